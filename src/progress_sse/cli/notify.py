"""`watch --notify`: tell the person at the terminal that the watched task ended.

A desktop notification where the system has a notifier of its own (`notify-send`
on Linux and the BSDs, `osascript` on macOS), found on the PATH; else, or when the
notifier fails (no desktop session, as over SSH), the terminal bell. No new
dependency: each is a program the desktop already has.

The bell goes to stderr, never stdout: stdout may be JSON lines or plain lines
that a script reads, where a BEL byte would be data. On a terminal both are the
same screen, so it rings all the same.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import TextIO

from .terminal import TaskView, clean

BELL = "\a"
APP_NAME = "progress-sse"
# A notifier that has not answered by then (a desktop bus that hangs) gives way to the bell.
NOTIFIER_TIMEOUT = 5.0
MAX_BODY = 200
OUTCOME = {"success": "succeeded", "failure": "failed", "revoked": "was cancelled", "lost": "was lost"}
# osascript passes the words as arguments, so no quoting of task text into AppleScript.
_APPLESCRIPT = "on run argv\ndisplay notification (item 2 of argv) with title (item 1 of argv)\nend run"


def announce_end(view: TaskView, err: TextIO | None = None) -> str:
    """Tell that the task `view` shows has ended: a desktop notification, else the
    bell on `err` (stderr). Returns what told it: the notifier's name, or "bell"."""
    title, body = words(view)
    command = notifier(title, body)
    if command is not None and _ran(command):
        return os.path.basename(command[0])
    stream = err or sys.stderr
    stream.write(BELL)
    stream.flush()
    return "bell"


def words(view: TaskView) -> tuple[str, str]:
    """The notification's title ("demo.count succeeded") and body: the error of a
    failure, else the task's last message, else its result."""
    state = view.state or "?"
    title = f"{view.name or 'task'} {OUTCOME.get(state, state)}"
    payload = view.payload
    error = payload.get("error")
    if state == "failure" and isinstance(error, dict) and isinstance(error.get("type"), str):
        message = error.get("message")
        body = f"{error['type']}: {message}" if isinstance(message, str) and message else error["type"]
    elif view.message:
        body = view.message
    elif state == "success" and payload.get("result") is not None:
        body = "Result: " + json.dumps(payload["result"], ensure_ascii=False)
    else:
        body = ""
    body = clean(body)
    return title, body if len(body) <= MAX_BODY else body[: MAX_BODY - 1] + "…"


def notifier(title: str, body: str) -> list[str] | None:
    """The command that shows a desktop notification here, or None when there is none."""
    if sys.platform == "darwin":
        found = shutil.which("osascript")
        # `--` ends osascript's options, so a title that starts with a dash is not one.
        return [found, "-e", _APPLESCRIPT, "--", title, body] if found else None
    found = shutil.which("notify-send")
    return [found, f"--app-name={APP_NAME}", "--", title, body] if found else None


def _ran(command: list[str]) -> bool:
    """Whether the notifier showed it: it exited 0 in time. Its own complaints (no
    session bus, say) are not ours to print: the bell tells instead."""
    try:
        done = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=NOTIFIER_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0

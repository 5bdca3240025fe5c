"""The client commands: `watch`, `start` and `cancel`, clients of a running
server's HTTP API (docs/cli.md). They need no Redis settings, and log nothing.

An access token (--token, else PROGRESS_SSE_TOKEN) goes in each request's
`Authorization` header; no message of these commands ever shows it.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import shlex
import signal
import sys
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..config import ConfigError
from .errors import failed

if TYPE_CHECKING:
    # The client modules import aiohttp and rich: only these commands pay for that.
    import aiohttp

    from .client import AccessRefused, RetryPolicy

COMMANDS = ("watch", "start", "cancel")


# What `watch` (and `start --watch`) exits with, by the task's terminal state.
EXIT_SUCCESS, EXIT_FAILURE, EXIT_CANCELLED, EXIT_UNREACHABLE = 0, 1, 2, 3
# The server refused access (401, 403): no token, a wrong or expired one, or one without
# the scope. Not 3: getting a new token is the fix, and retrying with this one never is.
EXIT_REFUSED = 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C
# 128 + SIGPIPE: what a shell reports for `yes | head -1`, a program whose reader went
# away. Not 0: `watch` did not see how the task ended, and 0 would say it succeeded.
EXIT_BROKEN_PIPE = 141
# What `cancel` exits with besides 0 (cancelled) and 3: nothing was cancelled, the task
# had already ended. Not 0, so a script learns that the task's work may have been done.
EXIT_NOT_CANCELLED = 1
EXIT_STATUS = {"success": EXIT_SUCCESS, "failure": EXIT_FAILURE, "revoked": EXIT_CANCELLED, "lost": EXIT_CANCELLED}
EXIT_HELP = (
    "exit status: 0 the task succeeded, 1 it failed, 2 it was revoked (cancelled) or lost, "
    "3 the server cannot be reached or does not know the task (2 is also argparse's usage error), "
    f"{EXIT_REFUSED} access refused (401 or 403: no token, a wrong or expired one, or one that does not allow this), "
    "130 interrupted by Ctrl-C (the task keeps running), 141 stdout was closed early, as by `| head -1`"
)
CANCEL_HELP = (
    "exit status: 0 cancelled, 1 not cancelled because the task had already ended (stderr says how), "
    "3 the server cannot be reached, does not know the task, or could not cancel it "
    f"(2 is argparse's usage error), {EXIT_REFUSED} access refused (401 or 403: no token, a wrong or expired one, "
    "or one without cancel for this task), 141 stdout was closed early"
)
URL_ENV, DEFAULT_URL = "PROGRESS_SSE_URL", "http://localhost:8000"
RETRY_ENV, DEFAULT_RETRY_FOR = "PROGRESS_SSE_RETRY_FOR", 60.0
TOKEN_ENV = "PROGRESS_SSE_TOKEN"


def add_parsers(sub: Any) -> None:
    def url(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--url",
            help=f"base URL of the progress-sse server (the part before /tasks) [env {URL_ENV}; default {DEFAULT_URL}]",
        )
        p.add_argument(
            "--token",
            metavar="TOKEN",
            help="access token for a server that checks tokens, sent on every request (reconnects included) as "
            "'Authorization: Bearer TOKEN', never in the URL, and never printed. Prefer the environment "
            "variable: a flag's value is seen in shell history and by `ps`. An empty --token '' sends none "
            f"[env {TOKEN_ENV}; default none]",
        )

    def watching(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--json",
            action="store_true",
            dest="json_lines",
            help="print each event as one JSON object per line (its payload plus 'cursor') instead of a bar; "
            'when the server\'s history was reset, one line {"reset": REASON, "message": ..., '
            '"missing": [TASK_ID...], "cursor": ...} (no \'state\'), then the states that follow',
        )
        p.add_argument(
            "--retry-for",
            metavar="SECONDS",
            help="after the connection drops, keep reconnecting (with backoff, resuming at the last event) for "
            f"this long before giving up with exit status 3 [env {RETRY_ENV}; default {DEFAULT_RETRY_FOR:g}]",
        )
        p.add_argument(
            "--notify",
            action="store_true",
            help="when the task ends, say so with a desktop notification (notify-send on Linux, osascript on "
            "macOS, when on the PATH), else by ringing the terminal bell (a BEL on stderr)",
        )

    watch = sub.add_parser(
        "watch",
        help="follow a task's progress in the terminal until it ends",
        description="Draws a live progress bar on a terminal, plain lines when stdout is not one, or JSON lines "
        "with --json. Resumes where it left off if the connection drops. The traceback of a failed task is "
        "always printed.",
        epilog=EXIT_HELP,
    )
    watch.add_argument("task_id", metavar="TASK_ID", help="the task's id, as `progress-sse start` prints it")
    watch.add_argument(
        "--after",
        metavar="CURSOR",
        help="show the events after this cursor instead of starting at the task's current state: "
        "0 replays the task's whole history, the 'cursor' of a --json line resumes from there",
    )
    url(watch)
    watching(watch)

    start = sub.add_parser(
        "start",
        help="start an allow-listed task through the server and print its id",
        description="POSTs the task to <url>/tasks and prints only its id on stdout, so "
        "`id=$(progress-sse start demo.count)` works. A refused task (4xx) prints the server's reason on "
        "stderr and exits 3, as does a server that cannot be reached; a refused token (401, 403) exits "
        f"{EXIT_REFUSED}. With --watch, the watch uses the token the server sends back for the new task "
        "if it sends one (so a token that may only start tasks is enough), else --token.",
        epilog=f"with --watch, {EXIT_HELP}",
    )
    start.add_argument("name", metavar="NAME", help="the task's name on the server's allow-list, e.g. demo.count")
    start.add_argument(
        "--arg",
        action="append",
        default=[],
        dest="args",
        metavar="VALUE",
        type=_json_or_string,
        help="a positional argument; repeat for more, in order. Sent as JSON when it parses as JSON "
        "(20, 1.5, true, null, [1,2]), else as a string (hello). Quote a string that looks like JSON: '\"20\"'",
    )
    start.add_argument(
        "--kw",
        action="append",
        default=[],
        dest="kwargs",
        metavar="KEY=VALUE",
        type=_keyword,
        help="a keyword argument; repeatable. VALUE is read as for --arg: --kw n=20 sends 20, --kw label=hi sends 'hi'",
    )
    start.add_argument(
        "--watch",
        action="store_true",
        help="then watch the task, as `progress-sse watch --after 0` does: every event from 'queued' on",
    )
    url(start)
    watching(start)

    cancel = sub.add_parser(
        "cancel",
        help="cancel (revoke) a task through the server",
        description="Sends DELETE <url>/tasks/<id>: a queued task will not run, a running one is terminated. "
        "Prints 'cancelled <id> (revoked)' on stdout; anything else goes to stderr.",
        epilog=CANCEL_HELP,
    )
    cancel.add_argument("task_id", metavar="TASK_ID", help="the task's id, as `progress-sse start` prints it")
    url(cancel)


def _json_or_string(text: str) -> Any:
    """JSON when the text is JSON, else the text itself.

    NaN, Infinity and numbers too large for a float (1e999) are not JSON the server
    accepts, so they stay text rather than becoming a request that is refused."""

    def refuse(constant: str) -> Any:
        raise ValueError(constant)

    def finite(number: str) -> float:
        value = float(number)
        if not math.isfinite(value):
            raise ValueError(number)
        return value

    try:
        return json.loads(text, parse_constant=refuse, parse_float=finite)
    except ValueError:
        return text


def _keyword(text: str) -> tuple[str, Any]:
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, _json_or_string(value)


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command == "start":
        keys = [key for key, _ in args.kwargs]
        twice = sorted({key for key in keys if keys.count(key) > 1})
        if twice:
            parser.error(f"--kw {twice[0]} is given more than once")
        if not args.watch and (args.json_lines or args.retry_for is not None or args.notify):
            parser.error("--json, --retry-for and --notify apply to --watch; add --watch or leave them out")
    try:
        base_url = _base_url(args.url)
        # Only a watch reconnects: `cancel` reads no PROGRESS_SSE_RETRY_FOR that could stop it.
        retry_for = _retry_for(args.retry_for) if args.command != "cancel" else DEFAULT_RETRY_FOR
        token = _token(args.token)
        if token and (urlsplit(base_url).username or urlsplit(base_url).password):
            raise ConfigError("a user and password in the URL and a token cannot both be sent; give one of them")
    except ConfigError as exc:
        return failed(exc, 2)
    if isinstance(sys.stdout, io.TextIOWrapper):
        # A message with characters the pipe's encoding lacks must not crash the watch.
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        return asyncio.run(_interruptible(_client_main(args, base_url, retry_for, token)))
    except KeyboardInterrupt:  # Ctrl-C before the loop took SIGINT over
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return _reader_went_away()


def _reader_went_away() -> int:
    """stdout's reader is gone (`| head -1`): end quietly with 141, as a program that
    SIGPIPE ends would. Python ignores SIGPIPE, so the write raised instead of ending
    us. At exit Python flushes stdout once more: anything still buffered would meet
    the broken pipe again and print "Exception ignored … BrokenPipeError". With
    stdout pointed at /dev/null, that flush has somewhere to go."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a file descriptor (an embedding caller's stream)
        pass
    return EXIT_BROKEN_PIPE


async def _interruptible(work: Coroutine[Any, Any, int]) -> int:
    """Ctrl-C cancels the work (the live bar restores the terminal on its way out)
    and exits 130. Left to asyncio.run, a KeyboardInterrupt can surface mid-cleanup
    and kill the process by the signal instead."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    interrupted = False

    def on_sigint() -> None:
        nonlocal interrupted
        interrupted = True
        task.cancel()

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        return await task
    except asyncio.CancelledError:
        if interrupted:
            return EXIT_INTERRUPTED
        raise
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        if interrupted:  # on the way out: a second Ctrl-C must not end in a traceback
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _base_url(flag: str | None) -> str:
    """--url, else PROGRESS_SSE_URL, else the default; a bad one is named with where it came from."""
    name, value = ("--url", flag) if flag else (URL_ENV, os.environ.get(URL_ENV, "").strip())
    if not value:
        return DEFAULT_URL
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{name}={value!r} is not valid: expected http://host[:port][/prefix]")
    return value


def _retry_for(flag: str | None) -> float:
    name, value = ("--retry-for", flag) if flag is not None else (RETRY_ENV, os.environ.get(RETRY_ENV, "").strip())
    if not value:
        return DEFAULT_RETRY_FOR
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise ConfigError(f"{name}={value!r} is not valid: expected a number of seconds, 0 or more")
    return seconds


def _token(flag: str | None) -> str | None:
    """--token, else PROGRESS_SSE_TOKEN, else none. A bad one is named, but never shown:
    what it holds may be a secret."""
    from .client import is_token

    name, value = ("--token", flag) if flag is not None else (TOKEN_ENV, os.environ.get(TOKEN_ENV, ""))
    value = value.strip()
    if not value:
        return None
    if not is_token(value):
        raise ConfigError(
            f"{name} is not valid: expected a token of visible ASCII characters, with no spaces "
            "(its value is not shown)"
        )
    return value


def _refused(exc: AccessRefused, token: str | None) -> int:
    """A 401 or 403 ends the command: the server's sentence, and what to do when no token was sent."""
    hint = f" No token was sent: give one with --token or {TOKEN_ENV}." if token is None else ""
    print(f"progress-sse: {exc}{hint}", file=sys.stderr)
    return EXIT_REFUSED


async def _client_main(args: argparse.Namespace, base_url: str, retry_for: float, token: str | None) -> int:
    from .client import AccessRefused, ClientError, Rejected, RetryPolicy, new_session, start_task

    async with new_session() as session:
        if args.command == "cancel":
            return await _cancel(session, base_url, args.task_id, token)
        policy = RetryPolicy(give_up_after=retry_for)
        if args.command == "watch":
            return await watch(
                session,
                base_url,
                args.task_id,
                json_lines=args.json_lines,
                policy=policy,
                cursor=args.after,
                url_flag=args.url,
                token=token,
                notify=args.notify,
            )
        try:
            started = await start_task(session, base_url, args.name, args.args, dict(args.kwargs), token=token)
        except AccessRefused as exc:
            return _refused(exc, token)
        except Rejected as exc:
            print(f"progress-sse: the server refused the task (HTTP {exc.status}): {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE
        except ClientError as exc:
            return failed(exc, EXIT_UNREACHABLE)
        if not args.watch:
            print(started.id, flush=True)
            return EXIT_SUCCESS
        # Cursor 0: the whole log, so nothing between the POST and the stream's start is missed.
        # The server's watch token for this task, when it sent one: the token given may
        # only allow starting tasks.
        return await watch(
            session,
            base_url,
            started.id,
            json_lines=args.json_lines,
            policy=policy,
            cursor="0",
            url_flag=args.url,
            token=_watching_token(token, started.token, started.id),
            notify=args.notify,
        )


def _watching_token(given: str | None, handed_back: str | None, task_id: str) -> str | None:
    """The token to watch a task just started with: the one given when it covers the
    task already (an operator's sees tracebacks, which the handed-back watch token
    does not), else the one the 202 handed back, else the one given. The claims are
    read, not checked: the server checks them."""
    if given and handed_back:
        import jwt

        try:
            claims = jwt.decode(given, options={"verify_signature": False})
        except jwt.PyJWTError:
            return handed_back
        tasks = claims.get("tasks")
        if claims.get("operator") is True or (isinstance(tasks, list) and task_id in tasks):
            return given
    return handed_back or given


async def watch(
    session: aiohttp.ClientSession,
    base_url: str,
    task_id: str,
    *,
    json_lines: bool,
    policy: RetryPolicy | None = None,
    cursor: str | None = None,
    url_flag: str | None = None,
    token: str | None = None,
    notify: bool = False,
) -> int:
    """Follow the task with the renderer that suits stdout; the exit status of its end.

    Cancelled (by Ctrl-C: `_interruptible`), it says on stderr that the task goes on
    and how to cancel it; `url_flag`, the --url given if any, goes into that command
    (the token never does). With `notify`, an end is told once the outcome is shown
    (cli/notify.py); a watch that stops for any other reason tells nothing."""
    from .client import AccessRefused, ClientError, Reconnecting, Reset, follow
    from .notify import announce_end
    from .terminal import make_renderer

    renderer = make_renderer(task_id, json_lines=json_lines)
    ended: str | None = None
    try:
        with renderer:
            async for item in follow(session, base_url, task_id, cursor=cursor, policy=policy, token=token):
                if isinstance(item, Reconnecting):
                    renderer.reconnecting(item)
                    continue
                if isinstance(item, Reset):
                    # Not an end: the task's current state follows, or its next event
                    # when no state of it survived.
                    renderer.reset(item)
                    continue
                renderer.event(item)
                if item.terminal:
                    ended = item.state
                    break
    except AccessRefused as exc:  # also a reconnect refused because the token expired mid-stream
        return _refused(exc, token)
    except ClientError as exc:
        return failed(exc, EXIT_UNREACHABLE)
    except asyncio.CancelledError:
        # The with block has taken the live row down, so the note goes below its last state.
        view = renderer.view
        _stopped_watching(task_id, view.state if view.terminal else None, url_flag)
        raise
    if ended is None:  # follow() ends only after a terminal event or by raising: for the type checker
        return EXIT_UNREACHABLE
    if notify:
        # After the with block, so the outcome (and the live row's last state) is on
        # screen first. A notifier is a process to wait for: not on the event loop.
        await asyncio.to_thread(announce_end, renderer.view)
    return EXIT_STATUS.get(ended, EXIT_FAILURE)


def _stopped_watching(task_id: str, ended_as: str | None, url_flag: str | None) -> None:
    """Ctrl-C's note on stderr: the task goes on without the watch, and how to stop it."""
    from .terminal import clean, isatty

    if ended_as:
        note = f"Stopped watching. Task {task_id} had already ended ({ended_as})."
    else:
        # Ready to paste: quoted, and with the --url this watch was given.
        command = shlex.join(["progress-sse", "cancel", task_id, *(["--url", url_flag] if url_flag else [])])
        note = f"Stopped watching. Task {task_id} keeps running; cancel it with: {command}"
    # On a terminal the cursor is at the start of a line, after the `^C` the terminal
    # echoed; a carriage return writes the note over that echo.
    start = "\r" if isatty(sys.stderr) else ""
    print(start + clean(note), file=sys.stderr, flush=True)


async def _cancel(session: aiohttp.ClientSession, base_url: str, task_id: str, token: str | None) -> int:
    """`cancel`: 0 when this cancelled the task, 1 when it had already ended, 3 when the
    server could not be asked, does not know the task, or could not cancel it, 4 when
    it refused access."""
    from .client import AccessRefused, AlreadyEnded, ClientError, cancel_task

    try:
        state = await cancel_task(session, base_url, task_id, token)
    except AccessRefused as exc:
        return _refused(exc, token)
    except AlreadyEnded as exc:
        return failed(exc, EXIT_NOT_CANCELLED)
    except ClientError as exc:
        return failed(exc, EXIT_UNREACHABLE)
    if state != "revoked":
        # It ended on its own while the server was revoking it (the worker's word came first).
        print(f"progress-sse: Task {task_id} ended ({state}) before it could be cancelled.", file=sys.stderr)
        return EXIT_NOT_CANCELLED
    print(f"cancelled {task_id} ({state})", flush=True)
    return EXIT_SUCCESS

"""Drawing one task's events for `progress-sse watch`: a live bar, plain lines, or JSON lines.

- `LiveRenderer` (stdout is a terminal): a rich progress row that redraws in
  place. A spinner, the bar, percent and `current/total`, rate, ETA and elapsed
  time while the total is known; a spinner, a pulsing bar, the message and the
  elapsed time while it is not. Retries are printed above the row, the result or
  the error below it at the end. The row stops short of the terminal's last
  columns, so Ctrl-C leaves it on screen once (see `_RoomForCtrlC`).
- `PlainRenderer` (a pipe or a file): one line per state change or progress
  update, never a redraw, so logs and `grep` stay readable.
- `JsonRenderer` (`--json`): one JSON object per line, the event's payload plus
  its `cursor`.

A `reset` of the server's history is one line in every mode (`reset_line`; in
JSON, `{"reset": reason, "message", "missing", "cursor"}`), then the states that
follow are shown as they come.

Rate, ETA and elapsed time come from the events' own `ts`, not from when they
arrived: a watch that joins late, or resumes and receives a burst of stored
events, still shows the task's real pace. Only differences between two `ts`
values are used, so a worker clock that is off does not skew them.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from datetime import timedelta
from types import TracebackType
from typing import Any, TextIO

from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.json import JSON
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID
from rich.spinner import Spinner
from rich.table import Column
from rich.text import Text

from .client import Reconnecting, Reset, TaskEvent

# The rate is the slope over the events of the last RATE_WINDOW seconds (task
# time): long enough to smooth out jitter, short enough to follow a change of pace.
RATE_WINDOW = 10.0


class TaskView:
    """What the renderers show, kept up to date from the events."""

    def __init__(self, task_id: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.task_id = task_id
        self.clock = clock
        self.name: str | None = None
        self.state: str | None = None
        self.current: float = 0
        self.total: float | None = None
        self.percent: float | None = None
        self.message: str | None = None
        self.payload: dict[str, Any] = {}
        self.terminal = False
        self.rate: float | None = None  # units of `current` per second
        self.started = False  # a `started` event was seen, so `elapsed` is the run time
        self.notice: str | None = None  # reconnecting…, until the next event
        self._eta: float | None = None  # seconds left as of the last event
        self._samples: deque[tuple[float, float]] = deque()
        self._anchor_ts: float | None = None  # task time that elapsed counts from
        self._last_ts: float | None = None
        self._last_seen = clock()  # when the last event arrived (local monotonic time)

    @property
    def determinate(self) -> bool:
        return self.total is not None and self.percent is not None

    def apply(self, event: TaskEvent) -> None:
        p = event.payload
        self.payload = p
        self.state = event.state
        self.terminal = event.terminal
        self.name = clean(p["name"]) if isinstance(p.get("name"), str) else self.name
        self.message = clean(p["message"]) if isinstance(p.get("message"), str) else None
        self.notice = None
        total = _number(p.get("total"))
        if total != self.total:
            self._samples.clear()  # a new total is a new pace
        self.current = _number(p.get("current")) or 0
        self.total = total
        self.percent = _number(p.get("percent")) if total is not None else None
        self._last_seen = self.clock()
        ts = _number(p.get("ts"))
        if ts is not None:
            if event.state == "started" and not self.started:
                self.started, self._anchor_ts = True, ts
            if self._anchor_ts is None:
                self._anchor_ts = ts
            self._last_ts = ts
            self._sample(ts)

    def reset(self, missing: bool) -> None:
        """The server's history started over: the pace measured so far is void. A task
        with no state left (`missing`) shows none of its old figures, only that it
        waits for its next event."""
        self._samples.clear()
        self.rate, self._eta = None, None
        if missing:
            self.current, self.total, self.percent, self.message = 0, None, None, None
            self.notice = "history lost; waiting for the task's next event"

    def _sample(self, ts: float) -> None:
        if self._samples and self.current < self._samples[-1][1]:
            self._samples.clear()  # counting started over (a retry): old pace is void
        self._samples.append((ts, self.current))
        while len(self._samples) > 2 and ts - self._samples[0][0] > RATE_WINDOW:
            self._samples.popleft()
        (t0, c0), (t1, c1) = self._samples[0], self._samples[-1]
        self.rate = (c1 - c0) / (t1 - t0) if t1 > t0 and c1 > c0 else None
        remaining = (self.total - self.current) if self.total is not None else None
        self._eta = remaining / self.rate if self.rate and remaining is not None and remaining >= 0 else None

    def elapsed(self) -> float | None:
        """Seconds since the task started (or since the first event seen); frozen once it ended."""
        if self._anchor_ts is None or self._last_ts is None:
            return None
        since = 0.0 if self.terminal else self.clock() - self._last_seen
        return max(0.0, self._last_ts - self._anchor_ts + since)

    def eta(self) -> float | None:
        """Seconds left at the current rate, counting down between events."""
        if self._eta is None or self.terminal or not self.determinate:
            return None
        return max(0.0, self._eta - (self.clock() - self._last_seen))

    def figures(self) -> str:
        """`3/10 (30.0%)`, or `3 (total unknown)` while indeterminate."""
        current, total, percent = self.current, self.total, self.percent
        if total is not None and percent is not None:
            return f"{_num(current)}/{_num(total)} ({percent:.1f}%)"
        return f"{_num(current)} (total unknown)" if current else "(total unknown)"

    def summary(self) -> str:
        """The one line that says how the task ended, or what it is doing."""
        p, state, label = self.payload, self.state or "?", self.name or "task"
        if state == "success":
            took = f" in {duration(self.elapsed())}" if self.started else ""
            return f"{label} succeeded{took}"
        if state == "failure":
            error = _error(p)
            kind = error.get("type") or "Error"
            text = error.get("message") or self.message or ""
            return f"{label} failed: {kind}: {text}" if text else f"{label} failed: {kind}"
        if state == "revoked":
            reason = p.get("reason")
            why = f" ({clean(reason)})" if isinstance(reason, str) and reason != "revoked" else ""
            return f"{label} was cancelled{why}" + (f": {self.message}" if self.message else "")
        if state == "lost":
            return f"{label} was lost" + (f": {self.message}" if self.message else "")
        if state == "retry":
            return f"retry #{p.get('retries', '?')}" + (f": {self.message}" if self.message else "") + self._retry_eta()
        return f"{state}: {self.message}" if self.message else state

    def _retry_eta(self) -> str:
        eta, ts = _number(self.payload.get("eta")), _number(self.payload.get("ts"))
        if eta is None or ts is None:
            return ""
        return f" (next attempt in {max(0.0, eta - ts):.1f} s)"

    def has_result(self) -> bool:
        return self.state == "success" and self.payload.get("result") is not None

    def traceback(self) -> str | None:
        error = self.payload.get("error")
        if self.state == "failure" and isinstance(error, dict) and isinstance(error.get("traceback"), str):
            return clean(str(error["traceback"]), lines=True).rstrip("\n") or None
        return None


class Renderer:
    """Shows a task's events; a context manager so a live display is always torn down."""

    def __init__(self, task_id: str) -> None:
        self.view = TaskView(task_id)

    def __enter__(self) -> Renderer:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        return None

    def event(self, event: TaskEvent) -> None:
        raise NotImplementedError

    def reconnecting(self, notice: Reconnecting) -> None:
        raise NotImplementedError

    def reset(self, reset: Reset) -> None:
        raise NotImplementedError


def reconnect_text(notice: Reconnecting) -> str:
    return f"connection lost ({notice.reason}); reconnecting in {notice.delay:.1f} s (attempt {notice.attempt})"


def reset_line(reset: Reset, task_id: str) -> str:
    """The one line that says the history was reset, and why; it starts with `reset`, as
    plain lines start with their state."""
    why = clean(reset.message) if reset.message else "the server's event history started over."
    line = f"reset ({clean(reset.reason)}): {why}"
    if task_id in reset.missing:
        line += " No state of this task survived; waiting for its next event."
    return line


class JsonRenderer(Renderer):
    """One JSON object per line: the payload plus `cursor`; notices go to stderr."""

    def __init__(self, task_id: str, out: TextIO, err: TextIO) -> None:
        super().__init__(task_id)
        self.out, self.err = out, err

    def event(self, event: TaskEvent) -> None:
        # ensure_ascii: every byte is ASCII, whatever the locale of the pipe.
        self.out.write(json.dumps({**event.payload, "cursor": event.cursor}) + "\n")
        self.out.flush()

    def reconnecting(self, notice: Reconnecting) -> None:
        print(f"progress-sse: {reconnect_text(notice)}", file=self.err, flush=True)

    def reset(self, reset: Reset) -> None:
        line = {"reset": reset.reason, "message": reset.message, "missing": list(reset.missing), "cursor": reset.cursor}
        self.out.write(json.dumps(line) + "\n")
        self.out.flush()


class PlainRenderer(Renderer):
    """One line per change, for pipes and files; the result or traceback at the end."""

    def __init__(self, task_id: str, out: TextIO, err: TextIO) -> None:
        super().__init__(task_id)
        self.out, self.err = out, err
        self._last: tuple[Any, ...] | None = None

    def _print(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def event(self, event: TaskEvent) -> None:
        view = self.view
        if view.state is None:
            name = event.payload.get("name")
            self._print(f"task {clean(view.task_id)} ({clean(name) if isinstance(name, str) else 'unknown name'})")
        view.apply(event)
        key = (view.state, view.current, view.total, view.message)
        if key == self._last:
            return  # nothing a reader would see as new
        self._last = key
        self._print(plain_line(view))
        if view.has_result():
            # One line, so `grep '^result: '` gets all of it.
            self._print("result: " + json.dumps(view.payload["result"], ensure_ascii=False))
        traceback = view.traceback()
        if traceback:
            self._print(traceback)

    def reconnecting(self, notice: Reconnecting) -> None:
        print(f"progress-sse: {reconnect_text(notice)}", file=self.err, flush=True)

    def reset(self, reset: Reset) -> None:
        self.view.reset(self.view.task_id in reset.missing)
        self._print(reset_line(reset, self.view.task_id))
        self._last = None  # the state that follows is news, even if it reads as before


def plain_line(view: TaskView) -> str:
    """`<state> <details>`: every line starts with the state, so `grep`/`awk` can pick."""
    state, p = view.state or "?", view.payload
    message = f" {view.message}" if view.message else ""
    if state == "progress":
        line = f"progress {view.figures()}{message}"
        if view.rate:
            eta = view.eta()
            line += f" [{view.rate:.1f}/s" + (f", eta {duration(eta, up=True)}]" if eta is not None else "]")
        return line
    if state == "retry":
        return view.summary()
    if state == "success":
        took = f" in {duration(view.elapsed())}" if view.started else ""
        return f"success {view.figures()}{took}" if view.determinate else f"success{took}"
    if state == "failure":
        error = _error(p)
        kind, text = error.get("type") or "Error", error.get("message") or view.message or ""
        return f"failure {kind}: {text}" if text else f"failure {kind}"
    if state == "revoked":
        reason = p.get("reason")
        return f"revoked ({clean(reason)}){message}" if isinstance(reason, str) else f"revoked{message}"
    return f"{state}{message}"


def _state_line(view: TaskView) -> str:
    return f"{view.state}" + (f" {view.message}" if view.message else "")


class _ViewColumn(ProgressColumn):
    """A column drawn from the TaskView rather than from rich's own task counters."""

    def __init__(self, draw: Callable[[], RenderableType], column: Column | None = None) -> None:
        self._draw = draw
        super().__init__(table_column=column)

    def render(self, task: Task) -> RenderableType:
        return self._draw()


# Columns the live row leaves free at the right edge: room for the `^C` a terminal echoes.
CTRL_C_ROOM = 2


class _RoomForCtrlC:
    """The live row, `CTRL_C_ROOM` columns narrower than the terminal (re-measured at each draw).

    A row as wide as the terminal leaves the cursor past its last column, so the
    `^C` the terminal echoes on Ctrl-C wraps onto the next line. rich's final redraw
    then starts on that line and the row ends up on screen twice. With room to
    spare, the echo lands beside the row and the redraw wipes it."""

    def __init__(self, row: RenderableType) -> None:
        self.row = row

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from console.render(self.row, options.update_width(max(1, options.max_width - CTRL_C_ROOM)))


class _Progress(Progress):
    def get_renderable(self) -> RenderableType:
        return _RoomForCtrlC(super().get_renderable())


class LiveRenderer(Renderer):
    """A rich progress row, redrawn in place; the outcome printed below it at the end."""

    def __init__(self, task_id: str, console: Console) -> None:
        super().__init__(task_id)
        self.console = console
        self._spinner = Spinner("dots", style="progress.spinner")
        view = self.view
        self.progress = _Progress(
            _ViewColumn(self._status),
            _ViewColumn(lambda: Text(view.name or "task", style="bold")),
            BarColumn(bar_width=30),
            _ViewColumn(self._figures),
            _ViewColumn(lambda: Text(f"{view.rate:.1f}/s" if view.rate else "", style="progress.data.speed")),
            _ViewColumn(self._eta),
            _ViewColumn(lambda: Text(duration(view.elapsed()), style="progress.elapsed")),
            # The message can be long: it is cut, never wrapped, so the row stays one line.
            _ViewColumn(self._text, Column(no_wrap=True, overflow="ellipsis", ratio=1)),
            console=console,
            # The row and whatever we print stay on screen; stdout is ours alone.
            transient=False,
            redirect_stdout=False,
            redirect_stderr=False,
            expand=True,
        )
        self._bar: TaskID | None = None
        self._bar_determinate = False

    def __enter__(self) -> Renderer:
        self.console.print(Text(f"task {clean(self.view.task_id)}", style="dim"))
        self.progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.progress.stop()  # draws the last state of the row and leaves it
        if self.view.terminal:
            self._outcome()

    def event(self, event: TaskEvent) -> None:
        view = self.view
        view.apply(event)
        if view.state == "retry":
            self.progress.console.print(Text(f"↻ {view.summary()}", style="yellow"))
        self._update_bar()

    def reconnecting(self, notice: Reconnecting) -> None:
        self.view.notice = reconnect_text(notice)
        self.progress.refresh()

    def reset(self, reset: Reset) -> None:
        self.view.reset(self.view.task_id in reset.missing)
        self.progress.console.print(Text(f"↺ {reset_line(reset, self.view.task_id)}", style="yellow"))
        self._update_bar()

    def _update_bar(self) -> None:
        view = self.view
        if view.terminal:
            # Full on success; a task that ended otherwise keeps its place, or is empty
            # if it never had a total (a pulse would claim it is still working).
            determinate = True
            done = 100.0 if view.state == "success" else (view.percent or 0.0)
        else:
            determinate, done = view.determinate, view.percent or 0.0
        if self._bar is None or (self._bar_determinate and not determinate):
            # rich's update() cannot take a total back to None (unknown); a new row can.
            if self._bar is not None:
                self.progress.remove_task(self._bar)
            self._bar = self.progress.add_task("", total=100.0 if determinate else None)
        self.progress.update(self._bar, total=100.0 if determinate else None, completed=done)
        self._bar_determinate = determinate
        self.progress.refresh()

    def _status(self) -> RenderableType:
        state = self.view.state
        if state == "success":
            return Text("✓", style="green")
        if state in ("failure", "lost"):
            return Text("✗", style="red")
        if state == "revoked":
            return Text("⊘", style="yellow")
        return self._spinner.render(self.console.get_time())

    def _figures(self) -> Text:
        # Read once: rich draws from its refresh thread while events update the view.
        current, total, percent = self.view.current, self.view.total, self.view.percent
        if total is not None and percent is not None:
            return Text(f"{percent:5.1f}% {_num(current)}/{_num(total)}", style="progress.percentage")
        return Text(f"{_num(current)}/?" if current else "", style="progress.percentage")

    def _eta(self) -> Text:
        view = self.view
        if not view.determinate or view.terminal:
            return Text("")
        eta = view.eta()
        return Text(f"eta {duration(eta, up=True)}" if eta is not None else "eta -:--:--", style="progress.remaining")

    def _text(self) -> Text:
        view = self.view
        if view.notice:
            return Text(view.notice, style="yellow")
        if view.state == "progress":
            return Text(view.message or "")
        if view.terminal:
            return Text(view.state or "")
        return Text(view.summary() if view.state == "retry" else _state_line(view), style="dim")

    def _outcome(self) -> None:
        view, out = self.view, self.console
        style = {"success": "bold green", "revoked": "bold yellow"}.get(view.state or "", "bold red")
        out.print(Text(view.summary(), style=style))
        if view.has_result():
            out.print(JSON.from_data(view.payload["result"], ensure_ascii=False))
        traceback = view.traceback()
        if traceback:
            out.print(Text(traceback, style="dim"), highlight=False)


def make_renderer(task_id: str, *, json_lines: bool, out: TextIO | None = None, err: TextIO | None = None) -> Renderer:
    """JSON lines when asked; a live bar on a terminal; plain lines everywhere else."""
    out = out or sys.stdout
    err = err or sys.stderr
    if json_lines:
        return JsonRenderer(task_id, out, err)
    # stdout itself decides, not rich's FORCE_COLOR: colours in a CI log are fine, a
    # bar redrawn ten times a second into it is not.
    if isatty(out) and os.environ.get("TERM", "").lower() not in ("dumb", "unknown"):
        return LiveRenderer(task_id, Console(file=out))
    return PlainRenderer(task_id, out, err)


def isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except ValueError:  # closed
        return False


def duration(seconds: float | None, *, up: bool = False) -> str:
    """`0:01:05`, as rich's own time columns show it; `-:--:--` when unknown.

    Elapsed time rounds down; a time left rounds `up`, so it never reads 0 early."""
    if seconds is None:
        return "-:--:--"
    return str(timedelta(seconds=math.ceil(seconds) if up else int(seconds)))


def _error(payload: dict[str, Any]) -> dict[str, str]:
    """The failure's `type` and `message`, made safe to print."""
    error = payload.get("error")
    if not isinstance(error, dict):
        return {}
    return {k: clean(v) for k in ("type", "message") if isinstance(v := error.get(k), str)}


# Control characters in task text (an ESC from a file name, a message with a newline)
# must neither drive the terminal nor break a one-line-per-update output: they are
# shown escaped. Tab stays; newline stays only where lines are expected (tracebacks).
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x00, 0x20), *range(0x7F, 0xA0)] if c != 0x09}
_CONTROL.update({0x0A: "\\n", 0x0D: "\\r"})
_CONTROL_LINES = {**_CONTROL, 0x0A: "\n"}


def clean(text: str, *, lines: bool = False) -> str:
    """`text` with control characters escaped (`\\x1b`, `\\n`), so it prints as it reads."""
    return text.translate(_CONTROL_LINES if lines else _CONTROL)


def _number(value: Any) -> float | None:
    # bool is an int to Python, but never a count.
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"

"""The protocol facts that static/progress.js must spell out for itself.

progress.js is a dependency-free client that users may copy into their own
projects, so it cannot ask the server for these; this test holds its copies to
the Python definitions instead."""

from __future__ import annotations

import json
import re
from pathlib import Path

from progress_sse.events import TERMINAL_STATES, State
from progress_sse.keys import TASK_ID_PATTERN
from progress_sse.web.handlers import MAX_STREAM_TASKS

CLIENT = (Path(__file__).resolve().parents[1] / "static" / "progress.js").read_text()


def js_constant(name: str) -> str:
    match = re.search(rf"^(?:export )?const {name} = (.+);$", CLIENT, re.M)
    assert match, f"progress.js no longer defines {name}"
    return match.group(1)


def test_terminal_states_are_the_servers() -> None:
    listed = js_constant("TERMINAL_STATES").removeprefix("Object.freeze(").removesuffix(")")
    assert set(json.loads(listed)) == set(TERMINAL_STATES)


def test_the_task_id_pattern_is_the_servers() -> None:
    assert js_constant("TASK_ID") == f"/^{TASK_ID_PATTERN}$/"


def test_the_tasks_per_stream_limit_is_the_servers() -> None:
    assert int(js_constant("MAX_TASKS_PER_STREAM")) == MAX_STREAM_TASKS


def test_every_state_is_the_servers_in_order() -> None:
    head = json.loads(js_constant("STATES").replace(", ...TERMINAL_STATES", ""))  # [queued, …] + the terminal ones
    terminal = json.loads(js_constant("TERMINAL_STATES").removeprefix("Object.freeze(").removesuffix(")"))
    assert [*head, *terminal] == [state.value for state in State]

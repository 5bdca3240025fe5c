"""Both copies of the group aggregate against one table of cases (tests/group_cases.json).

The server folds a group's members in src/progress_sse/web/groups.py; the page folds
the same members off its shared stream in static/groups.js. docs/protocol.md is the
contract for both, and the table spells it out case by case, so a change to either
copy that the other does not follow fails here.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from progress_sse.web.groups import aggregate

from .conftest import Server

TABLE = json.loads((Path(__file__).parent / "group_cases.json").read_text())
CASES: list[dict[str, Any]] = TABLE["cases"]
FIELDS = ("state", "current", "total", "percent", "done")


def bar_fields(bar: dict[str, Any]) -> dict[str, Any]:
    return {field: bar[field] for field in FIELDS}


def test_the_table_names_each_case_once_and_answers_every_field() -> None:
    names = [case["case"] for case in CASES]
    assert len(names) == len(set(names))
    assert all(set(case["bar"]) == set(FIELDS) for case in CASES)


@pytest.mark.parametrize("case", CASES, ids=[case["case"] for case in CASES])
def test_server_aggregate_answers_the_table(case: dict[str, Any]) -> None:
    members = {f"m{i}": member for i, member in enumerate(case["members"])}
    bar = aggregate("g", members, case["tasks"])
    assert bar_fields(bar) == case["bar"]
    assert bar["message"] == f"{case['bar']['done']} of {case['tasks']} tasks done"


# Runs every case through the page's module, imported from its versioned URL the
# way page.js imports it, and returns the answers in the table's order.
RUN_CASES = """async ([url, cases]) => {
  const { aggregate } = await import(url);
  return cases.map((c) => aggregate(c.members, c.tasks));
}"""


@pytest.mark.e2e
@pytest.mark.browser
async def test_page_aggregate_answers_the_table(server: Server, output_dir: Path) -> None:
    from progress_sse.web.pages import ASSETS

    from .browser import open_browser

    shots = output_dir / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    async with open_browser(shots, "group-cases") as page:
        # Any page of the app's origin, under its CSP; an unknown task's page is the
        # one that needs no worker and no task.
        await page.page.goto(server.url(f"/tasks/{uuid.uuid4()}"))
        url = server.url(f"/static/{server.app[ASSETS].version}/groups.js")
        bars = await page.page.evaluate(RUN_CASES, [url, CASES])
        page.forgive("404 (Not Found)")  # the unknown task's page itself
        assert page.unexpected_errors() == []

    wrong = [
        f"{case['case']}:\n  table {case['bar']}\n  page  {bar_fields(bar)}"
        for case, bar in zip(CASES, bars, strict=True)
        if bar_fields(bar) != case["bar"]
    ]
    assert not wrong, "static/groups.js disagrees with the table:\n" + "\n".join(wrong)
    messages = [bar["message"] for bar in bars]
    assert messages == [f"{case['bar']['done']} of {case['tasks']} tasks done" for case in CASES]

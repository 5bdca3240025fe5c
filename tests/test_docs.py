"""The documented answers are the server's: README.md and docs/protocol.md against a real server.

The bodies the docs show for POST /tasks and /healthz are compared, key by key,
with what a real server (real Redis, real worker) answers.
"""

from __future__ import annotations

import ast
import json
import re
import textwrap
from pathlib import Path

import pytest

from .conftest import Server

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("worker")]

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PROTOCOL = (ROOT / "docs" / "protocol.md").read_text()


def readme_start_example() -> dict[str, object]:
    """The 202 body the README prints after its `curl -s -X POST … /tasks`."""
    block = README.split("$ curl -s -X POST localhost:8000/tasks", 1)[1].split("```", 1)[0]
    line = next(line for line in block.splitlines() if line.startswith("{"))
    body: dict[str, object] = json.loads(line)
    return body


def protocol_fields(heading: str, pattern: str) -> set[str]:
    section = PROTOCOL.split(heading, 1)[1].split("\n### ", 1)[0]
    match = re.search(pattern, section, re.S)
    assert match, f"no body in {heading}"
    return set(re.findall(r'[{,]\s*"(\w+)"', match.group(1)))  # keys follow { or a comma; values a colon


async def test_the_202_body_is_the_documented_one(server: Server) -> None:
    async with server.session.post(server.url("/tasks"), json={"name": "demo.count", "kwargs": {"n": 1}}) as resp:
        assert resp.status == 202
        body = await resp.json()
    assert body["workers"] >= 1, "the session worker is alive, so no warning"
    assert set(readme_start_example()) == set(body)
    assert protocol_fields("### `POST /tasks`", r"the body\s+`(\{[^`]*\})`") == set(body)
    assert readme_start_example()["state"] == body["state"] == "queued"


async def test_the_healthz_body_is_the_documented_one(server: Server) -> None:
    async with server.session.get(server.url("/healthz")) as resp:
        body = await resp.json()
    documented = protocol_fields("### `GET /healthz`", r"`200` `(\{[^`]*\})`")
    assert documented == set(body)


def test_every_import_the_docs_show_works() -> None:
    """The public import paths users copy from the README and docs/integration.md
    (progress_sse.install, progress_sse.web.create_app, progress_sse.allowlist, …)
    keep working."""
    integration = (ROOT / "docs" / "integration.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", README + integration, re.S)
    imports = [
        ast.unparse(node)
        for block in blocks
        for node in ast.walk(ast.parse(textwrap.dedent(block)))
        if isinstance(node, ast.ImportFrom | ast.Import)
        and any(name.startswith("progress_sse") for name in _modules(node))
    ]
    assert len(imports) >= 8, imports
    for line in imports:
        exec(line, {})  # the docs' own import lines, nothing else


def _modules(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.ImportFrom):
        return [node.module or ""]
    return [alias.name for alias in node.names]

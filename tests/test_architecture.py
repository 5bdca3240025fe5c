"""The package's boundaries, as pyproject.toml's import contracts declare them:
the worker side imports nothing of the web or the terminal, the web nothing of
the CLI, and no sibling modules import each other both ways."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_hold() -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 4 kept, 0 broken." in result.stdout


def test_the_paths_of_the_flat_layout_still_run() -> None:
    """`celery -A progress_sse.tasks` and `python -m progress_sse.cli` from before
    the layout split keep working (each in a process of its own: importing the
    worker's app installs the bridge)."""
    code = "import progress_sse.tasks as t; print(t.app.main, sorted(n for n in t.app.tasks if n.startswith('demo.')))"
    app = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert app.returncode == 0, app.stderr
    assert app.stdout.strip() == "progress_sse ['demo.count', 'demo.fail', 'demo.flaky', 'demo.mystery', 'demo.stages']"
    cli = subprocess.run(
        [sys.executable, "-m", "progress_sse.cli", "--help"], capture_output=True, text=True, timeout=60
    )
    assert cli.returncode == 0 and "progress-sse" in cli.stdout, cli.stderr

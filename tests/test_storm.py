"""A reconnect storm of 1,000 clients, run by its benchmark (scripts/bench_storm.py):
clients following their tasks through a web restart all resume, with no error
status, no gap and no duplicate. Its timings are the benchmark's to
report (docs/benchmarks.md), not this test's to assert."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from progress_sse.config import Settings

pytestmark = pytest.mark.fault

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_storm.py"


def test_clients_resume_a_web_restart_without_an_error_status_a_gap_or_a_duplicate(settings: Settings) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--redis-url", settings.redis_url, "--clients", "1000", "--tasks", "50"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "answers to reconnects:" in done.stdout and "'503'" not in done.stdout, done.stdout
    assert "every progress event and the success 1000/1000" in done.stdout, done.stdout

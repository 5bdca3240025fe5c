"""`scripts/dev` installs only when pyproject.toml changed since its last install.

The script runs for real, in a copy of the repository's layout whose `.venv` holds
stand-ins that record how they were called: pip (so nothing is downloaded) and
the `progress-sse` console script (so no server starts).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy2(ROOT / "scripts" / "dev", tmp_path / "scripts" / "dev")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "progress-sse"\n')
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    calls = tmp_path / "calls.log"
    # pip exits with $PIP_STATUS (default 0); anything else runs on the real Python.
    (bin_dir / "python").write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then\n'
        f'    echo "pip $*" >>{calls}\n'
        '    exit "${PIP_STATUS:-0}"\n'
        "fi\n"
        f'exec {sys.executable} "$@"\n'
    )
    (bin_dir / "progress-sse").write_text(f'#!/bin/sh\necho "progress-sse $*" >>{calls}\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    return tmp_path


def run_dev(checkout: Path, *args: str, pip_status: int = 0) -> tuple[int, list[str]]:
    calls = checkout / "calls.log"
    calls.write_text("")
    result = subprocess.run(
        ["bash", str(checkout / "scripts" / "dev"), *args],
        env={"PATH": "/usr/bin:/bin", "PIP_STATUS": str(pip_status)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode, calls.read_text().splitlines()


def pip_installs(calls: list[str]) -> list[str]:
    return [call for call in calls if call.startswith("pip ") and "-e" in call.split()]


def test_first_start_installs_and_a_second_one_does_not(checkout: Path) -> None:
    status, calls = run_dev(checkout, "--port", "9000")
    assert status == 0
    assert pip_installs(calls) == ["pip -m pip install --quiet -e .[embedded]"]
    assert calls[-1] == "progress-sse dev --port 9000"

    status, calls = run_dev(checkout)
    assert status == 0
    assert calls == ["progress-sse dev"], "no pip at all: a second start works offline"


def test_a_changed_pyproject_installs_again(checkout: Path) -> None:
    run_dev(checkout)
    with (checkout / "pyproject.toml").open("a") as f:
        f.write('dependencies = ["rich"]\n')
    status, calls = run_dev(checkout)
    assert status == 0
    assert len(pip_installs(calls)) == 1


def test_a_failed_install_is_tried_again_next_time(checkout: Path) -> None:
    status, calls = run_dev(checkout, pip_status=1)
    assert status == 1
    assert not any(call.startswith("progress-sse") for call in calls), "no start on a failed install"
    status, calls = run_dev(checkout)
    assert status == 0
    assert len(pip_installs(calls)) == 1


def test_a_venv_that_lost_its_console_script_installs_again(checkout: Path) -> None:
    run_dev(checkout)
    (checkout / ".venv" / "bin" / "progress-sse").unlink()  # `pip uninstall`: the stamp alone would lie
    _, calls = run_dev(checkout)
    assert len(pip_installs(calls)) == 1

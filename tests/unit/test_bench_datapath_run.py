"""`bench/bench_datapath.py --run TABLE N`: what `--instructions` runs under valgrind.

valgrind is not needed here: the run mode itself must work in both builds, or the count
would be of a harness that failed at its first transaction."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_datapath.py"


@pytest.mark.parametrize("table", ["plain", "encrypted"])
def test_run_mode_runs_the_transactions(table: str) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--run", table, "3"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # nothing but the transactions: callgrind counts it all


def test_instructions_without_valgrind_says_what_is_missing(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--instructions"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={"PATH": str(tmp_path)},  # no valgrind on it
    )
    assert result.returncode == 1
    assert "needs valgrind" in result.stdout

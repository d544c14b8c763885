"""scripts/bootstrap.sh: which Python it creates .venv with (see the comments there)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bootstrap.sh"
CANDIDATES = ("python3", "/usr/bin/python3", "python3.13", "python3.12", "python3.11")

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/maps").exists(), reason="the check reads /proc/self/maps (Linux)"
)


def _functions() -> str:
    text = SCRIPT.read_text()
    found = [
        re.search(rf"^{name}\(\) \{{\n.*?^\}}\n", text, re.S | re.M)
        for name in ("describe_python", "pick_python")
    ]
    assert all(found), "bootstrap.sh no longer defines describe_python and pick_python"
    return "".join(m.group(0) for m in found if m)


def _bash(call: str) -> str:
    result = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + _functions() + call],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_describe_python_tells_a_shared_libpython_from_one_linked_in() -> None:
    # This test runs on a Python that holds pgseal's build (it imports it).
    with open("/proc/self/maps") as maps:
        expected = "shared" if "libpython" in maps.read() else "linked"
    assert _bash(f'describe_python "{sys.executable}"') == expected


def test_describe_python_says_nothing_for_what_cannot_hold_the_build(tmp_path: Path) -> None:
    # A Python without ensurepip (Debian without python3-venv): no venv with pip from it.
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "ensurepip.py").write_text("raise ImportError('no ensurepip here')\n")
    no_venv = tmp_path / "python-no-venv"
    no_venv.write_text(f'#!/bin/sh\nPYTHONPATH="{shadow}" exec "{sys.executable}" "$@"\n')
    no_venv.chmod(0o755)
    assert _bash(f'describe_python "{no_venv}" || true') == ""
    assert _bash(f'describe_python "{tmp_path / "missing"}" || true') == ""


def test_pick_python_prefers_a_candidate_with_libpython_linked_in() -> None:
    kinds = {
        cand: _bash(f'command -v "{cand}" >/dev/null && describe_python "{cand}" || true')
        for cand in CANDIDATES
    }
    picked = _bash("pick_python")
    usable = [cand for cand in CANDIDATES if kinds[cand]]
    if not usable:
        assert picked == "python3"
    elif any(kinds[cand] == "linked" for cand in usable):
        assert picked == next(cand for cand in usable if kinds[cand] == "linked")
    else:
        assert picked == usable[0]

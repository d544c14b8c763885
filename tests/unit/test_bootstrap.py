"""scripts/bootstrap.sh: which Python it creates .venv with (see the comments there)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bootstrap.sh"

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


def _bash(call: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + _functions() + call],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _shadowed(tmp_path: Path, name: str, sitecustomize: str) -> Path:
    """This test's Python, started with `sitecustomize` run first (to take something away)."""
    shadow = tmp_path / f"{name}-site"
    shadow.mkdir()
    (shadow / "sitecustomize.py").write_text(sitecustomize)
    wrapper = tmp_path / name
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{shadow}" exec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def test_describe_python_tells_a_shared_libpython_from_one_linked_in() -> None:
    with open("/proc/self/maps") as maps:
        kind = "shared" if "libpython" in maps.read() else "linked"
    assert _bash(f'describe_python "{sys.executable}"') == f"{kind} 3.{sys.version_info[1]}"


@pytest.mark.parametrize(
    "missing, sitecustomize",
    [
        # Debian without python3-venv: no ensurepip, so no venv with pip from it.
        ("ensurepip", "import sys; sys.modules['ensurepip'] = None\n"),
        # No Python.h (Debian without python3-dev): no compiled build.
        ("headers", "import sysconfig; _paths = sysconfig.get_paths\n"
                    "sysconfig.get_paths = lambda *a, **k: "
                    "{**_paths(*a, **k), 'include': '/nonexistent'}\n"),
        ("3.11", "import sys; sys.version_info = (3, 10, 14, 'final', 0)\n"),
    ],
)
def test_describe_python_says_nothing_for_what_cannot_hold_the_build(
    tmp_path: Path, missing: str, sitecustomize: str
) -> None:
    python = _shadowed(tmp_path, f"python-without-{missing}", sitecustomize)
    assert _bash(f'describe_python "{python}" || true') == ""
    assert _bash(f'describe_python "{tmp_path / "not-there"}" || true') == ""


def _fake(tmp_path: Path, name: str, answer: str | None) -> str:
    """A candidate that answers describe_python with `answer` (None: fails)."""
    fake = tmp_path / name
    body = "exit 1" if answer is None else f"echo '{answer}'"
    fake.write_text(f"#!/bin/sh\ncat >/dev/null\n{body}\n")
    fake.chmod(0o755)
    return str(fake)


@pytest.mark.parametrize(
    "answers, picked",
    [
        (["shared 3.11", "linked 3.11"], 1),  # same version, libpython linked in: taken
        (["linked 3.11", "linked 3.11"], 0),
        (["linked 3.11", "shared 3.11"], 0),
        (["shared 3.11", "linked 3.13"], 0),  # never a newer Python for it
        (["shared 3.11", "shared 3.12", "linked 3.11"], 2),
        ([None, "shared 3.12", "linked 3.12"], 2),  # the first that can hold the build sets it
        ([None, "shared 3.12"], 1),
    ],
)
def test_pick_python(tmp_path: Path, answers: list[str | None], picked: int) -> None:
    fakes = [_fake(tmp_path, f"python-{i}", answer) for i, answer in enumerate(answers)]
    candidates = " ".join([str(tmp_path / "not-there"), *fakes])
    assert _bash("pick_python", {"PGSEAL_PYTHONS": candidates}) == fakes[picked]


def test_pick_python_falls_back_to_python3(tmp_path: Path) -> None:
    candidates = " ".join([str(tmp_path / "not-there"), _fake(tmp_path, "broken", None)])
    assert _bash("pick_python", {"PGSEAL_PYTHONS": candidates}) == "python3"

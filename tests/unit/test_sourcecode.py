"""The code base itself: the pure packages stay pure, and the linters pass."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
PURE = ("wire", "session", "rewrite", "crypto", "policy")
# I/O, event loops and the HSM live in the shell packages only.
FORBIDDEN = {"asyncio", "socket", "ssl", "selectors", "subprocess", "pkcs11", "aiocache", "asyncpg",
             "psycopg", "uvloop", "urllib", "http"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
            if node.module.startswith("proxy."):
                names.add(node.module)
    return names


# Pure modules inside the shell packages, which the pure ones may use: the audit record and
# its hash chain (the data path builds records; test_pure_modules_in_shell_packages checks
# that they stay pure themselves).
PURE_IN_SHELL = ("proxy.audit.records",)


def _io_imports(path: Path) -> list[str]:
    """What `path` imports that a pure module may not: I/O, or the shell packages."""
    imported = imported_modules(path)
    shell = (
        m
        for m in imported
        if m.startswith(("proxy.server", "proxy.keys", "proxy.audit")) and m not in PURE_IN_SHELL
    )
    return sorted(imported & FORBIDDEN) + sorted(shell)


@pytest.mark.parametrize("package", PURE)
def test_pure_packages_do_no_io(package: str) -> None:
    offenders = []
    for path in sorted((ROOT / "proxy" / package).rglob("*.py")):
        bad = _io_imports(path)
        if bad:
            offenders.append(f"{path.relative_to(ROOT)}: {', '.join(bad)}")
    assert not offenders, "pure code imports I/O:\n" + "\n".join(offenders)


@pytest.mark.parametrize("module", PURE_IN_SHELL)
def test_pure_modules_in_shell_packages(module: str) -> None:
    bad = _io_imports(ROOT.joinpath(*module.split(".")).with_suffix(".py"))
    assert not bad, f"{module} imports I/O or shell code: {', '.join(bad)}"


# What importing the pure core may not load, even indirectly (a package's __init__, say):
# event loops, drivers, the HSM, and the shell's own modules. (Not socket or ssl: the standard
# library loads them for its own ends, e.g. email.utils under importlib.metadata.)
NOT_LOADED_BY_PURE = ("asyncio", "asyncpg", "aiocache", "pkcs11", "psycopg", "uvloop")


def test_importing_the_pure_core_loads_no_io() -> None:
    modules = [
        "proxy.wire.messages", "proxy.session.datapath", "proxy.session.connection",
        "proxy.rewrite.analyzer", "proxy.crypto.values", "proxy.policy.loader",
        *PURE_IN_SHELL,
    ]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    loaded = set(result.stdout.split())
    bad = sorted(
        m
        for m in loaded
        if m.split(".")[0] in NOT_LOADED_BY_PURE
        or (m.startswith(("proxy.server", "proxy.keys", "proxy.audit.")) and m not in PURE_IN_SHELL)
    )
    assert not bad, f"importing the pure core loads: {', '.join(bad)}"


def _tool(name: str) -> str:
    exe = Path(sys.executable).parent / name
    if exe.exists():
        return str(exe)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


def test_ruff() -> None:
    # What `make lint` checks: the tests and benchmarks too, so that it stays green.
    result = subprocess.run(
        [_tool("ruff"), "check", "proxy", "tests", "bench"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict() -> None:
    result = subprocess.run([_tool("mypy")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

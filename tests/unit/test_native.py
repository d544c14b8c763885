"""The compiled build: used only when it was built, whole, from the sources as they are now."""

from __future__ import annotations

import ast
import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy import _native
from proxy._native import (
    BUILD_MANIFEST,
    COMPILED_MODULES,
    SHARED_LIBRARY,
    build_problems,
    build_sources,
    source_path,
    use_pure_sources,
    why_not_compiled,
    write_manifest,
)

ROOT = Path(__file__).resolve().parent.parent.parent
EXT = importlib.machinery.EXTENSION_SUFFIXES[0]


def fake_package(tmp_path: Path, *, built: tuple[str, ...] = COMPILED_MODULES) -> Path:
    """A copy of the sources the compiled modules are built from, an "extension" for each
    module in `built` plus the shared library, and the manifest of a successful build."""
    package = tmp_path / "proxy"
    for path in build_sources():
        copy = package / path.relative_to(_native.PACKAGE_DIR)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(path.read_bytes())
    for name in built:
        source = source_path(name, package)
        source.with_name(source.stem + EXT).write_bytes(b"\x7fELF")
    if built:
        (package / f"{SHARED_LIBRARY}{EXT}").write_bytes(b"\x7fELF")
    write_manifest(package, package / BUILD_MANIFEST)
    return package


def test_a_whole_build_of_the_current_sources_may_run(tmp_path: Path) -> None:
    assert build_problems(fake_package(tmp_path)) == []


def test_the_build_covers_what_the_compiled_modules_import() -> None:
    names = {str(p.relative_to(_native.PACKAGE_DIR)) for p in build_sources()}
    # compiled modules, and modules whose constants mypyc copies into them
    assert {"session/datapath.py", "wire/messages.py", "errors.py", "crypto/_errors.py"} <= names
    assert "server/app.py" not in names and "cli.py" not in names


@pytest.mark.parametrize("edited", ["session/datapath.py", "crypto/_errors.py"])
def test_an_edited_source_makes_the_build_stale(tmp_path: Path, edited: str) -> None:
    package = fake_package(tmp_path)
    with (package / edited).open("a") as f:
        f.write("\nx = 1\n")
    assert build_problems(package) == [f"changed since the build: {edited}"]


@pytest.mark.parametrize(
    "manifest", [None, "", "{}", '{"modules": []}', '{"modules": [], "sources": []}']
)
def test_without_a_readable_manifest_the_build_never_runs(
    tmp_path: Path, manifest: str | None
) -> None:
    # setup.py deletes the manifest before compiling and writes it after: a failed or
    # interrupted build leaves extension files and no manifest.
    package = fake_package(tmp_path)
    if manifest is None:
        (package / BUILD_MANIFEST).unlink()
    else:
        (package / BUILD_MANIFEST).write_text(manifest)
    assert build_problems(package) == ["no build manifest"]


def test_a_missing_or_extra_extension_makes_the_build_stale(tmp_path: Path) -> None:
    package = fake_package(tmp_path, built=COMPILED_MODULES[1:])
    assert build_problems(package) == [
        "the compiled modules are not the ones COMPILED_MODULES names"
    ]
    package = fake_package(tmp_path / "extra")
    (package / "cli.py").write_text("")
    (package / f"cli{EXT}").write_bytes(b"\x7fELF")  # left from a build that compiled it
    assert build_problems(package) == [
        "the compiled modules are not the ones COMPILED_MODULES names"
    ]


def test_a_missing_shared_library_makes_the_build_stale(tmp_path: Path) -> None:
    package = fake_package(tmp_path)
    (package / f"{SHARED_LIBRARY}{EXT}").unlink()
    assert build_problems(package) == ["the compiled modules' shared library is missing"]


def test_a_pure_install_has_nothing_to_check(tmp_path: Path) -> None:
    package = fake_package(tmp_path, built=())
    (package / BUILD_MANIFEST).unlink()
    assert build_problems(package) == []


def _fresh_meta_path(monkeypatch: pytest.MonkeyPatch) -> None:
    without_ours = [f for f in sys.meta_path if not isinstance(f, _native._PureSourceFinder)]
    monkeypatch.setattr(sys, "meta_path", without_ours)
    monkeypatch.delenv("PGSEAL_PURE", raising=False)


def test_a_stale_build_loads_every_built_module_from_its_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = fake_package(tmp_path)
    (package / "cli.py").write_text("")
    (package / f"cli{EXT}").write_bytes(b"\x7fELF")
    _fresh_meta_path(monkeypatch)
    with pytest.warns(RuntimeWarning, match=r"not the ones COMPILED_MODULES.*pip install -e \."):
        reason = use_pure_sources(package)
    assert reason is not None and "not usable" in reason
    finder = sys.meta_path[0]
    for name, path in [("proxy.session.datapath", "session/datapath.py"), ("proxy.cli", "cli.py")]:
        spec = finder.find_spec(name, None)  # type: ignore[call-arg]
        assert spec is not None and spec.origin == str(package / path)
    assert finder.find_spec("proxy.server.app", None) is None  # type: ignore[call-arg]


def test_a_current_build_is_used_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fresh_meta_path(monkeypatch)
    before = list(sys.meta_path)
    assert use_pure_sources(fake_package(tmp_path)) is None
    assert sys.meta_path == before


def test_compiled_modules_do_not_rely_on_from_none() -> None:
    # Compiled, `raise X from None` leaves __suppress_context__ False: the error being
    # handled (a UnicodeDecodeError holding the client's bytes, say) would print with any
    # traceback that gets logged. proxy.errors.without_context(X) sets it in both builds.
    offenders = []
    for name in COMPILED_MODULES:
        path = source_path(name)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Raise)
                and isinstance(node.cause, ast.Constant)
                and not (
                    isinstance(node.exc, ast.Call)
                    and isinstance(node.exc.func, ast.Name)
                    and node.exc.func.id == "without_context"
                )
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, "raise ... from None without without_context:\n" + "\n".join(offenders)


def test_errors_from_compiled_decoders_carry_no_visible_context() -> None:
    from proxy.crypto.values import SessionFormat, ValueFormatError, to_canonical
    from proxy.wire import messages as m
    from proxy.wire.framing import ProtocolViolation

    with pytest.raises(ProtocolViolation) as violation:
        m.decode_execute(b"\xff\xfe\0\0\0\0\0")
    with pytest.raises(ValueFormatError) as refused:
        to_canonical("text", b"secret\xff", 0, SessionFormat())
    for error in (violation.value, refused.value):
        assert error.__cause__ is None and error.__suppress_context__


def _build_in_a_child(**env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", "import proxy._native as n; print(n.running_compiled())"],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, check=True,
    )
    return result.stdout.strip()


def test_pgseal_pure_runs_the_pure_build() -> None:
    assert _build_in_a_child(PGSEAL_PURE="1") == "False"


@pytest.mark.skipif(
    os.environ.get("PGSEAL_EXPECT_COMPILED") != "1", reason="PGSEAL_EXPECT_COMPILED=1 (make test)"
)
def test_the_install_runs_the_compiled_build_wherever_it_can() -> None:
    # A build that fell back to pure Python on a machine that can compile fails here, not
    # only in a benchmark.
    if (why_not := why_not_compiled()) is not None:
        pytest.skip(f"this machine builds the pure Python build: {why_not}")
    assert _build_in_a_child(PGSEAL_PURE="0") == "True"
    assert build_problems() == []

"""The compiled build: used only when it was built from the sources as they are now."""

from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy import _native
from proxy._native import (
    BUILD_MANIFEST,
    COMPILED_MODULES,
    source_path,
    stale_modules,
    use_pure_sources,
    write_manifest,
)

ROOT = Path(__file__).resolve().parent.parent.parent
MODULES = ("proxy.wire.framing", "proxy.session.datapath")
EXT = importlib.machinery.EXTENSION_SUFFIXES[0]


def fake_package(tmp_path: Path, *, built: tuple[str, ...] = MODULES) -> Path:
    """A package dir with the sources of MODULES and an "extension" for each in `built`."""
    package = tmp_path / "proxy"
    for name in MODULES:
        source = source_path(name, package)
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text(f"# {name}\n")
        if name in built:
            source.with_name(source.stem + EXT).write_bytes(b"\x7fELF")
    digests = {name: _native.source_digest(source_path(name, package)) for name in MODULES}
    (package / BUILD_MANIFEST).write_text(json.dumps({"modules": digests}))
    return package


def test_a_build_of_the_current_sources_is_not_stale(tmp_path: Path) -> None:
    assert stale_modules(fake_package(tmp_path), MODULES) == []


def test_an_edited_source_makes_its_module_stale(tmp_path: Path) -> None:
    package = fake_package(tmp_path)
    with source_path("proxy.session.datapath", package).open("a") as f:
        f.write("x = 1\n")
    assert stale_modules(package, MODULES) == ["proxy.session.datapath"]


@pytest.mark.parametrize("manifest", [None, "", "{}", '{"modules": []}', "[1]"])
def test_without_a_readable_manifest_every_built_module_is_stale(
    tmp_path: Path, manifest: str | None
) -> None:
    package = fake_package(tmp_path)
    if manifest is None:
        (package / BUILD_MANIFEST).unlink()
    else:
        (package / BUILD_MANIFEST).write_text(manifest)
    assert stale_modules(package, MODULES) == list(MODULES)


def test_a_module_built_but_no_longer_in_the_manifest_is_stale(tmp_path: Path) -> None:
    package = fake_package(tmp_path)
    (package / BUILD_MANIFEST).write_text(json.dumps({"modules": {MODULES[0]: "0" * 64}}))
    assert stale_modules(package, MODULES) == list(MODULES)


def test_a_pure_install_is_never_stale(tmp_path: Path) -> None:
    package = fake_package(tmp_path, built=())
    (package / BUILD_MANIFEST).unlink()
    assert stale_modules(package, MODULES) == []


def test_write_manifest_records_every_compiled_source(tmp_path: Path) -> None:
    package = tmp_path / "proxy"
    for name in COMPILED_MODULES:
        source_path(name, package).parent.mkdir(parents=True, exist_ok=True)
        source_path(name, package).write_text(name)
    recorded = json.loads(write_manifest(package).read_text())["modules"]
    assert sorted(recorded) == sorted(COMPILED_MODULES)
    for name in COMPILED_MODULES:
        source_path(name, package).with_name(source_path(name, package).stem + EXT).touch()
    assert stale_modules(package) == []


def test_a_stale_build_loads_every_compiled_module_from_its_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = fake_package(tmp_path)
    source_path("proxy.wire.framing", package).write_text("edited = True\n")
    without_ours = [f for f in sys.meta_path if not isinstance(f, _native._PureSourceFinder)]
    monkeypatch.setattr(sys, "meta_path", without_ours)
    monkeypatch.delenv("PGSEAL_PURE", raising=False)
    with pytest.warns(RuntimeWarning, match=r"proxy\.wire\.framing.*pip install -e \."):
        reason = use_pure_sources(package)
    assert reason is not None and "older than their source" in reason
    finder = sys.meta_path[0]
    spec = finder.find_spec("proxy.session.datapath", None)  # type: ignore[call-arg]
    assert spec is not None and spec.origin == str(source_path("proxy.session.datapath", package))
    assert finder.find_spec("proxy.cli", None) is None  # type: ignore[call-arg]


def test_a_current_build_is_used_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    without_ours = [f for f in sys.meta_path if not isinstance(f, _native._PureSourceFinder)]
    monkeypatch.setattr(sys, "meta_path", without_ours)
    monkeypatch.delenv("PGSEAL_PURE", raising=False)
    before = list(sys.meta_path)
    assert use_pure_sources(fake_package(tmp_path)) is None
    assert sys.meta_path == before


def _build_in_a_child(**env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", "import proxy._native as n; print(n.running_compiled())"],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, check=True,
    )
    return result.stdout.strip()


def test_pgseal_pure_runs_the_pure_build() -> None:
    assert _build_in_a_child(PGSEAL_PURE="1") == "False"


@pytest.mark.skipif(
    os.environ.get("PGSEAL_EXPECT_COMPILED") != "1",
    reason="PGSEAL_EXPECT_COMPILED=1 (make test, where a C compiler is) checks the build",
)
def test_the_install_runs_the_compiled_build() -> None:
    # `make test` sets PGSEAL_EXPECT_COMPILED where the build compiles: a build that fell
    # back to pure Python without saying so fails here, not only in a benchmark.
    assert _build_in_a_child(PGSEAL_PURE="0") == "True"
    assert all(_native.compiled_files(name) for name in COMPILED_MODULES)

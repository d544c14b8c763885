"""Build hook: compiles the data path's hot modules with mypyc (proxy/_native.py).

Everything else about the package is in pyproject.toml. PGSEAL_PURE_BUILD=1, or no C
compiler or Python headers on the machine, gives the pure Python build: the same
behaviour, more CPU. PGSEAL_REQUIRE_COMPILED=1 makes that an error instead (the Docker
image's build stage).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
PACKAGE = HERE / "proxy"


def _native_module() -> ModuleType:
    # proxy/_native.py on its own: importing the package would run its import-time check.
    spec = importlib.util.spec_from_file_location("_pgseal_native", PACKAGE / "_native.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NATIVE = _native_module()


def _remove_inplace_build() -> None:
    """No earlier compiled build is left in the source tree: not by a pure build, nor by a
    compiled one (the extension of a module no longer in COMPILED_MODULES would otherwise
    stay, and proxy/_native.py would rightly refuse the whole build for it)."""
    (PACKAGE / NATIVE.BUILD_MANIFEST).unlink(missing_ok=True)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for extension in PACKAGE.rglob(f"*{suffix}"):
            extension.unlink(missing_ok=True)


class BuildCompiledCore(build_ext):
    """build_ext that records the build (proxy/_compiled.json) only once it succeeded:
    a failed or interrupted compile leaves no manifest, so whatever extension files
    remain are never taken for current (proxy/_native.py)."""

    def run(self) -> None:
        super().run()  # ext_modules() removed the last build's manifest before mypycify
        if not self.extensions:
            return
        shared = self.get_ext_fullpath(f"proxy.{NATIVE.SHARED_LIBRARY}")
        NATIVE.write_manifest(PACKAGE, Path(shared).parent / NATIVE.BUILD_MANIFEST)


def ext_modules() -> list[object]:
    why_not = NATIVE.why_not_compiled()
    if why_not is not None:
        if os.environ.get("PGSEAL_REQUIRE_COMPILED") == "1":
            sys.exit(f"pgseal: PGSEAL_REQUIRE_COMPILED=1 but cannot compile: {why_not}")
        print(f"pgseal: {why_not}: building the pure Python build", file=sys.stderr)
        _remove_inplace_build()
        return []
    from mypyc.build import mypycify

    # mypycify type-checks and generates C right here: a failure from now on must leave
    # no manifest behind (BuildCompiledCore writes it once the extensions are built).
    _remove_inplace_build()
    sources = [
        str(NATIVE.source_path(name, PACKAGE).relative_to(HERE))
        for name in NATIVE.COMPILED_MODULES
    ]
    # One group: the modules call each other natively; its shared library lives in the
    # package (proxy/_compiled__mypyc*.so), not at the top level of site-packages.
    return mypycify(sources, opt_level="3", debug_level="0", group_name=NATIVE.GROUP)


setup(ext_modules=ext_modules(), cmdclass={"build_ext": BuildCompiledCore})

"""Build hook: compiles the data path's hot modules with mypyc (proxy/_native.py).

Everything else about the package is in pyproject.toml. PGSEAL_PURE_BUILD=1, or no C
compiler on the machine, gives the pure Python build: same behaviour, more CPU.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def _native_module():  # type: ignore[no-untyped-def]
    # proxy/_native.py on its own: importing the package would run its import-time check.
    spec = importlib.util.spec_from_file_location("_pgseal_native", HERE / "proxy" / "_native.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compiler() -> str | None:
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return shutil.which(cc.split()[0])


def ext_modules() -> list[object]:
    if os.environ.get("PGSEAL_PURE_BUILD") == "1":
        return []
    if _compiler() is None:
        print("pgseal: no C compiler: building the pure Python build", file=sys.stderr)
        return []
    from mypyc.build import mypycify

    native = _native_module()
    sources = [
        str(native.source_path(name, HERE / "proxy").relative_to(HERE))
        for name in native.COMPILED_MODULES
    ]
    native.write_manifest(HERE / "proxy")
    # One group: the modules call each other natively; its shared library lives in the
    # package (proxy/_compiled__mypyc*.so), not at the top level of site-packages.
    return mypycify(sources, opt_level="3", debug_level="0", group_name="proxy._compiled")


setup(ext_modules=ext_modules())

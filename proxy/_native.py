"""The compiled build of the data path's hot modules, and when not to use it.

`pip install` compiles the modules in COMPILED_MODULES with mypyc (setup.py): the same
source, as C extensions beside the .py files, plus one shared library holding them all
(`proxy/_compiled__mypyc*.so`). Python imports an extension before the .py of the same
name, so a compiled install runs them with no switch anywhere. The proxy's CPU per
transaction falls by about a third (bench/README.md, "compiled core").

The compiled modules only ever work as one set: they call each other directly, not
through `import`. So it is all of them or none:

- PGSEAL_PURE=1 runs the pure Python build (to compare, or to rule the compiler out);
- an extension built from a source that has changed since (an editable install, then an
  edit or a `git pull`) must not run in its place: setup.py records each source's SHA-256
  in BUILD_MANIFEST, and when any differs, or the manifest is missing, every compiled
  module is loaded from its .py instead, with a warning naming the rebuild command.

`use_pure_sources()` runs from `proxy/__init__.py`, before any of them can be imported.
Nothing here imports the compiled modules; setup.py reads COMPILED_MODULES from this file
without importing the package.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

#: The modules the build compiles: the pure core's per-message work, the cell recipe and
#: the value codecs. Not audit.records: its records are built through slot setters, which
#: compiled classes refuse (and its chain runs per batch, not per message).
COMPILED_MODULES: tuple[str, ...] = (
    "proxy.crypto._numbers",
    "proxy.crypto._temporal",
    "proxy.crypto.cells",
    "proxy.crypto.deterministic",
    "proxy.crypto.values",
    "proxy.policy.model",
    "proxy.rewrite.plan",
    "proxy.session.connection",
    "proxy.session.datapath",
    "proxy.session.tenant",
    "proxy.wire.framing",
    "proxy.wire.messages",
)

#: What setup.py wrote: {"modules": {name: sha256 of its source}}, beside this file.
BUILD_MANIFEST = "_compiled.json"

PACKAGE_DIR = Path(__file__).resolve().parent
REBUILD_HINT = "pip install -e . (make bootstrap) rebuilds them"


def source_path(module: str, package_dir: Path = PACKAGE_DIR) -> Path:
    """The .py file of `module` (a name in COMPILED_MODULES) under `package_dir`."""
    return package_dir.joinpath(*module.split(".")[1:]).with_suffix(".py")


def source_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compiled_files(module: str, package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """The extension files built for `module` (none in a pure install)."""
    source = source_path(module, package_dir)
    return [
        p
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
        if (p := source.with_name(source.stem + suffix)).exists()
    ]


def stale_modules(
    package_dir: Path = PACKAGE_DIR, modules: Sequence[str] = COMPILED_MODULES
) -> list[str]:
    """The compiled modules whose source is not the one they were built from (all of
    them when the manifest is missing or unreadable). Empty in a pure install."""
    built = [name for name in modules if compiled_files(name, package_dir)]
    if not built:
        return []
    try:
        recorded = json.loads((package_dir / BUILD_MANIFEST).read_text())["modules"]
    except (OSError, ValueError, KeyError, TypeError):
        return built
    return [
        name
        for name in built
        if not isinstance(recorded, dict)
        or recorded.get(name) != source_digest(source_path(name, package_dir))
    ]


class _PureSourceFinder:
    """Finds each compiled module's .py ahead of its extension (a sys.meta_path finder)."""

    def __init__(self, sources: dict[str, Path]) -> None:
        self.sources = sources

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        source = self.sources.get(fullname)
        if source is None:
            return None
        return importlib.util.spec_from_file_location(fullname, source)


def use_pure_sources(package_dir: Path = PACKAGE_DIR) -> str | None:
    """Make the compiled modules load from their .py when they must (see the module doc),
    and say why; None when the compiled build (or a pure install) is used as it is."""
    if os.environ.get("PGSEAL_PURE") == "1":
        reason = "PGSEAL_PURE=1"
    else:
        stale = stale_modules(package_dir)
        if not stale:
            return None
        reason = f"compiled modules older than their source ({', '.join(stale)})"
        warnings.warn(
            f"pgseal: {reason}: running the pure Python build; {REBUILD_HINT}",
            RuntimeWarning,
            stacklevel=2,
        )
    if not any(isinstance(f, _PureSourceFinder) for f in sys.meta_path):
        sources = {name: source_path(name, package_dir) for name in COMPILED_MODULES}
        sys.meta_path.insert(0, _PureSourceFinder(sources))
    return reason


def running_compiled() -> bool:
    """Whether the compiled build is what runs (for `pgseal version`, metrics, tests)."""
    from proxy.session import datapath

    return not datapath.__file__.endswith(".py") if datapath.__file__ else False


def build_name() -> str:
    """"compiled" or "pure": for the startup line and the pgseal_build_info metric."""
    return "compiled" if running_compiled() else "pure"


def write_manifest(package_dir: Path = PACKAGE_DIR) -> Path:
    """Record the digest of every compiled module's source (setup.py, when it compiles)."""
    manifest = package_dir / BUILD_MANIFEST
    digests = {name: source_digest(source_path(name, package_dir)) for name in COMPILED_MODULES}
    manifest.write_text(json.dumps({"modules": digests}, indent=1, sort_keys=True) + "\n")
    return manifest

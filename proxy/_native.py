"""The compiled build of the data path's hot modules, and when not to use it.

`pip install` compiles the modules in COMPILED_MODULES with mypyc (setup.py): the same
source, as C extensions beside the .py files, plus one shared library holding them all
(`proxy/_compiled__mypyc*.so`). Python imports an extension before the .py of the same
name, so a compiled install runs them with no switch anywhere. The proxy's CPU per
transaction falls by a fifth to a quarter (`python -m bench encrypted --pure`).

The compiled modules only ever work as one set: they call each other directly, not
through `import`, and mypyc copies the Final constants of the modules they import into
the compiled code. So it is all of them or none, and the pure build runs instead when:

- PGSEAL_PURE=1 (to compare, or to rule the compiler out);
- the build is not the one the sources describe: setup.py writes BUILD_MANIFEST only once
  the compile succeeded, with the module list and the SHA-256 of every source the compiled
  modules import (build_sources); no manifest, another set of extension files than
  COMPILED_MODULES, or any of those sources changed since (an editable install, then an
  edit or a `git pull`): every compiled module, and any other extension file left in the
  package, is loaded from its .py instead, with a warning naming the rebuild command.

`use_pure_sources()` runs from `proxy/__init__.py`, before any of them can be imported.
Nothing here imports the compiled modules; setup.py reads this file without importing
the package.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import sys
import sysconfig
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

#: The modules the build compiles: the pure core's per-message work, the cell recipe, the
#: value codecs, and the audit records the data path writes for every statement.
COMPILED_MODULES: tuple[str, ...] = (
    "proxy.audit.records",
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

#: What setup.py writes once the compile succeeded: {"modules": COMPILED_MODULES as built,
#: "sources": {path under the package: sha256}} for every module the compiled ones import,
#: directly or not (mypyc copies their Final constants into the compiled code).
BUILD_MANIFEST = "_compiled.json"
#: The compiled group (setup.py's group_name) and its shared library, without its suffix.
GROUP = "proxy._compiled"
SHARED_LIBRARY = GROUP.rpartition(".")[2] + "__mypyc"

PACKAGE_DIR = Path(__file__).resolve().parent
REBUILD_HINT = "pip install -e . (make bootstrap) rebuilds them"


def source_path(module: str, package_dir: Path = PACKAGE_DIR) -> Path:
    """The .py file of `module` (a proxy.* module) under `package_dir`."""
    base = package_dir.joinpath(*module.split(".")[1:])
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def source_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _imported_proxy_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("proxy."))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "proxy" or node.module.startswith("proxy."):
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def build_sources(
    package_dir: Path = PACKAGE_DIR, modules: Sequence[str] = COMPILED_MODULES
) -> list[Path]:
    """The compiled modules' sources and every proxy module they import, transitively."""
    seen: set[str] = set()
    todo = list(modules)
    found: list[Path] = []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = source_path(name, package_dir)
        if not path.is_file():
            continue  # `from proxy.x import y` where y is a name, not a module
        found.append(path)
        todo.extend(_imported_proxy_modules(path) - seen)
    return sorted(found)


def built_modules(package_dir: Path = PACKAGE_DIR) -> set[str]:
    """The proxy.* modules that have an extension file under `package_dir` (the shared
    library aside): what Python would import instead of their .py."""
    built: set[str] = set()
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for ext in package_dir.rglob(f"*{suffix}"):
            stem = ext.name[: -len(suffix)]
            if stem != SHARED_LIBRARY and "." not in stem:
                parts = ext.relative_to(package_dir).parent.parts
                built.add(".".join(("proxy", *parts, stem)))
    return built


def has_shared_library(package_dir: Path = PACKAGE_DIR) -> bool:
    return any(
        (package_dir / f"{SHARED_LIBRARY}{suffix}").exists()
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
    )


def build_problems(package_dir: Path = PACKAGE_DIR) -> list[str]:
    """Why the compiled build under `package_dir` must not run (empty: it may, or this is
    a pure install): no manifest (a build that failed or never finished), another set of
    modules than COMPILED_MODULES, or a source changed since the build."""
    built = built_modules(package_dir)
    if not built and not has_shared_library(package_dir):
        return []
    try:
        manifest = json.loads((package_dir / BUILD_MANIFEST).read_text())
        modules, sources = manifest["modules"], manifest["sources"]
        if not isinstance(sources, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        return ["no build manifest"]
    if modules != list(COMPILED_MODULES) or built != set(COMPILED_MODULES):
        return ["the compiled modules are not the ones COMPILED_MODULES names"]
    if not has_shared_library(package_dir):
        return ["the compiled modules' shared library is missing"]
    # The files the manifest lists are enough: a module can only join the build's sources
    # through a new import in one of them, which changes its digest. (Finding them again,
    # build_sources' AST walk, would cost every `import proxy` some 300 ms.)
    changed = sorted(
        name
        for name, digest in sources.items()
        if not (package_dir / name).is_file() or source_digest(package_dir / name) != digest
    )
    return [f"changed since the build: {', '.join(changed)}"] if changed else []


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
        problems = build_problems(package_dir)
        if not problems:
            return None
        reason = f"compiled build not usable ({'; '.join(problems)})"
        warnings.warn(
            f"pgseal: {reason}: running the pure Python build; {REBUILD_HINT}",
            RuntimeWarning,
            stacklevel=2,
        )
    if not any(isinstance(f, _PureSourceFinder) for f in sys.meta_path):
        names = set(COMPILED_MODULES) | built_modules(package_dir)
        sources = {name: source_path(name, package_dir) for name in names}
        sys.meta_path.insert(0, _PureSourceFinder(sources))
    return reason


def why_not_compiled() -> str | None:
    """Why `pip install` would give the pure build here (setup.py), or None."""
    if os.environ.get("PGSEAL_PURE_BUILD") == "1":
        return "PGSEAL_PURE_BUILD=1"
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc})"
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.exists():
        return f"no Python headers ({headers}; Debian: python3-dev)"
    return None


def running_compiled() -> bool:
    """Whether the compiled build is what runs (startup line, metrics, tests)."""
    from proxy.session import datapath

    return not str(datapath.__file__).endswith(".py")


def build_name() -> str:
    """The build that runs, "compiled" or "pure": the startup line, pgseal_build_info."""
    return "compiled" if running_compiled() else "pure"


def write_manifest(package_dir: Path, to: Path) -> Path:
    """Record what the build compiled and from which sources (setup.py, once it succeeded)."""
    digests = {
        str(p.relative_to(package_dir)): source_digest(p) for p in build_sources(package_dir)
    }
    manifest = {"modules": list(COMPILED_MODULES), "sources": digests}
    to.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return to

"""Which build of the hot modules the tests run against (proxy/_native.py)."""

from __future__ import annotations

from typing import TypeVar

import pytest

from proxy._native import running_compiled

COMPILED = running_compiled()

_T = TypeVar("_T")


def pure_only(test: _T) -> _T:
    """For tests that patch a module global or read a signature, which the compiled build
    fixes at build time. `make test` runs them (with the unit tests) a second time, with
    PGSEAL_PURE=1: `-m "not integration or pure_only"`."""
    skip = pytest.mark.skipif(
        COMPILED, reason="inspects the pure Python build: runs again with PGSEAL_PURE=1"
    )
    return pytest.mark.pure_only(skip(test))

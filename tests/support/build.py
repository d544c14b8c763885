"""Which build of the hot modules the tests run against (proxy/_native.py)."""

from __future__ import annotations

from proxy._native import running_compiled

COMPILED = running_compiled()

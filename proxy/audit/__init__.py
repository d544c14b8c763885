"""Tamper-evident audit trail (DESIGN.md 9): records, hash chain, sinks, verification.

`records` (the record and its hash chain) is pure and used by the pure data path; the trail,
its sinks and the verifiers do I/O (asyncio, asyncpg). They are loaded on first use, so that
importing the data path, which imports this package for `records`, loads none of them
(tests/unit/test_sourcecode.py checks it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from proxy.audit.records import EVENTS, AuditRecord, ChainHead, VerifyReport

if TYPE_CHECKING:
    from proxy.audit.trail import AuditTrail
    from proxy.audit.verify import verify_jsonl, verify_postgres

__all__ = [
    "EVENTS", "AuditRecord", "AuditTrail", "ChainHead", "VerifyReport",
    "verify_jsonl", "verify_postgres",
]

_LAZY = {
    "AuditTrail": "proxy.audit.trail",
    "verify_jsonl": "proxy.audit.verify",
    "verify_postgres": "proxy.audit.verify",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'proxy.audit' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

"""Tamper-evident audit trail (DESIGN.md 9): records, hash chain, sinks, verification."""

from proxy.audit.records import EVENTS, AuditRecord, ChainHead, VerifyReport
from proxy.audit.trail import AuditTrail
from proxy.audit.verify import verify_jsonl, verify_postgres

__all__ = [
    "EVENTS", "AuditRecord", "AuditTrail", "ChainHead", "VerifyReport",
    "verify_jsonl", "verify_postgres",
]

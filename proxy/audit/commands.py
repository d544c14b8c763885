"""`pgseal audit verify FILE|--postgres`: check the hash chain; exit 1 on any problem."""

from __future__ import annotations

import argparse
import asyncio

import asyncpg

from proxy.audit.records import VerifyReport
from proxy.audit.verify import verify_jsonl, verify_postgres
from proxy.config import Config
from proxy.errors import KeyServiceUnavailable, PgsealError


def cmd_audit_verify(args: argparse.Namespace, config: Config) -> int:
    if args.file:
        try:
            report = verify_jsonl(args.file)
        except OSError as exc:
            raise PgsealError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    else:
        tables = [s.table for s in config.audit.sinks if s.kind == "postgres" and s.table]
        table = tables[0] if tables else "pgseal.audit"
        try:
            report = asyncio.run(verify_postgres(config.keystore.dsn, table))
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise KeyServiceUnavailable(f"cannot read audit table {table}: {reason}") from None
    return _print(report)


def _print(report: VerifyReport) -> int:
    for problem in report.problems:
        print(f"FAIL {problem}")
    for warning in report.warnings:
        print(f"warn {warning}")
    if report.ok:
        print(report.summary())
        return 0
    print(
        f"{report.records} records read; last seq {report.head.seq}. Not detectable by the "
        "chain alone: a tail cut back to an earlier audit.stop, or a fully rewritten trail; "
        "compare the last hash with a copy kept elsewhere."
    )
    raise PgsealError(report.summary())

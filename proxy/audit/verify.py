"""Verify a stored audit trail: the jsonl file or the postgres table (see records.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import asyncpg

from proxy.audit.records import VerifyReport, verify_lines
from proxy.audit.sinks import quote_table


def _file_lines(path: Path) -> Iterator[tuple[str, str]]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            # A final line without its newline is a write that was cut off.
            text = raw.decode("utf-8", "replace")
            if not raw.endswith(b"\n"):
                yield f"line {number}", text + "\0"  # never valid JSON: reported as cut off
            else:
                yield f"line {number}", text.rstrip("\n")


def verify_jsonl(path: str | Path) -> VerifyReport:
    """Walk a jsonl trail; OSError when it cannot be read."""
    path = Path(path)
    return verify_lines(_file_lines(path), str(path))


async def verify_postgres(dsn: str, table: str) -> VerifyReport:
    """Walk the postgres sink's table in seq order (the stored JSON lines, not the columns)."""
    qtable = quote_table(table)
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        # qtable: identifiers checked and quoted by quote_table
        rows = await conn.fetch(f"SELECT seq, record FROM {qtable} ORDER BY seq")  # noqa: S608
    finally:
        await conn.close()
    return verify_lines(((f"row seq={r['seq']}", r["record"]) for r in rows), f"postgres {table}")

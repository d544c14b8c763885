"""The postgres audit sink and `verify_postgres` against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.audit import AuditRecord, AuditTrail, verify_postgres
from proxy.audit.sinks import PostgresSink
from proxy.errors import KeyServiceUnavailable

pytestmark = pytest.mark.integration


@pytest.fixture
def audit_table(pg: Any) -> Any:
    schema = f"pgseal_audit_{secrets.token_hex(4)}"
    yield f"{schema}.audit"
    pg.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


async def run_trail(dsn: str, table: str, n: int) -> None:
    trail = AuditTrail([PostgresSink(dsn, table)])
    await trail.start()
    await asyncio.gather(*(
        trail.record(AuditRecord("data.decrypt", tenant="acme", key_id=1, table="public.t",
                                 columns=("ssn", "dob"), count=i, db_user="app"))
        for i in range(n)
    ))
    await trail.close()


@pytest.mark.asyncio
async def test_postgres_sink_chain_survives_restarts_and_catches_tampering(
    pg: Any, audit_table: str
) -> None:
    dsn = pg.superuser_dsn
    await run_trail(dsn, audit_table, 20)
    await run_trail(dsn, audit_table, 5)  # a restart continues the chain from the table
    report = await verify_postgres(dsn, audit_table)
    assert report.ok, report.problems
    assert report.records == (20 + 2) + (5 + 2)  # audit.start and audit.stop around each run
    rows = pg.execute(f"SELECT event, tenant FROM {audit_table} WHERE seq = 2")
    assert rows == [("data.decrypt", "acme")]  # queryable columns beside the record

    # edit a record
    record = json.loads(pg.execute(f"SELECT record FROM {audit_table} WHERE seq = 5")[0][0])
    record["count"] = 999
    edited = json.dumps(record, sort_keys=True, separators=(",", ":")).replace("'", "''")
    pg.execute(f"UPDATE {audit_table} SET record = '{edited}' WHERE seq = 5")
    report = await verify_postgres(dsn, audit_table)
    assert any("seq 5" in p and "edited" in p for p in report.problems)

    # remove a record
    pg.execute(f"DELETE FROM {audit_table} WHERE seq = 10")
    assert any("missing" in p for p in (await verify_postgres(dsn, audit_table)).problems)

    # reorder two records by swapping their seq
    pg.execute(f"UPDATE {audit_table} SET seq = -12 WHERE seq = 12")
    pg.execute(f"UPDATE {audit_table} SET seq = 12 WHERE seq = 13")
    pg.execute(f"UPDATE {audit_table} SET seq = 13 WHERE seq = -12")
    assert any("row seq=12" in p for p in (await verify_postgres(dsn, audit_table)).problems)

    # truncate the tail
    pg.execute(f"DELETE FROM {audit_table} WHERE seq > 20")
    assert any("not audit.stop" in p for p in (await verify_postgres(dsn, audit_table)).problems)


@pytest.mark.asyncio
async def test_unreachable_postgres_sink_blocks_then_recovers(pg: Any, audit_table: str) -> None:
    sink = PostgresSink("postgresql://postgres@127.0.0.1:1/postgres", audit_table,
                        connect_timeout=2)
    trail = AuditTrail([sink])
    with pytest.raises(KeyServiceUnavailable,
                       match=f"audit sink postgres {audit_table} unwritable"):
        await trail.start()
    sink.dsn = pg.superuser_dsn
    await sink.close()
    await trail.start()  # the database is back: no restart needed
    await trail.record(AuditRecord("key.unwrap", tenant="acme"))
    await trail.close()
    assert (await verify_postgres(pg.superuser_dsn, audit_table)).ok


def test_cli_verify_postgres(pg: Any, audit_table: str, tmp_path: Path) -> None:
    asyncio.run(run_trail(pg.superuser_dsn, audit_table, 3))
    cfg = tmp_path / "pgseal.yaml"
    cfg.write_text(yaml.safe_dump({
        "keystore": {"dsn": pg.superuser_dsn},
        "audit": {"sinks": [{"postgres": {"table": audit_table}}]},
    }))
    script = Path(sys.executable).parent / "pgseal"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "proxy"]
    ok = subprocess.run([*cmd, "audit", "verify", "--postgres", "--config", str(cfg)],
                        capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ok, 5 records" in ok.stdout
    pg.execute(f"DELETE FROM {audit_table} WHERE seq = 5")
    bad = subprocess.run([*cmd, "audit", "verify", "--postgres", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert bad.returncode == 1 and bad.stderr.startswith("pgseal: postgres ")
    assert "not audit.stop" in bad.stderr and bad.stderr.count("\n") == 1

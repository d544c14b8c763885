"""The postgres audit sink and `verify_postgres` against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from proxy.audit import AuditRecord, AuditTrail, verify_postgres
from proxy.audit.sinks import PostgresSink
from proxy.audit.trail import RETRY_FIRST
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


class _LostCommitAnswers:
    """The next `left` transactions end for real (commit or rollback), and then the
    client is told the connection died: what a connection lost during COMMIT looks like."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from asyncpg.transaction import Transaction

        self.left = 0
        real_exit = Transaction.__aexit__

        async def lossy_exit(tx: Any, extype: Any, ex: Any, tb: Any) -> Any:
            result = await real_exit(tx, extype, ex, tb)
            if self.left > 0:
                self.left -= 1
                raise asyncpg.ConnectionDoesNotExistError("connection lost (test)")
            return result

        monkeypatch.setattr(Transaction, "__aexit__", lossy_exit)


async def _rows(dsn: str, table: str) -> list[tuple[str, int | None]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            f"SELECT event, (record::json->>'count')::int AS n FROM {table} ORDER BY seq"
        )
        return [(r["event"], r["n"]) for r in rows]
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_a_batch_whose_commit_went_unanswered_is_not_written_twice(
    pg: Any, audit_table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    lost = _LostCommitAnswers(monkeypatch)
    trail = AuditTrail([PostgresSink(pg.superuser_dsn, audit_table)])
    await trail.start()
    # The sink's own retry: the batch committed, the answer was lost, the retry finds it.
    lost.left = 1
    await trail.record(AuditRecord("data.decrypt", tenant="acme", count=1), kept=True)
    # Lost twice: the retry finds it written but its answer is lost too; the trail keeps
    # the record and sends it again with the next batch, which writes only the new one.
    lost.left = 2
    with pytest.raises(KeyServiceUnavailable):
        await trail.record(AuditRecord("data.decrypt", tenant="acme", count=2), kept=True)
    await asyncio.sleep(RETRY_FIRST + 0.3)  # the trail's first wait before it tries again
    await trail.record(AuditRecord("data.decrypt", tenant="acme", count=3), kept=True)
    await trail.close()
    rows = await _rows(pg.superuser_dsn, audit_table)
    assert rows == [
        ("audit.start", None),
        ("data.decrypt", 1),
        ("data.decrypt", 2),
        ("data.decrypt", 3),
        ("audit.stop", None),
    ]
    assert (await verify_postgres(pg.superuser_dsn, audit_table)).ok


@pytest.mark.asyncio
async def test_a_batch_that_did_not_commit_is_written_by_the_retry(
    pg: Any, audit_table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other side: the connection really died before COMMIT (the transaction rolled
    back); the retry finds nothing and writes the batch."""
    trail = AuditTrail([PostgresSink(pg.superuser_dsn, audit_table)])
    await trail.start()
    from asyncpg.transaction import Transaction

    real_exit = Transaction.__aexit__
    left = [1]

    async def rolled_back(tx: Any, extype: Any, ex: Any, tb: Any) -> Any:
        if left[0] > 0 and extype is None:
            left[0] -= 1
            await real_exit(tx, RuntimeError, RuntimeError("test"), None)  # ROLLBACK
            raise asyncpg.ConnectionDoesNotExistError("connection lost (test)")
        return await real_exit(tx, extype, ex, tb)

    monkeypatch.setattr(Transaction, "__aexit__", rolled_back)
    await trail.record(AuditRecord("data.decrypt", tenant="acme", count=7), kept=True)
    await trail.close()
    rows = await _rows(pg.superuser_dsn, audit_table)
    assert rows == [("audit.start", None), ("data.decrypt", 7), ("audit.stop", None)]
    assert (await verify_postgres(pg.superuser_dsn, audit_table)).ok


@pytest.mark.asyncio
async def test_a_commit_still_running_when_its_answer_is_lost_is_seen_under_repeatable_read(
    pg: Any, audit_table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database defaults to REPEATABLE READ and the lost COMMIT is still running when
    the retry starts: the retry waits for the table's lock, then must see that COMMIT
    (its transaction is READ COMMITTED), not a snapshot from before the lock."""
    from asyncpg.transaction import Transaction

    schema = audit_table.split(".")[0]
    dsn = pg.superuser_dsn + (
        "&" if "?" in pg.superuser_dsn else "?"
    ) + "default_transaction_isolation=repeatable%20read"
    probe = await asyncpg.connect(dsn)
    try:
        assert await probe.fetchval("SHOW transaction_isolation") == "repeatable read"
    finally:
        await probe.close()
    trail = AuditTrail([PostgresSink(dsn, audit_table)])
    await trail.start()
    # Its COMMIT takes 2 s on the server (a deferred trigger), the lock held meanwhile.
    pg.execute(
        f"CREATE FUNCTION {schema}.slow() RETURNS trigger LANGUAGE plpgsql AS "
        "$$BEGIN PERFORM pg_sleep(2); RETURN NULL; END$$; "
        f"CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON {audit_table} "
        f"DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {schema}.slow()"
    )
    real_exit = Transaction.__aexit__
    armed = [True]
    committing: list[asyncio.Future[Any]] = []

    async def answer_lost(tx: Any, extype: Any, ex: Any, tb: Any) -> Any:
        if armed[0] and extype is None:
            armed[0] = False
            committing.append(asyncio.ensure_future(real_exit(tx, extype, ex, tb)))
            await asyncio.sleep(0.2)  # COMMIT sent, running; its answer never comes
            raise asyncpg.ConnectionDoesNotExistError("connection lost (test)")
        return await real_exit(tx, extype, ex, tb)

    monkeypatch.setattr(Transaction, "__aexit__", answer_lost)
    # The sink's own retry may find its connection still busy with that COMMIT; the trail
    # then keeps the record and sends it again with the next one.
    with contextlib.suppress(KeyServiceUnavailable):
        await trail.record(AuditRecord("data.decrypt", tenant="acme", count=1), kept=True)
    for count in range(2, 8):  # while that COMMIT runs, and after
        await asyncio.sleep(0.6)
        with contextlib.suppress(KeyServiceUnavailable):
            await trail.record(AuditRecord("data.decrypt", tenant="acme", count=count), kept=True)
            break
    await asyncio.gather(*committing, return_exceptions=True)
    await trail.close()
    rows = await _rows(pg.superuser_dsn, audit_table)
    assert rows == [
        ("audit.start", None),
        *(("data.decrypt", n) for n in range(1, count + 1)),
        ("audit.stop", None),
    ]
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

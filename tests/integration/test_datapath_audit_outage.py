"""An audit sink that fills up while the proxy serves (DESIGN.md 4, 6, 9).

`audit.on_failure: block`: a key use whose record cannot be written fails. Data-path
records (data.encrypt, data.decrypt, data.deny) are written after the statement, with
group commit, so the first failed write leaves a standing failure: every later key use
(sealing a parameter, opening a cell) is refused with SQLSTATE 58030 naming the audit
sink, while statements that touch no protected column keep working. The records that
could not be written are kept and tried again about once a second; once the sink takes
writes again they go out first, in order, and key uses work again without a restart.

A proxy of its own (own keystore and master key, `make_keys_config`) writes its trail to
a jsonl file under tmp_path. The disk fills up by replacing that file with a symlink to
/dev/full (every write: ENOSPC; the tests run as root, so permissions cannot do it); the
sink notices the new inode at its path and opens it. Restoring replaces the symlink with
an empty regular file, so every record written after the outage is in that new file,
whose chain starts at seq 1.

Each phase uses its own statement shape (column order), so its records can be told apart
by event, tenant, table and statement fingerprint: records never hold a value.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from proxy.audit import verify_jsonl
from proxy.config import AuditConfig, AuditSinkConfig, Config
from proxy.session.datapath import fingerprint
from tests.support.logs import capture_logs
from tests.support.proxy_fixtures import DATA, ProxyThread, proxy_config

pytestmark = pytest.mark.integration

UNAVAILABLE = "58030"
TABLE = "public.tickets"  # tenant: {session: true}; `owner` is a plain copy of the tenant
SENT = f"Aud{secrets.token_hex(6)}Z"  # in every plaintext value; never in a cell, file or log

# One statement shape per phase (same parameters: $1 subject, $2 body, $3 priority).
SQL_FIRST = "INSERT INTO tickets (subject, body, priority) VALUES ($1, $2, $3) RETURNING id"
SQL_A = "INSERT INTO tickets (body, subject, priority) VALUES ($2, $1, $3) RETURNING id"
SQL_PROBE = "INSERT INTO tickets (priority, subject, body) VALUES ($3, $1, $2) RETURNING id"
SQL_AFTER = "INSERT INTO tickets (subject, priority, body) VALUES ($1, $3, $2) RETURNING id"
SQL_OPEN = "SELECT subject, body FROM tickets WHERE id = $1"
SQL_READ = "SELECT id, subject, body, priority FROM tickets WHERE owner = $1 ORDER BY id"
SQL_COUNT = "SELECT count(*) FROM tickets WHERE owner = $1"  # no protected column

FAIL_WITHIN = 5.0  # seconds until key uses are refused after the disk fills up
RECOVER_WITHIN = 10.0  # seconds until they work again after it is back (retry ~1/s)
RECORDS_WITHIN = 5.0  # seconds until asynchronously written records are in the file


@dataclass
class Outage:
    config: Config
    path: Path  # the audit sink's jsonl file
    tenant: str
    log_records: list[str] = field(default_factory=list)


@pytest.fixture
def outage(make_keys_config: Callable[..., Config], sealing_config: Config, pg: Any,
           tmp_path: Path) -> Iterator[Outage]:
    """A config with a jsonl sink of its own (on_failure: block), the proxy's logs captured."""
    path = tmp_path / "audit" / "trail.jsonl"
    keys = make_keys_config(
        audit=AuditConfig(sinks=(AuditSinkConfig("jsonl", path=str(path)),), on_failure="block")
    )
    base = proxy_config(pg)
    config = replace(keys, listen=base.listen, upstream=base.upstream,
                     upstream_tls=base.upstream_tls, policies=(str(DATA / "policy.yaml"),))
    state = Outage(config, path, f"outage-{secrets.token_hex(4)}")
    try:
        with capture_logs(state.log_records):
            yield state
    finally:
        if path.is_symlink():  # a failed test must not leave the sink pointing at /dev/full
            path.unlink()
        pg.execute(f"DELETE FROM tickets WHERE owner = '{state.tenant}'")
        pg.execute(f"DELETE FROM plain_items WHERE label LIKE 'outage-{state.tenant}%'")


@pytest.fixture
def outage_proxy(outage: Outage) -> Iterator[ProxyThread]:
    running = ProxyThread(outage.config).__enter__()
    try:
        yield running
    finally:
        if running.loop is not None and not running.loop.is_closed():
            running.__exit__(None, None, None)


# --- helpers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    id: int
    subject: str
    body: str
    priority: int


def _values(tag: str, priority: int) -> tuple[str, str, int]:
    return f"subj {tag} {SENT}", f"body {tag} {SENT} é✓", priority


async def _insert(conn: asyncpg.Connection[Any], sql: str, tag: str,
                  priority: int) -> Row | asyncpg.PostgresError:
    """The row written, or the error the proxy answered with."""
    subject, body, prio = _values(tag, priority)
    try:
        row_id = await conn.fetchval(sql, subject, body, prio)
    except asyncpg.PostgresError as exc:
        return exc
    return Row(int(row_id), subject, body, prio)


def _assert_unavailable(exc: object, what: str) -> None:
    assert isinstance(exc, asyncpg.PostgresError), f"{what}: expected 58030, got {exc!r}"
    assert exc.sqlstate == UNAVAILABLE, f"{what}: {exc.sqlstate} {exc}"
    assert re.search(r"audit (sink|trail)", str(exc), re.IGNORECASE), (
        f"{what}: the error does not name the audit sink: {exc}"
    )


def _read_records(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # reported by verify
    return out


def _encrypts(records: list[dict[str, Any]], tenant: str, sql: str) -> list[int]:
    """Positions of the data.encrypt records of `sql` for the tenant."""
    fp = fingerprint(sql)
    return [
        i for i, r in enumerate(records)
        if r.get("event") == "data.encrypt" and r.get("tenant") == tenant
        and r.get("table") == TABLE and r.get("statement") == fp and r.get("outcome") == "ok"
    ]


def _decrypts(records: list[dict[str, Any]], tenant: str, sql: str) -> list[int]:
    fp = fingerprint(sql)
    return [
        i for i, r in enumerate(records)
        if r.get("event") == "data.decrypt" and r.get("tenant") == tenant
        and r.get("table") == TABLE and r.get("statement") == fp
    ]


async def _wait_for(check: Callable[[], bool], within: float) -> bool:
    deadline = time.monotonic() + within
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)


def _fill_disk(path: Path) -> None:
    """Swap the sink's file for /dev/full in one rename: every later write gets ENOSPC."""
    link = path.with_name(path.name + ".full")
    os.symlink("/dev/full", link)
    os.replace(link, path)


def _restore_disk(path: Path) -> None:
    fresh = path.with_name(path.name + ".fresh")
    fresh.write_bytes(b"")
    os.replace(fresh, path)


def _stored_cells(pg: Any, tenant: str) -> dict[int, tuple[bytes, ...]]:
    """Row id -> its protected cells as PostgreSQL stores them (read directly)."""
    rows = pg.execute(
        f"SELECT id, subject, body, priority FROM tickets WHERE owner = '{tenant}' ORDER BY id"
    )
    return {int(r[0]): tuple(bytes(c) for c in r[1:]) for r in rows}


def _problems_besides_open_tail(report: Any) -> list[str]:
    """verify's problems, without 'does not end with audit.stop' (a writer still runs)."""
    return [p for p in report.problems
            if not (report.open_tail and p.startswith("last record (seq"))]


# --- the test --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_full_audit_disk_blocks_key_uses_and_loses_no_record(
        outage: Outage, outage_proxy: ProxyThread, pg: Any, tmp_path: Path) -> None:
    path, tenant = outage.path, outage.tenant
    rows: list[Row] = []  # every insert the proxy let through, in order
    let_through: dict[str, int] = dict.fromkeys((SQL_FIRST, SQL_A, SQL_PROBE, SQL_AFTER), 0)

    def keep(sql: str, row: Row) -> None:
        rows.append(row)
        let_through[sql] += 1

    conn = await asyncpg.connect(outage_proxy.dsn())
    try:
        await conn.execute(f"SET pgseal.tenant = '{tenant}'")

        # 1. A key use with the sink healthy: works; its record reaches the file.
        first = await _insert(conn, SQL_FIRST, "first", 1)
        assert isinstance(first, Row), first
        keep(SQL_FIRST, first)
        assert await _wait_for(
            lambda: len(_encrypts(_read_records(path), tenant, SQL_FIRST)) == 1, RECORDS_WITHIN
        ), "the first insert's data.encrypt record never reached the audit file"
        before = tmp_path / "before-outage.jsonl"
        os.link(path, before)  # the old file stays readable after the swap
        old_ino = path.stat().st_ino

        # 2. The disk fills up.
        _fill_disk(path)
        assert path.is_symlink()
        assert path.stat().st_ino != old_ino, "the sink could not tell /dev/full from its file"
        with pytest.raises(OSError) as full:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, b"x")
            finally:
                os.close(fd)
        assert full.value.errno == errno.ENOSPC

        # 3. Statement A: its key use may come before the failure is known.
        a = await _insert(conn, SQL_A, "stmt-a", 2)
        a_succeeded = isinstance(a, Row)
        if isinstance(a, Row):
            keep(SQL_A, a)
        else:
            _assert_unavailable(a, "statement A")

        # 4. The failed write becomes a standing failure: key uses are refused.
        refusal: asyncpg.PostgresError | None = None
        deadline = time.monotonic() + FAIL_WITHIN
        probe = 0
        while refusal is None:
            got = await _insert(conn, SQL_PROBE, f"probe-{probe}", 3)
            probe += 1
            if isinstance(got, Row):
                keep(SQL_PROBE, got)  # before the failure was known: its record is owed
                assert time.monotonic() < deadline, (
                    f"key uses still work {FAIL_WITHIN}s after the audit sink filled up "
                    f"({probe} probe inserts let through)"
                )
                await asyncio.sleep(0.05)
            else:
                refusal = got
        _assert_unavailable(refusal, "a protected insert during the outage")
        # Opening a cell is a key use too.
        try:
            opened = await conn.fetch(SQL_OPEN, first.id)
        except asyncpg.PostgresError as exc:
            _assert_unavailable(exc, "a protected select during the outage")
        else:
            pytest.fail(f"a cell was opened while its audit record could not be written: "
                        f"{len(opened)} rows")
        # Still refused a moment later (standing, not one unlucky batch).
        _assert_unavailable(await _insert(conn, SQL_PROBE, "probe-again", 3),
                            "a second protected insert during the outage")
        # Statements that touch no protected column keep working.
        assert await conn.fetchval("SELECT 1") == 1
        label = f"outage-{tenant}-plain"
        plain_id = await conn.fetchval(
            "INSERT INTO plain_items (label) VALUES ($1) RETURNING id", label)
        assert await conn.fetchval("SELECT label FROM plain_items WHERE id = $1",
                                   plain_id) == label
        assert await conn.fetchval(SQL_COUNT, tenant) == len(rows)
        # Nothing refused reached PostgreSQL; what did is sealed.
        stored = _stored_cells(pg, tenant)
        assert sorted(stored) == [r.id for r in rows]
        for cells in stored.values():
            for cell in cells:
                assert cell[:1] == b"\x01" and SENT.encode() not in cell

        # 5. The disk is back.
        _restore_disk(path)
        assert path.is_file() and not path.is_symlink()

        # 6. Key uses work again, without a restart.
        recovered: Row | None = None
        last: asyncpg.PostgresError | None = None
        deadline = time.monotonic() + RECOVER_WITHIN
        attempt = 0
        while recovered is None and time.monotonic() < deadline:
            got = await _insert(conn, SQL_AFTER, f"after-{attempt}", 4)
            attempt += 1
            if isinstance(got, Row):
                recovered = got
            else:
                _assert_unavailable(got, "a protected insert while the sink recovers")
                last = got
                await asyncio.sleep(0.1)
        assert recovered is not None, (
            f"key uses still refused {RECOVER_WITHIN}s after the audit sink was restored "
            f"({attempt} attempts); last error: {last}"
        )
        keep(SQL_AFTER, recovered)
        again = await _insert(conn, SQL_AFTER, "after-again", 5)
        assert isinstance(again, Row), f"recovered, then refused again: {again}"
        keep(SQL_AFTER, again)
        got_rows = [Row(int(r[0]), r[1], r[2], r[3]) for r in await conn.fetch(SQL_READ, tenant)]
        assert got_rows == rows
        assert sorted(_stored_cells(pg, tenant)) == [r.id for r in rows]
    finally:
        await conn.close()

    # 7. Nothing lost: every key use that was let through has its record, A's and the
    # probes' (owed since the outage) in the new file ahead of what came after.
    def counts(records: list[dict[str, Any]], sql: str) -> int:
        return len(_encrypts(records, tenant, sql))

    def complete() -> bool:
        new = _read_records(path)
        return (all(counts(new, sql) >= n for sql, n in let_through.items() if sql != SQL_FIRST)
                and bool(_decrypts(new, tenant, SQL_READ)))

    settled = await _wait_for(complete, RECORDS_WITHIN)
    old, new = _read_records(before), _read_records(path)
    if a_succeeded:
        assert counts(old, SQL_A) == 0, "statement A's record was written before the outage?"
        assert counts(new, SQL_A) == 1, (
            "statement A was let through but its data.encrypt record is not in the audit "
            f"file written after the restore (lost): {[r['event'] for r in new]}"
        )
    assert settled, f"records missing from the new audit file: {[r['event'] for r in new]}"
    assert counts(old, SQL_FIRST) == 1 and counts(new, SQL_FIRST) == 0
    for sql, n in let_through.items():
        assert counts(old, sql) + counts(new, sql) == n, (sql, n)
    owed = _encrypts(new, tenant, SQL_A) + _encrypts(new, tenant, SQL_PROBE)
    later = _encrypts(new, tenant, SQL_AFTER) + _decrypts(new, tenant, SQL_READ)
    assert not owed or max(owed) < min(later), "records owed from the outage came after newer ones"
    assert _decrypts(old, tenant, SQL_READ) == []
    # The new file's chain is whole (it cannot end with audit.stop while the proxy runs).
    assert new[0]["seq"] == 1
    running = verify_jsonl(path)
    assert _problems_besides_open_tail(running) == [], running.problems
    # The old file was cut off by the outage, but is otherwise intact.
    old_report = verify_jsonl(before)
    assert _problems_besides_open_tail(old_report) == [], old_report.problems

    # A clean stop closes the new file with audit.stop: verify is then fully happy.
    outage_proxy.__exit__(None, None, None)
    stopped = verify_jsonl(path)
    assert stopped.ok, stopped.problems
    assert _read_records(path)[-1]["event"] == "audit.stop"

    # 8. No plaintext in the audit files, nor in the proxy's log records.
    for trail in (before, path):
        assert SENT.encode() not in trail.read_bytes(), trail
    leaked = [line for line in outage.log_records if SENT in line]
    assert leaked == [], leaked[:3]

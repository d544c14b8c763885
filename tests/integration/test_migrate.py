"""`pgseal migrate encrypt|decrypt` against a real PostgreSQL and SoftHSM2 token.

- SIGKILL part way, resume: every value sealed exactly once (cells committed before the
  kill are untouched by the resumed run, the checkpoint counts each row once) and
  readable through the proxy, including equality search (cells are byte-identical to
  the proxy's own);
- writes through a proxy on the old policy while the migration runs are all there
  afterwards, and after the cut-over such a proxy fails closed (its plaintext refused);
- decrypt restores the plaintext column (type, NOT NULL, values); the opposite direction
  undoes an unfinished migration; tables without a primary key and session-tenant tables.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.config import Config
from proxy.migrate.column import ColumnOptions, migrate_column
from proxy.migrate.common import MigrationError
from proxy.migrate.plan import ObjectNames
from tests.support.migrate_helpers import (
    MigEnv,
    Writer,
    migrate_env,
    read_through,
    unique,
    writing,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def env(make_keys_config: Callable[..., Config], pg: Any, tmp_path: Path) -> Iterator[MigEnv]:
    with migrate_env(make_keys_config, pg, tmp_path) as made:
        yield made


def _column_type(pg: Any, table: str, column: str) -> tuple[str, bool]:
    rows = pg.execute(
        "SELECT format_type(a.atttypid, a.atttypmod), a.attnotnull FROM pg_attribute a "
        f"WHERE a.attrelid = 'public.{table}'::regclass AND a.attname = '{column}' "
        "AND NOT a.attisdropped")
    assert rows, f"no column {table}.{column}"
    return str(rows[0][0]), bool(rows[0][1])


def _columns(pg: Any, table: str) -> set[str]:
    return {r[0] for r in pg.execute(
        f"SELECT attname FROM pg_attribute WHERE attrelid = 'public.{table}'::regclass "
        "AND attnum > 0 AND NOT attisdropped")}


def _user_triggers(pg: Any, table: str) -> int:
    return int(pg.execute(f"SELECT count(*) FROM pg_trigger WHERE tgrelid = "
                          f"'public.{table}'::regclass AND NOT tgisinternal")[0][0])


def _status_row(out: str, job: str) -> tuple[str, str, str]:
    """(KIND, PHASE, DONE) of `job` in `pgseal migrate status`'s table (under its header)."""
    lines = out.splitlines()
    assert lines[0].split() == ["JOB", "KIND", "PHASE", "DONE", "STARTED", "UPDATED"], out
    # JOB holds a space ("column db/schema.table.col"): the row starts with it, then columns.
    rows = [line[len(job):].split() for line in lines[1:] if line.startswith(job + " ")]
    assert len(rows) == 1, out
    kind, phase, done = rows[0][:3]
    return kind, phase, done


def test_sigkill_midway_then_resume_seals_every_value_exactly_once(env: MigEnv) -> None:
    pg = env.pg
    table = unique("mig_kill")
    pg.execute(
        f"CREATE TABLE {table} (id int PRIMARY KEY, tenant_id text NOT NULL, ssn text, "
        "note text); "
        f"INSERT INTO {table} SELECT g, 't' || (g % 3), "
        "CASE WHEN g % 10 = 0 THEN NULL ELSE 'ssn-' || g END, 'n' "
        "FROM generate_series(1, 3000) g")
    policy = env.policy("new", {f"public.{table}": {
        "tenant": {"column": "tenant_id"},
        "columns": {"ssn": {"type": "text", "search": "equality"}}}})
    cfg = str(env.config_file(policy))
    job = f"column {env.database}/public.{table}.ssn"
    shadow = ObjectNames.of("public", table, "ssn", "encrypt").shadow

    proc = env.popen("migrate", "encrypt", f"public.{table}.ssn", "--batch", "50",
                     "--rate", "800", "--config", cfg)
    try:
        env.wait_job(job, 400)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    # Part way: the plaintext column untouched, some rows sealed into the shadow column.
    assert _column_type(pg, table, "ssn")[0] == "text"
    before = {int(i): bytes(c) for i, c in pg.execute(
        f'SELECT id, "{shadow}" FROM {table} WHERE "{shadow}" IS NOT NULL')}
    assert 400 <= len(before) < 2700
    # The checkpoint shares each batch's transaction: it counts exactly the committed rows.
    killed = env.job(job)
    assert killed is not None and killed["phase"] == "backfill"
    assert killed["done"] == len(before)
    # What an operator asks after the crash: `pgseal migrate status` shows the job where the
    # checkpoint left it.
    status = env.pgseal("migrate", "status", "--config", cfg)
    assert status.returncode == 0, status.stderr
    assert _status_row(status.stdout, job) == ("encrypt", "backfill", f"{len(before):,}")

    done = env.pgseal("migrate", "encrypt", f"public.{table}.ssn", "--batch", "500",
                      "--config", cfg)
    assert done.returncode == 0, done.stderr
    assert "encrypted" in done.stdout and f"{2700 - len(before):,} rows sealed" in done.stdout

    assert _column_type(pg, table, "ssn") == ("bytea", False)
    assert shadow not in _columns(pg, table) and _user_triggers(pg, table) == 0
    after = {int(i): bytes(c) for i, c in pg.execute(f"SELECT id, ssn FROM {table}")
             if c is not None}
    assert len(after) == 2700
    # Randomness would show: a cell sealed again would differ (SIV cells differ by key too,
    # and nothing was rotated, so equal bytes mean the very same cell was kept).
    assert all(after[i] == cell for i, cell in before.items())
    final = env.job(job)
    assert final is not None and final["phase"] == "done" and final["done"] == 2700
    status = env.pgseal("migrate", "status", "--config", cfg)
    assert _status_row(status.stdout, job) == ("encrypt", "done", "2,700")
    assert pg.execute(f"SELECT count(*) FROM {table} WHERE ssn IS NULL")[0][0] == 300

    records = [r for r in env.audit()
               if r["event"] == "data.encrypt" and r["table"] == f"public.{table}"]
    assert all(r["key_version"] == 1 and r["kek"] for r in records)
    sealed = sum(r["count"] for r in records)
    assert 2700 <= sealed <= 2700 + 50  # the killed batch may have been audited, not committed

    proxy = env.proxy(policy)
    for tenant in ("t0", "t1", "t2"):
        seen = read_through(proxy, table, "ssn", tenant)
        assert seen == {i: (None if i % 10 == 0 else f"ssn-{i}")
                        for i in range(1, 3001) if f"t{i % 3}" == tenant}
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("SET pgseal.tenant = 't1'")
        # Equality search matches: the migration's cells are the proxy's cells.
        found = conn.execute(f"SELECT id FROM {table} WHERE ssn = %s", ["ssn-1234"]).fetchall()
        assert found == [(1234,)]


def test_writes_through_the_proxy_during_the_migration_all_survive(env: MigEnv) -> None:
    pg = env.pg
    table = unique("mig_live")
    pg.execute(
        f"CREATE TABLE {table} (id int PRIMARY KEY, tenant_id text NOT NULL, ssn text, "
        "note bytea); "
        f"INSERT INTO {table} (id, tenant_id, ssn) SELECT g, CASE WHEN g % 2 = 0 THEN 't1' "
        "ELSE 't2' END, 'orig-' || g FROM generate_series(1, 2000) g")
    old = env.policy("old", {f"public.{table}": {
        "tenant": {"column": "tenant_id"}, "columns": {"note": {"type": "text"}}}})
    new = env.policy("new", {f"public.{table}": {
        "tenant": {"column": "tenant_id"},
        "columns": {"note": {"type": "text"}, "ssn": {"type": "text", "search": "equality"}}}})
    expected_ssn = {i: f"orig-{i}" for i in range(1, 2001)}
    expected_note: dict[int, str] = {}
    t1_ids = [i for i in range(2, 2001, 2)]
    rng = random.Random(7)

    def step(conn: psycopg.Connection[Any], i: int) -> None:
        op = rng.random()
        if op < 0.55:
            row, value = rng.choice(t1_ids), f"upd-{i}"
            conn.execute(f"UPDATE {table} SET ssn = %s WHERE id = %s", [value, row])
            expected_ssn[row] = value
        elif op < 0.75:
            row = 100000 + i
            conn.execute(f"INSERT INTO {table} (id, tenant_id, ssn, note) "
                         "VALUES (%s, 't1', %s, %s)", [row, f"new-{i}", f"note-{i}"])
            t1_ids.append(row)
            expected_ssn[row], expected_note[row] = f"new-{i}", f"note-{i}"
        elif op < 0.85:
            row = rng.choice(t1_ids)
            conn.execute(f"UPDATE {table} SET ssn = NULL WHERE id = %s", [row])
            expected_ssn[row] = None  # type: ignore[assignment]
        else:  # a sealed column of the same rows, written by the proxy meanwhile
            row = rng.choice(t1_ids)
            conn.execute(f"UPDATE {table} SET note = %s WHERE id = %s", [f"n{i}", row])
            expected_note[row] = f"n{i}"

    proxy_old = env.proxy(old)
    cfg = str(env.config_file(new))
    writer = Writer(proxy_old.dsn(), "t1", step)
    with writing(writer):
        time.sleep(0.3)
        result = env.pgseal("migrate", "encrypt", f"public.{table}.ssn", "--batch", "100",
                            "--rate", "1500", "--config", cfg)
        swapped_at = time.monotonic()
        time.sleep(0.5)  # keep writing through the old policy after the cut-over
    writer.finish()
    assert result.returncode == 0, result.stderr
    during = [t for t in writer.ok_at if t < swapped_at]
    assert len(during) > 50, f"only {len(during)} writes overlapped the migration"
    # After the cut-over the old-policy proxy fails closed: its plaintext is refused.
    assert writer.failures, "no write through the old policy was tried after the cut-over"
    assert set(writer.failures) <= {"23514", "42804"}, writer.failures
    env.stop_proxy(proxy_old)

    proxy_new = env.proxy(new)
    got = {**read_through(proxy_new, table, "ssn", "t1"),
           **read_through(proxy_new, table, "ssn", "t2")}
    assert got == expected_ssn
    notes = read_through(proxy_new, table, "note", "t1")
    assert all(notes[i] == v for i, v in expected_note.items())
    # Nothing but cells in the column (the CHECK was validated).
    assert pg.execute(f"SELECT count(*) FROM {table} WHERE ssn IS NOT NULL AND "
                      "substring(ssn from 1 for 1) <> '\\x01'::bytea")[0][0] == 0
    # A plaintext written around the proxy (an untyped literal becomes bytea) is refused.
    with pytest.raises(psycopg.errors.CheckViolation):
        pg.execute(f"UPDATE {table} SET ssn = 'plain text' WHERE id = 1")


@pytest.mark.asyncio
async def test_decrypt_restores_the_plaintext_column(env: MigEnv) -> None:
    pg = env.pg
    table = unique("mig_round")
    pg.execute(
        f"CREATE TABLE {table} (id bigint PRIMARY KEY, tenant_id text NOT NULL, "
        "code varchar(32) NOT NULL, amount numeric(12,2), seen timestamptz, meta jsonb); "
        f"INSERT INTO {table} SELECT g, 't' || (g % 2), 'C-' || g, "
        "CASE WHEN g % 7 = 0 THEN NULL ELSE (g * 1.25)::numeric(12,2) END, "
        "timestamptz '2024-02-29 12:00:00.123456+05:30' + g * interval '1 hour', "
        "jsonb_build_object('n', g, 'tags', jsonb_build_array('a', g % 3)) "
        "FROM generate_series(1, 800) g; "
        f"CREATE TABLE {table}_orig AS SELECT * FROM {table}; "
        f"CREATE INDEX {table}_code ON {table} (code)")
    policy = env.policy("p", {f"public.{table}": {
        "tenant": {"column": "tenant_id"},
        "columns": {"code": {"type": "varchar", "search": "equality"},
                    "amount": {"type": "numeric"}, "seen": {"type": "timestamptz"},
                    "meta": {"type": "jsonb"}}}})
    config = env.with_policies(policy)
    for column in ("code", "amount", "seen", "meta"):
        report = await migrate_column(config, ColumnOptions(
            "encrypt", f"public.{table}.{column}", batch=300))
        assert report.outcome == "done" and report.rows == (800 if column != "amount" else 686)
    assert _column_type(pg, table, "code") == ("bytea", True)  # NOT NULL kept
    proxy = env.proxy(policy)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("SET pgseal.tenant = 't1'")
        through = conn.execute(f"SELECT id, code, amount, seen, meta FROM {table} "
                               "WHERE tenant_id = 't1' ORDER BY id").fetchall()
    direct = pg.execute(f"SELECT id, code, amount, seen, meta FROM {table}_orig "
                        "WHERE tenant_id = 't1' ORDER BY id")
    assert through == [tuple(r) for r in direct]

    for column in ("code", "amount", "seen", "meta"):
        report = await migrate_column(config, ColumnOptions(
            "decrypt", f"public.{table}.{column}", batch=300))
        assert report.outcome == "done"
    assert _column_type(pg, table, "code") == ("character varying(32)", True)
    assert _column_type(pg, table, "amount") == ("numeric(12,2)", False)
    assert _column_type(pg, table, "seen") == ("timestamp with time zone", False)
    assert _column_type(pg, table, "meta") == ("jsonb", False)
    differ = pg.execute(
        f"SELECT count(*) FROM {table} t JOIN {table}_orig o USING (id) WHERE "
        "(t.code, t.amount, t.seen, t.meta) IS DISTINCT FROM (o.code, o.amount, o.seen, o.meta)")
    assert differ[0][0] == 0
    again = await migrate_column(config, ColumnOptions("decrypt", f"public.{table}.code"))
    assert again.outcome == "already"


@pytest.mark.asyncio
async def test_the_opposite_direction_undoes_an_unfinished_migration(env: MigEnv) -> None:
    pg = env.pg
    table = unique("mig_undo")
    pg.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, tenant_id text NOT NULL, "
               "secret text NOT NULL); "
               f"INSERT INTO {table} SELECT g, 'acme', 's' || g FROM generate_series(1, 300) g")
    policy = env.policy("p", {f"public.{table}": {
        "tenant": {"column": "tenant_id"}, "columns": {"secret": {"type": "text"}}}})
    config = env.with_policies(policy)
    ready = await migrate_column(config, ColumnOptions(
        "encrypt", f"public.{table}.secret", swap=False))
    assert ready.outcome == "ready" and ready.rows == 300 and ready.pending == 0
    shadow = ObjectNames.of("public", table, "secret", "encrypt").shadow
    assert shadow in _columns(pg, table) and _user_triggers(pg, table) == 1
    # The trigger keeps it in sync while waiting for the cut-over: a write makes the row
    # pending again.
    pg.execute(f"UPDATE {table} SET secret = 'changed' WHERE id = 5")
    assert pg.execute(f'SELECT "{shadow}" IS NULL FROM {table} WHERE id = 5')[0][0] is True

    undone = await migrate_column(config, ColumnOptions("decrypt", f"public.{table}.secret"))
    assert undone.outcome == "undone"
    assert shadow not in _columns(pg, table) and _user_triggers(pg, table) == 0
    assert _column_type(pg, table, "secret") == ("text", True)
    assert pg.execute(f"SELECT secret FROM {table} WHERE id IN (4, 5) ORDER BY id") == [
        ("s4",), ("changed",)]


def test_table_without_key_and_session_tenant(env: MigEnv) -> None:
    pg = env.pg
    table = unique("mig_heap")
    pg.execute(f"CREATE TABLE {table} (n int, body text); "
               f"INSERT INTO {table} SELECT g, 'body ' || g FROM generate_series(1, 1500) g; "
               f"CREATE TABLE {table}_orig AS SELECT * FROM {table}")
    policy = env.policy("p", {f"public.{table}": {
        "tenant": {"session": True}, "columns": {"body": {"type": "text"}}}})
    cfg = str(env.config_file(policy))
    refused = env.pgseal("migrate", "encrypt", f"public.{table}.body", "--config", cfg)
    assert refused.returncode == 1 and "--tenant" in refused.stderr
    assert refused.stderr.startswith("pgseal: ") and refused.stderr.count("\n") == 1

    done = env.pgseal("migrate", "encrypt", f"public.{table}.body", "--tenant", "acme",
                      "--batch", "200", "--config", cfg)
    assert done.returncode == 0, done.stderr
    proxy = env.proxy(policy)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("SET pgseal.tenant = 'acme'")
        rows: dict[int, str] = dict(conn.execute(f"SELECT n, body FROM {table}").fetchall())
    assert rows == {i: f"body {i}" for i in range(1, 1501)}

    back = env.pgseal("migrate", "decrypt", f"public.{table}.body", "--batch", "200",
                      "--config", cfg)
    assert back.returncode == 0, back.stderr
    assert pg.execute(f"SELECT count(*) FROM {table} t FULL JOIN {table}_orig o USING (n) "
                      "WHERE t.body IS DISTINCT FROM o.body")[0][0] == 0


@pytest.mark.asyncio
async def test_decrypt_refuses_a_cell_moved_to_another_tenant(env: MigEnv) -> None:
    pg = env.pg
    table = unique("mig_moved")
    pg.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, tenant_id text NOT NULL, s text); "
               f"INSERT INTO {table} SELECT g, 't' || (g % 2), 'v' || g "
               "FROM generate_series(1, 100) g")
    policy = env.policy("p", {f"public.{table}": {
        "tenant": {"column": "tenant_id"}, "columns": {"s": {"type": "text"}}}})
    config = env.with_policies(policy)
    await migrate_column(config, ColumnOptions("encrypt", f"public.{table}.s"))
    # Row 1 (tenant t1) gets row 2's cell (tenant t0): it opens under t0's key, but it is
    # not row 1's value, and decrypting it there would hand t0's plaintext to t1's row.
    pg.execute(f"UPDATE {table} SET s = (SELECT s FROM {table} WHERE id = 2) WHERE id = 1")
    with pytest.raises(MigrationError, match="another tenant"):
        await migrate_column(config, ColumnOptions("decrypt", f"public.{table}.s"))
    # Nothing was cut over: encrypt (the opposite direction) drops the half-done decrypt.
    undone = await migrate_column(config, ColumnOptions("encrypt", f"public.{table}.s"))
    assert undone.outcome == "undone"
    assert _column_type(pg, table, "s") == ("bytea", False) and _user_triggers(pg, table) == 0

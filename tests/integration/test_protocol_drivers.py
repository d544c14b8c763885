"""Real drivers through the proxy: asyncpg (binary), psycopg 3 (text), psql (simple).

Prepared statements, executemany, transactions, server-side cursors, notices,
ParameterStatus; psql scripts compared with the same script run directly.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import errors as pg_errors
from psycopg.rows import dict_row

pytestmark = pytest.mark.integration


# --- asyncpg ---------------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_asyncpg_prepared_statements(proxy: Any) -> None:
    conn = await asyncpg.connect(proxy.dsn())
    try:
        stmt = await conn.prepare("select $1::int * 2 as doubled, $2::text || '!' as shout")
        assert [a.name for a in stmt.get_attributes()] == ["doubled", "shout"]
        assert [t.name for t in stmt.get_parameters()] == ["int4", "text"]
        for i in range(50):
            assert tuple(await stmt.fetchrow(i, f"n{i}")) == (i * 2, f"n{i}!")
        # The statement cache reuses named server-side statements across calls.
        for i in range(20):
            assert await conn.fetchval("select $1::bigint + 1", i) == i + 1
    finally:
        await conn.close()


@pytest.mark.asyncio(loop_scope="session")
async def test_asyncpg_executemany_and_types(proxy: Any) -> None:
    conn = await asyncpg.connect(proxy.dsn())
    try:
        await conn.execute(
            "create temp table typed (i int, b bigint, t text, by bytea, n numeric, "
            "ts timestamptz, d date, j jsonb, u uuid, a int[], f float8, ok bool)"
        )
        rows = [
            (
                i,
                i * 10**12,
                f"text {i} ünïcödé",
                bytes(range(i % 256)) * 3,
                decimal.Decimal(f"{i}.{i:04d}"),
                dt.datetime(2024, 1, 1, 12, tzinfo=dt.UTC) + dt.timedelta(hours=i),
                dt.date(2000, 1, 1) + dt.timedelta(days=i),
                json.dumps({"i": i, "tags": ["a", "b"]}),
                uuid.UUID(int=i),
                [i, i + 1, None],
                i / 3,
                i % 2 == 0,
            )
            for i in range(500)
        ]
        await conn.executemany(
            "insert into typed values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)", rows
        )
        got = await conn.fetch("select * from typed order by i")
        assert len(got) == 500
        for row, rec in zip(rows, got, strict=True):
            expect = list(row)
            actual = list(rec)
            expect[7] = json.loads(expect[7])  # jsonb normalises whitespace
            actual[7] = json.loads(actual[7])
            assert actual == expect
        assert await conn.fetchval("select count(*) from typed where ok") == 250
    finally:
        await conn.close()


@pytest.mark.asyncio(loop_scope="session")
async def test_asyncpg_transactions(proxy: Any) -> None:
    conn = await asyncpg.connect(proxy.dsn())
    other = await asyncpg.connect(proxy.dsn())
    try:
        await conn.execute("drop table if exists tx_t; create table tx_t (i int primary key)")
        async with conn.transaction():
            await conn.execute("insert into tx_t values (1)")
            assert conn.is_in_transaction()
            # Not visible to another session before commit.
            assert await other.fetchval("select count(*) from tx_t") == 0
        assert await other.fetchval("select count(*) from tx_t") == 1
        with pytest.raises(RuntimeError):
            async with conn.transaction():
                await conn.execute("insert into tx_t values (2)")
                raise RuntimeError("roll back")
        assert await conn.fetchval("select count(*) from tx_t") == 1
        async with conn.transaction(isolation="serializable", readonly=True):
            assert await conn.fetchval("show transaction_isolation") == "serializable"
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await conn.execute("insert into tx_t values (3)")
        assert not conn.is_in_transaction()
        # Manual BEGIN/COMMIT over the simple protocol, failed transaction status E.
        await conn.execute("begin")
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute("insert into tx_t values (1)")
        with pytest.raises(asyncpg.InFailedSQLTransactionError):
            await conn.fetchval("select 1")
        await conn.execute("rollback")
        assert await conn.fetchval("select 1") == 1
        await conn.execute("drop table tx_t")
    finally:
        await conn.close()
        await other.close()


@pytest.mark.asyncio(loop_scope="session")
async def test_asyncpg_server_side_cursor(proxy: Any) -> None:
    """Execute with a row limit: PortalSuspended, then more Executes on the same portal."""
    conn = await asyncpg.connect(proxy.dsn())
    try:
        async with conn.transaction():
            seen = [
                r[0]
                async for r in conn.cursor("select g from generate_series(1, 1000) g", prefetch=37)
            ]
            assert seen == list(range(1, 1001))
            cur = await conn.cursor(
                "select g, repeat('y', g) from generate_series(1, $1::int) g", 300
            )
            first = await cur.fetch(10)
            assert [r[0] for r in first] == list(range(1, 11))
            await cur.forward(100)
            row = await cur.fetchrow()
            assert row is not None and row[0] == 111 and row[1] == "y" * 111
            rest = await cur.fetch(1000)
            assert [r[0] for r in rest] == list(range(112, 301))
    finally:
        await conn.close()


@pytest.mark.asyncio(loop_scope="session")
async def test_asyncpg_notices_and_parameter_status(proxy: Any) -> None:
    conn = await asyncpg.connect(proxy.dsn())
    try:
        notices: list[str] = []
        conn.add_log_listener(lambda _c, msg: notices.append(msg.message))
        await conn.execute("do $$ begin raise notice 'first %', 1; raise warning 'second'; end $$")
        assert notices == ["first 1", "second"]
        await conn.execute("set application_name = 'renamed-by-set'")
        assert conn.get_settings().application_name == "renamed-by-set"
        await conn.execute("set timezone = 'Asia/Tokyo'")
        assert conn.get_settings().TimeZone == "Asia/Tokyo"
    finally:
        await conn.close()


# --- psycopg --------------------------------------------------------------------------


def test_psycopg_prepared_and_executemany(proxy: Any) -> None:
    with psycopg.connect(proxy.dsn(), prepare_threshold=0) as conn:
        conn.execute("create temp table pm (i int, t text)")
        with conn.cursor() as cur:
            cur.executemany("insert into pm values (%s, %s)", [(i, f"t{i}") for i in range(300)])
            cur.executemany(
                "insert into pm values (%s, %s) returning i * 2",
                [(1000, "a"), (1001, "b")],
                returning=True,
            )
            got = []
            while True:
                got.append(cur.fetchone())
                if not cur.nextset():
                    break
            assert got == [(2000,), (2002,)]
        for i in range(10):
            assert conn.execute("select t from pm where i = %s", [i], prepare=True).fetchone() == (
                f"t{i}",
            )
        # Explicit SQL-level prepared statements too.
        conn.execute("prepare byid (int) as select t from pm where i = $1")
        assert conn.execute("execute byid(42)").fetchone() == ("t42",)
        conn.execute("deallocate byid")
        # Binary results on request.
        with conn.cursor(binary=True) as cur:
            cur.execute("select %s::int, %s::bytea, now()::date", [7, b"\x00\xff"])
            assert cur.fetchone()[:2] == (7, b"\x00\xff")  # type: ignore[index]
        conn.commit()


def test_psycopg_transactions(proxy: Any) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("drop table if exists ptx; create table ptx (i int primary key)")
        with conn.transaction():
            conn.execute("insert into ptx values (1)")
            with pytest.raises(pg_errors.UniqueViolation), conn.transaction():  # savepoint
                conn.execute("insert into ptx values (1)")
            conn.execute("insert into ptx values (2)")
        with pytest.raises(ZeroDivisionError), conn.transaction():
            conn.execute("insert into ptx values (3)")
            raise ZeroDivisionError
        assert conn.execute("select array_agg(i order by i) from ptx").fetchone() == ([1, 2],)
        conn.execute("drop table ptx")
    with psycopg.connect(proxy.dsn()) as conn:  # implicit transactions
        conn.execute("select 1")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        with pytest.raises(pg_errors.DivisionByZero):
            conn.execute("select 1/0")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(pg_errors.InFailedSqlTransaction):
            conn.execute("select 1")
        conn.rollback()
        assert conn.execute("select 2").fetchone() == (2,)


def test_psycopg_server_side_cursors(proxy: Any) -> None:
    with psycopg.connect(proxy.dsn()) as conn:
        with conn.cursor(name="big", row_factory=dict_row) as cur:
            cur.itersize = 100
            cur.execute("select g as n, md5(g::text) as h from generate_series(1, 5000) g")
            count = 0
            for row in cur:
                count += 1
                assert row["n"] == count
            assert count == 5000
        with conn.cursor(name="scroll", scrollable=True) as cur:
            cur.execute("select g from generate_series(1, 100) g")
            assert cur.fetchmany(3) == [(1,), (2,), (3,)]
            cur.scroll(50, mode="absolute")
            assert cur.fetchone() == (51,)
            cur.scroll(-10)
            assert cur.fetchone() == (42,)
        conn.commit()
        with conn.cursor(name="held", withhold=True) as cur:
            cur.execute("select g from generate_series(1, 10) g")
            conn.commit()  # WITH HOLD survives the commit
            assert [r[0] for r in cur.fetchall()] == list(range(1, 11))


def test_psycopg_notices_and_parameter_status(proxy: Any) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        notices: list[str] = []
        conn.add_notice_handler(
            lambda diag: notices.append(f"{diag.severity}: {diag.message_primary}")
        )
        conn.execute("do $$ begin raise notice 'hi %', 'there'; end $$")
        assert notices == ["NOTICE: hi there"]
        conn.execute("set application_name = 'via-psycopg'")
        assert conn.info.parameter_status("application_name") == "via-psycopg"
        conn.execute("set datestyle = 'SQL, DMY'")
        assert conn.info.parameter_status("DateStyle") == "SQL, DMY"


def test_psycopg_startup_options_pass_through(proxy: Any) -> None:
    dsn = proxy.dsn(
        application_name="opt-test", options="-c%20search_path%3Dpg_catalog%20-c%20work_mem%3D7MB"
    )
    with psycopg.connect(dsn) as conn:
        assert conn.execute("show work_mem").fetchone() == ("7MB",)
        assert conn.execute("show search_path").fetchone() == ("pg_catalog",)
        assert conn.execute("select current_setting('application_name')").fetchone() == (
            "opt-test",
        )


@pytest.mark.parametrize(
    ("user", "database", "expected"),
    [
        ("postgres", "no_such_db", 'FATAL:  database "no_such_db" does not exist'),
        ("no_such_role", "postgres", 'FATAL:  role "no_such_role" does not exist'),
    ],
)
def test_startup_errors_pass_through(
    proxy: Any, pg: Any, user: str, database: str, expected: str
) -> None:
    messages = []
    for target in (pg, proxy):
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(target.dsn(user=user, database=database)).close()
        messages.append(str(info.value).rsplit("failed: ", 1)[1])
    assert messages == [expected, expected]


# --- psql: the simple protocol -----------------------------------------------------------


PSQL_SCRIPT = r"""
\set ON_ERROR_STOP 0
drop table if exists psql_t;
create table psql_t (i int primary key, t text);
insert into psql_t values (1, 'one'); insert into psql_t values (2, 'two'); select count(*)
  from psql_t;
select 1 as a; select 1/0; select 'never reached';
begin; insert into psql_t values (3, 'three'); insert into psql_t values (1, 'dup'); commit;
select i, t from psql_t order by i;
\copy psql_t from '{copy_in}'
\copy psql_t to '{copy_out}'
\copy (select i * 10, upper(t) from psql_t order by i) to '{copy_out2}' with (format csv, header)
\copy psql_t from '{bad_in}'
select count(*) from psql_t;
do $$ begin raise notice 'notice from psql'; end $$;
select repeat('z', 100000) = repeat('z', 100000) as big;
\echo :SERVER_VERSION_NUM
select ;
drop table psql_t;
"""


def _psql(dsn: str, script: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["psql", "-X", "-d", dsn, "-v", "VERBOSITY=default"],
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
        check=False,
    )


def test_psql_script_matches_direct(proxy: Any, pg: Any, tmp_path: Path) -> None:
    copy_in = tmp_path / "in.tsv"
    copy_in.write_text("".join(f"{i}\trow {i}\n" for i in range(10, 2010)))
    bad_in = tmp_path / "bad.tsv"
    bad_in.write_text("5000\tfine\nnot-a-number\tbad\n")
    results = {}
    for name, target in (("direct", pg), ("proxy", proxy)):
        files = {k: tmp_path / f"{name}-{k}.out" for k in ("copy_out", "copy_out2")}
        script = PSQL_SCRIPT.format(copy_in=copy_in, bad_in=bad_in, **files)
        done = _psql(target.dsn(), script)
        results[name] = (
            done.returncode,
            done.stdout,
            done.stderr,
            *(f.read_text() for f in files.values()),
        )
    direct, proxied = results["direct"], results["proxy"]
    assert proxied == direct
    _code, out, err, copy_out, copy_out2 = direct
    assert "division by zero" in err and "duplicate key" in err and "invalid input syntax" in err
    assert "notice from psql" in err
    assert "COPY 2000" in out and "2002" in out  # rows loaded, then counted
    assert len(copy_out.splitlines()) == 2002 and copy_out2.startswith("?column?,upper\n10,ONE\n")


def test_psql_on_error_stop_exit_code(proxy: Any) -> None:
    done = _psql(proxy.dsn(), "\\set ON_ERROR_STOP 1\nselect 1;\nselect nope;\nselect 2;\n")
    assert done.returncode == 3
    assert 'column "nope" does not exist' in done.stderr
    assert " 2\n" not in done.stdout


@pytest.mark.parametrize(
    "sql",
    [
        "create temp table m (i int); insert into m select generate_series(1, 10); "
        "select sum(i) from m",
        "select 1 as a; select 1/0; select 3 as c",
        "begin; select 1; select nope; commit",
        "select 'a' \\; select 'b'",
    ],
)
def test_psql_several_statements_in_one_query(proxy: Any, pg: Any, sql: str) -> None:
    """psql -c sends the string as ONE Query message; the answers must equal direct."""
    runs = [
        subprocess.run(
            ["psql", "-X", "-A", "-d", target.dsn(), "-c", sql],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        for target in (pg, proxy)
    ]
    direct, proxied = ((r.returncode, r.stdout, r.stderr) for r in runs)
    assert proxied == direct

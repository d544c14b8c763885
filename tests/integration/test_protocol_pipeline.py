"""Extended-protocol pipelines and error recovery, compared with PostgreSQL itself.

Each scenario runs twice, once directly against PostgreSQL and once through the
proxy, and the two transcripts must be equal: results, errors (SQLSTATE and
message), and what works again after the error. The raw tests compare every
message byte for byte.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.wire import messages as m
from proxy.wire.framing import Frame
from tests.integration.test_protocol_robustness import RawConn, error_of

pytestmark = pytest.mark.integration


def _outcome(fn: Callable[[], Any]) -> Any:
    try:
        return ("ok", fn())
    except psycopg.Error as exc:
        return ("error", type(exc).__name__, exc.sqlstate, str(exc).splitlines()[0])


# --- psycopg pipeline mode ---------------------------------------------------------------


def psycopg_pipeline_transcript(dsn: str, table: str) -> list[Any]:
    out: list[Any] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"drop table if exists {table}")
        conn.execute(f"create table {table} (id int primary key, v text)")

        # 1. Autocommit pipeline, error in the middle: one Sync closes the pipeline, so
        #    it is one implicit transaction and nothing of it stays; the statements after
        #    the error are skipped; the connection recovers.
        def step1() -> Any:
            cursors = []
            with conn.pipeline():
                cursors.append(conn.execute(f"insert into {table} values (1, 'a') returning id"))
                cursors.append(conn.execute(f"insert into {table} values (2, 'b') returning id"))
                cursors.append(conn.execute(f"insert into {table} values (1, 'dup') returning id"))
                cursors.append(conn.execute(f"insert into {table} values (3, 'c') returning id"))
            return [c.fetchall() for c in cursors]

        out.append(_outcome(step1))
        out.append(
            _outcome(lambda: conn.execute(f"select id, v from {table} order by id").fetchall())
        )

        # 2. Explicit syncs split the pipeline: an error after a sync point only aborts
        #    its own segment; the next segment runs.
        results: list[Any] = []

        def step2() -> Any:
            with conn.pipeline() as p:
                a = conn.execute(f"insert into {table} values (10, 'x')")
                p.sync()
                b = conn.execute("select 1/0")
                try:
                    p.sync()
                except psycopg.Error as exc:
                    results.append(("sync error", type(exc).__name__, exc.sqlstate))
                c = conn.execute(f"insert into {table} values (11, 'y') returning v")
                d = conn.execute("select $1::int * 2", [21], prepare=True)
                p.sync()
                results.append(a.statusmessage)
                results.append(_outcome(b.fetchall))
                results.append(c.fetchall())
                results.append(d.fetchall())
            return results

        out.append(_outcome(step2))
        out.append(results)

        # 3. Inside a transaction: the error aborts it; after the pipeline the
        #    transaction block rolls back and nothing from it stays.
        def step3() -> Any:
            with conn.transaction(), conn.pipeline():
                conn.execute(f"insert into {table} values (20, 'tx')")
                conn.execute(f"update {table} set v = 'changed' where id = 1")
                conn.execute("select * from no_such_table_anywhere")
                conn.execute(f"insert into {table} values (21, 'tx')")

        out.append(_outcome(step3))
        out.append(
            _outcome(lambda: conn.execute(f"select id, v from {table} order by id").fetchall())
        )

        # 4. Many prepared statements and parameters in one pipeline, error at the end.
        def step4() -> Any:
            curs = []
            with conn.pipeline():
                for i in range(50):
                    curs.append(
                        conn.execute(
                            "select %s::int + %s::int, %s::text", [i, i, f"r{i}"], prepare=True
                        )
                    )
                curs.append(conn.execute("select 'x'::int"))
            return [c.fetchall() for c in curs]

        out.append(_outcome(step4))
        out.append(_outcome(lambda: conn.execute("select 'still alive'").fetchone()))
        conn.execute(f"drop table {table}")
    return out


def test_psycopg_pipeline_errors_recover_as_direct(proxy: Any, pg: Any) -> None:
    # Same table name on both runs (it appears in error messages); they run one after the other.
    direct = psycopg_pipeline_transcript(pg.dsn(), "pipe_t")
    proxied = psycopg_pipeline_transcript(proxy.dsn(), "pipe_t")
    assert proxied == direct
    # The scenario did exercise errors (so the comparison means something).
    assert direct[0][0] == "error" and direct[0][2] == "23505"
    assert direct[-1] == ("ok", ("still alive",))


def test_psycopg_pipeline_many_statements(proxy: Any) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("create temp table many (i int, t text)")
        with conn.pipeline(), conn.cursor() as cur:
            cur.executemany(
                "insert into many values (%s, %s)", [(i, str(i) * 10) for i in range(2000)]
            )
        # Read back after the pipeline has drained: fetching inside it right after an
        # executemany races inside psycopg itself (seen against PostgreSQL directly too:
        # "the last operation didn't produce records").
        count, total, biggest = conn.execute(  # type: ignore[misc]
            "select count(*), sum(i), max(t) from many"
        ).fetchone()
        assert (count, total, biggest) == (2000, sum(range(2000)), "999" * 10)


# --- asyncpg ------------------------------------------------------------------------------


async def asyncpg_transcript(dsn: str, table: str) -> list[Any]:
    out: list[Any] = []

    async def outcome(coro: Any) -> Any:
        try:
            return ("ok", await coro)
        except asyncpg.PostgresError as exc:
            return ("error", type(exc).__name__, exc.sqlstate, str(exc))

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"drop table if exists {table}")
        await conn.execute(f"create table {table} (id int primary key, v text not null)")
        # executemany pipelines Bind/Execute for every row before one Sync: a failing
        # row in the middle aborts the batch (asyncpg's executemany is atomic).
        rows = [(i, f"v{i}") for i in range(100)]
        rows[57] = (57, None)
        out.append(await outcome(conn.executemany(f"insert into {table} values ($1, $2)", rows)))
        out.append(await outcome(conn.fetchval(f"select count(*) from {table}")))
        rows[57] = (57, "v57")
        out.append(await outcome(conn.executemany(f"insert into {table} values ($1, $2)", rows)))
        out.append(await outcome(conn.fetchval(f"select count(*) from {table}")))
        # Duplicate key mid-batch.
        out.append(
            await outcome(
                conn.executemany(
                    f"insert into {table} values ($1, $2)", [(200, "a"), (5, "b"), (201, "c")]
                )
            )
        )
        out.append(await outcome(conn.fetchval(f"select count(*) from {table}")))
        # Error inside an explicit transaction, then statements in the failed transaction.
        tr = conn.transaction()
        await tr.start()
        out.append(await outcome(conn.execute(f"insert into {table} values (300, 'in tx')")))
        out.append(await outcome(conn.fetchval("select 1/0")))
        out.append(await outcome(conn.fetchval("select 1")))
        await tr.rollback()
        out.append(await outcome(conn.fetchval(f"select count(*) from {table} where id >= 300")))
        # Prepared statement whose execution fails, then reused successfully.
        stmt = await conn.prepare("select 10 / $1::int")
        out.append(await outcome(stmt.fetchval(0)))
        out.append(await outcome(stmt.fetchval(5)))
        # Savepoint: inner error rolled back, outer work kept.
        async with conn.transaction():
            await conn.execute(f"insert into {table} values (400, 'outer')")
            try:
                async with conn.transaction():
                    await conn.execute(f"insert into {table} values (400, 'inner dup')")
            except asyncpg.UniqueViolationError as exc:
                out.append(("inner", exc.sqlstate))
            await conn.execute(f"insert into {table} values (401, 'outer 2')")
        out.append(
            await outcome(conn.fetch(f"select id, v from {table} where id >= 400 order by id"))
        )
        out.append(conn.is_in_transaction())
        await conn.execute(f"drop table {table}")
    finally:
        await conn.close()
    # Records compare by value; make them plain tuples.
    return [
        tuple(tuple(r) if isinstance(r, asyncpg.Record) else r for r in x)
        if isinstance(x, tuple)
        else x
        for x in out
    ]


@pytest.mark.asyncio(loop_scope="session")
async def test_asyncpg_errors_mid_pipeline_recover_as_direct(proxy: Any, pg: Any) -> None:
    direct = await asyncpg_transcript(pg.dsn(), "apipe_t")
    proxied = await asyncpg_transcript(proxy.dsn(), "apipe_t")
    assert proxied == direct
    assert direct[0][0] == "error" and direct[0][2] == "23502"
    assert direct[1] == ("ok", 0)
    assert direct[3] == ("ok", 100)


@pytest.mark.asyncio(loop_scope="session")
async def test_asyncpg_concurrent_pipelines_on_many_connections(proxy: Any) -> None:
    conns = [await asyncpg.connect(proxy.dsn()) for _ in range(8)]
    try:

        async def run(conn: asyncpg.Connection, k: int) -> None:
            await conn.execute("create temp table if not exists pp (i int, k int)")
            for _ in range(5):
                await conn.executemany(
                    "insert into pp values ($1, $2)", [(i, k) for i in range(200)]
                )
                with pytest.raises(asyncpg.DivisionByZeroError):
                    await conn.executemany(
                        "insert into pp values (1 / $1, $2)", [(1, k), (0, k), (1, k)]
                    )
            assert await conn.fetchval("select count(*) from pp where k = $1", k) == 1000

        await asyncio.gather(*(run(c, k) for k, c in enumerate(conns)))
    finally:
        for c in conns:
            await c.close()


# --- raw messages, byte for byte -------------------------------------------------------------


def _transcript(host: str, port: int, script: list[list[bytes]]) -> list[list[bytes]]:
    """Send each batch, read up to the ReadyForQuery each Sync/Query owes; raw frames back."""
    out: list[list[bytes]] = []
    with RawConn(host, port) as conn:
        conn.startup(application_name="raw-pipeline")
        for batch in script:
            conn.send(*batch)
            owed = sum(1 for msg in batch if msg[:1] in (b"S", b"Q"))
            frames: list[bytes] = []
            for _ in range(owed):
                frames.extend(f.raw for f in conn.read_until_ready())
            out.append(frames)
    return out


def _q(sql: str) -> bytes:
    return m.Query(sql).encode()


def _bind(portal: str, stmt: str, *params: bytes | None, results: tuple[int, ...] = ()) -> bytes:
    return m.Bind(portal, stmt, (), tuple(params), results).encode()


RAW_SCRIPT: list[list[bytes]] = [
    # Named and unnamed statements and portals, Describe of both, several Executes, one Sync.
    [
        m.Parse("s_add", "select $1::int + $2::int as sum", (23, 23)).encode(),
        m.Describe("S", "s_add").encode(),
        _bind("p1", "s_add", b"1", b"2"),
        m.Describe("P", "p1").encode(),
        m.Execute("p1").encode(),
        m.Parse("", "select g, g * 2 from generate_series(1, $1::int) g").encode(),
        _bind("", "", b"5", results=(1,)),
        m.Execute("", 2).encode(),  # PortalSuspended after two rows
        m.Execute("", 0).encode(),  # the rest
        m.SYNC,
    ],
    # An error in the middle: everything after it up to Sync is skipped, then recovery.
    [
        _bind("", "s_add", b"40", b"2"),
        m.Execute("").encode(),
        m.Parse("", "select 1/0").encode(),
        _bind("", ""),
        m.Execute("").encode(),
        _bind("", "s_add", b"7", b"7"),
        m.Execute("").encode(),
        m.Parse("bad", "selec oops").encode(),
        m.SYNC,
        _bind("", "s_add", b"100", b"1"),
        m.Execute("").encode(),
        m.SYNC,
    ],
    # Errors of several kinds: parse error, bad parameter, missing statement, missing portal.
    [m.Parse("", "select * from nowhere_at_all").encode(), m.SYNC],
    [_bind("", "s_add", b"x", b"1"), m.Execute("").encode(), m.SYNC],
    [_bind("", "no_such_statement"), m.SYNC],
    [m.Execute("no_such_portal").encode(), m.SYNC],
    [m.Describe("S", "no_such_statement").encode(), m.SYNC],
    # Close statement and portal; using the closed statement then fails.
    [
        _bind("keep", "s_add", b"2", b"2"),
        m.Close("P", "keep").encode(),
        m.Close("S", "s_add").encode(),
        m.Close("S", "never_existed").encode(),
        m.SYNC,
    ],
    [_bind("", "s_add", b"1", b"1"), m.SYNC],
    # Transactions across syncs; error inside the transaction block: status E until ROLLBACK.
    [
        _q("begin"),
        m.Parse("", "insert into raw_t values ($1)").encode(),
        _bind("", "", b"1"),
        m.Describe("P", "").encode(),  # NoData
        m.Execute("").encode(),
        m.SYNC,
    ],
    [m.Parse("", "select 1/0").encode(), _bind("", ""), m.Execute("").encode(), m.SYNC],
    [_q("select 1"), m.Parse("", "select 2").encode(), m.SYNC],
    [_q("rollback"), _q("select count(*) from raw_t")],
    # Simple protocol: several statements in one string, error in the middle.
    [_q("select 1 as a; select 'two' as b; select 1/0; select 4")],
    [_q("begin; insert into raw_t values (5); select * from raw_t; commit")],
    [_q("select 1; select 1/0; select 3"), _q("select count(*) from raw_t")],
    [_q("")],  # EmptyQueryResponse
    [_q("do $$ begin raise notice 'hello % world', 42; end $$")],  # NoticeResponse
    [_q("set application_name = 'raw-renamed'; show application_name")],  # ParameterStatus
    # COPY over both protocols: CopyData/CopyDone, CopyFail, COPY TO.
    [
        _q("copy raw_t from stdin"),
        m.frame(b"d", b"7\n8\n"),
        m.frame(b"d", b"9\n"),
        m.frame(b"c", b""),
    ],
    [_q("copy raw_t from stdin"), m.frame(b"d", b"10\n"), m.frame(b"f", b"raw client gave up\0")],
    [_q("copy raw_t from stdin"), m.frame(b"d", b"eleven\n"), m.frame(b"c", b"")],
    [
        m.Parse("", "copy raw_t from stdin").encode(),
        _bind("", ""),
        m.Execute("").encode(),
        m.frame(b"d", b"12\n"),
        m.frame(b"c", b""),
        m.SYNC,
    ],
    [
        _q("copy (select * from raw_t order by 1) to stdout"),
        _q("copy raw_t to stdout (format binary)"),
    ],
    [_q("delete from raw_t")],
]


def test_raw_extended_protocol_matches_direct_byte_for_byte(proxy: Any, pg: Any) -> None:
    pg.execute("drop table if exists raw_t; create table raw_t (i int)")
    try:
        direct = _transcript(pg.host, pg.port, RAW_SCRIPT)
        proxied = _transcript(proxy.host, proxy.port, RAW_SCRIPT)
    finally:
        pg.execute("drop table raw_t")
    for i, (d, p) in enumerate(zip(direct, proxied, strict=True)):
        assert p == d, f"batch {i} differs"
    # Sanity: the script does produce what it means to (errors, suspension, notice).
    types = {f[:1] for batch in direct for f in batch}
    assert {
        b"E",
        b"s",
        b"I",
        b"N",
        b"3",
        b"n",
        b"t",
        b"T",
        b"1",
        b"2",
        b"G",
        b"H",
        b"d",
        b"c",
    } <= types


def test_flush_without_sync_gets_answers(proxy: Any, pg: Any) -> None:
    """Flush makes PostgreSQL send what it has; the proxy must not wait for a Sync."""
    for host, port in ((pg.host, pg.port), (proxy.host, proxy.port)):
        with RawConn(host, port) as conn:
            conn.startup()
            conn.send(
                m.Parse("f1", "select 'flushed'::text").encode(),
                _bind("", "f1"),
                m.Execute("").encode(),
                m.FLUSH,
            )
            got = [conn.read_frame(timeout=5) for _ in range(4)]
            assert [chr(f.type) for f in got if f] == ["1", "2", "D", "C"]
            assert m.decode_data_row(got[2].body).values == (b"flushed",)  # type: ignore[union-attr]
            # An error before Sync is also sent on Flush; then everything until Sync is skipped.
            conn.send(
                m.Parse("", "select 1/0").encode(), _bind("", ""), m.Execute("").encode(), m.FLUSH
            )
            frames = [conn.read_frame(timeout=5) for _ in range(2)]
            assert [chr(f.type) for f in frames if f] == ["1", "E"]
            assert error_of(frames[1]).sqlstate == "22012"  # type: ignore[arg-type]
            conn.send(_bind("", "f1"), m.Execute("").encode(), m.SYNC)
            tail = conn.read_until_ready()
            assert [chr(f.type) for f in tail] == ["Z"]
            conn.send(_bind("", "f1"), m.Execute("").encode(), m.SYNC)
            assert [chr(f.type) for f in conn.read_until_ready()] == ["2", "D", "C", "Z"]


def test_deep_pipeline_without_reading(proxy: Any) -> None:
    """Thousands of queries written before any answer is read: backpressure both ways."""
    n = 5000
    with RawConn(proxy.host, proxy.port, timeout=60) as conn:
        conn.startup()
        batch = m.Parse("deep", "select $1::int, repeat('x', 200)").encode()
        msgs = [batch]
        for i in range(n):
            msgs.append(_bind("", "deep", str(i).encode()))
            msgs.append(m.Execute("").encode())
            msgs.append(m.SYNC)
        payload = b"".join(msgs)
        sender = threading.Thread(target=conn.send, args=(payload,))
        sender.start()
        rows = 0
        readies = 0
        while readies < n:
            f = conn.read_frame()
            assert isinstance(f, Frame)
            if f.type == ord("D"):
                assert m.decode_data_row(f.body).values[0] == str(rows).encode()
                rows += 1
            elif f.type == ord("Z"):
                readies += 1
            elif f.type == ord("E"):
                raise AssertionError(error_of(f))
        sender.join()
        assert rows == n

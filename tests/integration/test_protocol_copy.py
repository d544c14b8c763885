"""COPY in both directions: psycopg, asyncpg, psql \\copy; failures mid-stream."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import errors as pg_errors

from proxy.wire import messages as m

pytestmark = pytest.mark.integration


def test_psycopg_copy_in_and_out(proxy: Any) -> None:
    rows = [
        (i, f"name {i}\ttab\nnewline \\ backslash", None if i % 7 == 0 else i * 1.5)
        for i in range(20000)
    ]
    with psycopg.connect(proxy.dsn()) as conn:
        conn.execute("create temp table cp (i int, t text, f float8)")
        with conn.cursor() as cur:
            with cur.copy("copy cp (i, t, f) from stdin") as copy:
                for row in rows:
                    copy.write_row(row)
            assert cur.rowcount == len(rows)
            with cur.copy("copy cp to stdout") as copy:
                back = list(copy.rows())
            assert [(int(i), t, None if f is None else float(f)) for i, t, f in back] == rows
            # Binary COPY both ways.
            with cur.copy(
                "copy (select i, t, f from cp order by i) to stdout (format binary)"
            ) as copy:
                copy.set_types(["int4", "text", "float8"])
                binary_rows = list(copy.rows())
            assert binary_rows == rows
            cur.execute("create temp table cp2 (like cp)")
            with cur.copy("copy cp2 from stdin (format binary)") as copy:
                copy.set_types(["int4", "text", "float8"])
                for row in binary_rows:
                    copy.write_row(row)
            cur.execute("select count(*), sum(i) from cp2")
            assert cur.fetchone() == (len(rows), sum(range(len(rows))))


def test_psycopg_copy_large_stream(proxy: Any) -> None:
    """About 40 MB of COPY data in 1 MB writes: streams through, no single large message."""
    chunk = "".join(f"{i}\t{'x' * 200}\n" for i in range(5000)).encode()
    with psycopg.connect(proxy.dsn()) as conn:
        conn.execute("create temp table cbig (i int, t text)")
        with conn.cursor() as cur:
            with cur.copy("copy cbig from stdin") as copy:
                for _ in range(40):
                    copy.write(chunk)
            assert cur.rowcount == 200000
            total = 0
            with cur.copy("copy cbig to stdout") as copy:
                for data in copy:
                    total += len(data)
            assert total == 40 * len(chunk)


def test_psycopg_copy_errors_recover(proxy: Any) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("drop table if exists cerr; create table cerr (i int primary key)")
        # The client aborts the COPY itself: psycopg sends CopyFail and re-raises.
        with pytest.raises(RuntimeError), conn.cursor() as cur:
            with cur.copy("copy cerr from stdin") as copy:
                copy.write_row((1,))
                raise RuntimeError("client gave up")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        # The server rejects the data while the client is still sending.
        with pytest.raises(pg_errors.InvalidTextRepresentation), conn.cursor() as cur:
            with cur.copy("copy cerr from stdin") as copy:
                copy.write(b"1\n2\nthree\n")
                for i in range(4, 20000):
                    copy.write(f"{i}\n".encode())
        with pytest.raises(pg_errors.UniqueViolation), conn.cursor() as cur:
            with cur.copy("copy cerr from stdin") as copy:
                copy.write(b"1\n1\n")
        assert conn.execute("select count(*) from cerr").fetchone() == (0,)
        # COPY TO of a failing query.
        with pytest.raises(pg_errors.DivisionByZero), conn.cursor() as cur:
            with cur.copy(
                "copy (select 1 / (g - 500) from generate_series(1, 1000) g) to stdout"
            ) as copy:
                for _ in copy:
                    pass
        assert conn.execute("select 'recovered'").fetchone() == ("recovered",)
        conn.execute("drop table cerr")


@pytest.mark.asyncio(loop_scope="session")
async def test_asyncpg_copy_both_ways(proxy: Any) -> None:
    conn = await asyncpg.connect(proxy.dsn())
    try:
        await conn.execute("create temp table acp (i int, t text, b bytea)")
        records = [(i, f"rec {i}", bytes([i % 256]) * (i % 50)) for i in range(10000)]
        result = await conn.copy_records_to_table("acp", records=records)
        assert result == "COPY 10000"
        # copy_to_table from a file-like source (text format).
        source = io.BytesIO(
            "".join(f"{i}\tfrom file {i}\t\\\\x00ff\n" for i in range(10000, 12000)).encode()
        )
        assert await conn.copy_to_table("acp", source=source) == "COPY 2000"
        # copy_from_query into a sink, and copy_from_table into a file-like object.
        sink = io.BytesIO()
        assert (
            await conn.copy_from_query(
                "select i, t from acp where i < $1 order by i", 100, output=sink
            )
            == "COPY 100"
        )
        lines = sink.getvalue().decode().splitlines()
        assert lines[0] == "0\trec 0" and lines[-1] == "99\trec 99"
        chunks: list[bytes] = []

        async def collect(data: bytes) -> None:
            chunks.append(data)

        assert await conn.copy_from_table("acp", output=collect, format="csv") == "COPY 12000"
        assert b"".join(chunks).count(b"\n") == 12000
        assert await conn.fetchval("select count(*) from acp where b = '\\x00ff'::bytea") == 2000
        # A failing COPY FROM, then the connection is fine.
        with pytest.raises(asyncpg.InvalidTextRepresentationError):
            await conn.copy_to_table(
                "acp", source=io.BytesIO(b"1\tok\t\\\\x00\nnope\tbad\t\\\\x00\n")
            )
        assert await conn.fetchval("select count(*) from acp") == 12000
    finally:
        await conn.close()


def _psql(dsn: str, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-c", command],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_psql_copy_both_ways(proxy: Any, pg: Any, tmp_path: Path) -> None:
    source = tmp_path / "source.csv"
    source.write_text("i,t\n" + "".join(f'{i},"quoted, {i}"\n' for i in range(50000)))
    pg.execute("drop table if exists psql_copy; create table psql_copy (i int, t text)")
    try:
        done = _psql(proxy.dsn(), f"\\copy psql_copy from '{source}' with (format csv, header)")
        assert done.returncode == 0 and done.stdout.strip() == "COPY 50000", done.stderr
        out_proxy = tmp_path / "via-proxy.csv"
        out_direct = tmp_path / "direct.csv"
        for target, path in ((proxy, out_proxy), (pg, out_direct)):
            done = _psql(
                target.dsn(),
                f"\\copy (select * from psql_copy order by i) to '{path}' "
                "with (format csv, header)",
            )
            assert done.returncode == 0, done.stderr
        assert out_proxy.read_bytes() == out_direct.read_bytes() == source.read_bytes()
        bad = tmp_path / "bad.csv"
        bad.write_text("1,a\nx,b\n")
        done = _psql(proxy.dsn(), f"\\copy psql_copy from '{bad}' with (format csv)")
        assert done.returncode != 0 and 'invalid input syntax for type integer: "x"' in done.stderr
    finally:
        pg.execute("drop table psql_copy")


def test_a_pipelined_copy_from_with_its_stream_and_a_second_sync(
    sealing_proxy: Any, pg: Any
) -> None:
    """Parse/Bind/Execute/Sync of a protected COPY FROM, its data, CopyDone and Sync, all in
    one write (a pipelining client that does not wait for CopyInResponse). PostgreSQL
    ignores the first Sync (inside the COPY) and answers the second: so must the proxy,
    and the session goes on, also when the COPY fails (the second row has no tenant: the
    proxy ends the COPY with CopyFail, nothing of it is stored)."""
    import secrets

    from tests.integration.test_protocol_robustness import RawConn

    tenant, sentinel = f"copy-pipe-{secrets.token_hex(4)}", "SENTINEL-copy-pipe-7"
    for rows, expected in (
        (f"{tenant}\t{sentinel}\n", ["1", "2", "G", "C", "Z"]),
        (f"{tenant}\t{sentinel}\n\\N\t{sentinel}\n", ["1", "2", "G", "E", "Z"]),
    ):
        with RawConn(sealing_proxy.host, sealing_proxy.port) as conn:
            conn.startup(options=f"-c pgseal.tenant={tenant}")
            conn.send(
                m.Parse("", "COPY patients (tenant_id, ssn) FROM STDIN").encode(),
                m.Bind("", "", (), (), ()).encode(),
                m.Execute("", 0).encode(),
                m.SYNC,
                m.CopyData(rows.encode()).encode(),
                m.COPY_DONE,
                m.SYNC,
            )
            answer = [chr(f.type) for f in conn.read_until_ready()]
            assert answer == expected, answer
            conn.send(m.Query("SELECT 1").encode())
            assert [chr(f.type) for f in conn.read_until_ready()] == ["T", "D", "C", "Z"]
    stored = pg.execute(f"SELECT ssn FROM patients WHERE tenant_id = '{tenant}'")
    assert len(stored) == 1 and sentinel.encode() not in bytes(stored[0][0])  # type: ignore[arg-type]

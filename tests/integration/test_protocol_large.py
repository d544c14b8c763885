"""Large values and many connections, against the real `pgseal serve` process.

A 64 MB value crosses the proxy in both directions while the proxy's peak
memory (VmHWM) grows by far less than the value: large messages stream
through, and a client that does not read stops the upstream (backpressure)
instead of filling the proxy's memory. Then 300 clients at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.wire import messages as m
from tests.integration.test_protocol_robustness import RawConn

pytestmark = pytest.mark.integration

MB = 1024 * 1024
BIG = 64 * MB
# Growth allowed for a 64 MB value: buffers of a few MB (high-water marks, socket reads,
# allocator slack), never the value itself.
MAX_GROWTH = 20 * MB


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0]) * 1024
    return out


@pytest.mark.asyncio(loop_scope="session")
async def test_64mb_value_both_directions_without_buffering(proxy_process: Any) -> None:
    proxy = proxy_process()
    pid = proxy.proc.pid
    conn = await asyncpg.connect(proxy.dsn())
    try:
        # The server log has log_statement=all: keep 64 MB parameters out of it.
        await conn.execute(
            "set log_parameter_max_length = 0; set log_parameter_max_length_on_error = 0"
        )
        await conn.execute("create temp table big (v bytea)")
        # Warm up every path (and the allocator) with 2 MB values first.
        warm = os.urandom(2 * MB)
        await conn.execute("insert into big values ($1)", warm)
        assert await conn.fetchval("select v from big") == warm
        assert len(await conn.fetchval("select repeat('w', $1)", 2 * MB)) == 2 * MB
        await conn.execute("truncate big")
        before = memory(pid)

        value = os.urandom(BIG)
        digest = hashlib.sha256(value).hexdigest()
        # Client -> server: one 64 MB Bind message.
        await conn.execute("insert into big values ($1)", value)
        assert await conn.fetchval("select encode(sha256(v), 'hex') from big") == digest
        # Server -> client: one 64 MB DataRow (binary), and one 64 MB text value.
        got = await conn.fetchval("select v from big")
        assert got == value
        del got
        text = await conn.fetchval("select repeat('x', $1)", BIG)
        assert len(text) == BIG
        del text
        after = memory(pid)
    finally:
        await conn.close()
    grew = after["VmHWM"] - before["VmHWM"]
    assert grew < MAX_GROWTH, (
        f"proxy peak memory grew by {grew / MB:.1f} MB for a 64 MB value ({before} -> {after})"
    )


def test_slow_reader_applies_backpressure(proxy_process: Any) -> None:
    """A client that asks for 64 MB and reads nothing: the proxy stops reading upstream."""
    proxy = proxy_process()
    pid = proxy.proc.pid
    with psycopg.connect(proxy.dsn()) as warm:  # warm the process up first
        warm.execute("select repeat('w', 2 * 1024 * 1024)").fetchone()
    before = memory(pid)
    with RawConn("127.0.0.1", proxy.port, timeout=60) as conn:
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        conn.startup()
        conn.send(m.Query(f"select repeat('x', {BIG})").encode())
        time.sleep(3)  # PostgreSQL has long produced the value; the client reads nothing
        stalled = memory(pid)
        total = 0
        while True:
            frame = conn.read_frame()
            assert frame is not None
            if frame.type == ord("D"):
                total = len(frame.body)
            if frame.type == ord("Z"):
                break
        assert total > BIG
    grew = stalled["VmHWM"] - before["VmHWM"]
    assert grew < MAX_GROWTH, f"proxy buffered {grew / MB:.1f} MB for a client that does not read"


@pytest.mark.asyncio(loop_scope="session")
async def test_300_concurrent_connections(proxy_process: Any, pg: Any) -> None:
    proxy = proxy_process()
    n = 300
    app = "many-conns"
    gate = asyncio.Event()

    async def client(i: int) -> tuple[int, int]:
        conn = await asyncpg.connect(
            proxy.dsn(), server_settings={"application_name": app}, timeout=60
        )
        try:
            await gate.wait()  # every connection is open at the same time
            row = await conn.fetchrow(
                "select pg_backend_pid(), $1::int * 2, pg_sleep(0.1)", i, timeout=60
            )
            assert row is not None
            return row[0], row[1]
        finally:
            await conn.close()

    tasks = [asyncio.create_task(client(i)) for i in range(n)]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        open_now = await asyncio.to_thread(
            pg.execute, f"select count(*) from pg_stat_activity where application_name = '{app}'"
        )
        if open_now[0][0] == n:
            break
        failed = [t for t in tasks if t.done() and t.exception()]
        if failed:
            raise failed[0].exception()  # type: ignore[misc]
        await asyncio.sleep(0.2)
    assert open_now[0][0] == n, f"only {open_now[0][0]} of {n} connections open at once"
    gate.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks), 90)
    assert sorted(r[1] for r in results) == [2 * i for i in range(n)]
    assert len({r[0] for r in results}) == n  # each its own backend
    # All released afterwards.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        left = await asyncio.to_thread(
            pg.execute, f"select count(*) from pg_stat_activity where application_name = '{app}'"
        )
        if left[0][0] == 0:
            break
        await asyncio.sleep(0.2)
    assert left[0][0] == 0

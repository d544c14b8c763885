"""LISTEN/NOTIFY, query cancellation, and clients that vanish mid-query.

Cancel: the CancelRequest arrives at the proxy on a new connection and must
reach the upstream that owns the backend; the query then ends with 57014.
A client that disconnects while its query runs gets that query cancelled and
its backend released (PostgreSQL alone would not notice until it next writes).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import errors as pg_errors

from proxy.config import TlsConfig
from proxy.wire import messages as m
from tests.integration.test_protocol_robustness import RawConn, backend_gone, error_of

pytestmark = pytest.mark.integration


def active_query_pids(pg: Any, application_name: str) -> list[int]:
    rows = pg.execute(
        "select pid from pg_stat_activity where application_name = "
        f"'{application_name}' and state = 'active' and query like '%pg_sleep%'"
    )
    return [r[0] for r in rows]


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


# --- LISTEN / NOTIFY -------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_asyncpg_listen_notify(proxy: Any, pg: Any) -> None:
    listener = await asyncpg.connect(proxy.dsn())
    sender = await asyncpg.connect(proxy.dsn())
    got: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    try:
        await listener.add_listener(
            "chan_a", lambda _c, _pid, ch, payload: got.put_nowait((ch, payload))
        )
        await listener.add_listener(
            "chan b", lambda _c, _pid, ch, payload: got.put_nowait((ch, payload))
        )
        await sender.execute("notify chan_a, 'hello'")
        await sender.execute("select pg_notify('chan b', $1)", "x" * 7000)
        pg.execute("notify chan_a, 'from a direct session'")  # delivered while the listener is idle
        async with sender.transaction():
            for i in range(100):
                await sender.execute(f"notify chan_a, 'tx {i}'")
        received = [await asyncio.wait_for(got.get(), 10) for _ in range(103)]
        assert received[:3] == [
            ("chan_a", "hello"),
            ("chan b", "x" * 7000),
            ("chan_a", "from a direct session"),
        ]
        assert received[3:] == [("chan_a", f"tx {i}") for i in range(100)]
        await listener.remove_listener("chan_a", lambda *a: None)
    finally:
        await listener.close()
        await sender.close()


def test_psycopg_listen_notify(proxy: Any, pg: Any) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("listen jobs")
        for i in range(5):
            pg.execute(f"notify jobs, 'job {i}'")
        payloads = []
        for notify in conn.notifies(timeout=10, stop_after=5):
            payloads.append((notify.channel, notify.payload))
        assert payloads == [("jobs", f"job {i}") for i in range(5)]
        # A notification arriving while a query runs comes with the query's answer.
        threading.Timer(0.3, pg.execute, ["notify jobs, 'during query'"]).start()
        conn.execute("select pg_sleep(1)")
        late = list(conn.notifies(timeout=5, stop_after=1))
        assert [n.payload for n in late] == ["during query"]


# --- cancel --------------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_asyncpg_timeout_cancels_query(proxy: Any, pg: Any) -> None:
    conn = await asyncpg.connect(proxy.dsn(), server_settings={"application_name": "apg-timeout"})
    try:
        started = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await conn.fetchval("select pg_sleep(30)", timeout=0.5)
        # asyncpg sends a CancelRequest on timeout and waits for the query to end:
        # the connection is usable right after, and nothing sleeps on the server.
        assert await conn.fetchval("select 'after cancel'") == "after cancel"
        assert time.monotonic() - started < 10
        assert active_query_pids(pg, "apg-timeout") == []
        if pg.log_path is not None:
            # asyncpg hides the server's answer behind TimeoutError; the server log shows
            # the query ended with 57014 (ERROR: canceling statement due to user request).
            pid = conn.get_server_pid()
            log = pg.log_path.read_text(errors="replace")
            assert (
                f"[{pid}] postgres@postgres ERROR:  canceling statement due to user request" in log
            )
        stmt = await conn.prepare("select pg_sleep($1)")
        with pytest.raises(asyncio.TimeoutError):
            await stmt.fetchval(30, timeout=0.5)
        assert await conn.fetchval("select 2") == 2
    finally:
        await conn.close()


class _Canceller(threading.Thread):
    """Calls conn.cancel()/cancel_safe() once the query is seen running; join() re-raises."""

    def __init__(self, conn: psycopg.Connection[Any], pg: Any, app: str, how: str) -> None:
        super().__init__()
        self.conn, self.pg, self.app, self.how = conn, pg, app, how
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            assert wait_for(lambda: bool(active_query_pids(self.pg, self.app)))
            getattr(self.conn, self.how)()
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float | None = 10) -> None:
        super().join(timeout)
        if self.error is not None:
            raise self.error


def _cancel_later(conn: psycopg.Connection[Any], pg: Any, app: str, how: str) -> _Canceller:
    return _Canceller(conn, pg, app, how)


@pytest.mark.parametrize("how", ["cancel", "cancel_safe"])
def test_psycopg_cancel_ends_query_with_57014(proxy_process: Any, pg: Any, how: str) -> None:
    # A proxy in its own process: psycopg's blocking cancel() (PQcancel) holds the GIL
    # while it waits for the proxy to answer, which would starve an in-process proxy thread.
    proxy = proxy_process()
    app = f"pg-{how}"
    with psycopg.connect(proxy.dsn(application_name=app), autocommit=True) as conn:
        t = _cancel_later(conn, pg, app, how)
        started = time.monotonic()
        with pytest.raises(pg_errors.QueryCanceled) as info:
            conn.execute("select pg_sleep(30)")
        t.join()
        assert info.value.sqlstate == "57014"
        assert time.monotonic() - started < 10
        assert conn.execute("select 'alive'").fetchone() == ("alive",)


def test_cancel_over_tls_to_the_proxy(make_proxy: Any, pg: Any, tls_files: Any) -> None:
    """libpq's cancel_safe() opens the cancel connection with the same sslmode (TLS first)."""
    proxy = make_proxy(tls=TlsConfig(str(tls_files.cert), str(tls_files.key)))
    app = "pg-cancel-tls"
    with psycopg.connect(
        proxy.dsn(application_name=app, sslmode="require"), autocommit=True
    ) as conn:
        assert conn.pgconn.ssl_in_use
        t = _cancel_later(conn, pg, app, "cancel_safe")
        with pytest.raises(pg_errors.QueryCanceled):
            conn.execute("select pg_sleep(30)")
        t.join()


def test_cancel_with_wrong_key_is_ignored(proxy: Any, pg: Any) -> None:
    with RawConn(proxy.host, proxy.port) as conn:
        key = m.decode_backend_key_data(next(f.body for f in conn.startup() if f.type == ord("K")))
        conn.send(m.Query("select pg_sleep(1.5), 'finished'").encode())
        for bad in (
            m.CancelRequest(key.pid, key.secret ^ 1),
            m.CancelRequest(key.pid + 1, key.secret),
        ):
            with RawConn(proxy.host, proxy.port) as canceller:
                canceller.send(bad.encode())
                assert canceller.read_all() == []  # closed without an answer, like PostgreSQL
        frames = conn.read_until_ready()
        assert [chr(f.type) for f in frames] == ["T", "D", "C", "Z"]
        # And the right key does cancel.
        conn.send(m.Query("select pg_sleep(30)").encode())
        wait_for(
            lambda: bool(
                pg.execute(
                    f"select 1 from pg_stat_activity where pid = {key.pid} and state = 'active'"
                )
            )
        )
        with RawConn(proxy.host, proxy.port) as canceller:
            canceller.send(m.CancelRequest(key.pid, key.secret).encode())
        frames = conn.read_until_ready()
        assert error_of(frames[-2]).sqlstate == "57014"


# --- the client vanishes mid-query ----------------------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_client_disconnect_cancels_running_query(proxy: Any, pg: Any) -> None:
    app = "vanishing-asyncpg"
    conn = await asyncpg.connect(proxy.dsn(), server_settings={"application_name": app})
    pid = conn.get_server_pid()
    task = asyncio.create_task(conn.fetchval("select pg_sleep(30)"))
    assert await asyncio.to_thread(wait_for, lambda: bool(active_query_pids(pg, app)))
    conn.terminate()  # drop the socket: no Terminate, no cancel from the client
    with pytest.raises((asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError)):
        await task
    started = time.monotonic()
    assert await asyncio.to_thread(backend_gone, pg, pid, 10), (
        "backend still there 10s after the client left"
    )
    assert time.monotonic() - started < 10


def test_psql_killed_mid_query_releases_backend(proxy: Any, pg: Any) -> None:
    app = "vanishing-psql"
    proc = subprocess.Popen(
        ["psql", "-X", "-d", proxy.dsn(application_name=app), "-c", "select pg_sleep(30)"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_for(lambda: bool(active_query_pids(pg, app)), 15)
        (pid,) = active_query_pids(pg, app)
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        assert backend_gone(pg, pid, 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    "pipelined", [False, True], ids=["after-startup", "pipelined-with-startup"]
)
def test_client_disconnect_after_large_query_releases_backend(
    proxy: Any, pg: Any, pipelined: bool
) -> None:
    """The running query came in one 1 MB Query message (streamed through the proxy, not
    held), possibly in the same write as the StartupMessage: it is still known to run."""
    sql = "select pg_sleep(30) /* " + "x" * (1 << 20) + " */"
    startup = m.StartupMessage(
        m.PROTOCOL_3_0, (("user", "postgres"), ("application_name", "vanish-big"))
    )
    with RawConn(proxy.host, proxy.port) as conn:
        if pipelined:
            conn.send(startup.encode(), m.Query(sql).encode())
            pid = conn.backend_pid(conn.read_until_ready())
        else:
            conn.send(startup.encode())
            pid = conn.backend_pid(conn.read_until_ready())
            conn.send(m.Query(sql).encode())
        assert wait_for(lambda: bool(active_query_pids(pg, "vanish-big")))
    assert backend_gone(pg, pid), "backend still running the query after its client left"


def test_client_disconnect_mid_unsynced_pipeline_releases_backend(proxy: Any, pg: Any) -> None:
    """Execute + Flush, no Sync: the statement runs all the same and must be cancelled."""
    with RawConn(proxy.host, proxy.port) as conn:
        pid = conn.backend_pid(conn.startup(application_name="vanish-unsynced"))
        conn.send(
            m.Parse("", "select pg_sleep(30)").encode(),
            m.Bind("", "", (), (), ()).encode(),
            m.Execute("").encode(),
            m.FLUSH,
        )
        assert wait_for(lambda: bool(active_query_pids(pg, "vanish-unsynced")))
    assert backend_gone(pg, pid), "backend still running the unsynced statement"


def test_client_disconnect_in_open_transaction_rolls_back(proxy: Any, pg: Any) -> None:
    pg.execute("drop table if exists vanish_tx; create table vanish_tx (i int)")
    try:
        with RawConn(proxy.host, proxy.port) as conn:
            pid = conn.backend_pid(conn.startup())
            conn.send(
                m.Query("begin; insert into vanish_tx values (1); lock table vanish_tx").encode()
            )
            conn.read_until_ready()
        assert backend_gone(pg, pid)
        # The lock is gone with the backend and the insert was rolled back.
        assert pg.execute("select count(*) from vanish_tx") == [(0,)]
    finally:
        pg.execute("drop table vanish_tx")

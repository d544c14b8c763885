"""`pgseal serve` as a process: SIGTERM/SIGINT shutdown order and --workers.

Shutdown: stop accepting; idle sessions end at once with 57P01; busy ones may
finish within the grace period (PGSEAL_SHUTDOWN_GRACE) and end when idle;
whatever still runs after it is cancelled upstream and ends with 57P01.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors as pg_errors

from proxy.wire import messages as m
from tests.integration.test_protocol_robustness import RawConn, backend_gone, error_of

pytestmark = pytest.mark.integration


def expect_shutdown_error(conn: RawConn, timeout: float = 10.0) -> None:
    """The next thing the client sees is a FATAL 57P01, then the close."""
    frames = conn.read_all(timeout)
    assert frames, "closed without an ErrorResponse"
    err = error_of(frames[-1])
    assert (err.get("S"), err.sqlstate) == ("FATAL", "57P01"), err
    assert err.message == "terminating connection due to administrator command"


def watch_notices(conn: psycopg.Connection[Any]) -> list[str | None]:
    """SQLSTATEs of errors libpq got while idle (it hands those to the notice processor)."""
    seen: list[str | None] = []
    conn.add_notice_handler(lambda diag: seen.append(diag.sqlstate))
    return seen


def assert_admin_shutdown(exc: BaseException | None, notices: list[str | None]) -> None:
    """libpq reports our 57P01 as the error of the next query or, when it arrived while
    the connection was idle, as a notice followed by "server closed the connection"
    (just as with PostgreSQL's own shutdown)."""
    assert isinstance(exc, psycopg.OperationalError), exc
    if isinstance(exc, pg_errors.AdminShutdown) or "administrator command" in str(exc):
        return
    assert "57P01" in notices, (exc, notices)


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return True
    return False


class Running(threading.Thread):
    """Run a query on a psycopg connection in a thread; .result / .error afterwards."""

    def __init__(self, conn: psycopg.Connection[Any], sql: str) -> None:
        super().__init__(daemon=True)
        self.conn, self.sql = conn, sql
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished_at = 0.0
        self.start()

    def run(self) -> None:
        try:
            self.result = self.conn.execute(self.sql).fetchall()
        except BaseException as exc:
            self.error = exc
        self.finished_at = time.monotonic()


def wait_active(pg: Any, app: str, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = pg.execute(
            "select pid from pg_stat_activity "
            f"where application_name = '{app}' and state = 'active'"
        )
        if rows:
            return int(rows[0][0])
        time.sleep(0.05)
    raise AssertionError(f"no active query for {app}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_idle_sessions_with_57p01(proxy_process: Any, pg: Any, sig: int) -> None:
    proxy = proxy_process(env={"PGSEAL_SHUTDOWN_GRACE": "10"})
    raw = RawConn("127.0.0.1", proxy.port)
    pid = raw.backend_pid(raw.startup())
    idle = psycopg.connect(proxy.dsn(), autocommit=True)
    notices = watch_notices(idle)
    started = time.monotonic()
    proxy.signal(sig)
    expect_shutdown_error(raw)
    raw.close()
    # psycopg sees the same error on its next use.
    with pytest.raises(psycopg.OperationalError) as info:
        idle.execute("select 1")
    assert_admin_shutdown(info.value, notices)
    idle.close()
    code, out = proxy.wait(15)
    assert code == 0, out
    # Idle sessions do not wait for the grace period.
    assert time.monotonic() - started < 5
    assert backend_gone(pg, pid)


def test_busy_session_finishes_within_grace(proxy_process: Any, pg: Any) -> None:
    proxy = proxy_process(env={"PGSEAL_SHUTDOWN_GRACE": "20"})
    app = "busy-within-grace"
    conn = psycopg.connect(proxy.dsn(application_name=app), autocommit=True)
    notices = watch_notices(conn)
    try:
        query = Running(conn, "select 'done', pg_sleep(2)")
        wait_active(pg, app)
        signalled = time.monotonic()
        proxy.signal(signal.SIGTERM)
        time.sleep(0.3)
        assert refused(proxy.port), "still accepting connections after SIGTERM"
        query.join(30)
        assert query.error is None, query.error
        assert query.result == [("done", "")]
        # Now idle: the session is ended with 57P01 and the process exits, well before the grace.
        with pytest.raises(psycopg.OperationalError) as info:
            conn.execute("select 1")
        assert_admin_shutdown(info.value, notices)
        code, out = proxy.wait(30)
        assert code == 0, out
        assert time.monotonic() - signalled < 10
    finally:
        conn.close()


def test_open_transaction_gets_the_grace_too(proxy_process: Any, pg: Any) -> None:
    proxy = proxy_process(env={"PGSEAL_SHUTDOWN_GRACE": "20"})
    with RawConn("127.0.0.1", proxy.port) as conn:
        conn.startup()
        conn.send(m.Query("begin; create temp table t_grace (i int)").encode())
        conn.read_until_ready()
        proxy.signal(signal.SIGTERM)
        time.sleep(0.5)
        # Still in the transaction: the session may finish its work.
        conn.send(m.Query("insert into t_grace values (1); commit").encode())
        frames = conn.read_until_ready()
        assert frames[-1].body == b"I"
        expect_shutdown_error(conn)
    code, out = proxy.wait(30)
    assert code == 0, out


def test_unsynced_pipeline_is_busy(proxy_process: Any, pg: Any) -> None:
    """Parse/Bind/Execute/Flush with no Sync yet (psycopg pipeline mode streams like this):
    a statement is running, so the session is busy and may finish within the grace."""
    proxy = proxy_process(env={"PGSEAL_SHUTDOWN_GRACE": "20"})
    with RawConn("127.0.0.1", proxy.port) as conn:
        conn.startup(application_name="unsynced")
        conn.send(
            m.Parse("", "select 'flushed', pg_sleep(1.5)").encode(),
            m.Bind("", "", (), (), ()).encode(),
            m.Execute("").encode(),
            m.FLUSH,
        )
        wait_active(pg, "unsynced")
        proxy.signal(signal.SIGTERM)
        got = [conn.read_frame(timeout=15) for _ in range(4)]
        assert [chr(f.type) for f in got if f is not None] == ["1", "2", "D", "C"]
        conn.send(m.SYNC)
        assert [chr(f.type) for f in conn.read_until_ready()] == ["Z"]
        expect_shutdown_error(conn)
    code, out = proxy.wait(30)
    assert code == 0, out


def test_session_still_busy_after_grace_ends_with_57p01(proxy_process: Any, pg: Any) -> None:
    proxy = proxy_process(env={"PGSEAL_SHUTDOWN_GRACE": "1.5"})
    app = "busy-beyond-grace"
    conn = psycopg.connect(proxy.dsn(application_name=app), autocommit=True)
    notices = watch_notices(conn)
    raw = RawConn("127.0.0.1", proxy.port)
    # More sessions still busy at the end: every one's cancel must leave before the exit.
    others = [RawConn("127.0.0.1", proxy.port) for _ in range(20)]
    try:
        raw.startup(application_name=app + "-raw")
        raw.send(m.Query("select pg_sleep(30)").encode())
        other_pids = []
        for other in others:
            other_pids.append(other.backend_pid(other.startup(application_name=app + "-more")))
            other.send(m.Query("select pg_sleep(30)").encode())
        query = Running(conn, "select pg_sleep(30)")
        pid = wait_active(pg, app)
        raw_pid = wait_active(pg, app + "-raw")
        signalled = time.monotonic()
        proxy.signal(signal.SIGTERM)
        expect_shutdown_error(raw, timeout=15)
        for other in others:
            expect_shutdown_error(other, timeout=15)
        query.join(15)
        assert not query.is_alive()
        assert_admin_shutdown(query.error, notices)
        assert query.finished_at - signalled < 8, "not ended soon after the grace period"
        assert query.finished_at - signalled > 1.0, "ended before the grace period was over"
        code, out = proxy.wait(15)
        assert code == 0, out
        # The queries were cancelled upstream and the backends released.
        for backend in (pid, raw_pid, *other_pids):
            assert backend_gone(pg, backend), f"backend {backend} still there after shutdown"
    finally:
        raw.close()
        for other in others:
            other.close()
        conn.close()


def test_in_process_shutdown_cancels_what_still_runs(pg: Any) -> None:
    """ProxyServer.shutdown() (what `async with ProxyServer(...)` ends with) must get its
    cancels out before it returns: the caller may close the event loop right after."""
    from tests.support.proxy_fixtures import ProxyThread, proxy_config

    app = "in-process-shutdown"
    pids = []
    conns = []
    with ProxyThread(proxy_config(pg)) as proxy:
        for _ in range(10):
            conn = RawConn(proxy.host, proxy.port)
            conns.append(conn)
            pids.append(conn.backend_pid(conn.startup(application_name=app)))
            conn.send(m.Query("select pg_sleep(30)").encode())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            active = pg.execute(
                "select count(*) from pg_stat_activity "
                f"where application_name = '{app}' and state = 'active'"
            )[0][0]
            if active == len(pids):
                break
            time.sleep(0.05)
    # ProxyThread's exit ran shutdown(grace=1.0) and closed its loop.
    try:
        for conn in conns:
            expect_shutdown_error(conn)
        for backend in pids:
            assert backend_gone(pg, backend), f"backend {backend} still running after shutdown"
    finally:
        for conn in conns:
            conn.close()


def _worker_pids(parent: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{parent}/task").iterdir():
        text = (task / "children").read_text().split()
        children.extend(int(c) for c in text)
    return children


def _local_ports_of(pid: int) -> set[int]:
    """Local TCP ports of a process's sockets (from /proc: fd inodes matched in net/tcp)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink()
        except OSError:
            continue
        if str(target).startswith("socket:["):
            inodes.add(str(target)[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            cols = line.split()
            if cols[9] in inodes:
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def test_workers_share_the_port(proxy_process: Any, pg: Any) -> None:
    proxy = proxy_process(["--workers", "2"], env={"PGSEAL_SHUTDOWN_GRACE": "10"})
    app = "two-workers"
    deadline = time.monotonic() + 10
    while len(_worker_pids(proxy.proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = _worker_pids(proxy.proc.pid)
    assert len(workers) == 2
    conns = [psycopg.connect(proxy.dsn(application_name=app), autocommit=True) for _ in range(24)]
    try:
        for i, conn in enumerate(conns):
            assert conn.execute("select %s::int", [i]).fetchone() == (i,)
        # Which worker holds each upstream connection: the backend's client_port is the
        # worker's local port.
        client_ports = {
            r[0]
            for r in pg.execute(
                f"select client_port from pg_stat_activity where application_name = '{app}'"
            )
        }
        assert len(client_ports) == len(conns)
        used = [w for w in workers if _local_ports_of(w) & client_ports]
        assert sorted(used) == sorted(workers), (
            "SO_REUSEPORT spread 24 connections over one worker only"
        )
        notices = [watch_notices(conn) for conn in conns]
        proxy.signal(signal.SIGTERM)  # to the parent, which forwards it to the workers
        code, out = proxy.wait(20)
        assert code == 0, out
        for conn, seen in zip(conns, notices, strict=True):
            with pytest.raises(psycopg.OperationalError) as info:
                conn.execute("select 1")
            assert_admin_shutdown(info.value, seen)
        for w in workers:
            assert (
                not Path(f"/proc/{w}").exists() or "zombie" in Path(f"/proc/{w}/status").read_text()
            )
    finally:
        for conn in conns:
            conn.close()

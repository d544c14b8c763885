"""Authentication passed through (SCRAM, md5, password) and TLS on both hops.

The local cluster's pg_hba gives each *_user its method; tls_only_user may only
connect over TLS (hostssl), which proves the upstream hop is encrypted.
SCRAM-SHA-256-PLUS is removed from the offer: channel binding would bind to the
proxy's TLS session. libpq (channel_binding=prefer, the default) on TLS then
sends gs2 flag 'y', which PostgreSQL on a TLS upstream rejects as a downgrade;
the proxy says so in a FATAL naming channel_binding=disable.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.config import TlsConfig, UpstreamTlsConfig
from proxy.wire import messages as m
from tests.conftest import AUTH_PASSWORDS
from tests.integration.test_protocol_robustness import RawConn, error_of
from tests.support.certs import make_tls_files

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _local_only(pg: Any) -> None:
    pg.require_local()


@pytest.fixture
def tls_proxy(make_proxy: Any, tls_files: Any) -> Any:
    """TLS to the client and TLS (verify-full) to PostgreSQL."""
    return make_proxy(
        tls=TlsConfig(str(tls_files.cert), str(tls_files.key)),
        upstream_tls=UpstreamTlsConfig("verify-full", str(tls_files.ca_cert)),
    )


def client_ssl(tls_files: Any) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(tls_files.ca_cert))
    return ctx


def upstream_ssl_in_use(pg: Any, application_name: str) -> bool:
    rows = pg.execute(
        "select s.ssl from pg_stat_ssl s join pg_stat_activity a using (pid) "
        f"where a.application_name = '{application_name}'"
    )
    assert rows, f"no backend named {application_name}"
    return bool(rows[0][0])


# --- password methods, plain TCP ----------------------------------------------------------


@pytest.mark.parametrize("user", sorted(AUTH_PASSWORDS))
def test_psycopg_right_password(proxy: Any, user: str) -> None:
    with psycopg.connect(proxy.dsn(user=user, password=AUTH_PASSWORDS[user])) as conn:
        assert conn.execute("select current_user").fetchone() == (user,)


@pytest.mark.parametrize("user", sorted(AUTH_PASSWORDS))
def test_psycopg_wrong_password(proxy: Any, pg: Any, user: str) -> None:
    messages = []
    for target in (pg, proxy):
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(target.dsn(user=user, password="wrong")).close()
        messages.append(str(info.value).rsplit("failed: ", 1)[1])
    assert messages[0] == messages[1] == f'FATAL:  password authentication failed for user "{user}"'


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("user", sorted(AUTH_PASSWORDS))
async def test_asyncpg_right_and_wrong_password(proxy: Any, user: str) -> None:
    conn = await asyncpg.connect(proxy.dsn(user=user, password=AUTH_PASSWORDS[user]))
    try:
        assert await conn.fetchval("select current_user") == user
    finally:
        await conn.close()
    with pytest.raises(asyncpg.InvalidPasswordError) as info:
        await asyncpg.connect(proxy.dsn(user=user, password="wrong"))
    assert info.value.sqlstate == "28P01"


def test_psql_scram_with_pgpassword(proxy: Any) -> None:
    env = {**os.environ, "PGPASSWORD": "scram-pass"}
    done = subprocess.run(
        ["psql", "-X", "-A", "-t", "-d", proxy.dsn(user="scram_user"), "-c", "select current_user"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert (done.returncode, done.stdout.strip()) == (0, "scram_user"), done.stderr
    env["PGPASSWORD"] = "nope"
    done = subprocess.run(
        ["psql", "-X", "-d", proxy.dsn(user="scram_user"), "-c", "select 1"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert (
        done.returncode == 2
        and 'password authentication failed for user "scram_user"' in done.stderr
    )


def test_scram_plus_is_not_offered(make_proxy: Any, tls_files: Any) -> None:
    proxy = make_proxy(upstream_tls=UpstreamTlsConfig("require"))
    with RawConn(proxy.host, proxy.port) as conn:
        conn.send(m.StartupMessage(m.PROTOCOL_3_0, (("user", "scram_user"),)).encode())
        offer = conn.read_frame()
        assert offer is not None
        # PostgreSQL on TLS offers SCRAM-SHA-256-PLUS first; the proxy drops it.
        assert m.decode_authentication(offer.body).sasl_mechanisms == ("SCRAM-SHA-256",)


# --- TLS to the client ----------------------------------------------------------------------


def test_client_tls_require_and_verify_full(make_proxy: Any, tls_files: Any) -> None:
    proxy = make_proxy(tls=TlsConfig(str(tls_files.cert), str(tls_files.key)))
    with psycopg.connect(proxy.dsn(sslmode="require")) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select 1").fetchone() == (1,)
    dsn = proxy.dsn(sslmode="verify-full", sslrootcert=str(tls_files.ca_cert))
    with psycopg.connect(dsn) as conn:
        assert conn.pgconn.ssl_in_use
    # A client that does not ask for TLS still gets plaintext.
    with psycopg.connect(proxy.dsn(sslmode="disable")) as conn:
        assert not conn.pgconn.ssl_in_use


def test_client_tls_not_configured_answers_n(proxy: Any) -> None:
    with pytest.raises(psycopg.OperationalError, match="server does not support SSL"):
        psycopg.connect(proxy.dsn(sslmode="require")).close()
    with psycopg.connect(proxy.dsn(sslmode="prefer")) as conn:
        assert not conn.pgconn.ssl_in_use
    with RawConn(proxy.host, proxy.port) as conn:
        conn.send(m.SSLRequest().encode())
        assert conn.recv_byte() == b"N"
        frames = conn.startup()  # the same connection goes on in plaintext
        assert frames[-1].type == ord("Z")


def test_client_tls_wrong_ca_is_refused_by_client(
    make_proxy: Any, tls_files: Any, tmp_path: Any
) -> None:
    other = make_tls_files(tmp_path / "other-ca")
    proxy = make_proxy(tls=TlsConfig(str(tls_files.cert), str(tls_files.key)))
    # (Both test CAs share a name: OpenSSL reports a bad signature rather than an unknown issuer.)
    with pytest.raises(psycopg.OperationalError, match="SSL error"):
        psycopg.connect(proxy.dsn(sslmode="verify-full", sslrootcert=str(other.ca_cert))).close()
    # The proxy survives a failed handshake.
    with psycopg.connect(proxy.dsn(sslmode="require")) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


# --- TLS to PostgreSQL -----------------------------------------------------------------------


@pytest.mark.parametrize("sslmode", ["require", "verify-full", "prefer"])
def test_upstream_tls_modes(make_proxy: Any, pg: Any, tls_files: Any, sslmode: str) -> None:
    root = str(tls_files.ca_cert) if sslmode == "verify-full" else None
    proxy = make_proxy(upstream_tls=UpstreamTlsConfig(sslmode, root))
    app = f"upstream-{sslmode}"
    with psycopg.connect(proxy.dsn(application_name=app)) as conn:
        assert upstream_ssl_in_use(pg, app)
        assert not conn.pgconn.ssl_in_use  # the client hop is plain: two independent hops
    # pg_hba allows tls_only_user on hostssl only.
    with psycopg.connect(proxy.dsn(user="tls_only_user")) as conn:
        assert conn.execute("select current_user").fetchone() == ("tls_only_user",)


def test_upstream_plaintext_is_refused_by_hostssl(proxy: Any) -> None:
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        psycopg.connect(proxy.dsn(user="tls_only_user")).close()


def test_upstream_verify_full_with_wrong_ca(make_proxy: Any, tmp_path: Any) -> None:
    other = make_tls_files(tmp_path / "other-ca")
    proxy = make_proxy(upstream_tls=UpstreamTlsConfig("verify-full", str(other.ca_cert)))
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(proxy.dsn()).close()
    text = str(info.value)
    assert "pgseal: upstream unavailable" in text and "certificate verify failed" in text, text


class _NoTlsServer:
    """Stands in for a PostgreSQL with ssl=off: answers every SSLRequest with 'N'."""

    def __init__(self) -> None:
        self.server: asyncio.base_events.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readexactly(8)
            if head == m.SSLRequest().encode():
                writer.write(b"N")
                await writer.drain()
            await reader.read(1024)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
def no_tls_upstream() -> Iterator[tuple[str, int]]:
    import threading

    loop = asyncio.new_event_loop()
    fake = _NoTlsServer()
    fake.server = loop.run_until_complete(asyncio.start_server(fake.handle, "127.0.0.1", 0))
    port = fake.server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield "127.0.0.1", port

    async def stop() -> None:
        assert fake.server is not None
        fake.server.close()
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()

    asyncio.run_coroutine_threadsafe(stop(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


@pytest.mark.parametrize("sslmode", ["require", "verify-full"])
def test_upstream_without_tls_gives_clear_error(
    make_proxy: Any, no_tls_upstream: tuple[str, int], tls_files: Any, sslmode: str
) -> None:
    from proxy.config import HostPort

    root = str(tls_files.ca_cert) if sslmode == "verify-full" else None
    proxy = make_proxy(
        upstream=HostPort(*no_tls_upstream), upstream_tls=UpstreamTlsConfig(sslmode, root)
    )
    with RawConn(proxy.host, proxy.port) as conn:
        conn.send(m.StartupMessage(m.PROTOCOL_3_0, (("user", "postgres"),)).encode())
        frames = conn.read_all()
    assert len(frames) == 1
    err = error_of(frames[0])
    assert err.get("S") == "FATAL" and err.sqlstate == "08006"
    assert (
        err.message
        == "pgseal: upstream unavailable: the upstream does not support TLS (sslmode require)"
    )
    with pytest.raises(psycopg.OperationalError, match="upstream does not support TLS"):
        psycopg.connect(proxy.dsn()).close()


# --- TLS on both hops with SCRAM ----------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_asyncpg_scram_over_tls_both_hops(tls_proxy: Any, pg: Any, tls_files: Any) -> None:
    app = "apg-tls-both"
    conn = await asyncpg.connect(
        tls_proxy.dsn(user="scram_user", password="scram-pass"),
        ssl=client_ssl(tls_files),
        server_settings={"application_name": app},
    )
    try:
        assert conn._transport.get_extra_info("ssl_object") is not None
        assert await conn.fetchval("select current_user") == "scram_user"
        assert await asyncio.to_thread(upstream_ssl_in_use, pg, app)
    finally:
        await conn.close()
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(
            tls_proxy.dsn(user="scram_user", password="bad"), ssl=client_ssl(tls_files)
        )


@pytest.mark.asyncio(loop_scope="session")
async def test_large_values_and_cancel_over_tls_both_hops(tls_proxy: Any, tls_files: Any) -> None:
    """Streaming and backpressure through both TLS layers; cancel reaches a TLS upstream."""
    conn = await asyncpg.connect(tls_proxy.dsn(), ssl=client_ssl(tls_files))
    try:
        await conn.execute("set log_parameter_max_length = 0")
        value = os.urandom(16 * 1024 * 1024)
        assert await conn.fetchval("select $1::bytea", value) == value
        rows = await conn.fetch("select g, repeat('t', 1000) from generate_series(1, 20000) g")
        assert len(rows) == 20000
        with pytest.raises(asyncio.TimeoutError):
            await conn.fetchval("select pg_sleep(30)", timeout=0.5)
        assert await conn.fetchval("select 'usable'") == "usable"
    finally:
        await conn.close()


def test_garbage_instead_of_tls_handshake(make_proxy: Any, tls_files: Any, proxy: Any) -> None:
    tls = make_proxy(tls=TlsConfig(str(tls_files.cert), str(tls_files.key)))
    with RawConn(tls.host, tls.port) as conn:
        conn.send(m.SSLRequest().encode())
        assert conn.recv_byte() == b"S"
        conn.send(
            m.StartupMessage(m.PROTOCOL_3_0, (("user", "postgres"),)).encode()
        )  # not a ClientHello
        assert conn.read_all() == []  # closed
    with psycopg.connect(tls.dsn(sslmode="require")) as ok:
        assert ok.execute("select 1").fetchone() == (1,)


def test_psycopg_scram_over_tls_both_hops_needs_channel_binding_disable(
    tls_proxy: Any, pg: Any, tls_files: Any
) -> None:
    app = "pg-tls-both"
    dsn = tls_proxy.dsn(
        user="scram_user",
        password="scram-pass",
        sslmode="verify-full",
        sslrootcert=str(tls_files.ca_cert),
        channel_binding="disable",
        application_name=app,
    )
    with psycopg.connect(dsn) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select current_user").fetchone() == ("scram_user",)
        assert upstream_ssl_in_use(pg, app)
    # libpq's default channel_binding=prefer: gs2 flag 'y', which PostgreSQL on TLS refuses.
    default = tls_proxy.dsn(user="scram_user", password="scram-pass", sslmode="require")
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(default).close()
    assert "channel binding cannot cross the proxy" in str(info.value)
    assert "channel_binding=disable" in str(info.value)
    # channel_binding=require cannot be met: libpq itself refuses (nothing offers -PLUS).
    with pytest.raises(psycopg.OperationalError, match="channel binding"):
        psycopg.connect(
            tls_proxy.dsn(
                user="scram_user",
                password="scram-pass",
                sslmode="require",
                channel_binding="require",
            )
        ).close()
    # The wrong password over TLS is still the server's verdict.
    bad = tls_proxy.dsn(
        user="scram_user", password="bad", sslmode="require", channel_binding="disable"
    )
    with pytest.raises(
        psycopg.OperationalError, match='password authentication failed for user "scram_user"'
    ):
        psycopg.connect(bad).close()


def test_libpq_default_channel_binding_works_when_upstream_is_plain(
    make_proxy: Any, tls_files: Any
) -> None:
    """Client hop TLS, upstream plain: 'y' is fine for PostgreSQL on a plain connection."""
    proxy = make_proxy(tls=TlsConfig(str(tls_files.cert), str(tls_files.key)))
    with psycopg.connect(
        proxy.dsn(user="scram_user", password="scram-pass", sslmode="require")
    ) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select current_user").fetchone() == ("scram_user",)


def test_md5_and_password_over_tls_both_hops(tls_proxy: Any) -> None:
    for user in ("md5_user", "password_user"):
        with psycopg.connect(
            tls_proxy.dsn(user=user, password=AUTH_PASSWORDS[user], sslmode="require")
        ) as conn:
            assert conn.execute("select current_user").fetchone() == (user,)


def test_psql_over_tls_both_hops(tls_proxy: Any, tls_files: Any) -> None:
    env = {**os.environ, "PGPASSWORD": "scram-pass", "PGCHANNELBINDING": "disable"}
    dsn = tls_proxy.dsn(
        user="scram_user", sslmode="verify-full", sslrootcert=str(tls_files.ca_cert)
    )
    done = subprocess.run(
        [
            "psql",
            "-X",
            "-A",
            "-t",
            "-d",
            dsn,
            "-c",
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert (done.returncode, done.stdout.strip()) == (0, "t"), done.stderr


# --- GSSENCRequest -------------------------------------------------------------------------------


def test_gssencrequest_answered_n_then_startup(proxy: Any) -> None:
    with RawConn(proxy.host, proxy.port) as conn:
        conn.send(m.GSSENCRequest().encode())
        assert conn.recv_byte() == b"N"
        # libpq then tries SSL on the same connection, then the startup packet.
        conn.send(m.SSLRequest().encode())
        assert conn.recv_byte() == b"N"
        frames = conn.startup()
        assert frames[-1].type == ord("Z")


def test_psql_gssencmode_prefer(proxy: Any) -> None:
    done = subprocess.run(
        ["psql", "-X", "-A", "-t", "-d", proxy.dsn(gssencmode="prefer"), "-c", "select 'gss ok'"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (done.returncode, done.stdout.strip()) == (0, "gss ok"), done.stderr
    with psycopg.connect(proxy.dsn(gssencmode="prefer")) as conn:
        assert conn.execute("select 1").fetchone() == (1,)

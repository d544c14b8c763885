"""Hostile and broken clients: garbage, absurd lengths, half messages, vanishing.

Such a client is dropped (an 08P01 ErrorResponse and/or a close), its upstream
backend is released, and every other client of the same proxy carries on.
`RawConn` is the byte-level client the protocol tests share: it speaks through
the project's own codec (`proxy.wire`) so that frames are compared exactly.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
import time
from typing import Any

import asyncpg
import pytest

from proxy.wire import messages as m
from proxy.wire.framing import Frame, FrameBuffer, held_table

pytestmark = pytest.mark.integration

_ALL_TYPES = held_table(bytes(range(256)))


class RawConn:
    """A blocking PostgreSQL v3 client that works in frames, for exact comparisons."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.buf = FrameBuffer("server", held=_ALL_TYPES)
        self.eof = False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, *messages: bytes) -> None:
        self.sock.sendall(b"".join(messages))

    def recv_byte(self) -> bytes:
        """The single-byte answer to SSLRequest/GSSENCRequest."""
        return self.sock.recv(1)

    def read_frame(self, timeout: float | None = None) -> Frame | None:
        """The next whole message, or None on EOF (or a reset)."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        while True:
            item = self.buf.next()
            if item is not None:
                assert isinstance(item, Frame)
                return item
            if self.eof:
                return None
            try:
                data = self.sock.recv(1 << 16)
            except ConnectionResetError:
                data = b""
            if not data:
                self.eof = True
            else:
                self.buf.feed(data)

    def read_until_ready(self) -> list[Frame]:
        frames: list[Frame] = []
        while True:
            frame = self.read_frame()
            if frame is None:
                raise EOFError(f"connection closed; got {[chr(f.type) for f in frames]}")
            frames.append(frame)
            if frame.type == ord("Z"):
                return frames

    def read_all(self, timeout: float = 10.0) -> list[Frame]:
        """Every frame until the peer closes."""
        frames: list[Frame] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            frame = self.read_frame(timeout=max(0.1, deadline - time.monotonic()))
            if frame is None:
                return frames
            frames.append(frame)
        raise AssertionError(
            f"peer did not close within {timeout}s; got {[chr(f.type) for f in frames]}"
        )

    def startup(
        self, user: str = "postgres", database: str = "postgres", **params: str
    ) -> list[Frame]:
        """Trust-auth startup; returns everything up to the first ReadyForQuery."""
        pairs = (("user", user), ("database", database), *params.items())
        self.send(m.StartupMessage(m.PROTOCOL_3_0, tuple(pairs)).encode())
        frames = self.read_until_ready()
        assert frames[0].type == ord("R") and frames[0].body[:4] == b"\0\0\0\0", frames[0]
        return frames

    def backend_pid(self, startup_frames: list[Frame]) -> int:
        key = next(f for f in startup_frames if f.type == ord("K"))
        return m.decode_backend_key_data(key.body).pid


def error_of(frame: Frame) -> m.ErrorResponse:
    assert frame.type in (ord("E"), ord("N")), frame
    return m.decode_error_response(frame.body)


def raw_message(mtype: bytes, length: int, body: bytes = b"") -> bytes:
    return mtype + struct.pack("!I", length & 0xFFFFFFFF) + body


def backend_gone(pg: Any, pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pg.execute(f"select 1 from pg_stat_activity where pid = {pid}"):
            return True
        time.sleep(0.1)
    return False


def assert_dropped(conn: RawConn, sqlstate: str = "08P01") -> None:
    """The proxy answers a broken client with at most an ErrorResponse, then closes."""
    frames = conn.read_all()
    errors = [f for f in frames if f.type == ord("E")]
    for frame in errors:
        err = error_of(frame)
        assert err.sqlstate == sqlstate, err
        assert err.get("S") == "FATAL"
    assert [f.type for f in frames if f.type != ord("E")] == [], frames


# --- startup phase -------------------------------------------------------------------


@pytest.mark.parametrize(
    "packet",
    [
        pytest.param(b"\xff\xff\xff\xff" + os.urandom(64), id="length-4GiB"),
        pytest.param(b"\x7f\xff\xff\xff" + b"\0\3\0\0", id="length-2GiB"),
        pytest.param(b"\x00\x00\x00\x03", id="length-3"),
        pytest.param(b"\x00\x00\x00\x00", id="length-0"),
        pytest.param(struct.pack("!II", 8, 0x00020000), id="protocol-2.0"),
        pytest.param(struct.pack("!II", 8, 1234), id="unknown-code"),
        pytest.param(struct.pack("!II", 13, m.PROTOCOL_3_0) + b"ab\0\0\0", id="no-user"),
        pytest.param(struct.pack("!II", 15, m.PROTOCOL_3_0) + b"user\0pg", id="unterminated"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="http"),
    ],
)
def test_broken_startup_packet_is_dropped(proxy: Any, packet: bytes) -> None:
    with RawConn(proxy.host, proxy.port) as conn:
        conn.send(packet)
        assert_dropped(conn)


def test_random_garbage_before_startup_is_dropped(proxy: Any) -> None:
    rng = random.Random(2)
    for _ in range(20):
        with RawConn(proxy.host, proxy.port) as conn:
            n = rng.randrange(3, 400)
            # A non-zero top byte makes the length prefix at least 16 MiB: never acceptable.
            garbage = bytes([rng.randrange(1, 256)]) + rng.randbytes(n)
            conn.send(garbage)
            assert_dropped(conn)


def test_sslrequest_with_pipelined_plaintext_is_refused(make_proxy: Any, tls_files: Any) -> None:
    from proxy.config import TlsConfig

    proxy = make_proxy(tls=TlsConfig(str(tls_files.cert), str(tls_files.key)))
    startup = m.StartupMessage(m.PROTOCOL_3_0, (("user", "postgres"),)).encode()
    with RawConn(proxy.host, proxy.port) as conn:
        # CVE-2021-23214: bytes sent in the clear behind SSLRequest must not be trusted.
        conn.send(m.SSLRequest().encode() + startup)
        assert_dropped(conn)


# --- after authentication ------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(raw_message(b"Q", 0x7FFFFFFF, b"select 1"), id="length-2GiB"),
        pytest.param(raw_message(b"Q", 0xFFFFFFFF), id="length-4GiB"),
        pytest.param(raw_message(b"Q", 1 << 30, b"select"), id="length-1GiB"),
        pytest.param(raw_message(b"Q", 0), id="length-0"),
        pytest.param(raw_message(b"Q", 3), id="length-3"),
        pytest.param(raw_message(b"\x00", 4), id="type-NUL"),
        pytest.param(raw_message(b"z", 4), id="type-z"),
        pytest.param(
            m.Query("select 1").encode() + raw_message(b"B", 0x40000001), id="after-valid"
        ),
    ],
)
def test_absurd_message_after_auth_is_dropped(proxy: Any, pg: Any, message: bytes) -> None:
    with RawConn(proxy.host, proxy.port) as conn:
        pid = conn.backend_pid(conn.startup(application_name="absurd"))
        conn.send(message)
        frames = conn.read_all()
        # A valid query sent before the bad bytes may still be answered; then the error.
        errors = [error_of(f) for f in frames if f.type == ord("E")]
        assert errors and errors[-1].sqlstate == "08P01" and errors[-1].get("S") == "FATAL", frames
        assert frames[-1].type == ord("E")
    assert backend_gone(pg, pid), "the dropped client's backend is still there"


def test_malformed_sasl_response_is_dropped(proxy: Any, pg: Any) -> None:
    pg.require_local()
    with RawConn(proxy.host, proxy.port) as conn:
        conn.send(m.StartupMessage(m.PROTOCOL_3_0, (("user", "scram_user"),)).encode())
        offer = conn.read_frame()
        assert offer is not None and m.decode_authentication(offer.body).code == m.AUTH_SASL
        # SASLInitialResponse whose data length points past the end of the message.
        conn.send(m.frame(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", 1000) + b"n,,n=,r=abc"))
        assert_dropped(conn)


def test_backend_terminated_upstream_reaches_client(proxy: Any, pg: Any) -> None:
    """pg_terminate_backend: the client gets PostgreSQL's FATAL 57P01, then the close."""
    with RawConn(proxy.host, proxy.port) as conn:
        pid = conn.backend_pid(conn.startup())
        pg.execute(f"select pg_terminate_backend({pid})")
        frames = conn.read_all()
        assert [error_of(f).sqlstate for f in frames] == ["57P01"]


def test_unreachable_upstream_gives_clear_error(make_proxy: Any) -> None:
    from proxy.config import HostPort
    from proxy.localpg import free_port

    proxy = make_proxy(upstream=HostPort("127.0.0.1", free_port()))
    with RawConn(proxy.host, proxy.port) as conn:
        conn.send(m.StartupMessage(m.PROTOCOL_3_0, (("user", "postgres"),)).encode())
        frames = conn.read_all()
    assert len(frames) == 1
    err = error_of(frames[0])
    assert (err.get("S"), err.sqlstate) == ("FATAL", "08006")
    assert err.message is not None and err.message.startswith("pgseal: upstream unavailable: ")


def test_queries_pipelined_behind_startup(proxy: Any) -> None:
    """Bytes that arrive with the StartupMessage wait for the upstream and go after it."""
    with RawConn(proxy.host, proxy.port) as conn:
        startup = m.StartupMessage(m.PROTOCOL_3_0, (("user", "postgres"),)).encode()
        conn.send(startup, m.Query("select 'early'").encode())
        conn.read_until_ready()
        frames = conn.read_until_ready()
        assert [chr(f.type) for f in frames] == ["T", "D", "C", "Z"]
        assert m.decode_data_row(frames[1].body).values == (b"early",)


def test_half_message_then_close_releases_backend(proxy: Any, pg: Any) -> None:
    with RawConn(proxy.host, proxy.port) as conn:
        pid = conn.backend_pid(conn.startup())
        whole = m.Query("select 'a long enough statement'").encode()
        conn.send(whole[: len(whole) // 2])
    assert backend_gone(pg, pid)


def test_message_one_byte_at_a_time(proxy: Any) -> None:
    """Framing holds across any split: a query dribbled byte by byte still works."""
    with RawConn(proxy.host, proxy.port) as conn:
        for b in m.StartupMessage(
            m.PROTOCOL_3_0, (("user", "postgres"), ("database", "postgres"))
        ).encode():
            conn.send(bytes([b]))
        frames = conn.read_until_ready()
        assert frames[-1].type == ord("Z")
        data = (
            m.Parse("", "select $1::int + 1").encode()
            + m.Bind("", "", (), (b"41",), ()).encode()
            + m.Execute("").encode()
            + m.SYNC
        )
        for b in data:
            conn.send(bytes([b]))
        frames = conn.read_until_ready()
        rows = [m.decode_data_row(f.body).values for f in frames if f.type == ord("D")]
        assert rows == [(b"42",)]


@pytest.mark.asyncio(loop_scope="session")
async def test_broken_clients_do_not_disturb_others(proxy: Any, pg: Any) -> None:
    """While dozens of broken clients come and go, healthy ones see no error at all."""
    healthy = [await asyncpg.connect(proxy.dsn()) for _ in range(4)]
    stop = asyncio.Event()
    counts = [0] * len(healthy)

    async def work(i: int, conn: asyncpg.Connection) -> None:
        while not stop.is_set():
            got = await conn.fetch("select g, md5(g::text) from generate_series(1, 200) g")
            assert len(got) == 200 and got[-1][0] == 200
            assert await conn.fetchval("select $1::text", f"client {i}") == f"client {i}"
            counts[i] += 1

    async def vandal(seed: int) -> None:
        rng = random.Random(seed)
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        try:
            if rng.random() < 0.5:
                params = (("user", "postgres"), ("application_name", "vandal"))
                writer.write(m.StartupMessage(m.PROTOCOL_3_0, params).encode())
                # Read up to ReadyForQuery, then misbehave in READY.
                buf = FrameBuffer("server", held=_ALL_TYPES)
                while True:
                    data = await asyncio.wait_for(reader.read(65536), 10)
                    assert data, "proxy closed a well-behaved startup"
                    buf.feed(data)
                    frames = []
                    while (f := buf.next()) is not None:
                        assert isinstance(f, Frame)
                        frames.append(f)
                    if any(f.type == ord("Z") for f in frames):
                        break
            choice = rng.randrange(4)
            if choice == 0:
                writer.write(raw_message(b"Q", 0x7FFFFFF0 + rng.randrange(15)))
            elif choice == 1:
                # Type NUL after startup; before it, a length of at least 16 MiB.
                writer.write(b"\x00\x01" + rng.randbytes(rng.randrange(4, 300)))
            elif choice == 2:
                writer.write(raw_message(b"Q", rng.randrange(0, 4)))
            else:
                writer.write(b"\xff" * rng.randrange(5, 64))
            await writer.drain()
            rest = await asyncio.wait_for(reader.read(), 10)  # until the proxy closes
            assert rest == b"" or rest[:1] == b"E"
        finally:
            writer.close()

    workers = [asyncio.create_task(work(i, c)) for i, c in enumerate(healthy)]
    try:
        for wave in range(5):
            await asyncio.gather(*(vandal(wave * 100 + k) for k in range(12)))
        await asyncio.sleep(0.2)
    finally:
        stop.set()
        await asyncio.gather(*workers)
        for conn in healthy:
            await conn.close()
    assert all(n > 0 for n in counts), counts
    # Nothing leaked upstream: only the healthy sessions came and went.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = pg.execute(
            "select count(*) from pg_stat_activity where application_name = 'vandal'"
        )[0][0]
        if left == 0:
            break
        await asyncio.sleep(0.1)
    assert left == 0, f"{left} backends of dropped clients still open"

"""The asyncio shell: listener, per-connection pump, TLS, upstream, lifecycle.

All protocol decisions are made by `ProxySession` (pure); this module only moves
bytes between sockets and carries out the session's effects. It uses
asyncio Protocols rather than streams: a received chunk is handed to the
session and its output written in the same callback, with no task switch per
message on the hot path.

Backpressure: when one side's write buffer passes the high-water mark we stop
reading from the other side until it drains (pause_writing/resume_writing).

Shutdown (uvicorn's order): stop accepting; idle sessions end at once with
57P01; busy ones may finish within the grace period and end when they next go
idle; after it, running queries are cancelled upstream and everyone left gets 57P01.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

from proxy._native import build_name
from proxy.config import Config, HostPort
from proxy.errors import PgsealError
from proxy.server.metrics import MetricsServer, Stats
from proxy.session.connection import (
    CloseConnection,
    ConnectUpstream,
    FetchKeys,
    ForwardCancel,
    ProxySession,
    StartClientTls,
    WriteAudit,
    startup_database,
)
from proxy.session.connection import fatal as fatal_error
from proxy.wire import messages as m

if TYPE_CHECKING:  # the data path (and sqlglot) loads only when a policy is in force
    from proxy.session.datapath import ConnectionFacts

log = logging.getLogger("pgseal.server")

HIGH_WATER = 1 << 20  # bytes queued for a socket before we stop reading the other side
LOW_WATER = 1 << 18
UPSTREAM_CONNECT_TIMEOUT = 10.0


def client_ssl_context(config: Config) -> ssl.SSLContext | None:
    if config.tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(config.path(config.tls.cert)), str(config.path(config.tls.key)))
    return ctx


def upstream_ssl_context(config: Config) -> ssl.SSLContext | None:
    mode = config.upstream_tls.sslmode
    if mode == "disable":
        return None
    if mode == "verify-full":
        assert config.upstream_tls.root_cert is not None
        ctx = ssl.create_default_context(cafile=str(config.path(config.upstream_tls.root_cert)))
    else:
        # prefer/require: encrypt, without verifying the server (libpq's meaning of these modes).
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class _Side(asyncio.Protocol):
    """One socket of a proxied connection; forwards events to its `Pump`."""

    def __init__(self, pump: Pump, is_client: bool) -> None:
        self.pump = pump
        self.is_client = is_client
        self.transport: asyncio.Transport | None = None
        self.first_byte: asyncio.Future[bytes] | None = None  # SSLRequest answer upstream
        # Client bytes decrypted before start_tls() has returned the TLS transport (asyncio
        # delivers data in the same callback that completes the handshake); see _start_client_tls.
        self.held: list[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, hence the cast.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        if self.is_client:
            self.pump.client_made(self)

    def data_received(self, data: bytes) -> None:
        if self.first_byte is not None and not self.first_byte.done():
            self.first_byte.set_result(data)
            return
        if self.held is not None:
            self.held.append(data)
            return
        if self.is_client:
            self.pump.from_client(data)
        else:
            self.pump.from_server(data)

    def eof_received(self) -> bool | None:
        return False  # close our end too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.first_byte is not None and not self.first_byte.done():
            self.first_byte.set_exception(ConnectionError("upstream closed during TLS negotiation"))
        self.pump.lost(self, exc)

    def pause_writing(self) -> None:
        self.pump.peer_of(self).pause_reading()

    def resume_writing(self) -> None:
        self.pump.peer_of(self).resume_reading()


class _NoSide:
    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Pump:
    """Moves bytes between one client and its upstream through a ProxySession."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        runtime = server.datapath
        self.session = ProxySession(
            client_tls_available=server.client_ssl is not None,
            datapath_factory=runtime.new_datapath if runtime is not None else None,
        )
        self.client: _Side | None = None
        self.upstream: _Side | None = None
        self.client_transport: asyncio.Transport | None = None
        self.upstream_transport: asyncio.Transport | None = None
        self.closed = False
        self.draining = False  # shutdown asked us to end when idle
        self._facts: ConnectionFacts | None = None  # who is on it, for audit records (once)
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- plumbing ------------------------------------------------------------------

    def peer_of(self, side: _Side) -> Any:
        transport = self.upstream_transport if side.is_client else self.client_transport
        return transport if transport is not None else _NoSide()

    def client_made(self, side: _Side) -> None:
        self.client = side
        self.client_transport = side.transport
        self.server.pumps.add(self)
        self.server.stats.connections_total += 1

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def from_client(self, data: bytes) -> None:
        if self.session.client_passes(data) and self.upstream_transport is not None:
            self.upstream_transport.write(data)
            return
        self.session.client_data(data)
        self._flush()

    def from_server(self, data: bytes) -> None:
        session = self.session
        if session.server_passes(data) and self.client_transport is not None:
            self.client_transport.write(data)  # nothing else queued: no _flush() needed
        else:
            session.server_data(data)
            self._flush()
        if self.draining and not session.busy and not self.closed:
            self.end_with_shutdown_error()

    def _flush(self) -> None:
        s = self.session
        if s.to_server:
            out = s.to_server
            s.to_server = []
            if self.upstream_transport is not None:
                self.upstream_transport.write(out[0] if len(out) == 1 else b"".join(out))
            else:  # not connected yet: keep it for upstream_connected()
                s.to_server = out
        if s.to_client:
            out = s.to_client
            s.to_client = []
            if self.client_transport is not None:
                self.client_transport.write(out[0] if len(out) == 1 else b"".join(out))
        if s.effects:
            effects = s.effects
            s.effects = []
            for effect in effects:
                self._apply(effect)

    def _apply(self, effect: Any) -> None:
        if isinstance(effect, WriteAudit):  # first: one per statement that used a key
            runtime = self.server.datapath
            assert runtime is not None
            if self._facts is None:
                self._facts = self.connection_facts()
            runtime.queue_audit(effect.notes, self._facts)
        elif isinstance(effect, StartClientTls):
            assert self.client_transport is not None
            self.client_transport.pause_reading()
            self._spawn(self._start_client_tls())
        elif isinstance(effect, ConnectUpstream):
            self._spawn(self._connect_upstream())
        elif isinstance(effect, ForwardCancel):
            self.server.spawn_cancel(effect.request)
        elif isinstance(effect, FetchKeys):
            self._spawn(self._fetch_keys(effect))
        elif isinstance(effect, CloseConnection):
            if effect.reason.startswith("internal error"):
                log.error("closing connection: %s", effect.reason)
            else:
                log.debug("closing connection: %s", effect.reason)
            self._close()

    async def _fetch_keys(self, effect: FetchKeys) -> None:
        runtime = self.server.datapath
        assert runtime is not None
        self.server.stats.key_fetches += 1
        try:
            await runtime.keyring.fetch(effect.tenants, effect.key_ids)
        except PgsealError as exc:
            log.warning("key fetch failed: %s", exc)
            self.server.stats.key_fetch_failures += 1
            self.session.keys_failed(effect.side, exc)
        except Exception:  # a bug: the waiting frame must not hang nor go out unexamined
            log.exception("key fetch failed unexpectedly")
            self.server.stats.key_fetch_failures += 1
            self.session.close(
                "internal error fetching keys",
                fatal_error("XX000", "pgseal: internal error; the statement was not forwarded"),
            )
        else:
            self.session.keys_ready(effect.side)
        if not self.closed:
            self._flush()

    def connection_facts(self) -> ConnectionFacts:
        from proxy.session.datapath import ConnectionFacts

        startup = self.session.startup
        peer = self.client_transport.get_extra_info("peername") if self.client_transport else None
        key = self.session.backend_key
        return ConnectionFacts(
            db_user=(startup.get("user") if startup else None) or "",
            database=startup_database(startup) if startup else "",
            application_name=self.session.parameters.get("application_name"),
            client_addr=f"{peer[0]}:{peer[1]}" if peer else None,
            session=f"{key.pid}" if key else "",
        )

    async def _start_client_tls(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.client_transport is not None and self.client is not None
        side = self.client
        # Until we hold the TLS transport, whatever the client sends (a CancelRequest or
        # StartupMessage right behind the handshake) must wait: answers written now would
        # go to the raw socket, and a close would skip TLS close_notify.
        side.held = []
        try:
            new = await loop.start_tls(
                self.client_transport,
                side,
                self.server.client_ssl,  # type: ignore[arg-type]
                server_side=True,
                ssl_handshake_timeout=30,
            )
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            log.info("client TLS handshake failed: %s", exc)
            side.held = None
            self._close()
            return
        self.client_transport = new
        side.transport = new
        held, side.held = side.held, None
        for data in held:
            if self.closed:
                break
            self.from_client(data)

    async def _connect_upstream(self) -> None:
        loop = asyncio.get_running_loop()
        up = self.server.config.upstream
        side = _Side(self, is_client=False)
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(lambda: side, up.host, up.port), UPSTREAM_CONNECT_TIMEOUT
            )
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = False
            ctx = self.server.upstream_ssl
            if ctx is not None:
                side.first_byte = loop.create_future()
                transport.write(m.SSLRequest().encode())
                answer = await asyncio.wait_for(side.first_byte, UPSTREAM_CONNECT_TIMEOUT)
                side.first_byte = None
                if answer[:1] == b"S" and len(answer) == 1:
                    transport.pause_reading()
                    new = await loop.start_tls(transport, side, ctx, server_hostname=up.host)
                    if new is None:
                        raise ConnectionError("upstream closed during the TLS handshake")
                    transport = new
                    side.transport = new
                    tls = True
                elif answer[:1] == b"N" and len(answer) == 1:
                    if self.server.config.upstream_tls.sslmode in ("require", "verify-full"):
                        raise ConnectionError("the upstream does not support TLS (sslmode require)")
                else:
                    raise ConnectionError("unexpected answer to SSLRequest")
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            reason = str(exc) or type(exc).__name__
            if self.upstream_transport is None and side.transport is not None:
                side.transport.abort()
            self.session.upstream_failed(reason)
            self._flush()
            return
        if self.closed:
            transport.abort()
            return
        self.upstream = side
        self.upstream_transport = transport
        self.session.upstream_connected(tls=tls)
        self._flush()

    # -- endings -----------------------------------------------------------------

    def lost(self, side: _Side, exc: Exception | None) -> None:
        if side.is_client and not self.closed:
            self.session.client_gone()  # cancels a running query (an effect), then closes
            self._flush()
        if side is self.upstream or side.is_client:
            self._close()

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.server.pumps.discard(self)
        if self.upstream_transport is not None:
            if not self.upstream_transport.is_closing():
                self.upstream_transport.write(m.TERMINATE)
            self.upstream_transport.close()
        if self.client_transport is not None:
            self.client_transport.close()

    def end_with_shutdown_error(self) -> None:
        if self.client_transport is not None and not self.client_transport.is_closing():
            self.client_transport.write(self.session.shutdown_message())
        self._close()

    def force_end(self) -> None:
        """Grace period over: cancel what runs upstream, tell the client, close."""
        self.session.cancel_running()
        self._flush()
        self.end_with_shutdown_error()


class ProxyServer:
    """The listening proxy. `async with ProxyServer(config) as server:` in tests."""

    def __init__(
        self, config: Config, *, reuse_port: bool = False, sock: socket.socket | None = None
    ) -> None:
        self.config = config
        self.client_ssl = client_ssl_context(config)
        self.upstream_ssl = upstream_ssl_context(config)
        self.pumps: set[Pump] = set()
        self.datapath: Any = None  # DataPathRuntime when policies are configured
        self.stats = Stats()
        self.accepting = False
        self.metrics: MetricsServer | None = None
        self._cancels: set[asyncio.Task[None]] = set()  # forwarded cancels in flight
        self._server: asyncio.base_events.Server | None = None
        self._reuse_port = reuse_port
        self._sock = sock
        self.port: int = config.listen.port

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.config.policies and self.datapath is None:
            self.datapath = await open_datapath_runtime(self.config)

        def factory() -> _Side:
            return _Side(Pump(self), is_client=True)

        if self._sock is not None:
            self._server = await loop.create_server(factory, sock=self._sock, backlog=4096)
        else:
            self._server = await loop.create_server(
                factory,
                self.config.listen.host,
                self.config.listen.port,
                reuse_port=self._reuse_port or None,
                backlog=4096,
            )
        for s in self._server.sockets:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.port = self._server.sockets[0].getsockname()[1]
        self.accepting = True
        if self.config.metrics.listen is not None and self.metrics is None:
            self.metrics = MetricsServer(
                self, self.config.metrics.listen.host, self.config.metrics.listen.port
            )
            await self.metrics.start()
        log.info(
            "pgseal listening on %s:%s -> %s",
            self.config.listen.host,
            self.port,
            self.config.upstream,
        )

    def spawn_cancel(self, request: m.CancelRequest) -> None:
        """Forward a cancel in the background; shutdown() waits for the ones in flight."""
        task = asyncio.get_running_loop().create_task(self.forward_cancel(request))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def forward_cancel(self, request: m.CancelRequest) -> None:
        """Send a CancelRequest to the upstream (which owns every backend we proxy)."""
        up = self.config.upstream
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(up.host, up.port), 5)
            writer.write(request.encode())
            await writer.drain()
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        except (TimeoutError, OSError) as exc:
            log.warning("could not forward cancel request: %s", exc)

    async def shutdown(self, grace: float = 10.0) -> None:
        self.accepting = False
        if self._server is not None:
            self._server.close()
        for pump in list(self.pumps):
            if not pump.session.busy:
                pump.end_with_shutdown_error()
            else:
                pump.draining = True
        deadline = asyncio.get_running_loop().time() + grace
        # Polling keeps the sessions free of shutdown bookkeeping; 50 ms is plenty here.
        while self.pumps and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for pump in list(self.pumps):
            pump.force_end()
        if self._cancels:
            # The cancels just sent must reach PostgreSQL before the caller stops the loop,
            # or the queries of the sessions we ended run on upstream with no client.
            # (forward_cancel gives up on its own after 5 s.)
            await asyncio.wait(set(self._cancels), timeout=10)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1)
        if self.metrics is not None:
            await self.metrics.close()
        if self.datapath is not None:
            await self.datapath.close()

    async def __aenter__(self) -> ProxyServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown(grace=1.0)


async def open_datapath_runtime(config: Config) -> Any:
    """Policies, key service and audit trail for a proxy that encrypts."""
    from proxy.audit.trail import AuditTrail
    from proxy.keys.service import KeyService
    from proxy.policy.loader import load_policies
    from proxy.server.datapath_shell import DataPathRuntime

    policies = load_policies([config.path(p) for p in config.policies])
    audit = AuditTrail.from_config(config)
    await audit.start()
    try:
        service = await KeyService.open(config, audit=audit, lazy=True)
    except BaseException:
        await audit.close()
        raise
    runtime = DataPathRuntime(policies, service, audit)
    if config.cryptoperiod.rotate_on_schedule:
        runtime.start_rotation(config.cryptoperiod)
    return runtime


@contextlib.asynccontextmanager
async def running_proxy(config: Config) -> AsyncIterator[ProxyServer]:
    server = ProxyServer(config)
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown(grace=1.0)


# --- process level: serve, workers, signals -------------------------------------------

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"}
    },
    "handlers": {
        "stderr": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "stream": "ext://sys.stderr",
        }
    },
    "root": {"level": os.environ.get("PGSEAL_LOG_LEVEL", "INFO"), "handlers": ["stderr"]},
}


def install_event_loop_policy() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve_until_signalled(
    config: Config, sock: socket.socket | None = None, grace: float = 10.0
) -> None:
    server = ProxyServer(config, sock=sock, reuse_port=config.workers > 1)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"pgseal: listening on {config.listen.host}:{server.port}, upstream {config.upstream}"
        f" ({build_name()} build)",
        flush=True,
    )
    await stop.wait()
    log.info("shutting down: %d sessions", len(server.pumps))
    await server.shutdown(grace)


def _run_worker(config: Config, grace: float) -> None:
    install_event_loop_policy()
    asyncio.run(serve_until_signalled(config, grace=grace))


def cmd_serve(args: Any, config: Config) -> int:
    import logging.config

    logging.config.dictConfig(LOGGING)
    grace = float(os.environ.get("PGSEAL_SHUTDOWN_GRACE", "10"))
    if config.workers == 1:
        try:
            _run_worker(config, grace)
        except OSError as exc:
            print(f"pgseal: cannot listen on {config.listen}: {exc.strerror}", file=sys.stderr)
            return 1
        return 0
    return _run_workers(config, grace)


def _run_workers(config: Config, grace: float) -> int:
    """Fork N workers sharing the port with SO_REUSEPORT; forward SIGTERM/SIGINT to them."""
    # Bind once here first so that a port conflict is reported before forking.
    probe = socket.socket(socket.AF_INET6 if ":" in config.listen.host else socket.AF_INET)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        probe.bind((config.listen.host, config.listen.port))
    except OSError as exc:
        print(f"pgseal: cannot listen on {config.listen}: {exc.strerror}", file=sys.stderr)
        return 1
    if config.listen.port == 0:
        config = _with_port(config, probe.getsockname()[1])
    children: list[int] = []
    for _ in range(config.workers):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            probe.close()
            try:
                _run_worker(config, grace)
            finally:
                os._exit(0)
        children.append(pid)
    probe.close()

    def forward(signum: int, _frame: Any) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    for child in children:
        _, code = os.waitpid(child, 0)
        status = status or (os.waitstatus_to_exitcode(code) != 0)
    return int(status)


def _with_port(config: Config, port: int) -> Config:
    from dataclasses import replace

    return replace(config, listen=HostPort(config.listen.host, port))

"""Per-connection protocol state of the proxy. Pure: bytes in, bytes and effects out.

Theory of operation
-------------------
One `ProxySession` per client connection. The shell feeds it what the client
sent (`client_data`) and what the upstream sent (`server_data`); after each
call it drains `to_server`, `to_client` (lists of byte strings to write, in
order) and `effects` (the few things only the shell can do: upgrade the
client socket to TLS, connect the upstream, forward a cancel, close).

Phases and what moves between them (the table `_TRANSITIONS` is the whole
machine; handlers only ever move along an edge listed there):

    STARTUP ──SSLRequest/GSSENCRequest──▶ STARTUP (answer 'S'+TLS or 'N')
    STARTUP ──CancelRequest──▶ CLOSED (effect ForwardCancel)
    STARTUP ──StartupMessage──▶ CONNECTING (effect ConnectUpstream)
    CONNECTING ──upstream_connected()──▶ AUTHENTICATING (startup sent upstream)
    AUTHENTICATING ──AuthenticationOk──▶ READY ; ──ErrorResponse──▶ CLOSED
    READY ──client Terminate / either side EOF──▶ CLOSED

In READY, messages nobody needs to change travel as received slices (see
wire/framing.py). Sync/Query from the client (each owes a ReadyForQuery),
Execute (runs a statement, perhaps long before its Sync) and ReadyForQuery from
the server are only counted as they pass ("watched");
ParameterStatus, BackendKeyData and Terminate are held and decoded.
"""

from __future__ import annotations

import enum
import shlex
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from proxy.errors import PgsealError
from proxy.wire import messages as m
from proxy.wire.framing import (
    FRONTEND_TYPES,
    Frame,
    FrameBuffer,
    ProtocolViolation,
    held_table,
    next_startup_packet,
)

if TYPE_CHECKING:
    # The data path pulls in sqlglot and cryptography (~45 MB): a proxy without policies
    # never imports it (see _need_keys and _authentication).
    from proxy.session.datapath import AuditNote, DataPath, NeedKeys, SessionInfo


class Phase(enum.Enum):
    STARTUP = "startup"
    CONNECTING = "connecting"
    AUTHENTICATING = "authenticating"
    READY = "ready"
    CLOSED = "closed"


_TRANSITIONS: Final[dict[Phase, frozenset[Phase]]] = {
    Phase.STARTUP: frozenset({Phase.STARTUP, Phase.CONNECTING, Phase.CLOSED}),
    Phase.CONNECTING: frozenset({Phase.AUTHENTICATING, Phase.CLOSED}),
    Phase.AUTHENTICATING: frozenset({Phase.READY, Phase.CLOSED}),
    Phase.READY: frozenset({Phase.CLOSED}),
    Phase.CLOSED: frozenset(),
}

# Server messages looked at, per phase. Everything else passes through as slices.
_SERVER_HELD_AUTH: Final = held_table(b"RSKE")
_SERVER_HELD_READY: Final = held_table(b"SK")
_SERVER_WATCHED: Final = held_table(b"Z")
_CLIENT_HELD_AUTH: Final = held_table(b"p")
# With a policy loaded, nothing but password messages may pass before the data path is
# ready (startup answered, catalog query answered): a Query pipelined behind the
# StartupMessage would otherwise reach PostgreSQL unexamined, or be judged before the
# proxy knows the role and tenant PostgreSQL started the session with.
_CLIENT_HELD_ALL: Final = held_table(bytes(sorted(FRONTEND_TYPES)))
_CLIENT_HELD_READY: Final = held_table(b"X")
_CLIENT_WATCHED: Final = held_table(b"SQE")
# With a policy loaded every statement, bind and result message is looked at, and
# CopyDone / CopyFail (they tell which Syncs PostgreSQL answers: _drop_ignored_syncs);
# CopyData, Flush, notices and notifications still pass as slices.
_CLIENT_HELD_DATAPATH: Final = held_table(b"PBDESQCFXcf")
# ... and the client's COPY stream while a COPY FROM STDIN of a protected table runs.
_CLIENT_HELD_DATAPATH_COPY: Final = held_table(b"PBDESQCFXdcf")
# + D while a result has cells; + d, c while a COPY TO STDOUT stream has cells
_SERVER_HELD_DATAPATH: Final = held_table(b"123tTnCsIEZSKGH")
_COPY_DATA: Final = 0x64
_COPY_DONE: Final = 0x63
_SYNC: Final = 0x53
_QUERY: Final = 0x51
_READY: Final = 0x5A
_DATA_ROW: Final = 0x44
_EXECUTE: Final = 0x45
_ERROR: Final = 0x45  # ErrorResponse (server)
# The hot path compares against a plain global: `Phase.READY` is an attribute lookup
# through EnumType.__getattr__ on every message.
_PHASE_READY: Final = Phase.READY

SCRAM_PLUS: Final = "SCRAM-SHA-256-PLUS"


# --- effects: what only the I/O shell can do -----------------------------------------


@dataclass(frozen=True, slots=True)
class StartClientTls:
    """Write b'S' (already queued in to_client), then upgrade the client socket to TLS."""


@dataclass(frozen=True, slots=True)
class ConnectUpstream:
    startup: m.StartupMessage


@dataclass(frozen=True, slots=True)
class ForwardCancel:
    request: m.CancelRequest


@dataclass(frozen=True, slots=True)
class FetchKeys:
    """Fetch these keys into the key cache, then call keys_ready(side) (or keys_failed)."""

    side: str  # "client" | "server": which direction is waiting
    tenants: frozenset[str]
    key_ids: frozenset[int]


@dataclass(frozen=True, slots=True)
class WriteAudit:
    notes: tuple[AuditNote, ...]

    def __init__(self, notes: tuple[AuditNote, ...]) -> None:
        # Written out: see proxy.session.datapath._Pending.__init__.
        object.__setattr__(self, "notes", notes)


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """Flush what is queued, then close both sides. `reason` is for the log only."""

    reason: str


Effect = StartClientTls | ConnectUpstream | ForwardCancel | FetchKeys | WriteAudit | CloseConnection

DataPathFactory = Callable[["SessionInfo", dict[str, str]], "DataPath"]


def startup_database(startup: m.StartupMessage) -> str:
    """The database PostgreSQL connects to: the one named, or else the user's."""
    return startup.get("database") or startup.get("user") or ""


def startup_tenant(startup: m.StartupMessage) -> str | None:
    """pgseal.tenant from the startup packet: a parameter of its own, or `-c` in options."""
    direct = startup.get("pgseal.tenant")
    options = startup.get("options") or ""
    found = direct
    try:
        words = shlex.split(options.replace("\\ ", "\0"))
    except ValueError:
        words = options.split()
    for i, word in enumerate(words):
        setting = None
        if word == "-c" and i + 1 < len(words):
            setting = words[i + 1]
        elif word.startswith("-c") and len(word) > 2:
            setting = word[2:]
        elif word.startswith("--"):
            setting = word[2:]
        if setting is not None:
            name, sep, value = setting.partition("=")
            if sep and name.strip().lower() == "pgseal.tenant":
                found = value.replace("\0", " ")
    return found


def _need_keys() -> type[NeedKeys]:
    from proxy.session.datapath import NeedKeys

    return NeedKeys


def fatal(sqlstate: str, message: str) -> bytes:
    return m.ErrorResponse.make(sqlstate, message, severity="FATAL").encode()


class ProxySession:
    """Protocol state of one client connection; see the module doc."""

    def __init__(
        self, *, client_tls_available: bool, datapath_factory: DataPathFactory | None = None
    ) -> None:
        self.phase = Phase.STARTUP
        self.datapath_factory = datapath_factory
        self.datapath: DataPath | None = None
        # A frame waiting for keys (FetchKeys), per direction; that direction stops until then.
        self._stalled: dict[str, Frame] = {}
        # The client's stalled frame waits for the server's answers, not for keys
        # (NeedAnswers): it is processed again at the next ReadyForQuery or ErrorResponse.
        self._awaiting_answers = False
        self._catalog_sent = False
        self.client_tls_available = client_tls_available
        self.client_tls = False
        self.upstream_tls = False
        self.startup: m.StartupMessage | None = None
        self.backend_key: m.BackendKeyData | None = None
        self.parameters: dict[str, str] = {}
        self.transaction_status = "I"
        # Each Sync or Query the client sent (and the startup) owes one ReadyForQuery:
        # > 0 means busy.
        self.awaiting_ready = 0
        # An Execute was sent and no Sync after it yet: pipelines streamed with Flush
        # (psycopg's pipeline mode) run statements that no ReadyForQuery is owed for.
        self.unsynced = False
        self.to_server: list[bytes] = []
        self.to_client: list[bytes] = []
        self.effects: list[Effect] = []
        self._startup_buf = bytearray()
        self._client = FrameBuffer(
            "client",
            held=_CLIENT_HELD_AUTH if datapath_factory is None else _CLIENT_HELD_ALL,
            watched=_CLIENT_WATCHED,
            valid_types=FRONTEND_TYPES,
        )
        self._server = FrameBuffer("server", held=_SERVER_HELD_AUTH, watched=_SERVER_WATCHED)
        self._last_auth_code: int | None = None

    # -- phase bookkeeping ------------------------------------------------------------

    def _move(self, phase: Phase) -> None:
        if phase not in _TRANSITIONS[self.phase]:
            raise AssertionError(f"illegal transition {self.phase} -> {phase}")
        self.phase = phase

    def close(self, reason: str, client_error: bytes | None = None) -> None:
        if client_error is not None:
            self.to_client.append(client_error)
        if self.phase is not Phase.CLOSED:
            self._move(Phase.CLOSED)
            self.effects.append(CloseConnection(reason))

    @property
    def busy(self) -> bool:
        """True while a query runs (or an Execute awaits its Sync) or a transaction is open."""
        return self.awaiting_ready > 0 or self.unsynced or self.transaction_status != "I"

    # -- client side --------------------------------------------------------------

    def client_passes(self, data: bytes) -> bool:
        """Hot path: True when `data` goes to the server unchanged (the caller writes it).
        Otherwise nothing happened and the caller uses `client_data`."""
        if self.phase is not _PHASE_READY or self._stalled or not self._client.passes_whole(data):
            return False
        buf = self._client
        seen = buf.seen  # take_seen(), inlined: this runs once per received chunk
        n = seen[_SYNC] + seen[_QUERY]
        if n or seen[_EXECUTE]:
            seen[_SYNC] = seen[_QUERY] = seen[_EXECUTE] = 0
            self.awaiting_ready += n
            self.unsynced = buf.last_watched_type == _EXECUTE
        return True

    def server_passes(self, data: bytes) -> bool:
        """Hot path, server to client; see client_passes."""
        if self.phase is not _PHASE_READY or self._stalled or not self._server.passes_whole(data):
            return False
        buf = self._server
        seen = buf.seen
        ready = seen[_READY]
        if ready:
            seen[_READY] = 0
            self.transaction_status = chr(buf.last_watched_byte)
            left = self.awaiting_ready - ready
            self.awaiting_ready = left if left > 0 else 0
        return True

    def client_data(self, data: bytes) -> None:
        if self.phase is Phase.CLOSED:
            return
        try:
            if self.phase is Phase.STARTUP:
                self._startup_buf += data
                self._startup_packets()
                return
            self._client.feed(data)
            if self.phase is not Phase.CONNECTING and "client" not in self._stalled:
                self._client_messages()
        except ProtocolViolation as exc:
            self._protocol_violation(exc)

    def _startup_packets(self) -> None:
        while self.phase is Phase.STARTUP:
            packet = next_startup_packet(self._startup_buf)
            if packet is None:
                return
            msg = m.decode_startup_packet(packet)
            if isinstance(msg, m.SSLRequest):
                if self.client_tls or self._startup_buf:
                    # A second SSLRequest, or plaintext pipelined behind it (CVE-2021-23214).
                    raise ProtocolViolation("client", "unexpected data after SSLRequest")
                if self.client_tls_available:
                    self.to_client.append(b"S")
                    self.effects.append(StartClientTls())
                    self.client_tls = True
                else:
                    self.to_client.append(b"N")
            elif isinstance(msg, m.GSSENCRequest):
                self.to_client.append(b"N")
            elif isinstance(msg, m.CancelRequest):
                self.effects.append(ForwardCancel(msg))
                self.close("cancel request forwarded")
            else:
                self.startup = msg
                self._move(Phase.CONNECTING)
                self.effects.append(ConnectUpstream(msg))
                if self._startup_buf:
                    self._client.feed(bytes(self._startup_buf))
                    self._startup_buf.clear()

    def _client_messages(self) -> None:
        # Also reached from keys_ready/keys_failed and the server's side: a malformed
        # message read there must end the session as cleanly as one read in client_data.
        try:
            buf = self._client
            out = self.to_server
            datapath = self.datapath
            while self.phase is not Phase.CLOSED:
                item = buf.next()
                if item is None:
                    break
                if type(item) is bytes:
                    out.append(item)
                    continue
                assert isinstance(item, Frame)
                t = item.type
                if (
                    self.datapath_factory is not None
                    and (datapath is None or datapath.catalog_pending)
                    and t not in (0x70, 0x58)
                ):
                    buf.push_back(item)  # wait for the data path (see _CLIENT_HELD_ALL)
                    break
                if datapath is not None and t != 0x58:
                    if t == _SYNC or t == _QUERY:
                        self.awaiting_ready += 1
                        self.unsynced = False
                    elif t == _EXECUTE:
                        self.unsynced = True
                    if self._through_datapath("client", item) is None:
                        break
                elif t == 0x58:  # Terminate
                    # Pipelined behind a running query (asyncpg's terminate() does this), it
                    # would sit unread upstream until the query ends: cancel the query.
                    self.cancel_running()
                    out.append(item.raw)
                    self.close("client sent Terminate")
                elif t == 0x70:  # password / SASL response
                    out.append(self._auth_response(item))
                else:  # pragma: no cover - held types are listed above
                    out.append(item.raw)
            n = buf.take_seen(_SYNC) + buf.take_seen(_QUERY)
            executes = buf.take_seen(_EXECUTE)
            if n or executes:
                self.awaiting_ready += n
                self.unsynced = buf.last_watched_type == _EXECUTE
            self._collect_audit()
        except ProtocolViolation as exc:
            self._protocol_violation(exc)

    def _protocol_violation(self, exc: ProtocolViolation) -> None:
        """Malformed bytes from either side (exc.who): tell the client, end the session."""
        self.close(
            f"{exc.who} protocol violation: {exc.message}", fatal("08P01", f"pgseal: {exc.message}")
        )

    def _through_datapath(self, side: str, frame: Frame) -> bytes | None:
        """Process one frame through the data path: what was forwarded, None while it waits
        for keys."""
        assert self.datapath is not None
        try:
            if side == "client":
                out = self.datapath.client_frame(frame)
            else:
                out = self.datapath.server_frame(frame)
        except _need_keys() as need:
            if side == "client" and frame.type in (_SYNC, _QUERY):
                self.awaiting_ready -= 1  # counted again on the retry
            self._stalled[side] = frame
            if need.answers:
                self._awaiting_answers = True
            else:
                self.effects.append(FetchKeys(side, need.tenants, need.key_ids))
            return None
        except ProtocolViolation:
            raise
        except Exception:  # a bug must not forward anything: end the connection, loudly
            self.close(
                f"internal error in the data path:\n{traceback.format_exc()}",
                fatal(
                    "XX000",
                    "pgseal: internal error; the statement was not forwarded (see the proxy log)",
                ),
            )
            return None
        if side == "client":
            self.to_server.append(out)
        else:
            self.to_client.append(out)
        if self.datapath.ignored_syncs:  # Syncs and Queries PostgreSQL will not answer
            self.awaiting_ready = max(0, self.awaiting_ready - self.datapath.ignored_syncs)
            self.datapath.ignored_syncs = 0
        self._sync_held()
        return out

    def _sync_held(self) -> None:
        """Hold what the data path must see next: DataRows of a result with cells (a new
        head of the response queue, e.g. Execute of an earlier portal, may need its rows
        opened with no other server message before them), and COPY streams with cells."""
        datapath = self.datapath
        assert datapath is not None
        server = self._server
        held = server.held
        rows = datapath.rows_need_looking_at()
        if held[_DATA_ROW] != rows:
            server.hold(_DATA_ROW, rows)
        copy_out = datapath.copy_out is not None
        if held[_COPY_DATA] != copy_out:
            server.hold(_COPY_DATA, copy_out)
            server.hold(_COPY_DONE, copy_out)
        # Client tables are shared by every session: swapped whole, never edited.
        if datapath.catalog_pending:
            self._client.held = _CLIENT_HELD_ALL  # nothing passes before the catalog answer
        elif datapath.copy_in is not None or datapath.copy_discarding:
            self._client.held = _CLIENT_HELD_DATAPATH_COPY
        elif self._client.held is not _CLIENT_HELD_DATAPATH:
            self._client.held = _CLIENT_HELD_DATAPATH

    def _collect_audit(self) -> None:
        if self.datapath is not None and self.datapath.audit:
            self.effects.append(WriteAudit(tuple(self.datapath.take_audit())))

    def keys_ready(self, side: str) -> None:
        """The keys a FetchKeys asked for are in the cache: process the waiting frame again."""
        frame = self._stalled.pop(side, None)
        if frame is None or self.phase is Phase.CLOSED:
            return
        if side == "client":
            self._client.push_back(frame)
            self._client_messages()
        else:
            self._server.push_back(frame)
            self._server_messages()

    def keys_failed(self, side: str, error: PgsealError) -> None:
        """The keys could not be had (HSM, keystore, audit down; key destroyed): refuse in order."""
        frame = self._stalled.pop(side, None)
        if frame is None or self.phase is Phase.CLOSED or self.datapath is None:
            return
        if side == "client":
            if frame.type == _QUERY:
                self.awaiting_ready += 1
            self.to_server.append(self.datapath.refuse_for_key_failure(frame, error))
            self._sync_held()  # a COPY FROM may have ended with it
            self._client_messages()
        else:
            self.to_client.append(self.datapath.fail_server_frame(error))
            self._server_messages()

    def _auth_response(self, item: Frame) -> bytes:
        if self._last_auth_code == m.AUTH_SASL:
            initial = m.decode_sasl_initial_response(item.body)
            # 'y' = "I support channel binding but you did not offer it". PostgreSQL on a
            # TLS connection treats that as a downgrade attack and refuses; say why here.
            if initial.data is not None and initial.data[:1] == b"y" and self.upstream_tls:
                self.close(
                    "client requested channel binding",
                    fatal(
                        "28000",
                        "pgseal: SCRAM channel binding cannot cross the proxy; "
                        "connect with channel_binding=disable (TLS still protects each hop)",
                    ),
                )
                return b""
        return item.raw

    # -- upstream side ------------------------------------------------------------

    def upstream_connected(self, *, tls: bool) -> None:
        """The shell connected (and TLS-negotiated) the upstream: send the startup packet."""
        assert self.startup is not None
        self.upstream_tls = tls
        self._move(Phase.AUTHENTICATING)
        self.to_server.append(self.startup.encode())
        # The startup owes a ReadyForQuery too (the one that ends it); without counting it,
        # a query pipelined behind the StartupMessage would look finished at that one.
        self.awaiting_ready += 1
        if self._client.buffered:
            self._client_messages()

    def upstream_failed(self, reason: str) -> None:
        self.close(
            f"upstream unavailable: {reason}",
            fatal("08006", f"pgseal: upstream unavailable: {reason}"),
        )

    def server_data(self, data: bytes) -> None:
        if self.phase is Phase.CLOSED:
            return
        self._server.feed(data)
        if "server" not in self._stalled:
            self._server_messages()

    def _server_messages(self) -> None:
        buf = self._server
        out = self.to_client
        datapath = self.datapath
        try:
            while self.phase is not Phase.CLOSED:
                item = buf.next()
                if item is None:
                    break
                if type(item) is bytes:
                    out.append(item)
                    continue
                assert isinstance(item, Frame)
                t = item.type
                if t == 0x53:  # ParameterStatus
                    ps = m.decode_parameter_status(item.body)
                    self.parameters[ps.name] = ps.value
                    out.append(item.raw)
                elif datapath is not None and t != 0x4B:
                    if t == _READY and not self._catalog_sent:
                        # Startup is complete: learn the protected tables' OIDs, and the
                        # role and tenant PostgreSQL started the session with, before the
                        # client's first statement. The client gets this ReadyForQuery
                        # when the answer is in (the data path swallows the answer).
                        self._catalog_sent = True
                        self.to_server.append(datapath.catalog_query(item.raw))
                        self._sync_held()  # its DataRows are ours
                        continue
                    catalog_pending = datapath.catalog_pending
                    forwarded = self._through_datapath("server", item)
                    if forwarded is None:
                        break
                    if t == _READY and forwarded:  # not the answer to our own catalog query
                        self.transaction_status = chr(item.body[0]) if item.body else "I"
                        self.awaiting_ready = max(0, self.awaiting_ready - 1)
                    if t == _READY and datapath.startup_failure is not None:
                        self.close(
                            f"catalog query failed: {datapath.startup_failure}",
                            fatal(
                                "58000",
                                "pgseal: could not read the session's protected tables and "
                                f"settings at startup: {datapath.startup_failure}",
                            ),
                        )
                        return
                    if catalog_pending and not datapath.catalog_pending:
                        if self._client.buffered and "client" not in self._stalled:
                            self._client_messages()  # what the client sent meanwhile
                    if (t == _READY or t == _ERROR) and self._awaiting_answers:
                        # A segment sent before the stalled client frame was answered, or
                        # failed (an error can also cancel the answer it waited for: a
                        # Query behind a failed Execute with no Sync is skipped): process
                        # the frame again (it may wait on for the next answer).
                        self._awaiting_answers = False
                        self.keys_ready("client")
                elif t == 0x4B:  # BackendKeyData
                    self.backend_key = m.decode_backend_key_data(item.body)
                    out.append(item.raw)
                elif t == 0x52:  # Authentication*
                    out.append(self._authentication(item))
                    # AuthenticationOk made the data path: the startup ReadyForQuery in
                    # this same read must see it (and send the catalog query).
                    datapath = self.datapath
                elif t == 0x45:  # ErrorResponse during authentication: PostgreSQL closes next
                    out.append(item.raw)
                    self.close("authentication failed upstream")
                else:  # pragma: no cover
                    out.append(item.raw)
        except ProtocolViolation as exc:
            self._protocol_violation(exc)
            return
        ready = buf.take_seen(_READY)
        if ready:
            self.transaction_status = chr(buf.last_watched_byte)
            self.awaiting_ready = max(0, self.awaiting_ready - ready)
        self._collect_audit()

    def _authentication(self, item: Frame) -> bytes:
        auth = m.decode_authentication(item.body)
        self._last_auth_code = auth.code
        if auth.code == m.AUTH_OK:
            self._move(Phase.READY)
            if self.datapath_factory is not None and self.startup is not None:
                digits = self.startup.get("extra_float_digits") or "1"
                from proxy.session.datapath import SessionInfo

                info = SessionInfo(
                    user=self.startup.get("user") or "",
                    database=startup_database(self.startup),
                    startup_tenant=startup_tenant(self.startup),
                    extra_float_digits=int(digits) if digits.lstrip("-").isdigit() else 1,
                    bytea_output=self.startup.get("bytea_output") or "hex",
                )
                self.datapath = self.datapath_factory(info, self.parameters)
                # Our own copy: whether DataRow is held changes with each result.
                self._server.held = bytearray(_SERVER_HELD_DATAPATH)
                self._client.held = _CLIENT_HELD_ALL  # until the catalog answer (_sync_held)
            else:
                self._server.held = _SERVER_HELD_READY
                self._client.held = _CLIENT_HELD_READY
            return item.raw
        if auth.code == m.AUTH_SASL:
            # Channel binding would bind to the proxy's TLS session, not PostgreSQL's.
            mechanisms = [name for name in auth.sasl_mechanisms if name != SCRAM_PLUS]
            if not mechanisms:
                self.close(
                    "no SASL mechanism left",
                    fatal("28000", "pgseal: upstream offers only SCRAM-SHA-256-PLUS"),
                )
                return b""
            return m.Authentication.sasl(mechanisms).encode()
        return item.raw

    # -- endings -------------------------------------------------------------------

    def cancel_running(self) -> None:
        """Queue a cancel of the query running upstream, if one runs.

        PostgreSQL does not notice a vanished client while it executes a query, so
        a backend whose client is gone must be cancelled to be released. Only when
        a ReadyForQuery is owed or an Execute awaits its Sync: an idle (or
        idle-in-transaction) backend notices the closed socket by itself."""
        key = self.backend_key
        running = self.awaiting_ready > 0 or self.unsynced
        if self.phase is Phase.READY and running and key is not None:
            self.effects.append(ForwardCancel(m.CancelRequest(key.pid, key.secret)))

    def client_gone(self) -> None:
        """The client's connection closed or reset without a Terminate."""
        self.cancel_running()
        self.close("client disconnected")

    def shutdown_message(self) -> bytes:
        """What a client gets when the proxy ends its session (SIGTERM after the grace period)."""
        return fatal("57P01", "terminating connection due to administrator command")

    def drain(self) -> tuple[list[bytes], list[bytes], list[Effect]]:
        """Take everything queued: (to_server, to_client, effects)."""
        out = (self.to_server, self.to_client, self.effects)
        self.to_server, self.to_client, self.effects = [], [], []
        return out

"""PostgreSQL v3 messages the proxy needs to read or write. Pure.

Every message is a frozen dataclass with slots; `decode_*` functions take a
message body (type byte and length stripped) and raise ProtocolViolation on any
malformed input, never another exception; `encode()` returns the whole message.
Only what the proxy must understand is modelled: everything else travels as
undecoded `Span`s (see framing.py).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from proxy.wire.framing import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    PROTOCOL_3_0,
    SSL_REQUEST_CODE,
    ProtocolViolation,
)

_I16 = struct.Struct("!h")
_U16 = struct.Struct("!H")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")


def frame(mtype: bytes, body: bytes) -> bytes:
    return mtype + _I32.pack(len(body) + 4) + body


class Reader:
    """Cursor over a message body; every read failure is a ProtocolViolation."""

    __slots__ = ("data", "pos", "who")

    def __init__(self, data: bytes, who: str) -> None:
        self.data = data
        self.pos = 0
        self.who = who

    def fail(self, what: str) -> ProtocolViolation:
        return ProtocolViolation(self.who, f"malformed message: {what}")

    def int16(self) -> int:
        if self.pos + 2 > len(self.data):
            raise self.fail("truncated int16")
        (v,) = _I16.unpack_from(self.data, self.pos)
        self.pos += 2
        return int(v)

    def uint16(self) -> int:
        if self.pos + 2 > len(self.data):
            raise self.fail("truncated int16")
        (v,) = _U16.unpack_from(self.data, self.pos)
        self.pos += 2
        return int(v)

    def int32(self) -> int:
        if self.pos + 4 > len(self.data):
            raise self.fail("truncated int32")
        (v,) = _I32.unpack_from(self.data, self.pos)
        self.pos += 4
        return int(v)

    def uint32(self) -> int:
        if self.pos + 4 > len(self.data):
            raise self.fail("truncated int32")
        (v,) = _U32.unpack_from(self.data, self.pos)
        self.pos += 4
        return int(v)

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise self.fail("truncated byte")
        v = self.data[self.pos]
        self.pos += 1
        return v

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail("truncated field")
        v = self.data[self.pos : self.pos + n]
        self.pos += n
        return v

    def cstring_bytes(self) -> bytes:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise self.fail("unterminated string")
        v = self.data[self.pos : end]
        self.pos = end + 1
        return v

    def cstring(self) -> str:
        raw = self.cstring_bytes()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("string is not UTF-8") from None

    def rest(self) -> bytes:
        v = self.data[self.pos :]
        self.pos = len(self.data)
        return v

    def done(self) -> None:
        if self.pos != len(self.data):
            raise self.fail("trailing bytes")


def _cstr(s: str) -> bytes:
    raw = s.encode("utf-8")
    if b"\0" in raw:
        raise ValueError("NUL byte in a protocol string")
    return raw + b"\0"


# --- startup phase -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartupMessage:
    protocol: int
    params: tuple[tuple[str, str], ...]

    def get(self, name: str, default: str | None = None) -> str | None:
        for k, v in self.params:
            if k == name:
                return v
        return default

    def encode(self) -> bytes:
        body = (
            _I32.pack(self.protocol) + b"".join(_cstr(k) + _cstr(v) for k, v in self.params) + b"\0"
        )
        return _I32.pack(len(body) + 4) + body


@dataclass(frozen=True, slots=True)
class SSLRequest:
    def encode(self) -> bytes:
        return _I32.pack(8) + _I32.pack(SSL_REQUEST_CODE)


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    def encode(self) -> bytes:
        return _I32.pack(8) + _I32.pack(GSSENC_REQUEST_CODE)


@dataclass(frozen=True, slots=True)
class CancelRequest:
    pid: int
    secret: int

    def encode(self) -> bytes:
        return (
            _I32.pack(16)
            + _I32.pack(CANCEL_REQUEST_CODE)
            + _I32.pack(self.pid)
            + _I32.pack(self.secret)
        )


StartupPacket = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest


def decode_startup_packet(packet: bytes) -> StartupPacket:
    """A whole startup-phase packet, length prefix included."""
    r = Reader(packet, "client")
    r.int32()
    code = r.int32()
    if code == SSL_REQUEST_CODE:
        r.done()
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        r.done()
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        msg = CancelRequest(r.int32(), r.int32())
        r.done()
        return msg
    if code >> 16 != 3:
        raise ProtocolViolation(
            "client", f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}"
        )
    params: list[tuple[str, str]] = []
    while True:
        name = r.cstring()
        if not name:
            break
        params.append((name, r.cstring()))
    r.done()
    if not any(k == "user" for k, _ in params):
        raise ProtocolViolation("client", "no PostgreSQL user name specified in startup packet")
    return StartupMessage(code, tuple(params))


# --- authentication ------------------------------------------------------------

AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


@dataclass(frozen=True, slots=True)
class Authentication:
    """Any 'R' message: `code` plus the raw rest (salt, SASL data...)."""

    code: int
    data: bytes = b""

    def encode(self) -> bytes:
        return frame(b"R", _I32.pack(self.code) + self.data)

    @property
    def sasl_mechanisms(self) -> tuple[str, ...]:
        if self.code != AUTH_SASL:
            return ()
        r = Reader(self.data, "server")
        names: list[str] = []
        while True:
            name = r.cstring()
            if not name:
                return tuple(names)
            names.append(name)

    @classmethod
    def sasl(cls, mechanisms: Sequence[str]) -> Authentication:
        return cls(AUTH_SASL, b"".join(_cstr(m) for m in mechanisms) + b"\0")


def decode_authentication(body: bytes) -> Authentication:
    r = Reader(body, "server")
    code = r.int32()
    msg = Authentication(code, r.rest())
    if code == AUTH_SASL:
        msg.sasl_mechanisms  # noqa: B018 - validates the list
    return msg


@dataclass(frozen=True, slots=True)
class SASLInitialResponse:
    mechanism: str
    data: bytes | None

    def encode(self) -> bytes:
        data = b"" if self.data is None else self.data
        length = -1 if self.data is None else len(data)
        return frame(b"p", _cstr(self.mechanism) + _I32.pack(length) + data)


def decode_sasl_initial_response(body: bytes) -> SASLInitialResponse:
    r = Reader(body, "client")
    mechanism = r.cstring()
    n = r.int32()
    data = None if n == -1 else r.take(n)
    r.done()
    return SASLInitialResponse(mechanism, data)


# --- session status ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackendKeyData:
    pid: int
    secret: int

    def encode(self) -> bytes:
        return frame(b"K", _I32.pack(self.pid) + _I32.pack(self.secret))


def decode_backend_key_data(body: bytes) -> BackendKeyData:
    r = Reader(body, "server")
    msg = BackendKeyData(r.int32(), r.int32())
    r.done()
    return msg


@dataclass(frozen=True, slots=True)
class ParameterStatus:
    name: str
    value: str

    def encode(self) -> bytes:
        return frame(b"S", _cstr(self.name) + _cstr(self.value))


def decode_parameter_status(body: bytes) -> ParameterStatus:
    r = Reader(body, "server")
    msg = ParameterStatus(r.cstring(), r.cstring())
    r.done()
    return msg


@dataclass(frozen=True, slots=True)
class ReadyForQuery:
    status: str  # 'I' idle, 'T' in transaction, 'E' failed transaction

    def __post_init__(self) -> None:
        if self.status not in ("I", "T", "E"):
            raise ValueError(f"bad transaction status {self.status!r}")

    def encode(self) -> bytes:
        return frame(b"Z", self.status.encode())


def decode_ready_for_query(body: bytes) -> ReadyForQuery:
    if len(body) != 1 or body not in (b"I", b"T", b"E"):
        raise ProtocolViolation("server", "malformed message: ReadyForQuery")
    return ReadyForQuery(body.decode())


# --- errors and notices ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """ErrorResponse ('E') or, with notice=True, NoticeResponse ('N')."""

    fields: tuple[tuple[str, str], ...]
    notice: bool = False

    @classmethod
    def make(
        cls, sqlstate: str, message: str, severity: str = "ERROR", **extra: str
    ) -> ErrorResponse:
        items = [("S", severity), ("V", severity), ("C", sqlstate), ("M", message)]
        codes = {"detail": "D", "hint": "H", "table": "t", "column": "c", "schema": "s"}
        items += [(codes[k], v) for k, v in extra.items() if v]
        return cls(tuple(items))

    def get(self, code: str) -> str | None:
        for k, v in self.fields:
            if k == code:
                return v
        return None

    @property
    def sqlstate(self) -> str | None:
        return self.get("C")

    @property
    def message(self) -> str | None:
        return self.get("M")

    def encode(self) -> bytes:
        body = b"".join(k.encode("ascii") + _cstr(v) for k, v in self.fields) + b"\0"
        return frame(b"N" if self.notice else b"E", body)


def decode_error_response(body: bytes, notice: bool = False, who: str = "server") -> ErrorResponse:
    r = Reader(body, who)
    items: list[tuple[str, str]] = []
    while True:
        code = r.byte()
        if code == 0:
            break
        items.append((chr(code), r.cstring()))
    r.done()
    return ErrorResponse(tuple(items), notice)


# --- simple and extended query (frontend) -------------------------------------------


@dataclass(frozen=True, slots=True)
class Query:
    sql: str

    def encode(self) -> bytes:
        return frame(b"Q", _cstr(self.sql))


def decode_query(body: bytes) -> Query:
    r = Reader(body, "client")
    msg = Query(r.cstring())
    r.done()
    return msg


@dataclass(frozen=True, slots=True)
class Parse:
    name: str
    sql: str
    param_types: tuple[int, ...] = ()

    def encode(self) -> bytes:
        return frame(
            b"P",
            _cstr(self.name)
            + _cstr(self.sql)
            + _I16.pack(len(self.param_types))
            + b"".join(_U32.pack(t) for t in self.param_types),
        )


def decode_parse(body: bytes) -> Parse:
    r = Reader(body, "client")
    name = r.cstring()
    sql = r.cstring()
    n = r.int16()
    if n < 0:
        raise r.fail("negative parameter count")
    types = tuple(r.uint32() for _ in range(n))
    r.done()
    return Parse(name, sql, types)


@dataclass(frozen=True, slots=True)
class Bind:
    portal: str
    statement: str
    param_formats: tuple[int, ...]
    params: tuple[bytes | None, ...]
    result_formats: tuple[int, ...]

    def param_format(self, index: int) -> int:
        """The format code of parameter `index` (0-based) per the protocol's 0/1/n rule."""
        f = self.param_formats
        return 0 if not f else f[0] if len(f) == 1 else f[index]

    def result_format(self, index: int) -> int:
        f = self.result_formats
        return 0 if not f else f[0] if len(f) == 1 else f[index]

    def encode(self) -> bytes:
        parts = [
            _cstr(self.portal),
            _cstr(self.statement),
            _I16.pack(len(self.param_formats)),
            *(_I16.pack(f) for f in self.param_formats),
            _I16.pack(len(self.params)),
        ]
        for p in self.params:
            if p is None:
                parts.append(_I32.pack(-1))
            else:
                parts.append(_I32.pack(len(p)))
                parts.append(p)
        parts.append(_I16.pack(len(self.result_formats)))
        parts.extend(_I16.pack(f) for f in self.result_formats)
        return frame(b"B", b"".join(parts))


def decode_bind(body: bytes) -> Bind:
    r = Reader(body, "client")
    portal = r.cstring()
    statement = r.cstring()
    nf = r.int16()
    if nf < 0:
        raise r.fail("negative format count")
    formats = tuple(r.int16() for _ in range(nf))
    n = r.int16()
    if n < 0:
        raise r.fail("negative parameter count")
    if nf > 1 and nf != n:
        raise r.fail("parameter format count does not match parameter count")
    params: list[bytes | None] = []
    for _ in range(n):
        size = r.int32()
        params.append(None if size == -1 else r.take(size))
    nr = r.int16()
    if nr < 0:
        raise r.fail("negative result format count")
    results = tuple(r.int16() for _ in range(nr))
    r.done()
    if any(f not in (0, 1) for f in formats + results):
        raise r.fail("format code must be 0 or 1")
    return Bind(portal, statement, formats, tuple(params), results)


@dataclass(frozen=True, slots=True)
class Describe:
    kind: str  # 'S' statement or 'P' portal
    name: str

    def encode(self) -> bytes:
        return frame(b"D", self.kind.encode() + _cstr(self.name))


@dataclass(frozen=True, slots=True)
class Close:
    kind: str
    name: str

    def encode(self) -> bytes:
        return frame(b"C", self.kind.encode() + _cstr(self.name))


def _decode_kind_name(body: bytes, what: str) -> tuple[str, str]:
    r = Reader(body, "client")
    kind = chr(r.byte())
    if kind not in ("S", "P"):
        raise r.fail(f"{what} kind must be S or P")
    name = r.cstring()
    r.done()
    return kind, name


def decode_describe(body: bytes) -> Describe:
    return Describe(*_decode_kind_name(body, "Describe"))


def decode_close(body: bytes) -> Close:
    return Close(*_decode_kind_name(body, "Close"))


@dataclass(frozen=True, slots=True)
class Execute:
    portal: str
    max_rows: int = 0

    def encode(self) -> bytes:
        return frame(b"E", _cstr(self.portal) + _I32.pack(self.max_rows))


def decode_execute(body: bytes) -> Execute:
    r = Reader(body, "client")
    msg = Execute(r.cstring(), r.int32())
    r.done()
    return msg


SYNC = frame(b"S", b"")
FLUSH = frame(b"H", b"")
TERMINATE = frame(b"X", b"")


# --- results (backend) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FieldDescription:
    name: str
    table_oid: int
    column_attnum: int
    type_oid: int
    type_size: int
    type_modifier: int
    format: int


@dataclass(frozen=True, slots=True)
class RowDescription:
    fields: tuple[FieldDescription, ...]

    def encode(self) -> bytes:
        parts = [_I16.pack(len(self.fields))]
        for f in self.fields:
            parts.append(_cstr(f.name))
            parts.append(
                struct.pack(
                    "!IhIhih",
                    f.table_oid,
                    f.column_attnum,
                    f.type_oid,
                    f.type_size,
                    f.type_modifier,
                    f.format,
                )
            )
        return frame(b"T", b"".join(parts))


def decode_row_description(body: bytes) -> RowDescription:
    r = Reader(body, "server")
    n = r.int16()
    if n < 0:
        raise r.fail("negative field count")
    fields_: list[FieldDescription] = []
    for _ in range(n):
        name = r.cstring()
        fields_.append(
            FieldDescription(
                name, r.uint32(), r.int16(), r.uint32(), r.int16(), r.int32(), r.int16()
            )
        )
    r.done()
    return RowDescription(tuple(fields_))


@dataclass(frozen=True, slots=True)
class DataRow:
    values: tuple[bytes | None, ...] = field(default=())

    def encode(self) -> bytes:
        parts = [_I16.pack(len(self.values))]
        for v in self.values:
            if v is None:
                parts.append(_I32.pack(-1))
            else:
                parts.append(_I32.pack(len(v)))
                parts.append(v)
        return frame(b"D", b"".join(parts))


def decode_data_row(body: bytes) -> DataRow:
    r = Reader(body, "server")
    n = r.int16()
    if n < 0:
        raise r.fail("negative column count")
    values: list[bytes | None] = []
    for _ in range(n):
        size = r.int32()
        values.append(None if size == -1 else r.take(size))
    r.done()
    return DataRow(tuple(values))


@dataclass(frozen=True, slots=True)
class ParameterDescription:
    type_oids: tuple[int, ...]

    def encode(self) -> bytes:
        return frame(
            b"t", _I16.pack(len(self.type_oids)) + b"".join(_U32.pack(t) for t in self.type_oids)
        )


def decode_parameter_description(body: bytes) -> ParameterDescription:
    r = Reader(body, "server")
    n = r.int16()
    if n < 0:
        raise r.fail("negative parameter count")
    msg = ParameterDescription(tuple(r.uint32() for _ in range(n)))
    r.done()
    return msg


@dataclass(frozen=True, slots=True)
class CommandComplete:
    tag: str

    def encode(self) -> bytes:
        return frame(b"C", _cstr(self.tag))


def decode_command_complete(body: bytes) -> CommandComplete:
    r = Reader(body, "server")
    msg = CommandComplete(r.cstring())
    r.done()
    return msg


@dataclass(frozen=True, slots=True)
class NotificationResponse:
    pid: int
    channel: str
    payload: str

    def encode(self) -> bytes:
        return frame(b"A", _I32.pack(self.pid) + _cstr(self.channel) + _cstr(self.payload))


def decode_notification_response(body: bytes) -> NotificationResponse:
    r = Reader(body, "server")
    msg = NotificationResponse(r.int32(), r.cstring(), r.cstring())
    r.done()
    return msg


# --- COPY ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CopyResponse:
    """CopyInResponse ('G') or CopyOutResponse ('H'): overall format (0 text, 1 binary)
    and one format code per column."""

    format: int
    column_formats: tuple[int, ...]


def decode_copy_response(body: bytes) -> CopyResponse:
    r = Reader(body, "server")
    fmt = r.byte()
    n = r.int16()
    if n < 0:
        raise r.fail("negative column count")
    msg = CopyResponse(fmt, tuple(r.int16() for _ in range(n)))
    r.done()
    return msg


@dataclass(frozen=True, slots=True)
class CopyData:
    data: bytes

    def encode(self) -> bytes:
        return frame(b"d", self.data)


@dataclass(frozen=True, slots=True)
class CopyFail:
    message: str

    def encode(self) -> bytes:
        return frame(b"f", _cstr(self.message))


COPY_DONE = frame(b"c", b"")


__all__ = [
    "PROTOCOL_3_0",
    "Authentication",
    "BackendKeyData",
    "Bind",
    "CancelRequest",
    "Close",
    "CommandComplete",
    "CopyData",
    "CopyFail",
    "CopyResponse",
    "DataRow",
    "Describe",
    "ErrorResponse",
    "Execute",
    "FieldDescription",
    "GSSENCRequest",
    "NotificationResponse",
    "ParameterDescription",
    "ParameterStatus",
    "Parse",
    "Query",
    "ReadyForQuery",
    "RowDescription",
    "SASLInitialResponse",
    "SSLRequest",
    "StartupMessage",
]

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
from dataclasses import dataclass
from typing import Final

from proxy.errors import without_context
from proxy.wire.framing import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    PROTOCOL_3_0,
    SSL_REQUEST_CODE,
    ProtocolViolation,
    u32_at,
)

_I16: Final = struct.Struct("!h")
_U16: Final = struct.Struct("!H")
_I32: Final = struct.Struct("!i")
_U32: Final = struct.Struct("!I")

# The hot decoders and encoders (Parse, Bind, Describe, Execute, RowDescription, DataRow)
# do not go through `Reader`: a method call per field cost more than all the rest. They
# read integers with `_i16_at`/`_i32_at` (arrays with bound `unpack_from`s) after explicit
# bounds checks, find C strings with `bytes.find`, and raise what the `Reader` version
# raised, same message for the same input (tests/unit/test_wire.py keeps that version as
# the oracle).
_pack_i16: Final = _I16.pack
_pack_i32: Final = _I32.pack
_NULL_SIZE: Final = _I32.pack(-1)
_FIELD: Final = struct.Struct("!IhIhih")  # a RowDescription field after its name
_FIELD_SIZE: Final = _FIELD.size
_unpack_field: Final = _FIELD.unpack_from
_pack_nul_field: Final = struct.Struct("!xIhIhih").pack  # the name's NUL, then the field
# The read that fails first in a RowDescription field cut short, by bytes left after the name.
_FIELD_TRUNCATION: Final = tuple(
    "truncated int32" if left < 4 or 6 <= left < 10 or 12 <= left < 16 else "truncated int16"
    for left in range(_FIELD_SIZE)
)
_pack_head: Final = struct.Struct("!ci").pack  # type byte and length
_pack_head_16: Final = struct.Struct("!cih").pack  # type byte, length and an int16 count
_FORMAT_CODES: Final = frozenset((0, 1))
_CACHED: Final = 32  # Structs for arrays of up to this many elements are compiled once


# Big-endian signed integers at `pos` of a body whose length the caller has checked
# (byte reads, not struct calls: see framing.u32_at).
def _i16_at(body: bytes, pos: int) -> int:
    value = body[pos] << 8 | body[pos + 1]
    return value - 0x10000 if value & 0x8000 else value


def _i32_at(body: bytes, pos: int) -> int:
    value = u32_at(body, pos)
    return value - 0x100000000 if value & 0x80000000 else value


def _i16_array(n: int) -> struct.Struct:
    return struct.Struct(f"!{n}h")


def _u32_array(n: int) -> struct.Struct:
    return struct.Struct(f"!{n}I")


def _counted_i16_array(n: int) -> struct.Struct:
    return struct.Struct(f"!h{n}h")


def _counted_u32_array(n: int) -> struct.Struct:
    return struct.Struct(f"!h{n}I")


# Index by element count if below _CACHED, else call the function.
_I16_ARRAYS: Final = tuple(map(_i16_array, range(_CACHED)))
_U32_ARRAYS: Final = tuple(map(_u32_array, range(_CACHED)))
_COUNTED_I16_ARRAYS: Final = tuple(map(_counted_i16_array, range(_CACHED)))
_COUNTED_U32_ARRAYS: Final = tuple(map(_counted_u32_array, range(_CACHED)))


def _malformed(who: str, what: str) -> ProtocolViolation:
    return ProtocolViolation(who, f"malformed message: {what}")


def _two_cstrings(body: bytes) -> tuple[str, str, int]:
    """The two C strings a Parse or Bind body starts with, and where the second one's NUL is."""
    if len(body) > 1 and body[0] == 0 and body[1] == 0:
        return "", "", 1  # both unnamed (a Bind of the unnamed statement): nothing to decode
    end = body.find(b"\0")
    if end < 0:
        raise _malformed("client", "unterminated string")
    try:
        first = body[:end].decode()
        pos = end + 1
        end = body.find(b"\0", pos)
        if end < 0:
            raise _malformed("client", "unterminated string")
        return first, body[pos:end].decode(), end
    except UnicodeDecodeError:
        raise without_context(_malformed("client", "string is not UTF-8")) from None


def _values(
    body: bytes, pos: int, n: int, who: str
) -> tuple[tuple[bytes | None, ...], int]:
    """`n` length-prefixed values from `pos` (Bind parameters, DataRow columns; -1 is
    NULL), and where they end."""
    size = len(body)
    values: list[bytes | None] = []
    append = values.append
    for _ in range(n):
        if pos + 4 > size:
            raise _malformed(who, "truncated int32")
        length = _i32_at(body, pos)
        pos += 4
        if length >= 0:
            end = pos + length
            if end > size:
                raise _malformed(who, "truncated field")
            append(body[pos:end])
            pos = end
        elif length == -1:
            append(None)
        else:
            raise _malformed(who, "truncated field")
    return tuple(values), pos


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
            raise without_context(self.fail("string is not UTF-8")) from None

    def rest(self) -> bytes:
        v = self.data[self.pos :]
        self.pos = len(self.data)
        return v

    def done(self) -> None:
        if self.pos != len(self.data):
            raise self.fail("trailing bytes")


def _cstr(s: str) -> bytes:
    if not s:
        return b"\0"  # the unnamed statement and portal: most Binds name both
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

AUTH_OK: Final = 0
AUTH_CLEARTEXT: Final = 3
AUTH_MD5: Final = 5
AUTH_SASL: Final = 10
AUTH_SASL_CONTINUE: Final = 11
AUTH_SASL_FINAL: Final = 12


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

    def __init__(self, sql: str) -> None:
        # Written out: see proxy.session.datapath._Pending.__init__.
        object.__setattr__(self, "sql", sql)

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

    def __init__(self, name: str, sql: str, param_types: tuple[int, ...] = ()) -> None:
        # Written out: see proxy.session.datapath._Pending.__init__.
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "sql", sql)
        object.__setattr__(self, "param_types", param_types)

    def encode(self) -> bytes:
        name, sql = _cstr(self.name), _cstr(self.sql)
        types = self.param_types
        n = len(types)
        tail = (_COUNTED_U32_ARRAYS[n] if n < _CACHED else _counted_u32_array(n)).pack(n, *types)
        return b"".join((_pack_head(b"P", len(name) + len(sql) + len(tail) + 4), name, sql, tail))


def decode_parse(body: bytes) -> Parse:
    name, sql, end = _two_cstrings(body)
    size = len(body)
    pos = end + 3
    if pos > size:
        raise _malformed("client", "truncated int16")
    n = _i16_at(body, end + 1)
    if n < 0:
        raise _malformed("client", "negative parameter count")
    end = pos + 4 * n
    if end > size:
        raise _malformed("client", "truncated int32")
    if end != size:
        raise _malformed("client", "trailing bytes")
    types = (_U32_ARRAYS[n] if n < _CACHED else _u32_array(n)).unpack_from(body, pos)
    return Parse(name, sql, types)


@dataclass(frozen=True, slots=True)
class Bind:
    portal: str
    statement: str
    param_formats: tuple[int, ...]
    params: tuple[bytes | None, ...]
    result_formats: tuple[int, ...]

    def __init__(
        self,
        portal: str,
        statement: str,
        param_formats: tuple[int, ...],
        params: tuple[bytes | None, ...],
        result_formats: tuple[int, ...],
    ) -> None:
        # Written out: see proxy.session.datapath._Pending.__init__.
        object.__setattr__(self, "portal", portal)
        object.__setattr__(self, "statement", statement)
        object.__setattr__(self, "param_formats", param_formats)
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "result_formats", result_formats)

    def param_format(self, index: int) -> int:
        """The format code of parameter `index` (0-based) per the protocol's 0/1/n rule."""
        f = self.param_formats
        return 0 if not f else f[0] if len(f) == 1 else f[index]

    def result_format(self, index: int) -> int:
        f = self.result_formats
        return 0 if not f else f[0] if len(f) == 1 else f[index]

    def encode(self) -> bytes:
        return encode_bind(
            self.portal, self.statement, self.param_formats, self.params, self.result_formats
        )


def _put_values(parts: list[bytes], values: Sequence[bytes | None]) -> int:
    """Append length-prefixed values (-1 for NULL) to `parts`; return their encoded size."""
    append = parts.append
    length = 4 * len(values)
    for v in values:
        if v is None:
            append(_NULL_SIZE)
        else:
            size = len(v)
            length += size
            append(_pack_i32(size))
            append(v)
    return length


def encode_bind(
    portal_name: str,
    statement_name: str,
    formats: tuple[int, ...],
    params: tuple[bytes | None, ...],
    results: tuple[int, ...],
) -> bytes:
    """Bind.encode without building a Bind: the data path re-encodes every Bind it seals."""
    portal, statement = _cstr(portal_name), _cstr(statement_name)
    nf = len(formats)
    nr = len(results)
    n = len(params)
    parts = [
        b"",  # type byte and length, once the length is known
        portal,
        statement,
        # format count, format codes, parameter count
        (_COUNTED_I16_ARRAYS[nf + 1] if nf + 1 < _CACHED else _counted_i16_array(nf + 1)).pack(
            nf, *formats, n
        ),
    ]
    length = len(portal) + len(statement) + 2 * nf + 2 * nr + 10 + _put_values(parts, params)
    results_array = _COUNTED_I16_ARRAYS[nr] if nr < _CACHED else _counted_i16_array(nr)
    parts.append(results_array.pack(nr, *results))
    parts[0] = _pack_head(b"B", length)
    return b"".join(parts)


def bind_names(body: bytes) -> tuple[str, str] | None:
    """(portal, statement) of a Bind body without decoding the rest; None if malformed
    (decode_bind then says how)."""
    try:
        portal, statement, _ = _two_cstrings(body)
    except ProtocolViolation:
        return None
    return portal, statement


def decode_bind(body: bytes) -> Bind:
    portal, statement, end = _two_cstrings(body)
    size = len(body)
    pos = end + 3
    if pos > size:
        raise _malformed("client", "truncated int16")
    nf = _i16_at(body, end + 1)
    if nf < 0:
        raise _malformed("client", "negative format count")
    end = pos + 2 * nf + 2  # the format codes, then the parameter count
    if end > size:
        raise _malformed("client", "truncated int16")
    formats = (_I16_ARRAYS[nf] if nf < _CACHED else _i16_array(nf)).unpack_from(body, pos)
    n = _i16_at(body, end - 2)
    if n < 0:
        raise _malformed("client", "negative parameter count")
    if nf > 1 and nf != n:
        raise _malformed("client", "parameter format count does not match parameter count")
    params, pos = _values(body, end, n, "client")
    end = pos + 2
    if end > size:
        raise _malformed("client", "truncated int16")
    nr = _i16_at(body, pos)
    if nr < 0:
        raise _malformed("client", "negative result format count")
    pos = end
    end += 2 * nr
    if end > size:
        raise _malformed("client", "truncated int16")
    if end != size:
        raise _malformed("client", "trailing bytes")
    results = (_I16_ARRAYS[nr] if nr < _CACHED else _i16_array(nr)).unpack_from(body, pos)
    if not (_FORMAT_CODES.issuperset(formats) and _FORMAT_CODES.issuperset(results)):
        raise _malformed("client", "format code must be 0 or 1")
    return Bind(portal, statement, formats, params, results)


@dataclass(frozen=True, slots=True)
class Describe:
    kind: str  # 'S' statement or 'P' portal
    name: str

    def __init__(self, kind: str, name: str) -> None:
        # Written out: see proxy.session.datapath._Pending.__init__.
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "name", name)

    def encode(self) -> bytes:
        return frame(b"D", self.kind.encode() + _cstr(self.name))


@dataclass(frozen=True, slots=True)
class Close:
    kind: str
    name: str

    def __init__(self, kind: str, name: str) -> None:
        # Written out: see proxy.session.datapath._Pending.__init__.
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "name", name)

    def encode(self) -> bytes:
        return frame(b"C", self.kind.encode() + _cstr(self.name))


def _decode_kind_name(body: bytes, what: str) -> tuple[str, str]:
    if not body:
        raise _malformed("client", "truncated byte")
    kind = body[0]
    if kind == 0x50:
        kind_ = "P"
    elif kind == 0x53:
        kind_ = "S"
    else:
        raise _malformed("client", f"{what} kind must be S or P")
    end = body.find(b"\0", 1)
    if end < 0:
        raise _malformed("client", "unterminated string")
    try:
        name = body[1:end].decode()
    except UnicodeDecodeError:
        raise without_context(_malformed("client", "string is not UTF-8")) from None
    if end + 1 != len(body):
        raise _malformed("client", "trailing bytes")
    return kind_, name


def decode_describe(body: bytes) -> Describe:
    kind, name = _decode_kind_name(body, "Describe")
    return Describe(kind, name)


def decode_close(body: bytes) -> Close:
    return Close(*_decode_kind_name(body, "Close"))


@dataclass(frozen=True, slots=True)
class Execute:
    portal: str
    max_rows: int = 0

    def __init__(self, portal: str, max_rows: int = 0) -> None:
        # Written out: see proxy.session.datapath._Pending.__init__.
        object.__setattr__(self, "portal", portal)
        object.__setattr__(self, "max_rows", max_rows)

    def encode(self) -> bytes:
        return frame(b"E", _cstr(self.portal) + _I32.pack(self.max_rows))


def decode_execute(body: bytes) -> Execute:
    end = body.find(b"\0")
    if end < 0:
        raise _malformed("client", "unterminated string")
    try:
        portal = body[:end].decode()
    except UnicodeDecodeError:
        raise without_context(_malformed("client", "string is not UTF-8")) from None
    size = len(body)
    if end + 5 > size:
        raise _malformed("client", "truncated int32")
    if end + 5 != size:
        raise _malformed("client", "trailing bytes")
    return Execute(portal, _i32_at(body, end + 1))


SYNC: Final = frame(b"S", b"")
FLUSH: Final = frame(b"H", b"")
TERMINATE: Final = frame(b"X", b"")


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

    def __init__(
        self,
        name: str,
        table_oid: int,
        column_attnum: int,
        type_oid: int,
        type_size: int,
        type_modifier: int,
        format: int,
    ) -> None:
        # Written out: see proxy.session.datapath._Pending.__init__.
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "table_oid", table_oid)
        object.__setattr__(self, "column_attnum", column_attnum)
        object.__setattr__(self, "type_oid", type_oid)
        object.__setattr__(self, "type_size", type_size)
        object.__setattr__(self, "type_modifier", type_modifier)
        object.__setattr__(self, "format", format)


@dataclass(frozen=True, slots=True)
class RowDescription:
    fields: tuple[FieldDescription, ...]

    def __init__(self, fields: tuple[FieldDescription, ...]) -> None:
        # Written out: see proxy.session.datapath._Pending.__init__.
        object.__setattr__(self, "fields", fields)

    def encode(self) -> bytes:
        fields_ = self.fields
        if len(fields_) > 32767:
            _pack_i16(len(fields_))  # the struct.error it always raised, first
        parts = [b""]  # type byte, length and field count, once the length is known
        append = parts.append
        length = 6 + (_FIELD_SIZE + 1) * len(fields_)
        for f in fields_:
            name = f.name.encode()
            if b"\0" in name:
                raise ValueError("NUL byte in a protocol string")
            length += len(name)
            append(name)
            append(
                _pack_nul_field(
                    f.table_oid,
                    f.column_attnum,
                    f.type_oid,
                    f.type_size,
                    f.type_modifier,
                    f.format,
                )
            )
        parts[0] = _pack_head_16(b"T", length, len(fields_))
        return b"".join(parts)


def decode_row_description(body: bytes) -> RowDescription:
    size = len(body)
    if size < 2:
        raise _malformed("server", "truncated int16")
    n = _i16_at(body, 0)
    if n < 0:
        raise _malformed("server", "negative field count")
    pos = 2
    fields_: list[FieldDescription] = []
    append = fields_.append
    find = body.find
    for _ in range(n):
        end = find(b"\0", pos)
        if end < 0:
            raise _malformed("server", "unterminated string")
        try:
            name = body[pos:end].decode()
        except UnicodeDecodeError:
            raise without_context(_malformed("server", "string is not UTF-8")) from None
        pos = end + 1
        end = pos + _FIELD_SIZE
        if end > size:
            raise _malformed("server", _FIELD_TRUNCATION[size - pos])
        table_oid, attnum, type_oid, type_size, type_modifier, format_ = _unpack_field(body, pos)
        pos = end
        append(
            FieldDescription(
                name, table_oid, attnum, type_oid, type_size, type_modifier, format_
            )
        )
    if pos != size:
        raise _malformed("server", "trailing bytes")
    return RowDescription(tuple(fields_))


@dataclass(frozen=True, slots=True)
class DataRow:
    values: tuple[bytes | None, ...] = ()

    def __init__(self, values: tuple[bytes | None, ...] = ()) -> None:
        # Written out: see proxy.session.datapath._Pending.__init__.
        object.__setattr__(self, "values", values)

    def encode(self) -> bytes:
        return encode_data_row(self.values)


def encode_data_row(values: Sequence[bytes | None]) -> bytes:
    """DataRow.encode without building a DataRow: the data path re-encodes every row it opens."""
    if len(values) > 32767:
        _pack_i16(len(values))  # the struct.error it always raised, first
    parts = [b""]  # type byte, length and column count, once the length is known
    length = 6 + _put_values(parts, values)
    parts[0] = _pack_head_16(b"D", length, len(values))
    return b"".join(parts)


def decode_data_row(body: bytes) -> DataRow:
    return DataRow(data_row_values(body))


def data_row_values(body: bytes) -> tuple[bytes | None, ...]:
    """decode_data_row's values, without the DataRow: the data path reads every row it
    opens this way."""
    size = len(body)
    if size < 2:
        raise _malformed("server", "truncated int16")
    n = _i16_at(body, 0)
    if n < 0:
        raise _malformed("server", "negative column count")
    values, pos = _values(body, 2, n, "server")
    if pos != size:
        raise _malformed("server", "trailing bytes")
    return values


@dataclass(frozen=True, slots=True)
class ParameterDescription:
    type_oids: tuple[int, ...]

    def __init__(self, type_oids: tuple[int, ...]) -> None:
        # Written out: see proxy.session.datapath._Pending.__init__.
        object.__setattr__(self, "type_oids", type_oids)

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

    def __init__(self, tag: str) -> None:
        # Written out: see proxy.session.datapath._Pending.__init__.
        object.__setattr__(self, "tag", tag)

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


COPY_DONE: Final = frame(b"c", b"")


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

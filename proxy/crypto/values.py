"""Canonical value codecs: what goes inside a cell, for every declared type.

A client may send the same value as text or binary (Bind format codes 0/1),
and as text in several spellings ('1.0e2' and '100.0' for numeric, 'TRUE'
and 't' for bool). The proxy seals a *canonical* encoding of the value, so
the same value gives the same plaintext (and, under the deterministic suite,
the same cell) whichever way it came. On the way out the canonical form is
turned back into exactly the bytes PostgreSQL itself would have sent for a
column of the declared type, in the format the client asked for.

Contract:
  to_canonical(type, data, fmt, session)  -> canonical bytes
  from_canonical(type, canonical, fmt, session) -> DataRow field bytes
  from_canonical(t, to_canonical(t, x, f, s), f, s) is PostgreSQL's own
  output for x; text and binary input of one value give one canonical form.
NULL never reaches a codec: callers pass a -1 length through unchanged.

Canonical encoding: one codec byte, then the value (PostgreSQL's binary
representation where that is exact and unique):
  0x01 text, varchar  the UTF-8 text
  0x02 int2/4/8       int64 big-endian (so a policy may widen int2 -> int8)
  0x03 float4         IEEE-754 single bits, as sent (-0 and NaN payloads kept)
  0x04 float8         IEEE-754 double bits, as sent
  0x05 numeric        PostgreSQL's normalized binary numeric (display scale kept)
  0x06 bool           one byte, 0 or 1
  0x07 date           int32 days since 2000-01-01 (+-infinity = INT32_MAX/MIN)
  0x08 time           int64 microseconds since midnight
  0x09 timestamp      int64 microseconds since 2000-01-01 (wall clock)
  0x0A timestamptz    int64 microseconds since 2000-01-01 UTC
  0x0B uuid           16 bytes
  0x0C json           the JSON text exactly as sent
  0x0D jsonb          PostgreSQL's printed form of the jsonb value
  0x0E bytea          the raw bytes
The codec byte also makes every canonical form non-empty, and lets a value
sealed under one declared type be recognised (and refused) under another.

Equality caveat: canonical forms are exact, so values PostgreSQL calls equal
but prints differently (numeric 1.5 vs 1.50, float 0 vs -0, jsonb 1.0 vs 1)
are different plaintexts: deterministic search matches the printed value.

Refusals (ValueFormatError, message safe to show; never the value itself):
input PostgreSQL would reject (same conditions: range, syntax, UTF-8, NUL);
input PostgreSQL accepts but this module cannot reproduce exactly (date
words like 'today', non-ISO dates, zone abbreviations, hex/underscore
integers of PostgreSQL 16, 'nan(...)' floats); sessions whose output it
cannot reproduce (client_encoding other than UTF8, DateStyle other than ISO
for date/timestamp output, TimeZone values zoneinfo cannot load).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from proxy.crypto import _json, _numbers, _temporal
from proxy.crypto._errors import (
    CHARACTER_NOT_IN_REPERTOIRE,
    DATA_CORRUPTED,
    FEATURE_NOT_SUPPORTED,
    INVALID_BINARY_REPRESENTATION,
    ValueFormatError,
    bad_binary,
    bad_syntax,
    out_of_range,
)
from proxy.errors import without_context

__all__ = [
    "SUPPORTED_TYPES",
    "TYPE_INFO",
    "TYPE_LENGTHS",
    "TYPE_OIDS",
    "SessionFormat",
    "TypeInfo",
    "ValueFormatError",
    "from_canonical",
    "to_canonical",
]

FORMAT_TEXT: Final = 0
FORMAT_BINARY: Final = 1


@dataclass(frozen=True, slots=True)
class SessionFormat:
    """The session settings that decide how values are read and printed.

    Fill it from ParameterStatus (TimeZone, DateStyle, IntervalStyle,
    client_encoding) and from what the client set itself: bytea_output and
    extra_float_digits are not reported by ParameterStatus, so the caller
    tracks them from the startup packet and SET statements.
    intervalstyle is carried but unused (no interval type is sealed).
    Unsupported values are refused when a value is converted, not here, so
    sessions that never touch an encrypted column are unaffected.
    """

    timezone: str = "UTC"
    datestyle: str = "ISO, MDY"
    intervalstyle: str = "postgres"
    client_encoding: str = "UTF8"
    bytea_output: str = "hex"
    extra_float_digits: int = 1
    # What these mean for the conversions, worked out once per SessionFormat instead of
    # once per value (not a field of equality or hashing: it follows from the others).
    settings: _Settings = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings", _settings(self))


@dataclass(frozen=True, slots=True)
class TypeInfo:
    """The pg_type facts RowDescription and ParameterDescription need."""

    name: str
    oid: int
    typlen: int  # pg_type.typlen: -1 for variable length
    array_oid: int
    typmod: int = -1  # no length/precision modifiers are declared by policies


TYPE_INFO: Final[dict[str, TypeInfo]] = {
    t.name: t
    for t in (
        TypeInfo("text", 25, -1, 1009),
        TypeInfo("varchar", 1043, -1, 1015),
        TypeInfo("int2", 21, 2, 1005),
        TypeInfo("int4", 23, 4, 1007),
        TypeInfo("int8", 20, 8, 1016),
        TypeInfo("float4", 700, 4, 1021),
        TypeInfo("float8", 701, 8, 1022),
        TypeInfo("numeric", 1700, -1, 1231),
        TypeInfo("bool", 16, 1, 1000),
        TypeInfo("date", 1082, 4, 1182),
        TypeInfo("time", 1083, 8, 1183),
        TypeInfo("timestamp", 1114, 8, 1115),
        TypeInfo("timestamptz", 1184, 8, 1185),
        TypeInfo("uuid", 2950, 16, 2951),
        TypeInfo("json", 114, -1, 199),
        TypeInfo("jsonb", 3802, -1, 3807),
        TypeInfo("bytea", 17, -1, 1001),
    )
}
TYPE_OIDS: Final[dict[str, int]] = {name: t.oid for name, t in TYPE_INFO.items()}
TYPE_LENGTHS: Final[dict[str, int]] = {name: t.typlen for name, t in TYPE_INFO.items()}
SUPPORTED_TYPES: Final[frozenset[str]] = frozenset(TYPE_INFO)


# -- session settings, resolved once per SessionFormat (its `settings`) ---------------


@dataclass(frozen=True, slots=True)
class _Settings:
    utf8: bool
    iso_dates: bool
    bytea_hex: bool | None  # None: a bytea_output we do not reproduce
    extra_float_digits: int
    timezone: str

    def zone(self) -> _temporal.Zone:
        return _temporal.session_zone(self.timezone)


def _settings(session: SessionFormat) -> _Settings:
    encoding = session.client_encoding.upper().replace("-", "").replace("_", "")
    style = session.datestyle.split(",")[0].strip().upper()
    bytea = session.bytea_output.strip().lower()
    return _Settings(
        utf8=encoding in ("UTF8", "UNICODE"),
        iso_dates=style == "ISO",
        bytea_hex=True if bytea == "hex" else False if bytea == "escape" else None,
        extra_float_digits=session.extra_float_digits,
        timezone=session.timezone,
    )


# -- shared helpers ------------------------------------------------------------------

_PG_SPACE: Final = _numbers.PG_SPACE
_I32: Final = struct.Struct(">i")
_I64: Final = struct.Struct(">q")


def _bad_utf8() -> ValueFormatError:
    return ValueFormatError(
        'invalid byte sequence for encoding "UTF8"', CHARACTER_NOT_IN_REPERTOIRE
    )


def _nul_in_text() -> ValueFormatError:
    return ValueFormatError(
        'invalid byte sequence for encoding "UTF8": 0x00', CHARACTER_NOT_IN_REPERTOIRE
    )


def _decode(data: bytes) -> str:
    """Text as PostgreSQL receives it from a UTF8 client: valid UTF-8, no NUL."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise without_context(_bad_utf8()) from None
    if "\x00" in text:
        raise _nul_in_text()
    return text


def _check_text(data: bytes) -> None:
    """_decode's checks (same errors, same order) for a caller that needs no str.

    ASCII, the usual case, is valid UTF-8 as it is: only a NUL byte is left to
    look for (`0 in data` is a memchr; `b"\x00" in data` is several times slower).
    UTF-8 encodes U+0000 only as the byte 0, so both checks find the same NULs.
    """
    if not data.isascii():
        _decode(data)
    elif 0 in data:
        raise _nul_in_text()


def _corrupt(type_name: str) -> ValueFormatError:
    return ValueFormatError(
        f"stored value is not a valid {type_name} (was the column's declared type changed?)",
        DATA_CORRUPTED,
    )


def _need_iso(settings: _Settings) -> None:
    if not settings.iso_dates:
        raise ValueFormatError(
            "encrypted date/time columns need DateStyle ISO", FEATURE_NOT_SUPPORTED
        )


# -- per-type codecs ---------------------------------------------------------------

# Each codec turns input into a payload (the canonical form minus the codec
# byte) and a payload into output; `size` is the fixed payload length, or -1.
TextIn = Callable[[str, _Settings], bytes]
BinaryIn = Callable[[bytes], bytes]
TextOut = Callable[[bytes, _Settings], bytes]
BinaryOut = Callable[[bytes], bytes]


@dataclass(frozen=True, slots=True)
class _Codec:
    tag: int
    size: int
    # None: the payload is the text input's bytes as sent, once _check_text passes
    # (text, varchar), so to_canonical neither decodes nor re-encodes them.
    text_in: TextIn | None
    binary_in: BinaryIn
    text_out: TextOut
    binary_out: BinaryOut
    # bytes((tag,)), built once: it starts every canonical form.
    prefix: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", bytes((self.tag,)))


def _same(payload: bytes) -> bytes:
    return payload


# text, varchar: the UTF-8 bytes themselves (text input: see _Codec.text_in).


def _text_binary_in(data: bytes) -> bytes:
    _check_text(data)
    return data


def _text_text_out(payload: bytes, _s: _Settings) -> bytes:
    return payload


# integers: int64 whatever the declared width.


def _int_codec(type_name: str, width: int) -> _Codec:
    lo, hi = _numbers.INT_BOUNDS[type_name]

    def text_in(text: str, _s: _Settings) -> bytes:
        return _I64.pack(_numbers.parse_int(text, type_name))

    def binary_in(data: bytes) -> bytes:
        if len(data) != width:
            raise bad_binary(type_name)
        return _I64.pack(int.from_bytes(data, "big", signed=True))

    def value(payload: bytes) -> int:
        v: int = _I64.unpack(payload)[0]
        if not lo <= v <= hi:
            raise out_of_range(type_name)
        return v

    def text_out(payload: bytes, _s: _Settings) -> bytes:
        return str(value(payload)).encode()

    def binary_out(payload: bytes) -> bytes:
        return value(payload).to_bytes(width, "big", signed=True)

    return _Codec(0x02, 8, text_in, binary_in, text_out, binary_out)


# floats: the IEEE bits.


def _float_codec(tag: int, width: int) -> _Codec:
    fmt = struct.Struct(">I" if width == 4 else ">Q")
    name = "real" if width == 4 else "double precision"
    parse = _numbers.parse_float4 if width == 4 else _numbers.parse_float8
    show = _numbers.float4_text if width == 4 else _numbers.float8_text

    def text_in(text: str, _s: _Settings) -> bytes:
        return fmt.pack(parse(text))

    def binary_in(data: bytes) -> bytes:
        if len(data) != width:
            raise bad_binary(name)
        return data

    def text_out(payload: bytes, s: _Settings) -> bytes:
        return show(fmt.unpack(payload)[0], s.extra_float_digits).encode()

    return _Codec(tag, width, text_in, binary_in, text_out, _same)


# numeric: normalized binary numeric.


def _numeric_text_in(text: str, _s: _Settings) -> bytes:
    return _numbers.numeric_from_text(text)


def _numeric_text_out(payload: bytes, _s: _Settings) -> bytes:
    return _numbers.numeric_text(payload).encode()


def _numeric_binary_out(payload: bytes) -> bytes:
    _numbers.numeric_check(payload)
    return payload


# bool


def _bool_text_in(text: str, _s: _Settings) -> bytes:
    """boolin / parse_bool_with_len: trimmed, any case, unique prefixes of the words."""
    word = text.strip(_PG_SPACE).lower()
    n = len(word)
    if n:
        first = word[0]
        if first == "t" and "true".startswith(word):
            return b"\x01"
        if first == "f" and "false".startswith(word):
            return b"\x00"
        if first == "y" and "yes".startswith(word):
            return b"\x01"
        if first == "n" and "no".startswith(word):
            return b"\x00"
        # 'o' alone is ambiguous: at least 'on' or 'of'.
        if first == "o" and n >= 2 and "on".startswith(word):
            return b"\x01"
        if first == "o" and n >= 2 and "off".startswith(word):
            return b"\x00"
        if word == "1":
            return b"\x01"
        if word == "0":
            return b"\x00"
    raise bad_syntax("boolean")


def _bool_binary_in(data: bytes) -> bytes:
    if len(data) != 1:
        raise bad_binary("boolean")
    # boolrecv: any non-zero byte is true.
    return b"\x01" if data[0] else b"\x00"


def _bool_text_out(payload: bytes, _s: _Settings) -> bytes:
    return b"t" if payload == b"\x01" else b"f"


def _bool_binary_out(payload: bytes) -> bytes:
    if payload not in (b"\x00", b"\x01"):
        raise _corrupt("boolean")
    return payload


# date / time / timestamp / timestamptz


def _date_text_in(text: str, _s: _Settings) -> bytes:
    return _I32.pack(_temporal.date_from_text(text))


def _date_binary_in(data: bytes) -> bytes:
    return _I32.pack(_temporal.date_from_binary(data))


def _date_text_out(payload: bytes, s: _Settings) -> bytes:
    _need_iso(s)
    return _temporal.date_text(_I32.unpack(payload)[0]).encode()


def _time_text_in(text: str, _s: _Settings) -> bytes:
    return _I64.pack(_temporal.time_from_text(text))


def _time_binary_in(data: bytes) -> bytes:
    return _I64.pack(_temporal.time_from_binary(data))


def _time_text_out(payload: bytes, _s: _Settings) -> bytes:
    return _temporal.time_text(_I64.unpack(payload)[0]).encode()


def _timestamp_text_in(text: str, _s: _Settings) -> bytes:
    return _I64.pack(_temporal.timestamp_from_text(text))


def _timestamp_binary_in(data: bytes) -> bytes:
    return _I64.pack(_temporal.timestamp_from_binary(data, "timestamp"))


def _timestamp_text_out(payload: bytes, s: _Settings) -> bytes:
    _need_iso(s)
    return _temporal.timestamp_text(_I64.unpack(payload)[0]).encode()


def _timestamptz_text_in(text: str, s: _Settings) -> bytes:
    return _I64.pack(_temporal.timestamptz_from_text(text, s.zone))


def _timestamptz_binary_in(data: bytes) -> bytes:
    return _I64.pack(_temporal.timestamp_from_binary(data, "timestamp with time zone"))


def _timestamptz_text_out(payload: bytes, s: _Settings) -> bytes:
    _need_iso(s)
    return _temporal.timestamptz_text(_I64.unpack(payload)[0], s.zone()).encode()


def _checked_binary_out(check: Callable[[bytes], object]) -> BinaryOut:
    def binary_out(payload: bytes) -> bytes:
        check(payload)
        return payload

    return binary_out


# uuid


_HEX_DIGITS: Final = frozenset("0123456789abcdefABCDEF")


_UUID_USUAL_RE: Final = re.compile(
    "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)


def _uuid_text_in(text: str, _s: _Settings) -> bytes:
    """string_to_uuid: optional braces, a hyphen allowed after any group of 4 digits."""
    if _UUID_USUAL_RE.fullmatch(text):
        return bytes.fromhex(text.replace("-", ""))  # the common spelling, fast
    src = text
    braces = src.startswith("{")
    if braces:
        src = src[1:]
    out = bytearray()
    i = 0
    for n in range(16):
        pair = src[i : i + 2]
        if len(pair) != 2 or pair[0] not in _HEX_DIGITS or pair[1] not in _HEX_DIGITS:
            raise bad_syntax("uuid")
        out.append(int(pair, 16))
        i += 2
        if n % 2 == 1 and n < 15 and src[i : i + 1] == "-":
            i += 1
    if braces:
        if src[i : i + 1] != "}":
            raise bad_syntax("uuid")
        i += 1
    if i != len(src):
        raise bad_syntax("uuid")
    return bytes(out)


def _uuid_binary_in(data: bytes) -> bytes:
    if len(data) != 16:
        raise bad_binary("uuid")
    return data


def _uuid_text_out(payload: bytes, _s: _Settings) -> bytes:
    h = payload.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}".encode()


# json / jsonb


def _json_text_in(text: str, _s: _Settings) -> bytes:
    _json.json_validate(text)
    return text.encode("utf-8")


def _json_binary_in(data: bytes) -> bytes:
    _json.json_validate(_decode(data))
    return data


def _jsonb_text_in(text: str, _s: _Settings) -> bytes:
    return _json.jsonb_normalize(text).encode("utf-8")


def _jsonb_binary_in(data: bytes) -> bytes:
    # jsonb_recv: a version byte (only 1 exists), then the text.
    if not data or data[0] != 1:
        raise ValueFormatError("unsupported jsonb version number", INVALID_BINARY_REPRESENTATION)
    return _json.jsonb_normalize(_decode(data[1:])).encode("utf-8")


def _jsonb_binary_out(payload: bytes) -> bytes:
    return b"\x01" + payload


# bytea

_BYTEA_HEX_SPACE: Final = frozenset(" \n\t\r")
_OCTAL_ESCAPE_RE: Final = re.compile(r"\\([0-3][0-7][0-7])|\\\\|\\")


def _bytea_text_in(text: str, _s: _Settings) -> bytes:
    """byteain: '\\x' + hex pairs (whitespace between pairs), or escape format."""
    if text.startswith("\\x"):
        out = bytearray()
        i, n = 2, len(text)
        while i < n:
            c = text[i]
            if c in _BYTEA_HEX_SPACE:
                i += 1
                continue
            if c not in _HEX_DIGITS:
                raise ValueFormatError("invalid hexadecimal digit")
            if i + 1 >= n:
                raise ValueFormatError("invalid hexadecimal data: odd number of digits")
            if text[i + 1] not in _HEX_DIGITS:
                raise ValueFormatError("invalid hexadecimal digit")
            out.append(int(text[i : i + 2], 16))
            i += 2
        return bytes(out)
    raw = text.encode("utf-8")
    if b"\\" not in raw:
        return raw

    def unescape(m: re.Match[str]) -> str:
        if m.group(1) is not None:
            return chr(int(m.group(1), 8))
        if m.group(0) == "\\\\":
            return "\\"
        raise bad_syntax("bytea")

    # Work on latin-1 so each input byte is one character and back.
    return _OCTAL_ESCAPE_RE.sub(unescape, raw.decode("latin-1")).encode("latin-1")


def _bytea_text_out(payload: bytes, s: _Settings) -> bytes:
    if s.bytea_hex is None:
        raise ValueFormatError(
            "encrypted bytea columns need bytea_output hex or escape", FEATURE_NOT_SUPPORTED
        )
    if s.bytea_hex:
        return b"\\x" + payload.hex().encode()
    out = bytearray()
    for b in payload:
        if b == 0x5C:
            out += b"\\\\"
        elif b < 0x20 or b > 0x7E:
            out += b"\\%03o" % b
        else:
            out.append(b)
    return bytes(out)


_CODECS: Final[dict[str, _Codec]] = {
    "text": _Codec(0x01, -1, None, _text_binary_in, _text_text_out, _same),
    "varchar": _Codec(0x01, -1, None, _text_binary_in, _text_text_out, _same),
    "int2": _int_codec("int2", 2),
    "int4": _int_codec("int4", 4),
    "int8": _int_codec("int8", 8),
    "float4": _float_codec(0x03, 4),
    "float8": _float_codec(0x04, 8),
    "numeric": _Codec(
        0x05,
        -1,
        _numeric_text_in,
        _numbers.numeric_from_binary,
        _numeric_text_out,
        _numeric_binary_out,
    ),
    "bool": _Codec(0x06, 1, _bool_text_in, _bool_binary_in, _bool_text_out, _bool_binary_out),
    "date": _Codec(
        0x07,
        4,
        _date_text_in,
        _date_binary_in,
        _date_text_out,
        _checked_binary_out(_temporal.date_from_binary),
    ),
    "time": _Codec(
        0x08,
        8,
        _time_text_in,
        _time_binary_in,
        _time_text_out,
        _checked_binary_out(_temporal.time_from_binary),
    ),
    "timestamp": _Codec(
        0x09,
        8,
        _timestamp_text_in,
        _timestamp_binary_in,
        _timestamp_text_out,
        _checked_binary_out(_timestamp_binary_in),
    ),
    "timestamptz": _Codec(
        0x0A,
        8,
        _timestamptz_text_in,
        _timestamptz_binary_in,
        _timestamptz_text_out,
        _checked_binary_out(_timestamptz_binary_in),
    ),
    "uuid": _Codec(0x0B, 16, _uuid_text_in, _uuid_binary_in, _uuid_text_out, _same),
    "json": _Codec(0x0C, -1, _json_text_in, _json_binary_in, _text_text_out, _same),
    "jsonb": _Codec(0x0D, -1, _jsonb_text_in, _jsonb_binary_in, _text_text_out, _jsonb_binary_out),
    "bytea": _Codec(0x0E, -1, _bytea_text_in, _same, _bytea_text_out, _same),
}
assert set(_CODECS) == set(TYPE_INFO)


def _codec_for(type_name: str, session: SessionFormat) -> tuple[_Codec, _Settings]:
    """The type's codec and the session's settings, or the error for either, in this
    order: unknown type, then client_encoding (the value's own errors come after)."""
    codec = _CODECS.get(type_name)
    if codec is None:
        raise ValueFormatError("type is not supported for encrypted columns", FEATURE_NOT_SUPPORTED)
    settings = session.settings
    if not settings.utf8:
        raise ValueFormatError(
            "encrypted columns need client_encoding UTF8", FEATURE_NOT_SUPPORTED
        )
    return codec, settings


def _unsupported_format() -> ValueFormatError:
    return ValueFormatError("unsupported format code", INVALID_BINARY_REPRESENTATION)


def to_canonical(
    type_name: str, data: bytes | bytearray | memoryview, fmt_code: int, session: SessionFormat
) -> bytes:
    """Canonical plaintext of a parameter value as a client sent it in Bind.

    `data` is the parameter's bytes (never NULL), `fmt_code` 0 (text) or 1
    (binary). Raises ValueFormatError where PostgreSQL would reject the value
    (or where the proxy refuses rather than guess; see the module docstring).
    """
    codec, settings = _codec_for(type_name, session)
    if type(data) is not bytes:
        # The codecs take bytes (and the compiled build checks that they get them).
        data = bytes(data)
    if fmt_code == FORMAT_TEXT:
        text_in = codec.text_in
        if text_in is None:
            _check_text(data)
            return codec.prefix + data
        return codec.prefix + text_in(_decode(data), settings)
    if fmt_code == FORMAT_BINARY:
        return codec.prefix + codec.binary_in(data)
    raise _unsupported_format()


def from_canonical(
    type_name: str, canonical: bytes | bytearray | memoryview, fmt_code: int, session: SessionFormat
) -> bytes:
    """The DataRow field PostgreSQL would send for this value, in `fmt_code`.

    Raises ValueFormatError if the session asks for an output this module
    cannot reproduce exactly, or if `canonical` was not produced by
    `to_canonical` for a compatible type.
    """
    codec, settings = _codec_for(type_name, session)
    if not canonical or canonical[0] != codec.tag:
        raise _corrupt(type_name)
    payload = canonical[1:]
    if type(payload) is not bytes:
        # A bytearray or memoryview: codecs get bytes. (bytes() of bytes would
        # only return the same object, at the cost of a call.)
        payload = bytes(payload)
    if codec.size >= 0 and len(payload) != codec.size:
        raise _corrupt(type_name)
    try:
        if fmt_code == FORMAT_TEXT:
            return codec.text_out(payload, settings)
        if fmt_code == FORMAT_BINARY:
            return codec.binary_out(payload)
    except (struct.error, IndexError, UnicodeDecodeError):
        raise without_context(_corrupt(type_name)) from None
    raise _unsupported_format()

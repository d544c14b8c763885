"""The fast paths of the value codecs against a frozen copy of the plain algorithms.

`to_canonical` / `from_canonical` for text and numeric, and the numeric codec in
`proxy.crypto._numbers`, carry hand-tuned fast paths (they run for every protected
parameter and column). The ORACLE below is a compact copy of the straightforward
implementation they replaced, kept here on purpose: every generated input must give
the same bytes, or the same error (class, message and SQLSTATE), from both.

For the other types the oracle's dispatcher calls the module's own per-type payload
functions (`values._CODECS[...]`), which the fast paths leave untouched; what is
compared there is the dispatch itself: which check fails first, and the codec byte.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from typing import Final

from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.crypto import _numbers, values
from proxy.crypto._errors import (
    CHARACTER_NOT_IN_REPERTOIRE,
    DATA_CORRUPTED,
    FEATURE_NOT_SUPPORTED,
    INVALID_BINARY_REPRESENTATION,
    NUMERIC_VALUE_OUT_OF_RANGE,
    ValueFormatError,
    bad_binary,
    bad_syntax,
)
from proxy.crypto.values import SessionFormat, from_canonical, to_canonical

# == ORACLE: the original algorithms, frozen (do not optimise) ==========================

_HEAD: Final = struct.Struct(">HhHH")
_SIGNS: Final = frozenset({0x0000, 0x4000, 0xC000, 0xD000, 0xF000})
_SPECIAL_TEXT: Final = {0xC000: "NaN", 0xD000: "Infinity", 0xF000: "-Infinity"}
_NUMERIC_RE: Final = re.compile(
    r"[ \t\n\r\v\f]*([+-]?)(?:([0-9]+)(?:\.([0-9]*))?|\.([0-9]+))(?:[eE]([+-]?[0-9]+))?"
    r"[ \t\n\r\v\f]*"
)
_SPECIALS: Final = {
    "nan": 0xC000, "infinity": 0xD000, "+infinity": 0xD000, "-infinity": 0xF000,
    "inf": 0xD000, "+inf": 0xD000, "-inf": 0xF000,
}


def _ref_overflow() -> ValueFormatError:
    return ValueFormatError("value overflows numeric format", NUMERIC_VALUE_OUT_OF_RANGE)


def _ref_bad_field(field: str) -> ValueFormatError:
    return ValueFormatError(
        f'invalid {field} in external "numeric" value', INVALID_BINARY_REPRESENTATION
    )


def _ref_special(sign: int) -> bytes:
    return _HEAD.pack(0, 0, sign, (sign & 0x1F80) >> 7)


def ref_numeric_pack(negative: bool, digits: str, dexp: int, dscale: int) -> bytes:
    if dscale > 0x3FFF:
        raise _ref_overflow()
    stripped = digits.lstrip("0")
    if not stripped:
        return _HEAD.pack(0, 0, 0x0000, dscale)
    significant = stripped.rstrip("0")
    dexp += len(stripped) - len(significant)
    shift = dexp % 4
    significant += "0" * shift
    dexp -= shift
    significant = "0" * (-len(significant) % 4) + significant
    ndigits = len(significant) // 4
    weight = dexp // 4 + ndigits - 1
    if weight > 0x7FFF or weight < -0x8000:
        raise _ref_overflow()
    groups = [int(significant[i : i + 4]) for i in range(0, len(significant), 4)]
    sign = 0x4000 if negative else 0x0000
    return _HEAD.pack(ndigits, weight, sign, dscale) + struct.pack(f">{ndigits}H", *groups)


def ref_numeric_from_text(text: str) -> bytes:
    m = _NUMERIC_RE.fullmatch(text)
    if m is None:
        special = _SPECIALS.get(text.strip(" \t\n\r\v\f").lower())
        if special is None:
            raise bad_syntax("numeric")
        return _ref_special(special)
    sign, whole, frac, only_frac, exponent = m.groups()
    if only_frac is not None:
        whole, frac = "", only_frac
    frac = frac or ""
    exp = 0
    if exponent is not None:
        body = exponent.lstrip("+-").lstrip("0")
        if len(body) > 10:
            raise _ref_overflow()
        exp = int(exponent)
        if abs(exp) >= 2**31 // 2 - 1:
            raise _ref_overflow()
    dscale = max(0, len(frac) - exp)
    return ref_numeric_pack(sign == "-", whole + frac, exp - len(frac), dscale)


def ref_numeric_from_binary(data: bytes) -> bytes:
    if len(data) < _HEAD.size:
        raise bad_binary("numeric")
    ndigits, weight, sign, dscale = _HEAD.unpack_from(data)
    if len(data) != _HEAD.size + 2 * ndigits:
        raise bad_binary("numeric")
    if sign not in _SIGNS:
        raise _ref_bad_field("sign")
    if dscale > 0x3FFF:
        raise _ref_bad_field("scale")
    groups = struct.unpack_from(f">{ndigits}h", data, _HEAD.size)
    if any(not 0 <= g < 10000 for g in groups):
        raise _ref_bad_field("digit")
    if sign not in (0x0000, 0x4000):
        return _ref_special(sign)
    digits = "".join(f"{g:04d}" for g in groups)
    dexp = 4 * (weight - ndigits + 1)
    if dexp < -dscale:
        drop = -dscale - dexp
        digits = digits[:-drop] if drop < len(digits) else ""
        dexp = -dscale
    return ref_numeric_pack(sign == 0x4000, digits, dexp, dscale)


def ref_numeric_check(data: bytes) -> None:
    ndigits, _weight, sign, _dscale = _HEAD.unpack_from(data)
    if len(data) != _HEAD.size + 2 * ndigits or sign not in _SIGNS:
        raise ValueFormatError("stored numeric value is malformed", DATA_CORRUPTED)


def ref_numeric_text(data: bytes) -> str:
    ndigits, weight, sign, dscale = _HEAD.unpack_from(data)
    if sign in _SPECIAL_TEXT:
        return _SPECIAL_TEXT[sign]
    groups = struct.unpack_from(f">{ndigits}H", data, _HEAD.size)
    all_digits = "".join(f"{g:04d}" for g in groups)
    int_groups = weight + 1
    if int_groups <= 0:
        int_part = "0"
        frac_digits = "0000" * (-int_groups) + all_digits
    else:
        padded = all_digits + "0000" * max(0, int_groups - ndigits)
        int_part = padded[: 4 * int_groups].lstrip("0") or "0"
        frac_digits = padded[4 * int_groups :]
    text = int_part
    if dscale > 0:
        text += "." + frac_digits[:dscale].ljust(dscale, "0")
    return ("-" + text) if sign == 0x4000 else text


def _ref_decode(data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueFormatError(
            'invalid byte sequence for encoding "UTF8"', CHARACTER_NOT_IN_REPERTOIRE
        ) from None
    if "\x00" in text:
        raise ValueFormatError(
            'invalid byte sequence for encoding "UTF8": 0x00', CHARACTER_NOT_IN_REPERTOIRE
        )
    return text


def _ref_corrupt(type_name: str) -> ValueFormatError:
    return ValueFormatError(
        f"stored value is not a valid {type_name} (was the column's declared type changed?)",
        DATA_CORRUPTED,
    )


def _ref_numeric_binary_out(payload: bytes) -> bytes:
    ref_numeric_check(payload)
    return payload


def _ref_text_binary_in(data: bytes) -> bytes:
    _ref_decode(data)
    return data


# (tag, size, text_in, binary_in, text_out, binary_out) as the original codecs had them.
_RefCodec = tuple[
    int, int, Callable[..., bytes], Callable[..., bytes], Callable[..., bytes], Callable[..., bytes]
]
_REF_TEXT: Final[_RefCodec] = (
    0x01, -1, lambda t, _s: t.encode("utf-8"), _ref_text_binary_in, lambda p, _s: p, lambda p: p
)
_REF_CODECS: Final[dict[str, _RefCodec]] = {
    "text": _REF_TEXT,
    "varchar": _REF_TEXT,
    "numeric": (
        0x05,
        -1,
        lambda t, _s: ref_numeric_from_text(t),
        ref_numeric_from_binary,
        lambda p, _s: ref_numeric_text(p).encode(),
        _ref_numeric_binary_out,
    ),
}


def _ref_codec(type_name: str) -> _RefCodec:
    if type_name in _REF_CODECS:
        return _REF_CODECS[type_name]
    codec = values._CODECS.get(type_name)
    if codec is None:
        raise ValueFormatError("type is not supported for encrypted columns", FEATURE_NOT_SUPPORTED)
    # Types without a fast path: their payload functions are the oracle's too.
    assert codec.text_in is not None  # only text and varchar have none, handled above
    return (codec.tag, codec.size, codec.text_in, codec.binary_in, codec.text_out,
            codec.binary_out)


def _ref_check_encoding(session: SessionFormat) -> None:
    if not session.settings.utf8:
        raise ValueFormatError("encrypted columns need client_encoding UTF8", FEATURE_NOT_SUPPORTED)


def ref_to_canonical(type_name: str, data: bytes, fmt_code: int, session: SessionFormat) -> bytes:
    tag, _size, text_in, binary_in, _text_out, _binary_out = _ref_codec(type_name)
    _ref_check_encoding(session)
    if fmt_code == 0:
        payload = text_in(_ref_decode(data), session.settings)
    elif fmt_code == 1:
        payload = binary_in(bytes(data))
    else:
        raise ValueFormatError("unsupported format code", INVALID_BINARY_REPRESENTATION)
    return bytes((tag,)) + payload


def ref_from_canonical(
    type_name: str, canonical: bytes, fmt_code: int, session: SessionFormat
) -> bytes:
    tag, size, _text_in, _binary_in, text_out, binary_out = _ref_codec(type_name)
    _ref_check_encoding(session)
    if not canonical or canonical[0] != tag:
        raise _ref_corrupt(type_name)
    payload = bytes(canonical[1:])
    if size >= 0 and len(payload) != size:
        raise _ref_corrupt(type_name)
    try:
        if fmt_code == 0:
            return text_out(payload, session.settings)
        if fmt_code == 1:
            return binary_out(payload)
    except (struct.error, IndexError, UnicodeDecodeError):
        raise _ref_corrupt(type_name) from None
    raise ValueFormatError("unsupported format code", INVALID_BINARY_REPRESENTATION)


# == comparison ==========================================================================


def outcome(fn: Callable[..., object], *args: object) -> tuple[str, object]:
    """What a call gave: ('ok', result) or ('error', class, message, SQLSTATE)."""
    try:
        result = fn(*args)
    except Exception as e:  # any exception is an outcome to compare
        return "error", (type(e), str(e), getattr(e, "sqlstate", None))
    return "ok", (type(result), result)


def assert_same(new: Callable[..., object], ref: Callable[..., object], *args: object) -> None:
    assert outcome(new, *args) == outcome(ref, *args), args


# == generated inputs ====================================================================

PG_SPACE = st.sampled_from(" \t\n\r\v\f")
# Spaces PostgreSQL does not skip (and digits it does not read).
NOT_PG_SPACE = st.sampled_from(["\u00a0", "\u2003", "\x1c", "\x00", "\u0663", "\uff11", "_"])


@st.composite
def numeric_literals(draw: st.DrawFn) -> str:
    """Mostly well-formed numeric_in input: every part optional, some parts odd."""
    lead = draw(st.text(PG_SPACE, max_size=2))
    trail = draw(st.text(PG_SPACE, max_size=2))
    sign = draw(st.sampled_from(["", "", "-", "+", "--", "+-"]))
    digits = st.text("0123456789", max_size=30) | st.sampled_from(["", "0", "000", "10000"])
    whole = draw(digits)
    point = draw(st.sampled_from(["", ".", ".", ".."]))
    frac = draw(digits)
    exponent = draw(
        st.sampled_from([""])
        | st.builds(
            lambda e, s, zeros, n: f"{e}{s}{zeros}{n}",
            st.sampled_from("eE"),
            st.sampled_from(["", "+", "-"]),
            st.sampled_from(["", "0", "0000000000000"]),
            st.integers(0, 20) | st.integers(0, 2**40) | st.sampled_from(
                [16383, 16384, 131071, 131072, 131075, 1073741822, 1073741823, 9999999999]
            ),
        )
        | st.sampled_from(["e", "E+", "e-", "e1.5", "ee1"])
    )
    text = f"{lead}{sign}{whole}{point}{frac}{exponent}{trail}"
    if draw(st.integers(0, 20)) == 0:
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(NOT_PG_SPACE) + text[at:]
    return text


@st.composite
def special_spellings(draw: st.DrawFn) -> str:
    word = draw(st.sampled_from(
        ["nan", "infinity", "inf", "-nan", "nan(1)", "infinit", "infinityy", "in", "n"]
    ))
    word = "".join(c.upper() if draw(st.booleans()) else c for c in word)
    sign = draw(st.sampled_from(["", "", "+", "-"]))
    return draw(st.text(PG_SPACE, max_size=2)) + sign + word + draw(st.text(PG_SPACE, max_size=2))


NUMERIC_TEXT = numeric_literals() | special_spellings() | st.text(max_size=20)

LONG_NUMERIC_EXAMPLES = [
    "9" * 131072,  # the largest weight numeric accepts
    "1" + "0" * 131072,  # one digit too many
    "0." + "0" * 16382 + "1",
    "0." + "0" * 16383 + "1",  # dscale above 16383
    "1e-16383",
    "1e-16384",
    "1e131071",
    "1e131072",
    "1" * 5000 + "." + "2" * 5000,  # beyond int()'s default digit limit
    "-" + "12345678" * 40 + "e-3",
    " 000123.4500e+2 ",
    "-0.000",
    ".5",
    "5.",
    "1e2147483647",
    "1e-1073741823",
]


@st.composite
def numeric_binaries(draw: st.DrawFn) -> bytes:
    """numeric_recv input: valid ones with odd weights/scales, and broken ones."""
    ndigits = draw(st.integers(0, 12))
    groups = draw(st.lists(
        st.integers(0, 9999) | st.sampled_from([0, 10000, 32767, -1, -32768]),
        min_size=ndigits, max_size=ndigits,
    ))
    weight = draw(st.integers(-20, 20) | st.integers(-(2**15), 2**15 - 1))
    sign = draw(st.sampled_from([0x0000, 0x4000, 0xC000, 0xD000, 0xF000]) | st.integers(0, 0xFFFF))
    dscale = draw(st.integers(0, 60) | st.sampled_from([0x3FFF, 0x4000, 0xFFFF]))
    data = struct.pack(f">HhHH{ndigits}h", ndigits, weight, sign, dscale, *groups)
    cut = draw(st.sampled_from([None, None, None, -1, 1, 7]))
    if cut is not None:
        data = data[:cut]
    if draw(st.integers(0, 10)) == 0:
        data += b"\x00\x01"
    return data


# == numeric functions ===================================================================


@given(NUMERIC_TEXT)
@settings(max_examples=1500)
def test_numeric_from_text_matches_oracle(text: str) -> None:
    assert_same(_numbers.numeric_from_text, ref_numeric_from_text, text)


def test_numeric_from_text_long_inputs_match_oracle() -> None:
    for text in LONG_NUMERIC_EXAMPLES:
        assert_same(_numbers.numeric_from_text, ref_numeric_from_text, text)
        assert_same(_numbers.numeric_normalize_text, _ref_normalize, text)


@given(
    st.booleans(),
    st.text("0123456789", max_size=200) | st.text("09", max_size=40),
    st.integers(-300, 300) | st.integers(-(2**20), 2**20),
    st.integers(0, 200) | st.sampled_from([0x3FFF, 0x4000]),
)
@settings(max_examples=1000)
def test_numeric_pack_matches_oracle(negative: bool, digits: str, dexp: int, dscale: int) -> None:
    assert_same(_numbers._numeric_pack, ref_numeric_pack, negative, digits, dexp, dscale)


@given(numeric_binaries() | st.binary(max_size=40))
@settings(max_examples=1500)
@example(b"")
@example(struct.pack(">HhHH", 0, 0, 0xC000, 0))
def test_numeric_from_binary_and_check_match_oracle(data: bytes) -> None:
    assert_same(_numbers.numeric_from_binary, ref_numeric_from_binary, data)
    assert_same(_numbers.numeric_check, ref_numeric_check, data)
    # numeric_text is only ever given what numeric_check accepts, but a malformed
    # value must still fail the same way (from_canonical maps these to "corrupt").
    assert_same(_numbers.numeric_text, ref_numeric_text, data)


def _ref_normalize(text: str) -> str:
    return ref_numeric_text(ref_numeric_from_text(text))


@given(NUMERIC_TEXT)
@settings(max_examples=1000)
def test_numeric_text_matches_oracle(text: str) -> None:
    assert_same(_numbers.numeric_normalize_text, _ref_normalize, text)
    try:
        binary = ref_numeric_from_text(text)
    except ValueFormatError:
        return
    assert_same(_numbers.numeric_text, ref_numeric_text, binary)
    assert_same(_numbers.numeric_from_binary, ref_numeric_from_binary, binary)


# == to_canonical / from_canonical =======================================================

SESSIONS = [
    SessionFormat(),
    SessionFormat(client_encoding="unicode"),
    SessionFormat(client_encoding="LATIN1"),
    SessionFormat(timezone="America/New_York", datestyle="German", bytea_output="escape"),
]
TYPES = st.sampled_from([*sorted(values.TYPE_INFO), "interval", "TEXT", ""])
HOT_TYPES = st.sampled_from(["text", "varchar", "numeric"])
FORMATS = st.sampled_from([0, 0, 1, 1, 2, -1])
TEXT_BYTES = (
    st.text().map(lambda t: t.encode("utf-8"))
    | st.text("abcAZ 09\x00\x7f").map(str.encode)
    | st.binary(max_size=30)
    | NUMERIC_TEXT.map(lambda t: t.encode("utf-8", "surrogatepass"))
    | numeric_binaries()
)


@given(HOT_TYPES, TEXT_BYTES, FORMATS, st.sampled_from(SESSIONS))
@settings(max_examples=1500)
@example("text", b"Customer Name 42", 0, SessionFormat())
@example("text", b"caf\xc3\xa9 \xf0\x9f\x94\x92", 0, SessionFormat())
@example("text", b"\xed\xa0\x80", 0, SessionFormat())  # an encoded surrogate: not UTF-8
@example("text", b"bad\xff\x00", 0, SessionFormat())  # both faults: UTF-8 reported first
@example("numeric", b"3325.98", 0, SessionFormat())
@example("varchar", bytearray(b"abc"), 0, SessionFormat())
@example("text", bytearray(b"abc"), 1, SessionFormat())
def test_to_canonical_hot_types_match_oracle(
    type_name: str, data: bytes, fmt: int, session: SessionFormat
) -> None:
    assert_same(to_canonical, ref_to_canonical, type_name, data, fmt, session)


@given(TYPES, TEXT_BYTES, FORMATS, st.sampled_from(SESSIONS))
@settings(max_examples=1000)
def test_to_canonical_dispatch_matches_oracle(
    type_name: str, data: bytes, fmt: int, session: SessionFormat
) -> None:
    assert_same(to_canonical, ref_to_canonical, type_name, data, fmt, session)


def _canonical_inputs() -> st.SearchStrategy[bytes]:
    tags = st.integers(0, 16) | st.sampled_from([0x01, 0x05, 0x05])
    payloads = TEXT_BYTES | NUMERIC_TEXT.map(
        lambda t: _payload_or_empty(ref_numeric_from_text, t)
    )
    return st.builds(lambda tag, p: bytes((tag,)) + p, tags, payloads) | st.binary(max_size=20)


def _payload_or_empty(fn: Callable[[str], bytes], text: str) -> bytes:
    try:
        return fn(text)
    except ValueFormatError:
        return b""


@given(TYPES, _canonical_inputs(), FORMATS, st.sampled_from(SESSIONS))
@settings(max_examples=1500)
@example("numeric", b"\x05" + struct.pack(">HhHH2H", 2, 0, 0, 2, 3325, 9800), 0, SessionFormat())
@example("text", b"\x01Customer Name 42", 0, SessionFormat())
@example("text", bytearray(b"\x01abc"), 0, SessionFormat())
@example("text", memoryview(b"\x01abc"), 1, SessionFormat())
@example("numeric", b"\x05\x00\x01", 0, SessionFormat())  # short header: corrupt
@example("numeric", b"\x05" + struct.pack(">HhHH", 3, 0, 0, 0), 0, SessionFormat())
def test_from_canonical_matches_oracle(
    type_name: str, canonical: bytes, fmt: int, session: SessionFormat
) -> None:
    assert_same(from_canonical, ref_from_canonical, type_name, canonical, fmt, session)


@given(HOT_TYPES, TEXT_BYTES, st.sampled_from([0, 1]), st.sampled_from([0, 1]))
@settings(max_examples=1000)
def test_round_trip_matches_oracle(type_name: str, data: bytes, fmt_in: int, fmt_out: int) -> None:
    session = SessionFormat()
    try:
        canonical = ref_to_canonical(type_name, data, fmt_in, session)
    except ValueFormatError:
        return
    assert to_canonical(type_name, data, fmt_in, session) == canonical
    assert_same(from_canonical, ref_from_canonical, type_name, canonical, fmt_out, session)

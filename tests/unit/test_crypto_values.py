"""Canonical value codecs: round trips, PostgreSQL's printed forms, refusals.

Expected texts below were taken from PostgreSQL 15 itself; the integration
test (tests/integration/test_value_codecs_pg.py) checks the same codecs
against a live server for many more values.
"""

from __future__ import annotations

import json
import math
import struct

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from proxy.crypto.values import (
    SUPPORTED_TYPES,
    TYPE_INFO,
    TYPE_LENGTHS,
    TYPE_OIDS,
    SessionFormat,
    ValueFormatError,
    from_canonical,
    to_canonical,
)
from proxy.errors import PgsealError

UTC = SessionFormat()
KOLKATA = SessionFormat(timezone="Asia/Kolkata")
NEW_YORK = SessionFormat(timezone="America/New_York")
SESSIONS = [UTC, KOLKATA, NEW_YORK, SessionFormat(timezone="Australia/Lord_Howe")]


def text_out(type_name: str, literal: str, session: SessionFormat = UTC) -> str:
    canonical = to_canonical(type_name, literal.encode(), 0, session)
    return from_canonical(type_name, canonical, 0, session).decode()


def binary_round_trip(type_name: str, binary: bytes, session: SessionFormat = UTC) -> None:
    """binary -> canonical -> binary is the identity; text form agrees."""
    canonical = to_canonical(type_name, binary, 1, session)
    assert from_canonical(type_name, canonical, 1, session) == binary
    printed = from_canonical(type_name, canonical, 0, session)
    assert to_canonical(type_name, printed, 0, session) == canonical


# -- the type table ------------------------------------------------------------------


def test_type_facts() -> None:
    assert len(SUPPORTED_TYPES) == 17
    assert TYPE_OIDS == {
        "text": 25, "varchar": 1043, "int2": 21, "int4": 23, "int8": 20, "float4": 700,
        "float8": 701, "numeric": 1700, "bool": 16, "date": 1082, "time": 1083,
        "timestamp": 1114, "timestamptz": 1184, "uuid": 2950, "json": 114, "jsonb": 3802,
        "bytea": 17,
    }
    assert TYPE_LENGTHS["int8"] == 8 and TYPE_LENGTHS["uuid"] == 16
    assert TYPE_LENGTHS["text"] == -1 and TYPE_LENGTHS["bool"] == 1
    assert all(t.typmod == -1 for t in TYPE_INFO.values())


# -- PostgreSQL's printed forms ---------------------------------------------------------

PRINTED: list[tuple[str, str, str, SessionFormat]] = [
    ("numeric", "1.50", "1.50", UTC),
    ("numeric", "1.5e3", "1500", UTC),
    ("numeric", "-0.00", "0.00", UTC),
    ("numeric", "1e-3", "0.001", UTC),
    ("numeric", "nan", "NaN", UTC),
    ("numeric", "-inf", "-Infinity", UTC),
    ("numeric", " 12.345e1 ", "123.45", UTC),
    ("float8", "1e23", "9.999999999999999e+22", UTC),
    ("float8", "-0", "-0", UTC),
    ("float8", "123456789012345678", "1.2345678901234568e+17", UTC),
    ("float8", "2.5e-5", "2.5e-05", UTC),
    ("float8", "0.1", "0.1", UTC),
    ("float8", "NaN", "NaN", UTC),
    ("float8", "-inf", "-Infinity", UTC),
    ("float4", "0.1", "0.1", UTC),
    ("float4", "1e6", "1e+06", UTC),
    ("float4", "16777216", "1.6777216e+07", UTC),
    ("float4", "123456", "123456", UTC),
    # Exactly a float32 midpoint (ties to even) and a hair above it, whose
    # nearest double is that same midpoint: strtof rounds up, so must we.
    ("float4", "1.000000059604644775390625", "1", UTC),
    ("float4", "1.000000059604644775390626", "1.0000001", UTC),
    ("float8", "1e23", "1e+23", SessionFormat(extra_float_digits=0)),
    ("float8", "123456789", "123456789", SessionFormat(extra_float_digits=0)),
    ("int2", " +007 ", "7", UTC),
    ("int8", "-9223372036854775808", "-9223372036854775808", UTC),
    ("bool", " YES ", "t", UTC),
    ("bool", "of", "f", UTC),
    ("bool", "1", "t", UTC),
    ("timestamptz", "2024-03-01 12:00:00+01", "2024-03-01 16:30:00+05:30", KOLKATA),
    ("timestamptz", "2024-03-01 12:00:30.5+00", "2024-03-01 17:30:30.5+05:30", KOLKATA),
    ("timestamptz", "1800-01-01 00:00+00", "1800-01-01 05:53:28+05:53:28", KOLKATA),
    ("timestamptz", "2024-03-10 02:30", "2024-03-10 03:30:00-04", NEW_YORK),  # DST gap
    ("timestamptz", "2024-11-03 01:30", "2024-11-03 01:30:00-05", NEW_YORK),  # overlap
    ("timestamptz", "2024-07-01T12:00:00Z", "2024-07-01 08:00:00-04", NEW_YORK),
    ("timestamptz", "2024-03-01 12:00:00", "2024-03-01 12:00:00+00", UTC),
    ("timestamptz", "0001-01-01 00:00:00+00 BC", "0001-01-01 00:00:00+00 BC", UTC),
    ("timestamptz", "epoch", "1970-01-01 00:00:00+00", UTC),
    ("timestamptz", "-infinity", "-infinity", NEW_YORK),
    ("timestamptz", "2024-03-01 12:00 Europe/Paris", "2024-03-01 11:00:00+00", UTC),
    ("timestamp", "2024-03-01T12:00:00.500+05", "2024-03-01 12:00:00.5", UTC),
    ("timestamp", "2024-03-01 24:00:00", "2024-03-02 00:00:00", UTC),
    ("timestamp", "294276-12-31 23:59:59.999999", "294276-12-31 23:59:59.999999", UTC),
    ("date", "4714-11-24 BC", "4714-11-24 BC", UTC),
    ("date", "0001-01-01 BC", "0001-01-01 BC", UTC),
    ("date", "2024-3-1", "2024-03-01", UTC),
    ("date", "Infinity", "infinity", UTC),
    ("date", "99999-06-15", "99999-06-15", UTC),
    ("time", "12:00:00.1234565", "12:00:00.123456", UTC),
    ("time", "23:59:59.9999995", "24:00:00", UTC),
    ("time", "7:05", "07:05:00", UTC),
    ("uuid", "{A0EEBC99-9C0B4EF8-BB6D6BB9-BD380A11}", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", UTC),
    ("bytea", "\\x de ad", "\\xdead", UTC),
    ("bytea", "a\\\\b\\001", "\\x615c6201", UTC),
    ("bytea", "", "\\x", UTC),
    ("jsonb", '{"b": [1, 2.50], "a": 1, "aa": {}, "a": "\\u00e9\\n"}',
     '{"a": "é\\n", "b": [1, 2.50], "aa": {}}', UTC),
    ("jsonb", "  [1e2, -0, 1.0]  ", "[100, 0, 1.0]", UTC),
    ("jsonb", '"\\u0001"', '"\\u0001"', UTC),
    ("json", ' {"b":1,  "b":2} ', ' {"b":1,  "b":2} ', UTC),
    ("text", "", "", UTC),
    ("varchar", "ünïcødé 𝄞", "ünïcødé 𝄞", UTC),
]


@pytest.mark.parametrize(("type_name", "literal", "expected", "session"), PRINTED)
def test_printed_like_postgres(
    type_name: str, literal: str, expected: str, session: SessionFormat
) -> None:
    assert text_out(type_name, literal, session) == expected
    # And what PostgreSQL prints reads back to the same canonical value.
    assert to_canonical(type_name, expected.encode(), 0, session) == to_canonical(
        type_name, literal.encode(), 0, session
    )


BINARY_FORMS: list[tuple[str, str, bytes]] = [
    ("int2", "-2", b"\xff\xfe"),
    ("int4", "1", b"\x00\x00\x00\x01"),
    ("float4", "1.5", struct.pack(">f", 1.5)),
    ("float8", "NaN", bytes.fromhex("7ff8000000000000")),
    ("numeric", "1.50", bytes.fromhex("000200000000000200011388")),
    ("numeric", "NaN", bytes.fromhex("00000000c0000000")),
    ("numeric", "Infinity", bytes.fromhex("00000000d0000020")),
    ("numeric", "-0.00", bytes.fromhex("0000000000000002")),
    ("bool", "true", b"\x01"),
    ("date", "2000-01-02", b"\x00\x00\x00\x01"),
    ("date", "infinity", b"\x7f\xff\xff\xff"),
    ("time", "00:00:01", (1_000_000).to_bytes(8, "big")),
    ("timestamp", "-infinity", b"\x80" + bytes(7)),
    ("timestamptz", "2000-01-01 00:00:00+00", bytes(8)),
    ("jsonb", '{"b":1,"a":2}', b'\x01{"a": 2, "b": 1}'),
    ("uuid", "a0eebc999c0b4ef8bb6d6bb9bd380a11", bytes.fromhex("a0eebc999c0b4ef8bb6d6bb9bd380a11")),
    ("bytea", "\\x00ff", b"\x00\xff"),
]


@pytest.mark.parametrize(("type_name", "literal", "binary"), BINARY_FORMS)
def test_binary_like_postgres(type_name: str, literal: str, binary: bytes) -> None:
    canonical = to_canonical(type_name, literal.encode(), 0, UTC)
    assert from_canonical(type_name, canonical, 1, UTC) == binary
    assert to_canonical(type_name, binary, 1, UTC) == canonical


# -- Hypothesis: round trips per type -----------------------------------------------------

MIN_DATE, END_DATE = -2451545, 2145031949
MIN_TS, END_TS = -211813488000000000, 9223371331200000000
text_values = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00")
)


@given(text_values)
def test_text_round_trip(value: str) -> None:
    raw = value.encode()
    for type_name in ("text", "varchar"):
        canonical = to_canonical(type_name, raw, 0, UTC)
        assert canonical == to_canonical(type_name, raw, 1, UTC)
        assert from_canonical(type_name, canonical, 0, UTC) == raw
        assert from_canonical(type_name, canonical, 1, UTC) == raw


@pytest.mark.parametrize(("type_name", "width"), [("int2", 2), ("int4", 4), ("int8", 8)])
@given(data=st.data())
def test_int_round_trip(type_name: str, width: int, data: st.DataObject) -> None:
    bound = 2 ** (8 * width - 1)
    value = data.draw(st.integers(-bound, bound - 1))
    binary = value.to_bytes(width, "big", signed=True)
    binary_round_trip(type_name, binary)
    assert to_canonical(type_name, str(value).encode(), 0, UTC) == to_canonical(
        type_name, binary, 1, UTC
    )


@given(st.integers(0, 2**64 - 1), st.sampled_from([1, 0, -5]))
@settings(max_examples=300)
def test_float8_bits_round_trip(bits: int, efd: int) -> None:
    binary = bits.to_bytes(8, "big")
    session = SessionFormat(extra_float_digits=efd)
    canonical = to_canonical("float8", binary, 1, session)
    assert from_canonical("float8", canonical, 1, session) == binary
    value = struct.unpack(">d", binary)[0]
    printed = from_canonical("float8", canonical, 0, session)
    if math.isnan(value):
        assert printed == b"NaN"
    elif efd > 0:
        # Shortest output is exact: it reads back to the very same bits.
        assert to_canonical("float8", printed, 0, session) == canonical


@given(st.integers(0, 2**32 - 1))
@settings(max_examples=300)
def test_float4_bits_round_trip(bits: int) -> None:
    binary = bits.to_bytes(4, "big")
    canonical = to_canonical("float4", binary, 1, UTC)
    assert from_canonical("float4", canonical, 1, UTC) == binary
    if not math.isnan(struct.unpack(">f", binary)[0]):
        printed = from_canonical("float4", canonical, 0, UTC)
        assert to_canonical("float4", printed, 0, UTC) == canonical


@given(
    st.sampled_from(["", "-", "+"]),
    st.text("0123456789", min_size=1, max_size=40),
    st.integers(0, 40),
    st.one_of(st.none(), st.integers(-50, 50)),
)
def test_numeric_round_trip(sign: str, digits: str, point: int, exponent: int | None) -> None:
    point = min(point, len(digits))
    literal = f"{sign}{digits[:point]}.{digits[point:]}"
    if exponent is not None:
        literal += f"e{exponent}"
    canonical = to_canonical("numeric", literal.encode(), 0, UTC)
    binary = from_canonical("numeric", canonical, 1, UTC)
    assert to_canonical("numeric", binary, 1, UTC) == canonical
    printed = from_canonical("numeric", canonical, 0, UTC)
    assert to_canonical("numeric", printed, 0, UTC) == canonical
    # Printed value equals the input value at the input's display scale.
    from decimal import Decimal

    assert Decimal(printed.decode()) == Decimal(literal)


@given(
    st.integers(0, 8), st.integers(-20, 20), st.sampled_from([0, 0x4000]), st.integers(0, 60),
    st.data(),
)
def test_numeric_binary_is_normalized_once(
    ndigits: int, weight: int, sign: int, dscale: int, data: st.DataObject
) -> None:
    groups = data.draw(st.lists(st.integers(0, 9999), min_size=ndigits, max_size=ndigits))
    binary = struct.pack(f">HhHH{ndigits}H", ndigits, weight, sign, dscale, *groups)
    canonical = to_canonical("numeric", binary, 1, UTC)
    normalized = from_canonical("numeric", canonical, 1, UTC)
    binary_round_trip("numeric", normalized)


@given(st.booleans())
def test_bool_round_trip(value: bool) -> None:
    binary_round_trip("bool", bytes([value]))


@given(st.one_of(st.integers(MIN_DATE, END_DATE - 1), st.sampled_from([-(2**31), 2**31 - 1])))
def test_date_round_trip(days: int) -> None:
    binary_round_trip("date", days.to_bytes(4, "big", signed=True))


@given(st.integers(0, 86_400_000_000))
def test_time_round_trip(usecs: int) -> None:
    binary_round_trip("time", usecs.to_bytes(8, "big", signed=True))


@given(
    st.one_of(st.integers(MIN_TS, END_TS - 1), st.sampled_from([-(2**63), 2**63 - 1])),
    st.sampled_from(SESSIONS),
)
@settings(max_examples=300)
def test_timestamps_round_trip(usecs: int, session: SessionFormat) -> None:
    binary = usecs.to_bytes(8, "big", signed=True)
    binary_round_trip("timestamp", binary, session)
    binary_round_trip("timestamptz", binary, session)


@given(st.binary(min_size=16, max_size=16))
def test_uuid_round_trip(value: bytes) -> None:
    binary_round_trip("uuid", value)
    h = value.hex()
    for spelling in (h, h.upper(), "{" + h + "}"):
        expected = to_canonical("uuid", value, 1, UTC)
        assert to_canonical("uuid", spelling.encode(), 0, UTC) == expected


@given(st.binary(max_size=200), st.sampled_from(["hex", "escape"]))
def test_bytea_round_trip(value: bytes, output: str) -> None:
    binary_round_trip("bytea", value, SessionFormat(bytea_output=output))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | text_values,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(text_values, children, max_size=4),
    max_leaves=20,
)


@given(json_values, st.booleans())
def test_json_and_jsonb_round_trip(value: object, ascii_only: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert to_canonical("json", text, 0, UTC) == to_canonical("json", text, 1, UTC)
    assert from_canonical("json", to_canonical("json", text, 0, UTC), 0, UTC) == text
    canonical = to_canonical("jsonb", text, 0, UTC)
    assert canonical == to_canonical("jsonb", b"\x01" + text, 1, UTC)
    printed = from_canonical("jsonb", canonical, 0, UTC)
    assert to_canonical("jsonb", printed, 0, UTC) == canonical  # normalization is idempotent
    assert from_canonical("jsonb", canonical, 1, UTC) == b"\x01" + printed
    assert json.loads(printed) == json.loads(text) or _has_float(value)


def _has_float(value: object) -> bool:
    # 1e16 prints as 10000000000000000 (numeric), equal in value but not in type.
    if isinstance(value, float):
        return True
    if isinstance(value, list):
        return any(_has_float(v) for v in value)
    if isinstance(value, dict):
        return any(_has_float(v) for v in value.values())
    return False


# -- text and binary of one value give one canonical form -----------------------------------


@pytest.mark.parametrize(
    ("type_name", "texts", "binary"),
    [
        ("int4", ["42", " +42", "0042 "], (42).to_bytes(4, "big")),
        ("bool", ["t", "TRUE", "yes", "on", "1"], b"\x01"),
        ("numeric", ["1.50", "15.0e-1", "+1.50"], bytes.fromhex("000200000000000200011388")),
        ("float8", ["0.5", "5e-1", " .5 "], struct.pack(">d", 0.5)),
        ("uuid", ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "{A0EEBC999C0B4EF8BB6D6BB9BD380A11}"],
         bytes.fromhex("a0eebc999c0b4ef8bb6d6bb9bd380a11")),
        ("timestamptz", ["2024-03-01 12:00:00+00", "2024-03-01T07:00:00-05", "2024-03-01 12:00Z",
                         "2024-03-01 17:30:00+05:30"],
         (762_609_600_000_000).to_bytes(8, "big", signed=True)),
        ("date", ["2000-01-01", "2000-1-1", "2000-01-01 23:59:59"], bytes(4)),
        ("jsonb", ['{"a":1,"b":2}', '{"b": 2, "a": 1}', '{"a":0,"b":2,"a":1}'],
         b'\x01{"a": 1, "b": 2}'),
        ("bytea", ["\\x414243", "ABC", "\\101BC"], b"ABC"),
    ],
)
def test_spellings_share_one_canonical(type_name: str, texts: list[str], binary: bytes) -> None:
    expected = to_canonical(type_name, binary, 1, UTC)
    for text in texts:
        assert to_canonical(type_name, text.encode(), 0, UTC) == expected, text


def test_timestamptz_input_depends_on_session_zone_only_without_offset() -> None:
    literal = b"2024-07-01 12:00:00"
    assert to_canonical("timestamptz", literal, 0, UTC) != to_canonical(
        "timestamptz", literal, 0, NEW_YORK
    )
    with_offset = b"2024-07-01 12:00:00+02"
    assert to_canonical("timestamptz", with_offset, 0, UTC) == to_canonical(
        "timestamptz", with_offset, 0, NEW_YORK
    )


def test_posix_fixed_session_zones() -> None:
    # What PostgreSQL reports after SET TIME ZONE 5.5 / INTERVAL '-03:00'.
    canonical = to_canonical("timestamptz", b"2024-03-01 12:00:00+00", 0, UTC)
    plus = SessionFormat(timezone="<+05:30>-05:30")
    minus = SessionFormat(timezone="<-03>+03")
    assert from_canonical("timestamptz", canonical, 0, plus) == b"2024-03-01 17:30:00+05:30"
    assert from_canonical("timestamptz", canonical, 0, minus) == b"2024-03-01 09:00:00-03"


# -- edge cases --------------------------------------------------------------------------

REJECTED: list[tuple[str, bytes]] = [
    ("int2", b"40000"), ("int2", b"-32769"), ("int4", b""), ("int4", b"1.0"), ("int8", b"0x10"),
    ("int8", b"9" * 5000), ("int4", b"1_000"), ("int4", "١٢".encode()),
    ("float8", b"1e400"), ("float8", b"1e-400"), ("float8", b"-nan"), ("float8", b"1_0"),
    ("float4", b"1e39"), ("float4", b"1e-46"),
    ("numeric", b"1e-20000"), ("numeric", b"1e140000"), ("numeric", b"."), ("numeric", b"1e 5"),
    ("bool", b""), ("bool", b"o"), ("bool", b"2"),
    ("date", b"2023-02-29"), ("date", b"0000-01-01"), ("date", b"today"), ("date", b"1/2/2024"),
    ("date", b"4714-11-23 BC"), ("date", b"+infinity"),
    ("time", b"24:00:01"), ("time", b"23:59:60.5"), ("time", b"12:00:00+05"),
    ("timestamp", b"2024-03-01 12:00:00 EST"), ("timestamp", b"2024-03-01 12:00:00+16"),
    ("timestamp", b"2024-03-01 12:00:00 No/Such_Zone"), ("timestamp", b"294277-01-01"),
    ("timestamptz", b"now"), ("timestamptz", b"2024-03-01 12:00:00+0530:00"),
    ("uuid", b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1"),
    ("uuid", b" a0eebc999c0b4ef8bb6d6bb9bd380a11"),
    ("json", b"{"), ("json", b"NaN"), ("json", b"[1,]"), ("jsonb", b'"\\u0000"'),
    ("jsonb", b'"\\ud800"'), ("jsonb", b"[" * 5000 + b"]" * 5000),
    ("bytea", b"\\x0"), ("bytea", b"\\xzz"), ("bytea", b"a\\b"),
    ("text", b"\xff"), ("text", b"a\x00b"), ("text", b"\xed\xa0\x80"), ("varchar", b"\xc0\xaf"),
]


@pytest.mark.parametrize(("type_name", "raw"), REJECTED)
def test_rejected(type_name: str, raw: bytes) -> None:
    with pytest.raises(ValueFormatError) as info:
        to_canonical(type_name, raw, 0, NEW_YORK)
    assert isinstance(info.value, ValueError) and isinstance(info.value, PgsealError)
    assert len(info.value.sqlstate) == 5


BINARY_REJECTED: list[tuple[str, bytes]] = [
    ("int2", b"\x00"), ("int4", b"\x00" * 8), ("float8", b"\x00" * 4), ("bool", b""),
    ("bool", b"\x01\x01"), ("uuid", b"\x00" * 15), ("date", (2**31 - 2).to_bytes(4, "big")),
    ("time", (86_400_000_001).to_bytes(8, "big")), ("time", (-1).to_bytes(8, "big", signed=True)),
    ("timestamp", (END_TS).to_bytes(8, "big")), ("jsonb", b'\x02{}'), ("jsonb", b""),
    ("numeric", b"\x00\x01\x00\x00\x00\x00\x00\x00"),  # one digit announced, none sent
    ("numeric", bytes.fromhex("0001000012340000ffff")),  # bad sign, negative digit
    ("numeric", bytes.fromhex("0001000000000000" "2710")),  # digit 10000
    ("numeric", bytes.fromhex("000000000000ffff")), ("text", b"\xff"), ("json", b"{"),
]


@pytest.mark.parametrize(("type_name", "raw"), BINARY_REJECTED)
def test_binary_rejected(type_name: str, raw: bytes) -> None:
    with pytest.raises(ValueFormatError):
        to_canonical(type_name, raw, 1, UTC)


SECRET = "S3cr3tV4lue"


@pytest.mark.parametrize("type_name", sorted(SUPPORTED_TYPES - {"text", "varchar", "bytea"}))
def test_errors_never_contain_the_value(type_name: str) -> None:
    for raw in (SECRET.encode(), f"2024-01-01 {SECRET}".encode(), f'{{"{SECRET}": }}'.encode()):
        for fmt in (0, 1):
            try:
                to_canonical(type_name, raw, fmt, NEW_YORK)
            except ValueFormatError as error:
                assert SECRET not in str(error) and SECRET not in repr(error.args)
                assert error.__cause__ is None


def test_empty_and_extreme_values() -> None:
    assert text_out("text", "") == ""
    assert text_out("jsonb", '""') == '""'
    assert text_out("bytea", "") == "\\x"
    assert to_canonical("text", b"", 0, UTC) == b"\x01"  # never empty: SIV-friendly
    assert text_out("numeric", "0e-16383") == "0." + "0" * 16383
    assert text_out("numeric", "9" * 1000) == "9" * 1000
    assert text_out("float8", "1.7976931348623157e308") == "1.7976931348623157e+308"
    assert text_out("float8", "5e-324") == "5e-324"
    assert text_out("float4", "1.4e-45") == "1e-45"
    assert text_out("int2", "-32768") == "-32768"
    assert text_out("date", "5874897-12-31") == "5874897-12-31"
    assert text_out("timestamp", "4714-11-24 00:00:00 BC") == "4714-11-24 00:00:00 BC"


def test_negative_zero_and_nan_bits_are_kept() -> None:
    binary_round_trip("float8", bytes.fromhex("8000000000000000"))
    for bits in ("8000000000000000", "7ff8000000000001", "fff8000000000000"):
        canonical = to_canonical("float8", bytes.fromhex(bits), 1, UTC)
        assert from_canonical("float8", canonical, 1, UTC) == bytes.fromhex(bits)
    assert text_out("float4", "-0") == "-0"
    assert to_canonical("float8", b"-0", 0, UTC) != to_canonical("float8", b"0", 0, UTC)


def test_dst_sweep_new_york_reads_back() -> None:
    # Every 10 minutes across both 2024 transitions: printed text reads back
    # to the same instant, and wall-clock input in the gap/overlap resolves
    # the way PostgreSQL does (later instant).
    for day in ("2024-03-10", "2024-11-03"):
        for minute in range(0, 6 * 60, 10):
            literal = f"{day} {minute // 60:02d}:{minute % 60:02d}:00".encode()
            canonical = to_canonical("timestamptz", literal, 0, NEW_YORK)
            printed = from_canonical("timestamptz", canonical, 0, NEW_YORK)
            assert to_canonical("timestamptz", printed, 0, NEW_YORK) == canonical


# -- session settings ------------------------------------------------------------------------


def test_refused_sessions() -> None:
    canonical = to_canonical("date", b"2024-03-01", 0, UTC)
    with pytest.raises(ValueFormatError) as info:
        from_canonical("date", canonical, 0, SessionFormat(datestyle="SQL, DMY"))
    assert info.value.sqlstate == "0A000"
    # Binary output and time-of-day output do not depend on DateStyle.
    assert from_canonical("date", canonical, 1, SessionFormat(datestyle="German")) == (
        from_canonical("date", canonical, 1, UTC)
    )
    assert text_out("time", "12:00", SessionFormat(datestyle="Postgres, MDY")) == "12:00:00"
    assert text_out("date", "2024-03-01", SessionFormat(datestyle="ISO, DMY")) == "2024-03-01"
    with pytest.raises(ValueFormatError):
        to_canonical("int4", b"1", 0, SessionFormat(client_encoding="LATIN1"))
    assert to_canonical("int4", b"1", 0, SessionFormat(client_encoding="utf-8"))
    with pytest.raises(ValueFormatError):
        to_canonical("timestamptz", b"2024-03-01 12:00", 0, SessionFormat(timezone="Mars/Olympus"))
    # A bad zone only matters where a zone is needed.
    assert to_canonical("timestamptz", b"2024-03-01 12:00+00", 0, SessionFormat(timezone="x"))
    with pytest.raises(ValueFormatError):
        from_canonical("bytea", to_canonical("bytea", b"x", 1, UTC), 0,
                       SessionFormat(bytea_output="base64"))


def test_canonical_of_another_type_is_refused() -> None:
    as_int4 = to_canonical("int4", b"40000", 0, UTC)
    assert from_canonical("int8", as_int4, 0, UTC) == b"40000"  # widening is fine
    with pytest.raises(ValueFormatError):
        from_canonical("int2", as_int4, 0, UTC)  # narrowing out of range
    with pytest.raises(ValueFormatError):
        from_canonical("text", as_int4, 0, UTC)
    with pytest.raises(ValueFormatError):
        from_canonical("int4", b"", 0, UTC)
    with pytest.raises(ValueFormatError):
        from_canonical("int4", as_int4 + b"\x00", 1, UTC)
    with pytest.raises(ValueFormatError):
        from_canonical("numeric", b"\x05\x00", 0, UTC)


def test_unknown_type_and_format() -> None:
    with pytest.raises(ValueFormatError):
        to_canonical("money", b"1", 0, UTC)
    with pytest.raises(ValueFormatError):
        to_canonical("int4", b"1", 2, UTC)
    with pytest.raises(ValueFormatError):
        from_canonical("int4", to_canonical("int4", b"1", 0, UTC), 2, UTC)


@given(st.sampled_from(sorted(SUPPORTED_TYPES)), st.binary(max_size=40), st.integers(0, 1))
@settings(max_examples=1000)
def test_fuzz_any_input_converts_or_raises_value_format_error(
    type_name: str, raw: bytes, fmt: int
) -> None:
    try:
        canonical = to_canonical(type_name, raw, fmt, NEW_YORK)
    except ValueFormatError:
        return
    for out_fmt in (0, 1):
        from_canonical(type_name, canonical, out_fmt, NEW_YORK)


@given(st.sampled_from(sorted(SUPPORTED_TYPES)), st.binary(max_size=40))
def test_fuzz_from_canonical_never_crashes(type_name: str, raw: bytes) -> None:
    assume(raw)
    for fmt in (0, 1):
        try:
            from_canonical(type_name, raw, fmt, NEW_YORK)
        except ValueFormatError:
            pass

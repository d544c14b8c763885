"""The value codecs against a real PostgreSQL: same bytes, both formats.

For every literal below, PostgreSQL parses it as the declared type and sends
it back as text and as binary; the codecs must produce exactly those bytes
from their canonical form, and PostgreSQL's binary form must map back to the
same canonical bytes. Literals PostgreSQL rejects must be rejected too, and
literals the codecs refuse on purpose (PostgreSQL accepts them) are listed so
the gap stays visible. Random values (floats, numerics, timestamps) are
checked the same way with a fixed seed.

Uses libpq's exec_params through psycopg 3 so that parameter and result
formats are chosen per call and raw field bytes come back untouched.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import pq

from proxy.crypto.values import (
    TYPE_INFO,
    TYPE_OIDS,
    SessionFormat,
    ValueFormatError,
    from_canonical,
    to_canonical,
)

pytestmark = pytest.mark.integration

ZONES = ["UTC", "Asia/Kolkata", "America/New_York"]


@dataclass
class Pg:
    conn: psycopg.Connection[tuple[object, ...]]

    def session(self) -> SessionFormat:
        status = self.conn.pgconn.parameter_status
        return SessionFormat(
            timezone=(status(b"TimeZone") or b"UTC").decode(),
            datestyle=(status(b"DateStyle") or b"ISO, MDY").decode(),
            client_encoding=(status(b"client_encoding") or b"UTF8").decode(),
        )

    def set(self, sql: str) -> None:
        self.conn.execute(sql)

    def roundtrip(self, type_name: str, value: bytes, fmt: int, result_format: int) -> bytes | None:
        """PostgreSQL's output of `value`::type in `result_format`; None if it refuses."""
        res = self.conn.pgconn.exec_params(
            f"SELECT $1::{type_name}".encode(),
            [value],
            param_types=[TYPE_OIDS[type_name]],
            param_formats=[fmt],
            result_format=result_format,
        )
        if res.status != pq.ExecStatus.TUPLES_OK:
            return None
        out = res.get_value(0, 0)
        assert out is not None
        return bytes(out)


@pytest.fixture(scope="module")
def db(pg_dsn: str) -> Iterator[Pg]:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("SET client_encoding = 'UTF8'")
        yield Pg(conn)


def check_same_as_postgres(db: Pg, type_name: str, literal: str | bytes) -> str:
    """Compare one text literal; return 'ok', 'both-reject' or 'we-refuse'."""
    raw = literal.encode() if isinstance(literal, str) else literal
    session = db.session()
    pg_text = db.roundtrip(type_name, raw, 0, 0)
    try:
        canonical = to_canonical(type_name, raw, 0, session)
    except ValueFormatError:
        return "both-reject" if pg_text is None else "we-refuse"
    assert pg_text is not None, f"{type_name}: we accept {literal!r}, PostgreSQL rejects it"
    pg_binary = db.roundtrip(type_name, raw, 0, 1)
    assert pg_binary is not None
    assert from_canonical(type_name, canonical, 0, session) == pg_text, (type_name, literal)
    assert from_canonical(type_name, canonical, 1, session) == pg_binary, (type_name, literal)
    assert to_canonical(type_name, pg_binary, 1, session) == canonical, (type_name, literal)
    # PostgreSQL's own text output reads back to the same value.
    assert to_canonical(type_name, pg_text, 0, session) == canonical, (type_name, literal)
    return "ok"


def check_binary_value(db: Pg, type_name: str, binary: bytes) -> None:
    """A binary value: PostgreSQL's text and binary echo must equal ours."""
    session = db.session()
    pg_text = db.roundtrip(type_name, binary, 1, 0)
    try:
        canonical = to_canonical(type_name, binary, 1, session)
    except ValueFormatError:
        assert pg_text is None, f"{type_name}: we refuse binary {binary.hex()}, PostgreSQL takes it"
        return
    assert pg_text is not None, f"{type_name}: we accept binary {binary.hex()}, PostgreSQL rejects"
    pg_binary = db.roundtrip(type_name, binary, 1, 1)
    assert from_canonical(type_name, canonical, 0, session) == pg_text, (type_name, binary.hex())
    assert from_canonical(type_name, canonical, 1, session) == pg_binary, (type_name, binary.hex())
    if not is_nan_with_payload(type_name, canonical):
        assert to_canonical(type_name, pg_text, 0, session) == canonical, (type_name, binary.hex())


def is_nan_with_payload(type_name: str, canonical: bytes) -> bool:
    """NaNs other than the default print as 'NaN', which reads back as the default."""
    bits = int.from_bytes(canonical[1:], "big")
    if type_name == "float8":
        exponent, fraction, default = bits >> 52 & 0x7FF, bits & (2**52 - 1), 0x7FF8 << 48
        return exponent == 0x7FF and fraction != 0 and bits != default
    if type_name == "float4":
        exponent, fraction, default = bits >> 23 & 0xFF, bits & (2**23 - 1), 0x7FC0_0000
        return exponent == 0xFF and fraction != 0 and bits != default
    return False


# -- literal tables ---------------------------------------------------------------

# 2**-150, exactly half the smallest float32 subnormal.
HALF_MIN_SUBNORMAL_F32 = (
    "7.00649232162408535461864791644958065640130970938257885878534141944895541342930300743"
    "319094181060791015625e-46"
)

ACCEPTED: dict[str, list[str]] = {
    "text": ["", "hello", "  spaced  ", "ünïcødé ✓ 𝄞", "line\nbreak", "tab\there", "'quote'\\"],
    "varchar": ["", "x" * 300, "日本語"],
    "int2": ["0", "-32768", "32767", " 42 ", "+7", "007", "-0", "\t12\n"],
    "int4": ["0", "-2147483648", "2147483647", "  -15  ", "+0"],
    "int8": ["0", "-9223372036854775808", "9223372036854775807", "00000000000000000000001"],
    "float4": [
        "0", "-0", "1", "-1.5", "0.1", "3.14159", "1e6", "123456", "1e-5", "0.0001",
        "3.4028235e38", "1.17549435e-38", "1e-45", "1.4e-45", "16777217", "NaN", "nan", "7.1e-46",
        "Infinity", "-Infinity", "inf", "+inf", "-INF", " 2.5 ", "1.", ".5", "1E10",
        "0.30000001", "100", "1000000", "999999.9", "3.4028234664e38",
        # float32 midpoints: exact ties go to even; a hair above must round up
        # even though the nearest double is the midpoint itself.
        "1.000000059604644775390625", "1.000000059604644775390626",
        "1.000000178813934326171875", "340282356779733661637539395458142568447",
        HALF_MIN_SUBNORMAL_F32.replace("625e", "626e"),
    ],
    "float8": [
        "0", "-0", "1", "0.1", "-2.5", "1e15", "123456789012345", "1234567890123456",
        "1e-5", "0.0001", "1e100", "1e-300", "5e-324", "2.2250738585072014e-308",
        "1.7976931348623157e308", "NaN", "Infinity", "-Infinity", "  3.5e+2  ",
        "0.30000000000000004", "9007199254740993", "2.4703282292062328e-324", "1e22", "1e23",
    ],
    "numeric": [
        "0", "-0", "-0.00", "1.50", "1.5e3", "1e-3", " 12.345e1 ", ".5", "1.", "+.5",
        "NaN", "nan", "Infinity", "-Infinity", "inf", "-inf", "0.0001", "100000000",
        "123456789.123456789", "-98765.4321000", "1e1001", "1e-1001", "0e-5", "9" * 200,
        "0." + "0" * 100 + "1", "12345678901234567890.12345678901234567890", "1.5E+3", "1e0",
        "10000", "0.00010000", "-1e-8",
    ],
    "bool": ["t", "f", "true", "FALSE", " yes ", "no", "on", "off", "of", "1", "0", "y", "n",
             "tr", "TRU", "fa", "ye"],
    "date": [
        "2024-03-01", "2024-3-1", "0001-01-01", "2000-02-29", "1999-12-31", "infinity",
        "-infinity", "epoch", " 2024-03-01 ", "2024-03-01 BC", "4714-11-24 BC", "5874897-12-31",
        "10000-01-01", "99999-06-15", "2024-03-01 12:00:00", "2024-03-01T23:59:59+05",
        "0001-12-31 BC", "2024-03-01 ad", "02024-03-01", "2024-03-01 12:00 Europe/Paris",
        "2024-03-01T12:00Z", "0001-01-01 AD",
    ],
    "time": [
        "00:00", "12:34", "12:34:56", "23:59:59.999999", "24:00:00", "24:00", "23:59:60",
        "01:02:03.5", "01:02:03.0000005", "01:02:03.0000015", "23:59:59.9999995", " 7:05:00 ",
        "12:00:00.123456789", "00:00:00.000000", "1:02", "12:00:00.5000005",
    ],
    "timestamp": [
        "2024-03-01 12:00:00", "2024-03-01T12:00:00", "2024-03-01 12:00:00.5", "2024-03-01",
        "infinity", "-infinity", "epoch", "2024-03-01 24:00:00", "2024-03-01 23:59:60",
        "4714-11-24 00:00:00 BC", "294276-12-31 23:59:59.999999", "0001-01-01 00:00:00",
        "2024-03-01 12:00:00+05", "2024-03-01 12:00:00 Europe/Paris", "1999-12-31 23:59:59.999999",
        "2024-03-01 12:00:00.000001", "0044-03-15 12:00:00 BC", "2024-03-01t12:00:00z",
    ],
    "timestamptz": [
        "2024-03-01 12:00:00+01", "2024-03-01 12:00:00+05:30", "2024-03-01 12:00:00.5-08",
        "2024-03-01T12:00:00Z", "2024-03-01 12:00:00 UTC", "2024-03-01 12:00:00 GMT",
        "2024-03-01 12:00:00", "2024-03-01", "infinity", "-infinity", "epoch",
        "2024-03-10 02:30:00", "2024-03-10 01:59:59", "2024-03-10 03:00:00",
        "2024-11-03 01:30:00", "2024-11-03 00:59:59", "2024-11-03 02:00:00",
        "2024-03-31 02:30:00 Europe/Paris", "2024-10-27 02:30:00 Europe/Paris",
        "1800-01-01 00:00:00", "1900-06-01 12:00:00", "1942-06-01 12:00:00",
        "0001-01-01 00:00:00+00 BC", "4714-11-24 00:00:00+00 BC", "294276-12-31 23:59:59+00",
        "2100-07-04 12:00:00", "3000-01-01 00:00:00", "100000-07-01 12:00:00",
        "2024-03-01 12:00:00+0530", "2024-03-01 12:00:00 +05:30", "2024-03-01 12:00:00+15:59:59",
        "2024-03-01 12:00:00-00:30", "2024-03-01 12:00:00 america/new_york",
        "2038-03-14 02:30:00", "9999-12-31 23:59:59", "10000-03-12 02:30:00",
        "0500-01-01 00:00:00 BC", "02024-03-01 12:00", "2024-03-01 12:00:00 +05",
        "2024-03-01 12:00:00+05 BC", "2024-03-01 12:00:00z", "2024-03-01 12:00:00 utc",
        "2024-03-01T12:00:00 America/Chicago", "2024-03-01\t12:00", "2024-03-01 12:00:00+1",
        "2024-03-01 12:00:00-1530", "2024-03-01 12:00:00+05:30:15", "1999-12-31 24:00:00",
        "2024-03-01 12:00:00.999999999", "2024-03-01 12:00:00 Etc/GMT+5",
        "2024-03-01 00:00:00 Asia/Kolkata BC",
    ],
    "uuid": [
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
        "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}", "a0eebc999c0b4ef8bb6d6bb9bd380a11",
        "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11", "{a0eebc99-9c0b4ef8-bb6d6bb9-bd380a11}",
        "00000000-0000-0000-0000-000000000000",
    ],
    "json": [
        '{"b": 1, "a": 2, "a": 3}', "  [1, 2.50, -0, 1e2]  ", '"str"', "null", "true", "1",
        '{"nested": {"x": [1, {"y": null}]}}', '"\\u00e9\\ud83d\\ude00"', '"\\ud800"',
        '"\\u0000"', '{"k":"v"}', "[]", "{}", '"esc \\" \\\\ \\/ \\b \\f \\n \\r \\t"',
    ],
    "jsonb": [
        '{"b": 1, "a": 2, "a": 3}', "[1, 2.50, -0, 1e2, 1E-2, 0.000]", '"str"', "null", "true",
        "false", "1", "-1.0e1", '{"aa": 1, "b": 2, "c": {"zz": [], "y": {}}}',
        '"\\u00e9\\ud83d\\ude00 raw é"', '"ctl \\u0001 \\u001f \\u007f"', '{"k":"v"}', "[]", "{}",
        '"esc \\" \\\\ \\/ \\b \\f \\n \\r \\t"', '{"é": 1, "z": 2, "ab": 3}', "  [ 1 , 2 ]  ",
        "12345678901234567890123456789", '{"a": {"a": {"a": [true, false, null]}}}',
    ],
    "bytea": [
        "\\x", "\\x00ff10", "\\xDEADbeef", "\\x de ad\nbe\tef ", "plain", "",
        "esc\\\\aped", "\\000\\001\\377", "mixé", "a\\134b",
    ],
}

REJECTED: dict[str, list[str]] = {
    "int2": ["32768", "-32769", "", " ", "1.0", "1e2", "abc", "1 2", "99999999999999999999999"],
    "int4": ["2147483648", "--1", "+-1"],
    "int8": ["9223372036854775808", "-9223372036854775809"],
    "float4": ["1e39", "-1e39", "1e-46", "abc", "", "1e", "infinit", "3.40282357e38", "7.0e-46",
               # exact ties at the edges: to even means to infinity / to zero
               "340282356779733661637539395458142568448", HALF_MIN_SUBNORMAL_F32],
    "float8": ["1e309", "1e-400", "", "1.2.3", "- 1"],
    "numeric": ["", ".", "abc", "1e", "1.2.3", "1e-20000", "1e140000", "- 1"],
    "bool": ["", "o", "2", "yess", "truex", "nope"],
    "date": ["2024-02-30", "2023-02-29", "0000-01-01", "2024-13-01", "2024-00-10",
             "4714-11-23 BC", "5874898-01-01", "2024-03-01 25:00", "+infinity"],
    "time": ["24:00:01", "25:00", "12:60", "23:59:60.5", "12:00:61", ""],
    "timestamp": ["2024-03-01 12:00:00+16", "294277-01-01 00:00:00", "4714-11-23 23:59:59 BC",
                  "2024-03-01 12:00:00 No/Such_Zone"],
    "timestamptz": ["294276-12-31 23:59:59-01", "2024-03-01 12:00:00+16:00",
                    "2024-03-01 BC AD"],
    "uuid": ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11-",
             "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "a0eebc99--9c0b-4ef8-bb6d-6bb9bd380a11",
             " a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "g0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"],
    "json": ["", "{", "[1,]", "NaN", "01", "1.", ".5", "'x'", '{"a" 1}', '"\\x"', "[1] x"],
    "jsonb": ['"\\ud800"', '"\\u0000"', "Infinity", '{"a": 1e-20000}', "[1,,2]"],
    "bytea": ["\\x0", "\\xzz", "\\x0 1", "bad\\escape", "\\400", "trailing\\"],
    "text": [],
}

# PostgreSQL accepts these; the codecs refuse rather than guess (see values.py).
REFUSED: dict[str, list[str]] = {
    "float8": ["-nan", "0x10", "nan(123)"],
    "date": ["today", "Jan 8 1999", "1/8/1999", "19990108", "J2451187", "999-01-08"],
    "time": ["allballs", "04:05 PM", "12:00:00+05", "040506", "12:00.5", "01:02:03."],
    "timestamptz": ["2024-03-01 12:00:00 EST", "now", "2024-03-01 12:00:00 CET",
                    "2024-03-01 12:00:00 EST5EDT", "2024-03-01 12:00:00."],
}

# PostgreSQL 15 rejects these, 16 accepts them (non-decimal integers,
# underscores); the codecs refuse them either way.
VERSION_DEPENDENT: dict[str, list[str]] = {
    "int4": ["0x10", "0o17", "0b101", "1_000"],
    "numeric": ["1_000.5", "0x1F"],
}


@pytest.mark.parametrize("zone", ZONES)
@pytest.mark.parametrize("type_name", sorted(ACCEPTED))
def test_accepted_literals_match_postgres(db: Pg, zone: str, type_name: str) -> None:
    db.set(f"SET TimeZone = '{zone}'")
    outcomes = {literal: check_same_as_postgres(db, type_name, literal)
                for literal in ACCEPTED[type_name]}
    refused = [lit for lit, outcome in outcomes.items() if outcome != "ok"]
    assert refused == [], f"{type_name}: refused or rejected by both: {refused!r}"


@pytest.mark.parametrize("type_name", sorted(REJECTED))
def test_rejected_literals_are_rejected(db: Pg, type_name: str) -> None:
    db.set("SET TimeZone = 'America/New_York'")
    for literal in REJECTED[type_name]:
        assert db.roundtrip(type_name, literal.encode(), 0, 0) is None, (type_name, literal)
        with pytest.raises(ValueFormatError):
            to_canonical(type_name, literal.encode(), 0, db.session())


@pytest.mark.parametrize("type_name", sorted(REFUSED))
def test_refused_literals_are_a_known_gap(db: Pg, type_name: str) -> None:
    for literal in REFUSED[type_name]:
        assert check_same_as_postgres(db, type_name, literal) == "we-refuse", literal


@pytest.mark.parametrize("type_name", sorted(VERSION_DEPENDENT))
def test_version_dependent_literals_are_refused(db: Pg, type_name: str) -> None:
    for literal in VERSION_DEPENDENT[type_name]:
        assert check_same_as_postgres(db, type_name, literal) in ("we-refuse", "both-reject")


def test_invalid_utf8_and_nul_rejected_like_postgres(db: Pg) -> None:
    for raw in (b"\xff", b"a\x00b", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80"):
        # libpq sends text-format parameters as C strings (cut at NUL), so
        # PostgreSQL's check is exercised through the binary format, which
        # runs the same client-encoding verification.
        assert db.roundtrip("text", raw, 1, 0) is None
        for fmt in (0, 1):
            with pytest.raises(ValueFormatError):
                to_canonical("text", raw, fmt, db.session())


def test_type_facts_match_pg_type(db: Pg) -> None:
    for name, info in TYPE_INFO.items():
        row = db.conn.execute(
            "SELECT oid::int, typlen::int, typarray::int FROM pg_type WHERE oid = %s::regtype",
            [name],
        ).fetchone()
        assert row == (info.oid, info.typlen, info.array_oid), name


# -- random values, binary in -------------------------------------------------------


def test_random_float_bits(db: Pg) -> None:
    rng = random.Random(20240301)
    for _ in range(1500):
        check_binary_value(db, "float8", rng.getrandbits(64).to_bytes(8, "big"))
        check_binary_value(db, "float4", rng.getrandbits(32).to_bytes(4, "big"))
    for _ in range(300):
        # Short decimals, where shortest-output ties and powers of two live.
        exp = rng.randint(-45, 38)
        literal = f"{rng.randint(1, 99999)}e{exp}"
        check_same_as_postgres(db, "float4", literal)
        check_same_as_postgres(db, "float8", f"{rng.randint(1, 10**17)}e{rng.randint(-330, 300)}")
    for k in range(-149, 128):
        check_binary_value(db, "float4", struct.pack(">f", 2.0**k))
    for k in range(-1074, 1024, 7):
        check_binary_value(db, "float8", struct.pack(">d", 2.0**k))


def test_extra_float_digits_zero_and_negative(db: Pg) -> None:
    rng = random.Random(7)
    for efd in (0, -3, -15, 3):
        db.set(f"SET extra_float_digits = {efd}")
        session = SessionFormat(timezone=db.session().timezone, extra_float_digits=efd)
        for _ in range(200):
            for type_name, width in (("float8", 64), ("float4", 32)):
                binary = rng.getrandbits(width).to_bytes(width // 8, "big")
                pg_text = db.roundtrip(type_name, binary, 1, 0)
                canonical = to_canonical(type_name, binary, 1, session)
                assert from_canonical(type_name, canonical, 0, session) == pg_text, binary.hex()
    db.set("RESET extra_float_digits")


def test_random_numeric(db: Pg) -> None:
    rng = random.Random(99)
    for _ in range(800):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 40)))
        point = rng.randint(0, len(digits))
        literal = f"{rng.choice(['', '-', '+'])}{digits[:point]}.{digits[point:]}"
        if rng.random() < 0.3:
            literal += f"e{rng.randint(-60, 60)}"
        if literal.strip("+-") == ".":
            continue
        assert check_same_as_postgres(db, "numeric", literal) == "ok", literal
    # Binary numerics with unnormalized digits, extra scale digits, negative zero.
    for _ in range(400):
        ndigits = rng.randint(0, 6)
        weight = rng.randint(-8, 8)
        sign = rng.choice([0x0000, 0x4000])
        dscale = rng.randint(0, 30)
        groups = [rng.choice([0, rng.randint(0, 9999)]) for _ in range(ndigits)]
        binary = struct.pack(f">HhHH{ndigits}H", ndigits, weight, sign, dscale, *groups)
        check_binary_value(db, "numeric", binary)
    for sign in (0xC000, 0xD000, 0xF000):
        check_binary_value(db, "numeric", struct.pack(">HhHH", 0, 0, sign, 0))
        check_binary_value(db, "numeric", struct.pack(">HhHHH", 1, 3, sign, 7, 5))
    check_binary_value(db, "numeric", struct.pack(">HhHHH", 1, 0, 0x1234, 0, 5))
    check_binary_value(db, "numeric", struct.pack(">HhHHH", 1, 0, 0, 0, 10000))


@pytest.mark.parametrize("zone", [*ZONES, "Europe/Dublin", "Australia/Lord_Howe"])
def test_random_timestamps(db: Pg, zone: str) -> None:
    db.set(f"SET TimeZone = '{zone}'")
    rng = random.Random(zone)
    lo, hi = -211813488000000000, 9223371331200000000
    recent_lo, recent_hi = -3_200_000_000_000_000, 2_300_000_000_000_000  # 1900..2073
    for i in range(700):
        if i % 3 == 0:
            usecs = rng.randrange(lo, hi)
        else:
            usecs = rng.randrange(recent_lo, recent_hi)
            if rng.random() < 0.5:
                usecs -= usecs % 1_000_000
        binary = usecs.to_bytes(8, "big", signed=True)
        check_binary_value(db, "timestamptz", binary)
        check_binary_value(db, "timestamp", binary)
        check_binary_value(db, "date", (usecs // 86_400_000_000).to_bytes(4, "big", signed=True))
        check_binary_value(db, "time", (usecs % 86_400_000_001).to_bytes(8, "big", signed=True))
    # Every half hour across both 2024 transitions, as wall-clock text.
    for day in ("2024-03-10", "2024-11-03", "2024-03-31", "2024-10-27", "2024-04-07",
                "2024-10-06"):
        for minute in range(0, 24 * 60, 30):
            literal = f"{day} {minute // 60:02d}:{minute % 60:02d}:00"
            assert check_same_as_postgres(db, "timestamptz", literal) == "ok", literal


def test_binary_edges(db: Pg) -> None:
    db.set("SET TimeZone = 'UTC'")
    for v in (-(2**31), 2**31 - 1, -2451545, -2451546, 2145031948, 2145031949):
        check_binary_value(db, "date", v.to_bytes(4, "big", signed=True))
    for v in (-(2**63), 2**63 - 1, -211813488000000000, -211813488000000001,
              9223371331199999999, 9223371331200000000):
        check_binary_value(db, "timestamp", v.to_bytes(8, "big", signed=True))
        check_binary_value(db, "timestamptz", v.to_bytes(8, "big", signed=True))
    for v in (-1, 0, 86_400_000_000, 86_400_000_001):
        check_binary_value(db, "time", v.to_bytes(8, "big", signed=True))
    for b in (b"\x00", b"\x01", b"\x02", b"\xff"):
        check_binary_value(db, "bool", b)
    check_binary_value(db, "jsonb", b'\x01{"b":1,"a":[1.0]}')
    check_binary_value(db, "json", b' {"b":1} ')
    check_binary_value(db, "bytea", bytes(range(256)))
    check_binary_value(db, "float8", bytes.fromhex("7ff0000000000001"))
    check_binary_value(db, "float8", bytes.fromhex("fff8000000000000"))
    check_binary_value(db, "int2", b"\x80\x00")


def test_bytea_escape_output(db: Pg) -> None:
    db.set("SET bytea_output = 'escape'")
    try:
        session = SessionFormat(bytea_output="escape")
        value = bytes(range(256)) + b"\\"
        canonical = to_canonical("bytea", value, 1, session)
        assert from_canonical("bytea", canonical, 0, session) == db.roundtrip("bytea", value, 1, 0)
    finally:
        db.set("RESET bytea_output")


def test_posix_session_time_zones(db: Pg) -> None:
    for setting in ("SET TIME ZONE 5.5", "SET TIME ZONE INTERVAL '-03:00' HOUR TO MINUTE",
                    "SET TimeZone = 'UTC+3'", "SET TimeZone = 'Etc/GMT-14'"):
        db.set(setting)
        for literal in ("2024-03-01 12:00:00", "2024-03-01 12:00:00+02", "1850-01-01 00:00:00"):
            assert check_same_as_postgres(db, "timestamptz", literal) == "ok", (setting, literal)

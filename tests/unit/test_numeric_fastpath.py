"""numeric_text / numeric_from_text against `decimal`, over seeded random sweeps.

test_values_fastpaths.py compares the numeric codec with a frozen copy of its old
algorithm on hypothesis-drawn inputs. This file adds an oracle built another way,
from `decimal.Decimal` (numeric_out: the value with exactly dscale digits after the
point, stored digits past dscale cut off, no exponent, zero without a sign), and
deterministic sweeps aimed at the edges of the fast paths in `_numbers`: the group
count and decimal shift bounds of numeric_text's integer path, weights below zero,
dscale shorter or longer than the stored digits, zero and trailing zero groups, and
the text length and spellings numeric_from_text's fast path hands to the regex.
"""

from __future__ import annotations

import random
import struct
from decimal import MAX_EMAX, MIN_EMIN, ROUND_DOWN, Context, Decimal

import pytest

from proxy.crypto import _numbers
from proxy.crypto._errors import ValueFormatError
from proxy.crypto._numbers import numeric_from_text, numeric_text
from tests.unit.test_values_fastpaths import (
    assert_same,
    ref_numeric_from_text,
    ref_numeric_text,
)

# Exact for every value below: no rounding ever happens in this context.
EXACT = Context(prec=200_000, Emax=MAX_EMAX, Emin=MIN_EMIN)
POS, NEG, NAN, PINF, NINF = 0x0000, 0x4000, 0xC000, 0xD000, 0xF000
SPACES = " \t\n\r\v\f"


# == the Decimal oracle ==================================================================


def stored_value(groups: tuple[int, ...], weight: int) -> Decimal:
    """The magnitude the base-10000 digits stand for, digit at position weight first."""
    total = Decimal(0)
    for i, group in enumerate(groups):
        total = EXACT.add(total, Decimal(group).scaleb(4 * (weight - i), EXACT))
    return total


def out_text(negative: bool, magnitude: Decimal, dscale: int) -> str:
    """numeric_out: exactly dscale decimals (truncated), plain notation, no '-0'."""
    shown = magnitude.quantize(Decimal(1).scaleb(-dscale), rounding=ROUND_DOWN, context=EXACT)
    text = format(shown, "f")
    return "-" + text if negative and shown else text


def decimal_text(data: bytes) -> str:
    ndigits, weight, sign, dscale = struct.unpack_from(">HhHH", data)
    special = {NAN: "NaN", PINF: "Infinity", NINF: "-Infinity"}
    if sign in special:
        return special[sign]
    groups = struct.unpack_from(f">{ndigits}H", data, 8)
    return out_text(sign == NEG, stored_value(groups, weight), dscale)


def parse(text: str) -> tuple[Decimal, int]:
    """numeric_in's value and display scale (digits after the point less the exponent)."""
    value = Decimal(text.strip(SPACES))
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)
    return value, max(0, -exponent)


def decimal_normalize(text: str) -> str:
    value, dscale = parse(text)
    return out_text(value < 0, value.copy_abs(), dscale)


def decimal_binary(text: str) -> bytes:
    """The normalized binary numeric, its base-10000 digits found by Decimal division."""
    value, dscale = parse(text)
    rest = value.copy_abs()
    if not rest:
        return struct.pack(">HhHH", 0, 0, POS, dscale)
    weight = rest.adjusted() // 4  # position of the leading base-10000 digit
    groups = []
    position = weight
    while rest:  # stops at the last nonzero digit: no trailing zero groups
        unit = Decimal(1).scaleb(4 * position, EXACT)
        group = int(EXACT.divide_int(rest, unit))
        groups.append(group)
        rest = EXACT.subtract(rest, EXACT.multiply(Decimal(group), unit))
        position -= 1
    sign = NEG if value < 0 else POS
    return struct.pack(f">HhHH{len(groups)}H", len(groups), weight, sign, dscale, *groups)


def pack(groups: list[int], weight: int, sign: int, dscale: int) -> bytes:
    return struct.pack(f">HhHH{len(groups)}H", len(groups), weight, sign, dscale, *groups)


# == the oracle itself, on values whose text is known ====================================


@pytest.mark.parametrize(
    ("binary", "text"),
    [
        (pack([3325, 9800], 0, POS, 2), "3325.98"),
        (pack([100], -1, NEG, 2), "-0.01"),
        (pack([], 0, POS, 3), "0.000"),
        (pack([1], 3, POS, 0), "1000000000000"),
        (pack([1, 5000], 0, POS, 0), "1"),  # digits past dscale are cut off
        (pack([1, 9999], 0, NEG, 2), "-1.99"),
        (pack([5000], -1, NEG, 0), "0"),  # -0.5 cut to no decimals: no '-0'
        (pack([12], -2, POS, 10), "0.0000001200"),
    ],
)
def test_decimal_oracle(binary: bytes, text: str) -> None:
    assert decimal_text(binary) == text


# == numeric_text ========================================================================


def random_binary(rng: random.Random) -> bytes:
    """Mostly valid numerics around the fast path's bounds, some not normalized."""
    ndigits = rng.choice([0, 1, 1, 2, 2, 3, 4, 7, 8, 9, 12, 33])
    groups = [rng.choice([0, 1, 9999, rng.randrange(10000)]) for _ in range(ndigits)]
    if ndigits and rng.random() < 0.7:  # normalized: no zero digit first or last
        groups[0] = groups[0] or rng.randrange(1, 10000)
        groups[-1] = groups[-1] or rng.randrange(1, 10000)
    dscale = rng.choice([0, 0, 1, 2, 4, rng.randrange(40), rng.randrange(200), 16383])
    weight = rng.choice([rng.randrange(-6, 6), rng.randrange(-40, 40), rng.randrange(-300, 300)])
    if rng.random() < 0.3:
        # Put the last stored digit right at numeric_text's shift bound or beside it.
        shift = rng.choice([-65, -64, -63, -1, 0, 1, 63, 64, 65])
        weight = (shift - dscale) // 4 + ndigits - 1
        weight = max(-(2**15), min(2**15 - 1, weight))
    sign = rng.choice([POS, POS, NEG, NEG, NAN, PINF, NINF])
    return pack(groups, weight, sign, dscale)


def test_numeric_text_matches_decimal() -> None:
    rng = random.Random(20240611)
    for _ in range(6000):
        binary = random_binary(rng)
        ndigits, weight, sign, dscale = struct.unpack_from(">HhHH", binary)
        expected = decimal_text(binary)
        if sign == NEG and expected[:1] != "-":
            # A negative value cut to zero by dscale. Never canonical (numeric_recv
            # and numeric_in normalize it to +0); numeric_text keeps the sign.
            expected = "-" + expected
        assert numeric_text(binary) == expected, (ndigits, weight, sign, dscale, binary.hex())
        assert numeric_text(binary) == ref_numeric_text(binary)
        # What numeric_recv makes of it prints the same, without any '-0'.
        canonical = _numbers.numeric_from_binary(binary)
        assert numeric_text(canonical) == decimal_text(canonical), binary.hex()


def test_numeric_text_malformed_matches_old_algorithm() -> None:
    """Groups above 9999, odd signs, short buffers: byte-for-byte as before."""
    rng = random.Random(7)
    cases = [
        pack([10000], 0, POS, 2),
        pack([1, 65535], 0, NEG, 4),
        pack([0, 10000, 5], -1, POS, 9),
        pack([9999] * 8, 3, POS, 0),
        pack([5000], -1, NEG, 0),  # '-0'
        pack([], 0, NEG, 2),  # '-0.00'
        pack([0, 0, 7, 0], 1, POS, 3),  # leading and trailing zero digits
        pack([1], 0, 0x1234, 1),  # not a known sign: printed as positive
        struct.pack(">HhHH", 3, 0, POS, 0),  # digits announced, none sent
        b"\x00\x01",
    ]
    for _ in range(3000):
        binary = random_binary(rng)
        if len(binary) > 8 and rng.random() < 0.5:
            at = 8 + 2 * rng.randrange((len(binary) - 8) // 2)  # one of the digits
            bad = struct.pack(">H", rng.choice([10000, 32767, 65535]))
            binary = binary[:at] + bad + binary[at + 2 :]
        elif rng.random() < 0.1:
            binary = binary[: rng.randrange(len(binary) + 1)]
        cases.append(binary)
    for binary in cases:
        assert_same(numeric_text, ref_numeric_text, binary)


# == numeric_from_text and the round trip =================================================


def random_numeric_text(rng: random.Random) -> str:
    whole = "".join(rng.choices("0123456789", k=rng.choice([0, 1, 1, 2, 4, 7, 12, 25])))
    frac = "".join(rng.choices("0123456789", k=rng.randrange(21)))
    if rng.random() < 0.2:
        whole = "0" * rng.randrange(1, 6) + whole
    if rng.random() < 0.2:
        frac += "0" * rng.randrange(1, 6)
    if not whole and not frac:
        whole = "0"
    point = "." if frac or rng.random() < 0.2 else ""
    text = rng.choice(["", "", "", "-", "-", "+"]) + whole + point + frac
    if rng.random() < 0.25:
        text += rng.choice("eE") + rng.choice(["", "+", "-"]) + str(rng.randrange(25))
    if rng.random() < 0.05:
        text = rng.choice(SPACES) + text + rng.choice(["", " "])
    return text


def round_trip_texts() -> list[str]:
    rng = random.Random(1234)
    texts = [random_numeric_text(rng) for _ in range(6000)]
    texts += [
        "3325.98", "-0.01", "12", "1234567.8900", "0", "-0", "-0.000", ".5", "-.5", "5.",
        "000123.4500", "1.5e3", "-12E-4", "0e5", "1e-60", "1e60", "1e64", "-1e-64",
        "99999999.9999", "100000000", "0.0001", "-9999", "10000", "1" * 125, "1" * 126,
        "0." + "0" * 122 + "1", "-" + "9" * 60 + "." + "9" * 64,
    ]
    return texts


def test_numeric_from_text_and_text_match_decimal() -> None:
    for text in round_trip_texts():
        binary = numeric_from_text(text)
        assert binary == decimal_binary(text), text
        assert binary == ref_numeric_from_text(text), text
        assert numeric_text(binary) == decimal_normalize(text), text


@pytest.mark.parametrize(
    "text",
    [
        "", "-", "+", ".", "-.", "--1", "+-1", "1.2.3", "1..2", "1-", "1_000", "0x10",
        "1e", "1e+", " ", "1 2", "\u0661\u0662", "1\u00b2", "\uff11", "1.\u0663", "-\u00a01",
        "1" * 200 + "x", "nan", "-Infinity", " +inf ", "NaN(1)",
    ],
)
def test_numeric_from_text_fast_path_leaves_the_rest_to_the_regex(text: str) -> None:
    """Spellings the fast path does not take: errors and specials stay as they were."""
    assert_same(numeric_from_text, ref_numeric_from_text, text)


@pytest.mark.parametrize(
    "text",
    [
        "0." + "0" * 16382 + "1",
        "-0." + "0" * 16383 + "1",  # dscale above 16383
        "9" * 131072,
        "-1" + "0" * 131072,  # weight above 32767
        "-" + "12345678" * 40 + "." + "9" * 300,
    ],
)
def test_numeric_from_text_fast_path_long_texts(text: str) -> None:
    """No length limit on the fast path: the packer's own checks decide, as before."""
    assert_same(numeric_from_text, ref_numeric_from_text, text)
    assert_same(
        _numbers.numeric_normalize_text, lambda t: ref_numeric_text(ref_numeric_from_text(t)), text
    )


def test_numeric_from_text_rejects_non_ascii_digits() -> None:
    # str.isdigit() alone takes these; numeric_in does not.
    for text in ("\u00b2", "1\u00b3", "\u0661", "-\u0966.5"):
        with pytest.raises(ValueFormatError):
            numeric_from_text(text)

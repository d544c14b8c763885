"""Integers, floats and numeric: PostgreSQL's exact input rules and output text.

Every parser here accepts a subset of what PostgreSQL 15 accepts and, for
that subset, produces exactly the value PostgreSQL would store; anything
else raises ValueFormatError. Every formatter produces byte-for-byte what
PostgreSQL prints (float output with extra_float_digits > 0 is the shortest
round-trip form, as in PostgreSQL 12 and later).
"""

from __future__ import annotations

import math
import re
import struct
from fractions import Fraction
from typing import Final

from proxy.crypto._errors import (
    DATA_CORRUPTED,
    INVALID_BINARY_REPRESENTATION,
    NUMERIC_VALUE_OUT_OF_RANGE,
    ValueFormatError,
    bad_binary,
    bad_syntax,
    out_of_range,
)

# PostgreSQL's isspace() in the C locale.
PG_SPACE: Final = " \t\n\r\v\f"

# -- integers -----------------------------------------------------------------

_INT_RE: Final = re.compile(r"[ \t\n\r\v\f]*([+-]?)([0-9]+)[ \t\n\r\v\f]*")

INT_BOUNDS: Final = {
    "int2": (-(2**15), 2**15 - 1),
    "int4": (-(2**31), 2**31 - 1),
    "int8": (-(2**63), 2**63 - 1),
}


def parse_int(text: str, type_name: str) -> int:
    """pg_strtoint16/32/64: optional spaces and sign, ASCII decimal digits only.

    PostgreSQL 16 also takes 0x/0o/0b prefixes and underscores; 15 does not,
    and neither do we (refusing is the safe side).
    """
    m = _INT_RE.fullmatch(text)
    if m is None:
        raise bad_syntax(type_name)
    digits = m.group(2).lstrip("0") or "0"
    lo, hi = INT_BOUNDS[type_name]
    # 19 digits bound int8; checking length first keeps int() away from
    # megabyte-long digit strings.
    if len(digits) > 19:
        raise out_of_range(type_name)
    value = int(digits)
    if m.group(1) == "-":
        value = -value
    if not lo <= value <= hi:
        raise out_of_range(type_name)
    return value


# -- floats -------------------------------------------------------------------

# What glibc strtod() reads as a decimal number, minus hex floats and
# nan(...)/inf spellings (handled separately below).
_FLOAT_RE: Final = re.compile(
    r"[ \t\n\r\v\f]*([+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)[ \t\n\r\v\f]*"
)
_FLOAT_SPECIALS: Final = {
    "nan": math.nan,
    "infinity": math.inf,
    "+infinity": math.inf,
    "-infinity": -math.inf,
    "inf": math.inf,
    "+inf": math.inf,
    "-inf": -math.inf,
}

# The NaN PostgreSQL stores for the text 'NaN' on x86-64 (C's NAN macro).
FLOAT8_NAN_BITS: Final = 0x7FF8_0000_0000_0000
FLOAT4_NAN_BITS: Final = 0x7FC0_0000

_F32: Final = struct.Struct(">f")
_U32: Final = struct.Struct(">I")
_F64: Final = struct.Struct(">d")
_U64: Final = struct.Struct(">Q")

_FLT_MAX: Final = float(_F32.unpack(b"\x7f\x7f\xff\xff")[0])
# Halfway between FLT_MAX and 2**128: the float32 rounding edge to infinity.
_FLT_OVERFLOW_EDGE: Final = (_FLT_MAX + 2.0**128) / 2


def _float_token(text: str, type_name: str) -> tuple[str | None, float]:
    """Return (decimal token, its nearest double), or (None, special value)."""
    m = _FLOAT_RE.fullmatch(text)
    if m is None:
        special = _FLOAT_SPECIALS.get(text.strip(PG_SPACE).lower())
        if special is None:
            # Includes 'nan(...)', '-nan', hex floats and '1e': glibc may take
            # some of them, but exactly how varies; refuse instead of guessing.
            raise bad_syntax(type_name)
        return None, special
    token = m.group(1)
    return token, float(token)


def _mantissa_is_zero(token: str) -> bool:
    mantissa = token.split("e")[0].split("E")[0]
    return not any(c in "123456789" for c in mantissa)


def _f64_bits(x: float) -> int:
    return int(_U64.unpack(_F64.pack(x))[0])


def parse_float8(text: str) -> int:
    """float8in: return the IEEE-754 bits PostgreSQL would store."""
    token, value = _float_token(text, "double precision")
    if token is None:
        return FLOAT8_NAN_BITS if math.isnan(value) else _f64_bits(value)
    # float() is correctly rounded, like glibc's strtod; what PostgreSQL adds
    # is the ERANGE check: overflow to infinity or underflow to zero is an
    # error (denormal results are fine).
    if math.isinf(value) or (value == 0.0 and not _mantissa_is_zero(token)):
        raise out_of_range("double precision")
    return _f64_bits(value)


def _f32_bits(x: float) -> int:
    return int(_U32.unpack(_F32.pack(x))[0])


def _f32_from_bits(bits: int) -> float:
    return float(_F32.unpack(_U32.pack(bits))[0])


def _round_to_f32(token: str, d: float) -> float:
    """Round the decimal `token` (nearest double `d`) to float32 exactly as strtof.

    Going decimal -> double -> float32 rounds twice. The result differs from
    a single correct rounding only when `d` lands exactly on a midpoint
    between two float32 values; then the exact decimal decides.
    """
    negative = token.startswith("-")
    a = abs(d)
    if a > _FLT_MAX:
        if a < _FLT_OVERFLOW_EDGE:
            result = _FLT_MAX
        elif a > _FLT_OVERFLOW_EDGE or abs(Fraction(token)) >= Fraction(_FLT_OVERFLOW_EDGE):
            return math.copysign(math.inf, -1.0 if negative else 1.0)
        else:
            result = _FLT_MAX
        return -result if negative else result
    f = float(_F32.unpack(_F32.pack(a))[0])
    if f != a:
        bits = _f32_bits(f)
        other = _f32_from_bits(bits + 1 if f < a else bits - 1)
        lo, hi = (f, other) if f < a else (other, f)
        if a * 2 == lo + hi:
            # Exactly on a float32 midpoint as a double: decide with the decimal.
            exact = abs(Fraction(token))
            mid = Fraction(a)
            if exact < mid:
                f = lo
            elif exact > mid:
                f = hi
            else:
                f = lo if _f32_bits(lo) % 2 == 0 else hi
    return -f if negative else f


def parse_float4(text: str) -> int:
    """float4in (strtof): return the IEEE-754 single bits PostgreSQL would store."""
    token, value = _float_token(text, "real")
    if token is None:
        return FLOAT4_NAN_BITS if math.isnan(value) else _f32_bits(value)
    f = _round_to_f32(token, value)
    if math.isinf(f) or (f == 0.0 and not _mantissa_is_zero(token)):
        raise out_of_range("real")
    return _f32_bits(f)


# -- float output: PostgreSQL's Ryu (src/common/d2s.c, f2s.c), exact ints ----
#
# PostgreSQL prints the shortest decimal strictly inside the rounding
# interval of the value (its Ryu copy is built with STRICTLY_SHORTEST 0, so
# an exact midpoint is never printed: 1e23 prints as 9.999999999999999e+22),
# nearest to the value, and integers below 2**53 (2**24) exactly. The ports
# below follow the C code step by step; where it multiplies by a table of
# powers of five and shifts, Python computes the same floor exactly.


def _log10_pow2(e: int) -> int:
    return (e * 78913) >> 18


def _log10_pow5(e: int) -> int:
    return (e * 732923) >> 20


def _pow5_factor(value: int) -> int:
    count = 0
    while value % 5 == 0:
        value //= 5
        count += 1
    return count


def _shortest_digits(
    mv: int, mp: int, mm: int, vr: int, vp: int, vm: int, e10: int,
    vm_trailing_zeros: bool, vr_trailing_zeros: bool, last_removed: int,
) -> tuple[int, int]:
    """Step 4 of Ryu (acceptBounds false): returns (decimal mantissa, exponent)."""
    removed = 0
    if vm_trailing_zeros or vr_trailing_zeros:
        while vp // 10 > vm // 10:
            vm_trailing_zeros &= vm % 10 == 0
            vr_trailing_zeros &= last_removed == 0
            last_removed = vr % 10
            vr //= 10
            vp //= 10
            vm //= 10
            removed += 1
        if vm_trailing_zeros:
            while vm % 10 == 0:
                vr_trailing_zeros &= last_removed == 0
                last_removed = vr % 10
                vr //= 10
                vp //= 10
                vm //= 10
                removed += 1
        if vr_trailing_zeros and last_removed == 5 and vr % 2 == 0:
            last_removed = 4  # round half to even on an exact ...50..0
        # acceptBounds is false: vr == vm is outside the (open) interval.
        output = vr + (1 if vr == vm or last_removed >= 5 else 0)
    else:
        while vp // 10 > vm // 10:
            last_removed = vr % 10
            vr //= 10
            vp //= 10
            vm //= 10
            removed += 1
        output = vr + (1 if vr == vm or last_removed >= 5 else 0)
    return output, e10 + removed


def _d2d(ieee_mantissa: int, ieee_exponent: int) -> tuple[int, int]:
    if ieee_exponent == 0:
        e2 = 1 - 1023 - 52 - 2
        m2 = ieee_mantissa
    else:
        e2 = ieee_exponent - 1023 - 52 - 2
        m2 = (1 << 52) | ieee_mantissa
    mv = 4 * m2
    mm_shift = 1 if ieee_mantissa != 0 or ieee_exponent <= 1 else 0
    mp = mv + 2
    mm = mv - 1 - mm_shift
    vm_tz = vr_tz = False
    if e2 >= 0:
        q = _log10_pow2(e2) - (1 if e2 > 3 else 0)
        e10 = q
        div = 10**q
        vr, vp, vm = (mv << e2) // div, (mp << e2) // div, (mm << e2) // div
        if q <= 21:
            if mv % 5 == 0:
                vr_tz = _pow5_factor(mv) >= q
            elif _pow5_factor(mp) >= q:
                vp -= 1
    else:
        q = _log10_pow5(-e2) - (1 if -e2 > 1 else 0)
        i = -e2 - q
        e10 = q + e2
        mul = 5**i
        vr, vp, vm = (mv * mul) >> q, (mp * mul) >> q, (mm * mul) >> q
        if q <= 1:
            vr_tz = True
            vp -= 1
        elif q < 63:
            vr_tz = mv & ((1 << (q - 1)) - 1) == 0
    return _shortest_digits(mv, mp, mm, vr, vp, vm, e10, vm_tz, vr_tz, 0)


def _f2d(ieee_mantissa: int, ieee_exponent: int) -> tuple[int, int]:
    if ieee_exponent == 0:
        e2 = 1 - 127 - 23 - 2
        m2 = ieee_mantissa
    else:
        e2 = ieee_exponent - 127 - 23 - 2
        m2 = (1 << 23) | ieee_mantissa
    mv = 4 * m2
    mp = 4 * m2 + 2
    mm_shift = 1 if ieee_mantissa != 0 or ieee_exponent <= 1 else 0
    mm = 4 * m2 - 1 - mm_shift
    vm_tz = vr_tz = False
    last_removed = 0
    if e2 >= 0:
        q = _log10_pow2(e2)
        e10 = q
        div = 10**q
        vr, vp, vm = (mv << e2) // div, (mp << e2) // div, (mm << e2) // div
        if q != 0 and (vp - 1) // 10 <= vm // 10:
            last_removed = ((mv << e2) // 10 ** (q - 1)) % 10
        if q <= 9:
            if mv % 5 == 0:
                vr_tz = _pow5_factor(mv) >= q
            elif _pow5_factor(mp) >= q:
                vp -= 1
    else:
        q = _log10_pow5(-e2)
        e10 = q + e2
        i = -e2 - q
        mul = 5**i
        vr, vp, vm = (mv * mul) >> q, (mp * mul) >> q, (mm * mul) >> q
        if q != 0 and (vp - 1) // 10 <= vm // 10:
            last_removed = ((mv * mul * 5) >> (q - 1)) % 10
        if q <= 1:
            vr_tz = True
            vp -= 1
        elif q < 31:
            vr_tz = mv & ((1 << (q - 1)) - 1) == 0
    return _shortest_digits(mv, mp, mm, vr, vp, vm, e10, vm_tz, vr_tz, last_removed)


def _small_int(ieee_mantissa: int, ieee_exponent: int, bias: int, bits: int) -> int | None:
    """d2d_small_int/f2d_small_int: an integer below 2**(bits+1) is printed exactly."""
    e2 = ieee_exponent - bias - bits
    if -bits <= e2 <= 0 and ieee_mantissa & ((1 << -e2) - 1) == 0:
        return ((1 << bits) | ieee_mantissa) >> -e2
    return None


def _ryu_layout(negative: bool, output: int, exponent: int, fixed_below: int) -> str:
    """to_chars(): fixed notation for display exponents -4 .. fixed_below-1,
    otherwise d[.ddd]e[+-]XX (at least two exponent digits)."""
    digits = str(output)
    olength = len(digits)
    display_exp = exponent + olength - 1
    sign = "-" if negative else ""
    if -4 <= display_exp < fixed_below:
        point = exponent + olength
        if point <= 0:
            return f"{sign}0.{'0' * -point}{digits}"
        if exponent < 0:
            return f"{sign}{digits[:point]}.{digits[point:]}"
        return f"{sign}{digits}{'0' * exponent}"
    if exponent == 0:
        # The small-integer path may leave trailing zeros in the mantissa.
        digits = digits.rstrip("0")
    mantissa = digits if len(digits) == 1 else f"{digits[0]}.{digits[1:]}"
    return f"{sign}{mantissa}e{'-' if display_exp < 0 else '+'}{abs(display_exp):02d}"


def float8_text(bits: int, extra_float_digits: int) -> str:
    """float8out: what PostgreSQL prints for the double with these bits."""
    x = _F64.unpack(_U64.pack(bits))[0]
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    if extra_float_digits <= 0:
        return _printf_g(x, max(1, 15 + extra_float_digits))
    if x == 0:
        return "-0" if bits >> 63 else "0"
    mantissa, exponent = bits & ((1 << 52) - 1), (bits >> 52) & 0x7FF
    small = _small_int(mantissa, exponent, 1023, 52)
    output, exp = (small, 0) if small is not None else _d2d(mantissa, exponent)
    return _ryu_layout(bool(bits >> 63), output, exp, 15)


def float4_text(bits: int, extra_float_digits: int) -> str:
    """float4out: what PostgreSQL prints for the float32 with these bits."""
    x = _f32_from_bits(bits)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    if extra_float_digits <= 0:
        return _printf_g(x, max(1, 6 + extra_float_digits))
    if x == 0:
        return "-0" if bits >> 31 else "0"
    mantissa, exponent = bits & ((1 << 23) - 1), (bits >> 23) & 0xFF
    small = _small_int(mantissa, exponent, 127, 23)
    output, exp = (small, 0) if small is not None else _f2d(mantissa, exponent)
    return _ryu_layout(bool(bits >> 31), output, exp, 6)


def _printf_g(x: float, precision: int) -> str:
    # Python's 'g' follows C's %g (exponent with at least two digits, no
    # trailing zeros), which is what pg_strfromd produces.
    return f"{x:.{precision}g}"


# -- numeric ------------------------------------------------------------------

NUMERIC_POS: Final = 0x0000
NUMERIC_NEG: Final = 0x4000
NUMERIC_NAN: Final = 0xC000
NUMERIC_PINF: Final = 0xD000
NUMERIC_NINF: Final = 0xF000
_NUMERIC_SIGNS: Final = frozenset(
    {NUMERIC_POS, NUMERIC_NEG, NUMERIC_NAN, NUMERIC_PINF, NUMERIC_NINF}
)
_NUMERIC_SPECIAL_TEXT: Final = {
    NUMERIC_NAN: "NaN",
    NUMERIC_PINF: "Infinity",
    NUMERIC_NINF: "-Infinity",
}

NUMERIC_DSCALE_MAX: Final = 0x3FFF
NUMERIC_WEIGHT_MAX: Final = 0x7FFF
NUMERIC_WEIGHT_MIN: Final = -0x8000
_NUMERIC_HEAD: Final = struct.Struct(">HhHH")

# Numerics of up to _SHORT_GROUPS base-10000 digits (128 decimal digits) are the
# usual case: their Structs are built once here rather than from a format string on
# every call (struct's own format cache costs a string build and a lookup per call).
# Longer ones use struct's module functions, as before.
_SHORT_GROUPS: Final = 32
_NUMERIC_STRUCTS: Final = tuple(struct.Struct(f">HhHH{n}H") for n in range(_SHORT_GROUPS + 1))
_UNSIGNED_GROUPS: Final = tuple(struct.Struct(f">{n}H") for n in range(_SHORT_GROUPS + 1))
_SIGNED_GROUPS: Final = tuple(struct.Struct(f">{n}h") for n in range(_SHORT_GROUPS + 1))
# Up to this many decimal digits (plus at most 3 of alignment) a value fits
# _SHORT_GROUPS groups, and int() of it is far below Python's digit limit.
_SHORT_DIGITS: Final = 4 * _SHORT_GROUPS - 3
_ALIGN: Final = (1, 10, 100, 1000)
# numeric_text's integer path: values of up to _FAST_GROUPS groups whose last
# stored digit is within _FAST_SHIFT decimal places of the display scale, so
# the integer it prints stays short (far from int-to-str's quadratic sizes).
_FAST_GROUPS: Final = 8
_FAST_SHIFT: Final = 64
_POW10: Final = tuple(10**i for i in range(_FAST_SHIFT))

_NUMERIC_RE: Final = re.compile(
    r"[ \t\n\r\v\f]*([+-]?)(?:([0-9]+)(?:\.([0-9]*))?|\.([0-9]+))(?:[eE]([+-]?[0-9]+))?"
    r"[ \t\n\r\v\f]*"
)
_NUMERIC_SPECIALS: Final = {
    "nan": NUMERIC_NAN,
    "infinity": NUMERIC_PINF,
    "+infinity": NUMERIC_PINF,
    "-infinity": NUMERIC_NINF,
    "inf": NUMERIC_PINF,
    "+inf": NUMERIC_PINF,
    "-inf": NUMERIC_NINF,
}
# numeric_in's own guard on the exponent (INT_MAX / 2).
_NUMERIC_EXPONENT_LIMIT: Final = 2**31 // 2 - 1


def _numeric_overflow() -> ValueFormatError:
    return ValueFormatError("value overflows numeric format", NUMERIC_VALUE_OUT_OF_RANGE)


def _bad_numeric_field(field: str) -> ValueFormatError:
    return ValueFormatError(
        f'invalid {field} in external "numeric" value', INVALID_BINARY_REPRESENTATION
    )


def _numeric_special(sign: int) -> bytes:
    # numeric_send reads the special value's header through the short-format
    # macros, so the dscale field carries header bits: 0 for NaN, 32 for +-Inf.
    return _NUMERIC_HEAD.pack(0, 0, sign, (sign & 0x1F80) >> 7)


def _numeric_pack(negative: bool, digits: str, dexp: int, dscale: int) -> bytes:
    """Build PostgreSQL's normalized binary numeric for int(digits) * 10**dexp.

    `digits` holds ASCII decimal digits only (possibly none).

    Normalized as make_result() leaves it: no leading or trailing zero base-10000
    digits, zero is positive with weight 0; dscale kept as given.
    """
    if dscale > NUMERIC_DSCALE_MAX:
        raise _numeric_overflow()
    if len(digits) <= _SHORT_DIGITS:
        # The usual, short case. Read the digits as one integer, align its last
        # digit to a base-10000 boundary (multiply by 10**(dexp % 4)), drop the
        # zero base-10000 digits at the end and divide the rest into base-10000
        # digits: one int() and a few divisions are cheaper than stripping,
        # padding and slicing.
        value: int = int(digits) if digits else 0
        if not value:
            return _NUMERIC_HEAD.pack(0, 0, NUMERIC_POS, dscale)
        shift = dexp % 4
        value *= _ALIGN[shift]
        dexp -= shift
        while not value % 10000:
            value //= 10000
            dexp += 4
        groups: list[int] = []
        while value > 0:  # not `while value`: it would never end for a negative one
            groups.append(value % 10000)
            value //= 10000
        groups.reverse()
    else:
        # Up to 131072 digits (past int()'s digit limit): strip, pad and slice.
        stripped = digits.lstrip("0")
        if not stripped:
            return _NUMERIC_HEAD.pack(0, 0, NUMERIC_POS, dscale)
        significant = stripped.rstrip("0")
        dexp += len(stripped) - len(significant)
        # Align the last digit to a base-10000 boundary, then pad on the left.
        shift = dexp % 4
        significant += "0" * shift
        dexp -= shift
        significant = "0" * (-len(significant) % 4) + significant
        groups = [int(significant[i : i + 4]) for i in range(0, len(significant), 4)]
    ndigits = len(groups)
    weight = dexp // 4 + ndigits - 1
    if weight > NUMERIC_WEIGHT_MAX or weight < NUMERIC_WEIGHT_MIN:
        raise _numeric_overflow()
    sign = NUMERIC_NEG if negative else NUMERIC_POS
    if ndigits <= _SHORT_GROUPS:
        return _NUMERIC_STRUCTS[ndigits].pack(ndigits, weight, sign, dscale, *groups)
    return _NUMERIC_HEAD.pack(ndigits, weight, sign, dscale) + struct.pack(
        f">{ndigits}H", *groups
    )


def numeric_from_text(text: str) -> bytes:
    """numeric_in: the normalized binary numeric PostgreSQL would store.

    The display scale is kept ('1.50' stays 1.50), the exponent applied
    ('1.5e3' is 1500 with scale 0), '-0' becomes 0.
    """
    if text.isascii():
        # The usual spelling, '-123.45': an optional '-', then digits around at
        # most one point. On ASCII, isdigit() is [0-9]+, so it holds exactly when
        # both parts are digits or empty and not both empty, as the regex wants;
        # the call below is then the one the regex path makes. Anything else
        # (spaces, '+', an exponent, a special) takes the regex.
        negative = text.startswith("-")
        # (Names of their own: mypyc types a local by its first assignment, and the
        # regex path below assigns None to its whole and frac.)
        int_part, _point, frac_part = (text[1:] if negative else text).partition(".")
        all_digits = int_part + frac_part
        if all_digits.isdigit():
            return _numeric_pack(negative, all_digits, -len(frac_part), len(frac_part))
    m = _NUMERIC_RE.fullmatch(text)
    if m is None:
        special = _NUMERIC_SPECIALS.get(text.strip(PG_SPACE).lower())
        if special is None:
            raise bad_syntax("numeric")
        return _numeric_special(special)
    sign, whole, frac, only_frac, exponent = m.groups()
    if only_frac is not None:
        whole, frac = "", only_frac
    elif frac is None:
        frac = ""
    scale = len(frac)
    if exponent is None:
        # The usual spelling: the digits after the point are the display scale.
        return _numeric_pack(sign == "-", whole + frac, -scale, scale)
    body = exponent.lstrip("+-").lstrip("0")
    if len(body) > 10:
        raise _numeric_overflow()
    exp = int(exponent)
    if abs(exp) >= _NUMERIC_EXPONENT_LIMIT:
        raise _numeric_overflow()
    return _numeric_pack(sign == "-", whole + frac, exp - scale, max(0, scale - exp))


def numeric_from_binary(data: bytes) -> bytes:
    """numeric_recv: validate, truncate to dscale, normalize (like make_result)."""
    if len(data) < _NUMERIC_HEAD.size:
        raise bad_binary("numeric")
    ndigits, weight, sign, dscale = _NUMERIC_HEAD.unpack_from(data)
    if len(data) != _NUMERIC_HEAD.size + 2 * ndigits:
        raise bad_binary("numeric")
    if sign not in _NUMERIC_SIGNS:
        raise _bad_numeric_field("sign")
    if dscale > NUMERIC_DSCALE_MAX:
        raise _bad_numeric_field("scale")
    if ndigits <= _SHORT_GROUPS:
        groups = _SIGNED_GROUPS[ndigits].unpack_from(data, _NUMERIC_HEAD.size)
    else:
        groups = struct.unpack_from(f">{ndigits}h", data, _NUMERIC_HEAD.size)
    if groups and (min(groups) < 0 or max(groups) >= 10000):
        raise _bad_numeric_field("digit")
    if sign not in (NUMERIC_POS, NUMERIC_NEG):
        return _numeric_special(sign)
    # One %-format for all groups: each is 0..9999, printed as exactly 4 digits.
    digits = ("%04d" * ndigits) % groups
    dexp = 4 * (weight - ndigits + 1)
    if dexp < -dscale:
        # trunc_var(): digits beyond the display scale are dropped (toward zero).
        drop = -dscale - dexp
        digits = digits[:-drop] if drop < len(digits) else ""
        dexp = -dscale
    return _numeric_pack(sign == NUMERIC_NEG, digits, dexp, dscale)


def numeric_check(data: bytes) -> None:
    """Cheap structural check of a canonical numeric before it is sent as is.

    Canonical values come out of authenticated cells, so this guards against
    a type mix-up, not an attacker: header, length and sign only.
    """
    ndigits, _weight, sign, _dscale = _NUMERIC_HEAD.unpack_from(data)
    if len(data) != _NUMERIC_HEAD.size + 2 * ndigits or sign not in _NUMERIC_SIGNS:
        raise ValueFormatError("stored numeric value is malformed", DATA_CORRUPTED)


def numeric_text(data: bytes) -> str:
    """numeric_out for a normalized binary numeric: e.g. '1.50', '-0.001', 'NaN'."""
    # Declared int so that mypyc does the arithmetic below on native ints.
    ndigits: int
    weight: int
    sign: int
    dscale: int
    ndigits, weight, sign, dscale = _NUMERIC_HEAD.unpack_from(data)
    if sign in _NUMERIC_SPECIAL_TEXT:
        return _NUMERIC_SPECIAL_TEXT[sign]
    groups: tuple[int, ...]
    if ndigits <= _SHORT_GROUPS:
        groups = _UNSIGNED_GROUPS[ndigits].unpack_from(data, _NUMERIC_HEAD.size)
    else:
        groups = struct.unpack_from(f">{ndigits}H", data, _NUMERIC_HEAD.size)
    # Decimal places from the last stored digit to the last displayed one.
    shift: int = dscale - 4 * (ndigits - 1 - weight)
    if ndigits <= _FAST_GROUPS and -_FAST_SHIFT < shift < _FAST_SHIFT:
        # The usual case: the value as one integer in units of 10**-dscale (the
        # stored digits past dscale cut off, as the slicing below does), printed
        # once, zero-padded to one digit before the point.
        value: int = 0
        for group in groups:
            if group > 9999:
                break  # not a base-10000 digit: printed as it always was, below
            value = value * 10000 + group
        else:
            value = value * _POW10[shift] if shift >= 0 else value // _POW10[-shift]
            if not dscale:
                text = str(value)
            else:
                text = str(value).zfill(dscale + 1)
                text = f"{text[:-dscale]}.{text[-dscale:]}"
            return "-" + text if sign == NUMERIC_NEG else text
    # The rest (more groups, digits far from the point, a group above 9999):
    # base-10000 digits at positions weight, weight-1, ...; integer part is
    # positions >= 0, padded with zero groups up to position 0. One %-format
    # prints every group as (at least) 4 digits, like f"{g:04d}" each.
    digits = ("%04d" * ndigits) % groups
    int_groups = weight + 1
    if int_groups <= 0:
        text = "0"
        frac_digits = "0000" * -int_groups + digits
    else:
        if int_groups > ndigits:
            digits += "0000" * (int_groups - ndigits)
        split = 4 * int_groups
        text = digits[:split].lstrip("0") or "0"
        frac_digits = digits[split:]
    if dscale > 0:
        text = f"{text}.{frac_digits[:dscale].ljust(dscale, '0')}"
    return "-" + text if sign == NUMERIC_NEG else text


def numeric_normalize_text(token: str) -> str:
    """numeric_out(numeric_in(token)): how jsonb prints a JSON number."""
    return numeric_text(numeric_from_text(token))

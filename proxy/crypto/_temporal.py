"""date, time, timestamp, timestamptz: PostgreSQL's integer representation,
its ISO text output, and the ISO 8601 input forms applications send.

Representation (identical to PostgreSQL's binary format):
  date         int32 days since 2000-01-01, INT32_MIN/MAX = -infinity/infinity
  time         int64 microseconds since midnight, 0 ..= 24:00:00
  timestamp    int64 microseconds since 2000-01-01 00:00:00 (wall clock)
  timestamptz  int64 microseconds since 2000-01-01 00:00:00 UTC
  INT64_MIN/MAX = -infinity/infinity for both timestamps.

Calendar arithmetic is PostgreSQL's own (date2j/j2date, proleptic Gregorian,
1 BC = year 0), so BC dates and years past 9999 work. Time zone offsets come
from the system tz database through zoneinfo, the same files Debian's
PostgreSQL reads; outside datetime's years 1..9999 an instant is moved by
whole 400-year Gregorian cycles, which repeat calendar and DST rules exactly.

Accepted text input (a strict subset of PostgreSQL's; anything else is
refused, never guessed): optional surrounding whitespace, then
  'infinity' | '-infinity' | 'epoch'     (any case)
  YYYY-MM-DD                             year of 4 or more digits
  YYYY-MM-DD(T| )HH:MM[:SS[.frac]]       'T' in either case
  ... followed by an optional zone: Z | UTC | GMT | +HH | +HHMM | +HH:MM[:SS]
      (either sign, HH <= 15) | a tz database name such as Europe/Paris
  ... and an optional trailing ' BC' or ' AD'.
time alone: HH:MM[:SS[.frac]], no zone. As in PostgreSQL, a zone given to a
timestamp (without time zone) or date is checked and then ignored.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from typing import Final, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from proxy.crypto._errors import (
    DATETIME_FIELD_OVERFLOW,
    INVALID_DATETIME_FORMAT,
    INVALID_PARAMETER_VALUE,
    ValueFormatError,
    bad_binary,
)

USECS_PER_SEC: Final = 1_000_000
SECS_PER_DAY: Final = 86_400
USECS_PER_DAY: Final = SECS_PER_DAY * USECS_PER_SEC

POSTGRES_EPOCH_JDATE: Final = 2_451_545
UNIX_EPOCH_JDATE: Final = 2_440_588
DATETIME_MIN_JULIAN: Final = 0
DATE_END_JULIAN: Final = 2_147_483_494
MIN_TIMESTAMP: Final = -211_813_488_000_000_000
END_TIMESTAMP: Final = 9_223_371_331_200_000_000
JULIAN_MINYEAR: Final = -4713
JULIAN_MINMONTH: Final = 11
JULIAN_MAXYEAR: Final = 5_874_898
JULIAN_MAXMONTH: Final = 6

DATEVAL_NOBEGIN: Final = -(2**31)
DATEVAL_NOEND: Final = 2**31 - 1
DT_NOBEGIN: Final = -(2**63)
DT_NOEND: Final = 2**63 - 1

EPOCH_UNIX_USECS: Final = (UNIX_EPOCH_JDATE - POSTGRES_EPOCH_JDATE) * USECS_PER_DAY

_DAYS_IN_MONTH: Final = ((31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31),
                         (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31))

# A Gregorian cycle: 400 years, exactly 146097 days, same weekdays and rules.
_CYCLE_DAYS: Final = 146_097
_CYCLE_SECS: Final = _CYCLE_DAYS * SECS_PER_DAY

_INT32: Final = struct.Struct(">i")
_INT64: Final = struct.Struct(">q")

# Seconds (relative to 2000-01-01) inside which datetime arithmetic is safe
# with a day of margin either side: years 2 .. 9998.
_PY_LO_SECS: Final = (date(2, 1, 1).toordinal() - date(2000, 1, 1).toordinal()) * SECS_PER_DAY
_PY_HI_SECS: Final = (date(9998, 12, 31).toordinal() - date(2000, 1, 1).toordinal()) * SECS_PER_DAY
_PG_EPOCH_NAIVE: Final = datetime(2000, 1, 1)
_PG_EPOCH_UTC: Final = datetime(2000, 1, 1, tzinfo=UTC)

# PostgreSQL's ParseDateTime refuses inputs much longer than this.
_MAX_INPUT_LEN: Final = 100


# -- calendar -------------------------------------------------------------------


def is_leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def date2j(y: int, m: int, d: int) -> int:
    """PostgreSQL's date2j: Julian day number of a proleptic Gregorian date."""
    if m > 2:
        m += 1
        y += 4800
    else:
        m += 13
        y += 4799
    century = y // 100
    julian = y * 365 - 32167
    julian += y // 4 - century + century // 4
    julian += 7834 * m // 256 + d
    return julian


def j2date(jd: int) -> tuple[int, int, int]:
    """PostgreSQL's j2date, extended to negative day numbers by 400-year cycles."""
    cycles = 0
    if jd < 0:
        cycles = -jd // _CYCLE_DAYS + 1
        jd += cycles * _CYCLE_DAYS
    julian = jd + 32044
    quad = julian // 146097
    extra = (julian - quad * 146097) * 4 + 3
    julian += 60 + quad * 3 + extra // 146097
    quad = julian // 1461
    julian -= quad * 1461
    y = julian * 4 // 1461
    julian = ((julian + 305) % 365 if y != 0 else (julian + 306) % 366) + 123
    y += quad * 4
    year = y - 4800
    quad = julian * 2141 // 65536
    day = julian - 7834 * quad // 256
    month = (quad + 10) % 12 + 1
    return year - 400 * cycles, month, day


def _is_valid_julian(y: int, m: int) -> bool:
    return (y > JULIAN_MINYEAR or (y == JULIAN_MINYEAR and m >= JULIAN_MINMONTH)) and (
        y < JULIAN_MAXYEAR or (y == JULIAN_MAXYEAR and m < JULIAN_MAXMONTH)
    )


def _is_valid_date(days: int) -> bool:
    return (
        DATETIME_MIN_JULIAN - POSTGRES_EPOCH_JDATE <= days < DATE_END_JULIAN - POSTGRES_EPOCH_JDATE
    )


def _is_valid_timestamp(usecs: int) -> bool:
    return MIN_TIMESTAMP <= usecs < END_TIMESTAMP


# -- time zones -------------------------------------------------------------------


class Zone(Protocol):
    """What the codecs need from a time zone: offsets in seconds east of UTC."""

    def offset_at_utc(self, utc_secs: int) -> int:
        """Offset in force at an instant (seconds since 2000-01-01 UTC)."""
        ...

    def offset_for_local(self, local_secs: int) -> int:
        """Offset PostgreSQL picks for a wall-clock time (seconds since 2000-01-01)."""
        ...


class FixedZone:
    """A constant offset: numeric zones in input, POSIX-style session zones."""

    __slots__ = ("offset",)

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def offset_at_utc(self, utc_secs: int) -> int:
        return self.offset

    def offset_for_local(self, local_secs: int) -> int:
        return self.offset


def _into_python_range(secs: int) -> int:
    """Move `secs` by whole 400-year cycles into datetime's safe range."""
    if secs < _PY_LO_SECS:
        return secs + ((_PY_LO_SECS - secs) // _CYCLE_SECS + 1) * _CYCLE_SECS
    if secs > _PY_HI_SECS:
        return secs - ((secs - _PY_HI_SECS) // _CYCLE_SECS + 1) * _CYCLE_SECS
    return secs


def _whole_seconds(delta: timedelta | None) -> int:
    assert delta is not None  # a ZoneInfo always has an offset
    return delta.days * SECS_PER_DAY + delta.seconds


class TzdbZone:
    """A tz database zone (America/New_York ...), read through zoneinfo."""

    __slots__ = ("_zone",)

    def __init__(self, zone: ZoneInfo) -> None:
        self._zone = zone

    def offset_at_utc(self, utc_secs: int) -> int:
        at = _PG_EPOCH_UTC + timedelta(seconds=_into_python_range(utc_secs))
        return _whole_seconds(at.astimezone(self._zone).utcoffset())

    def offset_for_local(self, local_secs: int) -> int:
        wall = _PG_EPOCH_NAIVE + timedelta(seconds=_into_python_range(local_secs))
        first = _whole_seconds(wall.replace(tzinfo=self._zone, fold=0).utcoffset())
        second = _whole_seconds(wall.replace(tzinfo=self._zone, fold=1).utcoffset())
        # PostgreSQL's DetermineTimeZoneOffset: in a spring-forward gap it uses
        # the offset from before the change, in a fall-back overlap the one
        # from after; both are the smaller offset (the later instant).
        return min(first, second)


_POSIX_FIXED_RE: Final = re.compile(
    r"(?:<[A-Za-z0-9+:\-]{1,16}>|[A-Za-z]{3,16})([+-]?)([0-9]{1,2})(?::([0-9]{2})(?::([0-9]{2}))?)?"
)


@lru_cache(maxsize=64)
def session_zone(name: str) -> Zone:
    """The zone for a TimeZone setting as PostgreSQL reports it.

    tz database names (case as reported), and the fixed-offset POSIX forms
    PostgreSQL reports after SET TIME ZONE <number|interval>, e.g.
    '<+05:30>-05:30'. Anything else (POSIX rules with DST, unknown names)
    raises ValueFormatError: output in that zone cannot be reproduced exactly.
    """
    if "<" not in name:
        try:
            return TzdbZone(ZoneInfo(name))
        except (ZoneInfoNotFoundError, ValueError, OSError):
            pass
    m = _POSIX_FIXED_RE.fullmatch(name)
    if m is not None:
        sign, hours, minutes, seconds = m.groups()
        west = int(hours) * 3600 + int(minutes or 0) * 60 + int(seconds or 0)
        # POSIX offsets count hours west of Greenwich: the sign is inverted.
        return FixedZone(west if sign == "-" else -west)
    raise ValueFormatError(
        "the session TimeZone is not supported for encrypted columns", INVALID_PARAMETER_VALUE
    )


@lru_cache(maxsize=1)
def _tzdb_names() -> dict[str, str]:
    return {name.lower(): name for name in available_timezones()}


@lru_cache(maxsize=256)
def _input_zone(name: str) -> Zone | None:
    """A tz database name written inside a timestamp, matched case-insensitively."""
    key = _tzdb_names().get(name.lower())
    if key is None:
        return None
    return TzdbZone(ZoneInfo(key))


# -- text input ---------------------------------------------------------------

_WS: Final = "[ \t\n\r\v\f]"
_DATE_PART: Final = r"(?P<y>[0-9]{4,})-(?P<mo>[0-9]{1,2})-(?P<d>[0-9]{1,2})"
_TIME_PART: Final = r"(?P<h>[0-9]{1,2}):(?P<mi>[0-9]{2})(?::(?P<s>[0-9]{2})(?P<f>\.[0-9]+)?)?"
_OFFSET_PART: Final = r"[+-][0-9]{1,2}(?::[0-9]{2}(?::[0-9]{2})?)?|[+-][0-9]{4}"
# A zone name needs a space before it, and 'BC'/'AD' are eras, not zones.
_ZONE_PART: Final = (
    rf"(?:{_WS}*(?P<offset>{_OFFSET_PART}|[Zz])"
    rf"|{_WS}+(?![Bb][Cc]\Z|[Aa][Dd]\Z)(?P<zname>[A-Za-z][A-Za-z0-9_+\-]*(?:/[A-Za-z0-9_+\-]+)*))"
)
_DATETIME_RE: Final = re.compile(
    rf"{_DATE_PART}(?:(?:[Tt]|{_WS}+){_TIME_PART}{_ZONE_PART}?)?"
    rf"(?:{_WS}+(?P<era>[Bb][Cc]|[Aa][Dd]))?"
)
_TIME_RE: Final = re.compile(_TIME_PART)
_OFFSET_RE: Final = re.compile(
    r"([+-])([0-9]{1,2})(?::([0-9]{2})(?::([0-9]{2}))?)?|([+-])([0-9]{2})([0-9]{2})"
)

# Numeric zone displacement limit (MAX_TZDISP_HOUR).
_MAX_TZDISP_HOUR: Final = 15


def _syntax(type_name: str) -> ValueFormatError:
    return ValueFormatError(f"invalid input syntax for type {type_name}", INVALID_DATETIME_FORMAT)


def _field_overflow() -> ValueFormatError:
    return ValueFormatError("date/time field value out of range", DATETIME_FIELD_OVERFLOW)


def _out_of_range(type_name: str) -> ValueFormatError:
    return ValueFormatError(f"{type_name} out of range", DATETIME_FIELD_OVERFLOW)


def _prepare(text: str, type_name: str) -> str:
    stripped = text.strip(" \t\n\r\v\f")
    if not stripped or len(stripped) > _MAX_INPUT_LEN:
        raise _syntax(type_name)
    return stripped


def _time_usecs(h: str, mi: str, s: str | None, f: str | None) -> int:
    hour, minute, sec = int(h), int(mi), int(s or 0)
    # ParseFractionalSecond: strtod() then rint(frac * 1e6), in doubles.
    fsec = round(float(f) * 1_000_000.0) if f else 0
    # time_overflows(): fields one by one (24:00:00 and :60 allowed), then
    # the total must not pass 24:00:00.
    if hour > 24 or minute >= 60 or sec > 60 or fsec > USECS_PER_SEC:
        raise _field_overflow()
    total = ((hour * 60 + minute) * 60 + sec) * USECS_PER_SEC + fsec
    if total > USECS_PER_DAY:
        raise _field_overflow()
    return total


def _zone_from_text(spec: str, type_name: str) -> Zone:
    if spec[0] in "+-":
        m = _OFFSET_RE.fullmatch(spec)
        if m is None:
            raise _syntax(type_name)
        if m[1] is not None:
            sign, hours, minutes, seconds = m[1], m[2], m[3], m[4]
        else:
            sign, hours, minutes, seconds = m[5], m[6], m[7], None
        hour, minute, sec = int(hours), int(minutes or 0), int(seconds or 0)
        if hour > _MAX_TZDISP_HOUR or minute >= 60 or sec >= 60:
            raise ValueFormatError("time zone displacement out of range", DATETIME_FIELD_OVERFLOW)
        east = hour * 3600 + minute * 60 + sec
        return FixedZone(-east if sign == "-" else east)
    lowered = spec.lower()
    if lowered in ("z", "utc", "gmt"):
        return FixedZone(0)
    if "/" not in spec:
        # Abbreviations (EST, CET, ...) come from PostgreSQL's
        # timezone_abbreviations setting, which may differ from the tz
        # database entry of the same name: refuse rather than guess.
        raise ValueFormatError(
            f"time zone abbreviations are not supported for type {type_name}",
            INVALID_PARAMETER_VALUE,
        )
    zone = _input_zone(spec)
    if zone is None:
        raise ValueFormatError("time zone not recognized", INVALID_PARAMETER_VALUE)
    return zone


def _parse_datetime(text: str, type_name: str) -> tuple[int, int, Zone | None] | int:
    """Parse a date or date+time.

    Returns (days since 2000-01-01, microseconds into the day, zone written
    in the text or None), or for the special words a timestamp value:
    DT_NOEND ('infinity'), DT_NOBEGIN ('-infinity'), 1970-01-01 ('epoch').
    """
    stripped = _prepare(text, type_name)
    special = stripped.lower()
    if special == "infinity":
        return DT_NOEND
    if special == "-infinity":
        return DT_NOBEGIN
    if special == "epoch":
        return EPOCH_UNIX_USECS
    m = _DATETIME_RE.fullmatch(stripped)
    if m is None:
        raise _syntax(type_name)
    year, month, day = int(m["y"]), int(m["mo"]), int(m["d"])
    # ValidateDate: there is no year zero in AD/BC notation.
    if year <= 0:
        raise _field_overflow()
    if m["era"] is not None and m["era"].lower() == "bc":
        year = 1 - year
    if not 1 <= month <= 12 or not 1 <= day <= _DAYS_IN_MONTH[is_leap(year)][month - 1]:
        raise _field_overflow()
    if not _is_valid_julian(year, month):
        raise _out_of_range(type_name)
    days = date2j(year, month, day) - POSTGRES_EPOCH_JDATE
    usecs = 0 if m["h"] is None else _time_usecs(m["h"], m["mi"], m["s"], m["f"])
    spec = m["offset"] or m["zname"]
    zone = None if spec is None else _zone_from_text(spec, type_name)
    return days, usecs, zone


def date_from_text(text: str) -> int:
    """date_in: days since 2000-01-01 (a time or zone after the date is ignored)."""
    parsed = _parse_datetime(text, "date")
    if isinstance(parsed, int):
        if parsed == DT_NOEND:
            return DATEVAL_NOEND
        if parsed == DT_NOBEGIN:
            return DATEVAL_NOBEGIN
        return parsed // USECS_PER_DAY
    days = parsed[0]
    if not _is_valid_date(days):
        raise _out_of_range("date")
    return days


def timestamp_from_text(text: str) -> int:
    """timestamp_in: wall-clock microseconds since 2000-01-01 (zone ignored)."""
    parsed = _parse_datetime(text, "timestamp")
    if isinstance(parsed, int):
        return parsed
    days, usecs, _zone = parsed
    result = days * USECS_PER_DAY + usecs
    if not _is_valid_timestamp(result):
        raise _out_of_range("timestamp")
    return result


def timestamptz_from_text(text: str, session: Callable[[], Zone]) -> int:
    """timestamptz_in: UTC microseconds since 2000-01-01.

    Without a zone in the text, the wall-clock time is read in the session
    zone; in a DST gap or overlap, PostgreSQL's choice (the later instant).
    """
    parsed = _parse_datetime(text, "timestamp with time zone")
    if isinstance(parsed, int):
        return parsed
    days, usecs, zone = parsed
    local = days * USECS_PER_DAY + usecs
    # The offset is looked up on whole seconds, as PostgreSQL does.
    # The session zone is only resolved (and possibly refused) when needed.
    offset = (zone or session()).offset_for_local(local // USECS_PER_SEC)
    result = local - offset * USECS_PER_SEC
    if not _is_valid_timestamp(result):
        raise _out_of_range("timestamp with time zone")
    return result


def time_from_text(text: str) -> int:
    """time_in: microseconds since midnight (HH:MM[:SS[.frac]] only)."""
    stripped = _prepare(text, "time without time zone")
    m = _TIME_RE.fullmatch(stripped)
    if m is None:
        raise _syntax("time without time zone")
    return _time_usecs(m["h"], m["mi"], m["s"], m["f"])


# -- binary input -----------------------------------------------------------------


def date_from_binary(data: bytes) -> int:
    if len(data) != 4:
        raise bad_binary("date")
    days: int = _INT32.unpack(data)[0]
    if days not in (DATEVAL_NOBEGIN, DATEVAL_NOEND) and not _is_valid_date(days):
        raise _out_of_range("date")
    return days


def time_from_binary(data: bytes) -> int:
    if len(data) != 8:
        raise bad_binary("time without time zone")
    usecs: int = _INT64.unpack(data)[0]
    if not 0 <= usecs <= USECS_PER_DAY:
        raise _out_of_range("time")
    return usecs


def timestamp_from_binary(data: bytes, type_name: str) -> int:
    if len(data) != 8:
        raise bad_binary(type_name)
    usecs: int = _INT64.unpack(data)[0]
    if usecs not in (DT_NOBEGIN, DT_NOEND) and not _is_valid_timestamp(usecs):
        raise _out_of_range("timestamp")
    return usecs


# -- text output -----------------------------------------------------------------


def _ymd_text(year: int, month: int, day: int) -> str:
    # EncodeDateOnly (ISO): the year at least 4 digits, BC years counted from 1.
    return f"{year if year > 0 else 1 - year:04d}-{month:02d}-{day:02d}"


def _hms_text(usecs_of_day: int) -> str:
    secs, fsec = divmod(usecs_of_day, USECS_PER_SEC)
    minutes, sec = divmod(secs, 60)
    hour, minute = divmod(minutes, 60)
    text = f"{hour:02d}:{minute:02d}:{sec:02d}"
    if fsec:
        # AppendSeconds: six digits, trailing zeros dropped.
        text += "." + f"{fsec:06d}".rstrip("0")
    return text


def _offset_text(east: int) -> str:
    # EncodeTimezone: +HH, +HH:MM or +HH:MM:SS, whichever is exact.
    sign = "-" if east < 0 else "+"
    minutes, sec = divmod(abs(east), 60)
    hour, minute = divmod(minutes, 60)
    if sec:
        return f"{sign}{hour:02d}:{minute:02d}:{sec:02d}"
    if minute:
        return f"{sign}{hour:02d}:{minute:02d}"
    return f"{sign}{hour:02d}"


def date_text(days: int) -> str:
    if days == DATEVAL_NOEND:
        return "infinity"
    if days == DATEVAL_NOBEGIN:
        return "-infinity"
    year, month, day = j2date(days + POSTGRES_EPOCH_JDATE)
    return _ymd_text(year, month, day) + (" BC" if year <= 0 else "")


def time_text(usecs: int) -> str:
    return _hms_text(usecs)


def _timestamp_text(local: int, zone_suffix: str) -> str:
    days, usecs_of_day = divmod(local, USECS_PER_DAY)
    year, month, day = j2date(days + POSTGRES_EPOCH_JDATE)
    text = f"{_ymd_text(year, month, day)} {_hms_text(usecs_of_day)}{zone_suffix}"
    return text + " BC" if year <= 0 else text


def timestamp_text(usecs: int) -> str:
    if usecs == DT_NOEND:
        return "infinity"
    if usecs == DT_NOBEGIN:
        return "-infinity"
    return _timestamp_text(usecs, "")


def timestamptz_text(usecs: int, zone: Zone) -> str:
    if usecs == DT_NOEND:
        return "infinity"
    if usecs == DT_NOBEGIN:
        return "-infinity"
    offset = zone.offset_at_utc(usecs // USECS_PER_SEC)
    return _timestamp_text(usecs + offset * USECS_PER_SEC, _offset_text(offset))

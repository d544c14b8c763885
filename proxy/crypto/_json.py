"""json and jsonb: validation as json_in does, normalization as jsonb_out prints.

json keeps the text exactly as sent (PostgreSQL stores json verbatim). jsonb
is printed the way PostgreSQL prints a stored jsonb: object keys sorted by
byte length then bytes, the last of duplicate keys wins, numbers through
numeric ('1E2' -> 100, '1.50' stays 1.50, '-0' -> 0), strings unescaped and
re-escaped minimally, and ', ' / ': ' separators: {"a": 1, "b": [1, 2]}.
"""

from __future__ import annotations

import json
from typing import Final

from proxy.crypto._errors import UNTRANSLATABLE_CHARACTER, ValueFormatError, bad_syntax
from proxy.crypto._numbers import numeric_normalize_text


class _Number(str):
    """A JSON number token, kept as text (no float rounding, no int digit limit)."""

    __slots__ = ()


class _Object(list[tuple[str, object]]):
    """A JSON object as its (key, value) pairs in input order, duplicates kept."""

    __slots__ = ()


def _reject_constant(name: str) -> object:
    # Python's json reads NaN/Infinity; JSON (and PostgreSQL) does not.
    raise ValueError("not JSON")


def _parse(text: str, type_name: str) -> object:
    try:
        return json.loads(
            text,
            parse_int=_Number,
            parse_float=_Number,
            parse_constant=_reject_constant,
            object_pairs_hook=_Object,
        )
    except RecursionError:
        # PostgreSQL allows deeper nesting (up to its stack limit); refusing
        # is the safe side of that difference.
        raise ValueFormatError(f"{type_name} value is nested too deeply") from None
    except ValueError:
        raise bad_syntax(type_name) from None


def json_validate(text: str) -> None:
    """json_in: raise ValueFormatError unless `text` is one JSON value.

    Like PostgreSQL's json type, lone surrogate escapes and \\u0000 are
    accepted (the text is only checked, never de-escaped).
    """
    _parse(text, "json")


_ESCAPES: Final = {i: f"\\u{i:04x}" for i in range(0x20)} | {
    0x08: "\\b",
    0x0C: "\\f",
    0x0A: "\\n",
    0x0D: "\\r",
    0x09: "\\t",
    0x22: '\\"',
    0x5C: "\\\\",
}


def _string(value: str) -> str:
    if "\x00" in value:
        raise ValueFormatError("unsupported Unicode escape sequence", UNTRANSLATABLE_CHARACTER)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate escape (\ud800 ...): jsonb has to de-escape it and cannot.
        raise bad_syntax("json") from None
    return '"' + value.translate(_ESCAPES) + '"'


def _key_order(key: str) -> tuple[int, bytes]:
    raw = key.encode("utf-8")
    return len(raw), raw


def _emit(value: object, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, _Number):
        out.append(numeric_normalize_text(value))
    elif isinstance(value, str):
        out.append(_string(value))
    elif isinstance(value, _Object):
        last: dict[str, object] = {}
        for key, item in value:
            _string(key)  # same checks on keys as on values
            last[key] = item
        out.append("{")
        for i, key in enumerate(sorted(last, key=_key_order)):
            if i:
                out.append(", ")
            out.append(_string(key))
            out.append(": ")
            _emit(last[key], out)
        out.append("}")
    elif isinstance(value, list):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(", ")
            _emit(item, out)
        out.append("]")
    else:  # pragma: no cover - json.loads builds nothing else
        raise TypeError(type(value).__name__)


def jsonb_normalize(text: str) -> str:
    """jsonb_out(jsonb_in(text)): PostgreSQL's printed form of a jsonb value."""
    value = _parse(text, "json")
    out: list[str] = []
    try:
        _emit(value, out)
    except RecursionError:
        raise ValueFormatError("jsonb value is nested too deeply") from None
    return "".join(out)

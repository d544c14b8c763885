"""The one error the value codecs raise (re-exported by `proxy.crypto.values`)."""

from __future__ import annotations

from typing import Final

from proxy.errors import PgsealError

# SQLSTATEs, chosen to match what PostgreSQL itself answers for the same input.
INVALID_TEXT_REPRESENTATION: Final = "22P02"
INVALID_BINARY_REPRESENTATION: Final = "22P03"
NUMERIC_VALUE_OUT_OF_RANGE: Final = "22003"
DATETIME_FIELD_OVERFLOW: Final = "22008"
INVALID_DATETIME_FORMAT: Final = "22007"
CHARACTER_NOT_IN_REPERTOIRE: Final = "22021"
UNTRANSLATABLE_CHARACTER: Final = "22P05"
INVALID_PARAMETER_VALUE: Final = "22023"
FEATURE_NOT_SUPPORTED: Final = "0A000"
DATA_CORRUPTED: Final = "XX001"


class ValueFormatError(PgsealError, ValueError):
    """A value cannot be converted to or from its canonical form.

    The message is safe to show to the client: it names the type and the
    kind of problem, never the value itself (values are the secrets this
    proxy exists to protect). `sqlstate` is what PostgreSQL would answer for
    the same input, or 0A000 where the proxy refuses something PostgreSQL
    would accept but the proxy cannot reproduce exactly.
    """

    def __init__(self, message: str, sqlstate: str = INVALID_TEXT_REPRESENTATION) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def bad_syntax(type_name: str) -> ValueFormatError:
    return ValueFormatError(f"invalid input syntax for type {type_name}")


def out_of_range(type_name: str) -> ValueFormatError:
    return ValueFormatError(f"value out of range for type {type_name}", NUMERIC_VALUE_OUT_OF_RANGE)


def bad_binary(type_name: str) -> ValueFormatError:
    return ValueFormatError(
        f"incorrect binary data format for type {type_name}", INVALID_BINARY_REPRESENTATION
    )

"""Fuzzing COPY through ProxySession with its DataPath (Hypothesis): the data path area
test_datapath_fuzz.py does not reach. Its harness is reused (a connected session, Run,
play, FakeServer, the key ring, the sentinel check); CopyServer adds COPY to FakeServer.

The oracle is PostgreSQL's own reading of the bytes the proxy forwards: `pg_copy_rows` is
CopyReadLineText and CopyReadAttributesText/CSV (copyfromparse.c, PostgreSQL 15-17)
written again from the C, not from proxy/session/copyformat.py, so that where the two
disagree about a row or a field (the way a plaintext would slip into an encrypted column)
the properties see it. `pg_field` is CopyAttributeOutText/CSV (copyto.c).

1. COPY ... FROM STDIN into a protected table, text or CSV, with or without a column list,
   with DELIMITER / NULL / QUOTE / ESCAPE / HEADER [MATCH] / FORCE_NOT_NULL / FORCE_NULL /
   DEFAULT in either option syntax, any end-of-line, the end-of-data marker, by Query or
   by Parse/Bind/Execute; CopyData cut at random bytes (a row over several, several rows in
   one) and the client's bytes cut at others: no sentinel goes upstream; what PostgreSQL
   reads from the forwarded stream is the client's rows, each value of an encrypted
   column a cell that opens, under the row's tenant key, to exactly the value written; a
   row that breaks the tenant rules fails the whole COPY (CopyFail) with a pgseal error.
   A binary COPY is refused. The session answers a query afterwards.
2. Malformed COPY data (bad escapes, wrong field counts, invalid UTF-8, unterminated
   quotes, truncation, CopyFail, other messages inside the stream, a server that fails the
   COPY): a clean SQL error, never XX000 or a traceback, never plaintext upstream, nothing
   but cells in the encrypted columns of any row PostgreSQL would store; the session
   answers a query afterwards, or ends with 08P01.
3. COPY ... TO STDOUT: the server's cells reach the client as plaintext written exactly as
   PostgreSQL writes it in the client's format; hostile rows (cells of another tenant or
   column, mangled cells, rows of the wrong width, a row tenant that is not the cell's) give
   pgseal errors or NULLs (on_denied null), never a plaintext that does not belong there.

PGSEAL_FUZZ_EXAMPLES=N multiplies every max_examples by N (as in test_datapath_fuzz.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Final

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from proxy.crypto.cells import CellKey, read_cell_header
from proxy.crypto.values import SessionFormat, from_canonical, to_canonical
from proxy.policy.model import PolicySet, TablePolicy
from proxy.wire import messages as m
from tests.unit.test_datapath import BIND_COMPLETE, FakeKeyRing
from tests.unit.test_datapath_copy import copy_response
from tests.unit.test_datapath_fuzz import (
    PATIENTS_COLUMNS,
    FakeServer,
    Run,
    Script,
    _assert_no_sentinel,
    _errors,
    _exchange,
    _frames,
    _fuzz,
    _keystore_keys,
    _pieces,
    _ring,
    connected,
    play,
    policies,
)

__all__ = ["policies"]  # the module-scoped fixture

# The tables of the harness's catalog a COPY goes into, their columns in table order.
TABLE_COLUMNS: Final[dict[str, tuple[str, ...]]] = {
    "patients": PATIENTS_COLUMNS,
    "payments": ("id", "tenant_id", "card_number", "amount", "paid_at"),
    "notes": ("id", "body", "rating"),
    "contacts": ("id", "tenant_id", "email", "phone"),
}
SESSION = SessionFormat()  # what `connected` reports: UTF8, ISO dates, UTC
SELECT_ONE = m.Query("SELECT 1").encode()  # after the COPY: the session still answers
_COPY_SQL = re.compile(
    r"\s*COPY\s+(?:BINARY\s+)?(?:\((?P<query>.*)\)|(?:public\.)?(?P<table>\w+)\s*"
    r"(?:\((?P<columns>[^)]*)\))?)\s+(?P<direction>FROM|TO)\s+(?:STDIN|STDOUT)\b",
    re.I | re.S,
)


# --- a server that runs COPY -------------------------------------------------------------


class CopyServer(FakeServer):
    """FakeServer, and COPY as PostgreSQL runs it (postgres.c, copyfromparse.c).

    COPY FROM STDIN answers CopyInResponse, then reads CopyData until CopyDone
    (CommandComplete) or CopyFail (57014), ignores Sync and Flush, and fails on any other
    message (08P01, that message lost); `fail_after` CopyData fails the COPY itself
    (23505). After a failure, a Query's COPY answers ReadyForQuery, an Execute's skips to
    Sync. COPY TO STDOUT answers CopyOutResponse, `copy_out` (each one CopyData),
    CopyDone and CommandComplete. A COPY whose SQL holds `fail_marker` fails before it
    starts, as FakeServer's statements do."""

    def __init__(
        self,
        copy_out: Sequence[bytes] = (),
        fail_after: int | None = None,
        fail_marker: str | None = None,
    ) -> None:
        super().__init__(fail_marker=fail_marker)
        self.copy_out = list(copy_out)
        self.fail_after = fail_after
        self.reading: bool | None = None  # while a COPY FROM reads: whether by Execute
        self.copy_portals: dict[str, str] = {}  # portal -> the SQL it runs

    def _answer(self, ready: bytes, out: list[bytes]) -> None:
        for t, body in _frames(ready):
            if self.reading is not None:
                self._copy_message(t, body, out)
                continue
            sql: str | None = None
            if not self.skipping and t == ord("Q"):
                sql = m.decode_query(body).sql
            elif not self.skipping and t == ord("E"):
                sql = self.copy_portals.get(m.decode_execute(body).portal)
            copy = _COPY_SQL.match(sql) if sql else None
            if copy is not None and not (self.fail_marker and self.fail_marker in copy.string):
                self._start(copy, t == ord("E"), out)
                continue
            before = len(out)
            super()._answer(m.frame(bytes((t,)), body), out)
            if t == ord("B") and out[before:] == [BIND_COMPLETE]:
                bind = m.decode_bind(body)
                self.copy_portals[bind.portal] = self.sql.get(bind.statement, "")

    def _start(self, copy: re.Match[str], extended: bool, out: list[bytes]) -> None:
        if copy["query"] is not None:
            items = re.match(r"\s*SELECT\s+(.*?)\s+FROM\b", copy["query"], re.I | re.S)
            width = len(items[1].split(",")) if items else 1
        elif copy["columns"] is not None:
            width = len(copy["columns"].split(","))
        else:
            width = len(TABLE_COLUMNS.get(copy["table"].lower(), ("?",)))
        binary = int(bool(re.search(r"\bbinary\b", copy.string, re.I)))
        if copy["direction"].upper() == "FROM":
            out.append(copy_response(b"G", width, binary))
            self.reading = extended
            return
        out.append(copy_response(b"H", width, binary))
        out.extend(m.CopyData(data).encode() for data in self.copy_out)
        out.append(m.COPY_DONE + m.CommandComplete(f"COPY {len(self.copy_out)}").encode())
        if not extended:
            out.append(m.ReadyForQuery(self.status).encode())

    def _copy_message(self, t: int, body: bytes, out: list[bytes]) -> None:
        if t == ord("d"):
            if self.fail_after is not None:
                self.fail_after -= 1
                if self.fail_after < 0:
                    self.fail_after = None
                    self._end(out, "23505", "duplicate key value violates unique constraint")
        elif t == ord("c"):
            out.append(m.CommandComplete("COPY 1").encode())
            if not self.reading:
                out.append(m.ReadyForQuery(self.status).encode())
            self.reading = None
        elif t == ord("f"):
            message = body.rstrip(b"\0").decode("utf-8", "replace")
            self._end(out, "57014", f"COPY from stdin failed: {message}")
        elif t not in b"SH":  # Sync and Flush: ignored inside a COPY
            self._end(out, "08P01", f"unexpected message type 0x{t:02X} during COPY from stdin")

    def _end(self, out: list[bytes], sqlstate: str, message: str) -> None:
        out.append(m.ErrorResponse.make(sqlstate, message).encode())
        if self.reading:
            self.skipping = True
        else:
            out.append(m.ReadyForQuery(self.status).encode())
        self.reading = None


# --- how a COPY stream is written ------------------------------------------------------


@dataclass(frozen=True)
class Format:
    """A COPY stream's format, and the COPY options that say so."""

    csv: bool = False
    delimiter: str = "\t"
    null: str = "\\N"
    quote: str = '"'
    escape: str = '"'
    header: str = "off"  # off | on | match
    default: str | None = None  # PostgreSQL 16's DEFAULT marker
    force_not_null: tuple[str, ...] = ()
    force_null: tuple[str, ...] = ()
    force_quote: tuple[str, ...] = ()  # COPY TO; ("*",) every column
    legacy: bool = False  # the pre-9.0 option syntax (no HEADER MATCH, no DEFAULT)
    eol: bytes = b"\n"

    def options(self) -> str:
        """The options clause of the COPY statement, in its syntax ("" for none)."""
        strings = [
            (name, value)
            for name, value, default in (
                ("DELIMITER", self.delimiter, "," if self.csv else "\t"),
                ("NULL", self.null, "" if self.csv else "\\N"),
                ("QUOTE", self.quote, '"'),
                ("ESCAPE", self.escape, self.quote),
                ("DEFAULT", self.default, None),
            )
            if value is not None and value != default
        ]
        lists = [
            (name, names)
            for name, names in (
                ("FORCE_NOT_NULL", self.force_not_null),
                ("FORCE_NULL", self.force_null),
                ("FORCE_QUOTE", self.force_quote),
            )
            if names
        ]
        if self.legacy:  # WITH CSV HEADER DELIMITER AS ';' FORCE NOT NULL a, b ...
            words = ["CSV"] * self.csv + ["HEADER"] * (self.header != "off")
            words += [f"{name} AS {_sql_string(value)}" for name, value in strings]
            words += [f"{name.replace('_', ' ')} {', '.join(names)}" for name, names in lists]
            return " WITH " + " ".join(words) if words else ""
        items = ["FORMAT csv"] * self.csv
        items += {"off": [], "on": ["HEADER"], "match": ["HEADER match"]}[self.header]
        items += [f"{name} {_sql_string(value)}" for name, value in strings]
        items += [f"{name} ({', '.join(names)})" for name, names in lists if names != ("*",)]
        items += [f"{name} *" for name, names in lists if names == ("*",)]
        return f" ({', '.join(items)})" if items else ""


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@st.composite
def formats(draw: st.DrawFn, direction: str, columns: tuple[str, ...]) -> Format:
    """A format PostgreSQL accepts for a COPY; the force options name some of `columns`."""
    csv = draw(st.booleans())
    if csv:
        delimiter = draw(st.sampled_from([",", ",", ";", "|", "\t"]))
        null = draw(st.sampled_from(["", "", "NULL", "\\N"]))
        quote = draw(st.sampled_from(['"', '"', "'", "%"]))
        escape = draw(st.sampled_from([quote, quote, "\\", "!"]))
    else:
        delimiter = draw(st.sampled_from(["\t", "\t", ",", "|", ";"]))
        null = draw(st.sampled_from(["\\N", "\\N", "NULL", "", "nil"]))
        quote = escape = '"'
    legacy = draw(st.booleans())
    header = draw(st.sampled_from(["off", "off", "on"] + ([] if legacy else ["match"])))
    default = None
    if direction == "from" and not legacy and draw(st.integers(0, 4)) == 0:
        default = draw(st.sampled_from(["DEF", "\\D", "@default"]))
    subset = (
        st.lists(st.sampled_from(columns), unique=True, max_size=2).map(tuple)
        if columns else st.just(())
    )
    fmt = Format(csv, delimiter, null, quote, escape, header, default, legacy=legacy)
    if csv and direction == "from":
        fmt = replace(fmt, force_not_null=draw(subset), force_null=draw(subset))
    if csv and direction == "to":
        fmt = replace(fmt, force_quote=draw(st.one_of(subset, st.just(("*",)))))
    return replace(fmt, eol=draw(st.sampled_from([b"\n", b"\n", b"\r\n", b"\r"])))


_PLAIN_ASCII = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-")
_LETTER_ESCAPES = {"\b": "b", "\f": "f", "\n": "n", "\r": "r", "\t": "t", "\v": "v"}


def write_field(draw: st.DrawFn, value: str | None, fmt: Format) -> bytes:
    """A value as a client may write it in a COPY FROM field, with any of the escapes and
    quotings PostgreSQL reads (letters, digits and `-` always as they are, so that a
    sentinel stays whole); None: NULL."""
    if value is None:
        return fmt.null.encode()
    if fmt.csv:
        return _write_csv(draw, value, fmt)
    out = bytearray()
    for i, ch in enumerate(value):
        raw = ch.encode()
        forced = i == 0 and value in (fmt.null, fmt.default)  # not a marker: spell it otherwise
        if ch in _PLAIN_ASCII and not forced:
            out += raw
            continue
        ways = [b"".join(b"\\x%02x" % b for b in raw)]
        if len(raw) == 1:
            ways.append(b"\\%03o" % raw[0])
            if ch in _LETTER_ESCAPES:
                ways.append(b"\\" + _LETTER_ESCAPES[ch].encode())
            if ch in ("\\", "\n", "\r", fmt.delimiter):
                ways.append(b"\\" + raw)  # `\` then the character itself: that character
        if ch not in ("\\", "\n", "\r", fmt.delimiter) and not forced:
            ways += [raw, raw]
        out += draw(st.sampled_from(ways))
    return bytes(out)


def _write_csv(draw: st.DrawFn, value: str, fmt: Format) -> bytes:
    specials = (fmt.delimiter, fmt.quote, "\n", "\r")
    plain_end = min((value.find(c) for c in specials if c in value), default=len(value))
    marker = value in (fmt.null, fmt.default, "\\.")
    if not marker and plain_end == len(value) and draw(st.booleans()):
        return value.encode()
    # Quoted from some point on (PostgreSQL reads quotes anywhere in a field).
    head = draw(st.integers(0, plain_end))
    body = "".join(fmt.escape + c if c in (fmt.quote, fmt.escape) else c for c in value[head:])
    return (value[:head] + fmt.quote + body + fmt.quote).encode()


# --- PostgreSQL's reading and writing of COPY streams ------------------------------------


class PgRefused(Exception):
    """PostgreSQL fails the COPY here: nothing of it is stored."""


class _DefaultMarker:
    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Final = _DefaultMarker()
PgValue = bytes | None | _DefaultMarker
_CR, _LF, _BACKSLASH, _DOT = 0x0D, 0x0A, 0x5C, 0x2E
_OCTAL = frozenset(b"01234567")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_LETTERS = {ord("b"): 8, ord("f"): 12, ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("v"): 11}


def pg_copy_rows(data: bytes, fmt: Format, columns: tuple[str, ...]) -> list[list[PgValue]]:
    """The rows PostgreSQL stores from a whole COPY FROM stream (NextCopyFrom), or PgRefused."""
    lines = _pg_lines(data, fmt)
    if fmt.header != "off" and lines:
        header = lines.pop(0)
        if fmt.header == "match":
            names = _pg_fields(header, fmt, len(columns))
            if names != [c.encode() for c in columns]:
                raise PgRefused("column name mismatch in header line")
    rows = []
    for line in lines:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            raise PgRefused("invalid byte sequence for encoding UTF8") from None
        if b"\0" in line:
            raise PgRefused("invalid byte sequence for encoding UTF8: 0x00")
        fields = _pg_fields(line, fmt, len(columns))
        if len(fields) != len(columns):
            raise PgRefused(f"{len(fields)} fields for {len(columns)} columns")
        for i, name in enumerate(columns):
            if fmt.csv and fields[i] is None and name in fmt.force_not_null:
                fields[i] = fmt.null.encode()
            elif fmt.csv and name in fmt.force_null and fields[i] == fmt.null.encode():
                fields[i] = None
        rows.append(fields)
    return rows


def _pg_lines(data: bytes, fmt: Format) -> list[bytes]:
    """CopyReadLineText over a whole stream: its lines, end-of-lines removed, up to the
    end-of-data marker."""
    quote = ord(fmt.quote) if fmt.csv else -1
    escape = ord(fmt.escape) if fmt.csv and fmt.escape != fmt.quote else -1
    eol: bytes | None = None
    lines: list[bytes] = []
    i, n = 0, len(data)
    while i < n:
        start, first, in_quote, last_was_escape = i, True, False, False
        while True:
            if i >= n:
                lines.append(data[start:])  # the last line, without an end-of-line
                return lines
            c = data[i]
            i += 1
            if fmt.csv:
                if in_quote and c == escape:
                    last_was_escape = not last_was_escape
                if c == quote and not last_was_escape:
                    in_quote = not in_quote
                if c != escape:
                    last_was_escape = False
            if c == _CR and not in_quote:
                if eol in (None, b"\r\n") and i < n and data[i] == _LF:
                    i += 1
                    eol = b"\r\n"
                elif eol in (b"\r\n", b"\n"):
                    raise PgRefused("literal carriage return found in data")
                else:
                    eol = b"\r"
                lines.append(data[start : i - len(eol)])
                break
            if c == _LF and not in_quote:
                if eol in (b"\r", b"\r\n"):
                    raise PgRefused("literal newline found in data")
                eol = b"\n"
                lines.append(data[start : i - 1])
                break
            if c == _BACKSLASH and (not fmt.csv or first):
                if i >= n:
                    lines.append(data[start:])  # a backslash just before the end: data
                    return lines
                if data[i] == _DOT:
                    if _pg_end_marker(data, i + 1, eol, fmt.csv):
                        if i - 1 > start:
                            lines.append(data[start : i - 1])  # the data before `\.`
                        return lines
                elif not fmt.csv:
                    i += 1  # text: the character after a backslash is never special
            first = False
    return lines


def _pg_end_marker(data: bytes, i: int, eol: bytes | None, csv: bool) -> bool:
    """After `\\.` (i: the next byte): whether the data ends here (text: or PgRefused)."""

    def at(k: int) -> int:
        return data[k] if k < len(data) else 0

    def not_end(message: str) -> bool:
        if csv:
            return False
        raise PgRefused(message)

    if eol == b"\r\n":
        if at(i) == _LF:
            return not_end("end-of-copy marker does not match previous newline style")
        if at(i) != _CR:
            return not_end("end-of-copy marker corrupt")
        i += 1
    if at(i) not in (_CR, _LF):
        return not_end("end-of-copy marker corrupt")
    expected = {b"\n": _LF, b"\r\n": _LF, b"\r": _CR}.get(eol or b"", at(i))
    if at(i) != expected:
        raise PgRefused("end-of-copy marker does not match previous newline style")
    return True


def _pg_fields(line: bytes, fmt: Format, width: int) -> list[PgValue]:
    """CopyReadAttributesText / CopyReadAttributesCSV: one line's values."""
    null = fmt.null.encode()
    default = fmt.default.encode() if fmt.default is not None else None
    delimiter = ord(fmt.delimiter)
    quote, escape = ord(fmt.quote), ord(fmt.escape)
    fields: list[PgValue] = []
    i, n = 0, len(line)
    while True:
        start, out, found, saw_quote, non_ascii = i, bytearray(), False, False, False
        end = i
        while True:
            end = i
            if i >= n:
                break
            c = line[i]
            i += 1
            if c == delimiter:
                found = True
                break
            if fmt.csv:
                if c != quote:
                    out.append(c)
                    continue
                saw_quote = True
                while True:  # in quotes
                    if i >= n:
                        raise PgRefused("unterminated CSV quoted field")
                    c = line[i]
                    i += 1
                    if c == escape and i < n and line[i] in (escape, quote):
                        out.append(line[i])
                        i += 1
                    elif c == quote:
                        break
                    else:
                        out.append(c)
                continue
            if c == _BACKSLASH:
                if i >= n:
                    break
                c = line[i]
                i += 1
                if c in _OCTAL:
                    value = c - 0x30
                    for _ in range(2):
                        if i < n and line[i] in _OCTAL:
                            value = value * 8 + line[i] - 0x30
                            i += 1
                    c = value & 0xFF
                    non_ascii = non_ascii or c == 0 or c >= 0x80
                elif c == ord("x") and i < n and line[i] in _HEX:
                    two = i + 1 < n and line[i + 1] in _HEX
                    digits = line[i : i + 2] if two else line[i : i + 1]
                    i += len(digits)
                    c = int(digits, 16)
                    non_ascii = non_ascii or c == 0 or c >= 0x80
                else:
                    c = _LETTERS.get(c, c)
            out.append(c)
        raw = line[start:end]
        if raw == null and not saw_quote:
            fields.append(None)
        elif default is not None and raw == default and len(fields) < width:
            fields.append(DEFAULT)
        else:
            if non_ascii:  # pg_verifymbstr on what the escapes made
                try:
                    out.decode("utf-8")
                except UnicodeDecodeError:
                    raise PgRefused("invalid byte sequence for encoding UTF8") from None
                if 0 in out:
                    raise PgRefused("invalid byte sequence for encoding UTF8: 0x00")
            fields.append(bytes(out))
        if not found:
            return fields


def pg_field(
    value: bytes | None, fmt: Format, force_quote: bool = False, single: bool = False
) -> bytes:
    """A value as COPY TO writes it (CopyAttributeOutText / CopyAttributeOutCSV)."""
    if value is None:
        return fmt.null.encode()
    delimiter = fmt.delimiter.encode()
    if not fmt.csv:
        out = bytearray()
        for c in value:
            if c < 0x20 and c in _LETTERS.values():
                out += b"\\" + bytes(k for k, v in _LETTERS.items() if v == c)
            elif c in (_BACKSLASH, delimiter[0]):
                out += b"\\" + bytes((c,))
            else:
                out.append(c)
        return bytes(out)
    quote, escape = fmt.quote.encode(), fmt.escape.encode()
    needs = force_quote or value == fmt.null.encode() or (single and value == b"\\.")
    if not needs and not any(s in value for s in (delimiter, quote, b"\n", b"\r")):
        return value
    body = b"".join(
        escape + bytes((c,)) if c in (quote[0], escape[0]) else bytes((c,)) for c in value
    )
    return quote + body + quote


# --- 1. COPY FROM STDIN: nothing but cells upstream -------------------------------------

TENANT_KEYS: Final = {"acme": 1, "globex": 2}  # what _ring() holds
_TAIL_TEXT = st.text(alphabet=st.sampled_from(list(",;|\t\"'%!\\\n\r.N x0é€\b\v\f{}:@")),
                     max_size=6)
# ... sometimes ending with a backslash: the field's last byte before a delimiter or EOL.
_TAIL = st.one_of(_TAIL_TEXT, _TAIL_TEXT.map(lambda t: t + "\\"))


class _Refused(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


@dataclass
class CopyIn:
    """A COPY FROM STDIN, the client's stream, and what PostgreSQL must store from it."""

    table: TablePolicy
    columns: tuple[str, ...]  # the COPY's columns (the table's when it lists none)
    sql: str
    fmt: Format
    data: bytes
    rows: list[list[PgValue]]  # each row's values as the client meant them
    tenants: list[str | None]  # whose key seals each row (None: nothing in it to seal)
    failure: tuple[int, str] | None  # the first row that fails the COPY, its SQLSTATE
    sentinels: list[str] = field(default_factory=list)
    # A key missing for a row (58030) is only looked for once every row of its CopyData
    # passed the rules: a row behind it that breaks them (42501) may fail the COPY instead.
    later_denial: bool = False


def _row_tenant(table: TablePolicy, columns: tuple[str, ...], row: list[PgValue],
                session: str | None) -> str:
    """Whose key seals the row, with INSERT's rules (_Refused where the COPY must fail)."""
    tenant = session
    if table.tenant_column in columns and not table.tenant_from_session:
        value = row[columns.index(table.tenant_column)]
        if value is None:
            tenant = None
        elif isinstance(value, bytes):
            tenant = value.decode()
    if tenant is None or (table.isolation == "strict" and tenant != session):
        raise _Refused("42501")
    if tenant not in TENANT_KEYS:
        raise _Refused("58030")  # no key for it (the key service fails in Run)
    return tenant


@st.composite
def copy_ins(draw: st.DrawFn, policies: PolicySet, session: str | None,
             list_columns: bool | None = None, ids: bool = True) -> CopyIn:
    """A COPY FROM STDIN into a protected table; every value of an encrypted text or jsonb
    column carries a sentinel. ids=False: no column but the tenant's is left unencrypted."""
    name = draw(st.sampled_from(sorted(TABLE_COLUMNS)))
    table = policies.tables[("public", name)]
    listed = draw(st.booleans()) if list_columns is None else list_columns
    if not ids:
        listed = True
    columns = TABLE_COLUMNS[name]
    if listed:
        choices = [c for c in columns if ids or c != "id"]
        columns = tuple(draw(st.permutations(choices)))[: draw(st.integers(1, len(choices)))]
        if not any(c in table.columns for c in columns):
            columns += (draw(st.sampled_from(sorted(table.columns))),)
    # FORCE_NOT_NULL makes a NULL the NULL string, no date or number: text columns only.
    forceable = tuple(c for c in columns if table.columns.get(c) is None
                      or table.columns[c].type == "text")
    fmt = draw(formats("from", forceable or columns[:0]))
    sentinels: list[str] = []

    def sentinel() -> str:
        value = "SENTINEL-" + draw(st.binary(min_size=6, max_size=6)).hex()
        sentinels.append(value)
        return value

    def value(column: str) -> str | _DefaultMarker | None:
        policy = table.columns.get(column)
        kind = draw(st.sampled_from(["value"] * 6 + ["null", "default", "marker"]))
        if kind == "null":
            return None
        if kind == "default" and fmt.default is not None:
            return DEFAULT
        if column == "id":
            return str(draw(st.integers(1, 10**6)))
        if column == "tenant_id":
            if table.isolation == "trusted":  # rows of several tenants in one CopyData
                return draw(st.sampled_from(["acme"] * 5 + ["globex"] * 4 + ["newco", None]))
            return draw(st.sampled_from(["acme"] * 10 + ["globex", None]))
        assert policy is not None
        if kind == "marker" and policy.type == "text" and (fmt.csv or fmt.null):
            # The NULL string as a value (text format cannot write an empty one if NULL '')
            return fmt.null
        plain = sentinel() + draw(_TAIL) if draw(st.booleans()) else draw(_TAIL) + sentinel()
        return {
            "date": lambda: draw(st.dates()).isoformat(),
            "numeric": lambda: f"{draw(st.integers(-9999, 9999))}.{draw(st.integers(10, 99))}",
            "timestamptz": lambda: f"{draw(st.dates()).isoformat()} 12:34:56+00",
            "int4": lambda: str(draw(st.integers(-(2**31), 2**31 - 1))),
            "jsonb": lambda: json.dumps({"k": plain, "n": [1, None]}, ensure_ascii=False),
        }.get(policy.type, lambda: plain)()

    def meant(column: str, v: str | _DefaultMarker | None) -> PgValue:
        """What PostgreSQL reads from the field as write_field writes it."""
        if isinstance(v, _DefaultMarker):
            return DEFAULT
        if v is None:
            return fmt.null.encode() if fmt.csv and column in fmt.force_not_null else None
        if fmt.csv and column in fmt.force_null and v == fmt.null:
            return None
        return v.encode()

    delimiter = fmt.delimiter.encode()

    def line(values: Sequence[str | _DefaultMarker | None]) -> bytes:
        return delimiter.join(
            fmt.default.encode() if isinstance(v, _DefaultMarker) and fmt.default is not None
            else write_field(draw, None if isinstance(v, _DefaultMarker) else v, fmt)
            for v in values
        )

    lines: list[bytes] = []
    if fmt.header == "match" or (fmt.header == "on" and draw(st.booleans())):
        lines.append(line(columns))
    elif fmt.header == "on":  # a client that says HEADER for data without one
        lines.append(line([value(c) if c in table.columns else "x" for c in columns]))
    rows: list[list[PgValue]] = []
    for _ in range(draw(st.integers(0, 5))):
        values = [value(c) for c in columns]
        lines.append(line(values))
        rows.append([meant(c, v) for c, v in zip(columns, values, strict=True)])
    eol = fmt.eol
    data = b"".join(row + eol for row in lines)
    ending = draw(st.sampled_from(["", "", "no-eol", "marker", "marker+garbage", "inline"]))
    if ending == "no-eol" and lines and lines[-1]:  # (an empty last line is no row)
        data = data[: -len(eol)]
    elif ending.startswith("marker") or (ending == "inline" and fmt.csv):
        data += b"\\." + eol
        if ending == "marker+garbage":  # ignored after the marker
            data += f"{sentinel()}{fmt.delimiter}x".encode() + eol
    elif ending == "inline" and rows and lines[-1]:  # text: `\.` ends a line's data too
        data = data[: -len(eol)] + b"\\." + eol
    tenants: list[str | None] = []
    failures: list[tuple[int, str]] = []
    for i, row in enumerate(rows):
        sealed = any(
            isinstance(v, bytes) for c, v in zip(columns, row, strict=True) if c in table.columns
        )
        try:
            tenants.append(_row_tenant(table, columns, row, session) if sealed else None)
        except _Refused as refused:
            failures.append((i, refused.sqlstate))
            tenants.append(None)
    listing = f" ({', '.join(columns)})" if listed else ""
    sql = f"COPY {draw(st.sampled_from(['', 'public.']))}{name}{listing} FROM STDIN{fmt.options()}"
    failure = failures[0] if failures else None
    later = failure is not None and any(s == "42501" for _, s in failures[1:])
    return CopyIn(table, columns, sql, fmt, data, rows, tenants, failure, sentinels, later)


def _open(key: CellKey, column: str, field: PgValue) -> bytes:
    """The canonical plaintext of a bytea field that holds a cell (AssertionError if not)."""
    assert isinstance(field, bytes) and field[:2] == b"\\x", f"not a cell: {field!r}"
    cell = bytes.fromhex(field[2:].decode())
    return key.open(column, cell)


def _assert_stored_rows_are_the_clients(case: CopyIn, stored: list[list[PgValue]],
                                        ring: FakeKeyRing) -> None:
    """Each row PostgreSQL reads from the forwarded stream is the client's row of the same
    place, every value of an encrypted column a cell of its tenant that opens to the
    value as written (its canonical form, for the types that have one)."""
    table = case.table
    assert len(stored) <= len(case.rows)
    for got, meant, tenant in zip(stored, case.rows, case.tenants, strict=False):
        for column, value, expected in zip(case.columns, got, meant, strict=True):
            policy = table.columns.get(column)
            if policy is None or not isinstance(expected, bytes):
                assert value == expected, (column, value, expected)
                continue
            assert tenant is not None
            path = f"public.{table.table}.{column}"
            canonical = _open(ring.by_tenant[tenant], path, value)
            assert isinstance(value, bytes)
            header = read_cell_header(bytes.fromhex(value[2:].decode()))
            assert header.suite == (2 if policy.search else 1), (column, header)
            if policy.type == "text":
                assert canonical == b"\x01" + expected
            elif policy.type == "jsonb":
                shown = from_canonical(policy.type, canonical, 0, SESSION)
                assert json.loads(shown) == json.loads(expected)
            else:
                assert from_canonical(policy.type, canonical, 0, SESSION) == expected


def _cuts(data: st.DataObject) -> list[int]:
    return data.draw(st.lists(st.integers(1, 10**6), max_size=6))


def _client_stream(data: st.DataObject, case: CopyIn, extended: bool) -> list[bytes]:
    """The client's chunks: the COPY, its data in random CopyData pieces, then SELECT 1."""
    pieces = _pieces(case.data, _cuts(data))
    body = b"".join(m.CopyData(p).encode() for p in pieces) + m.COPY_DONE
    if extended:
        start = (
            m.Parse("", case.sql).encode() + m.Bind("", "", (), (), ()).encode()
            + m.Execute("", 0).encode() + m.SYNC
        )
        body += m.SYNC
    else:
        start = m.Query(case.sql).encode()
    if extended or data.draw(st.booleans()):
        # Wait for CopyInResponse before the data, as libpq does (see
        # test_a_sync_after_copy_done_pipelined_before_copy_in_response_is_answered).
        return [start, *_pieces(body + SELECT_ONE, _cuts(data))]
    return _pieces(start + body + SELECT_ONE, _cuts(data))


def _copy_frames(upstream: bytes) -> tuple[bytes, list[bytes], str]:
    """The COPY data that went upstream, each CopyData, and how the stream ended there."""
    frames = list(_frames(upstream))
    bodies = [body for t, body in frames if t == ord("d")]
    ends = "".join(chr(t) for t, _ in frames if t in (ord("c"), ord("f")))
    return b"".join(bodies), bodies, ends


def _assert_answers_a_query_after(run: Run) -> None:
    frames = list(_frames(bytes(run.downstream)))
    assert not run.closed, run.closed
    assert frames[-2:] == [
        (ord("C"), m.CommandComplete("SELECT 0").encode()[5:]),
        (ord("Z"), b"I"),
    ], frames[-4:]


@_fuzz(150)
@given(data=st.data(), extended=st.booleans(), session=st.sampled_from(["acme"] * 5 + [None]))
def test_copy_from_sends_only_cells_that_open_to_the_values(  # type: ignore[no-untyped-def]
    policies, data: st.DataObject, extended: bool, session: str | None
) -> None:
    case = data.draw(copy_ins(policies, session))
    # The oracle reads the client's stream as the client meant it.
    assert pg_copy_rows(case.data, case.fmt, case.columns) == case.rows
    ring = _ring()
    chunks = _client_stream(data, case, extended)
    run = play(policies, Script(chunks, case.sentinels), ring, tenant=session, server=CopyServer())
    run.assert_no_internal_error()
    upstream = bytes(run.upstream)
    _assert_no_sentinel(upstream)
    sent, bodies, ends = _copy_frames(upstream)
    assert all(body.endswith((b"\n", b"\r")) for body in bodies), "a CopyData ends mid-row"
    stored = pg_copy_rows(sent, case.fmt, case.columns)
    _assert_stored_rows_are_the_clients(case, stored, ring)
    errors = _errors(bytes(run.downstream))
    if case.failure is None:
        assert ends == "c" and len(stored) == len(case.rows)
        assert errors == []
    else:
        at, sqlstate = case.failure
        assert ends == "f" and len(stored) <= at
        allowed = {sqlstate, "42501"} if case.later_denial else {sqlstate}
        assert len(errors) == 1 and errors[0].sqlstate in allowed, errors
        assert (errors[0].message or "").startswith("pgseal: "), errors
    _assert_answers_a_query_after(run)
    event(f"format {'csv' if case.fmt.csv else 'text'}, header {case.fmt.header}")
    event(f"outcome: {'fails ' + case.failure[1] if case.failure else 'stored'}")


@pytest.mark.parametrize(
    "sql",
    [
        "COPY patients (tenant_id, ssn) FROM STDIN (FORMAT binary)",
        "COPY BINARY patients FROM STDIN",
        "COPY patients (tenant_id, ssn) FROM STDIN WITH BINARY",
    ],
)
def test_a_binary_copy_from_is_refused_and_the_session_goes_on(policies, sql: str) -> None:  # type: ignore[no-untyped-def]
    """The proxy seals text and CSV rows only: a binary COPY of a protected table is never
    forwarded (libpq sends no data before CopyInResponse, which never comes)."""
    run = play(policies, Script([m.Query(sql).encode(), SELECT_ONE], []), server=CopyServer())
    run.assert_no_internal_error()
    assert [e.sqlstate for e in _errors(bytes(run.downstream))] == ["0A000"]
    assert [m.decode_query(b).sql for t, b in _frames(bytes(run.upstream))] == [
        "pgseal_refused_statement", "SELECT 1"
    ]
    _assert_answers_a_query_after(run)


# --- 2. malformed COPY data: clean errors, cells only -----------------------------------

_BAD_ESCAPES = (b"\\.", b"\\.", b"\\", b"\\x", b"\\xff", b"\\000", b"\\303", b"\\x00")
_INSERTS = (*_BAD_ESCAPES, b'"', b"'", b"%", b"!", b"\t", b",", b"|", b"\r", b"\n", b"\r\n",
            b"\xff", b"\xc3", b"\xed\xa0\x80", b"\0")
_OTHER_MESSAGES = (SELECT_ONE, m.SYNC, b"H\0\0\0\4", m.Parse("", "SELECT 1").encode(),
                   m.CopyData(b"").encode(), m.frame(b"p", b"secret\0"), b"Z\0\0\0\4")


@dataclass
class BrokenCopy:
    case: CopyIn
    how: str
    client: list[bytes]  # the client's chunks
    fail_after: int | None  # the server fails the COPY after that many CopyData
    # A Query or Parse inside the COPY stream, which PostgreSQL fails the COPY for and
    # drops: the proxy does not follow (test_a_query_inside_a_copy_from_stream_...).
    lost_message: bool = False


@st.composite
def broken_copies(draw: st.DrawFn, policies: PolicySet) -> BrokenCopy:
    """A COPY FROM of property 1 (no unencrypted column but the tenant's, so that a shifted
    field cannot carry a sentinel where it may go as written), its data or messages
    broken one way."""
    case = draw(copy_ins(policies, "acme", ids=False))
    data = case.data
    how = draw(st.sampled_from(
        ["byte", "insert", "insert", "escape", "escape", "delete", "truncate", "copyfail",
         "message", "server", "no-end"]
    ))
    # Where: anywhere, at a field's edge, or in a sentinel (a protected value).
    edges = [i for i, c in enumerate(data) if c in (ord(case.fmt.delimiter), _LF, _CR)]
    edges += [i + 1 for i in edges] + [data.find(v.encode()) for v in case.sentinels]
    at = draw(st.one_of(st.integers(0, len(data)), st.sampled_from([0, *edges])))
    at = min(max(at, 0), len(data))
    if how == "byte" and data:
        at = min(at, len(data) - 1)
        byte = st.binary(min_size=1, max_size=1)
        new = draw(st.one_of(st.sampled_from(_INSERTS).map(lambda b: b[:1]), byte))
        data = data[:at] + new + data[at + 1 :]
    elif how in ("insert", "escape"):
        inserted = draw(st.sampled_from(_INSERTS if how == "insert" else _BAD_ESCAPES))
        data = data[:at] + inserted + data[at:]
    elif how == "delete":
        data = data[:at] + data[at + draw(st.integers(1, 4)) :]
    elif how in ("truncate", "copyfail"):
        data = data[:at]
    cuts = draw(st.lists(st.integers(1, 10**6), max_size=5))
    messages = [m.CopyData(piece).encode() for piece in _pieces(data, cuts)]
    lost = how == "no-end"
    if how == "message":
        other = draw(st.sampled_from(_OTHER_MESSAGES))
        lost = other[:1] in (b"Q", b"P")
        messages.insert(draw(st.integers(0, len(messages))), other)
    if how == "copyfail":
        messages.append(m.CopyFail("client gave up").encode())
    elif how != "no-end":
        messages.append(m.COPY_DONE)
    start = m.Query(case.sql).encode()
    stream = b"".join(messages) + SELECT_ONE
    if draw(st.booleans()):  # data after CopyInResponse, or pipelined
        client = [start, *_pieces(stream, draw(st.lists(st.integers(1, 10**6), max_size=4)))]
    else:
        client = _pieces(start + stream, draw(st.lists(st.integers(1, 10**6), max_size=4)))
    fail_after = draw(st.integers(0, len(messages))) if how == "server" else None
    return BrokenCopy(case, how, client, fail_after, lost)


def _assert_cells_of_the_row_tenant(case: CopyIn, stored: list[list[PgValue]],
                                    ring: FakeKeyRing, session: str) -> None:
    """Every value PostgreSQL would store in an encrypted column is NULL, DEFAULT, or a cell
    of that column sealed with the key of the row's tenant as PostgreSQL stores it."""
    table = case.table
    tenant_at = case.columns.index("tenant_id") if "tenant_id" in case.columns else None
    for row in stored:
        tenant = row[tenant_at] if tenant_at is not None else session.encode()
        for column, value in zip(case.columns, row, strict=True):
            if column not in table.columns or not isinstance(value, bytes):
                continue
            assert value[:2] == b"\\x", f"{column} would store {value!r}"
            cell = bytes.fromhex(value[2:].decode())
            key = ring.keys[read_cell_header(cell).key_id]
            key.open(f"public.{table.table}.{column}", cell)  # CellError: not its column's
            if not isinstance(tenant, _DefaultMarker):
                assert tenant == key.tenant.encode(), f"{key.tenant}'s cell in a {tenant!r} row"


SERVER_ERRORS: Final = frozenset({"57014", "23505", "08P01"})  # CopyServer's own


@_fuzz(300)
@given(data=st.data())
def test_malformed_copy_data_fails_cleanly(policies, data: st.DataObject) -> None:  # type: ignore[no-untyped-def]
    broken = data.draw(broken_copies(policies))
    case = broken.case
    ring = _ring()
    server = CopyServer(fail_after=broken.fail_after)
    run = play(policies, Script(broken.client, case.sentinels), ring, server=server)
    run.assert_no_internal_error()
    _assert_no_sentinel(bytes(run.upstream))
    sent, _, _ = _copy_frames(bytes(run.upstream))
    try:
        stored = pg_copy_rows(sent, case.fmt, case.columns)
    except PgRefused:
        stored = []  # PostgreSQL fails the COPY: nothing is stored
    _assert_cells_of_the_row_tenant(case, stored, ring, "acme")
    errors = _errors(bytes(run.downstream))
    for error in errors:
        ours = (error.message or "").startswith("pgseal: ")
        assert ours or error.sqlstate in SERVER_ERRORS, error
    if run.closed:
        assert run.closed[0].reason.startswith("client protocol violation"), run.closed
        assert errors and errors[-1].sqlstate == "08P01"
    elif broken.lost_message:  # PostgreSQL's answer: the COPY failed, a message lost
        assert errors
    else:
        _assert_answers_a_query_after(run)
    event(f"{broken.how}: {sorted({str(e.sqlstate) for e in errors}) or 'no error'}")


# --- 3. COPY TO STDOUT: the row's own plaintext, written as PostgreSQL writes it ---------

OUT_TABLES: Final = ("patients", "contacts")
_GOOD_KINDS: Final = ("good", "good", "good", "escape", "null")
_HOSTILE_KINDS: Final = (
    *_GOOD_KINDS, "other_tenant", "other_column", "truncated", "flipped", "garbage",
    "hexgarbage", "unknown_key",
)
ERROR: Final = "error"  # a field whose row must fail with a pgseal error
MAYBE: Final = "null or error"  # a mangled cell: NULL under on_denied null if denied first


@dataclass
class CopyOutCase:
    """A COPY TO STDOUT, the server's stream, and what the client may see of each row."""

    sql: str
    fmt: Format
    user: str
    header: bytes | None  # the server's header line
    rows: list[list[bytes]]  # the server's fields, as it writes them
    outcomes: list[list[bytes | str]]  # per field: what the client gets, ERROR or MAYBE
    bad_width: list[bool]  # rows the server sends with a field too many or too few
    forbidden: list[str]  # plaintexts the client must never see


def _bytea_escape(data: bytes) -> bytes:
    """bytea_output = escape."""
    return b"".join(
        b"\\\\" if c == 0x5C else bytes((c,)) if 0x20 <= c < 0x7F else b"\\%03o" % c
        for c in data
    )


@st.composite
def copy_outs(draw: st.DrawFn, policies: PolicySet) -> CopyOutCase:
    name = draw(st.sampled_from(OUT_TABLES))
    table = policies.tables[("public", name)]
    user = draw(st.sampled_from(["app", "pgseal_app"]))
    may_decrypt = table.decrypt_roles is None or user in table.decrypt_roles
    nulls = table.on_denied == "null"
    form = draw(st.sampled_from(["list", "list", "all", "query"]))
    columns = TABLE_COLUMNS[name]
    if form != "all":
        columns = tuple(draw(st.permutations(columns)))[: draw(st.integers(1, len(columns)))]
        if not any(c in table.columns for c in columns):
            columns += (draw(st.sampled_from(sorted(table.columns))),)
    fmt = draw(formats("to", columns))
    fmt = replace(fmt, header="on" if fmt.header == "match" else fmt.header, eol=b"\n")
    listing = ", ".join(columns)
    sql = {
        "list": f"COPY {name} ({listing}) TO STDOUT{fmt.options()}",
        "all": f"COPY {name} TO STDOUT{fmt.options()}",
        "query": f"COPY (SELECT {listing} FROM {name}) TO STDOUT{fmt.options()}",
    }[form]
    single = len(columns) == 1
    ring = _ring()
    acme, globex = ring.by_tenant["acme"], ring.by_tenant["globex"]
    forbidden: list[str] = []

    def out(value: bytes | None, column: str) -> bytes:
        forced = fmt.force_quote == ("*",) or column in fmt.force_quote
        return pg_field(value, fmt, forced and value is not None, single)

    def secret() -> bytes:
        value = "SENTINEL-" + draw(st.binary(min_size=4, max_size=4)).hex()
        forbidden.append(value)
        return value.encode()

    rows: list[list[bytes]] = []
    outcomes: list[list[bytes | str]] = []
    for n in range(draw(st.sampled_from([0, 1, 2, 3, 4, 4]))):
        hostile = draw(st.integers(0, 3)) == 0  # else a row as PostgreSQL has it
        tenant = draw(st.sampled_from(["acme", "acme", "globex", None])) if hostile else "acme"
        row: list[bytes] = []
        seen: list[bytes | str] = []
        for column in columns:
            policy = table.columns.get(column)
            if policy is None:
                value = str(n).encode() if column == "id" else tenant.encode() if tenant else None
                row.append(out(value, column))
                seen.append(row[-1])
                continue
            kind = draw(st.sampled_from(_HOSTILE_KINDS if hostile else _GOOD_KINDS))
            path = f"public.{name}.{column}"
            if kind == "null":
                row.append(out(None, column))
                seen.append(row[-1])
                continue
            if policy.type == "text":
                plain = (f"GOOD-{n}-{column}" + draw(_TAIL)).encode()
            else:
                plain = b"2024-02-29" if policy.type == "date" else b"12.50"
            canonical = to_canonical(policy.type, plain, 0, SESSION)
            det = policy.search is not None
            cell = acme.seal(path, canonical, deterministic=det)
            denied = not may_decrypt or ("tenant_id" in columns and tenant != "acme")
            outcome: bytes | str = (
                (out(None, column) if nulls else ERROR) if denied
                else out(from_canonical(policy.type, canonical, 0, SESSION), column)
            )
            if kind == "other_tenant":
                cell = globex.seal(path, to_canonical(policy.type, secret(), 0, SESSION)
                                   if policy.type == "text" else canonical, deterministic=det)
                outcome = out(None, column) if nulls else ERROR
            elif kind == "other_column":
                other = next(c for c in table.columns if c != column)
                cell = acme.seal(f"public.{name}.{other}", b"\x01" + secret(), deterministic=det)
                outcome = MAYBE if nulls and denied else ERROR
            elif kind == "unknown_key":
                unknown = CellKey(99, "acme", bytes([99]) * 32)
                cell = unknown.seal(path, b"\x01" + secret(), deterministic=det)
                outcome = ERROR  # the key cannot be had (58030)
            elif kind in ("truncated", "flipped"):
                cell = acme.seal(path, b"\x01" + secret(), deterministic=det)
                at = draw(st.integers(0, len(cell) - 1))
                cell = cell[:at] if kind == "truncated" else (
                    cell[:at] + bytes((cell[at] ^ (1 << draw(st.integers(0, 7))),)) + cell[at + 1 :]
                )
                outcome = MAYBE if nulls and denied else ERROR
            if kind == "garbage":
                text = secret() + draw(_TAIL).encode()
                outcome = ERROR
            elif kind == "hexgarbage":
                text = b"\\x" + (secret() + draw(st.binary(max_size=8))).hex().encode()
                outcome = MAYBE if nulls and denied else ERROR
            elif kind == "escape":
                text = _bytea_escape(cell)
            else:
                text = b"\\x" + cell.hex().encode()
            row.append(out(text, column))
            seen.append(outcome)
        rows.append(row)
        outcomes.append(seen)
    bad_width = [draw(st.integers(0, 19)) == 0 for _ in rows]
    header = (
        fmt.delimiter.encode().join(out(c.encode(), c) for c in columns)
        if fmt.header == "on" else None
    )
    return CopyOutCase(sql, fmt, user, header, rows, outcomes, bad_width, forbidden)


def _server_stream(data: st.DataObject, case: CopyOutCase) -> list[bytes]:
    """The COPY data as PostgreSQL sends it (a CopyData a row), or in random pieces."""
    delimiter = case.fmt.delimiter.encode()
    lines = [] if case.header is None else [case.header]
    for row, bad in zip(case.rows, case.bad_width, strict=True):
        if bad:
            row = row[:-1] if len(row) > 1 else [*row, b"7"]
        lines.append(delimiter.join(row))
    if data.draw(st.booleans()):
        return [line + b"\n" for line in lines]
    stream = b"".join(line + b"\n" for line in lines)
    return _pieces(stream, _cuts(data)) if stream else []


@_fuzz(200)
@given(data=st.data())
def test_copy_to_gives_each_row_its_own_plaintext_or_an_error(  # type: ignore[no-untyped-def]
    policies, data: st.DataObject
) -> None:
    case = data.draw(copy_outs(policies))
    server = CopyServer(copy_out=_server_stream(data, case))
    run = Run(connected(policies, _ring(), "acme", case.user))
    run.session.client_data(m.Query(case.sql).encode())
    sent = run.drain()
    assert b"pgseal_refused_statement" not in sent, case.sql
    answer = server.answer(sent)
    for piece in _pieces(answer, _cuts(data)):
        run.session.server_data(piece)
        run.drain()
    run.assert_no_internal_error()
    downstream = bytes(run.downstream)
    for plaintext in case.forbidden:
        assert plaintext.encode() not in downstream, plaintext
    frames = list(_frames(downstream))
    got = b"".join(body for t, body in frames if t == ord("d"))
    lines = _pg_lines(got, case.fmt)
    if case.header is not None and lines:
        assert lines.pop(0) == case.header
    errors = _errors(downstream)
    delimiter = case.fmt.delimiter.encode()
    null = case.fmt.null.encode()
    for line, outcomes, bad in zip(lines, case.outcomes, case.bad_width, strict=False):
        assert not bad and ERROR not in outcomes, f"a row that must fail went through: {line!r}"
        # A mangled cell let through (MAYBE) can only have been denied: NULL.
        assert line == delimiter.join(o if isinstance(o, bytes) else null for o in outcomes)
    if len(lines) < len(case.rows):
        assert any(
            bad or ERROR in o or MAYBE in o
            for o, bad in zip(case.outcomes[len(lines):], case.bad_width[len(lines):], strict=True)
        ), "rows went missing without a reason"
        (error,) = errors
        assert error.sqlstate in ("42501", "XX001", "58030"), error
        assert (error.message or "").startswith("pgseal: "), error
        after = [t for t, _ in frames[frames.index((ord("E"), error.encode()[5:])):]]
        assert ord("d") not in after, "CopyData after the error"
    else:
        assert errors == []
    run.session.client_data(SELECT_ONE)
    _exchange(run, server)
    _assert_answers_a_query_after(run)
    event(f"rows delivered: {len(lines)} of {len(case.rows)}; error: {bool(errors)}")


# --- what the fuzzing found -----------------------------------------------------------


def _copy_in(policies: PolicySet, sql: str, data: bytes, server: CopyServer | None = None) -> Run:
    """A COPY FROM STDIN of `data` in one CopyData, as libpq sends it, then SELECT 1."""
    client = [m.Query(sql).encode(), m.CopyData(data).encode() + m.COPY_DONE + SELECT_ONE]
    run = play(policies, Script(client, []), server=server or CopyServer())
    run.assert_no_internal_error()
    _assert_answers_a_query_after(run)
    return run


@pytest.mark.parametrize("header", ["HEADER", "HEADER match"])
def test_a_data_row_sent_as_the_header_line_never_goes_upstream(policies, header: str) -> None:  # type: ignore[no-untyped-def]
    """Found by test_copy_from_sends_only_cells_that_open_to_the_values: the header line
    went upstream as the client wrote it, so a data row sent as one (HEADER said of data
    without a header) reached PostgreSQL in plaintext; under HEADER MATCH PostgreSQL quotes
    that line in its error, which the server log keeps. The column names go in its place,
    and MATCH is checked by the proxy."""
    sql = f"COPY patients (tenant_id, ssn) FROM STDIN (FORMAT csv, {header})"
    run = _copy_in(policies, sql, b"acme,SENTINEL-123-45-6789\nacme,SENTINEL-2\n")
    _assert_no_sentinel(bytes(run.upstream))
    sent, _, ends = _copy_frames(bytes(run.upstream))
    errors = [(e.sqlstate, e.message) for e in _errors(bytes(run.downstream))]
    if header == "HEADER":
        assert sent.startswith(b"tenant_id,ssn\nacme,\\x") and ends == "c" and not errors
    else:
        assert sent == b"" and ends == "f"
        assert errors == [("22P04", "pgseal: the header line of the COPY into public.patients "
                                    "does not match its columns (tenant_id, ssn)")]


def test_a_header_line_that_matches_is_forwarded_as_the_column_names(policies) -> None:  # type: ignore[no-untyped-def]
    sql = "COPY patients (tenant_id, ssn) FROM STDIN (FORMAT csv, HEADER match)"
    run = _copy_in(policies, sql, b'tenant_id,"ssn"\nacme,SENTINEL-1\n')
    _assert_no_sentinel(bytes(run.upstream))
    sent, _, ends = _copy_frames(bytes(run.upstream))
    assert sent.startswith(b"tenant_id,ssn\nacme,\\x") and ends == "c"
    assert _errors(bytes(run.downstream)) == []


@pytest.mark.parametrize(
    ("option", "field", "sqlstate"),
    [
        ("FORCE_NULL (tenant_id)", b'"acme"', "42501"),  # NULL to PostgreSQL: no tenant
        ("FORCE_NOT_NULL (tenant_id)", b"acme", None),  # the string 'acme': acme's row
    ],
)
def test_the_row_tenant_is_read_with_the_force_options(  # type: ignore[no-untyped-def]
    policies, option: str, field: bytes, sqlstate: str | None
) -> None:
    """Found by test_copy_from_sends_only_cells_that_open_to_the_values: the tenant field
    was read without FORCE_NULL / FORCE_NOT_NULL, so the proxy's row tenant could differ
    from the one PostgreSQL stores: with NULL 'acme' and FORCE_NULL, a quoted "acme" is
    NULL to PostgreSQL, but the row was sealed under acme's key (a row of no tenant holding
    acme's cells); with FORCE_NOT_NULL an unquoted acme was refused as no tenant."""
    sql = f"COPY payments (tenant_id, card_number) FROM STDIN (FORMAT csv, NULL 'acme', {option})"
    run = _copy_in(policies, sql, field + b",SENTINEL-1\n")
    _assert_no_sentinel(bytes(run.upstream))
    assert [e.sqlstate for e in _errors(bytes(run.downstream))] == ([sqlstate] if sqlstate else [])


def test_an_end_of_data_marker_inside_the_tenant_field_is_a_format_error(policies) -> None:  # type: ignore[no-untyped-def]
    """Found by test_malformed_copy_data_fails_cleanly: `\\.` inside a text field of the
    tenant column ended the session as an internal error (XX000): the CopyFormatError of
    reading it escaped CopyIn._row_tenant. PostgreSQL fails such a COPY (end-of-copy
    marker corrupt); so does the proxy, with 22P04."""
    run = _copy_in(policies, "COPY payments (tenant_id, card_number) FROM STDIN",
                   b"\\.acme\tSENTINEL-1\n")
    _assert_no_sentinel(bytes(run.upstream))
    assert [e.sqlstate for e in _errors(bytes(run.downstream))] == ["22P04"]


# Found by the properties above, in proxy/session/datapath.py.


def test_a_sync_after_copy_done_pipelined_before_copy_in_response_is_answered(policies) -> None:  # type: ignore[no-untyped-def]
    """Parse/Bind/Execute/Sync of a COPY FROM, its data, CopyDone and Sync sent at once (a
    pipelining client; libpq waits for CopyInResponse). PostgreSQL ignores the first Sync
    (inside the COPY) and answers the second. When CopyInResponse arrived, the proxy took
    both for ignored; when the COPY then failed (here: a row with no tenant, CopyFail), its
    error handling skipped past the Query behind and left `server_skipping` set, and the
    client's next Query was dropped unanswered: the client hung. Syncs now remember how
    many CopyDone / CopyFail the client had sent before them."""
    start = (
        m.Parse("", "COPY payments (tenant_id, card_number) FROM STDIN").encode()
        + m.Bind("", "", (), (), ()).encode() + m.Execute("", 0).encode() + m.SYNC
    )
    data = m.CopyData(b"\\N\tSENTINEL-1\n").encode() + m.COPY_DONE + m.SYNC
    run = play(policies, Script([start + data, SELECT_ONE], []), server=CopyServer())
    run.assert_no_internal_error()
    _assert_answers_a_query_after(run)


def test_a_query_inside_a_copy_from_stream_keeps_the_proxy_in_step(policies) -> None:  # type: ignore[no-untyped-def]
    """A Query sent before CopyDone: PostgreSQL fails the COPY (08P01 unexpected message
    type 0x51 during COPY from stdin) and drops the Query. The proxy still waits for its
    answer, so each later result is judged against the statement before it: here the
    patients row of the next SELECT reaches the client as unopened cells. Ending the
    session (08P01), or dropping that entry as PostgreSQL drops the message, would do."""
    server = CopyServer()
    server.keys = _keystore_keys()
    copy = m.Query("COPY notes (body) FROM STDIN").encode() + m.CopyData(b"x\n").encode()
    run = play(policies, Script([copy + SELECT_ONE, m.COPY_DONE], []), server=server)
    run.session.client_data(m.Query("SELECT id, name FROM patients WHERE id = 1").encode())
    _exchange(run, server)
    run.assert_no_internal_error()
    assert run.closed or b"ROW0-acme-name." in run.downstream


@pytest.mark.parametrize(
    "sql",
    [
        "COPY patients (tenant_id, ssn) FROM STDIN (FORMAT binary)",  # refused by the proxy
        "COPY patients (tenant_id, ssn) FROM STDIN /*fail*/",  # permission denied, say
    ],
)
def test_the_stream_of_a_copy_that_never_started_does_not_go_upstream(policies, sql: str) -> None:  # type: ignore[no-untyped-def]
    """A client that sends its COPY data without waiting for CopyInResponse, which reaches
    the proxy after the COPY's error: PostgreSQL drops that CopyData, but the plaintext has
    reached it."""
    stream = m.CopyData(b"acme\tSENTINEL-1\n").encode() + m.COPY_DONE
    run = play(
        policies, Script([m.Query(sql).encode(), stream + SELECT_ONE], []),
        server=CopyServer(fail_marker="/*fail*/"),
    )
    run.assert_no_internal_error()
    _assert_no_sentinel(bytes(run.upstream))

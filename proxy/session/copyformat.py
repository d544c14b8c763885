"""The COPY text and CSV stream formats, as PostgreSQL 15 reads and writes them. Pure.

Theory of operation
-------------------
A COPY stream is rows separated by an end-of-line (LF, CRLF or CR, fixed by
the first line), fields separated by a one-byte delimiter. This module cuts
the stream into rows (`split_rows`, incrementally: CopyData messages carry
arbitrary chunks, a row may span several), rows into raw fields
(`CopyDialect.split_fields`), and converts single fields between their raw
form and their value (`read_field`, `text_field`, `bytea_field`). A row is
reassembled from its raw fields, so everything the proxy does not touch goes
upstream byte for byte as the client wrote it.

The rules follow PostgreSQL's copyfromparse.c / copyto.c (CopyReadLineText,
CopyReadAttributesText/CSV, CopyAttributeOutText/CSV):

text  `\\` escapes: `\\b \\f \\n \\r \\t \\v`, octal `\\ooo`, hex `\\xhh`, any
      other character stands for itself; an escaped newline is data; NULL is
      a raw field equal to the NULL string (default `\\N`); `\\.` before an
      end-of-line ends the data.
csv   fields may be quoted (anywhere in the field, as PostgreSQL allows);
      inside quotes the escape character (default: the quote) escapes a quote
      or itself, and newlines are data; NULL is an unquoted raw field equal to
      the NULL string (default empty), changed per column by FORCE_NOT_NULL /
      FORCE_NULL; a line that is only `\\.` ends the data.

Split state is an immutable value: a caller that cannot finish a chunk (keys
to fetch) keeps the old state and feeds the same chunk again later.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Final

from proxy.rewrite.plan import CopyOptions

# PostgreSQL refuses a line longer than MaxAllocSize (1 GiB - 1) itself.
MAX_ROW: Final = (1 << 30) - 1


class CopyFormatError(Exception):
    """The stream is not valid COPY data of its format. The message names no value."""


class _Default:
    """A field equal to the DEFAULT marker (PostgreSQL 16+): the column's default."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Final = _Default()

_TEXT_ESCAPE = re.compile(rb"\\(?:([0-7]{1,3})|x([0-9A-Fa-f]{1,2})|(.))", re.DOTALL)
_TEXT_CONTROL = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}
_HEX_ALPHABET: Final = frozenset(b"\\x0123456789abcdef")


def _text_unescape(match: re.Match[bytes]) -> bytes:
    octal, hexa, other = match.groups()
    if octal is not None:
        return bytes((int(octal, 8) & 0xFF,))
    if hexa is not None:
        return bytes((int(hexa, 16),))
    if other == b".":
        # Mid-line `\.`: PostgreSQL stops with "end-of-copy marker corrupt".
        raise CopyFormatError("end-of-copy marker corrupt")
    return _TEXT_CONTROL.get(other, other)


def _odd_backslashes_at_end(data: bytes) -> bool:
    n = len(data)
    i = n
    while i > 0 and data[i - 1] == 0x5C:
        i -= 1
    return (n - i) % 2 == 1


@dataclass(frozen=True, slots=True)
class CopyDialect:
    """How one COPY stream writes rows: format, delimiter, NULL and CSV quoting."""

    csv: bool
    delimiter: bytes
    null: bytes
    quote: bytes = b'"'
    escape: bytes = b'"'
    default: bytes | None = None
    _field_re: re.Pattern[bytes] | None = field(default=None, compare=False, repr=False)
    _text_special: re.Pattern[bytes] | None = field(default=None, compare=False, repr=False)
    _bytea_quoted: bool = field(default=False, compare=False, repr=False)

    @classmethod
    def of(cls, options: CopyOptions) -> CopyDialect:
        """The dialect of a COPY statement's options; ValueError (a message for the
        user) for options PostgreSQL would refuse or the proxy cannot read."""
        csv = options.format == "csv"
        if options.format == "binary":
            raise ValueError("binary COPY is not supported on protected tables")
        delimiter = _one_byte(options.delimiter, "," if csv else "\t", "DELIMITER")
        null = (options.null if options.null is not None else ("" if csv else "\\N")).encode()
        quote = _one_byte(options.quote, '"', "QUOTE")
        escape = _one_byte(options.escape, quote.decode(), "ESCAPE")
        default = options.default.encode() if options.default is not None else None
        if delimiter in (b"\r", b"\n") or b"\r" in null or b"\n" in null:
            raise ValueError("COPY delimiter and NULL cannot contain newline or carriage return")
        if not csv and delimiter in b"\\.abcdefghijklmnopqrstuvwxyz0123456789":
            raise ValueError(f"COPY delimiter cannot be {delimiter.decode()!r}")
        if csv and (delimiter == quote or quote in (b"\r", b"\n")):
            raise ValueError("COPY delimiter and quote must be different")
        if not csv and (options.quote is not None or options.escape is not None):
            raise ValueError("COPY QUOTE and ESCAPE are only available in CSV mode")
        if delimiter in null:
            raise ValueError("COPY delimiter must not appear in the NULL specification")
        d, q, e = re.escape(delimiter), re.escape(quote), re.escape(escape)
        if e == q:
            quoted = q + rb"(?:[^" + q + rb"]|" + q + q + rb")*" + q
        else:
            quoted = q + rb"(?:" + e + rb"[" + e + q + rb"]|[^" + q + rb"])*" + q
        field_re = re.compile(rb"(?:[^" + q + d + rb"]+|" + quoted + rb")*")
        special = re.compile(rb"[\x08-\x0d\\" + d + rb"]")
        bytea_quoted = csv and (delimiter[0] in _HEX_ALPHABET or quote[0] in _HEX_ALPHABET)
        return cls(
            csv, delimiter, null, quote, escape, default, field_re, special, bytea_quoted
        )

    # -- rows into fields --------------------------------------------------------------

    def split_fields(self, row: bytes) -> list[bytes]:
        """The raw fields of one row (quotes and escapes still in them)."""
        if self.csv:
            if self.quote not in row:
                return row.split(self.delimiter)
            return self._split_csv(row)
        parts = row.split(self.delimiter)
        if b"\\" not in row:
            return parts
        # A delimiter preceded by an odd run of backslashes is data (`\<delim>`).
        fields: list[bytes] = []
        carry: bytes | None = None
        for part in parts:
            if carry is not None:
                part = carry + self.delimiter + part
                carry = None
            if part[-1:] == b"\\" and _odd_backslashes_at_end(part):
                carry = part
                continue
            fields.append(part)
        if carry is not None:
            fields.append(carry)
        return fields

    def _split_csv(self, row: bytes) -> list[bytes]:
        assert self._field_re is not None
        fields: list[bytes] = []
        pos = 0
        n = len(row)
        delimiter = self.delimiter[0]
        while True:
            match = self._field_re.match(row, pos)
            assert match is not None  # the pattern matches the empty string
            end = match.end()
            fields.append(row[pos:end])
            if end == n:
                return fields
            if row[end] != delimiter:
                raise CopyFormatError("unterminated CSV quoted field")
            pos = end + 1

    # -- one field -----------------------------------------------------------------------

    def read_field(
        self, raw: bytes, force_not_null: bool = False, force_null: bool = False
    ) -> bytes | _Default | None:
        """The value of a raw field: bytes, None for NULL, or DEFAULT."""
        if not self.csv:
            if raw == self.null:
                return None
            if self.default is not None and raw == self.default:
                return DEFAULT
            if b"\\" not in raw:
                return raw
            return _TEXT_ESCAPE.sub(_text_unescape, raw)
        quoted = self.quote in raw
        if not quoted:
            if raw == self.null:
                return self.null if force_not_null else None
            if self.default is not None and raw == self.default:
                return DEFAULT
            value = raw
        else:
            value = self._csv_value(raw)
        if force_null and value == self.null:
            return None
        return value

    def _csv_value(self, raw: bytes) -> bytes:
        """Quotes removed and escapes resolved (CopyReadAttributesCSV)."""
        quote = self.quote
        if raw[:1] == quote and raw[-1:] == quote and len(raw) > 1:
            inner = raw[1:-1]
            if quote not in inner and self.escape not in inner:
                return inner  # "..." with nothing to resolve inside (FORCE_QUOTE output)
        out = bytearray()
        q, e = self.quote[0], self.escape[0]
        i, n = 0, len(raw)
        in_quote = False
        while i < n:
            c = raw[i]
            i += 1
            if not in_quote:
                if c == q:
                    in_quote = True
                else:
                    out.append(c)
                continue
            if c == e and i < n and raw[i] in (e, q):
                out.append(raw[i])
                i += 1
                continue
            if c == q:
                in_quote = False
                continue
            out.append(c)
        if in_quote:
            raise CopyFormatError("unterminated CSV quoted field")
        return bytes(out)

    def text_field(
        self, value: bytes | None, force_quote: bool = False, single: bool = False
    ) -> bytes:
        """A value written as PostgreSQL's COPY TO writes it (None: the NULL string)."""
        if value is None:
            return self.null
        if not self.csv:
            assert self._text_special is not None
            if self._text_special.search(value) is None:
                return value
            return self._text_special.sub(self._text_escape, value)
        quote = force_quote or value == self.null or (single and value == b"\\.")
        if not quote:
            for special in (self.delimiter, self.quote, b"\n", b"\r"):
                if special in value:
                    quote = True
                    break
        if not quote:
            return value
        q, e = self.quote, self.escape
        body = value.replace(e, e + e) if e != q else value
        body = body.replace(q, e + q)
        return q + body + q

    def _text_escape(self, match: re.Match[bytes]) -> bytes:
        c = match.group()
        letter = _CONTROL_LETTER.get(c)  # before the delimiter test: a tab is `\t` even then
        if letter is not None:
            return b"\\" + letter
        return b"\\" + c  # a backslash or the delimiter

    def bytea_field(self, cell: bytes) -> bytes:
        """A sealed cell as a bytea field in hex format (`\\x...`)."""
        if not self.csv:
            return b"\\\\x" + cell.hex().encode()
        value = b"\\x" + cell.hex().encode()
        if self._bytea_quoted:
            return self.text_field(value, force_quote=True)
        return value

    def bytea_value(self, raw: bytes) -> bytes:
        """The text of a bytea field as PostgreSQL writes it (escapes resolved)."""
        if not self.csv and raw[:3] == b"\\\\x" and raw.count(b"\\") == 2:
            return raw[1:]  # the common case: hex output, one doubled backslash
        value = self.read_field(raw)
        if not isinstance(value, bytes):  # pragma: no cover - the caller checked NULL
            raise CopyFormatError("NULL where a cell was expected")
        return value


_CONTROL_LETTER = {b"\b": b"b", b"\f": b"f", b"\n": b"n", b"\r": b"r", b"\t": b"t", b"\v": b"v"}


def _one_byte(value: str | None, default: str, what: str) -> bytes:
    encoded = (value if value is not None else default).encode()
    if len(encoded) != 1:
        raise ValueError(f"COPY {what} must be a single one-byte character")
    return encoded


# --- rows ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SplitState:
    """Where a stream stands between two chunks (immutable; see the module doc)."""

    pending: tuple[bytes, ...] = ()  # chunks of the row not finished yet
    pending_len: int = 0
    eol: bytes | None = None  # b"\n", b"\r\n" or b"\r", once the first line has shown it
    ended: bool = False  # the end-of-data marker was seen: the rest is ignored, as upstream


def split_rows(
    dialect: CopyDialect, state: SplitState, chunk: bytes, *, final: bool = False
) -> tuple[list[bytes], SplitState]:
    """The whole rows (end-of-line removed) that `chunk` completes, and the next state.

    `final`: the stream ends after `chunk` (CopyDone): a last line without its
    end-of-line is a row too. Rows after the end-of-data marker are dropped.
    Raises CopyFormatError where PostgreSQL would fail the COPY for the framing.
    """
    if state.ended:
        return [], state
    if state.eol == b"\n" and chunk and not state.pending and chunk.find(b"\n") == len(chunk) - 1:
        # The common case, and how PostgreSQL sends COPY TO: exactly one whole row.
        row = chunk[:-1]
        if not _continues(dialect, row) and not _ends_data(dialect, row, []):
            return [row], state
    if not final and b"\n" not in chunk and b"\r" not in chunk:
        # No row can end in this chunk: keep it without looking at the pending part again.
        size = state.pending_len + len(chunk)
        if size > MAX_ROW:
            raise CopyFormatError("a COPY row is longer than 1 GiB")
        if not chunk:
            return [], state
        return [], replace(state, pending=(*state.pending, chunk), pending_len=size)
    data = b"".join(state.pending) + chunk if state.pending else chunk
    eol = state.eol
    if eol is None:
        eol = _detect_eol(dialect, data, final)
        if eol is None:
            if final:
                eol = b"\n"  # a single line without an end-of-line: any will do
            else:
                size = len(data)
                if size > MAX_ROW:
                    raise CopyFormatError("a COPY row is longer than 1 GiB")
                return [], replace(state, pending=(data,), pending_len=size)
    separator = b"\r" if eol == b"\r" else b"\n"
    parts = data.split(separator)
    rest = parts.pop()
    rows: list[bytes] = []
    carry: bytes | None = None
    ended = False
    for part in parts:
        if carry is not None:
            part = carry + separator + part
            carry = None
        if _continues(dialect, part):
            carry = part
            continue
        if eol == b"\r\n":
            if part[-1:] != b"\r":
                raise CopyFormatError("literal newline found in data")
            part = part[:-1]
        if _ends_data(dialect, part, rows):
            ended = True
            break
        rows.append(part)
    if ended:
        return rows, SplitState(eol=eol, ended=True)
    if carry is not None:
        rest = carry + separator + rest
    if final:
        if rest:
            if dialect.csv and _continues(dialect, rest):
                raise CopyFormatError("unterminated CSV quoted field")
            if not _ends_data(dialect, rest, rows):
                rows.append(rest)
        return rows, SplitState(eol=eol, ended=True)
    if len(rest) > MAX_ROW:
        raise CopyFormatError("a COPY row is longer than 1 GiB")
    return rows, SplitState((rest,) if rest else (), len(rest), eol)


def _continues(dialect: CopyDialect, part: bytes) -> bool:
    """Whether the end-of-line after `part` (a row so far) is data, not a row end."""
    if not dialect.csv:
        return part[-1:] == b"\\" and _odd_backslashes_at_end(part)
    return _in_quote(dialect, part)


def _in_quote(dialect: CopyDialect, data: bytes) -> bool:
    q = dialect.quote
    if q not in data:
        return False
    if dialect.escape == q:
        return data.count(q) % 2 == 1
    # CopyReadLineText: an escape counts inside quotes only, and not the second of a pair.
    qc, ec = q[0], dialect.escape[0]
    in_quote = last_was_escape = False
    for c in data:
        if in_quote and c == ec:
            last_was_escape = not last_was_escape
        if c == qc and not last_was_escape:
            in_quote = not in_quote
        if c != ec:
            last_was_escape = False
    return in_quote


def _ends_data(dialect: CopyDialect, row: bytes, rows: list[bytes]) -> bool:
    """End-of-data marker: text `\\.` at a line's end (what precedes it is a last row),
    CSV a line that is only `\\.`."""
    if dialect.csv:
        return row == b"\\."
    if row[-2:] != b"\\." or not _odd_backslashes_at_end(row[:-1]):
        return False
    if len(row) > 2:
        rows.append(row[:-2])
    return True


def _detect_eol(dialect: CopyDialect, data: bytes, final: bool) -> bytes | None:
    """The end-of-line of the first line, or None while it cannot be told yet."""
    pos = 0
    n = len(data)
    while True:
        lf = data.find(b"\n", pos)
        cr = data.find(b"\r", pos)
        if lf < 0 and cr < 0:
            return None
        at = lf if cr < 0 or (0 <= lf < cr) else cr
        if _continues(dialect, data[:at]):
            pos = at + 1  # escaped (text) or quoted (CSV): data, not an end-of-line
            continue
        if data[at] == 0x0A:
            return b"\n"
        if at + 1 < n:
            return b"\r\n" if data[at + 1] == 0x0A else b"\r"
        return b"\r" if final else None

"""COPY text and CSV streams (proxy/session/copyformat.py): rows cut from arbitrary
chunks, fields read and written as PostgreSQL 15 does.

The same bytes are fed whole, one byte at a time and in random chunks (h11's habit);
values survive write -> split -> read for any text (Hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.rewrite.plan import CopyOptions
from proxy.session.copyformat import (
    DEFAULT,
    CopyDialect,
    CopyFormatError,
    SplitState,
    split_rows,
)

TEXT = CopyDialect.of(CopyOptions())
CSV = CopyDialect.of(CopyOptions(format="csv"))


def rows_of(dialect: CopyDialect, chunks: list[bytes], final: bool = True) -> list[bytes]:
    state = SplitState()
    rows: list[bytes] = []
    for chunk in chunks:
        got, state = split_rows(dialect, state, chunk)
        rows += got
    if final:
        got, state = split_rows(dialect, state, b"", final=True)
        rows += got
    return rows


def byte_by_byte(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


@pytest.mark.parametrize(
    ("dialect", "stream", "rows"),
    [
        (TEXT, b"a\tb\nc\td\n", [b"a\tb", b"c\td"]),
        (TEXT, b"a\tb\r\nc\td\r\n", [b"a\tb", b"c\td"]),
        (TEXT, b"a\tb\rc\td\r", [b"a\tb", b"c\td"]),
        (TEXT, b"a\\\nb\tc\n", [b"a\\\nb\tc"]),  # an escaped newline is data
        (TEXT, b"a\\\\\nb\n", [b"a\\\\", b"b"]),  # an escaped backslash is not an escape
        (TEXT, b"a\nlast", [b"a", b"last"]),  # no end-of-line after the last row
        (TEXT, b"a\n\\.\nignored\n", [b"a"]),  # end-of-data marker
        (TEXT, b"a\nb\\.\nignored\n", [b"a", b"b"]),  # text: `\.` ends a line's data too
        (CSV, b'a,"b\nc"\nd,e\n', [b'a,"b\nc"', b"d,e"]),  # a quoted newline is data
        (CSV, b'a,"b""\n"\n', [b'a,"b""\n"']),
        (CSV, b'"\\."\n\\.\nignored\n', [b'"\\."']),  # only an unquoted lone `\.` ends CSV
        (CSV, b"a\r\nb\r\n", [b"a", b"b"]),
    ],
)
def test_rows_whole_and_byte_by_byte(
    dialect: CopyDialect, stream: bytes, rows: list[bytes]
) -> None:
    assert rows_of(dialect, [stream]) == rows
    assert rows_of(dialect, byte_by_byte(stream)) == rows


def test_split_state_is_unchanged_until_a_row_ends() -> None:
    state = SplitState()
    got, after = split_rows(TEXT, state, b"abc")
    assert got == [] and after.pending == (b"abc",) and state.pending == ()
    got, again = split_rows(TEXT, after, b"def\nx")
    assert got == [b"abcdef"] and again.pending == (b"x",)
    # Feeding the same chunk to the same state again gives the same answer (NeedKeys retry).
    assert split_rows(TEXT, after, b"def\nx") == (got, again)


def test_escape_quote_different_from_quote() -> None:
    dialect = CopyDialect.of(CopyOptions(format="csv", escape="\\"))
    stream = b'"a\\"\nb",c\n"d\\\\",e\n'
    assert rows_of(dialect, byte_by_byte(stream)) == [b'"a\\"\nb",c', b'"d\\\\",e']
    assert [dialect.read_field(f) for f in dialect.split_fields(b'"a\\"\nb",c')] == [b'a"\nb', b"c"]


def test_malformed_streams_fail() -> None:
    with pytest.raises(CopyFormatError):
        rows_of(CSV, [b'a,"unterminated\n'])
    with pytest.raises(CopyFormatError):
        rows_of(TEXT, [b"a\r\nb\n"])  # CRLF first, then a bare LF
    with pytest.raises(CopyFormatError):
        TEXT.read_field(b"x\\.y")


def test_text_fields() -> None:
    fields = TEXT.split_fields(b"a\\\tb\t\\N\t\\x41\\101\\n\t\t\\\\")
    assert fields == [b"a\\\tb", b"\\N", b"\\x41\\101\\n", b"", b"\\\\"]
    assert [TEXT.read_field(f) for f in fields] == [b"a\tb", None, b"AA\n", b"", b"\\"]
    assert TEXT.text_field(b"a\tb\\c\nd\re") == b"a\\tb\\\\c\\nd\\re"
    assert TEXT.text_field(None) == b"\\N"
    pipe = CopyDialect.of(CopyOptions(delimiter="|", null=""))
    assert pipe.text_field(b"a|b") == b"a\\|b" and pipe.read_field(b"") is None


def test_csv_fields_null_and_force_options() -> None:
    assert CSV.split_fields(b'a,"b,c""",,"",x"y,z"') == [b"a", b'"b,c"""', b"", b'""', b'x"y,z"']
    assert CSV.read_field(b"") is None
    assert CSV.read_field(b'""') == b""
    assert CSV.read_field(b"", True) == b""  # FORCE_NOT_NULL
    assert CSV.read_field(b'""', False, True) is None  # FORCE_NULL
    assert CSV.read_field(b'x"y,z"') == b"xy,z"
    assert CSV.text_field(b"") == b'""'
    assert CSV.text_field(b'say "hi", ok') == b'"say ""hi"", ok"'
    assert CSV.text_field(b"plain", True) == b'"plain"'
    assert CSV.text_field(b"\\.", single=True) == b'"\\."'
    marked = CopyDialect.of(CopyOptions(format="csv", default="@"))
    assert marked.read_field(b"@") is DEFAULT and marked.read_field(b'"@"') == b"@"


def test_bytea_fields() -> None:
    assert TEXT.bytea_field(b"\x01\xff") == b"\\\\x01ff"
    assert TEXT.bytea_value(b"\\\\x01ff") == b"\\x01ff"
    assert CSV.bytea_field(b"\x01\xff") == b"\\x01ff"
    # A delimiter that hex digits use: the field is quoted.
    odd = CopyDialect.of(CopyOptions(format="csv", delimiter="f"))
    assert odd.bytea_field(b"\x01\xff") == b'"\\x01ff"'
    assert odd.split_fields(b'"\\x01ff"f1') == [b'"\\x01ff"', b"1"]


@pytest.mark.parametrize(
    "options",
    [
        CopyOptions(delimiter="ab"),
        CopyOptions(delimiter="\n"),
        CopyOptions(delimiter="a"),  # text: letters would read as escapes
        CopyOptions(format="csv", quote=","),
        CopyOptions(quote="'"),  # QUOTE only in CSV
        CopyOptions(format="binary"),
    ],
)
def test_dialects_postgresql_refuses_are_refused(options: CopyOptions) -> None:
    with pytest.raises(ValueError):
        CopyDialect.of(options)


values = st.one_of(
    st.none(),
    st.text(
        alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
        max_size=12,
    ),
)
row_strategy = st.lists(values, min_size=1, max_size=5)


BACKSLASH_CSV = CopyDialect.of(CopyOptions(format="csv", escape="\\", null="NULL"))


@pytest.mark.parametrize("dialect", [TEXT, CSV, BACKSLASH_CSV])
@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(row_strategy, min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 200), max_size=8),
)
def test_write_split_read_round_trip(
    dialect: CopyDialect, rows: list[list[str | None]], cuts: list[int]
) -> None:
    width = len(rows[0])
    rows = [(r + [None] * width)[:width] for r in rows]
    stream = b"".join(
        dialect.delimiter.join(
            dialect.text_field(None if v is None else v.encode(), single=width == 1) for v in row
        )
        + b"\n"
        for row in rows
    )
    points = sorted({c % (len(stream) + 1) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    got = rows_of(dialect, chunks)
    assert len(got) == len(rows)
    for line, row in zip(got, rows, strict=True):
        fields = dialect.split_fields(line)
        assert [dialect.read_field(f) for f in fields] == [
            None if v is None else v.encode() for v in row
        ]


@pytest.mark.parametrize("dialect", [TEXT, CSV, BACKSLASH_CSV])
@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=120), cut=st.integers(0, 120))
def test_any_bytes_split_or_fail_with_copy_format_error(
    dialect: CopyDialect, data: bytes, cut: int
) -> None:
    """The fuzz invariant: arbitrary input gives rows and fields, or CopyFormatError."""
    try:
        for line in rows_of(dialect, [data[:cut], data[cut:]]):
            for raw in dialect.split_fields(line):
                dialect.read_field(raw)
    except CopyFormatError:
        pass

"""COPY statements: which table, columns, direction and stream format, and whether to refuse.

Pure. sqlglot models COPY only in part (no WHERE, no `FORMAT binary` in the
option list, the pre-9.0 option syntax falls back to an opaque Command), and a
COPY the proxy misreads could stream plaintext into an encrypted column, so the
statement is read here with a small tokenizer following PostgreSQL's grammar
(gram.y `CopyStmt`):

    COPY [BINARY] [ONLY] name [(col, ...)] {FROM|TO} [PROGRAM] {'file'|STDIN|STDOUT}
         [[USING] DELIMITERS 'c'] [WITH] {legacy options | (generic options)} [WHERE ...]
    COPY (query) TO [PROGRAM] {'file'|STDOUT} [WITH] {legacy options | (generic options)}

Anything else is refused when it touches an encrypted column. A COPY that
touches none (a column list of plain columns only, a query with no protected
output and no value to seal) is passthrough.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from proxy.policy.model import AmbiguousTableError, PolicySet, TablePolicy
from proxy.rewrite.lexer import decode_string_literal, fold_identifier, skip_block_comment
from proxy.rewrite.plan import (
    CELL_TENANT,
    UNSUPPORTED,
    ColumnRef,
    CopyFormatName,
    CopyHeader,
    CopyOptions,
    CopyPlan,
    OutputTarget,
    Refusal,
    StatementPlan,
    TenantSource,
)

# (sql, start, end) -> the plan of the statement sql[start:end]: the analyzer's own
# entry point, handed in so that `COPY (query)` reuses the SELECT analysis.
InnerAnalysis = Callable[[str, int, int], StatementPlan]

_TOKEN = re.compile(
    r"""
      (?P<space>\s+|--[^\n]*)
    | (?P<comment>/\*)
    | (?P<estr>[eE]'(?:[^'\\]|\\.|'')*')
    | (?P<ustr>[uU]&'(?:[^']|'')*')
    | (?P<str>'(?:[^']|'')*')
    | (?P<dollar>\$(?P<tag>(?:[^\W\d]\w*)?)\$.*?\$(?P=tag)\$)
    | (?P<uident>[uU]&"(?:[^"]|"")*")
    | (?P<qident>"(?:[^"]|"")*")
    | (?P<word>[^\W\d][\w$]*)
    | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
    | (?P<punct>.)
    """,
    re.VERBOSE | re.DOTALL,
)


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str  # word | ident | str | number | punct | opaque
    text: str  # words folded to lower case; identifiers and strings resolved
    start: int  # offsets into the whole analyzed string
    end: int

    def word(self, *words: str) -> bool:
        return self.kind == "word" and self.text in words

    def punct(self, char: str) -> bool:
        return self.kind == "punct" and self.text == char


class _Unreadable(Exception):
    """Not a COPY statement this module reads with certainty."""


def _tokens(sql: str, start: int, end: int) -> list[_Tok]:
    toks: list[_Tok] = []
    pos = start
    while pos < end:
        m = _TOKEN.match(sql, pos, end)
        if m is None:  # pragma: no cover - the punct branch matches any character
            raise _Unreadable("token")
        kind = m.lastgroup
        text = m.group()
        if kind == "comment":
            pos = skip_block_comment(sql, m.end())
            continue
        pos = m.end()
        if kind == "space":
            continue
        if kind == "word":
            toks.append(_Tok("word", fold_identifier(text), m.start(), m.end()))
        elif kind == "qident":
            toks.append(_Tok("ident", text[1:-1].replace('""', '"'), m.start(), m.end()))
        elif kind in ("str", "estr", "dollar", "ustr"):
            value = decode_string_literal(text)
            toks.append(
                _Tok("str" if value is not None else "opaque", value or "", m.start(), m.end())
            )
        elif kind == "number":
            toks.append(_Tok("number", text, m.start(), m.end()))
        elif kind == "uident":
            toks.append(_Tok("opaque", text, m.start(), m.end()))
        else:
            toks.append(_Tok("punct", text, m.start(), m.end()))
    return toks


@dataclass(slots=True)
class _Statement:
    """What the grammar says, before the policy is consulted."""

    query: tuple[int, int] | None = None  # COPY (query): its span in the whole string
    name: tuple[str, ...] = ()
    name_end: int = 0
    columns: tuple[str, ...] | None = None
    direction: Literal["from", "to"] = "from"
    program: bool = False
    pipe: bool = True  # STDIN / STDOUT (the client's stream), not a server file
    binary: bool = False  # legacy `COPY BINARY t` / `BINARY` option
    where: bool = False
    options: dict[str, object] | None = None


class _Reader:
    def __init__(self, toks: list[_Tok]) -> None:
        self.toks = toks
        self.i = 0

    def peek(self, ahead: int = 0) -> _Tok | None:
        at = self.i + ahead
        return self.toks[at] if at < len(self.toks) else None

    def take(self) -> _Tok:
        tok = self.peek()
        if tok is None:
            raise _Unreadable("unexpected end")
        self.i += 1
        return tok

    def take_word(self, *words: str) -> bool:
        tok = self.peek()
        if tok is not None and tok.word(*words):
            self.i += 1
            return True
        return False

    def take_punct(self, char: str) -> bool:
        tok = self.peek()
        if tok is not None and tok.punct(char):
            self.i += 1
            return True
        return False

    def expect_punct(self, char: str) -> _Tok:
        tok = self.take()
        if not tok.punct(char):
            raise _Unreadable(f"expected {char}")
        return tok

    def name(self) -> str:
        tok = self.take()
        if tok.kind not in ("word", "ident"):
            raise _Unreadable("expected a name")
        return tok.text

    def string(self) -> str:
        tok = self.take()
        if tok.kind != "str":
            raise _Unreadable("expected a string constant")
        return tok.text

    def name_list(self) -> tuple[str, ...]:
        names = [self.name()]
        while self.take_punct(","):
            names.append(self.name())
        return tuple(names)

    @property
    def done(self) -> bool:
        return self.i >= len(self.toks)


def _read_statement(sql: str, start: int, end: int) -> _Statement:
    r = _Reader(_tokens(sql, start, end))
    if not r.take_word("copy"):
        raise _Unreadable("not COPY")
    st = _Statement()
    if r.take_punct("("):
        open_at = r.i - 1
        depth = 1
        while depth:
            tok = r.take()
            if tok.punct("("):
                depth += 1
            elif tok.punct(")"):
                depth -= 1
        st.query = (r.toks[open_at].end, r.toks[r.i - 1].start)
        if not r.take_word("to"):
            raise _Unreadable("COPY (query) goes TO")
        st.direction = "to"
    else:
        st.binary = r.take_word("binary")
        r.take_word("only")
        parts = [r.name()]
        while r.take_punct("."):
            parts.append(r.name())
        if len(parts) > 3:
            raise _Unreadable("name")
        st.name = tuple(parts)
        st.name_end = r.toks[r.i - 1].end
        if r.take_punct("("):
            st.columns = r.name_list()
            r.expect_punct(")")
        direction = r.take()
        if not direction.word("from", "to"):
            raise _Unreadable("FROM or TO")
        st.direction = "from" if direction.text == "from" else "to"
    st.program = r.take_word("program")
    target = r.take()
    if target.kind == "str":
        st.pipe = False
    elif target.word("stdin", "stdout"):
        st.pipe = not st.program
    else:
        raise _Unreadable("file name")
    options: dict[str, object] = {}
    if st.query is None and r.peek() is not None:
        # copy_delimiter: the pre-7.3 `[USING] DELIMITERS 'c'`
        using = r.take_word("using")
        if r.take_word("delimiters"):
            options["delimiter"] = r.string()
        elif using:
            raise _Unreadable("USING DELIMITERS")
    r.take_word("with")
    after = r.peek()
    if after is not None and after.punct("("):
        r.take()
        _generic_options(r, options)
    else:
        _legacy_options(r, options)
    if r.take_word("where"):
        st.where = True
        r.i = len(r.toks)
    if not r.done:
        raise _Unreadable("trailing tokens")
    if options.pop("binary", False):
        st.binary = True
    st.options = options
    return st


_LEGACY_STRING_OPTIONS = ("delimiter", "null", "quote", "escape", "encoding")


def _legacy_options(r: _Reader, options: dict[str, object]) -> None:
    """copy_opt_list: BINARY | FREEZE | CSV | HEADER | DELIMITER [AS] 'c' | NULL [AS] 's'
    | QUOTE [AS] 'c' | ESCAPE [AS] 'c' | ENCODING 's' | FORCE QUOTE {cols | *}
    | FORCE NOT NULL {cols | *} | FORCE NULL {cols | *}"""
    while True:
        tok = r.peek()
        if tok is None or tok.word("where"):
            return
        r.take()
        if tok.word("binary"):
            options["binary"] = True
        elif tok.word("freeze"):
            pass
        elif tok.word("csv"):
            options["format"] = "csv"
        elif tok.word("header"):
            options["header"] = "on"
        elif tok.word(*_LEGACY_STRING_OPTIONS):
            r.take_word("as")
            options[tok.text] = r.string()
        elif tok.word("force"):
            if r.take_word("quote"):
                name = "force_quote"
            elif r.take_word("not"):
                if not r.take_word("null"):
                    raise _Unreadable("FORCE NOT NULL")
                name = "force_not_null"
            elif r.take_word("null"):
                name = "force_null"
            else:
                raise _Unreadable("FORCE")
            options[name] = "*" if r.take_punct("*") else r.name_list()
        else:
            raise _Unreadable("option")


def _generic_options(r: _Reader, options: dict[str, object]) -> None:
    """copy_generic_opt_list: `name [arg]` items up to `)`; arg is a word, a string, a
    number, `*`, DEFAULT or a parenthesized list."""
    while True:
        name_tok = r.take()
        if name_tok.kind != "word":
            raise _Unreadable("option name")
        arg: object = None
        tok = r.peek()
        if tok is None:
            raise _Unreadable("unterminated option list")
        if tok.punct("("):
            r.take()
            arg = r.name_list()
            r.expect_punct(")")
        elif tok.punct("*"):
            r.take()
            arg = "*"
        elif tok.punct("+") or tok.punct("-"):
            r.take()
            arg = tok.text + r.take().text
        elif tok.kind in ("word", "str", "number"):
            r.take()
            arg = tok.text
        if name_tok.text in options and name_tok.text != "binary":
            raise _Unreadable("option given twice")  # PostgreSQL: conflicting or redundant
        options[name_tok.text] = arg
        if r.take_punct(")"):
            return
        r.expect_punct(",")


# --- options ----------------------------------------------------------------------------


class _BadOption(Exception):
    """An option the proxy will not stream through (the message is shown to the user)."""


# Options that do not change how the rows are written in the stream.
_INERT_OPTIONS = frozenset({"freeze", "on_error", "log_verbosity", "reject_limit"})


def _boolean(value: object, name: str, *, match: bool = False) -> str:
    """defGetBoolean (and HEADER's extra MATCH): 'on' | 'off' | 'match'."""
    if value is None:
        return "on"
    text = str(value).lower()
    if text in ("true", "on", "1"):
        return "on"
    if text in ("false", "off", "0"):
        return "off"
    if match and text == "match":
        return "match"
    raise _BadOption(f"COPY option {name} takes a boolean")


def _column_list(value: object, name: str) -> tuple[str, ...] | Literal["*"]:
    if value == "*":
        return "*"
    if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
        return value
    raise _BadOption(f"COPY option {name} takes a column list")


def _options(raw: dict[str, object]) -> CopyOptions:
    fmt: CopyFormatName = "text"
    header: CopyHeader = "off"
    strings: dict[str, str] = {}
    lists: dict[str, tuple[str, ...] | Literal["*"]] = {}
    for name, value in raw.items():
        if name == "format":
            text = str(value).lower()
            if text not in ("text", "csv", "binary"):
                raise _BadOption(f"COPY format {value} is not recognized")
            fmt = "csv" if text == "csv" else "binary" if text == "binary" else "text"
        elif name in ("delimiter", "null", "default", "quote", "escape", "encoding"):
            if not isinstance(value, str):
                raise _BadOption(f"COPY option {name} takes a string")
            strings[name] = value
        elif name == "header":
            mode = _boolean(value, name, match=True)
            header = "match" if mode == "match" else "off" if mode == "off" else "on"
        elif name in ("force_quote", "force_not_null", "force_null"):
            lists[name] = _column_list(value, name.upper())
        elif name in _INERT_OPTIONS:
            continue
        else:
            # Unknown to the proxy, so perhaps a way of writing rows it cannot read.
            raise _BadOption(f"COPY option {name} is not supported through pgseal")
    return CopyOptions(
        format=fmt,
        delimiter=strings.get("delimiter"),
        null=strings.get("null"),
        default=strings.get("default"),
        header=header,
        quote=strings.get("quote"),
        escape=strings.get("escape"),
        force_quote=lists.get("force_quote", ()),
        force_not_null=lists.get("force_not_null", ()),
        force_null=lists.get("force_null", ()),
        encoding=strings.get("encoding"),
    )


_ENCODING_NAME = re.compile(r"[^a-z0-9]")


def is_utf8_encoding(name: str) -> bool:
    """PostgreSQL's encoding-name matching (letters and digits only, any case) for UTF8."""
    return _ENCODING_NAME.sub("", name.lower()) in ("utf8", "unicode")


# --- the plan ---------------------------------------------------------------------------


def copy_targets(table: TablePolicy, columns: tuple[str, ...]) -> tuple[OutputTarget | None, ...]:
    """One entry per COPY column: the encrypted column it carries, or None.

    The tenant source of a read is the row's tenant column when the list has it
    (by position), else the cell's own key (as for a SELECT without it)."""
    tenant: TenantSource = CELL_TENANT
    if table.tenant_column is not None and table.tenant_column in columns:
        tenant = TenantSource(
            "output",
            output=columns.index(table.tenant_column),
            column=ColumnRef(table.schema, table.table, table.tenant_column),
        )
    targets: list[OutputTarget | None] = []
    for name in columns:
        policy = table.columns.get(name)
        if policy is None:
            targets.append(None)
        else:
            ref = ColumnRef(table.schema, table.table, name)
            targets.append(OutputTarget(name, ref, policy, tenant))
    return tuple(targets)


def _refusal(start: int, end: int, message: str, construct: str) -> StatementPlan:
    refusal = Refusal(UNSUPPORTED, f"pgseal: {message}", construct)
    return StatementPlan("refused", start, end, "COPY", refusal=refusal)


def analyze_copy(
    sql: str,
    start: int,
    end: int,
    policies: PolicySet,
    search_path: tuple[str, ...],
    inner: InnerAnalysis,
) -> StatementPlan:
    """The plan of the COPY statement sql[start:end] (see `CopyPlan`)."""
    try:
        st = _read_statement(sql, start, end)
    except _Unreadable:
        return _refusal(
            start,
            end,
            "cannot read a COPY statement that mentions a protected table; it is not forwarded",
            "unparseable COPY",
        )
    if st.query is not None:
        plan = inner(sql, *st.query)
        if plan.kind != "protected":
            return replace(plan, start=start, end=end, command="COPY")
        name = ", ".join(sorted(f"{s}.{t}" for s, t in plan.tables)) or "a protected table"
        if not plan.outputs_exact:
            return _refusal(
                start, end,
                f"COPY (SELECT * ...) over protected table {name}: a COPY stream has no "
                "column descriptions, so the proxy cannot tell which columns are encrypted; "
                "list the columns",
                "COPY (query with *)",
            )
        opens = any(o is not None for o in plan.outputs)
        table_policy = None
    else:
        schema = st.name[-2] if len(st.name) > 1 else None
        try:
            table_policy = policies.resolve(schema, st.name[-1], search_path)
        except AmbiguousTableError as exc:
            return _refusal(start, end, exc.describe(), "COPY")
        if table_policy is None:
            return StatementPlan("passthrough", start, end, "COPY")
        name = table_policy.qualified_name
        listed = st.columns if st.columns is not None else tuple(table_policy.columns)
        if not any(c in table_policy.columns for c in listed):
            return StatementPlan("passthrough", start, end, "COPY")
        opens = st.direction == "to"
        plan = StatementPlan("protected", start, end, "COPY", tables=frozenset({table_policy.key}))
    if not st.pipe:
        where = "PROGRAM" if st.program else "a server file"
        return _refusal(
            start, end,
            f"COPY {'to' if st.direction == 'to' else 'from'} {where} on protected table "
            f"{name} is not supported: the data would bypass the proxy; use STDIN/STDOUT "
            "(psql \\copy)",
            "COPY file",
        )
    try:
        assert st.options is not None
        options = _options(st.options)
    except _BadOption as exc:
        return _refusal(start, end, f"{exc} (protected table {name})", "COPY option")
    if st.binary or options.format == "binary":
        if table_policy is None and not opens:
            return replace(plan, start=start, end=end, command="COPY")
        return _refusal(
            start, end,
            f"binary COPY of protected table {name} is not supported: the proxy seals and "
            "opens text and CSV rows only; use FORMAT text or FORMAT csv",
            "COPY binary",
        )
    if options.encoding is not None and not is_utf8_encoding(options.encoding):
        return _refusal(
            start, end,
            f"COPY of protected table {name} with ENCODING {options.encoding}: only UTF8 "
            "is supported",
            "COPY encoding",
        )
    if st.where:
        return _refusal(
            start, end,
            f"COPY ... FROM ... WHERE on protected table {name} is not supported: filter "
            "the rows before sending them",
            "COPY WHERE",
        )
    if table_policy is not None:
        copy = CopyPlan(st.direction, table_policy.key, st.columns, st.name_end, options)
        outputs = (
            copy_targets(table_policy, st.columns)
            if st.direction == "to" and st.columns is not None
            else ()
        )
        return replace(plan, outputs=outputs, copy=copy)
    if not opens:
        # Only values to seal in the query (a WHERE on a search column): no cell in the
        # stream, so the stream passes as it is.
        return replace(plan, start=start, end=end, command="COPY")
    copy = CopyPlan("to", None, None, start, options)
    return replace(plan, start=start, end=end, command="COPY", copy=copy)

"""Statement analysis with sqlglot: which values to seal, which results to open, what to refuse.

Theory of operation
-------------------
1. `split_statements` cuts the string the way the server will (quotes, dollar
   quotes, comments). Each statement is then handled on its own:
2. SET / RESET / DISCARD are read by `lexer.parse_session_statement`, never by
   the parser (they are frequent: every pooled connection checkout sends one).
3. A statement whose text names no protected table (`PolicySet.
   mentions_protected_table`, a substring test) is passthrough unparsed.
4. The rest is tokenized and parsed (postgres dialect). Columns are mapped to
   the relation they come from with our own scope walk (`_Frame`): sqlglot's
   `qualify` needs the live schema to expand `*` and to place unqualified
   columns, and its scopes skip the DML part of INSERT/UPDATE/DELETE; the walk
   here knows what the policy knows (the protected columns of protected
   tables) and treats everything else as "some plain column".
5. Every reference to an encrypted column must sit in a position the proxy can
   serve: an output, an equality with a parameter/constant (search columns),
   a stored value that is a parameter/constant, IS [NOT] NULL, count().
   Anything else raises `_Refused` and the whole statement is refused:
   the analysis fails closed, it never forwards a half-understood statement.

Offsets: sqlglot gives start/end character offsets for identifiers and
constants only; whole value expressions (casts, negative numbers, TRUE) are
measured on the token stream (`_span`), and VALUES items are cut at their
commas. All offsets in a plan are relative to the whole analyzed string.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Literal, NoReturn

import sqlglot
from sqlglot import Token, TokenType, exp
from sqlglot.dialects.dialect import Dialect
from sqlglot.errors import ParseError, TokenError

from proxy.policy.model import (
    AmbiguousTableError,
    ColumnPolicy,
    PolicySet,
    TableKey,
    TablePolicy,
)
from proxy.rewrite.copy import analyze_copy
from proxy.rewrite.lexer import (
    SessionStatementError,
    decode_string_literal,
    first_keyword,
    fold_identifier,
    glued_parameter_ends,
    parse_session_statement,
    split_statements,
)
from proxy.rewrite.plan import (
    CELL_TENANT,
    SESSION_TENANT,
    UNSUPPORTED,
    ColumnRef,
    LiteralTarget,
    OutputTarget,
    ParamTarget,
    Refusal,
    SessionSetting,
    StatementPlan,
    TenantSource,
    TenantWrite,
    TextEdit,
    Use,
)

DEFAULT_SEARCH_PATH: tuple[str, ...] = ("public",)

# Cells of two different columns never compare equal: the SIV subkey and the
# AAD both bind schema.table.column (DESIGN.md 8). A join between two different
# search columns would silently return nothing, so it is refused. Flip this
# only if the cell format ever derives both from a shared "join group".
CROSS_COLUMN_EQUALITY = False

# Statements longer than this are analyzed but not cached: bulk INSERTs with
# inline values are never sent twice, and the cache must not pin megabytes. (Nor is a
# statement with constants for protected columns, whatever its length: see analyze().)
_CACHE_MAX_SQL = 16 * 1024
_CACHE_ENTRIES = 4096

_DIALECT = Dialect.get_or_raise("postgres")

# sqlglot logs the statement text when it falls back to a generic Command; the
# text may hold plaintext values, and nothing of the kind may reach a log.
logging.getLogger("sqlglot").addFilter(lambda record: False)

_SET_CONFIG = re.compile(r"set_config\s*\(", re.IGNORECASE)
_EXPLAIN_PREFIX = re.compile(
    r"EXPLAIN\s*(?:\((?:[^()'\"]|'[^']*')*\)\s*)?(?:(?:ANALY[SZ]E|VERBOSE)\s+)*",
    re.IGNORECASE,
)
# Statements that carry no values of any column and cannot return one.
_VALUE_FREE_COMMANDS = frozenset(
    {
        "ABORT", "ANALYSE", "ANALYZE", "BEGIN", "CHECKPOINT", "CLOSE", "CLUSTER", "COMMENT",
        "COMMIT", "DEALLOCATE", "DROP", "END", "FETCH", "GRANT", "LISTEN", "LOCK", "MOVE",
        "NOTIFY", "REASSIGN", "REFRESH", "REINDEX", "RELEASE", "REVOKE", "ROLLBACK",
        "SAVEPOINT", "SECURITY", "SHOW", "START", "TRUNCATE", "UNLISTEN", "VACUUM",
    }
)  # fmt: skip
_PARSED_COMMANDS = frozenset(
    {"", "SELECT", "WITH", "INSERT", "UPDATE", "DELETE", "VALUES", "TABLE"}
)
_DDL_COMMANDS = frozenset({"CREATE", "ALTER"})


class _Refused(Exception):
    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


def _refuse(construct: str, message: str, column: ColumnRef | None = None) -> NoReturn:
    raise _Refused(Refusal(UNSUPPORTED, f"pgseal: {message}", construct, column))


def _ident(node: exp.Expr | None) -> str | None:
    if node is None:
        return None
    if isinstance(node, exp.Identifier):
        text = str(node.this)
        return text if node.args.get("quoted") else fold_identifier(text)
    if isinstance(node, exp.TableAlias):
        return _ident(node.this)
    return fold_identifier(str(node.name)) if node.name else None


def _strip_parens(node: exp.Expr) -> exp.Expr:
    while isinstance(node, exp.Paren):
        node = node.this
    return node


def _strip_casts(node: exp.Expr) -> exp.Expr:
    while isinstance(node, (exp.Paren, exp.Cast)):
        node = node.this
    return node


def _conjuncts(node: exp.Expr | None) -> Iterator[exp.Expr]:
    if node is None:
        return
    node = _strip_parens(node)
    if isinstance(node, exp.And):
        yield from _conjuncts(node.this)
        yield from _conjuncts(node.expression)
    else:
        yield node


ValueKind = Literal["param", "literal", "null", "default"]


def _value_core(node: exp.Expr | None) -> tuple[ValueKind, exp.Expr] | None:
    """A value the proxy can seal (or leave alone): parameter, constant, NULL, DEFAULT.

    Parentheses and casts around it are allowed (`$1::text`, `DATE '2020-01-01'`);
    they are replaced with the sealed value, so their type never matters.
    """
    if node is None:
        return None
    e = node
    while isinstance(e, (exp.Paren, exp.Cast)):
        e = e.this
    if isinstance(e, exp.Parameter):
        inner = e.this
        if isinstance(inner, exp.Literal) and not inner.is_string and str(inner.this).isdigit():
            return ("param", e)
        return None
    if isinstance(e, exp.Literal) or isinstance(
        e, (exp.ByteString, exp.RawString, exp.UnicodeString, exp.Boolean)
    ):
        return ("literal", e)
    if isinstance(e, exp.Neg) and isinstance(e.this, exp.Literal) and not e.this.is_string:
        return ("literal", e)
    if isinstance(e, exp.Null):
        return ("null", e)
    if isinstance(e, exp.Var) and str(e.this).upper() == "DEFAULT":
        return ("default", e)
    if (
        isinstance(e, exp.Column)
        and not e.table
        and isinstance(e.this, exp.Identifier)
        and not e.this.args.get("quoted")
        and str(e.this.this).upper() == "DEFAULT"
    ):
        return ("default", e)  # UPDATE ... SET col = DEFAULT parses as a column named DEFAULT
    return None


def _is_current_tenant_call(node: exp.Expr) -> bool:
    """current_setting('pgseal.tenant'[, true]): the row tenant is the session tenant."""
    node = _strip_parens(node)
    while isinstance(node, exp.Cast):
        node = _strip_parens(node.this)
    if not isinstance(node, exp.Func):
        return False
    if node.sql_name().upper() not in ("CURRENT_SETTING", "CURRENTSETTING") and not (
        isinstance(node, exp.Anonymous) and str(node.this).lower() == "current_setting"
    ):
        return False
    args = list(node.iter_expressions())
    return bool(args) and isinstance(args[0], exp.Literal) and args[0].this == "pgseal.tenant"


def _array_operator(node: exp.Expr) -> exp.Expr | None:
    """The operand of `ANY(...)` / `SOME(...)` / `ALL(...)`, else None."""
    if isinstance(node, (exp.Any, exp.All)):
        return _strip_parens(node.this)
    if isinstance(node, exp.Anonymous) and str(node.this).upper() in ("ANY", "SOME", "ALL"):
        args = node.expressions
        return _strip_parens(args[0]) if len(args) == 1 else None
    return None


_CONSTRUCT_NAMES: dict[type[exp.Expr], str] = {
    exp.Like: "LIKE",
    exp.ILike: "ILIKE",
    exp.SimilarTo: "SIMILAR TO",
    exp.RegexpLike: "regular expression match",
    exp.RegexpILike: "regular expression match",
    exp.GT: "comparison >",
    exp.GTE: "comparison >=",
    exp.LT: "comparison <",
    exp.LTE: "comparison <=",
    exp.Between: "BETWEEN",
    exp.Ordered: "ORDER BY",
    exp.Order: "ORDER BY",
    exp.Group: "GROUP BY",
    exp.Cast: "a cast",
    exp.TryCast: "a cast",
    exp.DPipe: "operator ||",
    exp.Add: "arithmetic",
    exp.Sub: "arithmetic",
    exp.Mul: "arithmetic",
    exp.Div: "arithmetic",
    exp.Mod: "arithmetic",
    exp.Neg: "arithmetic",
    exp.Case: "CASE",
    exp.If: "CASE",
    exp.Distinct: "DISTINCT",
    exp.Window: "a window",
    exp.Is: "IS TRUE/FALSE",
    exp.Not: "NOT",
    exp.And: "a boolean AND",
    exp.Or: "a boolean OR",
    exp.JSONExtract: "a JSON operator",
    exp.JSONExtractScalar: "a JSON operator",
    exp.JSONBContains: "a JSON operator",
    exp.JSONBExtract: "a JSON operator",
    exp.JSONBExtractScalar: "a JSON operator",
    exp.ArrayContains: "an array operator",
    exp.Tuple: "a row value",
    exp.Array: "an ARRAY constructor",
    exp.Where: "a boolean test",
    exp.Having: "a boolean test",
    exp.Join: "a join condition",
}


def _construct(node: exp.Expr | None) -> str:
    """A short name for the SQL construct `node` is, for refusal messages."""
    while isinstance(node, exp.Paren):
        node = node.parent
    if node is None:
        return "an expression"
    for cls in type(node).__mro__:
        name = _CONSTRUCT_NAMES.get(cls)
        if name is not None:
            return name
    if isinstance(node, exp.Anonymous):
        return f"function {str(node.this).lower()}()"
    if isinstance(node, exp.Func):
        return f"function {node.sql_name().lower()}()"
    if isinstance(node, exp.Binary):
        return f"operator {type(node).__name__.upper()}"
    return type(node).__name__.upper()


@lru_cache(maxsize=1024)
def _type_node(text: str) -> exp.DataType | None:
    """The type a run of tokens spells, to find where a cast's type ends in the text.

    Parsed inside CAST(NULL AS ...) because DataType.build ignores trailing
    tokens (`text AND x` would pass for `text`). Compared structurally with
    the parsed cast's type: both come from the same parser.
    """
    try:
        cast = sqlglot.parse_one(f"CAST(NULL AS {text})", dialect="postgres")
    except (ParseError, TokenError, ValueError, KeyError):
        return None
    to = cast.args.get("to") if isinstance(cast, exp.Cast) else None
    return to if isinstance(to, exp.DataType) else None


_NOT_IN_TYPES = frozenset(
    {TokenType.COMMA, TokenType.SEMICOLON, TokenType.L_PAREN, TokenType.EQ, TokenType.DCOLON}
)


def _type_depth(token_type: TokenType, depth: int) -> int:
    """Paren depth after a token of a type name; -1 when the token cannot belong to one
    (sqlglot's parser accepts `CAST(NULL AS text,)`, so the text alone cannot tell)."""
    if token_type in (TokenType.L_PAREN, TokenType.L_BRACKET):
        return depth + 1
    if token_type in (TokenType.R_PAREN, TokenType.R_BRACKET):
        return depth - 1
    if token_type in (TokenType.COMMA, TokenType.SEMICOLON):
        return depth if depth > 0 else -1
    if token_type in (TokenType.DCOLON, TokenType.EQ):
        return -1
    return depth


class _Tools(threading.local):
    """A tokenizer and a parser per thread: building them costs more than using them."""

    def __init__(self) -> None:
        self.tokenizer = _DIALECT.tokenizer()
        self.parser = _DIALECT.parser()


_TOOLS = _Tools()


# --- lineage and relations --------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Prot:
    """The value is the cell of an encrypted column, from relation instance `instance`."""

    ref: ColumnRef
    policy: ColumnPolicy
    table: TablePolicy
    instance: int
    # PostgreSQL reports the origin (table OID, attnum) of this output in
    # RowDescription: true for plain column references, also through derived
    # tables and CTEs; false through UNION or a scalar subquery.
    traceable: bool = True


@dataclass(slots=True)
class _Col:
    """One output column of a relation or query."""

    name: str
    lineage: _Prot | None = None
    node: exp.Expr | None = None  # the defining select-list expression
    tenant_of: int | None = None  # this is the tenant column of relation instance N
    # A column of a VALUES list (or a plain reference to one): its item in every
    # row, so INSERT ... SELECT ... FROM (VALUES ...) can seal them where they are.
    values: tuple[exp.Expr, ...] | None = None


@dataclass(slots=True)
class _Star:
    """An unknown number of columns (a `*` over a base table or function)."""

    tables: tuple[tuple[TablePolicy, int], ...] = ()  # protected base tables inside


_Out = _Col | _Star


@dataclass(slots=True)
class _Source:
    """A FROM item visible in a frame."""

    alias: str
    instance: int
    policy: TablePolicy | None = None  # a protected base table
    schema: str | None = None  # base tables: the schema as written (or resolved)
    base: bool = False
    outputs: list[_Out] | None = None  # derived relations (subquery, CTE, VALUES)

    def column(self, name: str) -> tuple[bool, _Col | None]:
        """(definitely has it, the column) for an unqualified lookup of `name`."""
        if self.base:
            p = self.policy
            if p is not None:
                col = p.columns.get(name)
                if col is not None:
                    ref = ColumnRef(p.schema, p.table, name)
                    return True, _Col(name, _Prot(ref, col, p, self.instance))
                if name == p.tenant_column:
                    return True, _Col(name, tenant_of=self.instance)
            return False, None
        assert self.outputs is not None
        for out in self.outputs:
            if isinstance(out, _Col) and out.name == name:
                return True, out
        for out in self.outputs:
            if isinstance(out, _Star):
                for table, instance in out.tables:
                    col = table.columns.get(name)
                    if col is not None:
                        ref = ColumnRef(table.schema, table.table, name)
                        return True, _Col(name, _Prot(ref, col, table, instance))
                    if name == table.tenant_column:
                        return True, _Col(name, tenant_of=instance)
        return False, None

    @property
    def opaque(self) -> bool:
        """May hold columns we cannot list (base tables, `*`, functions)."""
        return self.base or any(isinstance(o, _Star) for o in self.outputs or ())

    @property
    def protected(self) -> bool:
        if self.policy is not None:
            return True
        for out in self.outputs or ():
            if isinstance(out, _Star) and out.tables:
                return True
            if isinstance(out, _Col) and out.lineage is not None:
                return True
        return False

    def expand(self) -> list[_Out]:
        """The columns of `alias.*`."""
        if self.base:
            tables = ((self.policy, self.instance),) if self.policy is not None else ()
            return [_Star(tables)]
        assert self.outputs is not None
        return list(self.outputs)


class _Frame:
    """The relations one SELECT (or DML statement) can see, and its enclosing frame."""

    __slots__ = ("ctes", "parent", "sources")

    def __init__(self, parent: _Frame | None, ctes: dict[str, list[_Out]]) -> None:
        self.parent = parent
        self.ctes = ctes
        self.sources: dict[str, _Source] = {}

    def add(self, source: _Source) -> None:
        if source.alias in self.sources:
            _refuse("FROM", f"table name {source.alias!r} specified more than once")
        self.sources[source.alias] = source

    def chain(self) -> Iterator[_Frame]:
        frame: _Frame | None = self
        while frame is not None:
            yield frame
            frame = frame.parent


# --- the analyzer -------------------------------------------------------------


@dataclass
class _Analysis:
    """Mutable state of one statement's analysis (discarded after building the plan)."""

    text: str  # the statement's text
    base: int  # its offset in the analyzed string
    policies: PolicySet
    search_path: tuple[str, ...]
    tokens: list[Token] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    instances: int = 0
    params: dict[int, ParamTarget] = field(default_factory=dict)
    consumed: set[int] = field(default_factory=set)  # id() of Parameter nodes sealed
    # Where each sealed parameter is written to a column: (index, span); a parameter
    # also compared is sent as the bytea[] of its cells there ("key versions").
    store_sites: list[tuple[int, tuple[int, int] | None]] = field(default_factory=list)
    literals: dict[tuple[int, int], LiteralTarget] = field(default_factory=dict)
    edits: dict[tuple[int, int], TextEdit] = field(default_factory=dict)
    tenant_preds: dict[int, TenantSource] = field(default_factory=dict)
    tenant_writes: list[TenantWrite] = field(default_factory=list)
    tables: set[TableKey] = field(default_factory=set)
    # The statement's own top-level query and the relations its FROM sees (hidden row
    # tenant columns: see hidden_tenant_columns).
    root: exp.Expr | None = None
    root_frame: _Frame | None = None
    # The narrow form (see `analyze`): `col = $n` / `col <> $n` stay as they are.
    narrow: bool = False

    # -- tokens and spans --

    def tokenize(self) -> None:
        cuts = glued_parameter_ends(self.text)
        tokenizer = _TOOLS.tokenizer
        if not cuts:
            self.tokens = tokenizer.tokenize(self.text)
        else:
            # Tokenize piece by piece around `$1,$2` (see glued_parameter_ends),
            # shifting each piece's offsets back to the statement's.
            self.tokens = []
            bounds = [0, *cuts, len(self.text)]
            for lo, hi in itertools.pairwise(bounds):
                for tok in tokenizer.tokenize(self.text[lo:hi]):
                    self.tokens.append(
                        Token(
                            tok.token_type,
                            tok.text,
                            tok.line,
                            tok.col,
                            tok.start + lo,
                            tok.end + lo,
                            tok.comments,
                        )
                    )
        self.starts = [t.start for t in self.tokens]
        self.ends = [t.end for t in self.tokens]

    def _tok_starting(self, offset: int) -> int | None:
        i = bisect.bisect_left(self.starts, offset)
        return i if i < len(self.starts) and self.starts[i] == offset else None

    def _tok_ending(self, end_exclusive: int) -> int | None:
        i = bisect.bisect_left(self.ends, end_exclusive - 1)
        return i if i < len(self.ends) and self.ends[i] == end_exclusive - 1 else None

    def _span(self, node: exp.Expr) -> tuple[int, int] | None:
        """(start, end) of a value expression in the statement text, end exclusive."""
        meta = node.meta if node._meta else None
        if (
            meta
            and "start" in meta
            and isinstance(node, (exp.Literal, exp.ByteString, exp.RawString, exp.UnicodeString))
        ):
            return int(meta["start"]), int(meta["end"]) + 1
        if isinstance(node, exp.Column) and isinstance(node.this, exp.Identifier):
            parts = [p for p in node.parts if isinstance(p, exp.Identifier) and p._meta]
            if len(parts) != len(node.parts):
                return None
            start, end = int(parts[0].meta["start"]), int(parts[-1].meta["end"]) + 1
            # Offsets of a quoted name may or may not include its quotes (sqlglot versions).
            if parts[0].args.get("quoted") and self.text[start : start + 1] != '"':
                start -= 1
            if node.this.args.get("quoted") and self.text[end - 1 : end] != '"':
                end += 1
            return start, end
        if isinstance(node, exp.Parameter):
            inner = node.this
            m = inner.meta if inner._meta else None
            if not m or "start" not in m:
                return None
            start = int(m["start"]) - 1
            if self.text[start : start + 1] != "$":
                return None
            return start, int(m["end"]) + 1
        if isinstance(node, exp.Neg):
            inner_span = self._span(node.this)
            if inner_span is None:
                return None
            i = self._tok_starting(inner_span[0])
            if i is None or i == 0 or self.tokens[i - 1].token_type != TokenType.DASH:
                return None
            return self.tokens[i - 1].start, inner_span[1]
        if isinstance(node, exp.Paren):
            inner_span = self._span(node.this)
            if inner_span is None:
                return None
            i = self._tok_starting(inner_span[0])
            j = self._tok_ending(inner_span[1])
            if (
                i is None
                or j is None
                or i == 0
                or j + 1 >= len(self.tokens)
                or self.tokens[i - 1].token_type != TokenType.L_PAREN
                or self.tokens[j + 1].token_type != TokenType.R_PAREN
            ):
                return None
            return self.tokens[i - 1].start, self.tokens[j + 1].end + 1
        if isinstance(node, exp.Cast):
            inner_span = self._span(node.this)
            if inner_span is None:
                return None
            return self._cast_span(node, inner_span)
        return None

    def _cast_span(self, node: exp.Cast, inner: tuple[int, int]) -> tuple[int, int] | None:
        i0 = self._tok_starting(inner[0])
        i1 = self._tok_ending(inner[1])
        if i0 is None or i1 is None:
            return None
        to = node.args.get("to")
        if not isinstance(to, exp.DataType):
            return None
        toks = self.tokens
        # value::type — the longest run of tokens after `::` that spells the type
        if i1 + 1 < len(toks) and toks[i1 + 1].token_type == TokenType.DCOLON:
            first = i1 + 2
            best = None
            depth = 0
            for j in range(first, min(first + 12, len(toks))):
                depth = _type_depth(toks[j].token_type, depth)
                if depth < 0:
                    break  # a `,` or `)` that ends the expression, not part of the type
                if depth == 0 and _type_node(self.text[toks[first].start : toks[j].end + 1]) == to:
                    best = toks[j].end + 1
            return (inner[0], best) if best is not None else None
        # CAST(value AS type)
        if (
            i0 >= 2
            and toks[i0 - 1].token_type == TokenType.L_PAREN
            and toks[i0 - 2].text.upper() == "CAST"
        ):
            depth = 0
            for j in range(i0 - 1, len(toks)):
                tt = toks[j].token_type
                if tt == TokenType.L_PAREN:
                    depth += 1
                elif tt == TokenType.R_PAREN:
                    depth -= 1
                    if depth == 0:
                        return toks[i0 - 2].start, toks[j].end + 1
            return None
        # type 'constant' — the longest run of tokens before the constant spelling the type
        best = None
        for j in range(i0 - 1, max(i0 - 7, -1), -1):
            if toks[j].token_type in _NOT_IN_TYPES:
                break
            if _type_node(self.text[toks[j].start : toks[i0 - 1].end + 1]) == to:
                best = toks[j].start
        return (best, inner[1]) if best is not None else None

    def _bool_span_after(self, column: exp.Expr) -> tuple[int, int] | None:
        """`col = TRUE`: the TRUE token (sqlglot gives booleans no offsets)."""
        ident = column.this if isinstance(column, exp.Column) else None
        if not isinstance(ident, exp.Identifier) or not ident._meta:
            return None
        i = self._tok_ending(int(ident.meta["end"]) + 1)
        if i is None or i + 2 >= len(self.tokens):
            return None
        op, value = self.tokens[i + 1], self.tokens[i + 2]
        if op.token_type in (TokenType.EQ, TokenType.NEQ) and value.token_type in (
            TokenType.TRUE,
            TokenType.FALSE,
        ):
            return value.start, value.end + 1
        return None

    def _values_slots(
        self, values: exp.Values, anchor: exp.Expr
    ) -> list[list[tuple[int, int]]] | None:
        """Spans of every VALUES item, cut at top-level commas after `anchor`'s end.

        The anchor is the last name of the INSERT column list: the VALUES
        keyword is the first one after it.
        """
        if not isinstance(anchor, exp.Identifier) or not anchor._meta:
            return None
        toks = self.tokens
        i = self._tok_ending(int(anchor.meta["end"]) + 1)
        if i is None:
            return None
        while i < len(toks) and toks[i].token_type != TokenType.VALUES:
            i += 1
        rows: list[list[tuple[int, int]]] = []
        i += 1
        openers = (TokenType.L_PAREN, TokenType.L_BRACKET, TokenType.L_BRACE)
        closers = (TokenType.R_PAREN, TokenType.R_BRACKET, TokenType.R_BRACE)
        while i < len(toks) and toks[i].token_type == TokenType.L_PAREN:
            row: list[tuple[int, int]] = []
            depth = 0
            item_start = i + 1
            j = i + 1
            while j < len(toks):
                tt = toks[j].token_type
                if tt in openers:
                    depth += 1
                elif tt in closers:
                    if depth == 0:
                        if j > item_start:
                            row.append((toks[item_start].start, toks[j - 1].end + 1))
                        break
                    depth -= 1
                elif tt == TokenType.COMMA and depth == 0:
                    if j == item_start:
                        return None
                    row.append((toks[item_start].start, toks[j - 1].end + 1))
                    item_start = j + 1
                j += 1
            else:
                return None
            rows.append(row)
            i = j + 1
            if i + 1 < len(toks) and toks[i].token_type == TokenType.COMMA:
                i += 1
            else:
                break
        shape = [len(t.expressions) for t in values.expressions]
        if [len(r) for r in rows] != shape:
            return None
        return rows

    # -- relations --

    def _new_instance(self) -> int:
        self.instances += 1
        return self.instances

    def _base_source(self, table: exp.Table, ctes: dict[str, list[_Out]]) -> _Source:
        name = _ident(table.this) or ""
        schema = _ident(table.args.get("db"))
        alias_node = table.args.get("alias")
        alias = _ident(alias_node) if alias_node is not None else None
        if table.args.get("catalog") is not None:
            _refuse("FROM", f"cross-database reference {table.sql('postgres')}")
        if schema is None and name in ctes:
            outputs = self._rename(ctes[name], alias_node, name)
            return _Source(alias or name, self._new_instance(), outputs=outputs)
        try:
            policy = self.policies.resolve(schema, name, self.search_path)
        except AmbiguousTableError as exc:
            _refuse("FROM", exc.describe())
        if (
            policy is not None
            and isinstance(alias_node, exp.TableAlias)
            and alias_node.args.get("columns")
        ):
            _refuse(
                "FROM",
                f"column aliases on protected table {policy.qualified_name} are not supported",
            )
        return _Source(
            alias or name,
            self._new_instance(),
            policy=policy,
            schema=schema or (policy.schema if policy else None),
            base=True,
        )

    def _rename(self, outs: list[_Out], alias: exp.Expr | None, what: str) -> list[_Out]:
        """Apply a column alias list `AS x(a, b)` to a derived relation's outputs."""
        names = alias.args.get("columns") if isinstance(alias, exp.TableAlias) else None
        if not names:
            return list(outs)
        if any(isinstance(o, _Star) for o in outs):
            if any(isinstance(o, _Star) and o.tables for o in outs) or any(
                isinstance(o, _Col) and o.lineage for o in outs
            ):
                _refuse("FROM", f"column aliases over * of a protected table in {what}")
            return [_Col(_ident(n) or "") for n in names]
        renamed: list[_Out] = []
        for i, out in enumerate(outs):
            assert isinstance(out, _Col)
            new_name = _ident(names[i]) if i < len(names) else None
            renamed.append(replace(out, name=new_name) if new_name else out)
        return renamed

    def _from_item(
        self, item: exp.Expr, frame: _Frame, pending: list[tuple[exp.Join, _Source]]
    ) -> _Source:
        """Add one FROM item (and the joins hanging off it) to `frame`."""
        ctes = frame.ctes
        alias_node = item.args.get("alias")
        if isinstance(item, exp.Table) and isinstance(item.this, exp.Identifier):
            source = self._base_source(item, ctes)
        elif isinstance(item, exp.Subquery):
            # Not LATERAL: the subquery cannot see its siblings, only the outer frames.
            outs = self.query(item.this, frame.parent, ctes)
            alias = _ident(alias_node) or f"?subquery{self.instances}"
            source = _Source(
                alias, self._new_instance(), outputs=self._rename(outs, alias_node, alias)
            )
        elif isinstance(item, exp.Lateral):
            inner = item.this
            lat_alias = item.args.get("alias") or (
                inner.args.get("alias") if isinstance(inner, exp.Subquery) else None
            )
            if isinstance(inner, exp.Subquery):
                outs = self.query(inner.this, frame, ctes)
            else:
                self.visit(inner, frame)
                outs = [_Star()]
            alias = _ident(lat_alias) or f"?lateral{self.instances}"
            source = _Source(
                alias, self._new_instance(), outputs=self._rename(outs, lat_alias, alias)
            )
        elif isinstance(item, exp.Values):
            outs = self.query(item, frame.parent, ctes)
            alias = _ident(alias_node) or f"?values{self.instances}"
            source = _Source(
                alias, self._new_instance(), outputs=self._rename(outs, alias_node, alias)
            )
        else:
            # Set-returning functions (unnest, generate_series, ...): plain columns we
            # cannot list; their arguments are ordinary expressions.
            for arg in item.iter_expressions():
                if arg is not alias_node:
                    self.visit(arg, frame)
            alias = _ident(alias_node) or fold_identifier(str(item.name or item.key))
            source = _Source(alias, self._new_instance(), outputs=[_Star()])
        frame.add(source)
        for join in item.args.get("joins") or ():
            self._join(join, frame, pending)
        return source

    def _join(self, join: exp.Join, frame: _Frame, pending: list[tuple[exp.Join, _Source]]) -> None:
        before = list(frame.sources.values())
        source = self._from_item(join.this, frame, pending)
        if str(join.args.get("method") or "").upper() == "NATURAL":
            if source.protected or any(s.protected for s in before):
                _refuse("NATURAL JOIN", "NATURAL JOIN with a protected table is not supported")
        pending.append((join, source))

    def _join_conditions(self, frame: _Frame, pending: list[tuple[exp.Join, _Source]]) -> None:
        sources = list(frame.sources.values())
        for join, source in pending:
            using = join.args.get("using")
            if using:
                left = sources[: sources.index(source)]
                for ident in using:
                    name = _ident(ident) or ""
                    _, right_col = source.column(name)
                    left_col = None
                    for s in left:
                        found, col = s.column(name)
                        if found:
                            left_col = col
                    ll = left_col.lineage if left_col else None
                    rl = right_col.lineage if right_col else None
                    if ll or rl:
                        self.join_pair(ll, rl, "JOIN USING")
            on = join.args.get("on")
            if on is not None:
                self.visit(on, frame)

    # -- column lookup --

    def lookup(self, column: exp.Column, frame: _Frame, quiet: bool = False) -> _Col | None:
        """What a column reference denotes; None for a plain (or unknown) column."""
        name = _ident(column.this) or ""
        qualifier = _ident(column.args.get("table"))
        schema = _ident(column.args.get("db"))
        if qualifier is not None:
            for f in frame.chain():
                source = f.sources.get(qualifier)
                if source is None:
                    continue
                if schema is not None and source.base and source.schema not in (schema, None):
                    continue
                _, col = source.column(name)
                return col
            return None  # a composite field or an error the server will report
        for f in frame.chain():
            definite: list[_Col] = []
            maybe = False
            for source in f.sources.values():
                found, col = source.column(name)
                if found and col is not None:
                    definite.append(col)
                elif source.opaque:
                    maybe = True
            protected = [c for c in definite if c.lineage is not None]
            if protected and len(definite) > 1 and not quiet:
                ref = protected[0].lineage.ref if protected[0].lineage else name
                _refuse(
                    "column reference",
                    f"column reference {name!r} is ambiguous ({ref} and another); qualify it",
                )
            if definite:
                return definite[0]
            if maybe:
                if not quiet:
                    self._check_whole_row(name, frame)
                    self._check_outer_ambiguity(name, f)
                return None
        if not quiet:
            self._check_whole_row(name, frame)
        return None

    def _check_whole_row(self, name: str, frame: _Frame) -> None:
        """`SELECT p FROM patients p`, `to_jsonb(p)`: the whole row, sealed cells and all.

        PostgreSQL prefers a column of that name; the proxy cannot know every
        column, so a name that is also a protected relation's alias is refused.
        """
        for f in frame.chain():
            source = f.sources.get(name)
            if source is not None and source.protected:
                what = (
                    source.policy.qualified_name
                    if source.policy is not None
                    else _protected_names(source.outputs or ())
                )
                _refuse(
                    "whole-row reference",
                    f"whole-row reference {name!r} to protected table {what} is not supported "
                    "(it would carry sealed cells; list the columns)",
                )

    def _check_outer_ambiguity(self, name: str, inner: _Frame) -> None:
        """An unqualified name inside a frame with tables we cannot list, also naming an
        encrypted column of an outer frame: we cannot tell which one PostgreSQL binds."""
        outer = inner.parent
        while outer is not None:
            for source in outer.sources.values():
                found, col = source.column(name)
                if found and col is not None and col.lineage is not None:
                    _refuse(
                        "column reference",
                        f"unqualified column {name!r} may be {col.lineage.ref} of an outer "
                        "query; qualify it with its table",
                        col.lineage.ref,
                    )
            outer = outer.parent

    def collect_tenant_preds(self, condition: exp.Expr | None, frame: _Frame) -> None:
        """`alias.tenant_col = $n | 'x'` in a top-level AND: the tenant of that relation's rows."""
        for conj in _conjuncts(condition):
            if not isinstance(conj, exp.EQ):
                continue
            for col, value in ((conj.this, conj.expression), (conj.expression, conj.this)):
                col = _strip_parens(col)
                if not isinstance(col, exp.Column) or isinstance(col.this, exp.Star):
                    continue
                source = self._value_tenant(value)
                if source is None:
                    continue
                found = self.lookup(col, frame, quiet=True)
                if found is not None and found.tenant_of is not None:
                    self.tenant_preds.setdefault(found.tenant_of, source)

    def _value_tenant(self, node: exp.Expr) -> TenantSource | None:
        core = _value_core(node)
        if core is None:
            return SESSION_TENANT if _is_current_tenant_call(node) else None
        kind, value = core
        if kind == "param":
            return TenantSource("param", param=int(value.this.this))
        if kind == "literal":
            text = self._literal_text(value)
            return TenantSource("literal", value=text) if text is not None else None
        if kind == "default":
            return SESSION_TENANT
        return None

    # -- values --

    def _literal_text(self, core: exp.Expr) -> str | None:
        if isinstance(core, exp.Boolean):
            return "true" if core.this else "false"
        if isinstance(core, exp.Neg):
            inner = self._literal_text(core.this)
            return f"-{inner}" if inner is not None else None
        span = self._span(core)
        if span is None:
            return None
        raw = self.text[span[0] : span[1]]
        if isinstance(core, exp.Literal) and not core.is_string:
            return raw
        return decode_string_literal(raw)

    def seal(
        self,
        value: exp.Expr,
        prot: _Prot,
        use: Use,
        tenant: TenantSource,
        *,
        slot: tuple[int, int] | None = None,
        anchor: exp.Expr | None = None,
        array: bool = False,
        force_cast: bool = False,
        versions: bool = False,
        narrow: bool = False,
    ) -> bool:
        """Record that `value` (a parameter or constant) is sealed for `prot`'s column.

        `versions`: a compared value, sent as the bytea[] of its cells under every live
        key version (the caller rewrites the comparison to take an array).
        Returns False for NULL/DEFAULT (nothing to seal). Refuses anything else.
        """
        core = _value_core(value)
        ref = prot.ref
        if core is None:
            _refuse(
                "expression",
                f"a value of encrypted column {ref} must be a parameter or a constant, "
                f"not {_construct(_strip_parens(value))}",
                ref,
            )
        kind, node = core
        if kind in ("null", "default"):
            if kind == "default" and use == "compare":
                _refuse("DEFAULT", f"DEFAULT compared with encrypted column {ref}", ref)
            if kind == "null" and use == "store" and value is not node:
                # A typed NULL (NULL::text): the column is bytea, so the type must go.
                span = slot or self._span(value)
                if span is None:
                    _refuse("cast", f"write NULL without a cast into encrypted column {ref}", ref)
                self.edits[span] = TextEdit(span[0] + self.base, span[1] + self.base, "NULL")
            return False
        self.tables.add(ref.table_key)
        if kind == "param":
            index = int(node.this.this)
            target = ParamTarget(index, ref, prot.policy, use, tenant, array, versions, narrow)
            self._add_param(target)
            self.consumed.add(id(node))
            span = slot or self._span(value)
            if use == "store":
                self.store_sites.append((index, span))
            if value is not node or force_cast:
                if span is None:
                    _refuse("cast", f"cannot locate the cast around ${index} for {ref}", ref)
                cast = f"${index}::bytea[]" if array or versions else f"${index}::bytea"
                self.edits[span] = TextEdit(span[0] + self.base, span[1] + self.base, cast)
            return True
        span = slot or self._span(value)
        if span is None and isinstance(node, exp.Boolean) and anchor is not None and value is node:
            span = self._bool_span_after(anchor)
        if span is None:
            _refuse("constant", f"cannot locate the constant for encrypted column {ref}", ref)
        text = self._literal_text(node)
        if text is None:
            _refuse(
                "constant",
                f"this form of constant for encrypted column {ref} is not supported "
                "(use a plain '...' string or a parameter)",
                ref,
            )
        self.literals[span] = LiteralTarget(
            span[0] + self.base, span[1] + self.base, text, ref, prot.policy, use, tenant,
            versions,
        )
        return True

    def _add_param(self, target: ParamTarget) -> None:
        existing = self.params.get(target.index)
        if existing is None:
            self.params[target.index] = target
            return
        if (existing.column, existing.tenant, existing.array) != (
            target.column,
            target.tenant,
            target.array,
        ):
            _refuse(
                "parameter",
                f"parameter ${target.index} is used for {existing.column} and {target.column} "
                "(or under different tenants); use one parameter per use",
                target.column,
            )
        # Equality columns are sealed deterministically either way: the same cell. A
        # parameter both stored and compared is sent with every version (`versions`)
        # and stored as the first, the active one (see finish_versions).
        self.params[target.index] = replace(
            existing,
            use="store" if "store" in (existing.use, target.use) else "compare",
            versions=existing.versions or target.versions,
            narrow=existing.narrow or target.narrow,
        )

    def finish_versions(self) -> None:
        """Store sites of parameters that are also compared take the active version's cell."""
        for index, span in self.store_sites:
            target = self.params.get(index)
            if target is None or not target.versions or target.array:
                continue
            if span is None:
                _refuse(
                    "parameter",
                    f"cannot locate ${index}, stored in and compared with {target.column}",
                    target.column,
                )
            self.edits[span] = TextEdit(
                span[0] + self.base, span[1] + self.base, f"(${index}::bytea[])[1]"
            )

    # -- comparisons over every key version --

    def _edit(self, start: int, end: int, text: str) -> None:
        """Replace text[start:end] of the statement (start == end: insert)."""
        self.edits[(start, end)] = TextEdit(start + self.base, end + self.base, text)

    def _tok_before(self, offset: int) -> int | None:
        """The last token ending before `offset`."""
        i = bisect.bisect_left(self.ends, offset) - 1
        return i if i >= 0 else None

    def _tok_from(self, offset: int) -> int | None:
        """The first token starting at or after `offset`."""
        i = bisect.bisect_left(self.starts, offset)
        return i if i < len(self.tokens) else None

    def _list_items(
        self, open_index: int
    ) -> tuple[list[tuple[int, int]], list[int], int] | None:
        """The list opened by token `open_index` (`(` or `[`): item spans, the indexes of the
        commas between them, the index of the closing token."""
        toks = self.tokens
        openers = (TokenType.L_PAREN, TokenType.L_BRACKET, TokenType.L_BRACE)
        closers = (TokenType.R_PAREN, TokenType.R_BRACKET, TokenType.R_BRACE)
        depth = 0
        items: list[tuple[int, int]] = []
        commas: list[int] = []
        start = open_index + 1
        for j in range(open_index + 1, len(toks)):
            tt = toks[j].token_type
            if tt in openers:
                depth += 1
            elif tt in closers:
                if depth == 0:
                    if j > start:
                        items.append((toks[start].start, toks[j - 1].end + 1))
                    return items, commas, j
                depth -= 1
            elif tt == TokenType.COMMA and depth == 0:
                if j == start:
                    return None
                items.append((toks[start].start, toks[j - 1].end + 1))
                commas.append(j)
                start = j + 1
        return None

    def _value_span(self, value: exp.Expr, anchor: exp.Expr | None) -> tuple[int, int] | None:
        span = self._span(value)
        if span is None and isinstance(value, exp.Boolean) and anchor is not None:
            span = self._bool_span_after(anchor)
        return span

    def _versions_compare(
        self, node: exp.Expr, column: exp.Expr, value: exp.Expr, value_first: bool, ref: ColumnRef
    ) -> None:
        """`col = v` -> `col = ANY(v)`, `col <> v` -> `col <> ALL(v)`, IS [NOT] DISTINCT FROM
        likewise: `v` is now the bytea[] of the value's cells under every live key version."""
        vspan = self._value_span(value, _strip_parens(column))
        cspan = self._span(column)
        if vspan is None:
            _refuse("comparison", f"cannot locate the value compared with {ref}", ref)
        negated = isinstance(node, (exp.NEQ, exp.NullSafeNEQ))
        if isinstance(node, (exp.NullSafeEQ, exp.NullSafeNEQ)):
            if cspan is None:
                _refuse("IS DISTINCT FROM", f"cannot locate {ref} in IS DISTINCT FROM", ref)
            ctext = self.text[cspan[0] : cspan[1]]
            core = _value_core(value)
            null_branch = ""
            if core is not None and core[0] == "param":
                ptext = f"${int(core[1].this.this)}::bytea[]"
                null_branch = f" OR ({ctext} IS NULL AND ({ptext})[1] IS NULL)"
            head = "(NOT ((" if negated else "(("
            tail = f")) IS TRUE{null_branch})" + (")" if negated else "")
            if value_first:
                self._edit(vspan[0], vspan[0], f"{head}{ctext} = ANY(")
                self._edit(vspan[1], cspan[1], tail)
            else:
                self._edit(cspan[0], cspan[0], head)
                self._edit(cspan[1], vspan[0], " = ANY(")
                self._edit(vspan[1], vspan[1], tail)
            return
        op = "<> ALL(" if negated else "= ANY("
        if value_first:
            if cspan is None:
                _refuse(
                    "comparison",
                    f"compare encrypted column {ref} as `column = value`, the column first",
                    ref,
                )
            self._edit(vspan[0], vspan[0], f"{self.text[cspan[0] : cspan[1]]} {op}")
            self._edit(vspan[1], cspan[1], ")")
            return
        i = self._tok_before(vspan[0])
        if i is None or self.tokens[i].token_type not in (TokenType.EQ, TokenType.NEQ):
            _refuse("comparison", f"cannot locate the comparison with {ref}", ref)
        self._edit(self.tokens[i].start, vspan[0], op)
        self._edit(vspan[1], vspan[1], ")")

    def _concat_items(
        self,
        prot: _Prot,
        items: Sequence[exp.Expr],
        spans: list[tuple[int, int]],
        commas: list[int],
        tenant: TenantSource,
        frame: _Frame | None,
    ) -> None:
        """The items of an IN list or ARRAY[...] become `v1 || v2 || ...` of bytea[]s."""
        if len(spans) != len(items):
            _refuse("IN", f"cannot locate the list compared with {prot.ref}", prot.ref)
        for comma in commas:
            tok = self.tokens[comma]
            self._edit(tok.start, tok.end + 1, " ||")
        for item, span in zip(items, spans, strict=True):
            core = _value_core(item)
            if core is not None and core[0] == "null":
                self._edit(span[0], span[1], "ARRAY[NULL]::bytea[]")
            elif core is not None:
                self.seal(item, prot, "compare", tenant, slot=span, versions=True)
            else:
                assert frame is not None
                self.join_pair(prot, self.operand(item, frame), "IN")
                self._edit(span[0], span[0], "ARRAY[")
                self._edit(span[1], span[1], "]")

    def compare_tenant(self, prot: _Prot) -> TenantSource:
        if prot.table.tenant_from_session:
            return SESSION_TENANT
        return self.tenant_preds.get(prot.instance, SESSION_TENANT)

    def require_search(self, prot: _Prot, construct: str) -> None:
        if not prot.policy.searchable:
            _refuse(
                construct,
                f"{construct} on randomized encrypted column {prot.ref} is not supported "
                "(only columns with search: equality can be compared)",
                prot.ref,
            )

    def join_pair(self, left: _Prot | None, right: _Prot | None, construct: str) -> None:
        if left is None or right is None:
            prot = left or right
            assert prot is not None
            _refuse(
                construct,
                f"{construct} between encrypted column {prot.ref} and a plain column "
                "is not supported",
                prot.ref,
            )
        self.require_search(left, construct)
        self.require_search(right, construct)
        if left.ref != right.ref and not (
            CROSS_COLUMN_EQUALITY and left.policy.type == right.policy.type
        ):
            _refuse(
                construct,
                f"{construct} between encrypted columns {left.ref} and {right.ref} is not "
                "supported: cells of different columns never compare equal",
                left.ref,
            )

    # -- expressions --

    def operand(self, node: exp.Expr, frame: _Frame) -> _Prot | None:
        """The encrypted column a comparison operand denotes, if any (visits the rest)."""
        e = _strip_parens(node)
        if isinstance(e, exp.Column) and not isinstance(e.this, exp.Star):
            col = self.lookup(e, frame)
            return col.lineage if col is not None else None
        if isinstance(e, exp.Subquery):
            outs = self.query(e.this, frame, frame.ctes)
            return self._scalar_lineage(outs)
        self.visit(e, frame)
        return None

    def _scalar_lineage(self, outs: list[_Out]) -> _Prot | None:
        if len(outs) == 1 and isinstance(outs[0], _Col):
            lineage = outs[0].lineage
            return replace(lineage, traceable=False) if lineage is not None else None
        for out in outs:
            if isinstance(out, _Star) and out.tables:
                _refuse("subquery", "a subquery over * of a protected table used as a value")
            if isinstance(out, _Col) and out.lineage is not None:
                _refuse("subquery", f"a subquery returning {out.lineage.ref} used as a value")
        return None

    def visit(self, node: exp.Expr | None, frame: _Frame) -> None:
        """Check a plain expression: any encrypted column inside must be in an allowed place."""
        if node is None:
            return
        if isinstance(node, exp.Column):
            if isinstance(node.this, exp.Star):
                qualifier = _ident(node.args.get("table"))
                for f in frame.chain():
                    source = f.sources.get(qualifier or "")
                    if source is not None:
                        if source.protected:
                            _refuse(
                                _construct(node.parent),
                                f"{qualifier}.* of a protected table inside "
                                f"{_construct(node.parent)} is not supported",
                            )
                        break
                return
            col = self.lookup(node, frame)
            if col is not None and col.lineage is not None:
                construct = _construct(node.parent)
                _refuse(
                    construct,
                    f"{construct} on encrypted column {col.lineage.ref} is not supported",
                    col.lineage.ref,
                )
            return
        if isinstance(node, (exp.EQ, exp.NEQ, exp.NullSafeEQ, exp.NullSafeNEQ)):
            self.compare(node, frame)
            return
        if isinstance(node, exp.In):
            self.in_(node, frame)
            return
        if isinstance(node, exp.Is) and isinstance(node.expression, exp.Null):
            self.operand(node.this, frame)  # IS [NOT] NULL works on cells as is
            return
        if isinstance(node, exp.Count):
            self._count(node, frame)
            return
        if isinstance(node, exp.Exists):
            inner = node.this
            self.query(inner.this if isinstance(inner, exp.Subquery) else inner, frame, frame.ctes)
            return
        if isinstance(node, (exp.Subquery, exp.Query)):
            # A subquery as a value inside some other expression (the places where
            # its value may be an encrypted cell, comparisons and outputs, go
            # through operand()/_output()): its cells must not feed the expression.
            query = node.this if isinstance(node, exp.Subquery) else node
            lineage = self._scalar_lineage(self.query(query, frame, frame.ctes))
            if lineage is not None:
                construct = _construct(node.parent)
                _refuse(
                    construct,
                    f"{construct} on encrypted column {lineage.ref} (from a subquery) "
                    "is not supported",
                    lineage.ref,
                )
            return
        if isinstance(node, exp.Ordered):
            prot = self.operand(node.this, frame)
            if prot is not None:
                _refuse(
                    "ORDER BY", f"ORDER BY encrypted column {prot.ref} is not supported", prot.ref
                )
            return
        for child in node.iter_expressions():
            self.visit(child, frame)

    def _count(self, node: exp.Count, frame: _Frame) -> None:
        arg = node.this
        if arg is None or isinstance(arg, exp.Star):
            return
        if isinstance(arg, exp.Distinct):
            for e in arg.expressions:
                prot = self.operand(e, frame)
                if prot is not None:
                    self.require_search(prot, "count(DISTINCT)")
            return
        self.operand(arg, frame)  # count(col) counts non-NULL cells: fine

    def compare(self, node: exp.Binary, frame: _Frame) -> None:
        a, b = _strip_parens(node.this), _strip_parens(node.expression)
        if isinstance(a, exp.Tuple) and isinstance(b, exp.Tuple):
            if len(a.expressions) == len(b.expressions):
                for x, y in zip(a.expressions, b.expressions, strict=True):
                    self._compare_pair(node, x, y, frame, row=True)
                return
        self._compare_pair(node, node.this, node.expression, frame)

    def _compare_pair(
        self, node: exp.Expr, a: exp.Expr, b: exp.Expr, frame: _Frame, *, row: bool = False
    ) -> None:
        construct = (
            "equality comparison"
            if isinstance(node, (exp.EQ, exp.NullSafeEQ))
            else ("comparison <>")
        )
        array_operand = _array_operator(_strip_parens(b))
        if array_operand is not None:
            prot = None if _value_core(a) else self.operand(a, frame)
            if prot is None:
                self.visit(b, frame)
                return
            self._compare_array(prot, array_operand, frame, a)
            return
        a_core, b_core = _value_core(a), _value_core(b)
        la = None if a_core else self.operand(a, frame)
        lb = None if b_core else self.operand(b, frame)
        if la is None and lb is None:
            return
        if la is not None and lb is not None:
            self.join_pair(la, lb, construct)
            return
        if la is not None:
            prot, other, other_core = la, b, b_core
            anchor = _strip_parens(a)
        else:
            assert lb is not None
            prot, other, other_core = lb, a, a_core
            anchor = _strip_parens(b)
        if other_core is None:
            _refuse(
                construct,
                f"{construct} of encrypted column {prot.ref} with an expression is not supported "
                "(compare with a parameter, a constant or the same column)",
                prot.ref,
            )
        if other_core[0] == "null":
            return
        self.require_search(prot, construct)
        if row:
            _refuse(
                "row comparison",
                f"a row comparison with a value for encrypted column {prot.ref} is not "
                f"supported: compare it on its own ({prot.ref.column} = $n)",
                prot.ref,
            )
        column = a if la is not None else b
        tenant = self.compare_tenant(prot)
        if (
            self.narrow
            and isinstance(node, (exp.EQ, exp.NEQ))
            and other_core[0] == "param"
        ):
            # One cell, compared as the client wrote it: right while the tenant has a
            # single live key version, which Bind checks (ParamTarget.narrow).
            self.seal(other, prot, "compare", tenant, anchor=anchor, narrow=True)
            return
        if self.seal(other, prot, "compare", tenant, anchor=anchor, versions=True):
            self._versions_compare(node, column, other, other is a, prot.ref)

    def _compare_array(
        self, prot: _Prot, operand: exp.Expr, frame: _Frame, column: exp.Expr
    ) -> None:
        self.require_search(prot, "= ANY")
        tenant = self.compare_tenant(prot)
        core = _value_core(operand)
        if core is not None and core[0] == "param":
            self.seal(operand, prot, "compare", tenant, array=True, versions=True)
            return
        array = operand
        if isinstance(array, exp.Cast) and isinstance(_strip_parens(array.this), exp.Array):
            array = _strip_parens(array.this)  # ARRAY[...]::varchar[]: the cast goes too
        if isinstance(array, exp.Array):
            self._array_items(prot, array, tenant, column)
            return
        if isinstance(operand, (exp.Subquery, exp.Query)):
            query = operand.this if isinstance(operand, exp.Subquery) else operand
            self._same_column_query(
                prot, self.query(query, frame, frame.ctes), "= ANY (SELECT ...)"
            )
            return
        _refuse(
            "= ANY",
            f"= ANY over {_construct(operand)} for encrypted column {prot.ref} is not supported "
            "(use an array parameter, ARRAY[...] or IN (...))",
            prot.ref,
        )

    def _array_items(
        self, prot: _Prot, array: exp.Array, tenant: TenantSource, column: exp.Expr
    ) -> None:
        """`col = ANY(ARRAY[v1, v2][::type[]])` -> `col = ANY((v1 || v2))` (bytea[] items)."""
        cspan = self._span(column)
        k = self._tok_from(cspan[1]) if cspan is not None else None
        toks = self.tokens
        # col, = or <>, ANY/SOME/ALL, one or more (, ARRAY, [
        if k is not None:
            k += 2
            while k < len(toks) and toks[k].token_type == TokenType.L_PAREN:
                k += 1
        if (
            k is None
            or k + 1 >= len(toks)
            or toks[k].token_type != TokenType.ARRAY
            or toks[k + 1].token_type != TokenType.L_BRACKET
        ):
            _refuse("= ANY", f"cannot locate the ARRAY compared with {prot.ref}", prot.ref)
        found = self._list_items(k + 1)
        if found is None:
            _refuse("= ANY", f"cannot locate the ARRAY compared with {prot.ref}", prot.ref)
        spans, commas, close = found
        # A cast after `]` ends at the parenthesis that closes ANY(.
        end, depth = close, 0
        if close + 1 < len(toks) and toks[close + 1].token_type == TokenType.DCOLON:
            j = close + 2
            while j < len(toks):
                tt = toks[j].token_type
                if tt in (TokenType.L_PAREN, TokenType.L_BRACKET):
                    depth += 1
                elif tt in (TokenType.R_PAREN, TokenType.R_BRACKET):
                    if depth == 0:
                        break
                    depth -= 1
                j += 1
            end = j - 1
        if not array.expressions:
            self._edit(toks[k].start, toks[end].end + 1, "ARRAY[]::bytea[]")
            return
        self._edit(toks[k].start, toks[k + 1].end + 1, "(")
        self._edit(toks[close].start, toks[end].end + 1, ")")
        self._concat_items(prot, array.expressions, spans, commas, tenant, None)

    def _same_column_query(self, prot: _Prot, outs: list[_Out], construct: str) -> None:
        inner = self._scalar_lineage(outs)
        self.join_pair(prot, inner, construct)

    def in_(self, node: exp.In, frame: _Frame) -> None:
        this = _strip_parens(node.this)
        query = node.args.get("query")
        if isinstance(this, exp.Tuple):
            self._in_tuple(node, this, frame)
            return
        prot = None if _value_core(this) else self.operand(this, frame)
        if prot is None:
            for item in node.expressions:
                self.visit(item, frame)
            if query is not None:
                outs = self.query(_strip_subquery(query), frame, frame.ctes)
                if self._scalar_lineage(outs) is not None:
                    _refuse("IN", "IN (SELECT <encrypted column>) compared with a plain value")
            if node.args.get("unnest") is not None:
                self.visit(node.args["unnest"], frame)
            return
        self.require_search(prot, "IN")
        tenant = self.compare_tenant(prot)
        if node.expressions:
            self._in_list(node, prot, tenant, frame)
        if query is not None:
            self._same_column_query(
                prot, self.query(_strip_subquery(query), frame, frame.ctes), "IN"
            )
        if node.args.get("unnest") is not None or node.args.get("field") is not None:
            _refuse(
                "IN", f"this form of IN on encrypted column {prot.ref} is not supported", prot.ref
            )

    def _in_list(self, node: exp.In, prot: _Prot, tenant: TenantSource, frame: _Frame) -> None:
        """`col IN (v1, v2)` -> `col = ANY (v1 || v2)`, NOT IN -> `<> ALL` (bytea[] items)."""
        cspan = self._span(node.this)
        first = self._tok_from(cspan[1]) if cspan is not None else None
        toks = self.tokens
        k, op = first, "= ANY"
        if first is not None and toks[first].token_type == TokenType.NOT:
            k, op = first + 1, "<> ALL"
        if (
            k is None
            or first is None
            or k >= len(toks)
            or toks[k].token_type != TokenType.IN
            or k + 1 >= len(toks)
            or toks[k + 1].token_type != TokenType.L_PAREN
        ):
            _refuse("IN", f"cannot locate the IN list compared with {prot.ref}", prot.ref)
        found = self._list_items(k + 1)
        if found is None:
            _refuse("IN", f"cannot locate the IN list compared with {prot.ref}", prot.ref)
        spans, commas, _ = found
        self._edit(toks[first].start, toks[k].end + 1, op)
        self._concat_items(prot, node.expressions, spans, commas, tenant, frame)

    def _in_tuple(self, node: exp.In, this: exp.Tuple, frame: _Frame) -> None:
        lineages = [None if _value_core(e) else self.operand(e, frame) for e in this.expressions]
        query = node.args.get("query")
        if not any(lineages):
            for item in node.expressions:
                self.visit(item, frame)
            if query is not None:
                outs = self.query(_strip_subquery(query), frame, frame.ctes)
                if any(isinstance(o, _Col) and o.lineage for o in outs):
                    _refuse("IN", "row IN (SELECT <encrypted column> ...) is not supported")
            return
        for row in node.expressions:
            row = _strip_parens(row)
            if not isinstance(row, exp.Tuple) or len(row.expressions) != len(lineages):
                _refuse("IN", "row IN (...) with an encrypted column needs row constants")
            for prot, item in zip(lineages, row.expressions, strict=True):
                if prot is None:
                    self.visit(item, frame)
                    continue
                self.require_search(prot, "IN")
                core = _value_core(item)
                if core is not None and core[0] != "null":
                    _refuse(
                        "row IN",
                        f"row IN (...) with a value for encrypted column {prot.ref} is not "
                        f"supported: compare it on its own ({prot.ref.column} IN (...))",
                        prot.ref,
                    )
                if core is None:
                    self.join_pair(prot, self.operand(item, frame), "IN")
        if query is not None:
            outs = self.query(_strip_subquery(query), frame, frame.ctes)
            if len(outs) != len(lineages) or any(isinstance(o, _Star) for o in outs):
                _refuse("IN", "row IN (SELECT ...) with an encrypted column needs matching columns")
            for prot, out in zip(lineages, outs, strict=True):
                assert isinstance(out, _Col)
                if prot is not None or out.lineage is not None:
                    self.join_pair(prot, out.lineage, "IN")

    # -- queries --

    def query(
        self, node: exp.Expr, parent: _Frame | None, ctes: dict[str, list[_Out]]
    ) -> list[_Out]:
        """Analyze a query (or data-modifying statement); its output columns."""
        node = _strip_subquery(node)
        if isinstance(node, exp.Subquery):  # (SELECT ...) ORDER BY ... LIMIT ...
            outs = self.query(node.this, parent, ctes)
            frame = _Frame(parent, ctes)
            self._order(node.args.get("order"), frame, outs)
            for key in ("limit", "offset"):
                self.visit(node.args.get(key), frame)
            return outs
        ctes = self._with(node, parent, ctes)
        if isinstance(node, exp.Select):
            return self._select(node, parent, ctes)
        if isinstance(node, exp.SetOperation):
            return self._set_operation(node, parent, ctes)
        if isinstance(node, exp.Values):
            frame = _Frame(parent, ctes)
            width = 0
            for row in node.expressions:
                items = row.expressions if isinstance(row, exp.Tuple) else [row]
                width = max(width, len(items))
                for item in items:
                    if _value_core(item) is None:
                        self.visit(item, frame)
            rows = [r.expressions if isinstance(r, exp.Tuple) else [r] for r in node.expressions]
            return [
                _Col(
                    f"column{i + 1}",
                    values=tuple(r[i] for r in rows) if all(len(r) > i for r in rows) else None,
                )
                for i in range(width)
            ]
        if isinstance(node, exp.Insert):
            return self._insert(node, parent, ctes)
        if isinstance(node, exp.Update):
            return self._update(node, parent, ctes)
        if isinstance(node, exp.Delete):
            return self._delete(node, parent, ctes)
        _refuse(type(node).__name__.upper(), f"{type(node).__name__.upper()} here is not supported")

    def _with(
        self, node: exp.Expr, parent: _Frame | None, ctes: dict[str, list[_Out]]
    ) -> dict[str, list[_Out]]:
        with_ = node.args.get("with_")
        if not isinstance(with_, exp.With):
            return ctes
        ctes = dict(ctes)
        recursive = bool(with_.args.get("recursive"))
        for cte in with_.expressions:
            alias = cte.args.get("alias")
            name = _ident(alias) or ""
            body = cte.this
            if recursive and isinstance(body, exp.SetOperation):
                # The recursive part refers to the CTE itself: its columns are those
                # of the non-recursive part.
                left = self.query(body.this, parent, ctes)
                ctes[name] = self._rename(left, alias, name)
                right = self.query(body.expression, parent, ctes)
                outs = self._merge_set(left, right, body)
            else:
                outs = self.query(body, parent, ctes)
            ctes[name] = self._rename(outs, alias, name)
        return ctes

    def _select(
        self, node: exp.Select, parent: _Frame | None, ctes: dict[str, list[_Out]]
    ) -> list[_Out]:
        frame = _Frame(parent, ctes)
        pending: list[tuple[exp.Join, _Source]] = []
        from_ = node.args.get("from_")
        if isinstance(from_, exp.From):
            self._from_item(from_.this, frame, pending)
        for join in node.args.get("joins") or ():
            self._join(join, frame, pending)
        where = node.args.get("where")
        self.collect_tenant_preds(where.this if where is not None else None, frame)
        for join, _ in pending:
            self.collect_tenant_preds(join.args.get("on"), frame)
        self._join_conditions(frame, pending)
        if node is self.root:
            self.root_frame = frame

        outs = self.select_items(node.expressions, frame)
        if where is not None:
            self.visit(where.this, frame)
        self._group(node.args.get("group"), frame, outs)
        having = node.args.get("having")
        if having is not None:
            self.visit(having.this, frame)
        self._distinct(node.args.get("distinct"), frame, outs)
        self._order(node.args.get("order"), frame, outs)
        for key in ("limit", "offset", "qualify", "windows"):
            value = node.args.get(key)
            if isinstance(value, list):
                for v in value:
                    self.visit(v, frame)
            elif value is not None:
                self.visit(value, frame)
        if node.args.get("into") is not None and self._has_protected(outs):
            _refuse(
                "SELECT INTO",
                f"SELECT INTO copying encrypted columns ({_protected_names(outs)}) is not "
                "supported (it would copy sealed cells out of their table)",
            )
        return outs

    @staticmethod
    def _has_protected(outs: Sequence[_Out]) -> bool:
        return any(
            (isinstance(o, _Col) and o.lineage is not None) or (isinstance(o, _Star) and o.tables)
            for o in outs
        )

    def select_items(self, items: Sequence[exp.Expr], frame: _Frame) -> list[_Out]:
        outs: list[_Out] = []
        for item in items:
            if isinstance(item, exp.Star):
                for source in frame.sources.values():
                    outs.extend(source.expand())
                continue
            if isinstance(item, exp.Column) and isinstance(item.this, exp.Star):
                qualifier = _ident(item.args.get("table")) or ""
                starred = frame.sources.get(qualifier)
                if starred is None:
                    _refuse("*", f"{qualifier}.* names no table of this query")
                outs.extend(starred.expand())
                continue
            if isinstance(item, exp.Alias):
                name = _ident(item.args.get("alias")) or "?column?"
                outs.append(self._output(item.this, name, frame))
                continue
            outs.append(self._output(item, _default_name(item), frame))
        return outs

    def _output(self, expr: exp.Expr, name: str, frame: _Frame) -> _Col:
        e = _strip_parens(expr)
        if isinstance(e, exp.Column) and not isinstance(e.this, exp.Star):
            col = self.lookup(e, frame)
            if col is None:
                return _Col(name, node=expr)
            return _Col(name, col.lineage, expr, col.tenant_of, col.values)
        inner = _strip_casts(e)
        if (
            inner is not e
            and isinstance(inner, exp.Column)
            and not isinstance(inner.this, exp.Star)
        ):
            # `p0::VARCHAR` over a VALUES column (SQLAlchemy's insertmanyvalues);
            # a cast of an encrypted column is refused by visit().
            col = self.lookup(inner, frame)
            if col is not None and col.values is not None and col.lineage is None:
                return _Col(name, node=expr, values=col.values)
        if isinstance(e, exp.Subquery):
            return _Col(name, self._scalar_lineage(self.query(e.this, frame, frame.ctes)), expr)
        if _value_core(e) is None:
            self.visit(e, frame)
        return _Col(name, node=expr)

    def _group(self, group: exp.Expr | None, frame: _Frame, outs: list[_Out]) -> None:
        if group is None:
            return
        for item in group.expressions:
            prot = self._output_ref(item, frame, outs, prefer_input=True)
            if prot is not None:
                self.require_search(prot, "GROUP BY")
        for key in ("grouping_sets", "cube", "rollup"):
            for item in group.args.get(key) or ():
                self.visit(item, frame)

    def _distinct(self, distinct: exp.Expr | None, frame: _Frame, outs: list[_Out]) -> None:
        if distinct is None:
            return
        on = distinct.args.get("on")
        if on is not None:
            items = on.expressions if isinstance(on, exp.Tuple) else [on]
            for item in items:
                prot = self._output_ref(item, frame, outs, prefer_input=False)
                if prot is not None:
                    self.require_search(prot, "DISTINCT ON")
            return
        self._require_searchable_outputs(outs, "DISTINCT")

    def _require_searchable_outputs(self, outs: Sequence[_Out], construct: str) -> None:
        for out in outs:
            if isinstance(out, _Col) and out.lineage is not None:
                self.require_search(out.lineage, construct)
            elif isinstance(out, _Star):
                for table, _ in out.tables:
                    for col in table.columns.values():
                        if not col.searchable:
                            ref = ColumnRef(table.schema, table.table, col.name)
                            _refuse(
                                construct,
                                f"{construct} over randomized encrypted column {ref} "
                                "is not supported",
                                ref,
                            )

    def _order(self, order: exp.Expr | None, frame: _Frame, outs: list[_Out]) -> None:
        if order is None:
            return
        for ordered in order.expressions:
            item = ordered.this if isinstance(ordered, exp.Ordered) else ordered
            prot = self._output_ref(item, frame, outs, prefer_input=False)
            if prot is not None:
                _refuse(
                    "ORDER BY", f"ORDER BY encrypted column {prot.ref} is not supported", prot.ref
                )

    def _output_ref(
        self, item: exp.Expr, frame: _Frame, outs: list[_Out], *, prefer_input: bool
    ) -> _Prot | None:
        """The encrypted column a GROUP BY / ORDER BY item names: an ordinal, an output
        name or an input column (PostgreSQL's lookup order differs between the two)."""
        e = _strip_parens(item)
        if isinstance(e, exp.Literal) and not e.is_string and str(e.this).isdigit():
            position = int(e.this)
            if any(isinstance(o, _Star) for o in outs[:position]):
                if self._has_protected(outs):
                    _refuse("ORDER BY", "ordinal reference past a * of a protected table")
                return None
            if 1 <= position <= len(outs):
                out = outs[position - 1]
                return out.lineage if isinstance(out, _Col) else None
            return None
        if (
            isinstance(e, exp.Column)
            and not e.args.get("table")
            and isinstance(e.this, exp.Identifier)
        ):
            name = _ident(e.this)
            by_name = [o for o in outs if isinstance(o, _Col) and o.name == name]
            if by_name and not prefer_input:
                return by_name[0].lineage
            col = self.lookup(e, frame, quiet=bool(by_name))
            if col is not None:
                return col.lineage
            return by_name[0].lineage if by_name else None
        return self.operand(e, frame)

    def _set_operation(
        self, node: exp.SetOperation, parent: _Frame | None, ctes: dict[str, list[_Out]]
    ) -> list[_Out]:
        left = self.query(node.this, parent, ctes)
        right = self.query(node.expression, parent, ctes)
        outs = self._merge_set(left, right, node)
        frame = _Frame(parent, ctes)
        self._order(node.args.get("order"), frame, outs)
        for key in ("limit", "offset"):
            self.visit(node.args.get(key), frame)
        return outs

    def _merge_set(self, left: list[_Out], right: list[_Out], node: exp.Expr) -> list[_Out]:
        what = type(node).__name__.upper()
        if any(isinstance(o, _Star) for o in (*left, *right)):
            if self._has_protected(left) or self._has_protected(right):
                _refuse(what, f"{what} over * of a protected table is not supported")
            return [_Star()]
        if len(left) != len(right):
            return list(left)  # the server reports the mismatch
        distinct = bool(node.args.get("distinct"))
        merged: list[_Out] = []
        for lo, ro in zip(left, right, strict=True):
            assert isinstance(lo, _Col) and isinstance(ro, _Col)
            ll, rl = lo.lineage, ro.lineage
            if ll is None and rl is None:
                merged.append(_Col(lo.name))
                continue
            if ll is None or rl is None:
                plain = lo if ll is None else ro
                prot = ll or rl
                assert prot is not None
                core = _value_core(plain.node) if plain.node is not None else None
                if core is None or core[0] != "null":
                    _refuse(
                        what,
                        f"{what} mixes encrypted column {prot.ref} with a plain value",
                        prot.ref,
                    )
                merged.append(_Col(lo.name, replace(prot, traceable=False, instance=-1)))
                continue
            if ll.ref != rl.ref:
                _refuse(
                    what,
                    f"{what} mixes encrypted columns {ll.ref} and {rl.ref}",
                    ll.ref,
                )
            if distinct:
                self.require_search(ll, f"{what} (without ALL)")
            merged.append(_Col(lo.name, replace(ll, traceable=False, instance=-1)))
        return merged

    # -- data-modifying statements --

    def _target(self, table: exp.Expr, frame: _Frame) -> _Source:
        if not isinstance(table, exp.Table) or not isinstance(table.this, exp.Identifier):
            _refuse("target", f"unsupported target {table.sql('postgres')}")
        source = self._base_source(table, {})
        frame.add(source)
        return source

    def _insert(
        self, node: exp.Insert, parent: _Frame | None, ctes: dict[str, list[_Out]]
    ) -> list[_Out]:
        target = node.this
        column_nodes: list[exp.Expr] | None = None
        if isinstance(target, exp.Schema):
            column_nodes = list(target.expressions)
            target = target.this
        frame = _Frame(parent, ctes)
        source = self._target(target, frame)
        if node is self.root:
            self.root_frame = frame  # what RETURNING sees
        policy = source.policy
        values_frame = _Frame(parent, ctes)  # VALUES items cannot see the target
        body = node.expression
        if body is not None and not isinstance(body, exp.Values):
            body = _strip_subquery(body)
        cols = [_ident(c) or "" for c in column_nodes] if column_nodes is not None else None
        insert_tenant: TenantSource | None = SESSION_TENANT

        if policy is None:
            if isinstance(body, exp.Values):
                self.query(body, parent, ctes)
            elif body is not None:
                outs = self.query(body, parent, ctes)
                for out in outs:
                    moved = out.lineage if isinstance(out, _Col) else None
                    if moved is not None or (isinstance(out, _Star) and out.tables):
                        what = str(moved.ref) if moved else "a protected table's columns"
                        _refuse(
                            "INSERT ... SELECT",
                            f"INSERT ... SELECT of encrypted column {what} into unprotected "
                            f"table {source.alias} would move sealed data out of its column",
                            moved.ref if moved else None,
                        )
        else:
            if cols is None and body is not None:
                _refuse(
                    "INSERT",
                    f"INSERT into protected table {policy.qualified_name} needs a column list",
                )
            if isinstance(body, exp.Values):
                assert cols is not None and column_nodes is not None
                insert_tenant = self._insert_values(body, cols, column_nodes, source, values_frame)
            elif body is not None:
                assert cols is not None
                insert_tenant = self._insert_select(body, cols, source, parent, ctes)
            else:
                insert_tenant = SESSION_TENANT  # DEFAULT VALUES: the column default

        conflict = node.args.get("conflict")
        if conflict is not None:
            self._on_conflict(conflict, frame, source, insert_tenant)
        returning = node.args.get("returning")
        return self.select_items(returning.expressions, frame) if returning is not None else []

    def _row_tenant(
        self, policy: TablePolicy, cols: list[str], items: Sequence[exp.Expr | None]
    ) -> TenantSource | None:
        if policy.tenant_from_session or policy.tenant_column not in cols:
            # No tenant value written: the column default applies, which pgseal
            # expects to be the session tenant (current_setting('pgseal.tenant')).
            return SESSION_TENANT
        item = items[cols.index(policy.tenant_column)]
        return self._value_tenant(item) if item is not None else None

    def _insert_values(
        self,
        body: exp.Values,
        cols: list[str],
        column_nodes: list[exp.Expr],
        source: _Source,
        frame: _Frame,
    ) -> TenantSource | None:
        policy = source.policy
        assert policy is not None
        slots = self._values_slots(body, column_nodes[-1]) if column_nodes else None
        tenants: set[TenantSource | None] = set()
        for r, row in enumerate(body.expressions):
            items = row.expressions if isinstance(row, exp.Tuple) else [row]
            if len(items) != len(cols):
                _refuse("INSERT", "INSERT has a different number of columns and values")
            tenant = self._row_tenant(policy, cols, items)
            tenants.add(tenant)
            wrote = False
            for c, (name, item) in enumerate(zip(cols, items, strict=True)):
                col = policy.columns.get(name)
                if col is None:
                    if name != policy.tenant_column or _value_core(item) is None:
                        if not _is_current_tenant_call(item):
                            self.visit(item, frame)
                    continue
                ref = ColumnRef(policy.schema, policy.table, name)
                prot = _Prot(ref, col, policy, source.instance)
                core = _value_core(item)
                if core is not None and core[0] in ("param", "literal") and tenant is None:
                    _refuse(
                        "tenant",
                        f"the tenant of the row is not known when sealing {ref}: give "
                        f"{policy.tenant_column} as a parameter or a constant",
                        ref,
                    )
                slot = slots[r][c] if slots is not None else None
                if self.seal(item, prot, "store", tenant or SESSION_TENANT, slot=slot):
                    wrote = True
            if wrote:
                assert tenant is not None
                self.tenant_writes.append(TenantWrite(policy.key, r, tenant))
        return tenants.pop() if len(tenants) == 1 else None

    def _insert_select(
        self,
        body: exp.Expr,
        cols: list[str],
        source: _Source,
        parent: _Frame | None,
        ctes: dict[str, list[_Out]],
    ) -> TenantSource | None:
        """INSERT ... SELECT: each target column from a parameter/constant select item,
        from the same encrypted column (a cell copy), or from a VALUES list column
        whose items are parameters/constants (SQLAlchemy's insertmanyvalues:
        `SELECT p0::VARCHAR, ... FROM (VALUES ($1, ..., 0), ...) AS imp_sen(p0, ...)`)."""
        policy = source.policy
        assert policy is not None
        outs = self.query(body, parent, ctes)
        if any(isinstance(o, _Star) for o in outs):
            if any(name in policy.columns for name in cols) or self._has_protected(outs):
                _refuse(
                    "INSERT ... SELECT *",
                    f"INSERT ... SELECT * into protected table {policy.qualified_name} is not "
                    "supported (list the columns)",
                )
            return SESSION_TENANT
        if len(outs) != len(cols):
            _refuse("INSERT", "INSERT has a different number of target columns and expressions")
        col_outs = [o for o in outs if isinstance(o, _Col)]
        row_counts = {len(o.values) for o in col_outs if o.values is not None}
        n_rows = row_counts.pop() if len(row_counts) == 1 else 1
        tenants: set[TenantSource | None] = set()
        for r in range(n_rows):
            items = [o.values[r] if o.values is not None else o.node for o in col_outs]
            tenant = self._row_tenant(policy, cols, items)
            tenants.add(tenant)
            wrote = False
            for name, out, item in zip(cols, col_outs, items, strict=True):
                col = policy.columns.get(name)
                if col is None:
                    if out.lineage is not None:
                        _refuse(
                            "INSERT ... SELECT",
                            f"copying encrypted column {out.lineage.ref} into plain column "
                            f"{policy.qualified_name}.{name} is not supported",
                            out.lineage.ref,
                        )
                    continue
                ref = ColumnRef(policy.schema, policy.table, name)
                if out.lineage is not None:
                    if out.lineage.ref != ref:
                        _refuse(
                            "INSERT ... SELECT",
                            f"copying encrypted column {out.lineage.ref} into {ref} is not "
                            "supported: a cell only opens in its own column",
                            ref,
                        )
                    self._check_copy_tenant(policy, cols, col_outs, out.lineage, ref)
                    continue  # a cell copied within its own column and tenant stays valid
                core = _value_core(item) if item is not None else None
                if core is None or item is None:
                    _refuse(
                        "expression",
                        f"a value of encrypted column {ref} must be a parameter or a constant",
                        ref,
                    )
                if core[0] in ("param", "literal") and tenant is None:
                    _refuse(
                        "tenant",
                        f"the tenant of the row is not known when sealing {ref}: give "
                        f"{policy.tenant_column} as a parameter or a constant",
                        ref,
                    )
                prot = _Prot(ref, col, policy, source.instance)
                # Untyped parameters in a select list or a VALUES list in FROM
                # resolve as text: make them bytea explicitly.
                if self.seal(item, prot, "store", tenant or SESSION_TENANT, force_cast=True):
                    wrote = True
                if out.values is not None and out.node is not None and out.node is not item:
                    self._uncast(out.node, ref)
            if wrote:
                assert tenant is not None
                row = r if n_rows > 1 or any(o.values is not None for o in col_outs) else None
                self.tenant_writes.append(TenantWrite(policy.key, row, tenant))
        return tenants.pop() if len(tenants) == 1 else None

    @staticmethod
    def _check_copy_tenant(
        policy: TablePolicy, cols: list[str], outs: list[_Col], cell: _Prot, ref: ColumnRef
    ) -> None:
        """A copied cell belongs to its source row's tenant: the new row must be that tenant's.

        Only a tenant column copied from the same source row guarantees it; anything else
        (a parameter, a constant, the column default) could write another tenant's row
        (or a cell of another tenant into this one), which nothing downstream can check.
        """
        if policy.tenant_from_session:
            return
        tenant_out = (
            outs[cols.index(policy.tenant_column)] if policy.tenant_column in cols else None
        )
        if tenant_out is None or tenant_out.tenant_of != cell.instance:
            _refuse(
                "INSERT ... SELECT",
                f"INSERT ... SELECT copying cells of {ref} must also copy "
                f"{policy.qualified_name}.{policy.tenant_column} of the same source row "
                "(a cell belongs to its row's tenant)",
                ref,
            )

    def _uncast(self, node: exp.Expr, ref: ColumnRef) -> None:
        """`p0::VARCHAR` carrying a sealed (bytea) VALUES column into `ref`: drop the cast."""
        inner = _strip_casts(node)
        if inner is node:
            return
        span = self._span(node)
        inner_span = self._span(inner)
        if span is None or inner_span is None:
            _refuse("cast", f"cannot locate the cast of the value for {ref}", ref)
        self.edits[span] = TextEdit(
            span[0] + self.base, span[1] + self.base, self.text[inner_span[0] : inner_span[1]]
        )

    def _on_conflict(
        self,
        conflict: exp.Expr,
        frame: _Frame,
        source: _Source,
        insert_tenant: TenantSource | None,
    ) -> None:
        policy = source.policy
        for key in conflict.args.get("conflict_keys") or ():
            e = key.this if isinstance(key, exp.Ordered) else key
            if isinstance(e, exp.Column):
                col = self.lookup(e, frame)
                if col is not None and col.lineage is not None:
                    self.require_search(col.lineage, "ON CONFLICT")
            elif isinstance(e, exp.Identifier) and policy is not None:
                name = _ident(e) or ""
                if name in policy.columns and not policy.columns[name].searchable:
                    ref = ColumnRef(policy.schema, policy.table, name)
                    _refuse(
                        "ON CONFLICT",
                        f"ON CONFLICT on randomized encrypted column {ref} is not supported",
                        ref,
                    )
            else:
                self.visit(e, frame)
        predicate = conflict.args.get("index_predicate")
        if predicate is not None:
            self.visit(predicate.this if isinstance(predicate, exp.Where) else predicate, frame)
        assignments = conflict.args.get("expressions") or []
        if not assignments:
            return
        update_frame = _Frame(frame.parent, frame.ctes)
        for s in frame.sources.values():
            update_frame.add(s)
        excluded = _Source(
            "excluded", self._new_instance(), policy=policy, schema=source.schema, base=True
        )
        update_frame.add(excluded)
        where = conflict.args.get("where")
        # Rows of several tenants (VALUES with different tenant values) only
        # matter if an assignment seals something: then refused in _assign_one.
        tenant = insert_tenant if policy is not None else SESSION_TENANT
        wrote = False
        for assignment in assignments:
            wrote |= self.assignment(assignment, update_frame, source, tenant, excluded)
        if wrote and policy is not None and tenant is not None:
            self.tenant_writes.append(TenantWrite(policy.key, None, tenant))
        if where is not None:
            self.visit(where.this, update_frame)

    def assignment(
        self,
        node: exp.Expr,
        frame: _Frame,
        target: _Source,
        tenant: TenantSource | None,
        excluded: _Source | None = None,
    ) -> bool:
        """`SET col = value`: True if a sealed value is written."""
        if not isinstance(node, exp.EQ):
            self.visit(node, frame)
            return False
        left, right = node.this, node.expression
        if isinstance(left, exp.Tuple):
            names = [_strip_parens(c) for c in left.expressions]
            values = _strip_parens(right)
            if isinstance(values, exp.Tuple) and len(values.expressions) == len(names):
                wrote = False
                for n, v in zip(names, values.expressions, strict=True):
                    wrote |= self._assign_one(n, v, frame, target, tenant, excluded)
                return wrote
            policy = target.policy
            for n in names:
                name = _ident(n.this) if isinstance(n, exp.Column) else None
                if (
                    policy is not None
                    and name is not None
                    and (name in policy.columns or name == policy.tenant_column)
                ):
                    _refuse(
                        "SET (...) = (SELECT ...)",
                        f"SET (...) = (SELECT ...) on protected table {policy.qualified_name} "
                        "is not supported",
                    )
            self.visit(right, frame)
            return False
        return self._assign_one(left, right, frame, target, tenant, excluded)

    def _assign_one(
        self,
        left: exp.Expr,
        right: exp.Expr,
        frame: _Frame,
        target: _Source,
        tenant: TenantSource | None,
        excluded: _Source | None,
    ) -> bool:
        name = _ident(left.this) if isinstance(left, exp.Column) else _ident(left)
        policy = target.policy
        if policy is not None and name in policy.columns:
            assert name is not None
            col = policy.columns[name]
            ref = ColumnRef(policy.schema, policy.table, name)
            prot = _Prot(ref, col, policy, target.instance)
            core = _value_core(right)
            if core is not None:
                if tenant is None and core[0] in ("param", "literal"):
                    _refuse(
                        "ON CONFLICT",
                        f"ON CONFLICT DO UPDATE sealing {ref} for rows of different tenants "
                        "is not supported (one statement per tenant)",
                        ref,
                    )
                return self.seal(right, prot, "store", tenant or SESSION_TENANT, anchor=left)
            lineage = self.operand(right, frame)
            if lineage is None or lineage.ref != ref:
                _refuse(
                    "assignment",
                    f"encrypted column {ref} can only be set to a parameter, a constant, "
                    "NULL, DEFAULT or the same column (not an expression)",
                    ref,
                )
            return False
        if policy is not None and name == policy.tenant_column:
            r = _strip_parens(right)
            if (
                isinstance(r, exp.Column)
                and _ident(r.this) == name
                and (
                    _ident(r.args.get("table"))
                    in (None, target.alias, excluded.alias if excluded else "")
                )
            ):
                return False  # tenant_id = EXCLUDED.tenant_id / itself: the tenant stays
            _refuse(
                "assignment",
                f"changing the tenant column {policy.qualified_name}.{name} of a table with "
                "encrypted columns is not supported (its cells are sealed for the old tenant)",
            )
        lineage = self.operand(right, frame) if _value_core(right) is None else None
        if lineage is not None:
            _refuse(
                "assignment",
                f"copying encrypted column {lineage.ref} into plain column {name} is not supported",
                lineage.ref,
            )
        return False

    def _dml_frame(
        self, node: exp.Expr, parent: _Frame | None, ctes: dict[str, list[_Out]]
    ) -> tuple[_Frame, _Source]:
        frame = _Frame(parent, ctes)
        target = self._target(node.this, frame)
        if node is self.root:
            self.root_frame = frame  # what RETURNING sees
        pending: list[tuple[exp.Join, _Source]] = []
        from_ = node.args.get("from_")
        if isinstance(from_, exp.From):
            self._from_item(from_.this, frame, pending)
        using = node.args.get("using")
        for item in using if isinstance(using, list) else [using]:
            if isinstance(item, exp.Expr):
                self._from_item(item, frame, pending)
        for join in node.args.get("joins") or ():
            self._join(join, frame, pending)
        where = node.args.get("where")
        self.collect_tenant_preds(where.this if where is not None else None, frame)
        for join, _ in pending:
            self.collect_tenant_preds(join.args.get("on"), frame)
        self._join_conditions(frame, pending)
        return frame, target

    def _update(
        self, node: exp.Update, parent: _Frame | None, ctes: dict[str, list[_Out]]
    ) -> list[_Out]:
        frame, target = self._dml_frame(node, parent, ctes)
        policy = target.policy
        tenant = SESSION_TENANT
        if policy is not None and not policy.tenant_from_session:
            tenant = self.tenant_preds.get(target.instance, SESSION_TENANT)
        wrote = False
        for assignment in node.expressions:
            wrote |= self.assignment(assignment, frame, target, tenant)
        if wrote and policy is not None:
            self.tenant_writes.append(TenantWrite(policy.key, None, tenant))
        where = node.args.get("where")
        if where is not None:
            self.visit(where.this, frame)
        for key in ("order", "limit"):
            self.visit(node.args.get(key), frame)
        returning = node.args.get("returning")
        return self.select_items(returning.expressions, frame) if returning is not None else []

    def _delete(
        self, node: exp.Delete, parent: _Frame | None, ctes: dict[str, list[_Out]]
    ) -> list[_Out]:
        frame, _ = self._dml_frame(node, parent, ctes)
        where = node.args.get("where")
        if where is not None:
            self.visit(where.this, frame)
        for key in ("order", "limit"):
            self.visit(node.args.get(key), frame)
        returning = node.args.get("returning")
        return self.select_items(returning.expressions, frame) if returning is not None else []

    # -- DDL --

    def ddl(self, node: exp.Expr) -> None:
        """CREATE/ALTER: no values, except constants for an encrypted column (a
        DEFAULT, a CHECK, a partial-index predicate) that would be stored in the
        catalog in plaintext, and queries (CREATE TABLE AS, views)."""
        query = node.args.get("expression")
        if isinstance(node, exp.Create) and isinstance(query, exp.Query):
            outs = self.query(query, None, {})
            if self._has_protected(outs) or self.params or self.literals:
                kind = str(node.args.get("kind") or "CREATE").upper()
                what = _protected_names(outs) or ", ".join(
                    sorted(f"{schema}.{table}" for schema, table in self.tables)
                )
                _refuse(
                    f"CREATE {kind} AS",
                    f"CREATE {kind} ... AS SELECT over encrypted columns ({what}) is not "
                    "supported (it would copy sealed cells out of their table)",
                )
            return
        protected = self._ddl_tables(node)
        if not protected:
            return
        names = {name for p in protected for name in p.columns}
        for literal in node.find_all(exp.Literal, exp.ByteString, exp.RawString, exp.UnicodeString):
            unit = literal.parent
            while unit is not None and not isinstance(
                unit,
                (exp.ColumnDef, exp.AlterColumn, exp.Constraint, exp.ColumnConstraint, exp.Where),
            ):
                unit = unit.parent
            if unit is None:
                continue
            mentioned = {_ident(c.this) for c in unit.find_all(exp.Column)}
            if isinstance(unit, (exp.ColumnDef, exp.AlterColumn)):
                mentioned.add(_ident(unit.this))
            hit = sorted(n for n in mentioned if n in names)
            if hit:
                _refuse(
                    "DDL constant",
                    f"a constant in DDL for encrypted column {hit[0]} would be stored in "
                    "plaintext (DEFAULT/CHECK/partial index on an encrypted column)",
                )

    def _ddl_tables(self, node: exp.Expr) -> list[TablePolicy]:
        found: list[TablePolicy] = []
        for table in node.find_all(exp.Table):
            if isinstance(table.this, exp.Identifier):
                try:
                    policy = self.policies.resolve(
                        _ident(table.args.get("db")), _ident(table.this) or "", self.search_path
                    )
                except AmbiguousTableError as exc:
                    _refuse("DDL", exc.describe())
                if policy is not None:
                    found.append(policy)
        return found

    def hidden_tenant_columns(self, instances: Sequence[int], n_outputs: int) -> dict[int, int]:
        """Add the row tenant column of each relation instance to the end of the select list
        (of a top-level SELECT) or of the RETURNING list (of an INSERT, UPDATE or DELETE),
        where the client never sees it (the data path drops it from RowDescription and
        DataRow): a cell whose tenant only its own key names is then checked against its
        row's, so one copied into another tenant's row fails to open. Returns instance ->
        output position; empty when the statement is neither (DISTINCT, GROUP BY and HAVING
        would change a SELECT's meaning) or the edited text does not parse back to exactly
        the columns added (the cells are then checked against the session tenant alone, as
        before)."""
        root, frame = self.root, self.root_frame
        if frame is None or not instances:
            return {}
        if isinstance(root, exp.Select):
            if any(root.args.get(k) for k in ("distinct", "group", "having", "into")):
                return {}
            at, n_items = self._top_level_from(), len(root.expressions)
        elif isinstance(root, (exp.Insert, exp.Update, exp.Delete)):
            returning = root.args.get("returning")
            if returning is None:
                return {}
            # RETURNING ends the statement in PostgreSQL's grammar.
            at, n_items = self._statement_end(), len(returning.expressions)
        else:
            return {}
        by_instance = {
            src.instance: src
            for src in frame.sources.values()
            if src.base and src.policy is not None and src.policy.tenant_column is not None
        }
        chosen = [i for i in dict.fromkeys(instances) if i in by_instance]
        if not chosen or at is None:
            return {}
        added = [(by_instance[i].alias, by_instance[i].policy.tenant_column) for i in chosen]  # type: ignore[union-attr]
        text = "".join(f", {_quote_ident(a)}.{_quote_ident(str(c))}" for a, c in added) + " "
        if not self._adds_exactly(root, at, text, n_items, added):
            return {}
        self._edit(at, at, text)
        return {instance: n_outputs + k for k, instance in enumerate(chosen)}

    def _top_level_from(self) -> int | None:
        """Offset of the FROM that ends the top-level select list (outside parentheses, not
        of IS [NOT] DISTINCT FROM)."""
        depth = 0
        previous: TokenType | None = None
        for tok in self.tokens:
            kind = tok.token_type
            if kind in (TokenType.L_PAREN, TokenType.L_BRACKET):
                depth += 1
            elif kind in (TokenType.R_PAREN, TokenType.R_BRACKET):
                depth -= 1
            elif kind == TokenType.FROM and depth == 0 and previous != TokenType.DISTINCT:
                return tok.start
            previous = kind
        return None

    def _statement_end(self) -> int | None:
        """Offset just after the statement's last token (a trailing `;` not counted)."""
        for tok in reversed(self.tokens):
            if tok.token_type != TokenType.SEMICOLON:
                return tok.end + 1
        return None

    def _adds_exactly(
        self,
        root: exp.Expr,
        at: int,
        text: str,
        n_items: int,
        added: Sequence[tuple[str, str | None]],
    ) -> bool:
        """Whether the statement with `text` inserted at `at` parses to the same kind of
        statement with exactly the `added` (qualifier, column) references after its own
        select (or RETURNING) items."""
        edited = self.text[:at] + text + self.text[at:]
        try:
            trees = _TOOLS.parser.parse(_TOOLS.tokenizer.tokenize(edited), edited)
        except (ParseError, TokenError):
            return False
        tree = trees[0] if len(trees) == 1 else None
        if tree is None or type(tree) is not type(root):
            return False
        if isinstance(tree, exp.Select):
            items = tree.expressions
        else:
            returning = tree.args.get("returning")
            items = returning.expressions if returning is not None else []
        if len(items) != n_items + len(added):
            return False
        for item, (qualifier, column) in zip(items[n_items:], added, strict=True):
            if not (
                isinstance(item, exp.Column)
                and _ident(item.args.get("table")) == qualifier
                and _ident(item.this) == column
                and item.args.get("db") is None
            ):
                return False
        return True

    def final_checks(self, root: exp.Expr) -> None:
        """A parameter sealed for an encrypted column must not also be used as a plain value."""
        if not self.params:
            return
        self.finish_versions()
        for param in root.find_all(exp.Parameter):
            inner = param.this
            if not isinstance(inner, exp.Literal) or not str(inner.this).isdigit():
                continue
            index = int(inner.this)
            target = self.params.get(index)
            if target is not None and id(param) not in self.consumed:
                _refuse(
                    "parameter",
                    f"parameter ${index} is a value of encrypted column {target.column} and is "
                    "also used as a plain value",
                    target.column,
                )


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _protected_names(outs: Sequence[_Out]) -> str:
    """The encrypted columns (and protected tables behind `*`) among outputs, for messages."""
    names: list[str] = []
    for out in outs:
        if isinstance(out, _Col) and out.lineage is not None:
            names.append(str(out.lineage.ref))
        elif isinstance(out, _Star):
            names.extend(table.qualified_name for table, _ in out.tables)
    return ", ".join(dict.fromkeys(names))


def _strip_subquery(node: exp.Expr) -> exp.Expr:
    """The query inside `(...)`; ORDER BY/LIMIT on the parentheses are checked by query()."""
    while isinstance(node, exp.Subquery) and isinstance(node.this, exp.Expr):
        if any(node.args.get(k) is not None for k in ("order", "limit", "offset")):
            break
        node = node.this
    return node


def _default_name(item: exp.Expr) -> str:
    """The field name PostgreSQL gives an unaliased select-list item."""
    e = _strip_parens(item)
    while isinstance(e, exp.Cast):
        e = e.this
    if isinstance(e, exp.Column) and isinstance(e.this, exp.Identifier):
        return _ident(e.this) or "?column?"
    if isinstance(e, exp.Anonymous):
        return fold_identifier(str(e.this))
    if isinstance(e, exp.Func):
        return e.sql_name().lower()
    return "?column?"


# --- plans ------------------------------------------------------------------------


def _output_plan(
    outs: list[_Out], analysis: _Analysis
) -> tuple[
    tuple[OutputTarget | None, ...],
    bool,
    dict[str, tuple[OutputTarget, ...]],
    frozenset[TableKey],
    int,
]:
    exact = not any(isinstance(o, _Star) for o in outs)
    tenant_positions: dict[int, int] = {}
    for i, out in enumerate(outs):
        if isinstance(out, _Col) and out.tenant_of is not None:
            tenant_positions.setdefault(out.tenant_of, i)
    star_instances: dict[int, TablePolicy] = {}
    for out in outs:
        if isinstance(out, _Star):
            for table, instance in out.tables:
                star_instances[instance] = table
    star_counts: dict[TableKey, int] = {}
    for table in star_instances.values():
        star_counts[table.key] = star_counts.get(table.key, 0) + 1

    # Instances whose cells would otherwise be checked against their own key alone: the
    # statement reads their row tenant column too, unseen by the client.
    unpinned = [
        out.lineage.instance
        for out in outs
        if isinstance(out, _Col)
        and out.lineage is not None
        and out.lineage.table.tenant_column is not None
        and out.lineage.instance not in tenant_positions
        and out.lineage.instance not in analysis.tenant_preds
    ]
    hidden = analysis.hidden_tenant_columns(unpinned, len(outs)) if exact else {}
    tenant_positions.update(hidden)

    def tenant_for(lineage: _Prot) -> TenantSource:
        table = lineage.table
        if table.tenant_column is None:
            return CELL_TENANT
        tenant_ref = ColumnRef(table.schema, table.table, table.tenant_column)
        if exact and lineage.instance in tenant_positions:
            return TenantSource(
                "output", output=tenant_positions[lineage.instance], column=tenant_ref
            )
        if not exact and lineage.instance in star_instances and star_counts[table.key] == 1:
            return TenantSource("output", column=tenant_ref)
        return analysis.tenant_preds.get(lineage.instance, CELL_TENANT)

    positional: list[OutputTarget | None] = []
    by_name: dict[str, list[OutputTarget]] = {}
    star_tables: set[TableKey] = set()
    for out in outs:
        if isinstance(out, _Col):
            if out.lineage is None:
                positional.append(None)
                continue
            if not exact and not out.lineage.traceable:
                _refuse(
                    "*",
                    f"a * of one table beside {out.lineage.ref} from a UNION or a subquery: the "
                    "proxy could not locate the encrypted column in the result; list the columns",
                    out.lineage.ref,
                )
            target = OutputTarget(
                out.name, out.lineage.ref, out.lineage.policy, tenant_for(out.lineage)
            )
            positional.append(target)
            by_name.setdefault(out.name, []).append(target)
            analysis.tables.add(out.lineage.ref.table_key)
        else:
            for table, instance in out.tables:
                star_tables.add(table.key)
                analysis.tables.add(table.key)
                for name, col in table.columns.items():
                    ref = ColumnRef(table.schema, table.table, name)
                    lineage = _Prot(ref, col, table, instance)
                    by_name.setdefault(name, []).append(
                        OutputTarget(name, ref, col, tenant_for(lineage))
                    )
    positional.extend(None for _ in hidden)
    return (
        tuple(positional) if exact else (),
        exact,
        {k: tuple(v) for k, v in by_name.items()},
        frozenset(star_tables),
        len(hidden),
    )


def _plan_from(
    analysis: _Analysis, start: int, end: int, command: str, outs: list[_Out]
) -> StatementPlan:
    outputs, exact, by_name, star_tables, hidden = _output_plan(outs, analysis)
    protected = bool(
        analysis.params or analysis.literals or analysis.edits or by_name or star_tables
    )
    return StatementPlan(
        kind="protected" if protected else "passthrough",
        start=start,
        end=end,
        command=command,
        params=dict(sorted(analysis.params.items())),
        literals=tuple(sorted(analysis.literals.values(), key=lambda t: t.start)),
        edits=tuple(sorted(analysis.edits.values(), key=lambda t: t.start)),
        outputs=outputs if protected else (),
        hidden_outputs=hidden if protected else 0,
        outputs_exact=exact,
        outputs_by_name=by_name,
        star_tables=star_tables,
        tenant_writes=tuple(analysis.tenant_writes),
        tables=frozenset(analysis.tables),
    )


def _refused(start: int, end: int, command: str, refusal: Refusal) -> StatementPlan:
    return StatementPlan("refused", start, end, command, refusal=refusal)


def _passthrough(
    start: int, end: int, command: str, settings: tuple[SessionSetting, ...] = ()
) -> StatementPlan:
    return StatementPlan("passthrough", start, end, command, session_settings=settings)


def _mentioned_tables(text: str, policies: PolicySet) -> str:
    lowered = text.lower()
    names = sorted(
        {p.qualified_name for p in policies.tables.values() if p.table.lower() in lowered}
    )
    return ", ".join(names) or "a protected table"


def _analyze_statement(
    sql: str,
    start: int,
    end: int,
    policies: PolicySet,
    search_path: tuple[str, ...],
    *,
    result_to_client: bool = True,
    narrow: bool = False,
) -> StatementPlan:
    """One statement's plan. `result_to_client`: its rows go to the client as DataRows,
    so the proxy may add row tenant columns it drops there (not inside EXPLAIN or COPY).
    `narrow`: see `analyze`."""
    plan = _statement_plan(sql, start, end, policies, search_path, result_to_client, narrow)
    if narrow and any(t.narrow and (t.versions or t.array) for t in plan.params.values()):
        # One parameter compared both ways (`ssn = $1 OR ssn IN ($1, $2)`): it can only be
        # sent as the bytea[] of every version, so the statement keeps the wide form.
        return _statement_plan(sql, start, end, policies, search_path, result_to_client, False)
    return plan


def _statement_plan(
    sql: str,
    start: int,
    end: int,
    policies: PolicySet,
    search_path: tuple[str, ...],
    result_to_client: bool,
    narrow: bool,
) -> StatementPlan:
    text = sql[start:end]
    command = first_keyword(sql, start)
    if command in ("SET", "RESET", "DISCARD"):
        try:
            setting = parse_session_statement(text)
        except SessionStatementError as exc:
            return _refused(start, end, command, Refusal(UNSUPPORTED, f"pgseal: {exc}", command))
        return _passthrough(start, end, command, (setting,) if setting else ())
    if "set_config" in text.lower() and _SET_CONFIG.search(text) and "pgseal." in text.lower():
        return _refused(
            start,
            end,
            command,
            Refusal(
                UNSUPPORTED,
                "pgseal: set_config() of a pgseal setting is not supported; use SET pgseal.tenant",
                "set_config",
            ),
        )
    if not policies.mentions_protected_table(text):
        return _passthrough(start, end, command)
    if command == "EXPLAIN":
        m = _EXPLAIN_PREFIX.match(text)
        if m is not None and m.end() < len(text):
            inner = _analyze_statement(
                sql, start + m.end(), end, policies, search_path, result_to_client=False
            )
            if inner.kind == "refused":
                return replace(inner, start=start, command=command)
            # The result is the plan text: nothing to open; values are still sealed
            # (EXPLAIN ANALYZE executes the statement, EXPLAIN shows its constants).
            seals = bool(inner.params or inner.literals or inner.edits)
            return replace(
                inner,
                kind="protected" if seals else "passthrough",
                start=start,
                command=command,
                outputs=(None,),  # one text column, QUERY PLAN
                outputs_exact=True,
                outputs_by_name={},
                star_tables=frozenset(),
            )
    if command in _VALUE_FREE_COMMANDS:
        return _passthrough(start, end, command)
    if command == "COPY":
        return analyze_copy(
            sql,
            start,
            end,
            policies,
            search_path,
            lambda whole, s, e: _analyze_statement(
                whole, s, e, policies, search_path, result_to_client=False
            ),
        )
    if command not in _PARSED_COMMANDS and command not in _DDL_COMMANDS:
        return _refused(
            start,
            end,
            command,
            Refusal(
                UNSUPPORTED,
                f"pgseal: {command or 'this statement'} on protected table "
                f"{_mentioned_tables(text, policies)} is not supported",
                command,
            ),
        )
    analysis = _Analysis(text, start, policies, search_path, narrow=narrow)
    try:
        analysis.tokenize()
        trees = _TOOLS.parser.parse(analysis.tokens, text)
    except (ParseError, TokenError):
        return _refused(
            start,
            end,
            command,
            Refusal(
                UNSUPPORTED,
                "pgseal: cannot parse a statement that mentions protected table "
                f"{_mentioned_tables(text, policies)}; it is not forwarded",
                "unparseable SQL",
            ),
        )
    if len(trees) != 1 or trees[0] is None:
        return _refused(
            start, end, command, Refusal(UNSUPPORTED, "pgseal: cannot parse statement", "parse")
        )
    tree = trees[0]
    try:
        if isinstance(
            tree, (exp.Query, exp.Insert, exp.Update, exp.Delete, exp.Subquery, exp.Values)
        ):
            analysis.root = tree if result_to_client else None
            outs = analysis.query(tree, None, {})
            analysis.final_checks(tree)
            return _plan_from(analysis, start, end, command, outs)
        if isinstance(tree, (exp.Create, exp.Alter)):
            analysis.ddl(tree)
            analysis.final_checks(tree)
            plan = _plan_from(analysis, start, end, command, [])
            return plan
        if isinstance(tree, exp.Drop):
            return _passthrough(start, end, command)
        if isinstance(tree, exp.Command) and command in _DDL_COMMANDS:
            # DDL sqlglot does not model: value-free unless it sets a DEFAULT or CHECK
            # on (or builds a view/function/rule over) a protected table.
            if re.search(
                r"\b(DEFAULT|CHECK|VIEW|FUNCTION|PROCEDURE|RULE|TRIGGER|AS)\b", text, re.I
            ):
                _refuse(
                    command,
                    f"this {command} statement on protected table "
                    f"{_mentioned_tables(text, policies)} is not supported through pgseal",
                )
            return _passthrough(start, end, command)
        _refuse(
            command,
            f"{command or 'this statement'} on protected table "
            f"{_mentioned_tables(text, policies)} is not supported",
        )
    except _Refused as refused:
        return _refused(start, end, command, refused.refusal)
    except Exception as exc:
        # Any analyzer bug must fail closed, not crash the connection. The
        # message names the exception type only: its text could quote SQL.
        return _refused(
            start,
            end,
            command,
            Refusal(
                UNSUPPORTED,
                f"pgseal: internal error ({type(exc).__name__}) analyzing a statement on "
                f"protected table {_mentioned_tables(text, policies)}; it is not forwarded",
                "internal error",
            ),
        )


def _analyze(
    sql: str, policies: PolicySet, search_path: tuple[str, ...], narrow: bool = False
) -> tuple[StatementPlan, ...]:
    plans: list[StatementPlan] = []
    for span in split_statements(sql):
        plan = _analyze_statement(
            sql, span.start, span.end, policies, search_path, narrow=narrow
        )
        for setting in plan.session_settings:
            # Later statements of the same string already run under the new path.
            if setting.name == "search_path":
                if setting.action == "set" and isinstance(setting.value, tuple):
                    search_path = setting.value
                else:
                    search_path = DEFAULT_SEARCH_PATH
        plans.append(plan)
    return tuple(plans)


# Plans by (text, policies, search_path), least recently used first. PolicySet hashes by
# identity and the key keeps a reference to it: a reloaded policy is a different key,
# never a stale hit.
_CACHE: OrderedDict[tuple[str, PolicySet, tuple[str, ...], bool], tuple[StatementPlan, ...]] = (
    OrderedDict()
)
_CACHE_LOCK = threading.Lock()


def analyze(
    sql: str,
    policies: PolicySet,
    search_path: tuple[str, ...] = DEFAULT_SEARCH_PATH,
    *,
    narrow: bool = False,
) -> list[StatementPlan]:
    """One plan per statement of `sql` (see `proxy.rewrite` for the contract). Pure; cached,
    except a text with constants for protected columns (its key and its plan hold those
    plaintexts, and a text with inline values is rarely sent twice anyway), and a refused
    one (it may hold constants the analysis could not place, e.g. `ssn LIKE '123%'`).

    `narrow`: the statement's narrow form (see "key versions" in `proxy.rewrite`), where a
    parameter compared with `=` or `<>` stays `col = $n`, one cell (ParamTarget.narrow)."""
    search_path = tuple(search_path)
    if len(sql) > _CACHE_MAX_SQL:
        return list(_analyze(sql, policies, search_path, narrow))
    key = (sql, policies, search_path, narrow)
    with _CACHE_LOCK:
        plans = _CACHE.get(key)
        if plans is not None:
            _CACHE.move_to_end(key)
            return list(plans)
    plans = _analyze(sql, policies, search_path, narrow)
    if not any(plan.literals or plan.kind == "refused" for plan in plans):
        with _CACHE_LOCK:
            _CACHE[key] = plans
            if len(_CACHE) > _CACHE_ENTRIES:
                _CACHE.popitem(last=False)
    return list(plans)


def clear_cache() -> None:
    """Forget every cached plan (after a policy reload, to release the old PolicySet)."""
    with _CACHE_LOCK:
        _CACHE.clear()

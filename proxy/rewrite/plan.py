"""What the analyzer tells the protocol session about one SQL statement.

Everything here is a small frozen value; a plan is computed once per distinct
statement text (and search_path, and policy object) and shared by every
connection that sends the same text. See `proxy.rewrite` for the contract.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Literal

from proxy.policy.model import ColumnPolicy, TableKey

PlanKind = Literal["passthrough", "protected", "refused"]
Use = Literal["store", "compare"]
TenantKind = Literal["param", "literal", "session", "output", "cell"]
SqlState = Literal["0A000", "42501"]

UNSUPPORTED: Final = "0A000"
DENIED: Final = "42501"

_EMPTY: Mapping[object, object] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class ColumnRef:
    """A column of a protected table, by catalog names; str() is `schema.table.column`."""

    schema: str
    table: str
    column: str

    @property
    def table_key(self) -> TableKey:
        return (self.schema, self.table)

    def __str__(self) -> str:
        return f"{self.schema}.{self.table}.{self.column}"


@dataclass(frozen=True, slots=True)
class TenantSource:
    """Where the tenant of a value comes from.

    - param:   the tenant is the value of parameter `$param` (Bind time).
    - literal: the tenant is written in the SQL text (`value`).
    - session: the session tenant (`SET pgseal.tenant`, startup options) at
               execution time; with no session tenant the caller must refuse
               (42501) whenever a key is needed.
    - output:  (reads) the row's tenant column is part of the result:
               position `output` when the plan's outputs are exact, otherwise
               the RowDescription field named `column.column` whose table is
               `column.table_key`. The caller checks that the cell's own
               tenant (from its key) equals the row's.
    - cell:    (reads) only the cell's own key names the tenant; the AAD binds
               tenant and column, so a cell opened this way is authentic for
               that tenant and column, and the caller compares that tenant with
               the session tenant (isolation), but cannot notice a cell copied
               into another tenant's row.
    """

    kind: TenantKind
    param: int | None = None
    value: str | None = None
    output: int | None = None
    column: ColumnRef | None = None

    def __post_init__(self) -> None:
        if (self.kind == "param") != (self.param is not None):
            raise ValueError("TenantSource: param is set exactly for kind 'param'")
        if (self.kind == "literal") != (self.value is not None):
            raise ValueError("TenantSource: value is set exactly for kind 'literal'")
        if self.kind != "output" and (self.output is not None or self.column is not None):
            raise ValueError("TenantSource: output/column only for kind 'output'")
        if self.kind == "output" and self.column is None:
            raise ValueError("TenantSource: kind 'output' names the tenant column")

    def describe(self) -> str:
        if self.kind == "param":
            return f"${self.param}"
        if self.kind == "literal":
            return f"literal {self.value!r}"
        if self.kind == "output":
            where = f"output {self.output + 1}" if self.output is not None else "result"
            return f"row tenant column {self.column} ({where})"
        return self.kind


SESSION_TENANT = TenantSource("session")
CELL_TENANT = TenantSource("cell")


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a statement is answered with an ErrorResponse and never forwarded."""

    sqlstate: SqlState
    message: str  # starts with "pgseal: ", names schema.table.column and the construct
    construct: str
    column: ColumnRef | None = None


@dataclass(frozen=True, slots=True)
class ParamTarget:
    """Parameter `$index` carries a value of an encrypted column.

    store: the value is written into the column (INSERT/UPDATE/ON CONFLICT).
    compare: the value is compared with the column (always a `search: equality`
      column: seal it deterministically under `tenant`'s key).
    array: the parameter is an array (`col = ANY($n)`): seal each element and
      send a bytea[]; the parameter's type is bytea[] (OID 1001), not bytea.
    versions: the value is compared with the column (see "key versions" in
      `proxy.rewrite`): send a bytea[] of its cells under every live key version
      of the tenant, the active version first (a NULL value: `{NULL}`); the
      parameter's type is bytea[]. With `array`: every element under every version.
    narrow: the value is compared (`col = $n`, `col <> $n`) in the statement's narrow
      form (`analyze(narrow=True)`): send one cell, as for a stored value, and only
      while its tenant has a single live key version; with more, the statement must
      be sent in its wide form (where this parameter is `versions`).
    The caller declares the parameter as bytea (OID 17, or 1001) in the Parse
    it forwards, whatever type the client gave, and reports `policy.type` (its
    array type with `array`) to the client in ParameterDescription.
    """

    index: int
    column: ColumnRef
    policy: ColumnPolicy
    use: Use
    tenant: TenantSource
    array: bool = False
    versions: bool = False
    narrow: bool = False


@dataclass(frozen=True, slots=True)
class LiteralTarget:
    """A constant in the statement text that must be sealed before forwarding.

    `sql[start:end]` (offsets into the whole string given to analyze, end
    exclusive) is the complete value expression, casts included
    (`'1980-01-02'::date`, `DATE '1980-01-02'`, `-5`); the caller replaces all
    of it with the sealed cell as a bytea literal (`'\\x01..'::bytea`).
    `value` is the constant's text as PostgreSQL would read it (quotes and
    escapes resolved), to be encoded with `policy.type`'s input rules.
    """

    start: int
    end: int
    value: str
    column: ColumnRef
    policy: ColumnPolicy
    use: Use
    tenant: TenantSource
    # A compared constant: replaced with a bytea[] of its cells under every live key
    # version of the tenant (`ARRAY['\\x01..'::bytea, ...]` or a bytea[] parameter),
    # as for `ParamTarget.versions`.
    versions: bool = False

    def edit(self, replacement: str) -> TextEdit:
        return TextEdit(self.start, self.end, replacement)


@dataclass(frozen=True, slots=True)
class TextEdit:
    """Replace `sql[start:end]` (whole-string offsets, end exclusive) with `text`.

    Plans carry edits for parameters whose casts would make PostgreSQL see
    another type than bytea (`$1::text` compared with a bytea column fails):
    they become `$1::bytea` (or `$1::bytea[]`).
    """

    start: int
    end: int
    text: str


@dataclass(frozen=True, slots=True)
class OutputTarget:
    """A result column that carries cells of an encrypted column: open them."""

    name: str  # the field name PostgreSQL reports in RowDescription
    column: ColumnRef
    policy: ColumnPolicy
    tenant: TenantSource


@dataclass(frozen=True, slots=True)
class TenantWrite:
    """The tenant of rows a statement writes sealed values into.

    `row` is the VALUES row (0-based) for INSERT ... VALUES, None when the
    source covers every row the statement writes (UPDATE, INSERT ... SELECT,
    ON CONFLICT DO UPDATE). Strict isolation: the caller refuses (42501)
    unless the source resolves to the session tenant; trusted isolation: it
    picks the key of that tenant.
    """

    table: TableKey
    row: int | None
    source: TenantSource


SettingName = Literal[
    "pgseal.tenant", "search_path", "role", "session_authorization", "all", "discard_all"
]


@dataclass(frozen=True, slots=True)
class SessionSetting:
    """A statement that changes session state the proxy tracks (it is forwarded too).

    name 'all' is RESET ALL (every GUC, so pgseal.tenant and search_path, not
    the role); 'discard_all' is DISCARD ALL (that, plus SESSION AUTHORIZATION
    DEFAULT and every prepared statement gone). action 'reset' also covers
    `SET ... TO DEFAULT`. value: the tenant (str), the search_path schemas
    (tuple, as catalog names), the role name (str); None for reset, and for
    `SET ROLE NONE` (action 'set': the session user, where RESET ROLE goes back
    to the connection-time role).
    local: SET LOCAL (undone at transaction end, also by ROLLBACK; the caller
    tracks transaction state from ReadyForQuery).
    """

    name: SettingName
    action: Literal["set", "reset"]
    value: str | tuple[str, ...] | None = None
    local: bool = False


CopyFormatName = Literal["text", "csv", "binary"]
CopyHeader = Literal["off", "on", "match"]


@dataclass(frozen=True, slots=True)
class CopyOptions:
    """The options of a COPY statement that decide how its data stream is written.

    Values as PostgreSQL reads them (strings resolved, keywords lower case);
    None means the format's default (text: tab, `\\N`; csv: comma, empty string,
    `"`, escape = quote). Column lists are catalog names; "*" means every column.
    Options that do not change the stream (FREEZE, ON_ERROR, ...) are not kept.
    """

    format: CopyFormatName = "text"
    delimiter: str | None = None
    null: str | None = None
    default: str | None = None
    header: CopyHeader = "off"
    quote: str | None = None
    escape: str | None = None
    force_quote: tuple[str, ...] | Literal["*"] = ()
    force_not_null: tuple[str, ...] | Literal["*"] = ()
    force_null: tuple[str, ...] | Literal["*"] = ()
    encoding: str | None = None


@dataclass(frozen=True, slots=True)
class CopyPlan:
    """`COPY ... FROM STDIN` / `COPY ... TO STDOUT` touching encrypted columns (text or CSV).

    direction 'from': the client streams rows; seal the fields of the table's
    encrypted columns row by row (tenant: the row's tenant column when listed,
    else the session's; the same isolation rules as INSERT).
    direction 'to': the server streams rows; open the fields that `outputs`
    (of the enclosing StatementPlan) marks, by position.
    table: the protected table, or None for `COPY (query) TO STDOUT` (then the
    plan's `outputs` are exact and name every column).
    columns: the column list as written (catalog names), or None when the
    statement has none (every column, in table order): the caller must then
    insert an explicit list at sql offset `columns_at`, from the live catalog,
    so that PostgreSQL and the proxy agree on which field is which column.
    """

    direction: Literal["from", "to"]
    table: TableKey | None
    columns: tuple[str, ...] | None
    columns_at: int
    options: CopyOptions


@dataclass(frozen=True, slots=True)
class StatementPlan:
    """What to do with one statement. See `proxy.rewrite` for the whole contract."""

    kind: PlanKind
    start: int  # the statement's text is sql[start:end] of the analyzed string
    end: int
    command: str = ""  # first keyword, upper case (SELECT, INSERT, SET, ...)
    refusal: Refusal | None = None
    params: Mapping[int, ParamTarget] = field(default_factory=lambda: _EMPTY_PARAMS)
    literals: tuple[LiteralTarget, ...] = ()
    edits: tuple[TextEdit, ...] = ()
    outputs: tuple[OutputTarget | None, ...] = ()
    # The last `hidden_outputs` of `outputs` are row tenant columns the proxy added to the
    # select list (see TenantSource 'output'): never shown to the client.
    hidden_outputs: int = 0
    outputs_exact: bool = True
    outputs_by_name: Mapping[str, tuple[OutputTarget, ...]] = field(
        default_factory=lambda: _EMPTY_OUTPUTS
    )
    star_tables: frozenset[TableKey] = frozenset()
    tenant_writes: tuple[TenantWrite, ...] = ()
    session_settings: tuple[SessionSetting, ...] = ()
    tables: frozenset[TableKey] = frozenset()  # protected tables whose columns it touches
    copy: CopyPlan | None = None  # COPY through the client's stream (see CopyPlan)

    def __post_init__(self) -> None:
        if (self.kind == "refused") != (self.refusal is not None):
            raise ValueError("StatementPlan: a refusal exactly for kind 'refused'")
        for name in ("params", "outputs_by_name"):
            value = getattr(self, name)
            if not isinstance(value, MappingProxyType):
                object.__setattr__(self, name, MappingProxyType(dict(value)))

    @property
    def has_protected_outputs(self) -> bool:
        return bool(self.outputs_by_name) or any(o is not None for o in self.outputs)


_EMPTY_PARAMS: Mapping[int, ParamTarget] = MappingProxyType({})
_EMPTY_OUTPUTS: Mapping[str, tuple[OutputTarget, ...]] = MappingProxyType({})


def apply_edits(sql: str, edits: Iterable[TextEdit]) -> str:
    """`sql` with every edit applied (edits must not overlap; any order).

    An insertion (start == end) goes before a replacement starting at the same offset.
    """
    ordered = sorted(edits, key=lambda e: (e.start, e.end))
    out: list[str] = []
    pos = 0
    for edit in ordered:
        if edit.start < pos:
            raise ValueError(f"overlapping edits at offset {edit.start}")
        out.append(sql[pos : edit.start])
        out.append(edit.text)
        pos = edit.end
    out.append(sql[pos:])
    return "".join(out)


def resolve_outputs(
    plan: StatementPlan, fields: Sequence[tuple[str, TableKey | None]]
) -> tuple[OutputTarget | None, ...]:
    """Which RowDescription fields carry sealed cells, one entry per field.

    `fields`: for each field of the RowDescription PostgreSQL sent, its name
    and the protected table its table OID stands for (None when the OID is 0
    or not a protected table; the caller keeps the OID -> (schema, table) map
    of protected tables, e.g. from `to_regclass` on the policy's tables).

    Exact plans are matched by position (and a field count that disagrees
    means the plan does not describe this result: refuse to guess). Otherwise
    each field is matched by (name, table): a field named like a protected
    output but coming from another table (say `u.name` beside `p.name`) stays
    closed.
    """
    if plan.outputs_exact:
        if len(fields) != len(plan.outputs):
            raise ValueError(
                f"result has {len(fields)} columns, the statement plan {len(plan.outputs)}"
            )
        return plan.outputs
    resolved: list[OutputTarget | None] = []
    for name, table in fields:
        match = None
        if table is not None:
            for candidate in plan.outputs_by_name.get(name, ()):
                if candidate.column.table_key == table:
                    match = candidate
                    break
        resolved.append(match)
    return tuple(resolved)

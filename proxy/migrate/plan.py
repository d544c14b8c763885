"""The pure half of `pgseal migrate` and `pgseal rekey`: names, SQL text, checks, pacing.

Nothing here does I/O. The shell (`proxy.migrate.column`, `proxy.migrate.rekey`) reads
the catalog into a `TableShape`, asks this module for the statements to run, and runs
them. Every identifier that reaches SQL goes through `quote_ident`; every value travels
as a parameter. Parameters are always sent as text (`$n::text::type`), so the shell never
needs a Python codec for the table's key types: PostgreSQL's own text I/O round-trips
them exactly (the shell's session is pinned to ISO dates, UTC and exact floats).

Rows are addressed in batches by their primary key (keyset pagination: `(k1, k2) >
(last)` in key order, served by the primary key's index), or, for a table without one,
by ranges of heap pages (`ctid >= '(p,0)' AND ctid < '(q,0)'`, a TID range scan on
PostgreSQL 14+). A row that moves (UPDATE gives it a new ctid) can be missed by a page
range or seen twice: both are harmless, because each batch selects only rows that still
need work (see `ColumnMigration` and `RekeySql`), and later passes pick up the rest.
"""

# ruff: noqa: S608  (SQL is built here by design: every identifier goes through
#                     quote_ident, every value travels as a parameter)

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from proxy.policy.model import ColumnType

Direction = Literal["encrypt", "decrypt"]

MAX_IDENT_BYTES: Final = 63  # NAMEDATALEN - 1: PostgreSQL truncates longer names silently

# The cell header (DESIGN.md 8): version 0x01, suite, 4-byte key id. The shortest cells
# hold a 1-byte canonical plaintext: GCM 6 + 12 + 1 + 16, SIV 6 + 16 + 1.
MIN_CELL_GCM: Final = 35
MIN_CELL_SIV: Final = 23

# PostgreSQL types (format_type, modifiers stripped) whose values a policy type can take
# over exactly: the text form PostgreSQL prints for them parses as the policy type and
# means the same value. Anything else needs an ALTER COLUMN ... TYPE first.
LIVE_TYPES: Final[dict[str, tuple[str, ...]]] = {
    "text": ("text", "character varying", "character", "name", "citext"),
    "varchar": ("text", "character varying", "character", "name", "citext"),
    "int2": ("smallint",),
    "int4": ("smallint", "integer"),
    "int8": ("smallint", "integer", "bigint"),
    "float4": ("real",),
    "float8": ("real", "double precision"),
    "numeric": ("numeric", "smallint", "integer", "bigint"),
    "bool": ("boolean",),
    "date": ("date",),
    "time": ("time without time zone",),
    "timestamp": ("timestamp without time zone",),
    "timestamptz": ("timestamp with time zone",),
    "uuid": ("uuid",),
    "json": ("json",),
    "jsonb": ("jsonb",),
    "bytea": ("bytea",),
}

# The plaintext column `migrate decrypt` creates when nothing better is known.
SQL_TYPES: Final[dict[str, str]] = {
    "text": "text",
    "varchar": "character varying",
    "int2": "smallint",
    "int4": "integer",
    "int8": "bigint",
    "float4": "real",
    "float8": "double precision",
    "numeric": "numeric",
    "bool": "boolean",
    "date": "date",
    "time": "time without time zone",
    "timestamp": "timestamp without time zone",
    "timestamptz": "timestamp with time zone",
    "uuid": "uuid",
    "json": "json",
    "jsonb": "jsonb",
    "bytea": "bytea",
}

# What an operator may pass as `--type` (it is pasted into SQL, so it is checked first):
# a type name of words, optionally with (n) or (p,s), optionally "with[out] time zone".
_TYPE_RE = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*(?: [A-Za-z_][A-Za-z0-9_]*)*"
    r"(?:\(\d{1,4}(?:, ?\d{1,4})?\))?(?: with(?:out)? time zone)?$"
)
_MODIFIER_RE = re.compile(r"\(\d+(?:,\s*\d+)?\)")


class PlanError(ValueError):
    """A migration that cannot be planned; the message is for the operator (one line)."""


# --- names ----------------------------------------------------------------------------


def quote_ident(name: str) -> str:
    """A double-quoted SQL identifier (catalog names are case-sensitive as stored)."""
    if not name or "\0" in name:
        raise PlanError(f"invalid identifier {name!r}")
    return '"' + name.replace('"', '""') + '"'


def parse_column_spec(text: str) -> tuple[str, str, str]:
    """SCHEMA.TABLE.COLUMN -> catalog names, as the policy writes them.

    Unquoted parts are taken as written (the policy's catalog names: `crm.Contacts`);
    a part in double quotes may hold dots, with `""` for a quote.
    """
    parts: list[str] = []
    buf: list[str] = []
    i, quoted, was_quoted = 0, False, False
    while i < len(text):
        ch = text[i]
        if quoted:
            if ch == '"':
                if text[i + 1 : i + 2] == '"':
                    buf.append('"')
                    i += 1
                else:
                    quoted = False
            else:
                buf.append(ch)
        elif ch == '"' and not buf:
            quoted = was_quoted = True
        elif ch == ".":
            parts.append("".join(buf))
            buf, was_quoted = [], False
        else:
            if was_quoted:
                raise PlanError(f"{text!r}: text after a closing quote")
            buf.append(ch)
        i += 1
    if quoted:
        raise PlanError(f"{text!r}: unterminated quote")
    parts.append("".join(buf))
    if len(parts) != 3 or not all(parts):
        raise PlanError(f"{text!r}: expected SCHEMA.TABLE.COLUMN")
    return parts[0], parts[1], parts[2]


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:8]


def _fit(prefix: str, name: str) -> str:
    """prefix + as much of `name` as fits in an identifier (whole UTF-8 characters)."""
    room = MAX_IDENT_BYTES - len(prefix.encode())
    raw = name.encode()[:room]
    return prefix + raw.decode("utf-8", errors="ignore")


@dataclass(frozen=True, slots=True)
class ObjectNames:
    """The objects one column migration adds to the table, named after the column.

    The short digest of schema.table.column keeps names unique (index and function
    names are per schema, a long column name is cut) and lets a resumed run find them.
    """

    shadow: str  # the new column being filled
    function: str  # the trigger function (in the table's schema)
    trigger: str
    index: str  # partial index of the rows still to do
    guard: str  # CHECK: only well-formed cells in an encrypted column
    not_null: str  # CHECK (col IS NOT NULL), the scan-free way back to NOT NULL

    @classmethod
    def of(cls, schema: str, table: str, column: str, direction: Direction) -> ObjectNames:
        d = _digest(schema, table, column)
        tag = "enc" if direction == "encrypt" else "dec"
        return cls(
            shadow=_fit(f"_pgseal_{tag}_{d}_", column),
            function=f"_pgseal_sync_{tag}_{d}",
            trigger=f"_pgseal_sync_{tag}_{d}",
            index=f"_pgseal_todo_{tag}_{d}",
            guard=_fit(f"pgseal_cell_{d}_", column),
            not_null=f"_pgseal_notnull_{d}",
        )


# --- types ------------------------------------------------------------------------------


def base_type(sql_type: str) -> str:
    """format_type text without modifiers: 'character varying(20)' -> 'character varying'."""
    return _MODIFIER_RE.sub("", sql_type).strip()


def live_type_problem(policy_type: ColumnType, live_type: str) -> str | None:
    """Why a live column of `live_type` cannot become an encrypted `policy_type`, or None."""
    base = base_type(live_type)
    if base.endswith("[]"):
        return f"is an array ({live_type}); encrypted columns hold single values"
    allowed = LIVE_TYPES[policy_type]
    if base not in allowed:
        return (f"is {live_type} but the policy declares {policy_type} (takes "
                f"{', '.join(allowed)}): change the policy, or ALTER COLUMN ... TYPE first")
    return None


def checked_sql_type(text: str) -> str:
    """An operator-given SQL type name, safe to paste into a statement."""
    cleaned = " ".join(text.split())
    if not _TYPE_RE.match(cleaned):
        raise PlanError(f"--type {text!r}: not a plain SQL type name")
    return cleaned


# --- the table --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyColumn:
    name: str
    sql_type: str  # format_type(atttypid, atttypmod): trusted catalog text


@dataclass(frozen=True, slots=True)
class TableShape:
    """How to address a table's rows: its primary key, or ctid page ranges without one."""

    schema: str
    table: str
    key: tuple[KeyColumn, ...] = ()

    @property
    def qualified(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.table)}"

    @property
    def name(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def by_ctid(self) -> bool:
        return not self.key

    @property
    def key_width(self) -> int:
        """How many text values address one row (one ctid without a key)."""
        return len(self.key) or 1

    def key_select(self) -> str:
        """The row address as text columns k0, k1 ... (aliased: ORDER BY must not see them)."""
        if self.by_ctid:
            return "t.ctid::text AS k0"
        return ", ".join(f"t.{quote_ident(k.name)}::text AS k{i}" for i, k in enumerate(self.key))

    def key_order(self) -> str:
        return ", ".join(f"t.{quote_ident(k.name)}" for k in self.key)

    def key_after(self, first: int) -> str:
        """(k...) > ($first::text::type ...): the keyset condition after a checkpoint."""
        cols = ", ".join(f"t.{quote_ident(k.name)}" for k in self.key)
        params = ", ".join(f"${first + i}::text::{k.sql_type}" for i, k in enumerate(self.key))
        return f"({cols}) > ({params})"

    def key_match(self, first: int) -> tuple[str, str, str]:
        """(unnest arrays, v's key columns, join condition) for a batch UPDATE.

        Parameters $first.. are text[] arrays of the row addresses. Without a key the
        ctids also go in as `ctid = ANY(...)`, which gives PostgreSQL a TID scan.
        """
        arrays = ", ".join(f"${first + i}::text[]" for i in range(self.key_width))
        names = ", ".join(f"k{i}" for i in range(self.key_width))
        if self.by_ctid:
            cond = f"t.ctid = ANY(${first}::text[]::tid[]) AND t.ctid = v.k0::tid"
        else:
            cols = ", ".join(f"t.{quote_ident(k.name)}" for k in self.key)
            vals = ", ".join(f"v.k{i}::{k.sql_type}" for i, k in enumerate(self.key))
            cond = f"({cols}) = ({vals})"
        return arrays, names, cond

    def key_row(self, first: int) -> str:
        """The condition for one row addressed by text parameters $first.."""
        if self.by_ctid:
            return f"t.ctid = ${first}::text::tid"
        cols = ", ".join(f"t.{quote_ident(k.name)}" for k in self.key)
        vals = ", ".join(f"${first + i}::text::{k.sql_type}" for i, k in enumerate(self.key))
        return f"({cols}) = ({vals})"

    def describe(self, address: Sequence[str]) -> str:
        """A row address for messages: (id)=(42) or ctid (3,7). Never a protected value."""
        if self.by_ctid:
            return f"ctid {address[0]}"
        return (f"({', '.join(k.name for k in self.key)})=({', '.join(address)})")


def page_range(page: int, pages: int) -> tuple[str, str]:
    """The ctid bounds of heap pages [page, page + pages)."""
    return f"({page},0)", f"({page + pages},0)"


def pages_per_batch(batch: int, rows_per_page: float) -> int:
    """How many heap pages hold about `batch` rows (at least one)."""
    if rows_per_page <= 0:
        return 1
    return max(1, int(batch / rows_per_page))


# --- one column migration ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ColumnMigration:
    """The statements of one online column migration (see `proxy.migrate` for the design).

    encrypt: `column` holds plaintext; the shadow is bytea and receives cells.
    decrypt: `column` holds cells; the shadow is `target_type` and receives plaintext.
    A row is *pending* when its shadow is NULL and its column is not: the trigger keeps
    that true for every write the application makes, and each batch changes only
    pending rows, under a row lock, so a value is never sealed twice nor lost.
    """

    direction: Direction
    shape: TableShape
    column: str
    target_type: str  # SQL type of the shadow column
    tenant_column: str | None = None  # a change of the row's tenant makes it pending too
    names: ObjectNames = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", ObjectNames.of(
            self.shape.schema, self.shape.table, self.column, self.direction))
        for name in (self.column, self.tenant_column or "x", self.shape.schema,
                     self.shape.table, *(k.name for k in self.shape.key)):
            if "$" in name:
                # Names are pasted into the dollar-quoted trigger body.
                raise PlanError(f"identifier {name!r}: '$' is not supported here")

    @property
    def col(self) -> str:
        return quote_ident(self.column)

    @property
    def shadow(self) -> str:
        return quote_ident(self.names.shadow)

    @property
    def pending(self) -> str:
        return f"t.{self.shadow} IS NULL AND t.{self.col} IS NOT NULL"

    # -- preparation (idempotent: a resumed run repeats it harmlessly)

    def function_sql(self) -> str:
        """The trigger function: any write that changes the value (or the row's tenant)
        makes the row pending again. It cannot seal (PostgreSQL holds no keys); it only
        invalidates, and the backfill re-does the row. Values are compared as text:
        numeric 1.0 -> 1.00 is a change for a sealed canonical form, and json has no `=`.
        """
        fn = f"{quote_ident(self.shape.schema)}.{quote_ident(self.names.function)}"
        changed = f"NEW.{self.col}::text IS DISTINCT FROM OLD.{self.col}::text"
        if self.tenant_column is not None:
            tcol = quote_ident(self.tenant_column)
            changed += f" OR NEW.{tcol}::text IS DISTINCT FROM OLD.{tcol}::text"
        return (
            f"CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS "
            "$pgseal$\nBEGIN\n"
            f"  IF TG_OP = 'INSERT' OR {changed} THEN\n"
            f"    NEW.{self.shadow} := NULL;\n"
            "  END IF;\n"
            "  RETURN NEW;\n"
            "END\n$pgseal$"
        )

    def prepare_sql(self) -> list[str]:
        """Shadow column, trigger function and trigger: one short transaction."""
        table = self.shape.qualified
        fn = f"{quote_ident(self.shape.schema)}.{quote_ident(self.names.function)}"
        trg = quote_ident(self.names.trigger)
        return [
            f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {self.shadow} {self.target_type}",
            self.function_sql(),
            f"DROP TRIGGER IF EXISTS {trg} ON {table}",
            f"CREATE TRIGGER {trg} BEFORE INSERT OR UPDATE ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION {fn}()",
        ]

    def index_sql(self) -> str:
        """Partial index of the pending rows, so catch-up passes and the cut-over find the
        few rows written meanwhile without scanning the table (run CONCURRENTLY)."""
        cols = (", ".join(quote_ident(k.name) for k in self.shape.key) if self.shape.key
                else self.shadow)
        return (
            f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {quote_ident(self.names.index)} "
            f"ON {self.shape.qualified} ({cols}) "
            f"WHERE {self.shadow} IS NULL AND {self.col} IS NOT NULL"
        )

    def drop_index_sql(self) -> str:
        return (f"DROP INDEX CONCURRENTLY IF EXISTS "
                f"{quote_ident(self.shape.schema)}.{quote_ident(self.names.index)}")

    # -- batches

    def _value_select(self) -> str:
        if self.direction == "encrypt":
            # The type's own output function (format %s), not a cast: char(n) keeps its
            # padding, so the canonical form is the value PostgreSQL would have sent.
            value = f"format('%s', t.{self.col}) AS v"
        else:
            value = f"t.{self.col} AS v"
        if self.tenant_column is not None:
            value += f", t.{quote_ident(self.tenant_column)}::text AS tenant"
        return value

    def select_keyset(self, *, after: bool, lock: bool = True) -> str:
        """Pending rows in key order after a checkpoint; params: [after values...], limit."""
        where = self.pending
        first = 1
        if after:
            where += f" AND {self.shape.key_after(1)}"
            first = 1 + len(self.shape.key)
        lock_clause = " FOR UPDATE OF t SKIP LOCKED" if lock else ""
        return (
            f"SELECT {self.shape.key_select()}, {self._value_select()} "
            f"FROM {self.shape.qualified} AS t WHERE {where} "
            f"ORDER BY {self.shape.key_order()} LIMIT ${first}{lock_clause}"
        )

    def select_pages(self, *, lock: bool = True) -> str:
        """Pending rows of a page range (tables without a key); params: from tid, to tid."""
        lock_clause = " FOR UPDATE OF t SKIP LOCKED" if lock else ""
        return (
            f"SELECT {self.shape.key_select()}, {self._value_select()} "
            f"FROM {self.shape.qualified} AS t WHERE t.ctid >= $1::text::tid "
            f"AND t.ctid < $2::text::tid AND {self.pending}{lock_clause}"
        )

    def select_any(self, *, lock: bool = True) -> str:
        """Any pending rows (catch-up and cut-over: served by the partial index); param: limit."""
        lock_clause = " FOR UPDATE OF t SKIP LOCKED" if lock else ""
        return (
            f"SELECT {self.shape.key_select()}, {self._value_select()} "
            f"FROM {self.shape.qualified} AS t WHERE {self.pending} LIMIT $1{lock_clause}"
        )

    def update_shadow(self) -> str:
        """Write a batch of shadow values; params: key text[] arrays, then values.

        encrypt: values are bytea cells; decrypt: text, cast to the target type.
        """
        arrays, names, cond = self.shape.key_match(1)
        n = self.shape.key_width + 1
        if self.direction == "encrypt":
            values, value = f"${n}::bytea[]", "v.val"
        else:
            values, value = f"${n}::text[]", f"v.val::{self.target_type}"
        return (
            f"UPDATE {self.shape.qualified} AS t SET {self.shadow} = {value} "
            f"FROM unnest({arrays}, {values}) AS v({names}, val) WHERE {cond}"
        )

    def count_pending(self) -> str:
        return f"SELECT count(*) FROM {self.shape.qualified} AS t WHERE {self.pending}"

    # -- the cut-over

    def swap_sql(self, *, not_null: bool) -> list[str]:
        """After the last pending row is done, under ACCESS EXCLUSIVE: replace the column.

        The old column goes (with its indexes, default and constraints: PostgreSQL
        refuses if a view or a foreign key elsewhere depends on it, and the whole
        transaction rolls back); the shadow takes its name. An encrypted column gets a
        CHECK that only well-formed cells enter it, NOT VALID so it is checked for new
        writes at once and validated for the old rows later without the lock. That CHECK
        is what makes a proxy still running the old policy fail closed: its plaintext
        write is refused instead of stored.
        """
        table = self.shape.qualified
        fn = f"{quote_ident(self.shape.schema)}.{quote_ident(self.names.function)}"
        out = [
            f"DROP TRIGGER IF EXISTS {quote_ident(self.names.trigger)} ON {table}",
            f"DROP FUNCTION IF EXISTS {fn}()",
            f"ALTER TABLE {table} DROP COLUMN {self.col}",
            f"ALTER TABLE {table} RENAME COLUMN {self.shadow} TO {self.col}",
        ]
        if self.direction == "encrypt":
            out.append(f"ALTER TABLE {table} ADD CONSTRAINT {quote_ident(self.names.guard)} "
                       f"CHECK ({cell_guard(self.col)}) NOT VALID")
        if not_null:
            out.append(f"ALTER TABLE {table} ADD CONSTRAINT {quote_ident(self.names.not_null)} "
                       f"CHECK ({self.col} IS NOT NULL) NOT VALID")
        return out

    def post_swap_steps(self, *, not_null: bool) -> list[tuple[str, str | None]]:
        """After the cut-over commits: (statement, constraint it needs or None), in order.

        Each is idempotent given its condition (a resumed run skips a step whose
        constraint is gone), and none holds a long lock: VALIDATE takes SHARE UPDATE
        EXCLUSIVE (reads and writes go on), and SET NOT NULL skips its scan given a valid
        CHECK (col IS NOT NULL) (PostgreSQL 12+), so that lock is brief.
        """
        table = self.shape.qualified
        out: list[tuple[str, str | None]] = []
        if self.direction == "encrypt":
            guard = quote_ident(self.names.guard)
            out.append((f"ALTER TABLE {table} VALIDATE CONSTRAINT {guard}", self.names.guard))
        if not_null:
            nn = quote_ident(self.names.not_null)
            out += [
                (f"ALTER TABLE {table} VALIDATE CONSTRAINT {nn}", self.names.not_null),
                (f"ALTER TABLE {table} ALTER COLUMN {self.col} SET NOT NULL", self.names.not_null),
                (f"ALTER TABLE {table} DROP CONSTRAINT {nn}", self.names.not_null),
            ]
        out.append((f"ANALYZE {table} ({self.col})", None))
        return out

    def undo_sql(self) -> list[str]:
        """Abandon a migration that has not cut over: the original column is untouched."""
        table = self.shape.qualified
        fn = f"{quote_ident(self.shape.schema)}.{quote_ident(self.names.function)}"
        return [
            f"DROP TRIGGER IF EXISTS {quote_ident(self.names.trigger)} ON {table}",
            f"DROP FUNCTION IF EXISTS {fn}()",
            f"ALTER TABLE {table} DROP COLUMN IF EXISTS {self.shadow}",
        ]


def cell_guard(col: str) -> str:
    """SQL true for NULL or a well-formed cell header and length (never raises: substring)."""
    return (
        f"{col} IS NULL"
        f" OR (substring({col} from 1 for 2) = '\\x0101'::bytea"
        f" AND octet_length({col}) >= {MIN_CELL_GCM})"
        f" OR (substring({col} from 1 for 2) = '\\x0102'::bytea"
        f" AND octet_length({col}) >= {MIN_CELL_SIV})"
    )


# --- rekey --------------------------------------------------------------------------------


def key_id_bytes(key_id: int) -> bytes:
    """Bytes 2..5 of a cell: the key id, u32 big-endian."""
    return key_id.to_bytes(4, "big")


@dataclass(frozen=True, slots=True)
class RekeySql:
    """The statements that re-seal the cells of one physical column.

    A cell's key is found from its header: `substring(col from 3 for 4)` is the key id,
    so no tenant column is needed (and session-tenant tables work the same). Writes are
    optimistic: `... WHERE key AND col = old_cell`, so a value the application changed
    meanwhile (through the proxy, already sealed under the current key) is left alone.
    """

    shape: TableShape
    column: str  # the physical column (an in-flight migration's shadow is one too)

    @property
    def col(self) -> str:
        return quote_ident(self.column)

    def _old(self, param: int) -> str:
        return f"substring(t.{self.col} from 3 for 4) = ANY(${param}::bytea[])"

    def select_keyset(self, *, after: bool) -> str:
        """Cells under the given key ids after a checkpoint; params: ids, [after...], limit."""
        where = self._old(1)
        nxt = 2
        if after:
            where += f" AND {self.shape.key_after(2)}"
            nxt = 2 + len(self.shape.key)
        return (
            f"SELECT {self.shape.key_select()}, t.{self.col} AS cell "
            f"FROM {self.shape.qualified} AS t WHERE {where} "
            f"ORDER BY {self.shape.key_order()} LIMIT ${nxt}"
        )

    def select_pages(self) -> str:
        """Cells under the given key ids in a page range; params: ids, from tid, to tid."""
        return (
            f"SELECT {self.shape.key_select()}, t.{self.col} AS cell "
            f"FROM {self.shape.qualified} AS t WHERE t.ctid >= $2::text::tid "
            f"AND t.ctid < $3::text::tid AND {self._old(1)}"
        )

    def update_cells(self) -> str:
        """Swap old cells for new ones where they are still there; params: key arrays,
        old cells, new cells. RETURNING one row per cell replaced."""
        arrays, names, cond = self.shape.key_match(1)
        n = self.shape.key_width + 1
        return (
            f"UPDATE {self.shape.qualified} AS t SET {self.col} = v.new "
            f"FROM unnest({arrays}, ${n}::bytea[], ${n + 1}::bytea[]) AS v({names}, old, new) "
            f"WHERE {cond} AND t.{self.col} = v.old RETURNING 1"
        )

    def update_one(self) -> str:
        """One row (the fallback when a batch hits a unique violation); params: key..., old, new."""
        n = self.shape.key_width + 1
        return (
            f"UPDATE {self.shape.qualified} AS t SET {self.col} = ${n + 1}::bytea "
            f"WHERE {self.shape.key_row(1)} AND t.{self.col} = ${n}::bytea"
        )

    def count_by_key(self) -> str:
        """Cells per key id among the given ones; param: ids."""
        return (
            f"SELECT substring(t.{self.col} from 3 for 4) AS key_id, count(*) AS n "
            f"FROM {self.shape.qualified} AS t WHERE {self._old(1)} GROUP BY 1"
        )


# --- pacing and progress --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Throttle:
    """At most `rate` rows per second on average (None: as fast as it goes)."""

    rate: float | None = None

    def __post_init__(self) -> None:
        if self.rate is not None and self.rate <= 0:
            raise PlanError("--rate must be positive")

    def batch_size(self, batch: int) -> int:
        """A batch is never more than a second's worth of rows, so pauses stay short."""
        if self.rate is None:
            return batch
        return max(1, min(batch, int(self.rate)))

    def delay(self, done: int, elapsed: float) -> float:
        """Seconds to wait so that `done` rows took at least done / rate seconds."""
        if self.rate is None:
            return 0.0
        return max(0.0, done / self.rate - elapsed)


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


def render_progress(label: str, done: int, total: int, elapsed: float, *,
                    bar: bool, width: int = 28, unit: str = "rows") -> str:
    """One progress line: a bar (terminals) or plain text (logs). `total` may be 0."""
    rate = done / elapsed if elapsed > 0 else 0.0
    shown_total = max(total, done)
    fraction = done / shown_total if shown_total else 1.0
    eta = (shown_total - done) / rate if rate > 0 else 0.0
    numbers = (f"{done:,}/{shown_total:,} {unit} ({fraction:.0%}), {rate:,.0f} {unit}/s, "
               f"elapsed {_clock(elapsed)}")
    if not bar:
        return f"{label}: {numbers}"
    filled = int(width * fraction)
    return (f"{label} [{'#' * filled}{'.' * (width - filled)}] {numbers}"
            + (f", eta {_clock(eta)}" if done < shown_total else ""))

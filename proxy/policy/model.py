"""The column policy of DESIGN.md section 5, as immutable values.

A `PolicySet` is built once by `proxy.policy.loader.load_policies` and then
shared read-only by every connection. Names are *catalog* names, exactly as
PostgreSQL stores them in pg_class/pg_attribute: `public.patients` in the YAML
is the table an unquoted `Patients` or a quoted `"patients"` refers to in SQL;
a table created as `"Patients"` must be written `public.Patients` in the policy.

`PolicySet` compares and hashes by identity (eq=False): the SQL analyzer caches
plans keyed on the set object itself, and a reloaded policy is a new object, so
a stale plan can never be served for a new policy (the cache holds a strong
reference to its key, so an id() can never be reused while an entry lives).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Literal, get_args

ColumnType = Literal[
    "text",
    "varchar",
    "int2",
    "int4",
    "int8",
    "float4",
    "float8",
    "numeric",
    "bool",
    "date",
    "time",
    "timestamp",
    "timestamptz",
    "uuid",
    "json",
    "jsonb",
    "bytea",
]
COLUMN_TYPES: tuple[ColumnType, ...] = get_args(ColumnType)
Search = Literal["equality"]
Isolation = Literal["strict", "trusted"]
OnDenied = Literal["error", "null"]

TableKey = tuple[str, str]  # (schema, table), catalog names


@dataclass(frozen=True, slots=True)
class ColumnPolicy:
    """One encrypted column: its declared (client-visible) type and search mode.

    `search` None means randomized encryption (AES-GCM): the column can be
    stored and read, tested with IS NULL, counted, but never compared.
    'equality' means deterministic encryption (AES-SIV) within one tenant.
    """

    name: str
    type: ColumnType
    search: Search | None = None

    def __post_init__(self) -> None:
        if self.type not in COLUMN_TYPES:
            raise ValueError(f"column {self.name}: unknown type {self.type!r}")
        if self.search not in (None, "equality"):
            raise ValueError(f"column {self.name}: search must be 'equality' or absent")

    @property
    def searchable(self) -> bool:
        return self.search == "equality"


@dataclass(frozen=True, slots=True)
class TablePolicy:
    """The policy of one table: where its row tenant comes from, who may decrypt.

    Exactly one of `tenant_column` / `tenant_from_session` describes the tenant:
    a column of the row (never itself encrypted), or the session's
    `pgseal.tenant` for tables that hold a single tenant's rows per session.
    """

    schema: str
    table: str
    tenant_column: str | None
    tenant_from_session: bool
    isolation: Isolation
    decrypt_roles: frozenset[str] | None
    on_denied: OnDenied
    columns: Mapping[str, ColumnPolicy]
    # Where the table was defined ("file:line"), for messages; not part of equality.
    origin: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if (self.tenant_column is None) == (not self.tenant_from_session):
            raise ValueError(f"{self.qualified_name}: tenant is either a column or the session")
        if self.tenant_column is not None and self.tenant_column in self.columns:
            raise ValueError(f"{self.qualified_name}: the tenant column may not be encrypted")
        if self.isolation not in ("strict", "trusted"):
            raise ValueError(f"{self.qualified_name}: isolation must be strict or trusted")
        if self.on_denied not in ("error", "null"):
            raise ValueError(f"{self.qualified_name}: on_denied must be error or null")
        if not isinstance(self.columns, MappingProxyType):
            object.__setattr__(self, "columns", MappingProxyType(dict(self.columns)))

    @property
    def key(self) -> TableKey:
        return (self.schema, self.table)

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.table}"

    def column(self, name: str) -> ColumnPolicy | None:
        return self.columns.get(name)

    def may_decrypt(self, role: str) -> bool:
        return self.decrypt_roles is None or role in self.decrypt_roles


class AmbiguousTableError(Exception):
    """An unqualified name matches protected tables in several schemas, none on the path."""

    def __init__(self, name: str, candidates: tuple[str, ...]) -> None:
        super().__init__(name, candidates)
        self.name = name
        self.candidates = candidates

    def describe(self) -> str:
        return (
            f"unqualified table name {self.name!r} may refer to protected table "
            f"{' or '.join(self.candidates)} (the proxy cannot be sure of the server's "
            "search_path); schema-qualify it"
        )


@dataclass(frozen=True, eq=False)
class PolicySet:
    """Every protected table, keyed by (schema, table). Identity-hashed (see module doc)."""

    tables: Mapping[TableKey, TablePolicy] = field(default_factory=dict)
    cross_tenant_roles: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not isinstance(self.tables, MappingProxyType):
            object.__setattr__(self, "tables", MappingProxyType(dict(self.tables)))
        for key, policy in self.tables.items():
            if key != policy.key:
                raise ValueError(f"table key {key} does not match {policy.qualified_name}")

    @classmethod
    def of(cls, tables: Iterable[TablePolicy], cross_tenant_roles: Iterable[str] = ()) -> PolicySet:
        return cls({t.key: t for t in tables}, frozenset(cross_tenant_roles))

    def __bool__(self) -> bool:
        return bool(self.tables)

    def table(self, schema: str, name: str) -> TablePolicy | None:
        return self.tables.get((schema, name))

    def is_protected_table(self, schema: str, name: str) -> bool:
        return (schema, name) in self.tables

    def resolve(
        self, schema: str | None, name: str, search_path: Iterable[str]
    ) -> TablePolicy | None:
        """The protected table an SQL reference names, or None.

        An unqualified name resolves through `search_path` to the first schema
        that has a *protected* table of that name. PostgreSQL would stop at the
        first schema holding any table of that name; the proxy cannot see
        unprotected tables, so it over-approximates (treats the reference as
        protected). That can only make a statement fail, never leak plaintext.

        The proxy's `search_path` is only an estimate (it cannot observe every
        way the server's path changes: the server's configured default, ALTER
        ROLE ... SET, set_config(), function-level settings), so it is never
        trusted to rule a protected table *out*: when no schema on the given
        path has a protected table of that name, an unqualified name still
        resolves to the protected table of that name in any schema if there is
        exactly one, and raises `AmbiguousTableError` if several schemas have
        one (callers refuse the statement). An unqualified name returns None
        only when no protected table anywhere has that name. This may seal or
        refuse a statement on an unprotected table that shares a protected
        table's name; it never lets one reach a protected table as plaintext.
        """
        if schema is not None:
            return self.tables.get((schema, name))
        for candidate in search_path:
            found = self.tables.get((candidate, name))
            if found is not None:
                return found
        anywhere = [t for (_, table), t in self.tables.items() if table == name]
        if len(anywhere) == 1:
            return anywhere[0]
        if anywhere:
            raise AmbiguousTableError(
                name, tuple(sorted(t.qualified_name for t in anywhere))
            )
        return None

    @cached_property
    def _mention_names(self) -> tuple[str, ...]:
        names: set[str] = set()
        for _, table in self.tables:
            names.add(table.lower())
            # Inside a quoted identifier an embedded `"` is written twice.
            names.add(table.replace('"', '""').lower())
        # U&"..." identifiers can spell a name with escapes (U&"p\0061tients"),
        # so their mere presence counts as a mention.
        names.add('u&"')
        return tuple(sorted(names))

    def mentions_protected_table(self, sql: str) -> bool:
        """True if `sql` may name a protected table: a fast pre-filter before parsing.

        Over-approximates (a name inside a string, a comment or a longer
        identifier counts), never under-approximates: unquoted identifiers fold
        to lower case and quoted ones are matched case-insensitively too, and
        any Unicode-escaped identifier counts as a mention.
        """
        if not self.tables:
            return False
        # A few substring tests on the lowered text beat one case-insensitive
        # regex alternation by an order of magnitude (this runs on every statement).
        lowered = sql.lower()
        return any(name in lowered for name in self._mention_names)

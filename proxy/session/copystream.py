"""COPY of protected tables through the data path: rows sealed going in, opened coming out.

Pure, and streaming: each CopyData message is handled on its own, and only
the unfinished last row of a message is kept for the next one (see
`copyformat.split_rows`), so a stream of any length passes in constant
memory. A message is processed all or nothing: when a key is missing from the
KeyRing, `MissingKeys` is raised before any state changes, and the caller
feeds the very same message again once the keys are there.

`CopyIn` (COPY ... FROM STDIN): every field of an encrypted column becomes a
sealed cell, written as a bytea field; every other byte of the row goes on
as the client wrote it. A header line (HEADER) never does: the column names
go in its place. The tenant of a row is its tenant column's field
when the COPY lists it, else the session tenant, with INSERT's rules. A row
that breaks them raises `CopyStop`: the caller then fails the whole COPY
upstream (CopyFail), so that nothing of it is stored, and nothing of the
row, nor of any later one, is forwarded.

`CopyOut` (COPY ... TO STDOUT): every field that holds a cell is opened and
written in the stream's format, with SELECT's read rules (decrypt_roles,
session tenant, cross-tenant roles, on_denied, the row's own tenant column).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from proxy.crypto.cells import CellError, CellKey, cell_key_id
from proxy.crypto.values import SessionFormat, ValueFormatError, from_canonical, to_canonical
from proxy.policy.model import PolicySet, TablePolicy
from proxy.rewrite.plan import CopyOptions, OutputTarget
from proxy.session.copyformat import (
    CopyDialect,
    CopyFormatError,
    SplitState,
    split_rows,
)

BAD_COPY_FORMAT = "22P04"  # PostgreSQL's bad_copy_file_format
DENIED = "42501"
CORRUPT = "XX001"
KEY_SERVICE = "58030"


class MissingKeys(Exception):
    """Keys the KeyRing does not hold yet: nothing changed; fetch them, feed the same chunk."""

    def __init__(
        self, tenants: frozenset[str] = frozenset(), key_ids: frozenset[int] = frozenset()
    ) -> None:
        super().__init__("keys needed")
        self.tenants = tenants
        self.key_ids = key_ids


@dataclass(frozen=True, slots=True)
class Denial:
    """A cell the session may not read (for the audit trail)."""

    tenant: str
    key_id: int
    table: str
    column: str
    message: str


class CopyStop(Exception):
    """The COPY must fail as a whole. `message` names tables, columns and row numbers,
    never a value (it also reaches the server log, inside CopyFail)."""

    def __init__(self, sqlstate: str, message: str, denials: tuple[Denial, ...] = ()) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.denials = denials


class KeySource(Protocol):
    """The part of the data path's KeyRing a COPY uses."""

    def current(self, tenant: str, uses: int) -> CellKey | None: ...

    def by_id(self, key_id: int, uses: int) -> CellKey | None: ...

    def destroyed(self, key_id: int) -> str | None:
        """The tenant of `key_id` when that key is known to be destroyed (crypto-shredded)."""
        ...


# (tenant, key_id, "schema.table") -> (columns, cells)
Counts = dict[tuple[str, int, str], tuple[set[str], list[int]]]


def _column_set(names: tuple[str, ...] | str, columns: tuple[str, ...]) -> frozenset[int]:
    if names == "*":
        return frozenset(range(len(columns)))
    return frozenset(i for i, c in enumerate(columns) if c in names)


def dialect_of(options: CopyOptions) -> CopyDialect:
    """The stream dialect, or CopyStop for options the proxy cannot stream."""
    try:
        return CopyDialect.of(options)
    except ValueError as exc:
        raise CopyStop("0A000", f"pgseal: {exc}") from None


@dataclass(frozen=True, slots=True)
class _SealSpec:
    index: int
    column: str  # "schema.table.column": subkey derivation and AAD
    name: str
    type: str
    deterministic: bool
    force_not_null: bool
    force_null: bool


class CopyIn:
    """One `COPY table FROM STDIN` of a protected table (see the module doc)."""

    def __init__(
        self,
        table: TablePolicy,
        columns: tuple[str, ...],
        options: CopyOptions,
        keys: KeySource,
        session: SessionFormat,
        session_tenant: str | None,
        *,
        tenant_uncertain: bool = False,
    ) -> None:
        self.table = table
        self.columns = columns
        self.dialect = dialect_of(options)
        self.keys = keys
        self.session = session
        self.session_tenant = session_tenant
        self.tenant_uncertain = tenant_uncertain
        not_null = _column_set(options.force_not_null, columns)
        force_null = _column_set(options.force_null, columns)
        self.specs = tuple(
            _SealSpec(
                i,
                f"{table.schema}.{table.table}.{name}",
                name,
                table.columns[name].type,
                table.columns[name].searchable,
                i in not_null,
                i in force_null,
            )
            for i, name in enumerate(columns)
            if name in table.columns
        )
        tenant_column = table.tenant_column
        self.tenant_index = (
            columns.index(tenant_column)
            if tenant_column is not None and tenant_column in columns
            else None
        )
        # The tenant field is read as PostgreSQL reads it, FORCE_NOT_NULL and FORCE_NULL
        # included: else a row could be sealed under a tenant PostgreSQL does not store.
        self.tenant_forced = (self.tenant_index in not_null, self.tenant_index in force_null)
        self.state = SplitState()
        self.header_pending = options.header != "off"
        self.header_match = options.header == "match"
        self.rows = 0  # data rows forwarded so far (for messages)
        self.sealed: Counts = {}

    def feed(self, chunk: bytes, *, final: bool = False) -> bytes:
        """The whole rows `chunk` completes, sealed, end-of-lines included (b"" if none).

        `final`: the client ended the stream (CopyDone). Raises MissingKeys (nothing
        changed) or CopyStop (the COPY must fail)."""
        name = self.table.qualified_name
        try:
            rows, state = split_rows(self.dialect, self.state, chunk, final=final)
        except CopyFormatError as exc:
            raise CopyStop(
                BAD_COPY_FORMAT, f"pgseal: {exc} (COPY into {name}, after row {self.rows})"
            ) from None
        dialect = self.dialect
        read_field = dialect.read_field
        header = self.header_pending
        ncols = len(self.columns)
        out: list[bytes] = []
        work: list[tuple[int, int, list[bytes], str, list[tuple[_SealSpec, bytes]]]] = []
        uses: dict[str, int] = {}
        number = self.rows
        for row in rows:
            if header:
                out.append(self._header(row))
                header = False
                continue
            number += 1
            try:
                fields = dialect.split_fields(row)
                if len(fields) != ncols:
                    raise CopyStop(
                        BAD_COPY_FORMAT,
                        f"pgseal: row {number} of the COPY into {name} has {len(fields)} "
                        f"fields for {ncols} columns",
                    )
                values: list[tuple[_SealSpec, bytes]] = []
                for spec in self.specs:
                    value = read_field(fields[spec.index], spec.force_not_null, spec.force_null)
                    if type(value) is bytes:  # NULL and DEFAULT stay as written
                        values.append((spec, value))
            except CopyFormatError as exc:
                raise CopyStop(
                    BAD_COPY_FORMAT, f"pgseal: {exc} (row {number} of the COPY into {name})"
                ) from None
            if values:
                tenant = self._row_tenant(fields, number)
                uses[tenant] = uses.get(tenant, 0) + len(values)
                work.append((len(out), number, fields, tenant, values))
            out.append(row)
        keys: dict[str, CellKey] = {}
        missing: set[str] = set()
        for tenant, count in uses.items():
            key = self.keys.current(tenant, count)
            if key is None:
                missing.add(tenant)
            else:
                keys[tenant] = key
        if missing:
            raise MissingKeys(tenants=frozenset(missing))
        session = self.session
        bytea_field = dialect.bytea_field
        join = dialect.delimiter.join
        for at, number_at, fields, tenant, values in work:
            seal = keys[tenant].seal
            for spec, value in values:
                try:
                    canonical = to_canonical(spec.type, value, 0, session)
                except ValueFormatError as exc:
                    raise CopyStop(
                        exc.sqlstate,
                        f"pgseal: {exc} (column {spec.column}, row {number_at} of the COPY)",
                    ) from None
                cell = seal(spec.column, canonical, deterministic=spec.deterministic)
                fields[spec.index] = bytea_field(cell)
            out[at] = join(fields)
        # Everything succeeded: only now does the stream move on.
        self.state = state
        self.header_pending = header
        self.rows = number
        for *_, tenant, values in work:
            slot = self.sealed.setdefault((tenant, keys[tenant].key_id, name), (set(), [0]))
            slot[0].update(spec.name for spec, _ in values)
            slot[1][0] += len(values)
        if not out:
            return b""
        eol = state.eol or b"\n"
        return eol.join(out) + eol

    def _header(self, row: bytes) -> bytes:
        """The header line to forward in place of the client's, which never goes upstream:
        PostgreSQL skips it (HEADER), or compares it with the column names (HEADER MATCH)
        and quotes the line in its error, which the server log keeps; either way a data
        row sent as a header would reach PostgreSQL in plaintext. The proxy forwards the
        column names, after making PostgreSQL's MATCH check itself."""
        dialect = self.dialect
        names = [name.encode() for name in self.columns]
        if self.header_match:
            try:
                got = [dialect.read_field(raw) for raw in dialect.split_fields(row)]
            except CopyFormatError:
                got = []
            if got != names:
                raise CopyStop(
                    BAD_COPY_FORMAT,
                    f"pgseal: the header line of the COPY into {self.table.qualified_name} "
                    f"does not match its columns ({', '.join(self.columns)})",
                )
        single = len(names) == 1
        return dialect.delimiter.join(dialect.text_field(n, single=single) for n in names)

    def _row_tenant(self, fields: list[bytes], number: int) -> str:
        """The tenant whose key seals this row, after the isolation rules (as INSERT)."""
        name = self.table.qualified_name
        if self.tenant_uncertain:
            raise CopyStop(
                DENIED,
                "pgseal: the session tenant is uncertain after an error in a pipelined SET; "
                "SET pgseal.tenant again",
            )
        session = self.session_tenant
        row: str | None = session
        if self.tenant_index is not None and not self.table.tenant_from_session:
            try:
                value = self.dialect.read_field(fields[self.tenant_index], *self.tenant_forced)
            except CopyFormatError as exc:  # e.g. a `\.` inside the field: not a value
                raise CopyStop(
                    BAD_COPY_FORMAT, f"pgseal: {exc} (row {number} of the COPY into {name})"
                ) from None
            if value is None:
                row = None
            elif isinstance(value, bytes):
                try:
                    row = value.decode("utf-8")
                except UnicodeDecodeError:
                    raise CopyStop(
                        "22021", f"pgseal: the tenant of row {number} is not UTF-8"
                    ) from None
            # DEFAULT: the column default, which is the session tenant's (as INSERT's DEFAULT)
        if row is None:
            raise CopyStop(
                DENIED,
                f"pgseal: no tenant for row {number} of {name}: SET pgseal.tenant first "
                "(or give the row's tenant column)",
            )
        if self.table.isolation == "strict" and row != session:
            if session is None:
                raise CopyStop(
                    DENIED,
                    f"pgseal: {name} needs a session tenant (SET pgseal.tenant) under strict "
                    "isolation",
                )
            raise CopyStop(
                DENIED,
                f"pgseal: tenant of row {number} differs from the session tenant on {name}",
            )
        return row


@dataclass(frozen=True, slots=True)
class _OpenSpec:
    index: int
    target: OutputTarget
    column: str  # "schema.table.column": subkey derivation and AAD
    type: str
    table: str  # "schema.table" for audit counts
    null_on_denied: bool
    force_quote: bool
    tenant_index: int | None  # where the row's tenant is, when the stream has it
    tenant_value: str | None  # the tenant a WHERE clause pins

    @property
    def checks_row(self) -> bool:
        return self.tenant_index is not None or self.tenant_value is not None


@dataclass(slots=True)
class CopyOut:
    """One `COPY ... TO STDOUT` whose stream carries cells (see the module doc).

    read_denial(target, tenant): why this session may not read a cell of `tenant`
    (decrypt_roles, isolation), or None; it must not change during the COPY (the
    session cannot change while its COPY runs), so its answers are kept.
    cell_of(text): the cell inside a bytea field's text (hex or escape output),
    CellError if it is none.
    """

    targets: tuple[OutputTarget | None, ...]
    options: CopyOptions
    keys: KeySource
    session: SessionFormat
    policies: PolicySet
    read_denial: Callable[[OutputTarget, str], str | None]
    cell_of: Callable[[bytes], bytes]
    dialect: CopyDialect = field(init=False)
    specs: tuple[_OpenSpec, ...] = field(init=False)
    state: SplitState = field(init=False, default_factory=SplitState)
    header_pending: bool = field(init=False)
    opened: Counts = field(init=False, default_factory=dict)
    denials: list[Denial] = field(init=False, default_factory=list)
    _rules: dict[tuple[int, str], str | None] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.dialect = dialect_of(self.options)
        self.header_pending = self.options.header != "off"
        names = tuple(t.name if t is not None else "" for t in self.targets)
        quoted = _column_set(self.options.force_quote, names)
        specs = []
        for i, target in enumerate(self.targets):
            if target is None:
                continue
            table = self.policies.tables[target.column.table_key]
            source = target.tenant
            specs.append(
                _OpenSpec(
                    i,
                    target,
                    str(target.column),
                    target.policy.type,
                    table.qualified_name,
                    table.on_denied == "null",
                    i in quoted,
                    source.output if source.kind == "output" else None,
                    source.value if source.kind == "literal" else None,
                )
            )
        self.specs = tuple(specs)

    def feed(self, chunk: bytes, *, final: bool = False) -> bytes:
        """The whole rows `chunk` completes, opened, end-of-lines included (b"" if none).
        Raises MissingKeys (nothing changed) or CopyStop (end the result with an error)."""
        try:
            rows, state = split_rows(self.dialect, self.state, chunk, final=final)
        except CopyFormatError as exc:
            raise CopyStop(
                CORRUPT, f"pgseal: unreadable COPY stream from the server: {exc}"
            ) from None
        dialect = self.dialect
        null = dialect.null
        bytea_value, text_field, split_fields = (
            dialect.bytea_value, dialect.text_field, dialect.split_fields
        )
        by_id, cell_of, session, rules = self.keys.by_id, self.cell_of, self.session, self._rules
        header = self.header_pending
        ncols = len(self.targets)
        single = ncols == 1
        out: list[bytes] = []
        need: set[int] = set()
        opened: dict[tuple[str, int, str, str], int] = {}
        denials: list[Denial] = []
        for row in rows:
            if header:
                out.append(row)
                header = False
                continue
            try:
                fields = split_fields(row)
                if len(fields) != ncols:
                    raise CopyFormatError(f"a row has {len(fields)} fields for {ncols} columns")
                tenants: dict[int, str | None] = {}  # the row's tenant fields, read once
                for spec in self.specs:
                    raw = fields[spec.index]
                    if raw == null:  # NULL (PostgreSQL quotes a CSV value equal to it)
                        continue
                    try:
                        cell = cell_of(bytea_value(raw))
                        key_id = cell_key_id(cell)
                    except CellError:
                        raise CopyStop(
                            CORRUPT,
                            f"pgseal: {spec.target.column} holds a value that is not a pgseal cell",
                        ) from None
                    key = by_id(key_id, 1)
                    if key is None:
                        gone = self._missing(spec, key_id, need, denials)
                        if gone is not None:
                            fields[spec.index] = gone
                        continue
                    denial = rules.get((spec.index, key.tenant), _UNKNOWN)
                    if denial is _UNKNOWN:
                        denial = self._rule(spec, key.tenant)
                    if denial is None and spec.checks_row:
                        denial = self._row_denial(spec, key, fields, tenants)
                    if denial is not None:
                        column = spec.target.column.column
                        denials.append(Denial(key.tenant, key_id, spec.table, column, denial))
                        if not spec.null_on_denied:
                            raise CopyStop(DENIED, denial, tuple(denials))
                        fields[spec.index] = null
                        continue
                    try:
                        plain = from_canonical(spec.type, key.open(spec.column, cell), 0, session)
                    except CellError:
                        raise CopyStop(
                            CORRUPT,
                            f"pgseal: a cell of {spec.target.column} cannot be opened (moved from "
                            "another row, tenant or column, or corrupted)",
                            tuple(denials),
                        ) from None
                    except ValueFormatError as exc:
                        raise CopyStop(
                            exc.sqlstate,
                            f"pgseal: {exc} (column {spec.target.column})",
                            tuple(denials),
                        ) from None
                    slot = (key.tenant, key_id, spec.table, spec.target.column.column)
                    opened[slot] = opened.get(slot, 0) + 1
                    fields[spec.index] = text_field(plain, spec.force_quote, single)
            except CopyFormatError as exc:
                raise CopyStop(
                    CORRUPT, f"pgseal: unreadable COPY stream from the server: {exc}"
                ) from None
            out.append(dialect.delimiter.join(fields))
        if need:
            raise MissingKeys(key_ids=frozenset(need))
        self.state = state
        self.header_pending = header
        for (tenant, key_id, table, column), n in opened.items():
            slot_total = self.opened.setdefault((tenant, key_id, table), (set(), [0]))
            slot_total[0].add(column)
            slot_total[1][0] += n
        self.denials.extend(denials)
        if not out:
            return b""
        eol = state.eol or b"\n"
        return eol.join(out) + eol

    def _missing(
        self, spec: _OpenSpec, key_id: int, need: set[int], denials: list[Denial]
    ) -> bytes | None:
        """A key not in the KeyRing: to fetch (None), or crypto-shredded (the NULL field,
        under on_denied null; CopyStop otherwise)."""
        shredded = self.keys.destroyed(key_id)
        if shredded is None:
            need.add(key_id)
            return None
        # Never openable again. The read rules come first: a reader who could not see
        # the cell anyway learns nothing about its tenant's keys.
        column = spec.target.column
        rule = self._rule(spec, shredded)
        gone = rule or (
            f"pgseal: a cell of {column} cannot be opened: data key {key_id} of tenant "
            f"{shredded!r} was destroyed (crypto-shredded)"
        )
        denials.append(Denial(shredded, key_id, spec.table, column.column, gone))
        if spec.null_on_denied:
            return self.dialect.null
        raise CopyStop(DENIED if rule else KEY_SERVICE, gone, tuple(denials))

    def _row_denial(
        self, spec: _OpenSpec, key: CellKey, fields: list[bytes], tenants: dict[int, str | None]
    ) -> str | None:
        """The cell's own tenant must be its row's (else it was copied there with SQL)."""
        if spec.tenant_index is None:
            expected = spec.tenant_value
        elif spec.tenant_index in tenants:
            expected = tenants[spec.tenant_index]
        else:
            value = self.dialect.read_field(fields[spec.tenant_index])
            expected = value.decode("utf-8", "replace") if isinstance(value, bytes) else None
            tenants[spec.tenant_index] = expected
        if expected == key.tenant:
            return None
        return (
            f"pgseal: a cell of {spec.target.column} belongs to another tenant than its row "
            "(copied from another row?)"
        )

    def _rule(self, spec: _OpenSpec, tenant: str) -> str | None:
        at = (spec.index, tenant)
        if at not in self._rules:
            self._rules[at] = self.read_denial(spec.target, tenant)
        return self._rules[at]


_UNKNOWN = "?"  # not in CopyOut._rules yet (a rule is None or a message)

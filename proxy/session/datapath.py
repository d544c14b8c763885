"""The encrypting data path of one connection. Pure: frames in, frames out.

Theory of operation
-------------------
With a policy loaded, `ProxySession` hands every client frame after startup
to `DataPath.client_frame` and every server frame to `DataPath.server_frame`;
each returns the bytes to forward (possibly rewritten, possibly nothing).

Sending: a statement (Query, Parse) is analyzed (`proxy.rewrite.analyze`,
cached per text). Sealed values replace literals in the text and protected
parameters in Bind (always as binary bytea); ParameterDescription and
RowDescription report the declared types back; DataRow cells are opened into
the format the client asked for.

Responses: every message forwarded upstream that the server answers gets a
`_Pending` entry in a FIFO; server messages are matched against the head.
After an ErrorResponse the server skips everything up to Sync, and so does
the queue. This is also how refusals stay in order in a pipeline: a refused
statement is not dropped but *substituted* by one that fails at once
(`_REFUSED_SQL`), and its ErrorResponse is replaced by ours. PostgreSQL then
does the error-until-Sync and the aborted-transaction bookkeeping itself,
exactly as for a real error, and nothing of the statement reaches it.

Keys: seal and open look keys up synchronously in a `KeyRing` (memory
only). A miss raises `NeedKeys`; the session keeps the frame, the shell
fetches the keys (HSM, keystore) and the same frame is processed again. A
frame is only ever processed to completion or not at all, so the retry is
exact. The same way, a value to seal under a session tenant that the answer
to an earlier segment may still change (it fails, and its SET never
happened) raises `NeedAnswers`: the frame waits for the next answer.

Fail closed: anything unexpected on a protected statement is a refusal,
never a forward of plaintext.
"""

from __future__ import annotations

import binascii
import enum
import re
import struct
from binascii import a2b_hex
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from proxy.audit.records import AuditRecord
from proxy.crypto.cells import CellError, CellKey, cell_key_id
from proxy.crypto.values import (
    TYPE_INFO,
    SessionFormat,
    ValueFormatError,
    from_canonical,
    to_canonical,
)
from proxy.errors import PgsealError, without_context
from proxy.policy.model import PolicySet, TableKey, TablePolicy
from proxy.rewrite import (
    LiteralTarget,
    OutputTarget,
    ParamTarget,
    StatementPlan,
    TenantSource,
    TextEdit,
    analyze,
    apply_edits,
    resolve_outputs,
)
from proxy.rewrite.copy import copy_targets, is_utf8_encoding
from proxy.rewrite.lexer import (
    SavepointStatementError,
    fold_identifier,
    parse_savepoint_statement,
)
from proxy.rewrite.params import parameter_count
from proxy.rewrite.plan import CopyPlan, SessionSetting
from proxy.session.copystream import CopyIn, CopyOut, CopyStop, Denial, MissingKeys, dialect_of
from proxy.session.tenant import TenantTracker, TrackerSnapshot
from proxy.wire import messages as m
from proxy.wire.framing import Frame, ProtocolViolation

BYTEA_OID: Final = 17
BYTEA_ARRAY_OID: Final = 1001
# text, varchar, name, char, bpchar, unknown
TEXT_OIDS: Final = frozenset({25, 1043, 19, 18, 1042, 0})
OID_TO_TYPE: Final = {info.oid: name for name, info in TYPE_INFO.items()}

# Settings that change how values print and that PostgreSQL does not report in
# ParameterStatus: the proxy tracks them itself (see DataPath.output_settings).
_OUTPUT_SETTINGS: Final = ("extra_float_digits", "bytea_output")
# COMMIT / ROLLBACK AND CHAIN: a new block starts at once ("AND NO CHAIN" does not match).
# The functions libpq's lo_* calls through FunctionCall (fixed OIDs of pg_proc): they change
# no setting. Any other FunctionCall leaves the tracked tenant and role uncertain.
_LARGE_OBJECT_FUNCTIONS: Final = frozenset(
    (715, 764, 765, 952, 953, 954, 955, 956, 957, 958, 964, 1004, 3170, 3171, 3172)
)
_PREPARE_TRANSACTION_RE: Final = re.compile(r"\s*PREPARE\s+TRANSACTION\b", re.IGNORECASE)
_AND_CHAIN_RE: Final = re.compile(r"\bAND\s+CHAIN\b", re.IGNORECASE)
_OUTPUT_SETTING_RE: Final = re.compile(
    r"(?is)\s*(?:SET\s+(?:(SESSION|LOCAL)\s+)?(extra_float_digits|bytea_output)\s*(?:=|\sTO\s)\s*"
    r"(?:'([^']*)'|([-+\w]+))\s*|RESET\s+(extra_float_digits|bytea_output)\s*)"
)

# What a refused statement is replaced with: fails at parse time, carries no value.
_REFUSED_SQL: Final = "pgseal_refused_statement"
_REFUSED_STATEMENT: Final = "pgseal.refused"

# CopyInResponse, CopyOutResponse, CopyData, CopyDone from the server.
_COPY_SERVER_TYPES: Final = frozenset(b"GHdc")

_I16: Final = struct.Struct("!h")
_I32: Final = struct.Struct("!i")


class NeedKeys(Exception):
    """Keys the KeyRing does not hold; fetch them and process the same frame again."""

    def __init__(
        self, tenants: frozenset[str] = frozenset(), key_ids: frozenset[int] = frozenset()
    ) -> None:
        super().__init__("keys needed")
        # True: wait for the server's answers instead (NeedAnswers). An instance attribute:
        # a compiled exception class does not expose class attributes to its instances.
        self.answers = False
        self.tenants = tenants
        self.key_ids = key_ids


class NeedAnswers(NeedKeys):
    """A value would be sealed under a session tenant (or judged under a role) that the
    answer to a segment sent before it may still change, should that segment fail
    (TenantTracker.in_flight_may_change). The session keeps the frame, as for NeedKeys,
    and processes it again at the next ReadyForQuery or ErrorResponse. A subclass of
    NeedKeys: whatever a statement did before it is undone the same way."""

    def __init__(self) -> None:
        super().__init__()
        self.answers = True


class DataPathObserver(Protocol):
    """Watches the session tracking as it happens (the tenant differential tests, which
    judge it against PostgreSQL, in either build: proxy/_native.py). None in production."""

    def statement_tracked(self, statement: str) -> None:
        """One statement's effect on the session was just applied (_track_settings)."""

    def readers_distrusted(self, in_doubt: Sequence[TenantTracker]) -> None:
        """An error put these trackers in doubt for what was sent behind it."""


class KeyRing(Protocol):
    """Synchronous, memory-only key lookup (the key service's cache)."""

    def current(self, tenant: str, uses: int) -> CellKey | None: ...

    def by_id(self, key_id: int, uses: int) -> CellKey | None: ...

    def versions(self, tenant: str, uses: int) -> Sequence[CellKey] | None:
        """Every live (active or retired) key of the tenant, the active one first; None
        unless all of them are in memory (the fetch for `tenant` loads them)."""
        ...

    def destroyed(self, key_id: int) -> str | None:
        """The tenant of `key_id` when that key is known to be destroyed (crypto-shredded)."""
        ...

    def failure(self) -> PgsealError | None:
        """A standing fault that must fail key uses (audit sink down with on_failure block)."""
        ...


@dataclass(frozen=True, slots=True)
class AuditNote:
    """One audit record the data path wants written (the shell adds who and where)."""

    event: str  # data.encrypt | data.decrypt | data.deny
    tenant: str | None
    key_id: int | None
    table: str | None
    columns: tuple[str, ...]
    count: int
    statement: str
    outcome: str = "ok"
    error: str | None = None

    def __init__(
        self,
        event: str,
        tenant: str | None,
        key_id: int | None,
        table: str | None,
        columns: tuple[str, ...],
        count: int,
        statement: str,
        outcome: str = "ok",
        error: str | None = None,
    ) -> None:
        # Written out: see _Pending.__init__.
        object.__setattr__(self, "event", event)
        object.__setattr__(self, "tenant", tenant)
        object.__setattr__(self, "key_id", key_id)
        object.__setattr__(self, "table", table)
        object.__setattr__(self, "columns", columns)
        object.__setattr__(self, "count", count)
        object.__setattr__(self, "statement", statement)
        object.__setattr__(self, "outcome", outcome)
        object.__setattr__(self, "error", error)


@dataclass(frozen=True, slots=True)
class ConnectionFacts:
    """Who is on a connection, for audit records (the shell knows it; see audit_records)."""

    db_user: str
    database: str
    application_name: str | None
    client_addr: str | None
    session: str


def audit_records(
    notes: Sequence[AuditNote],
    facts: ConnectionFacts,
    key_meta: Mapping[int, tuple[int, str]] | None = None,
) -> list[AuditRecord]:
    """The audit records of a connection's notes. Here rather than in the shell because it
    runs on the event loop for every statement that used a key: compiled, each record is a
    direct call of AuditRecord's constructor, without matching 16 arguments at run time.
    Validation is AuditRecord.__init__'s, as for every record; the arguments are positional,
    in its field order (tests/unit/test_audit_chain.py checks the order against keyword
    construction). `key_meta`: key id -> (version, kek) of the keys the notes name, from
    the key ring (the data path itself only knows key ids); a key not in it is null there."""
    user, database, app = facts.db_user, facts.database, facts.application_name
    addr, session = facts.client_addr, facts.session
    records: list[AuditRecord] = []
    for note in notes:
        key_id = note.key_id
        version: int | None = None
        kek: str | None = None
        if key_meta is not None and key_id is not None:
            meta = key_meta.get(key_id)
            if meta is not None:
                version, kek = meta
        records.append(
            AuditRecord(
                # event, tenant, key_id, key_version, kek, table, columns, count,
                note.event, note.tenant, key_id, version, kek, note.table, note.columns,
                note.count,
                # db_user, database, application_name, client_addr, session,
                user, database, app, addr, session,
                # statement, outcome, error
                note.statement, note.outcome, note.error,
            )
        )
    return records


class Refused(PgsealError):
    """A statement (or value) the data path will not forward."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


# --- fingerprints for the audit trail -------------------------------------------------

_LITERAL_RE: Final = re.compile(
    r"(?s)E?'(?:[^']|'')*'|\$(\w*)\$.*?\$\1\$|\b\d+(?:\.\d+)?(?:[eE][-+]?\d+)?\b"
)
_SPACE_RE: Final = re.compile(r"\s+")


def fingerprint(sql: str) -> str:
    """The statement without its literals: safe to store in the audit trail. Not memoized
    by text: a memo would keep statements of any size, and the plaintext constants in
    them, alive after they are done (a prepared statement keeps its own fingerprint; see
    _statement_fingerprint)."""
    return _SPACE_RE.sub(" ", _LITERAL_RE.sub("?", sql)).strip()[:1000]


def _statement_fingerprint(statement: _Statement) -> str:
    """fingerprint() of a prepared statement, once per Parse text rather than per Bind."""
    found = statement.fingerprint
    if found is None:
        found = statement.fingerprint = fingerprint(statement.sql)
        if statement.compiled is not None:
            statement.compiled.fingerprint = found
    return found


# --- per-statement and per-portal state -----------------------------------------------


@dataclass(slots=True)
class _Opener:
    """How to open one result column: position, target, format the client gets."""

    index: int
    target: OutputTarget
    fmt: int
    column: str  # schema.table.column (the cells' subkey and AAD)
    table: str  # schema.table (audit records)
    # The tenant of the cell's row, when the statement shows it: a column of the same
    # result (index, format, type OID; 0 if not described yet) or a value the WHERE
    # clause pins. A cell whose key belongs to another tenant was copied there.
    tenant_index: int | None = None
    tenant_fmt: int = 0
    tenant_oid: int = 0
    tenant_value: str | None = None


@dataclass(slots=True)
class _Statement:
    name: str
    sql: str
    plan: StatementPlan
    client_param_types: tuple[int, ...]
    # Parameters the client binds; literals to seal follow them as $n_client+1.. (see _parse).
    n_client: int = 0
    synthetic: tuple[LiteralTarget, ...] = ()
    # RowDescription fields (name, table) from a Describe of this statement, if any.
    fields: tuple[tuple[str, TableKey | None], ...] | None = None
    field_oids: tuple[int, ...] = ()
    # The search_path the plan was made under: PostgreSQL re-analyses it under another.
    search_path: tuple[str, ...] = ()
    # How Bind seals the protected parameters (see _compile_params).
    slots: tuple[_ParamSlot, ...] = ()
    # Openers by the Bind's result formats, when the plan's outputs are exact and no row
    # tenant comes from a parameter; shared with every Parse of the same text until a
    # Describe of this statement gives it fields of its own.
    openers_by_formats: dict[tuple[int, ...], tuple[_Opener, ...]] = field(default_factory=dict)
    compiled: _Compiled | None = None
    # The text without its literals, for audit records: worked out at the first record,
    # then kept with the statement (see _statement_fingerprint).
    fingerprint: str | None = None
    # A statement with a narrow form (plan, slots) also has a wide one (see _WideForm);
    # which of them PostgreSQL holds (_NARROW, _WIDE, _UNKNOWN after a switch that failed
    # or was skipped), and how many switches to it are on their way (_widen).
    wide: _WideForm | None = None
    upstream_form: int = 0
    switching: int = 0
    switched_at: int = -1  # DataPath.syncs_sent when the last switch was sent

    def __init__(
        self,
        name: str,
        sql: str,
        plan: StatementPlan,
        client_param_types: tuple[int, ...],
        n_client: int = 0,
        synthetic: tuple[LiteralTarget, ...] = (),
        fields: tuple[tuple[str, TableKey | None], ...] | None = None,
        field_oids: tuple[int, ...] = (),
        search_path: tuple[str, ...] = (),
        slots: tuple[_ParamSlot, ...] = (),
        openers_by_formats: dict[tuple[int, ...], tuple[_Opener, ...]] | None = None,
        compiled: _Compiled | None = None,
        fingerprint: str | None = None,
        wide: _WideForm | None = None,
        upstream_form: int = 0,
        switching: int = 0,
        switched_at: int = -1,
    ) -> None:
        # Written out (see _Pending.__init__). openers_by_formats: a new dict when not given.
        self.name = name
        self.sql = sql
        self.plan = plan
        self.client_param_types = client_param_types
        self.n_client = n_client
        self.synthetic = synthetic
        self.fields = fields
        self.field_oids = field_oids
        self.search_path = search_path
        self.slots = slots
        self.openers_by_formats = {} if openers_by_formats is None else openers_by_formats
        self.compiled = compiled
        self.fingerprint = fingerprint
        self.wide = wide
        self.upstream_form = upstream_form
        self.switching = switching
        self.switched_at = switched_at


# _Statement.upstream_form
_NARROW: Final = 0  # as the client's Parse defined it
_WIDE: Final = 1  # a switch (_widen) was answered
_UNKNOWN: Final = 2  # a switch failed or was skipped: the next Bind switches again


@dataclass(frozen=True, slots=True)
class _WideForm:
    """A statement's wide form, where every parameter compared with a search column is
    the bytea[] of its cells under every live key version (see "key versions" in
    `proxy.rewrite`). What Parse sends first is the narrow form (`col = $1`, one cell),
    which PostgreSQL plans better; a Bind whose tenant has more than one live version
    switches the statement to this form for good (_widen). Its plan differs from the
    narrow one only in how those parameters are sent: the narrow plan stays the
    statement's (outputs, parameter types, the search_path check)."""

    plan: StatementPlan
    parse: bytes  # the Parse that defines it upstream (the statement's own name)
    slots: tuple[_ParamSlot, ...]


@dataclass(frozen=True, slots=True)
class _ParamSlot:
    """How Bind seals one protected parameter: compiled once per statement text."""

    position: int  # 0-based, in the Bind's parameters
    target: ParamTarget
    column: str  # schema.table.column
    table: str  # schema.table
    use: str  # "write" | "read" (the isolation rules)
    # Parameters whose tenant has the same source share one tenant lookup per Bind.
    group: int


@dataclass(slots=True)
class _Described:
    """A portal's RowDescription of a protected statement as the client gets it, and what
    it says about the result's columns."""

    out: bytes
    rd: m.RowDescription
    fields: tuple[tuple[str, TableKey | None], ...]
    targets: tuple[OutputTarget | None, ...]
    # The portal's openers (None: they depend on the Bind: a row tenant from a parameter).
    openers: tuple[_Opener, ...] | None


@dataclass(slots=True)
class _Compiled:
    """What every Parse of the same message (same text, types, name) under the same
    search_path shares: drivers re-send the unnamed statement's Parse before each
    execution, and it must not be analysed, rewritten and re-encoded each time."""

    name: str
    sql: str
    plan: StatementPlan
    param_types: tuple[int, ...]
    search_path: tuple[str, ...]
    forwarded: bytes | None  # the Parse sent upstream; None: the client's own
    n_client: int = 0
    synthetic: tuple[LiteralTarget, ...] = ()
    slots: tuple[_ParamSlot, ...] = ()
    openers_by_formats: dict[tuple[int, ...], tuple[_Opener, ...]] = field(default_factory=dict)
    described: dict[bytes, _Described] = field(default_factory=dict)
    fingerprint: str | None = None
    wide: _WideForm | None = None  # see _Statement.wide

    def statement(self) -> _Statement:
        return _Statement(
            self.name,
            self.sql,
            self.plan,
            self.param_types,
            n_client=self.n_client,
            synthetic=self.synthetic,
            search_path=self.search_path,
            slots=self.slots,
            openers_by_formats=self.openers_by_formats,
            compiled=self,
            fingerprint=self.fingerprint,
            wide=self.wide,
        )


# Per connection: distinct Parse messages remembered, and per statement the Describe
# answers and result-format variants. Count limits; a Parse over _COMPILED_MAX_BYTES (bulk
# INSERTs with inline values, never sent twice) is not remembered at all: the cache must
# not pin megabytes, nor the plaintext constants in them, after the statement is gone.
_COMPILED_LIMIT: Final = 128
_COMPILED_VARIANTS: Final = 16
_COMPILED_MAX_BYTES: Final = 16 * 1024


@dataclass(slots=True)
class _Portal:
    statement: _Statement
    result_formats: tuple[int, ...]
    tenant: str | None
    openers: tuple[_Opener, ...] | None  # None: not known yet (a Describe P is on its way)
    bind: m.Bind | None = None  # for row tenants pinned by a parameter (`tenant_id = $2`)

    def __init__(
        self,
        statement: _Statement,
        result_formats: tuple[int, ...],
        tenant: str | None,
        openers: tuple[_Opener, ...] | None,
        bind: m.Bind | None = None,
    ) -> None:
        # Written out: see _Pending.__init__.
        self.statement = statement
        self.result_formats = result_formats
        self.tenant = tenant
        self.openers = openers
        self.bind = bind


class _Kind(enum.Enum):
    PARSE = "parse"
    BIND = "bind"
    DESCRIBE_S = "describe-statement"
    DESCRIBE_P = "describe-portal"
    EXECUTE = "execute"
    CLOSE = "close"
    SYNC = "sync"
    QUERY = "query"
    FUNCTION = "function"
    CATALOG = "catalog"  # the proxy's own catalog lookup after startup


_ENDS_WITH_READY: Final = (_Kind.SYNC, _Kind.QUERY, _Kind.FUNCTION, _Kind.CATALOG)


@dataclass(frozen=True, slots=True)
class _Reader:
    """The role a result runs under, and whether it or the session tenant was uncertain
    when its statement was sent (or became so: _distrust_later_readers)."""

    role: str
    role_uncertain: bool
    tenant_uncertain: bool

    def __init__(self, role: str, role_uncertain: bool, tenant_uncertain: bool) -> None:
        # Written out: see _Pending.__init__ (a NamedTuple's __new__ is interpreted too).
        object.__setattr__(self, "role", role)
        object.__setattr__(self, "role_uncertain", role_uncertain)
        object.__setattr__(self, "tenant_uncertain", tenant_uncertain)


@dataclass(slots=True)
class _Pending:
    kind: _Kind
    swallow: bool = False  # injected by the proxy: the client never sees the answer
    refusal: bytes | None = None  # our ErrorResponse, replacing the server's
    statement: _Statement | None = None
    portal: _Portal | None = None
    close_target: tuple[str, str] | None = None
    # Parse: the statement name it (re)defines and the record it replaced, restored when
    # the server skips the Parse (or it fails). Close: the record it closes.
    parsed: str | None = None
    previous: _Statement | None = None
    closed: _Statement | _Portal | None = None
    # simple Query: plans of its statements and where the results are
    plans: tuple[StatementPlan, ...] = ()
    sql: str = ""
    result_index: int = 0
    openers: tuple[_Opener, ...] = ()
    # The session tenant each result runs under (Execute: one; Query: one per statement),
    # as it was when sent: later SETs in the same pipeline must not decide its reads.
    tenants: tuple[str | None, ...] = ()
    # Likewise who reads each result (_Reader): a SET ROLE, SET pgseal.tenant or COMMIT
    # sent behind the statement must not decide its rows.
    readers: tuple[_Reader, ...] = ()
    # audit counts of opened cells: (tenant, key_id, table) -> [columns, count]
    opened: dict[tuple[str, int, str], tuple[set[str], list[int]]] | None = None
    failed: bool = False  # an error was sent for this result: swallow the rest
    fingerprint: str | None = None  # of its statement, for audit notes (_result_fingerprint)
    # Execute, Sync: how many CopyDone / CopyFail the client had sent before it (a Sync
    # sent after the COPY's end is answered, one sent inside it is not: _drop_ignored_syncs)
    copy_ends: int = 0

    def __init__(
        self,
        kind: _Kind,
        swallow: bool = False,
        refusal: bytes | None = None,
        statement: _Statement | None = None,
        portal: _Portal | None = None,
        close_target: tuple[str, str] | None = None,
        parsed: str | None = None,
        previous: _Statement | None = None,
        closed: _Statement | _Portal | None = None,
        plans: tuple[StatementPlan, ...] = (),
        sql: str = "",
        result_index: int = 0,
        openers: tuple[_Opener, ...] = (),
        tenants: tuple[str | None, ...] = (),
        readers: tuple[_Reader, ...] = (),
        opened: dict[tuple[str, int, str], tuple[set[str], list[int]]] | None = None,
        failed: bool = False,
        fingerprint: str | None = None,
        copy_ends: int = 0,
    ) -> None:
        # Written out rather than generated: compiled (mypyc), a dataclass keeps the
        # generated __init__, which runs as interpreted Python (about 0.7 µs here, one per
        # message); this one is native. tests/unit/test_written_inits.py holds every
        # written-out __init__ to its class's fields.
        self.kind = kind
        self.swallow = swallow
        self.refusal = refusal
        self.statement = statement
        self.portal = portal
        self.close_target = close_target
        self.parsed = parsed
        self.previous = previous
        self.closed = closed
        self.plans = plans
        self.sql = sql
        self.result_index = result_index
        self.openers = openers
        self.tenants = tenants
        self.readers = readers
        self.opened = opened
        self.failed = failed
        self.fingerprint = fingerprint
        self.copy_ends = copy_ends


@dataclass(slots=True)
class SessionInfo:
    user: str
    database: str
    startup_tenant: str | None
    # Output settings PostgreSQL does not report in ParameterStatus: from the startup packet.
    extra_float_digits: int = 1
    bytea_output: str = "hex"


class DataPath:
    """See the module doc. One per client connection."""

    def __init__(
        self,
        policies: PolicySet,
        keys: KeyRing,
        info: SessionInfo,
        *,
        parameters: dict[str, str],
    ) -> None:
        self.policies = policies
        # A dict of its own: a MappingProxyType's get is a generic method call, and this
        # runs for every protected column a statement touches.
        self._tables: dict[TableKey, TablePolicy] = dict(policies.tables)
        self.keys = keys
        self.info = info
        self.observer: DataPathObserver | None = None
        # The role SET ROLE / SET SESSION AUTHORIZATION left, with the tenant's
        # transaction rules (SET LOCAL, ROLLBACK, errors). Privileges never come
        # from it alone: see `_role_may`.
        self.role_setting = TenantTracker(info.user)
        # The session user, where SET ROLE NONE goes (None: not known for sure since a SET
        # SESSION AUTHORIZATION, which only a superuser sends: a plain value, not one more
        # tracker to keep at every Sync); and whether the session started with a role of
        # its own (options=-c role=..., ALTER ROLE ... SET role), where RESET ROLE goes
        # instead of the session user.
        self.session_user: str | None = info.user
        self._startup_role = False
        self.parameters = parameters  # the session's ParameterStatus values (shared, live)
        self.tenant = TenantTracker(info.startup_tenant)
        # extra_float_digits and bytea_output, with the same transaction rules as the
        # tenant: from the startup packet, then the server's own values (catalog query),
        # then SET / RESET. A value opened in text format must print as PostgreSQL would.
        self.output_settings = {
            "extra_float_digits": TenantTracker(str(info.extra_float_digits)),
            "bytea_output": TenantTracker(info.bytea_output),
        }
        self._all_trackers = self._tracker_tuple()
        self.search_path: tuple[str, ...] = ("public",)
        self.statements: dict[str, _Statement] = {}
        # Names whose last Parse from the client did not take effect upstream (refused, or
        # skipped or failed after an error) while PostgreSQL keeps an older statement under
        # them: a Bind to one was written for the statement the client last prepared, not
        # for the one PostgreSQL would run, so it is refused until a Parse or Close.
        self.unconfirmed: set[str] = set()
        self.portals: dict[str, _Portal] = {}
        self.pending: deque[_Pending] = deque()
        self.audit: list[AuditNote] = []
        self.table_oids: dict[int, TableKey] = {}
        # Parse messages already handled, by body (see _Compiled); RowDescriptions are
        # cached in them too, so they are dropped when table_oids changes.
        self._compiled: dict[bytes, _Compiled] = {}
        self._catalog_rows: list[tuple[int, TableKey]] = []
        # The startup ReadyForQuery, held while the catalog query runs (see catalog_query);
        # why the catalog query failed, when it did (the session cannot go on).
        self._startup_ready: bytes | None = None
        self.startup_failure: str | None = None
        # The catalog query is not answered yet (not even sent): client messages wait
        # (an attribute, not a property: the session reads it for every message).
        self.catalog_pending = True
        self._format_cache: tuple[tuple[str, ...], SessionFormat] | None = None
        # COPY (see the COPY section): column lists of the protected tables (catalog query),
        # the COPY FROM STDIN whose stream the client sends, the COPY TO STDOUT whose stream
        # the server sends, and Syncs PostgreSQL ignored inside a COPY (none answered).
        self.table_columns: dict[TableKey, tuple[str, ...]] = {}
        self.copy_in: _CopyInJob | None = None
        # Client CopyData / CopyDone / CopyFail are dropped until its next other message:
        # they belong to a statement that will not read them (see client_frame).
        self.copy_discarding = False
        self.copy_ends_sent = 0  # CopyDone / CopyFail messages from the client (_Pending)
        self.syncs_sent = 0  # Syncs from the client: segments, as an error skips them (_bind)
        # The transaction status of the last ReadyForQuery with nothing in flight after it.
        self.ready_status = "I"
        self.copy_out: _CopyOutJob | None = None
        self.ignored_syncs = 0  # Syncs and Queries PostgreSQL will not answer (the session counts)
        self._segment_open = False  # an Execute was sent since the last Sync
        # PostgreSQL discards every client message until Sync: an extended-protocol error
        # came back before the client sent the Sync that ends its batch (Flush pipelines).
        self.server_skipping = False

    # -- helpers -------------------------------------------------------------------------

    @property
    def session_format(self) -> SessionFormat:
        p = self.parameters
        key = (
            p.get("TimeZone", "UTC"),
            p.get("DateStyle", "ISO, MDY"),
            p.get("client_encoding", "UTF8"),
            p.get("IntervalStyle", "postgres"),
            self.output_settings["bytea_output"].current or "hex",
            self.output_settings["extra_float_digits"].current or "1",
        )
        cached = self._format_cache
        if cached is None or cached[0] != key:
            digits = key[5].strip()
            fmt = SessionFormat(
                timezone=key[0],
                datestyle=key[1],
                client_encoding=key[2],
                intervalstyle=key[3],
                bytea_output=key[4].strip().lower(),
                extra_float_digits=int(digits) if digits.lstrip("+-").isdigit() else 1,
            )
            self._format_cache = (key, fmt)
            return fmt
        return cached[1]

    def _policy(self, table: TableKey) -> TablePolicy:
        policy = self._tables.get(table)
        if policy is None:  # pragma: no cover - plans only name protected tables
            raise Refused("0A000", f"pgseal: no policy for {table[0]}.{table[1]}")
        return policy

    def _analyze(self, sql: str, narrow: bool = False) -> list[StatementPlan]:
        return analyze(sql, self.policies, self.search_path, narrow=narrow)

    # -- startup: learn the OIDs of protected tables in this database ----------------------

    def catalog_query(self, startup_ready: bytes) -> bytes:
        """The Query the proxy runs once after authentication (its answer is swallowed).

        The startup ReadyForQuery is held until it is answered (`startup_ready` is
        released then, see _ready): until the proxy knows the role and the tenant
        PostgreSQL started the session with, no client statement is looked at."""
        self._startup_ready = startup_ready
        pairs = ", ".join(
            f"({_quote(schema)}, {_quote(table)})" for schema, table in sorted(self.policies.tables)
        )
        sql = (
            "SELECT c.oid, n.nspname, c.relname, ARRAY(SELECT a.attname "  # noqa: S608 - _quote
            "FROM pg_catalog.pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 "
            "AND NOT a.attisdropped ORDER BY a.attnum)::text FROM pg_catalog.pg_class c "
            "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            f"WHERE (n.nspname, c.relname) IN ({pairs}); "
            "SELECT current_setting('extra_float_digits'), current_setting('bytea_output'), "
            # As UTF-8 in hex, whatever the client_encoding (names are str here).
            "encode(convert_to(current_user, 'UTF8'), 'hex'), "
            "encode(convert_to(current_setting('pgseal.tenant', true), 'UTF8'), 'hex'), "
            "encode(convert_to(session_user, 'UTF8'), 'hex')"
        )
        self._expect_ready(_Pending(_Kind.CATALOG, swallow=True))
        return m.Query(sql).encode()

    # -- client -> server ------------------------------------------------------------------

    def client_frame(self, frame: Frame) -> bytes:
        """Bytes to send upstream for one client message (may raise NeedKeys)."""
        t = frame.type
        if t == 0x63 or t == 0x66:  # CopyDone, CopyFail
            self.copy_ends_sent += 1
        copy_in = self.copy_in
        if copy_in is not None:
            if t in (0x64, 0x63, 0x66):  # CopyData, Done, Fail
                return self._copy_client(frame, copy_in)
            if (
                t not in (0x53, 0x58)
                and copy_in.entry.kind is _Kind.QUERY
                and not (copy_in.failed or copy_in.server_done)
            ):
                # A COPY of a Query: PostgreSQL would fail it and drop this message, or, if
                # the COPY has not started there, run it: which one is not known yet, and a
                # guess puts the response queue out of step. (After a COPY of an Execute
                # PostgreSQL skips to the Sync, and so does the queue.) Sync is ignored
                # during COPY; Terminate ends the session anyway.
                raise ProtocolViolation(
                    "client", f"unexpected message type 0x{t:02X} during COPY from stdin"
                )
        if self.copy_discarding:
            if t in (0x64, 0x63, 0x66):
                # The stream of a COPY that never started (refused here, or by the server
                # before CopyInResponse), sent without waiting for it: PostgreSQL ignores
                # it, but it must not reach PostgreSQL at all (it may be plaintext).
                return b""
            self.copy_discarding = False
        if self.server_skipping:
            if t != 0x53:
                # PostgreSQL would discard it unread: drop it here (nothing of it goes up,
                # and no answer is owed for it).
                if t == 0x51:
                    self.ignored_syncs += 1
                elif t == 0x50:
                    self._parse_skipped(frame.body)
                return b""
            self.server_skipping = False
        if t == 0x50:  # Parse
            compiled = self._compiled.get(frame.body)
            if compiled is not None and compiled.search_path == self.search_path:
                name = compiled.name
                if not name or name not in self.statements or self._closing(name):
                    self._parse_entry(name, compiled.statement())
                    return compiled.forwarded or frame.raw
            return self._parse(m.decode_parse(frame.body), frame)
        if t == 0x42:  # Bind
            names = m.bind_names(frame.body)
            if names is not None and _REFUSED_STATEMENT not in names:
                statement = self.statements.get(names[1])
                if (
                    statement is not None
                    and statement.plan.kind != "protected"
                    and statement.search_path == self.search_path
                    and names[1] not in self.unconfirmed
                ):
                    # Nothing to seal: forward it without decoding the parameters.
                    self.portals[names[0]] = _Portal(statement, (), None, ())
                    self.pending.append(_Pending(_Kind.BIND))
                    return frame.raw
            return self._bind(m.decode_bind(frame.body), frame)
        if t == 0x44:  # Describe
            d = m.decode_describe(frame.body)
            if d.name == _REFUSED_STATEMENT:
                return self._refuse_reserved()
            if d.kind == "S":
                statement = self.statements.get(d.name)
                wide = statement.wide if statement is not None else None
                before = b""
                if (
                    statement is not None
                    and wide is not None
                    and self._unsure_upstream(statement)
                    and not self._closing(d.name)
                    and not self._known_aborted()
                ):
                    before = self._widen(statement, wide)  # it may be missing (_seal_bind)
                self.pending.append(_Pending(_Kind.DESCRIBE_S, statement=statement))
                return before + frame.raw if before else frame.raw
            else:
                self.pending.append(_Pending(_Kind.DESCRIBE_P, portal=self.portals.get(d.name)))
            return frame.raw
        if t == 0x45:  # Execute
            e = m.decode_execute(frame.body)
            if e.portal == _REFUSED_STATEMENT:
                return self._refuse_reserved()
            portal = self.portals.get(e.portal)
            copy = portal.statement.plan.copy if portal is not None else None
            if copy is not None and copy.direction == "from":
                self._settled()  # before anything: its rows are sealed under the tenant
            if portal is None:
                # A portal whose Bind was refused (or unknown): if it was a COPY FROM
                # STDIN, its stream may follow and must not go up.
                self.copy_discarding = True
            if not self._segment_open:  # the first Execute since a Sync
                self._segment_start()
                self._segment_open = True
            if portal is not None:
                # SET pgseal.tenant, BEGIN, COMMIT... sent through the extended protocol
                # (pipeline mode, drivers that never use the simple one) take effect here.
                self._track_settings((portal.statement.plan,), portal.statement.sql)
            self.pending.append(
                _Pending(
                    _Kind.EXECUTE,
                    portal=portal,
                    tenants=(self.tenant.current,),
                    readers=(self._reader_now(),),
                    copy_ends=self.copy_ends_sent,
                )
            )
            if portal is not None and portal.statement.plan.copy is not None:
                return self._execute_copy(portal.statement, self.pending[-1], frame)
            return frame.raw
        if t == 0x43:  # Close
            c = m.decode_close(frame.body)
            if c.name == _REFUSED_STATEMENT:
                return self._refuse_reserved()
            closed = (self.statements if c.kind == "S" else self.portals).get(c.name)
            self.pending.append(_Pending(_Kind.CLOSE, close_target=(c.kind, c.name), closed=closed))
            return frame.raw
        if t == 0x53:  # Sync
            self.syncs_sent += 1
            self._expect_ready(_Pending(_Kind.SYNC, copy_ends=self.copy_ends_sent))
            self._segment_open = False
            return frame.raw
        if t == 0x51:  # Query
            # PostgreSQL drops the unnamed statement at a Query: a Bind of "" must not find
            # it here either (a switch to its wide form would bring it back).
            self.statements.pop("", None)
            self.unconfirmed.discard("")
            # Behind an Execute with no Sync yet, it runs in (and commits) that segment's
            # transaction: no new segment starts.
            segment_open = self._segment_open
            if not segment_open:
                self._segment_start()
            self._segment_open = False
            try:
                return self._query(m.decode_query(frame.body), frame)
            except NeedKeys:
                self._segment_open = segment_open  # processed again later, as it came
                raise
        if t == 0x46:  # FunctionCall: answered with V + Z
            # Answered with its own ReadyForQuery: it ends (and commits) an open segment.
            if not self._segment_open:
                self._segment_start()
            oid = int.from_bytes(frame.body[:4], "big") if len(frame.body) >= 4 else 0
            if oid not in _LARGE_OBJECT_FUNCTIONS:
                # Any other function may change a setting (set_config('pgseal.tenant', ...)):
                # what the trackers hold is a guess from now on (fail closed).
                for tracker in self._trackers():
                    tracker.unknown_change()
            self._expect_ready(_Pending(_Kind.FUNCTION))
            self._segment_open = False
            return frame.raw
        return frame.raw  # Flush, Terminate, CopyData/Done/Fail: nothing to track

    # Parse -------------------------------------------------------------------------

    def _parse(self, parse: m.Parse, frame: Frame) -> bytes:
        if parse.name == _REFUSED_STATEMENT:
            return self._refuse_reserved()
        if parse.name and parse.name in self.statements and not self._closing(parse.name):
            # PostgreSQL refuses it too; the proxy's record must keep matching the server's.
            return self._refuse_parse(
                parse, "42P05", f'prepared statement "{parse.name}" already exists'
            )
        plans = self._analyze(parse.sql)
        if len(plans) > 1:
            # PostgreSQL refuses several statements in one Parse; let it say so unless any
            # of them is refused by us.
            refused = next((p for p in plans if p.kind == "refused"), None)
            if refused is not None and refused.refusal is not None:
                return self._refuse_parse(parse, refused.refusal.sqlstate, refused.refusal.message)
            if any(p.kind != "passthrough" for p in plans):
                # PostgreSQL would reject it, but log its text (values included) on the way.
                return self._refuse_parse(
                    parse,
                    "42601",
                    "pgseal: cannot insert multiple commands into a prepared "
                    "statement (one of them touches an encrypted column)",
                )
            self._parse_entry(parse.name, None)  # fails upstream: no record
            return frame.raw
        if not plans:  # empty query string
            compiled = self._compile(frame, parse, StatementPlan("passthrough", 0, 0), None)
            self._parse_entry(parse.name, compiled.statement())
            return frame.raw
        plan = plans[0]
        if plan.kind == "refused":
            assert plan.refusal is not None
            return self._refuse_parse(parse, plan.refusal.sqlstate, plan.refusal.message)
        if plan.kind == "passthrough":
            compiled = self._compile(frame, parse, plan, None)
            self._parse_entry(parse.name, compiled.statement())
            return frame.raw
        # Literals are sealed at Bind time, never here: a prepared statement may be bound
        # under another session tenant later (pooled connections), and a literal's tenant
        # may be a parameter. Each literal becomes a parameter of our own after the
        # client's; Bind appends its sealed value and ParameterDescription hides it.
        n_client = parameter_count(parse.sql, len(parse.param_types))
        extra: list[TextEdit] = []
        if plan.copy is not None:
            try:
                extra = self._copy_edits(plan, plans, extended=True)
            except Refused as exc:
                return self._refuse_parse(parse, exc.sqlstate, str(exc))
        forwarded = _forwarded_parse(parse, plan, n_client, extra)
        wide = None
        if plan.copy is None and any(
            t.versions and not t.array for t in plan.params.values()
        ):
            narrow = self._analyze(parse.sql, narrow=True)[0]
            if any(t.narrow for t in narrow.params.values()):
                wide = _WideForm(plan, forwarded, _compile_params(plan))
                plan, forwarded = narrow, _forwarded_parse(parse, narrow, n_client, extra)
        compiled = self._compile(frame, parse, plan, forwarded, n_client, wide)
        self._parse_entry(parse.name, compiled.statement())
        return forwarded

    def _compile(
        self,
        frame: Frame,
        parse: m.Parse,
        plan: StatementPlan,
        forwarded: bytes | None,
        n_client: int = 0,
        wide: _WideForm | None = None,
    ) -> _Compiled:
        """What this Parse became, remembered for the next Parse of the same bytes (unless it
        is too large to keep, or a COPY)."""
        compiled = _Compiled(
            parse.name,
            parse.sql,
            plan,
            parse.param_types,
            self.search_path,
            forwarded,
            n_client=n_client,
            synthetic=plan.literals,
            slots=_compile_params(plan),
            wide=wide,
        )
        if len(frame.body) > _COMPILED_MAX_BYTES or plan.copy is not None or plan.literals:
            # Too large to pin; or a COPY, whose column list may come from the catalog
            # (`_copy_edits`) at the time of its Parse; or a text with constants for
            # protected columns (client-side binding): its plaintexts stay only as long as
            # the statement does.
            return compiled
        if len(self._compiled) >= _COMPILED_LIMIT:
            self._compiled.clear()
        self._compiled[frame.body] = compiled
        return compiled

    def _parse_entry(
        self, name: str, statement: _Statement | None, refusal: bytes | None = None
    ) -> None:
        """Queue a Parse of `name` and record `statement` for it (None: the Parse fails
        upstream). PostgreSQL drops the unnamed statement before parsing a new one; a
        named one is never replaced (see `_parse`), only added after a pending Close."""
        entry = _Pending(
            _Kind.PARSE,
            refusal=refusal,
            statement=statement,
            parsed=name,
            previous=self.statements.get(name),
        )
        if statement is not None:
            self.statements[name] = statement
            self.unconfirmed.discard(name)
        elif not name:
            self.statements.pop(name, None)
            self.unconfirmed.discard(name)
        elif name in self.statements:
            self.unconfirmed.add(name)  # PostgreSQL keeps the old one (42P05 or refused)
        self.pending.append(entry)

    def _parse_skipped(self, body: bytes) -> None:
        """A Parse dropped unread after an error: the statement PostgreSQL holds under its
        name (if any) is not the one the client meant (see `unconfirmed`)."""
        end = body.find(b"\0")
        try:
            name = body[:end].decode() if end >= 0 else None
        except UnicodeDecodeError:
            name = None  # no recorded statement has such a name
        if name is not None and name in self.statements:
            self.unconfirmed.add(name)

    def _closing(self, name: str) -> bool:
        """A Close of the recorded statement `name` is on its way (a re-Parse may follow)."""
        record = self.statements.get(name)
        return any(
            p.kind is _Kind.CLOSE and p.close_target == ("S", name) and p.closed is record
            for p in self.pending
        )

    def _unwind(self, dropped: Sequence[_Pending], failed: _Pending | None) -> None:
        """Entries the server skipped (or `failed`, whose message failed): give each Parse's
        name back the record it replaced, latest first."""
        for entry in reversed(dropped):
            if entry.kind is not _Kind.PARSE or entry.parsed is None:
                continue
            name = entry.parsed
            switched = entry.statement
            if entry.swallow and switched is not None:
                # A _widen Parse skipped, or failed (its Close may have run: in an aborted
                # transaction it does): PostgreSQL holds the narrow form, or nothing.
                switched.switching -= 1
                switched.upstream_form = _UNKNOWN
                continue
            if entry.previous is None or (entry is failed and not name):
                self.statements.pop(name, None)  # a failed unnamed Parse dropped the old one
                self.unconfirmed.discard(name)
            else:
                self.statements[name] = entry.previous
                self.unconfirmed.add(name)

    def _refuse_parse(self, parse: m.Parse, sqlstate: str, message: str) -> bytes:
        # A named statement keeps its record (PostgreSQL keeps it when a Parse fails); the
        # unnamed one is dropped upstream by the failing Parse too.
        self._parse_entry(parse.name, None, _error(sqlstate, message))
        self._audit_deny(parse.sql, message)
        return m.Parse(parse.name, _REFUSED_SQL, ()).encode()

    def _refuse_reserved(self) -> bytes:
        """A client message naming the proxy's own substitute statement or portal."""
        message = f'pgseal: the name "{_REFUSED_STATEMENT}" is reserved by the proxy'
        self.pending.append(_Pending(_Kind.PARSE, refusal=_error("42939", message)))
        return m.Parse(_REFUSED_STATEMENT, _REFUSED_SQL, ()).encode()

    # Bind --------------------------------------------------------------------------

    def _bind(self, bind: m.Bind, frame: Frame) -> bytes:
        if _REFUSED_STATEMENT in (bind.portal, bind.statement):
            self.portals.pop(bind.portal, None)
            return self._refuse_reserved()
        if bind.statement in self.unconfirmed:
            return self._refuse_bind(
                bind,
                "26000",
                f'pgseal: prepared statement "{bind.statement}" was not replaced by the last '
                "Parse of that name (refused, or skipped after an error); prepare it again",
            )
        statement = self.statements.get(bind.statement)
        if statement is None:
            # Never forward a Bind the proxy cannot vouch for: what the server holds under
            # that name is unknown to it (it may be a protected statement).
            return self._refuse_bind(
                bind,
                "26000",
                f'pgseal: prepared statement "{bind.statement}" is not known '
                "to the proxy; prepare it again",
            )
        if statement.search_path != self.search_path:
            # PostgreSQL re-analyses the statement under the new search_path.
            plans = (
                self._analyze(statement.sql, narrow=statement.wide is not None)
                if statement.sql.strip()
                else [statement.plan]
            )
            if len(plans) != 1 or not _same_plan(plans[0], statement.plan):
                self._audit_deny(statement.sql, "search_path changed since Parse")
                return self._refuse_bind(
                    bind,
                    "0A000",
                    "pgseal: statement prepared under another search_path; prepare it again",
                )
        if statement.plan.kind != "protected":
            self.portals[bind.portal] = _Portal(statement, bind.result_formats, None, ())
            self.pending.append(_Pending(_Kind.BIND))
            return frame.raw
        plan = statement.plan
        if len(bind.params) != statement.n_client:
            # PostgreSQL refuses it too, but only once the values have reached it: a value
            # past the statement's parameters would go up as the client sent it. (A client
            # that meant a newer statement, whose Parse was refused or skipped, sends one.)
            message = (
                f"bind message supplies {len(bind.params)} parameters, but prepared "
                f'statement "{bind.statement}" requires {statement.n_client}'
            )
            self._audit_deny(statement.sql, message)
            return self._refuse_bind(bind, "08P01", message)
        # No value to seal (a protected statement only for its result): the client's Bind
        # goes out as it came.
        seals = bool(statement.slots or statement.synthetic)
        sent_formats = frame_formats = bind.result_formats
        if plan.hidden_outputs and len(sent_formats) == len(plan.outputs) - plan.hidden_outputs:
            # One format per column the client sees: the hidden row tenant columns it
            # never sees come back as text (see _openers).
            sent_formats = (*sent_formats, *(0 for _ in range(plan.hidden_outputs)))
            bind = m.Bind(
                bind.portal, bind.statement, bind.param_formats, bind.params, sent_formats
            )
        wide = statement.wide
        switch = False  # the Bind must follow a switch to the wide form (_widen)
        params: tuple[bytes | None, ...] = bind.params
        formats: tuple[int, ...] = ()
        notes: list[AuditNote] = []
        try:
            self._check_key_service()
            if seals:
                params, formats, notes, switch = self._seal_bind(bind, statement)
            if switch and self._closing(statement.name):
                raise Refused(
                    "26000", f'pgseal: prepared statement "{statement.name}" is being closed'
                )
        except Refused as exc:
            self._audit_deny(statement.sql, str(exc))
            return self._refuse_bind(bind, exc.sqlstate, str(exc))
        openers: tuple[_Opener, ...] | None
        try:
            if plan.outputs_exact or statement.fields is not None:
                openers = statement.openers_by_formats.get(bind.result_formats)
                if openers is None:
                    fields = statement.fields
                    targets = (
                        plan.outputs if plan.outputs_exact else self._resolve(plan, fields or ())
                    )
                    n_formats = len(bind.result_formats)
                    if n_formats > 1 and n_formats != len(targets):
                        raise Refused(
                            "08P01",
                            f"bind message has {n_formats} result formats but query has "
                            f"{len(targets) - plan.hidden_outputs} columns",
                        )
                    result_formats = [bind.result_format(i) for i in range(len(targets))]
                    openers = self._openers(
                        targets, result_formats, fields, statement.field_oids, bind, statement
                    )
                    if not any(o.target.tenant.kind == "param" for o in openers):
                        if len(statement.openers_by_formats) >= _COMPILED_VARIANTS:
                            statement.openers_by_formats.clear()
                        statement.openers_by_formats[bind.result_formats] = openers
            else:
                openers = None
        except Refused as exc:
            self._audit_deny(statement.sql, str(exc))
            return self._refuse_bind(bind, exc.sqlstate, str(exc))
        self.audit.extend(notes)
        before = self._widen(statement, wide) if switch and wide is not None else b""
        portal = _Portal(statement, bind.result_formats, self.tenant.current, openers, bind)
        self.portals[bind.portal] = portal
        self.pending.append(_Pending(_Kind.BIND))
        if seals:
            out = before + m.encode_bind(
                bind.portal, bind.statement, formats, params, sent_formats
            )
        elif sent_formats is not frame_formats:
            out = bind.encode()
        else:
            out = frame.raw
        if openers is None and plan.has_protected_outputs:
            # Which result columns are cells depends on the live table (`*`): ask for the
            # portal's RowDescription ourselves and keep the answer to ourselves.
            self.pending.append(_Pending(_Kind.DESCRIBE_P, swallow=True, portal=portal))
            out += m.Describe("P", bind.portal).encode()
        return out

    def _seal_bind(
        self, bind: m.Bind, statement: _Statement
    ) -> tuple[tuple[bytes | None, ...], tuple[int, ...], list[AuditNote], bool]:
        """_seal_params in the form PostgreSQL will hold when the Bind arrives, and whether
        the Bind must be preceded by a switch to the wide form (_widen)."""
        # The narrow form only where PostgreSQL surely holds it: the client's Parse, and no
        # switch since (see _unsure_upstream).
        sure_narrow = statement.upstream_form == _NARROW and not statement.switching
        params, formats, notes, wide = self._seal_params(bind, statement, sure_narrow)
        switch = (
            wide
            and statement.wide is not None
            and (sure_narrow or self._unsure_upstream(statement))
            and not self._known_aborted()
        )
        return params, formats, notes, switch

    def _known_aborted(self) -> bool:
        """Whether the next message surely runs in a failed transaction block, where
        PostgreSQL refuses a Bind (25P02) before reading its values, but would run a
        switch's Close and fail its Parse, leaving nothing under the statement's name."""
        return self.ready_status == "E" and self._segments_in_flight() == 0

    def _unsure_upstream(self, statement: _Statement) -> bool:
        """Whether what PostgreSQL holds under `statement`'s name is not known for sure
        (a message for it must then follow a switch of its own): a switch still on its way
        may be skipped (an error ahead of it), and a failed one may have left no statement
        at all. A message is sure of the form it meets right behind its own switch, or
        behind one in its own segment (if that one fails or is skipped, so is the message:
        PostgreSQL skips to the Sync)."""
        if not statement.switching and statement.upstream_form != _UNKNOWN:
            return False  # the client's Parse, or an answered switch, and nothing since
        return statement.switched_at != self.syncs_sent

    def _widen(self, statement: _Statement, wide: _WideForm) -> bytes:
        """The messages that put `statement`'s wide form upstream right before a Bind sealed
        for it: a Close (a named statement cannot be parsed over; closing a missing one is
        no error) and a Parse of the same name, answered to the proxy alone (an error goes
        to the client: its Bind is skipped with it). The portals PostgreSQL made from the
        narrow form keep their plans. The answer sets upstream_form (server_frame,
        _unwind). Later Parses of the same text go wide at once (the compiled entry
        changes), so a connection switches a statement about once."""
        out = b""
        if statement.name:
            self.pending.append(_Pending(_Kind.CLOSE, swallow=True))
            out = m.Close("S", statement.name).encode()
        self.pending.append(
            _Pending(_Kind.PARSE, swallow=True, statement=statement, parsed=statement.name)
        )
        statement.switching += 1
        statement.switched_at = self.syncs_sent
        compiled = statement.compiled
        if compiled is not None and compiled.wide is wide:
            compiled.plan, compiled.slots, compiled.forwarded = wide.plan, wide.slots, wide.parse
            compiled.wide = None
        return out + wide.parse

    def _refuse_bind(self, bind: m.Bind, sqlstate: str, message: str) -> bytes:
        # The portal is not (re)created: forget an older one of that name, so a following
        # Execute is never taken for it (its SET re-applied, its openers used).
        self.portals.pop(bind.portal, None)
        self.pending.append(_Pending(_Kind.BIND, refusal=_error(sqlstate, message)))
        return m.Bind(bind.portal, _REFUSED_STATEMENT, (), (), ()).encode()

    def _seal_params(
        self, bind: m.Bind, statement: _Statement, narrow_ok: bool
    ) -> tuple[tuple[bytes | None, ...], tuple[int, ...], list[AuditNote], bool]:
        """The Bind's values with the protected ones sealed (their formats now binary), the
        audit notes, and whether they are sealed for the statement's wide form: its narrow
        parameters (one cell each) are sealed as the wide form's bytea[] of every live
        version when `narrow_ok` is False or a narrow value's tenant has more than one."""
        values = list(bind.params)
        n_values = len(values)
        param_formats = bind.param_formats
        formats = (
            list(param_formats)
            if len(param_formats) == n_values
            else [param_formats[0] if param_formats else 0] * n_values
        )
        # 1. The tenant of each value (once per tenant source), and how many values each
        #    tenant's keys seal: one key lookup per tenant, counted once per value.
        tenant_of_group: dict[int, str] = {}
        to_seal: list[tuple[_ParamSlot, str, bytes]] = []
        uses: dict[tuple[str, bool], int] = {}
        narrow_nulls: list[int] = []
        for slot in statement.slots:
            target = slot.target
            if slot.position >= n_values:
                raise Refused("08P01", f"pgseal: Bind has no value for ${target.index}")
            raw = values[slot.position]
            if raw is None:
                if target.narrow:
                    narrow_nulls.append(slot.position)  # NULL, or {NULL} if sealed wide
                elif target.versions and not target.array:
                    values[slot.position] = _bytea_array([None])  # compares as NULL does
                formats[slot.position] = 1
                continue
            tenant = tenant_of_group.get(slot.group)
            if tenant is None:
                tenant = self._value_tenant(
                    target.tenant, target.column.table_key, bind, statement, slot.use
                )
                tenant_of_group[slot.group] = tenant
            to_seal.append((slot, tenant, raw))
            # A narrow value takes the tenant's live versions: one cell if there is one.
            wanted = (tenant, target.versions or target.narrow)
            uses[wanted] = uses.get(wanted, 0) + 1
        # 2. The keys (a miss: NeedKeys after the rest is checked).
        keys_of: dict[tuple[str, bool], Sequence[CellKey]] = {}
        need: set[str] = set()
        for (tenant, versions), n in uses.items():
            keys = self._sealing_keys(tenant, versions, n)
            if keys is None:
                need.add(tenant)
            else:
                keys_of[(tenant, versions)] = keys
        # The wide form when a narrow value's tenant has several live versions: its keys
        # are already those the wide form seals with (no key is used twice).
        wide = not narrow_ok or (
            statement.wide is not None
            and any(
                len(keys_of.get((tenant, True), ())) > 1
                for slot, tenant, _ in to_seal
                if slot.target.narrow
            )
        )
        if wide:
            for position in narrow_nulls:
                values[position] = _bytea_array([None])
        # 3. Seal.
        session = self.session_format
        sealed: dict[tuple[str, int, str], tuple[set[str], list[int]]] = {}
        for slot, tenant, raw in to_seal:
            target = slot.target
            keys = keys_of.get((tenant, target.versions or target.narrow))
            if keys is None:
                continue
            position = slot.position
            client_type = (
                statement.client_param_types[position]
                if position < len(statement.client_param_types)
                else 0
            )
            fmt = formats[position]
            column = slot.column
            if target.array:
                elements = _array_elements(raw, fmt, target.policy.type, client_type)
                canonicals = [
                    None if e is None else self._canonical(target, e, efmt, client_type, session)
                    for e, efmt in elements
                ]
                # Each element under every live key version: a search finds old cells too.
                cells = [
                    c
                    for canonical in canonicals
                    for c in (
                        [None]
                        if canonical is None
                        else [k.seal(column, canonical, deterministic=True) for k in keys]
                    )
                ]
                values[position] = _bytea_array(cells)
                count = sum(1 for c in canonicals if c is not None)
            elif target.versions or (wide and target.narrow):
                canonical = self._canonical(target, raw, fmt, client_type, session)
                values[position] = _bytea_array(
                    [k.seal(column, canonical, deterministic=True) for k in keys]
                )
                count = 1
            else:
                canonical = self._canonical(target, raw, fmt, client_type, session)
                values[position] = keys[0].seal(
                    column, canonical, deterministic=target.policy.searchable
                )
                count = 1
            formats[position] = 1
            for key in keys:
                entry = sealed.get((tenant, key.key_id, slot.table))
                if entry is None:
                    entry = sealed[(tenant, key.key_id, slot.table)] = (set(), [0])
                entry[0].add(target.column.column)
                entry[1][0] += count
        for literal in statement.synthetic:
            sealed_cells = self._seal_literal(literal, bind, statement, need, sealed)
            if sealed_cells is None:
                continue
            values.append(_bytea_array(sealed_cells) if literal.versions else sealed_cells[0])
            formats.append(1)
        if need:
            raise NeedKeys(tenants=frozenset(need))
        notes = [
            AuditNote(
                "data.encrypt",
                tenant,
                key_id,
                table,
                tuple(sorted(cols)),
                n[0],
                _statement_fingerprint(statement),
            )
            for (tenant, key_id, table), (cols, n) in sealed.items()
        ]
        return tuple(values), tuple(formats), notes, wide

    def _seal_literal(
        self,
        literal: LiteralTarget,
        bind: m.Bind | None,
        statement: _Statement | None,
        need: set[str],
        sealed: dict[tuple[str, int, str], tuple[set[str], list[int]]],
    ) -> list[bytes] | None:
        """A constant's cells, one per key (every live version for a compared value),
        counted in `sealed` for the audit record; None (its tenant added to `need`) when
        the keys are not in memory. `bind`/`statement`: a prepared literal's execution."""
        tenant = self._value_tenant(
            literal.tenant,
            literal.column.table_key,
            bind,
            statement,
            "write" if literal.use == "store" else "read",
        )
        keys = self._sealing_keys(tenant, literal.versions)
        if keys is None:
            need.add(tenant)
            return None
        canonical = self._canonical(
            literal, literal.value.encode("utf-8"), 0, 0, self.session_format
        )
        deterministic = literal.policy.searchable or literal.use == "compare"
        column = str(literal.column)
        cells = [k.seal(column, canonical, deterministic=deterministic) for k in keys]
        for key in keys:
            slot = sealed.setdefault(
                (tenant, key.key_id, _table_name(literal.column.table_key)), (set(), [0])
            )
            slot[0].add(literal.column.column)
            slot[1][0] += 1
        return cells

    def _sealing_keys(
        self, tenant: str, versions: bool, uses: int = 1
    ) -> Sequence[CellKey] | None:
        """The keys `uses` values are sealed with: the tenant's active key, or for compared
        values every live version, the active one first. None: not all in memory
        (NeedKeys)."""
        if versions:
            return self.keys.versions(tenant, uses)
        key = self.keys.current(tenant, uses)
        return None if key is None else (key,)

    def _canonical(
        self,
        target: ParamTarget | LiteralTarget,
        raw: bytes,
        fmt: int,
        client_type: int,
        session: SessionFormat,
    ) -> bytes:
        type_name = target.policy.type
        try:
            if fmt == 1 and client_type not in (0, TYPE_INFO[type_name].oid):
                # The client sent another type's binary form (int8 for an int4 column...):
                # read it as that type, then as text in the column's type.
                other = OID_TO_TYPE.get(client_type)
                if other is None:
                    raise Refused(
                        "0A000",
                        f"pgseal: parameter for {target.column} sent as binary of "
                        f"type OID {client_type}; send it as {type_name} or as text",
                    )
                text = from_canonical(other, to_canonical(other, raw, 1, session), 0, session)
                return to_canonical(type_name, text, 0, session)
            return to_canonical(type_name, raw, fmt, session)
        except ValueFormatError as exc:
            raise without_context(
                Refused(exc.sqlstate, f"pgseal: {exc} (column {target.column})")
            ) from None

    def _value_tenant(
        self,
        source: TenantSource,
        table: TableKey,
        bind: m.Bind | None,
        statement: _Statement | None,
        use: str,
    ) -> str:
        """The tenant whose key seals a value, after the isolation rules."""
        policy = self._policy(table)
        session = self._session_tenant()
        row: str | None
        if policy.tenant_from_session or source.kind in ("session", "cell", "output"):
            row = session
        elif source.kind == "literal":
            row = source.value
        else:
            assert source.param is not None
            row = self._param_text(bind, statement, source.param) if bind is not None else None
        if row is None:
            raise Refused(
                "42501",
                f"pgseal: no tenant for {policy.qualified_name}: "
                "SET pgseal.tenant first (or give the row's tenant column)",
            )
        if policy.isolation == "strict" and row != session:
            if session is None:
                raise Refused(
                    "42501",
                    f"pgseal: {policy.qualified_name} needs a session tenant "
                    "(SET pgseal.tenant) under strict isolation",
                )
            if use == "write" or not self._role_may(self._cross_tenant):
                raise Refused(
                    "42501",
                    f"pgseal: tenant of the row differs from the session tenant "
                    f"on {policy.qualified_name}",
                )
        return row

    def _session_tenant(self) -> str | None:
        """The session tenant a value is sealed under (refused while uncertain)."""
        self._settled()
        if self.tenant.uncertain:
            raise Refused(
                "42501",
                "pgseal: the session tenant is uncertain after an error in a "
                "pipelined SET; SET pgseal.tenant again",
            )
        return self.tenant.current

    def _settled(self) -> None:
        """Before a value is sealed under the session tenant (and, for a search of another
        tenant, the role): wait (NeedAnswers) while a segment sent before this statement
        is unanswered and could, by failing, leave PostgreSQL running it under another
        tenant or role than the trackers took (a write sealed for the tenant of a SET that
        PostgreSQL then refused). The error then mostly comes with nothing sent behind it,
        and the trackers know what PostgreSQL kept, or else say uncertain, which refuses
        (TenantTracker.error). Within its own segment nothing can change it: PostgreSQL
        skips the rest of a segment after an error."""
        for tracker in (self.tenant, self.role_setting):
            if tracker.in_flight_may_change():
                if any(p.kind in _ENDS_WITH_READY for p in self.pending):
                    raise NeedAnswers
                # No answer is owed, yet the tracker waits for one: never wait for nothing,
                # and never guess (refused as under an uncertain value).
                tracker.unknown_change()

    def _param_text(
        self, bind: m.Bind | None, statement: _Statement | None, index: int
    ) -> str | None:
        assert bind is not None and statement is not None
        if index > len(bind.params):
            return None
        raw = bind.params[index - 1]
        if raw is None:
            return None
        fmt = bind.param_format(index - 1)
        client_type = (
            statement.client_param_types[index - 1]
            if index <= len(statement.client_param_types)
            else 0
        )
        if fmt == 0 or client_type in TEXT_OIDS:
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                raise without_context(
                    Refused("22021", "pgseal: tenant value is not UTF-8")
                ) from None
        type_name = OID_TO_TYPE.get(client_type)
        if type_name is None:
            raise Refused(
                "0A000", f"pgseal: tenant parameter ${index} of type OID {client_type} in binary"
            )
        try:
            text = from_canonical(
                type_name,
                to_canonical(type_name, raw, 1, self.session_format),
                0,
                self.session_format,
            )
        except ValueFormatError as exc:
            raise without_context(
                Refused(exc.sqlstate, f"pgseal: tenant parameter ${index}: {exc}")
            ) from None
        return text.decode()

    def _check_key_service(self) -> None:
        failure = self.keys.failure()
        if failure is not None:
            raise Refused(failure.sqlstate, str(failure))

    # Query and literals -------------------------------------------------------------

    def _query(self, query: m.Query, frame: Frame) -> bytes:
        plans = self._analyze(query.sql)
        refused = next((p for p in plans if p.kind == "refused"), None)
        if refused is not None:
            assert refused.refusal is not None
            return self._refuse_query(query.sql, refused.refusal.sqlstate, refused.refusal.message)
        if all(p.kind == "passthrough" for p in plans):
            self._track_settings(plans, query.sql)
            self._expect_ready(_Pending(_Kind.QUERY, plans=tuple(plans), sql=query.sql))
            return frame.raw
        # Settings apply statement by statement (`SET pgseal.tenant = 'a'; INSERT ...; SET
        # ...`): undo them if the Query is not sent now (refused, or waiting for keys).
        saved = ([t.snapshot() for t in self._trackers()], self.search_path, self.role)
        tenants: list[str | None] = []
        readers: list[_Reader] = []
        try:
            self._check_key_service()
            sql = self._sealed_sql(query.sql, plans, tenants, readers)
        except Refused as exc:
            self._restore(saved)
            return self._refuse_query(query.sql, exc.sqlstate, str(exc))
        except NeedKeys:
            self._restore(saved)
            raise
        self._expect_ready(
            _Pending(
                _Kind.QUERY,
                plans=tuple(plans),
                sql=query.sql,
                tenants=tuple(tenants),
                readers=tuple(readers),
            )
        )
        for plan, tenant in zip(plans, tenants, strict=True):
            self._arm_copy(plan, tenant, self.pending[-1], query.sql)
        return m.Query(sql).encode()

    def _refuse_query(self, sql: str, sqlstate: str, message: str) -> bytes:
        self._audit_deny(sql, message)
        self.copy_discarding = True  # a refused COPY FROM STDIN's stream may follow
        self._expect_ready(_Pending(_Kind.QUERY, refusal=_error(sqlstate, message), sql=sql))
        return m.Query(_REFUSED_SQL).encode()

    def _sealed_sql(
        self,
        sql: str,
        plans: Sequence[StatementPlan],
        tenants: list[str | None],
        readers: list[_Reader],
    ) -> str:
        """The Query text with its literals sealed; applies each statement's settings
        before the next statement and appends the tenant each one runs under to `tenants`,
        and who reads it to `readers`."""
        edits: list[TextEdit] = []
        need: set[str] = set()
        sealed: dict[tuple[str, int, str], tuple[set[str], list[int]]] = {}
        conforming = self.parameters.get("standard_conforming_strings", "on") == "on"
        for plan in plans:
            self._track_settings((plan,), sql)
            if plan.copy is not None and plan.copy.direction == "from":
                self._settled()  # its rows are sealed under the tenant now
            tenants.append(self.tenant.current)
            readers.append(self._reader_now())
            edits.extend(plan.edits)
            edits.extend(self._copy_edits(plan, plans))
            for literal in plan.literals:
                cells = self._seal_literal(literal, None, None, need, sealed)
                if cells is None:
                    continue
                texts = [
                    f"'\\x{cell.hex()}'::bytea" if conforming else f"E'\\\\x{cell.hex()}'::bytea"
                    for cell in cells
                ]
                text = f"ARRAY[{', '.join(texts)}]" if literal.versions else texts[0]
                edits.append(literal.edit(text))
        if need:
            raise NeedKeys(tenants=frozenset(need))
        for (tenant, key_id, table), (cols, n) in sealed.items():
            self.audit.append(
                AuditNote(
                    "data.encrypt",
                    tenant,
                    key_id,
                    table,
                    tuple(sorted(cols)),
                    n[0],
                    fingerprint(sql),
                )
            )
        return apply_edits(sql, edits) if edits else sql

    def _trackers(self) -> tuple[TenantTracker, ...]:
        """Every tracker of the session, the role last (taken at each statement, Sync
        and answer: built once, again only when the catalog answer replaces some)."""
        return self._all_trackers

    def _tracker_tuple(self) -> tuple[TenantTracker, ...]:
        return (self.tenant, *self.output_settings.values(), self.role_setting)

    @property
    def role(self) -> str:
        """The current role as the proxy tracks it (SET ROLE applied as sent)."""
        return self.role_setting.current or self.info.user

    def _reader_now(self) -> _Reader:
        """Who reads a result sent now (see _Pending.readers)."""
        return _Reader(self.role, self.role_setting.uncertain, self.tenant.uncertain)

    def _role_may(self, allowed: Callable[[str], bool], reader: _Reader | None = None) -> bool:
        """Whether the session holds a privilege (cross-tenant read, decrypt), for a
        result read by `reader` (None: a statement sent now).

        Fail closed: the proxy applies SET ROLE as sent, before the server has
        accepted it (it may fail with permission denied, or be rolled back), so
        the session gets a privilege only if BOTH the login user and the tracked
        role have it, and never while the tracked role is uncertain. SET ROLE can
        narrow the login user's privileges, never widen them. A result is judged by
        the role its statement ran under (the reader's, made uncertain by an error
        ahead of it: _distrust_later_readers), not by what was sent behind it.
        """
        if not allowed(self.info.user):
            return False
        if reader is None:
            reader = self._reader_now()
        if reader.role_uncertain:
            return allowed("") and allowed(" pgseal-unknown-role ")
        return allowed(reader.role)

    def _restore(self, saved: tuple[list[TrackerSnapshot], tuple[str, ...], str]) -> None:
        for tracker, state in zip(self._trackers(), saved[0], strict=True):
            tracker.restore(state)
        self.search_path = saved[1]  # the role is one of the trackers

    def _segment_start(self) -> None:
        """A Query, or the first Execute since a Sync: outside a block PostgreSQL runs it
        (up to the Sync) as one transaction; see TenantTracker.segment_start."""
        for tracker in self._trackers():
            tracker.segment_start()

    def _track_settings(self, plans: Sequence[StatementPlan], sql: str) -> None:
        """Apply what the statements change in the session (as sent; see tenant.py)."""
        for plan in plans:
            command = plan.command
            if command in ("BEGIN", "START"):
                for tracker in self._trackers():
                    tracker.begin()
            elif command in ("COMMIT", "END") or (
                command == "PREPARE" and _PREPARE_TRANSACTION_RE.match(sql, plan.start)
            ):
                # PREPARE TRANSACTION ends the block keeping its settings, as COMMIT does.
                chain = _AND_CHAIN_RE.search(sql, plan.start, plan.end) is not None
                for tracker in self._trackers():
                    tracker.commit(chain=chain)
            elif command in ("ROLLBACK", "ABORT", "SAVEPOINT", "RELEASE"):
                self._track_block_end_or_savepoint(command, sql[plan.start : plan.end])
            elif command in ("SET", "RESET"):
                self._track_output_setting(sql[plan.start : plan.end])
            elif command in ("DEALLOCATE", "DISCARD"):
                self._forget_statements(sql[plan.start : plan.end])
            for setting in plan.session_settings:
                if setting.name == "pgseal.tenant":
                    value = setting.value if setting.action == "set" else None
                    assert value is None or isinstance(value, str)
                    self.tenant.set(value, local=setting.local)
                elif setting.name == "search_path" and not setting.local:
                    if setting.action == "set" and isinstance(setting.value, tuple):
                        self.search_path = tuple(
                            self.role if s == "$user" else s for s in setting.value
                        )
                    else:
                        self.search_path = ("public",)
                elif setting.name in ("all", "discard_all"):
                    # role is GUC_NO_RESET_ALL: RESET ALL keeps it; DISCARD ALL resets the
                    # session authorization, and the role with it.
                    if setting.name == "discard_all":
                        for tracker in self._trackers():
                            tracker.discard_all()  # it also commits at once
                    else:
                        for tracker in (self.tenant, *self.output_settings.values()):
                            tracker.reset_all()
                    self.search_path = ("public",)
                elif setting.name in ("role", "session_authorization"):
                    self._track_role(setting)
            if self.observer is not None:
                self.observer.statement_tracked(sql[plan.start : plan.end])

    def _track_role(self, setting: SessionSetting) -> None:
        """SET ROLE / SET SESSION AUTHORIZATION, as PostgreSQL's current_user follows them:
        SET ROLE x is x; SET ROLE NONE the session user; RESET ROLE the connection-time role
        if the session started with one, else the session user; SET SESSION AUTHORIZATION x
        makes x the session and the current user. After a SET SESSION AUTHORIZATION the
        session user is not followed (a ROLLBACK may undo it): what depends on it, and the
        role after RESET SESSION AUTHORIZATION, is uncertain (fail closed: no privilege)."""
        role, local = self.role_setting, setting.local
        value = setting.value if isinstance(setting.value, str) else None
        if setting.name == "session_authorization":
            self.session_user = None
            if value is None:
                role.unknown_change()
            else:
                role.set(value, local=local)
        elif value is not None:
            role.set(value, local=local)  # SET ROLE x
        elif setting.action == "reset" and self._startup_role:
            role.set(None, local=local)  # RESET ROLE: the connection-time role
        elif self.session_user is None:
            role.unknown_change()
        else:  # SET ROLE NONE, or RESET ROLE without a connection-time role
            role.set(self.session_user, local=local)

    def _track_block_end_or_savepoint(self, command: str, text: str) -> None:
        """ROLLBACK / ABORT end the block; SAVEPOINT, ROLLBACK TO and RELEASE move within it
        (ROLLBACK TO undoes the SETs since the savepoint, as PostgreSQL does)."""
        trackers = self._trackers()
        try:
            found = None if command == "ABORT" else parse_savepoint_statement(command, text)
        except SavepointStatementError:
            for tracker in trackers:  # it may have undone a SET: fail closed
                tracker.unknown_savepoint()
            return
        chain = found is None and _AND_CHAIN_RE.search(text) is not None
        for tracker in trackers:
            if found is None:
                tracker.rollback(chain=chain)
            elif found[0] == "savepoint":
                tracker.savepoint(found[1])
            elif found[0] == "release":
                tracker.release(found[1])
            else:
                tracker.rollback_to(found[1])

    def _forget_statements(self, text: str) -> None:
        """SQL-level DEALLOCATE / DISCARD drop protocol-level statements too. Dropped at send
        time: if PostgreSQL refuses it, a later Bind of the name is refused as unknown
        (fail closed) rather than forwarded unexamined."""
        words = text.replace('"', " ").split()
        upper = [w.upper() for w in words]
        if upper[:2] in (["DISCARD", "ALL"], ["DEALLOCATE", "ALL"], ["DEALLOCATE", "PREPARE"]) and (
            upper[-1] == "ALL"
        ):
            self.statements = {k: v for k, v in self.statements.items() if k == ""}
            self.unconfirmed &= {""}  # a dropped name is unknown now: refused as such
            if upper[0] == "DISCARD":
                self.portals.clear()
            return
        if upper[:1] == ["DEALLOCATE"] and len(words) >= 2:
            name = words[-1]
            quoted = '"' in text
            name = name if quoted else fold_identifier(name)
            self.statements.pop(name, None)
            self.unconfirmed.discard(name)

    def _track_output_setting(self, text: str) -> None:
        match = _OUTPUT_SETTING_RE.fullmatch(text)
        if match is None:
            return
        scope, name, quoted, bare, reset = match.groups()
        if reset is not None:
            self.output_settings[reset.lower()].set(None)
            return
        value = quoted if quoted is not None else bare
        if bare is not None and bare.lower() == "default":
            value = None
        self.output_settings[name.lower()].set(value, local=(scope or "").upper() == "LOCAL")

    # -- server -> client ------------------------------------------------------------------

    def server_frame(self, frame: Frame) -> bytes:
        """Bytes to send to the client for one server message (may raise NeedKeys)."""
        t = frame.type
        pending = self.pending
        head = pending[0] if pending else None
        if t == 0x44:  # DataRow
            if head is None:
                return frame.raw
            if head.failed:
                return b""
            if head.kind is _Kind.CATALOG:
                self._catalog_row(frame, head.result_index)
                return b""
            return self._data_row(frame, head)
        if t in (0x4E, 0x41, 0x53, 0x4B):  # Notice, Notification, ParameterStatus, BackendKeyData
            return frame.raw
        if head is None:
            return frame.raw  # nothing outstanding: pass (e.g. FATAL at shutdown)
        if t in _COPY_SERVER_TYPES:
            return self._copy_server(frame, head)
        if (self.copy_in is not None or self.copy_out is not None) and t in (0x45, 0x43, 0x5A):
            self._copy_statement_end(t, head)
        if t == 0x45:  # ErrorResponse
            return self._error(frame, head)
        if t == 0x5A:  # ReadyForQuery
            return self._ready(frame, head)
        out = b"" if head.swallow or head.failed else frame.raw
        if t == 0x31:  # ParseComplete
            parsed = self._pop(_Kind.PARSE)
            switched = parsed.statement
            if parsed.swallow and switched is not None:  # a _widen Parse
                switched.switching -= 1
                switched.upstream_form = _WIDE
        elif t == 0x32:  # BindComplete
            self._pop(_Kind.BIND)
        elif t == 0x33:  # CloseComplete
            entry = self._pop(_Kind.CLOSE)
            if entry.close_target is not None:
                kind, name = entry.close_target
                records: dict[str, _Statement] | dict[str, _Portal] = (
                    self.statements if kind == "S" else self.portals
                )
                if entry.closed is not None and records.get(name) is entry.closed:
                    records.pop(name, None)  # not a newer record made after the Close
                    if kind == "S":
                        self.unconfirmed.discard(name)
                for p in self.pending:  # the closed record is gone upstream: never restore it
                    if p.previous is not None and p.previous is entry.closed:
                        p.previous = None
        elif t == 0x74:  # ParameterDescription
            if head.kind is _Kind.DESCRIBE_S and head.statement is not None:
                out = self._parameter_description(frame, head.statement)
        elif t == 0x54:  # RowDescription
            described = self._row_description(frame, head)
            out = b"" if head.swallow or head.failed else described
        elif t == 0x6E:  # NoData
            if head.kind in (_Kind.DESCRIBE_S, _Kind.DESCRIBE_P):
                pending.popleft()
        elif t in (0x43, 0x49):  # CommandComplete, EmptyQueryResponse
            self._result_done(head)
        elif t == 0x73:  # PortalSuspended
            self._result_done(head)
        return out

    def rows_need_looking_at(self) -> bool:
        """Whether the DataRows coming next must go through server_frame (else they pass
        as undecoded slices): only for results with cells to open, our own catalog
        query, or a result being dropped after an error."""
        if not self.pending:
            return False
        head = self.pending[0]
        if head.failed or head.kind is _Kind.CATALOG:
            return True
        if head.kind is _Kind.QUERY:
            return bool(head.openers)
        if head.kind is _Kind.EXECUTE:
            portal = head.portal
            return portal is not None and portal.openers != ()
        return False

    def _pop(self, kind: _Kind) -> _Pending:
        entry = self.pending.popleft()
        if entry.kind is not kind:  # the server answered something not asked (or not yet)
            raise ProtocolViolation(
                "server", f"protocol out of step: expected {kind.value}, got {entry.kind.value}"
            )
        return entry

    def _error(self, frame: Frame, head: _Pending) -> bytes:
        out = head.refusal if head.refusal is not None else frame.raw
        if head.failed or (head.swallow and head.kind not in (_Kind.PARSE, _Kind.CLOSE)):
            # (The error of a _widen Close or Parse is the client's: its Bind is skipped.)
            out = b""
        skipped = 0
        if head.kind not in (_Kind.QUERY, _Kind.CATALOG, _Kind.FUNCTION):
            # PostgreSQL skips to the Sync: a Query or FunctionCall sent before it gets no
            # ReadyForQuery (nor does the session count one for it).
            for entry in self.pending:
                if entry.kind is _Kind.SYNC:
                    break
                if entry.kind in (_Kind.QUERY, _Kind.FUNCTION):
                    skipped += 1
            self.ignored_syncs += skipped
        later = self._segments_in_flight() - skipped > 1
        behind_in_doubt = []
        for tracker in self._trackers():
            for _ in range(skipped):
                tracker.segment_skipped()
            if tracker.error(later_segments_sent=later):
                behind_in_doubt.append(tracker)
        if head.kind is _Kind.CATALOG:
            self.startup_failure = m.decode_error_response(frame.body).message or "an error"
        if head.kind in (_Kind.QUERY, _Kind.CATALOG, _Kind.FUNCTION):
            head.failed = head.kind is _Kind.CATALOG or head.failed
            head.refusal = None
            if head.kind is _Kind.QUERY:
                head.openers = ()
            self._distrust_later_readers(behind_in_doubt)
            return out
        # Extended protocol: the server skips to Sync, so do we; until the client sends one
        # if it has not yet.
        dropped = []
        while self.pending and self.pending[0].kind is not _Kind.SYNC:
            dropped.append(self.pending.popleft())
        self._unwind(dropped, head)
        self._distrust_later_readers(behind_in_doubt)
        self.server_skipping = not self.pending
        return out

    def _distrust_later_readers(self, in_doubt: Sequence[TenantTracker]) -> None:
        """The results sent behind a segment that failed took the role and tenant as if it
        had worked (a SET ROLE or SET pgseal.tenant in it, a COMMIT PostgreSQL turned into
        a ROLLBACK...). Where the error puts that in doubt (TenantTracker.error), they are
        judged as under an uncertain role or tenant (see _role_may, _read_denial); what was
        sent behind them does not count (rows are judged by the state their statement ran
        under). A COPY FROM STDIN, whose rows are sealed as they come, is not armed behind
        a segment whose failure would matter: it waits (_settled)."""
        if self.observer is not None:
            self.observer.readers_distrusted(in_doubt)
        role = self.role_setting in in_doubt
        tenant = self.tenant in in_doubt
        if not (role or tenant):
            return
        for entry in self.pending:
            entry.readers = tuple(
                _Reader(r.role, r.role_uncertain or role, r.tenant_uncertain or tenant)
                for r in entry.readers
            )

    def _ready(self, frame: Frame, head: _Pending) -> bytes:
        if head.kind not in _ENDS_WITH_READY:
            # Entries the server never answered (an error skipped them): drop them.
            dropped = []
            while self.pending and self.pending[0].kind not in _ENDS_WITH_READY:
                dropped.append(self.pending.popleft())
            self._unwind(dropped, None)
            if not self.pending:
                return frame.raw
            head = self.pending[0]
        self.pending.popleft()
        self._flush_opened(head)
        status = chr(frame.body[0]) if frame.body else "I"
        last = self._segments_in_flight() == 0
        if last:
            self.ready_status = status
        for tracker in self._trackers():
            tracker.ready(status, last=last)
        if head.kind is _Kind.CATALOG:
            self.table_oids = dict(self._catalog_rows)
            self._compiled.clear()
            ready, self._startup_ready = self._startup_ready, None
            self.catalog_pending = False
            if head.failed or head.result_index != 2:  # its two SELECTs, each answered
                self.startup_failure = self.startup_failure or "no answer"
                return b""
            return ready or b""
        if status == "I":
            self.portals.clear()  # portals do not outlive their transaction
        return frame.raw

    def _expect_ready(self, entry: _Pending) -> None:
        """Queue an entry PostgreSQL answers with a ReadyForQuery (every such entry comes
        through here: the trackers pair each ReadyForQuery with what was sent before it)."""
        self.pending.append(entry)
        for tracker in self._trackers():
            tracker.segment_end()

    def _segments_in_flight(self) -> int:
        """Segments sent and not yet answered; an Execute sent since the last Sync counts
        (the segment it opened is in flight, its Sync yet to come)."""
        open_segment = 1 if self._segment_open else 0
        return open_segment + sum(1 for p in self.pending if p.kind in _ENDS_WITH_READY)

    def _catalog_row(self, frame: Frame, result: int) -> None:
        row = m.data_row_values(frame.body)
        if result == 0 and len(row) == 4 and all(v is not None for v in row):
            oid, schema, table, columns = (v.decode() for v in row if v is not None)
            self._catalog_rows.append((int(oid), (schema, table)))
            # For a COPY without a column list (see _copy_columns).
            self.table_columns[(schema, table)] = tuple(
                c.decode() for c in _parse_text_array(columns) if c is not None
            )
        elif (
            result == 1
            and len(row) == 5
            # only the tenant (row[3]) may be NULL; spelled out, not `None in (...)`,
            # which mypyc cannot compile
            and not any(row[i] is None for i in (0, 1, 2, 4))
        ):
            # The session as PostgreSQL starts it (startup options, role and database
            # defaults such as ALTER ROLE ... SET role): also what RESET goes back to.
            # No client statement has been looked at yet (catalog_query).
            settings, (role, tenant, session_user) = row[:2], row[2:]
            for name, value in zip(_OUTPUT_SETTINGS, settings, strict=True):
                assert value is not None
                self.output_settings[name] = TenantTracker(value.decode())
            assert role is not None and session_user is not None
            try:  # each sent as its UTF-8 bytes in hex (catalog_query)
                role_name, session_name = _from_hex(role), _from_hex(session_user)
                tenant_name = _from_hex(tenant) if tenant else None
            except ValueError:  # UnicodeDecodeError included
                self.startup_failure = "an unexpected answer"
                return
            # The role in effect, which `options=-c role=...` narrows from the login user.
            self.role_setting = TenantTracker(role_name)
            self.session_user = session_name
            self._startup_role = role_name != session_name
            self.tenant = TenantTracker(tenant_name or None)
            self._all_trackers = self._tracker_tuple()
        else:
            self.startup_failure = "an unexpected answer"

    def _parameter_description(self, frame: Frame, statement: _Statement) -> bytes:
        plan = statement.plan
        if plan.kind != "protected" or not (plan.params or statement.synthetic):
            return frame.raw
        oids = list(m.decode_parameter_description(frame.body).type_oids)[: statement.n_client]
        for index, target in plan.params.items():
            if index <= len(oids):
                info = TYPE_INFO[target.policy.type]
                oids[index - 1] = info.array_oid if target.array else info.oid
        return m.ParameterDescription(tuple(oids)).encode()

    def _fields(self, rd: m.RowDescription) -> tuple[tuple[str, TableKey | None], ...]:
        return tuple((f.name, self.table_oids.get(f.table_oid)) for f in rd.fields)

    def _row_description(self, frame: Frame, head: _Pending) -> bytes:
        if _plain_result(head):
            if head.kind in (_Kind.DESCRIBE_S, _Kind.DESCRIBE_P):
                self.pending.popleft()
            elif head.kind is _Kind.QUERY:
                head.openers = ()
            return frame.raw
        if head.kind is _Kind.DESCRIBE_P and head.portal is not None:
            portal = head.portal
            compiled = portal.statement.compiled
            described = compiled.described.get(frame.body) if compiled is not None else None
            if described is not None:
                # The same statement described the same way before: same answer.
                self.pending.popleft()
                portal.openers = (
                    described.openers
                    if described.openers is not None
                    else self._openers_described(
                        described.targets, described.rd, described.fields, portal.bind,
                        portal.statement,
                    )
                )
                return described.out
        rd = m.decode_row_description(frame.body)
        fields = self._fields(rd)
        targets: tuple[OutputTarget | None, ...]
        if head.kind is _Kind.DESCRIBE_S:
            statement = head.statement
            self.pending.popleft()
            if statement is None or statement.plan.kind != "protected":
                return frame.raw
            plan = statement.plan
            statement.fields = fields
            statement.field_oids = tuple(f.type_oid for f in rd.fields)
            statement.openers_by_formats = {}  # openers now follow these fields
            targets = self._resolve(statement.plan, fields)
        elif head.kind is _Kind.DESCRIBE_P:
            described_portal = head.portal
            self.pending.popleft()
            if described_portal is None or described_portal.statement.plan.kind != "protected":
                return frame.raw
            portal = described_portal
            targets = self._resolve(portal.statement.plan, fields)
            portal.openers = self._openers_described(
                targets, rd, fields, portal.bind, portal.statement
            )
            out = self._described_fields(frame, rd, targets, portal.statement.plan)
            compiled = portal.statement.compiled
            if compiled is not None:
                if len(compiled.described) >= _COMPILED_VARIANTS:
                    compiled.described.clear()
                param_tenant = any(o.target.tenant.kind == "param" for o in portal.openers)
                compiled.described[frame.body] = _Described(
                    out, rd, fields, targets, None if param_tenant else portal.openers
                )
            return out
        elif head.kind is _Kind.QUERY:
            if head.result_index >= len(head.plans):
                head.openers = ()
                return frame.raw
            plan = head.plans[head.result_index]
            if plan.kind != "protected":
                head.openers = ()
                return frame.raw
            targets = self._resolve(plan, fields)
            head.openers = self._openers_described(targets, rd, fields, None, None)
        else:
            return frame.raw
        return self._described_fields(frame, rd, targets, plan)

    def _described_fields(
        self,
        frame: Frame,
        rd: m.RowDescription,
        targets: Sequence[OutputTarget | None],
        plan: StatementPlan,
    ) -> bytes:
        """The RowDescription the client gets: the declared type of each sealed column, and
        not the row tenant columns the proxy added (StatementPlan.hidden_outputs)."""
        hidden = _hidden_fields(plan, len(rd.fields))
        if not hidden and not any(t is not None for t in targets):
            return frame.raw
        new_fields = []
        shown = len(rd.fields) - hidden
        for f, target in zip(rd.fields[:shown], targets[:shown], strict=True):
            if target is None:
                new_fields.append(f)
                continue
            info = TYPE_INFO[target.policy.type]
            new_fields.append(
                m.FieldDescription(
                    f.name, f.table_oid, f.column_attnum, info.oid, info.typlen, -1, f.format
                )
            )
        return m.RowDescription(tuple(new_fields)).encode()

    def _resolve(
        self, plan: StatementPlan, fields: Sequence[tuple[str, TableKey | None]]
    ) -> tuple[OutputTarget | None, ...]:
        try:
            return resolve_outputs(plan, fields)
        except ValueError:
            # The result does not have the shape the plan describes: never guess which
            # column holds cells; they stay sealed for the client.
            return tuple(None for _ in fields)

    def _openers_described(
        self,
        targets: Sequence[OutputTarget | None],
        rd: m.RowDescription,
        fields: Sequence[tuple[str, TableKey | None]],
        bind: m.Bind | None,
        statement: _Statement | None,
    ) -> tuple[_Opener, ...]:
        formats = [f.format for f in rd.fields]
        oids = [f.type_oid for f in rd.fields]
        try:
            return self._openers(targets, formats, fields, oids, bind, statement)
        except Refused:
            # A pinned tenant parameter that cannot be read: the cells stay unchecked
            # against it, the isolation checks on the cell's own tenant still apply.
            return self._openers(targets, formats, fields, oids, None, None)

    def _openers(
        self,
        targets: Sequence[OutputTarget | None],
        formats: Sequence[int],
        fields: Sequence[tuple[str, TableKey | None]] | None,
        oids: Sequence[int],
        bind: m.Bind | None,
        statement: _Statement | None,
    ) -> tuple[_Opener, ...]:
        """Openers for the result columns that hold cells, each with where its row's
        tenant can be read (see `_Opener`). May raise Refused (a bad tenant parameter)."""
        openers = []
        for i, target in enumerate(targets):
            if target is None or i >= len(formats):
                continue
            opener = _Opener(
                i, target, formats[i], str(target.column), _table_name(target.column.table_key)
            )
            source = target.tenant
            if source.kind == "output":
                at = source.output
                if at is None and fields is not None and source.column is not None:
                    wanted = (source.column.column, source.column.table_key)
                    at = next((k for k, f in enumerate(fields) if f == wanted), None)
                if at is not None and at < len(formats):
                    opener.tenant_index = at
                    opener.tenant_fmt = formats[at]
                    opener.tenant_oid = oids[at] if at < len(oids) else 0
            elif source.kind == "literal":
                opener.tenant_value = source.value
            elif source.kind == "param" and bind is not None and statement is not None:
                assert source.param is not None
                opener.tenant_value = self._param_text(bind, statement, source.param)
            openers.append(opener)
        return tuple(openers)

    def _result_done(self, head: _Pending) -> None:
        if head.kind is _Kind.CATALOG:
            head.result_index += 1
        elif head.kind is _Kind.EXECUTE:
            self.pending.popleft()
            self._flush_opened(head)
        elif head.kind is _Kind.QUERY:
            head.result_index += 1
            head.openers = ()
            self._flush_opened(head)

    # DataRow ---------------------------------------------------------------------------

    def _data_row(self, frame: Frame, head: _Pending) -> bytes:
        if head.kind is _Kind.EXECUTE:
            portal = head.portal
            openers = portal.openers if portal is not None else ()
            if openers is None:  # pragma: no cover - the injected Describe answered first
                openers = ()
            session_tenant, reader = self._read_by(head, 0)
            plan = portal.statement.plan if portal is not None else None
        elif head.kind is _Kind.QUERY:
            openers = head.openers
            session_tenant, reader = self._read_by(head, head.result_index)
            plan = head.plans[head.result_index] if head.result_index < len(head.plans) else None
        else:
            return frame.raw
        if not openers:
            # (A plan with hidden row tenant columns has openers whenever its result has
            # the shape that lets them be dropped: see _hidden_fields.)
            return frame.raw
        failure = self.keys.failure()  # e.g. the audit sink is down: open nothing
        if failure is not None:
            return self._fail_result(head, failure.sqlstate, str(failure))
        row: list[bytes | None] = list(m.data_row_values(frame.body))
        # 1. The cells and the keys they name (one lookup per key, counted per cell).
        cells: list[tuple[_Opener, bytes, int]] = []
        uses: dict[int, int] = {}
        for opener in openers:
            if opener.index >= len(row):
                continue
            value = row[opener.index]
            if value is None:
                continue
            try:
                cell = _cell_bytes(value, opener.fmt)
                key_id = cell_key_id(cell)
            except CellError:
                return self._fail_result(
                    head,
                    "XX001",
                    f"pgseal: {opener.target.column} holds a value that is not a pgseal cell",
                )
            cells.append((opener, cell, key_id))
            uses[key_id] = uses.get(key_id, 0) + 1
        keys: dict[int, CellKey | None] = {}
        need: set[int] = set()  # not in memory: fetched after the rules ran on the rest
        for key_id, n in uses.items():
            key = keys[key_id] = self.keys.by_id(key_id, n)
            if key is None and self.keys.destroyed(key_id) is None:
                need.add(key_id)
        # 2. The rules, then open. A row refused by a cell whose key is at hand is refused
        #    before any other tenant's key is fetched for it.
        opened: list[tuple[int, bytes | None]] = []
        counted: list[tuple[tuple[str, int, str], str]] = []
        denials: list[AuditNote] = []
        readable: set[tuple[TableKey, str]] = set()  # (table, tenant) the rules allow
        session = self.session_format
        for opener, cell, key_id in cells:
            if key_id in need:
                continue
            target = opener.target
            key = keys[key_id]
            if key is None:
                shredded = self.keys.destroyed(key_id)
                assert shredded is not None
                # Crypto-shredded: never openable again; on_denied says NULL or an error.
                # The tenant and role rules come first: a reader who could not see this
                # cell anyway learns nothing about its tenant's keys.
                rule = self._read_denial(target, shredded, session_tenant, reader)
                gone = rule or (
                    f"pgseal: a cell of {target.column} cannot be opened: "
                    f"data key {key_id} of tenant {shredded!r} was destroyed "
                    "(crypto-shredded)"
                )
                sqlstate = "42501" if rule else "58030"
                denial: tuple[str, str, str, int] | None = (sqlstate, gone, shredded, key_id)
            else:
                allowed = (target.column.table_key, key.tenant)
                reason = None
                if allowed not in readable:
                    reason = self._read_denial(target, key.tenant, session_tenant, reader)
                    if reason is None:
                        readable.add(allowed)
                if reason is None:
                    reason = self._row_tenant_denial(opener, row, key)
                denial = None if reason is None else ("42501", reason, key.tenant, key.key_id)
            if denial is not None:
                sqlstate, message, tenant, denied_key = denial
                table = self._policy(target.column.table_key)
                denials.append(
                    AuditNote(
                        "data.deny",
                        tenant,
                        denied_key,
                        table.qualified_name,
                        (target.column.column,),
                        1,
                        self._result_fingerprint(head),
                        outcome="denied",
                        error=message,
                    )
                )
                if table.on_denied == "null":
                    opened.append((opener.index, None))
                    continue
                self.audit.extend(denials)
                return self._fail_result(head, sqlstate, message)
            assert key is not None
            try:
                canonical = key.open(opener.column, cell)
                plain = from_canonical(target.policy.type, canonical, opener.fmt, session)
            except CellError:
                return self._fail_result(
                    head,
                    "XX001",
                    f"pgseal: a cell of {target.column} cannot be "
                    "opened (moved from another row, tenant or column, or corrupted)",
                )
            except ValueFormatError as exc:
                return self._fail_result(
                    head, exc.sqlstate, f"pgseal: {exc} (column {target.column})"
                )
            opened.append((opener.index, plain))
            counted.append(((key.tenant, key.key_id, opener.table), target.column.column))
        if need:
            raise NeedKeys(key_ids=frozenset(need))
        # Only now that the whole row is done: a NeedKeys retry must not count twice.
        self.audit.extend(denials)
        if counted:
            totals = head.opened
            if totals is None:
                totals = head.opened = {}
            for slot_key, column in counted:
                slot = totals.get(slot_key)
                if slot is None:
                    slot = totals[slot_key] = (set(), [0])
                slot[0].add(column)
                slot[1][0] += 1
        for index, value_out in opened:
            row[index] = value_out
        if plan is not None:
            hidden = _hidden_fields(plan, len(row))
            if hidden:
                del row[-hidden:]
        return m.encode_data_row(row)


    def _row_tenant_denial(
        self, opener: _Opener, row: Sequence[bytes | None], key: CellKey
    ) -> str | None:
        """A cell whose key is another tenant's than its row's: copied there with SQL."""
        if opener.tenant_index is not None:
            raw = row[opener.tenant_index] if opener.tenant_index < len(row) else None
            expected = None if raw is None else self._field_text(raw, opener)
        elif opener.tenant_value is not None:
            expected = opener.tenant_value
        else:
            return None  # only the cell's own key names its tenant (see TenantSource 'cell')
        if expected == key.tenant:
            return None
        return (
            f"pgseal: a cell of {opener.target.column} belongs to another tenant than "
            "its row (copied from another row?)"
        )

    def _field_text(self, raw: bytes, opener: _Opener) -> str | None:
        """The row tenant column's value as text (None: it cannot be read)."""
        oid = opener.tenant_oid
        try:
            if opener.tenant_fmt == 0 or oid in TEXT_OIDS:
                return raw.decode("utf-8")
            type_name = OID_TO_TYPE.get(oid)
            if type_name is None:
                return None
            session = self.session_format
            return from_canonical(
                type_name, to_canonical(type_name, raw, 1, session), 0, session
            ).decode("utf-8")
        except (UnicodeDecodeError, ValueFormatError):
            return None

    def _cross_tenant(self, role: str) -> bool:
        return role in self.policies.cross_tenant_roles

    def _read_by(self, head: _Pending, at: int) -> tuple[str | None, _Reader]:
        """The session tenant and reader of a result (Execute: 0; Query: its index), as
        when its statement was sent."""
        tenant = head.tenants[at] if at < len(head.tenants) else self.tenant.current
        reader = head.readers[at] if at < len(head.readers) else self._reader_now()
        return tenant, reader

    def _read_denial(
        self, target: OutputTarget, tenant: str, session: str | None, reader: _Reader
    ) -> str | None:
        """Why a cell of `tenant` may not be opened for a result read by `reader` under
        session tenant `session` (both the result's: _read_by, as when its statement was
        sent, or uncertain after an error ahead of it; not what was sent behind it)."""
        table = self._policy(target.column.table_key)
        if not self._role_may(table.may_decrypt, reader):
            return f"pgseal: role {reader.role} may not read {target.column} in plaintext"
        if table.isolation == "trusted":
            return None
        if reader.tenant_uncertain:
            return "pgseal: the session tenant is uncertain; SET pgseal.tenant again"
        if session is None:
            if self._role_may(self._cross_tenant, reader):
                return None
            return f"pgseal: reading {target.column} needs a session tenant (SET pgseal.tenant)"
        if tenant != session and not self._role_may(self._cross_tenant, reader):
            return f"pgseal: {target.column} of another tenant is not readable in this session"
        return None

    def _fail_result(self, head: _Pending, sqlstate: str, message: str) -> bytes:
        """An error in the middle of a result: tell the client, drop the rest of it."""
        head.failed = True
        return _error(sqlstate, message)

    def _result_fingerprint(self, head: _Pending) -> str:
        """The audit fingerprint of the statement a result belongs to, once per result (a
        denied cell per row must not run the regexes over the text each time)."""
        found = head.fingerprint
        if found is None:
            if head.sql:
                found = fingerprint(head.sql)
            elif head.portal is not None:
                found = _statement_fingerprint(head.portal.statement)
            else:
                found = ""
            head.fingerprint = found
        return found

    def _flush_opened(self, head: _Pending) -> None:
        if not head.opened:
            return
        statement = self._result_fingerprint(head)
        for (tenant, key_id, table), (cols, n) in head.opened.items():
            self.audit.append(
                AuditNote(
                    "data.decrypt", tenant, key_id, table, tuple(sorted(cols)), n[0], statement
                )
            )
        head.opened = None

    def _audit_deny(self, sql: str, message: str) -> None:
        self.audit.append(
            AuditNote(
                "data.deny",
                self.tenant.current if not self.tenant.uncertain else None,
                None,
                None,
                (),
                0,
                fingerprint(sql),
                outcome="denied",
                error=message,
            )
        )

    def take_audit(self) -> list[AuditNote]:
        notes = self.audit
        self.audit = []
        return notes

    def refuse_for_key_failure(self, frame: Frame, error: PgsealError) -> bytes:
        """The keys a client frame needed could not be had: refuse that frame in order."""
        sqlstate = error.sqlstate
        message = f"pgseal: {error}"
        t = frame.type
        if t == 0x50:
            parse = m.decode_parse(frame.body)
            return self._refuse_parse(parse, sqlstate, message)
        if t == 0x42:
            return self._refuse_bind(m.decode_bind(frame.body), sqlstate, message)
        if t == 0x51:
            return self._refuse_query(m.decode_query(frame.body).sql, sqlstate, message)
        if t in (0x64, 0x63) and self.copy_in is not None:  # CopyData / CopyDone of a COPY
            return self._copy_in_stop(self.copy_in, CopyStop(sqlstate, message), t)
        raise error  # pragma: no cover - only those need keys

    def fail_server_frame(self, error: PgsealError) -> bytes:
        """The keys to open a DataRow could not be had: end that result with an error."""
        head = self.pending[0]
        return self._fail_result(head, error.sqlstate, f"pgseal: {error}")

    # -- COPY (copystream.py streams the rows) ---------------------------------------------
    #
    # A protected COPY is planned like any statement (proxy/rewrite/copy.py). COPY FROM
    # STDIN: when it is sent, a CopyIn job is armed; the client's CopyData, CopyDone and
    # CopyFail then go through it (the session holds them only while one is armed), are
    # sealed row by row, and a row that breaks the rules fails the COPY upstream
    # (CopyFail) with our error substituted for the server's. COPY TO STDOUT: the
    # server's CopyOutResponse starts a CopyOut job for the statement at the head of the
    # queue; its CopyData are opened until the statement ends.

    def _copy_columns(self, copy: CopyPlan) -> tuple[str, ...]:
        """The COPY's columns: as listed, else the live table's (from the catalog query)."""
        if copy.columns is not None:
            return copy.columns
        assert copy.table is not None
        columns = self.table_columns.get(copy.table)
        if columns is None:
            raise Refused(
                "0A000",
                f"pgseal: COPY of {_table_name(copy.table)} without a column list: the proxy "
                "does not know the table's columns (created after this connection started?); "
                "list them",
            )
        return columns

    def _copy_edits(
        self, plan: StatementPlan, plans: Sequence[StatementPlan], *, extended: bool = False
    ) -> list[TextEdit]:
        """What a protected COPY needs before it is sent: refusals, and an explicit column
        list when it has none (PostgreSQL and the proxy must agree on every field)."""
        copy = plan.copy
        if copy is None:
            return []
        name = _table_name(copy.table) if copy.table is not None else "a protected table"
        if extended and plan.literals:
            raise Refused(
                "0A000",
                f"pgseal: COPY (query) with constants on encrypted columns of {name} needs the "
                "simple query protocol (COPY takes no parameters)",
            )
        encoding = copy.options.encoding or self.session_format.client_encoding
        if not is_utf8_encoding(encoding):
            raise Refused("0A000", f"pgseal: COPY of protected table {name} needs UTF8 data")
        try:
            dialect_of(copy.options)
        except CopyStop as stop:
            raise without_context(
                Refused(stop.sqlstate, f"{stop.message} (COPY of {name})")
            ) from None
        if copy.direction == "from" and not extended:
            self._check_copy_alone(plans, name, None)
        if copy.table is None or copy.columns is not None:
            return []
        listed = ", ".join(_quote_ident(c) for c in self._copy_columns(copy))
        return [TextEdit(copy.columns_at, copy.columns_at, f" ({listed})")]

    def _check_copy_alone(
        self, plans: Sequence[StatementPlan], name: str, entry: _Pending | None
    ) -> None:
        """CopyData messages name no statement: a protected COPY FROM must be the only COPY
        in flight, so that the client's stream can only be its own."""
        in_flight = self.copy_in is not None or sum(1 for p in plans if p.command == "COPY") > 1
        for p in self.pending:
            if p is entry:
                continue
            if p.kind is _Kind.QUERY and any(x.command == "COPY" for x in p.plans):
                in_flight = True
            elif p.kind is _Kind.EXECUTE and p.portal is not None:
                in_flight = in_flight or p.portal.statement.plan.command == "COPY"
        if in_flight:
            raise Refused(
                "0A000",
                f"pgseal: COPY FROM STDIN into {name} must be the only COPY in flight on the "
                "connection (not beside another COPY in one query string or pipeline)",
            )

    def _arm_copy(self, plan: StatementPlan, tenant: str | None, entry: _Pending, sql: str) -> None:
        """A COPY FROM STDIN of a protected table is being sent: its stream comes next."""
        copy = plan.copy
        if copy is None or copy.direction != "from":
            return
        assert copy.table is not None
        job = CopyIn(
            self._policy(copy.table),
            self._copy_columns(copy),
            copy.options,
            self.keys,
            self.session_format,
            tenant,
            tenant_uncertain=self.tenant.uncertain,
        )
        self.copy_in = _CopyInJob(job, entry, sql)

    def _execute_copy(self, statement: _Statement, entry: _Pending, frame: Frame) -> bytes:
        plan = statement.plan
        copy = plan.copy
        if copy is None or copy.direction != "from":
            return frame.raw
        try:
            self._check_copy_alone((plan,), _table_name(copy.table or ("", "")), entry)
            self._arm_copy(plan, self.tenant.current, entry, statement.sql)
        except Refused as exc:
            # Substituted by an Execute that fails at once; our error replaces its own.
            self._audit_deny(statement.sql, str(exc))
            entry.refusal = _error(exc.sqlstate, str(exc))
            return m.Execute(_REFUSED_STATEMENT).encode()
        return frame.raw

    def _copy_client(self, frame: Frame, job: _CopyInJob) -> bytes:
        """CopyData / CopyDone / CopyFail of the armed COPY FROM STDIN."""
        t = frame.type
        if job.failed or job.server_done or t == 0x66:
            # A COPY already over upstream: drop the rest of its stream (never forward it).
            # The client's own CopyFail is forwarded while PostgreSQL still reads.
            if t != 0x64:
                self.copy_in = None
                self._copy_in_done(job)
            return frame.raw if t == 0x66 and not (job.failed or job.server_done) else b""
        try:
            if job.stop is not None:
                raise job.stop
            self._check_key_service()
            data = job.copy.feed(frame.body, final=t == 0x63)
        except MissingKeys as need:
            raise without_context(NeedKeys(tenants=need.tenants, key_ids=need.key_ids)) from None
        except Refused as exc:
            return self._copy_in_stop(job, CopyStop(exc.sqlstate, str(exc)), t)
        except CopyStop as stop:
            return self._copy_in_stop(job, stop, t)
        out = m.CopyData(data).encode() if data else b""
        if t == 0x63:
            self.copy_in = None
            self._copy_in_done(job)
            out += frame.raw
        return out

    def _copy_in_stop(self, job: _CopyInJob, stop: CopyStop, t: int) -> bytes:
        """Fail the whole COPY upstream; the client gets our error in place of the server's."""
        job.failed = True
        if t != 0x64:
            self.copy_in = None
        self._audit_deny(job.sql, stop.message)
        self._copy_in_done(job)
        if any(p is job.entry for p in self.pending):
            job.entry.refusal = _error(stop.sqlstate, stop.message)
        return m.CopyFail(stop.message).encode()

    def _copy_in_done(self, job: _CopyInJob) -> None:
        if job.audited:
            return
        job.audited = True
        for (tenant, key_id, table), (cols, n) in job.copy.sealed.items():
            self.audit.append(
                AuditNote(
                    "data.encrypt",
                    tenant,
                    key_id,
                    table,
                    tuple(sorted(cols)),
                    n[0],
                    fingerprint(job.sql),
                )
            )

    def _copy_server(self, frame: Frame, head: _Pending) -> bytes:
        """CopyInResponse, CopyOutResponse, and the server's CopyData / CopyDone."""
        t = frame.type
        if t == 0x47:  # CopyInResponse (forwarded even in a failed result: the server now
            # waits for the client's stream, which only the client can end)
            self._drop_ignored_syncs(head)
            job = self.copy_in
            if job is not None and job.entry is head:
                job.started = True
                response = m.decode_copy_response(frame.body)
                if response.format != 0 or len(response.column_formats) != len(job.copy.columns):
                    job.stop = CopyStop(
                        "XX000",
                        "pgseal: the server's COPY does not match the statement the proxy read",
                    )
            return frame.raw
        if t == 0x48:  # CopyOutResponse
            if head.failed or head.swallow:
                # A result we already ended with an error: hold its stream, to drop it.
                self.copy_out = _CopyOutJob(None, head, "")
                return b""
            return self._copy_out_start(frame, head)
        if head.failed or head.swallow:
            return b""
        out_job = self.copy_out
        if out_job is None or out_job.copy is None or out_job.entry is not head:
            return frame.raw
        failure = self.keys.failure()  # e.g. the audit sink is down: open nothing
        if failure is not None:
            return self._fail_result(head, failure.sqlstate, str(failure))
        try:
            data = out_job.copy.feed(frame.body, final=t == 0x63)
        except MissingKeys as need:
            raise without_context(NeedKeys(key_ids=need.key_ids)) from None
        except CopyStop as stop:
            self._copy_out_denials(out_job, stop.denials)
            return self._fail_result(head, stop.sqlstate, stop.message)
        self._copy_out_denials(out_job, tuple(out_job.copy.denials))
        out_job.copy.denials.clear()
        out = m.CopyData(data).encode() if data else b""
        return out + frame.raw if t == 0x63 else out

    def _copy_out_start(self, frame: Frame, head: _Pending) -> bytes:
        if head.kind is _Kind.QUERY:
            at = head.result_index
            plan = head.plans[at] if at < len(head.plans) else None
            tenant, reader = self._read_by(head, at)
            sql = head.sql
        elif head.kind is _Kind.EXECUTE and head.portal is not None:
            plan = head.portal.statement.plan
            tenant, reader = self._read_by(head, 0)
            sql = head.portal.statement.sql
        else:
            return frame.raw
        copy = plan.copy if plan is not None else None
        if plan is None or copy is None:
            return frame.raw
        try:
            self._check_key_service()
            targets = (
                plan.outputs
                if copy.table is None or copy.columns is not None
                else copy_targets(self._policy(copy.table), self._copy_columns(copy))
            )
            response = m.decode_copy_response(frame.body)
            if response.format != 0 or len(response.column_formats) != len(targets):
                raise CopyStop(
                    "XX000",
                    "pgseal: the server's COPY stream does not match the statement the proxy "
                    "read; it is not shown",
                )
            job = CopyOut(
                targets,
                copy.options,
                self.keys,
                self.session_format,
                self.policies,
                lambda target, cell_tenant: self._read_denial(target, cell_tenant, tenant, reader),
                _text_cell,
            )
        except Refused as exc:
            return self._fail_result(head, exc.sqlstate, str(exc))
        except CopyStop as stop:
            return self._fail_result(head, stop.sqlstate, stop.message)
        self.copy_out = _CopyOutJob(job, head, sql)
        return frame.raw

    def _copy_out_denials(self, job: _CopyOutJob, denials: Sequence[Denial]) -> None:
        for d in denials:
            self.audit.append(
                AuditNote(
                    "data.deny",
                    d.tenant,
                    d.key_id,
                    d.table,
                    (d.column,),
                    1,
                    job.audit_sql(),
                    outcome="denied",
                    error=d.message,
                )
            )

    def _copy_statement_end(self, t: int, head: _Pending) -> None:
        """Before an ErrorResponse, CommandComplete or ReadyForQuery is handled: let go of
        the COPY whose statement it ends."""
        out_job = self.copy_out
        if out_job is not None and (t == 0x5A or out_job.entry is head):
            self.copy_out = None
            opened = out_job.copy.opened if out_job.copy is not None else {}
            for (tenant, key_id, table), (cols, n) in opened.items():
                self.audit.append(
                    AuditNote(
                        "data.decrypt",
                        tenant,
                        key_id,
                        table,
                        tuple(sorted(cols)),
                        n[0],
                        out_job.audit_sql(),
                    )
                )
        job = self.copy_in
        if job is None or t == 0x43:
            return
        ends = job.entry is head
        if not ends and head.kind not in _ENDS_WITH_READY:
            # An error (or a ReadyForQuery) that drops the entries up to the next Sync.
            for p in self.pending:
                if p.kind in _ENDS_WITH_READY:
                    break
                ends = ends or p is job.entry
        if not ends:
            return
        if job.started:
            job.server_done = True  # the client still ends its stream; nothing more goes up
        else:
            self.copy_in = None  # refused before CopyInResponse: no stream will come
            self.copy_discarding = True  # and what the client sends of it goes nowhere
            self._copy_in_done(job)

    def _drop_ignored_syncs(self, head: _Pending) -> None:
        """PostgreSQL ignores Sync and Flush while it reads COPY data (libpq sends a Sync
        right behind an Execute without knowing it runs a COPY): the Syncs queued behind
        the COPY's Execute get no ReadyForQuery, up to the client's CopyDone or CopyFail
        (a pipelining client may have sent it, and a Sync PostgreSQL answers, already)."""
        if head.kind is not _Kind.EXECUTE:
            return
        pending = self.pending
        while (
            len(pending) > 1
            and pending[1].kind is _Kind.SYNC
            and pending[1].copy_ends == head.copy_ends
        ):
            del pending[1]
            self.ignored_syncs += 1
            for tracker in self._trackers():
                tracker.segment_skipped()  # its queued end pairs with no ReadyForQuery


# --- small pure helpers ------------------------------------------------------------------


def _plain_result(head: _Pending) -> bool:
    """A RowDescription that needs no rewriting: its statement touches no protected column."""
    if head.swallow:
        return False
    if head.kind is _Kind.DESCRIBE_S:
        return head.statement is None or head.statement.plan.kind != "protected"
    if head.kind is _Kind.DESCRIBE_P:
        return head.portal is None or head.portal.statement.plan.kind != "protected"
    if head.kind is _Kind.QUERY:
        index = head.result_index
        return index >= len(head.plans) or head.plans[index].kind != "protected"
    return False


def _forwarded_parse(
    parse: m.Parse, plan: StatementPlan, n_client: int, extra: Sequence[TextEdit]
) -> bytes:
    """The Parse sent upstream for a protected statement: the plan's edits (and `extra`)
    applied, each literal to seal made a parameter after the client's own, every sealed
    parameter declared bytea (bytea[] for a bytea[] of cells)."""
    edits = [*plan.edits, *extra]
    for k, literal in enumerate(plan.literals):
        edits.append(literal.edit(f"${n_client + 1 + k}"))
    sql = apply_edits(parse.sql, edits) if edits else parse.sql
    types = list(parse.param_types) + [0] * (
        n_client + len(plan.literals) - len(parse.param_types)
    )
    for index, target in plan.params.items():
        types[index - 1] = BYTEA_ARRAY_OID if target.array or target.versions else BYTEA_OID
    for k in range(len(plan.literals)):
        types[n_client + k] = BYTEA_ARRAY_OID if plan.literals[k].versions else BYTEA_OID
    return m.Parse(parse.name, sql, tuple(types)).encode()


def _compile_params(plan: StatementPlan) -> tuple[_ParamSlot, ...]:
    """The Bind program of a protected statement: one slot per sealed parameter, in the
    plan's order (which decides which refusal a Bind gets when several apply)."""
    groups: dict[tuple[TenantSource, TableKey, str], int] = {}
    slots = []
    for index, target in plan.params.items():
        use = "write" if target.use == "store" else "read"
        table = target.column.table_key
        group = groups.setdefault((target.tenant, table, use), len(groups))
        slots.append(
            _ParamSlot(index - 1, target, str(target.column), _table_name(table), use, group)
        )
    return tuple(slots)


def _same_plan(new: StatementPlan, old: StatementPlan) -> bool:
    """Whether a re-analysed statement is handled as it was at Parse time."""
    return (
        new.kind,
        new.params,
        new.literals,
        new.outputs,
        new.outputs_exact,
        new.outputs_by_name,
        new.star_tables,
        new.tables,
        new.copy,
        new.edits,
    ) == (
        old.kind,
        old.params,
        old.literals,
        old.outputs,
        old.outputs_exact,
        old.outputs_by_name,
        old.star_tables,
        old.tables,
        old.copy,
        old.edits,
    )


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _table_name(table: TableKey) -> str:
    return f"{table[0]}.{table[1]}"


def _error(sqlstate: str, message: str) -> bytes:
    return m.ErrorResponse.make(sqlstate, message).encode()


def _hidden_fields(plan: StatementPlan, n_fields: int) -> int:
    """How many trailing fields of a result of `plan` with n_fields are the row tenant
    columns the proxy added (none when the result is not the shape the plan describes:
    then nothing is dropped and no cell is opened either, see _resolve)."""
    hidden = plan.hidden_outputs
    return hidden if hidden and plan.outputs_exact and n_fields == len(plan.outputs) else 0


def _from_hex(value: bytes) -> str:
    """A name the catalog query has PostgreSQL send as its UTF-8 bytes in hex (whatever
    the client_encoding). ValueError if it is not that."""
    return bytes.fromhex(value.decode("ascii")).decode("utf-8")


def _cell_bytes(value: bytes, fmt: int) -> bytes:
    """The cell inside a bytea field as PostgreSQL sent it (binary, or text in hex or, with
    bytea_output=escape, in escape format: a backslash there is always doubled)."""
    if fmt == 1:
        return value
    if len(value) < 2 or value[0] != 0x5C or value[1] != 0x78:  # not b"\\x": escape format
        return _unescape_bytea(value)
    try:
        # A slice (one small copy) costs less than a memoryview and its slice object.
        return a2b_hex(value[2:])
    except (binascii.Error, ValueError):
        raise without_context(CellError()) from None


_ESCAPED_BYTE: Final = re.compile(rb"\\(\\|[0-3][0-7]{2})")


def _unescape_bytea(value: bytes) -> bytes:
    """PostgreSQL's escape-format bytea output: `\\\\` and `\\ooo`, other bytes as they are."""
    if b"\\" in _ESCAPED_BYTE.sub(b"", value):
        raise CellError()  # a lone backslash: not bytea output, fail closed
    return _ESCAPED_BYTE.sub(
        lambda e: b"\\" if e.group(1) == b"\\" else bytes((int(e.group(1), 8),)), value
    )


_ONE_I32: Final = _I32.pack(1)
_NULL_I32: Final = _I32.pack(-1)
_BYTEA_ARRAY_HEAD: Final = _ONE_I32 + _I32.pack(0) + _I32.pack(BYTEA_OID)
_BYTEA_ARRAY_HEAD_NULL: Final = _ONE_I32 + _ONE_I32 + _I32.pack(BYTEA_OID)


def _bytea_array(cells: Sequence[bytes | None]) -> bytes:
    """A one-dimensional bytea[] in binary array format."""
    # ndim 1, the has-null flag, the element type; then the length and lower bound 1.
    head = _BYTEA_ARRAY_HEAD_NULL if any(c is None for c in cells) else _BYTEA_ARRAY_HEAD
    parts = [head, _I32.pack(len(cells)), _ONE_I32]
    for c in cells:
        if c is None:
            parts.append(_NULL_I32)
        else:
            parts.append(_I32.pack(len(c)))
            parts.append(c)
    return b"".join(parts)


def _array_elements(
    raw: bytes, fmt: int, type_name: str, client_type: int
) -> list[tuple[bytes | None, int]]:
    """Elements of a one-dimensional array parameter, each with its format code."""
    if fmt == 1:
        try:
            ndim, _flags, _elem = struct.unpack_from("!iiI", raw, 0)
            if ndim == 0:
                return []
            if ndim != 1:
                raise Refused(
                    "0A000", "pgseal: only one-dimensional arrays compare with encrypted columns"
                )
            (count, _lower) = struct.unpack_from("!ii", raw, 12)
            pos = 20
            out: list[tuple[bytes | None, int]] = []
            for _ in range(count):
                (size,) = _I32.unpack_from(raw, pos)
                pos += 4
                if size < 0:
                    out.append((None, 1))
                else:
                    if pos + size > len(raw):
                        raise struct.error  # an element past the end: never a shorter one
                    out.append((raw[pos : pos + size], 1))
                    pos += size
            if pos != len(raw):
                raise struct.error  # PostgreSQL refuses bytes after the last element too
            return out
        except struct.error:
            raise without_context(
                Refused("22P03", "pgseal: malformed binary array parameter")
            ) from None
    try:
        text = raw.decode("utf-8", "strict")
    except UnicodeDecodeError:
        raise without_context(
            Refused(
                "22021", 'pgseal: invalid byte sequence for encoding "UTF8" in an array parameter'
            )
        ) from None
    return [(e, 0) for e in _parse_text_array(text)]


def _parse_text_array(text: str) -> list[bytes | None]:
    """A one-dimensional array literal `{a,"b c",NULL}`."""
    text = text.strip()
    if not (text.startswith("{") and text.endswith("}")):
        raise Refused("22P02", "pgseal: malformed array literal")
    body = text[1:-1]
    out: list[bytes | None] = []
    if not body.strip():
        return out
    i = 0
    n = len(body)
    while i <= n:
        while i < n and body[i].isspace():
            i += 1
        if i < n and body[i] == "{":
            raise Refused(
                "0A000", "pgseal: only one-dimensional arrays compare with encrypted columns"
            )
        if i < n and body[i] == '"':
            i += 1
            buf = []
            while i < n and body[i] != '"':
                if body[i] == "\\" and i + 1 < n:
                    i += 1
                buf.append(body[i])
                i += 1
            if i >= n:
                raise Refused("22P02", "pgseal: malformed array literal")
            i += 1
            out.append("".join(buf).encode())
            while i < n and body[i].isspace():
                i += 1
        else:
            start = i
            while i < n and body[i] != ",":
                i += 1
            item = body[start:i].strip()
            out.append(None if item.upper() == "NULL" else item.encode())
        if i < n and body[i] != ",":
            raise Refused("22P02", "pgseal: malformed array literal")
        i += 1
    return out


# --- COPY jobs -------------------------------------------------------------------------------


@dataclass(slots=True)
class _CopyInJob:
    copy: CopyIn
    entry: _Pending  # the Query / Execute that runs the COPY
    sql: str
    started: bool = False  # CopyInResponse seen
    server_done: bool = False  # PostgreSQL ended the COPY (an error) before the client did
    failed: bool = False  # we failed it (CopyFail sent)
    audited: bool = False
    stop: CopyStop | None = None  # fail at the next message (the server disagrees with us)


@dataclass(slots=True)
class _CopyOutJob:
    copy: CopyOut | None  # None: the stream of a result already failed, dropped
    entry: _Pending
    sql: str
    fingerprint: str | None = None  # of sql, worked out at the first audit note

    def audit_sql(self) -> str:
        if self.fingerprint is None:
            self.fingerprint = fingerprint(self.sql)
        return self.fingerprint


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _text_cell(value: bytes) -> bytes:
    """The cell inside a bytea field's text (COPY streams are always text)."""
    return _cell_bytes(value, 0)

"""Fuzzing the tenant rules of DESIGN.md section 5 (Hypothesis), on the harness of
tests/unit/test_datapath_fuzz.py: cross-tenant readers, strict and trusted isolation,
decrypt_roles, on_denied.

Each example draws a policy (for each of patients, contacts, dossiers and notes: isolation
strict or trusted, on_denied error or null, decrypt_roles absent or one of two lists;
cross_tenant_roles [auditor, inspector]; notes takes its tenant from the session), a login
user, a startup tenant, and a session script judged by a small oracle of its own (never the
proxy's code) under the session state as PostgreSQL has it when each statement runs:

1. `test_a_plaintext_reaches_the_client_iff_the_rules_allow_it`: reads (simple protocol, one
   or several statements a Query; extended, Describe or not, text, binary or per-column
   result formats, named statements executed again under later states; a WHERE naming a
   tenant as a constant or a parameter, or none) of rows of several tenants, which the
   FakeServer seals with each tenant's key, among SET / SET LOCAL / RESET of the tenant and
   the role, RESET ALL, DISCARD ALL, blocks committed or rolled back, savepoints rolled back
   to or released, Queries pipelined (a statement that leaves the tenant or role uncertain
   behind a read in flight included: the read is judged by the state it ran under), and a
   SET sent to fail with a read or a Query pipelined behind it (the tenant or role is then
   uncertain, for the read behind it too). The client gets each cell's
   plaintext if and only if the rules allow it; a denied cell is NULL (on_denied: null), or
   the result stops there with 42501 (error), the rest of its Query dropped; no plaintext
   of a denied cell anywhere in what the client gets.
2. `test_values_are_sealed_under_the_tenant_the_rules_name_or_refused`: writes (INSERT of
   one or several rows naming their tenants as constants or a parameter, NULL included;
   UPDATE naming the tenant or not; notes) and searches of a deterministic column, one
   statement answered at a time, among tenant and role changes, or pipelined behind a SET
   of the tenant or role sent to fail (the proxy holds it until that SET is answered, then
   judges it under the uncertain value PostgreSQL left): each value goes up sealed
   under the key of the tenant the oracle names, or the statement is refused with 42501
   and nothing of it goes up; no sentinel plaintext ever goes upstream.

The oracle's reading of the rules (DESIGN.md section 5, README "Tenants" and "Known limits"):
- a privilege (decrypt_roles, cross_tenant_roles) needs both the login user and the role in
  effect; while the role is uncertain, only what every role has (decrypt_roles absent);
- reads: outside decrypt_roles never; trusted isolation: the row's tenant alone decides (no
  session tenant needed, an uncertain one does not matter); strict: an uncertain session
  tenant refuses, none refuses but for a cross-tenant role (pg_dump of every tenant), a row
  of another tenant needs a cross-tenant role;
- a value sealed for a write or a search needs a certain session tenant (an uncertain one
  refuses the protected statements that seal) and a tenant for its row; strict: a write's
  row tenant must be the session tenant, whatever the role; a search value of another
  tenant than the session's needs a session tenant and a cross-tenant role;
- RESET ALL after a SET LOCAL of the tenant in the block leaves it uncertain (tenant.py).

What the scripts do not do: start a session with a role other than its login user (see
test_a_role_set_at_startup_narrows_what_the_session_may_read); pipeline more than one read
or Query behind a SET sent to fail (the tracker takes the value as uncertain at the error
whatever was sent behind it, a SET included: a rule of tenant.py the oracle does not
model); a second RESET ALL after a SET LOCAL in a session without a startup tenant (see
`setting`).

PGSEAL_FUZZ_EXAMPLES=N multiplies every max_examples by N (the harness's `_fuzz`).
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from proxy.crypto.cells import CellError
from proxy.policy.loader import load_policies
from proxy.policy.model import PolicySet
from proxy.wire import messages as m
from tests.unit.test_datapath_fuzz import (
    FAIL,
    SEALED_COLUMNS,
    SELECT_TABLES,
    FakeServer,
    KeyService,
    Run,
    _assert_no_sentinel,
    _exchange,
    _frames,
    _fuzz,
    _keystore_keys,
    _ring,
    _selected,
    connected,
)

ROLES = ("app", "auditor", "inspector", "pgseal_app", "nobody")
CROSS_TENANT_ROLES = frozenset({"auditor", "inspector"})
DECRYPT_CHOICES: tuple[frozenset[str] | None, ...] = (
    None,
    frozenset({"auditor", "pgseal_app"}),
    frozenset({"app", "inspector", "pgseal_app"}),
)
TENANTS = ("acme", "globex", "newco")  # all in the harness's keystore (newco: fetched)
RULE_TABLES = ("patients", "contacts", "dossiers", "notes")

# The policy's columns of each table (catalog columns as the harness's _catalog lists them).
_COLUMNS = {
    "patients": "ssn: {type: text, search: equality}, name: {type: text}, dob: {type: date}, "
    "balance: {type: numeric}, profile: {type: jsonb}",
    "contacts": "email: {type: text, search: equality}, phone: {type: text}",
    "dossiers": "summary: {type: text}",
    "notes": "body: {type: text}, rating: {type: int4}",
}


# --- the policy ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rules:
    """One table's rules."""

    isolation: str  # strict | trusted
    on_denied: str  # error | null
    decrypt_roles: frozenset[str] | None  # None: every role


Policy = tuple[tuple[str, Rules], ...]  # (table, its rules) for each of RULE_TABLES


def _policy_yaml(policy: Policy) -> str:
    lines = ["version: 1", "cross_tenant_roles: [auditor, inspector]", "tables:"]
    for table, rules in policy:
        tenant = "{session: true}" if table == "notes" else "{column: tenant_id}"
        lines += [
            f"  public.{table}:",
            f"    tenant: {tenant}",
            f"    isolation: {rules.isolation}",
            f'    on_denied: "{rules.on_denied}"',
            f"    columns: {{{_COLUMNS[table]}}}",
        ]
        if rules.decrypt_roles is not None:
            lines.append(f"    decrypt_roles: [{', '.join(sorted(rules.decrypt_roles))}]")
    return "\n".join(lines) + "\n"


@cache
def policy_set(policy: Policy) -> PolicySet:
    """The PolicySet of these rules, loaded from a YAML file as the proxy loads its own."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "policy.yaml"
        path.write_text(_policy_yaml(policy))
        return load_policies([path])


rules_st = st.builds(
    Rules,
    st.sampled_from(["strict", "trusted"]),
    st.sampled_from(["error", "null"]),
    st.sampled_from(DECRYPT_CHOICES),
)
policies_st = st.tuples(*(st.tuples(st.just(t), rules_st) for t in RULE_TABLES))


# --- the session state and the oracle --------------------------------------------------------


@dataclass(frozen=True)
class State:
    """The session as PostgreSQL has it, and whether the proxy can know it (uncertain)."""

    login: str
    startup: str | None  # the startup tenant (options=-c pgseal.tenant=...)
    tenant: str | None
    role: str  # the role in effect (the login user's when none was set)
    tenant_uncertain: bool = False
    role_uncertain: bool = False


def holds(roles: frozenset[str] | None, state: State) -> bool:
    """Whether the session holds a privilege granted to `roles` (None: to every role)."""
    if roles is None:
        return True
    return state.login in roles and not state.role_uncertain and state.role in roles


def may_read(rules: Rules, state: State, row_tenant: str) -> bool:
    """Whether a cell of a row of `row_tenant` may be opened (see the module doc)."""
    if not holds(rules.decrypt_roles, state):
        return False
    if rules.isolation == "trusted":
        return True
    if state.tenant_uncertain:
        return False
    cross = holds(CROSS_TENANT_ROLES, state)
    if state.tenant is None:
        return cross
    return row_tenant == state.tenant or cross


def sealing_tenant(
    rules: Rules, state: State, named: str | None, from_session: bool, write: bool
) -> str | None:
    """The tenant whose key seals a value (None: the statement is refused). `named`: the
    row tenant the statement gives (a constant or parameter; None for NULL), unless the
    value's tenant is the session's (`from_session`)."""
    if state.tenant_uncertain:
        return None
    tenant = state.tenant if from_session else named
    if tenant is None:
        return None
    if rules.isolation == "strict" and tenant != state.tenant:
        if write or state.tenant is None or not holds(CROSS_TENANT_ROLES, state):
            return None
    return tenant


# --- the session as PostgreSQL has it, while a script is drawn -----------------------------------


@dataclass(frozen=True)
class Setting:
    """pgseal.tenant or the role: its value outside a block and for the block (SET LOCAL),
    and whether the proxy can know it (README: a SET LOCAL does not end the doubt)."""

    committed: str | None
    local: str | None = None
    local_set: bool = False
    uncertain: bool = False

    @property
    def value(self) -> str | None:
        return self.local if self.local_set else self.committed

    def set_local(self, value: str | None) -> Setting:
        return replace(self, local=value, local_set=True)

    def block_end(self) -> Setting:
        return replace(self, local=None, local_set=False)


@dataclass
class Model:
    """The session as PostgreSQL runs it, statement by statement (none of which fails but
    a SET sent to fail, on purpose), and what the script prepared."""

    login: str
    startup: str | None
    tenant: Setting
    role: Setting = Setting(None)  # None: no SET ROLE (the login user)
    block: tuple[Setting, Setting] | None = None  # what a ROLLBACK goes back to
    savepoints: list[tuple[str, Setting, Setting]] = field(default_factory=list)
    segment: tuple[Setting, Setting] = (Setting(None), Setting(None))
    statements: dict[str, str] = field(default_factory=dict)  # prepared: name -> SQL
    count: int = 0

    def state(self) -> State:
        return State(
            self.login, self.startup, self.tenant.value, self.role.value or self.login,
            self.tenant.uncertain, self.role.uncertain,
        )

    def next(self) -> int:
        self.count += 1
        return self.count

    def segment_start(self) -> None:
        """A Query or an extended segment: outside a block, one transaction (a BEGIN in it
        makes a block of it, the statements before the BEGIN included)."""
        self.segment = (self.tenant, self.role)

    def run(self, op: str, value: str | None = None) -> None:
        if op == "tenant":
            self.tenant = Setting(value)
        elif op == "tenant_local":
            self.tenant = self.tenant.set_local(value)
        elif op == "reset_tenant":
            self.tenant = Setting(self.startup)
        elif op == "reset_all":  # the role is GUC_NO_RESET_ALL: it stays
            # After a SET LOCAL in the block the proxy does not guess what PostgreSQL's
            # RESET ALL leaves (tenant.py: "does not always win"): uncertain (and a SET
            # LOCAL still in force for a second RESET ALL) until a SET or RESET of it.
            local = self.tenant.local_set
            self.tenant = Setting(self.startup, self.startup if local else None, local, local)
        elif op in ("role", "reset_role"):
            self.role = Setting(value)
        elif op == "role_local":
            self.role = self.role.set_local(value)
        elif op == "discard_all":
            self.tenant, self.role = Setting(self.startup), Setting(None)
            self.statements.clear()  # DISCARD ALL deallocates them
        elif op == "begin":
            self.block = self.segment
            self.savepoints = []
        elif op == "savepoint":
            assert value is not None
            self.savepoints.append((value, self.tenant, self.role))
        elif op in ("rollback_to", "release"):
            # The newest savepoint of that name; ROLLBACK TO keeps it, RELEASE drops it.
            at = max(i for i, (name, _, _) in enumerate(self.savepoints) if name == value)
            if op == "rollback_to":
                _, self.tenant, self.role = self.savepoints[at]
            del self.savepoints[at + (op == "rollback_to") :]
        elif op in ("commit", "rollback"):
            assert self.block is not None
            tenant, role = self.block if op == "rollback" else (self.tenant, self.role)
            self.tenant, self.role, self.block = tenant.block_end(), role.block_end(), None
            self.segment = (self.tenant, self.role)  # the rest of a Query: a new transaction
        else:  # pragma: no cover
            raise AssertionError(op)


CHANGES = ("tenant", "tenant", "reset_tenant", "role", "role", "reset_role")


def setting(draw: st.DrawFn, model: Model, alone: bool, ops: tuple[str, ...] = ()) -> str:
    """A tenant, role or transaction statement valid where the session is (applied to
    `model`), never failing; or, in a block, a few in a row around a savepoint. alone: it
    is sent as a Query of its own (DISCARD ALL may). ops: only one of these."""
    if not ops:
        ops = (*CHANGES, "reset_all")
        if model.block is None:
            ops += ("begin",) * 3 + (("discard_all",) if alone else ())
        else:  # SET LOCAL, savepoints and what they undo, more often
            ops += ("tenant_local", "role_local", "reset_all") * 2
            ops += ("commit", "rollback", "rollback", "savepoint", "scene", "scene", "scene")
            ops += ("rollback_to", "release") if model.savepoints else ()
    if model.tenant.uncertain and model.tenant.local_set and model.tenant.local is None:
        # No second RESET ALL after a SET LOCAL without a startup tenant: the tracker keeps
        # the SET LOCAL "in force" as its startup value, None, the mark of none, and takes
        # the second RESET ALL as settling the tenant (None: the most restrictive value,
        # and what PostgreSQL has there; with a startup tenant it stays uncertain).
        ops = tuple(o for o in ops if o != "reset_all")
    op = draw(st.sampled_from(ops))
    value: str | None = None
    if op == "scene":  # SAVEPOINT s; a change or two; ROLLBACK TO s or RELEASE s
        name = draw(st.sampled_from(["a", "b"]))
        model.run("savepoint", name)
        inside = [f"SAVEPOINT {name}"]
        for _ in range(draw(st.integers(1, 2))):
            changes = (*CHANGES, "tenant_local", "role_local", "reset_all")
            inside.append(setting(draw, model, False, changes))
        end = draw(st.sampled_from(["rollback_to", "rollback_to", "release"]))
        model.run(end, name)
        verb = "ROLLBACK TO SAVEPOINT" if end == "rollback_to" else "RELEASE SAVEPOINT"
        return "; ".join([*inside, f"{verb} {name}"])
    if op == "savepoint":
        value = draw(st.sampled_from(["a", "b"]))
    elif op in ("rollback_to", "release"):
        value = draw(st.sampled_from(sorted({name for name, _, _ in model.savepoints})))
    if op in ("tenant", "tenant_local"):
        value = draw(st.sampled_from(TENANTS))
        verb = "SET LOCAL" if op == "tenant_local" else "SET"
        sql = f"{verb} pgseal.tenant {draw(st.sampled_from(['=', 'TO']))} {_literal(value)}"
    elif op == "reset_tenant":
        sql = draw(st.sampled_from(["RESET pgseal.tenant", "SET pgseal.tenant TO DEFAULT"]))
    elif op in ("role", "role_local"):
        value = draw(st.sampled_from(ROLES))
        sql = f"SET {'LOCAL ' if op == 'role_local' else ''}ROLE {value}"
    elif op == "reset_role":
        sql = draw(st.sampled_from(["RESET ROLE", "SET ROLE NONE"]))
    elif op in ("savepoint", "rollback_to", "release"):
        words = {"savepoint": "SAVEPOINT", "rollback_to": "ROLLBACK TO SAVEPOINT"}
        sql = f"{words.get(op, 'RELEASE SAVEPOINT')} {value}"
    else:
        sql = {"reset_all": "RESET ALL", "discard_all": "DISCARD ALL", "begin": "BEGIN",
               "commit": "COMMIT", "rollback": "ROLLBACK"}[op]
    model.run(op, value)
    return sql


def failing(draw: st.DrawFn, model: Model, tenant: bool) -> bytes:
    """A Query setting the tenant (or the role) that PostgreSQL fails: sent with something
    pipelined behind it, it leaves the proxy unable to know the value (outside a block:
    the value stays what it was, but the proxy applied the SET as sent)."""
    assert model.block is None
    if tenant:
        current = () if model.tenant.uncertain else (model.tenant.value,)
        value = draw(st.sampled_from([t for t in TENANTS if t not in current]))
        model.tenant = replace(model.tenant, uncertain=True)
        sql = f"SET pgseal.tenant = {_literal(value)} {FAIL}"
    else:
        current = () if model.role.uncertain else (model.role.value or model.login,)
        value = draw(st.sampled_from([r for r in ROLES if r not in current]))
        model.role = replace(model.role, uncertain=True)
        sql = f"SET ROLE {value} {FAIL}"
    return m.Query(sql).encode()


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# --- the work ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Read:
    sql: str
    table: str
    columns: tuple[str, ...]  # as the result has them ("*" expanded)
    rows: int  # how many rows the server answers
    state: State  # the session the read runs in
    pinned: str | None = None  # the tenant its WHERE names (the server's rows are its)


@dataclass(frozen=True)
class Value:
    """A value the proxy must seal: its column, plaintext and the tenant its row names."""

    table: str
    column: str
    plaintext: str
    named: str | None = None
    from_session: bool = True


@dataclass
class Unit:
    """Client bytes sent at once and answered before the next unit. `lead`: answers
    (ReadyForQuery) ahead of the work, to a SET sent to fail; `segments`: the reads of
    each segment after them; `values`: a write or search, judged under `state`."""

    data: bytes
    state: State
    lead: int = 0
    segments: tuple[tuple[Read, ...], ...] = ((),)
    values: tuple[Value, ...] = ()
    search: bool = False  # values compared, not written
    bind: tuple[int, ...] | None = None  # extended: the Bind positions of `values`


def _extended(
    parse: tuple[str, str] | None,
    name: str,
    params: tuple[bytes | None, ...] = (),
    param_formats: tuple[int, ...] = (),
    result_formats: tuple[int, ...] = (),
    describe: str = "",
) -> bytes:
    out = b"" if parse is None else m.Parse(*parse).encode()
    if describe == "S":
        out += m.Describe("S", name).encode()
    out += m.Bind("", name, param_formats, params, result_formats).encode()
    if describe == "P":
        out += m.Describe("P", "").encode()
    return out + m.Execute("", 0).encode() + m.SYNC


READ_COLUMNS: dict[str, tuple[tuple[str, ...], ...]] = {
    "patients": (
        ("*",), ("id", "name"), ("tenant_id", "name", "ssn"), ("ssn",), ("id", "tenant_id"),
        ("name", "tenant_id", "dob"),
    ),
    "contacts": (("*",), ("email",), ("phone", "tenant_id"), ("id",), ("email", "phone")),
    "dossiers": (("*",), ("summary",), ("tenant_id", "summary")),
}
_PINNED = re.compile(r"tenant_id = (?:'([a-z]+)'|\$1)")


def read_work(draw: st.DrawFn, model: Model, query: bool) -> tuple[Read, bytes | None]:
    """A read in the session as it is: its SQL for a Query (query=True: then its bytes
    are None), else the bytes of an extended read (Parse, maybe Describe, Bind, Execute,
    Sync; maybe of a statement prepared earlier, its tenant maybe a parameter)."""
    rows = draw(st.integers(1, 3))
    how = "query" if query else draw(
        st.sampled_from(["unnamed", "named", *(["again"] if model.statements else [])])
    )
    pinned = draw(st.sampled_from([None, None, *TENANTS]))
    if how == "again":
        name = draw(st.sampled_from(sorted(model.statements)))
        sql, parse = model.statements[name], None
    else:
        table = draw(st.sampled_from(sorted(READ_COLUMNS)))
        listed = ", ".join(draw(st.sampled_from(READ_COLUMNS[table])))
        where = f"id = {model.next()}"
        if pinned is not None:
            tenant = _literal(pinned) if query or draw(st.booleans()) else "$1"
            where = f"tenant_id = {tenant} AND {where}"
        sql = f"SELECT {listed} FROM {table} WHERE {where}"
        name = "" if how in ("query", "unnamed") else f"s{model.next()}"
        parse = (name, sql)
        if name:
            model.statements[name] = sql
    selected = _selected(sql)
    assert selected is not None
    table, columns = selected
    pin = _PINNED.search(sql)
    params: tuple[bytes, ...] = ()
    if pin is None:
        pinned = None
    elif pin[1] is not None:
        pinned = pin[1]
    else:  # `tenant_id = $1`: bound to a tenant (another one each time, maybe)
        pinned = pinned or draw(st.sampled_from(TENANTS))
        params = (pinned.encode(),)
    read = Read(sql, table, columns, rows, model.state(), pinned)
    if query:
        return read, None
    formats = draw(
        st.one_of(
            st.sampled_from([(), (0,), (1,)]),
            st.lists(st.sampled_from([0, 1]), min_size=len(columns), max_size=len(columns)).map(
                tuple
            ),
        )
    )
    describe = draw(st.sampled_from(["", "P", "S"]))
    return read, _extended(parse, name, params, (), formats, describe)


SEALED_OF = {"patients": ("ssn", "name"), "contacts": ("email", "phone"), "dossiers": ("summary",)}
SEARCHED = {"patients": "ssn", "contacts": "email"}


def write_work(draw: st.DrawFn, model: Model) -> Unit:
    """One INSERT, UPDATE or search (Query with constants, or Parse/Bind/Execute), each
    protected value a sentinel, judged under the session as it is (behind a SET sent to
    fail: as PostgreSQL runs it, with the value the proxy can no longer know)."""
    state = model.state()

    def sentinel() -> str:
        return f"SENTINEL-{model.next()}-{draw(st.binary(min_size=3, max_size=3)).hex()}"

    def tenant() -> str:
        return draw(st.sampled_from(TENANTS))

    form = draw(
        st.sampled_from(
            ["insert", "insert", "insert_params", "insert_tenant_constant", "update",
             "update_params", "notes", "notes_params", "search", "search", "search"]
        )
    )
    table = draw(st.sampled_from(sorted(SEALED_OF)))
    columns = SEALED_OF[table]
    cols = ", ".join(columns)
    n = model.next()
    if form == "insert":
        rows = []
        values: list[Value] = []
        for _ in range(draw(st.integers(1, 3))):
            named = tenant()
            row = [Value(table, c, sentinel(), named, False) for c in columns]
            values += row
            rows.append(f"({_literal(named)}, {', '.join(_literal(v.plaintext) for v in row)})")
        sql = f"INSERT INTO {table} (tenant_id, {cols}) VALUES {', '.join(rows)}"
        return Unit(m.Query(sql).encode(), state, values=tuple(values))
    if form in ("update", "search"):
        if form == "search":
            table = draw(st.sampled_from(sorted(SEARCHED)))
        column = SEARCHED[table] if form == "search" else draw(st.sampled_from(columns))
        value = sentinel()
        named_or_session: str | None = tenant() if draw(st.booleans()) else None
        pin = "" if named_or_session is None else f"tenant_id = {_literal(named_or_session)} AND "
        if form == "search":
            sql = f"SELECT id FROM {table} WHERE {pin}{column} = {_literal(value)}"
        else:
            sql = f"UPDATE {table} SET {column} = {_literal(value)} WHERE {pin}id = {n}"
        found = Value(table, column, value, named_or_session, named_or_session is None)
        return Unit(m.Query(sql).encode(), state, values=(found,), search=form == "search")
    if form == "notes":
        value = sentinel()
        sql = f"INSERT INTO notes (body) VALUES ({_literal(value)})"
        return Unit(m.Query(sql).encode(), state, values=(Value("notes", "body", value),))
    # The extended forms: each protected value a parameter, text or binary (a text
    # column's binary form is its UTF-8), the tenant parameter (if any) in text.
    name = draw(st.sampled_from(["", f"w{n}"]))
    params: list[bytes | None]
    if form == "notes_params":
        value = sentinel()
        sql, params = "INSERT INTO notes (body) VALUES ($1)", [value.encode()]
        found_values = [Value("notes", "body", value)]
        positions: tuple[int, ...] = (0,)
    elif form == "update_params":
        column = draw(st.sampled_from(columns))
        value = sentinel()
        named_or_null = draw(st.sampled_from((*TENANTS, None)))
        sql = f"UPDATE {table} SET {column} = $1 WHERE tenant_id = $2"
        params = [value.encode(), None if named_or_null is None else named_or_null.encode()]
        found_values = [Value(table, column, value, named_or_null, False)]
        positions = (0,)
    elif form == "insert_tenant_constant":
        named = tenant()
        found_values = [Value(table, c, sentinel(), named, False) for c in columns]
        marks = ", ".join(f"${i + 1}" for i in range(len(columns)))
        sql = f"INSERT INTO {table} (tenant_id, {cols}) VALUES ({_literal(named)}, {marks})"
        params = [v.plaintext.encode() for v in found_values]
        positions = tuple(range(len(columns)))
    else:  # insert_params
        named_or_null = draw(st.sampled_from((*TENANTS, None)))
        found_values = [Value(table, c, sentinel(), named_or_null, False) for c in columns]
        marks = ", ".join(f"${i + 2}" for i in range(len(columns)))
        sql = f"INSERT INTO {table} (tenant_id, {cols}) VALUES ($1, {marks})"
        params = [None if named_or_null is None else named_or_null.encode()]
        params += [v.plaintext.encode() for v in found_values]
        positions = tuple(range(1, len(columns) + 1))
    formats = [0] * len(params)
    for i in positions:
        formats[i] = draw(st.sampled_from([0, 1]))
    data = _extended((name, sql), name, tuple(params), tuple(formats))
    return Unit(data, state, values=tuple(found_values), bind=positions)


# --- session scripts ----------------------------------------------------------------------------


def _start(draw: st.DrawFn) -> Model:
    startup = draw(st.sampled_from((*TENANTS, None, None)))
    return Model(draw(st.sampled_from(ROLES)), startup, Setting(startup))


@st.composite
def read_sessions(draw: st.DrawFn) -> tuple[State, list[Unit]]:
    """The session's start (login user, startup tenant) and units of reads, tenant, role
    and transaction statements: several Queries pipelined in a unit, several statements
    in a Query, blocks committed or rolled back, a SET sent to fail (outside a block)."""
    model = _start(draw)
    start = model.state()
    units: list[Unit] = []
    pieces: list[bytes] = []
    segments: list[tuple[Read, ...]] = []
    query: list[str] = []  # the Query being written
    reads: list[Read] = []

    def end_query() -> None:
        if query:
            pieces.append(m.Query("; ".join(query)).encode())
            segments.append(tuple(reads))
            query.clear()
            reads.clear()

    def end_unit() -> None:
        end_query()
        if pieces:
            units.append(Unit(b"".join(pieces), model.state(), segments=tuple(segments)))
            pieces.clear()
            segments.clear()

    for _ in range(draw(st.integers(1, 14))):
        op = draw(st.sampled_from(["read"] * 5 + ["setting"] * 4 + ["fail"] * 2))
        if op == "fail" and model.block is None:
            end_unit()
            lead = failing(draw, model, draw(st.booleans()))
            if draw(st.booleans()):
                units.append(Unit(lead + m.Query("SELECT 1").encode(), model.state(), lead=1))
                continue
            model.segment_start()
            read, extended = read_work(draw, model, draw(st.booleans()))
            behind = extended if extended is not None else m.Query(read.sql).encode()
            units.append(Unit(lead + behind, model.state(), lead=1, segments=((read,),)))
            continue
        if op == "read":
            query_read = draw(st.booleans())
            if query_read:
                if not query:
                    model.segment_start()
                read, _ = read_work(draw, model, True)
                query.append(read.sql)
                reads.append(read)
            else:
                end_query()
                model.segment_start()
                read, extended = read_work(draw, model, False)
                assert extended is not None
                pieces.append(extended)
                segments.append((read,))
        else:
            alone = draw(st.booleans())
            if alone:
                end_query()
            if not query:
                model.segment_start()  # before the statement: a BEGIN later may need it
            # RESET ALL after a SET LOCAL, or a ROLLBACK (TO) back to an uncertain value, may
            # be sent behind a read in flight: it does not decide the read's rows (see
            # test_rows_are_judged_by_the_state_their_read_was_sent_under).
            sql = setting(draw, model, alone)
            if alone:
                pieces.append(m.Query(sql).encode())
                segments.append(())
            else:
                query.append(sql)
        if draw(st.booleans()):
            end_query()  # the next statement in a Query of its own, pipelined
        if draw(st.booleans()):
            end_unit()  # sent, answered
    end_unit()
    return start, units


@st.composite
def write_sessions(draw: st.DrawFn) -> tuple[State, list[Unit]]:
    """The session's start and units, each answered before the next: writes and searches,
    tenant and role statements (outside blocks: a refused write fails a block), a SET of
    the tenant or the role sent to fail, and a write or search pipelined behind it (see
    test_a_write_behind_a_failed_tenant_change_is_sealed_for_the_tenant_postgres_has)."""
    model = _start(draw)
    start = model.state()
    units: list[Unit] = []
    for _ in range(draw(st.integers(1, 10))):
        op = draw(st.sampled_from(["work"] * 4 + ["setting"] * 3 + ["fail"]))
        if op == "work":
            units.append(write_work(draw, model))
        elif op == "setting":
            sql = setting(draw, model, True)
            if model.block is not None:  # no blocks here
                model.run("commit")
                sql += "; COMMIT"
            units.append(Unit(m.Query(sql).encode(), model.state()))
        else:
            before = (model.tenant, model.role)
            lead = failing(draw, model, draw(st.booleans()))
            if draw(st.booleans()):
                units.append(Unit(lead + m.Query("SELECT 1").encode(), model.state(), lead=1))
            else:
                # The proxy holds a statement that seals behind the SET until the SET is
                # answered; the error then comes with nothing sent behind it, and tells
                # the proxy exactly what PostgreSQL kept: nothing of the SET.
                model.tenant, model.role = before
                behind = write_work(draw, model)
                units.append(replace(behind, data=lead + behind.data, lead=1))
    return start, units


# --- running a script ---------------------------------------------------------------------


class RowsServer(FakeServer):
    """The FakeServer, each SELECT of SELECT_TABLES answered with `counts[i]` rows (the
    i-th such SELECT it runs; 1 past the list), of the tenant its WHERE names if it names
    one (`tenant_id = 'x'`, or `$1` bound to x), else of the harness's row_tenants in turn.
    `answered` keeps each one's SQL and the numbers of its rows (in FakeServer.rows)."""

    def __init__(self, counts: list[int], row_tenants: tuple[str, ...]) -> None:
        super().__init__(keys=_keystore_keys(), row_tenants=row_tenants, fail_marker=FAIL)
        self.counts = counts
        self.answered: list[tuple[str, list[int]]] = []
        self.bound: list[str] = []  # the tenant of each Bind of a `tenant_id = $1` read
        self.prepared: dict[str, str] = {}

    def answer(self, forwarded: bytes) -> bytes:
        for t, body in _frames(forwarded):  # the proxy forwards whole messages here
            if t == ord("P"):
                parse = m.decode_parse(body)
                self.prepared[parse.name] = parse.sql
            elif t == ord("B"):
                bind = m.decode_bind(body)
                if "tenant_id = $1" in self.prepared.get(bind.statement, "") and bind.params:
                    self.bound.append((bind.params[0] or b"").decode())
        return super().answer(forwarded)

    def _result(self, sql: str, formats: tuple[int, ...]) -> bytes:
        selected = _selected(sql)
        if selected is None:
            return super()._result(sql, formats)
        done = len(self.answered)
        k = self.counts[done] if done < len(self.counts) else 1
        pinned = _PINNED.search(sql)
        tenants = self.row_tenants
        if pinned is not None:
            self.row_tenants = (pinned[1] or self.bound.pop(0),)
        first = len(self.rows)
        rows = b"".join(self._row(selected, formats, sql) for _ in range(k))
        self.row_tenants = tenants
        self.answered.append((sql.strip(), list(range(first, first + k))))
        return rows + m.CommandComplete(f"SELECT {k}").encode()


@dataclass
class Played:
    run: Run
    server: RowsServer
    # Each unit's bytes upstream and downstream.
    sent: list[bytes]
    got: list[bytes]


def play_units(
    policy: Policy, start: State, units: list[Unit], row_tenants: tuple[str, ...] = ("acme",)
) -> Played:
    """Each unit sent, then answered by the server (keys fetched as asked) in full."""
    ring = _ring()
    counts = [r.rows for u in units for segment in u.segments for r in segment]
    server = RowsServer(counts, row_tenants)
    session = connected(policy_set(policy), ring, start.startup, start.login)
    run = Run(session, keys=KeyService(ring), server=server)
    sent: list[bytes] = []
    got: list[bytes] = []
    for unit in units:
        up, down = len(run.upstream), len(run.downstream)
        run.session.client_data(unit.data)
        _exchange(run, server)
        sent.append(bytes(run.upstream[up:]))
        got.append(bytes(run.downstream[down:]))
    run.assert_no_internal_error()
    assert not run.closed, run.closed
    _assert_no_sentinel(bytes(run.upstream))
    return Played(run, server, sent, got)


Message = tuple[int, bytes]


def _work_segments(unit: Unit, got: bytes) -> list[list[Message]]:
    """The messages to the client of each segment of the unit's work, after the lead (the
    SET sent to fail: one server error)."""
    segments: list[list[Message]] = [[]]
    for t, body in _frames(got):
        segments[-1].append((t, body))
        if t == ord("Z"):
            segments.append([])
    assert not segments.pop(), "the unit was not answered to its end"
    for segment in segments[: unit.lead]:
        sqlstates = [m.decode_error_response(b).sqlstate for t, b in segment if t == ord("E")]
        assert sqlstates == ["42601"], sqlstates  # the server's: "the server said no"
    return segments[unit.lead :]


# --- 1. reads ----------------------------------------------------------------------------------

Event = tuple[str, object]  # ("row", the sealed columns' values) or ("error", SQLSTATE)


def expected_reads(
    policy: Policy, segment: tuple[Read, ...], server: RowsServer, done: int
) -> list[Event]:
    """What the client must get for one segment's reads, the first of them the `done`-th
    read the server answered."""
    rules = dict(policy)
    events: list[Event] = []
    for i, read in enumerate(segment):
        sql, numbers = server.answered[done + i]
        # The same read (the proxy may add the row tenant column to the select list).
        assert sql.endswith(read.sql.split(" FROM ")[1]), (sql, read.sql)
        sealed = [c for c in read.columns if c in SEALED_COLUMNS]
        for n in numbers:
            tenant, plain = server.rows[n]
            assert read.pinned in (None, tenant)
            if not sealed or may_read(rules[read.table], read.state, tenant):
                events.append(("row", tuple(plain[c].encode() for c in sealed)))
            elif rules[read.table].on_denied == "null":
                events.append(("row", tuple(None for _ in sealed)))
            else:
                events.append(("error", "42501"))
                return events  # the rest of the result, and of its Query, is dropped
    return events


def observed_reads(segment: tuple[Read, ...], messages: list[Message]) -> list[Event]:
    """What the client got for one segment's reads: each result of a Query starts with
    its RowDescription; an extended read is its segment's only one (described or not)."""
    events: list[Event] = []
    following = iter(segment)
    read = segment[0] if len(segment) == 1 else None
    for t, body in messages:
        if t == ord("T") and len(segment) > 1:
            read = next(following)
        elif t == ord("D"):
            assert read is not None, "a DataRow before its RowDescription"
            values = m.decode_data_row(body).values
            at = [i for i, c in enumerate(read.columns) if c in SEALED_COLUMNS]
            events.append(("row", tuple(values[i] for i in at)))
        elif t == ord("E"):
            events.append(("error", m.decode_error_response(body).sqlstate))
    return events


def check_reads(policy: Policy, units: list[Unit], played: Played) -> int:
    """Every read got exactly what the oracle says; returns how many plaintexts opened."""
    done = 0
    opened = 0
    allowed: set[bytes] = set()
    for unit, got in zip(units, played.got, strict=True):
        segments = _work_segments(unit, got)
        assert len(segments) == len(unit.segments), (segments, unit.segments)
        for reads, messages in zip(unit.segments, segments, strict=True):
            expected = expected_reads(policy, reads, played.server, done)
            done += len(reads)
            assert observed_reads(reads, messages) == expected, (reads, messages)
            for kind, values in expected:
                if kind == "row" and isinstance(values, tuple):
                    allowed.update(v for v in values if isinstance(v, bytes))
                    opened += sum(1 for v in values if v is not None)
    assert done == len(played.server.answered), "the server ran reads nobody expected"
    # Nowhere else either (an error's text, a notice): only plaintexts the rules allow.
    for found in re.finditer(rb"ROW\d+-[a-z]+-[a-z]+\.", bytes(played.run.downstream)):
        assert found[0] in allowed, found[0]
    return opened


@_fuzz(200)
@given(
    policy=policies_st,
    script=read_sessions(),
    row_tenants=st.lists(st.sampled_from(TENANTS), min_size=1, max_size=6).map(tuple),
)
def test_a_plaintext_reaches_the_client_iff_the_rules_allow_it(
    policy: Policy, script: tuple[State, list[Unit]], row_tenants: tuple[str, ...]
) -> None:
    """Property 1: reads of rows of several tenants, under every kind of session state."""
    start, units = script
    played = play_units(policy, start, units, row_tenants)
    opened = check_reads(policy, units, played)
    event(f"plaintexts opened: {min(opened, 3)}")
    event(f"login in cross_tenant_roles: {start.login in CROSS_TENANT_ROLES}")
    rules = dict(policy)
    for unit in units:
        for segment in unit.segments:
            for read in segment:
                table = rules[read.table]
                event(f"read of a {table.isolation} table, on_denied {table.on_denied}")
                event(f"read under an uncertain tenant: {read.state.tenant_uncertain}")
                event(f"read under an uncertain role: {read.state.role_uncertain}")
                event(f"read of a tenant named in the WHERE: {read.pinned is not None}")


# --- 2. writes and searches -------------------------------------------------------------------

_CELL = re.compile(r"'\\x([0-9a-f]+)'::bytea")


def _cells_sent(unit: Unit, sent: bytes) -> list[bytes] | None:
    """The cells that went up for the unit's values, in order; None if it was refused."""
    frames = list(_frames(sent))
    if unit.bind is None:
        (sql,) = [m.decode_query(b).sql for t, b in frames if t == ord("Q")][unit.lead :]
        if sql == "pgseal_refused_statement":
            return None
        return [bytes.fromhex(h) for h in _CELL.findall(sql)]
    (bind,) = [m.decode_bind(b) for t, b in frames if t == ord("B")]
    if bind.statement == "pgseal.refused":
        return None
    assert all(bind.param_format(i) == 1 for i in unit.bind), bind
    return [c for c in (bind.params[i] for i in unit.bind) if c is not None]


def _tenant_of(cell: bytes, column: str) -> tuple[str, bytes] | None:
    """The tenant whose key opens a cell of `column`, and what it holds."""
    for tenant, key in _keystore_keys().items():
        try:
            return tenant, key.open(column, cell)
        except CellError:
            continue
    return None


def check_writes(policy: Policy, units: list[Unit], played: Played) -> dict[str, int]:
    """Each unit's values went up sealed under the tenant the oracle names, or the
    statement was refused with 42501 and nothing of it went up."""
    rules = dict(policy)
    outcomes = {"sealed": 0, "refused": 0}
    for unit, sent, got in zip(units, played.sent, played.got, strict=True):
        messages = [msg for segment in _work_segments(unit, got) for msg in segment]
        errors = [m.decode_error_response(b).sqlstate for t, b in messages if t == ord("E")]
        if not unit.values:
            assert errors == [], errors
            continue
        tenants = [
            sealing_tenant(rules[v.table], unit.state, v.named, v.from_session, not unit.search)
            for v in unit.values
        ]
        cells = _cells_sent(unit, sent)
        if any(t is None for t in tenants):
            assert cells is None, f"{unit.values} went up under {unit.state}"
            assert errors == ["42501"], errors
            outcomes["refused"] += 1
            continue
        assert cells is not None, f"refused ({errors}) under {unit.state}: {unit.values}"
        assert errors == [], errors
        # A search value is sealed under every live key version of its tenant: one here.
        assert len(cells) == len(unit.values), cells
        for value, tenant, cell in zip(unit.values, tenants, cells, strict=True):
            opened = _tenant_of(cell, f"public.{value.table}.{value.column}")
            assert opened == (tenant, b"\x01" + value.plaintext.encode()), (value, opened)
        outcomes["sealed"] += 1
    return outcomes


@_fuzz(200)
@given(policy=policies_st, script=write_sessions())
def test_values_are_sealed_under_the_tenant_the_rules_name_or_refused(
    policy: Policy, script: tuple[State, list[Unit]]
) -> None:
    """Property 2: writes and searches, under every kind of session state."""
    start, units = script
    played = play_units(policy, start, units)
    outcomes = check_writes(policy, units, played)
    event(f"statements sealed: {min(outcomes['sealed'], 2)}")
    event(f"statements refused: {min(outcomes['refused'], 2)}")
    for unit in units:
        if unit.values:
            event(f"work pipelined behind a SET sent to fail: {unit.lead > 0}")
        for value in unit.values:
            rules = dict(policy)[value.table]
            other = value.named is not None and value.named != unit.state.tenant
            event(f"{rules.isolation}, another tenant named: {other}, search: {unit.search}")


# --- the checks can fail ------------------------------------------------------------------

STRICT_ERROR = Rules("strict", "error", None)
TRUSTED_NULL = Rules("trusted", "null", None)


def _policy_of(rules: Rules) -> Policy:
    return tuple((t, rules) for t in RULE_TABLES)


def test_the_read_checks_can_fail() -> None:
    """A globex row in acme's strict session is refused; an oracle that allowed it, or a
    plaintext planted in what the client got, is caught."""
    state = State("app", "acme", "acme", "app")
    sql = "SELECT * FROM patients WHERE id = 1"
    read = Read(sql, "patients", SELECT_TABLES["patients"][1], 2, state)
    units = [Unit(m.Query(sql).encode(), state, segments=((read,),))]
    policy = _policy_of(STRICT_ERROR)
    played = play_units(policy, state, units, ("acme", "globex"))
    check_reads(policy, units, played)
    assert b"ROW1-globex" not in played.run.downstream
    auditor = replace(state, login="auditor", role="auditor")
    wrong = [replace(units[0], segments=((replace(read, state=auditor),),))]
    with pytest.raises(AssertionError):
        check_reads(policy, wrong, played)
    played.run.downstream += m.DataRow((b"ROW1-globex-name.",)).encode()
    with pytest.raises(AssertionError):
        check_reads(policy, units, played)


def test_the_write_checks_can_fail() -> None:
    """globex's row from acme's strict session is refused, under trusted isolation sealed
    under globex's key; an oracle that said otherwise is caught."""
    state = State("auditor", "acme", "acme", "auditor")
    value = Value("patients", "ssn", "SENTINEL-1", "globex", False)
    sql = "INSERT INTO patients (tenant_id, ssn) VALUES ('globex', 'SENTINEL-1')"
    units = [Unit(m.Query(sql).encode(), state, values=(value,))]
    strict = _policy_of(STRICT_ERROR)
    trusted = _policy_of(TRUSTED_NULL)
    refused = check_writes(strict, units, play_units(strict, state, units))
    assert refused == {"sealed": 0, "refused": 1}
    played = play_units(trusted, state, units)
    assert check_writes(trusted, units, played) == {"sealed": 1, "refused": 0}
    with pytest.raises(AssertionError):
        check_writes(strict, units, played)  # what the strict oracle says of it
    acme = [replace(units[0], values=(replace(value, named="acme"),))]
    with pytest.raises(AssertionError):
        check_writes(trusted, acme, played)  # sealed under globex, not acme


def test_a_failed_set_leaves_the_tenant_or_role_uncertain() -> None:
    """The scripts' way of making the state uncertain does (else the properties would not
    exercise it): a SET sent to fail, with a Query pipelined behind it."""
    policy = _policy_of(STRICT_ERROR)
    for sql in (f"SET pgseal.tenant = 'globex' {FAIL}", f"SET ROLE app {FAIL}"):
        state = State("auditor", "acme", "acme", "auditor")
        unit = Unit(m.Query(sql).encode() + m.Query("SELECT 1").encode(), state, lead=1)
        played = play_units(policy, state, [unit])
        datapath = played.run.session.datapath
        assert datapath is not None
        assert datapath.tenant.uncertain == ("tenant" in sql)
        assert datapath.role_setting.uncertain == ("ROLE" in sql)


# --- what the fuzzing found -------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO notes (body) VALUES ('SENTINEL-1')",
        "INSERT INTO patients (tenant_id, ssn) VALUES ('globex', 'SENTINEL-1')",
        "SELECT id FROM contacts WHERE email = 'SENTINEL-1'",
    ],
)
def test_a_write_behind_a_failed_tenant_change_is_sealed_for_the_tenant_postgres_has(
    sql: str,
) -> None:
    """acme's session (strict isolation) sends SET pgseal.tenant = 'globex', which fails,
    and an INSERT (or a search) behind it before the answer. PostgreSQL runs the INSERT
    with pgseal.tenant = 'acme'. The proxy sealed its value under globex's key: a globex
    cell stored from acme's session (notes: in acme's row, where acme can never open it;
    patients: a row of globex written by a session of acme, which strict isolation
    refuses). Found by test_values_are_sealed_under_the_tenant_the_rules_name_or_refused.
    Now the INSERT waits (DataPath._settled) until the SET is answered: the error then
    comes with nothing behind it, so the proxy knows PostgreSQL kept acme, and judges
    the INSERT under acme (notes and the search: sealed under acme's key; patients: the
    row's tenant is not the session's, refused with 42501, nothing of it forwarded)."""
    columns = {"notes": "body", "patients": "ssn", "contacts": "email"}
    table = next(t for t in columns if t in sql)
    column = columns[table]
    state = State("app", "acme", "acme", "app")
    lead = m.Query(f"SET pgseal.tenant = 'globex' {FAIL}").encode()
    value = Value(table, column, "SENTINEL-1", "globex", table != "patients")
    search = sql.startswith("SELECT")
    unit = Unit(lead + m.Query(sql).encode(), state, lead=1, values=(value,), search=search)
    played = play_units(_policy_of(STRICT_ERROR), state, [unit])
    cells = _cells_sent(unit, played.sent[0])
    # Refused, or (a value whose tenant is the session's) sealed under acme's key.
    assert cells is None or (
        table != "patients"
        and _tenant_of(cells[0], f"public.{table}.{column}") == ("acme", b"\x01SENTINEL-1")
    ), _tenant_of(cells[0], f"public.{table}.{column}")
    assert (cells is None) == (table == "patients")
    check_writes(_policy_of(STRICT_ERROR), [unit], played)  # the oracle agrees


@pytest.mark.parametrize("login, table", [("pgseal_app", "contacts"), ("auditor", "patients")])
def test_a_role_set_at_startup_narrows_what_the_session_may_read(login: str, table: str) -> None:
    """Login pgseal_app (in contacts' decrypt_roles) or auditor (in cross_tenant_roles) with
    `options=-c role=app`: PostgreSQL runs the session as app, in neither list (and goes
    back to app on RESET ROLE and DISCARD ALL). The proxy took the role to be the login
    user, and opened contacts' cells for app, and globex's row of patients for acme's
    strict session; it now starts from `current_user` as its catalog query reads it
    (the harness's fake server answers it from the options). Found writing the role side
    of the oracle (not drawn by the scripts: they start every session as its login
    user)."""
    rules = Rules("strict", "null", frozenset({"auditor", "pgseal_app"}))
    policy = tuple((t, rules if t == "contacts" else STRICT_ERROR) for t in RULE_TABLES)
    # The harness puts the startup tenant in `options=-c pgseal.tenant=...`: the role
    # rides along in the same options.
    state = State(login, "acme -c role=app", "acme", "app")
    sql = f"SELECT * FROM {table} WHERE id = 1"
    read = Read(sql, table, SELECT_TABLES[table][1], 1, state)
    units = [Unit(m.Query(sql).encode(), state, segments=((read,),))]
    played = play_units(policy, state, units, ("acme" if table == "contacts" else "globex",))
    assert not re.search(rb"ROW0-[a-z]+-[a-z]+\.", bytes(played.run.downstream))


@pytest.mark.parametrize(
    "login, before, chunk, table",
    [
        # RESET ALL after a SET LOCAL: tenant.py does not guess what it leaves.
        ("app", "BEGIN; SET LOCAL pgseal.tenant = 'acme'", "{read}; RESET ALL", "patients"),
        # A ROLLBACK back to the uncertain tenant the block began with.
        ("app", "", "BEGIN; SET pgseal.tenant = 'acme'; {read}; ROLLBACK", "patients"),
        # A ROLLBACK back to the uncertain role the block began with.
        ("auditor", "", "BEGIN; SET ROLE auditor; {read}; ROLLBACK", "contacts"),
    ],
)
def test_rows_are_judged_by_the_state_their_read_was_sent_under(
    login: str, before: str, chunk: str, table: str
) -> None:
    """acme's session (strict isolation; contacts' decrypt_roles [auditor, pgseal_app]).
    The second and third cases begin with a SET pgseal.tenant (or SET ROLE app, login
    auditor) sent to fail with a Query behind it: the value is uncertain. Then a Query in
    which the tenant (or role) is certain when the read in it runs, but a statement after
    the read leaves the tracked value uncertain again (RESET ALL after SET LOCAL; a
    ROLLBACK to the block's start). PostgreSQL runs the read with pgseal.tenant = 'acme'
    (as auditor): the rules allow acme's row. The proxy refused it, 42501 "the session
    tenant is uncertain" (or "role auditor may not read ..."): _read_denial and _role_may
    looked at the trackers' uncertainty when the row arrived, after the later statement
    was sent, besides the reader's own (_Reader, taken when the read was sent). Found by
    test_a_plaintext_reaches_the_client_iff_the_rules_allow_it. Now only the reader
    decides, made uncertain by an error ahead of the read that puts what it was sent under
    in doubt (TenantTracker.error; see test_rows_behind_a_failed_change_are_judged_as_uncertain)."""
    rules = Rules("strict", "error", frozenset({"auditor", "pgseal_app"}))
    policy = tuple((t, rules if t == "contacts" else STRICT_ERROR) for t in RULE_TABLES)
    state = State(login, "acme", "acme", login)
    if before:
        units = [Unit(m.Query(before).encode(), state)]
    else:
        doubt = "SET ROLE app" if table == "contacts" else "SET pgseal.tenant = 'globex'"
        failed = m.Query(f"{doubt} {FAIL}").encode() + m.Query("SELECT 1").encode()
        units = [Unit(failed, state, lead=1)]
    sql = f"SELECT * FROM {table} WHERE id = 1"
    read = Read(sql, table, SELECT_TABLES[table][1], 1, state)
    units.append(Unit(m.Query(chunk.format(read=sql)).encode(), state, segments=((read,),)))
    check_reads(policy, units, play_units(policy, state, units))

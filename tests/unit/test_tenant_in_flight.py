"""Statements sent before the answer to a tenant or role change (pipelining), and errors
that make what was sent behind them run under another state than the proxy took.

Two rules (README "Known limits", TenantTracker.in_flight_may_change and .error):
- rows are judged by the tenant and role their statement ran under: as when it was sent,
  unless an error ahead of it puts that in doubt (then as under an uncertain value); what
  was sent behind it never counts;
- a value is sealed only under a tenant no unanswered segment can still change: the
  statement waits (NeedAnswers) until the segments before it are answered.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from proxy.policy import PolicySet
from proxy.policy.loader import load_policies
from proxy.session.datapath import NeedAnswers, NeedKeys
from proxy.wire import messages as m
from tests.unit.test_datapath_copy import client, copy_response, make, server
from tests.unit.test_datapath_fuzz import (
    FAIL,
    SELECT_TABLES,
    KeyService,
    Run,
    _exchange,
    _frames,
    _ring,
    connected,
)
from tests.unit.test_tenant_rules_fuzz import (
    STRICT_ERROR,
    Read,
    RowsServer,
    Rules,
    State,
    Unit,
    Value,
    _cells_sent,
    _policy_of,
    _tenant_of,
    check_reads,
    check_writes,
    play_units,
    policy_set,
)

POLICY = Path(__file__).resolve().parent.parent / "data" / "policy.yaml"


@pytest.fixture(scope="module")
def policies() -> PolicySet:
    return load_policies([POLICY])


# --- reads: judged by the state their statement ran under ---------------------------------


@pytest.mark.parametrize(
    "login, before, failed, row_tenant, doubt",
    [
        # PostgreSQL refuses the SET: the read runs under acme, not globex.
        ("app", "", f"SET pgseal.tenant = 'globex' {FAIL}", "globex", "tenant"),
        # A COMMIT that fails (a deferred constraint) rolls the block's SET back.
        ("app", "BEGIN; SET pgseal.tenant = 'globex'", f"COMMIT {FAIL}", "globex", "tenant"),
        # PostgreSQL refuses SET ROLE auditor: the read runs as app, no cross-tenant reader.
        ("auditor", "SET ROLE app", f"SET ROLE auditor {FAIL}", "globex", "role"),
        # An error that changes nothing: the read ran as it was sent (acme's own row, and
        # globex's for auditor).
        ("app", "", f"SELECT 1 {FAIL}", "acme", ""),
        ("auditor", "", f"SELECT 1 {FAIL}", "globex", ""),
    ],
)
def test_rows_behind_a_failed_change_are_judged_as_uncertain(
    login: str, before: str, failed: str, row_tenant: str, doubt: str
) -> None:
    """What the trackers' uncertainty *as rows arrive* used to catch (the reader's own
    snapshot, taken as sent, said globex, or auditor, certain): now the error itself
    makes the readers sent behind it uncertain (DataPath._distrust_later_readers)."""
    policy = _policy_of(STRICT_ERROR)
    start = State(login, "acme", "acme", login)
    units = [Unit(m.Query(before).encode(), start)] if before else []
    ran = State(
        login,
        "acme",
        "acme",
        "app" if "ROLE app" in before else login,
        tenant_uncertain=doubt == "tenant",
        role_uncertain=doubt == "role",
    )
    sql = "SELECT * FROM patients WHERE id = 1"
    read = Read(sql, "patients", SELECT_TABLES["patients"][1], 1, ran)
    data = m.Query(failed).encode() + m.Query(sql).encode()
    units.append(Unit(data, start, lead=1, segments=((read,),)))
    played = play_units(policy, start, units, (row_tenant,))
    opened = check_reads(policy, units, played)
    assert opened == (0 if doubt else 2)  # ssn and name


def test_rows_of_an_extended_read_behind_a_failed_change_are_judged_as_uncertain() -> None:
    """The same with the read through the extended protocol (Parse/Bind/Execute/Sync)."""
    policy = _policy_of(STRICT_ERROR)
    start = State("app", "acme", "acme", "app")
    ran = State("app", "acme", "acme", "app", tenant_uncertain=True)
    sql = "SELECT * FROM patients WHERE id = 1"
    read = Read(sql, "patients", SELECT_TABLES["patients"][1], 1, ran)

    data = (
        m.Query(f"SET pgseal.tenant = 'globex' {FAIL}").encode()
        + m.Parse("", sql).encode()
        + m.Bind("", "", (), (), ()).encode()
        + m.Execute("", 0).encode()
        + m.SYNC
    )
    units = [Unit(data, start, lead=1, segments=((read,),))]
    played = play_units(policy, start, units, ("globex",))
    assert check_reads(policy, units, played) == 0
    assert b"ROW0-globex" not in played.run.downstream


# --- writes: sealed only under a tenant no answer can still change ----------------------------


def _session(policy: tuple[tuple[str, Rules], ...], start: State) -> tuple[Run, RowsServer]:
    ring = _ring()
    session = connected(policy_set(policy), ring, start.startup, start.login)
    rows = RowsServer([], ("acme",))
    return Run(session, keys=KeyService(ring), server=rows), rows


@pytest.mark.parametrize("fails", [False, True])
def test_a_write_waits_for_the_answer_to_a_tenant_change_in_flight(fails: bool) -> None:
    """SET pgseal.tenant = 'globex' and an INSERT pipelined behind it: the INSERT goes up
    only once the SET is answered, sealed under globex if it worked, else under acme (the
    error came with nothing sent behind it: the tracker knows PostgreSQL kept acme)."""
    policy = _policy_of(STRICT_ERROR)
    start = State("app", "acme", "acme", "app")
    run, rows = _session(policy, start)
    change = f"SET pgseal.tenant = 'globex'{f' {FAIL}' if fails else ''}"
    insert = "INSERT INTO notes (body) VALUES ('SENTINEL-1')"
    run.session.client_data(m.Query(change).encode() + m.Query(insert).encode())
    first = run.drain()
    assert [m.decode_query(b).sql for t, b in _queries(first)] == [change]
    assert run.session.busy
    run.session.server_data(rows.answer(first))
    second = run.drain()
    (sql,) = [m.decode_query(b).sql for t, b in _queries(second)]
    assert sql.startswith("INSERT INTO notes")
    run.session.server_data(rows.answer(second))
    run.assert_no_internal_error()
    assert not run.session.busy and run.session.awaiting_ready == 0
    unit = Unit(m.Query(insert).encode(), start, values=(Value("notes", "body", "SENTINEL-1"),))
    (cell,) = _cells_sent(unit, second) or [b""]
    assert _tenant_of(cell, "public.notes.body") == (
        "acme" if fails else "globex",
        b"\x01SENTINEL-1",
    )


def _queries(data: bytes) -> list[tuple[int, bytes]]:
    return [(t, b) for t, b in _frames(data) if t == ord("Q")]


@pytest.mark.parametrize(
    "before",
    [
        "SELECT 1",  # changes nothing
        f"SELECT 1 {FAIL}",  # fails, and changes nothing
        "SET pgseal.tenant = 'acme'",  # the value it already has
    ],
)
def test_a_write_behind_what_cannot_change_the_tenant_goes_at_once(before: str) -> None:
    policy = _policy_of(STRICT_ERROR)
    start = State("app", "acme", "acme", "app")
    run, rows = _session(policy, start)
    insert = "INSERT INTO notes (body) VALUES ('SENTINEL-1')"
    run.session.client_data(m.Query(before).encode() + m.Query(insert).encode())
    first = run.drain()
    assert len(_queries(first)) == 2  # both pipelined
    run.session.server_data(rows.answer(first))
    _exchange(run, rows)
    assert not run.session.busy
    run.assert_no_internal_error()


def test_a_write_in_the_same_query_as_the_change_goes_at_once() -> None:
    """Within one segment nothing waits: PostgreSQL skips the rest after an error."""
    policy = _policy_of(STRICT_ERROR)
    start = State("app", "acme", "acme", "app")
    sql = "SET pgseal.tenant = 'globex'; INSERT INTO notes (body) VALUES ('SENTINEL-1')"
    value = Value("notes", "body", "SENTINEL-1")
    globex = State("app", "acme", "globex", "app")
    units = [Unit(m.Query(sql).encode(), globex, values=(value,))]
    played = play_units(policy, start, units)
    assert check_writes(policy, units, played) == {"sealed": 1, "refused": 0}


@pytest.mark.parametrize("fails", [False, True])
def test_a_search_of_another_tenant_waits_for_a_role_change_in_flight(fails: bool) -> None:
    """auditor's session as app, then SET ROLE auditor (a cross-tenant role) and a search of
    globex's value pipelined: sealed for globex only if PostgreSQL ran SET ROLE auditor."""
    policy = _policy_of(STRICT_ERROR)
    start = State("auditor", "acme", "acme", "auditor")
    change = f"SET ROLE auditor{f' {FAIL}' if fails else ''}"
    search = "SELECT id FROM contacts WHERE tenant_id = 'globex' AND email = 'SENTINEL-1'"
    value = Value("contacts", "email", "SENTINEL-1", "globex", False)
    role = State("auditor", "acme", "acme", "app" if fails else "auditor")
    units = [
        Unit(m.Query("SET ROLE app").encode(), start),
        Unit(
            m.Query(change).encode() + m.Query(search).encode(),
            role,
            lead=int(fails),
            values=(value,),
            search=True,
        ),
    ]
    if not fails:  # no error to skip: the SET's own answer is part of the unit's work
        units[1] = Unit(m.Query(search).encode(), role, values=(value,), search=True)
        units.insert(1, Unit(m.Query(change).encode(), role))
    played = play_units(policy, start, units)
    outcomes = check_writes(policy, units, played)
    assert outcomes == ({"sealed": 0, "refused": 1} if fails else {"sealed": 1, "refused": 0})


def test_an_extended_bind_waits_and_is_processed_again_exactly() -> None:
    """Parse/Bind/Execute/Sync of SET pgseal.tenant, then of an INSERT whose value is a
    parameter: the Bind waits for the SET's answer; the Parse before it went up."""
    policy = _policy_of(STRICT_ERROR)
    start = State("app", "acme", "acme", "app")
    run, rows = _session(policy, start)
    data = (
        m.Query(f"SET pgseal.tenant = 'globex' {FAIL}").encode()
        + m.Parse("", "INSERT INTO notes (body) VALUES ($1)").encode()
        + m.Bind("", "", (0,), (b"SENTINEL-1",), ()).encode()
        + m.Execute("", 0).encode()
        + m.SYNC
    )
    run.session.client_data(data)
    first = run.drain()
    assert [chr(t) for t, _ in _frames(first)] == ["Q", "P"]
    run.session.server_data(rows.answer(first))
    _exchange(run, rows)
    run.assert_no_internal_error()
    sent = bytes(run.upstream)
    (bind,) = [m.decode_bind(b) for t, b in _frames(sent) if t == ord("B")]
    cell = bind.params[0]
    assert cell is not None
    assert _tenant_of(cell, "public.notes.body") == ("acme", b"\x01SENTINEL-1")
    assert not run.session.busy and run.session.awaiting_ready == 0


# --- COPY FROM STDIN: its rows are sealed under the tenant it is armed with ---------------------


def test_a_copy_from_stdin_waits_for_a_tenant_change_in_flight(policies: PolicySet) -> None:
    dp, _ = make(policies)
    client(dp, m.Query("SET pgseal.tenant = 'globex'").encode())
    copy = m.Query("COPY patients (tenant_id, name) FROM STDIN").encode()
    with pytest.raises(NeedAnswers):
        client(dp, copy)
    assert dp.copy_in is None
    server(dp, m.CommandComplete("SET").encode())
    server(dp, m.ReadyForQuery("I").encode())
    client(dp, copy)  # processed again: armed under globex, known now
    assert dp.copy_in is not None
    assert server(dp, copy_response(b"G", 2)) == copy_response(b"G", 2)
    out = client(dp, m.CopyData(b"globex\tAlice\n").encode())
    assert b"Alice" not in out


def test_an_extended_copy_from_stdin_waits_before_anything_is_taken(policies: PolicySet) -> None:
    dp, _ = make(policies)
    client(dp, m.Query(f"SET pgseal.tenant = 'globex' {FAIL}").encode())
    client(dp, m.Parse("", "COPY patients (tenant_id, name) FROM STDIN").encode())
    client(dp, m.Bind("", "", (), (), ()).encode())
    execute = m.Execute("", 0).encode()
    with pytest.raises(NeedAnswers):
        client(dp, execute)
    server(dp, m.ErrorResponse.make("42501", "permission denied").encode())
    server(dp, m.ReadyForQuery("I").encode())
    assert not dp.tenant.uncertain and dp.tenant.current == "acme"  # an exact error
    assert client(dp, execute) == execute


def test_a_query_behind_an_unsynced_execute_waits_in_the_same_segment(
    policies: PolicySet,
) -> None:
    """A Query sent behind an Execute with no Sync runs in that segment's transaction
    (SET LOCAL still in force). Processed again after a wait (here for keys), it must not
    be taken for the start of a new segment, which would drop the SET LOCAL."""
    dp, ring = make(policies)
    client(dp, m.Parse("", "SET LOCAL pgseal.tenant = 'initech'").encode())
    client(dp, m.Bind("", "", (), (), ()).encode())
    client(dp, m.Execute("", 0).encode())
    query = m.Query("INSERT INTO notes (body) VALUES ('x')").encode()
    with pytest.raises(NeedKeys):
        client(dp, query)
    ring.add(3, "initech")
    sent = m.decode_query(client(dp, query)[5:]).sql
    (cell,) = re.findall(r"'\\x([0-9a-f]+)'::bytea", sent)
    assert ring.keys[3].open("public.notes.body", bytes.fromhex(cell)) == b"\x01x"

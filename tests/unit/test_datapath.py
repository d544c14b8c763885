"""DataPath (pure): rewriting, the response queue, refusal by substitution, key stalls.

The server side is played by hand: each test feeds the frames PostgreSQL would
send for what the data path forwarded.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from proxy.crypto.cells import CellKey, read_cell_header
from proxy.errors import PgsealError
from proxy.policy.loader import load_policies
from proxy.session.datapath import DataPath, NeedKeys, SessionInfo
from proxy.wire import messages as m
from proxy.wire.framing import Frame

POLICY = Path(__file__).resolve().parent.parent / "data" / "policy.yaml"


class FakeKeyRing:
    def __init__(self) -> None:
        self.keys: dict[int, CellKey] = {}
        self.by_tenant: dict[str, CellKey] = {}
        self.gone: dict[int, str] = {}  # destroyed key id -> its tenant
        self.fault: PgsealError | None = None

    def add(self, key_id: int, tenant: str) -> CellKey:
        key = CellKey(key_id, tenant, bytes([key_id]) * 32)
        self.keys[key_id] = key
        self.by_tenant[tenant] = key
        return key

    def current(self, tenant: str, uses: int) -> CellKey | None:
        return self.by_tenant.get(tenant)

    def by_id(self, key_id: int, uses: int) -> CellKey | None:
        return self.keys.get(key_id)

    def versions(self, tenant: str, uses: int) -> list[CellKey] | None:
        active = self.by_tenant.get(tenant)
        if active is None:
            return None
        older = [k for k in self.keys.values() if k.tenant == tenant and k is not active]
        return [active, *sorted(older, key=lambda k: -k.key_id)]

    def destroyed(self, key_id: int) -> str | None:
        return self.gone.get(key_id)

    def failure(self) -> PgsealError | None:
        return self.fault


def frame_of(raw: bytes) -> Frame:
    return Frame(raw[0], raw[5:])


@pytest.fixture(scope="module")
def policies():  # type: ignore[no-untyped-def]
    return load_policies([POLICY])


def make(policies, tenant: str | None = "acme") -> tuple[DataPath, FakeKeyRing]:  # type: ignore[no-untyped-def]
    ring = FakeKeyRing()
    ring.add(1, "acme")
    ring.add(2, "globex")
    dp = DataPath(policies, ring, SessionInfo("app", "db", tenant), parameters={})
    return dp, ring


def client(dp: DataPath, msg: object) -> bytes:
    return dp.client_frame(frame_of(msg.encode()))  # type: ignore[attr-defined]


def server(dp: DataPath, raw: bytes) -> bytes:
    return dp.server_frame(frame_of(raw))


PARSE_COMPLETE = b"1\0\0\0\4"
BIND_COMPLETE = b"2\0\0\0\4"
CLOSE_COMPLETE = b"3\0\0\0\4"
NO_DATA = b"n\0\0\0\4"


def _split(raw: bytes) -> tuple[list[tuple[bytes, bytes]], tuple[bytes, bytes]]:
    """The messages in `raw` (type, body): all but the last, and the last."""
    out = []
    while raw:
        (length,) = struct.unpack_from("!i", raw, 1)
        out.append((raw[:1], raw[5 : 1 + length]))
        raw = raw[1 + length :]
    return out[:-1], out[-1]


def test_bind_seals_protected_parameters_as_binary_bytea(policies) -> None:  # type: ignore[no-untyped-def]
    dp, ring = make(policies)
    parse = client(
        dp, m.Parse("", "INSERT INTO patients (tenant_id, ssn, name) VALUES ($1, $2, $3)")
    )
    forwarded = m.decode_parse(parse[5:])
    assert forwarded.param_types[1:] == (17, 17)
    out = client(dp, m.Bind("", "", (0,), (b"acme", b"123-45-6789", b"Alice"), ()))
    bind = m.decode_bind(out[5:])
    assert bind.params[0] == b"acme"
    assert bind.param_formats == (0, 1, 1)
    ssn, name = bind.params[1], bind.params[2]
    assert ssn is not None and name is not None
    assert read_cell_header(ssn).key_id == 1 and read_cell_header(ssn).suite == 2  # deterministic
    assert read_cell_header(name).suite == 1  # randomized
    assert b"Alice" not in out and b"123-45-6789" not in out
    assert ring.keys[1].open("public.patients.name", name)[1:] == b"Alice"
    assert [n.event for n in dp.take_audit()] == ["data.encrypt"]


def test_strict_isolation_refuses_a_row_of_another_tenant_in_order(policies) -> None:  # type: ignore[no-untyped-def]
    dp, _ = make(policies)
    client(dp, m.Parse("", "SELECT 1"))
    client(dp, m.Bind("", "", (), (), ()))
    client(dp, m.Parse("s2", "INSERT INTO patients (tenant_id, ssn) VALUES ($1, $2)"))
    refused_bind = client(dp, m.Bind("", "s2", (), (b"globex", b"1"), ()))
    # Substituted by a Bind that fails in PostgreSQL, carrying no value.
    assert b"globex" not in refused_bind and b"pgseal.refused" in refused_bind
    client(dp, m.Execute(""))
    client(dp, m.Parse("x", "SELECT 2"))  # skipped by the server after the error
    sync = dp.client_frame(frame_of(m.SYNC))
    assert sync == m.SYNC
    # The server answers the first Parse/Bind, then fails the substituted Bind.
    assert server(dp, PARSE_COMPLETE) == PARSE_COMPLETE
    assert server(dp, BIND_COMPLETE) == BIND_COMPLETE
    assert server(dp, PARSE_COMPLETE) == PARSE_COMPLETE
    pg_error = m.ErrorResponse.make(
        "26000", "prepared statement \"pgseal.refused\" does not exist"
    ).encode()
    ours = m.decode_error_response(server(dp, pg_error)[5:])
    assert ours.sqlstate == "42501" and "public.patients" in (ours.message or "")
    assert server(dp, m.ReadyForQuery("I").encode()) == m.ReadyForQuery("I").encode()
    assert not dp.pending


def test_refused_query_never_forwards_its_text(policies) -> None:  # type: ignore[no-untyped-def]
    dp, _ = make(policies)
    out = client(dp, m.Query("SELECT * FROM patients WHERE name LIKE 'Ali%'"))
    assert out == m.Query("pgseal_refused_statement").encode()
    err = m.decode_error_response(
        server(dp, m.ErrorResponse.make("42601", "syntax error").encode())[5:]
    )
    assert err.sqlstate == "0A000" and "public.patients.name" in (err.message or "")
    server(dp, m.ReadyForQuery("I").encode())
    assert not dp.pending


def test_simple_query_literals_are_spliced_as_sealed_bytea(policies) -> None:  # type: ignore[no-untyped-def]
    dp, _ = make(policies)
    sql = (
        "INSERT INTO patients (tenant_id, ssn, name) VALUES ('acme', '1-2-3', 'Alice') "
        "RETURNING id"
    )
    out = m.decode_query(client(dp, m.Query(sql))[5:]).sql
    assert "Alice" not in out and "1-2-3" not in out
    assert out.startswith("INSERT INTO patients (tenant_id, ssn, name) VALUES ('acme', '\\x0102")
    assert out.endswith("::bytea) RETURNING id")


def test_data_row_cells_are_opened_into_the_requested_format(policies) -> None:  # type: ignore[no-untyped-def]
    dp, ring = make(policies)
    cell = ring.keys[1].seal("public.patients.name", b"\x01Alice", deterministic=False)
    client(dp, m.Parse("", "SELECT id, name FROM patients WHERE id = $1"))
    client(dp, m.Bind("", "", (), (b"1",), (0,)))
    client(dp, m.Describe("P", ""))
    client(dp, m.Execute(""))
    client(dp, m.Parse("", "SELECT 1"))  # nothing to do with the result above
    dp.client_frame(frame_of(m.SYNC))
    server(dp, PARSE_COMPLETE)
    server(dp, BIND_COMPLETE)
    rd = m.RowDescription((
        m.FieldDescription("id", 0, 0, 23, 4, -1, 0),
        m.FieldDescription("name", 0, 0, 17, -1, -1, 0),
        m.FieldDescription("tenant_id", 0, 0, 25, -1, -1, 0),  # added by the proxy
    ))
    described = m.decode_row_description(server(dp, rd.encode())[5:])
    assert described.fields[1].type_oid == 25  # the declared type, not bytea
    assert len(described.fields) == 2  # the row tenant column stays with the proxy
    row = m.DataRow((b"7", b"\\x" + cell.hex().encode(), b"acme"))
    assert m.decode_data_row(server(dp, row.encode())[5:]).values == (b"7", b"Alice")
    server(dp, m.CommandComplete("SELECT 1").encode())
    assert [n.event for n in dp.take_audit()] == ["data.decrypt"]


def test_a_bind_with_nothing_to_seal_goes_out_as_the_client_sent_it(policies) -> None:  # type: ignore[no-untyped-def]
    """A statement protected only for its result (a cell is read, none written or compared):
    its Bind is forwarded byte for byte, and the result is still opened."""
    dp, ring = make(policies)
    cell = ring.keys[1].seal("public.patients.name", b"\x01Alice", deterministic=False)
    # (The row tenant is pinned: else the proxy adds its column and a result format.)
    client(dp, m.Parse("", "SELECT id, name FROM patients WHERE tenant_id = 'acme' AND id = $1"))
    bind = m.Bind("", "", (), (b"1",), (1, 0))  # no format codes: re-encoding would add one
    assert client(dp, bind) == bind.encode()
    client(dp, m.Execute(""))
    dp.client_frame(frame_of(m.SYNC))
    server(dp, PARSE_COMPLETE)
    server(dp, BIND_COMPLETE)
    row = m.DataRow((b"\0\0\0\7", b"\\x" + cell.hex().encode()))
    assert m.decode_data_row(server(dp, row.encode())[5:]).values == (b"\0\0\0\7", b"Alice")
    server(dp, m.CommandComplete("SELECT 1").encode())
    assert [n.event for n in dp.take_audit()] == ["data.decrypt"]


def _run(dp: DataPath, sql: str, tag: str, status: str = "T") -> None:
    client(dp, m.Query(sql))
    server(dp, m.CommandComplete(tag).encode())
    server(dp, m.ReadyForQuery(status).encode())


@pytest.mark.parametrize(
    ("undo", "expected"),
    [
        ("ROLLBACK TO SAVEPOINT s", "acme"),
        ("rollback to s;", "acme"),
        ("ROLLBACK TRANSACTION TO SAVEPOINT S", "acme"),  # unquoted: folded to lower case
        ("ROLLBACK /* to where? */ TO -- here\n s", "acme"),
        ("RELEASE SAVEPOINT s", "globex"),
        ("RELEASE s", "globex"),
    ],
)
def test_savepoints_move_the_session_tenant_as_postgresql_does(  # type: ignore[no-untyped-def]
    policies, undo: str, expected: str
) -> None:
    dp, _ = make(policies, tenant="initech")
    _run(dp, "BEGIN", "BEGIN")
    _run(dp, "SET pgseal.tenant = 'acme'", "SET")
    _run(dp, "SAVEPOINT s", "SAVEPOINT")
    _run(dp, "SET pgseal.tenant = 'globex'", "SET")
    _run(dp, undo, "ROLLBACK" if undo.lower().startswith("rollback") else "RELEASE")
    assert dp.tenant.current == expected and not dp.tenant.uncertain
    _run(dp, "COMMIT", "COMMIT", "I")
    assert dp.tenant.current == expected


def test_a_refused_query_with_a_commit_in_it_leaves_the_tenant_certain(policies) -> None:  # type: ignore[no-untyped-def]
    """The COMMIT was never sent (the whole Query was refused): the error that answers the
    refusal says nothing about the tenant."""
    dp, _ = make(policies, tenant="acme")
    sql = "COMMIT; INSERT INTO patients (tenant_id, ssn) VALUES ('globex', '1')"
    out = client(dp, m.Query(sql))
    assert out == m.Query("pgseal_refused_statement").encode()
    server(dp, m.ErrorResponse.make("42601", "syntax error").encode())
    server(dp, m.ReadyForQuery("I").encode())
    assert dp.tenant.current == "acme" and not dp.tenant.uncertain


def test_a_savepoint_statement_the_proxy_cannot_read_refuses_protected_statements(  # type: ignore[no-untyped-def]
    policies,
) -> None:
    dp, _ = make(policies, tenant="acme")
    _run(dp, "BEGIN", "BEGIN")
    _run(dp, "SAVEPOINT s", "SAVEPOINT")
    _run(dp, "SET pgseal.tenant = 'globex'", "SET")
    _run(dp, 'ROLLBACK TO U&"\\0073"', "ROLLBACK")  # s, in Unicode escapes: not read here
    assert dp.tenant.uncertain
    out = client(dp, m.Query("INSERT INTO notes (body) VALUES ('x')"))
    assert out == m.Query("pgseal_refused_statement").encode()
    _run(dp, "SET pgseal.tenant = 'acme'", "SET")
    assert not dp.tenant.uncertain


def test_reading_another_tenants_cell_is_denied(policies) -> None:  # type: ignore[no-untyped-def]
    dp, ring = make(policies, tenant="acme")
    cell = ring.keys[2].seal("public.patients.name", b"\x01Bob", deterministic=False)
    client(dp, m.Query("SELECT name FROM patients"))
    server(dp, m.RowDescription((
        m.FieldDescription("name", 0, 0, 17, -1, -1, 0),
        m.FieldDescription("tenant_id", 0, 0, 25, -1, -1, 0),
    )).encode())
    out = server(dp, m.DataRow((b"\\x" + cell.hex().encode(), b"globex")).encode())
    err = m.decode_error_response(out[5:])
    assert err.sqlstate == "42501" and b"Bob" not in out
    # the rest of that result is dropped; ReadyForQuery still arrives
    assert server(dp, m.DataRow((b"\\x" + cell.hex().encode(),)).encode()) == b""
    assert server(dp, m.CommandComplete("SELECT 2").encode()) == b""
    assert server(dp, m.ReadyForQuery("I").encode()) == m.ReadyForQuery("I").encode()


def test_a_missing_key_stalls_and_the_retry_is_exact(policies) -> None:  # type: ignore[no-untyped-def]
    dp, ring = make(policies, tenant="newco")
    client(dp, m.Parse("", "INSERT INTO patients (tenant_id, ssn) VALUES ($1, $2)"))
    bind = m.Bind("", "", (), (b"newco", b"42"), ())
    with pytest.raises(NeedKeys) as need:
        client(dp, bind)
    assert need.value.tenants == frozenset({"newco"})
    pending_before = len(dp.pending)
    ring.add(3, "newco")
    out = client(dp, bind)
    assert len(dp.pending) == pending_before + 1
    sealed = m.decode_bind(out[5:]).params[1]
    assert sealed is not None and read_cell_header(sealed).key_id == 3


def test_prepared_literals_become_parameters_sealed_at_bind(policies) -> None:  # type: ignore[no-untyped-def]
    dp, _ring = make(policies, tenant="acme")
    parse = m.decode_parse(
        client(dp, m.Parse("s", "SELECT id FROM patients WHERE ssn = '1-2-3' AND id > $1"))[5:]
    )
    assert "1-2-3" not in parse.sql and "$2" in parse.sql
    assert parse.param_types == (0, 1001)  # compared: its cells under every key version
    bind = m.decode_bind(client(dp, m.Bind("", "s", (), (b"5",), ()))[5:])
    assert bind.params[0] == b"5" and len(bind.params) == 2
    # ParameterDescription hides the proxy's own parameter.
    client(dp, m.Describe("S", "s"))
    server(dp, PARSE_COMPLETE)
    server(dp, BIND_COMPLETE)
    pd = server(dp, m.ParameterDescription((23, 1001)).encode())
    assert m.decode_parameter_description(pd[5:]).type_oids == (23,)


def test_session_tenant_follows_set_local_and_rollback(policies) -> None:  # type: ignore[no-untyped-def]
    dp, _ = make(policies, tenant=None)
    client(dp, m.Query("BEGIN; SET LOCAL pgseal.tenant = 'acme'"))
    assert dp.tenant.current == "acme"
    client(dp, m.Query("ROLLBACK"))
    assert dp.tenant.current is None
    client(dp, m.Query("SET pgseal.tenant = 'globex'"))
    assert dp.tenant.current == "globex"
    client(dp, m.Query("RESET ALL"))
    assert dp.tenant.current is None


def test_compared_values_match_every_key_version(policies) -> None:  # type: ignore[no-untyped-def]
    """After a rotation a search column holds cells of several versions: a compared value
    is sent as the bytea[] of its cells under each live version, the active one first;
    a stored value only under the active one."""
    dp, ring = make(policies, tenant="acme")
    old = ring.keys[1]
    new = ring.add(7, "acme")  # rotated: 7 active, 1 retired
    sql = "UPDATE patients SET ssn = $1 WHERE ssn = $2 AND ssn IN ($3, NULL)"
    parse = m.decode_parse(client(dp, m.Parse("", sql))[5:])
    # The narrow form goes first (`ssn = $2`: one cell)...
    assert parse.param_types == (17, 17, 1001)
    # ...and acme's two versions switch the statement to the wide one before the Bind.
    switch, (kind, body) = _split(client(dp, m.Bind("", "", (), (b"new", b"old", None), ())))
    assert [k for k, _ in switch] == [b"P"] and kind == b"B"
    parse = m.decode_parse(switch[0][1])
    assert parse.param_types == (17, 1001, 1001)
    assert parse.sql == (
        "UPDATE patients SET ssn = $1 WHERE ssn = ANY($2) "
        "AND ssn = ANY ($3 || ARRAY[NULL]::bytea[])"
    )
    bind = m.decode_bind(body)
    stored, compared, missing = bind.params
    assert stored is not None and read_cell_header(stored).key_id == 7
    assert compared is not None and b"old" not in compared
    ssn = "public.patients.ssn"
    cells = [
        new.seal(ssn, b"\x01old", deterministic=True),
        old.seal(ssn, b"\x01old", deterministic=True),
    ]
    assert all(c in compared for c in cells) and compared.index(cells[0]) < compared.index(cells[1])
    assert missing is not None and missing.endswith(b"\xff\xff\xff\xff")  # {NULL}: one NULL element
    notes = dp.take_audit()
    assert {(n.event, n.key_id) for n in notes} == {("data.encrypt", 7), ("data.encrypt", 1)}


SEARCH = "SELECT name FROM patients WHERE ssn = $1"


def test_a_search_parameter_goes_as_one_cell_while_its_tenant_has_one_key_version(policies) -> None:  # type: ignore[no-untyped-def]
    """The narrow form: `ssn = $1` stays as written and takes one cell (PostgreSQL plans
    it better than `= ANY($1)`, and keeps a generic plan for a prepared statement)."""
    dp, ring = make(policies, tenant="acme")
    parse = m.decode_parse(client(dp, m.Parse("s1", SEARCH))[5:])
    assert parse.param_types == (17,)
    assert parse.sql.endswith("WHERE ssn = $1")
    out = client(dp, m.Bind("", "s1", (), (b"123",), ()))
    assert out[:1] == b"B"  # nothing injected
    cell = m.decode_bind(out[5:]).params[0]
    assert cell == ring.keys[1].seal("public.patients.ssn", b"\x01123", deterministic=True)
    assert server(dp, PARSE_COMPLETE) == PARSE_COMPLETE
    assert server(dp, BIND_COMPLETE) == BIND_COMPLETE
    assert not dp.pending


def test_a_named_statement_goes_wide_once_its_tenant_has_two_versions(policies) -> None:  # type: ignore[no-untyped-def]
    """A Bind under a tenant with several live key versions: the proxy closes the narrow
    statement and parses the wide one under the same name first, answered to itself; the
    statement stays wide after that (one switch per connection)."""
    dp, ring = make(policies, tenant="acme")
    client(dp, m.Parse("s1", SEARCH))
    assert server(dp, PARSE_COMPLETE) == PARSE_COMPLETE
    client(dp, m.Bind("", "s1", (), (b"1",), ()))  # acme: one version, narrow
    assert server(dp, BIND_COMPLETE) == BIND_COMPLETE
    old = ring.keys[1]
    new = ring.add(7, "acme")
    injected, (kind, body) = _split(client(dp, m.Bind("", "s1", (), (b"123",), ())))
    assert [k for k, _ in injected] == [b"C", b"P"] and kind == b"B"
    assert m.decode_close(injected[0][1]) == m.Close("S", "s1")
    wide = m.decode_parse(injected[1][1])
    assert (wide.name, wide.param_types) == ("s1", (1001,))
    assert wide.sql.endswith("WHERE ssn = ANY($1)")
    sent = m.decode_bind(body).params[0]
    ssn = "public.patients.ssn"
    assert sent is not None
    for key in (new, old):
        assert key.seal(ssn, b"\x01123", deterministic=True) in sent
    # The proxy's Close and Parse are answered to it alone.
    assert server(dp, CLOSE_COMPLETE) == b""
    assert server(dp, PARSE_COMPLETE) == b""
    assert server(dp, BIND_COMPLETE) == BIND_COMPLETE
    assert not dp.pending
    # Wide from now on, also for a tenant with one version; Describe reports text.
    out = client(dp, m.Bind("", "s1", (), (b"9",), ()))
    assert out[:1] == b"B" and m.decode_bind(out[5:]).param_formats == (1,)
    assert server(dp, BIND_COMPLETE) == BIND_COMPLETE
    client(dp, m.Describe("S", "s1"))
    pd = server(dp, m.ParameterDescription((1001,)).encode())
    assert m.decode_parameter_description(pd[5:]).type_oids == (25,)


def test_an_unnamed_statement_parsed_again_goes_wide_at_once_after_a_switch(policies) -> None:  # type: ignore[no-untyped-def]
    dp, ring = make(policies, tenant="acme")
    ring.add(7, "acme")
    assert m.decode_parse(client(dp, m.Parse("", SEARCH))[5:]).param_types == (17,)
    injected, (kind, _) = _split(client(dp, m.Bind("", "", (), (b"123",), ())))
    assert [k for k, _ in injected] == [b"P"] and kind == b"B"  # no Close for ""
    assert server(dp, PARSE_COMPLETE) == PARSE_COMPLETE  # the client's Parse
    assert server(dp, PARSE_COMPLETE) == b""  # the proxy's
    assert server(dp, BIND_COMPLETE) == BIND_COMPLETE
    # The driver sends the same Parse again: the wide form, no switch before the Bind.
    parse = m.decode_parse(client(dp, m.Parse("", SEARCH))[5:])
    assert parse.param_types == (1001,)
    assert client(dp, m.Bind("", "", (), (b"123",), ()))[:1] == b"B"


def test_a_search_tenant_from_a_parameter_decides_the_form_at_each_bind(policies) -> None:  # type: ignore[no-untyped-def]
    """Trusted isolation: the row tenant pinned by `tenant_id = $1` seals `card_number`."""
    dp, ring = make(policies, tenant="acme")
    ring.add(8, "globex")  # globex: 8 active, 2 retired
    sql = "SELECT amount FROM payments WHERE tenant_id = $1 AND card_number = $2"
    assert m.decode_parse(client(dp, m.Parse("p", sql))[5:]).param_types[1] == 17
    assert client(dp, m.Bind("", "p", (), (b"acme", b"4111"), ()))[:1] == b"B"
    injected, _ = _split(client(dp, m.Bind("", "p", (), (b"globex", b"4111"), ())))
    assert [k for k, _ in injected] == [b"C", b"P"]


def test_a_failed_switch_is_the_clients_error_and_the_next_bind_switches_again(policies) -> None:  # type: ignore[no-untyped-def]
    dp, ring = make(policies, tenant="acme")
    client(dp, m.Parse("s1", SEARCH))
    server(dp, PARSE_COMPLETE)
    ring.add(7, "acme")
    client(dp, m.Bind("", "s1", (), (b"123",), ()))
    client(dp, m.Execute(""))
    dp.client_frame(frame_of(m.SYNC))
    assert server(dp, CLOSE_COMPLETE) == b""
    error = m.ErrorResponse.make("42P01", 'relation "patients" does not exist').encode()
    assert server(dp, error) == error  # the client's Bind is skipped with it
    assert server(dp, m.ReadyForQuery("I").encode()) == m.ReadyForQuery("I").encode()
    assert not dp.pending
    assert "s1" not in dp.unconfirmed
    # PostgreSQL may hold nothing under "s1" now (the Close ran): the next Bind switches
    # again, whatever its tenant.
    ring.keys.pop(7)
    ring.by_tenant["acme"] = ring.keys[1]
    injected, _ = _split(client(dp, m.Bind("", "s1", (), (b"123",), ())))
    assert [k for k, _ in injected] == [b"C", b"P"]


def test_a_describe_after_a_failed_switch_switches_first(policies) -> None:  # type: ignore[no-untyped-def]
    """After a failed switch PostgreSQL may hold nothing under the name: a Describe of the
    statement brings a switch of its own (a Describe of a narrow one does not)."""
    dp, ring = make(policies, tenant="acme")
    client(dp, m.Parse("s1", SEARCH))
    server(dp, PARSE_COMPLETE)
    assert client(dp, m.Describe("S", "s1"))[:1] == b"D"
    server(dp, m.ParameterDescription((17,)).encode())
    server(dp, NO_DATA)
    ring.add(7, "acme")
    client(dp, m.Bind("", "s1", (), (b"123",), ()))
    dp.client_frame(frame_of(m.SYNC))
    server(dp, CLOSE_COMPLETE)
    # (Its Parse failed on a lock: in a failed transaction block the proxy sends none.)
    server(dp, m.ErrorResponse.make("55P03", "canceling statement due to lock timeout").encode())
    server(dp, m.ReadyForQuery("I").encode())
    injected, (kind, _) = _split(client(dp, m.Describe("S", "s1")))
    assert [k for k, _ in injected] == [b"C", b"P"] and kind == b"D"
    assert server(dp, CLOSE_COMPLETE) == b"" and server(dp, PARSE_COMPLETE) == b""
    pd = server(dp, m.ParameterDescription((1001,)).encode())
    assert m.decode_parameter_description(pd[5:]).type_oids == (25,)


def test_a_switch_skipped_after_an_earlier_error_leaves_the_narrow_statement(policies) -> None:  # type: ignore[no-untyped-def]
    dp, ring = make(policies, tenant="acme")
    client(dp, m.Parse("s1", SEARCH))
    server(dp, PARSE_COMPLETE)
    client(dp, m.Parse("", "SELECT nosuch FROM patients_x"))
    ring.add(7, "acme")
    client(dp, m.Bind("", "s1", (), (b"123",), ()))
    dp.client_frame(frame_of(m.SYNC))
    error = m.ErrorResponse.make("42P01", 'relation "patients_x" does not exist').encode()
    assert server(dp, error) == error
    assert server(dp, m.ReadyForQuery("I").encode()) == m.ReadyForQuery("I").encode()
    assert "s1" not in dp.unconfirmed
    # The next Bind switches it again.
    injected, _ = _split(client(dp, m.Bind("", "s1", (), (b"123",), ())))
    assert [k for k, _ in injected] == [b"C", b"P"]


def test_a_narrow_statement_survives_a_search_path_change_that_changes_nothing(policies) -> None:  # type: ignore[no-untyped-def]
    dp, _ = make(policies, tenant="acme")
    client(dp, m.Parse("s1", SEARCH))
    server(dp, PARSE_COMPLETE)
    client(dp, m.Query("SET search_path = public"))
    out = client(dp, m.Bind("", "s1", (), (b"123",), ()))
    assert out[:1] == b"B" and m.decode_bind(out[5:]).params[0] != b"123"


def test_compared_literal_in_a_query_becomes_an_array_of_versions(policies) -> None:  # type: ignore[no-untyped-def]
    dp, ring = make(policies, tenant="acme")
    ring.add(7, "acme")
    out = m.decode_query(
        client(dp, m.Query("SELECT name FROM patients WHERE ssn <> '1-2-3'"))[5:]
    ).sql
    assert out.startswith(
        'SELECT name , "patients"."tenant_id" FROM patients WHERE ssn <> ALL(ARRAY[\'\\x01020000000'
    )
    assert out.count("::bytea") == 2 and "1-2-3" not in out


def test_messages_after_an_error_before_sync_are_skipped_like_postgresql(policies) -> None:  # type: ignore[no-untyped-def]
    """After an error in an extended-protocol batch PostgreSQL discards every message until
    Sync. A batch flushed without Sync (psycopg's pipeline, Flush) can have its error back
    before the client sends more: those messages, a simple Query among them, get no answer,
    and the response queue must not wait for one (it used to take the Sync's ReadyForQuery
    as the Query's and end the connection, out of step, at the next ParseComplete)."""
    dp, _ = make(policies)
    client(dp, m.Parse("", "SELECT nosuchcolumn FROM patients_x"))
    client(dp, m.Bind("", "", (), (), ()))
    client(dp, m.Execute(""))
    pg_error = m.ErrorResponse.make("42P01", 'relation "patients_x" does not exist').encode()
    assert server(dp, pg_error) == pg_error  # answered after a Flush: no Sync sent yet
    # Sent after the error: PostgreSQL skips all of it, the plaintext included.
    assert client(dp, m.Query("SELECT 1")) == b""
    assert (
        client(dp, m.Parse("", "INSERT INTO patients (tenant_id, ssn) VALUES ('acme', '1')"))
        == b""
    )
    assert dp.client_frame(frame_of(m.SYNC)) == m.SYNC
    assert server(dp, m.ReadyForQuery("I").encode()) == m.ReadyForQuery("I").encode()
    assert not dp.pending
    # And the connection goes on in step.
    client(dp, m.Parse("", "SELECT 1"))
    client(dp, m.Bind("", "", (), (), ()))
    dp.client_frame(frame_of(m.SYNC))
    assert server(dp, PARSE_COMPLETE) == PARSE_COMPLETE
    assert server(dp, BIND_COMPLETE) == BIND_COMPLETE
    assert server(dp, m.ReadyForQuery("I").encode()) == m.ReadyForQuery("I").encode()
    assert not dp.pending


def _function_call(oid: int) -> bytes:
    return m.frame(b"F", struct.pack("!ihhh", oid, 0, 0, 0))


def test_a_function_call_may_change_the_tenant_unless_it_is_a_large_object_one(policies) -> None:  # type: ignore[no-untyped-def]
    """set_config('pgseal.tenant', ...) can come through FunctionCall, and nothing in it says
    so: any function but libpq's large-object ones leaves the tenant and role uncertain."""
    dp, _ = make(policies)
    dp.client_frame(frame_of(_function_call(952)))  # lo_open
    assert not dp.tenant.uncertain and not dp.role_setting.uncertain
    dp.client_frame(frame_of(_function_call(2078)))  # set_config
    assert dp.tenant.uncertain and dp.role_setting.uncertain

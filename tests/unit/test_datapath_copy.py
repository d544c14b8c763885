"""COPY through the DataPath (pure): the client's stream sealed row by row, the server's
opened, refusals, key stalls, and the response queue around them.

The server side is played by hand, as in test_datapath.py."""

from __future__ import annotations

# ruff: noqa: E501 - protocol bytes read best one message per line
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.crypto.cells import CellKey, read_cell_header
from proxy.policy import PolicySet
from proxy.policy.loader import load_policies
from proxy.rewrite import CopyOptions
from proxy.session.copyformat import CopyDialect, SplitState, split_rows
from proxy.session.datapath import DataPath, NeedKeys, SessionInfo
from proxy.wire import messages as m
from proxy.wire.framing import Frame
from tests.unit.test_datapath import FakeKeyRing

POLICY = Path(__file__).resolve().parent.parent / "data" / "policy.yaml"
PATIENTS = ("id", "tenant_id", "ssn", "name", "dob", "balance", "profile")


# The same fake key ring as the other data-path unit tests.
Ring = FakeKeyRing


@pytest.fixture(scope="module")
def policies() -> PolicySet:
    return load_policies([POLICY])


def make(
    policies: PolicySet, tenant: str | None = "acme", user: str = "app"
) -> tuple[DataPath, Ring]:
    ring = Ring()
    ring.add(1, "acme")
    ring.add(2, "globex")
    dp = DataPath(policies, ring, SessionInfo(user, "db", tenant), parameters={})
    dp.table_columns[("public", "patients")] = PATIENTS  # what the catalog query tells
    return dp, ring


def frame_of(raw: bytes) -> Frame:
    return Frame(raw[0], raw[5:])


def client(dp: DataPath, raw: bytes) -> bytes:
    return dp.client_frame(frame_of(raw))


def server(dp: DataPath, raw: bytes) -> bytes:
    return dp.server_frame(frame_of(raw))


def copy_response(kind: bytes, columns: int, fmt: int = 0) -> bytes:
    return m.frame(kind, bytes((fmt,)) + struct.pack("!h", columns) + b"\0\0" * columns)


def copy_data(data: bytes) -> bytes:
    return m.CopyData(data).encode()


def messages(raw: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    while raw:
        (length,) = struct.unpack_from("!i", raw, 1)
        out.append((raw[:1], raw[5 : 1 + length]))
        raw = raw[1 + length :]
    return out


def cell_of(field: bytes) -> bytes:
    assert field.startswith(b"\\\\x")
    return bytes.fromhex(field[3:].decode())


READY = m.ReadyForQuery("I").encode()
COMPLETE = m.CommandComplete("COPY 2").encode()


def test_copy_from_seals_rows_split_across_messages(policies: PolicySet) -> None:
    dp, ring = make(policies)
    sent = m.decode_query(client(dp, m.Query("COPY patients FROM STDIN").encode())[5:]).sql
    # No column list: the live one is written in, so both sides agree on every field.
    assert sent == 'COPY patients ("id", "tenant_id", "ssn", "name", "dob", "balance", "profile") FROM STDIN'
    assert server(dp, copy_response(b"G", 7)) == copy_response(b"G", 7)
    first = client(dp, copy_data(b"1\tacme\t123-45-6789\tAlice\\tB\t1980-01-02\t12.50\t{\"a\": 1}\n2\tacme\t9"))
    second = client(dp, copy_data(b"87\t\\N\t\\N\t\\N\t\\N\n"))
    rows = [body for kind, body in messages(first + second) if kind == b"d"]
    assert rows[0].count(b"\n") == 1 and rows[1].count(b"\n") == 1  # whole rows only
    assert b"Alice" not in first and b"123-45-6789" not in first and b"987" not in second
    fields = rows[0].rstrip(b"\n").split(b"\t")
    assert fields[:2] == [b"1", b"acme"]
    ssn, name, dob = (cell_of(f) for f in fields[2:5])
    assert read_cell_header(ssn).suite == 2 and read_cell_header(name).suite == 1  # search: SIV
    key = ring.keys[1]
    assert key.open("public.patients.name", name) == b"\x01Alice\tB"
    assert key.open("public.patients.dob", dob)[:1] == b"\x07"
    assert rows[1].rstrip(b"\n").split(b"\t")[3:] == [b"\\N", b"\\N", b"\\N", b"\\N"]
    assert rows[1].split(b"\t")[2].startswith(b"\\\\x")  # the ssn split across messages
    done = client(dp, m.COPY_DONE)
    assert done == m.COPY_DONE
    assert dp.copy_in is None
    assert server(dp, COMPLETE) == COMPLETE and server(dp, READY) == READY
    (note,) = dp.take_audit()
    assert note.event == "data.encrypt" and note.count == 6 and note.tenant == "acme"
    assert note.columns == ("balance", "dob", "name", "profile", "ssn")


def test_copy_from_csv_with_header_and_a_last_row_without_newline(policies: PolicySet) -> None:
    dp, ring = make(policies)
    client(dp, m.Query("COPY patients (tenant_id, name) FROM STDIN (FORMAT csv, HEADER)").encode())
    server(dp, copy_response(b"G", 2))
    out = client(dp, copy_data(b'tenant_id,name\r\nacme,"Smith, ""J"""\r\nacme,'))
    header, row = out[5:].split(b"\r\n")[:2]
    assert header == b"tenant_id,name"  # passed on as written (PostgreSQL skips it)
    assert ring.keys[1].open("public.patients.name", bytes.fromhex(row.split(b",")[1][2:].decode())) == b'\x01Smith, "J"'
    done = client(dp, m.COPY_DONE)
    (data, end) = messages(done)
    assert data == (b"d", b"acme,\r\n") and end == (b"c", b"")  # an empty CSV field: NULL


def test_a_row_of_another_tenant_fails_the_whole_copy(policies: PolicySet) -> None:
    dp, _ = make(policies)
    client(dp, m.Query("COPY patients (tenant_id, name) FROM STDIN").encode())
    server(dp, copy_response(b"G", 2))
    assert client(dp, copy_data(b"acme\tAlice\n"))[:1] == b"d"
    failed = client(dp, copy_data(b"acme\tBob\nglobex\tCarol\n"))
    (kind, body), = messages(failed)
    assert kind == b"f" and b"Bob" not in failed and b"Carol" not in failed
    assert b"row 3 differs from the session tenant" in body
    # The rest of the client's stream goes nowhere.
    assert client(dp, copy_data(b"acme\tDave\n")) == b""
    assert client(dp, m.COPY_DONE) == b""
    assert dp.copy_in is None
    pg_error = m.ErrorResponse.make("57014", "COPY from stdin failed: pgseal: ...").encode()
    ours = m.decode_error_response(server(dp, pg_error)[5:])
    assert ours.sqlstate == "42501" and "public.patients" in (ours.message or "")
    assert server(dp, READY) == READY and not dp.pending
    assert [n.event for n in dp.take_audit()] == ["data.deny", "data.encrypt"]


@pytest.mark.parametrize(
    ("tenant", "sql", "rows", "message"),
    [
        (None, "COPY patients (tenant_id, name) FROM STDIN", b"acme\tA\n", "needs a session tenant"),
        ("acme", "COPY patients (tenant_id, name) FROM STDIN", b"\\N\tA\n", "no tenant for row 1"),
        (None, "COPY notes (body) FROM STDIN", b"x\n", "no tenant for row 1"),
        (None, "COPY payments (card_number) FROM STDIN", b"4111\n", "no tenant for row 1"),
        ("acme", "COPY patients (tenant_id, name) FROM STDIN", b"acme\n", "has 1 fields for 2"),
        ("acme", "COPY patients (tenant_id, dob) FROM STDIN", b"acme\tnot a date\n", "dob"),
    ],
)
def test_copy_from_refusals(
    policies: PolicySet, tenant: str | None, sql: str, rows: bytes, message: str
) -> None:
    dp, _ = make(policies, tenant)
    client(dp, m.Query(sql).encode())
    server(dp, copy_response(b"G", sql.count(",") + 1))
    (kind, body), = messages(client(dp, copy_data(rows)))
    assert kind == b"f" and message in body.decode(), body


def test_trusted_isolation_seals_each_row_under_its_own_tenant(policies: PolicySet) -> None:
    dp, _ = make(policies, None)
    client(dp, m.Query("COPY payments (tenant_id, card_number) FROM STDIN").encode())
    server(dp, copy_response(b"G", 2))
    out = client(dp, copy_data(b"acme\t4111\nglobex\t4222\n"))
    rows = [r.split(b"\t") for r in out[5:].split(b"\n")[:2]]
    assert [read_cell_header(cell_of(r[1])).key_id for r in rows] == [1, 2]


def test_a_missing_key_stalls_the_message_and_the_retry_is_exact(policies: PolicySet) -> None:
    dp, ring = make(policies, "initech")
    client(dp, m.Query("COPY patients (tenant_id, name) FROM STDIN").encode())
    server(dp, copy_response(b"G", 2))
    chunk = copy_data(b"initech\tAlice\ninitech\tB")
    with pytest.raises(NeedKeys) as need:
        client(dp, chunk)
    assert need.value.tenants == frozenset({"initech"})
    ring.add(3, "initech")
    out = client(dp, chunk)  # the same message again: nothing of the first try remains
    assert out[5:].count(b"\n") == 1
    final = client(dp, copy_data(b"ob\n"))
    assert ring.keys[3].open("public.patients.name", cell_of(final[5:-1].split(b"\t")[1])) == b"\x01Bob"


def test_copy_to_opens_cells_and_keeps_the_rest(policies: PolicySet) -> None:
    dp, ring = make(policies)
    client(dp, m.Query("COPY patients (id, tenant_id, name, dob) TO STDOUT (FORMAT csv, HEADER)").encode())
    assert server(dp, copy_response(b"H", 4)) == copy_response(b"H", 4)
    key = ring.keys[1]
    name = key.seal("public.patients.name", b"\x01Smith, J", deterministic=False)
    header = copy_data(b"id,tenant_id,name,dob\n")
    assert server(dp, header) == header
    row = copy_data(b"7,acme,\\x" + name.hex().encode() + b",\n")
    assert server(dp, row) == copy_data(b'7,acme,"Smith, J",\n')
    assert server(dp, m.COPY_DONE) == m.COPY_DONE
    assert server(dp, COMPLETE) == COMPLETE and server(dp, READY) == READY
    assert dp.copy_out is None
    (note,) = dp.take_audit()
    assert note.event == "data.decrypt" and note.count == 1 and note.columns == ("name",)


def test_copy_to_of_another_tenants_row_fails_the_result(policies: PolicySet) -> None:
    dp, ring = make(policies)
    client(dp, m.Query("COPY patients (tenant_id, name) TO STDOUT").encode())
    server(dp, copy_response(b"H", 2))
    theirs = ring.keys[2].seal("public.patients.name", b"\x01Eve", deterministic=False)
    error = server(dp, copy_data(b"globex\t\\\\x" + theirs.hex().encode() + b"\n"))
    err = m.decode_error_response(error[5:])
    assert err.sqlstate == "42501" and b"Eve" not in error
    assert server(dp, copy_data(b"more\n")) == b""  # the rest of the result is dropped
    assert server(dp, m.COPY_DONE) == b"" and server(dp, COMPLETE) == b""
    assert server(dp, READY) == READY
    assert [n.event for n in dp.take_audit()] == ["data.deny"]


def test_copy_to_for_a_cross_tenant_role_and_a_cell_moved_between_rows(policies: PolicySet) -> None:
    dp, ring = make(policies, None, user="auditor")
    client(dp, m.Query("COPY patients (tenant_id, name) TO STDOUT").encode())
    server(dp, copy_response(b"H", 2))
    theirs = ring.keys[2].seal("public.patients.name", b"\x01Eve", deterministic=False)
    field = b"\\\\x" + theirs.hex().encode()
    assert server(dp, copy_data(b"globex\t" + field + b"\n")) == copy_data(b"globex\tEve\n")
    moved = server(dp, copy_data(b"acme\t" + field + b"\n"))  # globex's cell in an acme row
    assert m.decode_error_response(moved[5:]).sqlstate == "42501"


def test_copy_to_waits_for_a_key_and_opens_the_same_message(policies: PolicySet) -> None:
    dp, ring = make(policies)
    client(dp, m.Query("COPY patients (name) TO STDOUT").encode())
    server(dp, copy_response(b"H", 1))
    later = CellKey(9, "acme", b"\x09" * 32)
    row = copy_data(b"\\\\x" + later.seal("public.patients.name", b"\x01Ann", deterministic=False).hex().encode() + b"\n")
    with pytest.raises(NeedKeys) as need:
        server(dp, row)
    assert need.value.key_ids == frozenset({9})
    ring.keys[9] = later
    assert server(dp, row) == copy_data(b"Ann\n")


def test_extended_protocol_copy_from_and_the_sync_postgresql_ignores(policies: PolicySet) -> None:
    dp, _ = make(policies)
    parse = client(dp, m.Parse("", "COPY patients FROM STDIN").encode())
    assert b'"profile") FROM STDIN' in parse
    client(dp, m.Bind("", "", (), (), ()).encode())
    assert client(dp, m.Execute("").encode()) == m.Execute("").encode()
    client(dp, m.SYNC)  # libpq sends it at once; PostgreSQL ignores it inside the COPY
    server(dp, b"1\0\0\0\4")
    server(dp, b"2\0\0\0\4")
    server(dp, copy_response(b"G", 7))
    assert dp.ignored_syncs == 1
    out = client(dp, copy_data(b"1\tacme\t1\tAnn\t\\N\t\\N\t\\N\n"))
    assert b"Ann" not in out
    client(dp, m.COPY_DONE)
    client(dp, m.SYNC)
    assert server(dp, COMPLETE) == COMPLETE and server(dp, READY) == READY
    assert not dp.pending


def test_extended_execute_of_a_second_copy_from_is_refused_in_order(policies: PolicySet) -> None:
    dp, _ = make(policies)
    client(dp, m.Parse("", "COPY patients (tenant_id, name) FROM STDIN").encode())
    client(dp, m.Bind("", "", (), (), ()).encode())
    client(dp, m.Execute("").encode())
    client(dp, m.Bind("", "", (), (), ()).encode())
    refused = client(dp, m.Execute("").encode())
    assert refused == m.Execute("pgseal.refused").encode()


def test_copy_that_fails_before_it_starts_lets_go_of_the_stream(policies: PolicySet) -> None:
    dp, _ = make(policies)
    client(dp, m.Query("COPY patients (tenant_id, name) FROM STDIN").encode())
    assert dp.copy_in is not None
    server(dp, m.ErrorResponse.make("42501", "permission denied for table patients").encode())
    assert dp.copy_in is None
    server(dp, READY)
    assert not dp.pending


def test_copy_without_column_list_needs_the_catalog(policies: PolicySet) -> None:
    dp, _ = make(policies)
    dp.table_columns.clear()
    out = client(dp, m.Query("COPY patients TO STDOUT").encode())
    assert out == m.Query("pgseal_refused_statement").encode()
    err = m.decode_error_response(server(dp, m.ErrorResponse.make("42601", "x").encode())[5:])
    assert "without a column list" in (err.message or "")


def test_two_copies_in_one_query_string_are_refused(policies: PolicySet) -> None:
    dp, _ = make(policies)
    out = client(dp, m.Query("COPY patients (name) FROM STDIN; COPY notes (body) FROM STDIN").encode())
    assert out == m.Query("pgseal_refused_statement").encode()


def test_catalog_query_learns_column_lists(policies: PolicySet) -> None:
    dp, _ = make(policies)
    dp.table_columns.clear()
    query = dp.catalog_query(m.ReadyForQuery("I").encode())
    assert b"attname" in query
    row = m.DataRow((b"16384", b"crm", b"Contacts", b'{Id,TenantId,"Phone Number","a,b"}')).encode()
    assert server(dp, row) == b""
    assert dp.table_columns[("crm", "Contacts")] == ("Id", "TenantId", "Phone Number", "a,b")


texts = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=10
)


@pytest.mark.parametrize("fmt", ["text", "csv"])
@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.tuples(st.one_of(st.none(), texts), texts), min_size=1, max_size=8),
    cuts=st.lists(st.integers(0, 400), max_size=10),
)
def test_any_chunking_forwards_whole_rows_of_cells_that_open_to_the_values(
    policies: PolicySet, fmt: str, rows: list[tuple[str | None, str]], cuts: list[int]
) -> None:
    dp, ring = make(policies)
    options = "(FORMAT csv)" if fmt == "csv" else ""
    client(dp, m.Query(f"COPY patients (name, id) FROM STDIN {options}").encode())
    server(dp, copy_response(b"G", 2))
    dialect = CopyDialect.of(CopyOptions(format=fmt))
    stream = b"".join(
        dialect.text_field(None if name is None else name.encode()) + dialect.delimiter
        + dialect.text_field(plain.encode()) + b"\n"
        for name, plain in rows
    )
    points = sorted({c % (len(stream) + 1) for c in cuts})
    sent = b"".join(
        client(dp, copy_data(stream[a:b]))
        for a, b in zip([0, *points], [*points, len(stream)], strict=True)
        if b > a
    )
    sent += client(dp, m.COPY_DONE)
    data = b"".join(body for kind, body in messages(sent) if kind == b"d")
    assert messages(sent)[-1] == (b"c", b"")
    got, _ = split_rows(dialect, SplitState(), data, final=True)
    assert len(got) == len(rows)
    for line, (name, plain) in zip(got, rows, strict=True):
        name_field, plain_field = dialect.split_fields(line)
        assert dialect.read_field(plain_field) == plain.encode()
        value = dialect.read_field(name_field)
        if name is None:
            assert value is None
        else:
            assert isinstance(value, bytes) and value.startswith(b"\\x")
            assert ring.keys[1].open("public.patients.name", bytes.fromhex(value[2:].decode())) == b"\x01" + name.encode()

"""DataPath: the proxy's statement and portal records never drift from the server's.

Each test replays a proof of concept of the security review (C4 A-D, C3, M1): a Bind
the proxy cannot vouch for is refused by substitution, and no plaintext is forwarded.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.policy.loader import load_policies
from proxy.session.datapath import DataPath, SessionInfo
from proxy.wire import messages as m
from tests.unit.test_datapath import (
    BIND_COMPLETE,
    PARSE_COMPLETE,
    POLICY,
    FakeKeyRing,
    client,
    frame_of,
    make,
    server,
)

INS = "INSERT INTO patients (tenant_id, ssn) VALUES ($1, $2)"
SSN = b"123-45-6789"
CLOSE_COMPLETE = b"3\0\0\0\4"
RFQ = m.ReadyForQuery("I").encode()
RESERVED = "pgseal.refused"


@pytest.fixture(scope="module")
def policies():  # type: ignore[no-untyped-def]
    return load_policies([POLICY])


def sync(dp: DataPath) -> bytes:
    return dp.client_frame(frame_of(m.SYNC))


def server_error(sqlstate: str = "42P05") -> bytes:
    return m.ErrorResponse.make(sqlstate, "server error").encode()


def bind_ssn(dp: DataPath, statement: str, portal: str = "") -> bytes:
    return client(dp, m.Bind(portal, statement, (0,), (b"acme", SSN), ()))


def refused_in_order(dp: DataPath, out: bytes, sqlstate: str) -> None:
    """`out` is a substitute (no plaintext); the server's error for it becomes ours."""
    assert SSN not in out
    assert b"pgseal.refused" in out or b"pgseal_refused_statement" in out
    sent = server(dp, server_error("XX000"))
    assert b"C" + sqlstate.encode() + b"\0" in sent


def set_search_path(dp: DataPath, value: str) -> None:
    client(dp, m.Query(f"SET search_path = {value}"))
    server(dp, b"C\0\0\0\x08SET\0")
    server(dp, RFQ)
    assert dp.search_path == tuple(v.strip() for v in value.split(","))


def prepared(dp: DataPath, name: str, sql: str = INS) -> None:
    client(dp, m.Parse(name, sql))
    sync(dp)
    server(dp, PARSE_COMPLETE)
    server(dp, RFQ)


def test_close_then_parse_in_one_pipeline_keeps_the_new_record(policies) -> None:  # type: ignore[no-untyped-def]
    dp, _ = make(policies)
    prepared(dp, "s1")
    old = dp.statements["s1"]
    client(dp, m.Close("S", "s1"))
    client(dp, m.Parse("s1", INS))
    sync(dp)
    server(dp, CLOSE_COMPLETE)
    server(dp, PARSE_COMPLETE)
    server(dp, RFQ)
    assert dp.statements["s1"] is not old
    out = bind_ssn(dp, "s1")
    assert SSN not in out
    assert b"pgseal.refused" not in out  # sealed, not refused


def test_close_then_failed_parse_leaves_no_record(policies) -> None:  # type: ignore[no-untyped-def]
    dp, _ = make(policies)
    prepared(dp, "s1")
    client(dp, m.Close("S", "s1"))
    client(dp, m.Parse("s1", INS))
    sync(dp)
    server(dp, CLOSE_COMPLETE)
    server(dp, server_error("42601"))
    server(dp, RFQ)
    assert "s1" not in dp.statements
    refused_in_order(dp, bind_ssn(dp, "s1"), "26000")


def test_reparse_of_an_existing_name_is_refused_and_keeps_the_record(policies) -> None:  # type: ignore[no-untyped-def]
    dp, _ = make(policies)
    prepared(dp, "s1")
    old = dp.statements["s1"]
    out = client(dp, m.Parse("s1", "SELECT $1::text, $2::text"))
    assert b"SELECT $1" not in out
    sync(dp)
    sent = server(dp, server_error("42601"))
    assert b"42P05" in sent and b"already exists" in sent
    server(dp, RFQ)
    assert dp.statements["s1"] is old
    out = bind_ssn(dp, "s1")
    assert SSN not in out


def test_refused_reparse_of_an_existing_name_keeps_the_record(policies) -> None:  # type: ignore[no-untyped-def]
    dp, _ = make(policies)
    prepared(dp, "s1")
    old = dp.statements["s1"]
    client(dp, m.Parse("s1", "SELECT * FROM patients WHERE name LIKE 'a%'"))
    sync(dp)
    server(dp, server_error())
    server(dp, RFQ)
    assert dp.statements["s1"] is old
    assert SSN not in bind_ssn(dp, "s1")


def test_skipped_unnamed_parse_restores_the_old_record(policies) -> None:  # type: ignore[no-untyped-def]
    dp, _ = make(policies)
    prepared(dp, "")
    old = dp.statements[""]
    client(dp, m.Execute("nope"))
    client(dp, m.Parse("", "SELECT $1::text, $2::text"))
    sync(dp)
    server(dp, server_error("34000"))
    server(dp, RFQ)
    assert dp.statements[""] is old  # PostgreSQL still holds it
    # ... but the client's next Bind was written for the statement it prepared last, not
    # for this one: refused until it prepares again (tests/unit/test_datapath_fuzz.py).
    refused_in_order(dp, bind_ssn(dp, ""), "26000")
    sync(dp)
    server(dp, RFQ)
    prepared(dp, "")
    out = bind_ssn(dp, "")
    assert SSN not in out
    assert b"pgseal.refused" not in out  # prepared again: sealed as usual


def test_failed_unnamed_parse_drops_the_record(policies) -> None:  # type: ignore[no-untyped-def]
    dp, _ = make(policies)
    prepared(dp, "")
    client(dp, m.Parse("", "SELECT $1::text, $2::text, nonsense("))
    sync(dp)
    server(dp, server_error("42601"))
    server(dp, RFQ)
    assert "" not in dp.statements  # PostgreSQL dropped the unnamed statement first
    refused_in_order(dp, bind_ssn(dp, ""), "26000")


def test_bind_of_an_unknown_statement_is_refused(policies) -> None:  # type: ignore[no-untyped-def]
    dp, _ = make(policies)
    out = bind_ssn(dp, "never_parsed")
    refused_in_order(dp, out, "26000")


def test_close_portal_then_bind_portal_keeps_the_new_portal(policies) -> None:  # type: ignore[no-untyped-def]
    dp, _ = make(policies)
    prepared(dp, "s1")
    client(dp, m.Query("BEGIN"))
    server(dp, b"C\0\0\0\x0aBEGIN\0")
    server(dp, m.ReadyForQuery("T").encode())
    bind_ssn(dp, "s1", "p1")
    sync(dp)
    server(dp, BIND_COMPLETE)
    server(dp, m.ReadyForQuery("T").encode())
    old = dp.portals["p1"]
    client(dp, m.Close("P", "p1"))
    bind_ssn(dp, "s1", "p1")
    sync(dp)
    server(dp, CLOSE_COMPLETE)
    server(dp, BIND_COMPLETE)
    server(dp, m.ReadyForQuery("T").encode())
    assert dp.portals["p1"] is not old


def test_search_path_change_refuses_a_statement_planned_under_another(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "version: 1\ntables:\n"
        "  clinic.patients:\n    tenant: {column: tenant_id}\n"
        "    columns:\n      ssn: {type: text, search: equality}\n"
        "  lab.patients:\n    tenant: {column: tenant_id}\n"
        "    columns:\n      ssn: {type: text}\n"
    )
    ring = FakeKeyRing()
    ring.add(1, "acme")
    dp = DataPath(load_policies([path]), ring, SessionInfo("app", "db", "acme"), parameters={})
    set_search_path(dp, "clinic")
    prepared(dp, "s")
    assert dp.statements["s"].plan.kind == "protected"
    set_search_path(dp, "lab")
    out = bind_ssn(dp, "s")
    assert SSN not in out and b"pgseal.refused" in out
    sent = server(dp, server_error("26000"))
    assert b"0A000" in sent and b"another search_path" in sent


def test_search_path_change_with_the_same_plan_binds(policies) -> None:  # type: ignore[no-untyped-def]
    dp, _ = make(policies)
    prepared(dp, "s1", "SELECT $1::text")
    set_search_path(dp, "scratch, public")
    out = client(dp, m.Bind("", "s1", (0,), (b"x",), ()))
    assert out.startswith(b"B") and b"pgseal.refused" not in out


def test_reserved_names_are_refused(policies) -> None:  # type: ignore[no-untyped-def]
    for msg in (
        m.Parse(RESERVED, "SELECT 1"),
        m.Bind("", RESERVED, (), (), ()),
        m.Bind(RESERVED, "", (), (), ()),
        m.Describe("S", RESERVED),
        m.Describe("P", RESERVED),
        m.Close("S", RESERVED),
        m.Close("P", RESERVED),
        m.Execute(RESERVED),
    ):
        dp, _ = make(policies)
        prepared(dp, "")
        out = client(dp, msg)
        assert out == m.Parse(RESERVED, "pgseal_refused_statement", ()).encode(), msg
        sent = server(dp, server_error("42601"))
        assert b"42939" in sent and b"reserved" in sent
        assert RESERVED not in dp.statements and RESERVED not in dp.portals


def test_several_statements_in_one_parse_touching_a_protected_column_are_refused(policies) -> None:  # type: ignore[no-untyped-def]
    dp, _ = make(policies)
    out = client(
        dp,
        m.Parse(
            "", "INSERT INTO patients (tenant_id, ssn) VALUES ('acme', '123-45-6789'); SELECT 1"
        ),
    )
    refused_in_order(dp, out, "42601")


def test_sql_deallocate_forgets_the_statement(policies) -> None:  # type: ignore[no-untyped-def]
    dp, _ = make(policies)
    prepared(dp, "s1")
    client(dp, m.Query("DEALLOCATE s1"))
    server(dp, b"C\0\0\0\x0fDEALLOCATE\0")
    server(dp, RFQ)
    # The name may be prepared again, and a Bind of the old one is not forwarded raw.
    assert "s1" not in dp.statements
    prepared(dp, "s1")
    assert "s1" in dp.statements


def test_discard_all_forgets_every_statement(policies) -> None:  # type: ignore[no-untyped-def]
    dp, _ = make(policies)
    prepared(dp, "s1")
    prepared(dp, "s2")
    client(dp, m.Query("DISCARD ALL"))
    assert "s1" not in dp.statements and "s2" not in dp.statements


def test_deallocate_forgets_an_unconfirmed_name(policies) -> None:  # type: ignore[no-untyped-def]
    dp, _ = make(policies)
    prepared(dp, "s1")
    prepared(dp, "s2")
    for name in ("s1", "s2"):
        client(dp, m.Parse(name, INS))  # exists: refused (42P05); PostgreSQL keeps the old one
        sync(dp)
        server(dp, server_error("XX000"))
        server(dp, RFQ)
    assert dp.unconfirmed == {"s1", "s2"}
    client(dp, m.Query("DEALLOCATE s1"))
    assert dp.unconfirmed == {"s2"} and "s1" not in dp.statements
    client(dp, m.Query("DEALLOCATE ALL"))
    assert not dp.unconfirmed and not dp.statements
    out = bind_ssn(dp, "s2")  # unknown now: still refused
    assert SSN not in out and b"pgseal.refused" in out

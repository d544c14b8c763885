"""H1 (SET ROLE never widens privileges) and H2 (no decryption while the key
service reports a fault, e.g. the audit sink is down)."""

from __future__ import annotations

import struct

from proxy.errors import KeyServiceUnavailable
from proxy.session.datapath import DataPath, SessionInfo
from proxy.wire import messages as m
from tests.unit.test_datapath import FakeKeyRing, client, policies, server

__all__ = ["policies"]  # the module-scoped fixture

READY_I = m.ReadyForQuery("I").encode()


def make_as(policies, user: str, tenant: str | None = "acme"):  # type: ignore[no-untyped-def]
    ring = FakeKeyRing()
    ring.add(1, "acme")
    ring.add(2, "globex")
    return DataPath(policies, ring, SessionInfo(user, "db", tenant), parameters={}), ring


# `SELECT name FROM patients` as PostgreSQL answers it: the proxy added the row's tenant.
NAME_AND_ROW_TENANT = m.RowDescription((
    m.FieldDescription("name", 0, 0, 17, -1, -1, 0),
    m.FieldDescription("tenant_id", 0, 0, 25, -1, -1, 0),
)).encode()


def _read_other_tenant(dp: DataPath, ring: FakeKeyRing) -> bytes:
    cell = ring.keys[2].seal("public.patients.name", b"\x01Bob", deterministic=False)
    client(dp, m.Query("SELECT name FROM patients"))
    server(dp, NAME_AND_ROW_TENANT)
    return server(dp, m.DataRow((b"\\x" + cell.hex().encode(), b"globex")).encode())


def test_failed_set_role_grants_nothing(policies) -> None:  # type: ignore[no-untyped-def]
    dp, ring = make_as(policies, "app")
    client(dp, m.Query("SET ROLE auditor"))
    server(dp, m.ErrorResponse.make("42501", "permission denied to set role").encode())
    server(dp, READY_I)
    assert dp.role == "app"
    out = _read_other_tenant(dp, ring)
    assert b"Bob" not in out and m.decode_error_response(out[5:]).sqlstate == "42501"


def test_set_role_as_sent_never_widens_the_login_users_privileges(policies) -> None:  # type: ignore[no-untyped-def]
    dp, ring = make_as(policies, "app")
    cell = ring.keys[2].seal("public.patients.name", b"\x01Bob", deterministic=False)
    # In a block the server may still roll the SET back; the proxy cannot know yet.
    client(dp, m.Query("BEGIN; SET ROLE auditor; SELECT name FROM patients"))
    server(dp, m.CommandComplete("BEGIN").encode())
    server(dp, m.CommandComplete("SET").encode())
    server(dp, NAME_AND_ROW_TENANT)
    out = server(dp, m.DataRow((b"\\x" + cell.hex().encode(), b"globex")).encode())
    assert b"Bob" not in out and m.decode_error_response(out[5:]).sqlstate == "42501"


def test_set_local_role_ends_with_the_block(policies) -> None:  # type: ignore[no-untyped-def]
    dp, _ = make_as(policies, "app")
    client(dp, m.Query("BEGIN"))
    server(dp, m.CommandComplete("BEGIN").encode())
    server(dp, m.ReadyForQuery("T").encode())
    client(dp, m.Query("SET LOCAL ROLE auditor"))
    client(dp, m.Query("ROLLBACK"))
    assert dp.role == "app"


def test_set_role_can_narrow_a_privileged_login(policies) -> None:  # type: ignore[no-untyped-def]
    dp, ring = make_as(policies, "auditor")
    client(dp, m.Query("SET ROLE app"))
    server(dp, m.CommandComplete("SET").encode())
    server(dp, READY_I)
    out = _read_other_tenant(dp, ring)
    assert b"Bob" not in out and m.decode_error_response(out[5:]).sqlstate == "42501"
    dp, ring = make_as(policies, "auditor")
    out = _read_other_tenant(dp, ring)
    assert m.decode_data_row(out[5:]).values == (b"Bob",)


def test_data_row_is_not_opened_while_the_key_service_reports_a_fault(policies) -> None:  # type: ignore[no-untyped-def]
    dp, ring = make_as(policies, "app")
    cell = ring.keys[1].seal("public.patients.name", b"\x01Alice", deterministic=False)
    client(dp, m.Query("SELECT name FROM patients"))
    server(dp, NAME_AND_ROW_TENANT)
    ring.fault = KeyServiceUnavailable("pgseal: audit sink unavailable")
    out = server(dp, m.DataRow((b"\\x" + cell.hex().encode(), b"acme")).encode())
    assert b"Alice" not in out and m.decode_error_response(out[5:]).sqlstate == "58030"
    assert server(dp, m.CommandComplete("SELECT 1").encode()) == b""
    assert server(dp, READY_I) == READY_I
    assert [n.event for n in dp.take_audit()] == []


def _copy_response(kind: bytes, columns: int) -> bytes:
    return m.frame(kind, b"\0" + struct.pack("!h", columns) + b"\0\0" * columns)


def test_copy_to_is_not_opened_while_the_key_service_reports_a_fault(policies) -> None:  # type: ignore[no-untyped-def]
    for fault_before_start in (True, False):
        dp, ring = make_as(policies, "app")
        mine = ring.keys[1].seal("public.patients.name", b"\x01Alice", deterministic=False)
        client(dp, m.Query("COPY patients (tenant_id, name) TO STDOUT"))
        if fault_before_start:
            ring.fault = KeyServiceUnavailable("pgseal: audit sink unavailable")
        first = server(dp, _copy_response(b"H", 2))
        ring.fault = KeyServiceUnavailable("pgseal: audit sink unavailable")
        data = server(dp, m.CopyData(b"acme\t\\\\x" + mine.hex().encode() + b"\n").encode())
        out = first + data
        assert b"Alice" not in out
        error = first if fault_before_start else data
        assert m.decode_error_response(error[5:]).sqlstate == "58030"
        assert server(dp, m.COPY_DONE) == b""
        assert server(dp, m.CommandComplete("COPY 1").encode()) == b""
        assert server(dp, READY_I) == READY_I

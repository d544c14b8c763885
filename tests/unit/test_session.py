"""ProxySession (pure): startup negotiation, auth pass-through, busy tracking."""

from __future__ import annotations

from proxy.session.connection import (
    CloseConnection,
    ConnectUpstream,
    ForwardCancel,
    Phase,
    ProxySession,
    StartClientTls,
)
from proxy.wire import messages as m

STARTUP = m.StartupMessage(m.PROTOCOL_3_0, (("user", "app"), ("database", "db")))


def ready_session(tls: bool = False) -> ProxySession:
    s = ProxySession(client_tls_available=False)
    s.client_data(STARTUP.encode())
    s.upstream_connected(tls=tls)
    s.drain()
    s.server_data(m.Authentication(m.AUTH_OK).encode() + m.BackendKeyData(7, 9).encode()
                  + m.ParameterStatus("TimeZone", "UTC").encode() + m.ReadyForQuery("I").encode())
    s.drain()
    return s


def test_ssl_request_without_tls_is_answered_n_then_startup_connects() -> None:
    s = ProxySession(client_tls_available=False)
    s.client_data(m.SSLRequest().encode())
    _to_server, to_client, effects = s.drain()
    assert to_client == [b"N"] and not effects
    s.client_data(STARTUP.encode())
    _, _, effects = s.drain()
    assert effects == [ConnectUpstream(STARTUP)]
    assert s.phase is Phase.CONNECTING


def test_ssl_request_with_tls_starts_tls() -> None:
    s = ProxySession(client_tls_available=True)
    s.client_data(m.SSLRequest().encode())
    _, to_client, effects = s.drain()
    assert to_client == [b"S"] and effects == [StartClientTls()]


def test_plaintext_pipelined_after_ssl_request_is_refused() -> None:
    s = ProxySession(client_tls_available=True)
    s.client_data(m.SSLRequest().encode() + STARTUP.encode())
    _, to_client, effects = s.drain()
    assert isinstance(effects[-1], CloseConnection)
    assert b"08P01" in b"".join(to_client)


def test_gssenc_request_is_answered_n() -> None:
    s = ProxySession(client_tls_available=False)
    s.client_data(m.GSSENCRequest().encode())
    assert s.drain()[1] == [b"N"]


def test_cancel_request_is_forwarded_and_closes() -> None:
    s = ProxySession(client_tls_available=False)
    s.client_data(m.CancelRequest(1, 2).encode())
    _, _, effects = s.drain()
    assert effects == [
        ForwardCancel(m.CancelRequest(1, 2)), CloseConnection("cancel request forwarded")
    ]


def test_scram_plus_is_removed_from_the_offer() -> None:
    s = ProxySession(client_tls_available=False)
    s.client_data(STARTUP.encode())
    s.upstream_connected(tls=True)
    s.drain()
    s.server_data(m.Authentication.sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]).encode())
    _, to_client, _ = s.drain()
    raw = b"".join(to_client)
    assert m.decode_authentication(raw[5:]).sasl_mechanisms == ("SCRAM-SHA-256",)


def test_channel_binding_flag_y_over_tls_upstream_is_refused_clearly() -> None:
    s = ProxySession(client_tls_available=True)
    s.client_data(STARTUP.encode())
    s.upstream_connected(tls=True)
    s.server_data(m.Authentication.sasl(["SCRAM-SHA-256"]).encode())
    s.drain()
    s.client_data(m.SASLInitialResponse("SCRAM-SHA-256", b"y,,n=,r=abc").encode())
    to_server, to_client, effects = s.drain()
    assert b"".join(to_server) == b""
    assert b"channel_binding=disable" in b"".join(to_client)
    assert isinstance(effects[-1], CloseConnection)


def test_busy_tracks_syncs_against_ready_for_query() -> None:
    s = ready_session()
    assert not s.busy and s.backend_key == m.BackendKeyData(7, 9)
    assert s.parameters["TimeZone"] == "UTC"
    pipeline = m.Parse("", "select 1").encode() + m.Execute("").encode() + m.SYNC + m.SYNC
    assert s.client_passes(pipeline)
    assert s.awaiting_ready == 2 and s.busy
    assert s.server_passes(m.ReadyForQuery("I").encode())
    assert s.awaiting_ready == 1
    s.server_data(b"1\0\0\0\4" + m.ReadyForQuery("T").encode())
    assert s.awaiting_ready == 0 and s.transaction_status == "T" and s.busy


def test_terminate_closes_after_forwarding() -> None:
    s = ready_session()
    s.client_data(m.TERMINATE)
    to_server, _, effects = s.drain()
    assert b"".join(to_server) == m.TERMINATE
    assert isinstance(effects[-1], CloseConnection)


def test_garbage_after_startup_closes_with_protocol_violation() -> None:
    s = ready_session()
    s.client_data(b"\x01\xff\xff\xff\xff")
    _, to_client, effects = s.drain()
    assert b"08P01" in b"".join(to_client)
    assert isinstance(effects[-1], CloseConnection)


def test_with_a_policy_nothing_passes_before_the_data_path_is_ready() -> None:
    """A Query pipelined behind the StartupMessage must wait for the data path (it would
    otherwise reach PostgreSQL unexamined), then be sealed like any other."""
    from pathlib import Path

    from proxy.policy.loader import load_policies
    from proxy.session.datapath import DataPath
    from tests.unit.test_datapath import FakeKeyRing

    policies = load_policies([Path(__file__).resolve().parent.parent / "data" / "policy.yaml"])
    ring = FakeKeyRing()
    ring.add(1, "acme")
    s = ProxySession(
        client_tls_available=False,
        datapath_factory=lambda info, params: DataPath(policies, ring, info, parameters=params),
    )
    insert = m.Query("INSERT INTO patients (tenant_id, ssn) VALUES ('acme', '123-45-6789')")
    startup = m.StartupMessage(
        m.PROTOCOL_3_0, (("user", "app"), ("options", "-c pgseal.tenant=acme"))
    )
    s.client_data(startup.encode() + insert.encode())
    s.upstream_connected(tls=False)
    assert b"123-45-6789" not in b"".join(s.drain()[0])
    s.server_data(m.Authentication(m.AUTH_OK).encode() + m.ReadyForQuery("I").encode())
    to_server = b"".join(s.drain()[0])
    assert b"123-45-6789" not in to_server
    assert b"pg_catalog.pg_class" in to_server  # the catalog query first
    # The startup ReadyForQuery, and the INSERT, wait for its answer: the role and tenant
    # PostgreSQL started the session with (here options=-c role=clerk) decide.
    assert b"INSERT INTO patients" not in to_server
    assert not any(c.startswith(b"Z") for c in s.drain()[1])
    settings_row = (b"1", b"hex", *(n.hex().encode() for n in (b"clerk", b"acme", b"app")))
    s.server_data(
        m.CommandComplete("SELECT 0").encode()
        + m.DataRow(settings_row).encode()
        + m.CommandComplete("SELECT 1").encode()
        + m.ReadyForQuery("I").encode()
    )
    to_server, to_client, _ = s.drain()
    assert b"INSERT INTO patients" in b"".join(to_server)
    assert b"123-45-6789" not in b"".join(to_server)
    assert b"".join(to_client) == m.ReadyForQuery("I").encode()
    assert s.datapath is not None and s.datapath.role == "clerk"


def test_a_failed_catalog_query_ends_the_session_before_any_statement() -> None:
    from pathlib import Path

    from proxy.policy.loader import load_policies
    from proxy.session.datapath import DataPath
    from tests.unit.test_datapath import FakeKeyRing

    policies = load_policies([Path(__file__).resolve().parent.parent / "data" / "policy.yaml"])
    s = ProxySession(
        client_tls_available=False,
        datapath_factory=lambda info, params: DataPath(
            policies, FakeKeyRing(), info, parameters=params
        ),
    )
    s.client_data(m.StartupMessage(m.PROTOCOL_3_0, (("user", "app"),)).encode())
    s.upstream_connected(tls=False)
    s.server_data(m.Authentication(m.AUTH_OK).encode() + m.ReadyForQuery("I").encode())
    s.client_data(m.Query("SELECT 1").encode())
    s.drain()
    error = m.ErrorResponse.make("42501", "permission denied for table pg_class").encode()
    s.server_data(error + m.ReadyForQuery("I").encode())
    to_server, to_client, effects = s.drain()
    assert b"SELECT 1" not in b"".join(to_server)
    sent = b"".join(to_client)
    assert b"permission denied for table pg_class" in sent and b"FATAL" in sent
    assert not sent.startswith(b"Z") and isinstance(effects[-1], CloseConnection)

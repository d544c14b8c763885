"""Edges of the session's role and tenant, against a real PostgreSQL (found reviewing the
startup catalog query and the writes that wait for answers): a write held behind a
failed unsynced Execute, SET ROLE NONE vs RESET ROLE with a startup role or after SET
SESSION AUTHORIZATION, a tenant from role defaults in a LATIN1 session. Each test
states what PostgreSQL itself does and checks the proxy does the same.
"""

from __future__ import annotations

import secrets
from typing import Any

import psycopg
import pytest

from proxy.wire import messages as m
from tests.integration.test_datapath_tenants import (  # noqa: F401
    DENIED,
    _insert_dossier,
    _sqlstate,
    roles,
)
from tests.integration.test_protocol_robustness import RawConn, error_of

pytestmark = pytest.mark.integration


def _tenant(tag: str) -> str:
    return f"{tag}-{secrets.token_hex(3)}"


def _pipeline_query_behind_failing_unsynced_execute(tenant_b: str, body: str) -> list[bytes]:
    """Execute (SET tenant) + Execute (fails), no Sync; a Query behind them (PostgreSQL
    discards it: it skips to the Sync); a protected write Query; then the Sync."""
    return [
        m.Parse("", f"SET pgseal.tenant = '{tenant_b}'").encode(),
        m.Bind("", "", (), (), ()).encode(),
        m.Execute("", 0).encode(),
        m.Parse("", "SELECT 1/0").encode(),
        m.Bind("", "", (), (), ()).encode(),
        m.Execute("", 0).encode(),
        m.Query("SELECT 1").encode(),
        m.Query(f"INSERT INTO notes (body) VALUES ('{body}') RETURNING id").encode(),
        m.SYNC,
    ]


def _frames_until_ready(conn: RawConn) -> list[str]:
    out = []
    for f in conn.read_until_ready():
        out.append(f"E:{error_of(f).sqlstate}" if f.type == ord("E") else chr(f.type))
    return out


def test_postgres_answers_the_sync_after_a_failed_unsynced_execute(pg: Any) -> None:
    """Control, straight to PostgreSQL: the error makes it skip both Queries up to the Sync,
    which it answers (the client gets ErrorResponse + ReadyForQuery)."""
    with RawConn(pg.host, pg.port, timeout=5) as conn:
        conn.startup(options="-c pgseal.tenant=a")
        conn.send(*_pipeline_query_behind_failing_unsynced_execute("b", "x"))
        got = _frames_until_ready(conn)
        assert got[-2:] == ["E:22012", "Z"], got


def test_query_behind_failed_unsynced_execute_does_not_hang(sealing_proxy: Any) -> None:
    """Through the proxy: the protected INSERT Query waits (NeedAnswers) for the answer to
    the 'SELECT 1' Query (it ends the segment that SET the tenant). PostgreSQL skips that
    Query (the Execute before it failed, no Sync yet) and waits for the Sync, which sits
    behind the held INSERT in the proxy: the held frame must be retried at the error, or
    no ReadyForQuery ever comes. Expected: the same answer as PostgreSQL's (E + Z)."""
    a, b = _tenant("ha"), _tenant("hb")
    with RawConn(sealing_proxy.host, sealing_proxy.port, timeout=5) as conn:
        conn.startup(options=f"-c pgseal.tenant={a}")
        conn.send(*_pipeline_query_behind_failing_unsynced_execute(b, "hang"))
        try:
            got = _frames_until_ready(conn)
        except TimeoutError:
            pytest.fail("no ReadyForQuery within 5 s: the proxy holds the Sync forever")
        assert got[-2:] == ["E:22012", "Z"], got


def test_set_role_none_is_the_session_user_not_the_startup_role(
    roles: Any, sealing_proxy: Any, pg: Any  # noqa: F811
) -> None:
    """Started with `-c role=pgseal_clerk` as login pgseal_app. In PostgreSQL (15 here)
    DISCARD ALL keeps pgseal_clerk (the proxy agrees), but SET ROLE NONE makes current_user
    the session user (pgseal_app, in decrypt_roles of dossiers), not the startup role. The
    proxy once took SET ROLE NONE for RESET ROLE and refused dossiers there (over-refusal,
    not a leak)."""
    a = _tenant("dr")
    pg.execute("GRANT pgseal_clerk TO pgseal_app")
    with psycopg.connect(sealing_proxy.dsn(user="pgseal_app"), autocommit=True) as app:
        did = _insert_dossier(app, a, "discard")
    read = "SELECT summary FROM dossiers WHERE id = %s"
    results = {}
    for reset in ("DISCARD ALL", "SET ROLE NONE"):
        with psycopg.connect(
            sealing_proxy.dsn(user="pgseal_app"),
            autocommit=True,
            options="-c role=pgseal_clerk",
        ) as clerk:
            clerk.execute(reset)
            clerk.execute(f"SET pgseal.tenant = '{a}'")
            who = clerk.execute("SELECT current_user").fetchone()
            results[reset] = (who, _sqlstate(lambda c=clerk: c.execute(read, [did]).fetchall()))
    # PostgreSQL runs both as the login user, who may decrypt.
    assert results == {
        "DISCARD ALL": (("pgseal_clerk",), DENIED),
        "SET ROLE NONE": (("pgseal_app",), None),
    }, results


def test_set_role_none_after_session_authorization_never_widens(
    roles: Any, sealing_proxy: Any, pg: Any  # noqa: F811
) -> None:
    """Login postgres (in decrypt_roles of dossiers). SET SESSION AUTHORIZATION pgseal_clerk
    (not in decrypt_roles), then SET ROLE NONE: PostgreSQL runs as the session user,
    pgseal_clerk. The proxy once went back to the startup current_user (postgres) there,
    and opened dossiers for a session PostgreSQL runs as pgseal_clerk; it now does not
    follow the session user past SET SESSION AUTHORIZATION, so the role is uncertain (no
    privilege)."""
    a = _tenant("sn")
    with psycopg.connect(sealing_proxy.dsn(), autocommit=True) as c:
        did = _insert_dossier(c, a, "widen")
        c.execute("SET SESSION AUTHORIZATION pgseal_clerk")
        assert _sqlstate(
            lambda: c.execute("SELECT summary FROM dossiers WHERE id = %s", [did]).fetchall()
        ) == DENIED
        c.execute("SET ROLE NONE")
        assert c.execute("SELECT current_user").fetchone() == ("pgseal_clerk",)
        state = _sqlstate(
            lambda: c.execute("SELECT summary FROM dossiers WHERE id = %s", [did]).fetchall()
        )
        assert state == DENIED, "plaintext opened for a session running as pgseal_clerk"


def test_startup_tenant_from_role_defaults_with_odd_characters(
    roles: Any, sealing_proxy: Any, pg: Any  # noqa: F811
) -> None:
    """ALTER ROLE ... SET pgseal.tenant with a quote, spaces and non-ASCII: the proxy takes
    PostgreSQL's value (UTF8 client), and a LATIN1 client (PostgreSQL sends
    current_setting() converted to LATIN1) must still be able to connect (protected values
    are refused later for a non-UTF8 client_encoding, but the session itself is fine in
    PostgreSQL)."""
    tenant = "café x'y "
    pg.execute(
        "ALTER ROLE pgseal_clerk SET pgseal.tenant = " + "'" + tenant.replace("'", "''") + "'"
    )
    try:
        with psycopg.connect(sealing_proxy.dsn(user="pgseal_clerk"), autocommit=True) as c:
            got = c.execute("SELECT current_setting('pgseal.tenant')").fetchone()
            assert got == (tenant,)
            # The proxy seals under it: a write with that row tenant passes the check.
            c.execute(
                "INSERT INTO patients (tenant_id, name) VALUES (%s, %s)", [tenant, "odd"]
            )
        with psycopg.connect(
            sealing_proxy.dsn(user="pgseal_clerk"), autocommit=True, client_encoding="LATIN1"
        ) as c:
            assert c.execute("SELECT 1").fetchone() == (1,)
    finally:
        pg.execute("ALTER ROLE pgseal_clerk RESET pgseal.tenant")

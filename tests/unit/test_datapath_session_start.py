"""The session as PostgreSQL starts it (the data path's catalog query) and the role
statements that move current_user from there. Pure: frames in, frames out."""

from __future__ import annotations

import pytest

from proxy.policy import PolicySet
from proxy.policy.loader import load_policies
from proxy.wire import messages as m
from tests.unit.test_datapath_copy import POLICY, client, make, server


@pytest.fixture(scope="module")
def policies() -> PolicySet:
    return load_policies([POLICY])


def _started(
    policies: PolicySet, *, login: str, role: str, tenant: str | None = "acme"
):  # type: ignore[no-untyped-def]
    dp, _ = make(policies, user=login)
    ready = m.ReadyForQuery("I").encode()
    dp.catalog_query(ready)
    names = (role, tenant, login)
    row = (b"1", b"hex", *(None if n is None else n.encode().hex().encode() for n in names))
    for answer in (
        m.CommandComplete("SELECT 0").encode(),
        m.DataRow(row).encode(),
        m.CommandComplete("SELECT 1").encode(),
    ):
        assert server(dp, answer) == b""
    assert server(dp, ready) == ready
    return dp


def _run(dp, sql: str) -> None:  # type: ignore[no-untyped-def]
    client(dp, m.Query(sql).encode())
    server(dp, m.CommandComplete("SET").encode())
    server(dp, m.ReadyForQuery("I").encode())


@pytest.mark.parametrize(
    "role, tenant, expected_tenant", [(b"app", b"globex", "globex"), (b"app", None, None)]
)
def test_catalog_answer_sets_the_role_and_tenant_postgres_started_with(
    policies: PolicySet, role: bytes, tenant: bytes | None, expected_tenant: str | None
) -> None:
    """options=-c role=app, or ALTER ROLE ... SET role / SET pgseal.tenant: PostgreSQL's
    values, not the login user and the startup packet's, are what the session starts
    with and what RESET goes back to; the startup ReadyForQuery waits for them."""
    dp, _ = make(policies, user="pgseal_app")
    ready = m.ReadyForQuery("I").encode()
    query = dp.catalog_query(ready)
    assert b"current_user" in query and dp.catalog_pending
    names = (role, tenant, b"pgseal_app")
    row = (b"1", b"hex", *(None if n is None else n.hex().encode() for n in names))
    for answer in (
        m.CommandComplete("SELECT 0").encode(),
        m.DataRow(row).encode(),
        m.CommandComplete("SELECT 1").encode(),
    ):
        assert server(dp, answer) == b""
    assert server(dp, ready) == ready  # the startup ReadyForQuery, released
    assert not dp.catalog_pending and dp.startup_failure is None
    assert dp.role == "app" and dp.role_setting.startup_value == "app"
    assert dp.tenant.current == expected_tenant and not dp.tenant.uncertain


def test_a_failed_catalog_query_ends_the_session(policies: PolicySet) -> None:
    dp, _ = make(policies)
    dp.catalog_query(m.ReadyForQuery("I").encode())
    error = m.ErrorResponse.make("42501", "permission denied for table pg_class").encode()
    assert server(dp, error) == b""
    assert server(dp, m.ReadyForQuery("I").encode()) == b""
    assert dp.startup_failure == "permission denied for table pg_class"




@pytest.mark.parametrize(
    "login, startup_role, statements, expected",
    [
        # Without a connection-time role, RESET ROLE and SET ROLE NONE are the session user.
        ("app", "app", ["SET ROLE clerk", "RESET ROLE"], "app"),
        ("app", "app", ["SET ROLE clerk", "SET ROLE NONE"], "app"),
        # With one (options=-c role=clerk), RESET ROLE goes back to it, NONE to the login.
        ("app", "clerk", ["SET ROLE NONE"], "app"),
        ("app", "clerk", ["SET ROLE NONE", "RESET ROLE"], "clerk"),
        ("app", "clerk", ["DISCARD ALL"], "clerk"),
        # SET SESSION AUTHORIZATION x makes x the session and the current user; the
        # session user is not followed from there (a ROLLBACK may undo it): what goes back
        # to it is uncertain (no privilege), never the login user's.
        ("postgres", "postgres", ["SET SESSION AUTHORIZATION clerk"], "clerk"),
        ("postgres", "postgres", ["SET SESSION AUTHORIZATION clerk", "SET ROLE NONE"], None),
        ("postgres", "postgres", ["SET SESSION AUTHORIZATION clerk", "RESET ROLE"], None),
        ("postgres", "postgres", ["SET SESSION AUTHORIZATION clerk", "SET ROLE app"], "app"),
        # What PostgreSQL does with the role at RESET SESSION AUTHORIZATION: not modelled.
        (
            "postgres",
            "postgres",
            ["SET SESSION AUTHORIZATION clerk", "RESET SESSION AUTHORIZATION"],
            None,
        ),
    ],
)
def test_role_statements_follow_current_user(
    policies: PolicySet, login: str, startup_role: str, statements: list[str], expected: str | None
) -> None:
    dp = _started(policies, login=login, role=startup_role)
    for sql in statements:
        _run(dp, sql)
    if expected is None:
        assert dp.role_setting.uncertain
    else:
        assert not dp.role_setting.uncertain and dp.role == expected

"""Who a connection's audit records name (Pump.connection_facts), from its startup message."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from proxy.server.app import Pump
from proxy.wire import messages as m


def _pump_after_startup(params: tuple[tuple[str, str], ...]) -> Pump:
    server: Any = SimpleNamespace(datapath=None, client_ssl=None)
    pump = Pump(server)
    pump.session.client_data(m.StartupMessage(196608, params).encode())
    return pump


@pytest.mark.parametrize(
    ("params", "database"),
    [
        ((("user", "app"), ("database", "shop")), "shop"),
        # No database named: PostgreSQL connects to the user's, and the record says so.
        ((("user", "app"),), "app"),
    ],
)
def test_facts_name_the_database_postgres_connects_to(
    params: tuple[tuple[str, str], ...], database: str
) -> None:
    facts = _pump_after_startup(params).connection_facts()
    assert (facts.db_user, facts.database) == ("app", database)
    assert facts.client_addr is None and facts.session == ""  # no socket, no BackendKeyData yet

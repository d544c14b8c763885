import urllib.request
from dataclasses import replace

import pytest

from proxy.config import HostPort, MetricsConfig
from proxy.localpg import free_port
from tests.support.build import COMPILED
from tests.support.proxy_fixtures import ProxyThread, proxy_config

pytestmark = pytest.mark.integration


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_health_and_readiness(pg) -> None:
    import psycopg

    port = free_port()
    config = replace(proxy_config(pg), metrics=MetricsConfig(HostPort("127.0.0.1", port)))
    with ProxyThread(config) as proxy:
        with psycopg.connect(proxy.dsn()) as conn:
            conn.execute("select 1")
            status, body = get(port, "/metrics")
            assert status == 200
            assert "pgseal_connections_active 1" in body
            assert "pgseal_connections_total 1" in body
            build = "compiled" if COMPILED else "pure"
            assert f'pgseal_build_info{{build="{build}"}} 1' in body
        assert get(port, "/healthz") == (200, "ok\n")
        assert get(port, "/readyz") == (200, "ok\n")
        assert get(port, "/nope")[0] == 404

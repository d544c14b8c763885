"""Test harness every suite reuses.

PostgreSQL comes from, in order:
  1. PGSEAL_TEST_DSN (a superuser DSN of a server you run),
  2. testcontainers, when a Docker engine answers,
  3. a throwaway cluster from the local server binaries (run as `postgres` when root).
Only the local cluster has the auth users (scram_user, md5_user, ...), TLS and a server
log we can grep; tests that need those skip elsewhere with a clear reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from proxy.localpg import LocalPostgres
from tests.support.certs import TlsFiles, make_tls_files

# Fixtures owned by the parts of the system they set up.
pytest_plugins = ["tests.support.hsm_fixtures", "tests.support.proxy_fixtures"]

AUTH_PASSWORDS = {"scram_user": "scram-pass", "md5_user": "md5-pass", "password_user": "plain-pass"}


@dataclass
class PgTarget:
    host: str
    port: int
    superuser_dsn: str
    kind: str  # "env" | "container" | "local"
    local: LocalPostgres | None = None

    @property
    def log_path(self) -> Path | None:
        return self.local.log_path if self.local else None

    def dsn(
        self, user: str = "postgres", database: str = "postgres", password: str | None = None
    ) -> str:
        if self.kind != "local":
            parts = urlsplit(self.superuser_dsn)
            if user == "postgres" and password is None:
                return self.superuser_dsn
            auth = f"{user}:{password}@" if password else f"{user}@"
            return f"postgresql://{auth}{parts.hostname}:{parts.port}/{database}"
        auth = f"{user}:{password}@" if password else f"{user}@"
        return f"postgresql://{auth}{self.host}:{self.port}/{database}"

    def execute(self, sql: str, database: str = "postgres") -> list[tuple[object, ...]]:
        """Run SQL directly against PostgreSQL (never through the proxy)."""
        import psycopg

        dsn = self.superuser_dsn if database == "postgres" else self.dsn(database=database)
        with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(sql)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []

    def require_local(self) -> LocalPostgres:
        if self.local is None:
            pytest.skip("needs the local throwaway cluster (auth users, TLS, server log)")
        return self.local


def _docker_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(
            ["docker", "info"], capture_output=True, timeout=5, check=False
        ).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def pg(tls_files: TlsFiles) -> Iterator[PgTarget]:
    env_dsn = os.environ.get("PGSEAL_TEST_DSN")
    if env_dsn:
        parts = urlsplit(env_dsn)
        yield PgTarget(parts.hostname or "127.0.0.1", parts.port or 5432, env_dsn, "env")
        return
    if os.environ.get("PGSEAL_TEST_NO_DOCKER") != "1" and _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer(
            "postgres:15", username="postgres", password="postgres"
        ) as container:
            host = container.get_container_host_ip()
            port = int(container.get_exposed_port(5432))
            dsn = f"postgresql://postgres:postgres@{host}:{port}/postgres"
            yield PgTarget(host, port, dsn, "container")
        return
    base = Path(tempfile.mkdtemp(prefix="pgseal-test-pg-"))
    local = LocalPostgres(base, ssl_cert=(str(tls_files.cert), str(tls_files.key)))
    local.start()
    try:
        for user, password in AUTH_PASSWORDS.items():
            encryption = "md5" if user == "md5_user" else "scram-sha-256"
            local.psql(
                f"SET password_encryption = '{encryption}'; "
                f"CREATE ROLE {user} LOGIN SUPERUSER PASSWORD '{password}'"
            )
        local.psql("CREATE ROLE tls_only_user LOGIN SUPERUSER")
        yield PgTarget(local.host, local.port, local.dsn(), "local", local)
    finally:
        local.destroy()


@pytest.fixture(scope="session")
def pg_dsn(pg: PgTarget) -> str:
    return pg.superuser_dsn

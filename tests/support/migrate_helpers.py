"""Shared by tests/integration/test_migrate.py and test_rekey.py: a keystore of its own,
policy files, a config file for `pgseal` run as a subprocess, proxies per policy, and
direct reads of the tables and the jobs table."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psycopg
import yaml

from proxy.config import Config
from tests.support.hsm_fixtures import config_to_yaml
from tests.support.proxy_fixtures import ProxyThread, proxy_config

_SCRIPT = Path(sys.executable).parent / "pgseal"
PGSEAL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "proxy"]


@dataclass
class MigEnv:
    pg: Any
    config: Config
    folder: Path
    _proxies: list[ProxyThread] = field(default_factory=list)

    @property
    def schema(self) -> str:
        return self.config.keystore.schema

    @property
    def database(self) -> str:
        """The database the tables (and the keystore) are in: job names carry it."""
        return str(self.pg.execute("SELECT current_database()")[0][0])

    def policy(self, name: str, tables: dict[str, Any]) -> Path:
        path = self.folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"version": 1, "tables": tables}))
        return path

    def config_file(self, *policies: Path, name: str = "pgseal.yaml") -> Path:
        raw = config_to_yaml(self.config)
        raw["policies"] = [str(p) for p in policies]
        path = self.folder / name
        path.write_text(yaml.safe_dump(raw))
        return path

    def with_policies(self, *policies: Path) -> Config:
        base = proxy_config(self.pg)
        return replace(self.config, listen=base.listen, upstream=base.upstream,
                       upstream_tls=base.upstream_tls, policies=tuple(str(p) for p in policies))

    def proxy(self, *policies: Path) -> ProxyThread:
        started = ProxyThread(self.with_policies(*policies)).__enter__()
        self._proxies.append(started)
        return started

    def stop_proxy(self, proxy: ProxyThread) -> None:
        proxy.__exit__(None, None, None)
        self._proxies.remove(proxy)

    def pgseal(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*PGSEAL, *args], capture_output=True, text=True,
                              timeout=timeout, env=dict(os.environ))

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([*PGSEAL, *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=dict(os.environ))

    def job(self, name: str) -> dict[str, Any] | None:
        try:
            rows = self.pg.execute(
                f"SELECT kind, phase, done, position::text FROM \"{self.schema}\".jobs "
                f"WHERE job = '{name}'")
        except psycopg.Error:
            return None
        if not rows:
            return None
        kind, phase, done, position = rows[0]
        return {"kind": kind, "phase": phase, "done": done,
                "position": json.loads(position) if position else None}

    def wait_job(self, name: str, done_at_least: int, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(name)
            if job is not None and job["done"] >= done_at_least:
                return job
            time.sleep(0.05)
        raise AssertionError(f"job {name} did not reach {done_at_least} rows in {timeout}s")

    def audit(self) -> list[dict[str, Any]]:
        path = Path(self.config.audit.sinks[0].path or "")
        return [json.loads(line) for line in path.read_text().splitlines()]

    def close(self) -> None:
        for p in list(self._proxies):
            self.stop_proxy(p)


@contextlib.contextmanager
def migrate_env(make_keys_config: Callable[..., Config], pg: Any,
                folder: Path) -> Iterator[MigEnv]:
    """A MigEnv with a keystore of its own (the test modules wrap it in a fixture)."""
    env = MigEnv(pg, make_keys_config(), folder)
    try:
        yield env
    finally:
        env.close()


def unique(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(3)}"


def read_through(proxy: ProxyThread, table: str, column: str, tenant: str) -> dict[int, Any]:
    """id -> the column's value as the proxy returns it, for one tenant's rows."""
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute(f"SET pgseal.tenant = '{tenant}'")  # test tenants are plain words
        rows = conn.execute(f"SELECT id, {column} FROM {table} WHERE tenant_id = %s",
                            [tenant]).fetchall()
    return {int(r[0]): r[1] for r in rows}


class Writer(threading.Thread):
    """Writes through a proxy until stopped; `expected` holds every committed value."""

    def __init__(self, dsn: str, tenant: str, step: Callable[[psycopg.Connection[Any], int],
                                                             None]) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.tenant = tenant
        self.step = step
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self.ok_at: list[float] = []
        self.failed_at: list[float] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                conn.execute(f"SET pgseal.tenant = '{self.tenant}'")
                i = 0
                while not self.stop.is_set():
                    i += 1
                    try:
                        self.step(conn, i)
                    except psycopg.Error as exc:
                        self.failures.append(exc.sqlstate or type(exc).__name__)
                        self.failed_at.append(time.monotonic())
                    else:
                        self.ok += 1
                        self.ok_at.append(time.monotonic())
                    time.sleep(0.002)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def finish(self) -> None:
        self.stop.set()
        self.join(30)
        if self.error is not None:
            raise self.error


@contextlib.contextmanager
def writing(writer: Writer) -> Iterator[Writer]:
    writer.start()
    try:
        yield writer
    finally:
        writer.stop.set()
        writer.join(30)

"""`pgseal rekey` and `pgseal keys rotate --rekey` against PostgreSQL and SoftHSM2.

- while the proxy keeps writing the tenant's rows, rekey moves every cell off the retired
  version without losing a write; other tenants' cells are untouched;
- `--destroy-old` destroys the retired version once no cell uses it, and reads go on;
- SIGKILL part way through `keys rotate --rekey`, resume with `rekey`: every cell re-sealed
  once (the checkpoint counts each exactly once), all readable.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.config import CacheConfig, Config
from proxy.migrate.column import ColumnOptions, migrate_column
from tests.support.migrate_helpers import (
    MigEnv,
    Writer,
    migrate_env,
    read_through,
    unique,
    writing,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def env(make_keys_config: Callable[..., Config], pg: Any, tmp_path: Path) -> Iterator[MigEnv]:
    with migrate_env(make_keys_config, pg, tmp_path) as made:
        yield made


def _keys(env: MigEnv, tenant: str) -> dict[int, tuple[int, str]]:
    """version -> (key id, state)."""
    rows = env.pg.execute(f'SELECT version, key_id, state FROM "{env.schema}".keys '
                          f"WHERE tenant = '{tenant}'")
    return {int(v): (int(k), str(s)) for v, k, s in rows}


def _cells_under(env: MigEnv, table: str, column: str, key_id: int) -> int:
    return int(env.pg.execute(
        f"SELECT count(*) FROM {table} WHERE substring({column} from 3 for 4) = "
        f"'\\x{key_id:08x}'::bytea")[0][0])


def test_rekey_under_concurrent_writes_then_destroy_old(env: MigEnv) -> None:
    pg = env.pg
    # Caches live a second: --destroy-old may act one second after the rotation.
    env.config = replace(env.config, cache=CacheConfig(ttl_seconds=1, max_entries=10000,
                                                       max_uses=1048576))
    table = unique("rk_live")
    pg.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, tenant_id text NOT NULL, "
               "email bytea, note bytea)")
    policy = env.policy("p", {f"public.{table}": {
        "tenant": {"column": "tenant_id"},
        "columns": {"email": {"type": "text", "search": "equality"}, "note": {"type": "text"}}}})
    cfg = str(env.config_file(policy))
    proxy = env.proxy(policy)
    expected_email: dict[int, str] = {}
    expected_note: dict[int, str] = {}
    for tenant, base in (("a", 0), ("b", 10000)):
        rows = [(base + i, tenant, f"{tenant}{i}@example.org", f"note {tenant} {i}")
                for i in range(1, 601)]
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            conn.execute(f"SET pgseal.tenant = '{tenant}'")
            with conn.cursor() as cur:
                cur.executemany(f"INSERT INTO {table} (id, tenant_id, email, note) "
                                "VALUES (%s, %s, %s, %s)", rows)
        expected_email.update({r[0]: r[2] for r in rows})
        expected_note.update({r[0]: r[3] for r in rows})
    b_before = pg.execute(f"SELECT id, email, note FROM {table} WHERE tenant_id = 'b'")

    rotated = env.pgseal("keys", "rotate", "--tenant", "a", "--config", cfg)
    assert rotated.returncode == 0, rotated.stderr
    rotated_at = time.monotonic()
    old_id, new_id = _keys(env, "a")[1][0], _keys(env, "a")[2][0]
    a_ids = list(range(1, 601))
    rng = random.Random(3)

    def step(conn: psycopg.Connection[Any], i: int) -> None:
        row = rng.choice(a_ids)
        if i % 3 == 0:
            conn.execute(f"UPDATE {table} SET email = %s WHERE id = %s", [f"w{i}@x.org", row])
            expected_email[row] = f"w{i}@x.org"
        else:
            conn.execute(f"UPDATE {table} SET note = %s WHERE id = %s", [f"written {i}", row])
            expected_note[row] = f"written {i}"

    writer = Writer(proxy.dsn(), "a", step)
    with writing(writer):
        time.sleep(0.2)
        result = env.pgseal("rekey", "--tenant", "a", "--batch", "50", "--rate", "1500",
                            "--config", cfg)
        ended = time.monotonic()
    writer.finish()
    assert result.returncode == 0, result.stderr
    assert writer.failures == []
    assert len([t for t in writer.ok_at if t < ended]) > 50
    assert f"version 1 (key id {old_id}): no cells left" in result.stdout
    for column in ("email", "note"):
        assert _cells_under(env, table, column, old_id) == 0
    assert _cells_under(env, table, "email", new_id) == 600
    # The other tenant was not touched at all.
    assert pg.execute(f"SELECT id, email, note FROM {table} WHERE tenant_id = 'b'") == b_before

    def check_reads() -> None:
        for tenant in ("a", "b"):
            assert read_through(proxy, table, "email", tenant) == {
                i: v for i, v in expected_email.items() if (i > 10000) == (tenant == "b")}
            assert read_through(proxy, table, "note", tenant) == {
                i: v for i, v in expected_note.items() if (i > 10000) == (tenant == "b")}

    check_reads()
    audit = [r for r in env.audit() if r["statement"] == "pgseal rekey --tenant a"]
    opened = sum(r["count"] for r in audit if r["event"] == "data.decrypt")
    assert {r["key_id"] for r in audit if r["event"] == "data.decrypt"} == {old_id}
    assert {r["key_id"] for r in audit if r["event"] == "data.encrypt"} == {new_id}
    # Each names the key's version and the master key it is wrapped under (DESIGN.md 9).
    assert {(r["event"], r["key_version"]) for r in audit} == {
        ("data.decrypt", 1), ("data.encrypt", 2)}
    assert all(r["kek"] for r in audit)
    assert 500 < opened <= 1200  # 1200 cells, minus those the writer replaced first

    time.sleep(max(0.0, 1.2 - (time.monotonic() - rotated_at)))
    destroyed = env.pgseal("rekey", "--tenant", "a", "--destroy-old", "--config", cfg)
    assert destroyed.returncode == 0, destroyed.stderr
    assert f"version 1 (key id {old_id}): no cells left: destroyed" in destroyed.stdout
    assert _keys(env, "a") == {1: (old_id, "destroyed"), 2: (new_id, "active")}
    assert any(r["event"] == "key.destroy" and r["key_id"] == old_id for r in env.audit())
    check_reads()  # every cell is under the current version: nothing was lost


@pytest.mark.asyncio
async def test_keys_rotate_rekey_killed_then_resumed(env: MigEnv) -> None:
    pg = env.pg
    table = unique("rk_kill")
    pg.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, tenant_id text NOT NULL, "
               "payload text); "
               f"INSERT INTO {table} SELECT g, 'c', 'payload ' || g "
               "FROM generate_series(1, 3000) g")
    policy = env.policy("p", {f"public.{table}": {
        "tenant": {"column": "tenant_id"}, "columns": {"payload": {"type": "text"}}}})
    await migrate_column(env.with_policies(policy),
                         ColumnOptions("encrypt", f"public.{table}.payload", batch=1000))
    cfg = str(env.config_file(policy))
    v1 = _keys(env, "c")[1][0]
    assert _cells_under(env, table, "payload", v1) == 3000

    proc = env.popen("keys", "rotate", "--tenant", "c", "--rekey", "--batch", "50", "--rate",
                     "700", "--config", cfg)
    try:
        env.wait_job(f"rekey {env.database}/c", 300)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    v2 = _keys(env, "c")[2][0]
    moved = _cells_under(env, table, "payload", v2)
    assert 300 <= moved < 3000
    job = env.job(f"rekey {env.database}/c")
    assert job is not None and job["phase"] == "running" and job["done"] == moved
    assert job["position"]["target"] == f"public.{table}.payload"

    resumed = env.pgseal("rekey", "--tenant", "c", "--config", cfg)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{3000 - moved:,} cells re-sealed" in resumed.stdout
    assert f"version 1 (key id {v1}): no cells left" in resumed.stdout
    assert _cells_under(env, table, "payload", v2) == 3000
    final = env.job(f"rekey {env.database}/c")
    assert final is not None and final["phase"] == "done" and final["done"] == 3000

    proxy = env.proxy(policy)
    assert read_through(proxy, table, "payload", "c") == {
        i: f"payload {i}" for i in range(1, 3001)}

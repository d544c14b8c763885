"""Cryptoperiods against a real keystore and SoftHSM2: `pgseal keys list` flags keys past
theirs (age simulated by backdating the keystore's timestamps), and proxies configured
with `rotate_on_schedule` rotate them, exactly once across the fleet.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from proxy.config import Config, CryptoperiodConfig
from proxy.keys.schedule import FLEET_JOB, RotationScheduler
from proxy.keys.service import KeyService, StaleRotation
from tests.integration.test_keys_cli import pgseal
from tests.support.hsm_fixtures import config_to_yaml
from tests.support.proxy_fixtures import DATA, ProxyThread, proxy_config

pytestmark = pytest.mark.integration


def _write_config(config: Config, path: Path) -> str:
    raw = config_to_yaml(config)
    periods = config.cryptoperiod
    raw["cryptoperiod"] = {
        "data_key_days": periods.data_key_days, "master_key_days": periods.master_key_days,
        "rotate_on_schedule": periods.rotate_on_schedule,
        "check_interval_seconds": periods.check_interval_seconds,
    }
    path.write_text(yaml.safe_dump(raw))
    return str(path)


async def _create(config: Config, *tenants: str) -> None:
    service = await KeyService.open(config, listen=False)
    try:
        for tenant in tenants:
            await service.create_key(tenant)
    finally:
        await service.close()


def _backdate(pg: Any, config: Config, tenant: str, key_days: int, master_days: int) -> None:
    """Age without waiting: the keystore's own timestamps are what cryptoperiods count from."""
    s = config.keystore.schema
    pg.execute(f"UPDATE {s}.keys SET created_at = now() - interval '{key_days} days' "
               f"WHERE tenant = '{tenant}'")
    pg.execute(f"UPDATE {s}.masters SET activated_at = now() - interval '{master_days} days' "
               "WHERE state = 'active'")


@pytest.mark.asyncio
async def test_keys_list_flags_keys_past_their_cryptoperiod(
        make_keys_config: Callable[..., Config], pg: Any, tmp_path: Path) -> None:
    config = make_keys_config(cryptoperiod=CryptoperiodConfig(data_key_days=30,
                                                              master_key_days=60))
    await _create(config, "old-t", "new-t")
    _backdate(pg, config, "old-t", key_days=45, master_days=90)
    cfg = _write_config(config, tmp_path / "pgseal.yaml")

    listed = pgseal("keys", "list", "--config", cfg)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split()[-1] == "CRYPTOPERIOD"
    by_tenant = {r.split()[0]: r for r in rows}
    assert by_tenant["old-t"].endswith("EXPIRED 15d ago")
    assert by_tenant["new-t"].endswith("ok 29d left")
    # the master key is not in that table, but its expiry is not kept quiet
    assert "master key" in listed.stderr and "past its cryptoperiod (60 days" in listed.stderr

    masters = pgseal("keys", "list", "--masters", "--config", cfg)
    assert masters.returncode == 0, masters.stderr
    header, *rows = masters.stdout.splitlines()
    assert header.split() == ["MASTER", "LABEL", "STATE", "ACTIVATED", "AGE", "CRYPTOPERIOD"]
    (row,) = rows
    assert " active " in row and row.endswith("EXPIRED 30d ago")

    # the environment overrides the file, like every other key
    env = {**os.environ, "PGSEAL_CRYPTOPERIOD_DATA_KEY_DAYS": "60",
           "PGSEAL_CRYPTOPERIOD_MASTER_KEY_DAYS": "365"}
    longer = pgseal("keys", "list", "--tenant", "old-t", "--config", cfg, env=env)
    assert longer.returncode == 0 and longer.stderr == ""
    assert longer.stdout.splitlines()[1].endswith("ok 14d left")


@pytest.mark.asyncio
async def test_one_rotation_per_due_key_and_the_fleet_lock(
        make_keys_config: Callable[..., Config], pg: Any) -> None:
    periods = CryptoperiodConfig(data_key_days=30, master_key_days=60)
    config = make_keys_config(cryptoperiod=periods)
    service = await KeyService.open(config, listen=False)
    try:
        first = await service.create_key("lock-t")
        _backdate(pg, config, "lock-t", key_days=31, master_days=1)
        scheduler = RotationScheduler(service, periods)
        # another process holds the fleet lock: this pass stays out of its way
        async with service.keystore.fleet_lock(FLEET_JOB) as ours:
            assert ours
            assert (await scheduler.run_once()).ran is False
        done = await scheduler.run_once()
        assert done.ran and done.data_keys == (("lock-t", 2),) and done.master is None
        again = await scheduler.run_once()
        assert again.ran and again.data_keys == ()
        # a job that picked a key earlier never rotates that key's successor
        with pytest.raises(StaleRotation):
            await service.rotate("lock-t", expect_active=first.key_id)
    finally:
        await service.close()


def test_serve_rotates_due_keys_once_across_two_proxies(
        make_keys_config: Callable[..., Config], sealing_config: Config, pg: Any) -> None:
    base = proxy_config(pg)
    config = make_keys_config()
    config = replace(config, listen=base.listen, upstream=base.upstream,
                     upstream_tls=base.upstream_tls, policies=(str(DATA / "policy.yaml"),))
    # A proxy that does not rotate seals a row for each tenant first.
    with ProxyThread(config) as plain, psycopg.connect(plain.dsn(), autocommit=True) as conn:
        for tenant in ("due-t", "fresh-t"):
            conn.execute(f"SET pgseal.tenant = '{tenant}'")
            conn.execute("INSERT INTO vault_items (tenant_id, payload) VALUES (%s, %s)",
                         [tenant, f"before {tenant}"])
    _backdate(pg, config, "due-t", key_days=45, master_days=90)

    rotating = replace(config, cryptoperiod=CryptoperiodConfig(
        data_key_days=30, master_key_days=60, rotate_on_schedule=True,
        check_interval_seconds=0.2))
    s = config.keystore.schema
    with ProxyThread(rotating) as a, ProxyThread(rotating) as b:
        schedulers = [p.server.datapath.rotation for p in (a, b) if p.server is not None]
        deadline = time.monotonic() + 10
        while sum(x.passes for x in schedulers) < 4:  # the rotation, then passes finding none
            assert time.monotonic() < deadline, "the scheduled passes did not run"
            time.sleep(0.05)
        keys = pg.execute(f"SELECT tenant, version, state FROM {s}.keys ORDER BY tenant, version")
        assert keys == [("due-t", 1, "retired"), ("due-t", 2, "active"), ("fresh-t", 1, "active")]
        masters = pg.execute(f"SELECT state FROM {s}.masters ORDER BY created_at")
        assert masters == [("destroyed",), ("active",)]
        # old cells still open, new ones are sealed under version 2
        with psycopg.connect(a.dsn(), autocommit=True) as conn:
            conn.execute("SET pgseal.tenant = 'due-t'")
            conn.execute("INSERT INTO vault_items (tenant_id, payload) "
                         "VALUES ('due-t', 'after due-t')")
            bodies = conn.execute("SELECT payload FROM vault_items WHERE tenant_id = 'due-t' "
                                  "ORDER BY id").fetchall()
            assert bodies[-2:] == [("before due-t",), ("after due-t",)]

    audit = config.path(config.audit.sinks[0].path or "")
    rotations = [r for r in map(json.loads, audit.read_text().splitlines())
                 if r["event"] == "key.rotate"]
    data = [r for r in rotations if r["tenant"] == "due-t"]
    assert len(data) == 1 and data[0]["key_version"] == 2
    assert data[0]["statement"].startswith("cryptoperiod (scheduled): version 1 past 30 days")
    assert len([r for r in rotations if (r["statement"] or "").startswith("rotate-master")]) == 1
    assert not [r for r in rotations if r["tenant"] == "fresh-t"]

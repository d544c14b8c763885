"""Crypto-shredding end to end: destroy a tenant's keys through one proxy's key service,
and every proxy on that keystore refuses its cells within a second (an error naming the
column, or NULL per on_denied) while other tenants read as before; then
`pgseal keys shred-report` shows the evidence and says by its exit code whether the
tenant is fully shredded.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import psycopg
import pytest

from proxy.config import AuditConfig, AuditSinkConfig, Config
from tests.integration.test_keys_cli import assert_one_line_failure, pgseal
from tests.support.proxy_fixtures import DATA, ProxyThread, proxy_config

pytestmark = pytest.mark.integration


@pytest.fixture
def fleet_config(make_keys_config: Callable[..., Config], sealing_config: Config,
                 pg: Any, tmp_path: Any) -> Config:
    """A keystore of its own, audited to a jsonl file and a postgres table, with policies."""
    config = make_keys_config()
    base = proxy_config(pg)
    audit = AuditConfig(sinks=(
        AuditSinkConfig("jsonl", path=str(tmp_path / "audit.jsonl")),
        AuditSinkConfig("postgres", table=f"{config.keystore.schema}.audit"),
    ))
    return replace(config, listen=base.listen, upstream=base.upstream,
                   upstream_tls=base.upstream_tls, audit=audit,
                   policies=(str(DATA / "policy.yaml"),))


@pytest.fixture
def two_proxies(fleet_config: Config) -> Iterator[tuple[ProxyThread, ProxyThread]]:
    with ProxyThread(fleet_config) as a, ProxyThread(fleet_config) as b:
        yield a, b


def _seed(proxy: ProxyThread, tenant: str) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute(f"SET pgseal.tenant = '{tenant}'")
        conn.execute("INSERT INTO patients (tenant_id, ssn, name) VALUES (%s, %s, %s)",
                     [tenant, f"ssn-{tenant}", f"name-{tenant}"])
        conn.execute("INSERT INTO payments (tenant_id, card_number, amount) VALUES (%s, %s, 7)",
                     [tenant, f"card-{tenant}"])


def _read(proxy: ProxyThread, tenant: str) -> tuple[Any, Any]:
    """(patients names, payments cards) of `tenant`, or the error the proxy answered."""
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute(f"SET pgseal.tenant = '{tenant}'")
        try:
            names: Any = conn.execute("SELECT name FROM patients WHERE tenant_id = %s",
                                      [tenant]).fetchall()
        except psycopg.Error as exc:
            names = exc
        cards = conn.execute("SELECT card_number FROM payments WHERE tenant_id = %s",
                             [tenant]).fetchall()
        return names, cards


def _refuses(result: tuple[Any, Any]) -> bool:
    names, cards = result
    return isinstance(names, psycopg.Error) and cards == [(None,)]


def test_destroy_reaches_every_proxy_within_a_second(
        two_proxies: tuple[ProxyThread, ProxyThread], fleet_config: Config,
        write_config_file: Any, pg: Any) -> None:
    a, b = two_proxies
    victim, other = f"shred-{secrets.token_hex(3)}", f"keep-{secrets.token_hex(3)}"
    _seed(a, victim)
    _seed(b, other)
    for proxy in (a, b):  # both proxies now hold both tenants' keys in their caches
        assert _read(proxy, victim) == ([(f"name-{victim}",)], [(f"card-{victim}",)])
        assert _read(proxy, other) == ([(f"name-{other}",)], [(f"card-{other}",)])

    assert a.loop is not None and a.server is not None
    service = a.server.datapath.service
    rotated = asyncio.run_coroutine_threadsafe(service.rotate(victim), a.loop).result(10)
    destroyed = asyncio.run_coroutine_threadsafe(service.destroy(victim), a.loop).result(10)
    assert sorted(k.version for k in destroyed) == [1, 2] and rotated[0].version == 2
    done = time.monotonic()

    # B learns of it only through the NOTIFY; A evicted at once.
    for proxy in (a, b):
        while not _refuses(result := _read(proxy, victim)):
            assert time.monotonic() - done < 1.0, f"still readable after 1s: {result}"
            time.sleep(0.02)
        names, _ = result
        assert names.sqlstate == "58030"
        assert "patients.name cannot be opened" in str(names)
        assert "destroyed (crypto-shredded)" in str(names)
    assert time.monotonic() - done < 1.0

    with psycopg.connect(b.dsn(), autocommit=True) as conn:
        conn.execute(f"SET pgseal.tenant = '{victim}'")
        with pytest.raises(psycopg.Error, match="were destroyed") as err:  # new writes too
            conn.execute("INSERT INTO patients (tenant_id, ssn, name) VALUES (%s, 'x', 'y')",
                         [victim])
        assert err.value.sqlstate == "58030"
        # a reader of another tenant is told the tenant rule, nothing about the keys
        conn.execute(f"SET pgseal.tenant = '{other}'")
        with pytest.raises(psycopg.Error) as err:
            conn.execute("SELECT name FROM patients WHERE tenant_id = %s", [victim]).fetchall()
        assert err.value.sqlstate == "42501" and victim not in str(err.value)
    for proxy in (a, b):  # the other tenant is untouched everywhere
        assert _read(proxy, other) == ([(f"name-{other}",)], [(f"card-{other}",)])
    # the cells are still in the table: sealed, and never openable again
    cell = pg.execute(f"SELECT name FROM patients WHERE tenant_id = '{victim}'")[0][0]
    assert bytes(cell)[:1] == b"\x01" and f"name-{victim}".encode() not in bytes(cell)

    # The evidence, while both proxies still run (their trails have no audit.stop yet).
    cfg = str(write_config_file(fleet_config))
    report = pgseal("keys", "shred-report", "--tenant", victim, "--config", cfg)
    assert report.returncode == 0, report.stdout + report.stderr
    out = report.stdout
    assert out.rstrip().endswith("verdict: SHREDDED")
    for key in destroyed:
        assert (f"version {key.version} key id {key.key_id}: destroyed" in out
                and "no wrapped bytes, no nonce" in out)
    assert "this process: no entry" in out
    schema = fleet_config.keystore.schema
    rows = pg.execute(f"SELECT state, wrapped IS NULL AND nonce IS NULL FROM {schema}.keys "
                      f"WHERE tenant = '{victim}'")
    assert rows == [("destroyed", True), ("destroyed", True)]
    # both sinks: the key.destroy records with their seq and hash, and the chain verdict
    trail = [json.loads(line) for line in
             fleet_config.path(fleet_config.audit.sinks[0].path or "").read_text().splitlines()]
    records = [r for r in trail if r["event"] == "key.destroy" and r["tenant"] == victim]
    assert len(records) == 2
    for r in records:
        assert f"seq {r['seq']} {r['ts']} key.destroy key id {r['key_id']}" in out
        assert r["hash"] in out
    assert out.count("chain intact through seq") == 2  # jsonl and postgres
    assert f"postgres {schema}.audit: chain intact" in out
    assert "rotate-master" in out  # the old wrapped copies: the standing advice

    # the other tenant is not shredded: exit 1, one line
    assert_one_line_failure(
        pgseal("keys", "shred-report", "--tenant", other, "--config", cfg),
        f"tenant {other!r}: version 1", "is active, not destroyed")

    # after rotate-master the master that wrapped the destroyed keys is gone too
    assert pgseal("keys", "rotate-master", "--config", cfg).returncode == 0
    after = pgseal("keys", "shred-report", "--tenant", victim, "--config", cfg)
    assert after.returncode == 0, after.stderr
    assert "destroyed on the HSM" in after.stdout
    assert "can no longer be unwrapped" in after.stdout

    # starting the tenant over gives it an active key: no longer shredded
    assert pgseal("keys", "create", "--tenant", victim, "--config", cfg).returncode == 0
    assert_one_line_failure(
        pgseal("keys", "shred-report", "--tenant", victim, "--config", cfg),
        "version 3", "is active, not destroyed")


def test_shred_report_fails_on_a_tampered_trail_and_an_unknown_tenant(
        make_keys_config: Callable[..., Config], write_config_file: Any) -> None:
    config = make_keys_config()
    cfg = str(write_config_file(config))
    assert pgseal("keys", "create", "--tenant", "gone", "--config", cfg).returncode == 0
    assert pgseal("keys", "destroy", "--tenant", "gone", "--yes",
                  "--config", cfg).returncode == 0
    clean = pgseal("keys", "shred-report", "--tenant", "gone", "--config", cfg)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "ends with audit.stop" in clean.stdout  # every writer stopped cleanly

    audit = config.path(config.audit.sinks[0].path or "")
    lines = audit.read_text().splitlines()
    for i, line in enumerate(lines):
        body = json.loads(line)
        if body["event"] == "key.destroy":
            body["key_version"] = 99
            lines[i] = json.dumps(body, sort_keys=True, separators=(",", ":"))
    audit.write_text("\n".join(lines) + "\n")
    assert_one_line_failure(pgseal("keys", "shred-report", "--tenant", "gone", "--config", cfg),
                            "BROKEN", "record edited")

    assert_one_line_failure(pgseal("keys", "shred-report", "--tenant", "never", "--config", cfg),
                            "has no data keys")

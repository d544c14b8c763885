"""Key rotation while applications keep working through the proxy.

A proxy of its own (own keystore schema and master key: `make_keys_config`) serves a
workload of asyncio tasks per tenant: asyncpg writers (binary, extended protocol),
asyncpg readers searching by equality and by id, psycopg readers searching with
literals (simple protocol) and IN lists. Meanwhile the tenant keys are rotated with
`pgseal keys rotate` and with the key service on the same keystore, then the master
key. Afterwards every row written at any point is still readable and found by an
equality search (a deterministic cell differs per key version, so a search must match
the cells of every live version), and cells written after a rotation carry the new
version. Destroying a tenant's keys makes its rows unreadable with a clear error while
the other tenants' rows stay intact.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import pytest_asyncio

from proxy.config import Config
from proxy.crypto.cells import read_cell_header
from proxy.keys.service import KeyService
from tests.support.proxy_fixtures import DATA, ProxyThread, proxy_config

pytestmark = pytest.mark.integration

SENT = "QZRT"  # in every payload; never in a cell or in the server log
TENANTS = ("rot-a", "rot-b", "rot-c")


@dataclass
class Written:
    id: int
    ref: str
    payload: str
    amount: Decimal


@dataclass
class Workload:
    dsn: str
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    rows: dict[str, list[Written]] = field(default_factory=lambda: {t: [] for t in TENANTS})
    searches: dict[str, int] = field(default_factory=lambda: {t: 0 for t in TENANTS})
    errors: list[str] = field(default_factory=list)

    async def writer(self, tenant: str) -> None:
        conn = await asyncpg.connect(self.dsn, server_settings={"pgseal.tenant": tenant})
        try:
            i = 0
            while not self.stop.is_set():
                ref = f"ref-{tenant}-{i}"
                payload = f"payload {SENT} {tenant} {i}"
                amount = Decimal(i) + Decimal("0.125")
                row_id = await conn.fetchval(
                    "INSERT INTO vault_items (tenant_id, secret_ref, payload, amount) "
                    "VALUES ($1, $2, $3, $4) RETURNING id", tenant, ref, payload, amount)
                self.rows[tenant].append(Written(row_id, ref, payload, amount))
                i += 1
                await asyncio.sleep(0.005)
        except Exception as exc:  # reported, not raised: the other tasks go on
            self.errors.append(f"writer {tenant}: {exc!r}")
        finally:
            await conn.close()

    async def asyncpg_reader(self, tenant: str) -> None:
        conn = await asyncpg.connect(self.dsn, server_settings={"pgseal.tenant": tenant})
        rng = random.Random(tenant)
        try:
            while not self.stop.is_set():
                rows = self.rows[tenant]
                if not rows:
                    await asyncio.sleep(0.01)
                    continue
                # Old rows matter most: they were sealed under older key versions.
                want = rows[rng.randrange(len(rows))] if rng.random() < 0.5 else rows[0]
                got = await conn.fetch(
                    "SELECT id, payload, amount FROM vault_items WHERE secret_ref = $1", want.ref)
                if [tuple(r) for r in got] != [(want.id, want.payload, want.amount)]:
                    self.errors.append(f"asyncpg search {want.ref}: {[tuple(r) for r in got]}")
                got = await conn.fetch(
                    "SELECT secret_ref FROM vault_items WHERE secret_ref = ANY($1::text[]) "
                    "ORDER BY id", [rows[0].ref, want.ref])
                wanted = sorted({(rows[0].id, rows[0].ref), (want.id, want.ref)})
                if [r[0] for r in got] != [ref for _, ref in wanted]:
                    self.errors.append(f"asyncpg = ANY {want.ref}: {[tuple(r) for r in got]}")
                row = await conn.fetchrow("SELECT payload FROM vault_items WHERE id = $1", want.id)
                if row is None or row[0] != want.payload:
                    self.errors.append(f"asyncpg by id {want.id}: {row}")
                self.searches[tenant] += 1
                await asyncio.sleep(0.003)
        except Exception as exc:
            self.errors.append(f"asyncpg reader {tenant}: {exc!r}")
        finally:
            await conn.close()

    async def literal_reader(self, tenant: str) -> None:
        """psycopg without parameters: simple protocol, the proxy seals the literals."""
        conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        rng = random.Random(tenant + "-literal")
        try:
            await conn.execute(f"SET pgseal.tenant = '{tenant}'")
            while not self.stop.is_set():
                rows = self.rows[tenant]
                if len(rows) < 2:
                    await asyncio.sleep(0.01)
                    continue
                a, b = rows[0], rows[rng.randrange(len(rows))]
                cur = await conn.execute(
                    f"SELECT id, payload FROM vault_items WHERE secret_ref IN ('{a.ref}', "
                    f"'{b.ref}') ORDER BY id")
                got = await cur.fetchall()
                wanted = sorted({(a.id, a.payload), (b.id, b.payload)})
                if got != wanted:
                    self.errors.append(f"literal IN {a.ref}, {b.ref}: {got}")
                cur = await conn.execute(
                    f"SELECT count(*) FROM vault_items WHERE secret_ref <> '{a.ref}' AND "
                    f"tenant_id = '{tenant}' AND id <= {b.id}")
                count = (await cur.fetchone() or (None,))[0]
                expected = sum(1 for r in rows if r.id <= b.id and r.ref != a.ref)
                if count != expected:
                    self.errors.append(f"literal <> {a.ref}: {count} rows, expected {expected}")
                self.searches[tenant] += 1
                await asyncio.sleep(0.003)
        except Exception as exc:
            self.errors.append(f"literal reader {tenant}: {exc!r}")
        finally:
            await conn.close()

    def tasks(self) -> list[asyncio.Task[None]]:
        out = []
        for tenant in TENANTS:
            out.append(asyncio.create_task(self.writer(tenant)))
            out.append(asyncio.create_task(self.asyncpg_reader(tenant)))
            out.append(asyncio.create_task(self.literal_reader(tenant)))
        return out


@pytest.fixture
def rotation_config(make_keys_config: Callable[..., Config], sealing_config: Config,
                    pg: Any) -> Config:
    """A keystore and master key of our own, the shared policy, the test PostgreSQL."""
    keys = make_keys_config()
    base = proxy_config(pg)
    return replace(keys, listen=base.listen, upstream=base.upstream,
                   upstream_tls=base.upstream_tls, policies=(str(DATA / "policy.yaml"),))


@pytest.fixture
def rotation_proxy(rotation_config: Config, pg: Any) -> Iterator[ProxyThread]:
    pg.execute("TRUNCATE public.vault_items")
    with ProxyThread(rotation_config) as running:
        yield running
    pg.execute("TRUNCATE public.vault_items")


@pytest_asyncio.fixture
async def service(rotation_config: Config) -> AsyncIterator[KeyService]:
    """The key service on the proxy's keystore, as an operator's process would open it."""
    svc = await KeyService.open(rotation_config, listen=False)
    try:
        yield svc
    finally:
        await svc.close()


def cell_key_ids(pg: Any, tenant: str) -> dict[int, tuple[int, int]]:
    """Row id -> (key id of secret_ref's cell, key id of payload's cell), read directly."""
    out = {}
    for row_id, ref, payload in pg.execute(
            f"SELECT id, secret_ref, payload FROM vault_items WHERE tenant_id = '{tenant}'"):
        ref_cell, payload_cell = bytes(ref), bytes(payload)
        assert ref_cell[:2] == b"\x01\x02" and payload_cell[:2] == b"\x01\x01"
        assert SENT.encode() not in ref_cell + payload_cell
        out[row_id] = (read_cell_header(ref_cell).key_id, read_cell_header(payload_cell).key_id)
    return out


def check_server_log(pg: Any, start: int, *wanted: bytes) -> None:
    """What the server logged (log_statement=all) from `start`: no plaintext, and every one
    of `wanted` (statement texts as PostgreSQL got them)."""
    if pg.log_path is None:
        return
    with open(pg.log_path, "rb") as f:
        f.seek(start)
        log = f.read()
    assert SENT.encode() not in log
    for text in wanted:
        assert text in log, text


async def versions(service: KeyService, tenant: str) -> dict[int, int]:
    """key id -> version for the tenant's keys."""
    return {k.key_id: k.version for k in await service.list_keys(tenant)}


async def cli(config_file: Path, *args: str) -> str:
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "proxy", *args, "--config", str(config_file)],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.asyncio
async def test_rotation_during_a_workload(
        rotation_proxy: ProxyThread, rotation_config: Config, service: KeyService, pg: Any,
        write_config_file: Callable[..., Path]) -> None:
    log_start = pg.log_path.stat().st_size if pg.log_path is not None else 0
    work = Workload(rotation_proxy.dsn())
    tasks = work.tasks()
    marks: dict[str, dict[str, int]] = {}

    async def settle(label: str) -> None:
        # Rows written from here on were sealed after the proxy heard of the change.
        await asyncio.sleep(0.3)
        marks[label] = {t: len(work.rows[t]) for t in TENANTS}
        await asyncio.sleep(0.5)

    try:
        await asyncio.sleep(0.6)
        config_file = write_config_file(rotation_config)
        out = await cli(config_file, "keys", "rotate", "--tenant", "rot-a")
        assert "rot-a" in out
        await settle("a-v2")
        marks["pre-v3"] = {t: len(work.rows[t]) for t in TENANTS}
        new, retired = await service.rotate("rot-a")
        assert (new.version, retired.version) == (3, 2)
        await service.rotate("rot-b")
        await settle("a-v3")
        rotation = await service.rotate_master()
        assert rotation.rewrapped >= 5  # a: 3 versions, b: 2, c: 1
        await settle("master")
    finally:
        work.stop.set()
        await asyncio.gather(*tasks)
    assert not work.errors, "\n".join(work.errors[:20])
    assert all(work.searches[t] > 10 for t in TENANTS), work.searches

    # Everything written at any point: readable, and found by equality (old versions too).
    conn = await asyncpg.connect(rotation_proxy.dsn())
    try:
        for tenant in TENANTS:
            await conn.execute(f"SET pgseal.tenant = '{tenant}'")
            rows = work.rows[tenant]
            got = await conn.fetch(
                "SELECT id, secret_ref, payload, amount FROM vault_items WHERE tenant_id = $1 "
                "ORDER BY id", tenant)
            assert [tuple(r) for r in got] == [(w.id, w.ref, w.payload, w.amount) for w in rows]
            for w in rows[:: max(1, len(rows) // 25)] + rows[-3:]:
                found = await conn.fetch(
                    "SELECT id FROM vault_items WHERE secret_ref = $1", w.ref)
                assert [r[0] for r in found] == [w.id], (tenant, w.ref)
            refs = [w.ref for w in rows]
            found = await conn.fetch(
                "SELECT count(*) FROM vault_items WHERE secret_ref = ANY($1::text[])", refs)
            assert found[0][0] == len(rows)
    finally:
        await conn.close()

    # Cells carry the version they were sealed with: a has v1..v3, b v1..v2, c v1; what was
    # written after a rotation carries the new version.
    for tenant, newest in (("rot-a", 3), ("rot-b", 2), ("rot-c", 1)):
        by_id = await versions(service, tenant)
        cells = cell_key_ids(pg, tenant)
        seen = {by_id[ref_key] for ref_key, _ in cells.values()}
        assert seen == set(range(1, newest + 1)), (tenant, seen)
        for ref_key, payload_key in cells.values():
            assert ref_key == payload_key
        rows = work.rows[tenant]
        late = rows[marks["a-v3"][tenant]:]
        assert late and all(by_id[cells[w.id][0]] == newest for w in late), tenant
    a_rows, a_ids = work.rows["rot-a"], await versions(service, "rot-a")
    cells = cell_key_ids(pg, "rot-a")
    between = a_rows[marks["a-v2"]["rot-a"]:marks["pre-v3"]["rot-a"]]
    assert between and all(a_ids[cells[w.id][0]] == 2 for w in between)

    check_server_log(pg, log_start)

    # The data path's audit records name the version and kek of the key each statement
    # used (DESIGN.md 9), not only its id: every version rot-a sealed under shows up.
    trail = Path(rotation_config.audit.sinks[0].path or "")
    ids = {tenant: await versions(service, tenant) for tenant in TENANTS}
    records = [json.loads(line) for line in trail.read_text().splitlines()]
    data = [r for r in records if r["event"].startswith("data.") and r["tenant"] in TENANTS]
    assert data
    for record in data:
        assert record["key_version"] == ids[record["tenant"]][record["key_id"]], record
    # The kek: the master key the data key was unwrapped with, as the key's own lifecycle
    # records (create, rotate, unwrap, re-wrap) name it.
    lifecycle_keks = {r["kek"] for r in records if r["event"].startswith("key.") and r["kek"]}
    assert {r["kek"] for r in data} <= lifecycle_keks and all(r["kek"] for r in data)
    # After the master rotation the proxy unwrapped its keys again, under the new master:
    # what each tenant sealed last (after the "master" settle) names it.
    for tenant in TENANTS:
        last = [r for r in data if r["tenant"] == tenant and r["event"] == "data.encrypt"][-1]
        assert last["kek"] == rotation.new_kek, (tenant, last)
    sealed_a = {r["key_version"] for r in data
                if r["tenant"] == "rot-a" and r["event"] == "data.encrypt"}
    assert sealed_a == {1, 2, 3}


@pytest.mark.asyncio
async def test_destroy_shreds_one_tenant_only(rotation_proxy: ProxyThread, service: KeyService,
                                              pg: Any) -> None:
    dsn = rotation_proxy.dsn()
    ids: dict[str, int] = {}
    for tenant in ("rot-a", "rot-c"):
        conn = await asyncpg.connect(dsn, server_settings={"pgseal.tenant": tenant})
        try:
            ids[tenant] = await conn.fetchval(
                "INSERT INTO vault_items (tenant_id, secret_ref, payload, amount) VALUES ($1, $2, "
                "$3, $4) RETURNING id", tenant, f"ref-{tenant}", f"payload {SENT}", Decimal("1.5"))
        finally:
            await conn.close()
    await service.rotate("rot-c")  # two versions to shred
    destroyed = await service.destroy("rot-c")
    assert sorted(k.version for k in destroyed) == [1, 2]

    conn = await asyncpg.connect(dsn, server_settings={"pgseal.tenant": "rot-c"})
    try:
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.fetch("SELECT payload FROM vault_items WHERE id = $1", ids["rot-c"])
        assert info.value.sqlstate == "58030"
        assert "destroyed" in str(info.value) and "rot-c" in str(info.value)
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.fetch("SELECT id FROM vault_items WHERE secret_ref = $1", "ref-rot-c")
        assert info.value.sqlstate == "58030" and "destroyed" in str(info.value)
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.execute(
                "INSERT INTO vault_items (tenant_id, secret_ref) VALUES ($1, $2)", "rot-c", "x")
        assert info.value.sqlstate == "58030"
        count = await conn.fetchval("SELECT count(*) FROM vault_items WHERE tenant_id = 'rot-c'")
        assert count == 1
    finally:
        await conn.close()
    # The cells are still there, intact, and will never open again.
    (cell,), = pg.execute(f"SELECT payload FROM vault_items WHERE id = {ids['rot-c']}")
    assert bytes(cell)[:2] == b"\x01\x01"

    conn = await asyncpg.connect(dsn, server_settings={"pgseal.tenant": "rot-a"})
    try:
        row = await conn.fetchrow(
            "SELECT payload, amount FROM vault_items WHERE secret_ref = $1", "ref-rot-a")
        assert tuple(row) == (f"payload {SENT}", Decimal("1.5"))
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_a_search_prepared_before_a_rotation_finds_the_rows_of_both_versions(
        rotation_proxy: ProxyThread, service: KeyService, pg: Any) -> None:
    """A prepared search goes to PostgreSQL as `secret_ref = $1` with one cell while its
    tenant has one key version. Bound again after a rotation, the proxy switches it to
    `secret_ref = ANY($1)` (a Close and a Parse of the same name, before the Bind): the
    search finds the rows of both versions, and a cursor opened on the narrow statement
    before the switch reads on."""
    log_start = pg.log_path.stat().st_size if pg.log_path is not None else 0
    dsn = rotation_proxy.dsn()
    insert = ("INSERT INTO vault_items (tenant_id, secret_ref, payload, amount) "
              "VALUES ($1, $2, $3, $4) RETURNING id")
    conn = await asyncpg.connect(dsn, server_settings={"pgseal.tenant": "rot-b"})
    writer = await asyncpg.connect(dsn, server_settings={"pgseal.tenant": "rot-b"})
    try:
        old_id = await conn.fetchval(insert, "rot-b", "ref-both", f"old {SENT}", Decimal(1))
        search = await conn.prepare(
            "SELECT id FROM vault_items WHERE secret_ref = $1 ORDER BY id")
        assert [r[0] for r in await search.fetch("ref-both")] == [old_id]
        async with conn.transaction():
            cursor = await search.cursor("ref-both")  # a portal of the narrow statement
            await service.rotate("rot-b")
            version_of = await versions(service, "rot-b")
            inserted = [old_id]
            for _ in range(200):  # until the proxy has heard of the new version
                inserted.append(await writer.fetchval(
                    insert, "rot-b", "ref-both", f"new {SENT}", Decimal(2)))
                if version_of[cell_key_ids(pg, "rot-b")[inserted[-1]][0]] == 2:
                    break
                await asyncio.sleep(0.02)
            else:
                pytest.fail("the proxy never sealed under the new version")
            found = [r[0] for r in await search.fetch("ref-both")]  # the switch
            assert found == inserted
            # The cursor's portal was made from the narrow statement: it reads on.
            assert [r[0] for r in await cursor.fetch(100)] == [old_id]
        # Still wide: every later Bind takes both versions.
        assert [r[0] for r in await search.fetch("ref-both")] == inserted
    finally:
        await conn.close()
        await writer.close()

    check_server_log(pg, log_start, b"WHERE secret_ref = $1 ORDER BY id",
                     b"WHERE secret_ref = ANY($1) ORDER BY id")


@pytest.mark.asyncio
async def test_psycopg_pipelined_prepared_searches_switch_across_a_rotation(
        rotation_proxy: ProxyThread, service: KeyService, pg: Any) -> None:
    """psycopg (text format) with server-side prepared statements in pipeline mode: the
    searches prepared under one key version are switched to the wide form in the middle
    of a pipeline after the rotation, and every result is right."""
    log_start = pg.log_path.stat().st_size if pg.log_path is not None else 0
    dsn = rotation_proxy.dsn()
    insert = ("INSERT INTO vault_items (tenant_id, secret_ref, payload, amount) "
              "VALUES (%s, %s, %s, %s) RETURNING id")
    search = "SELECT id, payload FROM vault_items WHERE secret_ref = %s ORDER BY id"
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, prepare_threshold=0)
    try:
        await conn.execute("SET pgseal.tenant = 'rot-a'")
        cur = await conn.execute(insert, ["rot-a", "ref-pipe", f"old {SENT}", Decimal(1)])
        old = (await cur.fetchone() or (0,))[0]
        cur = await conn.execute(search, ["ref-pipe"])
        assert await cur.fetchall() == [(old, f"old {SENT}")]
        await service.rotate("rot-a")
        version_of = await versions(service, "rot-a")
        for _ in range(200):  # until the proxy has heard of the new version
            cur = await conn.execute(insert, ["rot-a", "ref-pipe", f"new {SENT}", Decimal(2)])
            new = (await cur.fetchone() or (0,))[0]
            if version_of[cell_key_ids(pg, "rot-a")[new][0]] == 2:
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the proxy never sealed under the new version")
        async with conn.pipeline():
            cursors = [await conn.execute(search, ["ref-pipe"]) for _ in range(3)]
        results = [await c.fetchall() for c in cursors]
        ids = [r[0] for r in results[0]]
        assert ids[0] == old and ids[-1] == new and len(ids) >= 2
        assert results == [results[0]] * 3
        cur = await conn.execute(search, ["ref-pipe"])  # after the pipeline: still wide
        assert await cur.fetchall() == results[0]
    finally:
        await conn.close()
    check_server_log(pg, log_start, b"FROM vault_items WHERE secret_ref = $1 ORDER BY id",
                     b"FROM vault_items WHERE secret_ref = ANY($1) ORDER BY id")

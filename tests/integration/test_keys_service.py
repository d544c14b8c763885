"""KeyService end to end on a real SoftHSM2 token and a real PostgreSQL keystore."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from proxy.config import CacheConfig, Config, KeystoreConfig
from proxy.crypto.cells import CellError
from proxy.errors import KeyNotFound, KeyServiceUnavailable
from proxy.keys import KeyExists, KeyService

pytestmark = pytest.mark.integration

COLUMN = "public.patients.ssn"


def forms(secret: bytes) -> list[bytes]:
    """The ways a leaked key could be written down."""
    return [secret, secret.hex().encode(), secret.hex().upper().encode(),
            base64.b64encode(secret), base64.b64encode(secret).rstrip(b"=")]


async def keystore_dump(config: Config) -> bytes:
    """Every byte of every row of every table in the keystore schema."""
    conn = await asyncpg.connect(config.keystore.dsn)
    try:
        tables = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1",
            config.keystore.schema,
        )
        out = b""
        for t in tables:
            rows = await conn.fetch(
                f'SELECT * FROM "{config.keystore.schema}"."{t["table_name"]}"'
            )
            for row in rows:
                for value in row.values():
                    out += value if isinstance(value, bytes) else str(value).encode()
                    out += b"\0"
        return out
    finally:
        await conn.close()


def audit_path(config: Config) -> Path:
    assert config.audit.sinks[0].path is not None
    return config.path(config.audit.sinks[0].path)


def audit_events(config: Config) -> list[dict[str, Any]]:
    return [json.loads(line) for line in audit_path(config).read_text().splitlines()]


@pytest.mark.asyncio
async def test_seal_and_open_through_the_service(key_service: KeyService) -> None:
    key = await key_service.current_key("acme")
    assert key.state == "active" and key.version >= 1
    cell = key.cell_key.seal(COLUMN, b"123-45-6789", deterministic=False)
    again = await key_service.key_by_id(key.key_id)
    assert again.cell_key.open(COLUMN, cell) == b"123-45-6789"


@pytest.mark.asyncio
async def test_no_raw_data_key_in_keystore_audit_or_logs(
    make_keys_config: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    config = make_keys_config()
    async with await KeyService.open(config) as service:
        keys = [await service.current_key(t) for t in ("acme", "globex")]
        await service.rotate("acme")
        keys.append(await service.current_key("acme"))
        service.cache.clear()
        for k in keys:
            await service.key_by_id(k.key_id)  # unwrap again: logged and audited
        await service.rotate_master()
        service.cache.clear()
        await service.key_by_id(keys[0].key_id)
        stored = await keystore_dump(config)
    audit = audit_path(config).read_bytes()
    logs = caplog.text.encode() + b"".join(repr(r.__dict__).encode() for r in caplog.records)
    for key in keys:
        dek = bytes(key.cell_key._dek or b"")
        assert len(dek) == 32
        for form in forms(dek):
            assert form not in stored, "raw data key in the keystore"
            assert form not in audit, "raw data key in the audit trail"
            assert form not in logs, "raw data key in the logs"
    conn = await asyncpg.connect(config.keystore.dsn)
    try:
        wrapped = await conn.fetch(f'SELECT wrapped FROM "{config.keystore.schema}".keys')
    finally:
        await conn.close()
    for row in wrapped:  # not even wrapped keys go to the audit trail or the logs
        for form in forms(bytes(row["wrapped"])):
            assert form not in audit and form not in logs


@pytest.mark.asyncio
async def test_tampered_cells_fail_to_open(key_service: KeyService) -> None:
    acme = await key_service.current_key("acme")
    globex = await key_service.current_key("globex")
    for deterministic in (False, True):
        cell = acme.cell_key.seal(COLUMN, b"secret", deterministic=deterministic)
        flipped = bytearray(cell)
        flipped[-1] ^= 1
        with pytest.raises(CellError):
            acme.cell_key.open(COLUMN, bytes(flipped))  # flipped bit
        with pytest.raises(CellError):
            globex.cell_key.open(COLUMN, cell)  # swapped tenant (the key its id names is acme's)
        with pytest.raises(CellError):
            acme.cell_key.open("public.patients.name", cell)  # swapped column
        relabelled = cell[:2] + globex.key_id.to_bytes(4, "big") + cell[6:]
        with pytest.raises(CellError):
            (await key_service.key_by_id(globex.key_id)).cell_key.open(COLUMN, relabelled)
    with pytest.raises(KeyNotFound, match="no data key with id 4000000"):
        await key_service.key_by_id(4_000_000)  # wrong key id


@pytest.mark.asyncio
async def test_rotation_keeps_old_cells_readable(make_keys_config: Any) -> None:
    async with await KeyService.open(make_keys_config()) as service:
        v1 = await service.current_key("acme")
        old_cell = v1.cell_key.seal(COLUMN, b"before", deterministic=False)
        new, retired = await service.rotate("acme")
        assert (retired.key_id, retired.state) == (v1.key_id, "retired")
        assert (new.version, new.state) == (v1.version + 1, "active")
        v2 = await service.current_key("acme")
        assert (v2.key_id, v2.version) == (new.key_id, new.version)
        new_cell = v2.cell_key.seal(COLUMN, b"after", deterministic=False)
        assert int.from_bytes(new_cell[2:6], "big") == new.key_id  # new cells carry the new key
        old = await service.key_by_id(v1.key_id)
        assert old.state == "retired"
        assert old.cell_key.open(COLUMN, old_cell) == b"before"
        assert (await service.key_by_id(new.key_id)).cell_key.open(COLUMN, new_cell) == b"after"
        events = [(e["event"], e["tenant"]) for e in audit_events(service.config)]
        assert ("key.rotate", "acme") in events


@pytest.mark.asyncio
async def test_destroy_shreds_one_tenant_only(make_keys_config: Any) -> None:
    config = make_keys_config()
    async with await KeyService.open(config) as service:
        acme = await service.current_key("acme")
        await service.rotate("acme")
        acme2 = await service.current_key("acme")
        globex = await service.current_key("globex")
        cells = [k.cell_key.seal(COLUMN, b"x", deterministic=False) for k in (acme, acme2, globex)]
        destroyed = await service.destroy("acme")
        assert {k.key_id for k in destroyed} == {acme.key_id, acme2.key_id}
        assert await service.destroy("acme") == []  # idempotent
        for key in (acme, acme2):
            destroyed_message = f"data key {key.key_id} of tenant 'acme' was destroyed"
            with pytest.raises(KeyNotFound, match=destroyed_message):
                await service.key_by_id(key.key_id)
        with pytest.raises(ValueError):  # the cached key a caller still held is zeroed
            acme2.cell_key.open(COLUMN, cells[1])
        with pytest.raises(KeyNotFound, match="were destroyed"):
            await service.current_key("acme")  # no silent new key for a shredded tenant
        other = await service.key_by_id(globex.key_id)
        assert other.cell_key.open(COLUMN, cells[2]) == b"x"
        rows = await service.list_keys("acme")
        assert {r.state for r in rows} == {"destroyed"}
        # explicit create starts the tenant over with a new version
        fresh = await service.create_key("acme")
        assert fresh.version == 3
    conn = await asyncpg.connect(config.keystore.dsn)
    try:
        wrapped = await conn.fetch(
            f'SELECT wrapped, nonce FROM "{config.keystore.schema}".keys '
            "WHERE tenant = 'acme' AND state = 'destroyed'"
        )
    finally:
        await conn.close()
    assert wrapped and all(r["wrapped"] is None and r["nonce"] is None for r in wrapped)


@pytest.mark.asyncio
async def test_cache_hit_never_touches_the_hsm(key_service: KeyService) -> None:
    key = await key_service.current_key("hits")
    await key_service.key_by_id(key.key_id)
    calls, unwraps = key_service.hsm.calls, key_service.hsm.unwraps
    for _ in range(1000):
        assert await key_service.current_key("hits", uses=3) is key
        assert (await key_service.key_by_id(key.key_id)).key_id == key.key_id
    assert (key_service.hsm.calls, key_service.hsm.unwraps) == (calls, unwraps)


@pytest.mark.asyncio
async def test_one_unwrap_for_100_concurrent_misses(key_service: KeyService) -> None:
    key = await key_service.current_key("flight")
    key_service.cache.clear()
    unwraps = key_service.hsm.unwraps
    got = await asyncio.gather(*(key_service.key_by_id(key.key_id) for _ in range(100)))
    assert key_service.hsm.unwraps == unwraps + 1
    assert len({id(k) for k in got}) == 1
    key_service.cache.clear()
    unwraps = key_service.hsm.unwraps
    await asyncio.gather(*(key_service.current_key("flight") for _ in range(100)))
    assert key_service.hsm.unwraps == unwraps + 1


@pytest.mark.asyncio
async def test_concurrent_first_use_creates_exactly_one_key(make_keys_config: Any) -> None:
    config = make_keys_config()
    a, b = await KeyService.open(config), await KeyService.open(config)
    try:
        keys = await asyncio.gather(*(s.current_key(f"t{i}") for i in range(20) for s in (a, b)))
        by_tenant: dict[str, set[int]] = {}
        for k in keys:
            by_tenant.setdefault(k.tenant, set()).add(k.key_id)
        assert all(len(ids) == 1 for ids in by_tenant.values())
        rows = await a.list_keys()
        assert len(rows) == 20 and {r.state for r in rows} == {"active"}
    finally:
        await a.close()
        await b.close()


async def wait_until(predicate: Any, timeout: float = 1.0) -> float:
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not predicate():
        if loop.time() - start > timeout:
            raise AssertionError(f"not within {timeout}s")
        await asyncio.sleep(0.005)
    return loop.time() - start


@pytest.mark.asyncio
async def test_other_instances_see_rotate_and_destroy_within_a_second(
    make_keys_config: Any,
) -> None:
    config = make_keys_config()
    a, b = await KeyService.open(config), await KeyService.open(config)
    try:
        first = await b.current_key("shared")
        assert b.cache.hit_by_tenant("shared") is first
        new, _ = await a.rotate("shared")
        await wait_until(lambda: b.cache.hit_by_tenant("shared") is None)
        assert (await b.current_key("shared")).key_id == new.key_id
        await b.key_by_id(first.key_id)
        await a.destroy("shared")
        await wait_until(lambda: b.cache.hit_by_id(first.key_id) is None
                         and b.cache.hit_by_tenant("shared") is None)
        with pytest.raises(KeyNotFound):
            await b.key_by_id(new.key_id)
    finally:
        await a.close()
        await b.close()


@pytest.mark.asyncio
async def test_rotate_master_rewraps_everything_and_destroys_the_old_one(
    make_keys_config: Any,
) -> None:
    config = make_keys_config()
    async with await KeyService.open(config) as service:
        keys = [await service.current_key(f"m{i}") for i in range(5)]
        cells = [k.cell_key.seal(COLUMN, b"v", deterministic=True) for k in keys]
        (old_master,) = await service.hsm.list_masters()
        result = await service.rotate_master()
        assert result.rewrapped == 5 and result.old_keks == (old_master.kek,) and not result.resumed
        (master,) = await service.hsm.list_masters()  # the old one is gone from the token
        assert master.kek == result.new_kek and not master.extractable
        service.cache.clear()
        for key, cell in zip(keys, cells, strict=True):
            fresh = await service.key_by_id(key.key_id)
            assert fresh.kek == result.new_kek
            assert fresh.cell_key.open(COLUMN, cell) == b"v"  # no data rewrite needed
        new = await service.current_key("m-new")  # wrapped under the new master key
        assert new.kek == result.new_kek


@pytest.mark.asyncio
async def test_rotate_master_resumes_after_an_interruption(make_keys_config: Any,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_keys_config()
    async with await KeyService.open(config) as service:
        key = await service.current_key("resume")
        cell = key.cell_key.seal(COLUMN, b"v", deterministic=False)
        real_activate = service.keystore.activate_master

        async def crash(*args: Any) -> None:
            raise KeyServiceUnavailable("simulated crash between steps")

        monkeypatch.setattr(service.keystore, "activate_master", crash)
        with pytest.raises(KeyServiceUnavailable, match="simulated"):
            await service.rotate_master()
        assert len(await service.hsm.list_masters()) == 2  # new made, nothing re-wrapped
        monkeypatch.setattr(service.keystore, "activate_master", real_activate)
        service.cache.clear()
        assert (await service.key_by_id(key.key_id)).cell_key.open(COLUMN, cell) == b"v"
        result = await service.rotate_master()
        assert result.resumed and result.rewrapped == 1
        assert [m.kek for m in await service.hsm.list_masters()] == [result.new_kek]
        service.cache.clear()
        assert (await service.key_by_id(key.key_id)).cell_key.open(COLUMN, cell) == b"v"


@pytest.mark.asyncio
async def test_auto_create_off_asks_for_keys_create(make_keys_config: Any) -> None:
    config = make_keys_config()
    config = replace(config, keystore=replace(config.keystore, auto_create=False))
    async with await KeyService.open(config) as service:
        with pytest.raises(KeyNotFound, match="pgseal keys create --tenant nokey"):
            await service.current_key("nokey")
        await service.create_key("nokey")
        with pytest.raises(KeyExists, match="already has an active data key"):
            await service.create_key("nokey")
        assert (await service.current_key("nokey")).version == 1


@pytest.mark.asyncio
async def test_every_unwrap_and_lifecycle_event_is_audited(make_keys_config: Any) -> None:
    config = make_keys_config()
    async with await KeyService.open(config) as service:
        key = await service.current_key("aud")  # key.create (no unwrap: we made it)
        service.cache.clear()
        await service.key_by_id(key.key_id)  # key.unwrap
        await service.rotate("aud")  # key.rotate
        await service.destroy("aud")  # key.destroy x2
    events = [(e["event"], e["tenant"], e["key_id"]) for e in audit_events(config)]
    assert events[0][0] == "audit.start" and events[-1][0] == "audit.stop"
    assert ("key.create", "aud", key.key_id) in events
    assert ("key.unwrap", "aud", key.key_id) in events
    assert sum(1 for e in events if e[0] == "key.rotate") == 1
    assert sum(1 for e in events if e[0] == "key.destroy") == 2
    from proxy.audit import verify_jsonl

    assert verify_jsonl(audit_path(config)).ok


@pytest.mark.asyncio
async def test_keystore_unreachable_then_recovers_without_restart(
    make_keys_config: Any, pg: Any
) -> None:
    config = make_keys_config()
    async with await KeyService.open(config, listen=False) as service:
        good = service.keystore.dsn
        service.keystore.dsn = f"postgresql://postgres@127.0.0.1:1/{config.keystore.schema}"
        await service.keystore.close()  # drop the pool: the next call reconnects
        with pytest.raises(KeyServiceUnavailable) as info:
            await service.current_key("down")
        assert "keystore 127.0.0.1:1/" in str(info.value) and "unreachable" in str(info.value)
        assert info.value.sqlstate == "58030"
        service.keystore.dsn = good
        await service.keystore.close()
        assert (await service.current_key("down")).tenant == "down"


@pytest.mark.asyncio
async def test_audit_failure_blocks_the_key_use(make_keys_config: Any, tmp_path: Path) -> None:
    config = make_keys_config()
    async with await KeyService.open(config, listen=False) as service:
        key = await service.current_key("blocked")
        service.cache.clear()
        sink = service.audit.sinks[0]
        real = sink.write

        async def broken(batch: Any) -> None:
            from proxy.audit.sinks import SinkError

            raise SinkError("audit sink jsonl x unwritable: disk full")

        sink.write = broken  # type: ignore[method-assign]
        with pytest.raises(KeyServiceUnavailable, match="disk full"):
            await service.key_by_id(key.key_id)
        assert service.cache.hit_by_id(key.key_id) is None  # not cached either
        with pytest.raises(KeyServiceUnavailable):
            await service.rotate("blocked")  # a change whose record is lost is rolled back
        sink.write = real  # type: ignore[method-assign]
        assert (await service.key_by_id(key.key_id)).key_id == key.key_id
        assert len(await service.list_keys("blocked")) == 1


@pytest.mark.asyncio
async def test_max_uses_unwraps_again(make_keys_config: Any) -> None:
    config = make_keys_config(cache=CacheConfig(ttl_seconds=300, max_entries=10, max_uses=5))
    async with await KeyService.open(config, listen=False) as service:
        key = await service.current_key("uses")
        service.cache.clear()
        unwraps = service.hsm.unwraps
        await service.key_by_id(key.key_id, uses=3)
        await service.key_by_id(key.key_id, uses=2)
        assert service.hsm.unwraps == unwraps + 1
        await service.key_by_id(key.key_id, uses=1)
        assert service.hsm.unwraps == unwraps + 2


def test_keystore_schema_is_versioned(keys_config: Config, pg: Any) -> None:
    rows = pg.execute(f'SELECT version, name FROM "{keys_config.keystore.schema}".migrations')
    assert rows and rows[0][0] == 1
    assert isinstance(KeystoreConfig().schema, str)


@pytest.mark.asyncio
async def test_a_burst_of_misses_shares_one_hsm_trip(make_keys_config: Any) -> None:
    config = make_keys_config()
    async with await KeyService.open(config) as service:
        keys = [await service.current_key(f"burst{i}") for i in range(50)]
        service.cache.clear()
        calls, unwraps = service.hsm.calls, service.hsm.unwraps
        got = await asyncio.gather(
            *(service.current_key(f"burst{i}") for i in range(50)),
            *(service.key_by_id(k.key_id) for k in keys),
        )
        assert service.hsm.calls == calls + 1  # one trip to the HSM thread...
        assert service.hsm.unwraps == unwraps + 50  # ...for 50 unwraps
        assert got[0] is got[50]  # by tenant and by id: the same key object
        events = [e for e in audit_events(config) if e["event"] == "key.unwrap"]
        assert len(events) >= 50


@pytest.mark.asyncio
async def test_listener_reconnects_after_its_connection_dies(make_keys_config: Any,
                                                             pg: Any) -> None:
    config = make_keys_config()
    a, b = await KeyService.open(config), await KeyService.open(config)
    try:
        await b.current_key("relisten")
        pg.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                   "WHERE application_name = 'pgseal-keystore-listener'")
        await wait_until(lambda: not b.listening.is_set(), timeout=10)
        # on losing it the cache forgets everything (a rotate could be missed meanwhile)
        assert b.cache.hit_by_tenant("relisten") is None
        await wait_until(b.listening.is_set, timeout=5)
        await b.current_key("relisten")
        new, _ = await a.rotate("relisten")
        await wait_until(lambda: b.cache.hit_by_tenant("relisten") is None)
        assert (await b.current_key("relisten")).key_id == new.key_id
    finally:
        await a.close()
        await b.close()


@pytest.mark.asyncio
async def test_lazy_open_starts_degraded_and_recovers(make_keys_config: Any) -> None:
    config = make_keys_config()
    down = replace(config, keystore=replace(config.keystore,
                                            dsn="postgresql://postgres@127.0.0.1:1/postgres"))
    with pytest.raises(KeyServiceUnavailable, match="unreachable"):
        await KeyService.open(down)  # the default: fail fast at startup
    service = await KeyService.open(down, lazy=True)
    try:
        with pytest.raises(KeyServiceUnavailable, match="unreachable") as info:
            await service.current_key("lazy")
        assert info.value.sqlstate == "58030"
        service.keystore.dsn = config.keystore.dsn  # the database is back
        await service.keystore.close()
        assert (await service.current_key("lazy")).tenant == "lazy"
    finally:
        await service.close()

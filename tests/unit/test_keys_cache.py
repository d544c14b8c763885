"""TenantKeyCache: hits cost no load, single-flight misses, TTL, max entries, max uses, eviction."""

from __future__ import annotations

import asyncio
import os

import pytest

from proxy.crypto.cells import CellKey
from proxy.keys.cache import TenantKeyCache
from proxy.keys.model import DataKey


def data_key(key_id: int, tenant: str = "acme", version: int = 1) -> DataKey:
    cell_key = CellKey(key_id, tenant, os.urandom(32))
    return DataKey(key_id, tenant, version, "active", "kek1", cell_key)


class Loader:
    def __init__(self, key: DataKey, delay: float = 0.0) -> None:
        self.key = key
        self.delay = delay
        self.calls = 0

    async def __call__(self) -> DataKey:
        self.calls += 1
        await asyncio.sleep(self.delay)
        return self.key


def cache(**kw: float) -> TenantKeyCache:
    args = {"ttl_seconds": 300.0, "max_entries": 100, "max_uses": 1000, **kw}
    return TenantKeyCache(ttl_seconds=args["ttl_seconds"], max_entries=int(args["max_entries"]),
                          max_uses=int(args["max_uses"]))


@pytest.mark.asyncio
async def test_hit_after_miss_does_not_load() -> None:
    c, load = cache(), Loader(data_key(1))
    assert await c.by_tenant("acme", 1, load) is load.key
    for _ in range(10):
        assert await c.by_tenant("acme", 1, load) is load.key
        assert await c.by_id(1, 1, load) is load.key
    assert load.calls == 1
    assert c.hit_by_tenant("acme") is load.key


@pytest.mark.asyncio
async def test_single_flight_one_load_for_100_concurrent_misses() -> None:
    c, load = cache(), Loader(data_key(1), delay=0.05)
    keys = await asyncio.gather(*(c.by_tenant("acme", 1, load) for _ in range(100)))
    assert load.calls == 1
    assert all(k is load.key for k in keys)


@pytest.mark.asyncio
async def test_failed_load_reaches_every_waiter_and_is_not_cached() -> None:
    c = cache()
    calls = 0

    async def failing() -> DataKey:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        raise RuntimeError("hsm down")

    results = await asyncio.gather(*(c.by_id(5, 1, failing) for _ in range(10)),
                                   return_exceptions=True)
    assert calls == 1 and all(isinstance(r, RuntimeError) for r in results)
    ok = Loader(data_key(5))
    assert await c.by_id(5, 1, ok) is ok.key  # tried again, not a cached failure


@pytest.mark.asyncio
async def test_cancelled_waiter_does_not_cancel_the_load() -> None:
    c, load = cache(), Loader(data_key(1), delay=0.05)
    first = asyncio.ensure_future(c.by_tenant("acme", 1, load))
    second = asyncio.ensure_future(c.by_tenant("acme", 1, load))
    await asyncio.sleep(0.01)
    first.cancel()
    assert await second is load.key
    assert load.calls == 1


@pytest.mark.asyncio
async def test_ttl_expires_entries() -> None:
    c, load = cache(ttl_seconds=0.05), Loader(data_key(1))
    await c.by_tenant("acme", 1, load)
    await asyncio.sleep(0.1)
    assert c.hit_by_tenant("acme") is None and c.hit_by_id(1) is None
    await c.by_tenant("acme", 1, load)
    assert load.calls == 2


@pytest.mark.asyncio
async def test_max_uses_forces_a_reload() -> None:
    c, load = cache(max_uses=10), Loader(data_key(1))
    await c.by_id(1, 4, load)
    await c.by_id(1, 4, load)  # 8 uses
    assert load.calls == 1
    await c.by_id(1, 4, load)  # would be 12 > 10: unwrap again
    assert load.calls == 2


@pytest.mark.asyncio
async def test_max_entries_evicts_least_recently_used() -> None:
    c = cache(max_entries=3)
    loaders = {i: Loader(data_key(i, tenant=f"t{i}")) for i in range(1, 5)}
    for i in (1, 2, 3):
        await c.by_id(i, 1, loaders[i])
    await c.by_id(1, 1, loaders[1])  # 1 is now the most recent
    await c.by_id(4, 1, loaders[4])  # evicts 2
    assert c.hit_by_id(2) is None
    assert c.hit_by_id(1) is not None and c.hit_by_id(3) is not None
    assert len(c) == 3


@pytest.mark.asyncio
async def test_evict_tenant_drops_every_version_and_closes_on_destroy() -> None:
    c = cache()
    v1, v2, other = data_key(1), data_key(2, version=2), data_key(3, tenant="globex")
    await c.by_id(1, 1, Loader(v1))
    await c.by_tenant("acme", 1, Loader(v2))
    await c.by_tenant("globex", 1, Loader(other))
    assert c.evict_tenant("acme", close=True) == 2
    assert c.hit_by_id(1) is None and c.hit_by_id(2) is None and c.hit_by_tenant("acme") is None
    assert c.hit_by_tenant("globex") is other
    with pytest.raises(ValueError):  # a destroyed key still held by a caller is useless now
        v2.cell_key.seal("s.t.c", b"x", deterministic=False)


@pytest.mark.asyncio
async def test_load_that_raced_an_eviction_is_not_stored() -> None:
    c = cache()
    load = Loader(data_key(1), delay=0.05)
    pending = asyncio.ensure_future(c.by_tenant("acme", 1, load))
    await asyncio.sleep(0.01)
    c.evict_tenant("acme")  # a rotation committed while we were loading
    assert await pending is load.key  # the caller still gets its key...
    assert c.hit_by_tenant("acme") is None  # ...but it was not cached


@pytest.mark.asyncio
async def test_entries_are_short_lived_while_notifications_may_be_missed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from proxy.keys import cache as cache_module

    monkeypatch.setattr(cache_module, "DEGRADED_TTL", 0.05)
    c, load = cache(), Loader(data_key(1))
    c.degraded = True
    await c.by_tenant("acme", 1, load)
    assert c.hit_by_tenant("acme") is load.key  # a load is readable right after...
    await asyncio.sleep(0.1)
    assert c.hit_by_tenant("acme") is None  # ...but does not outlive the short TTL

"""TenantKeyCache.key_meta: the (version, kek) the data path's audit records name for a key
id, set when a key is unwrapped and kept apart from the keys themselves (proxy/keys/cache.py)."""

from __future__ import annotations

import asyncio

import pytest

from proxy.crypto.cells import CellKey
from proxy.keys import cache as cache_module
from proxy.keys.cache import TenantKeyCache
from proxy.keys.model import DataKey


def _key(key_id: int, kek: str, version: int = 1, tenant: str = "t1") -> DataKey:
    return DataKey(key_id, tenant, version, "active", kek, CellKey(key_id, tenant, bytes(32)))


def _load(cache: TenantKeyCache, *keys: DataKey) -> None:
    async def load_all() -> None:
        for key in keys:
            async def load(key: DataKey = key) -> DataKey:
                return key

            await cache.by_id(key.key_id, 0, load)

    asyncio.run(load_all())


def _cache() -> TenantKeyCache:
    return TenantKeyCache(ttl_seconds=300, max_entries=100, max_uses=10**9)


def test_an_unwrap_records_version_and_kek_and_a_new_unwrap_updates_the_kek() -> None:
    cache = _cache()
    assert cache.key_meta == {}
    _load(cache, _key(7, "kek-a", version=3))
    assert cache.key_meta == {7: (3, "kek-a")}
    assert cache.hit_by_id(7, 1) is not None  # a use changes nothing: set once per unwrap
    assert cache.key_meta == {7: (3, "kek-a")}
    # keys rotate-master: the cache is cleared, the key unwrapped again under the new kek.
    cache.clear()
    _load(cache, _key(7, "kek-b", version=3))
    assert cache.key_meta == {7: (3, "kek-b")}


def test_the_map_outlives_the_cache_but_never_holds_a_key() -> None:
    cache = _cache()
    _load(cache, _key(7, "kek-a"))
    cache.clear()
    assert cache.hit_by_id(7, 1) is None
    assert cache.key_meta == {7: (1, "kek-a")}
    assert all(type(v) is tuple and len(v) == 2 for v in cache.key_meta.values())


def test_it_is_bounded_dropping_the_oldest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_module, "KEY_META_MAX", 3)
    cache = _cache()
    _load(cache, *(_key(i, "k") for i in range(1, 6)))
    assert list(cache.key_meta) == [3, 4, 5]
    cache.clear()
    _load(cache, _key(1, "k"))  # unwrapped again: back, and the oldest goes
    assert list(cache.key_meta) == [4, 5, 1]

"""CacheKeyRing.key_meta: the (version, kek) the data path's audit records name for a key
id, kept apart from the keys themselves (proxy/server/datapath_shell.py)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from proxy.crypto.cells import CellKey
from proxy.keys.cache import TenantKeyCache
from proxy.keys.model import DataKey
from proxy.server import datapath_shell
from proxy.server.datapath_shell import CacheKeyRing


def _key(key_id: int, kek: str, version: int = 1, tenant: str = "t1") -> DataKey:
    return DataKey(key_id, tenant, version, "active", kek, CellKey(key_id, tenant, bytes(32)))


def _load(cache: TenantKeyCache, *keys: DataKey) -> None:
    async def load_all() -> None:
        for key in keys:
            async def load(key: DataKey = key) -> DataKey:
                return key

            await cache.by_id(key.key_id, 0, load)

    asyncio.run(load_all())


def _ring_with(*keys: DataKey) -> tuple[CacheKeyRing, TenantKeyCache]:
    cache = TenantKeyCache(ttl_seconds=300, max_entries=100, max_uses=10**9)
    _load(cache, *keys)
    return CacheKeyRing(SimpleNamespace(cache=cache), None), cache  # type: ignore[arg-type]


def test_a_hit_records_version_and_kek_and_a_new_unwrap_updates_the_kek() -> None:
    ring, cache = _ring_with(_key(7, "kek-a", version=3))
    assert ring.key_meta == {}
    assert ring.by_id(7, 1) is not None
    assert ring.key_meta == {7: (3, "kek-a")}
    # keys rotate-master: the cache is cleared, the key unwrapped again under the new kek.
    cache.clear()
    _load(cache, _key(7, "kek-b", version=3))
    assert ring.by_id(7, 1) is not None
    assert ring.key_meta == {7: (3, "kek-b")}


def test_the_map_outlives_the_cache_but_never_holds_a_key() -> None:
    ring, cache = _ring_with(_key(7, "kek-a"))
    ring.by_id(7, 1)
    cache.clear()
    assert ring.by_id(7, 1) is None
    assert ring.key_meta == {7: (1, "kek-a")}
    assert all(type(v) is tuple and len(v) == 2 for v in ring.key_meta.values())


def test_it_is_bounded_dropping_the_oldest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datapath_shell, "KEY_META_MAX", 3)
    ring, _ = _ring_with(*(_key(i, "k") for i in range(1, 6)))
    for i in range(1, 6):
        ring.by_id(i, 1)
    assert list(ring.key_meta) == [3, 4, 5]
    ring.by_id(1, 1)  # used again: back, and the oldest goes
    assert list(ring.key_meta) == [4, 5, 1]

"""In-memory cache of unwrapped data keys (DESIGN.md 7): TTL, max entries, max uses, single-flight.

Storage is aiocache's memory backend: it owns the entries and their TTL timers, so an
expired key is dropped from memory on time, not on the next lookup. Two things go
around its async API, on purpose:

- hits read the backend's dict synchronously (`peek`): every aiocache call runs through
  its decorator stack (timeout, plugins, an environment lookup, debug logging), measured
  at ~7.7 us per get against ~0.06 us for the dict, and a hit must cost next to nothing;
- evictions are synchronous (`drop`), so a rotate or destroy notification evicts at once,
  with no await in which a stale key could still be served.

Entries: ``k:<key_id>`` -> _Entry (the DataKey and how often it was used); ``t:<tenant>``
-> key_id of the tenant's active key. Misses are single-flight: concurrent callers for the
same tenant or key id share one load (one keystore read and one HSM unwrap). An eviction
bumps `epoch`; a load that began before it returns its key to its callers but does not
store it (it may predate the rotation or destruction that caused the eviction).

Destroyed keys are remembered too (key id -> tenant, bounded like the entries): a
destroyed key never comes back (key ids are never reused), and without the mark every
row of a shredded tenant would cost a keystore round trip to learn the same thing.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiocache import SimpleMemoryCache

from proxy.keys.model import DataKey

DEGRADED_TTL = 1.0  # seconds an entry lives while change notifications may be missed
# TenantKeyCache.key_meta holds at most this many keys' (version, kek), ~10 MB: a record
# names null only if this many other keys were loaded between its key's use and its queueing.
KEY_META_MAX = 100_000


class _MemoryBackend(SimpleMemoryCache):  # type: ignore[misc]
    """aiocache's memory backend plus a synchronous peek and drop (see module doc)."""

    def peek(self, key: str) -> Any:
        return self._cache.get(key)

    def keys(self) -> list[str]:
        return list(self._cache)

    def drop(self, key: str) -> None:
        self._cache.pop(key, None)
        handle = self._handlers.pop(key, None)
        if handle is not None:
            handle.cancel()


@dataclass(slots=True)
class _Entry:
    key: DataKey
    uses: int


class TenantKeyCache:
    """Unwrapped data keys by key id and by tenant (active key)."""

    def __init__(self, *, ttl_seconds: float, max_entries: int, max_uses: int) -> None:
        self.ttl = ttl_seconds
        self.max_entries = max_entries
        self.max_uses = max_uses
        self._store = _MemoryBackend(timeout=None)
        self._lru: OrderedDict[int, None] = OrderedDict()  # key ids, least recently used first
        self._inflight: dict[str, asyncio.Task[DataKey]] = {}
        self._destroyed: OrderedDict[int, str] = OrderedDict()  # key id -> tenant
        self.epoch = 0
        # True while other processes' notifications may be missed (LISTEN down or not yet
        # up): entries then live DEGRADED_TTL at most, so a rotate or destroy made
        # elsewhere meanwhile is honoured within that bound, while a caller that loads a
        # key and reads it back from the cache a moment later still finds it.
        self.degraded = False
        self.hits = 0
        self.misses = 0
        # key id -> (version, kek) of every key loaded: what the data path's audit records
        # name besides the key id (DESIGN.md 9). Set once per unwrap, not per use, and kept
        # past the key's eviction (a long result's records are queued when it ends); never
        # key material. A key id's version never changes and ids are never reused; the kek
        # changes with `keys rotate-master`, after which the key is unwrapped again.
        self.key_meta: dict[int, tuple[int, str]] = {}

    # -- hot path

    def _take(self, entry: _Entry | None, uses: int) -> DataKey | None:
        if entry is None:
            return None
        if entry.uses + uses > self.max_uses and entry.uses > 0:
            self._drop_entry(entry.key)  # used up: the next use unwraps again (and is audited)
            return None
        entry.uses += uses
        if entry.key.key_id in self._lru:
            self._lru.move_to_end(entry.key.key_id)
        self.hits += 1
        return entry.key

    def hit_by_id(self, key_id: int, uses: int = 1) -> DataKey | None:
        entry: _Entry | None = self._store.peek(f"k:{key_id}")
        return self._take(entry, uses)

    def hit_by_tenant(self, tenant: str, uses: int = 1) -> DataKey | None:
        key_id: int | None = self._store.peek(f"t:{tenant}")
        if key_id is None:
            return None
        entry: _Entry | None = self._store.peek(f"k:{key_id}")
        if entry is None:
            self._store.drop(f"t:{tenant}")
            return None
        return self._take(entry, uses)

    # -- misses

    async def by_id(self, key_id: int, uses: int,
                    load: Callable[[], Awaitable[DataKey]]) -> DataKey:
        hit = self.hit_by_id(key_id, uses)
        if hit is not None:
            return hit
        return await self._single_flight(f"k:{key_id}", uses, load, as_active=False)

    async def by_tenant(self, tenant: str, uses: int,
                        load: Callable[[], Awaitable[DataKey]]) -> DataKey:
        hit = self.hit_by_tenant(tenant, uses)
        if hit is not None:
            return hit
        return await self._single_flight(f"t:{tenant}", uses, load, as_active=True)

    async def _single_flight(self, flight: str, uses: int,
                             load: Callable[[], Awaitable[DataKey]], *, as_active: bool) -> DataKey:
        task = self._inflight.get(flight)
        if task is None:
            self.misses += 1
            task = asyncio.ensure_future(self._load(load, as_active))
            self._inflight[flight] = task

            def done(t: asyncio.Task[DataKey], flight: str = flight) -> None:
                if self._inflight.get(flight) is t:
                    del self._inflight[flight]

            task.add_done_callback(done)
        # shield: one caller giving up (cancelled) must not cancel the load the others wait on.
        key = await asyncio.shield(task)
        entry: _Entry | None = self._store.peek(f"k:{key.key_id}")
        if entry is not None and entry.key is key:
            entry.uses += uses
        return key

    async def _load(self, load: Callable[[], Awaitable[DataKey]], as_active: bool) -> DataKey:
        epoch = self.epoch
        key = await load()
        meta = self.key_meta
        if key.key_id not in meta and len(meta) >= KEY_META_MAX:
            del meta[next(iter(meta))]  # the oldest; a key loaded again comes back
        meta[key.key_id] = (key.version, key.kek)
        if epoch == self.epoch:
            ttl = min(self.ttl, DEGRADED_TTL) if self.degraded else self.ttl
            await self._store.set(f"k:{key.key_id}", _Entry(key, 0), ttl=ttl)
            if as_active:
                await self._store.set(f"t:{key.tenant}", key.key_id, ttl=ttl)
            self._lru[key.key_id] = None
            self._lru.move_to_end(key.key_id)
            while len(self._lru) > self.max_entries:
                oldest, _ = self._lru.popitem(last=False)
                stale: _Entry | None = self._store.peek(f"k:{oldest}")
                if stale is not None:
                    self._drop_entry(stale.key)
        return key

    # -- eviction

    def _drop_entry(self, key: DataKey) -> None:
        self._store.drop(f"k:{key.key_id}")
        if self._store.peek(f"t:{key.tenant}") == key.key_id:
            self._store.drop(f"t:{key.tenant}")
        self._lru.pop(key.key_id, None)

    def evict_tenant(self, tenant: str, key_ids: list[int] | tuple[int, ...] = (),
                     *, close: bool = False) -> int:
        """Drop a tenant's keys now (its active pointer and every cached version).

        `close` zeroes the dropped keys (destroy: a use still in flight must fail too).
        Returns how many keys were dropped.
        """
        self.epoch += 1
        self._store.drop(f"t:{tenant}")
        dropped = 0
        for key_id in [*key_ids, *list(self._lru)]:
            entry: _Entry | None = self._store.peek(f"k:{key_id}")
            if entry is not None and entry.key.tenant == tenant:
                self._drop_entry(entry.key)
                if close:
                    entry.key.cell_key.close()
                dropped += 1
        return dropped

    def mark_destroyed(self, key_id: int, tenant: str) -> None:
        """Remember that `key_id` (of `tenant`) was destroyed: see module doc."""
        self._destroyed[key_id] = tenant
        self._destroyed.move_to_end(key_id)
        while len(self._destroyed) > self.max_entries:
            self._destroyed.popitem(last=False)

    def destroyed_tenant(self, key_id: int) -> str | None:
        """The tenant of `key_id` when it is known to be destroyed, else None."""
        return self._destroyed.get(key_id)

    def holds_tenant(self, tenant: str) -> bool:
        """Whether any key of `tenant` (or a pointer to one) is in memory now."""
        if self._store.peek(f"t:{tenant}") is not None:
            return True
        for key_id in self._lru:
            entry: _Entry | None = self._store.peek(f"k:{key_id}")
            if entry is not None and entry.key.tenant == tenant:
                return True
        return False

    def clear(self) -> None:
        """Drop everything (listener reconnected: notifications may have been missed)."""
        self.epoch += 1
        self._destroyed.clear()
        for key_id in list(self._lru):
            entry: _Entry | None = self._store.peek(f"k:{key_id}")
            if entry is not None:
                self._drop_entry(entry.key)
        self._lru.clear()
        for key in self._store.keys():
            self._store.drop(key)

    def __len__(self) -> int:
        return sum(1 for k in self._lru if self._store.peek(f"k:{k}") is not None)

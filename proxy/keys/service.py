"""The key service: tenant data keys for the data path, their lifecycle, and its audit records.

The data path needs two calls, both cheap on a cache hit (no await on the HSM, the
keystore or the audit trail):

    key = await service.current_key(tenant, uses=n)   # seal n cells with key.cell_key
    key = await service.key_by_id(key_id, uses=n)     # open cells whose header names key_id

A miss reads the keystore row and unwraps the data key on the HSM, and writes a
key.unwrap audit record before the key is used (DESIGN.md 9). Lifecycle operations
(create, rotate, destroy, rotate_master) run in one keystore transaction each, record
their audit event inside it (a change whose record cannot be written is rolled back),
evict this process's cache at once and NOTIFY every other proxy on the keystore to do
the same. Faults (HSM, keystore, audit sink) raise KeyServiceUnavailable, SQLSTATE 58030;
nothing needs a restart once the fault clears.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import asyncpg

from proxy.audit.records import AuditRecord
from proxy.audit.trail import AuditTrail
from proxy.config import Config
from proxy.crypto.cells import DEK_LEN, CellKey
from proxy.errors import AccessDenied, KeyNotFound, KeyServiceUnavailable, PgsealError
from proxy.keys.cache import TenantKeyCache
from proxy.keys.hsm import HsmClient, dek_aad, prepare_softhsm_env
from proxy.keys.keystore import ACTIVE, DESTROYED, RETIRED, Conn, KeyRow, Keystore, MasterRow
from proxy.keys.model import DataKey, KeyInfo, MasterRotation

log = logging.getLogger("pgseal.keys")

MAX_TENANT_BYTES = 255
MAX_KEY_ID = 2**31 - 1  # keys.key_id is an int4 identity
LISTENER_HEALTH_SECONDS = 5.0


class _MissBatcher:
    """Concurrent cache misses share one keystore query, one HSM trip and one audit write.

    A miss queues a future; the drain task, scheduled for the next loop iteration, takes
    every miss queued by then as one batch. Misses arriving while a batch is in flight
    form the next one (the same group commit as the audit trail). A single miss costs the
    same as unbatched; a cold start over thousands of tenants costs a fraction.
    """

    def __init__(self, load: Callable[[dict[str, asyncio.Future[DataKey]],
                                       dict[int, asyncio.Future[DataKey]]], Awaitable[None]]):
        self._load = load
        self._tenants: dict[str, asyncio.Future[DataKey]] = {}
        self._ids: dict[int, asyncio.Future[DataKey]] = {}
        self._drain_task: asyncio.Task[None] | None = None
        self._side_tasks: set[asyncio.Task[DataKey]] = set()
        self.batches = 0

    def tenant(self, tenant: str) -> asyncio.Future[DataKey]:
        fut = self._tenants.get(tenant)
        if fut is None:
            fut = self._tenants[tenant] = asyncio.get_running_loop().create_future()
            self._kick()
        return fut

    def key(self, key_id: int) -> asyncio.Future[DataKey]:
        fut = self._ids.get(key_id)
        if fut is None:
            fut = self._ids[key_id] = asyncio.get_running_loop().create_future()
            self._kick()
        return fut

    def resolve_later(self, fut: asyncio.Future[DataKey],
                      work: Coroutine[Any, Any, DataKey]) -> None:
        """Settle `fut` with `work` in its own task (the slow path: create, retry)."""
        task = asyncio.get_running_loop().create_task(work)
        self._side_tasks.add(task)

        def done(t: asyncio.Task[DataKey]) -> None:
            self._side_tasks.discard(t)
            if fut.done():
                return
            if t.cancelled():
                fut.cancel()
            elif t.exception() is not None:
                fut.set_exception(t.exception())  # type: ignore[arg-type]
            else:
                fut.set_result(t.result())

        task.add_done_callback(done)

    def _kick(self) -> None:
        if self._drain_task is None or self._drain_task.done():
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        while self._tenants or self._ids:
            tenants, self._tenants = self._tenants, {}
            ids, self._ids = self._ids, {}
            self.batches += 1
            try:
                await self._load(tenants, ids)
            except BaseException as exc:
                # Every waiter hears of it; a cancellation (close) becomes an outage for
                # them rather than a wait that never ends.
                error = (KeyServiceUnavailable("key service is shutting down")
                         if isinstance(exc, asyncio.CancelledError) else exc)
                _fail([*tenants.values(), *ids.values()], error)
                if not isinstance(exc, Exception):
                    raise

    async def close(self) -> None:
        for task in [self._drain_task, *self._side_tasks]:
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        error = KeyServiceUnavailable("key service is shutting down")
        _fail([*self._tenants.values(), *self._ids.values()], error)
        self._tenants, self._ids = {}, {}


def _fail(futures: list[asyncio.Future[DataKey]], error: BaseException) -> None:
    for fut in futures:
        if not fut.done():
            fut.set_exception(error)


class KeyExists(PgsealError):
    """`keys create` for a tenant that already has an active key."""

    sqlstate = "58030"


class StaleRotation(PgsealError):
    """`rotate(expect_active=...)` found another active key: someone rotated it already."""

    sqlstate = "58030"


def check_tenant(tenant: str) -> None:
    raw = tenant.encode() if isinstance(tenant, str) else b""
    if not raw or len(raw) > MAX_TENANT_BYTES or b"\0" in raw:
        raise AccessDenied(f"invalid tenant {tenant!r}: 1 to {MAX_TENANT_BYTES} bytes, no NUL")


def _info(row: KeyRow) -> KeyInfo:
    return KeyInfo(row.key_id, row.tenant, row.version, row.state, row.kek,
                   row.created_at, row.rotated_at, row.destroyed_at)


class KeyService:
    """Tenant data keys: cached for the data path, managed for the CLI. See module doc."""

    def __init__(self, config: Config, keystore: Keystore, hsm: HsmClient, audit: AuditTrail,
                 *, owns_audit: bool) -> None:
        self.config = config
        self.keystore = keystore
        self.hsm = hsm
        self.audit = audit
        self._owns_audit = owns_audit
        self.cache = TenantKeyCache(
            ttl_seconds=config.cache.ttl_seconds,
            max_entries=config.cache.max_entries,
            max_uses=config.cache.max_uses,
        )
        self.auto_create = config.keystore.auto_create
        self._misses = _MissBatcher(self._load_batch)
        self._listener: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()
        self._closed = False

    # -- lifecycle of the service object

    @classmethod
    async def open(cls, config: Config, *, audit: AuditTrail | None = None,
                   listen: bool = True, lazy: bool = False) -> KeyService:
        """Connect to the HSM, the keystore (migrating it) and the audit sinks.

        `audit`: a trail the caller owns and started (the proxy shares one); None makes
        one from config.audit, owned and closed by this service.
        `listen`: follow other processes' changes (LISTEN/NOTIFY); the CLI does not need to.
        `lazy`: do not fail when something is down now; every key use retries it.
        """
        prepare_softhsm_env(config)
        trail = audit if audit is not None else AuditTrail.from_config(config)
        service = cls(config, Keystore(config.keystore.dsn, config.keystore.schema),
                      HsmClient(config.hsm), trail, owns_audit=audit is None)
        try:
            if audit is None:
                await trail.start()
            await service.hsm.open()
            await service.keystore.open()
        except KeyServiceUnavailable:
            if not lazy:
                await service.close()
                raise
            log.warning("key service starting degraded", exc_info=False)
        if listen:
            # Until LISTEN runs a change made by another proxy would go unnoticed:
            # cached keys live a second at most meanwhile.
            service.cache.degraded = True
            service._listener = asyncio.get_running_loop().create_task(
                service._listen_forever(), name="pgseal-keys-listener"
            )
            if not lazy:
                # Changes made by others must reach us before we serve a cached key.
                try:
                    await asyncio.wait_for(service.listening.wait(), 10)
                except TimeoutError:
                    await service.close()
                    raise KeyServiceUnavailable(
                        f"{service.keystore.where}: LISTEN connection not established"
                    ) from None
        return service

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._misses.close()
        self.cache.clear()
        await self.keystore.close()
        await self.hsm.close()
        if self._owns_audit:
            await self.audit.close()

    async def __aenter__(self) -> KeyService:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def check(self) -> None:
        """Readiness: raise KeyServiceUnavailable unless the HSM and keystore answer now."""
        await self.hsm.list_masters()

        async def ping(conn: Conn) -> None:
            await conn.execute("SELECT 1")

        await self.keystore.run(ping)

    # -- the data path

    async def current_key(self, tenant: str, uses: int = 1) -> DataKey:
        """The tenant's active key, for sealing `uses` cells.

        Creates the tenant's first key when keystore.auto_create is on; otherwise, or when
        the tenant's keys were destroyed, raises KeyNotFound.
        """
        hit = self.cache.hit_by_tenant(tenant, uses)
        if hit is not None:
            return hit
        check_tenant(tenant)
        return await self.cache.by_tenant(tenant, uses, lambda: self._load_current(tenant))

    async def key_by_id(self, key_id: int, uses: int = 1) -> DataKey:
        """The key a cell header names, for opening `uses` cells (active or retired).

        KeyNotFound when there is no such key or it was destroyed.
        """
        hit = self.cache.hit_by_id(key_id, uses)
        if hit is not None:
            return hit
        return await self.cache.by_id(key_id, uses, lambda: self._load_by_id(key_id))

    async def _load_current(self, tenant: str) -> DataKey:
        return await self._misses.tenant(tenant)

    async def _load_by_id(self, key_id: int) -> DataKey:
        if not 0 < key_id <= MAX_KEY_ID:  # int4 identity: a forged header names no key
            raise KeyNotFound(f"no data key with id {key_id}")
        return await self._misses.key(key_id)

    async def _load_new(self, tenant: str) -> DataKey:
        """A tenant with no active key: create it (auto_create) or say how to."""
        if not self.auto_create:
            raise KeyNotFound(
                f"tenant {tenant!r} has no data key (keystore.auto_create is off; "
                f"create one with: pgseal keys create --tenant {tenant})"
            )
        row, dek = await self._create(tenant, if_missing=True)
        if dek is not None:  # we made it: no unwrap needed
            return self._data_key(row, dek)
        return await self._unwrap(row)  # another proxy made it meanwhile

    async def _load_batch(self, tenants: dict[str, asyncio.Future[DataKey]],
                          ids: dict[int, asyncio.Future[DataKey]]) -> None:
        """Resolve every future of one batch of misses (see _MissBatcher)."""
        ks = self.keystore

        async def read(conn: Conn) -> list[KeyRow]:
            return await ks.rows_for(conn, list(ids), list(tenants))

        rows = await ks.run(read)
        by_id = {r.key_id: r for r in rows}
        active = {r.tenant: r for r in rows if r.state == ACTIVE}
        waiting: dict[int, list[asyncio.Future[DataKey]]] = {}
        for key_id, fut in ids.items():
            row = by_id.get(key_id)
            if row is None:
                fut.set_exception(KeyNotFound(f"no data key with id {key_id}"))
            else:
                waiting.setdefault(key_id, []).append(fut)
        for tenant, fut in tenants.items():
            row = active.get(tenant)
            if row is None:
                self._misses.resolve_later(fut, self._load_new(tenant))
            else:
                waiting.setdefault(row.key_id, []).append(fut)
        live: list[KeyRow] = []
        for key_id, futs in waiting.items():
            row = by_id[key_id]
            if row.state == DESTROYED or row.wrapped is None or row.nonce is None:
                self.cache.mark_destroyed(key_id, row.tenant)
                error = KeyNotFound(f"data key {key_id} of tenant {row.tenant!r} was destroyed")
                for fut in futs:
                    fut.set_exception(error)
            else:
                live.append(row)
        if not live:
            return
        try:
            deks = await self.hsm.unwrap_many([
                (r.kek, r.nonce, r.wrapped, dek_aad(r.tenant, r.version, r.kek))
                for r in live if r.nonce is not None and r.wrapped is not None
            ])
        except KeyServiceUnavailable as exc:
            with contextlib.suppress(KeyServiceUnavailable):  # the failure is recorded too
                await self.audit.record(*(self._unwrap_record(r, error=str(exc)) for r in live))
            raise
        ready: list[tuple[KeyRow, bytes]] = []
        for row, dek in zip(live, deks, strict=True):
            if dek is None:  # one at a time: re-read (master rotation race), precise error
                for fut in waiting[row.key_id]:
                    self._misses.resolve_later(fut, self._unwrap(row))
            else:
                ready.append((row, dek))
        try:
            # Durable before any of these keys is used (audit.on_failure: block).
            await self.audit.record(*(self._unwrap_record(row) for row, _ in ready))
        except KeyServiceUnavailable as exc:
            for row, _ in ready:
                for fut in waiting[row.key_id]:
                    fut.set_exception(exc)
            return
        for row, dek in ready:
            key = self._data_key(row, dek)
            for fut in waiting[row.key_id]:
                fut.set_result(key)

    def _data_key(self, row: KeyRow, dek: bytes) -> DataKey:
        return DataKey(row.key_id, row.tenant, row.version, row.state, row.kek,
                       CellKey(row.key_id, row.tenant, dek))

    async def _unwrap(self, row: KeyRow) -> DataKey:
        for attempt in (1, 2):
            if row.state == DESTROYED or row.wrapped is None or row.nonce is None:
                self.cache.mark_destroyed(row.key_id, row.tenant)
                raise KeyNotFound(f"data key {row.key_id} of tenant {row.tenant!r} was destroyed")
            try:
                dek = await self.hsm.unwrap(row.kek, row.nonce, row.wrapped,
                                            dek_aad(row.tenant, row.version, row.kek))
            except KeyServiceUnavailable as exc:
                fresh = await self._reread(row.key_id)
                if attempt == 1 and fresh is not None and (fresh.kek, fresh.state) != (
                        row.kek, row.state):
                    # Re-wrapped under a new master key (or destroyed) since we read it.
                    row = fresh
                    continue
                with contextlib.suppress(KeyServiceUnavailable):
                    await self.audit.record(self._unwrap_record(row, error=str(exc)))
                raise
            # The record is durable before the key is used; if it cannot be written the
            # key is dropped and the use fails (audit.on_failure: block).
            await self.audit.record(self._unwrap_record(row))
            return self._data_key(row, dek)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _reread(self, key_id: int) -> KeyRow | None:
        ks = self.keystore

        async def read(conn: Conn) -> KeyRow | None:
            return await ks.row_by_id(conn, key_id)

        try:
            return await ks.run(read)
        except KeyServiceUnavailable:
            return None

    @staticmethod
    def _unwrap_record(row: KeyRow, error: str | None = None) -> AuditRecord:
        return AuditRecord(
            "key.unwrap", tenant=row.tenant, key_id=row.key_id, key_version=row.version,
            kek=row.kek, outcome="error" if error else "ok", error=error,
        )

    # -- lifecycle

    async def _active_kek(self, conn: Conn) -> str:
        """The master key new data keys are wrapped with (adopting the token's only one)."""
        ks = self.keystore
        for master in await ks.masters(conn):
            if master.state == ACTIVE:
                return master.kek
        on_token = await self.hsm.list_masters()
        label, token = self.config.hsm.master_key_label, self.config.hsm.token_label
        if not on_token:
            raise KeyServiceUnavailable(
                f"no master key {label!r} on HSM token {token!r}: run `pgseal hsm init`"
            )
        if len(on_token) > 1:
            raise KeyServiceUnavailable(
                f"{len(on_token)} master keys {label!r} on HSM token {token!r} and none "
                f"recorded active in the {ks.where}"
            )
        kek = on_token[0].kek
        await ks.adopt_master(conn, kek, label)
        # What is active now: ours, or the one a concurrent first use adopted before us.
        active = [m.kek for m in await ks.masters(conn) if m.state == ACTIVE]
        if active != [kek]:
            raise KeyServiceUnavailable(
                f"master key {kek!r} on HSM token {token!r} could not be adopted: the "
                f"{ks.where} records {active or 'no active master key'}"
            )
        return kek

    async def _new_wrapped(self, conn: Conn, tenant: str,
                           version: int) -> tuple[str, bytes, bytes, bytes]:
        kek = await self._active_kek(conn)
        dek = secrets.token_bytes(DEK_LEN)
        nonce, wrapped = await self.hsm.wrap(kek, dek, dek_aad(tenant, version, kek))
        return kek, dek, nonce, wrapped

    async def _create(self, tenant: str, *, if_missing: bool) -> tuple[KeyRow, bytes | None]:
        """Create the tenant's key; (row, dek) — dek None when `if_missing` found one."""
        ks = self.keystore

        async def work(conn: Conn) -> tuple[KeyRow, bytes | None]:
            async with conn.transaction():
                await ks.lock_masters(conn, exclusive=False)
                await ks.lock_tenant(conn, tenant)
                rows = await ks.tenant_rows(conn, tenant)
                active = [r for r in rows if r.state == ACTIVE]
                if active:
                    if if_missing:  # another proxy created it while we waited for the lock
                        return active[0], None
                    raise KeyExists(
                        f"tenant {tenant!r} already has an active data key (version "
                        f"{active[0].version}, key id {active[0].key_id}); use keys rotate"
                    )
                if rows and if_missing:
                    raise KeyNotFound(
                        f"the data keys of tenant {tenant!r} were destroyed; to start over: "
                        f"pgseal keys create --tenant {tenant}"
                    )
                version = max((r.version for r in rows), default=0) + 1
                kek, dek, nonce, wrapped = await self._new_wrapped(conn, tenant, version)
                row = await ks.insert_key(conn, tenant, version, kek, nonce, wrapped)
                await ks.notify(conn, "create", tenant, [row.key_id])
                await self.audit.record(AuditRecord(
                    "key.create", tenant=tenant, key_id=row.key_id, key_version=version, kek=kek,
                ))
                return row, dek

        row, dek = await ks.run(work)
        if dek is not None:
            log.info("created data key %d (version %d) for tenant %r", row.key_id,
                     row.version, tenant)
        return row, dek

    async def create_key(self, tenant: str) -> KeyInfo:
        """Create a tenant's first key (or a new one after destroy); KeyExists if it has one."""
        check_tenant(tenant)
        row, _ = await self._create(tenant, if_missing=False)
        self.cache.evict_tenant(tenant)  # a destroyed tenant starting over
        return _info(row)

    async def rotate(self, tenant: str, *, expect_active: int | None = None,
                     reason: str | None = None) -> tuple[KeyInfo, KeyInfo]:
        """New active version for the tenant; the previous one retired (still opens its cells).

        Returns (new, retired). `expect_active`: rotate only if that key id is still the
        active one, else StaleRotation (a job that chose the key earlier must not rotate
        its successor). `reason` goes in front of the key.rotate audit record's statement.
        """
        check_tenant(tenant)
        ks = self.keystore

        async def work(conn: Conn) -> tuple[KeyRow, KeyRow]:
            async with conn.transaction():
                await ks.lock_masters(conn, exclusive=False)
                await ks.lock_tenant(conn, tenant)
                rows = await ks.tenant_rows(conn, tenant)
                active = [r for r in rows if r.state == ACTIVE]
                if not active:
                    raise KeyNotFound(
                        f"tenant {tenant!r} has no active data key to rotate "
                        f"(pgseal keys create --tenant {tenant})"
                    )
                old = active[0]
                if expect_active is not None and old.key_id != expect_active:
                    raise StaleRotation(
                        f"tenant {tenant!r}: key id {expect_active} is no longer the active "
                        f"one (now {old.key_id})"
                    )
                version = max(r.version for r in rows) + 1
                kek, _dek, nonce, wrapped = await self._new_wrapped(conn, tenant, version)
                retired = await ks.retire(conn, old.key_id)
                new = await ks.insert_key(conn, tenant, version, kek, nonce, wrapped)
                await ks.notify(conn, "rotate", tenant, [old.key_id, new.key_id])
                await self.audit.record(AuditRecord(
                    "key.rotate", tenant=tenant, key_id=new.key_id, key_version=version, kek=kek,
                    statement=(f"{reason}: " if reason else "")
                    + f"retired version {old.version} (key id {old.key_id})",
                ))
                return new, retired

        new, retired = await ks.run(work)
        self.cache.evict_tenant(tenant, [retired.key_id])
        log.info("rotated tenant %r to version %d", tenant, new.version)
        return _info(new), _info(retired)

    async def destroy(self, tenant: str) -> list[KeyInfo]:
        """Crypto-shred every version of the tenant's key: wrapped bytes erased, state destroyed.

        Cells sealed under them can never be opened again. Returns the keys destroyed now
        (empty when they already were). Old row versions may linger in PostgreSQL's heap,
        WAL and backups until vacuumed or expired: follow with rotate_master to make them
        useless too (they are wrapped under the master key it destroys).
        """
        check_tenant(tenant)
        ks = self.keystore

        async def work(conn: Conn) -> list[KeyRow]:
            async with conn.transaction():
                await ks.lock_tenant(conn, tenant)
                rows = await ks.tenant_rows(conn, tenant)
                if not rows:
                    raise KeyNotFound(f"tenant {tenant!r} has no data keys")
                live = [r for r in rows if r.state != DESTROYED]
                if not live:
                    return []
                done = await ks.destroy_tenant(conn, tenant)
                await ks.notify(conn, "destroy", tenant, [r.key_id for r in done])
                await self.audit.record(*(
                    AuditRecord("key.destroy", tenant=tenant, key_id=r.key_id,
                                key_version=r.version, kek=r.kek)
                    for r in done
                ))
                return done

        destroyed = await ks.run(work)
        self.cache.evict_tenant(tenant, [r.key_id for r in destroyed], close=True)
        for r in destroyed:
            self.cache.mark_destroyed(r.key_id, tenant)
        if destroyed:
            log.info("destroyed %d data keys of tenant %r", len(destroyed), tenant)
        return [_info(r) for r in destroyed]

    async def destroy_version(self, key_id: int) -> KeyInfo | None:
        """Crypto-shred one retired version of a tenant's key; its other versions stay.

        For `pgseal rekey --destroy-old`, once no cell is sealed under that version: its
        wrapped bytes are erased and every proxy evicts it (NOTIFY destroy). Refuses an
        active version (rotate first). Returns None when it was destroyed already.
        """
        ks = self.keystore

        async def work(conn: Conn) -> KeyRow | None:
            async with conn.transaction():
                row = await ks.row_by_id(conn, key_id)
                if row is None:
                    raise KeyNotFound(f"no data key with id {key_id}")
                await ks.lock_tenant(conn, row.tenant)
                row = await ks.row_by_id(conn, key_id)  # settled under the tenant's lock
                if row is None or row.state == DESTROYED:
                    return None
                if row.state != RETIRED:
                    raise PgsealError(
                        f"data key {key_id} of tenant {row.tenant!r} is {row.state}: only a "
                        "retired version can be destroyed on its own (rotate first)"
                    )
                await conn.execute(
                    f"UPDATE {ks.s}.keys SET state = 'destroyed', nonce = NULL, "  # noqa: S608
                    "wrapped = NULL, destroyed_at = now() WHERE key_id = $1", key_id)
                done = await ks.row_by_id(conn, key_id)
                assert done is not None
                await ks.notify(conn, "destroy", done.tenant, [key_id])
                await self.audit.record(AuditRecord(
                    "key.destroy", tenant=done.tenant, key_id=key_id, key_version=done.version,
                    kek=done.kek, statement=f"destroyed retired version {done.version} alone",
                ))
                return done

        done = await ks.run(work)
        if done is None:
            return None
        self.cache.evict_tenant(done.tenant, [key_id], close=True)
        self.cache.mark_destroyed(key_id, done.tenant)
        log.info("destroyed retired version %d (key id %d) of tenant %r", done.version, key_id,
                 done.tenant)
        return _info(done)

    async def list_keys(self, tenant: str | None = None) -> list[KeyInfo]:
        ks = self.keystore

        async def read(conn: Conn) -> list[KeyRow]:
            return await ks.all_rows(conn, tenant)

        return [_info(r) for r in await ks.run(read)]

    async def list_masters(self) -> list[MasterRow]:
        """The master keys this keystore knows, oldest first (pending to destroyed)."""
        ks = self.keystore

        async def read(conn: Conn) -> list[MasterRow]:
            return await ks.masters(conn)

        return await ks.run(read)

    async def due_keys(self, older_than: dt.timedelta, limit: int = 1000) -> list[KeyInfo]:
        """Active data keys created at least `older_than` ago (keystore clock), oldest first."""
        ks = self.keystore

        async def read(conn: Conn) -> list[KeyRow]:
            return await ks.due_rows(conn, older_than, limit)

        return [_info(r) for r in await ks.run(read)]

    async def rotate_master(self) -> MasterRotation:
        """New master key on the HSM, every data key re-wrapped in one transaction, old destroyed.

        Steps, each safe to repeat: (1) record a pending master key, then generate it on
        the token; (2) one transaction re-wraps every live data key under it and makes it
        the active one; (3) destroy the retired master keys on the token. Run again after
        an interruption, it resumes the pending rotation instead of starting another.
        """
        ks = self.keystore
        label = self.config.hsm.master_key_label

        async def bootstrap(conn: Conn) -> tuple[str, str | None]:
            async with conn.transaction():
                await ks.lock_masters(conn, exclusive=True)
                current = await self._active_kek(conn)
                pending = [m.kek for m in await ks.masters(conn) if m.state == "pending"]
                return current, pending[0] if pending else None

        current, pending = await ks.run(bootstrap)
        resumed = pending is not None
        if pending is None:
            new_kek = secrets.token_hex(8)

            async def add_pending(conn: Conn) -> None:
                await ks.add_pending_master(conn, new_kek, label)

            await ks.run(add_pending)
        else:
            new_kek = pending
        await self.hsm.generate_master(new_kek)  # a no-op when a resumed run already made it

        async def rewrap(conn: Conn) -> int:
            async with conn.transaction():
                await ks.lock_masters(conn, exclusive=True)
                rows = await ks.rewrap_candidates(conn, new_kek)
                records: list[AuditRecord] = []
                for row in rows:
                    assert row.nonce is not None and row.wrapped is not None
                    dek = await self.hsm.unwrap(row.kek, row.nonce, row.wrapped,
                                                dek_aad(row.tenant, row.version, row.kek))
                    records.append(AuditRecord(
                        "key.unwrap", tenant=row.tenant, key_id=row.key_id,
                        key_version=row.version, kek=row.kek, statement="rotate-master",
                    ))
                    nonce, wrapped = await self.hsm.wrap(
                        new_kek, dek, dek_aad(row.tenant, row.version, new_kek))
                    await ks.set_wrapped(conn, row.key_id, new_kek, nonce, wrapped)
                await ks.activate_master(conn, new_kek)
                await ks.notify(conn, "master", None, [])
                records.append(AuditRecord(
                    "key.rotate", kek=new_kek, count=len(rows),
                    statement=f"rotate-master: re-wrapped {len(rows)} data keys (was {current})",
                ))
                await self.audit.record(*records)
                return len(rows)

        rewrapped = await ks.run(rewrap)
        self.cache.clear()

        async def retired_keks(conn: Conn) -> list[str]:
            return await ks.unused_retired_masters(conn)

        old = await ks.run(retired_keks)
        for kek in old:
            await self.hsm.destroy_master(kek)

            async def mark(conn: Conn, kek: str = kek) -> None:
                await ks.mark_master_destroyed(conn, kek)

            await ks.run(mark)
        log.info("master key rotated to %s (%d data keys re-wrapped)", new_kek, rewrapped)
        return MasterRotation(new_kek, tuple(old), rewrapped, resumed)

    # -- other processes' changes

    def _on_notify(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if message.get("origin") == self.keystore.origin or op == "create":
            # Our own change was evicted synchronously already (evicting again would only
            # stop an in-flight load from being cached); a first key replaces nothing.
            return
        tenant = message.get("tenant")
        ids = [i for i in message.get("key_ids") or [] if isinstance(i, int)]
        if op == "master" or not isinstance(tenant, str):
            self.hsm.forget_handles()
            self.cache.clear()
        else:
            self.cache.evict_tenant(tenant, ids, close=op == "destroy")
            if op == "destroy":
                for key_id in ids:
                    self.cache.mark_destroyed(key_id, tenant)

    def _on_listener_lost(self) -> None:
        # Until LISTEN is back we might miss a rotate or destroy: forget what we hold and
        # keep new entries a second at most.
        self.cache.degraded = True
        self.cache.clear()
        self.listening.clear()

    async def _listen_forever(self) -> None:
        backoff = 0.1
        while not self._closed:
            lost = asyncio.Event()

            def on_lost(lost: asyncio.Event = lost) -> None:
                self._on_listener_lost()
                lost.set()

            try:
                async with self.keystore.listener(self._on_notify, on_lost) as conn:
                    self.cache.clear()  # whatever happened while we were away
                    self.cache.degraded = False
                    self.listening.set()
                    backoff = 0.1
                    while not lost.is_set():
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(lost.wait(), LISTENER_HEALTH_SECONDS)
                            continue
                        # asyncpg notices a dead peer only when it talks: ping.
                        await asyncio.wait_for(conn.execute("SELECT 1"), LISTENER_HEALTH_SECONDS)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("%s: change listener lost (%s); reconnecting",
                            self.keystore.where, type(exc).__name__)
            self._on_listener_lost()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)


__all__ = ["ACTIVE", "DESTROYED", "RETIRED", "DataKey", "KeyExists", "KeyService"]

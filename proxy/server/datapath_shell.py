"""What the shell gives the data path: the key cache as a synchronous KeyRing,
key fetching on a miss, and the data path's audit records queued and written in batches."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from proxy.audit.records import AuditRecord
from proxy.crypto.cells import CellKey
from proxy.errors import KeyServiceUnavailable, PgsealError
from proxy.policy.model import PolicySet
from proxy.session.datapath import (
    AuditNote,
    ConnectionFacts,
    DataPath,
    SessionInfo,
    audit_records,
)

if TYPE_CHECKING:
    from proxy.audit.trail import AuditTrail
    from proxy.config import CryptoperiodConfig
    from proxy.keys.schedule import RotationScheduler
    from proxy.keys.service import KeyService

log = logging.getLogger("pgseal.datapath")

# Data-path records are written after the key uses they describe (statements do not wait
# for them): the statements of this many seconds share one write and one fsync. With
# on_failure block, the first failed write stops every later key use.
AUDIT_GROUP_COMMIT = 0.02
# While the trail is down: how often the kept records are tried again.
AUDIT_RETRY = 1.0
# Shutdown waits this long for queued records to be written.
AUDIT_DRAIN_WAIT = 5.0


class CacheKeyRing:
    """The KeyRing of every connection: a view of the key service's in-memory cache."""

    def __init__(self, service: KeyService, audit: AuditTrail) -> None:
        self.service = service
        self.audit = audit
        self.audit_failure: PgsealError | None = None
        # tenant -> its live key ids, the active one first (see versions()).
        self._live: dict[str, tuple[int, ...]] = {}

    def current(self, tenant: str, uses: int) -> CellKey | None:
        hit = self.service.cache.hit_by_tenant(tenant, uses)
        return None if hit is None else hit.cell_key

    def by_id(self, key_id: int, uses: int) -> CellKey | None:
        hit = self.service.cache.hit_by_id(key_id, uses)
        return None if hit is None else hit.cell_key

    def versions(self, tenant: str, uses: int) -> list[CellKey] | None:
        """Every live key of the tenant, the active one first (a search must match the cells
        of every version). A tenant's set of live versions changes only with its active key
        (create, rotate, destroy), so a list whose head is not the cached active key is stale."""
        active = self.service.cache.hit_by_tenant(tenant, uses)
        ids = self._live.get(tenant)
        if active is None or ids is None or ids[0] != active.key_id:
            return None
        keys = [active.cell_key]
        for key_id in ids[1:]:
            hit = self.service.cache.hit_by_id(key_id, uses)
            if hit is None:
                return None
            keys.append(hit.cell_key)
        return keys

    async def _load_versions(self, tenant: str) -> None:
        active = await self.service.current_key(tenant, 0)
        retired = [
            k.key_id
            for k in sorted(await self.service.list_keys(tenant), key=lambda k: -k.version)
            if k.state != "destroyed" and k.key_id != active.key_id
        ]
        for key_id in retired:
            await self.service.key_by_id(key_id, 0)
        if len(self._live) >= self.service.cache.max_entries:
            self._live.clear()
        self._live[tenant] = (active.key_id, *retired)

    def destroyed(self, key_id: int) -> str | None:
        return self.service.cache.destroyed_tenant(key_id)

    def failure(self) -> PgsealError | None:
        return self.audit_failure

    async def fetch(self, tenants: frozenset[str], key_ids: frozenset[int]) -> None:
        """Load keys into the cache (HSM unwrap, keystore); raises PgsealError.

        Concurrent misses are batched by the key service (one keystore query, one HSM
        trip), so all of them are asked for at once. A key found destroyed is no failure
        here: the cache now knows it as destroyed, and the data path answers its cells
        per on_denied (NULL or an error naming the column) instead of failing the result.
        """
        ids = sorted(key_ids)
        results = await asyncio.gather(
            # A tenant's active key, and its retired ones for searches (versions()).
            *(self._load_versions(tenant) for tenant in tenants),
            *(self.service.key_by_id(key_id, 0) for key_id in ids),
            return_exceptions=True,
        )
        owners: list[int | None] = [None] * len(tenants) + list(ids)
        for key_id, result in zip(owners, results, strict=True):
            if not isinstance(result, BaseException):
                continue
            if key_id is not None and self.destroyed(key_id) is not None:
                continue
            raise result


class DataPathRuntime:
    """Policies + key ring + audit trail shared by every connection of one proxy process."""

    def __init__(self, policies: PolicySet, service: KeyService, audit: AuditTrail) -> None:
        self.policies = policies
        self.service = service
        self.audit = audit
        self.keyring = CacheKeyRing(service, audit)
        self.rotation: RotationScheduler | None = None
        # Audit notes of every connection, written by one task every AUDIT_GROUP_COMMIT
        # rather than one per statement (the trail writes each batch with one fsync).
        self._queued: list[AuditRecord] = []
        self._writer: asyncio.Task[None] | None = None

    def start_rotation(self, periods: CryptoperiodConfig) -> None:
        """Rotate keys past their cryptoperiod from this process (cryptoperiod section)."""
        from proxy.keys.schedule import RotationScheduler

        self.rotation = RotationScheduler(self.service, periods)
        self.rotation.start()

    def new_datapath(self, info: SessionInfo, parameters: dict[str, str]) -> DataPath:
        return DataPath(self.policies, self.keyring, info, parameters=parameters)

    async def close(self) -> None:
        await self.drain_audit()
        if self.rotation is not None:  # before the key service it uses
            await self.rotation.close()
        await self.service.close()
        await self.audit.close()

    def queue_audit(self, notes: tuple[AuditNote, ...], facts: ConnectionFacts) -> None:
        """Queue records for writing; statements do not wait for them. A failed write
        (on_failure block) makes every later key use fail until the trail is back; the
        records it could not write are kept and written then (see AuditTrail)."""
        self._queued.extend(audit_records(notes, facts, self.service.cache.key_meta))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_queued())

    async def _write_queued(self) -> None:
        while True:
            failing = self.keyring.audit_failure is not None
            await asyncio.sleep(AUDIT_RETRY if failing else AUDIT_GROUP_COMMIT)
            records, self._queued = self._queued, []
            try:
                if records:
                    await self.audit.record(*records, kept=True)
                else:
                    await self.audit.retry()
            except KeyServiceUnavailable as exc:
                if not failing:
                    log.error("audit trail unavailable, key uses refused until it is back: %s", exc)
                self.keyring.audit_failure = exc
                continue
            if failing:
                log.warning("audit trail available again: key uses resume")
            self.keyring.audit_failure = None
            if not self._queued:
                return

    async def drain_audit(self) -> None:
        """Write what is queued (shutdown). While the trail is down this gives up after
        AUDIT_DRAIN_WAIT; the trail then logs how many records it could not write."""
        writer = self._writer
        if writer is not None and not writer.done():
            if self.keyring.audit_failure is None:
                await asyncio.wait({writer}, timeout=AUDIT_DRAIN_WAIT)
            if not writer.done():
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
        if self._queued:
            records, self._queued = self._queued, []
            try:
                await self.audit.record(*records, kept=True)
            except KeyServiceUnavailable as exc:
                log.error("audit trail unavailable at shutdown: %s", exc)

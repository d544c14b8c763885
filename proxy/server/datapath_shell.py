"""What the shell gives the data path: the key cache as a synchronous KeyRing,
key fetching on a miss, and audit records for data-path key uses."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from proxy.audit.records import AuditRecord
from proxy.crypto.cells import CellKey
from proxy.errors import KeyServiceUnavailable, PgsealError
from proxy.policy.model import PolicySet
from proxy.session.datapath import AuditNote, DataPath, SessionInfo

if TYPE_CHECKING:
    from proxy.audit.trail import AuditTrail
    from proxy.keys.service import KeyService

log = logging.getLogger("pgseal.datapath")


class CacheKeyRing:
    """The KeyRing of every connection: a view of the key service's in-memory cache."""

    def __init__(self, service: KeyService, audit: AuditTrail) -> None:
        self.service = service
        self.audit = audit
        self.audit_failure: PgsealError | None = None

    def current(self, tenant: str, uses: int) -> CellKey | None:
        hit = self.service.cache.hit_by_tenant(tenant, uses)
        return None if hit is None else hit.cell_key

    def by_id(self, key_id: int, uses: int) -> CellKey | None:
        hit = self.service.cache.hit_by_id(key_id, uses)
        return None if hit is None else hit.cell_key

    def failure(self) -> PgsealError | None:
        return self.audit_failure

    async def fetch(self, tenants: frozenset[str], key_ids: frozenset[int]) -> None:
        """Load keys into the cache (HSM unwrap, keystore); raises PgsealError.

        Concurrent misses are batched by the key service (one keystore query, one HSM
        trip), so all of them are asked for at once."""
        await asyncio.gather(
            *(self.service.current_key(tenant, 0) for tenant in tenants),
            *(self.service.key_by_id(key_id, 0) for key_id in key_ids),
        )


@dataclass(frozen=True, slots=True)
class ConnectionFacts:
    """Who is on a connection, for audit records."""

    db_user: str
    database: str
    application_name: str | None
    client_addr: str | None
    session: str


def audit_records(notes: tuple[AuditNote, ...], facts: ConnectionFacts) -> list[AuditRecord]:
    return [
        AuditRecord(
            note.event,
            tenant=note.tenant,
            key_id=note.key_id,
            table=note.table,
            columns=note.columns,
            count=note.count,
            db_user=facts.db_user,
            database=facts.database,
            application_name=facts.application_name,
            client_addr=facts.client_addr,
            session=facts.session,
            statement=note.statement,
            outcome=note.outcome,
            error=note.error,
        )
        for note in notes
    ]


class DataPathRuntime:
    """Policies + key ring + audit trail shared by every connection of one proxy process."""

    def __init__(self, policies: PolicySet, service: KeyService, audit: AuditTrail) -> None:
        self.policies = policies
        self.service = service
        self.audit = audit
        self.keyring = CacheKeyRing(service, audit)

    def new_datapath(self, info: SessionInfo, parameters: dict[str, str]) -> DataPath:
        return DataPath(self.policies, self.keyring, info, parameters=parameters)

    async def close(self) -> None:
        await self.service.close()
        await self.audit.close()

    async def write_audit(self, notes: tuple[AuditNote, ...], facts: ConnectionFacts) -> None:
        try:
            await self.audit.record(*audit_records(notes, facts))
        except KeyServiceUnavailable as exc:
            # on_failure block: no further key use until a record can be written again.
            self.keyring.audit_failure = exc
            log.error("audit trail unavailable: %s", exc)
        else:
            self.keyring.audit_failure = None

"""`pgseal rekey --tenant T | --all`: re-seal cells under each tenant's current key version.

After `keys rotate` the retired version still opens the cells sealed under it; rekey
moves them to the active version so that the retired one can be destroyed. It walks
every encrypted column of the policy (and the shadow column of an encryption still in
progress, whose cells carry the real column's name) in batches, finds cells by the key
id in their header (`substring(col from 3 for 4)`), opens each with the key it names and
seals it again with the current key of the same tenant, with the same suite as the
proxy would use for that column.

Concurrent writes through the proxy are never lost: each batch writes with
`UPDATE ... WHERE <row> AND col = <the cell we read>`, so a cell the application
replaced meanwhile (sealed by the proxy under the current key) is left as it is. The
checkpoint (job `rekey DB/TENANT` or `rekey DB/*`) lets a killed run resume where it stopped;
without it, a run starts over and finds only the cells still under an old version.

When no cell is left under a retired version, that version can be destroyed
(`--destroy-old`): only if the last count started at least `cache.ttl_seconds` after the
rotation, so that no proxy can still have been sealing with it as its current key.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import asyncpg

from proxy.config import Config
from proxy.crypto.cells import CellError, cell_key_id
from proxy.errors import PgsealError
from proxy.keys.keystore import ACTIVE, RETIRED, Conn
from proxy.keys.model import KeyInfo
from proxy.keys.service import KeyService, check_tenant
from proxy.migrate.column import load_policy_set
from proxy.migrate.common import (
    MigrationError,
    Pacer,
    TableFacts,
    Who,
    connect_data,
    pg_message,
    read_table,
    take_job_lock,
)
from proxy.migrate.jobs import JobStore
from proxy.migrate.plan import (
    ObjectNames,
    PlanError,
    RekeySql,
    Throttle,
    key_id_bytes,
    page_range,
    pages_per_batch,
)
from proxy.policy.model import PolicySet

MAX_CONFLICTS_SHOWN = 10


@dataclass(frozen=True, slots=True)
class RekeyOptions:
    tenant: str | None  # None: every tenant with a retired version
    batch: int = 1000
    rate: float | None = None
    dsn: str | None = None
    destroy_old: bool = False
    passes: int = 3  # re-count and go again while cells remain (concurrent stale writers)


@dataclass(frozen=True, slots=True)
class RekeyTarget:
    """One physical column holding cells, and the column name its cells are sealed for."""

    facts: TableFacts
    physical: str
    aad: str  # schema.table.column (the cells' associated data)
    searchable: bool
    label: str

    @property
    def sql(self) -> RekeySql:
        return RekeySql(self.facts.shape, self.physical)


@dataclass(slots=True)
class VersionState:
    tenant: str
    key_id: int
    version: int
    cells: int = 0  # cells still sealed under it (in this database)
    destroyed_now: bool = False
    note: str | None = None


@dataclass(slots=True)
class RekeyReport:
    scope: str  # the tenant, or "*"
    database: str = ""  # where the cells were counted (other databases are not looked at)
    resealed: int = 0
    changed: int = 0  # skipped: the application replaced the cell meanwhile
    unreadable: int = 0  # cells that did not open (altered, moved): left as they are
    conflicts: list[str] = field(default_factory=list)  # unique constraint collisions
    seconds: float = 0.0
    active: dict[str, KeyInfo] = field(default_factory=dict)
    versions: list[VersionState] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # policy columns not looked at, why
    targets: list[str] = field(default_factory=list)
    no_active: list[str] = field(default_factory=list)  # tenants whose keys are all destroyed


class Rekeyer:
    def __init__(self, config: Config, options: RekeyOptions, policies: PolicySet,
                 service: KeyService, jobs: JobStore, conn: asyncpg.Connection[Any],
                 stream: TextIO | None) -> None:
        self.config = config
        self.options = options
        self.policies = policies
        self.service = service
        self.jobs = jobs
        self.conn = conn
        self.stream = stream
        self.job_name = ""  # rekey DATABASE/TENANT (or /*), once connected
        self.throttle = Throttle(options.rate)
        self.report = RekeyReport(options.tenant if options.tenant is not None else "*")
        self.same_db = False
        self.who: Who | None = None

    async def run(self) -> RekeyReport:
        o = self.options
        report = self.report
        keys = await self.service.list_keys(o.tenant)
        if o.tenant is not None and not keys:
            raise MigrationError(f"tenant {o.tenant!r} has no data keys")
        report.active = {k.tenant: k for k in keys if k.state == ACTIVE}
        tenants = sorted({k.tenant for k in keys})
        report.no_active = [t for t in tenants if t not in report.active]
        if o.tenant is not None and o.tenant not in report.active:
            raise MigrationError(f"tenant {o.tenant!r} has no active data key (destroyed?): "
                                 "there is no version to re-seal under")
        old = [k for k in keys if k.state == RETIRED and k.tenant in report.active]
        old_ids = [k.key_id for k in old]
        scope = f"--tenant {o.tenant}" if o.tenant is not None else "--all"
        self.who = await Who.of(self.conn, f"pgseal rekey {scope}")
        report.database = self.who.database
        self.job_name = f"rekey {self.who.database}/{report.scope}"
        await take_job_lock(self.conn, self.job_name)
        targets = await self._targets()
        report.targets = [t.label for t in targets]
        previous = await self.jobs.get(self.job_name)
        if previous is not None and previous.kind == "rekey" and previous.phase == "running":
            job = await self.jobs.resume(self.job_name)
        else:
            job = await self.jobs.start(self.job_name, "rekey", "running", {"done_targets": []})
        self.same_db = await self.jobs.same_database(self.conn, self.job_name)
        started = asyncio.get_running_loop().time()
        remaining: dict[int, int] = {}
        counted_at: dt.datetime | None = None
        if old_ids:
            remaining, counted_at, per_target = await self._count(targets, old_ids)
            pacer = Pacer(f"rekey {report.scope}", sum(remaining.values()), self.throttle,
                          unit="cells", stream=self.stream)
            done_targets = set(job.details.get("done_targets") or [])
            position = job.position
            for attempt in range(o.passes):
                before = report.resealed
                for target in targets:
                    if not per_target.get(target.label):
                        continue
                    if attempt == 0 and target.label in done_targets:
                        continue
                    start = (position if attempt == 0 and position is not None
                             and position.get("target") == target.label else None)
                    await self._target(target, old_ids, start, pacer)
                    done_targets.add(target.label)
                    await self.jobs.update(self.job_name,
                                           details={"done_targets": sorted(done_targets)})
                remaining, counted_at, per_target = await self._count(targets, old_ids)
                if not sum(remaining.values()) or report.resealed == before:
                    break
            pacer.show(final=True)
        report.seconds = asyncio.get_running_loop().time() - started
        for k in old:
            report.versions.append(VersionState(k.tenant, k.key_id, k.version,
                                                remaining.get(k.key_id, 0)))
        if o.destroy_old:
            await self._destroy_old(old, counted_at)
        await self.jobs.update(self.job_name, phase="done", finished=True,
                               details={"resealed": report.resealed})
        return report

    # -- where cells live

    async def _targets(self) -> list[RekeyTarget]:
        out: list[RekeyTarget] = []
        for (schema, table), tpol in sorted(self.policies.tables.items()):
            facts = await read_table(self.conn, schema, table)
            if facts is None:
                self.report.skipped.append(f"{schema}.{table}: no such table here")
                continue
            for name, cpol in sorted(tpol.columns.items()):
                aad = f"{schema}.{table}.{name}"
                shadow = ObjectNames.of(schema, table, name, "encrypt").shadow
                if shadow in facts.columns:
                    # An encryption in progress: the cells are in its shadow column for now
                    # (and the column itself still holds plaintext).
                    out.append(RekeyTarget(facts, shadow, aad, cpol.searchable,
                                           f"{aad} (shadow of a running migrate encrypt)"))
                    continue
                col = facts.columns.get(name)
                if col is None:
                    self.report.skipped.append(f"{aad}: no such column here")
                elif col.sql_type != "bytea":
                    self.report.skipped.append(f"{aad}: {col.sql_type}, not encrypted yet")
                else:
                    out.append(RekeyTarget(facts, name, aad, cpol.searchable, aad))
        return out

    async def _count(self, targets: Sequence[RekeyTarget], old_ids: list[int]
                     ) -> tuple[dict[int, int], dt.datetime, dict[str, int]]:
        """Cells per old key id over every target, when the count started (keystore
        clock, to compare with rotated_at), and cells per target."""

        async def now(conn: Conn) -> dt.datetime:
            value: dt.datetime = await conn.fetchval("SELECT now()")
            return value

        started = await self.service.keystore.run(now)
        ids = [key_id_bytes(i) for i in old_ids]
        total: dict[int, int] = {}
        per_target: dict[str, int] = {}
        for target in targets:
            try:
                rows = await self.conn.fetch(target.sql.count_by_key(), ids)
            except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                raise MigrationError(f"{target.label}: {pg_message(exc)}") from None
            for r in rows:
                key_id = int.from_bytes(bytes(r["key_id"]), "big")
                total[key_id] = total.get(key_id, 0) + int(r["n"])
                per_target[target.label] = per_target.get(target.label, 0) + int(r["n"])
        return total, started, per_target

    # -- one column

    async def _target(self, target: RekeyTarget, old_ids: list[int],
                      start: dict[str, Any] | None, pacer: Pacer) -> None:
        sql = target.sql
        ids = [key_id_bytes(i) for i in old_ids]
        limit = self.throttle.batch_size(self.options.batch)
        shape = target.facts.shape
        if shape.by_ctid:
            facts = await read_table(self.conn, shape.schema, shape.table) or target.facts
            step = pages_per_batch(limit, facts.rows_per_page or 50.0)
            page = int((start or {}).get("page", 0))
            while page < facts.pages:
                lo, hi = page_range(page, step)
                page += step
                rows = await self._fetch(target, sql.select_pages(), [ids, lo, hi])
                n = await self._batch(target, rows, {"target": target.label, "page": page})
                await pacer.advance(n)
            return
        after: list[str] | None = (start or {}).get("after")
        while True:
            params: list[Any] = [ids, limit] if after is None else [ids, *after, limit]
            rows = await self._fetch(target, sql.select_keyset(after=after is not None), params)
            if not rows:
                return
            after = [rows[-1][f"k{i}"] for i in range(shape.key_width)]
            n = await self._batch(target, rows, {"target": target.label, "after": after})
            await pacer.advance(n)

    async def _fetch(self, target: RekeyTarget, sql: str, params: list[Any]) -> list[Any]:
        try:
            return list(await self.conn.fetch(sql, *params))
        except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise MigrationError(f"{target.label}: {pg_message(exc)}") from None

    async def _batch(self, target: RekeyTarget, rows: Sequence[Any],
                     position: dict[str, Any]) -> int:
        """Open and re-seal a batch, write it optimistically, audit, checkpoint.

        Returns how many cells were handled (re-sealed, or skipped with a reason)."""
        assert self.who is not None
        report = self.report
        shape = target.facts.shape
        width = shape.key_width
        addresses: list[list[str]] = []
        olds: list[bytes] = []
        news: list[bytes] = []
        # (tenant, key id, version, kek) -> cells
        opened: dict[tuple[str, int, int, str], int] = {}
        sealed: dict[tuple[str, int, int, str], int] = {}
        by_key: dict[int, list[int]] = {}
        cells = [bytes(r["cell"]) for r in rows]
        for i, cell in enumerate(cells):
            try:
                by_key.setdefault(cell_key_id(cell), []).append(i)
            except CellError:
                report.unreadable += 1
        for key_id, indexes in by_key.items():
            try:
                old = await self.service.key_by_id(key_id, len(indexes))
            except PgsealError:  # destroyed meanwhile: nothing to do for these cells
                report.unreadable += len(indexes)
                continue
            # The same tenant's current key: the cells keep their tenant (and associated
            # data); a rotation while we run reaches us by NOTIFY and the next batch uses it.
            new = await self.service.current_key(old.tenant, len(indexes))
            if new.key_id == old.key_id:
                continue  # a cell sealed under what is now current: nothing to do
            for i in indexes:
                try:
                    plaintext = old.cell_key.open(target.aad, cells[i])
                except CellError:
                    report.unreadable += 1
                    continue
                addresses.append([rows[i][f"k{j}"] for j in range(width)])
                olds.append(cells[i])
                news.append(new.cell_key.seal(target.aad, plaintext,
                                              deterministic=target.searchable))
                ko = (old.tenant, old.key_id, old.version, old.kek)
                kn = (new.tenant, new.key_id, new.version, new.kek)
                opened[ko] = opened.get(ko, 0) + 1
                sealed[kn] = sealed.get(kn, 0) + 1
        table = f"{shape.schema}.{shape.table}"
        column = target.aad.rsplit(".", 1)[1]
        records = [self.who.record("data.decrypt", tenant=t, key_id=k, key_version=v, kek=w,
                                   table=table, column=column, count=n)
                   for (t, k, v, w), n in opened.items()]
        records += [self.who.record("data.encrypt", tenant=t, key_id=k, key_version=v, kek=w,
                                    table=table, column=column, count=n)
                    for (t, k, v, w), n in sealed.items()]
        replaced = 0
        try:
            async with self.conn.transaction():
                if addresses:
                    replaced = await self._write(target, addresses, olds, news)
                    await self.service.audit.record(*records)
                if self.same_db:
                    await self.conn.execute(self.jobs.checkpoint_sql(), self.job_name,
                                            json.dumps(position), replaced)
        except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise MigrationError(f"{target.label}: {pg_message(exc)}") from None
        if not self.same_db:
            await self.jobs.checkpoint(self.job_name, position, replaced)
        report.resealed += replaced
        return len(rows)

    async def _write(self, target: RekeyTarget, addresses: list[list[str]], olds: list[bytes],
                     news: list[bytes]) -> int:
        """The optimistic UPDATE; on a unique violation (the same value already sealed under
        the current version in another row: rotation had hidden a duplicate from the
        unique index), row by row, keeping the conflicting rows as they are."""
        sql = target.sql
        arrays = [list(col) for col in zip(*addresses, strict=True)]
        try:
            async with self.conn.transaction():
                done = await self.conn.fetch(sql.update_cells(), *arrays, olds, news)
            n = len(done)
            self.report.changed += len(olds) - n
            return n
        except asyncpg.UniqueViolationError:
            pass
        n = 0
        for address, old, new in zip(addresses, olds, news, strict=True):
            try:
                async with self.conn.transaction():
                    status = await self.conn.execute(sql.update_one(), *address, old, new)
            except asyncpg.UniqueViolationError as exc:
                self.report.conflicts.append(
                    f"{target.label} row {target.facts.shape.describe(address)}"
                    f" ({exc.constraint_name or 'unique'})")
                continue
            if status.endswith(" 1"):
                n += 1
            else:
                self.report.changed += 1
        return n

    # -- retired versions

    async def _destroy_old(self, old: list[KeyInfo], counted_at: dt.datetime | None) -> None:
        ttl = self.config.cache.ttl_seconds
        by_id = {v.key_id: v for v in self.report.versions}
        for k in old:
            state = by_id[k.key_id]
            if state.cells:
                continue
            rotated = k.rotated_at
            if counted_at is None or rotated is None or (
                    counted_at - rotated).total_seconds() < ttl:
                state.note = (f"not destroyed: rotated less than cache.ttl_seconds ({ttl:g} s) "
                              "before the count, a proxy may still have sealed with it; "
                              "run rekey again later")
                continue
            if await self.service.destroy_version(k.key_id) is not None:
                state.destroyed_now = True


async def rekey(config: Config, options: RekeyOptions,
                stream: TextIO | None = None) -> RekeyReport:
    """Re-seal the cells of one tenant (or all) under their current versions."""
    if options.batch <= 0:
        raise MigrationError("--batch must be positive")
    try:
        Throttle(options.rate)
    except PlanError as exc:
        raise MigrationError(str(exc)) from None
    if options.tenant is not None:
        check_tenant(options.tenant)
    policies = load_policy_set(config)
    service = await KeyService.open(config, listen=True)
    try:
        jobs = JobStore(service.keystore)
        await jobs.ensure()
        conn = await connect_data(options.dsn or config.keystore.dsn)
        try:
            return await Rekeyer(config, options, policies, service, jobs, conn, stream).run()
        finally:
            await conn.close()
    finally:
        await service.close()

"""`pgseal migrate encrypt|decrypt SCHEMA.TABLE.COLUMN`: one column, online.

See `proxy.migrate` for the design (shadow column, invalidating trigger, batches, the
cut-over). This module runs it: `migrate_column(config, options)` returns a report and
raises MigrationError (or another PgsealError) with a one-line reason.

Phases, as recorded in the job row (`<keystore schema>.jobs`, job `column DB/S.T.C`):
  backfill  shadow column + trigger + pending index exist; batches are running
  ready     backfill done, cut-over not done (`--no-swap`)
  swapped   the column was replaced (committed); CHECK validation etc. still to do
  done      finished;  undone: a migration abandoned before its cut-over
The catalog is the truth where it can be (a shadow column present means "not cut over");
the job row adds the checkpoint and what the catalog cannot say (the original type).
"""

# ruff: noqa: S608  (identifiers are quoted by proxy.migrate.plan; values are parameters)

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import asyncpg

from proxy.audit.records import AuditRecord
from proxy.config import Config
from proxy.crypto.cells import CellError, cell_key_id
from proxy.crypto.values import ValueFormatError, from_canonical, to_canonical
from proxy.errors import PgsealError
from proxy.keys.model import DataKey
from proxy.keys.service import KeyService, check_tenant
from proxy.migrate.common import (
    SESSION,
    MigrationError,
    Pacer,
    TableFacts,
    Who,
    connect_data,
    constraint_exists,
    dependents,
    guarded,
    index_state,
    pg_message,
    read_table,
    take_job_lock,
)
from proxy.migrate.jobs import Job, JobStore
from proxy.migrate.plan import (
    SQL_TYPES,
    ColumnMigration,
    Direction,
    ObjectNames,
    PlanError,
    Throttle,
    cell_guard,
    checked_sql_type,
    live_type_problem,
    page_range,
    pages_per_batch,
    parse_column_spec,
    quote_ident,
)
from proxy.policy.loader import load_policies
from proxy.policy.model import ColumnPolicy, PolicySet, TablePolicy


@dataclass(frozen=True, slots=True)
class ColumnOptions:
    direction: Direction
    column: str  # SCHEMA.TABLE.COLUMN, catalog names as in the policy
    batch: int = 1000
    rate: float | None = None
    dsn: str | None = None  # the data database (default: the keystore's)
    tenant: str | None = None  # encrypt, session-tenant tables: every row's tenant
    swap: bool = True  # False: stop when the backfill is done (phase ready)
    sql_type: str | None = None  # decrypt: the plaintext column's type
    lock_timeout_ms: int = 1000  # the cut-over's wait for its lock, per attempt
    lock_attempts: int = 30
    catchup_passes: int = 5


@dataclass(slots=True)
class ColumnReport:
    column: str
    direction: Direction
    outcome: str  # done | ready | already | undone
    rows: int = 0  # values sealed (encrypt) or opened (decrypt) by this run
    seconds: float = 0.0
    pending: int = 0  # rows still to do when stopping at `ready`
    dropped: list[str] = field(default_factory=list)  # went with the old column
    guard: str | None = None  # the CHECK an encrypted column now has
    target_type: str | None = None


def load_policy_set(config: Config) -> PolicySet:
    if not config.policies:
        raise MigrationError("no policies configured (policies: in the config, or "
                             "PGSEAL_POLICIES): the policy names each column's type")
    return load_policies([config.path(p) for p in config.policies])


def policy_column(policies: PolicySet, schema: str, table: str,
                  column: str) -> tuple[TablePolicy, ColumnPolicy]:
    tpol = policies.table(schema, table)
    if tpol is None:
        raise MigrationError(f"{schema}.{table} is not in the policy: add it (with the "
                             f"column's type) before migrating {schema}.{table}.{column}")
    cpol = tpol.column(column)
    if cpol is None:
        raise MigrationError(f"{schema}.{table}.{column} is not in the policy: add it with "
                             "its type (the policy names what the column holds)")
    return tpol, cpol


class ColumnMigrator:
    """One run of one column migration over an open key service and data connection."""

    def __init__(self, options: ColumnOptions, service: KeyService, jobs: JobStore,
                 conn: asyncpg.Connection[Any], tpol: TablePolicy, cpol: ColumnPolicy,
                 stream: TextIO | None) -> None:
        self.options = options
        self.service = service
        self.jobs = jobs
        self.conn = conn
        self.tpol = tpol
        self.cpol = cpol
        self.stream = stream
        self.schema, self.table, self.column = parse_column_spec(options.column)
        self.qualified = f"{self.schema}.{self.table}.{self.column}"  # the cells' AAD name
        self.job_name = ""  # column DATABASE/S.T.C, once connected
        self.throttle = Throttle(options.rate)
        self.same_db = False
        self.sealed = 0
        self.who: Who | None = None
        self.plan: ColumnMigration | None = None
        self.facts: TableFacts | None = None

    # -- entry point

    async def run(self) -> ColumnReport:
        o = self.options
        self.who = await Who.of(self.conn, f"pgseal migrate {o.direction} {self.qualified}")
        # One keystore may serve several databases holding a table of the same name.
        self.job_name = f"column {self.who.database}/{self.qualified}"
        await take_job_lock(self.conn, self.job_name)
        facts = await self._facts()
        mine = ObjectNames.of(self.schema, self.table, self.column, o.direction)
        other_dir: Direction = "decrypt" if o.direction == "encrypt" else "encrypt"
        theirs = ObjectNames.of(self.schema, self.table, self.column, other_dir)
        job = await self.jobs.get(self.job_name)
        report = ColumnReport(self.qualified, o.direction, "done")
        if theirs.shadow in facts.columns:
            # The opposite migration never cut over: undo it (the column is as it was).
            await self._undo(facts, other_dir, job)
            report.outcome = "undone"
            return report
        if mine.shadow in facts.columns:
            if job is None or job.kind != o.direction:
                job = await self.jobs.start(self.job_name, o.direction, "backfill",
                                            self._recover_details(facts))
            else:
                job = await self.jobs.resume(self.job_name)
        elif job is not None and job.kind == o.direction and (
                job.phase == "swapped"
                or (job.phase in ("backfill", "ready") and await self._swapped(facts))):
            # Cut over, but the run stopped before recording it (keystore in another
            # database) or before the CHECKs were validated: finish those steps.
            job = await self.jobs.resume(self.job_name)
            self.plan = self._plan(facts, job)
            await self._after_swap(job, report)
            return report
        elif (job is not None and job.kind == o.direction and job.phase == "done"
              and self._looks_done(facts)):
            report.outcome = "already"
            return report
        else:
            job = await self.jobs.start(self.job_name, o.direction, "backfill",
                                        await self._fresh_details(facts))
        self.same_db = await self.jobs.same_database(self.conn, self.job_name)
        self.plan = self._plan(facts, job)
        report.target_type = self.plan.target_type
        await self._prepare()
        facts = await self._facts()
        started = asyncio.get_running_loop().time()
        await self._backfill(job, facts)
        report.seconds = asyncio.get_running_loop().time() - started
        report.rows = self.sealed
        if not o.swap:
            report.pending = int(await self.conn.fetchval(self.plan.count_pending()))
            await self.jobs.update(self.job_name, phase="ready")
            report.outcome = "ready"
            return report
        report.dropped = await dependents(
            self.conn, facts, self.column, [self.plan.names.index, self.plan.names.guard])
        await self._cut_over(job)
        report.rows = self.sealed
        report.seconds = asyncio.get_running_loop().time() - started
        await self._after_swap(job, report)
        return report

    # -- what is there

    async def _facts(self) -> TableFacts:
        facts = await read_table(self.conn, self.schema, self.table)
        if facts is None:
            raise MigrationError(f"no table {self.schema}.{self.table} in this database")
        self.facts = facts
        return facts

    def _looks_done(self, facts: TableFacts) -> bool:
        """Whether the column is what a finished run of this direction leaves."""
        col = facts.columns.get(self.column)
        if col is None:
            return False
        if self.options.direction == "encrypt":
            return col.sql_type == "bytea"
        # A decrypted bytea column looks like an encrypted one: trust the job row then.
        return col.sql_type != "bytea" or self.cpol.type == "bytea"

    async def _swapped(self, facts: TableFacts) -> bool:
        """No shadow column although the job was backfilling: did the cut-over commit?
        (An encrypted column carries our CHECK from that very transaction.)"""
        if not self._looks_done(facts):
            return False
        if self.options.direction == "decrypt":
            return True
        guard = ObjectNames.of(self.schema, self.table, self.column, "encrypt").guard
        return await constraint_exists(self.conn, facts.oid, guard)

    def _recover_details(self, facts: TableFacts) -> dict[str, Any]:
        """A shadow column exists but no job row says so (keystore reset?): carry on."""
        col = facts.columns[self.column]
        mine = ObjectNames.of(self.schema, self.table, self.column, self.options.direction)
        return {"original_type": col.sql_type, "not_null": col.not_null,
                "target_type": facts.columns[mine.shadow].sql_type}

    async def _fresh_details(self, facts: TableFacts) -> dict[str, Any]:
        o = self.options
        col = facts.columns.get(self.column)
        if col is None:
            raise MigrationError(f"{self.qualified}: no such column in the table")
        if col.generated or col.identity:
            raise MigrationError(f"{self.qualified}: generated and identity columns cannot "
                                 "be encrypted")
        if any(k.name == self.column for k in facts.shape.key):
            raise MigrationError(f"{self.qualified} is part of the primary key: rows are "
                                 "addressed by it, it cannot be migrated")
        tenant_col = self.tpol.tenant_column
        if tenant_col is not None and tenant_col not in facts.columns:
            raise MigrationError(f"{self.schema}.{self.table}: no tenant column "
                                 f"{tenant_col!r} (the policy names it)")
        details: dict[str, Any] = {"original_type": col.sql_type, "not_null": col.not_null,
                                   "default": col.default}
        if o.direction == "encrypt":
            problem = live_type_problem(self.cpol.type, col.sql_type)
            if problem is not None:
                if col.sql_type == "bytea":
                    problem += " (is it encrypted already?)"
                raise MigrationError(f"{self.qualified} {problem}")
            if col.sql_type == "bytea" and await self._holds_cells():
                raise MigrationError(f"{self.qualified}: its values look like pgseal cells "
                                     "already; nothing to encrypt")
            details["target_type"] = "bytea"
        else:
            if col.sql_type != "bytea":
                raise MigrationError(f"{self.qualified} is {col.sql_type}, not bytea: it is "
                                     "not encrypted")
            previous = await self.jobs.get(self.job_name)
            if o.sql_type is not None:
                target = checked_sql_type(o.sql_type)
            else:
                # The type the column had before `migrate encrypt` (no lock-in, no drift),
                # else the policy's; a recorded type is checked like an operator's.
                target = SQL_TYPES[self.cpol.type]
                recorded = previous.details.get("original_type") if (
                    previous is not None and previous.kind == "encrypt") else None
                if isinstance(recorded, str):
                    with contextlib.suppress(PlanError):
                        target = checked_sql_type(recorded)
            # Check it is a type here, before anything changes (cannot be injected: checked
            # above, or written by format_type).
            await guarded(f"--type {target}", self.conn.execute(f"SELECT NULL::{target}"))
            details["target_type"] = target
        return details

    async def _holds_cells(self) -> bool:
        col = quote_ident(self.column)
        row = await self.conn.fetchrow(
            f"SELECT count(*) FILTER (WHERE {cell_guard('s.c')}) AS cells, count(*) AS n "
            f"FROM (SELECT {col} AS c FROM {quote_ident(self.schema)}."
            f"{quote_ident(self.table)} WHERE {col} IS NOT NULL LIMIT 100) AS s")
        assert row is not None
        return bool(row["n"]) and row["cells"] == row["n"]

    def _plan(self, facts: TableFacts, job: Job) -> ColumnMigration:
        encrypt = self.options.direction == "encrypt"
        # Both ways the row's tenant is read: encrypt seals under it; decrypt checks that
        # each cell belongs to its row's tenant, as the proxy does on a read.
        tenant_col = self.tpol.tenant_column
        try:
            # The job row is data: its type goes into DDL only once checked.
            target = "bytea" if encrypt else checked_sql_type(
                str(job.details.get("target_type") or SQL_TYPES[self.cpol.type]))
            return ColumnMigration(self.options.direction, facts.shape, self.column, target,
                                   tenant_col)
        except PlanError as exc:
            raise MigrationError(f"{self.qualified}: {exc}") from None

    # -- preparation

    async def _prepare(self) -> None:
        plan = self.plan
        assert plan is not None

        async def prepare() -> None:
            async with self.conn.transaction():
                for sql in plan.prepare_sql():
                    await self.conn.execute(sql)

        await self._with_lock_retry("preparing", prepare)
        if self.facts is not None and self.facts.rows_per_page <= 0:
            # Never analyzed: without statistics the planner picks sorts and scans over the
            # key index for the batch queries (measured 5x slower). ANALYZE samples: cheap.
            await guarded("analyzing", self.conn.execute(
                f"ANALYZE {self.facts.shape.qualified}"))
        state = await index_state(self.conn, self.schema, plan.names.index)
        if state is False:  # a CREATE INDEX CONCURRENTLY that was killed half way
            await guarded("dropping an invalid index", self.conn.execute(plan.drop_index_sql()))
        if state is not True:
            await guarded("creating the pending-rows index", self.conn.execute(plan.index_sql()))

    async def _with_lock_retry(self, what: str, work: Callable[[], Any]) -> None:
        """DDL waits for its lock at most lock_timeout_ms per try, so that the statements
        queued behind it (the application's) are held up that long at most."""
        o = self.options
        for attempt in range(o.lock_attempts):
            try:
                await self.conn.execute(f"SET lock_timeout = {int(o.lock_timeout_ms)}")
                try:
                    await work()
                finally:
                    await self.conn.execute("SET lock_timeout = 0")
                return
            except asyncpg.LockNotAvailableError:
                await asyncio.sleep(min(5.0, 0.1 * 2 ** attempt))
            except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                raise MigrationError(f"{self.qualified}: {what}: {pg_message(exc)}") from None
        raise MigrationError(f"{self.qualified}: {what}: table lock not granted within "
                             f"{o.lock_attempts} tries of {o.lock_timeout_ms} ms; run again")

    # -- the backfill

    async def _backfill(self, job: Job, facts: TableFacts) -> None:
        plan = self.plan
        assert plan is not None
        o = self.options
        total = int(await self.conn.fetchval(plan.count_pending()))
        pacer = Pacer(f"{o.direction} {self.qualified}", total, self.throttle, stream=self.stream)
        position = job.position or {}
        limit = self.throttle.batch_size(o.batch)
        if facts.shape.by_ctid:
            per_page = facts.rows_per_page
            if per_page <= 0:
                await self.conn.execute(f"ANALYZE {facts.shape.qualified}")
                per_page = (await self._facts()).rows_per_page
            step = pages_per_batch(limit, per_page)
            page = int(position.get("page", 0))
            while page < facts.pages:
                lo, hi = page_range(page, step)
                page += step

                def next_page(_rows: Sequence[Any], page: int = page) -> dict[str, Any]:
                    return {"page": page}

                n = await self._batch(plan.select_pages(), [lo, hi], next_page)
                await pacer.advance(n)
        else:
            after: list[str] | None = position.get("after")
            while True:
                params: list[Any]
                if after is None:
                    sql, params = plan.select_keyset(after=False), [limit]
                else:
                    sql, params = plan.select_keyset(after=True), [*after, limit]
                last: list[list[str]] = []

                def at(rows: Sequence[Any], last: list[list[str]] = last) -> dict[str, Any]:
                    address = self._address(rows[-1])
                    last.append(address)
                    return {"after": address}

                n = await self._batch(sql, params, at)
                if n == 0:
                    break
                after = last[-1]
                await pacer.advance(n)
        # Fresh statistics: the planner then serves the remaining passes from the partial
        # index of pending rows rather than scanning the table.
        await self.conn.execute(f"ANALYZE {facts.shape.qualified}")
        for _ in range(o.catchup_passes):
            handled = await self._catch_up(pacer)
            if handled <= limit:
                break  # what is left is about one batch: the cut-over takes it under lock
        pacer.show(final=True)

    async def _catch_up(self, pacer: Pacer | None) -> int:
        """One pass over the rows that became pending since (written by the application)."""
        plan = self.plan
        assert plan is not None
        budget = int(await self.conn.fetchval(plan.count_pending()))
        limit = self.throttle.batch_size(self.options.batch)
        handled = 0
        while handled < budget:
            n = await self._batch(plan.select_any(lock=True), [min(limit, budget - handled)],
                                  None)
            if n == 0:
                break
            handled += n
            if pacer is not None:
                await pacer.advance(n)
        return handled

    def _address(self, row: Any) -> list[str]:
        assert self.facts is not None
        return [row[f"k{i}"] for i in range(self.facts.shape.key_width)]

    async def _batch(self, sql: str, params: list[Any],
                     position: Callable[[Sequence[Any]], dict[str, Any]] | None,
                     *, nested: bool = False) -> int:
        """One batch in one transaction: lock pending rows, seal (or open) them, write the
        shadow, write the audit records (durable before the commit), checkpoint."""
        plan = self.plan
        assert plan is not None
        pos: dict[str, Any] | None = None
        try:
            async with self.conn.transaction():
                rows = await self.conn.fetch(sql, *params)
                if not rows:
                    return 0
                addresses = [self._address(r) for r in rows]
                values: list[bytes] | list[str]
                if self.options.direction == "encrypt":
                    values, records = await self._seal(rows, addresses)
                else:
                    values, records = await self._open(rows, addresses)
                arrays = [list(col) for col in zip(*addresses, strict=True)]
                await self.conn.execute(plan.update_shadow(), *arrays, values)
                await self.service.audit.record(*records)
                pos = position(rows) if position is not None else None
                if self.same_db:
                    await self.conn.execute(self.jobs.checkpoint_sql(), self.job_name,
                                            None if pos is None else json.dumps(pos), len(rows))
        except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise MigrationError(f"{self.qualified}: {pg_message(exc)}") from None
        self.sealed += len(rows)
        if not self.same_db and not nested:
            await self.jobs.checkpoint(self.job_name, pos, len(rows))
        return len(rows)

    async def _seal(self, rows: Sequence[Any],
                    addresses: list[list[str]]) -> tuple[list[bytes], list[AuditRecord]]:
        assert self.facts is not None and self.who is not None
        by_tenant: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            tenant = self.options.tenant if self.tpol.tenant_from_session else r["tenant"]
            if tenant is None:
                raise MigrationError(
                    f"{self.qualified}: row {self.facts.shape.describe(addresses[i])} has no "
                    f"tenant ({self.tpol.tenant_column} is NULL): the proxy could not read it "
                    "either; set its tenant first")
            by_tenant.setdefault(tenant, []).append(i)
        cells: list[bytes] = [b""] * len(rows)
        records: list[AuditRecord] = []
        for tenant, indexes in by_tenant.items():
            key = await self._current_key(tenant, len(indexes), addresses[indexes[0]])
            for i in indexes:
                try:
                    canonical = to_canonical(self.cpol.type, rows[i]["v"].encode(), 0, SESSION)
                except ValueFormatError as exc:
                    raise MigrationError(
                        f"{self.qualified}: row {self.facts.shape.describe(addresses[i])}: "
                        f"{exc} (as {self.cpol.type})") from None
                cells[i] = key.cell_key.seal(self.qualified, canonical,
                                             deterministic=self.cpol.searchable)
            records.append(self.who.record(
                "data.encrypt", tenant=tenant, key_id=key.key_id, key_version=key.version,
                kek=key.kek, table=f"{self.schema}.{self.table}", column=self.column,
                count=len(indexes)))
        return cells, records

    async def _current_key(self, tenant: str, uses: int, address: list[str]) -> DataKey:
        assert self.facts is not None
        try:
            check_tenant(tenant)
            return await self.service.current_key(tenant, uses)
        except PgsealError as exc:
            raise MigrationError(f"{self.qualified}: row {self.facts.shape.describe(address)}: "
                                 f"{exc}") from None

    async def _open(self, rows: Sequence[Any],
                    addresses: list[list[str]]) -> tuple[list[str], list[AuditRecord]]:
        assert self.facts is not None and self.who is not None
        shape = self.facts.shape
        by_key: dict[int, list[int]] = {}
        cells = [bytes(r["v"]) for r in rows]
        for i, cell in enumerate(cells):
            try:
                by_key.setdefault(cell_key_id(cell), []).append(i)
            except CellError:
                raise MigrationError(f"{self.qualified}: row {shape.describe(addresses[i])} "
                                     "holds a value that is not a pgseal cell") from None
        out: list[str] = [""] * len(rows)
        records: list[AuditRecord] = []
        for key_id, indexes in by_key.items():
            try:
                key = await self.service.key_by_id(key_id, len(indexes))
            except PgsealError as exc:
                where = shape.describe(addresses[indexes[0]])
                raise MigrationError(f"{self.qualified}: row {where}: {exc}") from None
            for i in indexes:
                if self.tpol.tenant_column is not None and rows[i]["tenant"] != key.tenant:
                    raise MigrationError(
                        f"{self.qualified}: row {shape.describe(addresses[i])} holds a cell of "
                        "another tenant (moved there?): not opened")
                try:
                    canonical = key.cell_key.open(self.qualified, cells[i])
                    out[i] = from_canonical(self.cpol.type, canonical, 0, SESSION).decode()
                except (CellError, ValueFormatError):
                    raise MigrationError(
                        f"{self.qualified}: row {shape.describe(addresses[i])}: the cell cannot "
                        "be opened (not sealed for this column, or altered)") from None
            records.append(self.who.record(
                "data.decrypt", tenant=key.tenant, key_id=key.key_id, key_version=key.version,
                kek=key.kek, table=f"{self.schema}.{self.table}", column=self.column,
                count=len(indexes)))
        return out, records

    # -- the cut-over

    async def _cut_over(self, job: Job) -> None:
        """One short transaction under ACCESS EXCLUSIVE: the rows written since the last
        pass, a check that none is left, then the column swap. If the lock does not come
        within lock_timeout_ms, let the application go on, catch up, and try again."""
        plan = self.plan
        assert plan is not None and self.facts is not None
        o = self.options
        not_null = bool(job.details.get("not_null"))
        for attempt in range(o.lock_attempts):
            before = self.sealed
            try:
                async with self.conn.transaction():
                    await self.conn.execute(f"SET LOCAL lock_timeout = {int(o.lock_timeout_ms)}")
                    await self.conn.execute(
                        f"LOCK TABLE {self.facts.shape.qualified} IN ACCESS EXCLUSIVE MODE")
                    await self.conn.execute("SET LOCAL lock_timeout = 0")
                    while await self._batch(plan.select_any(lock=False), [o.batch], None,
                                            nested=True):
                        pass
                    left = int(await self.conn.fetchval(plan.count_pending()))
                    if left:
                        raise MigrationError(f"{self.qualified}: {left} rows still pending "
                                             "under the table lock (a bug): nothing changed")
                    for sql in plan.swap_sql(not_null=not_null):
                        await self.conn.execute(sql)
                    if self.same_db:
                        await self.conn.execute(self.jobs.phase_sql(), self.job_name, "swapped")
            except asyncpg.LockNotAvailableError:
                self.sealed = before  # rolled back
                await self._catch_up(None)
                await asyncio.sleep(min(5.0, 0.1 * 2 ** attempt))
                continue
            except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                raise MigrationError(
                    f"{self.qualified}: cut-over refused, nothing changed (the backfill stays "
                    f"in sync; fix and run again): {pg_message(exc)}") from None
            if not self.same_db:
                await self.jobs.checkpoint(self.job_name, None, self.sealed - before)
                await self.jobs.update(self.job_name, phase="swapped")
            return
        raise MigrationError(
            f"{self.qualified}: the cut-over did not get its table lock within "
            f"{o.lock_attempts} tries of {o.lock_timeout_ms} ms; the backfill is complete "
            "and kept in sync: run again")

    async def _after_swap(self, job: Job, report: ColumnReport) -> None:
        plan = self.plan
        assert plan is not None
        facts = await self._facts()
        for sql, needs in plan.post_swap_steps(not_null=bool(job.details.get("not_null"))):
            if needs is not None and not await constraint_exists(self.conn, facts.oid, needs):
                continue  # done by an earlier run

            async def step(sql: str = sql) -> None:
                await self.conn.execute(sql)

            await self._with_lock_retry("finishing the cut-over", step)
        if self.options.direction == "encrypt":
            report.guard = plan.names.guard
        report.target_type = plan.target_type
        await self.jobs.update(self.job_name, phase="done", finished=True)

    # -- undo

    async def _undo(self, facts: TableFacts, direction: Direction, job: Job | None) -> None:
        """Drop what an unfinished migration added; its original column never changed."""
        details = dict(job.details) if job is not None else {}
        target = str(details.get("target_type") or "bytea")
        tenant_col = self.tpol.tenant_column if direction == "encrypt" else None
        plan = ColumnMigration(direction, facts.shape, self.column, target, tenant_col)

        async def undo() -> None:
            async with self.conn.transaction():
                for sql in plan.undo_sql():
                    await self.conn.execute(sql)

        await self._with_lock_retry("undoing", undo)
        if job is None:
            await self.jobs.start(self.job_name, direction, "undone", {})
        await self.jobs.update(self.job_name, phase="undone", finished=True)


async def migrate_column(config: Config, options: ColumnOptions,
                         stream: TextIO | None = None) -> ColumnReport:
    """Run (or resume) one column migration; see the module doc."""
    if options.batch <= 0:
        raise MigrationError("--batch must be positive")
    try:
        schema, table, column = parse_column_spec(options.column)
        Throttle(options.rate)
    except PlanError as exc:
        raise MigrationError(str(exc)) from None
    tpol, cpol = policy_column(load_policy_set(config), schema, table, column)
    if options.direction == "encrypt":
        if tpol.tenant_from_session and options.tenant is None:
            raise MigrationError(f"{schema}.{table} takes its tenant from the session: say "
                                 "whose rows these are with --tenant")
        if not tpol.tenant_from_session and options.tenant is not None:
            raise MigrationError(f"{schema}.{table} has a tenant column "
                                 f"({tpol.tenant_column}); --tenant is only for "
                                 "session-tenant tables")
    # LISTEN: a rotation while we run must reach us, so that we seal under the new version.
    service = await KeyService.open(config, listen=True)
    try:
        jobs = JobStore(service.keystore)
        await jobs.ensure()
        conn = await connect_data(options.dsn or config.keystore.dsn)
        try:
            migrator = ColumnMigrator(options, service, jobs, conn, tpol, cpol, stream)
            return await migrator.run()
        finally:
            await conn.close()
    finally:
        await service.close()

"""`pgseal migrate encrypt|decrypt|status`, `pgseal rekey` and `pgseal keys rotate --rekey`.

Each handler prints its report for a human on stdout (progress goes to stderr: a bar on
a terminal, a line every few seconds otherwise) and returns 0; a failure raises
PgsealError, which the CLI prints as one line on stderr (exit 1).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
from collections.abc import Awaitable
from typing import TypeVar

from proxy.config import Config
from proxy.errors import PgsealError
from proxy.keys.service import KeyService
from proxy.migrate.column import ColumnOptions, ColumnReport, migrate_column
from proxy.migrate.common import MigrationError
from proxy.migrate.jobs import Job, JobStore
from proxy.migrate.plan import Direction
from proxy.migrate.rekey import RekeyOptions, RekeyReport, rekey

_T = TypeVar("_T")


def _run(coro: Awaitable[_T]) -> _T:
    async def main() -> _T:
        return await coro

    return asyncio.run(main())


# --- migrate encrypt / decrypt ---------------------------------------------------------


def format_column_report(r: ColumnReport) -> str:
    rate = f" ({r.rows / r.seconds:,.0f} rows/s)" if r.seconds > 0 else ""
    verb = "sealed" if r.direction == "encrypt" else "opened"
    if r.outcome == "already":
        return f"{r.column}: already {r.direction}ed; nothing to do"
    if r.outcome == "undone":
        other = "decrypt" if r.direction == "encrypt" else "encrypt"
        return (f"{r.column}: the unfinished migrate {other} was undone (its shadow column and "
                "trigger dropped); the column is as it was before it")
    if r.outcome == "ready":
        return (f"{r.column}: backfill done, {r.rows:,} rows {verb} in {r.seconds:.1f} s{rate}; "
                f"{r.pending:,} rows written since are pending. The trigger keeps the shadow "
                "column in sync: run the same command without --no-swap to cut over")
    lines = [f"{r.column}: {r.direction}ed: {r.rows:,} rows {verb} in {r.seconds:.1f} s{rate}"]
    if r.direction == "encrypt":
        lines.append(f"  the column is now bytea holding cells; CHECK {r.guard} admits only "
                     "well-formed cells")
    else:
        lines.append(f"  the column is now {r.target_type}, in plaintext")
    if r.dropped:
        lines.append(f"  dropped with the old column: {', '.join(r.dropped)}")
    if r.direction == "encrypt":
        lines.append(
            "  next: restart every pgseal proxy with a policy covering this column. Until "
            "then a proxy on the old policy has its writes to it refused by that CHECK and "
            "reads raw cells. The old plaintext stays in dead row versions, WAL and backups "
            "until VACUUM (FULL) rewrites the table and they expire.")
    else:
        lines.append(
            "  next: take the column out of the policy and restart every pgseal proxy. Until "
            "then a proxy on the old policy fails reads of it and its writes to it fail")
    return "\n".join(lines)


def _migrate(args: argparse.Namespace, config: Config, direction: Direction) -> int:
    options = ColumnOptions(
        direction, args.column, batch=args.batch, rate=args.rate, dsn=args.dsn,
        tenant=getattr(args, "tenant", None), swap=not args.no_swap,
        sql_type=getattr(args, "sql_type", None),
    )
    print(format_column_report(_run(migrate_column(config, options))))
    return 0


def cmd_migrate_encrypt(args: argparse.Namespace, config: Config) -> int:
    return _migrate(args, config, "encrypt")


def cmd_migrate_decrypt(args: argparse.Namespace, config: Config) -> int:
    return _migrate(args, config, "decrypt")


def format_jobs(jobs: list[Job]) -> str:
    header = ("JOB", "KIND", "PHASE", "DONE", "STARTED", "UPDATED")

    def when(t: dt.datetime | None) -> str:
        return "-" if t is None else t.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")

    rows = [(j.job, j.kind, j.phase, f"{j.done:,}", when(j.started_at), when(j.updated_at))
            for j in jobs]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in [header, *rows])


def cmd_migrate_status(args: argparse.Namespace, config: Config) -> int:
    async def read() -> list[Job]:
        service = await KeyService.open(config, listen=False)
        try:
            store = JobStore(service.keystore)
            await store.ensure()
            return await store.all()
        finally:
            await service.close()

    jobs = _run(read())
    print(format_jobs(jobs) if jobs else "no migrations or rekeys recorded")
    return 0


# --- rekey -----------------------------------------------------------------------------


def format_rekey_report(r: RekeyReport) -> list[str]:
    rate = f" ({r.resealed / r.seconds:,.0f} cells/s)" if r.seconds > 0 else ""
    scope = f"tenant {r.scope!r}" if r.scope != "*" else "all tenants"
    lines = [f"rekey {scope}: {r.resealed:,} cells re-sealed in {r.seconds:.1f} s{rate} "
             f"(database {r.database})"]
    with_old = {v.tenant for v in r.versions}
    for tenant, key in sorted(r.active.items()):
        if tenant in with_old:
            lines.append(f"  tenant {tenant!r}: current version {key.version} "
                         f"(key id {key.key_id})")
    if r.changed:
        lines.append(f"  {r.changed:,} cells changed by the application meanwhile: left as "
                     "written (sealed by the proxy)")
    for v in r.versions:
        what = f"  tenant {v.tenant!r}: version {v.version} (key id {v.key_id}): "
        if v.destroyed_now:
            lines.append(what + "no cells left: destroyed")
        elif v.cells:
            lines.append(what + f"{v.cells:,} cells left: keep it")
        else:
            hint = v.note or (f"can be destroyed (pgseal rekey --tenant {v.tenant} "
                              "--destroy-old)")
            lines.append(what + "no cells left: " + hint)
    if not r.versions:
        lines.append("  no retired versions: nothing to re-seal")
    for t in r.no_active:
        lines.append(f"  tenant {t!r}: every key destroyed; its cells cannot be re-sealed")
    for s in r.skipped:
        lines.append(f"  skipped {s}")
    if r.unreadable:
        lines.append(f"  {r.unreadable:,} cells did not open (altered or moved): left as they are")
    for c in r.conflicts[:10]:
        lines.append(f"  conflict: {c}")
    if len(r.conflicts) > 10:
        lines.append(f"  ... {len(r.conflicts) - 10} more conflicts")
    return lines


def _rekey(args: argparse.Namespace, config: Config, tenant: str | None) -> int:
    options = RekeyOptions(tenant, batch=args.batch, rate=args.rate, dsn=args.dsn,
                           destroy_old=args.destroy_old)
    report = _run(rekey(config, options))
    print("\n".join(format_rekey_report(report)))
    if report.conflicts:
        raise MigrationError(
            f"{len(report.conflicts)} cells not re-sealed: the same value already exists "
            "under the current version in another row (a unique constraint); resolve the "
            "duplicates and run rekey again")
    return 0


def cmd_rekey(args: argparse.Namespace, config: Config) -> int:
    return _rekey(args, config, None if args.all else args.tenant)


def cmd_keys_rotate_rekey(args: argparse.Namespace, config: Config) -> int:
    """`keys rotate --tenant T --rekey`: the rotation as `keys rotate` does it, then rekey."""
    from proxy.keys.commands import cmd_keys_rotate

    code = cmd_keys_rotate(args, config)
    if code != 0:
        raise PgsealError(f"rotation of tenant {args.tenant!r} failed: not re-sealing")
    return _rekey(args, config, args.tenant)

"""Checkpoints of column migrations and rekeys, in the keystore schema (`<schema>.jobs`).

One row per job: `column DATABASE/SCHEMA.TABLE.COLUMN` (the latest encrypt or decrypt of
that column) or `rekey DATABASE/TENANT` / `rekey DATABASE/*`. A checkpoint is a hint,
never the source of truth: every batch selects only rows that still need work, so a lost
or stale checkpoint costs a re-scan, never a value sealed twice. When the data and the
keystore live in the same database the checkpoint is written in the batch's own
transaction (then `done` counts exactly the rows committed); otherwise right after it
commits.

The table is created here, on first use, rather than by the keystore's numbered
migrations: it is operational state of these commands, not part of the key model.
"""

# ruff: noqa: S608  (the table name is the keystore's checked schema identifier;
#                     values are parameters)

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from proxy.keys.keystore import Conn, Keystore

_CREATE = """
CREATE TABLE IF NOT EXISTS {s}.jobs (
    job         text PRIMARY KEY,
    kind        text NOT NULL,
    phase       text NOT NULL,
    position    jsonb,
    done        bigint NOT NULL DEFAULT 0,
    details     jsonb NOT NULL DEFAULT '{{}}'::jsonb,
    started_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
)
"""
_COLUMNS = "job, kind, phase, position, done, details, started_at, updated_at, finished_at"


@dataclass(frozen=True, slots=True)
class Job:
    job: str
    kind: str  # encrypt | decrypt | rekey
    phase: str  # backfill | ready | swapped | done | undone (columns); running | done (rekey)
    position: dict[str, Any] | None
    done: int
    details: dict[str, Any]
    started_at: datetime
    updated_at: datetime
    finished_at: datetime | None

    @classmethod
    def from_record(cls, r: Any) -> Job:
        return cls(
            r["job"], r["kind"], r["phase"],
            None if r["position"] is None else json.loads(r["position"]),
            int(r["done"]), json.loads(r["details"]),
            r["started_at"], r["updated_at"], r["finished_at"],
        )


class JobStore:
    """Reads and writes `<schema>.jobs` through the keystore's pool (or a given connection)."""

    def __init__(self, keystore: Keystore) -> None:
        self.keystore = keystore
        self.table = f"{keystore.s}.jobs"
        # Names this run in the job row, to tell whether the data connection sees it too.
        self.run_id = secrets.token_hex(8)

    async def ensure(self) -> None:
        schema = self.keystore.schema

        async def work(conn: Conn) -> None:
            async with conn.transaction():
                # CREATE TABLE IF NOT EXISTS still races with itself (pg_type unique key).
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1), 1)",
                                   f"pgseal:{schema}:jobs")
                await conn.execute(_CREATE.format(s=self.keystore.s))

        await self.keystore.run(work)

    async def get(self, job: str) -> Job | None:
        async def work(conn: Conn) -> Job | None:
            r = await conn.fetchrow(f"SELECT {_COLUMNS} FROM {self.table} WHERE job = $1", job)
            return None if r is None else Job.from_record(r)

        return await self.keystore.run(work)

    async def all(self) -> list[Job]:
        async def work(conn: Conn) -> list[Job]:
            rows = await conn.fetch(f"SELECT {_COLUMNS} FROM {self.table} ORDER BY job")
            return [Job.from_record(r) for r in rows]

        return await self.keystore.run(work)

    async def start(self, job: str, kind: str, phase: str, details: dict[str, Any]) -> Job:
        """A new job (replacing a finished one of the same name), or this run resuming it."""
        body = json.dumps({**details, "run": self.run_id})

        async def work(conn: Conn) -> Job:
            r = await conn.fetchrow(
                f"INSERT INTO {self.table} (job, kind, phase, details) VALUES ($1, $2, $3, "
                "$4::jsonb) ON CONFLICT (job) DO UPDATE SET kind = $2, phase = $3, "
                "position = NULL, done = 0, details = $4::jsonb, started_at = now(), "
                f"updated_at = now(), finished_at = NULL RETURNING {_COLUMNS}",
                job, kind, phase, body,
            )
            return Job.from_record(r)

        return await self.keystore.run(work)

    async def resume(self, job: str) -> Job:
        """Mark `job` as taken over by this run (see same_database)."""

        async def work(conn: Conn) -> Job:
            r = await conn.fetchrow(
                f"UPDATE {self.table} SET details = details || jsonb_build_object('run', "
                f"$2::text), updated_at = now() WHERE job = $1 RETURNING {_COLUMNS}",
                job, self.run_id,
            )
            return Job.from_record(r)

        return await self.keystore.run(work)

    def checkpoint_sql(self) -> str:
        """params: job, position (json text, or NULL to keep it), rows to add to `done`."""
        return (f"UPDATE {self.table} SET position = coalesce($2::jsonb, position), "
                "done = done + $3, updated_at = now() WHERE job = $1")

    def phase_sql(self) -> str:
        """params: job, phase."""
        return f"UPDATE {self.table} SET phase = $2, updated_at = now() WHERE job = $1"

    async def checkpoint(self, job: str, position: dict[str, Any] | None, add: int) -> None:
        sql = self.checkpoint_sql()
        pos = None if position is None else json.dumps(position)

        async def work(conn: Conn) -> None:
            await conn.execute(sql, job, pos, add)

        await self.keystore.run(work)

    async def update(self, job: str, *, phase: str | None = None,
                     details: dict[str, Any] | None = None, finished: bool = False) -> None:
        async def work(conn: Conn) -> None:
            await conn.execute(
                f"UPDATE {self.table} SET phase = coalesce($2, phase), "
                "details = details || coalesce($3::jsonb, '{}'::jsonb), updated_at = now(), "
                "finished_at = CASE WHEN $4 THEN now() ELSE finished_at END WHERE job = $1",
                job, phase, None if details is None else json.dumps(details), finished,
            )

        await self.keystore.run(work)

    async def same_database(self, conn: asyncpg.Connection[Any], job: str) -> bool:
        """Whether `conn` (the data connection) reaches this very jobs row: then the
        checkpoint can share each batch's transaction. Any error means no."""
        try:
            found = await conn.fetchval(
                f"SELECT details->>'run' FROM {self.table} WHERE job = $1", job)
        except (asyncpg.PostgresError, asyncpg.InterfaceError):
            return False
        return bool(found == self.run_id)

"""The keystore: wrapped tenant data keys in PostgreSQL (DESIGN.md 7), reached with asyncpg.

Tables live in the configured schema (default ``pgseal``), created on first use by
versioned migrations recorded in ``<schema>.migrations``:

- ``keys``: one row per (tenant, version): key_id (int4 identity: positive, fits the
  cell header's u32), state active | retired | destroyed, the master key (``kek``) that
  wrapped it, the GCM nonce and the wrapped bytes (both NULL once destroyed), timestamps.
  At most one active row per tenant (a partial unique index says so to the database too).
- ``masters``: the master keys this keystore knows, by kek id: pending (made on the HSM,
  re-wrap not committed yet), active (wraps new keys), retired (waiting to be destroyed on
  the token), destroyed. This is what makes master-key rotation resumable.

A raw data key is never written here. Concurrency between proxies is settled by
transaction-scoped advisory locks: one per tenant (create / rotate / destroy of that
tenant), and a master lock taken shared by every wrap and exclusively by master-key
rotation, so no key is wrapped under a master key that a rotation is replacing.
Every change sends a NOTIFY on ``channel`` inside its transaction: other proxies evict
their cached keys when it commits. A job the fleet must run once at a time (the
cryptoperiod check) holds a session advisory lock on a connection of its own
(``fleet_lock``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar
from urllib.parse import urlsplit

import asyncpg

from proxy.errors import KeyServiceUnavailable

log = logging.getLogger("pgseal.keys.keystore")

_T = TypeVar("_T")

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

# What `Keystore.run` hands its work: a pooled connection (asyncpg's proxy for it).
Conn: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"

ACTIVE, RETIRED, DESTROYED = "active", "retired", "destroyed"

MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        1,
        "data keys and master keys",
        """
        CREATE TABLE {s}.masters (
            kek          text PRIMARY KEY,
            label        text NOT NULL,
            state        text NOT NULL
                         CHECK (state IN ('pending', 'active', 'retired', 'destroyed')),
            created_at   timestamptz NOT NULL DEFAULT now(),
            activated_at timestamptz,
            retired_at   timestamptz,
            destroyed_at timestamptz
        );
        CREATE UNIQUE INDEX masters_one_active ON {s}.masters ((true)) WHERE state = 'active';
        CREATE TABLE {s}.keys (
            key_id       integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            tenant       text NOT NULL CHECK (tenant <> ''),
            version      integer NOT NULL CHECK (version > 0),
            state        text NOT NULL CHECK (state IN ('active', 'retired', 'destroyed')),
            kek          text NOT NULL,
            nonce        bytea,
            wrapped      bytea,
            created_at   timestamptz NOT NULL DEFAULT now(),
            rotated_at   timestamptz,
            destroyed_at timestamptz,
            UNIQUE (tenant, version),
            CHECK ((state = 'destroyed') = (wrapped IS NULL AND nonce IS NULL))
        );
        CREATE UNIQUE INDEX keys_one_active ON {s}.keys (tenant) WHERE state = 'active';
        """,
    ),
)


@dataclass(frozen=True, slots=True)
class KeyRow:
    """One row of `<schema>.keys` (wrapped bytes only: never a raw key)."""

    key_id: int
    tenant: str
    version: int
    state: str
    kek: str
    nonce: bytes | None
    wrapped: bytes | None
    created_at: datetime
    rotated_at: datetime | None
    destroyed_at: datetime | None

    @classmethod
    def from_record(cls, r: Any) -> KeyRow:
        return cls(
            r["key_id"], r["tenant"], r["version"], r["state"], r["kek"],
            None if r["nonce"] is None else bytes(r["nonce"]),
            None if r["wrapped"] is None else bytes(r["wrapped"]),
            r["created_at"], r["rotated_at"], r["destroyed_at"],
        )


@dataclass(frozen=True, slots=True)
class MasterRow:
    kek: str
    label: str
    state: str
    created_at: datetime | None = None
    activated_at: datetime | None = None  # when it began wrapping data keys
    retired_at: datetime | None = None
    destroyed_at: datetime | None = None


KEY_COLUMNS = (
    "key_id, tenant, version, state, kek, nonce, wrapped, created_at, rotated_at, destroyed_at"
)


def describe_dsn(dsn: str) -> str:
    """host:port/database of a DSN, for messages: never the user's password. Only a
    postgres[ql]:// URL is described (its user part and query string left out); anything
    else (`host=... password=...`, `jdbc:postgresql://...`, a typo) is not repeated."""
    try:
        parts = urlsplit(dsn)
        if parts.scheme not in ("postgres", "postgresql") or not parts.netloc:
            return "the configured DSN"
        host = parts.hostname or "localhost"
        port = parts.port or 5432
        db = parts.path.lstrip("/").split("/", 1)[0] or "postgres"
        return f"{host}:{port}/{db}"
    except ValueError:
        return "the configured DSN"


# {s}: the quoted schema; {cols}: KEY_COLUMNS. Values always travel as parameters.
_SQL = {
    "create_schema": "CREATE SCHEMA IF NOT EXISTS {s}",
    "create_migrations": (
        "CREATE TABLE IF NOT EXISTS {s}.migrations (version integer PRIMARY KEY, "
        "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
    ),
    "applied": "SELECT version FROM {s}.migrations",
    "record_migration": "INSERT INTO {s}.migrations (version, name) VALUES ($1, $2)",
    "by_id": "SELECT {cols} FROM {s}.keys WHERE key_id = $1",
    "active": "SELECT {cols} FROM {s}.keys WHERE tenant = $1 AND state = 'active'",
    "tenant": "SELECT {cols} FROM {s}.keys WHERE tenant = $1 ORDER BY version",
    "all": "SELECT {cols} FROM {s}.keys ORDER BY tenant, version",
    "batch": (
        "SELECT {cols} FROM {s}.keys WHERE key_id = ANY($1::integer[]) "
        "OR (tenant = ANY($2::text[]) AND state = 'active')"
    ),
    "insert": (
        "INSERT INTO {s}.keys (tenant, version, state, kek, nonce, wrapped) "
        "VALUES ($1, $2, 'active', $3, $4, $5) RETURNING {cols}"
    ),
    "retire": (
        "UPDATE {s}.keys SET state = 'retired', rotated_at = now() "
        "WHERE key_id = $1 RETURNING {cols}"
    ),
    "destroy": (
        "UPDATE {s}.keys SET state = 'destroyed', nonce = NULL, wrapped = NULL, "
        "destroyed_at = now() WHERE tenant = $1 AND state <> 'destroyed' RETURNING {cols}"
    ),
    "not_under": (
        "SELECT {cols} FROM {s}.keys WHERE state <> 'destroyed' AND kek <> $1 "
        "ORDER BY key_id FOR UPDATE"
    ),
    "set_wrapped": "UPDATE {s}.keys SET kek = $2, nonce = $3, wrapped = $4 WHERE key_id = $1",
    "masters": (
        "SELECT kek, label, state, created_at, activated_at, retired_at, destroyed_at "
        "FROM {s}.masters ORDER BY created_at"
    ),
    # Active keys that began protecting data at least $1 ago (the database's clock, the
    # one that wrote created_at), oldest first.
    "due": (
        "SELECT {cols} FROM {s}.keys WHERE state = 'active' AND created_at <= now() - $1::interval "
        "ORDER BY created_at, key_id LIMIT $2"
    ),
    "dead_rows": (
        "SELECT n_dead_tup, last_vacuum, last_autovacuum FROM pg_catalog.pg_stat_user_tables "
        "WHERE schemaname = $1 AND relname = 'keys'"
    ),
    "listeners": (
        "SELECT count(*) FROM pg_catalog.pg_stat_activity "
        "WHERE application_name = 'pgseal-keystore-listener' AND datname = current_database()"
    ),
    "adopt_master": (
        # No conflict target: two first uses at once (two proxies, two sessions) both
        # adopt the token's master key, and the second insert may meet the first on
        # the kek or on masters_one_active (the only active one), whichever it checks.
        "INSERT INTO {s}.masters (kek, label, state, activated_at) "
        "VALUES ($1, $2, 'active', now()) ON CONFLICT DO NOTHING"
    ),
    "pending_master": "INSERT INTO {s}.masters (kek, label, state) VALUES ($1, $2, 'pending')",
    "retire_masters": (
        "UPDATE {s}.masters SET state = 'retired', retired_at = now() "
        "WHERE state = 'active' AND kek <> $1"
    ),
    "activate_master": (
        "UPDATE {s}.masters SET state = 'active', activated_at = now() WHERE kek = $1"
    ),
    "unused_retired": (
        "SELECT m.kek FROM {s}.masters m WHERE m.state = 'retired' AND NOT EXISTS "
        "(SELECT 1 FROM {s}.keys k WHERE k.kek = m.kek AND k.state <> 'destroyed')"
    ),
    "master_destroyed": (
        "UPDATE {s}.masters SET state = 'destroyed', destroyed_at = now() WHERE kek = $1"
    ),
}


async def _keep_session(conn: Conn) -> None:
    """Pool reset hook that sends nothing.

    asyncpg's default reset runs RESET ALL, UNLISTEN *, CLOSE ALL and an advisory
    unlock on every release: a second round trip per key lookup. Our pooled sessions
    change no session state (locks are transaction-scoped, LISTEN has its own
    connection), and asyncpg still rolls back an open transaction itself.
    """
    return None

_LOST = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
)


class Keystore:
    """Pooled access to the keystore schema; every failure is KeyServiceUnavailable.

    The pool is made lazily with min_size 0, so a database that is down at start or
    restarts later is reached again on the next call: recovery needs no restart.
    """

    def __init__(self, dsn: str, schema: str, *, connect_timeout: float = 5.0) -> None:
        self.dsn = dsn
        self.schema = schema
        self.s = f'"{schema}"'  # validated as a plain identifier by KeystoreConfig
        self.channel = f"{schema}_keys"
        # Names this process's changes in NOTIFY payloads (it has evicted them already).
        self.origin = secrets.token_hex(8)
        # Every statement, with the schema (a checked plain identifier) filled in once.
        self.q = {name: sql.format(s=self.s, cols=KEY_COLUMNS) for name, sql in _SQL.items()}
        self._timeout = connect_timeout
        self._pool: asyncpg.Pool | None = None
        self._migrated = False
        self._pool_lock = asyncio.Lock()

    @property
    def where(self) -> str:
        """How messages name the keystore: host, port, database, schema (no credentials)."""
        return f"keystore {describe_dsn(self.dsn)} (schema {self.schema})"

    # -- connection plumbing

    async def _get_pool(self) -> asyncpg.Pool:
        async with self._pool_lock:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    self.dsn, min_size=0, max_size=4, timeout=self._timeout,
                    command_timeout=30,
                    server_settings={
                        "application_name": "pgseal-keystore",
                        # Every transaction takes an advisory lock, then reads the rows the
                        # lock's last holder may have just committed: READ COMMITTED, whatever
                        # the database's default (a REPEATABLE READ snapshot predates the lock).
                        "default_transaction_isolation": "read committed",
                    },
                    reset=_keep_session,
                )
            return self._pool

    def unavailable(self, exc: BaseException) -> KeyServiceUnavailable:
        if isinstance(exc, asyncio.TimeoutError):
            reason = "connection timed out"
        elif isinstance(exc, OSError):
            reason = exc.strerror or str(exc) or type(exc).__name__
        else:
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        return KeyServiceUnavailable(f"{self.where} unreachable: {reason}")

    async def run(self, work: Callable[[Conn], Awaitable[_T]]) -> _T:
        """Run `work(conn)` on a pooled connection; one retry when the connection was lost.

        `work` must be safe to run twice (it runs in its own transaction(s)).
        """
        for attempt in (1, 2):
            try:
                pool = await self._get_pool()
                async with pool.acquire() as conn:
                    if not self._migrated:
                        await self._migrate(conn)
                    return await work(conn)
            except KeyServiceUnavailable:
                raise
            except _LOST as exc:
                if attempt == 2:
                    raise self.unavailable(exc) from None
                log.info("%s: connection lost, retrying once", self.where)
            except asyncpg.PostgresError as exc:
                raise KeyServiceUnavailable(
                    f"{self.where}: {(str(exc).splitlines() or [type(exc).__name__])[0]}"
                ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def open(self) -> None:
        """Connect and migrate now (instead of on first use)."""

        async def noop(conn: Conn) -> None:
            return None

        await self.run(noop)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    # -- migrations

    async def _migrate(self, conn: Conn) -> None:
        q = self.q
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1), 0)",
                               f"pgseal:{self.schema}:migrate")
            await conn.execute(q["create_schema"])
            await conn.execute(q["create_migrations"])
            done = {r["version"] for r in await conn.fetch(q["applied"])}
            known = {v for v, _, _ in MIGRATIONS}
            if done - known:
                raise KeyServiceUnavailable(
                    f"{self.where} is at migration {max(done)}, newer than this pgseal "
                    f"knows ({max(known)}): upgrade pgseal"
                )
            for version, name, sql in MIGRATIONS:
                if version in done:
                    continue
                await conn.execute(sql.format(s=self.s))
                await conn.execute(q["record_migration"], version, name)
                log.info("%s: applied migration %d (%s)", self.where, version, name)
        self._migrated = True

    # -- locks and notifications (inside a transaction)

    async def lock_tenant(self, conn: Conn, tenant: str) -> None:
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1), hashtext($2))",
                           f"pgseal:{self.schema}:tenant", tenant)

    async def lock_masters(self, conn: Conn, *, exclusive: bool) -> None:
        """Shared by every wrap under the active master key; exclusive for its rotation."""
        sql = ("SELECT pg_advisory_xact_lock(hashtext($1), 0)" if exclusive
               else "SELECT pg_advisory_xact_lock_shared(hashtext($1), 0)")
        await conn.execute(sql, f"pgseal:{self.schema}:master")

    async def notify(self, conn: Conn, op: str, tenant: str | None,
                     key_ids: list[int]) -> None:
        message = {"op": op, "tenant": tenant, "key_ids": key_ids, "origin": self.origin}
        payload = json.dumps(message)
        if len(payload) > 7000:  # NOTIFY payloads stop at 8000 bytes: evict the whole tenant
            payload = json.dumps({**message, "key_ids": []})
        await conn.execute("SELECT pg_notify($1, $2)", self.channel, payload)

    # -- data keys

    async def row_by_id(self, conn: Conn, key_id: int) -> KeyRow | None:
        r = await conn.fetchrow(self.q["by_id"], key_id)
        return None if r is None else KeyRow.from_record(r)

    async def active_row(self, conn: Conn, tenant: str) -> KeyRow | None:
        r = await conn.fetchrow(self.q["active"], tenant)
        return None if r is None else KeyRow.from_record(r)

    async def tenant_rows(self, conn: Conn, tenant: str) -> list[KeyRow]:
        return [KeyRow.from_record(r) for r in await conn.fetch(self.q["tenant"], tenant)]

    async def rows_for(self, conn: Conn, key_ids: list[int],
                       tenants: list[str]) -> list[KeyRow]:
        """The rows of `key_ids` and the active rows of `tenants`, in one query."""
        return [KeyRow.from_record(r) for r in await conn.fetch(self.q["batch"], key_ids, tenants)]

    async def all_rows(self, conn: Conn, tenant: str | None = None) -> list[KeyRow]:
        if tenant is not None:
            return await self.tenant_rows(conn, tenant)
        return [KeyRow.from_record(r) for r in await conn.fetch(self.q["all"])]

    async def due_rows(self, conn: Conn, older_than: timedelta, limit: int) -> list[KeyRow]:
        """Active keys created at least `older_than` ago by the database's clock."""
        return [KeyRow.from_record(r)
                for r in await conn.fetch(self.q["due"], older_than, limit)]

    async def dead_rows(self, conn: Conn) -> tuple[int, datetime | None] | None:
        """Dead row versions of the keys table (statistics) and when it was last vacuumed."""
        r = await conn.fetchrow(self.q["dead_rows"], self.schema)
        if r is None:
            return None
        vacuums = [v for v in (r["last_vacuum"], r["last_autovacuum"]) if v is not None]
        return int(r["n_dead_tup"]), max(vacuums, default=None)

    async def listener_count(self, conn: Conn) -> int:
        """Change listeners of every pgseal keystore in this database, connected now."""
        return int(await conn.fetchval(self.q["listeners"]))

    async def insert_key(self, conn: Conn, tenant: str, version: int, kek: str,
                         nonce: bytes, wrapped: bytes) -> KeyRow:
        r = await conn.fetchrow(self.q["insert"], tenant, version, kek, nonce, wrapped)
        return KeyRow.from_record(r)

    async def retire(self, conn: Conn, key_id: int) -> KeyRow:
        return KeyRow.from_record(await conn.fetchrow(self.q["retire"], key_id))

    async def destroy_tenant(self, conn: Conn, tenant: str) -> list[KeyRow]:
        """Erase the wrapped bytes of every live version (crypto-shredding)."""
        return [KeyRow.from_record(r) for r in await conn.fetch(self.q["destroy"], tenant)]

    async def rewrap_candidates(self, conn: Conn, kek: str) -> list[KeyRow]:
        """Live keys not yet wrapped under `kek`, locked until the transaction ends."""
        return [KeyRow.from_record(r) for r in await conn.fetch(self.q["not_under"], kek)]

    async def set_wrapped(self, conn: Conn, key_id: int, kek: str, nonce: bytes,
                          wrapped: bytes) -> None:
        await conn.execute(self.q["set_wrapped"], key_id, kek, nonce, wrapped)

    # -- master keys

    async def masters(self, conn: Conn) -> list[MasterRow]:
        return [MasterRow(r["kek"], r["label"], r["state"], r["created_at"], r["activated_at"],
                          r["retired_at"], r["destroyed_at"])
                for r in await conn.fetch(self.q["masters"])]

    async def adopt_master(self, conn: Conn, kek: str, label: str) -> None:
        await conn.execute(self.q["adopt_master"], kek, label)

    async def add_pending_master(self, conn: Conn, kek: str, label: str) -> None:
        await conn.execute(self.q["pending_master"], kek, label)

    async def activate_master(self, conn: Conn, kek: str) -> None:
        await conn.execute(self.q["retire_masters"], kek)
        await conn.execute(self.q["activate_master"], kek)

    async def unused_retired_masters(self, conn: Conn) -> list[str]:
        return [r["kek"] for r in await conn.fetch(self.q["unused_retired"])]

    async def mark_master_destroyed(self, conn: Conn, kek: str) -> None:
        await conn.execute(self.q["master_destroyed"], kek)

    # -- fleet-wide jobs

    @asynccontextmanager
    async def fleet_lock(self, job: str) -> AsyncIterator[bool]:
        """Try to become the one process of the fleet running `job`; yields whether we are.

        A session advisory lock on a connection of its own (not a pooled one: the pool's
        reset sends no unlock, and a lock must not outlive the job on a reused session).
        Held until the block ends; a crash drops it with the connection.
        """
        try:
            conn = await asyncpg.connect(
                self.dsn, timeout=self._timeout,
                server_settings={"application_name": f"pgseal-{job}"},
            )
        except (*_LOST, asyncpg.PostgresError) as exc:
            raise self.unavailable(exc) from None
        try:
            try:
                got = bool(await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1), 0)",
                                               f"pgseal:{self.schema}:{job}"))
            except (*_LOST, asyncpg.PostgresError) as exc:
                raise self.unavailable(exc) from None
            yield got
        finally:
            # Closing the session releases its advisory locks; no explicit unlock needed.
            try:
                await asyncio.wait_for(conn.close(), 2)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                conn.terminate()

    # -- the change listener

    @asynccontextmanager
    async def listener(
        self, on_message: Callable[[dict[str, Any]], None], on_lost: Callable[[], None],
    ) -> AsyncIterator[asyncpg.Connection[Any]]:
        """A dedicated connection LISTENing on `channel` (the caller watches its health)."""
        conn = await asyncpg.connect(
            self.dsn, timeout=self._timeout,
            server_settings={"application_name": "pgseal-keystore-listener"},
        )

        def deliver(_conn: Any, _pid: int, _channel: str, payload: object) -> None:
            try:
                message = json.loads(str(payload))
            except ValueError:
                message = {}
            on_message(message if isinstance(message, dict) else {})

        def lost(_conn: Any) -> None:
            on_lost()

        try:
            conn.add_termination_listener(lost)
            await conn.add_listener(self.channel, deliver)
            yield conn
        finally:
            conn.remove_termination_listener(lost)
            if not conn.is_closed():
                try:
                    await asyncio.wait_for(conn.close(), 2)
                except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    conn.terminate()

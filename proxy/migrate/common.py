"""What column migrations and rekeys share: the data connection, the catalog, progress,
the job lock and audit records. The async shell around `proxy.migrate.plan`."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TextIO, TypeVar

import asyncpg

from proxy.audit.records import AuditRecord
from proxy.crypto.values import SessionFormat
from proxy.errors import PgsealError
from proxy.keys.keystore import describe_dsn
from proxy.migrate.plan import KeyColumn, TableShape, Throttle, render_progress

_T = TypeVar("_T")

# The session the shell reads and writes values in. Text I/O in exactly these settings
# is what `proxy.crypto.values` reproduces bit for bit (ISO dates, UTC, shortest exact
# floats, hex bytea), so a value read here seals to the very cell the proxy would make.
SESSION = SessionFormat(timezone="UTC", datestyle="ISO, MDY", intervalstyle="postgres",
                        client_encoding="UTF8", bytea_output="hex", extra_float_digits=1)
SERVER_SETTINGS = {
    "application_name": "pgseal-migrate",
    "DateStyle": "ISO, MDY",
    "TimeZone": "UTC",
    "IntervalStyle": "postgres",
    "extra_float_digits": "1",
    "bytea_output": "hex",
    # Our transactions are short by construction; a server default must not cut them.
    "statement_timeout": "0",
    "idle_in_transaction_session_timeout": "0",
    # Locks are taken, then rows read: each statement must see what the lock's last holder
    # committed, whatever the database's default isolation.
    "default_transaction_isolation": "read committed",
}


class MigrationError(PgsealError):
    """A migration or rekey that cannot go on; one line for the operator (exit 1)."""


def pg_message(exc: BaseException) -> str:
    """An asyncpg error as one line: message, then PostgreSQL's detail and hint."""
    text = (str(exc).splitlines() or [type(exc).__name__])[0]
    for extra in ("detail", "hint"):
        more = getattr(exc, extra, None)
        if more:
            text += f" ({' '.join(str(more).split())})"
    return text


def connect_failure(exc: BaseException) -> str:
    """Why connecting failed, one line, for a message next to describe_dsn(dsn). A DSN that
    could not be parsed (asyncpg raises ValueError, ClientConfigurationError or
    OverflowError) is not quoted: asyncpg's text can hold pieces of the password."""
    if isinstance(exc, (ValueError, ArithmeticError)):
        return "the DSN cannot be parsed"
    return pg_message(exc)


async def guarded(what: str, work: Awaitable[_T]) -> _T:
    """Run `work`; a PostgreSQL or connection error becomes a MigrationError naming `what`."""
    try:
        return await work
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise MigrationError(f"{what}: {pg_message(exc)}") from None


async def connect_data(dsn: str) -> asyncpg.Connection[Any]:
    try:
        conn: asyncpg.Connection[Any] = await asyncpg.connect(
            dsn, timeout=10, server_settings=SERVER_SETTINGS, statement_cache_size=64)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError, ValueError,
            ArithmeticError) as exc:
        raise MigrationError(
            f"cannot connect to {describe_dsn(dsn)}: {connect_failure(exc)}") from None
    return conn


async def take_job_lock(conn: asyncpg.Connection[Any], job: str) -> None:
    """One run per job at a time: a session advisory lock on the data database, released
    by PostgreSQL when the session ends (also when the process is SIGKILLed)."""
    got = await conn.fetchval("SELECT pg_try_advisory_lock(hashtext('pgseal:job'), hashtext($1))",
                              job)
    if not got:
        raise MigrationError(f"{job}: another pgseal run holds it (wait for it, or stop it)")


# --- the catalog ------------------------------------------------------------------------

_TABLE_SQL = """
SELECT c.oid, c.relkind::text AS relkind, c.relpages, c.reltuples,
       pg_relation_size(c.oid) / current_setting('block_size')::int AS pages
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relname = $2
"""
_KEY_SQL = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod)
FROM pg_catalog.pg_index i
JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) ON true
JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = $1 AND i.indisprimary
ORDER BY k.ord
"""
_COLUMNS_SQL = """
SELECT a.attname, a.attnum, format_type(a.atttypid, a.atttypmod) AS sql_type, a.attnotnull,
       a.attgenerated <> '' AS generated, a.attidentity <> '' AS identity,
       pg_get_expr(d.adbin, d.adrelid) AS default_expr
FROM pg_catalog.pg_attribute a
LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
"""
# Indexes and constraints that DROP COLUMN takes with it (named in the report).
_DEPENDENTS_SQL = """
SELECT 'index ' || ci.relname AS what
FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_class ci ON ci.oid = d.objid
WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.refobjid = $1 AND d.refobjsubid = $2
  AND ci.relkind = 'i' AND ci.relname <> ALL($3::text[])
UNION
SELECT 'constraint ' || co.conname
FROM pg_catalog.pg_constraint co
WHERE co.conrelid = $1 AND $2 = ANY(co.conkey) AND co.conname <> ALL($3::text[])
ORDER BY 1
"""


@dataclass(frozen=True, slots=True)
class ColumnFacts:
    name: str
    attnum: int
    sql_type: str
    not_null: bool
    generated: bool
    identity: bool
    default: str | None


@dataclass(frozen=True, slots=True)
class TableFacts:
    shape: TableShape
    columns: dict[str, ColumnFacts]
    oid: int
    pages: int  # heap pages now
    rows_per_page: float  # from the last ANALYZE (0 when never analyzed)


async def read_table(conn: asyncpg.Connection[Any], schema: str, table: str) -> TableFacts | None:
    row = await conn.fetchrow(_TABLE_SQL, schema, table)
    if row is None:
        return None
    if row["relkind"] not in ("r", "p"):
        raise MigrationError(f"{schema}.{table} is not a table (relkind {row['relkind']})")
    key = tuple(KeyColumn(r[0], r[1]) for r in await conn.fetch(_KEY_SQL, row["oid"]))
    columns = {
        r["attname"]: ColumnFacts(r["attname"], r["attnum"], r["sql_type"], r["attnotnull"],
                                  r["generated"], r["identity"], r["default_expr"])
        for r in await conn.fetch(_COLUMNS_SQL, row["oid"])
    }
    per_page = (float(row["reltuples"]) / row["relpages"]
                if row["relpages"] > 0 and row["reltuples"] > 0 else 0.0)
    return TableFacts(TableShape(schema, table, key), columns, row["oid"], int(row["pages"]),
                      per_page)


async def dependents(conn: asyncpg.Connection[Any], facts: TableFacts, column: str,
                     ours: list[str]) -> list[str]:
    col = facts.columns[column]
    return [r[0] for r in await conn.fetch(_DEPENDENTS_SQL, facts.oid, col.attnum, ours)]


async def constraint_exists(conn: asyncpg.Connection[Any], oid: int, name: str) -> bool:
    return bool(await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint WHERE conrelid = $1 "
        "AND conname = $2)", oid, name))


async def index_state(conn: asyncpg.Connection[Any], schema: str, name: str) -> bool | None:
    """None: no such index; else whether it is valid (a killed CREATE INDEX CONCURRENTLY
    leaves an invalid one behind)."""
    valid: bool | None = await conn.fetchval(
        "SELECT i.indisvalid FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c "
        "ON c.oid = i.indexrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = $1 AND c.relname = $2", schema, name)
    return valid


# --- audit ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Who:
    """The data connection's identity, for audit records."""

    db_user: str
    database: str
    statement: str  # what the operator ran, e.g. "pgseal migrate encrypt public.t.c"

    @classmethod
    async def of(cls, conn: asyncpg.Connection[Any], statement: str) -> Who:
        row = await conn.fetchrow("SELECT current_user::text, current_database()::text")
        assert row is not None
        return cls(row[0], row[1], statement)

    def record(self, event: str, *, tenant: str, key_id: int, key_version: int | None,
               kek: str | None, table: str, column: str, count: int) -> AuditRecord:
        return AuditRecord(
            event, tenant=tenant, key_id=key_id, key_version=key_version, kek=kek, table=table,
            columns=(column,), count=count, db_user=self.db_user, database=self.database,
            application_name="pgseal-migrate", statement=self.statement,
        )


# --- pacing and progress ---------------------------------------------------------------------


class Pacer:
    """Throttle (rows per second over the whole run) plus the progress display."""

    def __init__(self, label: str, total: int, throttle: Throttle, *, unit: str = "rows",
                 stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.total = total
        self.throttle = throttle
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.bar = _isatty(self.stream)
        self.clock = clock
        self.started = clock()
        self.done = 0
        self._shown = -1.0
        self._width = 0

    @property
    def elapsed(self) -> float:
        return self.clock() - self.started

    async def advance(self, rows: int) -> None:
        """Count `rows` done, show progress, and sleep as long as the rate asks."""
        self.done += rows
        self.show()
        delay = self.throttle.delay(self.done, self.elapsed)
        if delay > 0:
            await asyncio.sleep(delay)

    def show(self, *, final: bool = False) -> None:
        now = self.clock()
        # A terminal line is redrawn ten times a second; a log gets a line every 5 s.
        every = 0.1 if self.bar else 5.0
        if not final and now - self._shown < every:
            return
        self._shown = now
        line = render_progress(self.label, self.done, self.total, now - self.started,
                               bar=self.bar, unit=self.unit)
        if self.bar:
            pad = max(0, self._width - len(line))
            self._width = len(line)
            self.stream.write("\r" + line + " " * pad + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False

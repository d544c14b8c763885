"""Where audit records go: a JSON-lines file, a PostgreSQL table, stdout.

Each sink keeps its own hash chain and continues it from what it finds stored, so a
restart (or a second process writing the same file or table) extends one chain:

- jsonl: every batch is written under an exclusive ``flock``; when the file's size is
  not where this process left it (another writer appended, or this is the first batch)
  the last line is read back for seq and hash. Written with O_APPEND, then fsync:
  ``write`` returns only once the batch is on disk. A failed write is cut back off the
  file so a half line never ends up in the chain.
- postgres: each batch is one transaction holding an advisory lock on the table: read
  the last seq and hash, insert the batch, commit (durable on commit). A batch whose
  COMMIT went unanswered (the connection died) is looked up by the hash it would have
  left before its records are sent again, so they are not written twice.
- stdout: one line per record, flushed; its chain starts afresh in every process (a log
  collector cannot be read back), so it is a copy for log shipping, not the evidence.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import asyncpg

from proxy.audit.records import AuditRecord, ChainHead, chain, chain_text, head_of

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

log = logging.getLogger(__name__)

Batch = Sequence[tuple[AuditRecord, str]]  # (record, ts)



async def _keep_session(conn: asyncpg.Connection[Any]) -> None:
    """Pool reset hook that sends nothing.

    asyncpg's default reset runs RESET ALL, UNLISTEN *, CLOSE ALL and an advisory
    unlock on every release: a second round trip per key lookup. Our pooled sessions
    change no session state (locks are transaction-scoped, LISTEN has its own
    connection), and asyncpg still rolls back an open transaction itself.
    """
    return None

class SinkError(Exception):
    """A sink could not make a batch durable; the message names the sink (one line)."""


class AuditSink(Protocol):
    name: str

    async def open(self) -> ChainHead:
        """Prepare the sink; return where its chain stands (to tell a clean previous stop)."""
        ...

    async def write(self, batch: Batch) -> None:
        """Append the batch to the chain; return only once it is durable, else SinkError."""
        ...

    async def close(self) -> None: ...


# --- jsonl ----------------------------------------------------------------------


def read_last_line(fd: int, end: int) -> str | None:
    """The last complete (newline-terminated) line before offset `end`, or None.

    An unterminated tail is a write cut off by a crash: the chain continues from the line
    before it, and verify reports the damaged line.
    """
    chunk = 65536
    buf = b""
    pos = end
    last_nl: int | None = None  # offset in the file of the newline ending the last line
    while pos > 0:
        start = max(0, pos - chunk)
        buf = os.pread(fd, pos - start, start) + buf
        pos = start
        if last_nl is None:
            i = buf.rfind(b"\n")
            if i < 0:
                continue
            last_nl = pos + i
        j = buf.rfind(b"\n", 0, last_nl - pos)
        if j >= 0:
            return buf[j + 1 : last_nl - pos].decode("utf-8", "replace")
    if last_nl is not None:
        return buf[:last_nl].decode("utf-8", "replace")
    return None


class JsonlSink:
    """Append-only JSON lines file with flock + fsync per batch (see module doc)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = f"jsonl {path}"
        self._fd: int | None = None
        self._ino: int | None = None
        self._end = -1  # where our last write ended; -1: unknown, read the tail
        # Where our own last batch ended (a whole line): only then may a batch chained on
        # the event loop be written as it is (see write()).
        self._written = -1
        self._head = ChainHead()
        # File I/O is blocking: one thread per file keeps batches in order.
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgseal-audit")

    async def _in_thread(self, fn: Callable[[], ChainHead]) -> ChainHead:
        # run_in_executor without its checks that `fn` is no coroutine (a few µs a batch).
        return await asyncio.wrap_future(self._io.submit(fn), loop=asyncio.get_running_loop())

    def _open_fd(self) -> int:
        if self._fd is not None:
            try:
                same = os.stat(self.path).st_ino == self._ino
            except FileNotFoundError:
                same = False
            if same:
                return self._fd
            self._close_fd()  # moved away or deleted: start writing the file at `path` again
        created = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # O_RDWR: the tail is read back through the same descriptor (pread ignores O_APPEND).
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if created:
            # The new directory entry must survive a crash too, not only the file's data.
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self._fd, self._ino, self._end, self._written = fd, os.fstat(fd).st_ino, -1, -1
        return fd

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _sync_head(self, fd: int, size: int) -> ChainHead:
        if size != self._end:
            line = read_last_line(fd, size)
            self._head = (head_of(line) if line else None) or ChainHead()
            self._end = size
        return self._head

    def _open_sync(self) -> ChainHead:
        fd = self._open_fd()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            return self._sync_head(fd, os.fstat(fd).st_size)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    async def open(self) -> ChainHead:
        try:
            return await self._in_thread(self._open_sync)
        except OSError as exc:
            self._close_fd()
            raise SinkError(f"audit sink {self.name} unwritable: {exc.strerror or exc}") from None

    def _write_sync(
        self, batch: Batch, premade: tuple[str, ChainHead] | None, at: int
    ) -> ChainHead:
        fd = self._open_fd()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            size = os.fstat(fd).st_size
            prefix = ""
            if premade is not None and size == at and size == self._written:
                text, new_head = premade  # the file is where our last batch left it
            else:
                head = self._sync_head(fd, size)
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    prefix = "\n"  # a cut-off line: start ours on a line of its own
                text, new_head = chain_text(batch, head)
            data = (prefix + text).encode()
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError:
                # Cut our partial batch back off so the chain on disk stays whole.
                try:
                    os.ftruncate(fd, size)
                except OSError:
                    pass
                self._end = self._written = -1
                raise
            self._end = self._written = size + len(data)
            self._head = new_head
            return new_head
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    async def write(self, batch: Batch) -> None:
        # Chained here, on the event loop, from where this process's last batch left the
        # file: the writer thread then only writes and fsyncs, and barely needs the GIL
        # (a thread hashing while the loop runs makes both wait for it). When another
        # writer appended meanwhile, the thread chains again from what it reads back.
        at = self._written
        premade = chain_text(batch, self._head) if at >= 0 else None
        try:
            await self._in_thread(lambda: self._write_sync(batch, premade, at))
        except OSError as exc:
            self._close_fd_safely()
            reason = exc.strerror or str(exc)
            if exc.errno == errno.ENOSPC:
                reason = "no space left on device"
            raise SinkError(f"audit sink {self.name} unwritable: {reason}") from None

    def _close_fd_safely(self) -> None:
        # Reopen on the next write (recovery without restart once the fault clears).
        def close() -> None:
            self._close_fd()

        self._io.submit(close)

    async def close(self) -> None:
        def close() -> None:
            self._close_fd()

        await asyncio.get_running_loop().run_in_executor(self._io, close)
        self._io.shutdown(wait=False)


# --- stdout -------------------------------------------------------------------------


class StdoutSink:
    name = "stdout"

    def __init__(self) -> None:
        self._head = ChainHead()

    async def open(self) -> ChainHead:
        return self._head

    async def write(self, batch: Batch) -> None:
        text, head = chain_text(batch, self._head)
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except (OSError, ValueError) as exc:
            raise SinkError(f"audit sink stdout unwritable: {exc}") from None
        self._head = head

    async def close(self) -> None:
        return None


# --- postgres -------------------------------------------------------------------------


def quote_table(table: str) -> str:
    """'schema.table' or 'table' -> quoted identifiers; anything else is refused."""
    parts = table.split(".")
    if not 1 <= len(parts) <= 2 or not all(
        p and (p[0].isalpha() or p[0] == "_") and p.replace("_", "").isalnum() for p in parts
    ):
        raise ValueError(f"audit postgres table: schema.table of plain identifiers, got {table!r}")
    return ".".join(f'"{p}"' for p in parts)


class PostgresSink:
    """Audit rows in a PostgreSQL table (created if missing) on the keystore's database."""

    def __init__(self, dsn: str, table: str, *, connect_timeout: float = 5.0) -> None:
        self.dsn = dsn
        self.table = table
        self.qtable = quote_table(table)
        self.name = f"postgres {table}"
        self._timeout = connect_timeout
        self._pool: asyncpg.Pool | None = None
        self._ready = False
        # A COMMIT whose answer is lost may still have happened. `_unsure`: the last batch
        # sent without learning that it committed (the head it would leave, its records);
        # the next write looks that head up. `_written`: records found committed that way,
        # by identity (the trail sends the same objects again): never written twice, and
        # forgotten once a write succeeds (the trail then sends none of them again).
        self._unsure: tuple[ChainHead, list[AuditRecord]] | None = None
        self._written: dict[int, AuditRecord] = {}

    async def _conn_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            # min_size 0: connections are made on demand, so a database that is down at start
            # (or restarts) is reached again on the next batch without a restart.
            self._pool = await asyncpg.create_pool(
                self.dsn, min_size=0, max_size=2, timeout=self._timeout,
                server_settings={"application_name": "pgseal-audit"},
                reset=_keep_session,
            )
        return self._pool

    async def _ensure_table(self, conn: PoolConnectionProxy[Any]) -> None:
        if self._ready:
            return
        schema = self.qtable.split(".")[0] if "." in self.qtable else None
        async with conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1), 1)", f"pgseal-audit:{self.table}"
            )
            if schema:
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
            await conn.execute(
                f"""CREATE TABLE IF NOT EXISTS {self.qtable} (
                    seq bigint PRIMARY KEY,
                    ts timestamptz NOT NULL,
                    event text NOT NULL,
                    tenant text,
                    key_id bigint,
                    hash text NOT NULL,
                    record text NOT NULL  -- the canonical JSON line; verify reads this
                )"""
            )
        self._ready = True

    async def _run(self, batch: Batch | None) -> ChainHead:
        pool = await self._conn_pool()
        async with pool.acquire() as conn:
            await self._ensure_table(conn)
            # READ COMMITTED whatever the database's default: each statement must see what
            # a writer that held the lock before us committed (its chain head; the batch
            # _settle_unsure looks for). Under REPEATABLE READ the snapshot would be taken
            # before the lock is granted.
            async with conn.transaction(isolation="read_committed"):
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext($1), 2)", f"pgseal-audit:{self.table}"
                )
                if batch is not None:
                    await self._settle_unsure(conn)
                    batch = [(rec, ts) for rec, ts in batch if id(rec) not in self._written]
                row = await conn.fetchrow(
                    # qtable: identifiers checked and quoted by quote_table
                    f"SELECT seq, hash, event FROM {self.qtable} ORDER BY seq DESC LIMIT 1"  # noqa: S608
                )
                head = ChainHead(row["seq"], row["hash"], row["event"]) if row else ChainHead()
                if batch:
                    sealed, head = chain(batch, head)
                    # Until this transaction is known to have committed, or not.
                    self._unsure = (head, [rec for rec, _ in batch])
                    await conn.executemany(
                        f"INSERT INTO {self.qtable} (seq, ts, event, tenant, key_id, hash, record) "  # noqa: S608
                        "VALUES ($1, $2::text::timestamptz, $3, $4, $5, $6, $7)",
                        [
                            (s.seq, ts, rec.event, rec.tenant, rec.key_id, s.hash, s.line)
                            for (rec, ts), s in zip(batch, sealed, strict=True)
                        ],
                    )
            if batch is not None:  # committed, and the trail learns it: it sends none again
                self._unsure = None
                self._written.clear()
            return head

    async def _settle_unsure(self, conn: PoolConnectionProxy[Any]) -> None:
        """Did the batch whose COMMIT went unanswered commit? Its last record is in the table,
        with the hash that batch gave it, or not at all. (Under the table's advisory lock,
        which that transaction held until it ended: the answer is final.)"""
        if self._unsure is None:
            return
        head, records = self._unsure
        committed = await conn.fetchval(
            f"SELECT 1 FROM {self.qtable} WHERE seq = $1 AND hash = $2",  # noqa: S608
            head.seq,
            head.hash,
        )
        self._unsure = None
        if committed:
            log.warning(
                "audit sink %s: a batch whose COMMIT went unanswered was written; "
                "its %d records are not written again", self.name, len(records),
            )
            self._written.update((id(rec), rec) for rec in records)

    async def _guarded(self, batch: Batch | None) -> ChainHead:
        for attempt in (1, 2):
            try:
                return await self._run(batch)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                lost = isinstance(exc, asyncpg.ConnectionDoesNotExistError | ConnectionError)
                if lost and attempt == 1:
                    continue  # a pooled connection died (server restart): one fresh try
                self._ready = False
                raise SinkError(f"audit sink {self.name} unwritable: {_pg_reason(exc)}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def open(self) -> ChainHead:
        return await self._guarded(None)

    async def write(self, batch: Batch) -> None:
        await self._guarded(batch)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()


def _pg_reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "connection timed out"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text

"""The audit trail the key service and the data path write to (DESIGN.md 9).

``await trail.record(rec, ...)`` returns once the records are durable in every sink.
Records that arrive while a batch is being written wait and go together in the next
batch: one write and one fsync (or one transaction) for all of them, so many concurrent
statements share the cost of durability instead of each paying it (group commit).

With ``on_failure: block`` a batch that some sink could not make durable fails every
``record`` call waiting on it with KeyServiceUnavailable (SQLSTATE 58030): the key use it
describes must fail too. With ``warn`` the failure is logged and the callers go on.
A sink that failed is tried again with the next batch, so the trail recovers by itself
once the disk or database is back.

Records of things that already happened (``record(..., kept=True)``: the data path's key
uses, written after the fact) are never dropped when a sink fails: that sink keeps them
(up to MAX_BACKLOG) and writes them, in order and before anything newer, once it works
again; ``retry()`` tries that without new records. Only the sink that failed keeps them,
so a sink that wrote a batch never gets it twice. Other records describe something the
caller refuses to do when it cannot record it, and are not retried. A sink holding a
backlog is not handed every batch (each attempt re-chains the whole backlog): it is tried
again after RETRY_FIRST seconds, then after twice as long each time it still fails (up to
RETRY_MAX); batches in between fail at once for it and add their kept records.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence

from proxy.audit.records import AuditRecord, ChainHead
from proxy.audit.sinks import AuditSink, JsonlSink, PostgresSink, SinkError, StdoutSink
from proxy.config import Config
from proxy.errors import KeyServiceUnavailable

log = logging.getLogger("pgseal.audit")

Clock = Callable[[], dt.datetime]

# Records a failed sink keeps for when it is back (see module doc), at most.
MAX_BACKLOG = 100_000
# Seconds before a sink with a backlog is tried again: doubling from the first to the max.
RETRY_FIRST = 0.5
RETRY_MAX = 4.0


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def format_ts(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def sinks_from_config(config: Config) -> list[AuditSink]:
    sinks: list[AuditSink] = []
    for sink in config.audit.sinks:
        if sink.kind == "jsonl":
            assert sink.path is not None
            sinks.append(JsonlSink(config.path(sink.path)))
        elif sink.kind == "postgres":
            sinks.append(PostgresSink(config.keystore.dsn, sink.table or "pgseal.audit"))
        else:
            sinks.append(StdoutSink())
    return sinks


class AuditTrail:
    """Batched, hash-chained audit records to every configured sink."""

    def __init__(
        self, sinks: Sequence[AuditSink], *, on_failure: str = "block", clock: Clock = _utc_now
    ) -> None:
        if on_failure not in ("block", "warn"):
            raise ValueError("on_failure: block or warn")
        self.sinks = list(sinks)
        self.on_failure = on_failure
        self._clock = clock
        self._queue: list[tuple[Sequence[AuditRecord], str, asyncio.Future[None], bool]] = []
        # Per sink: kept records it failed to write, oldest first (see module doc).
        self._backlog: list[list[tuple[AuditRecord, str]]] = [[] for _ in self.sinks]
        # Per sink with a backlog: (when it may be tried again, the wait after that, why it
        # failed last).
        self._down: list[tuple[float, float, str] | None] = [None for _ in self.sinks]
        self.dropped = 0  # kept records given up on (a backlog over MAX_BACKLOG)
        self._writer: asyncio.Task[None] | None = None
        self._started = False
        self._start_owed = False
        self._closed = False
        # Names this writer in audit.start/audit.stop (several processes may share a sink).
        self.writer_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.batches = 0  # for tests and benchmarks: how many group commits happened

    @classmethod
    def from_config(cls, config: Config, *, clock: Clock = _utc_now) -> AuditTrail:
        return cls(sinks_from_config(config), on_failure=config.audit.on_failure, clock=clock)

    async def start(self) -> None:
        """Open every sink and write audit.start (noting an unclean previous stop)."""
        if self._started:
            return
        heads: list[tuple[AuditSink, ChainHead]] = []
        failures: list[str] = []
        for sink in self.sinks:
            try:
                heads.append((sink, await sink.open()))
            except SinkError as exc:
                failures.append(str(exc))
        if failures and self.on_failure == "block":
            # A caller that carries on anyway (KeyService lazy start) gets audit.start
            # written in front of its first record once the sinks are back.
            self._start_owed = True
            raise KeyServiceUnavailable(failures[0])
        for text in failures:
            log.warning("%s", text)
        unclean = [
            f"{sink.name} ended at seq {head.seq} with {head.event}"
            for sink, head in heads
            if head.seq and head.event != "audit.stop"
        ]
        self._started = True
        await self.record(
            AuditRecord(
                "audit.start",
                session=self.writer_id,
                error=(
                    "previous writer did not stop cleanly (crash, a writer still running, "
                    f"or truncation): {'; '.join(unclean)}"
                    if unclean else None
                ),
            )
        )

    async def record(self, *records: AuditRecord, kept: bool = False) -> None:
        """Make `records` durable in every sink, in order; raises KeyServiceUnavailable (block).

        `kept`: they describe what already happened; a sink that fails keeps them for later
        (see module doc)."""
        if not records:
            return
        await self._enqueue(records, kept)

    async def retry(self) -> None:
        """Write what failed sinks kept (those whose wait is over); raises
        KeyServiceUnavailable (block) while one of them still fails."""
        if any(self._backlog):
            await self._enqueue((), False)

    @property
    def backlog(self) -> int:
        """Kept records waiting for a sink to come back (the largest backlog)."""
        return max((len(b) for b in self._backlog), default=0)

    async def _enqueue(self, records: Sequence[AuditRecord], kept: bool) -> None:
        if self._closed:
            raise KeyServiceUnavailable("audit trail is closed")
        if self._start_owed:
            self._start_owed, self._started = False, True
            records = (AuditRecord("audit.start", session=self.writer_id,
                                   error="audit sinks were unavailable at start"), *records)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        # Retrieve the outcome even when the waiter was cancelled, so an abandoned failure
        # is not reported again as "exception never retrieved".
        done.add_done_callback(lambda f: None if f.cancelled() else f.exception())
        self._queue.append((records, format_ts(self._clock()), done, kept))
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._drain(), name="pgseal-audit-writer")
        # shield: a caller that gives up still gets its record written (and the next
        # batch is not held up by a cancelled waiter).
        await asyncio.shield(done)

    async def _drain(self) -> None:
        while self._queue:
            taken, self._queue = self._queue, []
            batch = [(rec, ts) for recs, ts, _, _ in taken for rec in recs]
            # The data path's batches are kept whole: one list for both (neither is changed).
            kept = batch if all(keep for _, _, _, keep in taken) else [
                (rec, ts) for recs, ts, _, keep in taken if keep for rec in recs
            ]
            results = await asyncio.gather(
                *(self._write_sink(i, batch, kept) for i in range(len(self.sinks))),
                return_exceptions=True,
            )
            self.batches += 1
            errors = [r for r in results if isinstance(r, BaseException)]
            for err in errors:
                if not isinstance(err, SinkError):  # a bug, not an outage: still fail closed
                    log.error("audit sink failed unexpectedly", exc_info=err)
            failure: BaseException | None = None
            if errors:
                first = errors[0]
                message = str(first) if isinstance(first, SinkError) else (
                    f"audit sink failed: {type(first).__name__}"
                )
                if self.on_failure == "block":
                    failure = KeyServiceUnavailable(message)
                else:
                    log.warning(
                        "%s (audit.on_failure: warn; %d records of key uses kept for it, "
                        "%d others lost there)", message, len(kept), len(batch) - len(kept),
                    )
            for _, _, fut, _ in taken:
                if fut.done():
                    continue
                if failure is not None:
                    fut.set_exception(failure)
                else:
                    fut.set_result(None)

    async def _write_sink(
        self, index: int, batch: list[tuple[AuditRecord, str]], kept: list[tuple[AuditRecord, str]]
    ) -> None:
        """Write what sink `index` kept, then `batch`; on failure it keeps `kept` too."""
        sink, backlog, down = self.sinks[index], self._backlog[index], self._down[index]
        writing = backlog + batch if backlog else batch
        if not writing:
            return
        now = time.monotonic()
        if backlog and down is not None and now < down[0]:
            self._keep(index, kept)  # not tried yet: see the module doc
            raise SinkError(down[2])
        try:
            await sink.write(writing)
        except BaseException as exc:
            wait = RETRY_FIRST if down is None else min(down[1] * 2, RETRY_MAX)
            self._down[index] = (now + wait, wait, str(exc) or type(exc).__name__)
            self._keep(index, kept)
            raise
        if backlog:
            log.warning("audit sink %s is back: %d kept records written", sink.name, len(backlog))
        self._backlog[index] = []
        self._down[index] = None

    def _keep(self, index: int, kept: list[tuple[AuditRecord, str]]) -> None:
        """Add `kept` to what sink `index` holds for later, up to MAX_BACKLOG."""
        backlog = self._backlog[index] + kept
        if len(backlog) > MAX_BACKLOG:
            # The newest go: with on_failure block the oldest are the key uses made
            # before the failure was known, the newer ones the refusals since.
            over = len(backlog) - MAX_BACKLOG
            self.dropped += over
            log.error(
                "audit sink %s is down with %d records waiting: the newest %d are dropped",
                self.sinks[index].name, len(backlog), over,
            )
            backlog = backlog[:MAX_BACKLOG]
        self._backlog[index] = backlog

    async def close(self) -> None:
        """Write audit.stop (the clean-shutdown marker verify looks for), then close sinks."""
        if self._closed:
            return
        try:
            if self._started:
                await self.record(AuditRecord("audit.stop", session=self.writer_id))
        except KeyServiceUnavailable as exc:
            log.warning("could not write audit.stop: %s", exc)
        finally:
            self._closed = True
            if self._writer is not None:
                await asyncio.gather(self._writer, return_exceptions=True)
            for sink, backlog in zip(self.sinks, self._backlog, strict=True):
                if backlog:
                    log.error(
                        "audit sink %s still down at shutdown: %d records of key uses could "
                        "not be written to it", sink.name, len(backlog),
                    )
                await sink.close()

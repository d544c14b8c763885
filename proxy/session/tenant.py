"""The session tenant (`pgseal.tenant`) as PostgreSQL itself would see it. Pure.

PostgreSQL applies SET at execution and undoes it on rollback; the proxy must
know the tenant when it seals a statement, which may be before PostgreSQL runs
an earlier SET in the same pipeline. So the tracker applies settings
optimistically as statements are sent and corrects itself from what the
server answers:

* SET v            -> the value from now on (undone if its transaction rolls back)
* SET LOCAL v      -> only until the end of the transaction block (ignored outside one,
                      as PostgreSQL does)
* RESET / SET TO DEFAULT / RESET ALL / DISCARD ALL -> the value at connection start
                      (from the startup `options`), which is PostgreSQL's reset value
* BEGIN / COMMIT / ROLLBACK track the block; COMMIT answered "ROLLBACK" (an aborted
  block) undoes like ROLLBACK
* an ErrorResponse outside a block undoes everything since the last ReadyForQuery
  (the implicit transaction of that Sync or Query was rolled back). When the
  client had already pipelined further segments past the failed one, the
  tracker cannot tell which SETs PostgreSQL kept: the tenant becomes
  `uncertain` and protected statements are refused until the next SET/RESET
  of pgseal.tenant (fail closed rather than guess a tenant).
* ReadyForQuery of the last segment in flight is the truth about being in a block.

Not tracked: SAVEPOINT / ROLLBACK TO (a SET after a savepoint survives a
ROLLBACK TO here). Documented in the README.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(slots=True)
class _State:
    committed: str | None
    local: str | None
    in_block: bool
    block_start: str | None


# What `snapshot` returns and `restore` takes; opaque to callers.
TrackerSnapshot = tuple[_State, _State, bool]


class TenantTracker:
    def __init__(self, startup_value: str | None) -> None:
        self.startup_value = startup_value
        self._s = _State(startup_value, None, False, startup_value)
        self._segment = _State(startup_value, None, False, startup_value)
        self.uncertain = False

    @property
    def current(self) -> str | None:
        s = self._s
        return s.local if s.local is not None else s.committed

    @property
    def in_block(self) -> bool:
        return self._s.in_block

    def snapshot(self) -> TrackerSnapshot:
        """The whole state, for `restore` when a statement is not sent after all."""
        return (replace(self._s), replace(self._segment), self.uncertain)

    def restore(self, saved: TrackerSnapshot) -> None:
        self._s, self._segment, self.uncertain = replace(saved[0]), replace(saved[1]), saved[2]

    # -- as statements are sent --------------------------------------------------

    def set(self, value: str | None, *, local: bool = False) -> None:
        """SET [LOCAL] pgseal.tenant = value; value None means RESET / TO DEFAULT."""
        s = self._s
        self.uncertain = False
        target = self.startup_value if value is None else value
        if local:
            if s.in_block:
                s.local = target
            return
        s.committed = target
        s.local = None if value is None and s.local is not None else s.local

    def reset_all(self) -> None:
        self.uncertain = False
        s = self._s
        s.committed = self.startup_value
        s.local = None

    def begin(self) -> None:
        s = self._s
        if not s.in_block:
            s.in_block = True
            s.block_start = s.committed

    def commit(self) -> None:
        s = self._s
        s.in_block = False
        s.local = None

    def rollback(self) -> None:
        s = self._s
        if s.in_block:
            s.committed = s.block_start
        s.in_block = False
        s.local = None

    # -- as the server answers ---------------------------------------------------------

    def error(self, *, later_segments_sent: bool) -> None:
        """An ErrorResponse: outside a block the implicit transaction is undone."""
        if self._s.in_block:
            return
        if later_segments_sent:
            if self.current != self._segment_value():
                self.uncertain = True
            return
        seg = self._segment
        self._s = _State(seg.committed, seg.local, seg.in_block, seg.block_start)

    def _segment_value(self) -> str | None:
        seg = self._segment
        return seg.local if seg.local is not None else seg.committed

    def ready(self, status: str, *, last: bool) -> None:
        """ReadyForQuery: 'I' idle, 'T' in a block, 'E' in a failed block.

        Only the answer to the last segment in flight describes the state the
        tracker holds; earlier ones are ignored."""
        if not last:
            return
        s = self._s
        if status == "I":
            if s.in_block:  # the block ended in a way we did not see (e.g. an error in COMMIT)
                s.in_block = False
            s.local = None
        else:
            if not s.in_block:
                s.in_block = True
                s.block_start = s.committed
        self._segment = _State(s.committed, s.local, s.in_block, s.block_start)

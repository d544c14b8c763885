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
* SAVEPOINT s / ROLLBACK TO s / RELEASE s inside a block: ROLLBACK TO undoes every SET
  (LOCAL or not) since the savepoint, as PostgreSQL does, and keeps the savepoint;
  RELEASE keeps the values and drops the savepoint and those after it. A savepoint
  statement the caller cannot read makes the value `uncertain` (see `unknown_savepoint`).
* ReadyForQuery of the last segment in flight is the truth about being in a block.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(slots=True)
class _State:
    committed: str | None
    local: str | None
    in_block: bool
    block_start: str | None
    # The block's savepoints, oldest first: (name, committed, local) when it was set.
    savepoints: tuple[tuple[str, str | None, str | None], ...] = ()


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
            s.savepoints = ()

    def commit(self) -> None:
        s = self._s
        s.in_block = False
        s.local = None
        s.savepoints = ()

    def rollback(self) -> None:
        s = self._s
        if s.in_block:
            s.committed = s.block_start
        s.in_block = False
        s.local = None
        s.savepoints = ()

    def savepoint(self, name: str) -> None:
        """SAVEPOINT name (outside a block PostgreSQL refuses it: nothing changes)."""
        s = self._s
        if s.in_block:
            s.savepoints = (*s.savepoints, (name, s.committed, s.local))

    def rollback_to(self, name: str) -> None:
        """ROLLBACK TO SAVEPOINT name: the values as they were when it was set; it stays,
        the later ones go. An unknown name is an error in PostgreSQL (nothing changes)."""
        s = self._s
        for i in range(len(s.savepoints) - 1, -1, -1):
            saved_name, committed, local = s.savepoints[i]
            if saved_name == name:
                s.committed, s.local = committed, local
                s.savepoints = s.savepoints[: i + 1]
                return

    def release(self, name: str) -> None:
        """RELEASE SAVEPOINT name: the values stay; it and every later one go."""
        s = self._s
        for i in range(len(s.savepoints) - 1, -1, -1):
            if s.savepoints[i][0] == name:
                s.savepoints = s.savepoints[:i]
                return

    def unknown_savepoint(self) -> None:
        """A savepoint statement whose name could not be read: whether it undid a SET is
        unknown, so protected statements are refused until the next SET (fail closed)."""
        if self._s.in_block:
            self.uncertain = True

    # -- as the server answers ---------------------------------------------------------

    def error(self, *, later_segments_sent: bool) -> None:
        """An ErrorResponse: outside a block the implicit transaction is undone."""
        if self._s.in_block:
            return
        if later_segments_sent:
            if self.current != self._segment_value():
                self.uncertain = True
            return
        self._s = replace(self._segment)

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
            s.savepoints = ()
        else:
            if not s.in_block:
                s.in_block = True
                s.block_start = s.committed
                s.savepoints = ()
        self._segment = replace(s)

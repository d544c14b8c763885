"""The session tenant (`pgseal.tenant`) as PostgreSQL itself would see it. Pure.

PostgreSQL applies SET at execution and undoes it on rollback; the proxy must
know the tenant when it seals a statement, which may be before PostgreSQL runs
an earlier SET in the same pipeline. So the tracker applies settings
optimistically as statements are sent and corrects itself from what the
server answers:

A segment is a Query, or the messages up to a Sync. Outside an explicit block
PostgreSQL runs a segment as one transaction, and the tracker follows it:

* SET v            -> the value from now on (undone if its transaction rolls back); it
                      also replaces a SET LOCAL for the rest of the block
* SET LOCAL v      -> until the block ends, or outside one until the segment ends
* RESET / SET TO DEFAULT / RESET ALL / DISCARD ALL -> the value at connection start
                      (from the startup `options`), which is PostgreSQL's reset value;
                      DISCARD ALL also commits at once (as a COMMIT would)
* BEGIN makes the segment's transaction (the statements before it included) the block;
  COMMIT / ROLLBACK [AND CHAIN] end it (and start the next); outside a block ROLLBACK
  undoes the segment so far and COMMIT is where a later ROLLBACK in it goes back to
* SAVEPOINT s / ROLLBACK TO s / RELEASE s: ROLLBACK TO undoes every SET (LOCAL or not)
  since the savepoint and keeps it; RELEASE keeps the values and drops it and the later
  ones. Names as PostgreSQL resolves them (folded, cut at 63 bytes).
* a failed block (ReadyForQuery 'E') runs only ROLLBACK [TO]; its COMMIT is a ROLLBACK
* an ErrorResponse: PostgreSQL skipped the rest of the segment. The outcome is exact in
  one case (one segment in flight, outside a block, no transaction statement in it: all
  of it is undone); otherwise, if anything sent since the last answer could have changed
  the value, it becomes `uncertain` (and what a ROLLBACK (TO) goes back to as well, when
  a transaction statement was among them). More may be sent before the failed segment
  is answered: then the ends the tracker queued for it and for the segments behind it
  (taken as if it had worked) are no base for the next error; and when a transaction
  statement was in doubt, whether PostgreSQL is in a block is not known, so whatever is
  sent before the last segment in flight is answered leaves the value uncertain (a SET
  included).
* ReadyForQuery of the last segment in flight is the truth about being in a block.
* What was sent behind a segment in flight took it as if it worked. `error` returns
  whether the segments sent behind the failed one may run under another value than
  taken for them (the data path then judges their results as under an uncertain one);
  `in_flight_may_change` whether a statement sent now may (the data path then holds a
  statement that seals values until the answers are in).

`uncertain`: protected statements are refused until the next SET / RESET of
pgseal.tenant, RESET ALL or DISCARD ALL (fail closed rather than guess a tenant);
a SET LOCAL does not end it. tests/integration/test_tenant_tracking_differential.py
compares the tracker with PostgreSQL over random sequences of all of the above.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

_Value = tuple[str | None, str | None, bool, tuple[tuple[str, str | None, str | None, bool], ...]]


@dataclass(slots=True)
class _State:
    committed: str | None
    local: str | None
    in_block: bool
    block_start: str | None
    # The block's savepoints, oldest first: (name, committed, local, uncertain) when set.
    savepoints: tuple[tuple[str, str | None, str | None, bool], ...] = ()
    failed: bool = False  # the block has failed: only ROLLBACK (TO) is run
    block_uncertain: bool = False  # the value was uncertain when the block began

    def __init__(
        self,
        committed: str | None,
        local: str | None,
        in_block: bool,
        block_start: str | None,
        savepoints: tuple[tuple[str, str | None, str | None, bool], ...] = (),
        failed: bool = False,
        block_uncertain: bool = False,
    ) -> None:
        # Written out: see proxy.session.datapath._Pending.__init__.
        self.committed = committed
        self.local = local
        self.in_block = in_block
        self.block_start = block_start
        self.savepoints = savepoints
        self.failed = failed
        self.block_uncertain = block_uncertain

    def value(self) -> _Value:
        """What decides the value now and after the block: compared to see whether
        statements changed it."""
        return (self.committed, self.local, self.in_block, self.savepoints)

    def copy(self) -> _State:
        # dataclasses.replace() introspects the fields on every call; this runs for
        # every tracker at every ReadyForQuery.
        return _State(
            self.committed,
            self.local,
            self.in_block,
            self.block_start,
            self.savepoints,
            self.failed,
            self.block_uncertain,
        )


# What `snapshot` returns and `restore` takes; opaque to callers.
TrackerSnapshot = tuple[_State, _State, bool, tuple[bool, bool, bool]]


class TenantTracker:
    def __init__(self, startup_value: str | None) -> None:
        self.startup_value = startup_value
        self._s = _State(startup_value, None, False, startup_value)
        self._segment = _State(startup_value, None, False, startup_value)
        self.uncertain = False
        # Since the last ReadyForQuery of the last segment in flight (when _segment was
        # taken): a transaction or savepoint statement was sent, and how many segments
        # have been answered. Either makes "undo to _segment" after an error a guess.
        self._control_sent = False
        self._answered_since = 0
        self._segment_uncertain = False
        self._chain_sent = False
        # A COMMIT / ROLLBACK / savepoint statement among them (a BEGIN alone is not one:
        # what a ROLLBACK of its block goes back to is the segment's start either way).
        self._ends_sent = False
        # The state as each segment in flight will have left it, oldest first (see
        # segment_end), and that of the last one answered since _segment was taken: an
        # error after answered segments is judged against what they left, not _segment.
        # None: not known (the value was uncertain, or an error undid what it assumed).
        # Paired with whether a transaction or savepoint statement had been sent
        # (_control_sent) when that segment ended: one sent behind a failed segment does
        # not change what the failure did to the segments between (error's verdict).
        self._segment_ends: deque[tuple[_Value | None, bool]] = deque()
        self._answered: _Value | None = None
        # An error that was not exact, with a transaction statement among what was sent:
        # whether PostgreSQL is in a block (failed or not), and with which savepoints, is
        # not known until the ReadyForQuery of the last segment in flight says so. A
        # statement sent meanwhile is read against a block state that may be wrong (an
        # AND CHAIN skipped: a SET LOCAL taken as lasting, a ROLLBACK as undoing a block),
        # so until then each one sent leaves the value, and what a ROLLBACK (TO) goes back
        # to, uncertain. Done as they are sent rather than at the error, so that a client
        # that waits for the answer (psql: BEGIN; ...; <error>, then ROLLBACK) keeps a
        # certain rollback.
        self._block_unknown = False

    @property
    def current(self) -> str | None:
        s = self._s
        return s.local if s.local is not None else s.committed

    def snapshot(self) -> TrackerSnapshot:
        """The whole state, for `restore` when a statement is not sent after all (what
        was sent since the last answer included: a statement not sent is not in doubt)."""
        sent = (self._control_sent, self._ends_sent, self._chain_sent)
        return (self._s.copy(), self._segment.copy(), self.uncertain, sent)

    def restore(self, saved: TrackerSnapshot) -> None:
        self._s, self._segment, self.uncertain = saved[0].copy(), saved[1].copy(), saved[2]
        self._control_sent, self._ends_sent, self._chain_sent = saved[3]

    # -- as statements are sent --------------------------------------------------

    def segment_start(self) -> None:
        """A Query, or the first Execute since a Sync. Outside a block PostgreSQL runs it
        as one transaction: a ROLLBACK in it goes back to here, a BEGIN in it makes all of
        it the block, and a SET LOCAL in it lasts until it ends (here, for the next one)."""
        if self._block_unknown:
            self._doubt_everything()
        s = self._s
        if not s.in_block:
            s.local = None
            s.block_start = s.committed
            s.block_uncertain = self.uncertain
            s.savepoints = ()

    def segment_end(self) -> None:
        """A Query, Sync or FunctionCall was sent: PostgreSQL answers it with a
        ReadyForQuery, and the state the tracker holds now is what it leaves if it works.
        While the value is uncertain that is not known: an error judged against it must
        not find "no change" in a SET of the guessed value (None counts as a change)."""
        if self.uncertain or self._block_unknown:
            self._segment_ends.append((None, self._control_sent))
            return
        s = self._s  # State.value(), inline: this runs for every tracker at every Sync
        end = (s.committed, s.local, s.in_block, s.savepoints)
        self._segment_ends.append((end, self._control_sent))

    def segment_skipped(self) -> None:
        """The oldest Query, Sync or FunctionCall in flight will get no ReadyForQuery after
        all: PostgreSQL skipped it (a Query or FunctionCall sent behind an Execute whose
        error makes it skip to the Sync) or ignored it (a Sync inside COPY FROM STDIN). Its
        segment goes on to the next one: its queued end is dropped, so that each answer
        keeps pairing with its own (one left behind would be taken as what a later segment
        left, and an error judged against it)."""
        if self._segment_ends:
            self._segment_ends.popleft()

    def set(self, value: str | None, *, local: bool = False) -> None:
        """SET [LOCAL] pgseal.tenant = value; value None means RESET / TO DEFAULT."""
        if self._block_unknown:
            self._doubt_everything()
        s = self._s
        if s.failed:
            return  # refused by PostgreSQL in a failed block
        target = self.startup_value if value is None else value
        if local:
            # In a block, or in the transaction of this segment. It says nothing about the
            # value after it ends: an uncertain one stays so (fail closed).
            s.local = target
            return
        self.uncertain = self._block_unknown
        s.committed = target
        s.local = None  # a plain SET also replaces a SET LOCAL for the rest of the block

    def reset_all(self) -> None:
        if self._block_unknown:
            self._doubt_everything()
        s = self._s
        if s.failed:
            return  # refused by PostgreSQL in a failed block
        # After a SET LOCAL in the same block, PostgreSQL's RESET ALL does not always win
        # over the value from before the block: do not guess. (RESET ALL skips a value
        # that SET LOCAL ... TO DEFAULT left at its reset value, so the SET LOCAL is still
        # undone at the end of the block.) The value is the reset one until then; the SET
        # LOCAL is kept in force so that a second RESET ALL is not taken as settling it.
        local = s.local is not None
        self.uncertain = local or self._block_unknown
        s.committed = self.startup_value
        s.local = self.startup_value if local else None

    def discard_all(self) -> None:
        """DISCARD ALL: RESET ALL (and RESET ROLE). PostgreSQL runs it only outside a block
        and first in its transaction (else it fails: the error decides), and commits at
        once: a ROLLBACK later in the same segment goes back to what it left, not to the
        segment's start (Execute DISCARD ALL, BEGIN, SET, ROLLBACK, then Sync), and an
        error later in it undoes no more than that: it counts as a COMMIT."""
        self.reset_all()
        s = self._s
        if s.failed or s.in_block:
            return  # refused by PostgreSQL
        self._control_sent = self._ends_sent = True
        s.block_start, s.block_uncertain = s.committed, self.uncertain

    def begin(self) -> None:
        """BEGIN / START TRANSACTION: the transaction of this segment becomes the block,
        the statements before it included (block_start: from segment_start or COMMIT)."""
        if self._block_unknown:
            self._doubt_everything()
        self._control_sent = True
        s = self._s
        if not s.in_block:
            s.in_block = True
            s.savepoints = ()
            s.failed = False

    def commit(self, *, chain: bool = False) -> None:
        """COMMIT / END [AND CHAIN]. A failed block's COMMIT is a ROLLBACK (PostgreSQL
        answers it with ROLLBACK)."""
        if self._block_unknown:
            self._doubt_everything()
        if self._s.failed:
            self.rollback(chain=chain)
            return
        self._control_sent = self._ends_sent = True
        s = self._s
        s.in_block = False
        s.local = None
        s.savepoints = ()
        # What a later ROLLBACK in the same segment goes back to.
        s.block_start, s.block_uncertain = s.committed, self.uncertain
        if chain:
            self._chain_sent = True
            self.begin()

    def rollback(self, *, chain: bool = False) -> None:
        """ROLLBACK / ABORT [AND CHAIN]."""
        if self._block_unknown:
            self._doubt_everything()
        self._control_sent = self._ends_sent = True
        s = self._s
        # The block, or the transaction of this segment, is undone.
        s.committed = s.block_start
        self.uncertain = s.block_uncertain
        s.in_block = False
        s.local = None
        s.savepoints = ()
        s.failed = False
        if chain:
            self._chain_sent = True
            self.begin()

    def savepoint(self, name: str) -> None:
        """SAVEPOINT name (refused by PostgreSQL outside a block or in a failed one)."""
        if self._block_unknown:
            self._doubt_everything()
        self._control_sent = self._ends_sent = True
        s = self._s
        if s.in_block and not s.failed:
            s.savepoints = (*s.savepoints, (name, s.committed, s.local, self.uncertain))

    def rollback_to(self, name: str) -> None:
        """ROLLBACK TO SAVEPOINT name: the values as they were when it was set; it stays,
        the later ones go, and a failed block works again. A name not tracked here may
        still be one PostgreSQL knows: the value is then uncertain (fail closed)."""
        if self._block_unknown:
            self._doubt_everything()
        self._control_sent = self._ends_sent = True
        s = self._s
        if not s.in_block:
            return  # refused by PostgreSQL outside a block
        for i in range(len(s.savepoints) - 1, -1, -1):
            saved_name, committed, local, uncertain = s.savepoints[i]
            if saved_name == name:
                s.committed, s.local, self.uncertain = committed, local, uncertain
                s.savepoints = s.savepoints[: i + 1]
                s.failed = False
                return
        self._doubt_everything()

    def release(self, name: str) -> None:
        """RELEASE SAVEPOINT name: the values stay; it and every later one go."""
        if self._block_unknown:
            self._doubt_everything()
        self._control_sent = self._ends_sent = True
        s = self._s
        if s.failed:
            return  # refused by PostgreSQL in a failed block
        for i in range(len(s.savepoints) - 1, -1, -1):
            if s.savepoints[i][0] == name:
                s.savepoints = s.savepoints[:i]
                return

    def unknown_savepoint(self) -> None:
        """A savepoint statement whose name could not be read: whether it undid a SET is
        unknown, so protected statements are refused until the next SET (fail closed)."""
        if self._block_unknown:
            self._doubt_everything()
        self._control_sent = self._ends_sent = True
        if self._s.in_block:
            self._doubt_everything()

    # -- what rests on the answers still to come ----------------------------------------

    def in_flight_may_change(self) -> bool:
        """Whether the value the statements sent now run under may still turn out other
        than the tracker holds, when a segment sent before them and not yet answered fails.
        A value sealed for a write (or a search) must not rest on that: the caller waits
        for the answers (see DataPath._settled). Within one segment it never does: after
        an error PostgreSQL skips the rest of it."""
        ends = self._segment_ends
        if not ends:  # nothing in flight (a client that waits for each answer): no cost
            return False
        control = self._control_sent  # in them, or in the statement being sent
        return any(self._failure_matters(end, control) for end, _ in ends)

    def _failure_matters(self, end: _Value | None, control: bool) -> bool:
        """Whether a segment in flight whose state was queued as `end` (segment_end) makes
        the segments sent behind it run under another state than was taken for them, should
        it fail. They were taken as if it worked; if it fails PostgreSQL undoes its implicit
        transaction, or fails the block it is in (which skips whatever follows until a
        ROLLBACK, and turns a COMMIT into one). The same either way only when it left the
        state as the last answer left it (known, and certain: a SET of the guessed value is
        a change), with no transaction or savepoint statement (`control`: sent since that
        answer, up to the end of the segment, or in a block, up to now: a COMMIT behind it
        is then a ROLLBACK)."""
        if self._answered_since:
            base = self._answered
        else:
            base = None if self._segment_uncertain else self._segment.value()
        if base is None or end != base or self._block_unknown:
            return True
        return control or (base[2] and self._control_sent)

    # -- as the server answers ---------------------------------------------------------

    def error(self, *, later_segments_sent: bool) -> bool:
        """An ErrorResponse. PostgreSQL skips the rest of the failed segment and undoes
        its implicit transaction, or leaves an explicit block failed. Which of the SETs
        sent since the last answer it kept is known exactly in one case only: one segment,
        not in a block, with no transaction statement in it (all of it is undone). In any
        other case where something was sent that changed the value, it is uncertain.

        Returns whether the segments sent behind the failed one (already in flight: their
        statements were read as if it had worked) may run under another value than the
        tracker took for them: a result of theirs must then be judged as under an
        uncertain value. Only what the error puts in doubt counts here, not what the
        statements sent behind them did."""
        ends = self._segment_ends
        behind_in_doubt = later_segments_sent and (
            not ends or self._failure_matters(*ends[0])
        )
        self._error(later_segments_sent=later_segments_sent)
        return behind_in_doubt

    def _error(self, *, later_segments_sent: bool) -> None:
        s, seg = self._s, self._segment
        # What the segments answered since _segment left, when there are any: that they
        # worked is known, so only the failed one and those behind it are in doubt. Not
        # knowing it (a ReadyForQuery with no segment_end) counts as a change.
        base = seg.value() if self._answered_since == 0 else self._answered
        changed = base is None or s.value() != base
        if seg.in_block and not self._control_sent:
            # The block PostgreSQL is in has failed; segments answered since _segment
            # make no difference (no transaction statement: the same block). Not knowing
            # it, a COMMIT sent after this error was taken as keeping the block's SETs
            # (PostgreSQL answers it with ROLLBACK) and what followed as under them.
            s.failed = True
        exact = (
            not seg.in_block
            and not later_segments_sent
            and not self._control_sent
            and self._answered_since == 0
        )
        ends = self._segment_ends
        if changed and exact:
            self._s = seg.copy()
            self.uncertain = self._segment_uncertain
            # The failed segment's queued end assumed it worked: it leaves what it undid
            # to. (Nothing was queued behind it: later_segments_sent is False.)
            for i, (_, control) in enumerate(ends):
                ends[i] = (None if self.uncertain else self._s.value(), control)
            return
        # A SET that cleared the doubt may have been skipped. A transaction or savepoint
        # statement that may have been skipped (an AND CHAIN: which block the value
        # belongs to) leaves what a ROLLBACK (TO) goes back to in doubt as well; so does
        # a change in the failed segment when segments behind it were sent: they took
        # what a ROLLBACK goes back to from the value as if it had worked. That change is
        # its own queued end against base (the open one's is the state now), not the
        # final state: SET tb; <error> + SET LOCAL ...; RESET ends where it began, but
        # the second segment's ROLLBACK would still go back to tb. A SET that only made
        # an uncertain value certain is such a change too (the ROLLBACK's target was
        # taken as certain).
        failed_end = ends[0][0] if ends else s.value()
        in_doubt = changed or failed_end != base or self._segment_uncertain
        if self._ends_sent or self._chain_sent or (in_doubt and later_segments_sent):
            self._doubt_everything()
        elif in_doubt:
            self.uncertain = True
        # The queued ends of the failed segment and of those behind it were taken as if it
        # had worked. Once answered they would be the base of the next error: a SET sent
        # after this answer, of the value such an end guessed, would look like no change
        # and leave a failed segment certain of it (SET a; <error> + SELECT 1 in flight,
        # then SET a; <error>: PostgreSQL never had a). Forget them unless the failed one
        # changed nothing and the value is certain.
        if ends and (self.uncertain or failed_end != base):
            for i, (_, control) in enumerate(ends):
                ends[i] = (None, control)
        if self._control_sent:
            self._block_unknown = True

    def unknown_change(self) -> None:
        """Something was sent that may have changed the value in a way not seen here (a
        function called through FunctionCall): uncertain until the next SET (fail closed)."""
        self._doubt_everything()

    def _doubt_everything(self) -> None:
        """The value is uncertain, and so is what a ROLLBACK (TO) would go back to."""
        s = self._s
        self.uncertain = True
        s.block_uncertain = True
        s.savepoints = tuple((name, c, lo, True) for name, c, lo, _ in s.savepoints)

    def ready(self, status: str, *, last: bool) -> None:
        """ReadyForQuery: 'I' idle, 'T' in a block, 'E' in a failed block.

        Only the answer to the last segment in flight describes the state the
        tracker holds; earlier ones are ignored."""
        ends = self._segment_ends
        if not last:
            self._answered_since += 1
            self._answered = ends.popleft()[0] if ends else None
            return
        ends.clear()
        self._answered = None
        self._block_unknown = False  # the status below is PostgreSQL's block state
        s = self._s
        if status == "I":
            if s.in_block:  # the block ended in a way we did not see (e.g. an error in COMMIT)
                s.in_block = False
            s.local = None
            s.savepoints = ()
            s.failed = False
        else:
            if not s.in_block:
                s.in_block = True
                s.block_start = s.committed
                s.block_uncertain = self.uncertain
                s.savepoints = ()
            s.failed = status == "E"
        self._segment = s.copy()
        self._control_sent = False
        self._answered_since = 0
        self._segment_uncertain = self.uncertain
        self._chain_sent = False
        self._ends_sent = False

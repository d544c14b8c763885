"""TenantTracker (pure): savepoints move a setting the way PostgreSQL moves a GUC.

PostgreSQL: ROLLBACK TO SAVEPOINT undoes every SET and SET LOCAL since the savepoint and
keeps the savepoint; RELEASE keeps the values and drops the savepoint and every later
one; the end of the block drops them all. A name used twice refers to the latest.
"""

from __future__ import annotations

from proxy.session.tenant import TenantTracker


def in_block(start: str | None = "x") -> TenantTracker:
    t = TenantTracker(start)
    t.begin()
    return t


def test_rollback_to_undoes_set_and_set_local_since_the_savepoint() -> None:
    t = in_block()
    t.set("a")
    t.savepoint("s")
    t.set("b")
    t.set("c", local=True)
    assert t.current == "c"
    t.rollback_to("s")
    assert t.current == "a"
    t.set("d")
    t.rollback_to("s")  # the savepoint stays: it can be rolled back to again
    assert t.current == "a"


def test_release_keeps_the_values_and_forgets_later_savepoints() -> None:
    t = in_block()
    t.savepoint("outer")
    t.set("a")
    t.savepoint("inner")
    t.set("b")
    t.release("outer")  # drops outer and inner
    assert t.current == "b"
    t.rollback_to("inner")  # unknown now: PostgreSQL refuses it, nothing changes
    assert t.current == "b"


def test_a_name_used_twice_means_the_latest() -> None:
    t = in_block()
    t.savepoint("s")
    t.set("a")
    t.savepoint("s")
    t.set("b")
    t.rollback_to("s")
    assert t.current == "a"
    t.release("s")
    t.rollback_to("s")  # the first one is still there
    assert t.current == "x"


def test_nested_rollback_to_an_outer_savepoint_drops_the_inner_ones() -> None:
    t = in_block()
    t.savepoint("outer")
    t.set("a")
    t.savepoint("inner")
    t.set("b")
    t.rollback_to("outer")
    assert t.current == "x"
    t.rollback_to("inner")  # gone with the rollback to outer
    assert t.current == "x"


def test_the_end_of_the_block_forgets_the_savepoints() -> None:
    t = in_block()
    t.savepoint("s")
    t.set("a")
    t.commit()
    assert t.current == "a"
    t.begin()
    t.set("b")
    t.rollback_to("s")  # from the previous block: unknown
    assert t.current == "b"
    t.rollback()
    assert t.current == "a"


def test_outside_a_block_savepoints_do_nothing() -> None:
    t = TenantTracker("x")
    t.savepoint("s")  # PostgreSQL: "SAVEPOINT can only be used in transaction blocks"
    t.set("a")
    t.rollback_to("s")
    assert t.current == "a"


def test_an_unreadable_savepoint_statement_makes_the_value_uncertain_until_set() -> None:
    t = in_block()
    t.unknown_savepoint()
    assert t.uncertain
    t.set("a")
    assert not t.uncertain
    outside = TenantTracker("x")
    outside.unknown_savepoint()  # outside a block it cannot have undone anything
    assert not outside.uncertain


def test_an_error_in_the_block_then_rollback_to_recovers_the_value() -> None:
    t = in_block()
    t.set("a")
    t.savepoint("s")
    t.set("b")
    t.error(later_segments_sent=False)  # inside a block: the block is aborted, values stay
    assert t.current == "b"
    t.rollback_to("s")
    assert t.current == "a"


def test_snapshot_and_restore_carry_the_savepoints() -> None:
    t = in_block()
    t.set("a")
    t.savepoint("s")
    saved = t.snapshot()
    t.release("s")
    t.restore(saved)
    t.set("b")
    t.rollback_to("s")
    assert t.current == "a"


# --- the transaction of a segment (a Query, or the messages up to a Sync) ---------------


def segment(start: str | None = "x") -> TenantTracker:
    t = TenantTracker(start)
    t.segment_start()
    return t


def test_rollback_outside_a_block_undoes_the_segment() -> None:
    t = segment()
    t.set("a")  # SET a; ROLLBACK in one Query: PostgreSQL undoes the SET
    t.rollback()
    assert t.current == "x"


def test_begin_makes_the_segment_so_far_part_of_the_block() -> None:
    t = segment()
    t.set("a")
    t.begin()  # SET a; BEGIN; SET b; ROLLBACK in one Query: back to before the SET a
    t.set("b")
    t.rollback()
    assert t.current == "x"


def test_commit_in_a_segment_is_what_a_later_rollback_goes_back_to() -> None:
    t = segment()
    t.set("a")
    t.commit()
    t.set("b")
    t.rollback()
    assert t.current == "a"


def test_set_local_outside_a_block_lasts_for_the_segment() -> None:
    t = segment()
    t.set("a", local=True)
    assert t.current == "a"  # the statements after it in the same Query run under a
    t.segment_start()
    assert t.current == "x"


def test_a_plain_set_replaces_a_set_local_in_the_block() -> None:
    t = in_block()
    t.set("a", local=True)
    t.set("b")
    assert t.current == "b"
    t.commit()
    assert t.current == "b"


def test_commit_of_a_failed_block_is_a_rollback() -> None:
    t = in_block()
    t.set("a")
    t.ready("E", last=True)  # an error: PostgreSQL answers the COMMIT with ROLLBACK
    t.set("b")  # refused in a failed block
    t.commit()
    assert t.current == "x" and not t.uncertain


def test_an_error_after_statements_that_changed_the_value_makes_it_uncertain() -> None:
    t = in_block()
    t.ready("T", last=True)
    t.set("a")  # SET a; SELECT 1/0 in one Query: whether the SET ran is not known here
    t.error(later_segments_sent=False)
    assert t.uncertain
    t.rollback()  # what the block goes back to is known
    assert t.current == "x" and not t.uncertain
    # With a savepoint statement in that Query, so is not what ROLLBACK TO goes back to.
    t = in_block()
    t.ready("T", last=True)
    t.savepoint("s")
    t.set("a")
    t.error(later_segments_sent=False)
    t.rollback_to("s")
    assert t.uncertain


def test_a_rollback_to_a_savepoint_not_tracked_here_makes_the_value_uncertain() -> None:
    t = in_block()
    t.set("a")
    t.rollback_to("elsewhere")  # PostgreSQL may know it (a name spelled another way)
    assert t.uncertain


def test_an_error_in_the_query_that_began_the_block_leaves_its_rollback_certain() -> None:
    # "BEGIN; SET LOCAL pgseal.tenant = 'a'; <error>" then "ROLLBACK": psql-style scripts.
    t = TenantTracker("x")
    t.ready("I", last=True)
    t.segment_start()
    t.begin()
    t.set("a", local=True)
    t.error(later_segments_sent=False)
    t.ready("E", last=True)
    t.segment_start()
    t.rollback()
    assert t.current == "x" and not t.uncertain


def pipelined(*sets: str | None) -> TenantTracker:
    """Start "x", then one segment per value (None: a segment with no SET), all sent
    before any answer."""
    t = TenantTracker("x")
    t.ready("I", last=True)
    for value in sets:
        t.segment_start()
        if value is not None:
            t.set(value)
        t.segment_end()
    return t


def test_a_failed_set_behind_an_answered_one_is_judged_against_what_that_one_left() -> None:
    # SET a (works), SET x (fails: PostgreSQL keeps a). Against the state before both, the
    # failed SET looked like no change at all: the tracker stayed certain of x.
    t = pipelined("a", "x")
    t.ready("I", last=False)
    t.error(later_segments_sent=False)
    t.ready("I", last=True)
    assert t.uncertain or t.current == "a"


def test_a_failed_segment_without_a_set_keeps_what_the_answered_ones_did() -> None:
    t = pipelined("a", None)
    t.ready("I", last=False)
    t.error(later_segments_sent=False)
    t.ready("I", last=True)
    assert t.current == "a" and not t.uncertain


def test_a_ready_for_query_not_paired_with_a_segment_end_makes_an_error_uncertain() -> None:
    t = pipelined()  # nothing marked: what the answered segment left is not known
    t.segment_start()
    t.set("a")
    t.ready("I", last=False)
    t.error(later_segments_sent=False)
    assert t.uncertain


def test_state_copy_carries_every_field() -> None:
    """_State.copy() is written out by hand (replace() is slow): a field added to the
    dataclass and forgotten there would silently reset on every ReadyForQuery."""
    from dataclasses import fields

    from proxy.session.tenant import _State

    values = {
        "committed": "a",
        "local": "b",
        "in_block": True,
        "block_start": "c",
        "savepoints": (("s", "a", None, True),),
        "failed": True,
        "block_uncertain": True,
    }
    assert {f.name for f in fields(_State)} == set(values)
    original = _State(**values)  # type: ignore[arg-type]
    copied = original.copy()
    assert copied == original and copied is not original


# --- answers read while more is sent (a client that pipelines and reads as it goes) ------


def test_a_failed_segments_queued_end_is_not_the_base_of_the_next_error() -> None:
    # SET a; <error> and SELECT 1 pipelined; once the first is answered, SET a; <error> is
    # sent. The SELECT 1's queued end said "a" (taken as if the first had worked): against
    # it the last SET a looked like no change, certain of a PostgreSQL never had.
    t = pipelined("a", None)
    t.error(later_segments_sent=True)
    t.ready("I", last=False)
    t.segment_start()
    t.set("a")
    t.segment_end()
    t.ready("I", last=False)
    t.error(later_segments_sent=False)
    t.ready("I", last=True)
    assert t.uncertain or t.current == "x"


def test_a_segment_sent_between_an_exact_error_and_its_answer() -> None:
    t = pipelined("a")
    t.error(later_segments_sent=False)  # exact: back to x
    t.segment_start()  # sent before the failed segment's ReadyForQuery
    t.set("a")
    t.segment_end()
    t.ready("I", last=False)
    t.error(later_segments_sent=False)
    t.ready("I", last=True)
    assert t.uncertain or t.current == "x"


def test_a_segment_ended_while_uncertain_is_no_base_for_an_error() -> None:
    t = pipelined("a", None)
    t.error(later_segments_sent=True)  # uncertain: a or x
    t.segment_start()  # SELECT 1, sent now: what it leaves is not known either
    t.segment_end()
    t.segment_start()
    t.set("a")
    t.segment_end()
    t.ready("I", last=False)
    t.ready("I", last=False)
    t.ready("I", last=False)
    t.error(later_segments_sent=False)
    t.ready("I", last=True)
    assert t.uncertain or t.current == "x"


def test_errors_in_a_pipeline_with_no_set_keep_the_value_certain() -> None:
    t = pipelined(None, None, None)  # e.g. INSERTs, two of them failing
    t.error(later_segments_sent=True)
    t.ready("I", last=False)
    t.ready("I", last=False)
    t.error(later_segments_sent=False)
    t.ready("I", last=True)
    assert t.current == "x" and not t.uncertain


def test_statements_sent_after_an_error_that_hides_the_block_state_are_uncertain() -> None:
    # COMMIT AND CHAIN outside a block fails (PostgreSQL stays out of a block) and a probe
    # is in flight; then SET a, SET LOCAL b (its own Query) and a third Query are sent.
    # Taking the chained block as real, SET LOCAL b looked like lasting into the third.
    t = TenantTracker("x")
    t.ready("I", last=True)
    t.segment_start()
    t.commit(chain=True)
    t.segment_end()
    t.segment_start()
    t.segment_end()
    t.error(later_segments_sent=True)
    for local in (False, True):
        t.segment_start()
        t.set("ab"[local], local=local)
        t.segment_end()
    t.segment_start()
    assert t.uncertain or t.current == "a"
    t.ready("I", last=False)
    t.ready("I", last=False)
    t.ready("I", last=False)
    t.ready("I", last=True)
    assert t.uncertain or t.current == "a"


def test_a_rollback_sent_after_an_error_with_a_skipped_begin_is_uncertain() -> None:
    # SELECT 1/0; BEGIN (PostgreSQL: no block), then SET a and ROLLBACK sent before the
    # answer: PostgreSQL keeps a (ROLLBACK outside a block); the tracker's block says x.
    t = TenantTracker("x")
    t.ready("I", last=True)
    t.segment_start()
    t.begin()
    t.segment_end()
    t.error(later_segments_sent=False)
    t.segment_start()
    t.set("a")
    t.segment_end()
    t.segment_start()
    t.rollback()
    t.segment_end()
    assert t.uncertain or t.current == "a"


def test_an_error_in_a_block_after_answered_segments_fails_the_block() -> None:
    # In a block with a: SELECT 1 + SELECT 1/0 pipelined; after the error, COMMIT (which
    # PostgreSQL answers with ROLLBACK) and a protected statement are sent.
    t = TenantTracker("x")
    t.ready("I", last=True)
    t.segment_start()
    t.begin()
    t.set("a")
    t.segment_end()
    t.ready("T", last=True)
    t = pipelined_in(t, 2)
    t.ready("T", last=False)
    t.error(later_segments_sent=False)
    t.segment_start()
    t.commit()
    t.segment_end()
    t.segment_start()
    assert t.uncertain or t.current == "x"


def pipelined_in(t: TenantTracker, n: int) -> TenantTracker:
    for _ in range(n):
        t.segment_start()
        t.segment_end()
    return t


def test_discard_all_commits_at_once() -> None:
    # Extended protocol, one Sync: DISCARD ALL, BEGIN, SET b, ROLLBACK. PostgreSQL commits
    # DISCARD ALL at once (it refuses to run in a transaction): the ROLLBACK goes back to
    # the startup value, not to the a from before the segment.
    t = pipelined("a")
    t.ready("I", last=True)
    t.segment_start()
    t.discard_all()
    t.begin()
    t.set("b")
    t.rollback()
    assert t.current == "x" and not t.uncertain
    # ... and an error after it undoes no more than to what it left.
    t = pipelined("a")
    t.ready("I", last=True)
    t.segment_start()
    t.discard_all()
    t.set("b")
    t.segment_end()
    t.error(later_segments_sent=False)
    assert t.uncertain or t.current == "x"
    # In a block PostgreSQL refuses it: what a ROLLBACK goes back to stays.
    t = in_block("a")
    t.discard_all()
    t.rollback()
    assert t.current == "a"


def test_a_query_skipped_after_an_execute_failed_gives_up_its_queued_end() -> None:
    # Execute SELECT 1/0 with no Sync, two Queries, Sync; then SET ta; then SET x; <error>.
    # PostgreSQL skips the Queries (their answers never come): were their queued ends kept,
    # each later answer would pair with the end of a segment before it, and the last error
    # be judged against x instead of ta.
    t = TenantTracker("x")
    t.ready("I", last=True)
    t.segment_start()  # the Execute; the Queries run in its transaction
    t.segment_end()  # the Queries
    t.segment_end()
    t.segment_end()  # the Sync
    t.segment_start()
    t.set("ta")
    t.segment_end()
    t.segment_start()
    t.set("x")
    t.segment_end()
    for _ in range(2):  # the data path, at the error: the Queries will not be answered
        t.segment_skipped()
    t.error(later_segments_sent=True)
    t.ready("I", last=False)
    t.ready("I", last=False)
    t.error(later_segments_sent=False)
    t.ready("I", last=True)
    assert t.uncertain or t.current == "ta"


def test_a_change_in_the_failed_segment_undone_behind_it_still_doubts_the_rollback() -> None:
    # Query "...; SET b" (fails at its end: a deferred constraint) and, unsynced, Executes
    # SET LOCAL TO DEFAULT and RESET: the value ends where it began, but the Executes'
    # transaction took b as what its ROLLBACK goes back to. Sent after the error, in it:
    # BEGIN, SET LOCAL c, ROLLBACK AND CHAIN, ROLLBACK. PostgreSQL: x.
    t = TenantTracker("x")
    t.ready("I", last=True)
    t.segment_start()
    t.set("b")
    t.segment_end()
    t.segment_start()
    t.set(None, local=True)
    t.set(None)
    t.error(later_segments_sent=True)
    t.ready("I", last=False)
    t.begin()
    t.set("c", local=True)
    t.rollback(chain=True)
    t.rollback()
    t.segment_end()
    t.ready("I", last=True)
    assert t.uncertain or t.current == "x"


def test_a_second_reset_all_does_not_settle_a_set_local_to_default() -> None:
    # SET LOCAL ... TO DEFAULT leaves the value at its reset value, which RESET ALL then
    # skips: at the end of the block the SET LOCAL is undone and a comes back.
    t = TenantTracker("x")
    t.set("a")
    t.begin()
    t.set(None, local=True)
    t.reset_all()
    t.reset_all()
    t.commit()
    assert t.uncertain or t.current == "a"
    # A plain SET after it does settle it (it replaces the SET LOCAL).
    t.begin()
    t.set(None, local=True)
    t.reset_all()
    t.set("b")
    t.commit()
    assert t.current == "b" and not t.uncertain


def test_a_failed_set_that_only_settled_the_value_doubts_the_rollback_behind_it() -> None:
    # Uncertain (PostgreSQL has b, the tracker guesses x). SET TO DEFAULT; <error>, then an
    # Execute opens the next segment; after the error, ABORT. The SET made x certain and
    # the next segment took it as what its ROLLBACK goes back to; PostgreSQL keeps b.
    t = in_block()
    t.rollback_to("unknown")  # a savepoint PostgreSQL may know: uncertain, the block too
    t.rollback()
    t.ready("I", last=True)
    assert t.uncertain
    t.segment_start()
    t.set(None)
    t.segment_end()
    t.segment_start()  # the next segment, not synced yet
    t.error(later_segments_sent=True)
    t.ready("I", last=False)
    t.rollback()
    t.segment_end()
    t.ready("I", last=True)
    assert t.uncertain


# --- what rests on the answers still to come (in_flight_may_change, error's verdict) --------


def test_a_change_in_flight_is_what_a_statement_sent_now_rests_on() -> None:
    # SET a in flight: a write sent now would be sealed for a, which PostgreSQL may refuse.
    assert pipelined("a").in_flight_may_change()
    # Segments that change nothing, outside a block: whatever their fate, x stays.
    t = pipelined(None, None)
    assert not t.in_flight_may_change()
    # Answered: nothing is in flight any more.
    t = pipelined("a")
    t.ready("I", last=True)
    assert not t.in_flight_may_change()
    # Within the segment being sent: PostgreSQL skips the rest of it after an error.
    t.segment_start()
    t.set("b")
    assert not t.in_flight_may_change()


def test_a_change_in_flight_behind_an_answered_segment() -> None:
    # SET a answered, SET a again and nothing in flight: the base is what the first left.
    t = pipelined("a", "a", None)
    t.ready("I", last=False)
    assert not t.in_flight_may_change()
    t = pipelined("a", "b")
    t.ready("I", last=False)
    assert t.in_flight_may_change()


def test_what_may_fail_in_a_block_or_with_transaction_statements_is_in_doubt() -> None:
    # A transaction statement in flight decides what block the statements behind it run
    # in (a COMMIT that fails is a ROLLBACK): even with no SET among them.
    t = TenantTracker("x")
    t.ready("I", last=True)
    t.segment_start()
    t.begin()
    t.segment_end()
    assert t.in_flight_may_change()
    t.ready("T", last=True)
    pipelined_in(t, 1)  # e.g. an INSERT in the block, in flight
    assert not t.in_flight_may_change()  # it fails: the block fails, what follows skipped
    t.segment_start()
    t.commit()
    assert t.in_flight_may_change()  # ...but a COMMIT behind it is then a ROLLBACK


def test_an_uncertain_value_is_no_base() -> None:
    t = pipelined("a", None)
    t.error(later_segments_sent=True)  # uncertain
    t.ready("I", last=False)
    t.segment_start()
    t.set("a")  # certain again, but the segment behind it may fail
    t.segment_end()
    assert t.in_flight_may_change()


def test_an_error_puts_what_was_sent_behind_it_in_doubt_only_if_it_matters() -> None:
    # SET a; <error> with a segment behind it: that one was read as under a.
    t = pipelined("a", None)
    assert t.error(later_segments_sent=True)
    # An error in a segment that changed nothing: what is behind it ran as taken.
    t = pipelined(None, "a")
    assert not t.error(later_segments_sent=True)
    # Nothing behind it: nothing to judge again.
    assert not pipelined("a").error(later_segments_sent=False)
    # Not what was sent behind it: SET a behind the failed segment is no doubt of its own
    # (RESET ALL after SET LOCAL behind a read leaves the tracker uncertain; the read
    # ran before it).
    t = TenantTracker("x")
    t.ready("I", last=True)
    t.segment_start()
    t.segment_end()
    t.segment_start()
    t.set("a")
    t.reset_all()
    t.segment_end()
    assert not t.error(later_segments_sent=True)


def test_an_error_ahead_of_an_uncertain_tracker_still_doubts_what_is_behind_it() -> None:
    # SET a; <error>, then (sent before the answer) a read, then BEGIN; SET LOCAL b; RESET
    # ALL, which leaves the tracker uncertain whatever happened before: the read behind
    # the error is in doubt all the same (PostgreSQL runs it under x, not a).
    t = pipelined("a", None)
    t.segment_start()
    t.begin()
    t.set("b", local=True)
    t.reset_all()
    t.segment_end()
    assert t.uncertain
    assert t.error(later_segments_sent=True)


def test_a_failed_commit_puts_what_is_behind_it_in_doubt() -> None:
    # BEGIN; SET a (answered, in the block); COMMIT fails (a deferred constraint):
    # PostgreSQL rolls the block back to x; a read sent behind it took a.
    t = in_block()
    t.set("a")
    t.ready("T", last=True)
    t.segment_start()
    t.commit()
    t.segment_end()
    pipelined_in(t, 1)
    assert t.error(later_segments_sent=True)


def test_a_transaction_statement_behind_a_failed_segment_matters_only_in_a_block() -> None:
    # SELECT 1/0, then BEGIN; SET LOCAL a; <read>; COMMIT sent before its answer: outside
    # a block the failed segment left nothing behind, and the block behind it runs as sent.
    t = pipelined(None)
    t.segment_start()
    t.begin()
    t.set("a", local=True)
    t.commit()
    t.segment_end()
    assert not t.error(later_segments_sent=True)
    # In a block (SET a in it, answered) the failure fails the block: a COMMIT behind it
    # is a ROLLBACK, and what follows it runs under x, not a.
    t = in_block()
    t.set("a")
    t.ready("T", last=True)
    pipelined_in(t, 1)
    t.segment_start()
    t.commit()
    t.segment_end()
    assert t.error(later_segments_sent=True)
    # A transaction statement in the failed segment itself: what it did is not known.
    t = TenantTracker("x")
    t.ready("I", last=True)
    t.segment_start()
    t.begin()
    t.commit()
    t.segment_end()
    pipelined_in(t, 1)
    assert t.error(later_segments_sent=True)

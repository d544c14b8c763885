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

"""The tenant a result is judged under against the one PostgreSQL ran its statement with,
over the random sequences of test_tenant_tracking_differential.py (errors, pipelines,
answers read while more is sent).

There, a probe statement sent behind one that later fails is not judged: the tracker took
the failed statement as if it had worked. Rows are judged by the state their statement was
sent under, made uncertain by an error ahead of them that puts it in doubt
(TenantTracker.error, DataPath._distrust_later_readers), never by what was sent behind
them. So here every probe is judged: when its row arrives, the tenant it was sent under
must be the one PostgreSQL reports, unless an error since made it uncertain.
PGSEAL_TRACKER_SEEDS=N runs N random sequences (default 150).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from proxy.session.datapath import DataPath
from proxy.session.tenant import TenantTracker
from proxy.wire import messages as m
from tests.integration.test_tenant_tracking_differential import (
    PROBE,
    _q,
    _Session,
    _where,
    _x,
    assert_every_seed_passes,
    on_probe_sent,
    probe_row,
)
from tests.integration.test_tenant_tracking_differential import _run as _run_sequence

pytestmark = pytest.mark.integration


class _Readers:
    """The tenant the tracker had when each probe was sent, and whether it was or became
    uncertain (an error that put what was sent behind it in doubt), until its row."""

    def __init__(self, dp: DataPath) -> None:
        self.sent: dict[int, list[Any]] = {}  # probe -> [tenant, uncertain]
        self.judged: dict[int, tuple[str | None, bool]] = {}  # as its row arrived

        def record(n: int) -> None:
            self.sent[n] = [dp.tenant.current, dp.tenant.uncertain]

        def distrusting(in_doubt: Sequence[TenantTracker]) -> None:
            if dp.tenant in in_doubt:  # as the data path does: every result in flight
                for state in self.sent.values():
                    state[1] = True

        on_probe_sent(dp, record, distrusting)

    def answer(self, t: int, raw: bytes) -> str | None:
        """A server message: a probe's row judged under a tenant PostgreSQL did not run
        it with, described."""
        row = probe_row(t, raw)
        if row is None:
            return None
        n, value = row
        tracked, unsure = self.sent.pop(n)
        self.judged[n] = (tracked, unsure)
        if unsure or value == tracked:
            return None
        return f"probe {n}: server {value!r}, judged under {tracked!r}"


def _session(host: str, port: int, user: str) -> _Session:
    session = _Session(host, port, user)
    session.probes = _Readers(session.dp)  # type: ignore[assignment]
    return session


def _run(seed: int, host: str, port: int, user: str) -> list[str] | None:
    """test_tenant_tracking_differential's sequence, every probe judged as it is read."""
    session = _session(host, port, user)
    return _run_sequence(seed, host, port, user, session=session, compare=False)


def test_results_are_never_judged_under_a_certain_wrong_tenant(pg: Any) -> None:
    assert_every_seed_passes(pg, _run)


_PROBE = PROBE.format(0)


@pytest.mark.parametrize(
    "before, failing, doubt",
    [
        # The SET fails: the probe behind it runs under init, not ta.
        ([], _q("SET pgseal.tenant = 'ta'; SELECT 1/0"), True),
        # A deferred constraint fails the COMMIT: the block's SET is rolled back.
        (
            _q("BEGIN; SET pgseal.tenant = 'ta'; INSERT INTO dp_child VALUES (1)"),
            _q("COMMIT"),
            True,
        ),
        # An error in a block fails it: the COMMIT sent behind it is a ROLLBACK.
        (_q("BEGIN; SET pgseal.tenant = 'ta'"), [*_q("SELECT 1/0"), *_q("COMMIT")], True),
        # An error that changes nothing: the probe ran under what it was sent under.
        ([], [*_x("SELECT 1/0"), m.SYNC], False),
    ],
)
def test_a_probe_behind_a_failing_segment(
    pg: Any, before: list[bytes], failing: list[bytes], doubt: bool
) -> None:
    """The probe is sent before the failing segment is answered; a block behind it leaves
    the tracker uncertain (RESET ALL after SET LOCAL) and must not decide its row."""
    session = _session(*_where(pg))
    try:
        if before:
            session.send(before)
            assert session.read("all") is None
        behind = "BEGIN; SET LOCAL pgseal.tenant = 'tb'; RESET ALL; COMMIT"
        session.send([*failing, *_q(_PROBE), *_q(behind)])
        assert session.read("all") is None  # never judged under a certain wrong tenant
        assert session.dp.tenant.uncertain
        readers = session.probes
        assert isinstance(readers, _Readers)
        sent = "ta" if before or b"'ta'" in b"".join(failing) else "init"
        assert readers.judged[0] == (sent, doubt)
    finally:
        session.server.sock.close()

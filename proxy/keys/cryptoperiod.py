"""Cryptoperiods: is a key past the time it may protect new data? (pure: no I/O)

A key's originator-usage period (NIST SP 800-57 Part 1 Rev. 5, 5.3.6) starts when it
begins protecting data: a data key's `created_at` (it is active from its first moment),
a master key's `activated_at` (when it started wrapping data keys; a master adopted by
the keystore counts from its adoption, the first time this keystore used it).

Only keys that still protect new data can be past their period: an active data key, the
active master key. A retired data key only opens old cells (its recipient-usage period);
a destroyed one does nothing at all. Limits come from `CryptoperiodConfig`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from proxy.config import CryptoperiodConfig

ACTIVE = "active"


@dataclass(frozen=True, slots=True)
class PeriodStatus:
    """Where a key stands against its cryptoperiod; `ends` None when none applies."""

    applies: bool
    expired: bool
    ends: dt.datetime | None

    def describe(self, now: dt.datetime) -> str:
        """One word for a table column: `EXPIRED`, `ok` with the days left, or `-`."""
        if not self.applies or self.ends is None:
            return "-"
        if self.expired:
            return f"EXPIRED {_days(now - self.ends)}d ago"
        return f"ok {_days(self.ends - now)}d left"


NOT_APPLICABLE = PeriodStatus(False, False, None)


def _days(delta: dt.timedelta) -> int:
    return max(0, delta.days)


def status(state: str, started: dt.datetime | None, period_days: int,
           now: dt.datetime) -> PeriodStatus:
    """The status of a key in `state` that began protecting data at `started`.

    Past its period means `now >= started + period_days`: at the boundary it is due.
    """
    if state != ACTIVE or started is None:
        return NOT_APPLICABLE
    ends = started + dt.timedelta(days=period_days)
    return PeriodStatus(True, now >= ends, ends)


def data_key_status(state: str, created_at: dt.datetime, periods: CryptoperiodConfig,
                    now: dt.datetime) -> PeriodStatus:
    return status(state, created_at, periods.data_key_days, now)


def master_key_status(state: str, activated_at: dt.datetime | None,
                      periods: CryptoperiodConfig, now: dt.datetime) -> PeriodStatus:
    return status(state, activated_at, periods.master_key_days, now)

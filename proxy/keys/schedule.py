"""Rotation on schedule: keys past their cryptoperiod are rotated by the proxy itself.

With `cryptoperiod.rotate_on_schedule`, every encrypting proxy runs a `RotationScheduler`
beside its key service: soon after start, then every `check_interval_seconds`, it runs one
pass. A pass first takes the keystore's fleet lock (a PostgreSQL advisory lock): if
another proxy holds it, that proxy is doing the same work and this pass is skipped. The
holder then

1. rotates the master key when the active one is past `master_key_days` (first, so the
   data keys rotated next are wrapped under the new master straight away);
2. rotates every active data key created at least `data_key_days` ago, oldest first.

"Due" is read after the lock is taken, so a pass never sees what an earlier pass (in
any proxy) already rotated; and each rotation names the exact key it found due
(`expect_active`), so a manual `pgseal keys rotate` racing with it is not followed by a
second rotation. Every rotation writes its key.rotate audit record as usual, data-key
ones with "cryptoperiod (scheduled)" in the statement.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass

from proxy.config import CryptoperiodConfig
from proxy.errors import KeyNotFound, KeyServiceUnavailable
from proxy.keys.cryptoperiod import master_key_status
from proxy.keys.service import KeyService, StaleRotation

log = logging.getLogger("pgseal.keys.schedule")

FLEET_JOB = "cryptoperiod"
FIRST_PASS_SECONDS = 10.0  # a restart must not postpone the check by a whole interval
BATCH = 500  # due keys read per query; a pass keeps reading until none is left


Clock = Callable[[], dt.datetime]


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class RotationPass:
    """What one pass did: `ran` False when another proxy held the fleet lock."""

    ran: bool
    data_keys: tuple[tuple[str, int], ...] = ()  # (tenant, new version) rotated
    master: str | None = None  # the new master key id, when it was rotated


class RotationScheduler:
    """The background task of a proxy that rotates keys past their cryptoperiod."""

    def __init__(self, service: KeyService, periods: CryptoperiodConfig, *,
                 clock: Clock = _utc_now) -> None:
        self.service = service
        self.periods = periods
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self.passes = 0  # passes that held the lock (for tests and logs)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._forever(), name="pgseal-cryptoperiod")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _forever(self) -> None:
        delay = min(self.periods.check_interval_seconds, FIRST_PASS_SECONDS)
        while True:
            await asyncio.sleep(delay)
            delay = self.periods.check_interval_seconds
            try:
                await self.run_once()
            except KeyServiceUnavailable as exc:
                # The keys stay usable; the next pass tries again.
                log.warning("cryptoperiod check failed, next in %.0fs: %s", delay, exc)
            except Exception:  # a bug must not end the schedule silently
                log.exception("cryptoperiod check failed unexpectedly")

    async def run_once(self) -> RotationPass:
        """One pass (see module doc); KeyServiceUnavailable when the keystore or HSM is down."""
        async with self.service.keystore.fleet_lock(FLEET_JOB) as ours:
            if not ours:
                log.debug("cryptoperiod: another proxy is running the check")
                return RotationPass(ran=False)
            self.passes += 1
            master = await self._master_if_due()
            rotated = await self._data_keys_due()
        if master is not None or rotated:
            log.info("cryptoperiod: rotated %d data key(s)%s", len(rotated),
                     f" and the master key (now {master})" if master else "")
        return RotationPass(True, tuple(rotated), master)

    async def _master_if_due(self) -> str | None:
        now = self._clock()
        for master in await self.service.list_masters():
            if master_key_status(master.state, master.activated_at, self.periods, now).expired:
                log.info("cryptoperiod: master key %s active since %s, past %d days: rotating",
                         master.kek, master.activated_at, self.periods.master_key_days)
                return (await self.service.rotate_master()).new_kek
        return None

    async def _data_keys_due(self) -> list[tuple[str, int]]:
        days = self.periods.data_key_days
        rotated: list[tuple[str, int]] = []
        while True:
            due = await self.service.due_keys(dt.timedelta(days=days), BATCH)
            done_now = 0
            for key in due:
                try:
                    new, _ = await self.service.rotate(
                        key.tenant, expect_active=key.key_id,
                        reason=f"cryptoperiod (scheduled): version {key.version} past {days} days",
                    )
                except (StaleRotation, KeyNotFound):
                    continue  # rotated or destroyed by someone else meanwhile
                rotated.append((new.tenant, new.version))
                done_now += 1
            # Rotated keys are fresh, so the next read returns the next ones; stop when
            # there are none, or when nothing could be rotated (no endless loop).
            if len(due) < BATCH or done_now == 0:
                return rotated

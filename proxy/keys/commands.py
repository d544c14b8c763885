"""`pgseal hsm init` and `pgseal keys ...` (DESIGN.md 3).

Each handler prints its result for a human on stdout and returns 0; a failure raises
PgsealError or ConfigError, which the CLI prints as one line on stderr (exit 1).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from proxy.config import Config, CryptoperiodConfig
from proxy.errors import PgsealError
from proxy.keys.cryptoperiod import data_key_status, master_key_status
from proxy.keys.hsm import HsmClient, ensure_softhsm_token, prepare_softhsm_env
from proxy.keys.keystore import MasterRow
from proxy.keys.model import KeyInfo
from proxy.keys.service import KeyService
from proxy.keys.shred import gather_evidence

_T = TypeVar("_T")


def _run(coro: Awaitable[_T]) -> _T:
    async def main() -> _T:
        return await coro

    return asyncio.run(main())


async def _with_service(config: Config, work: Callable[[KeyService], Awaitable[_T]]) -> _T:
    # No LISTEN: a command is over before anyone could notify it.
    service = await KeyService.open(config, listen=False)
    try:
        return await work(service)
    finally:
        await service.close()


# --- hsm init ------------------------------------------------------------------------


def cmd_hsm_init(args: argparse.Namespace, config: Config) -> int:
    """Create the SoftHSM2 token (embedded default) and the master key, when missing."""
    token = ensure_softhsm_token(config)
    if token is not None:
        state = "created" if token.created else "present"
        print(f"token {config.hsm.token_label!r}: {state} (softhsm2.conf: {token.conf})")
    else:
        prepare_softhsm_env(config)

    found, created = HsmClient(config.hsm).ensure_master_sync()
    kek = ", ".join(m.kek for m in found)
    label = config.hsm.master_key_label
    print(f"master key {label!r}: {'created' if created else 'present'} (id {kek}; "
          "AES-256, sensitive, not extractable)")
    return 0


# --- keys -------------------------------------------------------------------------------


def _age(when: dt.datetime, now: dt.datetime) -> str:
    seconds = max(0, int((now - when).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _when(when: dt.datetime | None) -> str:
    return "-" if when is None else when.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


def format_keys(keys: list[KeyInfo], now: dt.datetime | None = None,
                periods: CryptoperiodConfig | None = None) -> str:
    """The data keys as a table; CRYPTOPERIOD says `EXPIRED ...` for an active key past it."""
    now = now or dt.datetime.now(dt.UTC)
    periods = periods or CryptoperiodConfig()
    header = ("TENANT", "VERSION", "KEY_ID", "STATE", "CREATED", "AGE", "CRYPTOPERIOD")
    rows = [
        (k.tenant, str(k.version), str(k.key_id), k.state, _when(k.created_at),
         _age(k.created_at, now),
         data_key_status(k.state, k.created_at, periods, now).describe(now))
        for k in keys
    ]
    return _table(header, rows)


def format_masters(masters: list[MasterRow], now: dt.datetime | None = None,
                   periods: CryptoperiodConfig | None = None) -> str:
    """The master keys as a table; the active one's age counts from its activation."""
    now = now or dt.datetime.now(dt.UTC)
    periods = periods or CryptoperiodConfig()
    header = ("MASTER", "LABEL", "STATE", "ACTIVATED", "AGE", "CRYPTOPERIOD")
    rows = [
        (m.kek, m.label, m.state, _when(m.activated_at),
         _age(m.activated_at, now) if m.activated_at else "-",
         master_key_status(m.state, m.activated_at, periods, now).describe(now))
        for m in masters
    ]
    return _table(header, rows)


def cmd_keys_list(args: argparse.Namespace, config: Config) -> int:
    tenant: str | None = getattr(args, "tenant", None)
    periods = config.cryptoperiod

    async def read(s: KeyService) -> tuple[list[KeyInfo], list[MasterRow]]:
        return await s.list_keys(tenant), await s.list_masters()

    keys, masters = _run(_with_service(config, read))
    now = dt.datetime.now(dt.UTC)
    if getattr(args, "masters", False):
        print(format_masters(masters, now, periods) if masters else "no master keys recorded")
        return 0
    if not keys:
        print(f"no data keys for tenant {tenant!r}" if tenant else "no data keys")
    else:
        print(format_keys(keys, now, periods))
    # The master key is not in this table, but an expired one must not go unnoticed.
    for m in masters:
        if master_key_status(m.state, m.activated_at, periods, now).expired:
            print(f"pgseal: warning: master key {m.kek} is past its cryptoperiod "
                  f"({periods.master_key_days} days since {_when(m.activated_at)}): run "
                  "`pgseal keys rotate-master` (see `pgseal keys list --masters`)",
                  file=sys.stderr)
    return 0


def cmd_keys_shred_report(args: argparse.Namespace, config: Config) -> int:
    """Print the evidence that a tenant was crypto-shredded; exit 1 unless it fully was."""
    report = _run(gather_evidence(config, args.tenant))
    print(report.render(dt.datetime.now(dt.UTC)))
    reasons = report.reasons()
    if reasons:
        raise PgsealError(reasons[0])
    return 0


def cmd_keys_create(args: argparse.Namespace, config: Config) -> int:
    key = _run(_with_service(config, lambda s: s.create_key(args.tenant)))
    print(f"tenant {key.tenant!r}: data key version {key.version} created (key id {key.key_id})")
    return 0


def cmd_keys_rotate(args: argparse.Namespace, config: Config) -> int:
    new, old = _run(_with_service(config, lambda s: s.rotate(args.tenant)))
    print(f"tenant {new.tenant!r}: version {new.version} active (key id {new.key_id}); "
          f"version {old.version} retired (key id {old.key_id}, still opens its cells)")
    return 0


def cmd_keys_destroy(args: argparse.Namespace, config: Config) -> int:
    if not getattr(args, "yes", False):
        raise PgsealError(
            f"refusing to destroy the data keys of tenant {args.tenant!r} without --yes: "
            "its encrypted data becomes unreadable for good"
        )
    destroyed = _run(_with_service(config, lambda s: s.destroy(args.tenant)))
    if not destroyed:
        print(f"tenant {args.tenant!r}: data keys were already destroyed")
        return 0
    versions = ", ".join(str(k.version) for k in destroyed)
    print(f"tenant {args.tenant!r}: destroyed {len(destroyed)} data key(s) (versions {versions}); "
          "its cells can no longer be opened. Old row versions may remain in PostgreSQL's "
          "WAL and backups: run `pgseal keys rotate-master` to make them useless too.")
    return 0


def cmd_keys_rotate_master(args: argparse.Namespace, config: Config) -> int:
    result = _run(_with_service(config, lambda s: s.rotate_master()))
    resumed = " (resumed an interrupted rotation)" if result.resumed else ""
    old = ", ".join(result.old_keks) or "none"
    print(f"master key rotated{resumed}: new id {result.new_kek}; {result.rewrapped} data "
          f"key(s) re-wrapped; destroyed on the token: {old}")
    return 0

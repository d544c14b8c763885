"""`pgseal hsm init` and `pgseal keys ...` (DESIGN.md 3).

Each handler prints its result for a human on stdout and returns 0; a failure raises
PgsealError or ConfigError, which the CLI prints as one line on stderr (exit 1).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from typing import TypeVar

from proxy.config import Config
from proxy.errors import PgsealError
from proxy.keys.hsm import HsmClient, ensure_softhsm_token, prepare_softhsm_env
from proxy.keys.model import KeyInfo
from proxy.keys.service import KeyService

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


def format_keys(keys: list[KeyInfo], now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.UTC)
    header = ("TENANT", "VERSION", "KEY_ID", "STATE", "CREATED", "AGE")
    rows = [
        (k.tenant, str(k.version), str(k.key_id), k.state,
         k.created_at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ"), _age(k.created_at, now))
        for k in keys
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


def cmd_keys_list(args: argparse.Namespace, config: Config) -> int:
    tenant: str | None = getattr(args, "tenant", None)
    keys = _run(_with_service(config, lambda s: s.list_keys(tenant)))
    if not keys:
        print(f"no data keys for tenant {tenant!r}" if tenant else "no data keys")
        return 0
    print(format_keys(keys))
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

"""`pgseal demo`: the whole product on embedded defaults, in one command.

A throwaway PostgreSQL (local server binaries), a SoftHSM2 token with a master
key, the keystore and audit trail, the example policy and schema, and the
proxy in front. Everything lives under `--dir` (default ./.pgseal/) and is
removed on Ctrl-C, after the demo has verified its audit trail. The HSM PINs are
random per run and stay in this process's environment only.

The demo empties its folder when it starts and when it stops, so it only takes a
folder that is new, empty, or marked as an earlier demo's (MARKER): pointed at a
folder of the user's, it refuses instead of deleting what is there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging.config
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from proxy.audit.verify import verify_jsonl
from proxy.config import (
    AuditConfig,
    AuditSinkConfig,
    Config,
    HostPort,
    KeystoreConfig,
    UpstreamTlsConfig,
)
from proxy.errors import PgsealError
from proxy.localpg import LocalPostgres, LocalPostgresError, free_port
from proxy.server.app import LOGGING, ProxyServer, install_event_loop_policy

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "policies" / "example.yaml"
SCHEMA = ROOT / "examples" / "schema.sql"
APP = ROOT / "examples" / "demo_app.py"
EXPLAIN_EXAMPLE = "SELECT name FROM patients WHERE ssn = $1"
# Written into the demo's folder: only a folder holding it may be emptied. Its text says
# whether the demo created the folder (then it removes the folder too when it stops).
MARKER = ".pgseal-demo"
_CREATED = "pgseal demo folder, removed when the demo stops\n"
_GIVEN = "pgseal demo folder, emptied when the demo stops\n"


def claim_dir(base: Path) -> bool:
    """Make `base` the demo's folder; return whether the demo created it.

    An earlier demo's leftovers (it was killed) are cleared away, its PostgreSQL stopped.
    A folder holding anything else is refused (PgsealError): the demo would delete it.
    """
    created = not base.exists()
    if not created:
        if not base.is_dir():
            raise PgsealError(f"demo --dir {base}: not a folder")
        marker = base / MARKER
        if marker.is_file():
            created = marker.read_text() == _CREATED
            if (base / "pg" / "data" / "postmaster.pid").exists():
                with contextlib.suppress(LocalPostgresError):
                    LocalPostgres(base / "pg").stop("immediate")
            _empty(base)
        elif any(base.iterdir()):
            raise PgsealError(
                f"demo --dir {base} is not empty and no earlier demo's folder: the demo "
                "deletes everything in its folder when it stops (give it a new or empty one)"
            )
    base.mkdir(parents=True, exist_ok=True)
    (base / MARKER).write_text(_CREATED if created else _GIVEN)
    return created


def release_dir(base: Path, created: bool) -> None:
    """Remove what the demo put in `base` (all of it: the folder was empty or the
    demo's), and `base` itself if the demo created it."""
    if not (base / MARKER).is_file():
        return  # not ours (claim_dir refused it, or someone swapped it): leave it alone
    _empty(base)
    if created:
        with contextlib.suppress(OSError):
            base.rmdir()


def _empty(base: Path) -> None:
    for entry in base.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()


def demo_config(config: Config, pg: LocalPostgres, base: Path) -> Config:
    os.environ.setdefault("PGSEAL_HSM_PIN", secrets.token_hex(8))
    os.environ.setdefault("PGSEAL_HSM_SO_PIN", secrets.token_hex(8))
    os.environ.pop("SOFTHSM2_CONF", None)  # the demo's own token, never the user's
    return replace(
        config,
        upstream=HostPort(pg.host, pg.port),
        upstream_tls=UpstreamTlsConfig(sslmode="disable"),
        hsm=replace(
            config.hsm,
            softhsm_dir=str(base / "hsm"),
            pin="env:PGSEAL_HSM_PIN",
            so_pin="env:PGSEAL_HSM_SO_PIN",
        ),
        keystore=KeystoreConfig(dsn=pg.dsn(), schema="pgseal", auto_create=True),
        audit=AuditConfig(sinks=(AuditSinkConfig("jsonl", path=str(base / "audit.jsonl")),)),
        policies=(str(POLICY),) if POLICY.exists() else (),
        base_dir=str(base),
    )


def prepare_keys(config: Config) -> None:
    """What `pgseal hsm init` does: the SoftHSM2 token and its master key."""
    from proxy.keys.hsm import HsmClient, ensure_softhsm_token

    ensure_softhsm_token(config)
    HsmClient(config.hsm).ensure_master_sync()


async def _serve(config: Config, pg: LocalPostgres) -> None:
    server = ProxyServer(config)
    try:
        await server.start()
    except OSError:
        # The default port is taken (another proxy?): the demo takes any free one.
        server = ProxyServer(replace(config, listen=HostPort(config.listen.host, free_port())))
        await server.start()
    dsn = f"postgresql://app@{config.listen.host}:{server.port}/postgres"
    direct = pg.dsn()
    if APP.exists():
        print("\n--- examples/demo_app.py ---", flush=True)
        await asyncio.to_thread(
            subprocess.run, [sys.executable, str(APP), dsn, direct], check=False, timeout=60
        )
    print()
    print("pgseal demo is running. Connect through the proxy (tenant acme) with:")
    print(f'    psql "{dsn}?options=-c%20pgseal.tenant%3Dacme"')
    print("    then e.g.: SELECT ssn, name, dob FROM patients;")
    print(f'PostgreSQL itself (to see what is stored): psql "{direct}"')
    if config.policies:
        # The demo's token PIN lives in this process only; these two need no key.
        policy, example = shlex.quote(config.policies[0]), shlex.quote(EXPLAIN_EXAMPLE)
        print("What the proxy does with a statement, and the policy against the schema:")
        print(f"    pgseal explain --policies {policy} {example}")
        print(f"    pgseal policy check --policies {policy} --dsn {shlex.quote(direct)}")
    print(
        f"Audit trail: {config.base_dir}/audit.jsonl (the demo verifies it as `pgseal audit "
        "verify FILE` does when it stops; until then its last record is not audit.stop)"
    )
    print("Ctrl-C stops everything and removes the demo's files.", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.shutdown(grace=2.0)  # writes audit.stop
    trail = Path(config.base_dir) / "audit.jsonl"
    if trail.exists():
        report = verify_jsonl(trail)
        print(f"pgseal audit verify: {report.summary()}", flush=True)


def cmd_demo(args: Any, config: Config) -> int:
    base = Path(args.dir).resolve()
    try:
        created = claim_dir(base)
    except PgsealError as exc:
        print(f"pgseal: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # cannot create or write it
        print(f"pgseal: demo --dir {base}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    logging.config.dictConfig({**LOGGING, "root": {"level": "WARNING", "handlers": ["stderr"]}})
    pg = LocalPostgres(base / "pg", settings={"log_statement": "'all'"})
    try:
        print(f"pgseal demo: starting PostgreSQL under {base}/pg ...", flush=True)
        pg.start()
        if SCHEMA.exists():
            pg.psql(SCHEMA.read_text())
        config = demo_config(config, pg, base)
        print(f"pgseal demo: SoftHSM2 token and master key under {base}/hsm ...", flush=True)
        prepare_keys(config)
        install_event_loop_policy()
        asyncio.run(_serve(config, pg))
    except (LocalPostgresError, PgsealError) as exc:
        print(f"pgseal: {exc}", file=sys.stderr)
        return 1
    finally:
        pg.destroy()
        release_dir(base, created)
        print("pgseal demo: stopped and cleaned up.", flush=True)
    return 0

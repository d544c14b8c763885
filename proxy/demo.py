"""`pgseal demo`: the whole product on embedded defaults, in one command.

A throwaway PostgreSQL (local server binaries), a SoftHSM2 token with a master
key, the keystore and audit trail, the example policy and schema, and the
proxy in front. Everything lives under `--dir` (default ./.pgseal/) and is
removed on Ctrl-C, after the demo has verified its audit trail. The HSM PINs are
random per run and stay in this process's environment only.

The demo only takes a folder that is new, empty, or an earlier demo's (DemoDir), and
only ever removes what it put there: pointed at a folder of the user's, it refuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
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
# What the demo puts in its folder, and all it ever removes there. Its token is not at
# `hsm/`: that is where `pgseal hsm init` keeps a real one by default (hsm.softhsm_dir
# .pgseal/hsm), and the demo's default folder is .pgseal too.
DEMO_ENTRIES = ("pg", "demo-hsm", "audit.jsonl")
# Written into the folder, and locked (flock) while a demo runs there. Its text says
# whether the demo created the folder (then it removes the folder too, if it is empty).
MARKER = ".pgseal-demo"
_CREATED = "pgseal demo folder (created by the demo), cleared when the demo stops\n"
_GIVEN = "pgseal demo folder, cleared when the demo stops\n"


class DemoDir:
    """The demo's folder: only a new or empty one, or an earlier demo's (its marker, and
    nothing but DEMO_ENTRIES), is taken; anything else is refused (PgsealError) rather
    than deleted. Held, by a lock on the marker, from claim() to release()."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.created = False
        self._lock: int | None = None

    def claim(self) -> None:
        base = self.base
        if not base.exists():
            base.mkdir(parents=True)
            self.created = True
        elif not base.is_dir():
            raise PgsealError(f"demo --dir {base}: not a folder")
        else:
            names = {entry.name for entry in base.iterdir()}
            if MARKER in names:
                self._take_over(names)
            elif names:
                raise PgsealError(
                    f"demo --dir {base} is not empty and no earlier demo's folder: the demo "
                    "would delete what it puts there (give it a new or empty one)"
                )
        self._hold(_CREATED if self.created else _GIVEN)

    def _take_over(self, names: set[str]) -> None:
        """An earlier demo's folder (it was killed): stop its PostgreSQL, clear its files."""
        base, marker = self.base, self.base / MARKER
        text = "" if marker.is_symlink() or not marker.is_file() else marker.read_text()
        if text not in (_CREATED, _GIVEN):
            raise PgsealError(f"demo --dir {base}: {MARKER} there is not a demo's marker")
        others = sorted(names - {MARKER, *DEMO_ENTRIES})
        if others:
            raise PgsealError(
                f"demo --dir {base} holds files no demo made ({', '.join(others[:3])}): "
                "the demo leaves such a folder alone (give it a new or empty one)"
            )
        self._hold(text)  # refuses while another demo runs there
        self.created = text == _CREATED
        if (base / "pg" / "data" / "postmaster.pid").exists():
            with contextlib.suppress(LocalPostgresError):
                LocalPostgres(base / "pg").stop("immediate")
        self._remove(DEMO_ENTRIES)

    def _hold(self, text: str) -> None:
        if self._lock is None:
            fd = os.open(self.base / MARKER, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise PgsealError(
                    f"demo --dir {self.base}: another pgseal demo is running there"
                ) from None
            self._lock = fd
        os.ftruncate(self._lock, 0)
        os.pwrite(self._lock, text.encode(), 0)

    def release(self, keep: tuple[str, ...] = ()) -> None:
        """Remove the demo's entries but `keep`, the marker last (a failure midway leaves a
        folder the next demo still knows as its own), and the folder if the demo made it and
        nothing else was put there meanwhile."""
        if self._lock is None:
            return
        self._remove(tuple(name for name in DEMO_ENTRIES if name not in keep))
        if not keep:
            with contextlib.suppress(FileNotFoundError):
                (self.base / MARKER).unlink()
        os.close(self._lock)
        self._lock = None
        if self.created and not keep:
            with contextlib.suppress(OSError):  # not empty: what the user put there stays
                self.base.rmdir()

    def _remove(self, names: tuple[str, ...]) -> None:
        for name in names:
            entry = self.base / name
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
            softhsm_dir=str(base / "demo-hsm"),
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


async def _serve(config: Config, pg: LocalPostgres) -> bool:
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
        # As this demo was started (.venv/bin/pgseal from `make run`), on PATH or not.
        me = [sys.argv[0]]
        if Path(sys.argv[0]).name != "pgseal":
            me = [sys.executable, "-m", "proxy"]
        policy = config.policies[0]
        print("What the proxy does with a statement, and the policy against the schema:")
        print("    " + shlex.join([*me, "explain", "--policies", policy, EXPLAIN_EXAMPLE]))
        print("    " + shlex.join([*me, "policy", "check", "--policies", policy, "--dsn", direct]))
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
    try:
        report = verify_jsonl(trail)
    except OSError as exc:
        print(f"pgseal audit verify: cannot read {trail}: {exc.strerror or exc}", flush=True)
        return False
    print(f"pgseal audit verify: {report.summary()}", flush=True)
    return report.ok


def cmd_demo(args: Any, config: Config) -> int:
    folder = DemoDir(Path(args.dir).resolve())
    base = folder.base
    try:
        folder.claim()
    except PgsealError as exc:
        print(f"pgseal: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # cannot create or write it
        print(f"pgseal: demo --dir {base}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    logging.config.dictConfig({**LOGGING, "root": {"level": "WARNING", "handlers": ["stderr"]}})
    pg: LocalPostgres | None = None
    trail_ok = True
    try:
        pg = LocalPostgres(base / "pg", settings={"log_statement": "'all'"})
        print(f"pgseal demo: starting PostgreSQL under {base}/pg ...", flush=True)
        pg.start()
        if SCHEMA.exists():
            pg.psql(SCHEMA.read_text())
        config = demo_config(config, pg, base)
        print(f"pgseal demo: SoftHSM2 token and master key under {base}/demo-hsm ...", flush=True)
        prepare_keys(config)
        install_event_loop_policy()
        trail_ok = asyncio.run(_serve(config, pg))
    except (LocalPostgresError, PgsealError) as exc:
        print(f"pgseal: {exc}", file=sys.stderr)
        return 1
    finally:
        if pg is not None:
            pg.destroy()
        # A trail that did not verify is kept for a look (the next demo clears it).
        folder.release(keep=() if trail_ok else ("audit.jsonl",))
        print("pgseal demo: stopped and cleaned up.", flush=True)
    if not trail_ok:
        print(f"pgseal: the demo's audit trail did not verify: {base}/audit.jsonl kept",
              file=sys.stderr)
        return 1
    return 0

"""Migration and rekey throughput while a pgseal proxy serves a pgbench load.

    python -m bench.migrate                 # 1,000,000 rows
    python -m bench.migrate --rows 100000   # quicker

One run, in a temp dir removed on exit (also on Ctrl-C / SIGTERM), reusing
`bench.common`: a throwaway PostgreSQL tuned for benchmarking, `pgbench -i`, a SoftHSM2
token with its master key, the keystore in the same database, and `pgseal serve`
(pass-through) in front of it. A table of N rows over T tenants gets a plaintext `ssn`.

One pgbench (`-S`, `-P 1`, through the proxy) runs for the whole benchmark; its
per-second progress lines are split into windows:

  before   --baseline seconds with nothing else running
  migrate  `pgseal migrate encrypt public.bench_people.ssn` (the CLI, as a user runs it)
  rekey    every tenant rotated, then `pgseal rekey --all`
  after    --baseline seconds with nothing else running again

and the table shows rows (cells) per second of each job, as the job reports it (its own
elapsed time, process start excluded) and end to end, with pgbench's mean TPS in its
window and the ratio to the mean of `before` and `after` (the rest of the machine's load
drifts; on a busy machine compare the two quiet windows first). Results go to
bench/results/migrate-*.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.common import (
    REPO,
    BenchError,
    Cleanup,
    Server,
    init_pgbench,
    machine_info,
    pgbench_command,
    scratch_dir,
    signals_raise,
    start_pgseal,
    start_postgres,
    stop_process,
    write_results,
)
from proxy.localpg import find_pg_bindir

_PROGRESS = re.compile(r"^progress: ([0-9.]+) s, ([0-9.]+) tps", re.MULTILINE)
_REPORTED = re.compile(r"([0-9,]+) (?:rows sealed|cells re-sealed) in ([0-9.]+) s")


@dataclass
class Window:
    name: str
    start: float
    end: float
    units: int = 0  # rows or cells the job did
    job_seconds: float = 0.0  # as the job reports it
    extra: dict[str, Any] = field(default_factory=dict)


class BackgroundPgbench:
    """pgbench with -P 1 for as long as we need; its progress lines, timestamped."""

    def __init__(self, server: Server, mode: str, clients: int) -> None:
        cmd = pgbench_command(
            server, mode=mode, clients=clients, duration=24 * 3600, log_prefix=None
        )
        cmd[-1:-1] = ["-P", "1"]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
        )
        self.started = time.monotonic()
        self.samples: list[tuple[float, float]] = []  # (end of the second, tps)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            found = _PROGRESS.match(line)
            if found:
                self.samples.append((self.started + float(found.group(1)), float(found.group(2))))

    def tps(self, start: float, end: float) -> float:
        """Mean TPS over the whole seconds that lie inside [start, end]."""
        inside = [tps for t, tps in self.samples if start + 1.0 <= t <= end]
        if not inside:  # a window shorter than a second: the nearest sample
            later = [tps for t, tps in self.samples if t >= end]
            return later[0] if later else float("nan")
        return sum(inside) / len(inside)

    def stop(self) -> None:
        stop_process(self.proc, timeout=5)
        self._reader.join(5)


def _keys_config(work: Path, dsn: str, policy: Path) -> Path:
    """A pgseal config for the jobs: its own SoftHSM2 token, keystore, audit file."""
    os.environ.setdefault("PGSEAL_HSM_PIN", secrets.token_hex(8))
    os.environ.setdefault("PGSEAL_HSM_SO_PIN", secrets.token_hex(8))
    os.environ.pop("SOFTHSM2_CONF", None)  # our own token, never the user's
    raw = {
        "hsm": {
            "token_label": "pgseal-bench",
            "pin": "env:PGSEAL_HSM_PIN",
            "so_pin": "env:PGSEAL_HSM_SO_PIN",
            "master_key_label": "pgseal-bench-master",
            "softhsm_dir": str(work / "hsm"),
        },
        "keystore": {"dsn": dsn, "schema": "pgseal", "auto_create": True},
        "audit": {"sinks": [{"jsonl": str(work / "audit.jsonl")}]},
        "policies": [str(policy)],
    }
    path = work / "pgseal.yaml"
    path.write_text(yaml.safe_dump(raw))
    from proxy.config import load_config
    from proxy.keys.hsm import HsmClient, ensure_softhsm_token

    config = load_config(path, environ={})
    ensure_softhsm_token(config)  # what `pgseal hsm init` does
    HsmClient(config.hsm).ensure_master_sync()
    return path


def _psql(server: Server, sql: str) -> str:
    psql = find_pg_bindir() / "psql"
    result = subprocess.run(
        [
            str(psql) if psql.exists() else "psql",
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            *server.dsn_args(),
            "-c",
            sql,
            "postgres",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise BenchError(f"psql failed: {result.stderr.strip()}")
    return result.stdout.strip()


def _pgseal(*args: str) -> tuple[float, str]:
    """Run the pgseal CLI; (wall seconds, stdout)."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ),
        check=False,
    )
    wall = time.monotonic() - started
    if result.returncode != 0:
        raise BenchError(f"pgseal {' '.join(args[:2])} failed: {result.stderr.strip()[-300:]}")
    return wall, result.stdout


async def _rotate_all(config_path: Path, tenants: list[str]) -> None:
    from proxy.config import load_config
    from proxy.keys.service import KeyService

    service = await KeyService.open(load_config(config_path, environ={}), listen=False)
    try:
        for tenant in tenants:
            await service.rotate(tenant)
    finally:
        await service.close()


def _job(window: Window, stdout: str, wall: float) -> None:
    found = _REPORTED.search(stdout)
    if not found:
        raise BenchError(f"no throughput line in: {stdout[:300]}")
    window.units = int(found.group(1).replace(",", ""))
    window.job_seconds = float(found.group(2))
    window.extra["wall_seconds"] = round(wall, 2)


def run(args: argparse.Namespace) -> int:
    payload: dict[str, Any] = {
        "args": vars(args),
        "machine": machine_info(),
        "started": time.time(),
    }
    tenants = [f"tenant{i:02d}" for i in range(args.tenants)]
    windows: list[Window] = []
    with Cleanup() as cleanup, signals_raise():
        work = scratch_dir(cleanup, "pgseal-bench-migrate-")
        print(
            f"bench: PostgreSQL + pgbench -i -s {args.scale} + {args.rows:,} rows ...", flush=True
        )
        pg, direct = start_postgres(cleanup, work)
        init_pgbench(direct, args.scale)
        _psql(
            direct,
            "CREATE TABLE bench_people (id bigint PRIMARY KEY, tenant_id text NOT NULL, "
            "ssn text, note text); "
            "INSERT INTO bench_people SELECT g, 'tenant' || lpad((g % "
            f"{args.tenants})::text, 2, '0'), 'ssn-' || g, 'note ' || g "
            f"FROM generate_series(1, {args.rows}) g",
        )
        _psql(direct, "VACUUM ANALYZE bench_people")
        policy = work / "policy.yaml"
        policy.write_text(
            yaml.safe_dump(
                {
                    "version": 1,
                    "tables": {
                        "public.bench_people": {
                            "tenant": {"column": "tenant_id"},
                            "columns": {"ssn": {"type": "text", "search": "equality"}},
                        }
                    },
                }
            )
        )
        config = _keys_config(work, pg.dsn(), policy)
        proxy = start_pgseal(cleanup, work, direct)
        pacing = ["--batch", str(args.batch)] + (["--rate", str(args.rate)] if args.rate else [])

        print(
            f"bench: pgbench -S -M {args.mode} -c {args.clients} through pgseal for the "
            "whole run ...",
            flush=True,
        )
        load = BackgroundPgbench(proxy, args.mode, args.clients)
        cleanup.add("pgbench", load.stop)
        time.sleep(args.warmup)
        before = Window("before", time.monotonic(), 0.0)
        time.sleep(args.baseline)
        before.end = time.monotonic()
        windows.append(before)

        print("bench: pgseal migrate encrypt public.bench_people.ssn ...", flush=True)
        migrate = Window("migrate encrypt", time.monotonic(), 0.0)
        wall, out = _pgseal(
            "migrate", "encrypt", "public.bench_people.ssn", "--config", str(config), *pacing
        )
        migrate.end = time.monotonic()
        _job(migrate, out, wall)
        windows.append(migrate)

        asyncio.run(_rotate_all(config, tenants))
        time.sleep(1.0)
        print(f"bench: {len(tenants)} tenants rotated; pgseal rekey --all ...", flush=True)
        rekey = Window("rekey --all", time.monotonic(), 0.0)
        wall, out = _pgseal("rekey", "--all", "--config", str(config), *pacing)
        rekey.end = time.monotonic()
        _job(rekey, out, wall)
        windows.append(rekey)
        # The load alone once more: the machine's other work drifts, and the reference
        # is the mean of the two quiet windows around the jobs.
        after = Window("after", time.monotonic(), 0.0)
        time.sleep(args.baseline)
        after.end = time.monotonic()
        windows.append(after)
        time.sleep(1.5)  # the last progress line of the window
        load.stop()
        base_tps = (load.tps(before.start, before.end) + load.tps(after.start, after.end)) / 2
        rows: list[dict[str, Any]] = []
        for w in windows:
            tps = load.tps(w.start, w.end)
            rows.append(
                {
                    "phase": w.name,
                    "units": w.units,
                    "job_seconds": w.job_seconds,
                    "per_s": (w.units / w.job_seconds) if w.job_seconds else None,
                    "per_s_wall": (w.units / w.extra["wall_seconds"]) if w.units else None,
                    "pgbench_tps": tps,
                    "tps_ratio": tps / base_tps if base_tps else None,
                    "window_s": w.end - w.start,
                    **w.extra,
                }
            )
        payload["rows"] = rows
        payload["samples"] = load.samples
    payload["finished"] = time.time()
    path = write_results("migrate", payload)
    print()
    print(
        f"{args.rows:,} rows over {args.tenants} tenants, --batch {args.batch}"
        + (f" --rate {args.rate:g}" if args.rate else "")
        + f"; pgbench -S -M {args.mode} -c {args.clients} through pgseal all along; "
        f"{os.cpu_count()} cpus"
    )
    print(
        f"{'phase':<18}{'units':>12}{'job s':>9}{'units/s':>10}{'end-to-end/s':>14}"
        f"{'pgbench TPS':>13}{'vs quiet':>10}"
    )
    for r in rows:
        per = f"{r['per_s']:,.0f}" if r["per_s"] else "-"
        e2e = f"{r['per_s_wall']:,.0f}" if r["per_s_wall"] else "-"
        ratio = f"{r['tps_ratio']:.2f}" if r["tps_ratio"] else "-"
        print(
            f"{r['phase']:<18}{r['units']:>12,}{r['job_seconds']:>9.1f}{per:>10}{e2e:>14}"
            f"{r['pgbench_tps']:>13,.0f}{ratio:>10}"
        )
    print(f"\nresults: {path}")
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.migrate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rows", type=int, default=1_000_000, help="rows in the table (1,000,000)")
    p.add_argument("--tenants", type=int, default=10, help="tenants the rows spread over (10)")
    p.add_argument("--batch", type=int, default=1000, help="pgseal --batch (1000)")
    p.add_argument("--rate", type=float, help="pgseal --rate (default: no limit)")
    p.add_argument("--clients", type=int, default=4, help="pgbench clients (4)")
    p.add_argument("--mode", default="prepared", help="pgbench -M (prepared)")
    p.add_argument("--scale", type=int, default=10, help="pgbench -i scale (10)")
    p.add_argument("--baseline", type=float, default=8.0, help="seconds of load alone (8)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring (2)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        return run(parse(sys.argv[1:] if argv is None else argv))
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

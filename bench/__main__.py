"""`python -m bench [COMMAND] [options]` — what `make bench` runs.

Commands:
  all          (default) pass-through benchmark, then the 1,000-idle-connections check
  passthrough  pgbench -S via direct / PgBouncer / pgseal / pgseal --workers 2
  idle         only the idle-connections RSS check
  profile      proxy CPU per transaction (/proc), perf and py-spy profiles under pgbench load
  encrypted    pgbench on three encrypted columns via pgseal vs the plaintext twin via pgseal
               and direct (bench/encrypted.py); target encrypted >= 0.7x plain-through-pgseal
  cells, keys  the crypto / key-service microbenchmarks (bench/bench_cells.py, bench/bench_keys.py)
  datapath     CPU of the pure core per transaction of the encrypted benchmark, in-process
               (bench/bench_datapath.py): quiet enough to compare two versions of the data path
  migrate      migration / rekey throughput under load (bench/migrate.py)
  (cells, keys, datapath and migrate take their own options after the command: `-- --help`)

`--quick` is a short smoke run (1 round of 3 s per configuration).
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

from bench.common import BenchError
from bench.passthrough import CLIENTS, MODES, Plan, main, profile

SCRIPTS = {
    "cells": "bench_cells.py",
    "keys": "bench_keys.py",
    "migrate": "migrate.py",
    "datapath": "bench_datapath.py",
}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "command",
        nargs="?",
        default="all",
        choices=["all", "passthrough", "idle", "profile", "encrypted", *SCRIPTS],
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="1 round of 3 s per configuration, 200 idle connections",
    )
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 6; profile: 3)")
    p.add_argument("--duration", type=float, help="seconds per pgbench run (default 8)")
    p.add_argument("--scale", type=int, default=10, help="pgbench -i scale (default 10)")
    p.add_argument("--modes", default=",".join(MODES), help="pgbench -M modes, comma-separated")
    p.add_argument(
        "--clients", default=",".join(map(str, CLIENTS)), help="client counts, comma-separated"
    )
    p.add_argument("--no-workers2", action="store_true", help="skip the pgseal --workers 2 target")
    p.add_argument(
        "--idle-connections", type=int, help="connections for the idle check (default 1000)"
    )
    p.add_argument("--profile-mode", default="prepared", help="profile: pgbench -M mode")
    p.add_argument("--profile-clients", type=int, default=8, help="profile: pgbench clients")
    p.add_argument(
        "--profile-seconds", type=float, default=5, help="profile: py-spy record duration"
    )
    p.add_argument("--workers", type=int, default=1, help="profile, encrypted: pgseal --workers N")
    p.add_argument("--rows", type=int, help="encrypted: rows per tenant per table (10000)")
    p.add_argument("--tenants", type=int, default=4, help="encrypted: tenants (default 4)")
    p.add_argument(
        "--pyspy",
        type=float,
        default=0,
        metavar="S",
        help="encrypted: then py-spy the proxy for S seconds under the encrypted load",
    )
    p.add_argument(
        "--pure",
        action="store_true",
        help="encrypted: also both pgseal loads through the pure Python build (PGSEAL_PURE=1)",
    )
    p.add_argument(
        "--baseline",
        metavar="DIR",
        help="encrypted: also both pgseal loads through a pgseal run from the checkout DIR "
        "(with DIR/.venv when it has one), to measure a change within one run",
    )
    return p.parse_args(argv)


def run_script(command: str, rest: list[str]) -> int:
    """Hand over to another benchmark with its own options (`python -m bench keys -- ...`)."""
    script = Path(__file__).resolve().parent / SCRIPTS[command]
    if not script.exists():
        print(f"bench: {script.name} is not there yet", file=sys.stderr)
        return 1
    if rest[:1] == ["--"]:
        rest = rest[1:]
    sys.argv = [str(script), *rest]
    if command == "migrate":
        runpy.run_module("bench.migrate", run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(str(script), run_name="__main__")
    return 0


def run(argv: list[str]) -> int:
    if argv[:1] and argv[0] in SCRIPTS:
        return run_script(argv[0], argv[1:])
    args = parse(argv)
    if args.command in SCRIPTS:
        return run_script(args.command, [])
    if args.command == "encrypted":
        from bench.encrypted import EncPlan
        from bench.encrypted import main as encrypted_main

        return encrypted_main(
            EncPlan(
                rounds=args.rounds or (1 if args.quick else 5),
                duration=args.duration or (3.0 if args.quick else 10.0),
                rows=args.rows or (2000 if args.quick else 10_000),
                tenants=args.tenants,
                warmup=1.0 if args.quick else 3.0,
                profile_seconds=args.pyspy,
                workers=args.workers,
                pure=args.pure,
                baseline=args.baseline,
            )
        )
    plan = Plan(
        rounds=args.rounds or (1 if args.quick else (3 if args.command == "profile" else 6)),
        duration=args.duration or (3.0 if args.quick else 8.0),
        scale=args.scale,
        modes=tuple(m for m in args.modes.split(",") if m),
        clients=tuple(int(c) for c in args.clients.split(",") if c),
        workers2=not args.no_workers2,
        idle_connections=args.idle_connections
        if args.idle_connections is not None
        else (200 if args.quick else 1000),
        warmup=1.0 if args.quick else 2.0,
    )
    bad = set(plan.modes) - set(MODES)
    if bad:
        print(f"bench: unknown pgbench mode(s): {', '.join(sorted(bad))}", file=sys.stderr)
        return 2
    if args.command == "profile":
        return profile(
            plan,
            mode=args.profile_mode,
            clients=args.profile_clients,
            seconds=args.profile_seconds,
            workers=args.workers,
        )
    return main(
        plan,
        passthrough=args.command in ("all", "passthrough"),
        idle=args.command in ("all", "idle"),
    )


def entry() -> int:
    try:
        return run(sys.argv[1:])
    except KeyboardInterrupt:
        print("\nbench: interrupted; everything it started has been stopped", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(entry())

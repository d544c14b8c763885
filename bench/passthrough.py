"""Pass-through benchmark: pgbench -S through pgseal vs PgBouncer vs direct.

One throwaway PostgreSQL (tuned: no statement logging), `pgbench -i -s 10`,
PgBouncer in session mode, pgseal (`python -m proxy serve`, plaintext upstream)
with 1 worker and with `--workers 2`, all in the same run. Every round runs
every target once per (mode, clients) configuration, back to back, in a
rotating order, so that noise from the rest of the machine hits all targets
alike; the table shows the median over rounds of each figure. Latency
percentiles come from pgbench's per-transaction logs (`--log`), CPU per
transaction of the proxies from /proc/PID/stat.

Then the idle check: a fresh pgseal, 1,000 client connections that each finish
a real startup (StartupMessage .. ReadyForQuery) through it and stay idle, and
the proxy's VmRSS before, with them, and after they close.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    CLK_TCK,
    BenchError,
    Cleanup,
    RunResult,
    Server,
    child_pids,
    cpu_ticks,
    init_pgbench,
    machine_info,
    machine_ticks,
    median,
    raise_fd_limit,
    rss_kib,
    run_pgbench,
    scratch_dir,
    signals_raise,
    start_pgbouncer,
    start_pgseal,
    start_postgres,
    stop_process,
    write_results,
)

MODES = ("simple", "extended", "prepared")
CLIENTS = (1, 8)

# Targets (from the issue): pgseal >= 0.9x PgBouncer's TPS at 8 clients in every mode;
# at most 100 µs added p50 at 1 client over direct; 1,000 idle connections <= 200 MB RSS.
TPS_RATIO_TARGET = 0.9
ADDED_P50_TARGET_US = 100.0
IDLE_RSS_TARGET_MB = 200.0


@dataclass
class Plan:
    rounds: int = 6
    duration: float = 8.0
    scale: int = 10
    modes: Sequence[str] = MODES
    clients: Sequence[int] = CLIENTS
    workers2: bool = True
    idle_connections: int = 1000
    warmup: float = 2.0


def proxy_pids(server: Server) -> list[int]:
    """The processes that do a target's work (the workers, for `--workers N`)."""
    if server.pid is None or server.name == "direct":
        return []
    kids = child_pids(server.pid) if server.name != "pgbouncer" else []
    return kids or [server.pid]


def _ticks(pids: Sequence[int]) -> tuple[int, int]:
    user = sys_ = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            u, s = cpu_ticks(pid)
            user += u
            sys_ += s
    return user, sys_


def measured_run(
    server: Server, mode: str, clients: int, duration: float, logdir: Path
) -> RunResult:
    pids = proxy_pids(server)
    before = _ticks(pids)
    machine_before = machine_ticks()
    result = run_pgbench(server, mode=mode, clients=clients, duration=duration, logdir=logdir)
    machine_after = machine_ticks()
    after = _ticks(pids)
    busy = machine_after[0] - machine_before[0]
    total = busy + machine_after[1] - machine_before[1]
    result.extra["machine_busy"] = round(busy / total, 3) if total else None
    if pids:
        per_tick_us = 1e6 / CLK_TCK
        result.extra["proxy_user_us_per_tx"] = (
            (after[0] - before[0]) * per_tick_us / result.transactions
        )
        result.extra["proxy_sys_us_per_tx"] = (
            (after[1] - before[1]) * per_tick_us / result.transactions
        )
    return result


# --- the pass-through rounds ----------------------------------------------------------


def run_rounds(plan: Plan, targets: list[Server], logdir: Path) -> list[RunResult]:
    results: list[RunResult] = []
    configs = [(mode, c) for mode in plan.modes for c in plan.clients]
    total = plan.rounds * len(configs) * len(targets)
    done = 0
    started = time.monotonic()
    for rnd in range(plan.rounds):
        for i, (mode, clients) in enumerate(configs):
            # Rotate who goes first, so no target always runs right after a config change.
            shift = (rnd + i) % len(targets)
            for server in targets[shift:] + targets[:shift]:
                r = measured_run(server, mode, clients, plan.duration, logdir)
                r.extra["round"] = rnd
                results.append(r)
                done += 1
                eta = (time.monotonic() - started) / done * (total - done)
                print(
                    f"  round {rnd + 1}/{plan.rounds} {mode:<8} c={clients} {server.name:<10} "
                    f"{r.tps:>9.0f} tps  p50 {r.p50_us:>5.0f} µs  p99 {r.p99_us:>6.0f} µs"
                    f"   [{done}/{total}, ~{eta / 60:.1f} min left]",
                    flush=True,
                )
    return results


def _tps_ratio(a: RunResult, b: RunResult) -> float:
    return a.tps / b.tps


def _p50_diff(a: RunResult, b: RunResult) -> float:
    return a.p50_us - b.p50_us


def _paired(
    by_round: dict[tuple[str, int], RunResult],
    name: str,
    other: str,
    fn: Callable[[RunResult, RunResult], float],
) -> float | None:
    rounds = sorted({rnd for _, rnd in by_round})
    vals = [
        fn(by_round[(name, rnd)], by_round[(other, rnd)])
        for rnd in rounds
        if (name, rnd) in by_round and (other, rnd) in by_round
    ]
    return median(vals) if vals else None


def summarize(
    results: list[RunResult], plan: Plan, target_names: list[str]
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for mode in plan.modes:
        for clients in plan.clients:
            med: dict[str, dict[str, float]] = {}
            for name in target_names:
                runs = [
                    r
                    for r in results
                    if r.target == name and r.mode == mode and r.clients == clients
                ]
                if not runs:
                    continue
                entry = {
                    "tps": median([r.tps for r in runs]),
                    "p50_us": median([r.p50_us for r in runs]),
                    "p99_us": median([r.p99_us for r in runs]),
                    "rounds": len(runs),
                }
                cpu = [
                    r.extra["proxy_user_us_per_tx"]
                    for r in runs
                    if "proxy_user_us_per_tx" in r.extra
                ]
                if cpu:
                    entry["user_us_per_tx"] = median(cpu)
                    entry["sys_us_per_tx"] = median([r.extra["proxy_sys_us_per_tx"] for r in runs])
                med[name] = entry
            # Ratios and differences are taken per round, between runs that followed each
            # other within minutes, then the median over rounds: a burst of load from the
            # rest of the machine then spoils one pair, not the comparison.
            by_round = {
                (r.target, r.extra["round"]): r
                for r in results
                if r.mode == mode and r.clients == clients
            }
            for name, entry in med.items():
                row: dict[str, Any] = {"mode": mode, "clients": clients, "target": name, **entry}
                if name != "direct" and "direct" in med:
                    row["x_direct"] = _paired(by_round, name, "direct", _tps_ratio)
                    row["added_p50_us"] = _paired(by_round, name, "direct", _p50_diff)
                if name.startswith("pgseal") and "pgbouncer" in med:
                    row["x_pgbouncer"] = _paired(by_round, name, "pgbouncer", _tps_ratio)
                rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    def f(v: Any, fmt: str) -> str:
        return format(v, fmt) if v is not None else ""

    header = (
        f"{'mode':<9}{'clients':>7}  {'target':<10}{'TPS':>9}{'p50 µs':>8}{'p99 µs':>8}"
        f"{'/direct':>9}{'/pgbouncer':>11}{'+p50 µs':>9}{'cpu u+s µs/tx':>15}"
    )
    print(header)
    print("-" * len(header))
    last = None
    for row in rows:
        key = (row["mode"], row["clients"])
        lead = f"{row['mode']:<9}{row['clients']:>7}" if key != last else " " * 16
        if key != last and last is not None:
            print()
        last = key
        cpu = ""
        if "user_us_per_tx" in row:
            cpu = f"{row['user_us_per_tx']:.1f}+{row['sys_us_per_tx']:.1f}"
        print(
            f"{lead}  {row['target']:<10}{row['tps']:>9.0f}"
            f"{row['p50_us']:>8.0f}{row['p99_us']:>8.0f}"
            f"{f(row.get('x_direct'), '.3f'):>9}{f(row.get('x_pgbouncer'), '.3f'):>11}"
            f"{f(row.get('added_p50_us'), '+.0f'):>9}{cpu:>15}"
        )


def check_targets(rows: list[dict[str, Any]], idle: dict[str, Any] | None) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    for row in rows:
        if row["target"] != "pgseal":
            continue
        if row["clients"] == 8 and "x_pgbouncer" in row:
            checks.append(
                {
                    "what": f"TPS pgseal/pgbouncer, {row['mode']}, 8 clients",
                    "value": round(row["x_pgbouncer"], 3),
                    "target": f">= {TPS_RATIO_TARGET}",
                    "ok": row["x_pgbouncer"] >= TPS_RATIO_TARGET,
                }
            )
        if row["clients"] == 1 and "added_p50_us" in row:
            checks.append(
                {
                    "what": f"added p50 over direct, {row['mode']}, 1 client (µs)",
                    "value": round(row["added_p50_us"]),
                    "target": f"<= {ADDED_P50_TARGET_US:.0f}",
                    "ok": row["added_p50_us"] <= ADDED_P50_TARGET_US,
                }
            )
    if idle is not None:
        mb = idle["rss_with_kib"] / 1024
        checks.append(
            {
                "what": f"proxy RSS with {idle['connections']} idle connections (MB)",
                "value": round(mb, 1),
                "target": f"<= {IDLE_RSS_TARGET_MB:.0f}",
                "ok": mb <= IDLE_RSS_TARGET_MB,
            }
        )
    return checks


def print_checks(checks: list[dict[str, Any]]) -> None:
    for c in checks:
        mark = "ok  " if c["ok"] else "MISS"
        print(f"  [{mark}] {c['what']:<52} {c['value']!s:>8}  (target {c['target']})")


# --- idle connections ----------------------------------------------------------------------


def _startup_message(user: str, database: str) -> bytes:
    params = (
        b"".join(
            k.encode() + b"\0" + v.encode() + b"\0"
            for k, v in (
                ("user", user),
                ("database", database),
                ("application_name", "pgseal-bench-idle"),
            )
        )
        + b"\0"
    )
    return struct.pack("!II", 8 + len(params), 196608) + params


async def _open_idle(host: str, port: int, sem: asyncio.Semaphore) -> asyncio.StreamWriter:
    """Connect and finish a real startup through the proxy (until ReadyForQuery)."""
    async with sem:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(_startup_message("postgres", "postgres"))
        while True:
            head = await reader.readexactly(5)
            body = await reader.readexactly(struct.unpack("!I", head[1:])[0] - 4)
            if head[:1] == b"E":
                writer.close()
                raise BenchError(f"startup through the proxy failed: {body[:200]!r}")
            if head[:1] == b"Z":
                return writer


async def _idle_check(server: Server, n: int) -> dict[str, Any]:
    assert server.pid is not None
    await asyncio.sleep(0.5)
    before = rss_kib(server.pid)
    sem = asyncio.Semaphore(16)  # PostgreSQL forks a backend per connection: do not stampede
    started = time.monotonic()
    writers: list[asyncio.StreamWriter] = []
    try:
        tasks = [asyncio.create_task(_open_idle(server.host, server.port, sem)) for _ in range(n)]
        try:
            for t in tasks:
                writers.append(await t)
        finally:
            for t in tasks:
                t.cancel()
        opened_s = time.monotonic() - started
        await asyncio.sleep(1.0)
        with_them = rss_kib(server.pid)
    finally:
        for w in writers:
            with contextlib.suppress(Exception):
                w.write(b"X\0\0\0\4")
                w.close()
        for w in writers:
            with contextlib.suppress(Exception):
                await w.wait_closed()
    await asyncio.sleep(2.0)
    after = rss_kib(server.pid)
    return {
        "connections": n,
        "open_seconds": round(opened_s, 2),
        "rss_before_kib": before,
        "rss_with_kib": with_them,
        "rss_after_close_kib": after,
        "per_connection_kib": round((with_them - before) / n, 1),
    }


def idle_check(cleanup: Cleanup, work: Path, upstream: Server, n: int) -> dict[str, Any]:
    """A fresh single-worker pgseal, so that 'before' is a just-started proxy."""
    raise_fd_limit(4 * n + 1024)
    proxy = start_pgseal(cleanup, work, upstream, workers=1, name="pgseal-idle")
    result = asyncio.run(_idle_check(proxy, n))
    print(
        f"pgseal RSS: {result['rss_before_kib'] / 1024:.1f} MB idle, "
        f"{result['rss_with_kib'] / 1024:.1f} MB with {n} idle connections "
        f"({result['per_connection_kib']:.1f} KiB each; opened in {result['open_seconds']:.1f}s), "
        f"{result['rss_after_close_kib'] / 1024:.1f} MB after they closed"
    )
    return result


# --- entry point ---------------------------------------------------------------------------


def main(plan: Plan, *, passthrough: bool = True, idle: bool = True) -> int:
    raise_fd_limit()
    payload: dict[str, Any] = {
        "plan": asdict(plan),
        "machine": machine_info(),
        "started": time.time(),
    }
    with Cleanup() as cleanup, signals_raise():
        work = scratch_dir(cleanup, "pgseal-bench-")
        print(f"bench: PostgreSQL + pgbench -i -s {plan.scale} ...", flush=True)
        _, direct = start_postgres(cleanup, work)
        init_pgbench(direct, plan.scale)
        rows: list[dict[str, Any]] = []
        idle_result = None
        if passthrough:
            targets = [
                direct,
                start_pgbouncer(cleanup, work, direct, pool_size=max(plan.clients) + 4),
            ]
            targets.append(start_pgseal(cleanup, work, direct, workers=1, name="pgseal"))
            if plan.workers2:
                targets.append(start_pgseal(cleanup, work, direct, workers=2, name="pgseal-w2"))
            logdir = work / "logs"
            logdir.mkdir()
            if plan.warmup > 0:
                for server in targets:
                    run_pgbench(
                        server,
                        mode="prepared",
                        clients=max(plan.clients),
                        duration=max(1.0, plan.warmup),
                        logdir=logdir,
                    )
            print(
                f"bench: {plan.rounds} rounds x {len(plan.modes) * len(plan.clients)} configs x "
                f"{len(targets)} targets x {plan.duration:.0f}s",
                flush=True,
            )
            results = run_rounds(plan, targets, logdir)
            rows = summarize(results, plan, [t.name for t in targets])
            payload["runs"] = [asdict(r) for r in results]
            payload["summary"] = rows
            for server in targets[1:]:  # free the cores before the idle check
                if server.proc is not None:
                    stop_process(server.proc)
        if idle and plan.idle_connections > 0:
            print(
                f"bench: idle check, {plan.idle_connections} connections through pgseal ...",
                flush=True,
            )
            idle_result = idle_check(cleanup, work, direct, plan.idle_connections)
            payload["idle"] = idle_result
    checks = check_targets(rows, idle_result)
    payload["checks"] = checks
    payload["finished"] = time.time()
    path = write_results("passthrough", payload)
    if rows:
        print()
        print(
            f"pgbench -S, scale {plan.scale}: medians of {plan.rounds} interleaved rounds of "
            f"{plan.duration:.0f}s each.\n/direct, /pgbouncer (TPS ratios) and +p50 µs (over "
            "direct) are medians of per-round pairs;\ncpu = the proxy process's user+sys µs per "
            "transaction (/proc/PID/stat)."
        )
        load = os.getloadavg()
        print(
            f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
            f"on {os.cpu_count()} cpus (other work on the machine shows here)"
        )
        print_table(rows)
    if idle_result:
        print()
        print(
            f"idle: pgseal VmRSS {idle_result['rss_before_kib'] / 1024:.1f} MB before, "
            f"{idle_result['rss_with_kib'] / 1024:.1f} MB with {idle_result['connections']} idle "
            f"connections, {idle_result['rss_after_close_kib'] / 1024:.1f} MB after"
        )
    print()
    print("targets:")
    print_checks(checks)
    print(f"\nresults: {path}")
    return 0


# --- profile: where the proxy's time goes ----------------------------------------------------


def _pyspy() -> str | None:
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


def summarize_pyspy(path: Path, top: int | None = 25) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed) output.
    A frame reads `name (file:line)`; line numbers are dropped so a function is one entry.
    `top`: how many of each (None: all)."""
    self_time: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        total += count
        frames = [_frame_name(f) for f in stack.split(";")[1:]]  # first entry is the thread
        if not frames:
            continue
        self_time[frames[-1]] = self_time.get(frames[-1], 0) + count
        for name in set(frames):
            inclusive[name] = inclusive.get(name, 0) + count

    def share(d: dict[str, int]) -> list[tuple[str, float]]:
        return [
            (k, round(100 * v / total, 2))
            for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]
        ]

    return {"samples": total, "self": share(self_time), "inclusive": share(inclusive)}


def _frame_name(frame: str) -> str:
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rstrip(")")
    short = "/".join(file.split("/")[-2:]) if file else ""
    return f"{name} ({short})" if short else name


def _sample(flavour: str, pid: int, seconds: float, stem: Path) -> dict[str, Any] | None:
    """One sampling profile of `pid`: py-spy (Python frames, or --native), or perf."""
    if flavour == "perf":
        perf = shutil.which("perf")
        if perf is None:
            print("bench: perf not found; skipping the perf profile")
            return None
        data = stem.with_suffix(".data")
        rec = subprocess.run(
            [
                perf,
                "record",
                "-e",
                "cpu-clock",
                "-F",
                "2000",
                "-p",
                str(pid),
                "-o",
                str(data),
                "--",
                "sleep",
                str(int(seconds)),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if rec.returncode != 0 or not data.exists():
            print(f"bench: perf record failed: {rec.stderr.strip()[-300:]}")
            return None
        out: dict[str, Any] = {"file": str(data)}
        for key, sort in (("dso", "dso"), ("symbols", "dso,sym")):
            rep = subprocess.run(
                [
                    perf,
                    "report",
                    "-i",
                    str(data),
                    "--no-children",
                    "--sort",
                    sort,
                    "--stdio",
                    "-g",
                    "none",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            out[key] = _perf_shares(rep.stdout)
        return out
    spy = _pyspy()
    if spy is None:
        print("bench: py-spy not found; skipping the py-spy profiles")
        return None
    path = stem.with_suffix(".txt")
    # python: Python frames of every thread, idle included; native: with C frames too;
    # gil: only the thread holding the GIL, i.e. where the process's CPU time goes.
    extra = {
        "python": ["--idle", "--nonblocking"],
        "native": ["--idle", "--native"],
        "gil": ["--gil"],
    }[flavour]
    rec = subprocess.run(
        [
            spy,
            "record",
            "-p",
            str(pid),
            "-d",
            str(int(seconds)),
            "-r",
            "250",
            "-f",
            "raw",
            "-o",
            str(path),
            *extra,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if rec.returncode != 0 or not path.exists():
        print(f"bench: py-spy {flavour} failed: {rec.stderr.strip()[-300:]}")
        return None
    return {"file": str(path), **summarize_pyspy(path)}


def _perf_shares(report: str) -> list[tuple[str, float]]:
    """`perf report --stdio` lines `  12.34%  name...` -> [(name, 12.34), ...]."""
    rows: list[tuple[str, float]] = []
    for line in report.splitlines():
        head, _, rest = line.strip().partition("%")
        try:
            pct = float(head)
        except ValueError:
            continue
        rows.append((" ".join(rest.split()), pct))
    return rows


def profile(
    plan: Plan, *, mode: str = "prepared", clients: int = 8, seconds: float = 5.0, workers: int = 1
) -> int:
    """CPU per transaction of PgBouncer and pgseal (from /proc/PID/stat, without a profiler
    attached), then py-spy (Python frames, then --native) on pgseal under the same load."""
    raise_fd_limit()
    payload: dict[str, Any] = {"mode": mode, "clients": clients, "machine": machine_info()}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    from bench.common import RESULTS_DIR, pgbench_command

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with Cleanup() as cleanup, signals_raise():
        work = scratch_dir(cleanup, "pgseal-profile-")
        _, direct = start_postgres(cleanup, work)
        init_pgbench(direct, plan.scale)
        bouncer = start_pgbouncer(cleanup, work, direct, pool_size=clients + 4)
        seal = start_pgseal(cleanup, work, direct, workers=workers, name="pgseal")
        logdir = work / "logs"
        logdir.mkdir()
        cpu: dict[str, Any] = {}
        for rnd in range(plan.rounds):
            for server in (direct, bouncer, seal):
                r = measured_run(server, mode, clients, plan.duration, logdir)
                entry = cpu.setdefault(server.name, {"tps": [], "user": [], "sys": []})
                entry["tps"].append(r.tps)
                if "proxy_user_us_per_tx" in r.extra:
                    entry["user"].append(r.extra["proxy_user_us_per_tx"])
                    entry["sys"].append(r.extra["proxy_sys_us_per_tx"])
                print(
                    f"  round {rnd + 1} {server.name:<10} {r.tps:>8.0f} tps  "
                    f"proxy cpu {r.extra.get('proxy_user_us_per_tx', 0):.1f} user + "
                    f"{r.extra.get('proxy_sys_us_per_tx', 0):.1f} sys µs/tx",
                    flush=True,
                )
        payload["cpu"] = {
            name: {k: median(v) if v else None for k, v in e.items()} for name, e in cpu.items()
        }
        pid = (child_pids(seal.pid) or [seal.pid])[0] if seal.pid else None
        assert pid is not None
        for flavour in ("python", "native", "perf"):
            load = subprocess.Popen(
                pgbench_command(
                    seal, mode=mode, clients=clients, duration=seconds + 6, log_prefix=None
                ),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            cleanup.add("pgbench", functools.partial(stop_process, load, 2))
            time.sleep(2)
            try:
                found = _sample(flavour, pid, seconds, RESULTS_DIR / f"profile-{stamp}-{flavour}")
            finally:
                load.wait(seconds + 30)
            if found is not None:
                payload[f"profile_{flavour}"] = found
    print()
    print(
        f"pgbench -S -M {mode} -c {clients}: median of {plan.rounds} rounds of {plan.duration:.0f}s"
    )
    for name, e in payload["cpu"].items():
        line = f"  {name:<10} {e['tps']:>8.0f} tps"
        if e.get("user") is not None:
            line += (
                f"   process cpu {e['user']:.1f} µs user + {e['sys']:.1f} µs sys per transaction"
            )
        print(line)
    perf = payload.get("profile_perf")
    if perf:
        print(f"\nperf cpu-clock ({perf['file']}): share of the proxy's CPU time by library")
        for name, pct in perf["dso"][:6]:
            print(f"  {pct:>6.1f}   {name}")
        print("  top symbols")
        for name, pct in perf["symbols"][:15]:
            print(f"  {pct:>6.1f}   {name}")
    for flavour in ("python", "native"):
        s = payload.get(f"profile_{flavour}")
        if not s:
            continue
        print(f"\npy-spy {flavour} ({s['samples']} samples incl. idle; {s['file']})")
        print("  self %   function")
        for name, pct in s["self"][:15]:
            print(f"  {pct:>6.1f}   {name}")
        print("  incl %   function")
        for name, pct in s["inclusive"][:20]:
            print(f"  {pct:>6.1f}   {name}")
    path = write_results("profile", payload)
    print(f"\nresults: {path}")
    return 0

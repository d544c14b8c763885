"""Encrypted data path benchmark: pgbench on a table with three encrypted columns.

One throwaway PostgreSQL (tuned: no statement logging), a SoftHSM2 token with a master
key in the scratch dir (random PINs, in the children's environment only), the keystore
and a jsonl audit trail (fsync per batch, as in production), and one
`pgseal serve --config` with a policy that protects `bench_secure`:

    bench_secure(id bigserial pk, tenant_id text, email bytea, name bytea, balance bytea)
        email   {type: text, search: equality}   (indexed)
        name    {type: text}
        balance {type: numeric}
    bench_plain(id bigserial pk, tenant_id text, email text, name text, balance numeric)
        the plaintext twin, not in the policy (email indexed too)

Both tables hold the same N rows per tenant for a few tenants; the encrypted rows are
inserted THROUGH the proxy (asyncpg executemany), so they are real cells. Tenant t1 owns
ids 1..N in both tables.

The pgbench script (one transaction = three statements, autocommit each):

    \\set id random(1, N)
    SELECT email, name, balance FROM T WHERE id = :id \\gset p_        -- select by id
    SELECT id, name, balance FROM T WHERE email = :p_email;          -- equality search
    INSERT INTO T (tenant_id, email, name, balance)
        VALUES ('t1', :nid, :p_name, :p_balance);                   -- insert

(the equality search looks up the email the first statement just read; the insert's
email is a random number, so inserted rows never match a search) runs with
`-M extended -c 8 -j 2 -n` and PGOPTIONS='-c pgseal.tenant=t1' against four targets:

    encrypted      pgseal, bench_secure   (seal 3 values/insert, 1/search; open 5/tx)
    plain-pgseal   pgseal, bench_plain    (the same proxy; a statement on a table
                                           outside the policy never reaches the parser)
    plain-direct   PostgreSQL, bench_plain
    cells-direct   PostgreSQL, bench_secure, the SQL pgseal sends for the encrypted
                   script (see cells_script_text): the cells' own cost, no proxy

in interleaved rounds (rotating order), medians over rounds; the ratios
encrypted/plain-pgseal (target >= 0.7) and plain-pgseal/direct are taken per round, then
the median. The proxy's user+sys CPU per transaction comes from /proc/PID/stat, its system
calls from /proc/PID/io; PostgreSQL's, pgbench's and the machine's CPU per transaction are
shown next to it.
`--profile S` then samples the proxy with py-spy for S seconds under the encrypted load.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import re
import resource
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from bench.common import (
    CLK_TCK,
    REPO,
    RESULTS_DIR,
    BenchError,
    Cleanup,
    Server,
    child_pids,
    cpu_ticks,
    machine_info,
    machine_ticks,
    median,
    percentile,
    pgbench_exe,
    raise_fd_limit,
    read_latencies,
    scratch_dir,
    signals_raise,
    start_postgres,
    stop_process,
    syscall_counts,
    tree_ticks,
    wait_port,
    write_results,
)
from proxy import PURE_REASON
from proxy._native import running_compiled
from proxy.localpg import LocalPostgres, find_pg_bindir, free_port

RATIO_TARGET = 0.7  # encrypted >= 0.7x the plaintext-through-pgseal TPS (issue 4)
TENANT = "t1"
TARGETS = (
    "encrypted",
    "plain-pgseal",
    "plain-direct",
    "cells-direct",
    # --pure: the same two loads through a second pgseal running the pure Python build
    "encrypted-pure",
    "plain-pgseal-pure",
    # --baseline DIR: ... and through a pgseal run from another checkout (a change's effect,
    # measured in one run: this host's speed drifts between runs)
    "encrypted-base",
    "plain-pgseal-base",
)


@dataclass
class EncPlan:
    rounds: int = 5
    duration: float = 10.0
    rows: int = 10_000  # per tenant, per table
    tenants: int = 4
    clients: int = 8
    jobs: int = 2
    warmup: float = 3.0
    profile_seconds: float = 0.0
    workers: int = 1  # pgseal serve --workers
    pure: bool = False  # also the pure Python build (PGSEAL_PURE=1), as two more targets
    baseline: str | None = None  # also a pgseal from this checkout, as two more targets


@dataclass
class EncRun:
    target: str
    round: int
    tps: float
    transactions: int
    failed: int
    p50_us: float
    p99_us: float
    mean_us: float
    statements_ms: dict[str, float] = field(default_factory=dict)
    proxy_user_us_per_tx: float | None = None
    proxy_sys_us_per_tx: float | None = None
    machine_busy: float | None = None
    proxy_reads_per_tx: float | None = None
    proxy_writes_per_tx: float | None = None
    # The rest of the machine's CPU per transaction: PostgreSQL (postmaster and backends),
    # pgbench itself, and the machine as a whole (all processes and the kernel).
    pg_us_per_tx: float | None = None
    pgbench_us_per_tx: float | None = None
    machine_us_per_tx: float | None = None


# --- setup ------------------------------------------------------------------------------

SCHEMA_SQL = """
CREATE TABLE bench_secure (
    id bigserial PRIMARY KEY,
    tenant_id text NOT NULL,
    email bytea,
    name bytea,
    balance bytea
);
CREATE INDEX bench_secure_email ON bench_secure (email);
CREATE TABLE bench_plain (
    id bigserial PRIMARY KEY,
    tenant_id text NOT NULL,
    email text,
    name text,
    balance numeric(14, 2)
);
CREATE INDEX bench_plain_email ON bench_plain (email);
"""

POLICY = {
    "version": 1,
    "tables": {
        "public.bench_secure": {
            "tenant": {"column": "tenant_id"},
            "isolation": "strict",
            "on_denied": "error",
            "columns": {
                "email": {"type": "text", "search": "equality"},
                "name": {"type": "text"},
                "balance": {"type": "numeric"},
            },
        }
    },
}


def script_text(table: str, rows: int) -> str:
    return (
        f"\\set id random(1, {rows})\n"
        "\\set nid random(1000000000, 9999999999)\n"
        f"SELECT email, name, balance FROM {table} WHERE id = :id \\gset p_\n"
        f"SELECT id, name, balance FROM {table} WHERE email = :p_email;\n"
        f"INSERT INTO {table} (tenant_id, email, name, balance) "
        f"VALUES ('{TENANT}', :nid, :p_name, :p_balance);\n"
    )


def cells_script_text(rows: int) -> str:
    """The encrypted script's SQL as pgseal sends it upstream, with cells, straight to
    PostgreSQL: what the database itself pays for sealed columns (larger rows, a bytea
    index; the search as `email = $1`, one cell: the narrow form, the tenant having one
    key version), without any proxy. The
    first statement reads real cells; the search looks one up; the insert stores a fresh
    42-byte value (an email cell's size) and the cells it read."""
    fresh = "substring(sha256(:nid::text::bytea) || sha256(:nid::text::bytea) from 1 for 42)"
    return (
        f"\\set id random(1, {rows})\n"
        "\\set nid random(1000000000, 9999999999)\n"
        "SELECT email, name, balance FROM bench_secure WHERE id = :id \\gset p_\n"
        "SELECT id, name, balance FROM bench_secure WHERE email = :p_email::bytea;\n"
        "INSERT INTO bench_secure (tenant_id, email, name, balance) "
        f"VALUES ('{TENANT}', {fresh}, :p_name::bytea, :p_balance::bytea);\n"
    )


def tenants(n: int) -> list[str]:
    return [f"t{i + 1}" for i in range(n)]


def row_values(tenant_index: int, rows: int) -> list[tuple[int, str, str, str, Decimal]]:
    """(id, tenant, email, name, balance) of one tenant's rows: ids in one block per tenant."""
    tenant = f"t{tenant_index + 1}"
    base = tenant_index * rows
    return [
        (
            g,
            tenant,
            f"user{g}@example.com",
            f"Customer Name {g}",
            Decimal(g * 7919 % 10_000_000) / 100,
        )
        for g in range(base + 1, base + rows + 1)
    ]


def psql(pg: LocalPostgres, sql: str) -> str:
    exe = find_pg_bindir() / "psql"
    result = subprocess.run(
        [
            str(exe) if exe.exists() else "psql",
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            pg.host,
            "-p",
            str(pg.port),
            "-U",
            "postgres",
            "-c",
            sql,
            "postgres",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise BenchError(f"psql failed: {result.stderr.strip()[-300:]}")
    return result.stdout.strip()


def child_env() -> dict[str, str]:
    """The proxy's and `hsm init`'s environment: PINs of this run, our own token only."""
    env = {
        **os.environ,
        "PGSEAL_HSM_PIN": secrets.token_hex(8),
        "PGSEAL_HSM_SO_PIN": secrets.token_hex(8),
        "PGSEAL_LOG_LEVEL": "WARNING",
        "PGSEAL_SHUTDOWN_GRACE": "1",
    }
    for name in ("SOFTHSM2_CONF", "PGSEAL_CONFIG"):
        env.pop(name, None)
    return env


def write_config(
    work: Path, pg: LocalPostgres, port: int, workers: int = 1, name: str = "pgseal"
) -> Path:
    policy = work / "policy.yaml"
    policy.write_text(yaml.safe_dump(POLICY, sort_keys=False))
    config = {
        "listen": f"127.0.0.1:{port}",
        "workers": workers,
        "upstream": f"{pg.host}:{pg.port}",
        "upstream_tls": {"sslmode": "disable"},
        "hsm": {
            "token_label": "pgseal-bench",
            "pin": "env:PGSEAL_HSM_PIN",
            "so_pin": "env:PGSEAL_HSM_SO_PIN",
            "master_key_label": "pgseal-bench-master",
            "softhsm_dir": str(work / "hsm"),
        },
        "keystore": {"dsn": pg.dsn(), "schema": "pgseal", "auto_create": True},
        "audit": {"sinks": [{"jsonl": str(work / f"{name}-audit.jsonl")}], "on_failure": "block"},
        "policies": [str(policy)],
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def hsm_init(config: Path, env: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "hsm", "init", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        check=False,
        timeout=120,
    )
    if result.returncode != 0:
        raise BenchError(f"pgseal hsm init failed: {result.stderr.strip()[-300:]}")


def checkout_python(checkout: Path) -> str:
    """The interpreter that runs pgseal from `checkout`: its own .venv's when it has one (its
    own compiled build), else ours, run from that directory (`-m` imports from there)."""
    python = checkout / ".venv" / "bin" / "python"
    return str(python) if checkout != REPO and python.exists() else sys.executable


def _probe(checkout: Path, code: str) -> str:
    result = subprocess.run(
        [checkout_python(checkout), "-W", "ignore", "-c", code],
        capture_output=True, text=True, cwd=checkout, check=False, timeout=60,
    )
    return result.stdout.strip() or f"unknown ({result.stderr.strip()[-200:]})"


def checkout_build(checkout: Path) -> str:
    """Which build pgseal runs from `checkout`, as payload["build"] says it for this one: a
    baseline that fell back to the pure build would make every comparison meaningless."""
    return _probe(
        checkout,
        "import proxy, proxy._native as n; "
        "print('compiled' if n.running_compiled() else "
        "f'pure ({proxy.PURE_REASON or \"no compiled build\"})')",
    )


def checkout_interpreter(checkout: Path) -> str:
    """The Python that runs pgseal from `checkout`: its version, and whether libpython is a
    shared library (a pyenv or source build, by default without PGO or LTO) or linked into
    the executable (a distribution's build): the same code differs by 15-20% of the proxy's
    CPU between the two (bench/README.md), more than most changes one would compare."""
    return _probe(
        checkout,
        "import os, platform, sys; maps = open('/proc/self/maps').read(); "
        "kind = 'shared' if 'libpython' in maps else 'linked in'; "
        "print(f\"{platform.python_implementation()} {platform.python_version()}, "
        "libpython {kind} ({os.path.realpath(sys.executable)})\")",
    )


def start_sealing_proxy(
    cleanup: Cleanup,
    work: Path,
    config: Path,
    port: int,
    env: dict[str, str],
    checkout: Path = REPO,
) -> Server:
    """`pgseal serve` from `checkout` (see checkout_python)."""
    log_path = work / f"{config.stem}.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [checkout_python(checkout), "-m", "proxy", "serve", "--config", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        env=env,
        cwd=checkout,
        start_new_session=True,
    )
    cleanup.add("pgseal", lambda: stop_process(proc))
    try:
        wait_port("127.0.0.1", port, proc, 60, "pgseal")
    except BenchError as exc:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        raise BenchError(f"{exc}: {' | '.join(tail)}") from None
    return Server("pgseal", "127.0.0.1", port, proc=proc, pid=proc.pid)


async def fill(proxy: Server, pg: LocalPostgres, plan: EncPlan) -> dict[str, float]:
    """bench_secure through the proxy (one connection per tenant, its tenant set), then
    bench_plain with the same values directly; sanity checks on both sides."""
    import asyncpg

    timings: dict[str, float] = {}
    started = time.monotonic()
    for i, tenant in enumerate(tenants(plan.tenants)):
        conn = await asyncpg.connect(
            host=proxy.host,
            port=proxy.port,
            user="postgres",
            database="postgres",
            server_settings={"pgseal.tenant": tenant},
        )
        try:
            rows = row_values(i, plan.rows)
            for k in range(0, len(rows), 2000):
                await conn.executemany(
                    "INSERT INTO bench_secure (id, tenant_id, email, name, balance) "
                    "VALUES ($1, $2, $3, $4, $5)",
                    rows[k : k + 2000],
                )
        finally:
            await conn.close()
    timings["secure_rows_per_s"] = plan.rows * plan.tenants / (time.monotonic() - started)
    started = time.monotonic()
    direct = await asyncpg.connect(host=pg.host, port=pg.port, user="postgres", database="postgres")
    try:
        for i in range(plan.tenants):
            await direct.copy_records_to_table(
                "bench_plain",
                records=row_values(i, plan.rows),
                columns=["id", "tenant_id", "email", "name", "balance"],
            )
        total = plan.rows * plan.tenants
        for table in ("bench_secure", "bench_plain"):
            await direct.execute(f"SELECT setval('{table}_id_seq', {total})")
        # What PostgreSQL holds: cells, not plaintext.
        stored = await direct.fetchrow("SELECT email, name, balance FROM bench_secure WHERE id = 1")
        if stored is None or any(bytes(v)[:1] != b"\x01" for v in stored):
            raise BenchError("bench_secure row 1 does not hold pgseal cells")
        if b"example.com" in bytes(stored["email"]):
            raise BenchError("bench_secure holds a plaintext email")
    finally:
        await direct.close()
    timings["plain_copy_s"] = time.monotonic() - started
    # What the application sees through the proxy: the plaintext, found by equality search.
    conn = await asyncpg.connect(
        host=proxy.host,
        port=proxy.port,
        user="postgres",
        database="postgres",
        server_settings={"pgseal.tenant": TENANT},
    )
    try:
        want = row_values(0, plan.rows)[41]
        got = await conn.fetchrow(
            "SELECT id, email, name, balance FROM bench_secure WHERE email = $1", want[2]
        )
        if got is None or (got["id"], got["email"], got["name"], got["balance"]) != (
            want[0],
            want[2],
            want[3],
            want[4],
        ):
            raise BenchError(f"read-back through the proxy: expected {want}, got {got}")
    finally:
        await conn.close()
    for sql in ("VACUUM ANALYZE bench_secure", "VACUUM ANALYZE bench_plain", "CHECKPOINT"):
        psql(pg, sql)
    return timings


# --- pgbench ------------------------------------------------------------------------------

_TPS = re.compile(r"^tps = ([0-9.]+)", re.MULTILINE)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE)
_STMT = re.compile(r"^\s+([0-9.]+)\s+(?:\d+\s+)*(\S.*)$")
_STMT_NAMES = (
    ("WHERE id", "select_by_id"),
    ("WHERE email", "select_by_email"),
    ("INSERT", "insert"),
)


def pgbench_cmd(
    server: Server, script: Path, plan: EncPlan, duration: float, log_prefix: Path | None
) -> list[str]:
    cmd = [
        pgbench_exe(),
        *server.dsn_args(),
        "-n",
        "-M",
        "extended",
        "-c",
        str(plan.clients),
        "-j",
        str(plan.jobs),
        "-T",
        str(int(duration)),
        "-r",
        "-f",
        str(script),
    ]
    if log_prefix is not None:
        cmd += ["--log", f"--log-prefix={log_prefix}"]
    return [*cmd, "postgres"]


def pgbench_env() -> dict[str, str]:
    return {**os.environ, "PGOPTIONS": f"-c pgseal.tenant={TENANT}", "PGCONNECT_TIMEOUT": "10"}


def statement_latencies(out: str) -> dict[str, float]:
    """Per-statement mean latency (ms) from pgbench -r."""
    found: dict[str, float] = {}
    _, _, tail = out.partition("statement latencies in milliseconds")
    for line in tail.splitlines()[1:]:
        hit = _STMT.match(line)
        if not hit:
            continue
        for needle, name in _STMT_NAMES:
            if needle in hit.group(2) and not hit.group(2).startswith("\\"):
                found[name] = float(hit.group(1))
                break
    return found


def proxy_ticks(pid: int | None) -> tuple[int, int, int, int]:
    """(utime, stime, read syscalls, write syscalls) of the proxy so far, summed over its
    workers under `--workers N` (the parent then only waits)."""
    if pid is None:
        return 0, 0, 0, 0
    totals = [0, 0, 0, 0]
    for one in [pid, *child_pids(pid)]:
        with contextlib.suppress(OSError):
            for i, v in enumerate((*cpu_ticks(one), *syscall_counts(one))):
                totals[i] += v
    return totals[0], totals[1], totals[2], totals[3]


def postmaster_pid(pg: LocalPostgres) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int((pg.data_dir / "postmaster.pid").read_text().split()[0])
    return None


def _pg_ticks(pid: int | None) -> int | None:
    if pid is None:
        return None
    with contextlib.suppress(OSError):
        return tree_ticks(pid)
    return None


def run_once(
    name: str,
    server: Server,
    script: Path,
    proxy_pid: int,
    pg_pid: int | None,
    plan: EncPlan,
    logdir: Path,
    rnd: int,
    duration: float,
) -> EncRun:
    for old in logdir.glob("tx*"):
        old.unlink()
    prefix = logdir / "tx"
    cmd = pgbench_cmd(server, script, plan, duration, prefix)
    before, mach_before = proxy_ticks(proxy_pid), machine_ticks()
    pg_before, children_before = _pg_ticks(pg_pid), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=pgbench_env(),
    )
    try:
        out, err = proc.communicate(timeout=duration + 60)
    finally:
        stop_process(proc, timeout=2)
    after, mach_after = proxy_ticks(proxy_pid), machine_ticks()
    pg_after, children_after = _pg_ticks(pg_pid), resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise BenchError(
            f"pgbench against {name} failed (rc {proc.returncode}): "
            f"{' | '.join(err.strip().splitlines()[-3:])}"
        )
    found = _TPS.search(out)
    if not found:
        raise BenchError(f"pgbench against {name} printed no tps line: {out[-300:]}")
    failed = _FAILED.search(out)
    paths = glob.glob(f"{prefix}.*")
    latencies = read_latencies(paths)
    for p in paths:
        os.unlink(p)
    if not latencies:
        raise BenchError(f"pgbench against {name} logged no transactions")
    busy = mach_after[0] - mach_before[0]
    total = busy + mach_after[1] - mach_before[1]
    run = EncRun(
        target=name,
        round=rnd,
        tps=float(found.group(1)),
        transactions=len(latencies),
        failed=int(failed.group(1)) if failed else 0,
        p50_us=percentile(latencies, 50),
        p99_us=percentile(latencies, 99),
        mean_us=sum(latencies) / len(latencies),
        statements_ms=statement_latencies(out),
        machine_busy=round(busy / total, 3) if total else None,
    )
    if run.failed:
        raise BenchError(f"pgbench against {name}: {run.failed} failed transactions")
    tick_us = 1e6 / CLK_TCK
    if pg_before is not None and pg_after is not None:
        run.pg_us_per_tx = (pg_after - pg_before) * tick_us / run.transactions
    pgbench_s = (children_after.ru_utime - children_before.ru_utime) + (
        children_after.ru_stime - children_before.ru_stime
    )
    run.pgbench_us_per_tx = pgbench_s * 1e6 / run.transactions
    run.machine_us_per_tx = busy * tick_us / run.transactions
    if server.name == "pgseal":
        per_tick_us = 1e6 / CLK_TCK
        run.proxy_user_us_per_tx = (after[0] - before[0]) * per_tick_us / run.transactions
        run.proxy_sys_us_per_tx = (after[1] - before[1]) * per_tick_us / run.transactions
        run.proxy_reads_per_tx = (after[2] - before[2]) / run.transactions
        run.proxy_writes_per_tx = (after[3] - before[3]) / run.transactions
    return run


# --- summary --------------------------------------------------------------------------------


def _per_round(runs: Sequence[EncRun], a: str, b: str) -> list[float]:
    """TPS of `a` over TPS of `b` in each round (runs minutes apart, on the same load)."""
    by = {(r.target, r.round): r for r in runs}
    return [by[(a, k)].tps / by[(b, k)].tps for (t, k) in by if t == a and (b, k) in by]


def _paired(runs: Sequence[EncRun], a: str, b: str) -> float | None:
    vals = _per_round(runs, a, b)
    return median(vals) if vals else None


def _cpu_paired(runs: Sequence[EncRun], a: str, b: str) -> float | None:
    """Machine CPU per transaction of `a` over that of `b`, per round, median. Both loads
    keep the machine busy, so this is what the TPS ratio tends to (b's cost over a's
    is a's TPS over b's), and it moves less when the host's speed drifts between runs."""
    by = {(r.target, r.round): r.machine_us_per_tx or 0.0 for r in runs}
    vals = [cost / by[(b, k)] for (t, k), cost in by.items() if t == a and cost and by.get((b, k))]
    return median(vals) if vals else None


def summarize(runs: Sequence[EncRun]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for name in TARGETS:
        mine = [r for r in runs if r.target == name]
        if not mine:
            continue
        row: dict[str, Any] = {
            "target": name,
            "rounds": len(mine),
            "tps": median([r.tps for r in mine]),
            "p50_us": median([r.p50_us for r in mine]),
            "p99_us": median([r.p99_us for r in mine]),
            "statements_ms": {
                k: median([r.statements_ms[k] for r in mine if k in r.statements_ms])
                for k in ("select_by_id", "select_by_email", "insert")
                if any(k in r.statements_ms for r in mine)
            },
        }
        for what in ("pg_us_per_tx", "pgbench_us_per_tx", "machine_us_per_tx"):
            known = [getattr(r, what) for r in mine if getattr(r, what) is not None]
            row[what] = median(known) if known else float("nan")
        cpu = [r for r in mine if r.proxy_user_us_per_tx is not None]
        if cpu:
            row["user_us_per_tx"] = median([r.proxy_user_us_per_tx or 0.0 for r in cpu])
            row["sys_us_per_tx"] = median([r.proxy_sys_us_per_tx or 0.0 for r in cpu])
            row["reads_per_tx"] = median([r.proxy_reads_per_tx or 0.0 for r in cpu])
            row["writes_per_tx"] = median([r.proxy_writes_per_tx or 0.0 for r in cpu])
        rows.append(row)
    return {
        "rows": rows,
        "encrypted_x_plain_pgseal": _paired(runs, "encrypted", "plain-pgseal"),
        "encrypted_x_plain_pgseal_rounds": _per_round(runs, "encrypted", "plain-pgseal"),
        "plain_pgseal_x_direct": _paired(runs, "plain-pgseal", "plain-direct"),
        "encrypted_x_direct": _paired(runs, "encrypted", "plain-direct"),
        "cells_direct_x_direct": _paired(runs, "cells-direct", "plain-direct"),
        "machine_cpu_plain_pgseal_x_encrypted": _cpu_paired(runs, "plain-pgseal", "encrypted"),
        "pure_encrypted_x_plain_pgseal": _paired(runs, "encrypted-pure", "plain-pgseal-pure"),
        "encrypted_x_pure": _paired(runs, "encrypted", "encrypted-pure"),
        "plain_pgseal_x_pure": _paired(runs, "plain-pgseal", "plain-pgseal-pure"),
        "base_encrypted_x_plain_pgseal": _paired(runs, "encrypted-base", "plain-pgseal-base"),
        "machine_cpu_base_plain_pgseal_x_encrypted": _cpu_paired(
            runs, "plain-pgseal-base", "encrypted-base"
        ),
        "encrypted_x_base": _paired(runs, "encrypted", "encrypted-base"),
        "plain_pgseal_x_base": _paired(runs, "plain-pgseal", "plain-pgseal-base"),
    }


def print_summary(summary: dict[str, Any], plan: EncPlan) -> None:
    print(
        f"pgbench -M extended -c {plan.clients} -j {plan.jobs}, PGOPTIONS='-c "
        f"pgseal.tenant={TENANT}'; pgseal --workers {plan.workers}; {plan.rows:,} rows x "
        f"{plan.tenants} tenants per table;\n"
        f"one transaction = select by id + select by equality search + insert; medians of "
        f"{plan.rounds} interleaved rounds of {plan.duration:.0f}s.\nstatement columns: "
        "pgbench -r mean latency per statement (ms); cpu = the proxy's (all workers') user+sys "
        "µs per transaction; r/w = its read and write system calls per transaction;\n"
        "pg, pgbench, all = CPU µs per transaction of PostgreSQL (all backends), of pgbench, "
        "of the whole machine (every process and the kernel)."
    )
    load = os.getloadavg()
    print(
        f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
        f"on {os.cpu_count()} cpus"
    )
    header = (
        f"{'target':<18}{'TPS':>8}{'p50 µs':>9}{'p99 µs':>9}{'by id':>8}{'by email':>10}"
        f"{'insert':>8}{'cpu u+s µs/tx':>16}{'r/w per tx':>12}{'pg':>6}{'pgbench':>8}{'all':>6}"
    )
    print(header)
    print("-" * len(header))
    for row in summary["rows"]:
        st = row["statements_ms"]
        cpu = calls = ""
        if "user_us_per_tx" in row:
            cpu = f"{row['user_us_per_tx']:.0f}+{row['sys_us_per_tx']:.0f}"
            calls = f"{row['reads_per_tx']:.1f}/{row['writes_per_tx']:.1f}"
        print(
            f"{row['target']:<18}{row['tps']:>8.0f}{row['p50_us']:>9.0f}{row['p99_us']:>9.0f}"
            f"{st.get('select_by_id', float('nan')):>8.3f}"
            f"{st.get('select_by_email', float('nan')):>10.3f}"
            f"{st.get('insert', float('nan')):>8.3f}{cpu:>16}{calls:>12}"
            f"{row['pg_us_per_tx']:>6.0f}{row['pgbench_us_per_tx']:>8.0f}"
            f"{row['machine_us_per_tx']:>6.0f}"
        )
    ratio = summary["encrypted_x_plain_pgseal"]
    print()
    if ratio is not None:
        mark = "ok  " if ratio >= RATIO_TARGET else "MISS"
        print(f"  [{mark}] TPS encrypted / plain-pgseal  {ratio:.3f}   (target >= {RATIO_TARGET})")
        rounds = summary["encrypted_x_plain_pgseal_rounds"]
        if len(rounds) > 1:  # how much one round says on this machine
            print(f"         per round: {min(rounds):.3f} .. {max(rounds):.3f}")
        cpu_ratio = summary.get("machine_cpu_plain_pgseal_x_encrypted")
        costs = {row["target"]: row["machine_us_per_tx"] for row in summary["rows"]}
        if cpu_ratio is not None and costs.get("plain-pgseal"):
            print(
                f"         machine CPU per tx, plain-pgseal / encrypted {cpu_ratio:.3f}: the "
                f"target needs encrypted <= {costs['plain-pgseal'] / RATIO_TARGET:.0f} µs/tx "
                f"(now {costs['encrypted']:.0f})"
            )
    if summary["plain_pgseal_x_direct"] is not None:
        print(f"         TPS plain-pgseal / direct     {summary['plain_pgseal_x_direct']:.3f}")
    if summary["encrypted_x_direct"] is not None:
        print(f"         TPS encrypted / direct        {summary['encrypted_x_direct']:.3f}")
    if summary["cells_direct_x_direct"] is not None:
        print(
            f"         TPS cells-direct / direct     {summary['cells_direct_x_direct']:.3f}"
            "   (the cells' own cost in PostgreSQL, no proxy)"
        )
    for key, what in (
        ("pure_encrypted_x_plain_pgseal", "encrypted / plain-pgseal, pure build"),
        ("encrypted_x_pure", "encrypted, compiled / pure  "),
        ("plain_pgseal_x_pure", "plain-pgseal, compiled / pure"),
        ("base_encrypted_x_plain_pgseal", "encrypted / plain-pgseal, baseline"),
        ("encrypted_x_base", "encrypted, this / baseline    "),
        ("plain_pgseal_x_base", "plain-pgseal, this / baseline"),
    ):
        if summary.get(key) is not None:
            print(f"         TPS {what} {summary[key]:.3f}")
    base_cpu = summary.get("machine_cpu_base_plain_pgseal_x_encrypted")
    if base_cpu is not None:
        print(f"         machine CPU per tx, plain-pgseal / encrypted, baseline {base_cpu:.3f}")


# --- profile ----------------------------------------------------------------------------------


def profile_proxy(
    server: Server, script: Path, pid: int, plan: EncPlan, stem: Path
) -> dict[str, Any] | None:
    """py-spy on the proxy under the encrypted load: raw Python frames of whichever thread
    holds the GIL (`--gil`), i.e. where the proxy's CPU time goes, idle excluded."""
    from bench.passthrough import _sample

    seconds = plan.profile_seconds
    load = subprocess.Popen(
        pgbench_cmd(server, script, plan, seconds + 6, None),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=pgbench_env(),
    )
    try:
        time.sleep(2)
        return _sample("gil", pid, seconds, stem)
    finally:
        stop_process(load, timeout=2)


def extra_cost(
    encrypted_file: str, plain_file: str, rows: dict[str, dict[str, Any]]
) -> list[tuple[str, float, float]]:
    """(function, encrypted µs/tx, plain-pgseal µs/tx) per function, inclusive, the largest
    difference first: each profile's sample shares scaled by that target's proxy CPU per
    transaction (both profiles sample only while the GIL is held, so idle time is out)."""
    from bench.passthrough import summarize_pyspy

    def us_per_tx(path: str, target: str) -> dict[str, float]:
        row = rows.get(target, {})
        cpu = row.get("user_us_per_tx", 0.0) + row.get("sys_us_per_tx", 0.0)
        shares = summarize_pyspy(Path(path), top=None)["inclusive"]
        return {name: pct * cpu / 100 for name, pct in shares}

    enc = us_per_tx(encrypted_file, "encrypted")
    plain = us_per_tx(plain_file, "plain-pgseal")
    names = set(enc) | set(plain)
    table = [(n, enc.get(n, 0.0), plain.get(n, 0.0)) for n in names]
    return sorted(table, key=lambda r: -(r[1] - r[2]))


# --- entry point --------------------------------------------------------------------------------


def main(plan: EncPlan) -> int:
    raise_fd_limit()
    payload: dict[str, Any] = {
        "plan": asdict(plan),
        "machine": machine_info(),
        "started": time.time(),
    }
    runs: list[EncRun] = []
    with Cleanup() as cleanup, signals_raise():
        work = scratch_dir(cleanup, "pgseal-bench-enc-")
        print(
            "bench: PostgreSQL, SoftHSM2 token + master key, pgseal with the policy ...", flush=True
        )
        # LocalPostgres.destroy leaves its (empty) unix socket dir behind: removed after it.
        socket_dirs: list[Path] = []

        def remove_socket_dirs() -> None:
            for d in socket_dirs:
                shutil.rmtree(d, ignore_errors=True)

        cleanup.add("socket dir", remove_socket_dirs)
        pg, direct = start_postgres(cleanup, work)
        socket_dirs.append(pg.socket_dir)
        psql(pg, SCHEMA_SQL)
        env = child_env()
        port = free_port()
        config = write_config(work, pg, port, plan.workers)
        hsm_init(config, env)
        proxy = start_sealing_proxy(cleanup, work, config, port, env)
        assert proxy.pid is not None
        pid = proxy.pid
        payload["build"] = (
            "compiled" if running_compiled() else f"pure ({PURE_REASON or 'no compiled build'})"
        )
        payload["interpreter"] = checkout_interpreter(REPO)
        print(f"bench: pgseal build: {payload['build']}, {payload['interpreter']}", flush=True)
        pure_proxy = None
        if plan.pure:
            pure_port = free_port()
            pure_config = write_config(work, pg, pure_port, plan.workers, name="pgseal-pure")
            pure_env = {**env, "PGSEAL_PURE": "1"}
            pure_proxy = start_sealing_proxy(cleanup, work, pure_config, pure_port, pure_env)
        base_proxy = None
        if plan.baseline:
            baseline = Path(plan.baseline).resolve()
            base_port = free_port()
            base_config = write_config(work, pg, base_port, plan.workers, name="pgseal-base")
            base_proxy = start_sealing_proxy(
                cleanup, work, base_config, base_port, env, baseline
            )
            payload["baseline_build"] = checkout_build(baseline)
            payload["baseline_interpreter"] = checkout_interpreter(baseline)
            print(
                f"bench: baseline pgseal from {plan.baseline}, build: "
                f"{payload['baseline_build']}, {payload['baseline_interpreter']}",
                flush=True,
            )
        pg_pid = postmaster_pid(pg)
        print(
            f"bench: {plan.rows:,} rows x {plan.tenants} tenants into bench_secure (through "
            "pgseal) and bench_plain (direct) ...",
            flush=True,
        )
        payload["fill"] = asyncio.run(fill(proxy, pg, plan))
        print(
            f"bench: filled ({payload['fill']['secure_rows_per_s']:.0f} sealed rows/s "
            "through the proxy)",
            flush=True,
        )
        scripts = {}
        for table in ("bench_secure", "bench_plain"):
            scripts[table] = work / f"{table}.sql"
            scripts[table].write_text(script_text(table, plan.rows))
        scripts["cells"] = work / "cells.sql"
        scripts["cells"].write_text(cells_script_text(plan.rows))
        targets = [
            ("encrypted", proxy, scripts["bench_secure"]),
            ("plain-pgseal", proxy, scripts["bench_plain"]),
            ("plain-direct", direct, scripts["bench_plain"]),
            ("cells-direct", direct, scripts["cells"]),
        ]
        if pure_proxy is not None:
            targets += [
                ("encrypted-pure", pure_proxy, scripts["bench_secure"]),
                ("plain-pgseal-pure", pure_proxy, scripts["bench_plain"]),
            ]
        if base_proxy is not None:
            targets += [
                ("encrypted-base", base_proxy, scripts["bench_secure"]),
                ("plain-pgseal-base", base_proxy, scripts["bench_plain"]),
            ]
        logdir = work / "logs"
        logdir.mkdir()
        if plan.warmup > 0:
            for name, server, script in targets:
                run_once(
                    name, server, script, server.pid or pid, pg_pid, plan, logdir, -1,
                    max(1.0, plan.warmup),
                )
        total = plan.rounds * len(targets)
        started = time.monotonic()
        print(
            f"bench: {plan.rounds} rounds x {len(targets)} targets x {plan.duration:.0f}s",
            flush=True,
        )
        for rnd in range(plan.rounds):
            shift = rnd % len(targets)
            for name, server, script in targets[shift:] + targets[:shift]:
                r = run_once(
                    name, server, script, server.pid or pid, pg_pid, plan, logdir, rnd,
                    plan.duration,
                )
                runs.append(r)
                eta = (time.monotonic() - started) / len(runs) * (total - len(runs))
                cpu = (
                    f"  proxy cpu {r.proxy_user_us_per_tx:.0f}+{r.proxy_sys_us_per_tx:.0f} µs/tx"
                    f" r/w {r.proxy_reads_per_tx:.1f}/{r.proxy_writes_per_tx:.1f}"
                    if r.proxy_user_us_per_tx is not None
                    else ""
                )
                print(
                    f"  round {rnd + 1}/{plan.rounds} {name:<13}{r.tps:>7.0f} tps  p50 "
                    f"{r.p50_us:>5.0f} µs  p99 {r.p99_us:>6.0f} µs{cpu}   "
                    f"[{len(runs)}/{total}, ~{eta / 60:.1f} min left]",
                    flush=True,
                )
        summary = summarize(runs)
        payload["runs"] = [asdict(r) for r in runs]
        payload["summary"] = summary
        payload["checks"] = [
            {
                "what": "TPS encrypted / plain-pgseal",
                "value": summary["encrypted_x_plain_pgseal"],
                "target": f">= {RATIO_TARGET}",
                "ok": (summary["encrypted_x_plain_pgseal"] or 0) >= RATIO_TARGET,
            }
        ]
        payload["rows_after"] = psql(
            pg,
            "SELECT (SELECT count(*) FROM bench_secure) || ' ' || "
            "(SELECT count(*) FROM bench_plain)",
        )
        prof = None
        extra: list[tuple[str, float, float]] = []
        if plan.profile_seconds > 0:
            print(
                f"bench: py-spy on the proxy for {plan.profile_seconds:.0f}s under the "
                "encrypted load ...",
                flush=True,
            )
            RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            stem = RESULTS_DIR / f"encrypted-profile-{stamp}"
            prof = profile_proxy(proxy, scripts["bench_secure"], pid, plan, stem)
            payload["profile_python"] = prof
            print(f"bench: and {plan.profile_seconds:.0f}s under the plain-pgseal load ...")
            plain_stem = RESULTS_DIR / f"encrypted-profile-plain-{stamp}"
            plain_prof = profile_proxy(proxy, scripts["bench_plain"], pid, plan, plain_stem)
            payload["profile_python_plain"] = plain_prof
            if prof and plain_prof:
                by_target = {row["target"]: row for row in summary["rows"]}
                extra = extra_cost(prof["file"], plain_prof["file"], by_target)
                payload["profile_extra_us_per_tx"] = extra
    payload["finished"] = time.time()
    path = write_results("encrypted", payload)
    print()
    print_summary(summary, plan)
    if prof:
        print(f"\npy-spy ({prof['samples']} samples incl. idle; {prof['file']})")
        print("  self %   function")
        for name, pct in prof["self"][:15]:
            print(f"  {pct:>6.1f}   {name}")
        print("  incl %   function")
        for name, pct in prof["inclusive"][:25]:
            print(f"  {pct:>6.1f}   {name}")
    if extra:
        print(
            "\nwhere the encrypted transaction's extra proxy CPU goes: inclusive µs per "
            "transaction\n(py-spy share x the target's median cpu u+s µs/tx), encrypted vs "
            "plain-pgseal, largest difference first"
        )
        print(f"  {'encrypted':>9} {'plain':>7} {'extra':>7}   function")
        for name, enc_us, plain_us in extra[:30]:
            print(f"  {enc_us:>9.1f} {plain_us:>7.1f} {enc_us - plain_us:>+7.1f}   {name}")
    print(f"\nresults: {path}")
    return 0

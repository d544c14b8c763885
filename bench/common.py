"""Shared machinery of the benchmarks: processes that always get cleaned up,
pgbench runs and their per-transaction logs, process CPU and memory from /proc.

Every server a benchmark starts is registered on a `Cleanup` stack and stopped
in reverse order on the way out, including on Ctrl-C and SIGTERM
(`signals_raise` turns SIGTERM into KeyboardInterrupt). Child servers run in
their own session so that the terminal's Ctrl-C reaches only us, and we stop
them in a fixed order (pgbench, proxy, PgBouncer, PostgreSQL).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.localpg import LocalPostgres, find_pg_bindir, free_port

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
IS_ROOT = os.geteuid() == 0

# PostgreSQL tuned for benchmarking: no per-statement logging (LocalPostgres logs
# every statement by default, for the "nothing sealed reaches the log" tests),
# room for the 1,000-idle-connections check, no durability work.
BENCH_PG_SETTINGS = {
    "log_statement": "none",
    "log_connections": "off",
    "log_disconnections": "off",
    "log_min_messages": "warning",
    "log_min_duration_statement": "-1",
    "max_connections": "1200",
    "shared_buffers": "256MB",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "jit": "off",
    "autovacuum": "off",
}


class BenchError(RuntimeError):
    pass


# --- cleanup ------------------------------------------------------------------------


class Cleanup(contextlib.ExitStack):
    """An ExitStack whose callbacks are logged and never mask each other."""

    def add(self, what: str, fn: Callable[[], Any]) -> None:
        def run() -> None:
            try:
                fn()
            except Exception as exc:  # keep cleaning up the rest
                print(f"bench: cleanup of {what} failed: {exc}", file=sys.stderr)

        self.callback(run)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP behave like Ctrl-C (KeyboardInterrupt), so `finally` blocks run."""

    def handler(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    # Ctrl-C too, even when started in the background by a shell (which ignores SIGINT).
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def raise_fd_limit(want: int = 16384) -> None:
    """Children inherit it: the idle check holds ~2 sockets per connection in the proxy."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, max(soft, want)) if hard != resource.RLIM_INFINITY else max(soft, want)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


# --- processes ----------------------------------------------------------------------


def postgres_user_kwargs() -> dict[str, Any]:
    """Popen arguments that run a server as the `postgres` user when we are root
    (PgBouncer, like PostgreSQL, refuses to run as root)."""
    if not IS_ROOT:
        return {}
    pw = pwd.getpwnam("postgres")
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def chown_to_postgres(path: Path) -> None:
    if IS_ROOT:
        pw = pwd.getpwnam("postgres")
        os.chown(path, pw.pw_uid, pw.pw_gid)


def wait_port(
    host: str, port: int, proc: subprocess.Popen[Any] | None, timeout: float, what: str
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what} exited with code {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{what} did not listen on {host}:{port} within {timeout:.0f}s")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM the process group (it was started in its own session), then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


@dataclass
class Server:
    name: str
    host: str
    port: int
    proc: subprocess.Popen[Any] | None = None  # None: not ours to watch (PostgreSQL)
    pid: int | None = None

    def dsn_args(self) -> list[str]:
        return ["-h", self.host, "-p", str(self.port), "-U", "postgres"]


def start_postgres(
    cleanup: Cleanup, workdir: Path, settings: Mapping[str, str] | None = None
) -> tuple[LocalPostgres, Server]:
    pg = LocalPostgres(workdir / "pg", settings={**BENCH_PG_SETTINGS, **(settings or {})})
    cleanup.add("PostgreSQL", pg.destroy)
    pg.start()
    pid = int((pg.data_dir / "postmaster.pid").read_text().split()[0])
    return pg, Server("direct", pg.host, pg.port, pid=pid)


def start_pgbouncer(cleanup: Cleanup, workdir: Path, upstream: Server, pool_size: int) -> Server:
    """PgBouncer in session mode, trust auth, its config in `workdir`."""
    exe = _which("pgbouncer", "/usr/sbin/pgbouncer")
    d = workdir / "pgbouncer"
    d.mkdir(parents=True, exist_ok=True)
    chown_to_postgres(d)
    port = free_port()
    (d / "userlist.txt").write_text('"postgres" ""\n')
    (d / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={upstream.host} port={upstream.port}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {d / 'userlist.txt'}\n"
        "pool_mode = session\n"
        f"default_pool_size = {pool_size}\nmax_client_conn = {max(100, pool_size * 4)}\n"
        f"max_db_connections = 0\n"
        f"logfile = {d / 'pgbouncer.log'}\n"
        "log_connections = 0\nlog_disconnections = 0\nlog_pooler_errors = 1\n"
        "stats_period = 3600\n"
        "server_reset_query = DISCARD ALL\n"
        "ignore_startup_parameters = extra_float_digits\n"
    )
    for f in d.iterdir():
        chown_to_postgres(f)
    proc = subprocess.Popen(
        [exe, str(d / "pgbouncer.ini")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=(d / "stderr.log").open("wb"),
        start_new_session=True,
        cwd=d,
        **postgres_user_kwargs(),
    )
    cleanup.add("PgBouncer", lambda: stop_process(proc))
    wait_port("127.0.0.1", port, proc, 15, "PgBouncer")
    return Server("pgbouncer", "127.0.0.1", port, proc=proc, pid=proc.pid)


def start_pgseal(
    cleanup: Cleanup, workdir: Path, upstream: Server, *, workers: int = 1, name: str = "pgseal"
) -> Server:
    """`python -m proxy serve` as a subprocess, plaintext to the upstream."""
    port = free_port()
    env = {
        **os.environ,
        "PGSEAL_UPSTREAM_TLS_SSLMODE": "disable",
        "PGSEAL_LOG_LEVEL": "WARNING",
        "PGSEAL_SHUTDOWN_GRACE": "1",
    }
    env.pop("PGSEAL_CONFIG", None)
    log = (workdir / f"{name}.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            f"{upstream.host}:{upstream.port}",
            "--workers",
            str(workers),
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        env=env,
        cwd=REPO,
        start_new_session=True,
    )
    cleanup.add(name, lambda: stop_process(proc))
    wait_port("127.0.0.1", port, proc, 30, name)
    return Server(name, "127.0.0.1", port, proc=proc, pid=proc.pid)


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (the workers of `pgseal serve --workers N`)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _which(name: str, fallback: str) -> str:
    import shutil

    found = shutil.which(name) or (fallback if Path(fallback).exists() else None)
    if not found:
        raise BenchError(
            f"{name} not found: install the Debian package '{name}' (scripts/bootstrap.sh bench)"
        )
    return found


def pgbench_exe() -> str:
    candidate = find_pg_bindir() / "pgbench"
    return str(candidate) if candidate.exists() else _which("pgbench", "/usr/bin/pgbench")


# --- /proc ----------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def cpu_ticks(pid: int) -> tuple[int, int]:
    """(utime, stime) in clock ticks, from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]), int(fields[12])


def syscall_counts(pid: int) -> tuple[int, int]:
    """(read, write) system calls made so far by `pid` (syscr/syscw of /proc/PID/io):
    on loopback every write wakes the reader, so writes per transaction are a cost."""
    fields = dict(line.split(": ", 1) for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["syscr"]), int(fields["syscw"])


def tree_ticks(pid: int) -> int:
    """CPU ticks (user+sys) of `pid`, of its children that were reaped (cutime, cstime), and
    of those alive now: for a postmaster, every backend, ended or running."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    total = sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    for child in child_pids(pid):
        with contextlib.suppress(OSError, ValueError):
            total += sum(cpu_ticks(child))
    return total


def machine_ticks() -> tuple[int, int]:
    """(busy, idle) clock ticks of all CPUs together, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, idle


# --- pgbench ----------------------------------------------------------------------------


@dataclass
class RunResult:
    target: str
    mode: str
    clients: int
    tps: float
    transactions: int
    p50_us: float
    p99_us: float
    mean_us: float
    extra: dict[str, Any] = field(default_factory=dict)


_TPS = re.compile(r"^tps = ([0-9.]+)", re.MULTILINE)


def pgbench_command(
    server: Server,
    *,
    mode: str,
    clients: int,
    duration: float,
    log_prefix: Path | None,
    database: str = "postgres",
) -> list[str]:
    cmd = [
        pgbench_exe(),
        *server.dsn_args(),
        "-n",
        "-S",
        "-M",
        mode,
        "-c",
        str(clients),
        "-j",
        str(min(clients, os.cpu_count() or 1)),
        "-T",
        str(int(duration)),
    ]
    if log_prefix is not None:
        cmd += ["--log", f"--log-prefix={log_prefix}"]
    return [*cmd, database]


def run_pgbench(
    server: Server, *, mode: str, clients: int, duration: float, logdir: Path
) -> RunResult:
    """One pgbench -S run; TPS from its summary, p50/p99 from its per-transaction logs."""
    for old in logdir.glob("tx*"):
        old.unlink()
    prefix = logdir / "tx"
    cmd = pgbench_command(server, mode=mode, clients=clients, duration=duration, log_prefix=prefix)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
    )
    try:
        out, err = proc.communicate(timeout=duration + 60)
    finally:
        stop_process(proc, timeout=2)
    if proc.returncode != 0:
        raise BenchError(f"pgbench against {server.name} failed: {err.strip().splitlines()[-1:]}")
    found = _TPS.search(out)
    if not found:
        raise BenchError(f"pgbench printed no tps line: {out[-300:]}")
    latencies = read_latencies(glob.glob(f"{prefix}.*"))
    for f in glob.glob(f"{prefix}.*"):
        os.unlink(f)
    if not latencies:
        raise BenchError(f"pgbench against {server.name} logged no transactions")
    return RunResult(
        target=server.name,
        mode=mode,
        clients=clients,
        tps=float(found.group(1)),
        transactions=len(latencies),
        p50_us=percentile(latencies, 50),
        p99_us=percentile(latencies, 99),
        mean_us=sum(latencies) / len(latencies),
    )


def read_latencies(paths: Sequence[str]) -> list[int]:
    """Transaction latencies in µs from pgbench --log files
    (`client_id transaction_no time script_no time_epoch time_us`)."""
    out: list[int] = []
    for path in paths:
        with open(path) as f:
            out.extend(int(line.split(None, 3)[2]) for line in f)
    out.sort()
    return out


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * pct // 100))
    return float(sorted_values[int(rank) - 1])


def median(values: Sequence[float]) -> float:
    s = sorted(values)
    n = len(s)
    if n == 0:
        return float("nan")
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def init_pgbench(server: Server, scale: int) -> None:
    result = subprocess.run(
        [pgbench_exe(), *server.dsn_args(), "-i", "-q", "-s", str(scale), "postgres"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise BenchError(f"pgbench -i failed: {result.stderr.strip().splitlines()[-1:]}")


# --- results ------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": sys.version.split()[0],
        "loadavg_at_start": os.getloadavg(),
    }


def write_results(kind: str, payload: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def scratch_dir(cleanup: Cleanup, prefix: str) -> Path:
    """A temp dir removed on exit; readable by the postgres user (PgBouncer's config)."""
    import shutil

    d = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(d, 0o755)
    cleanup.add(f"scratch dir {d}", lambda: shutil.rmtree(d, ignore_errors=True))
    return d

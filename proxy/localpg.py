"""A throwaway PostgreSQL cluster from the local server binaries.

Used by `pgseal demo` and by the test suite when no Docker engine answers and
PGSEAL_TEST_DSN is not set. initdb and postgres refuse to run as root, so when
we are root every server command runs as the `postgres` system user (runuser).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


class LocalPostgresError(RuntimeError):
    pass


def find_pg_bindir() -> Path:
    """The bin folder of the newest local PostgreSQL server install."""
    env = os.environ.get("PGSEAL_PG_BINDIR")
    if env:
        return Path(env)
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("postgres")
    if on_path:
        return Path(on_path).parent
    raise LocalPostgresError(
        "no PostgreSQL server binaries found: install the Debian package 'postgresql' "
        "(or set PGSEAL_PG_BINDIR)"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


DEFAULT_HBA = (
    # Users named after an auth method use it; everyone else is trusted on loopback.
    "local all all trust",
    "host all scram_user 127.0.0.1/32 scram-sha-256",
    "host all md5_user 127.0.0.1/32 md5",
    "host all password_user 127.0.0.1/32 password",
    "hostssl all tls_only_user 127.0.0.1/32 trust",
    "hostnossl all tls_only_user 127.0.0.1/32 reject",
    "host all all 127.0.0.1/32 trust",
    "host all all ::1/128 trust",
)


class LocalPostgres:
    """initdb + postgres in `base_dir`; `start()`, `stop()`, `dsn()`."""

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        *,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        hba: Sequence[str] = DEFAULT_HBA,
        ssl_cert: tuple[str, str] | None = None,
    ) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "postgres.log"
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.settings = dict(settings or {})
        self.hba = tuple(hba)
        self.ssl_cert = ssl_cert
        self.bindir = find_pg_bindir()
        self._as_postgres = os.geteuid() == 0
        # Unix socket paths are limited to ~107 bytes: keep them in a short temp dir.
        self.socket_dir = Path(tempfile.mkdtemp(prefix="pgseal-sock-"))

    # -- running commands ------------------------------------------------------

    def _cmd(self, *args: str) -> list[str]:
        if self._as_postgres:
            return ["runuser", "-u", "postgres", "--", *args]
        return list(args)

    def _chown(self, path: Path) -> None:
        if self._as_postgres:
            pw = pwd.getpwnam("postgres")
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def _run(self, *args: str) -> None:
        result = subprocess.run(self._cmd(*args), capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise LocalPostgresError(f"{Path(args[0]).name} failed: {' | '.join(tail)}")

    # -- lifecycle -------------------------------------------------------------

    def init(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._chown(self.base_dir)
        self._chown(self.socket_dir)
        if (self.data_dir / "PG_VERSION").exists():
            return
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data_dir),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        )
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "max_connections": "500",
            "shared_buffers": "128MB",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "password_encryption": "'scram-sha-256'",
            "log_statement": "'all'",
            "log_min_messages": "warning",
            "log_line_prefix": "'%m [%p] %u@%d '",
            **{k: v for k, v in self.settings.items()},
        }
        if self.ssl_cert:
            cert, key = self.ssl_cert
            for name, src in (("server.crt", cert), ("server.key", key)):
                dst = self.data_dir / name
                shutil.copyfile(src, dst)
                os.chmod(dst, 0o600)
                self._chown(dst)
            conf.update(
                {"ssl": "on", "ssl_cert_file": "'server.crt'", "ssl_key_file": "'server.key'"}
            )
        with open(self.data_dir / "postgresql.auto.conf", "a") as f:
            for key, value in conf.items():
                f.write(f"{key} = {value}\n")
        (self.data_dir / "pg_hba.conf").write_text("\n".join(self.hba) + "\n")

    def start(self) -> LocalPostgres:
        self.init()
        if not self.log_path.exists():
            self.log_path.touch()
        self._chown(self.log_path)
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_path),
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {self.port} -k {self.socket_dir}",
            "start",
        )
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise LocalPostgresError(f"PostgreSQL did not start; see {self.log_path}")

    def stop(self, mode: str = "fast") -> None:
        if (self.data_dir / "postmaster.pid").exists():
            subprocess.run(
                self._cmd(
                    str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop"
                ),
                capture_output=True,
                check=False,
            )
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.base_dir, ignore_errors=True)

    # -- access ------------------------------------------------------------------

    def dsn(
        self, user: str = "postgres", database: str = "postgres", password: str | None = None
    ) -> str:
        auth = f"{user}:{password}@" if password else f"{user}@"
        return f"postgresql://{auth}{self.host}:{self.port}/{database}"

    def psql(self, sql: str, *, database: str = "postgres") -> str:
        """Run SQL as the superuser over the unix socket; returns stdout (tuples only)."""
        result = subprocess.run(
            [
                str(self.bindir / "psql") if (self.bindir / "psql").exists() else "psql",
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                database,
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise LocalPostgresError(result.stderr.strip())
        return result.stdout

"""Fixtures that run the proxy.

The proxy runs on its own event loop in a background thread (`ProxyThread`),
so that synchronous drivers (psycopg, psql in a subprocess) and asynchronous
ones (asyncpg on the test's loop) can all talk to it. `ProxyProcess` runs the
real `pgseal serve` command, for signals, workers and exit codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from proxy.config import Config, HostPort, load_config
from proxy.localpg import free_port
from proxy.server.app import ProxyServer


class _Proxy:
    """What both ways of running a proxy under test give: where it listens, a URL to it."""

    @property
    def host(self) -> str:
        raise NotImplementedError

    @property
    def port(self) -> int:
        raise NotImplementedError

    def dsn(
        self,
        user: str = "postgres",
        database: str = "postgres",
        password: str | None = None,
        **params: str,
    ) -> str:
        """A libpq URL to the proxy (`params`: query parameters, e.g. sslmode)."""
        auth = f"{user}:{password}@" if password else f"{user}@"
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"postgresql://{auth}{self.host}:{self.port}/{database}" + (
            f"?{query}" if query else ""
        )


class ProxyThread(_Proxy):
    """`with ProxyThread(config) as proxy:` a ProxyServer on its own loop and thread."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.server: ProxyServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    @property
    def host(self) -> str:
        return self.config.listen.host

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        self.server = ProxyServer(self.config)
        try:
            loop.run_until_complete(self.server.start())
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(self.server.shutdown(grace=1.0))
        loop.close()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the proxy's loop and return its result (for inspecting state)."""
        assert self.loop is not None
        fut: asyncio.Future[Any] = asyncio.run_coroutine_threadsafe(_call(fn), self.loop)  # type: ignore[assignment]
        return fut.result(10)

    def __enter__(self) -> ProxyThread:
        self._thread = threading.Thread(target=self._run, name="pgseal-proxy", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
        if self._thread is not None:
            self._thread.join(15)


async def _call(fn: Callable[[], Any]) -> Any:
    return fn()


class ProxyProcess(_Proxy):
    """The real `pgseal serve` in a subprocess."""

    def __init__(
        self, args: list[str], env: dict[str, str] | None = None, port: int | None = None
    ) -> None:
        self._port = port or free_port()
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        return self._port

    def start(self, timeout: float = 20.0) -> ProxyProcess:
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "proxy", "serve", "--listen", f"127.0.0.1:{self.port}",
                *self.args,
            ],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read() if self.proc.stdout else ""
                raise RuntimeError(f"pgseal serve exited {self.proc.returncode}: {out}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return self
            time.sleep(0.05)
        raise RuntimeError("pgseal serve did not start listening")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> tuple[int, str]:
        assert self.proc is not None
        out, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def proxy_config(pg: Any, **overrides: Any) -> Config:
    """A Config for a proxy in front of the test PostgreSQL, on a free port."""
    base = load_config(None, environ={})
    config = replace(base, listen=HostPort("127.0.0.1", 0), upstream=HostPort(pg.host, pg.port),
                     upstream_tls=replace(base.upstream_tls, sslmode="disable"))
    return replace(config, **overrides) if overrides else config


@pytest.fixture(scope="session")
def proxy(pg: Any) -> Iterator[ProxyThread]:
    """A pass-through proxy (no policies) in front of the test PostgreSQL, shared by a session."""
    with ProxyThread(proxy_config(pg)) as running:
        yield running


@pytest.fixture
def make_proxy(pg: Any) -> Iterator[Callable[..., ProxyThread]]:
    """Start extra proxies with config overrides: make_proxy(tls=..., upstream_tls=...)."""
    started: list[ProxyThread] = []

    def start(**overrides: Any) -> ProxyThread:
        p = ProxyThread(proxy_config(pg, **overrides)).__enter__()
        started.append(p)
        return p

    yield start
    for p in started:
        p.__exit__(None, None, None)


@pytest.fixture
def proxy_process(pg: Any, tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """Start `pgseal serve` subprocesses: proxy_process(extra_args, env=...)."""
    started: list[ProxyProcess] = []

    def start(args: list[str] | None = None, env: dict[str, str] | None = None) -> ProxyProcess:
        argv = ["--upstream", f"{pg.host}:{pg.port}", *(args or [])]
        p = ProxyProcess(
            argv, env={"PGSEAL_UPSTREAM_TLS_SSLMODE": "disable", **(env or {})}
        ).start()
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


DATA = Path(__file__).resolve().parent.parent / "data"


@pytest.fixture(scope="session")
def sealing_config(pg: Any, keys_config: Config) -> Config:
    """keys_config + the test policy, in front of the test PostgreSQL (tables created)."""
    pg.execute((DATA / "schema.sql").read_text())
    base = proxy_config(pg)
    return replace(
        keys_config, listen=base.listen, upstream=base.upstream, upstream_tls=base.upstream_tls,
        policies=(str(DATA / "policy.yaml"),),
    )


@pytest.fixture(scope="session")
def sealing_proxy(sealing_config: Config) -> Iterator[ProxyThread]:
    """A proxy that encrypts per tests/data/policy.yaml, shared by a session."""
    with ProxyThread(sealing_config) as running:
        yield running

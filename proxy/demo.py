"""`pgseal demo`: a throwaway PostgreSQL + the proxy in front of it, on embedded defaults.

Everything lives under `--dir` (default ./.pgseal/) and is removed on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging.config
import shutil
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from proxy.config import Config, HostPort, UpstreamTlsConfig
from proxy.localpg import LocalPostgres, LocalPostgresError, free_port
from proxy.server.app import LOGGING, ProxyServer, install_event_loop_policy


def demo_config(config: Config, pg: LocalPostgres) -> Config:
    return replace(
        config,
        upstream=HostPort(pg.host, pg.port),
        upstream_tls=UpstreamTlsConfig(sslmode="disable"),
    )


async def _serve(config: Config, pg: LocalPostgres) -> None:
    server = ProxyServer(config)
    try:
        await server.start()
    except OSError:
        # The default port is taken (another proxy?): the demo takes any free one.
        server = ProxyServer(replace(config, listen=HostPort(config.listen.host, free_port())))
        await server.start()
    dsn = f"postgresql://postgres@{config.listen.host}:{server.port}/postgres"
    print()
    print("pgseal demo is running. Connect through the proxy with:")
    print(f'    psql "{dsn}"')
    print(f"PostgreSQL itself (to see what is stored): psql \"{pg.dsn()}\"")
    print("Ctrl-C stops everything and removes the demo's files.", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.shutdown(grace=2.0)


def cmd_demo(args: Any, config: Config) -> int:
    logging.config.dictConfig({**LOGGING, "root": {"level": "WARNING", "handlers": ["stderr"]}})
    base = Path(args.dir).resolve()
    if (base / "pg" / "data" / "postmaster.pid").exists():
        # A previous demo died without cleaning up: stop its server before starting over.
        with contextlib.suppress(LocalPostgresError):
            LocalPostgres(base / "pg").stop("immediate")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True, exist_ok=True)
    pg = LocalPostgres(base / "pg", settings={"log_statement": "'all'"})
    try:
        print(f"pgseal demo: starting PostgreSQL under {base}/pg ...", flush=True)
        pg.start()
        install_event_loop_policy()
        asyncio.run(_serve(demo_config(config, pg), pg))
    except LocalPostgresError as exc:
        print(f"pgseal: {exc}", file=sys.stderr)
        return 1
    finally:
        pg.destroy()
        shutil.rmtree(base, ignore_errors=True)
        print("pgseal demo: stopped and cleaned up.", flush=True)
    return 0

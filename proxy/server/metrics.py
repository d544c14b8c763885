"""/metrics (Prometheus text format), /healthz and /readyz for operators.

A deliberately small HTTP/1.0 responder on its own port (config `metrics.listen`):
GET only, one request per connection, no bodies accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from proxy._native import build_name

if TYPE_CHECKING:
    from proxy.server.app import ProxyServer

log = logging.getLogger("pgseal.metrics")


@dataclass
class Stats:
    """Counters the shell bumps; cheap enough for the hot path (plain int adds)."""

    started: float = field(default_factory=time.time)
    connections_total: int = 0
    connections_rejected: int = 0
    key_fetches: int = 0
    key_fetch_failures: int = 0
    audit_failures: int = 0


def render(server: ProxyServer) -> str:
    stats = server.stats
    lines = [
        "# HELP pgseal_up 1 while the proxy accepts connections.",
        "# TYPE pgseal_up gauge",
        f"pgseal_up {1 if server.accepting else 0}",
        "# HELP pgseal_build_info 1, labelled with the build that runs (proxy/_native.py).",
        "# TYPE pgseal_build_info gauge",
        f'pgseal_build_info{{build="{build_name()}"}} 1',
        "# TYPE pgseal_start_time_seconds gauge",
        f"pgseal_start_time_seconds {stats.started:.3f}",
        "# TYPE pgseal_connections_active gauge",
        f"pgseal_connections_active {len(server.pumps)}",
        "# TYPE pgseal_connections_total counter",
        f"pgseal_connections_total {stats.connections_total}",
        "# TYPE pgseal_key_fetches_total counter",
        f"pgseal_key_fetches_total {stats.key_fetches}",
        "# TYPE pgseal_key_fetch_failures_total counter",
        f"pgseal_key_fetch_failures_total {stats.key_fetch_failures}",
        "# TYPE pgseal_audit_failures_total counter",
        f"pgseal_audit_failures_total {stats.audit_failures}",
    ]
    runtime = server.datapath
    if runtime is not None:
        cache = runtime.service.cache
        lines += [
            "# TYPE pgseal_key_cache_hits_total counter",
            f"pgseal_key_cache_hits_total {cache.hits}",
            "# TYPE pgseal_key_cache_misses_total counter",
            f"pgseal_key_cache_misses_total {cache.misses}",
            "# TYPE pgseal_hsm_calls_total counter",
            f"pgseal_hsm_calls_total {getattr(runtime.service.hsm, 'calls', 0)}",
        ]
    return "\n".join(lines) + "\n"


class MetricsServer:
    def __init__(self, proxy: ProxyServer, host: str, port: int) -> None:
        self.proxy = proxy
        self.host = host
        self.port = port
        self._server: asyncio.base_events.Server | None = None
        self._ready_checked = 0.0
        self._ready = False
        self._ready_reason = "not checked"

    async def start(self) -> None:
        # With several workers each one answers on the shared port (SO_REUSEPORT): a scrape
        # sees one worker's counters; /healthz and /readyz hold for any of them.
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, reuse_port=self.proxy.config.workers > 1 or None
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1)

    async def _readiness(self) -> tuple[bool, str]:
        # At most one key service check every 5 s, however often the probe asks.
        if time.monotonic() - self._ready_checked < 5:
            return self._ready, self._ready_reason
        self._ready_checked = time.monotonic()
        if not self.proxy.accepting:
            self._ready, self._ready_reason = False, "not accepting connections"
        elif self.proxy.datapath is None:
            self._ready, self._ready_reason = True, "ok"
        else:
            try:
                await asyncio.wait_for(self.proxy.datapath.service.check(), 3)
                self._ready, self._ready_reason = True, "ok"
            except Exception as exc:
                self._ready, self._ready_reason = False, f"key service: {exc}"
        return self._ready, self._ready_reason

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            parts = line.decode("latin-1").split()
            path = parts[1] if len(parts) >= 2 and parts[0] == "GET" else None
            status, body, ctype = "404 Not Found", "not found\n", "text/plain"
            if path == "/metrics":
                status, body, ctype = "200 OK", render(self.proxy), "text/plain; version=0.0.4"
            elif path == "/healthz":
                status, body = "200 OK", "ok\n"
            elif path == "/readyz":
                ok, reason = await self._readiness()
                status, body = ("200 OK" if ok else "503 Service Unavailable"), reason + "\n"
            elif path is None:
                status, body = "405 Method Not Allowed", "GET only\n"
            data = body.encode()
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(data)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        except (TimeoutError, OSError, UnicodeDecodeError):
            pass
        finally:
            writer.close()

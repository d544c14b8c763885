"""The session tenant the proxy tracks against the one PostgreSQL has, statement for
statement, over random sequences: BEGIN / COMMIT / ROLLBACK [AND CHAIN], SET [LOCAL],
RESET [ALL], SAVEPOINT / RELEASE / ROLLBACK TO (names reused, quoted, non-ASCII, over 63
bytes), errors, several statements in one Query, pipelined Queries and extended-protocol
batches. The tracker may say "uncertain" (protected statements are then refused); it must
never be sure of a tenant PostgreSQL does not have: that would seal and open under it.

A DataPath is driven directly, its bytes sent to a real PostgreSQL over a raw socket and
every answer fed back, then `current_setting('pgseal.tenant')` is compared.
PGSEAL_TRACKER_SEEDS=N runs N random sequences (default 150).
"""

from __future__ import annotations

import os
import random
import socket
import struct
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from proxy.policy import load_policies
from proxy.session.datapath import DataPath, SessionInfo
from proxy.wire import messages as m
from proxy.wire.framing import Frame
from tests.unit.test_datapath import FakeKeyRing

pytestmark = pytest.mark.integration

POLICY = Path(__file__).resolve().parent.parent / "data" / "policy.yaml"
TENANTS = ("ta", "tb", "tc")
NAMES = ("s", "S", '"s"', '"S"', "t", "Ärzte", '"Ärzte"', "ÄRZTE", "a" * 63 + "X", "a" * 63 + "Y")


class _Server:
    """A raw protocol connection to PostgreSQL (startup tenant 'init')."""

    def __init__(self, host: str, port: int, user: str) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        body = (
            struct.pack("!i", 196608)
            + f"user\0{user}\0database\0postgres\0options\0-c pgseal.tenant=init\0\0".encode()
        )
        self.sock.sendall(struct.pack("!i", len(body) + 4) + body)
        self.buf = b""
        while self.read()[0] != ord("Z"):
            pass

    def read(self) -> tuple[int, bytes]:
        while True:
            if len(self.buf) >= 5:
                n = struct.unpack("!i", self.buf[1:5])[0]
                if len(self.buf) >= 1 + n:
                    raw, self.buf = self.buf[: 1 + n], self.buf[1 + n :]
                    return raw[0], raw
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("server closed the connection")
            self.buf += data

    def tenant(self) -> tuple[str | None, bool]:
        """(current_setting, whether the block is failed so it could not be read)."""
        self.sock.sendall(m.Query("SELECT current_setting('pgseal.tenant', true)").encode())
        value: str | None = None
        failed = False
        while True:
            t, raw = self.read()
            if t == ord("D"):
                cell = m.decode_data_row(raw[5:]).values[0]
                value = None if cell is None else bytes(cell).decode()
            elif t == ord("E"):
                failed = True
            elif t == ord("Z"):
                return value, failed


def _statement(rng: random.Random) -> str:
    tenant, name = rng.choice(TENANTS), rng.choice(NAMES)
    return rng.choice(
        [
            "BEGIN", "START TRANSACTION", "COMMIT", "END", "ROLLBACK", "ABORT",
            "ROLLBACK AND CHAIN", "COMMIT AND CHAIN",
            f"SET pgseal.tenant = '{tenant}'", f"SET LOCAL pgseal.tenant = '{tenant}'",
            f"SET SESSION pgseal.tenant = {tenant}", "RESET pgseal.tenant",
            "SET pgseal.tenant TO DEFAULT", "SET LOCAL pgseal.tenant TO DEFAULT",
            f"SAVEPOINT {name}", f"SAVEPOINT {name}", f"RELEASE {name}",
            f"RELEASE SAVEPOINT {name}", f"ROLLBACK TO {name}",
            f"ROLLBACK WORK TO SAVEPOINT {name}", "SELECT 1/0", "SELECT 1", "RESET ALL",
        ]
    )  # fmt: skip


def _query_text(rng: random.Random) -> str:
    return "; ".join(_statement(rng) for _ in range(rng.choice((1, 1, 1, 2, 3))))


def _extended(statements: list[str], rng: random.Random, sync_last: bool) -> list[bytes]:
    msgs: list[bytes] = []
    for sql in statements:
        msgs += [m.Parse("", sql).encode(), m.Bind("", "", (), (), ()).encode()]
        msgs.append(m.Execute("").encode())
        if rng.random() < 0.3:
            msgs.append(m.SYNC)
    if sync_last and msgs[-1] != m.SYNC:
        msgs.append(m.SYNC)
    return msgs


def _messages(rng: random.Random) -> tuple[list[list[bytes]], str]:
    """One batch, in parts: each part is sent once the answers to the one before it have
    come up to a ReadyForQuery (a later part goes out while an earlier segment is open)."""
    mode = rng.random()
    if mode < 0.5:
        sql = _query_text(rng)
        return [[m.Query(sql).encode()]], f"Q {sql!r}"
    if mode < 0.7:  # pipelined Queries: an answered SET ahead of a failed one
        texts = [_query_text(rng) for _ in range(rng.choice((2, 2, 3)))]
        return [[m.Query(sql).encode() for sql in texts]], " + ".join(f"Q {t!r}" for t in texts)
    statements = [_statement(rng) for _ in range(rng.choice((1, 2, 3)))]
    if mode < 0.85:
        return [_extended(statements, rng, sync_last=True)], f"X {statements!r}"
    # A Query, then Executes whose Sync is sent only after the Query is answered.
    sql = _query_text(rng)
    first = [m.Query(sql).encode(), *_extended(statements, rng, sync_last=False)]
    rest = [_statement(rng) for _ in range(rng.choice((1, 2)))]
    parts = [first, _extended(rest, rng, sync_last=True)]
    return parts, f"Q {sql!r} + X {statements!r} | X {rest!r}"


def _run(seed: int, host: str, port: int, user: str, steps: int = 25) -> list[str] | None:
    rng = random.Random(seed)
    server = _Server(host, port, user)
    policies = load_policies([POLICY])
    dp = DataPath(policies, FakeKeyRing(), SessionInfo(user, "postgres", "init"), parameters={})
    log: list[str] = []
    try:
        for _ in range(steps):
            parts, what = _messages(rng)
            for i, msgs in enumerate(parts):
                out = b"".join(dp.client_frame(Frame(x[0], x[5:])) for x in msgs)
                server.sock.sendall(out)
                last_part = i == len(parts) - 1
                while True:
                    t, raw = server.read()
                    dp.server_frame(Frame(raw[0], raw[5:]))
                    if t == ord("Z") and (not last_part or dp._segments_in_flight() == 0):
                        break
            value, failed = server.tenant()
            tracked, unsure = dp.tenant.current, dp.tenant.uncertain
            log.append(f"{what}: server {value!r}, proxy {tracked!r}, uncertain {unsure}")
            if not failed and not unsure and value != tracked:
                return log
    finally:
        server.sock.close()
    return None


def test_the_tracked_tenant_is_never_a_certain_wrong_one(pg: Any) -> None:
    parts = urlsplit(pg.superuser_dsn)
    host, port, user = parts.hostname or "127.0.0.1", parts.port or 5432, parts.username
    wrong = {}
    for seed in range(int(os.environ.get("PGSEAL_TRACKER_SEEDS", "150"))):
        log = _run(seed, host, port, user or "postgres")
        if log is not None:
            wrong[seed] = log[-6:]
    assert not wrong, "\n".join(
        f"seed {seed}:\n  " + "\n  ".join(lines) for seed, lines in list(wrong.items())[:3]
    )

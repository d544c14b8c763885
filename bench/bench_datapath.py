"""CPU cost of the pure core per transaction of the encrypted benchmark (no sockets).

`python -m bench datapath [-- --seconds S]` drives one `ProxySession` with its `DataPath`
in-process through the exact messages of `bench/encrypted.py`'s pgbench script
(extended protocol: Parse, Bind, Describe portal, Execute, Sync per statement; the
server's answers with real cells), once on the encrypted table and once on its plaintext
twin, and prints microseconds per transaction (median of several timed blocks), plus
the cost of turning that transaction's audit notes into chained JSON lines.

Deterministic and quiet next to a pgbench run: use it to see what a change to the data
path saves; the pgbench benchmark (`python -m bench encrypted`) says what it is worth.

`--instructions` counts instead of timing: each transaction runs under valgrind's
callgrind, and the machine instructions per transaction are the difference between a
run of 20 and one of 220 transactions, over 200 (start-up, imports and the first,
cold analysis of each statement cancel out). The count is the same from run to run,
whatever the host is doing: the measure to compare two builds on a noisy machine
(`apt-get install valgrind`; about a minute per run).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path

# Runnable as a plain script from a checkout, without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy._native import build_name, running_compiled
from proxy.audit.records import ChainHead, chain
from proxy.crypto.cells import CellKey
from proxy.crypto.values import SessionFormat, to_canonical
from proxy.errors import PgsealError
from proxy.policy.loader import load_policies
from proxy.policy.model import PolicySet
from proxy.session import datapath
from proxy.session.connection import ProxySession, WriteAudit
from proxy.session.datapath import AuditNote, ConnectionFacts, DataPath, SessionInfo, audit_records
from proxy.wire import messages as m

SECURE_OID = 40001
PLAIN_OID = 40002
POLICY_YAML = """
version: 1
tables:
  public.bench_secure:
    tenant: {column: tenant_id}
    isolation: strict
    columns:
      email: {type: text, search: equality}
      name: {type: text}
      balance: {type: numeric}
"""


class StaticKeyRing:
    """Every key in memory (the cache after warm-up): no misses, no faults."""

    def __init__(self) -> None:
        self.key = CellKey(7, "t1", bytes(range(32)))

    def current(self, tenant: str, uses: int) -> CellKey | None:
        return self.key if tenant == "t1" else None

    def by_id(self, key_id: int, uses: int) -> CellKey | None:
        return self.key if key_id == 7 else None

    def versions(self, tenant: str, uses: int) -> list[CellKey] | None:
        return [self.key] if tenant == "t1" else None

    def destroyed(self, key_id: int) -> str | None:
        return None

    def failure(self) -> PgsealError | None:
        return None


def _text(value: str) -> bytes:
    return value.encode()


def _field(
    name: str, table_oid: int, attnum: int, type_oid: int, typlen: int
) -> m.FieldDescription:
    return m.FieldDescription(name, table_oid, attnum, type_oid, typlen, -1, 0)


def _statement(sql: str, params: tuple[bytes, ...]) -> bytes:
    return b"".join(
        (
            m.Parse("", sql, ()).encode(),
            m.Bind("", "", (), params, (0,)).encode(),
            m.Describe("P", "").encode(),
            m.Execute("", 0).encode(),
            m.SYNC,
        )
    )


def _answer(
    fields: tuple[m.FieldDescription, ...] | None, row: tuple[bytes | None, ...] | None, tag: str
) -> bytes:
    parts = [b"1\0\0\0\4", b"2\0\0\0\4"]
    parts.append(m.RowDescription(fields).encode() if fields is not None else b"n\0\0\0\4")
    if row is not None:
        parts.append(m.DataRow(row).encode())
    parts.append(m.CommandComplete(tag).encode())
    parts.append(m.ReadyForQuery("I").encode())
    return b"".join(parts)


def transaction(encrypted: bool, key: CellKey) -> list[tuple[bytes, bytes]]:
    """(client bytes, server answer) of the three statements of one pgbench transaction."""
    table = "bench_secure" if encrypted else "bench_plain"
    oid = SECURE_OID if encrypted else PLAIN_OID
    email, name, balance = "user42@example.com", "Customer Name 42", "3325.98"
    fmt = SessionFormat()
    if encrypted:

        def cell(column: str, type_name: str, value: str, deterministic: bool) -> bytes:
            canonical = to_canonical(type_name, value.encode(), 0, fmt)
            sealed = key.seal(
                f"public.bench_secure.{column}", canonical, deterministic=deterministic
            )
            return b"\\x" + sealed.hex().encode()

        stored = (
            cell("email", "text", email, True),
            cell("name", "text", name, False),
            cell("balance", "numeric", balance, False),
        )
        cell_type, cell_len = 17, -1
    else:
        stored = (_text(email), _text(name), _text(balance))
        cell_type, cell_len = 25, -1
    balance_type = cell_type if encrypted else 1700
    # The proxy adds the row tenant column to a SELECT that neither selects nor pins it,
    # and PostgreSQL answers it (the client never sees it).
    row_tenant = (_field("tenant_id", oid, 2, 25, -1),) if encrypted else ()
    tenant_value = (b"t1",) if encrypted else ()
    by_id = (
        _statement(f"SELECT email, name, balance FROM {table} WHERE id = $1", (b"42",)),
        _answer(
            (
                _field("email", oid, 3, cell_type, cell_len),
                _field("name", oid, 4, cell_type, cell_len),
                _field("balance", oid, 5, balance_type, -1),
                *row_tenant,
            ),
            (*stored, *tenant_value),
            "SELECT 1",
        ),
    )
    by_email = (
        _statement(f"SELECT id, name, balance FROM {table} WHERE email = $1", (_text(email),)),
        _answer(
            (
                _field("id", oid, 1, 20, 8),
                _field("name", oid, 4, cell_type, cell_len),
                _field("balance", oid, 5, balance_type, -1),
                *row_tenant,
            ),
            (b"42", stored[1], stored[2], *tenant_value),
            "SELECT 1",
        ),
    )
    insert = (
        _statement(
            f"INSERT INTO {table} (tenant_id, email, name, balance) VALUES ('t1', $1, $2, $3)",
            (b"5551234567", _text(name), str(Decimal(balance)).encode()),
        ),
        _answer(None, None, "INSERT 0 1"),
    )
    return [by_id, by_email, insert]


def connected_session(policies: PolicySet, keys: StaticKeyRing) -> ProxySession:
    """A session past startup and the data path's catalog query."""

    def factory(info: SessionInfo, parameters: dict[str, str]) -> DataPath:
        return DataPath(policies, keys, info, parameters=parameters)

    session = ProxySession(client_tls_available=False, datapath_factory=factory)
    startup = m.StartupMessage(
        196608, (("user", "bench"), ("database", "bench"), ("options", "-c pgseal.tenant=t1"))
    )
    session.client_data(startup.encode())
    session.upstream_connected(tls=False)
    session.server_data(
        m.Authentication(m.AUTH_OK).encode()
        + m.ParameterStatus("client_encoding", "UTF8").encode()
        + m.ParameterStatus("DateStyle", "ISO, MDY").encode()
        + m.ParameterStatus("TimeZone", "UTC").encode()
        + m.BackendKeyData(1, 2).encode()
        + m.ReadyForQuery("I").encode()
    )
    catalog = b"".join(
        (
            m.RowDescription(
                tuple(_field(n, 0, 0, 25, -1) for n in ("oid", "nspname", "relname", "cols"))
            ).encode(),
            m.DataRow(
                (
                    str(SECURE_OID).encode(),
                    b"public",
                    b"bench_secure",
                    b"{id,tenant_id,email,name,balance}",
                )
            ).encode(),
            m.CommandComplete("SELECT 1").encode(),
            m.RowDescription(tuple(_field(n, 0, 0, 25, -1) for n in "abcd")).encode(),
            # current_user, pgseal.tenant and session_user as UTF-8 in hex
            m.DataRow(
                (b"1", b"hex", *(n.hex().encode() for n in (b"bench", b"t1", b"bench")))
            ).encode(),
            m.CommandComplete("SELECT 1").encode(),
            m.ReadyForQuery("I").encode(),
        )
    )
    session.server_data(catalog)
    session.drain()
    return session


def measure(run: Callable[[], None], seconds: float) -> float:
    """Median seconds per call over timed blocks of about 50 ms."""
    run()
    start = time.perf_counter()
    calls = 0
    while time.perf_counter() - start < 0.05:
        run()
        calls += 1
    block = max(1, calls)
    samples = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(samples) < 5:
        t0 = time.perf_counter()
        for _ in range(block):
            run()
        samples.append((time.perf_counter() - t0) / block)
    return statistics.median(samples)


@contextmanager
def stubbed_kernels(key: CellKey) -> Iterator[None]:
    """CellKey.seal/open and the data path's to_canonical/from_canonical return constants
    (restored on exit). The sealed constant is a real cell of `key`, so its header is read
    and its key looked up as usual."""
    cell = key.seal("public.bench_secure.name", b"x", deterministic=False)
    codecs = ("to_canonical", "from_canonical")  # as the data path module imported them
    saved = (CellKey.seal, CellKey.open, *(getattr(datapath, name) for name in codecs))

    def seal(self: CellKey, column: str, plaintext: bytes, *, deterministic: bool) -> bytes:
        return cell

    def open_cell(self: CellKey, column: str, data: object) -> bytes:
        return b"x"

    def codec(type_name: str, value: bytes, fmt: int, session: SessionFormat) -> bytes:
        return b"x"

    CellKey.seal = seal  # type: ignore[method-assign]
    CellKey.open = open_cell  # type: ignore[method-assign,assignment]
    for name in codecs:
        setattr(datapath, name, codec)
    try:
        yield
    finally:
        CellKey.seal, CellKey.open = saved[0], saved[1]  # type: ignore[method-assign]
        for name, original in zip(codecs, saved[2:], strict=True):
            setattr(datapath, name, original)


def one_transaction(session: ProxySession, script: list[tuple[bytes, bytes]]) -> None:
    for client_bytes, server_bytes in script:
        if not session.client_passes(client_bytes):
            session.client_data(client_bytes)
        if not session.server_passes(server_bytes):
            session.server_data(server_bytes)
        session.drain()


def check_opens(session: ProxySession, script: list[tuple[bytes, bytes]]) -> None:
    """The transaction really opens its cells (a script out of step with what the data
    path expects would measure a path that opens nothing)."""
    to_client = b""
    for client_bytes, server_bytes in script:
        session.client_data(client_bytes)
        session.server_data(server_bytes)
        to_client += b"".join(session.drain()[1])
    if to_client.count(b"Customer Name 42") != 2 or b"3325.98" not in to_client:
        raise SystemExit("bench_datapath: the encrypted transaction did not open its cells")


def audit_notes(session: ProxySession, script: list[tuple[bytes, bytes]]) -> list[AuditNote]:
    notes: list[AuditNote] = []
    for client_bytes, server_bytes in script:
        session.client_data(client_bytes)
        session.server_data(server_bytes)
        for effect in session.drain()[2]:
            if isinstance(effect, WriteAudit):
                notes.extend(effect.notes)
    return notes


def load_bench_policies() -> PolicySet:
    with tempfile.TemporaryDirectory() as scratch:
        policy_file = Path(scratch) / "bench-policy.yaml"
        policy_file.write_text(POLICY_YAML)
        return load_policies([policy_file])


def run_transactions(table: str, count: int) -> None:
    """The --run mode: `count` transactions and nothing else (what callgrind counts)."""
    keys = StaticKeyRing()
    session = connected_session(load_bench_policies(), keys)
    script = transaction(table == "encrypted", keys.key)
    for _ in range(count):
        one_transaction(session, script)


INSTRUCTION_RUNS = (20, 220)


def count_instructions(table: str) -> float:
    """Machine instructions per transaction on `table` (see the module doc)."""
    counts = []
    for count in INSTRUCTION_RUNS:
        result = subprocess.run(
            [
                "valgrind", "--tool=callgrind", "--callgrind-out-file=" + os.devnull,
                sys.executable, str(Path(__file__).resolve()), "--run", table, str(count),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        found = re.search(r"Collected : (\d+)", result.stderr)
        if result.returncode != 0 or found is None:
            raise SystemExit(f"bench_datapath: valgrind failed:\n{result.stderr[-2000:]}")
        counts.append(int(found.group(1)))
    return (counts[1] - counts[0]) / (INSTRUCTION_RUNS[1] - INSTRUCTION_RUNS[0])


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per measurement")
    p.add_argument(
        "--instructions", action="store_true",
        help="count machine instructions per transaction under valgrind instead of timing",
    )
    p.add_argument("--run", nargs=2, metavar=("TABLE", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run:
        if args.run[0] not in ("plain", "encrypted"):
            p.error("--run: the table is plain or encrypted")
        run_transactions(args.run[0], int(args.run[1]))
        return 0
    if args.instructions:
        if shutil.which("valgrind") is None:
            print("bench_datapath: --instructions needs valgrind (apt-get install valgrind)")
            return 1
        counted = {table: count_instructions(table) for table in ("plain", "encrypted")}
        print(
            f"pure core ({build_name()} build) per pgbench transaction, machine instructions "
            f"(callgrind, runs of {INSTRUCTION_RUNS[0]} and {INSTRUCTION_RUNS[1]}):"
        )
        for table, n in counted.items():
            print(f"  {table + ' table':<17} {n:>10,.0f}")
        return 0
    policies = load_bench_policies()
    keys = StaticKeyRing()
    check_opens(connected_session(policies, keys), transaction(True, keys.key))
    per_tx: dict[str, float] = {}
    for label, encrypted in (("plain", False), ("encrypted", True)):
        session = connected_session(policies, keys)
        script = transaction(encrypted, keys.key)
        per_tx[label] = measure(lambda: one_transaction(session, script), args.seconds)  # noqa: B023
    # The same encrypted transaction with sealing, opening and the value codecs replaced by
    # constants: what the data path's own logic costs (decode, rules, keys, re-encode,
    # audit notes), i.e. the floor no faster crypto or codec can go below. Pure build
    # only: compiled code calls the compiled functions directly, past any patch.
    if not running_compiled():
        with stubbed_kernels(keys.key):
            session = connected_session(policies, keys)
            script = transaction(True, keys.key)
            per_tx["logic"] = measure(lambda: one_transaction(session, script), args.seconds)
    notes = tuple(audit_notes(connected_session(policies, keys), transaction(True, keys.key)))
    facts = ConnectionFacts("bench", "bench", "pgbench", "127.0.0.1", "1234.5")
    stamped = [(r, "2026-12-06T16:00:00.000000Z") for r in audit_records(notes, facts)]
    records_s = measure(lambda: audit_records(notes, facts), args.seconds)
    chain_s = measure(lambda: chain(stamped, ChainHead()), args.seconds)
    print(
        f"pure core ({build_name()} build) per pgbench transaction (3 statements, extended "
        "protocol), median:"
    )
    print(f"  plain table       {per_tx['plain'] * 1e6:8.1f} µs")
    print(f"  encrypted table   {per_tx['encrypted'] * 1e6:8.1f} µs")
    if "logic" in per_tx:
        print(
            f"    of which logic  {per_tx['logic'] * 1e6:8.1f} µs  (crypto and value codecs "
            "stubbed out)"
        )
    else:
        print("    of which logic: PGSEAL_PURE=1 only (compiled calls cannot be stubbed out)")
    print(
        f"  audit notes       {len(notes)} per transaction: records {records_s * 1e6:.1f} µs "
        f"+ chain {chain_s * 1e6:.1f} µs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

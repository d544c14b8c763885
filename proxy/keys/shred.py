"""`pgseal keys shred-report --tenant T`: the evidence that a tenant was crypto-shredded.

What is checked, and why each matters:

- keystore: every key version of the tenant is `destroyed`, and its row holds neither
  wrapped bytes nor a nonce (the row is read, not just its state);
- cache: this process holds no key of the tenant. Other processes cannot be inspected
  from here: they were told by the NOTIFY committed with the destroy (the listeners
  connected now are counted), one that missed it dropped its whole cache on reconnect,
  and any entry from before the destroy is gone by TTL at `destroyed_at + ttl` anyway;
- audit: a key.destroy record for every destroyed version, in every sink that can be
  read back (jsonl, postgres), with its seq and hash, and whether that sink's hash chain
  verifies (a trail whose writer is still running ends without audit.stop: reported, not
  a failure);
- what cannot be erased from here: copies of the wrapped bytes in old row versions of
  the keys table (until VACUUM), in WAL and in backups. They are useless once the master
  key that wrapped them is destroyed on the HSM (`pgseal keys rotate-master`), which the
  report checks per master key.

The tenant counts as shredded (exit 0) when it has keys, all destroyed with nothing
left in their rows, none in this process's cache, and every destroy is in a readable,
unbroken audit trail. Otherwise the first reason is the one-line failure.

Reading the evidence needs the keystore and the audit sinks, not the HSM.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import asyncpg

from proxy.audit.records import VerifyReport, verify_lines
from proxy.audit.sinks import quote_table
from proxy.audit.verify import _file_lines
from proxy.config import Config
from proxy.keys.cache import TenantKeyCache
from proxy.keys.keystore import DESTROYED, Conn, KeyRow, Keystore, MasterRow


@dataclass(frozen=True, slots=True)
class DestroyRecord:
    """A key.destroy audit record found for the tenant."""

    seq: int
    hash: str
    ts: str
    key_id: int | None
    key_version: int | None


@dataclass(slots=True)
class SinkEvidence:
    """What one audit sink holds about the destruction."""

    name: str
    readable: bool
    records: list[DestroyRecord] = field(default_factory=list)
    chain: str = ""  # "intact", "intact (writer running or cut: ...)", "BROKEN: ...", ...
    chain_ok: bool = False


@dataclass(slots=True)
class ShredReport:
    tenant: str
    keystore: str
    keys: list[KeyRow]
    masters: dict[str, MasterRow]
    in_cache: bool
    listeners: int | None
    dead_rows: tuple[int, dt.datetime | None] | None
    ttl_seconds: float
    sinks: list[SinkEvidence]

    # -- the verdict

    def reasons(self) -> list[str]:
        """Why the tenant is not (provably) shredded; empty when it is."""
        t = self.tenant
        out: list[str] = []
        if not self.keys:
            out.append(f"tenant {t!r} has no data keys in the {self.keystore} "
                       "(nothing was shredded here: wrong tenant or keystore?)")
        for k in self.keys:
            if k.state != DESTROYED:
                out.append(f"tenant {t!r}: version {k.version} (key id {k.key_id}) is "
                           f"{k.state}, not destroyed")
            elif k.wrapped is not None or k.nonce is not None:
                out.append(f"tenant {t!r}: the row of version {k.version} (key id "
                           f"{k.key_id}) still holds key material")
        if self.in_cache:
            out.append(f"tenant {t!r}: a key is still in this process's cache")
        readable = [s for s in self.sinks if s.readable]
        if not readable:
            out.append("no audit sink that can be read back (jsonl or postgres) is "
                       "configured or readable: no record of the destruction to show")
        for sink in readable:
            if not sink.chain_ok:
                out.append(f"audit {sink.name}: {sink.chain}")
        recorded = {r.key_id for s in readable for r in s.records}
        for k in self.keys:
            if k.state == DESTROYED and k.key_id not in recorded and readable:
                out.append(f"tenant {t!r}: no key.destroy audit record for version "
                           f"{k.version} (key id {k.key_id}) in any readable sink")
        return out

    # -- text for a human

    def render(self, now: dt.datetime) -> str:
        lines = [f"crypto-shredding evidence for tenant {self.tenant!r} ({self.keystore})", ""]
        lines.append("keystore rows:")
        if not self.keys:
            lines.append("  (none)")
        for k in self.keys:
            material = ("no wrapped bytes, no nonce" if k.wrapped is None and k.nonce is None
                        else f"HOLDS {len(k.wrapped or b'')} wrapped bytes")
            when = f" {_ts(k.destroyed_at)}" if k.destroyed_at else ""
            lines.append(f"  version {k.version} key id {k.key_id}: {k.state}{when}; "
                         f"{material}; wrapped under master {k.kek}")
        lines.append("")
        lines.append("caches:")
        lines.append(f"  this process: {'HOLDS a key' if self.in_cache else 'no entry'}")
        listeners = ("unknown" if self.listeners is None
                     else f"{self.listeners} pgseal change listener(s) connected to this "
                     "database now (all keystores)")
        lines.append(f"  other proxies: evicted on the destroy NOTIFY ({listeners}); a proxy "
                     "that missed it cleared its cache when its listener reconnected")
        destroyed_at = [k.destroyed_at for k in self.keys if k.destroyed_at is not None]
        if destroyed_at:
            expiry = max(destroyed_at) + dt.timedelta(seconds=self.ttl_seconds)
            passed = "passed" if now >= expiry else "not yet"
            lines.append(f"  TTL bound: any key cached before the destroy expired by "
                         f"{_ts(expiry)} (cache.ttl_seconds {self.ttl_seconds:g}): {passed}")
        lines.append("")
        lines.append("audit records of the destruction:")
        for sink in self.sinks:
            if not sink.readable:
                lines.append(f"  {sink.name}: {sink.chain}")
                continue
            lines.append(f"  {sink.name}: chain {sink.chain}")
            if not sink.records:
                lines.append("    no key.destroy record for this tenant")
            for r in sink.records:
                lines.append(f"    seq {r.seq} {r.ts} key.destroy key id {r.key_id} version "
                             f"{r.key_version} hash {r.hash}")
        lines.append("")
        lines.append("copies this command cannot erase:")
        if self.dead_rows is not None:
            dead, vacuumed = self.dead_rows
            lines.append(f"  dead row versions in the keys table: {dead} (statistics; last "
                         f"vacuum {_ts(vacuumed) if vacuumed else 'never'}): VACUUM removes "
                         "the old versions that still hold wrapped bytes")
        lines.append("  WAL and backups keep the wrapped bytes until they expire")
        for kek in sorted({k.kek for k in self.keys}):
            master = self.masters.get(kek)
            if master is not None and master.state == DESTROYED:
                lines.append(f"  master key {kek}: destroyed on the HSM "
                             f"{_ts(master.destroyed_at)}: those copies can no longer be "
                             "unwrapped")
            else:
                state = master.state if master is not None else "unknown to this keystore"
                lines.append(f"  master key {kek}: {state}: those copies stay unwrappable "
                             "while it exists; run `pgseal keys rotate-master` to destroy it")
        reasons = self.reasons()
        lines.append("")
        lines.append("verdict: " + ("SHREDDED" if not reasons else f"NOT SHREDDED: {reasons[0]}"))
        return "\n".join(lines)


def _ts(when: dt.datetime | None) -> str:
    if when is None:
        return "-"
    return when.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


# --- gathering --------------------------------------------------------------------------


def _destroy_record(text: str, tenant: str) -> DestroyRecord | None:
    if '"key.destroy"' not in text:  # most lines: skip the JSON parse
        return None
    try:
        body = json.loads(text)
    except ValueError:
        return None
    if not isinstance(body, dict) or body.get("event") != "key.destroy":
        return None
    if body.get("tenant") != tenant:
        return None
    return DestroyRecord(int(body["seq"]), str(body["hash"]), str(body["ts"]),
                         body.get("key_id"), body.get("key_version"))


def _chain_verdict(report: VerifyReport) -> tuple[str, bool]:
    if report.ok:
        return f"intact through seq {report.head.seq}, ends with audit.stop", True
    if report.open_tail and len(report.problems) == 1:
        # A proxy writing this trail right now looks the same as a cut tail.
        return (f"intact through seq {report.head.seq} (no audit.stop at the end: a writer "
                "is still running, or the tail was cut)"), True
    more = f" (+{len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
    return f"BROKEN: {report.problems[0]}{more}", False


def _jsonl_evidence(config: Config, path_text: str, tenant: str) -> SinkEvidence:
    path = config.path(path_text)
    sink = SinkEvidence(f"jsonl {path}", readable=True)

    def scan(lines: Iterable[tuple[str, str]]) -> Iterator[tuple[str, str]]:
        for where, text in lines:
            found = _destroy_record(text, tenant)
            if found is not None:
                sink.records.append(found)
            yield where, text

    try:
        report = verify_lines(scan(_file_lines(path)), str(path))
    except OSError as exc:
        return SinkEvidence(f"jsonl {path}", readable=False,
                            chain=f"unreadable: {exc.strerror or exc}")
    sink.chain, sink.chain_ok = _chain_verdict(report)
    return sink


async def _postgres_evidence(dsn: str, table: str, tenant: str) -> SinkEvidence:
    name = f"postgres {table}"
    qtable = quote_table(table)
    try:
        conn = await asyncpg.connect(dsn, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        return SinkEvidence(name, readable=False, chain=f"unreadable: {_reason(exc)}")
    try:
        # One ordered read serves both the chain and the records (qtable: checked, quoted).
        rows = await conn.fetch(f"SELECT seq, record FROM {qtable} ORDER BY seq")  # noqa: S608
    except (OSError, asyncpg.PostgresError) as exc:
        return SinkEvidence(name, readable=False, chain=f"unreadable: {_reason(exc)}")
    finally:
        await conn.close()
    sink = SinkEvidence(name, readable=True)
    for row in rows:
        found = _destroy_record(row["record"], tenant)
        if found is not None:
            sink.records.append(found)
    report = verify_lines(((f"row seq={r['seq']}", r["record"]) for r in rows), name)
    sink.chain, sink.chain_ok = _chain_verdict(report)
    return sink


def _reason(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


async def gather_evidence(config: Config, tenant: str,
                          cache: TenantKeyCache | None = None) -> ShredReport:
    """Read the evidence; raises KeyServiceUnavailable when the keystore cannot be read.

    `cache`: the key cache of this process when it has one (a proxy); a command has none.
    """
    keystore = Keystore(config.keystore.dsn, config.keystore.schema)

    async def read(conn: Conn) -> tuple[list[KeyRow], list[MasterRow], int,
                                        tuple[int, dt.datetime | None] | None]:
        return (await keystore.tenant_rows(conn, tenant), await keystore.masters(conn),
                await keystore.listener_count(conn), await keystore.dead_rows(conn))

    try:
        rows, masters, listeners, dead = await keystore.run(read)
    finally:
        await keystore.close()
    sinks: list[SinkEvidence] = []
    for sink in config.audit.sinks:
        if sink.kind == "jsonl" and sink.path:
            # File reading blocks: keep it off the loop (a trail can be large).
            sinks.append(await asyncio.to_thread(_jsonl_evidence, config, sink.path, tenant))
        elif sink.kind == "postgres":
            sinks.append(await _postgres_evidence(config.keystore.dsn,
                                                  sink.table or "pgseal.audit", tenant))
        else:
            sinks.append(SinkEvidence("stdout", readable=False,
                                      chain="not readable back (a copy for log shipping)"))
    return ShredReport(
        tenant=tenant, keystore=keystore.where, keys=rows,
        masters={m.kek: m for m in masters},
        in_cache=cache.holds_tenant(tenant) if cache is not None else False,
        listeners=listeners, dead_rows=dead, ttl_seconds=config.cache.ttl_seconds,
        sinks=sinks,
    )

"""Audit records and the SHA-256 hash chain (pure: no I/O).

Theory of operation
-------------------
A record is one JSON object per line with every field of DESIGN.md 9 always present
(null when it does not apply), so the serialization is canonical: keys sorted, no spaces,
UTF-8. ``hash`` is SHA-256 over the canonical serialization of every other field, and
``prev`` is the previous record's ``hash`` (64 zeros for the first record, seq 1). A sink
writes records in seq order; ``verify_lines`` walks them back.

What the chain detects and what it cannot (``pgseal audit verify`` prints the same):

- an edited record: its hash no longer matches (the edit would have to recompute every
  later hash, which then no longer matches an anchored copy of the last hash);
- a removed, inserted or reordered record: seq jumps or ``prev`` does not match;
- records removed from the front: the first record is not seq 1 with the genesis prev;
- a truncated tail: a clean shutdown writes ``audit.stop`` last, so a trail that does not
  end with it was cut, or its writer crashed or is still running;
- NOT detectable from the file alone: a tail truncated back to an earlier ``audit.stop``
  record (for instance while the proxy is stopped), or a whole file rewritten with a fresh
  chain. A restart after such a cut shows up only as an ``audit.start`` that notes an
  unclean previous stop (a warning: a crash looks the same). Copy the last seq and hash
  that verify prints to somewhere the proxy host cannot write to, and compare later.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from typing import Any

EVENTS = frozenset(
    {
        "key.create", "key.unwrap", "key.rotate", "key.destroy",
        "data.encrypt", "data.decrypt", "data.deny",
        "audit.start", "audit.stop",
    }
)
OUTCOMES = frozenset({"ok", "error", "denied"})
GENESIS = "0" * 64

# Every field, in the order DESIGN.md 9 lists them (serialization sorts keys anyway).
FIELDS = (
    "ts", "seq", "event", "tenant", "key_id", "key_version", "kek", "table", "columns",
    "count", "db_user", "database", "application_name", "client_addr", "session",
    "statement", "outcome", "error", "prev", "hash",
)
_FIELD_SET = frozenset(FIELDS)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """What happened, as the caller knows it; the sink adds ts, seq, prev and hash.

    `statement` is a fingerprint (normalized text without literals), never a value.
    Never put a plaintext value or key material in any field.
    """

    event: str
    tenant: str | None = None
    key_id: int | None = None
    key_version: int | None = None
    kek: str | None = None
    table: str | None = None
    columns: tuple[str, ...] = ()
    count: int | None = None
    db_user: str | None = None
    database: str | None = None
    application_name: str | None = None
    client_addr: str | None = None
    session: str | None = None
    statement: str | None = None
    outcome: str = "ok"
    error: str | None = None

    def __post_init__(self) -> None:
        if self.event not in EVENTS:
            raise ValueError(f"unknown audit event {self.event!r}")
        if self.outcome not in OUTCOMES:
            raise ValueError(f"audit outcome: one of {sorted(OUTCOMES)}, got {self.outcome!r}")
        if not isinstance(self.columns, tuple) or not all(isinstance(c, str) for c in self.columns):
            raise TypeError("AuditRecord.columns: a tuple of column names")

    def fields(self) -> dict[str, Any]:
        """The caller-supplied fields as JSON values."""
        return {
            "event": self.event, "tenant": self.tenant, "key_id": self.key_id,
            "key_version": self.key_version, "kek": self.kek, "table": self.table,
            "columns": list(self.columns), "count": self.count, "db_user": self.db_user,
            "database": self.database, "application_name": self.application_name,
            "client_addr": self.client_addr, "session": self.session,
            "statement": self.statement, "outcome": self.outcome, "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class ChainHead:
    """Where a chain stands: the last record's seq and hash (seq 0 + GENESIS when empty)."""

    seq: int = 0
    hash: str = GENESIS
    event: str | None = None  # the last record's event (audit.stop after a clean shutdown)


# The canonical serializer, built once: json.dumps(obj, sort_keys=True, separators=(",", ":"),
# ensure_ascii=False) is JSONEncoder(<those arguments>).encode(obj), with a new encoder per call.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
_encode = _ENCODER.encode


def canonical(obj: Mapping[str, Any]) -> bytes:
    return _encode(obj).encode()


def record_hash(body: Mapping[str, Any]) -> str:
    """SHA-256 over the canonical serialization of every field except `hash`."""
    return hashlib.sha256(canonical({k: v for k, v in body.items() if k != "hash"})).hexdigest()


@dataclass(frozen=True, slots=True)
class SealedLine:
    """A record placed in a chain: its canonical JSON line (no newline), seq and hash."""

    seq: int
    hash: str
    line: str


def _value(value: object) -> str:
    """One field value exactly as _ENCODER writes it inside a record, whatever its type."""
    if value is None:
        return "null"
    if type(value) is str:
        # The function _ENCODER escapes strings with (ensure_ascii=False), at C speed.
        return encode_basestring(value)
    if type(value) is int:  # not bool (true/false), which is an int too
        return int.__repr__(value)  # what the C encoder writes for an int
    return _encode(value)  # anything else (bool, float, a str subclass, ...): the encoder itself


def chain(
    records: Iterable[tuple[AuditRecord, str]], head: ChainHead
) -> tuple[list[SealedLine], ChainHead]:
    """Seal (record, ts) pairs after `head`, in order.

    Each line is byte for byte canonical(body) and its hash is record_hash(body), but both are
    written directly instead of building a dict and serializing it twice (this runs for every
    record, on the writer thread, competing for the GIL with the event loop). The keys are
    written in sorted order, as sort_keys would put them, and "hash" sorts between "event"
    and "kek": the hashed serialization (every field but hash) is `front + "," + back`, the
    stored line `front + ',"hash":"<hex>",' + back`. Both halves are built separately, so
    nothing is searched for in the text and no value can be mistaken for a key. Each value is
    written as _ENCODER writes it (the inline tests are _value's fast paths for the declared
    types; anything else goes through _value). tests/unit/test_audit_chain.py checks this
    against the dict-and-json.dumps oracle. A new field must be added here as well, in sorted
    place (test_intact_trail_verifies checks that a line holds exactly FIELDS).
    """
    sealed: list[SealedLine] = []
    seq, digest, event = head.seq, head.hash, head.event
    q, v, n = encode_basestring, _value, int.__repr__
    for record, ts in records:
        seq += 1
        prev = digest
        app, addr, cols = record.application_name, record.client_addr, record.columns
        count, database, db_user = record.count, record.database, record.db_user
        error, event, kek = record.error, record.event, record.kek
        key_id, key_version, outcome = record.key_id, record.key_version, record.outcome
        session, statement = record.session, record.statement
        table, tenant = record.table, record.tenant
        front = (
            f'{{"application_name":{q(app) if app.__class__ is str else v(app)}'
            f',"client_addr":{q(addr) if addr.__class__ is str else v(addr)}'
            # columns: a tuple of str (__post_init__); the encoder escapes a subclass the same
            f',"columns":[{",".join(map(q, cols))}]'
            f',"count":{n(count) if count.__class__ is int else v(count)}'
            f',"database":{q(database) if database.__class__ is str else v(database)}'
            f',"db_user":{q(db_user) if db_user.__class__ is str else v(db_user)}'
            f',"error":{q(error) if error.__class__ is str else v(error)}'
            f',"event":{q(event) if event.__class__ is str else v(event)}'
        )
        back = (
            f'"kek":{q(kek) if kek.__class__ is str else v(kek)}'
            f',"key_id":{n(key_id) if key_id.__class__ is int else v(key_id)}'
            f',"key_version":{v(key_version)}'
            f',"outcome":{q(outcome) if outcome.__class__ is str else v(outcome)}'
            f',"prev":{q(prev) if prev.__class__ is str else v(prev)}'
            f',"seq":{n(seq) if seq.__class__ is int else v(seq)}'
            f',"session":{q(session) if session.__class__ is str else v(session)}'
            f',"statement":{q(statement) if statement.__class__ is str else v(statement)}'
            f',"table":{q(table) if table.__class__ is str else v(table)}'
            f',"tenant":{q(tenant) if tenant.__class__ is str else v(tenant)}'
            f',"ts":{q(ts) if ts.__class__ is str else v(ts)}}}'
        )
        digest = hashlib.sha256(f"{front},{back}".encode()).hexdigest()
        sealed.append(SealedLine(seq, digest, f'{front},"hash":"{digest}",{back}'))
    if not sealed:
        return sealed, head
    return sealed, ChainHead(seq, digest, event)


def head_of(line: str) -> ChainHead | None:
    """The chain head a stored line leaves behind, or None when it is not a sealed record."""
    try:
        body = json.loads(line)
    except ValueError:
        return None
    if not isinstance(body, dict) or set(body) != _FIELD_SET:
        return None
    seq, digest, event = body["seq"], body["hash"], body["event"]
    if not isinstance(seq, int) or not isinstance(digest, str):
        return None
    return ChainHead(seq, digest, event if isinstance(event, str) else None)


@dataclass
class VerifyReport:
    """Result of walking a trail; `ok` only when there is no problem at all."""

    source: str
    records: int = 0
    head: ChainHead = field(default_factory=ChainHead)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # The trail does not end with audit.stop (one of `problems`): cut, or a writer is
    # still running. Readers that know writers are live can tell it from a broken chain.
    open_tail: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.ok:
            return (
                f"{self.source}: ok, {self.records} records, chain intact through seq "
                f"{self.head.seq}, last hash {self.head.hash}, ends with audit.stop"
            )
        more = f" (+{len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        return f"{self.source}: {self.problems[0]}{more}"


MAX_PROBLEMS = 50


def verify_lines(lines: Iterable[tuple[str, str]], source: str) -> VerifyReport:
    """Check a trail given as (where, text) pairs in stored order ("line 7", "row 7", ...).

    After a break the walk re-anchors on the record found, so one removed record is
    reported once instead of making every later record look wrong.
    """
    report = VerifyReport(source)
    expected = ChainHead()
    last_event: str | None = None

    def problem(text: str) -> None:
        if len(report.problems) < MAX_PROBLEMS:
            report.problems.append(text)

    for where, text in lines:
        try:
            body = json.loads(text)
        except ValueError:
            problem(f"{where}: not a JSON record (edited, or cut off mid-write)")
            last_event = None
            continue
        if not isinstance(body, dict) or set(body) != _FIELD_SET:
            problem(f"{where}: not an audit record (fields added or removed)")
            last_event = None
            continue
        report.records += 1
        seq = body["seq"]
        at = f"{where} (seq {seq})"
        if body["hash"] != record_hash(body):
            problem(f"{at}: record edited (its hash does not match its content)")
        if not isinstance(seq, int):
            problem(f"{at}: seq is not a number")
            seq = expected.seq + 1
        elif seq != expected.seq + 1:
            if expected.seq == 0:
                problem(f"{at}: the trail does not start at seq 1 (records removed from the front)")
            elif seq > expected.seq + 1:
                problem(f"{at}: records seq {expected.seq + 1}..{seq - 1} missing (removed)")
            else:
                problem(f"{at}: out of order after seq {expected.seq} (reordered or duplicated)")
        elif body["prev"] != expected.hash:
            problem(f"{at}: chain broken, prev does not match the record before (removed, "
                    "inserted or reordered record)")
        if body["event"] == "audit.start" and body["error"]:
            report.warnings.append(f"{at}: {body['error']}")
        expected = ChainHead(seq, str(body["hash"]), str(body["event"]))
        last_event = expected.event
    report.head = expected
    if report.records == 0 and not report.problems:
        problem("empty trail (no records)")
    elif last_event != "audit.stop" and report.records:
        report.open_tail = True
        problem(
            f"last record (seq {expected.seq}) is not audit.stop: the trail was truncated, "
            "or its writer crashed or is still running"
        )
    return report

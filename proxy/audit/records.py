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


@dataclass(frozen=True, slots=True, init=False)
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

    def __init__(
        self,
        event: str,
        tenant: str | None = None,
        key_id: int | None = None,
        key_version: int | None = None,
        kek: str | None = None,
        table: str | None = None,
        columns: tuple[str, ...] = (),
        count: int | None = None,
        db_user: str | None = None,
        database: str | None = None,
        application_name: str | None = None,
        client_addr: str | None = None,
        session: str | None = None,
        statement: str | None = None,
        outcome: str = "ok",
        error: str | None = None,
    ) -> None:
        # What dataclass would generate, the checks first. Every field is stored as its
        # declared type exactly (text, a whole number, or null; a subclass of str, int or
        # tuple as the plain value it stands for; a bool, a float or an object refused), in
        # both builds: a record is evidence, and chain() reuses the rendering of records whose
        # fields compare equal (_PARTS), which is only right when equal means written alike.
        # Written out (object.__setattr__, a direct slot store once compiled) because the data
        # path builds a record per key use. tests/unit/test_audit_chain.py checks it against
        # the generated __init__ and the checks it replaces. (Compiled, mypyc checks the
        # arguments' declared types before this runs, with its own message.)
        event = _required_text("event", event)
        tenant = _text_field("tenant", tenant)
        key_id = _whole_field("key_id", key_id)
        key_version = _whole_field("key_version", key_version)
        kek = _text_field("kek", kek)
        table = _text_field("table", table)
        columns = _names_field(columns)
        count = _whole_field("count", count)
        db_user = _text_field("db_user", db_user)
        database = _text_field("database", database)
        application_name = _text_field("application_name", application_name)
        client_addr = _text_field("client_addr", client_addr)
        session = _text_field("session", session)
        statement = _text_field("statement", statement)
        outcome = _required_text("outcome", outcome)
        error = _text_field("error", error)
        if event not in EVENTS:
            raise ValueError(f"unknown audit event {event!r}")
        if outcome not in OUTCOMES:
            raise ValueError(f"audit outcome: one of {sorted(OUTCOMES)}, got {outcome!r}")
        object.__setattr__(self, "event", event)
        object.__setattr__(self, "tenant", tenant)
        object.__setattr__(self, "key_id", key_id)
        object.__setattr__(self, "key_version", key_version)
        object.__setattr__(self, "kek", kek)
        object.__setattr__(self, "table", table)
        object.__setattr__(self, "columns", columns)
        object.__setattr__(self, "count", count)
        object.__setattr__(self, "db_user", db_user)
        object.__setattr__(self, "database", database)
        object.__setattr__(self, "application_name", application_name)
        object.__setattr__(self, "client_addr", client_addr)
        object.__setattr__(self, "session", session)
        object.__setattr__(self, "statement", statement)
        object.__setattr__(self, "outcome", outcome)
        object.__setattr__(self, "error", error)

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


# AuditRecord's field checks: each returns the value as its exact type, or raises TypeError
# naming the field. `type(value) is str`, not `value.__class__`: compiled, an isinstance()
# narrows the value and mypyc then reads __class__ as the narrowed type.


def _text_field(name: str, value: object) -> str | None:
    if value is None or type(value) is str:
        return value
    if isinstance(value, str):
        return str.__str__(value)  # its text, whatever its __str__, __eq__ or __hash__ say
    raise TypeError(f"AuditRecord.{name}: text or None, got {type(value).__name__}")


def _required_text(name: str, value: object) -> str:
    if type(value) is str:
        return value
    if isinstance(value, str):
        return str.__str__(value)
    raise TypeError(f"AuditRecord.{name}: text, got {type(value).__name__}")


def _whole_field(name: str, value: object) -> int | None:
    if value is None or type(value) is int:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return int.__index__(value)  # an IntEnum member as its number
    raise TypeError(f"AuditRecord.{name}: a whole number or None, got {type(value).__name__}")


def _names_field(value: object) -> tuple[str, ...]:
    if type(value) is tuple and all(type(name) is str for name in value):
        return value
    if isinstance(value, tuple) and all(isinstance(name, str) for name in value):
        return tuple(str.__str__(name) for name in tuple.__iter__(value))
    raise TypeError("AuditRecord.columns: a tuple of column names")


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


# Strings _parts() escaped before, and how (exact str only: AuditRecord stores no other): a
# trail repeats a few strings in nearly every record (statement fingerprints, tables, tenants,
# users, databases, sessions), and escaping a statement costs more than a lookup. Bounded:
# emptied when full, and long strings are not kept. (The writer thread may chain too: each
# dict operation is atomic, and a lost race only escapes a string again.)
_ESCAPED: dict[str, str] = {}
_ESCAPED_MAX = 2048
_ESCAPED_TEXT_MAX = 1024


def _escape(text: str) -> str:
    """encode_basestring(text), kept in _ESCAPED: chain()'s way when its lookup misses."""
    escaped = encode_basestring(text)
    if len(text) <= _ESCAPED_TEXT_MAX:
        if len(_ESCAPED) >= _ESCAPED_MAX:
            _ESCAPED.clear()
        _ESCAPED[text] = escaped
    return escaped


def chain(
    records: Iterable[tuple[AuditRecord, str]], head: ChainHead
) -> tuple[list[SealedLine], ChainHead]:
    """Seal (record, ts) pairs after `head`, in order."""
    sealed: list[SealedLine] = []
    return sealed, _chain(records, head, sealed, False)


def chain_text(
    records: Iterable[tuple[AuditRecord, str]], head: ChainHead
) -> tuple[str, ChainHead]:
    """chain()'s lines as one text, each ended by a newline (what a file sink appends)."""
    lines: list[str] = []
    end = _chain(records, head, lines, True)
    if lines:
        lines.append("")
    return "\n".join(lines), end


_NO_TS = object()

# The rendered fixed parts of a record's line (see _parts), by the record's fields but count:
# the data path writes the same few records over and over (one per statement, key and
# operation on each connection), differing only in count, seq, prev and ts. Keys compare by
# value, which is right only because AuditRecord.__init__ stores exact str, int and tuple
# values (equal means written alike). Bounded: emptied when full, and a record whose parts
# are long (an error message quoting a client's long name, say) is not kept. (The writer
# thread may chain too: each dict operation is atomic, and a lost race only renders a record
# again.)
_PARTS: dict[tuple[object, ...], tuple[str, str, str, str]] = {}
_PARTS_MAX = 4096
_PARTS_TEXT_MAX = 4096  # characters in the four parts together


def _text(value: str | None) -> str:
    if value is None:
        return "null"
    return _ESCAPED.get(value) or _escape(value)


def _whole(value: int | None) -> str:
    return "null" if value is None else int.__repr__(value)  # as the C encoder writes an int


def _parts(record: AuditRecord) -> tuple[str, str, str, str]:
    """A record's line without count, prev, seq and ts, in four pieces:

        a + count + b + ',"hash":"<hex>",' + c + prev + ',"seq":' + seq + d + ts + '}'

    The keys in sorted order, as sort_keys would put them; "hash" sorts between "event" and
    "kek", so the hashed serialization (every field but hash) is the same with a ',' for the
    hash member. Each value is written as _ENCODER writes it.
    """
    t = _text
    app, addr = t(record.application_name), t(record.client_addr)
    cols = ",".join(map(encode_basestring, record.columns))
    database, db_user, error = t(record.database), t(record.db_user), t(record.error)
    event, kek, outcome = t(record.event), t(record.kek), t(record.outcome)
    key_id, key_version = _whole(record.key_id), _whole(record.key_version)
    session, statement = t(record.session), t(record.statement)
    table, tenant = t(record.table), t(record.tenant)
    return (
        f'{{"application_name":{app},"client_addr":{addr},"columns":[{cols}],"count":',
        f',"database":{database},"db_user":{db_user},"error":{error},"event":{event}',
        f'"kek":{kek},"key_id":{key_id},"key_version":{key_version},"outcome":{outcome}'
        ',"prev":',
        f',"session":{session},"statement":{statement},"table":{table},"tenant":{tenant}'
        ',"ts":',
    )


def _chain(
    records: Iterable[tuple[AuditRecord, str]], head: ChainHead, out: list[Any], lines: bool
) -> ChainHead:
    """Seal the records into `out` (SealedLines, or with `lines` their lines alone); return
    the new head.

    Each line is byte for byte canonical(body) and its hash is record_hash(body), but both are
    written directly from the record's rendered parts (_parts, kept in _PARTS) instead of
    building a dict and serializing it twice (this runs for every record, on the event loop):
    nothing is searched for in the text, so no value can be mistaken for a key. The records of
    one batch share one ts, escaped once. tests/unit/test_audit_chain.py checks this against
    the dict-and-json.dumps oracle, and against lines pinned from before. A new field must be
    added to _parts as well, in sorted place (test_intact_trail_verifies checks that a line
    holds exactly FIELDS).
    """
    seq, digest, event = head.seq, head.hash, head.event
    q, sha256 = encode_basestring, hashlib.sha256
    known = _PARTS
    put = out.append
    last_ts: object = _NO_TS
    ts_text = ""
    prev_text = q(digest)
    for record, ts in records:
        seq += 1
        key = (
            record.event, record.tenant, record.key_id, record.key_version, record.kek,
            record.table, record.columns, record.db_user, record.database,
            record.application_name, record.client_addr, record.session, record.statement,
            record.outcome, record.error,
        )
        parts = known.get(key)
        if parts is None:
            parts = _parts(record)
            if sum(map(len, parts)) <= _PARTS_TEXT_MAX:
                if len(known) >= _PARTS_MAX:
                    known.clear()
                known[key] = parts
        a, b, c, d = parts
        count = _whole(record.count)
        if ts is not last_ts:
            last_ts, ts_text = ts, q(ts)
        # Every field before "hash", and every one after it: built once, joined twice.
        front = f"{a}{count}{b}"
        back = f'{c}{prev_text},"seq":{int.__repr__(seq)}{d}{ts_text}}}'
        digest = sha256(f"{front},{back}".encode()).hexdigest()
        line = f'{front},"hash":"{digest}",{back}'
        prev_text = f'"{digest}"'
        event = record.event
        put(line if lines else SealedLine(seq, digest, line))
    if seq == head.seq:  # no record
        return head
    return ChainHead(seq, digest, event)


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

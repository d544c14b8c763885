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
from collections.abc import Callable, Iterable, Mapping
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
        # What dataclass would generate, the checks first, at half its cost (the data path
        # builds a record per key use, on the event loop): a frozen dataclass's __init__ goes
        # through object.__setattr__ by name for every field, this calls each slot's setter
        # (_SET_*, below the class). tests/unit/test_audit_chain.py checks it against the
        # generated __init__ and __post_init__ it replaces (fields, defaults, errors).
        if event not in EVENTS:
            raise ValueError(f"unknown audit event {event!r}")
        if outcome not in OUTCOMES:
            raise ValueError(f"audit outcome: one of {sorted(OUTCOMES)}, got {outcome!r}")
        if columns.__class__ is tuple:
            try:
                "".join(columns)  # a TypeError unless every item is a str (or a subclass)
            except TypeError:
                raise TypeError("AuditRecord.columns: a tuple of column names") from None
        elif not isinstance(columns, tuple) or not all(isinstance(c, str) for c in columns):
            raise TypeError("AuditRecord.columns: a tuple of column names")
        _SET_EVENT(self, event)
        _SET_TENANT(self, tenant)
        _SET_KEY_ID(self, key_id)
        _SET_KEY_VERSION(self, key_version)
        _SET_KEK(self, kek)
        _SET_TABLE(self, table)
        _SET_COLUMNS(self, columns)
        _SET_COUNT(self, count)
        _SET_DB_USER(self, db_user)
        _SET_DATABASE(self, database)
        _SET_APPLICATION_NAME(self, application_name)
        _SET_CLIENT_ADDR(self, client_addr)
        _SET_SESSION(self, session)
        _SET_STATEMENT(self, statement)
        _SET_OUTCOME(self, outcome)
        _SET_ERROR(self, error)

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


_Setter = Callable[[Any, Any], None]


def _setter(cls: type, name: str) -> _Setter:
    """The slot's own setter (its member descriptor's __set__): what a frozen dataclass's
    __init__ reaches through object.__setattr__, without the lookup by name."""
    setter: _Setter = getattr(cls, name).__set__
    return setter


_SET_EVENT = _setter(AuditRecord, "event")
_SET_TENANT = _setter(AuditRecord, "tenant")
_SET_KEY_ID = _setter(AuditRecord, "key_id")
_SET_KEY_VERSION = _setter(AuditRecord, "key_version")
_SET_KEK = _setter(AuditRecord, "kek")
_SET_TABLE = _setter(AuditRecord, "table")
_SET_COLUMNS = _setter(AuditRecord, "columns")
_SET_COUNT = _setter(AuditRecord, "count")
_SET_DB_USER = _setter(AuditRecord, "db_user")
_SET_DATABASE = _setter(AuditRecord, "database")
_SET_APPLICATION_NAME = _setter(AuditRecord, "application_name")
_SET_CLIENT_ADDR = _setter(AuditRecord, "client_addr")
_SET_SESSION = _setter(AuditRecord, "session")
_SET_STATEMENT = _setter(AuditRecord, "statement")
_SET_OUTCOME = _setter(AuditRecord, "outcome")
_SET_ERROR = _setter(AuditRecord, "error")


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


_SET_SEQ = _setter(SealedLine, "seq")
_SET_HASH = _setter(SealedLine, "hash")
_SET_LINE = _setter(SealedLine, "line")


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


# Strings chain() escaped before, and how (exact str only): a trail repeats a few strings in
# nearly every record (statement fingerprints, tables, tenants, users, databases, sessions),
# and escaping a statement costs more than a dict lookup. Bounded: emptied when full, and
# long strings are not kept. (The writer thread may chain too: each dict operation is atomic,
# and a lost race only escapes a string again.)
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


def _chain(
    records: Iterable[tuple[AuditRecord, str]], head: ChainHead, out: list[Any], lines: bool
) -> ChainHead:
    """Seal the records into `out` (SealedLines, or with `lines` their lines alone); return
    the new head.

    Each line is byte for byte canonical(body) and its hash is record_hash(body), but both are
    written directly instead of building a dict and serializing it twice (this runs for every
    record, on the event loop). The keys are written in sorted order, as sort_keys would put
    them, and "hash" sorts between "event" and "kek": the hashed serialization (every field but
    hash) is `front + "," + back`, the stored line `front + ',"hash":"<hex>",' + back`. Both
    halves are built separately, so nothing is searched for in the text and no value can be
    mistaken for a key. Each value is written as _ENCODER writes it: the inline tests are
    _value's fast paths for the declared types (an exact str escaped through _ESCAPED, None as
    null, an exact int by int.__repr__), anything else goes through _value; the records of one
    batch share one ts, escaped once. tests/unit/test_audit_chain.py checks this against the
    dict-and-json.dumps oracle, and against lines pinned from before. A new field must be
    added here as well, in sorted place (test_intact_trail_verifies checks that a line holds
    exactly FIELDS).
    """
    seq, digest, event = head.seq, head.hash, head.event
    q, v, n, sha256 = encode_basestring, _value, int.__repr__, hashlib.sha256
    g, e = _ESCAPED.get, _escape
    put = out.append
    new, set_seq, set_hash, set_line = object.__new__, _SET_SEQ, _SET_HASH, _SET_LINE
    last_ts: object = _NO_TS
    ts_text = ""
    for record, ts in records:
        seq += 1
        prev = digest
        # Each value escaped, in sorted key order (the order the encoder meets them in).
        x = record.application_name
        app = (g(x) or e(x)) if x.__class__ is str else "null" if x is None else v(x)
        x = record.client_addr
        addr = (g(x) or e(x)) if x.__class__ is str else "null" if x is None else v(x)
        # columns: a tuple of str (__init__); the encoder escapes a subclass the same
        cols = ",".join(map(q, record.columns))
        i = record.count
        count = n(i) if i.__class__ is int else "null" if i is None else v(i)
        x = record.database
        database = (g(x) or e(x)) if x.__class__ is str else "null" if x is None else v(x)
        x = record.db_user
        db_user = (g(x) or e(x)) if x.__class__ is str else "null" if x is None else v(x)
        x = record.error
        error = (g(x) or e(x)) if x.__class__ is str else "null" if x is None else v(x)
        event = record.event
        event_text = (g(event) or e(event)) if event.__class__ is str else v(event)
        x = record.kek
        kek = (g(x) or e(x)) if x.__class__ is str else "null" if x is None else v(x)
        i = record.key_id
        key_id = n(i) if i.__class__ is int else "null" if i is None else v(i)
        i = record.key_version
        key_version = n(i) if i.__class__ is int else "null" if i is None else v(i)
        x = record.outcome
        outcome = (g(x) or e(x)) if x.__class__ is str else v(x)
        prev_text = q(prev) if prev.__class__ is str else v(prev)
        seq_text = n(seq) if seq.__class__ is int else v(seq)
        x = record.session
        session = (g(x) or e(x)) if x.__class__ is str else "null" if x is None else v(x)
        x = record.statement
        statement = (g(x) or e(x)) if x.__class__ is str else "null" if x is None else v(x)
        x = record.table
        table = (g(x) or e(x)) if x.__class__ is str else "null" if x is None else v(x)
        x = record.tenant
        tenant = (g(x) or e(x)) if x.__class__ is str else "null" if x is None else v(x)
        if ts is not last_ts:
            last_ts, ts_text = ts, q(ts) if ts.__class__ is str else v(ts)
        front = (
            f'{{"application_name":{app},"client_addr":{addr},"columns":[{cols}]'
            f',"count":{count},"database":{database},"db_user":{db_user},"error":{error}'
            f',"event":{event_text}'
        )
        back = (
            f'"kek":{kek},"key_id":{key_id},"key_version":{key_version},"outcome":{outcome}'
            f',"prev":{prev_text},"seq":{seq_text},"session":{session}'
            f',"statement":{statement},"table":{table},"tenant":{tenant},"ts":{ts_text}}}'
        )
        digest = sha256(f"{front},{back}".encode()).hexdigest()
        if lines:
            put(f'{front},"hash":"{digest}",{back}')
        else:  # SealedLine(seq, digest, line), without the frozen __init__'s setattr by name
            item = new(SealedLine)
            set_seq(item, seq)
            set_hash(item, digest)
            set_line(item, f'{front},"hash":"{digest}",{back}')
            put(item)
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

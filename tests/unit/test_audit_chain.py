"""The hash chain and its verifier (pure): what `pgseal audit verify` catches."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import re
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.audit.records import (
    EVENTS,
    FIELDS,
    GENESIS,
    OUTCOMES,
    AuditRecord,
    ChainHead,
    SealedLine,
    canonical,
    chain,
    chain_text,
    head_of,
    record_hash,
    verify_lines,
)
from proxy.session.datapath import AuditNote, ConnectionFacts, audit_records
from tests.support.build import COMPILED


def trail(n: int = 6) -> list[str]:
    records = [(AuditRecord("audit.start", session="w1"), "2024-01-01T00:00:00.000000Z")]
    records += [
        (AuditRecord("data.encrypt", tenant="acme", key_id=i, key_version=1, table="public.t",
                     columns=("ssn",), count=i, statement="INSERT INTO t VALUES ($1)"),
         f"2024-01-01T00:00:0{i}.000000Z")
        for i in range(1, n - 1)
    ]
    records.append((AuditRecord("audit.stop", session="w1"), "2024-01-01T00:01:00.000000Z"))
    sealed, _ = chain(records, ChainHead())
    return [s.line for s in sealed]


def check(lines: list[str]):  # type: ignore[no-untyped-def]
    return verify_lines(((f"line {i}", text) for i, text in enumerate(lines, 1)), "test")


def test_intact_trail_verifies() -> None:
    lines = trail()
    report = check(lines)
    assert report.ok, report.problems
    assert report.records == len(lines)
    assert report.head.seq == len(lines)
    first = json.loads(lines[0])
    assert first["seq"] == 1 and first["prev"] == GENESIS
    assert set(first) == set(FIELDS)


def test_serialization_is_canonical() -> None:
    line = trail()[1]
    body = json.loads(line)
    assert json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False) == line
    assert body["hash"] == record_hash(body)
    assert head_of(line) == ChainHead(body["seq"], body["hash"], body["event"])


def test_edited_record_is_caught() -> None:
    lines = trail()
    body = json.loads(lines[2])
    body["tenant"] = "other"
    lines[2] = json.dumps(body, sort_keys=True, separators=(",", ":"))
    report = check(lines)
    assert not report.ok
    assert "line 3" in report.problems[0] and "edited" in report.problems[0]


def test_edit_with_recomputed_hash_breaks_the_next_link() -> None:
    lines = trail()
    body = json.loads(lines[2])
    body["count"] = 999
    body["hash"] = record_hash(body)
    lines[2] = json.dumps(body, sort_keys=True, separators=(",", ":"))
    report = check(lines)
    assert any("line 4" in p and "chain broken" in p for p in report.problems)


def test_removed_record_is_caught() -> None:
    lines = trail()
    del lines[3]
    report = check(lines)
    assert any("missing" in p for p in report.problems)


def test_reordered_records_are_caught() -> None:
    lines = trail()
    lines[2], lines[3] = lines[3], lines[2]
    report = check(lines)
    assert not report.ok
    assert any("missing" in p or "out of order" in p for p in report.problems)


def test_truncated_tail_is_caught() -> None:
    lines = trail()[:-2]
    report = check(lines)
    assert report.problems == [
        f"last record (seq {len(lines)}) is not audit.stop: the trail was truncated, "
        "or its writer crashed or is still running"
    ]


def test_line_cut_mid_write_is_caught() -> None:
    lines = trail()
    lines[-1] = lines[-1][:40]
    report = check(lines)
    assert any("not a JSON record" in p for p in report.problems)


def test_records_removed_from_the_front_are_caught() -> None:
    report = check(trail()[2:])
    assert any("does not start at seq 1" in p for p in report.problems)


def test_inserted_record_is_caught() -> None:
    lines = trail()
    forged, _ = chain([(AuditRecord("data.decrypt", tenant="acme"), "2024-01-01T00:00:09Z")],
                      ChainHead(2, json.loads(lines[1])["hash"]))
    lines.insert(2, forged[0].line)
    report = check(lines)
    assert not report.ok


def test_empty_trail_is_not_ok() -> None:
    assert not check([]).ok


def test_unclean_restart_is_a_warning() -> None:
    sealed, head = chain([(AuditRecord("audit.start"), "t1"), (AuditRecord("key.create"), "t2")],
                         ChainHead())
    more, _ = chain([(AuditRecord("audit.start", error="previous writer did not stop cleanly"),
                      "t3"), (AuditRecord("audit.stop"), "t4")], head)
    report = check([s.line for s in sealed + more])
    assert report.ok
    assert report.warnings and "did not stop cleanly" in report.warnings[0]


def test_record_validation() -> None:
    with pytest.raises(ValueError, match="unknown audit event"):
        AuditRecord("key.steal")
    with pytest.raises(ValueError, match="outcome"):
        AuditRecord("data.deny", outcome="maybe")
    with pytest.raises(TypeError):
        AuditRecord("data.encrypt", columns=["ssn"])  # type: ignore[arg-type]


# --- chain() is byte for byte the dict + json.dumps serialization it replaced ----------------


def oracle_canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def oracle_chain(
    records: list[tuple[AuditRecord, Any]], head: ChainHead
) -> tuple[list[SealedLine], ChainHead]:
    """chain() as it was first written (the trail on disk is the compatibility contract)."""
    sealed: list[SealedLine] = []
    for record, ts in records:
        body: dict[str, Any] = {
            "event": record.event, "tenant": record.tenant, "key_id": record.key_id,
            "key_version": record.key_version, "kek": record.kek, "table": record.table,
            "columns": list(record.columns), "count": record.count, "db_user": record.db_user,
            "database": record.database, "application_name": record.application_name,
            "client_addr": record.client_addr, "session": record.session,
            "statement": record.statement, "outcome": record.outcome, "error": record.error,
        }
        body["ts"] = ts
        body["seq"] = head.seq + 1
        body["prev"] = head.hash
        digest = hashlib.sha256(
            oracle_canonical({k: v for k, v in body.items() if k != "hash"})
        ).hexdigest()
        body["hash"] = digest
        sealed.append(SealedLine(head.seq + 1, digest, oracle_canonical(body).decode()))
        head = ChainHead(head.seq + 1, digest, record.event)
    return sealed, head


# What could confuse a serializer that splices text: keys and quotes inside values.
TRICKY = [
    '"kek":', ',"kek":', '"hash"', ',"hash":"', '"hash":', '\\"', "\\", '"', "'", "{", "}", "[",
    "]", ",", ":", "null", "\x00", "\x01", "\n", "\r", "\t", "\x1f", "\x7f", "\x80", "\u2028",
    "\u2029", "é", "ß", "日本", "😀", "\ufeff", " ",
]
texts = st.lists(st.one_of(st.sampled_from(TRICKY), st.text(max_size=6)), max_size=6).map(
    "".join
)
maybe_texts = st.none() | texts
class Number(int):
    """An int subclass (json writes the number, whatever __repr__ says)."""

    def __repr__(self) -> str:
        return "not this"


maybe_ints = (
    st.none() | st.integers() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.integers().map(Number)
)
records = st.builds(
    AuditRecord,
    event=st.sampled_from(sorted(EVENTS)),
    tenant=maybe_texts, key_id=maybe_ints, key_version=maybe_ints, kek=maybe_texts,
    table=maybe_texts, columns=st.lists(texts, max_size=4).map(tuple), count=maybe_ints,
    db_user=maybe_texts, database=maybe_texts, application_name=maybe_texts,
    client_addr=maybe_texts, session=maybe_texts, statement=maybe_texts,
    outcome=st.sampled_from(sorted(OUTCOMES)), error=maybe_texts,
)
heads = st.builds(ChainHead, seq=st.integers(min_value=0, max_value=2**40),
                  hash=st.just(GENESIS) | texts, event=st.none() | texts)


def same_as_oracle(batch: list[tuple[AuditRecord, Any]], head: ChainHead) -> None:
    try:
        expected = oracle_chain(batch, head)
    except Exception as error:  # e.g. a lone surrogate cannot be UTF-8 encoded
        with pytest.raises(type(error)):
            chain(batch, head)
        return
    assert chain(batch, head) == expected


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(records, texts), max_size=4), heads)
def test_chain_is_byte_identical_to_the_oracle(batch: list[tuple[AuditRecord, str]],
                                               head: ChainHead) -> None:
    sealed, new_head = chain(batch, head)
    assert (sealed, new_head) == oracle_chain(batch, head)
    if not batch:
        assert new_head is head
    for s in sealed:
        body = json.loads(s.line)
        assert record_hash(body) == s.hash == body["hash"]
        assert canonical(body).decode() == s.line
        assert head_of(s.line) == ChainHead(s.seq, s.hash, body["event"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(records, texts), max_size=5))
def test_chained_lines_verify(batch: list[tuple[AuditRecord, str]]) -> None:
    batch = [*batch, (AuditRecord("audit.stop"), "t")]
    sealed, head = chain(batch, ChainHead())
    report = check([s.line for s in sealed])
    assert report.ok, report.problems
    assert report.records == len(batch) and report.head == head


class Name(str):
    """A str subclass (json writes the string itself, whatever __str__ says)."""

    def __str__(self) -> str:
        return "not this"


# Values of any JSON type, and objects json cannot write.
odd = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | texts | texts.map(Name),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=6,
) | st.builds(object)
WHOLE_FIELDS = ("key_id", "key_version", "count")


def refused(name: str, want: str = "", got: str = "") -> str:
    """What AuditRecord raises for a field of the wrong type. The compiled build checks the
    declared types of the arguments before __init__ runs, with mypyc's message ("str object
    expected; got int"); a bool for a number gets through that, and to __init__'s own."""
    mine = rf"^AuditRecord\.{name}: " + (rf"{re.escape(want)}, got {got}$" if want else "")
    return mine if got == "bool" else rf"{mine}| object expected; got "


def declared_type(name: str, value: object) -> bool:
    if name in WHOLE_FIELDS:
        return value is None or (isinstance(value, int) and not isinstance(value, bool))
    return value is None or isinstance(value, str)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fields_of_another_type_are_refused_and_the_rest_chain_as_json_would(
    data: st.DataObject,
) -> None:
    """Text where text is declared (a str subclass too), whole numbers where numbers are, or
    None: anything else (a bool, a float, a list, an object) is refused by name, so chain()
    may reuse the rendering of equal fields (1, 1.0 and True are equal, but not alike)."""
    fields = {
        name: data.draw(odd, label=name)
        for name in ("tenant", "key_id", "key_version", "kek", "table", "count", "db_user",
                     "database", "application_name", "client_addr", "session", "statement",
                     "error")
    }
    event = data.draw(st.sampled_from(sorted(EVENTS)) | st.sampled_from(sorted(EVENTS)).map(Name))
    columns = data.draw(st.lists(texts | texts.map(Name), max_size=3).map(tuple))
    wrong = [name for name in FIELDS if name in fields and not declared_type(name, fields[name])]
    if wrong:
        with pytest.raises(TypeError, match=refused(wrong[0])):
            AuditRecord(event, columns=columns, **fields)
        return
    record = AuditRecord(event, columns=columns, **fields)
    ts = data.draw(texts, label="ts")
    head = ChainHead(data.draw(st.integers(min_value=0)), data.draw(texts, label="hash"))
    plain = AuditRecord(  # the same values as exact str: alike, so one rendering serves both
        str.__str__(event),
        columns=tuple(str.__str__(c) for c in columns),
        **{k: str.__str__(v) if isinstance(v, str) else v for k, v in fields.items()},
    )
    same_as_oracle([(record, ts), (record, ts), (plain, ts)], head)


def test_parts_memo_reuses_only_what_is_written_alike() -> None:
    from proxy.audit import records as records_module

    records_module._PARTS.clear()
    base = dict(tenant="acme", key_id=1, key_version=1, table="public.t", columns=("a",))
    batch = [
        (AuditRecord("data.encrypt", **base, count=1), "t"),
        (AuditRecord("data.encrypt", **base, count=2), "t"),  # the same parts, another count
        (AuditRecord("data.encrypt", **{**base, "key_id": 2}, count=2), "t"),
        (AuditRecord("data.decrypt", **base, count=2), "t"),
        (AuditRecord("data.encrypt", **{**base, "tenant": Name("acme")}, count=3), "t"),
    ]
    assert chain(batch, ChainHead()) == oracle_chain(batch, ChainHead())
    assert len(records_module._PARTS) == 3
    with pytest.raises(TypeError, match=refused("key_id", "a whole number or None", "bool")):
        AuditRecord("data.encrypt", key_id=True)
    with pytest.raises(TypeError, match=refused("count", "a whole number or None", "float")):
        AuditRecord("data.encrypt", count=1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=refused("tenant", "text or None", "int")):
        AuditRecord("data.encrypt", tenant=1)  # type: ignore[arg-type]
    # A full memo is emptied before a new rendering goes in.
    records_module._PARTS.update({(i,): ("", "", "", "") for i in range(5000)})
    other = [(AuditRecord("data.encrypt", tenant="other"), "t")]
    assert chain(other, ChainHead()) == oracle_chain(other, ChainHead())
    assert len(records_module._PARTS) == 1


def test_lone_surrogate_fails_as_before() -> None:
    same_as_oracle([(AuditRecord("data.encrypt", tenant="\udc80"), "t")], ChainHead())
    with pytest.raises(UnicodeEncodeError):
        chain([(AuditRecord("data.encrypt", tenant="\udc80"), "t")], ChainHead())


def test_unserializable_value_is_refused() -> None:
    with pytest.raises(TypeError, match=refused("tenant", "text or None", "object")):
        AuditRecord("data.encrypt", tenant=object())  # type: ignore[arg-type]


def test_lines_written_before_still_verify() -> None:
    """A trail the old serializer wrote verifies, and chain() continues it seamlessly."""
    batch = [(AuditRecord("audit.start", session="w1"), "t0")] + [
        (AuditRecord("data.encrypt", tenant='a"kek":b', key_id=i, table="public.t",
                     columns=("ssn", ',"kek":'), count=i, statement='SELECT "\\"'), f"t{i}")
        for i in range(1, 4)
    ]
    old, head = oracle_chain(batch, ChainHead())
    assert head_of(old[-1].line) == head
    new, _ = chain([(AuditRecord("audit.stop"), "t9")], head)
    report = check([s.line for s in old + new])
    assert report.ok, report.problems


def test_audit_records_fill_the_fields_the_note_names() -> None:
    facts = ConnectionFacts("u", "db", "app", "10.0.0.1", "42.7")
    notes = (
        AuditNote("data.encrypt", "acme", 7, "public.t", ("a", "b"), 3, "INSERT ...", "ok"),
        AuditNote("data.deny", None, None, None, (), 0, "SELECT ...", "denied", "no key"),
    )
    assert audit_records(notes, facts) == [
        AuditRecord(
            note.event, tenant=note.tenant, key_id=note.key_id, table=note.table,
            columns=note.columns, count=note.count, db_user=facts.db_user,
            database=facts.database, application_name=facts.application_name,
            client_addr=facts.client_addr, session=facts.session, statement=note.statement,
            outcome=note.outcome, error=note.error,
        )
        for note in notes
    ]
    # With the key ring's (version, kek) per key id: the records name them too; a key it
    # does not know (and a note without a key) stays null.
    known = {7: (3, "pgseal-master")}
    with_meta = audit_records(notes, facts, known)
    assert [(r.key_id, r.key_version, r.kek) for r in with_meta] == [
        (7, 3, "pgseal-master"), (None, None, None)]
    assert [r.key_version for r in audit_records(notes, facts, {8: (1, "k")})] == [None, None]
    with pytest.raises(ValueError, match="unknown audit event"):
        audit_records((AuditNote("data.steal", None, None, None, (), 0, "x"),), facts)
    with pytest.raises(ValueError, match="outcome"):
        audit_records((AuditNote("data.deny", None, None, None, (), 0, "x", "maybe"),), facts)


# --- pinned output: the lines and hashes the code wrote before its speed-ups ------------------


def golden_batches() -> tuple[list[tuple[AuditRecord, str]], list[tuple[AuditRecord, str]]]:
    """Records of every kind, with what JSON must escape: a data-path batch, then a second."""
    facts = ConnectionFacts("app_user", "shop", 'psql "ünï"\t', None, "4242.7")
    notes = (
        AuditNote("data.encrypt", "acme", 7, "public.patients", ("ssn", "name"), 2,
                  "INSERT INTO patients (ssn, name) VALUES ($?, $?)"),
        AuditNote("data.decrypt", "日本", 2**40, "public.t", (), 0, 'SELECT "a\\b" FROM t', "ok"),
        AuditNote("data.deny", None, None, "public.t", ("x\u2028",), 1, "SELECT x FROM t",
                  "denied", "role 'r' may not decrypt\n😀"),
    )
    first = [(AuditRecord("audit.start", session="123-abcd"), "2026-01-02T03:04:05.000006Z")]
    first += [
        (r, f"2026-01-02T03:04:05.{i:06d}Z") for i, r in enumerate(audit_records(notes, facts), 7)
    ]
    second = [
        (AuditRecord("key.unwrap", tenant="acme", key_id=7, key_version=3, kek="pgseal-master#2",
                     outcome="error", error="HSM \x00 gone"), "2026-01-02T03:04:06.000000Z"),
        (AuditRecord("audit.stop", session="123-abcd"), "2026-01-02T03:04:07.123456Z"),
    ]
    return first, second


# (seq, hash, SHA-256 of the line) as written by chain() before it was made faster.
PINNED = [
    (1, "ce9c22f537fc27b3efcbb8e59361bc11e76221949426e97fe423ce480a175092",
     "3e6f08975e275544a9279a88f64461cab676b9ae0741371cdb61c16eee16cd5f"),
    (2, "70958bbd8155b1930419adf5893fd8616f777169903d5c6400edd0616b644d57",
     "271909fcdcec593aa30f3137ec40b6498b6f3ed74f5531f6b13e68f6dc93e229"),
    (3, "c253ff73487ed7a31ea0c9646a4790eef554a74008c5b976a51fd4db6c2861e3",
     "1ccf11951d37e9bc37a67e388cb69474faac21703babd4648e7674052cdcff02"),
    (4, "bfd1136564ef740e598434a275a3059f06599a63ada69fbacca39fcb981ca8ef",
     "bb7fc66e9c5fec1ec6d617a49d13cff9054910273f556cd8d43117babf7c0434"),
    (5, "78efdcaad50d396a549867cf33a57ea7ef274fc9b1bb6c0dbec0e2dbc41585d5",
     "9b469b90d3b6518a871b282259f928e39caeffe4344c15599d4f1c5f02116946"),
    (6, "86d583e299e6951515291b63e2a22898d2addfc7653e8df4ca325667b4488bae",
     "2d044a4b17cc7a840dbec621226f56a910a113a9e9ff0266601491c1172dd537"),
]
PINNED_LINE_4 = (
    '{"application_name":"psql \\"ünï\\"\\t","client_addr":null,"columns":["x\u2028"],'
    '"count":1,"database":"shop","db_user":"app_user",'
    '"error":"role \'r\' may not decrypt\\n😀","event":"data.deny",'
    '"hash":"bfd1136564ef740e598434a275a3059f06599a63ada69fbacca39fcb981ca8ef",'
    '"kek":null,"key_id":null,"key_version":null,"outcome":"denied",'
    '"prev":"c253ff73487ed7a31ea0c9646a4790eef554a74008c5b976a51fd4db6c2861e3",'
    '"seq":4,"session":"4242.7","statement":"SELECT x FROM t","table":"public.t",'
    '"tenant":null,"ts":"2026-01-02T03:04:05.000009Z"}'
)


def test_chain_output_is_pinned() -> None:
    first, second = golden_batches()
    sealed, head = chain(first, ChainHead())
    more, end = chain(second, head)
    assert [
        (s.seq, s.hash, hashlib.sha256(s.line.encode()).hexdigest()) for s in sealed + more
    ] == PINNED
    assert sealed[3].line == PINNED_LINE_4
    assert end == ChainHead(6, PINNED[-1][1], "audit.stop")
    # The same records chained in one batch, or one at a time, give the same lines.
    one_by_one: list[SealedLine] = []
    at = ChainHead()
    for item in first + second:
        step, at = chain([item], at)
        one_by_one += step
    assert one_by_one == sealed + more and at == end
    assert (sealed + more, end) == oracle_chain(first + second, ChainHead())


def test_pinned_chain_verifies_and_tampering_is_caught() -> None:
    first, second = golden_batches()
    sealed, head = chain(first, ChainHead())
    more, _ = chain(second, head)
    lines = [s.line for s in sealed + more]
    report = check(lines)
    assert report.ok, report.problems
    assert report.head == ChainHead(6, PINNED[-1][1], "audit.stop")
    edited = [*lines]
    edited[1] = edited[1].replace('"count":2', '"count":3')
    assert any("line 2" in p and "edited" in p for p in check(edited).problems)
    assert not check(lines[:2] + lines[3:]).ok  # removed
    assert not check([*lines[:2], lines[3], lines[2], *lines[4:]]).ok  # reordered
    assert not check(lines[:-1]).ok  # truncated


# --- the faster AuditRecord.__init__, chain_text and the escape memo --------------------------


@dataclass(frozen=True, slots=True)
class GeneratedRecord:
    """AuditRecord as it was: the dataclass-generated __init__ and a __post_init__ check."""

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
        # The checks AuditRecord makes, in its order: each field's type, in field order, then
        # the event and the outcome (a subclass of str stands for its text).
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            got = type(value).__name__
            if f.type == "tuple[str, ...]":
                if not isinstance(value, tuple) or not all(isinstance(c, str) for c in value):
                    raise TypeError("AuditRecord.columns: a tuple of column names")
            elif f.type == "int | None":
                if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                    raise TypeError(f"AuditRecord.{f.name}: a whole number or None, got {got}")
            elif f.type == "str | None":
                if value is not None and not isinstance(value, str):
                    raise TypeError(f"AuditRecord.{f.name}: text or None, got {got}")
            elif f.type == "str" and not isinstance(value, str):
                raise TypeError(f"AuditRecord.{f.name}: text, got {got}")
        event, outcome = str.__str__(self.event), str.__str__(self.outcome)
        if event not in EVENTS:
            raise ValueError(f"unknown audit event {event!r}")
        if outcome not in OUTCOMES:
            raise ValueError(f"audit outcome: one of {sorted(OUTCOMES)}, got {outcome!r}")


def exact(value: object) -> object:
    """What AuditRecord stores for a value it accepts: the plain str, int or tuple of str."""
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__index__(value)
    if isinstance(value, tuple):
        return tuple(str.__str__(c) for c in tuple.__iter__(value))
    return value


def test_record_init_has_the_generated_signature() -> None:
    def shape(cls: type) -> list[tuple[str, object, object]]:
        # (The compiled build's signature has no annotations: mypyc checks them itself.)
        parameters = inspect.signature(cls).parameters.values()
        return [(p.name, p.kind, p.default) for p in parameters]

    assert shape(AuditRecord) == shape(GeneratedRecord)
    parameters = inspect.signature(AuditRecord).parameters
    if not COMPILED:
        assert parameters == inspect.signature(GeneratedRecord).parameters  # annotations too
    assert [f.name for f in dataclasses.fields(AuditRecord)] == list(parameters)
    record = AuditRecord("key.create", "acme", 1, 2, "k", "t", ("a",), 3, "u", "d", "app",
                         "addr", "s", "stmt", "error", "boom")
    assert [getattr(record, f.name) for f in dataclasses.fields(AuditRecord)] == [
        "key.create", "acme", 1, 2, "k", "t", ("a",), 3, "u", "d", "app", "addr", "s", "stmt",
        "error", "boom",
    ]
    assert dataclasses.replace(record, tenant="other").tenant == "other"
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.tenant = "other"  # type: ignore[misc]


class Columns(tuple):  # type: ignore[type-arg]
    """A tuple subclass (the check falls back to isinstance for it)."""


any_columns = (
    st.lists(texts | texts.map(Name), max_size=3).map(tuple)
    | st.lists(texts, max_size=3).map(Columns)
    | st.lists(texts, max_size=2).map(list)
    | st.lists(st.one_of(texts, st.integers(), st.none(), st.binary(max_size=2)), max_size=3)
    .map(tuple)
    | st.none()
)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_record_init_checks_and_stores_as_the_generated_one(data: st.DataObject) -> None:
    event = data.draw(st.sampled_from(sorted(EVENTS)) | texts, label="event")
    outcome = data.draw(st.sampled_from(sorted(OUTCOMES)) | texts, label="outcome")
    columns = data.draw(any_columns, label="columns")
    values = {
        name: data.draw(odd, label=name)
        for name in ("tenant", "key_id", "kek", "count", "session", "statement", "error")
    }
    try:
        expected = GeneratedRecord(event, columns=columns, outcome=outcome, **values)
    except (ValueError, TypeError) as error:
        # Compiled, the arguments' declared types are checked first, by mypyc (a tuple for
        # columns; text or None, a number or None: a bool passes for a number, to __init__).
        mypyc_refuses = not isinstance(columns, tuple) or any(
            not declared_type(k, v) and not (k in WHOLE_FIELDS and isinstance(v, bool))
            for k, v in values.items()
        )
        if COMPILED and mypyc_refuses:
            with pytest.raises(TypeError, match=" object expected; got "):
                AuditRecord(event, columns=columns, outcome=outcome, **values)
            return
        with pytest.raises(type(error), match=re.escape(str(error))):
            AuditRecord(event, columns=columns, outcome=outcome, **values)
        return
    record = AuditRecord(event, columns=columns, outcome=outcome, **values)
    for f in dataclasses.fields(record):
        given_value, stored = getattr(expected, f.name), getattr(record, f.name)
        assert type(stored) is type(exact(given_value))
        assert stored == exact(given_value)
        if given_value is exact(given_value):  # already plain: kept as it is, not copied
            assert stored is given_value


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(records, texts), max_size=4), heads)
def test_chain_text_is_chain_joined(batch: list[tuple[AuditRecord, str]], head: ChainHead) -> None:
    sealed, end = chain(batch, head)
    assert chain_text(batch, head) == ("".join(s.line + "\n" for s in sealed), end)


def test_escape_memo_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.audit import records as records_module

    first, second = golden_batches()
    batch = first + second
    expected = oracle_chain(batch, ChainHead())
    records_module._ESCAPED.clear()
    records_module._PARTS.clear()  # (else every record's parts come from there)
    assert chain(batch, ChainHead()) == expected  # every string escaped, then remembered
    assert records_module._ESCAPED
    records_module._PARTS.clear()
    assert chain(batch, ChainHead()) == expected  # every string from the memo
    # A full memo is emptied, and long strings are not kept.
    monkeypatch.setattr(records_module, "_ESCAPED_MAX", 3)
    monkeypatch.setattr(records_module, "_ESCAPED_TEXT_MAX", 8)
    records_module._ESCAPED.clear()
    for _ in range(3):
        records_module._PARTS.clear()
        assert chain(batch, ChainHead()) == expected
        assert 0 < len(records_module._ESCAPED) <= 3
        assert all(len(text) <= 8 for text in records_module._ESCAPED)
    # A str subclass is stored, remembered and written as its own text.
    records_module._ESCAPED.clear()
    records_module._PARTS.clear()
    odd = [(AuditRecord("data.encrypt", tenant=Name("acme"), table="acme"), "t")] * 2
    assert chain(odd, ChainHead()) == oracle_chain(odd, ChainHead())
    assert all(type(text) is str for text in records_module._ESCAPED)


KEY_FIELDS = (  # every field but count: what _PARTS keys on
    "event", "tenant", "key_id", "key_version", "kek", "table", "columns", "db_user",
    "database", "application_name", "client_addr", "session", "statement", "outcome", "error",
)
OTHER_VALUE = {
    "event": "data.decrypt", "key_id": 8, "key_version": 3, "columns": ("b",),
    "outcome": "denied",
}


@pytest.mark.parametrize("name", KEY_FIELDS)
def test_records_differing_in_one_field_are_written_apart(name: str) -> None:
    from proxy.audit import records as records_module

    base: dict[str, Any] = {
        "event": "data.encrypt", "tenant": "acme", "key_id": 7, "key_version": 2, "kek": "k",
        "table": "public.t", "columns": ("a",), "count": 1, "db_user": "u", "database": "d",
        "application_name": "app", "client_addr": "10.0.0.1", "session": "s",
        "statement": "INSERT ...", "outcome": "ok", "error": "e",
    }
    assert set(KEY_FIELDS) == set(FIELDS) - {"count", "ts", "seq", "prev", "hash"}
    other = {**base, name: OTHER_VALUE.get(name, f"other {name}")}
    records_module._PARTS.clear()
    batch = [(AuditRecord(**base), "t"), (AuditRecord(**other), "t"), (AuditRecord(**base), "t")]
    sealed, _ = chain(batch, ChainHead())
    assert (sealed, _) == oracle_chain(batch, ChainHead())
    assert json.loads(sealed[1].line)[name] != json.loads(sealed[0].line)[name]


class Folded(str):
    """Equal to any text that differs only in case: a subclass the memo must not trust."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and self.lower() == other.lower()

    def __hash__(self) -> int:
        return hash(self.lower())


class Anything(int):
    def __eq__(self, other: object) -> bool:
        return True

    __hash__ = int.__hash__


class Columns2(tuple):  # type: ignore[type-arg]
    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(("not", "these"))


class Unhashable(str):
    def __eq__(self, other: object) -> bool:
        return str.__eq__(self, other)

    __hash__ = None  # type: ignore[assignment]


def test_subclass_values_are_stored_and_written_as_their_plain_value() -> None:
    from proxy.audit import records as records_module

    records_module._PARTS.clear()
    records_module._ESCAPED.clear()
    batch = [
        (AuditRecord("data.encrypt", tenant="acme", key_id=1, columns=("a",)), "t"),
        (AuditRecord("data.encrypt", tenant=Folded("ACME"), key_id=Anything(2),
                     columns=Columns2(("a",))), "t"),
        (AuditRecord("data.encrypt", tenant=Unhashable("x"), error=Unhashable("y")), "t"),
    ]
    stored = batch[1][0]
    assert (stored.tenant, stored.key_id, stored.columns) == ("ACME", 2, ("a",))
    assert type(stored.tenant) is str and type(stored.key_id) is int
    assert type(stored.columns) is tuple
    lines = [json.loads(s.line) for s in chain(batch, ChainHead())[0]]
    assert [(b["tenant"], b["key_id"], b["columns"]) for b in lines[:2]] == [
        ("acme", 1, ["a"]), ("ACME", 2, ["a"])
    ]
    assert chain(batch, ChainHead()) == oracle_chain(batch, ChainHead())


def test_long_parts_are_not_kept() -> None:
    from proxy.audit import records as records_module

    records_module._PARTS.clear()
    long = AuditRecord("data.deny", error="x" * 100_000, outcome="denied")
    short = AuditRecord("data.deny", error="short", outcome="denied")
    batch = [(long, "t"), (short, "t"), (long, "t")]
    assert chain(batch, ChainHead()) == oracle_chain(batch, ChainHead())
    assert list(records_module._PARTS.values()) == [records_module._parts(short)]

"""The hash chain and its verifier (pure): what `pgseal audit verify` catches."""

from __future__ import annotations

import hashlib
import json
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
    head_of,
    record_hash,
    verify_lines,
)
from proxy.server.datapath_shell import ConnectionFacts, audit_records
from proxy.session.datapath import AuditNote


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
maybe_ints = st.none() | st.integers() | st.integers(min_value=-(2**70), max_value=2**70)
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


# Values a caller should not pass (the fields are not type-checked): still what json wrote.
odd = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | texts | texts.map(Name),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_chain_matches_the_oracle_for_odd_value_types(data: st.DataObject) -> None:
    fields = {
        name: data.draw(odd, label=name)
        for name in ("tenant", "key_id", "key_version", "kek", "table", "count", "db_user",
                     "database", "application_name", "client_addr", "session", "statement",
                     "error")
    }
    event = data.draw(st.sampled_from(sorted(EVENTS)) | st.sampled_from(sorted(EVENTS)).map(Name))
    columns = data.draw(st.lists(texts | texts.map(Name), max_size=3).map(tuple))
    record = AuditRecord(event, columns=columns, **fields)
    ts = data.draw(odd, label="ts")
    head = ChainHead(data.draw(st.integers(min_value=0)), data.draw(odd | texts, label="hash"))
    same_as_oracle([(record, ts), (record, ts)], head)


def test_lone_surrogate_fails_as_before() -> None:
    same_as_oracle([(AuditRecord("data.encrypt", tenant="\udc80"), "t")], ChainHead())
    with pytest.raises(UnicodeEncodeError):
        chain([(AuditRecord("data.encrypt", tenant="\udc80"), "t")], ChainHead())


def test_unserializable_value_fails_as_before() -> None:
    record = AuditRecord("data.encrypt", tenant=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not JSON serializable"):
        chain([(record, "t")], ChainHead())


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
    with pytest.raises(ValueError, match="unknown audit event"):
        audit_records((AuditNote("data.steal", None, None, None, (), 0, "x"),), facts)
    with pytest.raises(ValueError, match="outcome"):
        audit_records((AuditNote("data.deny", None, None, None, (), 0, "x", "maybe"),), facts)

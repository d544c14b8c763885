"""The hash chain and its verifier (pure): what `pgseal audit verify` catches."""

from __future__ import annotations

import json

import pytest

from proxy.audit.records import (
    FIELDS,
    GENESIS,
    AuditRecord,
    ChainHead,
    chain,
    head_of,
    record_hash,
    verify_lines,
)


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

"""AuditTrail with the jsonl sink: group commit, durability, restart, faults, recovery."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from proxy.audit import AuditRecord, AuditTrail, verify_jsonl
from proxy.audit.sinks import JsonlSink, StdoutSink, read_last_line
from proxy.errors import KeyServiceUnavailable


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def open_trail(path: Path, on_failure: str = "block") -> AuditTrail:
    trail = AuditTrail([JsonlSink(path)], on_failure=on_failure)
    await trail.start()
    return trail


@pytest.mark.asyncio
async def test_concurrent_records_share_one_write(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    trail = await open_trail(path)
    before = trail.batches
    await asyncio.gather(*(
        trail.record(AuditRecord("data.encrypt", tenant="t", key_id=i, count=1)) for i in range(200)
    ))
    # The first record starts a batch; the other 199 arrive meanwhile and share the next.
    assert trail.batches - before <= 2
    await trail.close()
    report = verify_jsonl(path)
    assert report.ok, report.problems
    assert report.records == 202


@pytest.mark.asyncio
async def test_record_returns_after_the_line_is_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    trail = await open_trail(path)
    await trail.record(AuditRecord("key.create", tenant="acme", key_id=7, key_version=1, kek="k1"))
    last = lines(path)[-1]
    assert (last["event"], last["tenant"], last["key_id"]) == ("key.create", "acme", 7)
    await trail.close()


@pytest.mark.asyncio
async def test_chain_continues_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    for run in range(3):
        trail = await open_trail(path)
        await trail.record(AuditRecord("key.unwrap", tenant="acme", key_id=run))
        await trail.close()
    seqs = [r["seq"] for r in lines(path)]
    assert seqs == list(range(1, 10))
    report = verify_jsonl(path)
    assert report.ok, report.problems
    assert not report.warnings


@pytest.mark.asyncio
async def test_restart_after_a_crash_is_noted(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    trail = await open_trail(path)
    await trail.record(AuditRecord("key.unwrap", tenant="acme"))
    # crash: no audit.stop
    trail2 = await open_trail(path)
    await trail2.close()
    start = lines(path)[2]
    assert start["event"] == "audit.start"
    assert "did not stop cleanly" in str(start["error"])
    report = verify_jsonl(path)
    assert report.ok and report.warnings


@pytest.mark.asyncio
async def test_two_writers_on_one_file_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    a, b = await open_trail(path), await open_trail(path)
    await asyncio.gather(*(
        (a if i % 2 else b).record(AuditRecord("data.decrypt", count=i)) for i in range(50)
    ))
    await a.close()
    await b.close()
    seqs = [r["seq"] for r in lines(path)]
    assert seqs == list(range(1, len(seqs) + 1))
    assert verify_jsonl(path).ok


@pytest.mark.asyncio
async def test_half_written_line_is_not_chained_over(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    trail = await open_trail(path)
    await trail.close()
    with path.open("a") as f:
        f.write('{"seq": 3, "cut off')
    trail = await open_trail(path)
    await trail.close()
    records = path.read_text().splitlines()
    assert json.loads(records[-2])["seq"] == 3  # continues after the last whole record
    report = verify_jsonl(path)
    assert any("not a JSON record" in p for p in report.problems)


def test_read_last_line(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(b"one\ntwo\n" + b"x" * 70000 + b"\nthree\npartial")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert read_last_line(fd, os.fstat(fd).st_size) == "three"
        assert read_last_line(fd, 4) == "one"
        assert read_last_line(fd, 3) is None
        assert read_last_line(fd, 0) is None
    finally:
        os.close(fd)


@pytest.mark.asyncio
async def test_unwritable_sink_blocks_the_key_use_then_recovers(tmp_path: Path) -> None:
    folder = tmp_path / "audit"
    folder.mkdir()
    path = folder / "a.jsonl"
    trail = await open_trail(path)
    # The folder is replaced by a plain file: `path` cannot be reopened (works as root too).
    folder.rename(tmp_path / "moved")
    folder.write_text("not a folder")
    with pytest.raises(KeyServiceUnavailable, match=r"audit sink jsonl .* unwritable"):
        await trail.record(AuditRecord("key.unwrap", tenant="acme"))
    folder.unlink()
    folder.mkdir()
    await trail.record(AuditRecord("key.unwrap", tenant="acme"))  # recovered, no restart
    await trail.close()
    assert [r["event"] for r in lines(path)] == ["key.unwrap", "audit.stop"]


@pytest.mark.asyncio
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
async def test_full_disk_fails_closed() -> None:
    trail = AuditTrail([JsonlSink(Path("/dev/full"))])
    with pytest.raises(KeyServiceUnavailable, match="no space left on device"):
        await trail.start()


class FailingSink(StdoutSink):
    def __init__(self) -> None:
        super().__init__()
        self.name = "failing"
        self.fail = True
        self.written: list[str] = []
        self.kept_ids: list[tuple[str, int | None]] = []

    async def write(self, batch):  # type: ignore[no-untyped-def]
        from proxy.audit.sinks import SinkError

        if self.fail:
            raise SinkError("audit sink failing unwritable: disk on fire")
        self.written += [rec.event for rec, _ in batch]
        self.kept_ids += [(rec.event, rec.key_id) for rec, _ in batch]


@pytest.mark.asyncio
async def test_block_fails_every_waiter_and_warn_does_not() -> None:
    sink = FailingSink()
    trail = AuditTrail([sink], on_failure="block")
    results = await asyncio.gather(
        *(trail.record(AuditRecord("data.encrypt")) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, KeyServiceUnavailable) for r in results)
    assert "disk on fire" in str(results[0])
    sink.fail = False
    await trail.record(AuditRecord("data.encrypt"))
    assert sink.written == ["data.encrypt"]

    warn = AuditTrail([FailingSink()], on_failure="warn")
    await warn.record(AuditRecord("data.encrypt"))  # logged, not raised


@pytest.mark.asyncio
async def test_start_fails_closed_when_the_sink_cannot_open(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    trail = AuditTrail([JsonlSink(blocker / "a.jsonl")])  # parent is a file
    with pytest.raises(KeyServiceUnavailable, match="unwritable"):
        await trail.start()


@pytest.mark.asyncio
async def test_stdout_sink(capsys: pytest.CaptureFixture[str]) -> None:
    trail = AuditTrail([StdoutSink()])
    await trail.start()
    await trail.record(AuditRecord("data.deny", tenant="acme", outcome="denied"))
    await trail.close()
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["event"] for r in out] == ["audit.start", "data.deny", "audit.stop"]
    assert [r["seq"] for r in out] == [1, 2, 3]


@pytest.mark.asyncio
async def test_failed_start_is_written_with_the_first_record_later() -> None:
    sink = FailingSink()
    trail = AuditTrail([sink])

    async def fail_open():  # type: ignore[no-untyped-def]
        from proxy.audit.sinks import SinkError

        if sink.fail:
            raise SinkError("audit sink failing unwritable: down")
        return await StdoutSink.open(sink)

    sink.open = fail_open  # type: ignore[method-assign]
    with pytest.raises(KeyServiceUnavailable, match="down"):
        await trail.start()
    sink.fail = False
    await trail.record(AuditRecord("key.unwrap"))
    await trail.close()
    assert sink.written == ["audit.start", "key.unwrap", "audit.stop"]


@pytest.fixture
def no_retry_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sink with a backlog is tried again with the very next batch (no backoff)."""
    from proxy.audit import trail as trail_module

    monkeypatch.setattr(trail_module, "RETRY_FIRST", 0.0)
    monkeypatch.setattr(trail_module, "RETRY_MAX", 0.0)


class CountingSink(StdoutSink):
    """Always works; remembers what it wrote."""

    def __init__(self) -> None:
        super().__init__()
        self.name = "counting"
        self.written: list[tuple[str, int | None]] = []

    async def write(self, batch):  # type: ignore[no-untyped-def]
        self.written += [(rec.event, rec.key_id) for rec, _ in batch]


@pytest.mark.asyncio
async def test_kept_records_are_written_once_the_sink_is_back(no_retry_wait: None) -> None:
    down, up = FailingSink(), CountingSink()
    trail = AuditTrail([down, up], on_failure="block")
    with pytest.raises(KeyServiceUnavailable, match="disk on fire"):
        await trail.record(AuditRecord("data.encrypt", key_id=1), kept=True)
    with pytest.raises(KeyServiceUnavailable):
        await trail.record(AuditRecord("key.unwrap", key_id=2))  # refused use: not kept
    with pytest.raises(KeyServiceUnavailable):
        await trail.record(AuditRecord("data.decrypt", key_id=3), kept=True)
    assert trail.backlog == 2
    with pytest.raises(KeyServiceUnavailable):
        await trail.retry()  # still down: still kept
    assert trail.backlog == 2
    down.fail = False
    await trail.retry()
    assert trail.backlog == 0
    # The sink that was down gets the kept records, oldest first; the sink that worked got
    # every batch exactly once.
    assert down.written == ["data.encrypt", "data.decrypt"]
    assert up.written == [("data.encrypt", 1), ("key.unwrap", 2), ("data.decrypt", 3)]
    await trail.record(AuditRecord("data.encrypt", key_id=4), kept=True)
    assert down.written[-1] == "data.encrypt" and up.written[-1] == ("data.encrypt", 4)


@pytest.mark.asyncio
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
async def test_kept_records_go_before_newer_ones(tmp_path: Path, no_retry_wait: None) -> None:
    path = tmp_path / "a.jsonl"
    trail = await open_trail(path)
    path.rename(path.with_suffix(".old"))
    path.symlink_to("/dev/full")  # the sink reopens its path: a full disk from now on
    with pytest.raises(KeyServiceUnavailable, match="no space left"):
        await trail.record(AuditRecord("data.encrypt", tenant="acme", key_id=1), kept=True)
    path.unlink()  # space again: the sink starts a new file
    await trail.record(AuditRecord("data.decrypt", tenant="acme", key_id=2), kept=True)
    await trail.close()
    assert [(r["event"], r["key_id"]) for r in lines(path)] == [
        ("data.encrypt", 1), ("data.decrypt", 2), ("audit.stop", None)
    ]
    assert [r["seq"] for r in lines(path)] == [1, 2, 3]


@pytest.mark.asyncio
async def test_a_backlog_is_bounded(monkeypatch: pytest.MonkeyPatch, no_retry_wait: None) -> None:
    from proxy.audit import trail as trail_module

    monkeypatch.setattr(trail_module, "MAX_BACKLOG", 3)  # (no_retry_wait: every batch tries)
    sink = FailingSink()
    trail = AuditTrail([sink], on_failure="warn")
    for i in range(5):
        await trail.record(AuditRecord("data.encrypt", key_id=i), kept=True)
    assert trail.backlog == 3 and trail.dropped == 2
    sink.fail = False
    await trail.retry()
    assert sink.written == ["data.encrypt"] * 3
    # The oldest are kept (under block: the key uses made before the failure was known).
    assert [key_id for _, key_id in sink.kept_ids] == [0, 1, 2]


@pytest.mark.asyncio
async def test_a_sink_with_a_backlog_is_tried_again_after_a_growing_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from proxy.audit import trail as trail_module

    clock = [100.0]
    monkeypatch.setattr(trail_module.time, "monotonic", lambda: clock[0])
    sink = FailingSink()
    attempts = 0
    fail_write = sink.write

    async def counted(batch):  # type: ignore[no-untyped-def]
        nonlocal attempts
        attempts += 1
        await fail_write(batch)

    sink.write = counted  # type: ignore[method-assign]
    trail = AuditTrail([sink], on_failure="block")
    for step in range(10):  # 10 batches in 0.45 s: one attempt, the rest wait
        with pytest.raises(KeyServiceUnavailable, match="disk on fire"):
            await trail.record(AuditRecord("data.encrypt", key_id=step), kept=True)
        clock[0] += 0.05
    assert attempts == 1 and trail.backlog == 10
    clock[0] += 0.1  # RETRY_FIRST is over
    with pytest.raises(KeyServiceUnavailable):
        await trail.retry()
    assert attempts == 2
    clock[0] += trail_module.RETRY_FIRST  # the wait doubled: not yet
    with pytest.raises(KeyServiceUnavailable):
        await trail.retry()
    assert attempts == 2
    clock[0] += trail_module.RETRY_FIRST
    sink.fail = False
    await trail.retry()
    assert attempts == 3 and trail.backlog == 0
    assert sink.written == ["data.encrypt"] * 10


@pytest.mark.asyncio
async def test_trail_file_is_pinned(tmp_path: Path) -> None:
    """The bytes a trail writes (timestamps from the clock included) are what the code
    wrote before its speed-ups: data-path records (kept) and a key-service record."""
    import datetime as dt
    import hashlib

    from tests.unit.test_audit_chain import golden_batches

    path = tmp_path / "a.jsonl"
    ticks = iter(range(1000))
    start = dt.datetime(2026, 5, 6, 7, 8, 9, tzinfo=dt.timezone(dt.timedelta(hours=-7)))

    def clock() -> dt.datetime:
        return start + dt.timedelta(microseconds=next(ticks) * 250001)

    trail = AuditTrail([JsonlSink(path)], clock=clock)
    trail.writer_id = "w-1"
    await trail.start()
    first, second = golden_batches()
    await trail.record(*(rec for rec, _ in first[1:]), kept=True)
    await trail.record(second[0][0])
    await trail.close()
    data = path.read_bytes()
    assert (hashlib.sha256(data).hexdigest(), len(data)) == (
        "3d04e32fb3ecfcb153226cc93ff1917d920e2ef1fc319e89c6539e59b3017504", 2936
    )
    assert data.decode().splitlines()[1].endswith('"ts":"2026-05-06T14:08:09.250001Z"}')
    assert verify_jsonl(path).ok


@pytest.mark.asyncio
async def test_a_batch_keeps_only_its_kept_records(no_retry_wait: None) -> None:
    """One batch of kept and other records: a failed sink keeps the kept ones, in order; a
    batch of kept records only is kept whole (the same list serves both)."""
    down, up = FailingSink(), CountingSink()
    trail = AuditTrail([down, up], on_failure="warn")
    await asyncio.gather(
        trail.record(AuditRecord("data.encrypt", key_id=1), AuditRecord("data.decrypt", key_id=2),
                     kept=True),
        trail.record(AuditRecord("key.unwrap", key_id=3)),
        trail.record(AuditRecord("data.deny", key_id=4), kept=True),
    )
    assert trail.batches == 1 and trail.backlog == 3
    await asyncio.gather(*(
        trail.record(AuditRecord("data.encrypt", key_id=i), kept=True) for i in (5, 6)
    ))
    assert trail.batches == 2 and trail.backlog == 5
    down.fail = False
    await trail.retry()
    assert down.kept_ids == [
        ("data.encrypt", 1), ("data.decrypt", 2), ("data.deny", 4), ("data.encrypt", 5),
        ("data.encrypt", 6),
    ]
    assert [key_id for _, key_id in up.written] == [1, 2, 3, 4, 5, 6]
    assert trail.backlog == 0

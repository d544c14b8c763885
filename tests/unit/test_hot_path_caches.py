"""What the hot-path caches and shortcuts must keep doing: per-connection caches of Parse
messages, Bind programs, openers and portal RowDescriptions (a reused plan or opener must
never decide a read of another Bind, nor pin large messages); the order of the rules in a
DataRow; an audit sink that stays down is not handed its backlog with every batch.
"""

from __future__ import annotations

import gc
import tracemalloc

import pytest

from proxy.audit.records import AuditRecord, ChainHead, chain
from proxy.audit.sinks import Batch, SinkError
from proxy.audit.trail import AuditTrail
from proxy.crypto.cells import CellKey
from proxy.session.datapath import NeedKeys
from proxy.wire import messages as m
from tests.support.build import COMPILED
from tests.unit.test_datapath import (
    BIND_COMPLETE,
    PARSE_COMPLETE,
    client,
    frame_of,
    make,
    policies,
    server,
)

__all__ = ["policies"]  # the module-scoped fixture

PATIENTS_OID = 16400
READY = m.ReadyForQuery("I").encode()


def _hex(cell: bytes) -> bytes:
    return b"\\x" + cell.hex().encode()


def _error_of(out: bytes) -> m.ErrorResponse:
    assert out[:1] == b"E", out[:40]
    return m.decode_error_response(out[5:])


def _patients_fields(*names: str) -> m.RowDescription:
    attnums = {"id": (1, 23), "tenant_id": (2, 25), "ssn": (3, 17), "name": (4, 17)}
    return m.RowDescription(
        tuple(
            m.FieldDescription(n, PATIENTS_OID, attnums[n][0], attnums[n][1], -1, -1, 0)
            for n in names
        )
    )


# --- the caches must not carry one Bind's row tenant into another --------------------------


@pytest.mark.parametrize(
    ("sql", "fields"),
    [
        # outputs exact: openers made at Bind, the client's Describe P answered from the cache
        ("SELECT name FROM patients WHERE tenant_id = $1", ("name",)),
        # SELECT *: the proxy's own (swallowed) Describe P answered from the cache; the row
        # tenant is the result's tenant_id column
        ("SELECT * FROM patients WHERE tenant_id = $1", ("id", "tenant_id", "ssn", "name")),
    ],
)
def test_cached_portal_description_takes_the_row_tenant_of_each_bind(  # type: ignore[no-untyped-def]
    policies, sql: str, fields: tuple[str, ...]
) -> None:
    """The same Parse, bound twice with another pinned tenant: the second portal's rows are
    checked against the second Bind's row tenant, not the first one's (cached) openers."""
    dp, ring = make(policies, tenant="acme")
    dp.table_oids = {PATIENTS_OID: ("public", "patients")}
    name = ring.keys[1].seal("public.patients.name", b"\x01Alice", deterministic=False)
    rd = _patients_fields(*fields).encode()
    for tenant, opened in ((b"acme", True), (b"globex", False)):
        # PostgreSQL returns rows of the pinned tenant; the acme cell was copied into one.
        row = {"id": b"1", "tenant_id": tenant, "ssn": None, "name": _hex(name)}
        data_row = m.DataRow(tuple(row[f] for f in fields)).encode()
        client(dp, m.Parse("", sql))
        client(dp, m.Bind("", "", (), (tenant,), ()))
        client(dp, m.Describe("P", ""))
        client(dp, m.Execute(""))
        dp.client_frame(frame_of(m.SYNC))
        server(dp, PARSE_COMPLETE)
        server(dp, BIND_COMPLETE)
        if "*" in sql:
            assert server(dp, rd) == b""  # the proxy's own Describe
        assert server(dp, rd)[:1] == b"T"
        out = server(dp, data_row)
        if opened:
            assert b"Alice" in out
        else:
            # An acme cell in a result pinned to globex rows: copied there, never opened.
            assert b"Alice" not in out
            assert _error_of(out).sqlstate == "42501"
        server(dp, m.CommandComplete("SELECT 1").encode())
        server(dp, READY)
        assert not dp.pending


def test_openers_cached_per_result_formats_follow_the_format_asked(policies) -> None:  # type: ignore[no-untyped-def]
    """One statement bound with text, then binary, then text results: each gets its own."""
    dp, ring = make(policies, tenant="acme")
    cell = ring.keys[1].seal("public.patients.name", b"\x01Alice", deterministic=False)
    client(dp, m.Parse("s", "SELECT name FROM patients WHERE id = $1"))
    dp.client_frame(frame_of(m.SYNC))
    server(dp, PARSE_COMPLETE)
    server(dp, READY)
    for fmt, sent in (((0,), _hex(cell)), ((1,), cell), ((0,), _hex(cell))):
        client(dp, m.Bind("", "s", (), (b"1",), fmt))
        client(dp, m.Execute(""))
        dp.client_frame(frame_of(m.SYNC))
        server(dp, BIND_COMPLETE)
        row = m.DataRow((sent, b"acme"))  # and the row tenant column the proxy added
        assert m.decode_data_row(server(dp, row.encode())[5:]).values == (b"Alice",)
        server(dp, m.CommandComplete("SELECT 1").encode())
        server(dp, READY)
    assert not dp.pending


def test_a_reparse_of_an_existing_named_statement_is_still_refused(policies) -> None:  # type: ignore[no-untyped-def]
    """The Parse cache must not let a second Parse of the same bytes replace the record of a
    statement PostgreSQL keeps (it answers 42P05 and keeps the first one)."""
    dp, _ = make(policies)
    parse = m.Parse("s", "INSERT INTO patients (tenant_id, ssn) VALUES ($1, $2)")
    client(dp, parse)
    dp.client_frame(frame_of(m.SYNC))
    server(dp, PARSE_COMPLETE)
    server(dp, READY)
    first = dp.statements["s"]
    out = client(dp, parse)
    assert b"pgseal_refused_statement" in out
    dp.client_frame(frame_of(m.SYNC))
    ours = _error_of(server(dp, m.ErrorResponse.make("42601", "syntax error").encode()))
    assert ours.sqlstate == "42P05"
    server(dp, READY)
    assert dp.statements["s"] is first


# --- findings ------------------------------------------------------------------------------


def test_large_parse_messages_are_not_pinned_by_the_compiled_cache(policies) -> None:  # type: ignore[no-untyped-def]
    """Parse messages over 16 KiB are not remembered (bulk INSERTs with inline values are
    never sent twice; JDBC-style clients send every statement as an unnamed Parse): the
    cache must not pin megabytes, nor the plaintext constants in them, once the statement
    is gone."""
    dp, _ = make(policies)
    big = "x" * (256 * 1024)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(24):
            client(dp, m.Parse("", f"INSERT INTO unprotected (note) VALUES ('{i}{big}')"))
            server(dp, PARSE_COMPLETE)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # The unnamed statement alive now (its text, its Parse) is all that must stay.
    assert held < 8 * len(big), f"{held / 2**20:.1f} MiB held after 24 replaced statements"


def test_parse_messages_with_sealed_constants_are_not_remembered(policies) -> None:  # type: ignore[no-untyped-def]
    """Client-side binding puts values in the Parse text: such a Parse is not remembered
    once its statement is gone (its plaintexts live as long as the statement); a Parse
    with only parameters is."""
    dp, _ = make(policies)
    client(dp, m.Parse("", "INSERT INTO patients (tenant_id, ssn) VALUES ('acme', '123-45-6789')"))
    server(dp, PARSE_COMPLETE)
    assert not any(b"123-45-6789" in body for body in dp._compiled)
    client(dp, m.Parse("", "INSERT INTO patients (tenant_id, ssn) VALUES ($1, $2)"))
    server(dp, PARSE_COMPLETE)
    assert len(dp._compiled) == 1


def test_parses_with_sealed_constants_are_not_kept_after_the_connection(policies) -> None:  # type: ignore[no-untyped-def]
    """Client-side binding through the extended protocol: nothing (the Parse cache, the
    parameter scan, the analysis cache) keeps the texts once the connection is gone."""
    big = "4111 1111 1111 1111 " * (256 * 1024 // 20)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        dp, _ = make(policies)
        for i in range(24):
            client(
                dp,
                m.Parse("", f"INSERT INTO patients (tenant_id, ssn) VALUES ('acme', '{i}{big}')"),
            )
            server(dp, PARSE_COMPLETE)
            out = client(dp, m.Bind("", "", (), (), ()))
            assert big.encode() not in out  # the constant goes up as a sealed parameter
            server(dp, BIND_COMPLETE)
            dp.take_audit()
        client(dp, m.Parse("", "SELECT 1"))
        server(dp, PARSE_COMPLETE)
        del dp, out
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 4 * len(big), f"{held / 2**20:.1f} MiB held after the connection"


def test_a_denied_cell_names_its_statement_and_costs_one_fingerprint_per_result(  # type: ignore[no-untyped-def]
    policies, monkeypatch
) -> None:
    """A cell answered with NULL (on_denied: null, key destroyed) is audited with the
    prepared statement's fingerprint, worked out once for the whole result, not per row."""
    from proxy.session import datapath

    dp, ring = make(policies)
    shredded = CellKey(9, "acme", bytes([9]) * 32)
    ring.gone[9] = "acme"
    cell = shredded.seal("public.payments.card_number", b"\x014111", deterministic=True)
    calls: list[str] = []
    real = datapath.fingerprint
    if not COMPILED:  # compiled, datapath calls fingerprint directly: the pure build counts
        monkeypatch.setattr(datapath, "fingerprint", lambda sql: calls.append(sql) or real(sql))
    sql = "SELECT id, card_number FROM payments WHERE amount IS NOT NULL AND id > $1"
    client(dp, m.Parse("", sql))
    client(dp, m.Bind("", "", (), (b"0",), ()))
    client(dp, m.Execute(""))
    dp.client_frame(frame_of(m.SYNC))
    server(dp, PARSE_COMPLETE)
    server(dp, BIND_COMPLETE)
    for i in range(3):
        row = m.DataRow((str(i).encode(), _hex(cell)))
        assert m.decode_data_row(server(dp, row.encode())[5:]).values == (str(i).encode(), None)
    server(dp, m.CommandComplete("SELECT 3").encode())
    notes = dp.take_audit()
    assert [n.event for n in notes] == ["data.deny"] * 3
    assert {n.statement for n in notes} == {real(sql)}
    assert calls == ([] if COMPILED else [sql])


def test_simple_queries_with_sealed_constants_are_not_kept_after_they_are_done(policies) -> None:  # type: ignore[no-untyped-def]
    """The audit fingerprint of a statement is not memoized by its text: a memo of 4,096
    texts of any size kept large Query texts, and the plaintext constants sealed out of
    them, alive long after (gigabytes, with large enough statements). What stays is the
    last statement's (the SQL tokenizer's last input), whatever the count."""
    dp, _ = make(policies)
    big = "4111 1111 1111 1111 " * (256 * 1024 // 20)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(24):
            sql = f"INSERT INTO patients (tenant_id, ssn) VALUES ('acme', '{i}{big}')"
            out = client(dp, m.Query(sql))
            assert big.encode() not in out  # sealed, not forwarded
            server(dp, m.CommandComplete("INSERT 0 1").encode())
            server(dp, READY)
            notes = dp.take_audit()
            assert [n.event for n in notes] == ["data.encrypt"]
            assert all(big not in n.statement for n in notes)
            del sql, out, notes
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 4 * len(big), f"{held / 2**20:.1f} MiB held after 24 finished queries"


def test_a_denied_cell_is_refused_before_another_cells_key_is_fetched(policies) -> None:  # type: ignore[no-untyped-def]
    """A row with a cell of another tenant (on_denied: error) is refused at once (42501,
    data.deny audited), before the key of a later cell (a third tenant's, not in memory) is
    fetched: the key service must not unwrap keys for a reader about to be refused, and a
    failed fetch must not turn the refusal into a 58030 without a data.deny record."""
    dp, ring = make(policies, tenant="acme")
    other = CellKey(3, "initech", b"\3" * 32)  # not in the ring
    name = ring.keys[2].seal("public.patients.name", b"\x01Bob", deterministic=False)
    ssn = other.seal("public.patients.ssn", b"\x01999", deterministic=True)
    client(dp, m.Query("SELECT name, ssn FROM patients"))
    server(
        dp,
        m.RowDescription(
            (
                m.FieldDescription("name", 0, 0, 17, -1, -1, 0),
                m.FieldDescription("ssn", 0, 0, 17, -1, -1, 0),
                m.FieldDescription("tenant_id", 0, 0, 25, -1, -1, 0),
            )
        ).encode(),
    )
    try:
        out = server(dp, m.DataRow((_hex(name), _hex(ssn), b"globex")).encode())
    except NeedKeys as need:
        pytest.fail(f"asked to fetch {sorted(need.key_ids)} for a row it must refuse")
    assert _error_of(out).sqlstate == "42501"
    assert [n.event for n in dp.take_audit()] == ["data.deny"]


class _UpSink:
    name = "up"

    async def open(self) -> ChainHead:
        return ChainHead()

    async def write(self, batch: Batch) -> None:
        return None

    async def close(self) -> None:
        return None


class _DownSink(_UpSink):
    """A jsonl sink on a full disk: chains the batch (CPU, GIL), then the write fails."""

    name = "down"

    def __init__(self) -> None:
        self.handed = 0

    async def write(self, batch: Batch) -> None:
        self.handed += len(batch)
        chain(batch, ChainHead())
        raise SinkError("audit sink down: No space left on device")


@pytest.mark.asyncio
async def test_a_sink_that_stays_down_is_not_handed_its_whole_backlog_every_batch() -> None:
    """A sink that stays down (on_failure warn: traffic goes on) is not handed its whole
    backlog with every 20 ms batch (O(n^2) chaining, up to MAX_BACKLOG records each time, on
    the writer thread that competes with the event loop): it is retried after a wait."""
    down = _DownSink()
    trail = AuditTrail([_UpSink(), down], on_failure="warn")
    await trail.start()
    for _ in range(100):  # 100 group commits of 10 key uses each
        await trail.record(
            *(AuditRecord("data.decrypt", tenant="acme", key_id=1, count=1) for _ in range(10)),
            kept=True,
        )
    assert trail.backlog >= 1000  # nothing lost: good
    assert down.handed <= 10 * 1000, f"{down.handed} records handed for 1000 new ones"


def test_a_bind_with_a_wrong_number_of_result_formats_is_refused_like_postgresql(policies) -> None:  # type: ignore[no-untyped-def]
    """PostgreSQL answers it with 08P01; the proxy used to fail with an internal error."""
    dp, _ = make(policies)
    client(dp, m.Parse("", "SELECT ssn, name, dob FROM patients WHERE id = $1"))
    out = client(dp, m.Bind("", "", (), (b"1",), (0, 1)))
    assert b"pgseal.refused" in out
    server(dp, PARSE_COMPLETE)
    error = m.ErrorResponse.make("26000", 'prepared statement "pgseal.refused" does not exist')
    ours = _error_of(server(dp, error.encode()))
    assert ours.sqlstate == "08P01" and "2 result formats but query has 3 columns" in (
        ours.message or ""
    )

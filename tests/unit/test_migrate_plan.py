"""proxy.migrate.plan: names, SQL shape, checks and pacing (pure, no database)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from proxy.migrate.plan import (
    MAX_IDENT_BYTES,
    ColumnMigration,
    KeyColumn,
    ObjectNames,
    PlanError,
    RekeySql,
    TableShape,
    Throttle,
    checked_sql_type,
    key_id_bytes,
    live_type_problem,
    page_range,
    pages_per_batch,
    parse_column_spec,
    quote_ident,
    render_progress,
)

PK = TableShape("public", "people", (KeyColumn("id", "bigint"),))
COMPOSITE = TableShape("crm", "Contacts",
                       (KeyColumn("TenantId", "text"), KeyColumn("Id", "integer")))
NO_KEY = TableShape("public", "heap")


def test_plan_module_is_pure() -> None:
    source = (Path(__file__).parents[2] / "proxy" / "migrate" / "plan.py").read_text()
    imported = {
        (node.module or "") if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    forbidden = {"asyncio", "asyncpg", "psycopg", "socket", "ssl", "subprocess", "pkcs11",
                 "aiocache", "uvloop"}
    assert not {m.split(".")[0] for m in imported} & forbidden
    assert not [m for m in imported if m.startswith(("proxy.keys", "proxy.audit", "proxy.server"))]


@pytest.mark.parametrize(("text", "parts"), [
    ("public.people.ssn", ("public", "people", "ssn")),
    ("crm.Contacts.PhoneNumber", ("crm", "Contacts", "PhoneNumber")),
    ('"my.schema"."t""x".c', ("my.schema", 't"x', "c")),
])
def test_parse_column_spec(text: str, parts: tuple[str, str, str]) -> None:
    assert parse_column_spec(text) == parts


@pytest.mark.parametrize("text", ["people.ssn", "a.b.c.d", "a..c", '"a.b.c', '"a"x.b.c', ""])
def test_parse_column_spec_refuses(text: str) -> None:
    with pytest.raises(PlanError):
        parse_column_spec(text)


def test_quote_ident() -> None:
    assert quote_ident('we"ird') == '"we""ird"'
    with pytest.raises(PlanError):
        quote_ident("")


def test_names_fit_and_differ() -> None:
    long = "x" * 80
    names = ObjectNames.of("public", "t", long, "encrypt")
    for name in (names.shadow, names.function, names.trigger, names.index, names.guard,
                 names.not_null):
        assert len(name.encode()) <= MAX_IDENT_BYTES
    # two long columns that share a prefix still get distinct objects
    other = ObjectNames.of("public", "t", long + "y", "encrypt")
    assert names.shadow != other.shadow and names.index != other.index
    assert names.shadow != ObjectNames.of("public", "t", long, "decrypt").shadow
    # multi-byte names are cut on a character boundary
    assert ObjectNames.of("public", "t", "é" * 60, "encrypt").shadow.encode().decode()


def test_live_types() -> None:
    assert live_type_problem("text", "character varying(20)") is None
    assert live_type_problem("int8", "integer") is None
    assert live_type_problem("numeric", "numeric(12,2)") is None
    assert live_type_problem("timestamptz", "timestamp(3) with time zone") is None
    assert live_type_problem("int4", "bigint") is not None  # narrowing could fail per value
    assert "array" in (live_type_problem("text", "text[]") or "")
    assert live_type_problem("text", "bytea") is not None


@pytest.mark.parametrize("ok", ["text", "character varying(32)", "numeric(12, 2)",
                                "timestamp with time zone", "time(3) without time zone"])
def test_checked_sql_type_accepts(ok: str) -> None:
    assert checked_sql_type(ok)


@pytest.mark.parametrize("bad", ["text; DROP TABLE x", "int)", "text -- x", "a'b", ""])
def test_checked_sql_type_refuses(bad: str) -> None:
    with pytest.raises(PlanError):
        checked_sql_type(bad)


def test_keyset_sql_orders_by_the_key_not_its_text_alias() -> None:
    # ORDER BY id would mean the output column `id::text AS id` (text order): we alias k0.
    plan = ColumnMigration("encrypt", PK, "ssn", "bytea", "tenant_id")
    sql = plan.select_keyset(after=True)
    assert 'ORDER BY t."id" LIMIT $2 FOR UPDATE OF t SKIP LOCKED' in sql
    assert '(t."id") > ($1::text::bigint)' in sql
    assert "format('%s', t.\"ssn\")" in sql and 't."tenant_id"::text AS tenant' in sql
    update = plan.update_shadow()
    assert "unnest($1::text[], $2::bytea[])" in update and '(t."id") = (v.k0::bigint)' in update


def test_composite_key_and_ctid() -> None:
    plan = ColumnMigration("decrypt", COMPOSITE, "PhoneNumber", "character varying")
    sql = plan.select_keyset(after=True)
    assert '(t."TenantId", t."Id") > ($1::text::text, $2::text::integer)' in sql
    assert "LIMIT $3" in sql
    assert "v.val::character varying" in plan.update_shadow()
    heap = ColumnMigration("encrypt", NO_KEY, "c", "bytea")
    assert "t.ctid >= $1::text::tid" in heap.select_pages()
    assert "t.ctid = ANY($1::text[]::tid[])" in heap.update_shadow()
    assert page_range(10, 5) == ("(10,0)", "(15,0)")
    assert pages_per_batch(1000, 100.0) == 10 and pages_per_batch(10, 100.0) == 1
    assert pages_per_batch(10, 0.0) == 1


def test_trigger_invalidates_on_value_or_tenant_change() -> None:
    plan = ColumnMigration("encrypt", PK, "ssn", "bytea", "tenant_id")
    body = plan.function_sql()
    assert "TG_OP = 'INSERT'" in body
    assert 'NEW."ssn"::text IS DISTINCT FROM OLD."ssn"::text' in body
    assert 'NEW."tenant_id"::text IS DISTINCT FROM OLD."tenant_id"::text' in body
    assert f'NEW."{plan.names.shadow}" := NULL' in body
    with pytest.raises(PlanError):
        ColumnMigration("encrypt", PK, "a$b", "bytea")


def test_swap_adds_the_cell_guard_and_keeps_not_null() -> None:
    plan = ColumnMigration("encrypt", PK, "ssn", "bytea", "tenant_id")
    swap = " ; ".join(plan.swap_sql(not_null=True))
    assert 'DROP COLUMN "ssn"' in swap and f'RENAME COLUMN "{plan.names.shadow}" TO "ssn"' in swap
    assert "NOT VALID" in swap and plan.names.guard in swap and plan.names.not_null in swap
    steps = [sql for sql, _ in plan.post_swap_steps(not_null=True)]
    assert any("SET NOT NULL" in s for s in steps) and steps[-1].startswith("ANALYZE")
    decrypt = ColumnMigration("decrypt", PK, "ssn", "text")
    assert plan.names.guard not in " ".join(decrypt.swap_sql(not_null=False))


def test_rekey_sql() -> None:
    sql = RekeySql(PK, "ssn")
    assert 'substring(t."ssn" from 3 for 4) = ANY($1::bytea[])' in sql.select_keyset(after=False)
    assert "LIMIT $3" in sql.select_keyset(after=True)
    assert 'AND t."ssn" = v.old RETURNING 1' in sql.update_cells()
    assert key_id_bytes(7) == b"\x00\x00\x00\x07"


def test_throttle() -> None:
    free = Throttle()
    assert free.delay(10**6, 0.001) == 0 and free.batch_size(500) == 500
    slow = Throttle(100)
    assert slow.batch_size(1000) == 100
    assert slow.delay(200, 1.0) == pytest.approx(1.0)
    assert slow.delay(50, 1.0) == 0
    with pytest.raises(PlanError):
        Throttle(0)


def test_render_progress() -> None:
    line = render_progress("encrypt t", 500, 1000, 2.0, bar=True, width=10)
    assert "[#####.....]" in line and "500/1,000 rows (50%)" in line and "eta 0:00:02" in line
    plain = render_progress("encrypt t", 1200, 1000, 2.0, bar=False)
    assert plain.startswith("encrypt t: 1,200/1,200 rows (100%)") and "[" not in plain

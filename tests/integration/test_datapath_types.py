"""Every declared type of DESIGN.md 5 through the proxy, compared with PostgreSQL itself.

`typed_cells` has one encrypted column per type; `typed_plain` is its mirror with
the real types. Every write path (psycopg text parameters, psql literals, asyncpg
binary, psycopg binary and text Python objects) writes the same rows into both
tables: `typed_cells` through the proxy, `typed_plain` directly. Then every read
path reads both and must see the same thing: the same RowDescription types and
the same field bytes (psycopg, text and binary), and the same Python values or
the same load error (asyncpg, psycopg), whatever the driver makes of them.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg import pq
from psycopg.adapt import Loader
from psycopg.types.json import Json, Jsonb

from proxy.crypto.values import TYPE_INFO

pytestmark = pytest.mark.integration

TYPES = [
    "text",
    "varchar",
    "int2",
    "int4",
    "int8",
    "float4",
    "float8",
    "numeric",
    "bool",
    "date",
    "time",
    "timestamp",
    "timestamptz",
    "uuid",
    "json",
    "jsonb",
    "bytea",
]
COLUMNS = [f"c_{t}" for t in TYPES]

# PostgreSQL text input per type: NULL, empty, unicode, extremes, infinities, BC, NaN, -0.
VALUES: dict[str, list[str | None]] = {
    "text": [
        "",
        "plain",
        "ünïcødé ✓ 𝄞 日本語 🎉",
        "line\nbreak\ttab 'quote' \\ \"dq\"",
        "x" * 5000,
        None,
    ],
    "varchar": ["", "héllo wörld", "ü" * 300, None],
    "int2": ["0", "-32768", "32767", "-1", None],
    "int4": ["0", "-2147483648", "2147483647", "42", None],
    "int8": ["0", "-9223372036854775808", "9223372036854775807", "-1", None],
    "float4": [
        "0",
        "-0",
        "3.4028235e38",
        "1.4e-45",
        "-1.17549435e-38",
        "NaN",
        "Infinity",
        "-Infinity",
        "0.1",
        None,
    ],
    "float8": [
        "0",
        "-0",
        "1.7976931348623157e308",
        "5e-324",
        "-2.2250738585072014e-308",
        "NaN",
        "Infinity",
        "-Infinity",
        "0.30000000000000004",
        None,
    ],
    "numeric": [
        "0",
        "-0.00",
        "12.500",
        "NaN",
        "Infinity",
        "-Infinity",
        "9" * 200 + ".5",
        "-0." + "0" * 60 + "1",
        "1e100",
        "123456789012345678901234567890.123456789",
        None,
    ],
    "bool": ["true", "false", None],
    "date": [
        "2000-01-01",
        "1999-12-31",
        "infinity",
        "-infinity",
        "0044-03-15 BC",
        "4714-11-24 BC",
        "5874897-12-31",
        "0001-01-01",
        None,
    ],
    "time": ["00:00:00", "23:59:59.999999", "24:00:00", "12:34:56.789", None],
    "timestamp": [
        "2000-01-01 00:00:00",
        "infinity",
        "-infinity",
        "4714-11-24 00:00:00 BC",
        "294276-12-31 23:59:59.999999",
        "1970-01-01 00:00:00.000001",
        "0044-03-15 12:00:00 BC",
        None,
    ],
    "timestamptz": [
        "2000-01-01 00:00:00+00",
        "infinity",
        "-infinity",
        "2024-03-10 02:30:00-05",
        "1910-06-01 12:00:00+00",
        "4714-11-24 00:00:00+00 BC",
        "294276-12-31 23:59:59+00",
        "2024-03-01 12:00:00.123456+05:30",
        None,
    ],
    "uuid": [
        "00000000-0000-0000-0000-000000000000",
        "ffffffff-ffff-ffff-ffff-ffffffffffff",
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        None,
    ],
    "json": [
        "{}",
        "[]",
        "null",
        '"ünï \\u00e9"',
        '{"b": 1,  "a": [1, 2.50, {"x": null}]}',
        "12345678901234567890",
        None,
    ],
    "jsonb": [
        "{}",
        "[]",
        "null",
        '"ünï \\u00e9"',
        '{"b": 1,  "a": [1, 2.50, {"x": null}]}',
        "12345678901234567890.0",
        None,
    ],
    "bytea": ["\\x", "\\x00ff", "\\x" + bytes(range(256)).hex(), "plain ascii", None],
}
ROWS = max(len(v) for v in VALUES.values())


def row_texts(i: int) -> list[str | None]:
    """Row i of the value table: one value per column, NULL once a type runs out."""
    return [VALUES[t][i] if i < len(VALUES[t]) else None for t in TYPES]


_INSERT = (
    "INSERT INTO {table} (id, tenant_id, "
    + ", ".join(COLUMNS)
    + ") VALUES ("
    + ", ".join(["%s"] * (len(COLUMNS) + 2))
    + ")"
)
_INSERT_PG = (
    "INSERT INTO {table} (id, tenant_id, "
    + ", ".join(COLUMNS)
    + ") VALUES ("
    + ", ".join(f"${i}" for i in range(1, len(COLUMNS) + 3))
    + ")"
)


# --- raw field bytes, as the driver received them ----------------------------------------


class RawText(Loader):
    format = pq.Format.TEXT

    def load(self, data: Any) -> Any:
        return ("raw", bytes(data))


class RawBinary(Loader):
    format = pq.Format.BINARY

    def load(self, data: Any) -> Any:
        return ("raw", bytes(data))


def raw_cursor(conn: psycopg.Connection[Any], binary: bool) -> psycopg.Cursor[Any]:
    cur = conn.cursor(binary=binary)
    for info in TYPE_INFO.values():
        cur.adapters.register_loader(info.oid, RawBinary if binary else RawText)
    return cur


# --- the fixture: one tenant per module, both connections --------------------------------


@dataclass
class Typed:
    tenant: str
    proxy_dsn: str
    pg_dsn: str
    pg: Any
    proxy: psycopg.Connection[Any]
    plain: psycopg.Connection[Any]
    next_id: int = 1

    def ids(self, n: int) -> list[int]:
        first = self.next_id
        self.next_id += n
        return list(range(first, first + n))

    def select(self, table: str, columns: Sequence[str] = COLUMNS, star: bool = False) -> str:
        cols = "*" if star else ", ".join(columns)
        return f"SELECT {cols} FROM {table} WHERE tenant_id = %s ORDER BY id"


@pytest.fixture(scope="module")
def typed(sealing_proxy: Any, pg: Any) -> Iterator[Typed]:
    tenant = f"types-{uuid.uuid4().hex[:8]}"
    with (
        psycopg.connect(sealing_proxy.dsn(), autocommit=True) as proxy_conn,
        psycopg.connect(pg.superuser_dsn, autocommit=True) as plain_conn,
    ):
        proxy_conn.execute(f"SET pgseal.tenant = '{tenant}'")
        yield Typed(tenant, sealing_proxy.dsn(), pg.superuser_dsn, pg, proxy_conn, plain_conn)


def _write_text(typed: Typed) -> None:
    """psycopg, text parameters of unknown type: PostgreSQL's own input syntax."""
    for i, rid in enumerate(typed.ids(ROWS)):
        params = [rid, typed.tenant, *row_texts(i)]
        typed.plain.execute(_INSERT.format(table="typed_plain"), params)
        typed.proxy.execute(_INSERT.format(table="typed_cells"), params)


def _literal(value: str | None) -> str:
    return "NULL" if value is None else "'" + value.replace("'", "''") + "'"


def _write_literals(typed: Typed) -> None:
    """Simple protocol (psql): the values as literals in the statement text, with casts."""
    statements_cells, statements_plain = [], []
    for i, rid in enumerate(typed.ids(ROWS)):
        values = ", ".join(
            f"{_literal(v)}::{t}" if i % 2 and v is not None else _literal(v)
            for t, v in zip(TYPES, row_texts(i), strict=True)
        )
        for table, out in (("typed_cells", statements_cells), ("typed_plain", statements_plain)):
            out.append(
                f"INSERT INTO {table} (id, tenant_id, {', '.join(COLUMNS)}) "
                f"VALUES ({rid}, '{typed.tenant}', {values});"
            )
    typed.pg.execute("\n".join(statements_plain))
    script = f"SET pgseal.tenant = '{typed.tenant}';\n" + "\n".join(statements_cells)
    out = subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", typed.proxy_dsn, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr


def _loaded_columns(rows: list[list[tuple[str, Any]]]) -> list[list[Any]]:
    """Per row, the loadable values (an unloadable one becomes NULL)."""
    return [[v if kind == "ok" else None for kind, v in row] for row in rows]


def _psycopg_cells(
    conn: psycopg.Connection[Any], table: str, tenant: str, binary: bool, max_id: int | None = None
) -> list[list[tuple[str, Any]]]:
    """Every cell as ('ok', value) or ('error', exception class): column by column, so
    one value the driver cannot load does not hide the others."""
    where = "" if max_id is None else f" AND id <= {max_id}"
    by_column: list[list[tuple[str, Any]]] = []
    for column in COLUMNS:
        cur = conn.cursor(binary=binary)
        cur.execute(
            f"SELECT {column} FROM {table} WHERE tenant_id = %s{where} ORDER BY id", [tenant]
        )
        cells: list[tuple[str, Any]] = []
        for _ in range(cur.rowcount):
            try:
                row = cur.fetchone()
            except psycopg.DataError as exc:
                cells.append(("error", type(exc).__name__))
                cur.scroll(1)
                continue
            assert row is not None
            cells.append(("ok", row[0]))
        by_column.append(cells)
    return [list(r) for r in zip(*by_column, strict=True)]


_ASYNCPG_LOAD_ERRORS = (ValueError, OverflowError, ArithmeticError)


async def _asyncpg_cells(
    conn: Any, table: str, tenant: str, max_id: int | None = None
) -> list[list[tuple[str, Any]]]:
    where = "" if max_id is None else f" AND id <= {max_id}"
    ids = [
        r[0]
        for r in await conn.fetch(
            f"SELECT id FROM {table} WHERE tenant_id = $1{where} ORDER BY id", tenant
        )
    ]
    by_column: list[list[tuple[str, Any]]] = []
    for column in COLUMNS:
        try:
            values = [
                r[0]
                for r in await conn.fetch(
                    f"SELECT {column} FROM {table} WHERE tenant_id = $1{where} ORDER BY id", tenant
                )
            ]
            by_column.append([("ok", v) for v in values])
            continue
        except _ASYNCPG_LOAD_ERRORS:
            pass
        cells: list[tuple[str, Any]] = []
        for rid in ids:  # one value asyncpg cannot load: find out which, row by row
            try:
                value = await conn.fetchval(
                    f"SELECT {column} FROM {table} WHERE tenant_id = $1 AND id = $2", tenant, rid
                )
            except _ASYNCPG_LOAD_ERRORS as exc:
                cells.append(("error", type(exc).__name__))
            else:
                cells.append(("ok", value))
        by_column.append(cells)
    return [list(r) for r in zip(*by_column, strict=True)]


def _same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN and -0.0 different from 0.0 (repr tells them apart)."""
    return type(a) is type(b) and repr(a) == repr(b)


def _assert_rows_equal(cells: list[list[Any]], plain: list[list[Any]], what: str) -> None:
    assert len(cells) == len(plain), what
    for r, (got, want) in enumerate(zip(cells, plain, strict=True)):
        for c, (g, w) in enumerate(zip(got, want, strict=True)):
            assert _same(g, w), (
                f"{what}: row {r} column {COLUMNS[c] if c < len(COLUMNS) else c}: {g!r} != {w!r}"
            )


# --- writes ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def written(typed: Typed) -> Typed:
    """Rows from every write path, in both tables."""
    _write_text(typed)
    _write_literals(typed)
    return typed


def _write_objects(typed: Typed, binary: bool) -> None:
    """psycopg Python objects (as the driver loads them from the plain rows), text or binary."""
    rows = _loaded_columns(_psycopg_cells(typed.plain, "typed_plain", typed.tenant, binary, ROWS))
    for row, rid in zip(rows, typed.ids(len(rows)), strict=True):
        params: list[Any] = [rid, typed.tenant]
        for t, v in zip(TYPES, row, strict=True):
            if v is not None and t == "json":
                v = Json(v)
            elif v is not None and t == "jsonb":
                v = Jsonb(v)
            params.append(v)
        typed.plain.cursor(binary=binary).execute(_INSERT.format(table="typed_plain"), params)
        typed.proxy.cursor(binary=binary).execute(_INSERT.format(table="typed_cells"), params)


@pytest.fixture(scope="module")
def written_all(written: Typed) -> Typed:
    _write_objects(written, binary=False)
    _write_objects(written, binary=True)
    return written


# --- reads -------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
@pytest.mark.parametrize("star", [False, True], ids=["columns", "star"])
def test_psycopg_field_bytes_equal_postgres(written_all: Typed, binary: bool, star: bool) -> None:
    t = written_all
    got = raw_cursor(t.proxy, binary)
    got.execute(t.select("typed_cells", star=star), [t.tenant])
    want = raw_cursor(t.plain, binary)
    want.execute(t.select("typed_plain", star=star), [t.tenant])
    assert got.description is not None and want.description is not None
    assert [(d.name, d.type_code) for d in got.description] == [
        (d.name, d.type_code) for d in want.description
    ]
    got_rows, want_rows = got.fetchall(), want.fetchall()
    assert len(got_rows) == len(want_rows) >= 4 * ROWS
    for r, (g, w) in enumerate(zip(got_rows, want_rows, strict=True)):
        diff = [(i, a, b) for i, (a, b) in enumerate(zip(g, w, strict=True)) if a != b]
        assert g == w, f"row {r}: {diff[:3]}"


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_psycopg_values_equal_postgres(written_all: Typed, binary: bool) -> None:
    t = written_all
    got = _psycopg_cells(t.proxy, "typed_cells", t.tenant, binary)
    want = _psycopg_cells(t.plain, "typed_plain", t.tenant, binary)
    _assert_rows_equal(got, want, f"psycopg {'binary' if binary else 'text'}")
    assert any(kind == "error" for row in want for kind, _ in row)  # the extremes are there


@pytest.mark.asyncio
async def test_asyncpg_binary_round_trip_equals_postgres(written_all: Typed) -> None:
    import asyncpg

    t = written_all
    proxy = await asyncpg.connect(t.proxy_dsn, server_settings={"pgseal.tenant": t.tenant})
    plain = await asyncpg.connect(t.pg_dsn)
    try:
        # Write: asyncpg's own objects for the first rows (binary parameters).
        first = await _asyncpg_cells(plain, "typed_plain", t.tenant, ROWS)
        rows = _loaded_columns(first)
        ids = t.ids(len(rows))
        for table, conn in (("typed_plain", plain), ("typed_cells", proxy)):
            await conn.executemany(
                _INSERT_PG.format(table=table),
                [(rid, t.tenant, *row) for rid, row in zip(ids, rows, strict=True)],
            )
        # Read everything back, every way it was written.
        got = await _asyncpg_cells(proxy, "typed_cells", t.tenant)
        want = await _asyncpg_cells(plain, "typed_plain", t.tenant)
        _assert_rows_equal(got, want, "asyncpg")
        assert any(kind == "error" for row in want for kind, _ in row)  # BC dates
        assert len(got) == 5 * ROWS
        # Whole rows at once too, and a prepared statement reused.
        stmt = await proxy.prepare(
            f"SELECT {', '.join(COLUMNS)} FROM typed_cells "
            "WHERE tenant_id = $1 AND id = ANY($2::int[]) ORDER BY id"
        )
        plain_stmt = await plain.prepare(
            f"SELECT {', '.join(COLUMNS)} FROM typed_plain "
            "WHERE tenant_id = $1 AND id = ANY($2::int[]) ORDER BY id"
        )
        assert [a.type.oid for a in stmt.get_attributes()] == [
            a.type.oid for a in plain_stmt.get_attributes()
        ]
        got_rows = [tuple(r) for r in await stmt.fetch(t.tenant, ids)]
        want_rows = [tuple(r) for r in await plain_stmt.fetch(t.tenant, ids)]
        _assert_rows_equal(
            [list(r) for r in got_rows], [list(r) for r in want_rows], "asyncpg rows"
        )
    finally:
        await proxy.close()
        await plain.close()


def test_stored_values_are_cells_and_nulls_stay_null(written_all: Typed) -> None:
    t = written_all
    cells = t.plain.execute(
        f"SELECT {', '.join(COLUMNS)} FROM typed_cells WHERE tenant_id = %s ORDER BY id", [t.tenant]
    ).fetchall()
    plain = (
        raw_cursor(t.plain, binary=False)
        .execute(
            f"SELECT {', '.join(COLUMNS)} FROM typed_plain WHERE tenant_id = %s ORDER BY id",
            [t.tenant],
        )
        .fetchall()
    )
    assert len(cells) == len(plain)
    for cell_row, plain_row in zip(cells, plain, strict=True):
        for cell, value in zip(cell_row, plain_row, strict=True):
            assert (cell is None) == (value is None)
            if cell is not None:
                assert bytes(cell)[:2] == b"\x01\x01"  # version 1, randomized suite


# --- time zones --------------------------------------------------------------------------

ZONES = ["UTC", "America/New_York", "Asia/Kolkata", "Europe/Amsterdam", "Australia/Lord_Howe"]
# Without an offset: read in the session's zone (DST gaps and overlaps, local mean time).
ZONED = [
    "2024-03-10 02:30:00",
    "2024-11-03 01:30:00",
    "1910-06-01 12:00:00",
    "1900-01-01 00:00:00",
    "2024-10-06 02:15:00",
    "2024-06-30 23:59:59.999999",
    "infinity",
]


def test_timestamptz_under_session_time_zones(sealing_proxy: Any, pg: Any) -> None:
    tenant = f"tz-{uuid.uuid4().hex[:8]}"
    columns = ["c_timestamptz", "c_timestamp", "c_date", "c_time"]
    with (
        psycopg.connect(sealing_proxy.dsn(), autocommit=True) as proxy,
        psycopg.connect(pg.superuser_dsn, autocommit=True) as plain,
    ):
        proxy.execute(f"SET pgseal.tenant = '{tenant}'")
        rid = 0
        finite: list[int] = []
        for zone in ZONES:
            for conn in (proxy, plain):
                conn.execute(f"SET TimeZone = '{zone}'")
            for value in ZONED:
                rid += 1
                if value != "infinity":
                    finite.append(rid)
                date_part = value.split(" ")[0]
                params = [
                    rid,
                    tenant,
                    value,
                    value,
                    date_part,
                    "12:00:00" if value == "infinity" else value.split(" ")[1],
                ]
                sql_text = (
                    "INSERT INTO {} (id, tenant_id, "
                    + ", ".join(columns)
                    + ") VALUES (%s, %s, %s, %s, %s, %s)"
                )
                plain.execute(sql_text.format("typed_plain"), params)
                proxy.execute(sql_text.format("typed_cells"), params)
        for zone in ZONES:
            for conn in (proxy, plain):
                conn.execute(f"SET TimeZone = '{zone}'")
            assert proxy.info.parameter_status("TimeZone") == zone
            for binary in (False, True):
                query = (
                    "SELECT id, " + ", ".join(columns) + " FROM {} WHERE tenant_id = %s ORDER BY id"
                )
                got = (
                    raw_cursor(proxy, binary)
                    .execute(query.format("typed_cells"), [tenant])
                    .fetchall()
                )
                want = (
                    raw_cursor(plain, binary)
                    .execute(query.format("typed_plain"), [tenant])
                    .fetchall()
                )
                assert got == want, (zone, binary)
                # and as Python objects (aware datetimes in the session's zone)
                query = query.replace("ORDER BY", "AND id = ANY(%s) ORDER BY")
                got_obj = (
                    proxy.cursor(binary=binary)
                    .execute(query.format("typed_cells"), [tenant, finite])
                    .fetchall()
                )
                want_obj = (
                    plain.cursor(binary=binary)
                    .execute(query.format("typed_plain"), [tenant, finite])
                    .fetchall()
                )
                assert len(got_obj) == len(finite)
                assert [tuple(map(repr, r)) for r in got_obj] == [
                    tuple(map(repr, r)) for r in want_obj
                ]


# --- equality search: text and binary input of one value find the same cell ---------------

UTC = dt.UTC
SEARCH: dict[str, list[tuple[Any, str]]] = {  # (asyncpg object, PostgreSQL text of the same value)
    "text": [("ünï ✓ 🎉", "ünï ✓ 🎉"), ("", "")],
    "varchar": [("héllo", "héllo")],
    "int2": [(-32768, "-32768"), (7, "7")],
    "int4": [(2147483647, "2147483647")],
    "int8": [(-9223372036854775808, "-9223372036854775808")],
    "float4": [(0.5, "0.5"), (float("-inf"), "-Infinity")],
    "float8": [(0.1, "0.1"), (float("nan"), "NaN"), (-0.0, "-0")],
    "numeric": [
        (decimal.Decimal("12.50"), "12.50"),
        (decimal.Decimal("-1e-30"), "-0.000000000000000000000000000001"),
    ],
    "bool": [(True, "true"), (False, "f")],
    "date": [(dt.date(2024, 2, 29), "2024-02-29")],
    "time": [(dt.time(23, 59, 59, 999999), "23:59:59.999999")],
    "timestamp": [(dt.datetime(2000, 1, 1, 0, 0, 0, 1), "2000-01-01 00:00:00.000001")],
    "timestamptz": [(dt.datetime(2024, 3, 1, 6, 30, tzinfo=UTC), "2024-03-01 12:00:00+05:30")],
    "uuid": [
        (uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"), "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11")
    ],
    "json": [('{"a": 1}', '{"a": 1}')],
    "jsonb": [('{"b": 1, "a": [2]}', '{"a":[2],"b":1}')],
    "bytea": [(b"\x00\xff", "\\x00FF"), (b"", "\\x")],
}


@pytest.mark.asyncio
async def test_equality_search_same_cell_from_text_and_binary(sealing_proxy: Any) -> None:
    import asyncpg

    tenant = f"search-{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(sealing_proxy.dsn(), server_settings={"pgseal.tenant": tenant})
    expected: dict[tuple[str, int], int] = {}
    try:
        rid = 0
        for t, values in SEARCH.items():
            for k, (obj, _text) in enumerate(values):
                rid += 1
                expected[(t, k)] = rid
                await conn.execute(
                    f"INSERT INTO typed_search (id, tenant_id, s_{t}) VALUES ($1, $2, $3)",
                    rid,
                    tenant,
                    obj,
                )
        for t, values in SEARCH.items():
            objs = [obj for obj, _ in values]
            found = await conn.fetch(
                f"SELECT id FROM typed_search WHERE s_{t} = ANY($1) ORDER BY id", objs
            )
            assert [r["id"] for r in found] == [expected[(t, k)] for k in range(len(values))], t
            for k, (obj, _) in enumerate(values):
                assert (
                    await conn.fetchval(f"SELECT id FROM typed_search WHERE s_{t} = $1", obj)
                    == expected[(t, k)]
                ), t
    finally:
        await conn.close()

    with psycopg.connect(sealing_proxy.dsn(), autocommit=True) as pconn:
        pconn.execute(f"SET pgseal.tenant = '{tenant}'")
        for t, values in SEARCH.items():
            for k, (obj, text) in enumerate(values):
                want = [(expected[(t, k)],)]
                # text parameter in PostgreSQL's syntax
                assert (
                    pconn.execute(
                        f"SELECT id FROM typed_search WHERE s_{t} = %s", [text]
                    ).fetchall()
                    == want
                ), (t, text)
                # a literal in the statement (simple protocol: no parameters)
                assert (
                    pconn.execute(
                        f"SELECT id FROM typed_search WHERE s_{t} = {_literal(text)}"
                    ).fetchall()
                    == want
                ), (t, text)
                # psycopg's binary parameters (int4 values sent as int2/int8, floats as float8...)
                if t in ("json", "jsonb"):
                    obj = (Json if t == "json" else Jsonb)(json.loads(obj))
                if t in ("json",):
                    continue  # json is kept as sent: psycopg re-serializes it differently
                got = (
                    pconn.cursor(binary=True)
                    .execute(f"SELECT id FROM typed_search WHERE s_{t} = %s", [obj])
                    .fetchall()
                )
                assert got == want, (t, obj)
        # and the value reads back as PostgreSQL prints it
        row = pconn.execute(
            "SELECT s_jsonb, s_timestamptz FROM typed_search WHERE tenant_id = %s "
            "AND s_jsonb IS NOT NULL",
            [tenant],
        ).fetchone()
        assert row == ({"a": [2], "b": 1}, None)


# --- what PostgreSQL rejects, the proxy rejects with the same SQLSTATE -----------------------

BAD: list[tuple[str, Any, bool]] = [  # (type, value, binary)
    ("int2", "40000", False),
    ("int4", "12.5", False),
    ("int8", "99999999999999999999", False),
    ("float4", "1e39", False),
    ("float4", 1e39, True),
    ("float8", "1e400", False),
    ("numeric", "abc", False),
    ("bool", "maybe", False),
    ("date", "2024-02-30", False),
    ("time", "25:00", False),
    ("timestamp", "2024-13-01 00:00", False),
    ("uuid", "xyz", False),
    ("json", "{", False),
    ("jsonb", '"\\u0000"', False),
    ("bytea", "\\xzz", False),
    ("text", "nul\x00byte", False),
    ("int2", 40000, True),
]


def test_values_postgres_rejects_are_rejected_alike(sealing_proxy: Any, pg: Any) -> None:
    tenant = f"bad-{uuid.uuid4().hex[:8]}"
    with (
        psycopg.connect(sealing_proxy.dsn(), autocommit=True) as proxy,
        psycopg.connect(pg.superuser_dsn, autocommit=True) as plain,
    ):
        proxy.execute(f"SET pgseal.tenant = '{tenant}'")
        for rid, (t, value, binary) in enumerate(BAD, start=1):
            states = []
            for conn, table in ((plain, "typed_plain"), (proxy, "typed_cells")):
                try:
                    conn.cursor(binary=binary).execute(
                        f"INSERT INTO {table} (id, tenant_id, c_{t}) VALUES (%s, %s, %s)",
                        [rid, tenant, value],
                    )
                except psycopg.Error as exc:
                    states.append(
                        exc.sqlstate or type(exc).__name__
                    )  # psycopg refuses a NUL itself
                else:
                    states.append("accepted")
            assert states[0] != "accepted", (t, value)
            # The same data exception class (22); the exact code may differ (bytea's bad hex
            # digit is 22023 in PostgreSQL, 22P02 from the proxy's codec).
            assert states[1][:2] == states[0][:2], (t, value, binary, states)
        assert proxy.execute(
            "SELECT count(*) FROM typed_cells WHERE tenant_id = %s", [tenant]
        ).fetchone() == (0,)


# --- session output settings: the same bytes as PostgreSQL, or a clean refusal -------------


@pytest.mark.parametrize(
    "setting",
    [
        "extra_float_digits = 0",
        "extra_float_digits = 3",
        "extra_float_digits = -5",
        "DateStyle = 'SQL, DMY'",
        "DateStyle = 'ISO, DMY'",
        "DateStyle = 'German'",
        "bytea_output = 'escape'",
        "IntervalStyle = 'iso_8601'",
    ],
)
def test_session_output_settings_never_give_a_wrong_value(written_all: Typed, setting: str) -> None:
    t = written_all
    columns = [
        "c_float4",
        "c_float8",
        "c_date",
        "c_timestamp",
        "c_timestamptz",
        "c_time",
        "c_bytea",
    ]
    with (
        psycopg.connect(t.proxy_dsn, autocommit=True) as proxy,
        psycopg.connect(t.pg_dsn, autocommit=True) as plain,
    ):
        proxy.execute(f"SET pgseal.tenant = '{t.tenant}'")
        for conn in (proxy, plain):
            conn.execute(f"SET {setting}")
        for column in columns:
            query = f"SELECT {column} FROM {{}} WHERE tenant_id = %s ORDER BY id"
            want = (
                raw_cursor(plain, False).execute(query.format("typed_plain"), [t.tenant]).fetchall()
            )
            try:
                got = (
                    raw_cursor(proxy, False)
                    .execute(query.format("typed_cells"), [t.tenant])
                    .fetchall()
                )
            except psycopg.Error as exc:
                assert exc.sqlstate in ("0A000", "22023"), (column, exc)
                continue
            assert got == want, (setting, column)


def test_output_settings_from_startup_role_defaults_and_transactions(
    written_all: Typed, pg: Any
) -> None:
    """extra_float_digits / bytea_output however they are set: startup options, a role's
    default, SET LOCAL (gone at COMMIT), RESET, SET in pipeline mode."""
    t = written_all
    query = "SELECT c_float4, c_float8, c_bytea FROM {} WHERE tenant_id = %s ORDER BY id"

    def same(proxy: psycopg.Connection[Any], plain: psycopg.Connection[Any], what: str) -> None:
        got = raw_cursor(proxy, False).execute(query.format("typed_cells"), [t.tenant]).fetchall()
        want = raw_cursor(plain, False).execute(query.format("typed_plain"), [t.tenant]).fetchall()
        assert got == want, what

    options = "-c extra_float_digits=-2 -c bytea_output=escape"
    with (
        psycopg.connect(t.proxy_dsn, autocommit=True, options=options) as proxy,
        psycopg.connect(t.pg_dsn, autocommit=True, options=options) as plain,
    ):
        proxy.execute(f"SET pgseal.tenant = '{t.tenant}'")
        same(proxy, plain, "startup options")
        for conn in (proxy, plain):
            conn.execute("BEGIN")
            conn.execute("SET LOCAL extra_float_digits = 0")
        same(proxy, plain, "SET LOCAL")
        for conn in (proxy, plain):
            conn.execute("COMMIT")
        same(proxy, plain, "after COMMIT")
        for conn in (proxy, plain):
            conn.execute("SET extra_float_digits TO 3")
            conn.execute("RESET bytea_output")
        same(proxy, plain, "SET and RESET")
        for conn in (proxy, plain):
            with conn.pipeline():
                conn.execute("SET extra_float_digits = -15")
                conn.execute("SET bytea_output = 'escape'")
        same(proxy, plain, "SET in pipeline mode")
        for conn in (proxy, plain):
            conn.execute("RESET ALL")
        proxy.execute(f"SET pgseal.tenant = '{t.tenant}'")
        same(proxy, plain, "RESET ALL (back to the startup options)")
    pg.execute(
        "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgseal_floaty') "
        "THEN CREATE ROLE pgseal_floaty LOGIN; END IF; END $$; "
        "ALTER ROLE pgseal_floaty SET extra_float_digits = -3; "
        "GRANT SELECT ON typed_cells, typed_plain TO pgseal_floaty"
    )
    with (
        psycopg.connect(
            written_all.proxy_dsn.replace("postgres@", "pgseal_floaty@", 1), autocommit=True
        ) as proxy,
        psycopg.connect(
            t.pg_dsn.replace("postgres@", "pgseal_floaty@", 1), autocommit=True
        ) as plain,
    ):
        proxy.execute(f"SET pgseal.tenant = '{t.tenant}'")
        same(proxy, plain, "role default")


def test_typed_null_literal_into_an_encrypted_column(typed: Typed) -> None:
    rid = typed.ids(1)[0]
    typed.proxy.execute(
        "INSERT INTO typed_cells (id, tenant_id, c_text, c_int4) "
        f"VALUES ({rid}, '{typed.tenant}', NULL::text, NULL::int4)"
    )
    assert typed.proxy.execute(
        "SELECT c_text, c_int4 FROM typed_cells WHERE tenant_id = %s AND id = %s",
        [typed.tenant, rid],
    ).fetchall() == [(None, None)]

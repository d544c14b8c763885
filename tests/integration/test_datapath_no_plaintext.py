"""No plaintext anywhere (DESIGN.md 6, 9).

A workload through the proxy (inserts, updates, selects, upserts, deletes; the
simple and the extended protocol; asyncpg, psycopg with text, binary and pipeline
mode, psql) writes values that all carry one random sentinel, and tries a few
statements the proxy must refuse, with the sentinel in them. Afterwards the
sentinel must be in none of: a direct read of every table, the server log
(`log_statement=all`, bound parameters included), the data directory and WAL
after a CHECKPOINT, the proxy's audit trail, the proxy's own log records. The
refused statements never reach PostgreSQL: the log shows the stand-in
`pgseal_refused_statement` instead.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import os
import secrets
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.support.logs import capture_logs

pytestmark = pytest.mark.integration

# Random per run: nothing else in the cluster, its log or the proxy's files can hold it.
SENTINEL = f"Snt{secrets.token_hex(6)}Q"
# An int8 sentinel too: found as its decimal text (log) or its stored bytes (data files).
NUMBER = int.from_bytes(secrets.token_bytes(7), "big") | (1 << 55)


@dataclass
class Workload:
    tenant: str
    other: str
    refused: list[str] = field(default_factory=list)  # SQLSTATEs the refusals got
    log_records: list[str] = field(default_factory=list)
    notes_after: int = 0  # notes rows with a larger id are this workload's
    log_offset: int = 0  # the server log from here on is this workload's


def _v(tag: str) -> str:
    return f"{tag} {SENTINEL} é✓"


def _psycopg_work(dsn: str, w: Workload) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"SET pgseal.tenant = '{w.tenant}'")
        # extended protocol, text parameters
        conn.execute(
            "INSERT INTO patients (tenant_id, ssn, name, dob, balance, profile) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            [
                w.tenant,
                _v("ssn-1"),
                _v("name-1"),
                dt.date(1970, 1, 1),
                decimal.Decimal(NUMBER),
                Jsonb({"k": _v("j")}),
            ],
        )
        conn.execute(
            "UPDATE patients SET name = %s, profile = %s WHERE ssn = %s",
            [_v("name-1b"), Jsonb([_v("arr")]), _v("ssn-1")],
        )
        assert conn.execute(
            "SELECT name FROM patients WHERE ssn = %s", [_v("ssn-1")]
        ).fetchall() == [(_v("name-1b"),)]
        # upserts, both branches
        for name in (_v("up-a"), _v("up-b")):
            conn.execute(
                "INSERT INTO patients (tenant_id, ssn, name) VALUES (%s, %s, %s) "
                "ON CONFLICT (tenant_id, ssn) DO UPDATE SET name = EXCLUDED.name RETURNING name",
                [w.tenant, _v("ssn-up"), name],
            ).fetchall()
        # a unique violation: PostgreSQL's error detail shows the key, which must be a cell
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(
                "INSERT INTO patients (tenant_id, ssn) VALUES (%s, %s)", [w.tenant, _v("ssn-up")]
            )
        # binary parameters and results
        cur = conn.cursor(binary=True)
        cur.execute(
            "INSERT INTO patients (tenant_id, ssn, name, balance) VALUES (%s, %s, %s, %s)",
            [w.tenant, _v("ssn-bin"), _v("name-bin"), decimal.Decimal(NUMBER)],
        )
        assert cur.execute(
            "SELECT name FROM patients WHERE ssn = ANY(%s)", [[_v("ssn-bin"), _v("nobody")]]
        ).fetchall() == [(_v("name-bin"),)]
        # prepared (server-side) statements, reused
        for k in range(6):
            conn.execute(
                "INSERT INTO notes (body, rating) VALUES (%s, %s)",
                [_v(f"note-{k}"), NUMBER % 1000],
                prepare=True,
            )
        # literals: psycopg's client-side binding puts the values into the statement text
        ccur = psycopg.ClientCursor(conn)
        ccur.execute(
            "INSERT INTO patients (tenant_id, ssn, name, dob) VALUES (%s, %s, %s, %s)",
            [w.tenant, _v("ssn-lit"), _v("name-lit"), "1999-12-31"],
        )
        ccur.execute(
            "UPDATE patients SET name = %s WHERE ssn = %s", [_v("name-lit2"), _v("ssn-lit")]
        )
        # trusted isolation: the row's tenant decides, no session tenant needed
        conn.execute(
            "INSERT INTO payments (tenant_id, card_number, amount, paid_at) "
            "VALUES (%s, %s, %s, %s)",
            [
                w.other,
                _v("card"),
                decimal.Decimal(NUMBER),
                dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
            ],
        )
        conn.execute(
            "DELETE FROM patients WHERE ssn = %s RETURNING name", [_v("nobody")]
        ).fetchall()
        # pipeline mode: everything through Parse/Bind/Execute with one Sync
        with conn.pipeline():
            conn.execute(f"SET pgseal.tenant = '{w.tenant}'")
            for k in range(3):
                conn.execute(
                    "INSERT INTO patients (tenant_id, ssn, name) VALUES (%s, %s, %s)",
                    [w.tenant, _v(f"ssn-pipe-{k}"), _v(f"name-pipe-{k}")],
                )
            conn.execute(
                "UPDATE patients SET name = %s WHERE ssn = %s",
                [_v("name-pipe-x"), _v("ssn-pipe-0")],
            )
            piped = conn.execute(
                "SELECT name FROM patients WHERE ssn IN (%s, %s)",
                [_v("ssn-pipe-0"), _v("ssn-pipe-1")],
            )
        assert sorted(piped.fetchall()) == [(_v("name-pipe-1"),), (_v("name-pipe-x"),)]
        # refused: never forwarded, the sentinel with them
        for bad in (
            f"SELECT name FROM patients WHERE name LIKE '%{SENTINEL}%'",
            f"SELECT name FROM patients WHERE name = '{_v('name-1b')}'",  # randomized column
            f"SELECT upper(name) FROM patients WHERE ssn = '{_v('ssn-1')}' AND name < '{SENTINEL}'",
        ):
            with pytest.raises(psycopg.Error) as info:
                conn.execute(bad)
            w.refused.append(info.value.sqlstate or "")
            with pytest.raises(psycopg.Error) as info:
                conn.execute(
                    bad.replace(f"'%{SENTINEL}%'", "%s"),
                    [f"%{SENTINEL}%"] if "LIKE" in bad else None,
                )
            w.refused.append(info.value.sqlstate or "")
        with pytest.raises(psycopg.Error) as info, conn.pipeline():
            conn.execute(
                "INSERT INTO patients (tenant_id, ssn, name) VALUES (%s, %s, %s)",
                [w.tenant, _v("ssn-pipe-refused"), _v("name-pipe-refused")],
            )
            conn.execute("SELECT name FROM patients WHERE name LIKE %s", [f"{SENTINEL}%"])
        w.refused.append(info.value.sqlstate or "")


async def _asyncpg_work(dsn: str, w: Workload) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn, server_settings={"pgseal.tenant": w.tenant})
    try:
        await conn.execute(
            "INSERT INTO patients (tenant_id, ssn, name, dob, balance, profile) "
            "VALUES ($1, $2, $3, $4, $5, $6)",
            w.tenant,
            _v("ssn-a"),
            _v("name-a"),
            dt.date(2001, 2, 3),
            decimal.Decimal(NUMBER),
            f'{{"x": "{_v("ja")}"}}',
        )
        await conn.executemany(
            "INSERT INTO patients (tenant_id, ssn, name) VALUES ($1, $2, $3)",
            [(w.tenant, _v(f"ssn-many-{k}"), _v(f"name-many-{k}")) for k in range(5)],
        )
        await conn.execute(
            "UPDATE patients SET name = $1 WHERE ssn = $2", _v("name-a2"), _v("ssn-a")
        )
        await conn.execute(
            "INSERT INTO patients (tenant_id, ssn, name) VALUES ($1, $2, $3) "
            "ON CONFLICT (tenant_id, ssn) DO UPDATE SET name = EXCLUDED.name",
            w.tenant,
            _v("ssn-a"),
            _v("name-a3"),
        )
        stmt = await conn.prepare("SELECT name, profile FROM patients WHERE ssn = $1")
        row = await stmt.fetchrow(_v("ssn-a"))
        assert row is not None and row["name"] == _v("name-a3")
        assert sorted(
            r["name"]
            for r in await conn.fetch(
                "SELECT name FROM patients WHERE ssn = ANY($1::text[])",
                [_v("ssn-many-0"), _v("ssn-many-1")],
            )
        ) == [_v("name-many-0"), _v("name-many-1")]
        # simple protocol with literals (no arguments)
        await conn.execute(
            f"INSERT INTO notes (body, rating) VALUES ('{_v('note-simple')}', {NUMBER % 1000}); "
            f"UPDATE patients SET name = '{_v('name-a4')}' WHERE ssn = '{_v('ssn-a')}'"
        )
        async with conn.transaction():
            await conn.execute("INSERT INTO notes (body) VALUES ($1)", _v("note-tx"))
        for bad in (
            f"SELECT name FROM patients WHERE name LIKE '{SENTINEL}%'",
            f"SELECT length(name) FROM patients WHERE ssn = '{_v('ssn-a')}'",
        ):
            with pytest.raises(asyncpg.PostgresError) as info:
                await conn.fetch(bad)
            w.refused.append(info.value.sqlstate)
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.fetch("SELECT name FROM patients WHERE name LIKE $1", f"{SENTINEL}%")
        w.refused.append(info.value.sqlstate)
    finally:
        await conn.close()


def _psql_work(dsn: str, w: Workload) -> None:
    script = (
        f"SET pgseal.tenant = '{w.tenant}';"
        f"INSERT INTO patients (tenant_id, ssn, name, dob, balance, profile) VALUES "
        f"('{w.tenant}', '{_v('ssn-psql')}', '{_v('name-psql')}', DATE '1980-01-02', {NUMBER}, "
        f'\'{{"p": "{_v("jp")}"}}\'), '
        f"('{w.tenant}', '{_v('ssn-psql2')}', E'{_v('name-psql2')}\\n', NULL, -{NUMBER}, NULL);"
        f"UPDATE patients SET name = '{_v('name-psql3')}' WHERE ssn = '{_v('ssn-psql')}';"
        f"INSERT INTO patients (tenant_id, ssn, name) "
        f"VALUES ('{w.tenant}', '{_v('ssn-psql')}', '{_v('name-psql4')}') "
        f"ON CONFLICT (tenant_id, ssn) DO UPDATE SET name = EXCLUDED.name;"
        f"SELECT name FROM patients WHERE ssn IN ('{_v('ssn-psql')}', '{_v('ssn-psql2')}');"
    )
    out = subprocess.run(
        ["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", dsn, "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert _v("name-psql4") in out.stdout and _v("name-psql2") in out.stdout, out.stdout
    refused = subprocess.run(
        [
            "psql",
            "-X",
            "-A",
            "-t",
            dsn,
            "-c",
            f"SET pgseal.tenant = '{w.tenant}'",
            "-c",
            f"SELECT name FROM patients WHERE ssn = '{_v('ssn-psql')}' OR name LIKE '{SENTINEL}%'",
            "-c",
            f"UPDATE patients SET name = '{_v('x')}' || name WHERE ssn = '{_v('ssn-psql')}'",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.stderr.count("ERROR") == 2 and "public.patients.name" in refused.stderr, (
        refused.stderr
    )
    w.refused.append("psql")


@pytest.fixture(scope="module")
def workload(sealing_proxy: Any, pg: Any) -> Iterator[Workload]:
    pg.require_local()
    w = Workload(tenant=f"np-{secrets.token_hex(4)}", other=f"np-other-{secrets.token_hex(4)}")
    w.notes_after = int(pg.execute("SELECT coalesce(max(id), 0) FROM notes")[0][0])
    w.log_offset = Path(pg.require_local().log_path).stat().st_size
    with capture_logs(w.log_records, "%(name)s %(message)s"):
        dsn = sealing_proxy.dsn()
        _psycopg_work(dsn, w)
        asyncio.run(_asyncpg_work(dsn, w))
        _psql_work(dsn, w)
    pg.execute("CHECKPOINT")
    yield w


def _needles() -> list[bytes]:
    return [SENTINEL.encode(), str(NUMBER).encode()]


def test_workload_read_back_through_the_proxy(workload: Workload, sealing_proxy: Any) -> None:
    with psycopg.connect(sealing_proxy.dsn(), autocommit=True) as conn:
        conn.execute(f"SET pgseal.tenant = '{workload.tenant}'")
        names = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM patients WHERE tenant_id = %s AND name IS NOT NULL",
                [workload.tenant],
            )
        ]
        assert len(names) >= 15 and all(SENTINEL in n for n in names)
        notes = [
            r[0]
            for r in conn.execute("SELECT body FROM notes WHERE id > %s", [workload.notes_after])
        ]
        assert len(notes) == 8 and all(SENTINEL in n for n in notes)
    assert len(workload.refused) == 11
    assert all(s in ("0A000", "42501", "psql") for s in workload.refused), workload.refused


def test_sentinel_not_in_a_direct_read_of_any_table(workload: Workload, pg: Any) -> None:
    tables = pg.execute(
        "SELECT format('%I.%I', table_schema, table_name) FROM information_schema.tables "
        "WHERE table_type = 'BASE TABLE' "
        "AND table_schema NOT IN ('pg_catalog', 'information_schema')"
    )
    assert len(tables) >= 5
    for (table,) in tables:
        rows = pg.execute(f"SELECT t::text FROM {table} t")
        text = "\n".join(str(r[0]) for r in rows)
        for needle in _needles():
            assert needle.decode() not in text, table
        byte_columns = pg.execute(
            "SELECT a.attname FROM pg_attribute a WHERE a.attrelid = %s::regclass "
            "AND a.atttypid = 'bytea'::regtype "
            "AND a.attnum > 0 AND NOT a.attisdropped".replace(
                "%s", "'" + table.replace("'", "''") + "'"
            )
        )
        for (column,) in byte_columns:
            escaped = pg.execute(f"SELECT encode(\"{column}\", 'escape') FROM {table}")
            blob = "\n".join(str(r[0]) for r in escaped)
            assert SENTINEL not in blob, (table, column)
    # the workload really wrote there: cells, not NULLs
    assert (
        pg.execute(
            f"SELECT count(*) FROM patients WHERE tenant_id = '{workload.tenant}' "
            "AND substring(name from 1 for 2) = '\\x0101'::bytea"
        )[0][0]
        >= 15
    )


def test_sentinel_not_in_the_server_log(workload: Workload, pg: Any) -> None:
    whole = Path(pg.require_local().log_path).read_bytes()
    for needle in _needles():
        assert needle not in whole
    log = whole[workload.log_offset :]
    # Every refusal reached PostgreSQL only as the stand-in; the statements themselves never did.
    assert log.count(b"pgseal_refused_statement") >= len(workload.refused)
    for refused_text in (b"upper(name)", b"length(name)", b"LIKE", b"|| name"):
        assert refused_text not in log
    assert workload.tenant.encode() in log  # the log does hold this workload's statements
    assert b"parameters: $1 = '\\x01" in log  # bound parameters are logged: as cells


def test_sentinel_not_in_the_data_directory(workload: Workload, pg: Any) -> None:
    data_dir = Path(pg.require_local().data_dir)
    needles = [*_needles(), struct.pack("<q", NUMBER), struct.pack(">q", NUMBER)]
    files = 0
    for root, _dirs, names in os.walk(data_dir):
        for name in names:
            path = Path(root) / name
            try:
                content = path.read_bytes()
            except OSError:
                continue
            files += 1
            for needle in needles:
                assert needle not in content, path
    assert files > 100
    # the tenant name is stored in plaintext (it is not encrypted): the grep does see the rows
    assert any(
        workload.tenant.encode() in (Path(r) / n).read_bytes()
        for r, _d, ns in os.walk(data_dir / "base")
        for n in ns
    )


def test_sentinel_not_in_the_audit_trail(workload: Workload, sealing_config: Any) -> None:
    paths = [Path(sink.path) for sink in sealing_config.audit.sinks if sink.kind == "jsonl"]
    assert paths
    for path in paths:
        if not path.is_absolute():
            path = Path(sealing_config.base_dir) / path
        content = path.read_bytes()
        for needle in _needles():
            assert needle not in content
        assert workload.tenant.encode() in content
        assert (
            b'"data.encrypt"' in content
            and b'"data.decrypt"' in content
            and b'"data.deny"' in content
        )


def test_sentinel_not_in_the_proxy_log_records(workload: Workload) -> None:
    for record in workload.log_records:
        for needle in _needles():
            assert needle.decode() not in record, record

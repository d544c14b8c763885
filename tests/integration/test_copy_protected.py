"""COPY on protected tables, and pg_dump through the proxy (issue 5, item 4).

A database of its own, with a policy of its own, behind a proxy of its own:
- 100k rows, every plaintext value carrying one random sentinel, go in with
  psycopg (text format) and come back equal; the same rows go out and in again
  with psql's \\copy in CSV;
- binary COPY, server files and PROGRAM are refused; a row that breaks the tenant
  rules fails the whole COPY, nothing of it stored;
- a trusted table takes rows of several tenants in one COPY; a cross-tenant role
  reads them all, a strict table's rows stay with their tenant;
- pg_dump through the proxy gives a plaintext dump (one tenant via PGOPTIONS, or a
  cross-tenant role), psql -f of it through the proxy restores it into empty
  tables, and dumping those again gives the very same data;
- afterwards the sentinel is in neither the server log nor a direct read of a table.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.support.proxy_fixtures import ProxyThread

pytestmark = pytest.mark.integration

SENTINEL = f"Cpy{secrets.token_hex(6)}Z"
ROWS = 100_000
COLUMNS = "id, tenant_id, secret, note, amount, plain"
AUDITOR = "copy_auditor"

POLICY = f"""
version: 1
cross_tenant_roles: [{AUDITOR}]
tables:
  public.copy_rows:
    tenant: {{column: tenant_id}}
    isolation: strict
    on_denied: error
    columns:
      secret: {{type: text, search: equality}}
      note:   {{type: text}}
      amount: {{type: numeric}}
  public.copy_shared:
    tenant: {{column: tenant_id}}
    isolation: trusted
    columns:
      secret: {{type: text}}
      born:   {{type: date}}
  public.copy_session:
    tenant: {{session: true}}
    columns:
      body: {{type: text}}
"""

SCHEMA = f"""
CREATE TABLE copy_rows (id int NOT NULL, tenant_id text NOT NULL, secret bytea, note bytea,
                        amount bytea, plain text);
CREATE TABLE copy_shared (id int NOT NULL, tenant_id text NOT NULL, secret bytea, born bytea);
CREATE TABLE copy_session (id int NOT NULL, body bytea);
GRANT SELECT, INSERT ON copy_rows, copy_shared, copy_session TO {AUDITOR};
"""

Row = tuple[str | None, ...]


@dataclass
class Setup:
    proxy: ProxyThread
    db: str  # the database the rows are copied into
    restore_db: str  # empty tables for pg_dump's restore
    tenant: str
    other: str
    speed: dict[str, float]


def expected_rows(tenant: str) -> list[Row]:
    rows: list[Row] = []
    for i in range(ROWS):
        if i % 7 == 0:
            note = None
        elif i % 10 == 0:
            note = f'{SENTINEL} tricky {i}\t\n\r\\ é✓ "q", x;|'
        else:
            note = f"{SENTINEL} note {i}"
        amount = None if i % 11 == 0 else f"{i}.{i % 100:02d}"
        rows.append((str(i), tenant, f"{SENTINEL}-s{i}", note, amount, f"p{i}"))
    return rows


def by_id(lines: list[str]) -> list[str]:
    """Dump lines in id order (heap order is not insertion order: a short row may fill
    the space an earlier page has left); a COPY header line stays first."""
    return sorted(
        lines,
        key=lambda line: (
            not line.startswith("COPY "),
            int(line.split("\t")[0]) if not line.startswith("COPY ") else 0,
        ),
    )


def as_text_line(row: Row) -> str:
    """A row as COPY's text format writes it (written out here, not with the proxy's codec)."""
    escapes = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
    return "\t".join("\\N" if v is None else "".join(escapes.get(c, c) for c in v) for v in row)


def psql(
    dsn: str, *args: str, tenant: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PGOPTIONS": f"-c pgseal.tenant={tenant}"} if tenant else None
    out = subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", dsn, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    if check:
        assert out.returncode == 0, out.stderr
    return out


def pg_dump(dsn: str, *tables: str, tenant: str | None = None) -> str:
    env = {**os.environ, "PGOPTIONS": f"-c pgseal.tenant={tenant}"} if tenant else None
    args = ["pg_dump", "--data-only", "--no-owner", *(f"--table=public.{t}" for t in tables), dsn]
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def copy_sections(dump: str) -> dict[str, list[str]]:
    """The data of each table in a plain-format dump: its COPY header and rows."""
    sections: dict[str, list[str]] = {}
    for match in re.finditer(
        r"^(COPY public\.(\w+) \(.*?\) FROM stdin;)\n(.*?)^\\\.$", dump, re.M | re.S
    ):
        sections[match.group(2)] = [match.group(1), *match.group(3).splitlines()]
    return sections


@pytest.fixture(scope="module")
def setup(
    pg: Any, sealing_config: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Setup]:
    pg.require_local()
    suffix = secrets.token_hex(3)
    db, restore_db = f"pgseal_copy_{suffix}", f"pgseal_copy_restore_{suffix}"
    pg.execute(
        f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{AUDITOR}') "
        f"THEN CREATE ROLE {AUDITOR} LOGIN; END IF; END $$"
    )
    for name in (db, restore_db):
        pg.execute(f"CREATE DATABASE {name}")
        pg.execute(SCHEMA, database=name)
    policy = tmp_path_factory.mktemp("copy-policy") / "policy.yaml"
    policy.write_text(POLICY)
    config = replace(sealing_config, policies=(str(policy),))
    with ProxyThread(config) as proxy:
        yield Setup(proxy, db, restore_db, f"cp-{suffix}", f"cp-other-{suffix}", {})
    for name in (db, restore_db):
        pg.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="module")
def loaded(setup: Setup) -> list[Row]:
    """100k rows copied in with psycopg (text format), the timing kept."""
    rows = expected_rows(setup.tenant)
    with psycopg.connect(setup.proxy.dsn(database=setup.db), autocommit=True) as conn:
        conn.execute(f"SET pgseal.tenant = '{setup.tenant}'")
        started = time.perf_counter()
        with conn.cursor().copy(f"COPY copy_rows ({COLUMNS}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        setup.speed["copy_in"] = ROWS / (time.perf_counter() - started)
    return rows


def read_back_text(setup: Setup) -> list[Row]:
    with psycopg.connect(setup.proxy.dsn(database=setup.db), autocommit=True) as conn:
        conn.execute(f"SET pgseal.tenant = '{setup.tenant}'")
        started = time.perf_counter()
        with conn.cursor().copy(f"COPY copy_rows ({COLUMNS}) TO STDOUT") as copy:
            back = [tuple(r) for r in copy.rows()]
        setup.speed["copy_out"] = len(back) / (time.perf_counter() - started)
    return sorted(back, key=lambda r: int(r[0] or 0))


def test_psycopg_text_round_trip_of_100k_rows(setup: Setup, loaded: list[Row]) -> None:
    assert read_back_text(setup) == loaded
    print(
        f"\nCOPY through the proxy: in {setup.speed['copy_in']:.0f} rows/s, "
        f"out {setup.speed['copy_out']:.0f} rows/s ({ROWS} rows, 3 encrypted columns)"
    )


def test_psql_copy_csv_out_and_in_again(
    setup: Setup, loaded: list[Row], pg: Any, tmp_path: Path
) -> None:
    dsn = setup.proxy.dsn(database=setup.db)
    out_file = tmp_path / "rows.csv"
    psql(
        dsn,
        "-c",
        f"\\copy (SELECT {COLUMNS} FROM copy_rows ORDER BY id) TO '{out_file}' "
        "WITH (FORMAT csv, HEADER)",
        tenant=setup.tenant,
    )
    with out_file.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        assert next(reader) == [c.strip() for c in COLUMNS.split(",")]
        written = [tuple(v if v != "" else None for v in r) for r in reader]
    assert written == loaded  # plaintext in the client's file
    pg.execute("TRUNCATE copy_rows", database=setup.db)
    psql(
        dsn, "-c", f"\\copy copy_rows ({COLUMNS}) FROM '{out_file}' CSV HEADER", tenant=setup.tenant
    )
    # What went in is checked by the pg_dump test below (it dumps these very rows).
    assert pg.execute("SELECT count(*) FROM copy_rows", database=setup.db) == [(ROWS,)]


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        (
            "COPY copy_rows FROM STDIN (FORMAT binary)",
            "binary COPY of protected table public.copy_rows",
        ),
        ("COPY copy_rows (id, secret) TO STDOUT WITH BINARY", "binary COPY"),
        ("COPY copy_rows TO '/tmp/pgseal-copy-out'", "COPY to a server file"),
        ("COPY copy_rows (secret) FROM PROGRAM 'cat /etc/hostname'", "COPY from PROGRAM"),
        ("COPY (SELECT * FROM copy_rows) TO STDOUT", "list the columns"),
    ],
)
def test_binary_server_files_and_programs_are_refused(setup: Setup, sql: str, message: str) -> None:
    with psycopg.connect(setup.proxy.dsn(database=setup.db), autocommit=True) as conn:
        conn.execute(f"SET pgseal.tenant = '{setup.tenant}'")
        with pytest.raises(psycopg.errors.FeatureNotSupported) as info, conn.cursor().copy(sql):
            pass
        assert message in str(info.value)
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_asyncpg_binary_copy_is_refused_and_its_text_copy_works(setup: Setup) -> None:
    """asyncpg writes records with binary COPY (refused); its COPY TO can ask for CSV."""

    async def run() -> bytes:
        conn = await asyncpg.connect(
            setup.proxy.dsn(database=setup.db), server_settings={"pgseal.tenant": setup.tenant}
        )
        try:
            with pytest.raises(asyncpg.exceptions.FeatureNotSupportedError) as info:
                await conn.copy_records_to_table(
                    "copy_rows",
                    records=[(ROWS + 1, setup.tenant, f"{SENTINEL} binary", None, None, "b")],
                    columns=[c.strip() for c in COLUMNS.split(",")],
                )
            assert "binary COPY of protected table public.copy_rows" in str(info.value)
            out = io.BytesIO()
            await conn.copy_from_query(
                "SELECT id, secret FROM copy_rows WHERE id < 3 ORDER BY id",
                output=out,
                format="csv",
            )
            return out.getvalue()
        finally:
            await conn.close()

    assert asyncio.run(run()) == f"0,{SENTINEL}-s0\n1,{SENTINEL}-s1\n2,{SENTINEL}-s2\n".encode()


def _copy_rows_in(conn: psycopg.Connection[Any], rows: list[Row]) -> None:
    with conn.cursor().copy(f"COPY copy_rows ({COLUMNS}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def test_tenant_violations_refuse_the_whole_copy(setup: Setup, loaded: list[Row], pg: Any) -> None:
    dsn = setup.proxy.dsn(database=setup.db)
    before = pg.execute("SELECT count(*) FROM copy_rows", database=setup.db)[0][0]
    mine = [
        (str(ROWS + i), setup.tenant, f"{SENTINEL}-v{i}", f"{SENTINEL} v", "1", "v")
        for i in range(5000)
    ]
    theirs = (str(ROWS + 9999), setup.other, f"{SENTINEL}-theirs", f"{SENTINEL} theirs", "2", "t")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"SET pgseal.tenant = '{setup.tenant}'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            _copy_rows_in(conn, [*mine[:3000], theirs, *mine[3000:]])
        assert "differs from the session tenant on public.copy_rows" in str(info.value)
        assert SENTINEL not in str(info.value)
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the connection goes on
        conn.execute("RESET pgseal.tenant")
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            _copy_rows_in(conn, mine[:10])
        assert "needs a session tenant" in str(info.value)
        with (
            pytest.raises(psycopg.errors.InsufficientPrivilege) as info,
            conn.cursor().copy("COPY copy_session (id, body) FROM STDIN") as copy,
        ):
            copy.write_row((1, f"{SENTINEL} body"))
        assert "no tenant for row 1 of public.copy_session" in str(info.value)
    # psql \copy: the same refusal, and psql says so.
    stdin_rows = "".join(
        f"{ROWS + 20000 + i}\t{setup.other}\t{SENTINEL}-psql\t\\N\t\\N\tx\n" for i in range(3)
    )
    out = subprocess.run(
        [
            "psql",
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            dsn,
            "-c",
            f"\\copy copy_rows ({COLUMNS}) FROM STDIN",
        ],
        input=stdin_rows,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PGOPTIONS": f"-c pgseal.tenant={setup.tenant}"},
    )
    assert out.returncode != 0 and "differs from the session tenant" in out.stderr, out.stderr
    # Nothing of any refused COPY was stored.
    assert pg.execute("SELECT count(*) FROM copy_rows", database=setup.db)[0][0] == before
    assert pg.execute("SELECT count(*) FROM copy_session", database=setup.db)[0][0] == 0


def test_trusted_table_takes_several_tenants_and_reads_stay_isolated(
    setup: Setup, loaded: list[Row], pg: Any
) -> None:
    dsn = setup.proxy.dsn(database=setup.db)
    tenants = [setup.tenant, setup.other, f"{setup.other}-3"]
    shared = [
        (str(i), tenants[i % 3], f"{SENTINEL} shared {i}", f"19{i % 90 + 10}-0{i % 9 + 1}-1{i % 9}")
        for i in range(300)
    ]
    lines = io.StringIO()
    csv.writer(lines, lineterminator="\n").writerows(shared)
    with psycopg.connect(dsn, autocommit=True) as conn:  # trusted: no session tenant needed
        with conn.cursor().copy(
            "COPY copy_shared (id, tenant_id, secret, born) FROM STDIN (FORMAT csv)"
        ) as copy:
            copy.write(lines.getvalue())  # psycopg's write_row writes the text format only
        with conn.cursor().copy("COPY copy_session (id, body) FROM STDIN") as copy:
            pass  # an empty COPY needs no tenant
        conn.execute(f"SET pgseal.tenant = '{setup.tenant}'")
        with conn.cursor().copy("COPY copy_session (id, body) FROM STDIN") as copy:
            copy.write_row((1, f"{SENTINEL} session body"))
    key_ids = pg.execute(
        "SELECT tenant_id, count(DISTINCT substring(secret from 3 for 4)) FROM copy_shared "
        "GROUP BY tenant_id ORDER BY 1",
        database=setup.db,
    )
    assert len(key_ids) == 3 and all(n == 1 for _, n in key_ids)
    assert (
        len(
            {
                bytes(r[0])
                for r in pg.execute(
                    "SELECT DISTINCT substring(secret from 3 for 4) FROM copy_shared",
                    database=setup.db,
                )
            }
        )
        == 3
    )
    # A cross-tenant role reads every tenant's rows, with no session tenant.
    with psycopg.connect(setup.proxy.dsn(user=AUDITOR, database=setup.db), autocommit=True) as conn:
        buffer = io.StringIO()
        with conn.cursor().copy(
            "COPY copy_shared (id, tenant_id, secret, born) TO STDOUT (FORMAT csv)"
        ) as copy:
            for data in copy:
                buffer.write(bytes(data).decode())
        back = sorted(
            (tuple(r) for r in csv.reader(io.StringIO(buffer.getvalue()))), key=lambda r: int(r[0])
        )
        assert back == shared
        # A search seals the value under one tenant's key: it needs that tenant.
        conn.execute(f"SET pgseal.tenant = '{setup.tenant}'")
        with conn.cursor().copy(
            "COPY (SELECT id, secret FROM copy_rows WHERE secret = %s) TO STDOUT",
            [f"{SENTINEL}-s5"],
        ) as copy:
            assert [tuple(r) for r in copy.rows()] == [("5", f"{SENTINEL}-s5")]
    # Another tenant's session cannot read the strict table's rows.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"SET pgseal.tenant = '{setup.other}'")
        with (
            pytest.raises(psycopg.errors.InsufficientPrivilege),
            conn.cursor().copy("COPY copy_rows (id, note) TO STDOUT") as copy,
        ):
            list(copy.rows())
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_pg_dump_of_one_tenant_restores_through_the_proxy(
    setup: Setup, loaded: list[Row], pg: Any, tmp_path: Path
) -> None:
    source = setup.proxy.dsn(database=setup.db)
    target = setup.proxy.dsn(database=setup.restore_db)
    dump = pg_dump(source, "copy_rows", "copy_session", tenant=setup.tenant)
    sections = copy_sections(dump)
    # Plaintext, not cells: the rows psql's CSV \copy put in, in PostgreSQL's text format.
    assert by_id(sections["copy_rows"][1:]) == [as_text_line(row) for row in loaded]
    assert len(sections["copy_session"]) == 2
    assert "\\\\x01" not in dump
    (tmp_path / "dump.sql").write_text(dump)
    psql(target, "-f", str(tmp_path / "dump.sql"), tenant=setup.tenant)
    stored = pg.execute(
        "SELECT count(*), count(*) FILTER (WHERE substring(secret from 1 for 1) = '\\x01'::bytea) "
        "FROM copy_rows",
        database=setup.restore_db,
    )
    assert stored == [(ROWS, ROWS)]
    again = copy_sections(pg_dump(target, "copy_rows", "copy_session", tenant=setup.tenant))
    assert {k: by_id(v) for k, v in again.items()} == {k: by_id(v) for k, v in sections.items()}


def test_pg_dump_by_a_cross_tenant_role_restores_every_tenant(
    setup: Setup, loaded: list[Row], pg: Any, tmp_path: Path
) -> None:
    source = setup.proxy.dsn(user=AUDITOR, database=setup.db)
    dump = pg_dump(source, "copy_shared", "copy_session")
    sections = copy_sections(dump)
    assert len(sections["copy_shared"]) == 301 and len(sections["copy_session"]) == 2
    assert f"{SENTINEL} shared 7" in dump and f"{SENTINEL} session body" in dump
    # The trusted table restores with no session tenant: each row's tenant picks its key.
    shared_only = dump.replace("\n".join(sections["copy_session"]) + "\n\\.\n", "")
    assert "copy_session" not in copy_sections(shared_only)
    (tmp_path / "shared.sql").write_text(shared_only)
    psql(
        setup.proxy.dsn(user=AUDITOR, database=setup.restore_db), "-f", str(tmp_path / "shared.sql")
    )
    again = copy_sections(
        pg_dump(setup.proxy.dsn(user=AUDITOR, database=setup.restore_db), "copy_shared")
    )
    assert by_id(again["copy_shared"]) == by_id(sections["copy_shared"])
    tenants = pg.execute(
        "SELECT count(DISTINCT tenant_id) FROM copy_shared", database=setup.restore_db
    )
    assert tenants == [(3,)]


def test_no_sentinel_in_the_server_log_or_a_direct_read(
    setup: Setup, loaded: list[Row], pg: Any
) -> None:
    log = Path(pg.require_local().log_path).read_bytes()
    assert SENTINEL.encode() not in log
    assert b"COPY from stdin failed: pgseal:" in log  # the refused COPYs ended with our CopyFail
    tables = {
        "copy_rows": ("secret", "note", "amount"),
        "copy_shared": ("secret", "born"),
        "copy_session": ("body",),
    }
    for db in (setup.db, setup.restore_db):
        for table, columns in tables.items():
            raw = " || ".join(f"coalesce({c}, ''::bytea)" for c in columns)
            found = pg.execute(
                f"SELECT count(*) FROM {table} t WHERE t::text LIKE '%{SENTINEL}%' "
                f"OR position(convert_to('{SENTINEL}', 'UTF8') in {raw}) > 0",
                database=db,
            )
            assert found == [(0,)], (db, table)
    cells = pg.execute(
        "SELECT count(*), count(*) FILTER (WHERE substring(note from 1 for 1) = '\\x01'::bytea) "
        "FROM copy_rows WHERE note IS NOT NULL",
        database=setup.db,
    )
    assert cells[0][0] > 0 and cells[0][0] == cells[0][1]

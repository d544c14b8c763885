"""Tenant isolation through the proxy (DESIGN.md 5, 6).

Session tenant from SET / SET LOCAL / startup options, cleared by RESET, RESET ALL
and DISCARD ALL, tracked across transactions and pooled connections; strict and
trusted isolation; cells moved between rows, tenants and columns with direct SQL
never open into a wrong value; decrypt_roles, cross_tenant_roles, on_denied.
"""

from __future__ import annotations

import asyncio
import datetime
import secrets
import subprocess
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

pytestmark = pytest.mark.integration

DENIED = "42501"
ROLES = ("pgseal_app", "pgseal_clerk", "auditor")


def _tenant(tag: str) -> str:
    return f"{tag}-{secrets.token_hex(3)}"


def _sqlstate(fn: Any, *args: Any) -> str | None:
    try:
        fn(*args)
    except psycopg.Error as exc:
        return exc.sqlstate
    return None


def _current_setting(conn: psycopg.Connection[Any]) -> str | None:
    row = conn.execute("SELECT current_setting('pgseal.tenant', true)").fetchone()
    assert row is not None
    return row[0] or None


@pytest.fixture(scope="module")
def roles(pg: Any, sealing_proxy: Any) -> tuple[str, ...]:
    """Login roles for decrypt_roles and cross_tenant_roles, with table privileges."""
    for role in ROLES:
        pg.execute(
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') "
            f"THEN CREATE ROLE {role} LOGIN; END IF; END $$"
        )
        pg.execute(
            f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}; "
            f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}"
        )
    return ROLES


@pytest.fixture
def conn(sealing_proxy: Any) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(sealing_proxy.dsn(), autocommit=True) as c:
        yield c


def _insert_dossier(conn: psycopg.Connection[Any], tenant: str, summary: str) -> int:
    """A dossiers row of `tenant`, written as that session tenant (decrypt_roles of
    dossiers: pgseal_app and the superuser, not pgseal_clerk)."""
    conn.execute(f"SET pgseal.tenant = '{tenant}'")
    row = conn.execute(
        "INSERT INTO dossiers (tenant_id, summary) VALUES (%s, %s) RETURNING id",
        [tenant, summary],
    ).fetchone()
    assert row is not None
    return int(row[0])


def _insert_patient(conn: psycopg.Connection[Any], tenant: str, ssn: str, name: str) -> int:
    row = conn.execute(
        "INSERT INTO patients (tenant_id, ssn, name, dob, profile) "
        "VALUES (%s, %s, %s, %s, %s) RETURNING id",
        [tenant, ssn, name, "1990-05-06", f'{{"t": "{tenant}"}}'],
    ).fetchone()
    assert row is not None
    return int(row[0])


# --- cross-tenant reads and writes ------------------------------------------------------


def test_cross_tenant_reads_and_writes_refused(conn: psycopg.Connection[Any], pg: Any) -> None:
    a, b = _tenant("a"), _tenant("b")
    conn.execute(f"SET pgseal.tenant = '{a}'")
    a_id = _insert_patient(conn, a, "ssn-a", "Ann")
    conn.execute(f"SET pgseal.tenant = '{b}'")
    b_id = _insert_patient(conn, b, "ssn-b", "Bob")
    # read A's row as B: refused, whatever the statement looks like
    for query, params in (
        ("SELECT name FROM patients WHERE id = %s", [a_id]),
        ("SELECT * FROM patients WHERE id = %s", [a_id]),
        ("SELECT tenant_id, name FROM patients WHERE tenant_id = %s", [a]),
        ("SELECT name FROM patients WHERE tenant_id = %s AND ssn = %s", [a, "ssn-a"]),
        ("SELECT p.name FROM patients p LEFT JOIN plain_items i ON true WHERE p.id = %s", [a_id]),
    ):
        assert _sqlstate(lambda q=query, p=params: conn.execute(q, p).fetchall()) == DENIED, query
    # the same through the simple protocol
    assert (
        _sqlstate(lambda: conn.execute(f"SELECT name FROM patients WHERE id = {a_id}").fetchall())
        == DENIED
    )
    # B's own row is fine; A's ssn searched as B finds nothing (sealed under B's key)
    assert conn.execute("SELECT name FROM patients WHERE id = %s", [b_id]).fetchall() == [("Bob",)]
    assert conn.execute("SELECT id FROM patients WHERE ssn = %s", ["ssn-a"]).fetchall() == []
    # writes into A's rows as B: refused, nothing changes
    before = pg.execute(f"SELECT name, ssn FROM patients WHERE id = {a_id}")
    for query, params in (
        ("INSERT INTO patients (tenant_id, ssn, name) VALUES (%s, %s, %s)", [a, "x", "Eve"]),
        (
            "INSERT INTO patients (tenant_id, ssn, name) VALUES (%s, %s, %s), (%s, %s, %s)",
            [b, "y", "ok", a, "z", "Eve"],
        ),
        ("UPDATE patients SET name = %s WHERE tenant_id = %s", ["Eve", a]),
        ("UPDATE patients SET name = %s WHERE tenant_id = %s AND id = %s", ["Eve", a, a_id]),
        (
            "INSERT INTO patients (tenant_id, ssn, name) VALUES (%s, %s, %s) "
            "ON CONFLICT (tenant_id, ssn) DO UPDATE SET name = EXCLUDED.name",
            [a, "ssn-a", "Eve"],
        ),
    ):
        assert _sqlstate(conn.execute, query, params) == DENIED, query
    assert (
        _sqlstate(
            conn.execute, f"INSERT INTO patients (tenant_id, ssn, name) VALUES ('{a}', 'x', 'Eve')"
        )
        == DENIED
    )
    assert pg.execute(f"SELECT name, ssn FROM patients WHERE id = {a_id}") == before
    assert pg.execute(f"SELECT count(*) FROM patients WHERE tenant_id = '{b}'") == [(1,)]
    # and no tenant at all: protected reads and writes refused, plain ones fine
    conn.execute("RESET pgseal.tenant")
    assert (
        _sqlstate(
            lambda: conn.execute("SELECT name FROM patients WHERE id = %s", [b_id]).fetchall()
        )
        == DENIED
    )
    assert (
        _sqlstate(conn.execute, "INSERT INTO patients (tenant_id, ssn) VALUES (%s, %s)", [b, "n"])
        == DENIED
    )
    assert conn.execute("SELECT tenant_id FROM patients WHERE id = %s", [b_id]).fetchall() == [(b,)]


@pytest.mark.asyncio
async def test_cross_tenant_refused_with_asyncpg(sealing_proxy: Any) -> None:
    import asyncpg

    a, b = _tenant("aa"), _tenant("ab")
    conn_a = await asyncpg.connect(sealing_proxy.dsn(), server_settings={"pgseal.tenant": a})
    conn_b = await asyncpg.connect(sealing_proxy.dsn(), server_settings={"pgseal.tenant": b})
    try:
        a_id = await conn_a.fetchval(
            "INSERT INTO patients (tenant_id, ssn, name) VALUES ($1, $2, $3) RETURNING id",
            a,
            "s",
            "Ann",
        )
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn_b.fetch("SELECT name FROM patients WHERE id = $1", a_id)
        assert info.value.sqlstate == DENIED
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn_b.execute(
                "INSERT INTO patients (tenant_id, ssn, name) VALUES ($1, $2, $3)", a, "s2", "Eve"
            )
        assert info.value.sqlstate == DENIED
        assert await conn_a.fetchval("SELECT name FROM patients WHERE id = $1", a_id) == "Ann"
        assert await conn_b.fetchval("SELECT current_setting('pgseal.tenant')") == b
    finally:
        await conn_a.close()
        await conn_b.close()


# --- moved cells -----------------------------------------------------------------------


def test_cells_moved_to_another_tenants_row_never_open_wrongly(
    conn: psycopg.Connection[Any], pg: Any
) -> None:
    a, b = _tenant("ma"), _tenant("mb")
    conn.execute(f"SET pgseal.tenant = '{a}'")
    a_id = _insert_patient(conn, a, "ssn-ma", "Secret of A")
    conn.execute(f"SET pgseal.tenant = '{b}'")
    b_id = _insert_patient(conn, b, "ssn-mb", "Name of B")
    # an attacker with SQL access copies A's cells into B's row
    pg.execute(
        f"UPDATE patients SET name = src.name, ssn = src.ssn FROM patients src "
        f"WHERE src.id = {a_id} AND patients.id = {b_id}"
    )
    # B reads its own row: the cells are A's, refused
    for query in (
        "SELECT name FROM patients WHERE id = %s",
        "SELECT tenant_id, name FROM patients WHERE id = %s",
        "SELECT * FROM patients WHERE id = %s",
    ):
        state = _sqlstate(lambda q=query: conn.execute(q, [b_id]).fetchall())
        assert state in (DENIED, "XX001"), (query, state)
    # A reads B's row: the cell opens under A's key, but the row is B's: never "Secret of A" as B's
    conn.execute(f"SET pgseal.tenant = '{a}'")
    for query, params in (
        ("SELECT tenant_id, name FROM patients WHERE id = %s", [b_id]),
        ("SELECT * FROM patients WHERE id = %s", [b_id]),
        ("SELECT name FROM patients WHERE tenant_id = %s AND id = %s", [b, b_id]),
        (f"SELECT tenant_id, name FROM patients WHERE id = {b_id}", None),
    ):
        state = _sqlstate(lambda q=query, p=params: conn.execute(q, p).fetchall())
        assert state in (DENIED, "XX001"), (query, state)
    # A's own row still reads fine
    assert conn.execute(
        "SELECT tenant_id, name FROM patients WHERE id = %s", [a_id]
    ).fetchall() == [(a, "Secret of A")]


def test_cells_moved_in_a_trusted_table_never_open_wrongly(
    conn: psycopg.Connection[Any], pg: Any
) -> None:
    a, b = _tenant("pa"), _tenant("pb")
    ids = []
    for tenant in (a, b):
        row = conn.execute(
            "INSERT INTO payments (tenant_id, card_number, amount) "
            "VALUES (%s, %s, %s) RETURNING id",
            [tenant, f"card-{tenant}", "10.00"],
        ).fetchone()
        assert row is not None
        ids.append(row[0])
    pg.execute(
        f"UPDATE payments SET card_number = src.card_number FROM payments src "
        f"WHERE src.id = {ids[0]} AND payments.id = {ids[1]}"
    )
    row = conn.execute(
        "SELECT tenant_id, card_number FROM payments WHERE id = %s", [ids[1]]
    ).fetchone()
    # on_denied null for payments: a cell that does not belong to the row reads as NULL or fails
    assert row is None or row == (b, None), row


def test_cells_moved_to_another_column_or_table_fail_cleanly(
    conn: psycopg.Connection[Any], pg: Any
) -> None:
    a = _tenant("mc")
    conn.execute(f"SET pgseal.tenant = '{a}'")
    a_id = _insert_patient(conn, a, "ssn-mc", "Name MC")
    other_id = _insert_patient(conn, a, "ssn-mc2", "Other MC")
    note = conn.execute(
        "INSERT INTO notes (body, rating) VALUES (%s, %s) RETURNING id", ["note", 3]
    ).fetchone()
    assert note is not None
    moves = [
        f"UPDATE patients SET profile = name WHERE id = {other_id}",  # text cell into jsonb column
        f"UPDATE patients SET dob = ssn WHERE id = {other_id}",  # deterministic cell, other column
        f"UPDATE patients SET name = ssn WHERE id = {other_id}",  # same type, other column
        f"UPDATE notes SET body = (SELECT name FROM patients WHERE id = {a_id}) "
        f"WHERE id = {note[0]}",
        # not a cell at all
        f"UPDATE patients SET balance = '\\x0101deadbeef'::bytea WHERE id = {other_id}",
    ]
    checks = [
        ("SELECT profile FROM patients WHERE id = %s", other_id),
        ("SELECT dob FROM patients WHERE id = %s", other_id),
        ("SELECT name FROM patients WHERE id = %s", other_id),
        ("SELECT body FROM notes WHERE id = %s", note[0]),
        ("SELECT balance FROM patients WHERE id = %s", other_id),
    ]
    for move, (query, rid) in zip(moves, checks, strict=True):
        pg.execute(move)
        for binary in (False, True):
            with pytest.raises(psycopg.Error) as info:
                conn.cursor(binary=binary).execute(query, [rid]).fetchall()
            assert info.value.sqlstate == "XX001", (move, info.value)
            assert "pgseal" in str(info.value)
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the session goes on
    # the untouched row is fine
    assert conn.execute("SELECT name FROM patients WHERE id = %s", [a_id]).fetchall() == [
        ("Name MC",)
    ]


# --- SET LOCAL, transactions, RESET -----------------------------------------------------


def test_set_local_ends_with_the_transaction(conn: psycopg.Connection[Any]) -> None:
    a, b = _tenant("la"), _tenant("lb")
    conn.execute(f"SET pgseal.tenant = '{b}'")
    b_id = _insert_patient(conn, b, "ssn-lb", "B")
    conn.execute(f"SET pgseal.tenant = '{a}'")
    for ending in ("COMMIT", "ROLLBACK"):
        conn.execute("BEGIN")
        conn.execute(f"SET LOCAL pgseal.tenant = '{b}'")
        assert _current_setting(conn) == b
        assert conn.execute("SELECT name FROM patients WHERE id = %s", [b_id]).fetchall() == [
            ("B",)
        ]
        conn.execute(ending)
        assert _current_setting(conn) == a
        assert (
            _sqlstate(
                lambda: conn.execute("SELECT name FROM patients WHERE id = %s", [b_id]).fetchall()
            )
            == DENIED
        )
    # a SET (not LOCAL) in a rolled-back transaction is undone too; in a committed one it stays
    with pytest.raises(psycopg.errors.UndefinedTable), conn.transaction():
        conn.execute(f"SET pgseal.tenant = '{b}'")
        conn.execute("SELECT * FROM no_such_table")
    assert _current_setting(conn) == a
    assert (
        _sqlstate(
            lambda: conn.execute("SELECT name FROM patients WHERE id = %s", [b_id]).fetchall()
        )
        == DENIED
    )
    with conn.transaction():
        conn.execute(f"SET pgseal.tenant = '{b}'")
    assert _current_setting(conn) == b
    assert conn.execute("SELECT name FROM patients WHERE id = %s", [b_id]).fetchall() == [("B",)]
    # SET LOCAL outside a transaction does nothing (PostgreSQL warns)
    conn.execute(f"SET LOCAL pgseal.tenant = '{a}'")
    assert _current_setting(conn) == b


def test_savepoints_undo_and_keep_the_tenant_as_postgresql_does(
    conn: psycopg.Connection[Any],
) -> None:
    """psycopg's nested transactions are SAVEPOINT / ROLLBACK TO / RELEASE: a tenant set
    inside a rolled-back savepoint is undone, and the next values are sealed and read under
    the tenant PostgreSQL and the application have, not the one undone."""
    a, b = _tenant("sa"), _tenant("sb")
    conn.execute(f"SET pgseal.tenant = '{b}'")
    with conn.transaction():
        conn.execute(f"SET pgseal.tenant = '{a}'")  # in the block, before the savepoint
        with pytest.raises(psycopg.errors.UndefinedTable), conn.transaction():  # SAVEPOINT
            conn.execute(f"SET pgseal.tenant = '{b}'")
            conn.execute("SELECT * FROM no_such_table")
        # ROLLBACK TO SAVEPOINT: back to a (not to b, the value before the block)
        assert _current_setting(conn) == a
        row = conn.execute(
            "INSERT INTO notes (body) VALUES (%s) RETURNING id", ["written as a"]
        ).fetchone()
        assert row is not None

        def read_note() -> list[Any]:
            return conn.execute("SELECT body FROM notes WHERE id = %s", [row[0]]).fetchall()

        with conn.transaction():  # SAVEPOINT ... RELEASE: the SET LOCAL stays
            conn.execute(f"SET LOCAL pgseal.tenant = '{b}'")
        assert _current_setting(conn) == b
        assert _sqlstate(read_note) == DENIED
    # The block committed: the SET LOCAL ended with it, the SET of a stays.
    assert _current_setting(conn) == a
    assert conn.execute("SELECT body FROM notes WHERE id = %s", [row[0]]).fetchall() == [
        ("written as a",)
    ]
    conn.execute(f"SET pgseal.tenant = '{b}'")
    assert _sqlstate(read_note) == DENIED
    # Named savepoints in SQL, quoted and not, several deep.
    conn.execute(f"SET pgseal.tenant = '{a}'")
    conn.execute("BEGIN")
    conn.execute('SAVEPOINT "Outer"')
    conn.execute(f"SET pgseal.tenant = '{b}'")
    conn.execute("SAVEPOINT inner_one")
    conn.execute(f"SET pgseal.tenant = '{a}'")
    conn.execute("ROLLBACK TO inner_one")
    assert _current_setting(conn) == b
    conn.execute('ROLLBACK WORK TO SAVEPOINT "Outer"')
    assert _current_setting(conn) == a
    assert conn.execute("SELECT body FROM notes WHERE id = %s", [row[0]]).fetchall() == [
        ("written as a",)
    ]
    conn.execute("ROLLBACK")


def test_set_local_in_pipeline_mode(conn: psycopg.Connection[Any]) -> None:
    a, b = _tenant("pla"), _tenant("plb")
    conn.execute(f"SET pgseal.tenant = '{b}'")
    b_id = _insert_patient(conn, b, "ssn-plb", "PB")
    conn.execute(f"SET pgseal.tenant = '{a}'")
    with conn.pipeline():
        with conn.transaction():
            conn.execute(f"SET LOCAL pgseal.tenant = '{b}'")
            cur = conn.execute("SELECT name FROM patients WHERE id = %s", [b_id])
        after = conn.execute("SELECT current_setting('pgseal.tenant')")
    assert cur.fetchall() == [("PB",)]
    assert after.fetchall() == [(a,)]
    assert (
        _sqlstate(
            lambda: conn.execute("SELECT name FROM patients WHERE id = %s", [b_id]).fetchall()
        )
        == DENIED
    )
    # SET in pipeline mode (Parse/Bind/Execute) is tracked like the simple protocol's
    with conn.pipeline():
        conn.execute(f"SET pgseal.tenant = '{b}'")
        cur = conn.execute("SELECT name FROM patients WHERE id = %s", [b_id])
    assert cur.fetchall() == [("PB",)]
    with conn.pipeline():
        conn.execute("RESET pgseal.tenant")
    assert _current_setting(conn) is None
    assert (
        _sqlstate(
            lambda: conn.execute("SELECT name FROM patients WHERE id = %s", [b_id]).fetchall()
        )
        == DENIED
    )
    # one pipeline, two tenants: each statement runs under the tenant set before it
    with conn.pipeline():
        conn.execute(f"SET pgseal.tenant = '{a}'")
        ins = conn.execute(
            "INSERT INTO patients (tenant_id, ssn, name) VALUES (%s, %s, %s) RETURNING id, name",
            [a, "ssn-pla", "PA"],
        )
        conn.execute(f"SET pgseal.tenant = '{b}'")
        read_b = conn.execute("SELECT name FROM patients WHERE id = %s", [b_id])
        conn.execute(f"SET pgseal.tenant = '{a}'")
        read_a = conn.execute("SELECT name FROM patients WHERE ssn = %s", ["ssn-pla"])
    _, name = ins.fetchone()  # type: ignore[misc]
    assert name == "PA" and read_b.fetchall() == [("PB",)] and read_a.fetchall() == [("PA",)]


def test_several_statements_in_one_query_each_under_its_tenant(
    conn: psycopg.Connection[Any], sealing_proxy: Any
) -> None:
    a, b = _tenant("ma"), _tenant("mb")
    script = (
        f"SET pgseal.tenant = '{a}'; "
        f"INSERT INTO notes (body) VALUES ('note of {a}'); "
        f"BEGIN; SET LOCAL pgseal.tenant = '{b}'; "
        f"INSERT INTO patients (tenant_id, ssn, name) "
        f"VALUES ('{b}', 'ssn-{b}', 'name of {b}'); COMMIT; "
        f"INSERT INTO patients (tenant_id, ssn, name) VALUES ('{a}', 'ssn-{a}', 'name of {a}'); "
        f"SELECT name FROM patients WHERE ssn = 'ssn-{a}'; "
        f"SET pgseal.tenant = '{b}'; SELECT name FROM patients WHERE ssn = 'ssn-{b}'"
    )
    out = subprocess.run(
        [
            "psql",
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            sealing_proxy.dsn(),
            "-c",
            script,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["name", "of", a, "name", "of", b], out.stdout
    conn.execute(f"SET pgseal.tenant = '{a}'")
    assert conn.execute(
        "SELECT body FROM notes WHERE body IS NOT NULL ORDER BY id DESC LIMIT 1"
    ).fetchall() == [(f"note of {a}",)]


@pytest.mark.asyncio
async def test_set_local_with_asyncpg_transactions(sealing_proxy: Any) -> None:
    import asyncpg

    a, b = _tenant("ala"), _tenant("alb")
    conn = await asyncpg.connect(sealing_proxy.dsn(), server_settings={"pgseal.tenant": b})
    try:
        b_id = await conn.fetchval(
            "INSERT INTO patients (tenant_id, ssn, name) VALUES ($1, $2, $3) RETURNING id",
            b,
            "s",
            "AB",
        )
        await conn.execute(f"SET pgseal.tenant = '{a}'")
        async with conn.transaction():
            await conn.execute(f"SET LOCAL pgseal.tenant = '{b}'")
            assert await conn.fetchval("SELECT name FROM patients WHERE id = $1", b_id) == "AB"
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.fetchval("SELECT name FROM patients WHERE id = $1", b_id)
        assert info.value.sqlstate == DENIED
        with pytest.raises(ZeroDivisionError):
            async with conn.transaction():
                await conn.execute(f"SET LOCAL pgseal.tenant = '{b}'")
                raise ZeroDivisionError
        assert await conn.fetchval("SELECT current_setting('pgseal.tenant')") == a
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.fetchval("SELECT name FROM patients WHERE id = $1", b_id)
        assert info.value.sqlstate == DENIED
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "reset", ["RESET pgseal.tenant", "SET pgseal.tenant TO DEFAULT", "RESET ALL", "DISCARD ALL"]
)
def test_reset_clears_the_session_tenant(conn: psycopg.Connection[Any], reset: str) -> None:
    a = _tenant("r")
    conn.execute(f"SET pgseal.tenant = '{a}'")
    a_id = _insert_patient(conn, a, "ssn-r", "R")
    conn.execute(reset)
    assert _current_setting(conn) is None
    assert (
        _sqlstate(
            lambda: conn.execute("SELECT name FROM patients WHERE id = %s", [a_id]).fetchall()
        )
        == DENIED
    )
    assert (
        _sqlstate(conn.execute, "INSERT INTO patients (tenant_id, ssn) VALUES (%s, %s)", [a, "r2"])
        == DENIED
    )


# --- startup options -------------------------------------------------------------------


def test_startup_options_set_the_tenant(sealing_proxy: Any) -> None:
    a, b = _tenant("so"), _tenant("so2")
    with psycopg.connect(
        sealing_proxy.dsn(), autocommit=True, options=f"-c pgseal.tenant={a}"
    ) as conn:
        assert _current_setting(conn) == a  # the setting reached PostgreSQL
        a_id = _insert_patient(conn, a, "ssn-so", "SO")
        assert conn.execute("SELECT name FROM patients WHERE id = %s", [a_id]).fetchall() == [
            ("SO",)
        ]
        conn.execute(f"SET pgseal.tenant = '{b}'")
        assert _current_setting(conn) == b
        assert (
            _sqlstate(
                lambda: conn.execute("SELECT name FROM patients WHERE id = %s", [a_id]).fetchall()
            )
            == DENIED
        )
        # RESET goes back to the startup value, in PostgreSQL and in the proxy alike
        for reset in ("RESET pgseal.tenant", "RESET ALL", "DISCARD ALL"):
            conn.execute(f"SET pgseal.tenant = '{b}'")
            conn.execute(reset)
            assert _current_setting(conn) == a, reset
            assert conn.execute("SELECT name FROM patients WHERE id = %s", [a_id]).fetchall() == [
                ("SO",)
            ], reset
    # in the DSN, as PGOPTIONS would give it
    with psycopg.connect(
        sealing_proxy.dsn(options=f"-c%20pgseal.tenant%3D{a}"), autocommit=True
    ) as conn:
        assert _current_setting(conn) == a
        assert conn.execute("SELECT name FROM patients WHERE id = %s", [a_id]).fetchall() == [
            ("SO",)
        ]
    # psql with PGOPTIONS
    import os

    out = subprocess.run(
        [
            "psql",
            "-X",
            "-A",
            "-t",
            sealing_proxy.dsn(),
            "-c",
            f"SELECT current_setting('pgseal.tenant'), name FROM patients WHERE id = {a_id}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PGOPTIONS": f"-c pgseal.tenant={a}"},
    )
    assert out.stdout.strip() == f"{a}|SO", out


@pytest.mark.asyncio
async def test_asyncpg_server_settings_set_the_tenant(sealing_proxy: Any) -> None:
    import asyncpg

    a = _tenant("ss")
    conn = await asyncpg.connect(sealing_proxy.dsn(), server_settings={"pgseal.tenant": a})
    try:
        assert await conn.fetchval("SELECT current_setting('pgseal.tenant')") == a
        a_id = await conn.fetchval(
            "INSERT INTO patients (tenant_id, ssn, name) VALUES ($1, $2, $3) RETURNING id",
            a,
            "s",
            "SS",
        )
        await conn.execute("SET pgseal.tenant = 'someone-else'")
        await conn.execute("RESET ALL")
        assert await conn.fetchval("SELECT current_setting('pgseal.tenant')") == a
        assert await conn.fetchval("SELECT name FROM patients WHERE id = $1", a_id) == "SS"
    finally:
        await conn.close()


def test_set_config_of_the_tenant_is_refused(conn: psycopg.Connection[Any]) -> None:
    assert (
        _sqlstate(conn.execute, "SELECT set_config('pgseal.tenant', %s, false)", ["x"]) == "0A000"
    )
    assert _current_setting(conn) is None


# --- pools -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_asyncpg_pool_one_connection_many_tenants(sealing_proxy: Any) -> None:
    import asyncpg

    tenants = [_tenant(f"pool{k}") for k in range(6)]
    ids: dict[str, int] = {}
    pool = await asyncpg.create_pool(sealing_proxy.dsn(), min_size=1, max_size=1)
    try:
        for rounds in range(2):
            for tenant in tenants:
                async with pool.acquire() as conn:
                    await conn.execute(f"SET pgseal.tenant = '{tenant}'")
                    if rounds == 0:
                        ids[tenant] = await conn.fetchval(
                            "INSERT INTO patients (tenant_id, ssn, name) "
                            "VALUES ($1, $2, $3) RETURNING id",
                            tenant,
                            f"ssn-{tenant}",
                            f"name-{tenant}",
                        )
                    # the same prepared statements (asyncpg's cache), bound under each tenant
                    assert (
                        await conn.fetchval(
                            "SELECT name FROM patients WHERE ssn = $1", f"ssn-{tenant}"
                        )
                        == f"name-{tenant}"
                    )
                    assert (
                        await conn.fetchval("SELECT name FROM patients WHERE id = $1", ids[tenant])
                        == f"name-{tenant}"
                    )
                    other = tenants[(tenants.index(tenant) + 1) % len(tenants)]
                    if other in ids:
                        with pytest.raises(asyncpg.PostgresError) as info:
                            await conn.fetchval(
                                "SELECT name FROM patients WHERE id = $1", ids[other]
                            )
                        assert info.value.sqlstate == DENIED
        # released connections are reset (RESET ALL): the next user has no tenant
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT current_setting('pgseal.tenant', true)") in (
                None,
                "",
            )
            with pytest.raises(asyncpg.PostgresError) as info:
                await conn.fetchval("SELECT name FROM patients WHERE id = $1", ids[tenants[0]])
            assert info.value.sqlstate == DENIED
    finally:
        await pool.close()


@pytest.mark.asyncio
async def test_asyncpg_pool_concurrent_tenants(sealing_proxy: Any) -> None:
    import asyncpg

    tenants = [_tenant(f"cc{k}") for k in range(4)]

    async def setup(conn: Any) -> None:
        pass

    pool = await asyncpg.create_pool(sealing_proxy.dsn(), min_size=2, max_size=2, setup=setup)

    async def work(tenant: str, k: int) -> None:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(f"SET LOCAL pgseal.tenant = '{tenant}'")
            rid = await conn.fetchval(
                "INSERT INTO patients (tenant_id, ssn, name) VALUES ($1, $2, $3) RETURNING id",
                tenant,
                f"ssn-{k}",
                f"{tenant}-{k}",
            )
            await asyncio.sleep(0)
            assert (
                await conn.fetchval("SELECT name FROM patients WHERE id = $1", rid)
                == f"{tenant}-{k}"
            )
            assert (
                await conn.fetchval("SELECT name FROM patients WHERE ssn = $1", f"ssn-{k}")
                == f"{tenant}-{k}"
            )

    try:
        await asyncio.gather(*(work(t, k) for k in range(5) for t in tenants))
    finally:
        await pool.close()


def test_psycopg_pool_one_connection_many_tenants(sealing_proxy: Any) -> None:
    psycopg_pool = pytest.importorskip("psycopg_pool")

    tenants = [_tenant(f"pp{k}") for k in range(5)]
    ids: dict[str, int] = {}
    with psycopg_pool.ConnectionPool(
        sealing_proxy.dsn(), min_size=1, max_size=1, open=True, kwargs={"autocommit": True}
    ) as pool:
        for tenant in tenants:
            with pool.connection() as conn:
                conn.execute(f"SET pgseal.tenant = '{tenant}'")
                ids[tenant] = _insert_patient(conn, tenant, f"ssn-{tenant}", f"n-{tenant}")
        for tenant in reversed(tenants):
            with pool.connection() as conn:
                conn.execute(f"SET pgseal.tenant = '{tenant}'")
                for other, rid in ids.items():
                    query = "SELECT name FROM patients WHERE id = %s"
                    if other == tenant:
                        assert conn.execute(query, [rid], prepare=True).fetchall() == [
                            (f"n-{other}",)
                        ]
                    else:
                        assert (
                            _sqlstate(
                                lambda r=rid, q=query: conn.execute(q, [r], prepare=True).fetchall()
                            )
                            == DENIED
                        )
                assert conn.execute(
                    "SELECT name FROM patients WHERE ssn = %s", [f"ssn-{tenant}"], prepare=True
                ).fetchall() == [(f"n-{tenant}",)]
    # a pool whose connections are handed out inside transactions with SET LOCAL
    with psycopg_pool.ConnectionPool(
        sealing_proxy.dsn(), min_size=1, max_size=1, open=True
    ) as pool:
        for tenant in tenants:
            with pool.connection() as conn:
                conn.execute(f"SET LOCAL pgseal.tenant = '{tenant}'")
                assert conn.execute(
                    "SELECT name FROM patients WHERE id = %s", [ids[tenant]]
                ).fetchall() == [(f"n-{tenant}",)]
            with pool.connection() as conn:  # committed: the tenant is gone
                assert _current_setting(conn) is None
                assert (
                    _sqlstate(
                        lambda t=tenant: conn.execute(
                            "SELECT name FROM patients WHERE id = %s", [ids[t]]
                        ).fetchall()
                    )
                    == DENIED
                )


# --- trusted isolation, session-tenant tables --------------------------------------------


def test_trusted_isolation_needs_no_session_tenant(conn: psycopg.Connection[Any]) -> None:
    a, b = _tenant("ta"), _tenant("tb")
    assert _current_setting(conn) is None
    for tenant in (a, b):
        conn.execute(
            "INSERT INTO payments (tenant_id, card_number, amount, paid_at) "
            "VALUES (%s, %s, %s, %s)",
            [tenant, "4111-1111", "12.34", "2024-01-01 00:00:00+00"],
        )
    rows = conn.execute(
        "SELECT tenant_id, card_number, amount FROM payments WHERE tenant_id IN (%s, %s) "
        "ORDER BY tenant_id",
        [a, b],
    ).fetchall()
    assert [(r[0], r[1], str(r[2])) for r in rows] == [
        (a, "4111-1111", "12.34"),
        (b, "4111-1111", "12.34"),
    ]
    # the same card number is a different cell per tenant: search needs the row's tenant
    assert conn.execute(
        "SELECT tenant_id FROM payments WHERE tenant_id = %s AND card_number = %s", [b, "4111-1111"]
    ).fetchall() == [(b,)]
    assert conn.execute(
        f"SELECT tenant_id FROM payments WHERE tenant_id = '{a}' AND card_number = '4111-1111'"
    ).fetchall() == [(a,)]
    assert (
        _sqlstate(
            conn.execute, "SELECT tenant_id FROM payments WHERE card_number = %s", ["4111-1111"]
        )
        == DENIED
    )
    # a session tenant does not restrict a trusted table
    conn.execute(f"SET pgseal.tenant = '{a}'")
    assert (
        len(
            conn.execute(
                "SELECT card_number FROM payments WHERE tenant_id IN (%s, %s)", [a, b]
            ).fetchall()
        )
        == 2
    )
    conn.execute(f"INSERT INTO payments (tenant_id, card_number) VALUES ('{b}', 'lit-card')")


def test_session_tenant_table(conn: psycopg.Connection[Any]) -> None:
    a, b = _tenant("na"), _tenant("nb")
    assert _sqlstate(conn.execute, "INSERT INTO notes (body) VALUES (%s)", ["no tenant"]) == DENIED
    conn.execute(f"SET pgseal.tenant = '{a}'")
    row = conn.execute(
        "INSERT INTO notes (body, rating) VALUES (%s, %s) RETURNING id, body, rating", ["mine", 5]
    ).fetchone()
    assert row is not None and row[1:] == ("mine", 5)
    assert conn.execute("SELECT body, rating FROM notes WHERE id = %s", [row[0]]).fetchall() == [
        ("mine", 5)
    ]
    conn.execute(f"SET pgseal.tenant = '{b}'")
    assert (
        _sqlstate(lambda: conn.execute("SELECT body FROM notes WHERE id = %s", [row[0]]).fetchall())
        == DENIED
    )
    assert conn.execute("SELECT count(*) FROM notes WHERE id = %s", [row[0]]).fetchall() == [(1,)]
    conn.execute("UPDATE notes SET body = %s WHERE id = %s", ["B wrote", row[0]])  # B's key now
    assert conn.execute("SELECT body FROM notes WHERE id = %s", [row[0]]).fetchall() == [
        ("B wrote",)
    ]
    conn.execute(f"SET pgseal.tenant = '{a}'")
    assert (
        _sqlstate(lambda: conn.execute("SELECT body FROM notes WHERE id = %s", [row[0]]).fetchall())
        == DENIED
    )


# --- roles --------------------------------------------------------------------------------


def test_on_denied_null_gives_null(conn: psycopg.Connection[Any]) -> None:
    a, b = _tenant("oa"), _tenant("ob")
    ids = {}
    for tenant in (a, b):
        conn.execute(f"SET pgseal.tenant = '{tenant}'")
        row = conn.execute(
            "INSERT INTO contacts (tenant_id, email, phone) VALUES (%s, %s, %s) RETURNING id",
            [tenant, f"{tenant}@example.org", "555"],
        ).fetchone()
        assert row is not None
        ids[tenant] = row[0]
    conn.execute(f"SET pgseal.tenant = '{a}'")
    rows = conn.execute(
        "SELECT tenant_id, email, phone FROM contacts WHERE id IN (%s, %s) ORDER BY tenant_id",
        [ids[a], ids[b]],
    ).fetchall()
    assert rows == [(a, f"{a}@example.org", "555"), (b, None, None)]
    rows = (
        conn.cursor(binary=True)
        .execute("SELECT * FROM contacts WHERE id = %s", [ids[b]])
        .fetchall()
    )
    assert rows == [(ids[b], b, None, None)]


def test_decrypt_roles(roles: Any, sealing_proxy: Any, pg: Any) -> None:
    a = _tenant("dr")
    with psycopg.connect(sealing_proxy.dsn(user="pgseal_app"), autocommit=True) as app:
        app.execute(f"SET pgseal.tenant = '{a}'")
        cid = app.execute(
            "INSERT INTO contacts (tenant_id, email, phone) VALUES (%s, %s, %s) RETURNING id",
            [a, "x@example.org", "1"],
        ).fetchone()[0]  # type: ignore[index]
        did = _insert_dossier(app, a, "classified")
        assert app.execute("SELECT summary FROM dossiers WHERE id = %s", [did]).fetchall() == [
            ("classified",)
        ]
    with psycopg.connect(sealing_proxy.dsn(user="pgseal_clerk"), autocommit=True) as clerk:
        clerk.execute(f"SET pgseal.tenant = '{a}'")
        # outside decrypt_roles: on_denied null -> NULL, on_denied error -> 42501
        assert clerk.execute(
            "SELECT email, phone FROM contacts WHERE id = %s", [cid]
        ).fetchall() == [(None, None)]
        assert (
            _sqlstate(
                lambda: clerk.execute(
                    "SELECT summary FROM dossiers WHERE id = %s", [did]
                ).fetchall()
            )
            == DENIED
        )
        assert clerk.execute("SELECT id FROM dossiers WHERE id = %s", [did]).fetchall() == [(did,)]
        # the clerk may still write (it never gets plaintext back)
        clerk.execute(
            "INSERT INTO dossiers (tenant_id, summary) VALUES (%s, %s)", [a, "from clerk"]
        )
    # SET ROLE / RESET ROLE on a superuser session change what the proxy allows
    with psycopg.connect(sealing_proxy.dsn(), autocommit=True) as su:
        su.execute(f"SET pgseal.tenant = '{a}'")
        assert su.execute("SELECT summary FROM dossiers WHERE id = %s", [did]).fetchall() == [
            ("classified",)
        ]
        su.execute("SET ROLE pgseal_clerk")
        assert (
            _sqlstate(
                lambda: su.execute("SELECT summary FROM dossiers WHERE id = %s", [did]).fetchall()
            )
            == DENIED
        )
        su.execute("RESET ROLE")
        assert su.execute("SELECT summary FROM dossiers WHERE id = %s", [did]).fetchall() == [
            ("classified",)
        ]


def test_the_role_and_tenant_postgresql_starts_the_session_with(
    roles: Any, sealing_proxy: Any, pg: Any
) -> None:
    """`options=-c role=...` and ALTER ROLE ... SET: PostgreSQL starts the session with
    another role than the login user, and a tenant the startup packet never named. The
    proxy reads both at startup (current_user, current_setting) before any statement:
    pgseal_app (in decrypt_roles) running as pgseal_clerk (not) reads no plaintext, and
    RESET ROLE goes back to pgseal_clerk, as in PostgreSQL."""
    a = _tenant("sr")
    pg.execute("GRANT pgseal_clerk TO pgseal_app")
    with psycopg.connect(sealing_proxy.dsn(user="pgseal_app"), autocommit=True) as app:
        did = _insert_dossier(app, a, "startup-role")
    read = "SELECT summary FROM dossiers WHERE id = %s"
    with psycopg.connect(
        sealing_proxy.dsn(user="pgseal_app"),
        autocommit=True,
        options=f"-c role=pgseal_clerk -c pgseal.tenant={a}",
    ) as clerk:
        assert clerk.execute("SELECT current_user").fetchone() == ("pgseal_clerk",)
        assert _sqlstate(lambda: clerk.execute(read, [did]).fetchall()) == DENIED
        for reset in ("RESET ROLE", "RESET ALL", "DISCARD ALL"):
            clerk.execute(reset)
            clerk.execute(f"SET pgseal.tenant = '{a}'")
            assert _sqlstate(lambda: clerk.execute(read, [did]).fetchall()) == DENIED, reset
        clerk.execute("SET ROLE pgseal_app")  # the login user's own rights, explicitly
        assert clerk.execute(read, [did]).fetchall() == [("startup-role",)]
    # A tenant from the role's defaults, not from the startup packet.
    pg.execute(f"ALTER ROLE pgseal_app SET pgseal.tenant = '{a}'")
    try:
        with psycopg.connect(sealing_proxy.dsn(user="pgseal_app"), autocommit=True) as app:
            assert _current_setting(app) == a
            assert app.execute(read, [did]).fetchall() == [("startup-role",)]
            app.execute("SET pgseal.tenant = 'someone-else'")
            app.execute("RESET pgseal.tenant")  # back to the role's default, in both
            assert app.execute(read, [did]).fetchall() == [("startup-role",)]
    finally:
        pg.execute("ALTER ROLE pgseal_app RESET pgseal.tenant")


def test_cross_tenant_roles_read_every_tenant(roles: Any, sealing_proxy: Any) -> None:
    a, b = _tenant("xa"), _tenant("xb")
    ids = {}
    with psycopg.connect(sealing_proxy.dsn(), autocommit=True) as conn:
        for tenant in (a, b):
            conn.execute(f"SET pgseal.tenant = '{tenant}'")
            ids[tenant] = _insert_patient(conn, tenant, f"ssn-{tenant}", f"name-{tenant}")
    with psycopg.connect(sealing_proxy.dsn(user="auditor"), autocommit=True) as auditor:
        # no session tenant needed to read
        rows = auditor.execute(
            "SELECT tenant_id, name FROM patients WHERE id IN (%s, %s) ORDER BY tenant_id",
            [ids[a], ids[b]],
        ).fetchall()
        assert rows == [(a, f"name-{a}"), (b, f"name-{b}")]
        # with a session tenant, another tenant's rows are still readable and searchable
        auditor.execute(f"SET pgseal.tenant = '{a}'")
        assert auditor.execute(
            "SELECT name FROM patients WHERE tenant_id = %s AND ssn = %s", [b, f"ssn-{b}"]
        ).fetchall() == [(f"name-{b}",)]
        # but never written
        assert (
            _sqlstate(
                auditor.execute,
                "INSERT INTO patients (tenant_id, ssn, name) VALUES (%s, %s, %s)",
                [b, "x", "y"],
            )
            == DENIED
        )
        assert (
            _sqlstate(
                auditor.execute, "UPDATE patients SET name = %s WHERE tenant_id = %s", ["y", b]
            )
            == DENIED
        )


def test_moved_cell_read_without_the_row_tenant(conn: psycopg.Connection[Any], pg: Any) -> None:
    """A statement that neither selects nor pins the row's tenant: the proxy reads the row
    tenant column too (hidden from the client), so a cell copied into another tenant's
    row is caught even when the reader is the cell's own tenant."""
    a, b = _tenant("ga"), _tenant("gb")
    conn.execute(f"SET pgseal.tenant = '{a}'")
    a_id = _insert_patient(conn, a, "ssn-ga", "Secret of A")
    conn.execute(f"SET pgseal.tenant = '{b}'")
    b_id = _insert_patient(conn, b, "ssn-gb", "Name of B")
    pg.execute(
        f"UPDATE patients SET name = src.name FROM patients src "
        f"WHERE src.id = {a_id} AND patients.id = {b_id}"
    )
    conn.execute(f"SET pgseal.tenant = '{a}'")
    state = _sqlstate(
        lambda: conn.execute("SELECT name FROM patients WHERE id = %s", [b_id]).fetchall()
    )
    assert state in (DENIED, "XX001")
    # RETURNING too: the copied cell comes back from a write that neither returns nor pins
    # the row's tenant (row-level security in PostgreSQL would stop the write; the proxy
    # alone does not see which rows a WHERE id = ... touches).
    for returning in (
        "UPDATE patients SET dob = NULL WHERE id = %s RETURNING name",
        "DELETE FROM patients WHERE id = %s RETURNING id, name",
    ):
        state = _sqlstate(lambda q=returning: conn.execute(q, [b_id]).fetchall())
        assert state in (DENIED, "XX001"), returning
    # ... while a write returning its own tenant's cells opens them, the added column unseen.
    cur = conn.execute("UPDATE patients SET dob = NULL WHERE id = %s RETURNING id, name", [a_id])
    assert [d.name for d in (cur.description or ())] == ["id", "name"]
    assert cur.fetchall() == [(a_id, "Secret of A")]


@pytest.mark.asyncio
async def test_the_row_tenant_column_the_proxy_adds_is_never_seen(
    sealing_proxy: Any, conn: psycopg.Connection[Any]
) -> None:
    """No driver sees the row tenant column the proxy adds to `SELECT name ... WHERE id`:
    psycopg (text, extended protocol and pipeline), asyncpg (binary; a prepared statement's
    attributes come from a Describe of the statement), psql (simple protocol)."""
    import asyncpg

    a = _tenant("hid")
    conn.execute(f"SET pgseal.tenant = '{a}'")
    ids = [_insert_patient(conn, a, f"ssn-h{i}", f"Name {i}") for i in range(2)]
    sql = "SELECT name, id FROM patients WHERE id = ANY(%s) ORDER BY id"
    cur = conn.execute(sql, [ids])
    assert [d.name for d in (cur.description or ())] == ["name", "id"]
    assert cur.fetchall() == [("Name 0", ids[0]), ("Name 1", ids[1])]
    with conn.pipeline():
        cur = conn.execute(sql, [ids])
        cur2 = conn.execute("SELECT name FROM patients p WHERE p.id = %s", [ids[1]])
    assert cur.fetchall() == [("Name 0", ids[0]), ("Name 1", ids[1])]
    assert [d.name for d in (cur2.description or ())] == ["name"]
    assert cur2.fetchall() == [("Name 1",)]

    conn_a = await asyncpg.connect(sealing_proxy.dsn(), server_settings={"pgseal.tenant": a})
    try:
        statement = await conn_a.prepare("SELECT name, id FROM patients WHERE id = $1")
        assert [attr.name for attr in statement.get_attributes()] == ["name", "id"]
        assert tuple(await statement.fetchrow(ids[0])) == ("Name 0", ids[0])
        rows = await conn_a.fetch("SELECT dob, name FROM patients WHERE id = $1", ids[1])
        assert [tuple(r) for r in rows] == [(datetime.date(1990, 5, 6), "Name 1")]
    finally:
        await conn_a.close()

    conn_a = await asyncpg.connect(sealing_proxy.dsn(), server_settings={"pgseal.tenant": a})
    try:
        update = "UPDATE patients SET dob = $2 WHERE id = $1 RETURNING name, id"
        statement = await conn_a.prepare(update)
        assert [attr.name for attr in statement.get_attributes()] == ["name", "id"]
        day = datetime.date(1991, 1, 1)
        assert tuple(await statement.fetchrow(ids[0], day)) == ("Name 0", ids[0])
    finally:
        await conn_a.close()

    out = subprocess.run(
        ["psql", "-X", "-q", "-A", "-F", "|", "-v", "ON_ERROR_STOP=1", sealing_proxy.dsn(), "-c",
         f"SET pgseal.tenant = '{a}'; SELECT name, id FROM patients WHERE id = {ids[0]}; "
         f"UPDATE patients SET dob = NULL WHERE id = {ids[1]} RETURNING name"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:2] == ["name|id", f"Name 0|{ids[0]}"]
    assert lines[3:5] == ["name", "Name 1"], lines

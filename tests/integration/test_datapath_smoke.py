import psycopg
import pytest

pytestmark = pytest.mark.integration


def test_insert_and_select_round_trip_text(sealing_proxy, pg) -> None:
    with psycopg.connect(sealing_proxy.dsn(), autocommit=True) as conn:
        conn.execute("SET pgseal.tenant = 'acme'")
        conn.execute(
            "INSERT INTO patients (tenant_id, ssn, name, dob, balance) VALUES (%s, %s, %s, %s, %s)",
            ["acme", "123-45-6789", "Alice SENTINEL", "1980-01-02", "12.50"],
        )
        row = conn.execute(
            "SELECT ssn, name, dob, balance FROM patients WHERE ssn = %s", ["123-45-6789"]
        ).fetchone()
        assert row is not None
        assert row[0] == "123-45-6789" and row[1] == "Alice SENTINEL"
        assert str(row[2]) == "1980-01-02" and str(row[3]) == "12.50"
    stored = pg.execute("SELECT ssn, name FROM patients")
    assert all(b"SENTINEL" not in bytes(v) for r in stored for v in r)


@pytest.mark.asyncio
async def test_asyncpg_binary_round_trip(sealing_proxy, pg) -> None:
    import datetime as dt
    import decimal

    import asyncpg

    conn = await asyncpg.connect(sealing_proxy.dsn(), server_settings={"pgseal.tenant": "globex"})
    try:
        await conn.execute(
            "INSERT INTO patients (tenant_id, ssn, name, dob, balance, profile) "
            "VALUES ($1, $2, $3, $4, $5, $6)",
            "globex", "999-00-1111", "Bob SENTINEL", dt.date(1975, 5, 6), decimal.Decimal("-3.25"),
            '{"b": 1, "a": [1, 2]}',
        )
        row = await conn.fetchrow("SELECT * FROM patients WHERE ssn = $1", "999-00-1111")
        assert row["name"] == "Bob SENTINEL"
        assert row["dob"] == dt.date(1975, 5, 6)
        assert row["balance"] == decimal.Decimal("-3.25")
        assert row["profile"] == '{"a": [1, 2], "b": 1}'
        assert row["tenant_id"] == "globex"
    finally:
        await conn.close()


def test_simple_protocol_literals_and_refusals(sealing_proxy, pg) -> None:
    import subprocess

    dsn = sealing_proxy.dsn()
    out = subprocess.run(
        ["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=0", dsn, "-c",
         "SET pgseal.tenant = 'initech'; "
         "INSERT INTO patients (tenant_id, ssn, name) "
         "VALUES ('initech', '555-55-5555', 'Carol SENTINEL'); "
         "SELECT name FROM patients WHERE ssn = '555-55-5555';",
         "-c", "SELECT name FROM patients WHERE name LIKE 'Car%'"],
        capture_output=True, text=True, timeout=30,
    )
    assert "Carol SENTINEL" in out.stdout, out
    assert "LIKE" in out.stderr and "public.patients.name" in out.stderr, out.stderr


def test_cross_tenant_read_is_refused(sealing_proxy) -> None:
    with psycopg.connect(sealing_proxy.dsn(), autocommit=True) as conn:
        conn.execute("SET pgseal.tenant = 'acme'")
        conn.execute(
            "INSERT INTO patients (tenant_id, ssn, name) VALUES (%s, %s, %s)", ["acme", "1", "x"]
        )
        conn.execute("SET pgseal.tenant = 'other'")
        with pytest.raises(psycopg.Error) as info:
            conn.execute("SELECT name FROM patients WHERE tenant_id = 'acme'").fetchall()
        assert info.value.sqlstate == "42501"
        with pytest.raises(psycopg.Error) as info:
            conn.execute("INSERT INTO patients (tenant_id, ssn) VALUES (%s, %s)", ["acme", "2"])
        assert info.value.sqlstate == "42501"
        # the connection is still usable
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_prepared_statement_with_literal_is_sealed_per_bind_tenant(sealing_proxy, pg) -> None:
    with psycopg.connect(sealing_proxy.dsn(), autocommit=True) as conn:
        for tenant in ("t1", "t2"):
            conn.execute(f"SET pgseal.tenant = '{tenant}'")
            conn.execute(
                "INSERT INTO patients (tenant_id, ssn, name) VALUES (%s, %s, 'LITERAL SENTINEL')",
                [tenant, f"lit-{tenant}"], prepare=True,
            )
            rows = conn.execute(
                "SELECT name FROM patients WHERE ssn = %s", [f"lit-{tenant}"], prepare=True
            ).fetchall()
            assert rows == [("LITERAL SENTINEL",)]
    assert not pg.execute(
        "SELECT 1 FROM patients WHERE position('LITERAL SENTINEL'::bytea in name) > 0"
    )


def test_messages_after_a_flushed_error_are_skipped_and_the_connection_goes_on(
    sealing_proxy, pg
) -> None:
    """An error answered on Flush, then a simple Query and a protected INSERT before the
    Sync: PostgreSQL skips both; through the proxy the same, nothing of them reaches the
    server, and the connection stays in step."""
    from proxy.wire import messages as m
    from tests.integration.test_protocol_robustness import RawConn

    with RawConn(sealing_proxy.host, sealing_proxy.port) as conn:
        conn.startup(options="-c pgseal.tenant=acme")
        conn.send(
            m.Parse("", "select 1/0").encode(),
            m.Bind("", "", (), (), ()).encode(),
            m.Execute("").encode(),
            m.FLUSH,
        )
        frames = [conn.read_frame(timeout=5) for _ in range(2)]
        assert [chr(f.type) for f in frames if f] == ["1", "E"]  # 1/0 fails at Bind
        conn.send(
            m.Query("SELECT 'skipped'").encode(),
            m.Parse(
                "",
                "INSERT INTO patients (tenant_id, ssn, name) "
                "VALUES ('acme', '1', 'SKIPPEDSENTINEL')",
            ).encode(),
            m.Bind("", "", (), (), ()).encode(),
            m.Execute("").encode(),
            m.SYNC,
        )
        assert [chr(f.type) for f in conn.read_until_ready()] == ["Z"]
        conn.send(m.Query("SELECT 'still in step'").encode())
        tail = conn.read_until_ready()
        assert [chr(f.type) for f in tail] == ["T", "D", "C", "Z"]
        assert m.decode_data_row(tail[1].body).values == (b"still in step",)
    stored = pg.execute("SELECT name FROM patients")
    assert all(b"SKIPPEDSENTINEL" not in bytes(v) for r in stored for v in r if v is not None)

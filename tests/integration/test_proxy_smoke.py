import asyncpg
import psycopg
import pytest

pytestmark = pytest.mark.integration


@pytest.mark.asyncio
async def test_asyncpg_through_proxy(proxy) -> None:
    conn = await asyncpg.connect(proxy.dsn())
    try:
        assert await conn.fetchval("select $1::int + 1", 41) == 42
    finally:
        await conn.close()


def test_psycopg_through_proxy(proxy) -> None:
    with psycopg.connect(proxy.dsn()) as conn:
        assert conn.execute("select %s::text || 'b'", ["a"]).fetchone() == ("ab",)

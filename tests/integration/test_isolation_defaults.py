"""A database whose default isolation is REPEATABLE READ (ALTER ROLE/DATABASE ... SET
default_transaction_isolation) must not change how pgseal's own transactions see each
other: they take an advisory lock, then read what the lock's last holder committed, which
only READ COMMITTED shows (a REPEATABLE READ snapshot is taken before the lock is granted).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from proxy.keys.keystore import Keystore
from proxy.migrate.common import connect_data

pytestmark = pytest.mark.integration


@pytest.fixture
def repeatable_read_dsn(pg: Any) -> Iterator[str]:
    """A login role whose sessions start in REPEATABLE READ."""
    role = f"pgseal_rr_{secrets.token_hex(3)}"
    pg.execute(f"CREATE ROLE {role} LOGIN SUPERUSER")
    pg.execute(f"ALTER ROLE {role} SET default_transaction_isolation = 'repeatable read'")
    parts = urlsplit(pg.superuser_dsn)
    host = parts.netloc.rsplit("@", 1)[-1]
    yield urlunsplit(parts._replace(netloc=f"{role}@{host}"))
    pg.execute(f"DROP OWNED BY {role} CASCADE")  # the keystore schema it created
    pg.execute(f"DROP ROLE IF EXISTS {role}")


@pytest.mark.asyncio
async def test_the_role_default_is_really_repeatable_read(repeatable_read_dsn: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(repeatable_read_dsn)
    try:
        assert await conn.fetchval("SHOW transaction_isolation") == "repeatable read"
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_keystore_transactions_are_read_committed(repeatable_read_dsn: str) -> None:
    store = Keystore(repeatable_read_dsn, f"pgseal_rr_{secrets.token_hex(3)}")

    async def isolation(conn: Any) -> str:
        async with conn.transaction():
            return str(await conn.fetchval("SHOW transaction_isolation"))

    try:
        assert await store.run(isolation) == "read committed"
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_migration_transactions_are_read_committed(repeatable_read_dsn: str) -> None:
    conn = await connect_data(repeatable_read_dsn)
    try:
        async with conn.transaction():
            assert await conn.fetchval("SHOW transaction_isolation") == "read committed"
    finally:
        await conn.close()

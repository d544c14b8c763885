"""`pgseal policy check`: the policy against the live schema (reads the catalog)."""

from __future__ import annotations

import argparse
import asyncio
import sys

import asyncpg

from proxy.config import Config
from proxy.errors import PgsealError
from proxy.keys.keystore import describe_dsn
from proxy.migrate.common import connect_failure
from proxy.policy.check import check_policy
from proxy.policy.loader import load_policies
from proxy.policy.model import PolicySet

_COLUMNS_SQL = """
SELECT n.nspname, c.relname, a.attname, format_type(a.atttypid, a.atttypmod)
FROM pg_catalog.pg_attribute a
JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p')
  AND (n.nspname, c.relname) IN (SELECT * FROM unnest($1::text[], $2::text[]))
"""

# Key columns of some index that can find a cell by equality (a search: equality column
# wants one to be searchable fast): a valid, whole-table (not partial) btree or hash index.
# Any position counts: (tenant_id, ssn) serves a tenant's searches on ssn. INCLUDE columns
# do not (indkey lists them after the indnkeyatts key columns): they cannot be searched.
_INDEXED_SQL = """
SELECT n.nspname, c.relname, a.attname
FROM pg_catalog.pg_index i
JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
JOIN pg_catalog.pg_am am ON am.oid = ic.relam AND am.amname IN ('btree', 'hash')
JOIN pg_catalog.pg_class c ON c.oid = i.indrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid
  AND a.attnum = ANY((i.indkey::int2[])[0:i.indnkeyatts - 1])
WHERE i.indisvalid AND i.indpred IS NULL
  AND (n.nspname, c.relname) IN (SELECT * FROM unnest($1::text[], $2::text[]))
"""


async def _live_schema(
    dsn: str, policies: PolicySet
) -> tuple[list[tuple[str, str, str, str]], set[tuple[str, str, str]]]:
    schemas = [s for s, _ in policies.tables]
    tables = [t for _, t in policies.tables]
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        columns = [tuple(r) for r in await conn.fetch(_COLUMNS_SQL, schemas, tables)]
        indexed = {tuple(r) for r in await conn.fetch(_INDEXED_SQL, schemas, tables)}
    finally:
        await conn.close()
    return columns, indexed


def cmd_policy_check(args: argparse.Namespace, config: Config) -> int:
    if not config.policies:
        print(
            "pgseal: no policies configured (policies: in the config, or --policies)",
            file=sys.stderr,
        )
        return 1
    policies = load_policies([config.path(p) for p in config.policies])
    dsn = args.dsn or config.keystore.dsn
    try:
        columns, indexed = asyncio.run(_live_schema(dsn, policies))
    except (
        TimeoutError, OSError, ValueError, ArithmeticError, asyncpg.PostgresError,
        asyncpg.InterfaceError,
    ) as exc:
        # Neither describe_dsn nor connect_failure ever repeats a password.
        raise PgsealError(
            f"cannot read the schema at {describe_dsn(dsn)}: {connect_failure(exc)}"
        ) from None
    problems = check_policy(policies, columns, indexed)
    for line in problems:
        print(line)
    if problems:
        print(f"pgseal: {len(problems)} problem(s) in the policy", file=sys.stderr)
        return 1
    print(
        f"policy ok: {len(policies.tables)} tables, "
        f"{sum(len(t.columns) for t in policies.tables.values())} encrypted columns"
    )
    return 0

"""The policy against a live schema (pure: the caller reads the catalog)."""

from __future__ import annotations

from proxy.policy.model import PolicySet


def check_policy(
    policies: PolicySet,
    columns: list[tuple[str, str, str, str]],
    indexed: set[tuple[str, str, str]],
) -> list[str]:
    """Problems, one line each (empty: the policy fits the schema). Pure."""
    live: dict[tuple[str, str], dict[str, str]] = {}
    for schema, table_name, column_name, type_name in columns:
        live.setdefault((schema, table_name), {})[column_name] = type_name
    problems: list[str] = []
    for key, table in sorted(policies.tables.items()):
        where = f"{table.origin}: " if table.origin else ""
        have = live.get(key)
        if have is None:
            problems.append(f"{where}table {table.qualified_name} does not exist")
            continue
        if table.tenant_column is not None and table.tenant_column not in have:
            problems.append(
                f"{where}{table.qualified_name}: tenant column {table.tenant_column} does not exist"
            )
        for name, column in sorted(table.columns.items()):
            actual = have.get(name)
            if actual is None:
                problems.append(f"{where}{table.qualified_name}.{name} does not exist")
            elif actual != "bytea":
                problems.append(
                    f"{where}{table.qualified_name}.{name} is {actual}; "
                    "an encrypted column must be bytea "
                    f"(it holds {column.type} values sealed)"
                )
            elif column.searchable and (key[0], key[1], name) not in indexed:
                problems.append(
                    f"{where}{table.qualified_name}.{name} has search: equality but no index "
                    "(equality searches will scan the table)"
                )
    return problems

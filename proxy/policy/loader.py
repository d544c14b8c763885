"""Load and validate policy YAML (DESIGN.md section 5) with `file:line: message` errors.

The YAML is composed, not constructed: we walk PyYAML's node graph so every
error can name the line of the offending key or value, and so duplicate keys
(which PyYAML's constructor silently merges, last one wins) are caught. A
security policy that silently ignored a misspelt key would be a hole, so every
unknown key is an error naming it.

Format (version 1):

    version: 1
    cross_tenant_roles: [auditor]
    tables:
      public.patients:
        tenant: {column: tenant_id}        # or {session: true}
        isolation: strict                  # strict (default) | trusted
        decrypt_roles: [app, support]      # optional; absent = every role
        on_denied: error                   # error (default) | null
        columns:
          ssn: {type: text, search: equality}
          name: {type: text}

Several files (or folders of *.yaml / *.yml, read in name order) combine into
one PolicySet: `cross_tenant_roles` are united, and a table defined twice is an
error naming both places.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

import yaml

from proxy.errors import PgsealError
from proxy.policy.model import COLUMN_TYPES, ColumnPolicy, ColumnType, PolicySet, TablePolicy

_NULL_TAG = "tag:yaml.org,2002:null"
_BOOL_TAG = "tag:yaml.org,2002:bool"
_INT_TAG = "tag:yaml.org,2002:int"

_ROOT_KEYS = ("version", "cross_tenant_roles", "tables")
_TABLE_KEYS = ("tenant", "isolation", "decrypt_roles", "on_denied", "columns")
_TENANT_KEYS = ("column", "session")
_COLUMN_KEYS = ("type", "search")


class PolicyError(PgsealError, ValueError):
    """A policy problem, one line, starting with `file:line:` where there is one.

    A PgsealError, so every command that loads policies (serve, policy check, migrate,
    explain) prints it as `pgseal: <line>` and exits 1, as DESIGN.md 3 says, never as a
    traceback; still a ValueError for callers that catch that."""

    sqlstate = "F0000"  # config_file_error


class _File:
    """Validation helpers bound to one file, so every error carries file:line."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, node: yaml.Node | None, message: str) -> NoReturn:
        if node is None:
            raise PolicyError(f"{self.path}: {message}")
        raise PolicyError(f"{self.path}:{node.start_mark.line + 1}: {message}")

    def where(self, node: yaml.Node) -> str:
        return f"{self.path}:{node.start_mark.line + 1}"

    def mapping(
        self, node: yaml.Node, what: str, allowed: Sequence[str] | None
    ) -> list[tuple[str, yaml.ScalarNode, yaml.Node]]:
        """(key, key node, value node) of a mapping; unknown and duplicate keys refused."""
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, f"{what} must be a mapping")
        seen: dict[str, yaml.Node] = {}
        out: list[tuple[str, yaml.ScalarNode, yaml.Node]] = []
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _NULL_TAG:
                self.fail(key_node, f"{what}: keys must be plain names")
            # node.value is the text as written: a column named `on` or `yes` stays
            # a name even though YAML 1.1 would read it as a boolean.
            key = str(key_node.value)
            if key in seen:
                first = seen[key].start_mark.line + 1
                self.fail(key_node, f"{what}: duplicate key {key!r} (first at line {first})")
            seen[key] = key_node
            if allowed is not None and key not in allowed:
                self.fail(
                    key_node,
                    f"{what}: unknown key {key!r} (expected one of: {', '.join(allowed)})",
                )
            out.append((key, key_node, value_node))
        return out

    def string(self, node: yaml.Node, what: str) -> str:
        if not isinstance(node, yaml.ScalarNode) or node.tag == _NULL_TAG or node.value == "":
            self.fail(node, f"{what} must be a non-empty string")
        return str(node.value)

    def choice(self, node: yaml.Node, what: str, choices: Sequence[str]) -> str:
        value = self.string(node, what)
        if value not in choices:
            self.fail(node, f"{what} must be one of {', '.join(choices)}, got {value!r}")
        return value

    def string_list(self, node: yaml.Node, what: str) -> frozenset[str]:
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, f"{what} must be a list of names")
        return frozenset(self.string(item, f"{what} entry") for item in node.value)


_PART = r'(?:"((?:[^"]|"")+)"|([^."\s]+))'
_TABLE_NAME_RE = re.compile(rf"{_PART}\.{_PART}")


def _split_table_name(f: _File, node: yaml.ScalarNode) -> tuple[str, str]:
    """`schema.table`; a part may be double-quoted to hold a dot, a space or a quote."""
    text = str(node.value)
    match = _TABLE_NAME_RE.fullmatch(text)
    if match is None:
        f.fail(node, f"table name {text!r}: write it as schema.table")
    q_schema, schema, q_table, table = match.groups()
    return (
        schema if schema is not None else q_schema.replace('""', '"'),
        table if table is not None else q_table.replace('""', '"'),
    )


def _load_table(
    f: _File, key_node: yaml.ScalarNode, node: yaml.Node, schema: str, table: str
) -> TablePolicy:
    what = f"table {schema}.{table}"
    items = {k: (kn, vn) for k, kn, vn in f.mapping(node, what, _TABLE_KEYS)}

    if "tenant" not in items:
        f.fail(key_node, f"{what}: 'tenant' is required ({{column: NAME}} or {{session: true}})")
    tenant_node = items["tenant"][1]
    tenant = f.mapping(tenant_node, f"{what}.tenant", _TENANT_KEYS)
    if len(tenant) != 1:
        f.fail(tenant_node, f"{what}.tenant: exactly one of {{column: NAME}} or {{session: true}}")
    ((tenant_kind, _, tenant_value),) = tenant
    tenant_column: str | None = None
    if tenant_kind == "column":
        tenant_column = f.string(tenant_value, f"{what}.tenant.column")
    elif not (
        isinstance(tenant_value, yaml.ScalarNode)
        and tenant_value.tag == _BOOL_TAG
        and tenant_value.value.lower() in ("true", "yes", "on")
    ):
        f.fail(tenant_value, f"{what}.tenant.session: only `true` is meaningful")

    isolation = "strict"
    if "isolation" in items:
        isolation = f.choice(items["isolation"][1], f"{what}.isolation", ("strict", "trusted"))
    on_denied = "error"
    if "on_denied" in items:
        value_node = items["on_denied"][1]
        if isinstance(value_node, yaml.ScalarNode) and value_node.tag == _NULL_TAG:
            on_denied = "null"  # `on_denied: null` is YAML's null, and also what it means here
        else:
            on_denied = f.choice(value_node, f"{what}.on_denied", ("error", "null"))
    decrypt_roles: frozenset[str] | None = None
    if "decrypt_roles" in items:
        decrypt_roles = f.string_list(items["decrypt_roles"][1], f"{what}.decrypt_roles")

    if "columns" not in items:
        f.fail(key_node, f"{what}: 'columns' is required")
    columns_key, columns_node = items["columns"]
    columns: dict[str, ColumnPolicy] = {}
    for name, name_node, spec in f.mapping(columns_node, f"{what}.columns", None):
        col_what = f"{what}.columns.{name}"
        fields = {k: vn for k, _, vn in f.mapping(spec, col_what, _COLUMN_KEYS)}
        if "type" not in fields:
            f.fail(spec, f"{col_what}: 'type' is required (one of {', '.join(COLUMN_TYPES)})")
        type_name = f.choice(fields["type"], f"{col_what}.type", COLUMN_TYPES)
        search = None
        if "search" in fields and not (
            isinstance(fields["search"], yaml.ScalarNode) and fields["search"].tag == _NULL_TAG
        ):
            search = f.choice(fields["search"], f"{col_what}.search", ("equality",))
        if tenant_column is not None and name == tenant_column:
            f.fail(
                name_node,
                f"{col_what}: the tenant column {name!r} may not be encrypted "
                "(the proxy must read it to pick the tenant's key)",
            )
        columns[name] = ColumnPolicy(
            name, _as_column_type(type_name), "equality" if search else None
        )
    if not columns:
        f.fail(columns_node if columns_node.value else columns_key, f"{what}: 'columns' is empty")

    return TablePolicy(
        schema=schema,
        table=table,
        tenant_column=tenant_column,
        tenant_from_session=tenant_column is None,
        isolation="trusted" if isolation == "trusted" else "strict",
        decrypt_roles=decrypt_roles,
        on_denied="null" if on_denied == "null" else "error",
        columns=columns,
        origin=f.where(key_node),
    )


def _as_column_type(name: str) -> ColumnType:
    for candidate in COLUMN_TYPES:
        if candidate == name:
            return candidate
    raise AssertionError(name)  # pragma: no cover - checked by choice()


def _load_file(path: Path, tables: dict[tuple[str, str], TablePolicy], roles: set[str]) -> None:
    f = _File(str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise PolicyError(f"{path}: not UTF-8 text") from None
    try:
        documents = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f":{mark.line + 1}" if mark is not None else ""
        raise PolicyError(f"{path}{at}: invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path}: invalid YAML: {exc}") from None
    documents = [d for d in documents if d is not None]
    if not documents:
        return  # an empty file defines nothing
    if len(documents) > 1:
        f.fail(documents[1], "one YAML document per policy file")
    root = documents[0]
    items = {k: (kn, vn) for k, kn, vn in f.mapping(root, "policy", _ROOT_KEYS)}
    if "version" not in items:
        f.fail(root, "'version: 1' is required")
    version_node = items["version"][1]
    if not (
        isinstance(version_node, yaml.ScalarNode)
        and version_node.tag == _INT_TAG
        and version_node.value == "1"
    ):
        f.fail(version_node, "version: only 1 is known")
    if "cross_tenant_roles" in items:
        roles.update(f.string_list(items["cross_tenant_roles"][1], "cross_tenant_roles"))
    if "tables" not in items:
        return
    tables_node = items["tables"][1]
    if isinstance(tables_node, yaml.ScalarNode) and tables_node.tag == _NULL_TAG:
        return
    for _, name_node, table_node in f.mapping(tables_node, "tables", None):
        schema, table = _split_table_name(f, name_node)
        policy = _load_table(f, name_node, table_node, schema, table)
        previous = tables.get(policy.key)
        if previous is not None:
            f.fail(
                name_node,
                f"table {policy.qualified_name} is already defined at {previous.origin}",
            )
        tables[policy.key] = policy


def _policy_files(paths: Sequence[str | os.PathLike[str]]) -> Iterator[Path]:
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir() if p.is_file() and p.suffix in (".yaml", ".yml")
            )
            yield from found
        elif path.is_file():
            yield path
        else:
            raise PolicyError(f"{path}: no such policy file or folder")


def load_policies(paths: Sequence[str | os.PathLike[str]]) -> PolicySet:
    """Read policy files and folders (their *.yaml / *.yml, in name order) into one PolicySet.

    Raises PolicyError (`file:line: message`) on the first problem found.
    """
    tables: dict[tuple[str, str], TablePolicy] = {}
    roles: set[str] = set()
    for path in _policy_files(paths):
        _load_file(path, tables, roles)
    return PolicySet(tables, frozenset(roles))

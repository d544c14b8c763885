"""Policy YAML: loading, validation with file:line errors, and the PolicySet lookups."""

from __future__ import annotations

# ruff: noqa: E501 - YAML documents and expected messages read best one per line
import json
import textwrap
from pathlib import Path

import pytest

from proxy.policy import (
    COLUMN_TYPES,
    ColumnPolicy,
    PolicyError,
    PolicySet,
    TablePolicy,
    load_policies,
)
from proxy.policy.model import AmbiguousTableError

ROOT = Path(__file__).resolve().parents[2]

GOOD = """\
version: 1
cross_tenant_roles: [auditor]
tables:
  public.patients:
    tenant: {column: tenant_id}
    isolation: strict
    decrypt_roles: [app, support]
    on_denied: error
    columns:
      ssn:     {type: text, search: equality}
      name:    {type: text}
      dob:     {type: date}
  app.notes:
    tenant: {session: true}
    isolation: trusted
    on_denied: null
    columns:
      body: {type: text, search: null}
"""


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load_error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        load_policies([path])
    message = str(info.value)
    assert message.startswith(f"{path}:"), message
    return message.removeprefix(f"{path}:")


def test_loads_a_good_policy(tmp_path: Path) -> None:
    policies = load_policies([write(tmp_path, GOOD)])
    assert policies.cross_tenant_roles == {"auditor"}
    patients = policies.table("public", "patients")
    assert patients is not None
    assert patients.tenant_column == "tenant_id" and not patients.tenant_from_session
    assert patients.isolation == "strict" and patients.on_denied == "error"
    assert patients.decrypt_roles == {"app", "support"}
    assert patients.columns["ssn"] == ColumnPolicy("ssn", "text", "equality")
    assert patients.columns["name"] == ColumnPolicy("name", "text", None)
    assert patients.origin.endswith("policy.yaml:4")
    notes = policies.table("app", "notes")
    assert notes is not None
    assert notes.tenant_column is None and notes.tenant_from_session
    assert notes.isolation == "trusted" and notes.on_denied == "null"
    assert notes.decrypt_roles is None
    assert notes.may_decrypt("anyone") and not patients.may_decrypt("anyone")


def test_defaults(tmp_path: Path) -> None:
    policies = load_policies(
        [
            write(
                tmp_path,
                "version: 1\ntables:\n  s.t:\n    tenant: {column: t}\n    columns: {c: {type: int8}}\n",
            )
        ]
    )
    table = policies.table("s", "t")
    assert table is not None
    assert (table.isolation, table.on_denied, table.decrypt_roles) == ("strict", "error", None)
    assert policies.cross_tenant_roles == frozenset()


def test_every_type_is_accepted(tmp_path: Path) -> None:
    columns = "\n".join(f"      c_{t}: {{type: {t}}}" for t in COLUMN_TYPES)
    text = f"version: 1\ntables:\n  public.t:\n    tenant: {{column: tenant}}\n    columns:\n{columns}\n"
    table = load_policies([write(tmp_path, text)]).table("public", "t")
    assert table is not None and len(table.columns) == 17


def test_shipped_example_loads() -> None:
    policies = load_policies([ROOT / "policies"])
    assert policies.table("public", "patients") is not None
    payments = policies.table("public", "payments")
    assert payments is not None and payments.columns["card_number"].searchable


def test_shipped_schema_matches_the_loader() -> None:
    schema = json.loads((ROOT / "policies" / "schema.json").read_text())
    table = schema["$defs"]["table"]
    assert set(schema["properties"]) == {"version", "cross_tenant_roles", "tables"}
    assert set(table["properties"]) == {
        "tenant",
        "isolation",
        "decrypt_roles",
        "on_denied",
        "columns",
    }
    assert schema["$defs"]["column"]["properties"]["type"]["enum"] == list(COLUMN_TYPES)
    assert schema["additionalProperties"] is False and table["additionalProperties"] is False


def test_yaml_words_stay_names(tmp_path: Path) -> None:
    text = "version: 1\ntables:\n  public.t:\n    tenant: {column: yes}\n    columns:\n      on: {type: bool}\n"
    table = load_policies([write(tmp_path, text)]).table("public", "t")
    assert table is not None
    assert table.tenant_column == "yes" and "on" in table.columns


def test_quoted_table_names(tmp_path: Path) -> None:
    text = (
        "version: 1\ntables:\n"
        '  \'"My Schema"."Odd.Table"\':\n    tenant: {column: t}\n    columns: {c: {type: text}}\n'
        "  public.Accounts:\n    tenant: {column: t}\n    columns: {c: {type: text}}\n"
    )
    policies = load_policies([write(tmp_path, text)])
    assert policies.is_protected_table("My Schema", "Odd.Table")
    assert policies.is_protected_table("public", "Accounts")
    assert not policies.is_protected_table("public", "accounts")


def test_folders_and_several_files(tmp_path: Path) -> None:
    folder = tmp_path / "policies"
    folder.mkdir()
    write(
        folder,
        "version: 1\ncross_tenant_roles: [a]\ntables:\n  s.one:\n    tenant: {column: t}\n    columns: {c: {type: text}}\n",
        "10-one.yaml",
    )
    write(
        folder,
        "version: 1\ncross_tenant_roles: [b]\ntables:\n  s.two:\n    tenant: {column: t}\n    columns: {c: {type: text}}\n",
        "20-two.yml",
    )
    write(folder, "not: a policy", "README.txt")
    write(folder, "", "30-empty.yaml")
    extra = write(
        tmp_path,
        "version: 1\ntables:\n  s.three:\n    tenant: {session: true}\n    columns: {c: {type: text}}\n",
        "extra.yaml",
    )
    policies = load_policies([folder, extra])
    assert set(policies.tables) == {("s", "one"), ("s", "two"), ("s", "three")}
    assert policies.cross_tenant_roles == {"a", "b"}


def test_table_defined_twice_across_files(tmp_path: Path) -> None:
    one = write(
        tmp_path,
        "version: 1\ntables:\n  s.t:\n    tenant: {column: t}\n    columns: {c: {type: text}}\n",
        "a.yaml",
    )
    two = write(
        tmp_path,
        "version: 1\ntables:\n\n  s.t:\n    tenant: {column: t}\n    columns: {c: {type: text}}\n",
        "b.yaml",
    )
    with pytest.raises(PolicyError) as info:
        load_policies([one, two])
    assert str(info.value) == f"{two}:4: table s.t is already defined at {one}:3"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "version: 1\ntabels: {}\n",
            "2: policy: unknown key 'tabels' (expected one of: version, cross_tenant_roles, tables)",
        ),
        ("tables: {}\n", "1: 'version: 1' is required"),
        ("version: 2\n", "1: version: only 1 is known"),
        ("version: '1'\n", "1: version: only 1 is known"),
        ("- a\n- b\n", "1: policy must be a mapping"),
        (
            "version: 1\ncross_tenant_roles: auditor\n",
            "2: cross_tenant_roles must be a list of names",
        ),
        ("version: 1\ntables: [a]\n", "2: tables must be a mapping"),
        (
            "version: 1\ntables:\n  patients:\n    tenant: {column: t}\n    columns: {c: {type: text}}\n",
            "3: table name 'patients': write it as schema.table",
        ),
        (
            "version: 1\ntables:\n  a.b.c:\n    tenant: {column: t}\n    columns: {c: {type: text}}\n",
            "3: table name 'a.b.c': write it as schema.table",
        ),
        (
            "version: 1\ntables:\n  s.t:\n    columns: {c: {type: text}}\n",
            "3: table s.t: 'tenant' is required ({column: NAME} or {session: true})",
        ),
        (
            "version: 1\ntables:\n  s.t:\n    tenant: {column: t}\n",
            "3: table s.t: 'columns' is required",
        ),
        (
            "version: 1\ntables:\n  s.t:\n    tenant: {column: t}\n    columns: {}\n",
            "5: table s.t: 'columns' is empty",
        ),
        (
            "version: 1\ntables:\n  s.t:\n    tenant: {column: t}\n    colums: {c: {type: text}}\n",
            "5: table s.t: unknown key 'colums' (expected one of: tenant, isolation, decrypt_roles, on_denied, columns)",
        ),
        (
            "version: 1\ntables:\n  s.t:\n    tenant: {column: t, session: true}\n    columns: {c: {type: text}}\n",
            "4: table s.t.tenant: exactly one of {column: NAME} or {session: true}",
        ),
        (
            "version: 1\ntables:\n  s.t:\n    tenant: {session: false}\n    columns: {c: {type: text}}\n",
            "4: table s.t.tenant.session: only `true` is meaningful",
        ),
        (
            "version: 1\ntables:\n  s.t:\n    tenant: {row: t}\n    columns: {c: {type: text}}\n",
            "4: table s.t.tenant: unknown key 'row' (expected one of: column, session)",
        ),
        (
            "version: 1\ntables:\n  s.t:\n    tenant: tenant_id\n    columns: {c: {type: text}}\n",
            "4: table s.t.tenant must be a mapping",
        ),
        (
            "version: 1\ntables:\n  s.t:\n    tenant: {column: t}\n    isolation: loose\n    columns: {c: {type: text}}\n",
            "5: table s.t.isolation must be one of strict, trusted, got 'loose'",
        ),
        (
            "version: 1\ntables:\n  s.t:\n    tenant: {column: t}\n    on_denied: drop\n    columns: {c: {type: text}}\n",
            "5: table s.t.on_denied must be one of error, null, got 'drop'",
        ),
        (
            "version: 1\ntables:\n  s.t:\n    tenant: {column: t}\n    decrypt_roles: app\n    columns: {c: {type: text}}\n",
            "5: table s.t.decrypt_roles must be a list of names",
        ),
        (
            "version: 1\ntables:\n  s.t:\n    tenant: {column: t}\n    columns:\n      c: {type: string}\n",
            "6: table s.t.columns.c.type must be one of text, varchar, int2, int4, int8, float4, float8, numeric, bool, date, time, timestamp, timestamptz, uuid, json, jsonb, bytea, got 'string'",
        ),
        (
            "version: 1\ntables:\n  s.t:\n    tenant: {column: t}\n    columns:\n      c: {search: equality}\n",
            "6: table s.t.columns.c: 'type' is required (one of text, varchar, int2, int4, int8, float4, float8, numeric, bool, date, time, timestamp, timestamptz, uuid, json, jsonb, bytea)",
        ),
        (
            "version: 1\ntables:\n  s.t:\n    tenant: {column: t}\n    columns:\n      c: {type: text, search: prefix}\n",
            "6: table s.t.columns.c.search must be one of equality, got 'prefix'",
        ),
        (
            "version: 1\ntables:\n  s.t:\n    tenant: {column: t}\n    columns:\n      c: {type: text, index: true}\n",
            "6: table s.t.columns.c: unknown key 'index' (expected one of: type, search)",
        ),
        (
            "version: 1\ntables:\n  s.t:\n    tenant: {column: t}\n    columns:\n      c: text\n",
            "6: table s.t.columns.c must be a mapping",
        ),
        (
            "version: 1\ntables:\n  s.t:\n    tenant: {column: tenant_id}\n    columns:\n      c: {type: text}\n      tenant_id: {type: text}\n",
            "7: table s.t.columns.tenant_id: the tenant column 'tenant_id' may not be encrypted (the proxy must read it to pick the tenant's key)",
        ),
        (
            "version: 1\ntables:\n  s.t:\n    tenant: {column: t}\n    columns:\n      c: {type: text}\n      c: {type: int4}\n",
            "7: table s.t.columns: duplicate key 'c' (first at line 6)",
        ),
        (
            "version: 1\ntables:\n  s.t:\n    tenant: {column: t}\n    columns: {c: {type: text}}\n  s.t:\n    tenant: {column: t}\n    columns: {c: {type: text}}\n",
            "6: tables: duplicate key 's.t' (first at line 3)",
        ),
        (
            "version: 1\ntables:\n  s.t:\n    tenant: {column: t}\n    columns: {c: {type: text}\n",
            "6: invalid YAML: expected ',' or '}', but got '<stream end>'",
        ),
        (
            "version: 1\ntables:\n  s.t: [\n",
            "4: invalid YAML: expected the node content, but found '<stream end>'",
        ),
        ("version: 1\n---\nversion: 1\n", "3: one YAML document per policy file"),
    ],
)
def test_errors_name_file_and_line(tmp_path: Path, text: str, error: str) -> None:
    assert load_error(tmp_path, text) == error


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="no such policy file or folder"):
        load_policies([tmp_path / "nope.yaml"])


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"version: 1\n\xff\xfe")
    with pytest.raises(PolicyError, match="not UTF-8"):
        load_policies([path])


def test_policy_error_is_a_value_error() -> None:
    assert issubclass(PolicyError, ValueError)


def _table(schema: str, name: str, **columns: ColumnPolicy) -> TablePolicy:
    return TablePolicy(schema, name, "tenant_id", False, "strict", None, "error", columns)


def test_policy_set_lookups() -> None:
    policies = PolicySet.of(
        [
            _table("public", "patients", ssn=ColumnPolicy("ssn", "text", "equality")),
            _table("billing", "patients", iban=ColumnPolicy("iban", "text")),
        ],
        ["auditor"],
    )
    assert policies.is_protected_table("public", "patients")
    assert not policies.is_protected_table("public", "visits")
    found = policies.table("billing", "patients")
    assert found is not None and "iban" in found.columns
    assert policies.resolve(None, "patients", ("public", "billing")) is policies.table(
        "public", "patients"
    )
    assert policies.resolve(None, "patients", ("app", "billing")) is policies.table(
        "billing", "patients"
    )
    with pytest.raises(AmbiguousTableError):  # fail closed: off-path tables still count
        policies.resolve(None, "patients", ("app",))
    assert policies.resolve(None, "visits", ("app",)) is None
    assert policies.resolve("billing", "patients", ()) is found
    assert policies and not PolicySet()


def test_policy_set_hashes_by_identity() -> None:
    a = PolicySet.of([_table("s", "t", c=ColumnPolicy("c", "text"))])
    b = PolicySet.of([_table("s", "t", c=ColumnPolicy("c", "text"))])
    assert a != b and len({a, b}) == 2


def test_model_checks() -> None:
    with pytest.raises(ValueError):
        ColumnPolicy("c", "string")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ColumnPolicy("c", "text", "prefix")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tenant column may not be encrypted"):
        TablePolicy("s", "t", "c", False, "strict", None, "error", {"c": ColumnPolicy("c", "text")})
    with pytest.raises(ValueError, match="either a column or the session"):
        TablePolicy("s", "t", "c", True, "strict", None, "error", {"d": ColumnPolicy("d", "text")})
    with pytest.raises(ValueError, match="either a column or the session"):
        TablePolicy(
            "s", "t", None, False, "strict", None, "error", {"d": ColumnPolicy("d", "text")}
        )
    table = _table("s", "t", c=ColumnPolicy("c", "text"))
    with pytest.raises(TypeError):
        table.columns["d"] = ColumnPolicy("d", "text")  # type: ignore[index]


def test_resolve_does_not_trust_the_tracked_search_path() -> None:
    """C2: a protected table off the tracked search_path is still protected."""
    only = PolicySet.of([_table("public", "patients", ssn=ColumnPolicy("ssn", "text"))])
    assert only.resolve(None, "patients", ("x",)) is only.table("public", "patients")
    assert only.resolve(None, "patients", ()) is only.table("public", "patients")
    assert only.resolve(None, "visits", ("x",)) is None
    assert only.resolve("x", "patients", ("x",)) is None  # qualified: exact

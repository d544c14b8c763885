"""COPY statements in the analyzer (proxy/rewrite/copy.py): plans and refusals.

Statements as psql's \\copy, psycopg, pg_dump and people write them, in both the
option-list syntax and the pre-9.0 one that \\copy passes on unchanged."""

from __future__ import annotations

# ruff: noqa: E501 - statements and expected messages read best one per line
import pytest

from proxy.policy import PolicySet, load_policies
from proxy.rewrite import CopyOptions, StatementPlan, analyze, apply_edits

POLICY = """
version: 1
tables:
  public.patients:
    tenant: {column: tenant_id}
    columns:
      ssn:  {type: text, search: equality}
      name: {type: text}
      dob:  {type: date}
  public.notes:
    tenant: {session: true}
    columns:
      body: {type: text}
  crm.Contacts:
    tenant: {column: TenantId}
    columns:
      Phone: {type: text}
"""


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> PolicySet:
    path = tmp_path_factory.mktemp("policy") / "policy.yaml"
    path.write_text(POLICY)
    return load_policies([path])


def plan_of(sql: str, policies: PolicySet) -> StatementPlan:
    plans = analyze(sql, policies)
    assert len(plans) == 1
    return plans[0]


@pytest.mark.parametrize(
    ("sql", "direction", "columns", "options"),
    [
        ("COPY patients FROM STDIN", "from", None, CopyOptions()),
        (
            "COPY public.patients (id, tenant_id, ssn, name, dob) FROM stdin;",
            "from",
            ("id", "tenant_id", "ssn", "name", "dob"),
            CopyOptions(),
        ),
        ("copy patients (ssn) from stdin with csv", "from", ("ssn",), CopyOptions(format="csv")),
        (
            "COPY patients (tenant_id, ssn) FROM STDIN WITH (FORMAT csv, HEADER true, "
            "DELIMITER ';', NULL 'n/a', QUOTE '''', ESCAPE E'\\\\', FORCE_NOT_NULL (ssn), "
            "FORCE_NULL (tenant_id), ENCODING 'UTF-8', FREEZE)",
            "from",
            ("tenant_id", "ssn"),
            CopyOptions(
                format="csv", header="on", delimiter=";", null="n/a", quote="'", escape="\\",
                force_not_null=("ssn",), force_null=("tenant_id",), encoding="UTF-8",
            ),
        ),
        (
            # psql's \copy ... with csv header delimiter ';' force quote *  (legacy syntax)
            "COPY  patients (ssn, name) TO STDOUT with csv header delimiter as ';' force quote *",
            "to",
            ("ssn", "name"),
            CopyOptions(format="csv", header="on", delimiter=";", force_quote="*"),
        ),
        (
            "COPY ONLY public.patients (ssn) TO stdout (HEADER match, FORMAT 'text')",
            "to",
            ("ssn",),
            CopyOptions(header="match"),
        ),
        ("COPY patients TO STDOUT USING DELIMITERS '|'", "to", None, CopyOptions(delimiter="|")),
    ],
)
def test_copy_plans(
    sql: str,
    direction: str,
    columns: tuple[str, ...] | None,
    options: CopyOptions,
    policies: PolicySet,
) -> None:
    plan = plan_of(sql, policies)
    assert plan.kind == "protected" and plan.command == "COPY", plan.refusal
    assert plan.copy is not None
    assert plan.copy.direction == direction
    assert plan.copy.table == ("public", "patients")
    assert plan.copy.columns == columns
    assert plan.copy.options == options
    assert plan.tables == frozenset({("public", "patients")})


def test_copy_without_column_list_says_where_the_list_goes(policies: PolicySet) -> None:
    sql = "COPY public . patients /* all */ TO STDOUT (FORMAT csv)"
    plan = plan_of(sql, policies)
    assert plan.copy is not None and plan.copy.columns is None
    at = plan.copy.columns_at
    assert sql[:at].endswith("patients")
    assert plan.outputs == ()  # the caller resolves them from the live column list


def test_copy_to_outputs_by_position_with_the_row_tenant(policies: PolicySet) -> None:
    plan = plan_of("COPY patients (id, ssn, tenant_id, name) TO STDOUT", policies)
    assert [o.column.column if o else None for o in plan.outputs] == [None, "ssn", None, "name"]
    ssn = plan.outputs[1]
    assert ssn is not None and ssn.tenant.kind == "output" and ssn.tenant.output == 2
    plan = plan_of("COPY patients (ssn) TO STDOUT", policies)
    assert plan.outputs[0] is not None and plan.outputs[0].tenant.kind == "cell"


def test_copy_query_reuses_the_select_analysis(policies: PolicySet) -> None:
    sql = "COPY (SELECT tenant_id, name AS n, dob FROM patients WHERE ssn = '123') TO STDOUT CSV"
    plan = plan_of(sql, policies)
    assert plan.kind == "protected" and plan.copy is not None
    assert plan.copy.table is None and plan.copy.options.format == "csv"
    assert [o.column.column if o else None for o in plan.outputs] == [None, "name", "dob"]
    (literal,) = plan.literals
    assert literal.value == "123" and sql[literal.start : literal.end] == "'123'"
    # Only a value to seal, no cell in the stream: the stream passes as it is.
    plan = plan_of("COPY (SELECT id FROM patients WHERE ssn = $1) TO STDOUT", policies)
    assert plan.kind == "protected" and plan.copy is None and 1 in plan.params


def test_quoted_names_and_search_path(policies: PolicySet) -> None:
    plan = plan_of('COPY crm."Contacts" ("TenantId", "Phone") FROM STDIN', policies)
    assert plan.copy is not None and plan.copy.table == ("crm", "Contacts")
    assert plan.copy.columns == ("TenantId", "Phone")
    assert analyze("COPY contacts FROM STDIN", policies)[0].kind == "passthrough"
    plans = analyze('COPY "Contacts" FROM STDIN', policies, ("crm",))
    assert plans[0].copy is not None and plans[0].copy.table == ("crm", "Contacts")


@pytest.mark.parametrize(
    "sql",
    [
        "COPY patients (id, tenant_id) FROM STDIN",  # no encrypted column
        "COPY patients (id) TO STDOUT (FORMAT binary)",
        "COPY patients_archive FROM STDIN",  # only a longer name
        "COPY (SELECT id FROM patients) TO STDOUT",
        "COPY (SELECT id, tenant_id FROM patients) TO '/tmp/ids'",
    ],
)
def test_copy_touching_no_encrypted_column_passes(sql: str, policies: PolicySet) -> None:
    assert plan_of(sql, policies).kind == "passthrough"


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("COPY patients FROM STDIN (FORMAT binary)", "binary COPY of protected table public.patients"),
        ("COPY BINARY patients TO STDOUT", "binary COPY"),
        ("COPY patients TO STDOUT WITH BINARY", "binary COPY"),
        ("COPY patients (ssn) FROM '/tmp/in.csv' CSV", "COPY from a server file on protected table"),
        ("COPY patients TO '/tmp/out'", "COPY to a server file"),
        ("COPY patients FROM PROGRAM 'curl x'", "COPY from PROGRAM"),
        ("COPY (SELECT name FROM patients) TO PROGRAM 'cat'", "COPY to PROGRAM"),
        ("COPY patients FROM STDIN WITH (ENCODING 'LATIN1')", "only UTF8"),
        ("COPY patients FROM STDIN WHERE ssn = '1'", "COPY ... FROM ... WHERE"),
        ("COPY patients FROM STDIN (FORMAT xml)", "COPY format xml is not recognized"),
        ("COPY patients FROM STDIN (SOME_FUTURE_OPTION 1)", "some_future_option is not supported"),
        ("COPY (SELECT * FROM patients) TO STDOUT", "list the columns"),
        ("COPY (SELECT upper(name) FROM patients) TO STDOUT", "public.patients.name"),
        ("COPY patients (ssn FROM STDIN", "cannot read a COPY statement"),
        ("COPY patients FROM STDIN garbage", "cannot read a COPY statement"),
    ],
)
def test_copy_refusals(sql: str, message: str, policies: PolicySet) -> None:
    plan = plan_of(sql, policies)
    assert plan.kind == "refused" and plan.refusal is not None
    assert plan.refusal.sqlstate == "0A000"
    assert message in plan.refusal.message, plan.refusal.message
    assert plan.refusal.message.startswith("pgseal: ")


def test_column_list_edit_applies(policies: PolicySet) -> None:
    """What the data path does with columns_at (it knows the live column list)."""
    from proxy.rewrite import TextEdit

    sql = "COPY patients FROM STDIN WITH CSV"
    plan = plan_of(sql, policies)
    assert plan.copy is not None
    at = plan.copy.columns_at
    edited = apply_edits(sql, [TextEdit(at, at, ' ("id", "ssn")')])
    assert edited == 'COPY patients ("id", "ssn") FROM STDIN WITH CSV'
    assert plan_of(edited, policies).copy is not None


def test_copy_in_a_multi_statement_string(policies: PolicySet) -> None:
    sql = "SET pgseal.tenant = 'a'; COPY patients (ssn) FROM STDIN; SELECT 1"
    kinds = [(p.command, p.kind) for p in analyze(sql, policies)]
    assert kinds == [("SET", "passthrough"), ("COPY", "protected"), ("SELECT", "passthrough")]

"""The SQL analyzer against statements real applications and ORMs send.

Each row: a statement (as SQLAlchemy, Django, Rails, Prisma, psycopg2-style
client-side interpolation or a human at psql would send it) and what the proxy
must do with it: pass it through, seal which parameters and constants for
which column, open which result columns, or refuse it naming the construct.

Notation: columns are written `table.column` for public tables and
`schema.table.column` otherwise; a parameter or literal expectation is a
prefix of "<column> <use>[[]] @<tenant source> =<value>".
"""

from __future__ import annotations

# ruff: noqa: E501 - statements and expected messages read best one per line
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.policy import PolicySet, load_policies
from proxy.rewrite import (
    ColumnRef,
    StatementPlan,
    TextEdit,
    analyze,
    apply_edits,
    clear_cache,
    resolve_outputs,
)
from proxy.rewrite.analyzer import _analyze

POLICY = """
version: 1
cross_tenant_roles: [auditor]
tables:
  public.patients:
    tenant: {column: tenant_id}
    columns:
      ssn:     {type: text, search: equality}
      email:   {type: text, search: equality}
      name:    {type: text}
      dob:     {type: date}
      balance: {type: numeric}
      profile: {type: jsonb}
  public.patients_archive:
    tenant: {column: tenant_id}
    columns:
      ssn:  {type: text, search: equality}
      name: {type: text}
  public.payments:
    tenant: {column: tenant_id}
    columns:
      card_number: {type: text, search: equality}
      card_holder: {type: text}
      amount:      {type: numeric}
      paid_at:     {type: timestamptz}
      approved:    {type: bool}
  billing.invoices:
    tenant: {column: tenant_id}
    isolation: trusted
    columns:
      iban:  {type: varchar, search: equality}
      total: {type: numeric}
  public.user_notes:
    tenant: {session: true}
    columns:
      body:      {type: text}
      reference: {type: uuid, search: equality}
  public.Accounts:
    tenant: {column: TenantId}
    columns:
      SecretKey: {type: text, search: equality}
      Notes:     {type: text}
"""


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> PolicySet:
    path: Path = tmp_path_factory.mktemp("policy") / "test.yaml"
    path.write_text(POLICY)
    return load_policies([path])


@dataclass
class Case:
    sql: str
    kind: str  # one per statement, comma-separated: pass | prot | refuse
    params: dict[int, str] = field(default_factory=dict)
    literals: dict[str, str] = field(default_factory=dict)
    outputs: list[str | None] | None = None  # exact outputs
    stars: set[str] | None = None  # non-exact: protected tables behind *
    refuse: str | None = None  # substring of the refusal message
    edits: dict[str, str] = field(default_factory=dict)
    writes: list[str] | None = None
    search_path: tuple[str, ...] = ("public",)
    settings: list[str] | None = None
    rewritten: str | None = None  # the text after plan.edits (literal splices not applied)
    note: str = ""


def _short(ref: ColumnRef) -> str:
    text = str(ref)
    return text.removeprefix("public.")


P, R, X = "pass", "prot", "refuse"

CASES: list[Case] = [
    # ---- no protected table: the fast path, never parsed ----------------------------
    Case("SELECT 1", P),
    Case("select pg_catalog.version()", P, note="SQLAlchemy first connect"),
    Case("select current_schema()", P),
    Case("show standard_conforming_strings", P),
    Case("BEGIN", P),
    Case("BEGIN ISOLATION LEVEL REPEATABLE READ", P),
    Case("COMMIT", P),
    Case("ROLLBACK", P),
    Case("SAVEPOINT sa_savepoint_1", P),
    Case("RELEASE SAVEPOINT sa_savepoint_1", P),
    Case("ROLLBACK TO SAVEPOINT sa_savepoint_1", P),
    Case("SELECT pg_advisory_xact_lock($1)", P),
    Case('SELECT "users"."id", "users"."email" FROM "users" WHERE "users"."email" = $1', P),
    Case("INSERT INTO audit_log (event, payload) VALUES ($1, $2::jsonb)", P),
    Case(
        'SELECT "django_migrations"."id", "django_migrations"."app", "django_migrations"."name" '
        'FROM "django_migrations"',
        P,
        note="Django startup",
    ),
    Case(
        'SELECT "schema_migrations"."version" FROM "schema_migrations" ORDER BY "schema_migrations"."version" ASC',
        P,
    ),
    Case(
        "SELECT t.oid, typarray FROM pg_type t JOIN pg_namespace ns ON typnamespace = ns.oid "
        "WHERE typname = 'hstore'",
        P,
        note="psycopg hstore lookup",
    ),
    Case('SELECT "public"."users"."id" FROM "public"."users" WHERE 1=1 LIMIT $1 OFFSET $2', P),
    Case("SELEC 1 FROM nowhere", P, note="unparseable, but names no protected table"),
    Case("LISTEN jobs", P),
    Case("NOTIFY jobs, 'patient 7 updated'", P, note="'patients' substring absent: fast path"),
    # ---- protected table named, no protected column touched --------------------------
    Case("SELECT id FROM patients WHERE id = $1", P),
    Case("SELECT count(*) FROM patients WHERE tenant_id = $1", P),
    Case('SELECT "patients"."id" FROM "patients" WHERE "patients"."created_at" > $1', P),
    Case("DELETE FROM patients WHERE id = $1", P),
    Case("UPDATE patients SET updated_at = now() WHERE id = $1", P),
    Case("INSERT INTO patients (tenant_id, external_id) VALUES ($1, $2)", P),
    Case("SELECT 'patients' AS label", P, note="name only inside a string"),
    Case("SELECT ssn FROM other.patients WHERE ssn = $1", P, note="another schema"),
    Case("SELECT ssn FROM patients", R, search_path=("app",), outputs=["patients.ssn"], note="public not on the tracked search_path: still protected (C2)"),
    Case("SELECT secretkey FROM accounts", P, note="unquoted: folds to accounts, not Accounts"),
    Case("SELECT ssn IS NULL AS missing FROM patients WHERE id = $1", P),
    Case("SELECT count(ssn), count(*) FILTER (WHERE name IS NOT NULL) FROM patients", P),
    Case("SELECT id FROM patients WHERE name IS NULL OR email IS NOT NULL", P),
    Case("SELECT CASE WHEN dob IS NULL THEN 'unknown' ELSE 'known' END FROM patients", P),
    Case("SELECT EXISTS (SELECT 1 FROM patients WHERE id = $1)", P),
    Case("UPDATE patients SET name = NULL, dob = DEFAULT WHERE id = $1", P, note="nothing to seal"),
    Case(
        "INSERT INTO patients (tenant_id, ssn, name) SELECT tenant_id, ssn, name FROM patients "
        "WHERE id = $1",
        P,
        note="cells copied within their own columns stay valid",
    ),
    Case("INSERT INTO patients DEFAULT VALUES", P),
    # ---- SELECT: SQLAlchemy ------------------------------------------------------
    Case(
        "SELECT patients.id AS patients_id, patients.ssn AS patients_ssn, patients.name AS "
        "patients_name \nFROM patients \nWHERE patients.ssn = $1::VARCHAR",
        R,
        params={1: "patients.ssn compare @session"},
        rewritten="SELECT patients.id AS patients_id, patients.ssn AS patients_ssn, patients.name AS "
        "patients_name \nFROM patients \nWHERE patients.ssn = ANY($1::bytea[])",
        outputs=[None, "patients.ssn", "patients.name"],
        note="a compared value matches its cells under every key version",
    ),
    Case(
        "SELECT patients.id, patients.email \nFROM patients \nWHERE patients.email IN "
        "(__[POSTCOMPILE_email_1])",
        X,
        refuse="IN between encrypted column public.patients.email and a plain column",
        note="un-rendered SQLAlchemy expanding param never reaches the wire; if it did: refuse",
    ),
    Case(
        "SELECT patients.id, patients.email FROM patients WHERE patients.email IN ($1::VARCHAR, "
        "$2::VARCHAR, $3::VARCHAR)",
        R,
        params={
            1: "patients.email compare",
            2: "patients.email compare",
            3: "patients.email compare",
        },
        outputs=[None, "patients.email"],
    ),
    Case(
        "SELECT patients.ssn FROM patients WHERE patients.tenant_id = $1::VARCHAR AND "
        "patients.ssn = $2::VARCHAR",
        R,
        params={2: "patients.ssn compare @$1"},
        outputs=["patients.ssn"],
    ),
    Case(
        "SELECT count(*) AS count_1 \nFROM (SELECT patients.id AS patients_id, patients.name AS "
        "patients_name \nFROM patients \nWHERE patients.email = $1::VARCHAR) AS anon_1",
        R,
        params={1: "patients.email compare"},
        outputs=[None],
    ),
    Case(
        "SELECT anon_1.patients_ssn FROM (SELECT patients.ssn AS patients_ssn FROM patients "
        "WHERE patients.tenant_id = $1) AS anon_1 LIMIT $2",
        R,
        outputs=["patients.ssn"],
    ),
    Case(
        "SELECT patients.name FROM patients WHERE patients.ssn = ANY ($1::VARCHAR[])",
        R,
        params={1: "patients.ssn compare[]"},
        edits={"$1::VARCHAR[]": "$1::bytea[]"},
        outputs=["patients.name"],
    ),
    Case(
        "SELECT patients.id FROM patients WHERE (patients.tenant_id, patients.ssn) IN "
        "(($1, $2), ($3, $4))",
        X,
        refuse="row IN (...) with a value for encrypted column public.patients.ssn",
        note="a value must match every key version's cell: not expressible in a row IN",
    ),
    Case(
        "SELECT id FROM patients WHERE (tenant_id, ssn) = ($1, $2)",
        X,
        refuse="row comparison with a value for encrypted column public.patients.ssn",
    ),
    Case("SELECT a.id FROM patients a, patients b WHERE (a.tenant_id, a.ssn) = (b.tenant_id, b.ssn)", P),
    Case(
        "SELECT id FROM patients WHERE ssn <> $1 AND $2 = email AND ssn != 'x'",
        R,
        params={1: "patients.ssn compare", 2: "patients.email compare"},
        literals={"'x'": "patients.ssn compare"},
        rewritten="SELECT id FROM patients WHERE ssn <> ALL($1) AND email = ANY($2) AND ssn "
        "<> ALL('x')",
    ),
    Case(
        'SELECT id FROM patients WHERE $1::text = "patients"."ssn" OR (ssn) = ($2)',
        R,
        params={1: "patients.ssn compare", 2: "patients.ssn compare"},
        rewritten='SELECT id FROM patients WHERE "patients"."ssn" = ANY($1::bytea[]) OR (ssn) = '
        "ANY($2::bytea[])",
    ),
    Case(
        "SELECT id FROM patients WHERE ssn IS NOT DISTINCT FROM $1 AND email IS DISTINCT FROM 'a'",
        R,
        params={1: "patients.ssn compare"},
        literals={"'a'": "patients.email compare"},
        rewritten="SELECT id FROM patients WHERE ((ssn = ANY($1)) IS TRUE OR (ssn IS NULL AND "
        "($1::bytea[])[1] IS NULL)) AND (NOT ((email = ANY('a')) IS TRUE))",
    ),
    Case(
        "SELECT id FROM patients WHERE $1 IS DISTINCT FROM ssn",
        R,
        params={1: "patients.ssn compare"},
        rewritten="SELECT id FROM patients WHERE (NOT ((ssn = ANY($1)) IS TRUE OR (ssn IS NULL AND "
        "($1::bytea[])[1] IS NULL)))",
    ),
    Case(
        "SELECT id FROM patients WHERE ssn NOT IN ($1, NULL,'b') OR email IN ($2::text)",
        R,
        params={1: "patients.ssn compare", 2: "patients.email compare"},
        literals={"'b'": "patients.ssn compare"},
        rewritten="SELECT id FROM patients WHERE ssn <> ALL ($1 || ARRAY[NULL]::bytea[] ||'b') OR "
        "email = ANY ($2::bytea[])",
    ),
    Case(
        "SELECT a.id FROM patients a JOIN patients b ON a.ssn IN (b.ssn, $1)",
        R,
        params={1: "patients.ssn compare"},
        rewritten="SELECT a.id FROM patients a JOIN patients b ON a.ssn = ANY (ARRAY[b.ssn] || $1)",
    ),
    Case(
        "SELECT id FROM patients WHERE ssn = ANY (ARRAY[$1, $2]::VARCHAR[]) OR email = SOME(ARRAY[])",
        R,
        params={1: "patients.ssn compare", 2: "patients.ssn compare"},
        rewritten="SELECT id FROM patients WHERE ssn = ANY (($1 || $2)) OR email = "
        "SOME(ARRAY[]::bytea[])",
    ),
    # ---- SELECT: Django -----------------------------------------------------------
    Case(
        'SELECT "patients"."id", "patients"."tenant_id", "patients"."ssn", "patients"."name" FROM '
        '"patients" WHERE "patients"."email" = $1 LIMIT 21',
        R,
        params={1: "patients.email compare @session"},
        outputs=[None, None, "patients.ssn", "patients.name"],
    ),
    Case(
        'SELECT "patients"."name" FROM "patients" WHERE ("patients"."tenant_id" = $1 AND '
        '"patients"."ssn" = $2) ORDER BY "patients"."id" ASC LIMIT 1',
        R,
        params={2: "patients.ssn compare @$1"},
        outputs=["patients.name"],
    ),
    Case(
        'SELECT (1) AS "a" FROM "patients" WHERE "patients"."ssn" = $1 LIMIT 1',
        R,
        params={1: "patients.ssn compare"},
        note="Django .exists()",
    ),
    Case(
        'SELECT "patients"."id" FROM "patients" WHERE "patients"."ssn" IN ($1, $2, $3)',
        R,
        params={1: "patients.ssn compare", 2: "patients.ssn compare", 3: "patients.ssn compare"},
    ),
    Case(
        'SELECT "patients"."id" FROM "patients" WHERE NOT ("patients"."email" = $1)',
        R,
        params={1: "patients.email compare"},
        note="Django exclude()",
    ),
    Case(
        'SELECT "patients"."id" FROM "patients" WHERE "patients"."name"::text LIKE $1',
        X,
        refuse="a cast on encrypted column public.patients.name",
        note="Django __contains",
    ),
    Case(
        'SELECT "patients"."id" FROM "patients" WHERE UPPER("patients"."email"::text) = UPPER($1)',
        X,
        refuse="encrypted column public.patients.email",
        note="Django __iexact",
    ),
    Case(
        'SELECT "patients"."id" FROM "patients" WHERE "patients"."dob" >= $1',
        X,
        refuse="comparison >= on encrypted column public.patients.dob",
    ),
    Case(
        'SELECT "patients"."id" FROM "patients" ORDER BY "patients"."name" ASC',
        X,
        refuse="ORDER BY encrypted column public.patients.name",
    ),
    Case(
        'SELECT "patients"."id", "patients"."ssn" FROM "patients" INNER JOIN "visits" ON '
        '("patients"."id" = "visits"."patient_id") WHERE "visits"."code" = $1',
        R,
        outputs=[None, "patients.ssn"],
    ),
    Case(
        'SELECT "patients"."id" FROM "patients" WHERE "patients"."id" IN (SELECT U0."patient_id" '
        'FROM "visits" U0 WHERE U0."code" = $1) AND "patients"."ssn" = $2',
        R,
        params={2: "patients.ssn compare"},
    ),
    # ---- SELECT: Rails ------------------------------------------------------------
    Case(
        'SELECT "patients".* FROM "patients" WHERE "patients"."ssn" = $1 LIMIT $2',
        R,
        params={1: "patients.ssn compare"},
        stars={"patients"},
    ),
    Case(
        'SELECT "patients".* FROM "patients" WHERE "patients"."tenant_id" = $1 AND '
        '"patients"."email" = $2 LIMIT $3',
        R,
        params={2: "patients.email compare @$1"},
        stars={"patients"},
    ),
    Case(
        'SELECT 1 AS one FROM "patients" WHERE "patients"."email" = $1 AND "patients"."id" != $2 '
        "LIMIT $3",
        R,
        params={1: "patients.email compare"},
        note="Rails uniqueness validation",
    ),
    Case(
        'SELECT "payments".* FROM "payments" WHERE "payments"."patient_id" = $1 ORDER BY '
        '"payments"."created_at" DESC',
        R,
        stars={"payments"},
    ),
    Case(
        'SELECT COUNT(*) FROM "payments" WHERE "payments"."card_number" = $1',
        R,
        params={1: "payments.card_number compare"},
    ),
    # ---- SELECT: Prisma -----------------------------------------------------------
    Case(
        'SELECT "public"."patients"."id", "public"."patients"."name", "public"."patients"."ssn" '
        'FROM "public"."patients" WHERE ("public"."patients"."ssn" = $1 AND 1=1) LIMIT $2 OFFSET $3',
        R,
        params={1: "patients.ssn compare"},
        outputs=[None, "patients.name", "patients.ssn"],
    ),
    Case(
        'SELECT "public"."patients"."id" FROM "public"."patients" WHERE "public"."patients"."email" '
        "IN ($1,$2) OFFSET $3",
        R,
        params={1: "patients.email compare", 2: "patients.email compare"},
    ),
    Case(
        'SELECT "t1"."id", "t1"."card_holder" FROM "public"."payments" AS "t1" WHERE '
        '"t1"."tenant_id" = $1',
        R,
        outputs=[None, "payments.card_holder"],
    ),
    # ---- SELECT: hand-written and psql ---------------------------------------------
    Case("SELECT * FROM patients", R, stars={"patients"}),
    Case(
        'SELECT * FROM "public"."patients" AS "p" WHERE "p"."ssn" = $1',
        R,
        stars={"patients"},
        params={1: "patients.ssn compare"},
    ),
    Case("TABLE patients", R, stars={"patients"}),
    Case(
        "SELECT p.*, v.code FROM patients p JOIN visits v ON v.patient_id = p.id",
        R,
        stars={"patients"},
    ),
    Case(
        "SELECT v.* FROM patients p JOIN visits v ON v.patient_id = p.id WHERE p.ssn = $1",
        R,
        params={1: "patients.ssn compare"},
        stars=set(),
    ),
    Case(
        "SELECT p.name AS patient, p.dob FROM patients AS p WHERE p.ssn = '123-45-6789'",
        R,
        literals={"'123-45-6789'": "patients.ssn compare @session =123-45-6789"},
        outputs=["patients.name", "patients.dob"],
    ),
    Case(
        "SELECT name FROM patients WHERE ssn = E'123\\t45' AND email = $$a@b.c$$",
        R,
        literals={
            "E'123\\t45'": "patients.ssn compare @session =123\t45",
            "$$a@b.c$$": "patients.email compare @session =a@b.c",
        },
        outputs=["patients.name"],
    ),
    Case(
        "SELECT name FROM patients WHERE ssn = '1'::text AND email = CAST('x' AS varchar(40))",
        R,
        literals={
            "'1'::text": "patients.ssn compare",
            "CAST('x' AS varchar(40))": "patients.email compare",
        },
        outputs=["patients.name"],
    ),
    Case(
        "SELECT name FROM patients WHERE tenant_id = 'acme' AND ssn <> $1",
        R,
        params={1: "patients.ssn compare @literal 'acme'"},
        outputs=["patients.name"],
    ),
    Case(
        "SELECT name FROM patients WHERE ssn IS DISTINCT FROM $1 AND email IS NOT DISTINCT FROM $2",
        R,
        params={1: "patients.ssn compare", 2: "patients.email compare"},
        outputs=["patients.name"],
    ),
    Case(
        "SELECT id FROM patients WHERE ssn NOT IN ($1, $2) AND email <> ALL($3)",
        R,
        params={
            1: "patients.ssn compare",
            2: "patients.ssn compare",
            3: "patients.email compare[]",
        },
    ),
    Case(
        "SELECT id FROM patients WHERE ssn = ANY(ARRAY[$1, $2]) OR ssn = ANY(ARRAY['a'])",
        R,
        params={1: "patients.ssn compare", 2: "patients.ssn compare"},
        literals={"'a'": "patients.ssn compare"},
    ),
    Case("SELECT id FROM patients WHERE ssn = ANY('{a,b}')", X, refuse="= ANY over"),
    Case("SELECT id FROM patients WHERE $1 = ssn", R, params={1: "patients.ssn compare"}),
    Case("SELECT id FROM patients WHERE ssn = NULL", P, note="always unknown; nothing to seal"),
    Case(
        "SELECT name FROM patients WHERE ssn = $1 FOR UPDATE",
        R,
        params={1: "patients.ssn compare"},
        outputs=["patients.name"],
    ),
    Case(
        "SELECT name FROM patients WHERE ssn = $1 FOR UPDATE SKIP LOCKED LIMIT 1",
        R,
        params={1: "patients.ssn compare"},
        outputs=["patients.name"],
    ),
    Case(
        "SELECT id FROM patients WHERE email = $1 FOR SHARE OF patients NOWAIT",
        R,
        params={1: "patients.email compare"},
    ),
    Case("SELECT DISTINCT ssn FROM patients", R, outputs=["patients.ssn"]),
    Case(
        "SELECT DISTINCT name FROM patients",
        X,
        refuse="DISTINCT on randomized encrypted column public.patients.name",
    ),
    Case("SELECT DISTINCT * FROM patients", X, refuse="DISTINCT over randomized"),
    Case("SELECT DISTINCT ON (email) email, id FROM patients", R, outputs=["patients.email", None]),
    Case(
        "SELECT ssn, count(*) FROM patients GROUP BY ssn HAVING count(*) > 1",
        R,
        outputs=["patients.ssn", None],
    ),
    Case("SELECT ssn, count(*) FROM patients GROUP BY 1", R, outputs=["patients.ssn", None]),
    Case("SELECT name, count(*) FROM patients GROUP BY name", X, refuse="GROUP BY on randomized"),
    Case("SELECT count(DISTINCT ssn) FROM patients", P),
    Case("SELECT count(DISTINCT name) FROM patients", X, refuse="count(DISTINCT) on randomized"),
    Case(
        "SELECT max(balance) FROM patients",
        X,
        refuse="function max() on encrypted column public.patients.balance",
    ),
    Case("SELECT sum(amount) FROM payments WHERE tenant_id = $1", X, refuse="function sum()"),
    Case("SELECT id FROM patients ORDER BY 1", P),
    Case(
        "SELECT name FROM patients ORDER BY 1",
        X,
        refuse="ORDER BY encrypted column public.patients.name",
    ),
    Case("SELECT name AS n FROM patients ORDER BY n DESC", X, refuse="ORDER BY encrypted column"),
    Case(
        "SELECT id FROM patients WHERE name LIKE 'A%'",
        X,
        refuse="LIKE on encrypted column public.patients.name",
    ),
    Case(
        "SELECT id FROM patients WHERE email ILIKE $1",
        X,
        refuse="ILIKE on encrypted column public.patients.email",
    ),
    Case(
        "SELECT id FROM patients WHERE dob BETWEEN $1 AND $2",
        X,
        refuse="BETWEEN on encrypted column public.patients.dob",
    ),
    Case(
        "SELECT id FROM patients WHERE balance < 0",
        X,
        refuse="comparison < on encrypted column public.patients.balance",
    ),
    Case(
        "SELECT id FROM patients WHERE name = $1",
        X,
        refuse="randomized encrypted column public.patients.name",
    ),
    Case("SELECT id FROM patients WHERE ssn = upper($1)", X, refuse="with an expression"),
    Case(
        "SELECT id FROM patients WHERE lower(email) = $1",
        X,
        refuse="function lower() on encrypted column public.patients.email",
    ),
    Case(
        "SELECT ssn || '-x' FROM patients",
        X,
        refuse="operator || on encrypted column public.patients.ssn",
    ),
    Case(
        "SELECT coalesce(name, '') FROM patients",
        X,
        refuse="function coalesce() on encrypted column",
    ),
    Case(
        "SELECT profile->>'city' FROM patients",
        X,
        refuse="JSON operator on encrypted column public.patients.profile",
    ),
    Case(
        "SELECT id FROM patients WHERE profile @> $1",
        X,
        refuse="encrypted column public.patients.profile",
    ),
    Case(
        "SELECT ssn::text FROM patients", X, refuse="a cast on encrypted column public.patients.ssn"
    ),
    Case("SELECT length(name) FROM patients", X, refuse="on encrypted column public.patients.name"),
    Case("SELECT id FROM patients WHERE ssn ~ '^1'", X, refuse="regular expression match"),
    Case(
        "SELECT id FROM patients WHERE ssn = email",
        X,
        refuse="cells of different columns never compare equal",
    ),
    Case(
        "SELECT id FROM patients WHERE ssn = external_ref",
        X,
        refuse="of encrypted column public.patients.ssn with an expression",
    ),
    Case(
        "SELECT row_number() OVER (PARTITION BY email) FROM patients",
        X,
        refuse="encrypted column public.patients.email",
    ),
    Case("SELECT p FROM patients p", X, refuse="whole-row reference"),
    Case("SELECT row_to_json(p.*) FROM patients p", X, refuse="p.* of a protected table"),
    Case("SELECT to_jsonb(p) FROM patients p", X, refuse="whole-row reference"),
    Case(
        "SELECT name FROM patients UNION ALL SELECT name FROM patients_archive",
        X,
        refuse="mixes encrypted columns public.patients.name and public.patients_archive.name",
    ),
    Case(
        "SELECT ssn FROM patients WHERE tenant_id = $1 UNION ALL SELECT ssn FROM patients WHERE id = $2",
        R,
        outputs=["patients.ssn"],
    ),
    Case("SELECT ssn FROM patients UNION SELECT ssn FROM patients", R, outputs=["patients.ssn"]),
    Case(
        "SELECT name FROM patients UNION SELECT name FROM patients",
        X,
        refuse="UNION (without ALL) on randomized",
    ),
    Case("SELECT name FROM patients UNION ALL SELECT NULL", R, outputs=["patients.name"]),
    Case(
        "SELECT name FROM patients UNION ALL SELECT 'n/a'",
        X,
        refuse="mixes encrypted column public.patients.name with a plain value",
    ),
    Case(
        "SELECT * FROM patients UNION ALL SELECT * FROM patients_archive",
        X,
        refuse="UNION over * of a protected table",
    ),
    Case(
        "SELECT ssn FROM patients EXCEPT SELECT ssn FROM patients WHERE id = $1",
        R,
        outputs=["patients.ssn"],
    ),
    Case(
        "SELECT p.name, (SELECT max(v.at) FROM visits v WHERE v.patient_id = p.id) AS last_visit FROM patients p",
        R,
        outputs=["patients.name", None],
    ),
    Case(
        "SELECT v.id, (SELECT p.name FROM patients p WHERE p.id = v.patient_id) AS who FROM visits v",
        R,
        outputs=[None, "patients.name"],
        note="scalar subquery output: positional only",
    ),
    Case(
        "SELECT v.*, (SELECT p.name FROM patients p WHERE p.id = v.patient_id) FROM visits v",
        X,
        refuse="could not locate the encrypted column",
    ),
    Case(
        "SELECT id FROM patients p WHERE EXISTS (SELECT 1 FROM visits v WHERE v.patient_id = p.id AND v.code = $1) AND p.email = $2",
        R,
        params={2: "patients.email compare"},
    ),
    Case(
        "SELECT id FROM patients p WHERE EXISTS (SELECT 1 FROM visits v WHERE v.patient_id = p.id AND ssn = $1)",
        X,
        refuse="may be public.patients.ssn of an outer query",
    ),
    Case(
        "SELECT id FROM patients WHERE ssn IN (SELECT ssn FROM patients WHERE email = $1)",
        R,
        params={1: "patients.email compare"},
    ),
    Case(
        "SELECT id FROM patients WHERE ssn IN (SELECT ssn FROM patients_archive)",
        X,
        refuse="between encrypted columns public.patients.ssn and public.patients_archive.ssn",
    ),
    Case(
        "SELECT id FROM visits WHERE code IN (SELECT ssn FROM patients)",
        X,
        refuse="compared with a plain value",
    ),
    Case(
        "SELECT lower((SELECT name FROM patients LIMIT 1))",
        X,
        refuse="function lower() on encrypted column public.patients.name (from a subquery)",
    ),
    Case(
        "SELECT id FROM visits WHERE code = ANY((SELECT ssn FROM patients))",
        X,
        refuse="encrypted column public.patients.ssn (from a subquery)",
    ),
    Case(
        "SELECT ARRAY(SELECT email FROM patients)",
        X,
        refuse="encrypted column public.patients.email",
    ),
    Case(
        "SELECT id FROM patients WHERE ssn = (SELECT ssn FROM patients WHERE id = $1)",
        P,
        note="compared with the same column: nothing to seal",
    ),
    Case(
        "SELECT a.id, b.id FROM patients a JOIN patients b ON a.ssn = b.ssn AND a.tenant_id = b.tenant_id",
        P,
        note="self-join on an equality column: cells are equal within a tenant",
    ),
    Case(
        "SELECT a.id FROM patients a JOIN patients_archive b ON a.ssn = b.ssn",
        X,
        refuse="cells of different columns never compare equal",
    ),
    Case("SELECT a.id FROM patients a JOIN patients b USING (ssn)", P),
    Case(
        "SELECT a.id FROM patients a JOIN patients b ON a.name = b.name",
        X,
        refuse="randomized encrypted column public.patients.name",
    ),
    Case("SELECT id FROM patients NATURAL JOIN visits", X, refuse="NATURAL JOIN"),
    Case(
        "SELECT name FROM patients JOIN visits ON visits.patient_id = patients.id",
        R,
        outputs=["patients.name"],
        note="unqualified name binds to the protected table",
    ),
    Case(
        "SELECT p.name FROM patients p LEFT JOIN LATERAL (SELECT v.at FROM visits v WHERE v.patient_id = p.id "
        "ORDER BY v.at DESC LIMIT 1) last ON true",
        R,
        outputs=["patients.name"],
    ),
    Case(
        "SELECT x.n FROM (SELECT name AS n FROM patients WHERE email = $1) AS x",
        R,
        params={1: "patients.email compare"},
        outputs=["patients.name"],
    ),
    Case(
        "SELECT * FROM (SELECT id, ssn FROM patients) AS x WHERE x.ssn = $1",
        R,
        params={1: "patients.ssn compare"},
        outputs=[None, "patients.ssn"],
        note="* over a derived table is exact",
    ),
    Case(
        "SELECT x.s FROM (SELECT ssn FROM patients) AS x(s) WHERE x.s = $1",
        R,
        params={1: "patients.ssn compare"},
        outputs=["patients.ssn"],
    ),
    Case(
        "SELECT id FROM patients AS p(a, b) WHERE b = $1",
        X,
        refuse="column aliases on protected table",
    ),
    Case(
        "WITH recent AS (SELECT id, ssn, name FROM patients WHERE created_at > now() - interval '1 day') "
        "SELECT name FROM recent WHERE ssn = $1",
        R,
        params={1: "patients.ssn compare"},
        outputs=["patients.name"],
    ),
    Case(
        "WITH t AS (SELECT * FROM patients WHERE tenant_id = $1) SELECT t.email FROM t WHERE t.ssn = $2",
        R,
        params={2: "patients.ssn compare @$1"},
        outputs=["patients.email"],
    ),
    Case(
        "WITH RECURSIVE r(id, parent, ssn) AS (SELECT id, parent_id, ssn FROM patients WHERE id = $1 "
        "UNION ALL SELECT p.id, p.parent_id, p.ssn FROM patients p JOIN r ON p.parent_id = r.id) SELECT ssn FROM r",
        R,
        outputs=["patients.ssn"],
    ),
    Case(
        'SELECT "SecretKey", "Notes" FROM "Accounts" WHERE "TenantId" = $1 AND "SecretKey" = $2',
        R,
        params={2: "Accounts.SecretKey compare @$1"},
        outputs=["Accounts.SecretKey", "Accounts.Notes"],
    ),
    Case('SELECT a."Notes" AS "N" FROM public."Accounts" a', R, outputs=["Accounts.Notes"]),
    Case(
        "SELECT iban, total FROM billing.invoices WHERE tenant_id = $1 AND iban = $2",
        R,
        params={2: "billing.invoices.iban compare @$1"},
        outputs=["billing.invoices.iban", "billing.invoices.total"],
    ),
    Case("SELECT iban FROM invoices WHERE iban = $1", R, params={1: "billing.invoices.iban compare"}, outputs=["billing.invoices.iban"], note="billing is not on the tracked search_path: still protected (C2)"),
    Case(
        "SELECT iban FROM invoices WHERE iban = $1",
        R,
        search_path=("app", "billing"),
        params={1: "billing.invoices.iban compare"},
        outputs=["billing.invoices.iban"],
    ),
    Case(
        "SELECT body FROM user_notes WHERE reference = $1::uuid",
        R,
        params={1: "user_notes.reference compare @session"},
        outputs=["user_notes.body"],
    ),
    Case(
        "SELECT id FROM patients WHERE ssn = $1 OR id = $1", X, refuse="also used as a plain value"
    ),
    Case(
        "SELECT FROM patients WHERE (",
        X,
        refuse="cannot parse a statement that mentions protected table public.patients",
    ),
    Case("SELECT id FROM patients p, patients p", X, refuse="specified more than once"),
    Case("SELECT ssn INTO TEMP leaked FROM patients", X, refuse="SELECT INTO"),
    # ---- INSERT ----------------------------------------------------------------------
    Case(
        "INSERT INTO patients (tenant_id, ssn, name, dob) VALUES ($1::VARCHAR, $2::VARCHAR, $3::VARCHAR, "
        "$4::DATE) RETURNING patients.id",
        R,
        params={
            2: "patients.ssn store @$1",
            3: "patients.name store @$1",
            4: "patients.dob store @$1",
        },
        edits={"$2::VARCHAR": "$2::bytea", "$3::VARCHAR": "$3::bytea", "$4::DATE": "$4::bytea"},
        writes=["patients r0 $1"],
        outputs=[None],
        note="SQLAlchemy asyncpg",
    ),
    Case(
        'INSERT INTO "patients" ("tenant_id", "ssn", "name", "email") VALUES ($1, $2, $3, $4) RETURNING '
        '"patients"."id"',
        R,
        params={
            2: "patients.ssn store @$1",
            3: "patients.name store @$1",
            4: "patients.email store @$1",
        },
        writes=["patients r0 $1"],
        note="Django",
    ),
    Case(
        'INSERT INTO "patients" ("tenant_id", "ssn", "created_at", "updated_at") VALUES ($1, $2, $3, $4) '
        'RETURNING "id"',
        R,
        params={2: "patients.ssn store @$1"},
        note="Rails",
    ),
    Case(
        'INSERT INTO "public"."patients" ("tenant_id","name","ssn") VALUES ($1,$2,$3) RETURNING '
        '"public"."patients"."id", "public"."patients"."name"',
        R,
        params={2: "patients.name store", 3: "patients.ssn store"},
        outputs=[None, "patients.name"],
        note="Prisma",
    ),
    Case(
        "INSERT INTO patients (tenant_id, ssn, name) VALUES ($1, $2, $3), ($1, $4, $5), ($1, $6, $7)",
        R,
        params={
            2: "patients.ssn store @$1",
            3: "patients.name store @$1",
            4: "patients.ssn store @$1",
            5: "patients.name store @$1",
            6: "patients.ssn store @$1",
            7: "patients.name store @$1",
        },
        writes=["patients r0 $1", "patients r1 $1", "patients r2 $1"],
        note="executemany as multi-row VALUES",
    ),
    Case(
        "INSERT INTO patients (tenant_id, ssn, name, dob, balance, profile) VALUES ('acme', '123-45-6789', "
        "'O''Brien', '1980-01-02', 12.50, '{\"a\": 1}')",
        R,
        literals={
            "'123-45-6789'": "patients.ssn store @literal 'acme' =123-45-6789",
            "'O''Brien'": "patients.name store @literal 'acme' =O'Brien",
            "'1980-01-02'": "patients.dob store @literal 'acme' =1980-01-02",
            "12.50": "patients.balance store @literal 'acme' =12.50",
            "'{\"a\": 1}'": "patients.profile store @literal 'acme' ={\"a\": 1}",
        },
        writes=["patients r0 literal 'acme'"],
        note="psycopg2 client-side interpolation (simple protocol)",
    ),
    Case(
        "INSERT INTO patients (tenant_id, name, dob, balance) VALUES ('acme', E'line\\nbreak', DATE '1999-12-31', -0.5)",
        R,
        literals={
            "E'line\\nbreak'": "patients.name store @literal 'acme' =line\nbreak",
            "DATE '1999-12-31'": "patients.dob store @literal 'acme' =1999-12-31",
            "-0.5": "patients.balance store @literal 'acme' =-0.5",
        },
    ),
    Case(
        "INSERT INTO payments (tenant_id, card_number, approved, paid_at, amount) VALUES "
        "('t1', '4111111111111111', true, '2024-01-01 10:00:00+00'::timestamptz, 10::numeric(10,2))",
        R,
        literals={
            "'4111111111111111'": "payments.card_number store",
            "true": "payments.approved store @literal 't1' =true",
            "'2024-01-01 10:00:00+00'::timestamptz": "payments.paid_at store",
            "10::numeric(10,2)": "payments.amount store @literal 't1' =10",
        },
    ),
    Case(
        "INSERT INTO patients (ssn, name) VALUES ($1, $2)",
        R,
        params={1: "patients.ssn store @session", 2: "patients.name store @session"},
        writes=["patients r0 session"],
        note="tenant column omitted: its default is the session tenant",
    ),
    Case(
        "INSERT INTO patients (tenant_id, ssn) VALUES (DEFAULT, $1)",
        R,
        params={1: "patients.ssn store @session"},
    ),
    Case(
        "INSERT INTO patients (tenant_id, ssn) VALUES (current_setting('pgseal.tenant'), $1)",
        R,
        params={1: "patients.ssn store @session"},
    ),
    Case(
        "INSERT INTO patients (tenant_id, ssn) VALUES (lower($1), $2)",
        X,
        refuse="the tenant of the row is not known",
    ),
    Case("INSERT INTO patients VALUES ($1, $2, $3)", X, refuse="needs a column list"),
    Case(
        "INSERT INTO patients (tenant_id, ssn) VALUES ($1, upper($2))",
        X,
        refuse="a value of encrypted column public.patients.ssn must be a parameter or a constant",
    ),
    Case(
        "INSERT INTO payments (tenant_id, paid_at) VALUES ($1, now())",
        X,
        refuse="a value of encrypted column public.payments.paid_at must be a parameter or a constant",
    ),
    Case(
        "INSERT INTO patients (tenant_id, ssn) VALUES ($1, (SELECT ssn FROM patients_archive LIMIT 1))",
        X,
        refuse="must be a parameter or a constant",
    ),
    Case(
        "INSERT INTO patients (tenant_id, ssn) VALUES ('a', B'1010')",
        X,
        refuse="must be a parameter or a constant",
    ),
    Case(
        "INSERT INTO patients (tenant_id, ssn) VALUES ('a', 'x' 'y')",
        X,
        refuse="must be a parameter or a constant",
    ),
    Case(
        "INSERT INTO patients (tenant_id, ssn) VALUES ($1, $2), ($3, $2)",
        X,
        refuse="parameter $2 is used for",
    ),
    Case(
        "INSERT INTO patients (tenant_id, ssn, legacy_ssn) VALUES ($1, $2, $2)",
        X,
        refuse="also used as a plain value",
    ),
    Case(
        "INSERT INTO patients (tenant_id, ssn, name) VALUES ($1, $2, $3) ON CONFLICT (tenant_id, ssn) DO UPDATE "
        "SET name = EXCLUDED.name, updated_at = now() RETURNING id, name",
        R,
        params={2: "patients.ssn store @$1", 3: "patients.name store @$1"},
        outputs=[None, "patients.name"],
        note="upsert on an equality column",
    ),
    Case(
        "INSERT INTO patients (tenant_id, ssn) VALUES ($1, $2) ON CONFLICT (ssn) DO NOTHING",
        R,
        params={2: "patients.ssn store"},
    ),
    Case(
        "INSERT INTO patients (tenant_id, name) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        X,
        refuse="ON CONFLICT on randomized encrypted column public.patients.name",
    ),
    Case(
        "INSERT INTO patients (tenant_id, ssn, email) VALUES ($1, $2, $3) ON CONFLICT (ssn) DO UPDATE SET name = EXCLUDED.email",
        X,
        refuse="can only be set to a parameter, a constant, NULL, DEFAULT or the same column",
    ),
    Case(
        "INSERT INTO patients (tenant_id, ssn, name) VALUES ($1, $2, $3) ON CONFLICT (tenant_id, ssn) DO UPDATE "
        "SET name = $4, tenant_id = EXCLUDED.tenant_id",
        R,
        params={
            2: "patients.ssn store @$1",
            3: "patients.name store @$1",
            4: "patients.name store @$1",
        },
        writes=["patients r0 $1", "patients rNone $1"],
    ),
    Case(
        "INSERT INTO patients AS p (tenant_id, ssn, balance) VALUES ($1, $2, $3) ON CONFLICT ON CONSTRAINT "
        "patients_pkey DO UPDATE SET balance = p.balance WHERE p.email IS NULL",
        R,
        params={2: "patients.ssn store", 3: "patients.balance store"},
    ),
    Case(
        "INSERT INTO patients (tenant_id, ssn) VALUES ($1, $2) ON CONFLICT (tenant_id, ssn) DO UPDATE "
        "SET ssn = EXCLUDED.ssn WHERE patients.ssn IS DISTINCT FROM EXCLUDED.ssn",
        R,
        params={2: "patients.ssn store"},
    ),
    Case(
        "INSERT INTO patients (tenant_id, ssn) VALUES ($1, $2) ON CONFLICT (ssn) DO UPDATE SET tenant_id = $3",
        X,
        refuse="changing the tenant column",
    ),
    Case(
        "WITH upd AS (UPDATE patients SET name = $2 WHERE tenant_id = $3 AND ssn = $1 RETURNING id) "
        "INSERT INTO patients (tenant_id, ssn, name) SELECT $3, $1, $2 WHERE NOT EXISTS (SELECT 1 FROM upd)",
        R,
        params={1: "patients.ssn store @$3", 2: "patients.name store @$3"},
        rewritten="WITH upd AS (UPDATE patients SET name = $2 WHERE tenant_id = $3 AND ssn = ANY($1) "
        "RETURNING id) INSERT INTO patients (tenant_id, ssn, name) SELECT $3, ($1::bytea[])[1], "
        "$2::bytea WHERE NOT EXISTS (SELECT 1 FROM upd)",
        note="CTE upsert: $1 is compared (every key version) and stored (the active one); "
        "select-list parameters get an explicit ::bytea",
    ),
    Case(
        "WITH upd AS (UPDATE patients SET name = $2 WHERE ssn = $1 RETURNING id) "
        "INSERT INTO patients (tenant_id, ssn, name) SELECT $3, $1, $2 WHERE NOT EXISTS (SELECT 1 FROM upd)",
        X,
        refuse="under different tenants",
        note="$1 compared under the session tenant but stored under $3",
    ),
    Case(
        "INSERT INTO patients (tenant_id, ssn, name) SELECT p0::VARCHAR, p1::VARCHAR, p2::VARCHAR FROM "
        "(VALUES ($1, $2, $3, 0), ($4, $5, $6, 1)) AS imp_sen(p0, p1, p2, sen_counter) ORDER BY sen_counter "
        "RETURNING patients.id, patients.id AS id__1",
        R,
        params={
            2: "patients.ssn store @$1",
            3: "patients.name store @$1",
            5: "patients.ssn store @$4",
            6: "patients.name store @$4",
        },
        edits={
            "p1::VARCHAR": "p1",
            "p2::VARCHAR": "p2",
            "$2": "$2::bytea",
            "$3": "$3::bytea",
            "$5": "$5::bytea",
            "$6": "$6::bytea",
        },
        writes=["patients r0 $1", "patients r1 $4"],
        outputs=[None, None],
        note="SQLAlchemy 2 ORM flush: insertmanyvalues, sorted RETURNING (asyncpg)",
    ),
    Case(
        "INSERT INTO patients (tenant_id, ssn, dob) SELECT p0::VARCHAR, p1::VARCHAR, p2::DATE FROM "
        "(VALUES ($1::VARCHAR, $2::VARCHAR, $3::DATE, 0), ($4::VARCHAR, $5::VARCHAR, $6::DATE, 1)) "
        "AS imp_sen(p0, p1, p2, sen_counter) ORDER BY sen_counter RETURNING patients.id, patients.id AS id__1",
        R,
        params={
            2: "patients.ssn store @$1",
            3: "patients.dob store @$1",
            5: "patients.ssn store @$4",
            6: "patients.dob store @$4",
        },
        edits={
            "p1::VARCHAR": "p1",
            "p2::DATE": "p2",
            "$2::VARCHAR": "$2::bytea",
            "$3::DATE": "$3::bytea",
            "$5::VARCHAR": "$5::bytea",
            "$6::DATE": "$6::bytea",
        },
        note="the same through psycopg: casts inside VALUES too",
    ),
    Case(
        "INSERT INTO patients (tenant_id, ssn) SELECT p0, upper(p1) FROM (VALUES ($1, $2)) AS v(p0, p1)",
        X,
        refuse="a value of encrypted column public.patients.ssn must be a parameter or a constant",
    ),
    Case(
        "INSERT INTO patients (tenant_id, ssn) SELECT p0, p1 FROM (VALUES ($1, lower($2))) AS v(p0, p1)",
        X,
        refuse="a value of encrypted column public.patients.ssn must be a parameter or a constant",
    ),
    Case(
        "WITH ins AS (INSERT INTO patients (tenant_id, ssn) VALUES ($1, $2) RETURNING id, ssn) SELECT * FROM ins",
        R,
        params={2: "patients.ssn store @$1"},
        outputs=[None, "patients.ssn"],
    ),
    Case(
        "INSERT INTO patients_archive (tenant_id, ssn) SELECT tenant_id, ssn FROM patients",
        X,
        refuse="copying encrypted column public.patients.ssn into public.patients_archive.ssn",
    ),
    Case(
        "INSERT INTO export (value) SELECT ssn FROM patients",
        X,
        refuse="INSERT ... SELECT of encrypted column public.patients.ssn into unprotected table export",
    ),
    Case("INSERT INTO export SELECT * FROM patients", X, refuse="into unprotected table export"),
    Case(
        "INSERT INTO report (n) SELECT count(*) FROM patients WHERE ssn = $1",
        R,
        params={1: "patients.ssn compare"},
    ),
    Case(
        "INSERT INTO patients (tenant_id, ssn) SELECT $1, upper($2)",
        X,
        refuse="must be a parameter or a constant",
    ),
    Case(
        "INSERT INTO patients (tenant_id, ssn) SELECT t.id, $1 FROM tenants t WHERE t.slug = $2",
        X,
        refuse="the tenant of the row is not known",
    ),
    Case(
        "INSERT INTO patients (tenant_id, ssn) SELECT * FROM staging",
        X,
        refuse="INSERT ... SELECT * into protected table",
    ),
    Case(
        "INSERT INTO user_notes (body, reference) VALUES ($1, $2::uuid)",
        R,
        params={1: "user_notes.body store @session", 2: "user_notes.reference store @session"},
        edits={"$2::uuid": "$2::bytea"},
    ),
    Case(
        "INSERT INTO billing.invoices (tenant_id, iban, total) VALUES ($1, $2, $3)",
        R,
        params={2: "billing.invoices.iban store @$1", 3: "billing.invoices.total store @$1"},
        writes=["billing.invoices r0 $1"],
    ),
    Case(
        'INSERT INTO "Accounts" ("TenantId", "SecretKey", "Notes") VALUES ($1, $2, $3)',
        R,
        params={2: "Accounts.SecretKey store @$1", 3: "Accounts.Notes store @$1"},
    ),
    Case(
        "INSERT INTO patients (tenant_id, ssn) VALUES ($1, $2) RETURNING *",
        R,
        params={2: "patients.ssn store"},
        stars={"patients"},
    ),
    Case(
        "INSERT INTO patients (tenant_id, ssn) OVERRIDING SYSTEM VALUE VALUES ($1, 'x')",
        X,
        refuse="cannot parse",
        note="sqlglot does not know OVERRIDING: fail closed",
    ),
    # ---- UPDATE ----------------------------------------------------------------------
    Case(
        'UPDATE "patients" SET "name" = $1, "email" = $2 WHERE "patients"."id" = $3',
        R,
        params={1: "patients.name store @session", 2: "patients.email store @session"},
        writes=["patients rNone session"],
        note="Django",
    ),
    Case(
        "UPDATE patients SET ssn=$1::VARCHAR WHERE patients.id = $2::INTEGER",
        R,
        params={1: "patients.ssn store"},
        edits={"$1::VARCHAR": "$1::bytea"},
        note="SQLAlchemy",
    ),
    Case(
        'UPDATE "patients" SET "name" = $1, "updated_at" = $2 WHERE "patients"."id" = $3',
        R,
        params={1: "patients.name store"},
        note="Rails",
    ),
    Case(
        "UPDATE patients SET ssn = $1 WHERE tenant_id = $2 AND id = $3",
        R,
        params={1: "patients.ssn store @$2"},
        writes=["patients rNone $2"],
    ),
    Case(
        "UPDATE patients SET name = $1 WHERE ssn = $2 RETURNING ssn, name",
        R,
        params={1: "patients.name store", 2: "patients.ssn compare"},
        outputs=["patients.ssn", "patients.name"],
    ),
    Case(
        "UPDATE patients SET (name, dob) = ($1, $2) WHERE id = $3",
        R,
        params={1: "patients.name store", 2: "patients.dob store"},
    ),
    Case(
        "UPDATE patients SET (name, dob) = (SELECT n, d FROM staging WHERE id = $1) WHERE id = $1",
        X,
        refuse="SET (...) = (SELECT ...)",
    ),
    Case(
        "UPDATE patients SET name = name || ' Jr.' WHERE id = $1",
        X,
        refuse="operator || on encrypted column public.patients.name",
    ),
    Case(
        "UPDATE patients SET balance = balance + $1 WHERE id = $2",
        X,
        refuse="arithmetic on encrypted column",
    ),
    Case(
        "UPDATE patients SET tenant_id = $1 WHERE id = $2",
        X,
        refuse="changing the tenant column public.patients.tenant_id",
    ),
    Case(
        "UPDATE patients SET email = v.email FROM visitors v WHERE v.patient_id = patients.id",
        X,
        refuse="can only be set to",
    ),
    Case(
        "UPDATE users SET email = p.email FROM patients p WHERE p.user_id = users.id",
        X,
        refuse="copying encrypted column public.patients.email into plain column email",
    ),
    Case(
        "UPDATE patients p SET name = q.name FROM patients q WHERE q.id = $1 AND p.id = $2",
        P,
        note="cell copied within its column",
    ),
    Case(
        "UPDATE patients SET email = $1 FROM visits v WHERE v.patient_id = patients.id AND v.code = $2",
        R,
        params={1: "patients.email store"},
    ),
    Case(
        "UPDATE patients SET name = $1 WHERE ssn LIKE $2",
        X,
        refuse="LIKE on encrypted column public.patients.ssn",
    ),
    Case(
        "UPDATE payments SET approved = true, amount = 10.5 WHERE card_number = '4111'",
        R,
        literals={
            "true": "payments.approved store @session =true",
            "10.5": "payments.amount store",
            "'4111'": "payments.card_number compare @session =4111",
        },
    ),
    Case(
        "UPDATE payments SET approved = $1 WHERE tenant_id = 'acme' AND card_number = $2",
        R,
        params={
            1: "payments.approved store @literal 'acme'",
            2: "payments.card_number compare @literal 'acme'",
        },
    ),
    Case(
        'UPDATE "Accounts" SET "Notes" = $1 WHERE "TenantId" = $2 AND "SecretKey" = $3',
        R,
        params={1: "Accounts.Notes store @$2", 3: "Accounts.SecretKey compare @$2"},
    ),
    Case(
        "UPDATE billing.invoices SET total = $1 WHERE iban = $2",
        R,
        params={1: "billing.invoices.total store @session", 2: "billing.invoices.iban compare"},
    ),
    # ---- DELETE ----------------------------------------------------------------------
    Case("DELETE FROM patients WHERE ssn = $1", R, params={1: "patients.ssn compare"}),
    Case('DELETE FROM "patients" WHERE "patients"."id" IN ($1, $2)', P),
    Case(
        "DELETE FROM patients WHERE id = $1 RETURNING ssn, name",
        R,
        outputs=["patients.ssn", "patients.name"],
    ),
    Case(
        "DELETE FROM patients USING visits WHERE visits.patient_id = patients.id AND patients.email = 'x@y.z'",
        R,
        literals={"'x@y.z'": "patients.email compare"},
    ),
    Case(
        "DELETE FROM patients WHERE name = 'x'",
        X,
        refuse="randomized encrypted column public.patients.name",
    ),
    Case(
        "DELETE FROM patients p WHERE p.tenant_id = $1 AND p.email = $2 RETURNING p.*",
        R,
        params={2: "patients.email compare @$1"},
        stars={"patients"},
    ),
    # ---- DDL and utility ---------------------------------------------------------------
    Case(
        "CREATE TABLE patients (id bigserial PRIMARY KEY, tenant_id text NOT NULL DEFAULT "
        "current_setting('pgseal.tenant'), ssn bytea, name bytea)",
        P,
    ),
    Case("CREATE UNIQUE INDEX patients_tenant_ssn ON patients (tenant_id, ssn)", P),
    Case('CREATE INDEX CONCURRENTLY "patients_email_idx" ON "patients" ("email")', P),
    Case("ALTER TABLE patients ADD COLUMN note text DEFAULT 'none'", P),
    Case(
        'ALTER TABLE "patients" ADD CONSTRAINT "patients_user_fk" FOREIGN KEY ("user_id") REFERENCES "users" ("id") '
        "DEFERRABLE INITIALLY DEFERRED",
        P,
        note="Django migration",
    ),
    Case(
        "ALTER TABLE patients ALTER COLUMN ssn SET DEFAULT '000-00-0000'",
        X,
        refuse="constant in DDL for encrypted column ssn",
    ),
    Case(
        "CREATE INDEX p_active ON patients (id) WHERE ssn = 'x'",
        X,
        refuse="constant in DDL for encrypted column ssn",
    ),
    Case(
        "CREATE TABLE patients_copy AS SELECT ssn FROM patients",
        X,
        refuse="CREATE TABLE ... AS SELECT over encrypted columns",
    ),
    Case(
        "CREATE VIEW patient_names AS SELECT id, name FROM patients",
        X,
        refuse="CREATE VIEW ... AS SELECT",
    ),
    Case("CREATE VIEW patient_ids AS SELECT id, tenant_id FROM patients", P),
    Case("DROP TABLE IF EXISTS patients CASCADE", P),
    Case("TRUNCATE patients RESTART IDENTITY", P),
    Case("VACUUM (ANALYZE) patients", P),
    Case("LOCK TABLE patients IN SHARE ROW EXCLUSIVE MODE", P),
    Case("COMMENT ON COLUMN patients.ssn IS 'sealed by pgseal'", P),
    Case("GRANT SELECT, INSERT ON patients TO app", P),
    # COPY: streamed through the proxy (tests/unit/test_rewrite_copy.py), except these.
    Case(
        "COPY patients FROM STDIN WITH (FORMAT binary)",
        X,
        refuse="binary COPY of protected table public.patients",
    ),
    Case("COPY (SELECT * FROM patients) TO STDOUT", X, refuse="COPY (SELECT * ...)"),
    Case("COPY visits FROM STDIN", P),
    Case("DO $$ BEGIN UPDATE patients SET name = 'x'; END $$", X, refuse="DO on protected table"),
    Case(
        "PREPARE find_patient (text) AS SELECT name FROM patients WHERE ssn = $1",
        X,
        refuse="PREPARE",
    ),
    Case("DECLARE c CURSOR FOR SELECT ssn FROM patients", X, refuse="DECLARE"),
    Case(
        "MERGE INTO patients p USING staging s ON p.id = s.id WHEN MATCHED THEN UPDATE SET name = s.name",
        X,
        refuse="MERGE",
    ),
    Case(
        "EXPLAIN SELECT name FROM patients WHERE ssn = '123'",
        R,
        literals={"'123'": "patients.ssn compare"},
        outputs=[None],
    ),
    Case("EXPLAIN SELECT name FROM patients", P, note="the plan text has nothing to open"),
    Case(
        "EXPLAIN (ANALYZE, BUFFERS) SELECT id FROM patients WHERE email = $1",
        R,
        params={1: "patients.email compare"},
    ),
    Case(
        "EXPLAIN ANALYZE SELECT id FROM patients WHERE name LIKE 'a%'",
        X,
        refuse="LIKE on encrypted column",
    ),
    # ---- session statements ----------------------------------------------------------
    Case("SET pgseal.tenant = 'acme'", P, settings=["pgseal.tenant set 'acme'"]),
    Case("SET SESSION pgseal.tenant TO Acme", P, settings=["pgseal.tenant set 'acme'"]),
    Case('SET LOCAL "pgseal"."tenant" = "Acme"', P, settings=["pgseal.tenant set 'Acme' local"]),
    Case("SET pgseal.tenant TO DEFAULT", P, settings=["pgseal.tenant reset"]),
    Case("RESET pgseal.tenant", P, settings=["pgseal.tenant reset"]),
    Case("RESET ALL", P, settings=["all reset"]),
    Case("DISCARD ALL", P, settings=["discard_all reset"]),
    Case("SET search_path TO app, public", P, settings=["search_path set ('app', 'public')"]),
    Case("SET search_path = '$user', public", P, settings=["search_path set ('$user', 'public')"]),
    Case("SET ROLE support", P, settings=["role set 'support'"]),
    Case("SET SESSION AUTHORIZATION DEFAULT", P, settings=["session_authorization reset"]),
    Case("SET statement_timeout = 0", P, settings=[]),
    Case("SET TIME ZONE 'UTC'", P, settings=[]),
    Case("SET pgseal.tennant = 'acme'", X, refuse="unknown setting pgseal.tennant"),
    Case("SET pgseal.tenant = 'a', 'b'", X, refuse="exactly one non-empty value"),
    Case("SELECT set_config('pgseal.tenant', $1, false)", X, refuse="use SET pgseal.tenant"),
    # ---- several statements in one Query -----------------------------------------------
    Case(
        "BEGIN; INSERT INTO patients (tenant_id, ssn) VALUES ('a', '1'); COMMIT",
        "pass,prot,pass",
        literals={"'1'": "patients.ssn store @literal 'a' =1"},
    ),
    Case(
        "SET search_path TO billing; SELECT iban FROM invoices WHERE iban = 'DE89'",
        "pass,prot",
        literals={"'DE89'": "billing.invoices.iban compare @session =DE89"},
        settings=["search_path set ('billing',)"],
    ),
    Case("SELECT ';' AS semi; -- patients ssn\nSELECT 1; /* ; */ ;", "pass,pass"),
    Case(
        "SET pgseal.tenant = 'acme'; SELECT name FROM patients WHERE ssn = $x$12;3$x$",
        "pass,prot",
        literals={"$x$12;3$x$": "patients.ssn compare @session =12;3"},
        settings=["pgseal.tenant set 'acme'"],
    ),
]


def _render_tenant(plan: StatementPlan) -> None:  # pragma: no cover - debugging aid
    print(plan)


def _adds_hidden_tenant(edit: TextEdit) -> bool:
    return edit.start == edit.end and edit.text.startswith(', "') and edit.text.endswith('" ')


def _check(case: Case, plans: list[StatementPlan]) -> None:
    sql = case.sql
    kinds = ",".join({"passthrough": P, "protected": R, "refused": X}[p.kind] for p in plans)
    refusals = [p.refusal.message for p in plans if p.refusal is not None]
    assert kinds == case.kind, (kinds, refusals)
    if case.refuse is not None:
        assert any(case.refuse in m for m in refusals), refusals
    for plan in plans:
        if plan.refusal is not None:
            assert plan.refusal.message.startswith("pgseal: ")
            assert plan.refusal.sqlstate == "0A000"
    params = {n: t for p in plans for n, t in p.params.items()}
    rendered_params = {
        n: f"{_short(t.column)} {t.use}{'[]' if t.array else ''} @{t.tenant.describe()}"
        for n, t in params.items()
    }
    assert set(rendered_params) == set(case.params), rendered_params
    for n, want in case.params.items():
        assert rendered_params[n].startswith(want), (n, rendered_params[n])
    literals = {
        sql[t.start : t.end]: f"{_short(t.column)} {t.use} @{t.tenant.describe()} ={t.value}"
        for p in plans
        for t in p.literals
    }
    assert set(literals) == set(case.literals), literals
    for text, want in case.literals.items():
        assert literals[text].startswith(want), (text, literals[text])
    # The row tenant columns added after the select list are checked on their own
    # (test_an_unpinned_row_tenant_is_read_in_a_hidden_column); here, the rest.
    for p in plans:
        added = [e for e in p.edits if _adds_hidden_tenant(e)]
        assert len(added) == (1 if p.hidden_outputs else 0), (p.hidden_outputs, added)
    own_edits = [e for p in plans for e in p.edits if not _adds_hidden_tenant(e)]
    edits = {sql[e.start : e.end]: e.text for e in own_edits}
    if case.edits:
        assert edits == case.edits
    if case.rewritten is not None:
        assert apply_edits(sql, own_edits) == case.rewritten
    last = plans[-1]
    if case.outputs is not None:
        assert last.outputs_exact
        shown = last.outputs[: len(last.outputs) - last.hidden_outputs]
        got = [_short(o.column) if o is not None else None for o in shown]
        if last.kind == "passthrough":
            got = [None] * len(case.outputs)
        assert got == case.outputs, got
    if case.stars is not None:
        assert not last.outputs_exact or not case.stars
        assert {t for _, t in last.star_tables} == case.stars
    if case.writes is not None:
        got_writes = [
            f"{'.'.join(w.table).removeprefix('public.')} r{w.row} {w.source.describe()}"
            for p in plans
            for w in p.tenant_writes
        ]
        assert got_writes == case.writes, got_writes
    if case.settings is not None:
        got_settings = []
        for p in plans:
            for s in p.session_settings:
                text = f"{s.name} {s.action}"
                if s.value is not None:
                    text += f" {s.value!r}"
                if s.local:
                    text += " local"
                got_settings.append(text)
        assert got_settings == case.settings, got_settings
    # Offsets: every statement span and target lies inside the input, in order.
    previous_end = 0
    for plan in plans:
        assert previous_end <= plan.start <= plan.end <= len(sql)
        previous_end = plan.end
        for t in plan.literals:
            assert plan.start <= t.start < t.end <= plan.end


def _case_id(case: Case) -> str:
    return " ".join(case.sql.split())[:70]


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_statement(case: Case, policies: PolicySet) -> None:
    plans = analyze(case.sql, policies, case.search_path)
    _check(case, plans)


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_statement_narrow_form_differs_only_in_parameters_compared_alone(
    case: Case, policies: PolicySet
) -> None:
    """analyze(narrow=True): the same statement, but a parameter compared with `=` or `<>`
    on its own stays `col = $n` (ParamTarget.narrow, one cell) instead of `col = ANY($n)`."""
    wide = analyze(case.sql, policies, case.search_path)
    narrow = analyze(case.sql, policies, case.search_path, narrow=True)
    assert [p.kind for p in narrow] == [p.kind for p in wide]
    for n, w in zip(narrow, wide, strict=True):
        if w.kind == "refused":
            continue
        assert (n.outputs, n.literals, n.tenant_writes, n.session_settings, n.hidden_outputs) == (
            w.outputs, w.literals, w.tenant_writes, w.session_settings, w.hidden_outputs
        )
        assert n.params.keys() == w.params.keys()
        for index, target in n.params.items():
            if target.narrow:
                assert w.params[index].versions and not w.params[index].array
                assert replace(target, narrow=False) == replace(w.params[index], versions=False)
            else:
                assert target == w.params[index]


NARROW_FORMS = [
    ("SELECT id FROM patients WHERE ssn = $1", "SELECT id FROM patients WHERE ssn = $1", {1}),
    (
        "SELECT id FROM patients WHERE $1::text = ssn AND ssn <> ($2)",
        "SELECT id FROM patients WHERE $1::bytea = ssn AND ssn <> $2::bytea",
        {1, 2},
    ),
    (
        # IS [NOT] DISTINCT FROM, IN and = ANY keep every version.
        "SELECT id FROM patients WHERE ssn = $1 AND email IN ($2) AND ssn IS DISTINCT FROM $3",
        "SELECT id FROM patients WHERE ssn = $1 AND email = ANY ($2) AND (NOT ((ssn = ANY($3)) "
        "IS TRUE OR (ssn IS NULL AND ($3::bytea[])[1] IS NULL)))",
        {1},
    ),
    (
        # A parameter compared both alone and in a list: the statement stays wide.
        "SELECT id FROM patients WHERE ssn = $1 OR ssn IN ($1, $2)",
        "SELECT id FROM patients WHERE ssn = ANY($1) OR ssn = ANY ($1 || $2)",
        set(),
    ),
    (
        # Stored and compared: one cell for both (the wide form stores `($1::bytea[])[1]`).
        "UPDATE patients SET ssn = $1 WHERE ssn = $1 AND tenant_id = $2",
        "UPDATE patients SET ssn = $1 WHERE ssn = $1 AND tenant_id = $2",
        {1},
    ),
    (
        # Constants are sealed by the proxy itself: always every version.
        "SELECT id FROM patients WHERE ssn = 'x'",
        "SELECT id FROM patients WHERE ssn = ANY('x')",
        set(),
    ),
]


@pytest.mark.parametrize(("sql", "rewritten", "narrowed"), NARROW_FORMS)
def test_narrow_forms(sql: str, rewritten: str, narrowed: set[int], policies: PolicySet) -> None:
    (plan,) = analyze(sql, policies, narrow=True)
    own = [e for e in plan.edits if not _adds_hidden_tenant(e)]
    assert apply_edits(sql, own) == rewritten
    assert {i for i, t in plan.params.items() if t.narrow} == narrowed


def test_table_is_large_enough() -> None:
    statements = sum(max(1, c.kind.count(",") + 1) for c in CASES)
    assert len(CASES) >= 150 and statements >= 150


# ---- the API around the table ---------------------------------------------------------


def test_offsets_are_relative_to_the_whole_string(policies: PolicySet) -> None:
    sql = "SET pgseal.tenant = 'a';\nINSERT INTO patients (tenant_id, ssn, name) VALUES ('a', '1', $$n$$);\nSELECT 1"
    plans = analyze(sql, policies)
    assert [p.kind for p in plans] == ["passthrough", "protected", "passthrough"]
    assert [sql[p.start : p.end] for p in plans] == [
        "SET pgseal.tenant = 'a'",
        "INSERT INTO patients (tenant_id, ssn, name) VALUES ('a', '1', $$n$$)",
        "SELECT 1",
    ]
    edits = [t.edit("'\\x01ff'::bytea") for t in plans[1].literals]
    rewritten = apply_edits(sql, edits)
    assert rewritten == sql.replace("'1'", "'\\x01ff'::bytea").replace("$$n$$", "'\\x01ff'::bytea")


def test_edits_and_literal_splices_apply_together(policies: PolicySet) -> None:
    sql = "SELECT name FROM patients WHERE ssn = $1::text AND email IN ('a', CAST('b' AS text))"
    (plan,) = analyze(sql, policies)
    edits = [*plan.edits, *(t.edit("X") for t in plan.literals)]
    assert (
        apply_edits(sql, edits)
        == 'SELECT name , "patients"."tenant_id" FROM patients '
        "WHERE ssn = ANY($1::bytea[]) AND email = ANY (X || X)"
    )


def test_apply_edits_rejects_overlaps() -> None:
    with pytest.raises(ValueError, match="overlapping"):
        apply_edits("abcdef", [TextEdit(0, 3, "x"), TextEdit(2, 4, "y")])


def test_resolve_outputs_by_table_and_name(policies: PolicySet) -> None:
    (plan,) = analyze("SELECT u.*, p.* FROM users u JOIN patients p ON p.user_id = u.id", policies)
    assert not plan.outputs_exact and plan.star_tables == {("public", "patients")}
    patients = ("public", "patients")
    fields = [
        ("id", None),
        ("name", None),
        ("id", patients),
        ("tenant_id", patients),
        ("name", patients),
        ("ssn", patients),
    ]
    resolved = resolve_outputs(plan, fields)
    assert [str(r.column) if r else None for r in resolved] == [
        None,
        None,  # users.name: same name, another table: stays closed
        None,
        None,
        "public.patients.name",
        "public.patients.ssn",
    ]
    ssn = resolved[5]
    assert ssn is not None and ssn.tenant.kind == "output"
    assert ssn.tenant.column == ColumnRef("public", "patients", "tenant_id")


def test_resolve_outputs_exact_checks_the_field_count(policies: PolicySet) -> None:
    (plan,) = analyze("SELECT ssn, tenant_id FROM patients", policies)
    assert plan.outputs_exact
    resolved = resolve_outputs(plan, [("ssn", ("public", "patients")), ("tenant_id", None)])
    assert resolved[0] is not None and resolved[0].tenant.output == 1
    with pytest.raises(ValueError):
        resolve_outputs(plan, [("ssn", None)])


def test_output_tenant_from_where_clause(policies: PolicySet) -> None:
    (plan,) = analyze("SELECT name FROM patients WHERE tenant_id = $1", policies)
    (out,) = plan.outputs
    assert out is not None and out.tenant.kind == "param" and out.tenant.param == 1
    # Neither selected nor pinned: the row tenant column is added, hidden (see below).
    (plan,) = analyze("SELECT name FROM patients WHERE id = $1", policies)
    out, hidden = plan.outputs
    assert out is not None and out.tenant.kind == "output" and out.tenant.output == 1
    assert hidden is None and plan.hidden_outputs == 1


@pytest.mark.parametrize(
    ("sql", "forwarded"),
    [
        (
            "SELECT name FROM patients WHERE id = $1",
            'SELECT name , "patients"."tenant_id" FROM patients WHERE id = $1',
        ),
        (
            'SELECT p.name AS n FROM public.patients AS "P p" WHERE p.id = 1',
            None,  # "p" names no table: PostgreSQL refuses it; nothing is added to it
        ),
        (
            'SELECT "P p".name AS n FROM public.patients AS "P p" WHERE "P p".id = 1',
            'SELECT "P p".name AS n , "P p"."tenant_id" FROM public.patients AS "P p" '
            'WHERE "P p".id = 1',
        ),
        (
            "WITH recent AS (SELECT id FROM patients ORDER BY id DESC LIMIT 5) "
            "SELECT p.name, a IS DISTINCT FROM b FROM patients p JOIN recent r ON r.id = p.id",
            "WITH recent AS (SELECT id FROM patients ORDER BY id DESC LIMIT 5) "
            'SELECT p.name, a IS DISTINCT FROM b , "p"."tenant_id" FROM patients p '
            "JOIN recent r ON r.id = p.id",
        ),
        (
            "SELECT a.name, b.name FROM patients a JOIN patients b ON a.ssn = b.ssn",
            'SELECT a.name, b.name , "a"."tenant_id", "b"."tenant_id" FROM patients a '
            "JOIN patients b ON a.ssn = b.ssn",
        ),
        # RETURNING: at the end of its list (it ends the statement).
        (
            "INSERT INTO patients (tenant_id, ssn) VALUES ($1, $2) RETURNING id, name",
            'INSERT INTO patients (tenant_id, ssn) VALUES ($1, $2) RETURNING id, name, '
            '"patients"."tenant_id" ',
        ),
        (
            "UPDATE patients SET name = $1 WHERE id = $2 RETURNING ssn, name;",
            'UPDATE patients SET name = $1 WHERE id = $2 RETURNING ssn, name, '
            '"patients"."tenant_id" ;',
        ),
        (
            "DELETE FROM public.patients AS p WHERE id = $1 RETURNING p.ssn -- bye",
            'DELETE FROM public.patients AS p WHERE id = $1 RETURNING p.ssn, "p"."tenant_id"  '
            "-- bye",
        ),
        (
            "UPDATE patients SET dob = NULL FROM notes n WHERE n.id = patients.id "
            "RETURNING patients.ssn",
            "UPDATE patients SET dob = NULL FROM notes n WHERE n.id = patients.id "
            'RETURNING patients.ssn, "patients"."tenant_id" ',
        ),
        (
            "INSERT INTO patients AS p (tenant_id, ssn) VALUES ($1, $2) ON CONFLICT (id) "
            "DO UPDATE SET dob = NULL RETURNING ssn",
            "INSERT INTO patients AS p (tenant_id, ssn) VALUES ($1, $2) ON CONFLICT (id) "
            'DO UPDATE SET dob = NULL RETURNING ssn, "p"."tenant_id" ',
        ),
    ],
)
def test_an_unpinned_row_tenant_is_read_in_a_hidden_column(
    policies: PolicySet, sql: str, forwarded: str | None
) -> None:
    """A cell whose row tenant the statement neither selects nor pins could have been copied
    into another tenant's row: the proxy reads the row tenant column too, after the
    client's columns, and checks each cell against it (the data path drops it)."""
    (plan,) = analyze(sql, policies)
    if forwarded is None:
        assert plan.hidden_outputs == 0 or plan.kind == "refused"
        return
    assert apply_edits(sql, plan.edits) == forwarded
    shown = len(plan.outputs) - plan.hidden_outputs
    assert all(o is None for o in plan.outputs[shown:])
    for out in plan.outputs[:shown]:
        if out is not None:
            assert out.tenant.kind == "output" and out.tenant.output is not None
            assert out.tenant.output >= shown


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT tenant_id, name FROM patients WHERE id = $1",  # selected
        "SELECT name FROM patients WHERE tenant_id = $1 AND id = $2",  # pinned
        "SELECT DISTINCT name FROM patients WHERE id = 1",
        "SELECT name FROM patients WHERE id = 1 GROUP BY name",
        "SELECT name FROM patients UNION ALL SELECT name FROM patients",
        "SELECT * FROM patients",  # the tenant column is in the *
        "SELECT x.name FROM (SELECT name FROM patients) x",  # not a base table at the top
        "EXPLAIN SELECT name FROM patients WHERE id = 1",
        "COPY (SELECT id, name FROM patients) TO STDOUT",
        "WITH d AS (DELETE FROM patients WHERE id = 1 RETURNING ssn) SELECT ssn FROM d",
        "DELETE FROM patients WHERE id = 1 RETURNING *",  # the tenant column is in the *
        "UPDATE patients SET dob = NULL WHERE tenant_id = $1 RETURNING ssn",  # pinned
    ],
)
def test_no_hidden_column_where_it_would_change_the_result(policies: PolicySet, sql: str) -> None:
    (plan,) = analyze(sql, policies)
    assert plan.hidden_outputs == 0
    assert not any(
        '"tenant_id"' in e.text for e in plan.edits
    ), "the statement's text is left as it was"


def test_tables_touched(policies: PolicySet) -> None:
    (plan,) = analyze(
        "SELECT p.name FROM patients p JOIN payments y ON y.patient_id = p.id WHERE y.card_number = $1",
        policies,
    )
    assert plan.tables == {("public", "patients"), ("public", "payments")}


def test_plans_are_cached_per_policy_object(policies: PolicySet, tmp_path: Path) -> None:
    sql = "SELECT name FROM patients WHERE ssn = $1"
    first = analyze(sql, policies)
    assert analyze(sql, policies)[0] is first[0]
    other_path = tmp_path / "other.yaml"
    other_path.write_text(
        POLICY.replace("ssn:     {type: text, search: equality}", "ssn:     {type: text}")
    )
    other = load_policies([other_path])
    assert analyze(sql, other)[0].kind == "refused"  # a new policy object: a new analysis
    assert analyze(sql, policies)[0] is first[0]
    clear_cache()
    assert analyze(sql, policies)[0] is not first[0]


def test_statements_with_protected_constants_are_not_cached(policies: PolicySet) -> None:
    """The plaintext of an inline value for a protected column is in the text (the key)
    and in the plan: neither is kept once the statement is analyzed."""
    sql = "INSERT INTO patients (tenant_id, ssn) VALUES ('acme', '123-45-6789')"
    (plan,) = analyze(sql, policies)
    assert [lit.value for lit in plan.literals] == ["123-45-6789"]
    assert analyze(sql, policies)[0] is not plan
    from proxy.rewrite import analyzer

    assert not any("123-45-6789" in key[0] for key in analyzer._CACHE)
    # Nor a refused statement: its constants may be ones the analysis could not place.
    refused = "SELECT id FROM patients WHERE ssn LIKE '987-65-4321%'"
    (plan,) = analyze(refused, policies)
    assert plan.kind == "refused" and not plan.literals
    assert not any("987-65-4321" in key[0] for key in analyzer._CACHE)
    # An unprotected constant is no reason not to cache.
    unprotected = "SELECT name FROM patients WHERE tenant_id = 'acme'"
    first = analyze(unprotected, policies)
    assert analyze(unprotected, policies)[0] is first[0]


def test_long_statements_are_not_cached(policies: PolicySet) -> None:
    rows = ", ".join(f"($1, '{i}')" for i in range(3000))
    sql = f"INSERT INTO patients (tenant_id, ssn) VALUES {rows}"
    (plan,) = analyze(sql, policies)
    assert len(plan.literals) == 3000
    assert analyze(sql, policies)[0] is not plan


def test_search_path_follows_set_within_one_string(policies: PolicySet) -> None:
    sql = "SELECT iban FROM invoices; SET search_path = billing; SELECT iban FROM invoices; RESET search_path; SELECT iban FROM invoices"
    kinds = [p.kind for p in analyze(sql, policies)]
    # invoices is protected only in billing, but the tracked search_path is an
    # estimate, so an unqualified name off the path still resolves to it (C2).
    assert kinds == ["protected", "passthrough", "protected", "passthrough", "protected"]


@pytest.mark.parametrize(
    ("sql", "mentions"),
    [
        ("select * from patients", True),
        ("SELECT * FROM PATIENTS", True),
        ('SELECT * FROM "patients"', True),
        ("SELECT * FROM patients_archive", True),
        ('SELECT "SecretKey" FROM "Accounts"', True),
        ("SELECT 1 FROM accounts", True),  # over-approximates: the parser decides
        ('SELECT * FROM U&"p\\0061tients"', True),
        ("SELECT * FROM users", False),
        ("SELECT 1", False),
    ],
)
def test_mentions_protected_table(policies: PolicySet, sql: str, mentions: bool) -> None:
    assert policies.mentions_protected_table(sql) is mentions


def test_unicode_escaped_table_name_is_parsed_not_skipped(policies: PolicySet) -> None:
    (plan,) = analyze('SELECT name FROM U&"p\\0061tients" WHERE name = $1', policies)
    assert plan.kind != "passthrough"


def test_empty_policy_passes_everything() -> None:
    assert (
        analyze("SELECT ssn FROM patients WHERE ssn LIKE 'x'", PolicySet())[0].kind == "passthrough"
    )


def test_refusals_carry_sqlstate_and_construct(policies: PolicySet) -> None:
    (plan,) = analyze("SELECT id FROM patients WHERE email LIKE $1", policies)
    assert plan.refusal is not None
    assert plan.refusal.sqlstate == "0A000"
    assert plan.refusal.construct == "LIKE"
    assert plan.refusal.column == ColumnRef("public", "patients", "email")
    assert (
        plan.refusal.message
        == "pgseal: LIKE on encrypted column public.patients.email is not supported"
    )


_WORDS = st.sampled_from(
    [
        "SELECT", "INSERT INTO", "UPDATE", "DELETE FROM", "WITH x AS (", "VALUES", "(", ")", ",",
        "patients", "p", "ssn", "name", "email", "tenant_id", "p.ssn", "p.*", "*", "=", "<>", "IN",
        "LIKE", "AND", "OR", "NOT", "IS NULL", "$1", "$2", "$1::text", "'x'", "E'y'", "42", "-1",
        "true", "NULL", "DEFAULT", "FROM", "WHERE", "SET", "RETURNING", "ON CONFLICT", "DO",
        "NOTHING", "JOIN", "USING", "ON", "UNION", "ALL", "ORDER BY", "GROUP BY", "LIMIT", "count(",
        "lower(", "ANY(", "ARRAY[", "]", "::date", ";", "AS", "excluded.ssn",
    ]
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.lists(_WORDS, min_size=1, max_size=25))
def test_any_text_gets_a_plan_and_never_an_internal_error(words: list[str]) -> None:
    policies = _fuzz_policies()
    sql = " ".join(words)
    wide = _analyze(sql, policies, ("public",))
    narrow = _analyze(sql, policies, ("public",), narrow=True)
    for plan in (*wide, *narrow):
        assert plan.kind in ("passthrough", "protected", "refused")
        if plan.refusal is not None:
            assert "internal error" not in plan.refusal.message, (sql, plan.refusal.message)
        for t in plan.literals:
            assert plan.start <= t.start < t.end <= plan.end
    # The narrow form differs only in how compared parameters are sent.
    assert [p.kind for p in narrow] == [p.kind for p in wide], sql
    for n, w in zip(narrow, wide, strict=True):
        assert (n.outputs, n.literals, n.tenant_writes) == (w.outputs, w.literals, w.tenant_writes)
        assert n.params.keys() == w.params.keys()
        for i, t in n.params.items():
            assert not (t.narrow and (t.versions or t.array))
            assert t.narrow or t == w.params[i]


_FUZZ: list[PolicySet] = []


def _fuzz_policies() -> PolicySet:
    if not _FUZZ:
        from proxy.policy import ColumnPolicy, TablePolicy

        _FUZZ.append(
            PolicySet.of(
                [
                    TablePolicy(
                        "public",
                        "patients",
                        "tenant_id",
                        False,
                        "strict",
                        None,
                        "error",
                        {
                            "ssn": ColumnPolicy("ssn", "text", "equality"),
                            "email": ColumnPolicy("email", "text", "equality"),
                            "name": ColumnPolicy("name", "text"),
                        },
                    )
                ]
            )
        )
    return _FUZZ[0]


PURE_MODULES = [
    "proxy/policy/__init__.py",
    "proxy/policy/model.py",
    "proxy/policy/loader.py",
    "proxy/rewrite/__init__.py",
    "proxy/rewrite/plan.py",
    "proxy/rewrite/lexer.py",
    "proxy/rewrite/analyzer.py",
]


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_modules_import_no_io(module: str) -> None:
    import ast

    root = Path(__file__).resolve().parents[2]
    tree = ast.parse((root / module).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"asyncio", "socket", "ssl", "pkcs11", "aiocache", "asyncpg", "selectors"}


def test_typical_statement_is_analyzed_fast(policies: PolicySet) -> None:
    """A generous bound (the machine may be busy): analysis is a few parses' worth."""
    sql = (
        "SELECT patients.id, patients.ssn, patients.name FROM patients "
        "WHERE patients.tenant_id = $1::VARCHAR AND patients.ssn = $2::VARCHAR"
    )
    _analyze(sql, policies, ("public",))
    start = time.perf_counter()
    for _ in range(50):
        _analyze(sql, policies, ("public",))
    per_statement = (time.perf_counter() - start) / 50
    assert per_statement < 0.02


def test_unqualified_protected_table_off_the_search_path_is_protected(
    policies: PolicySet,
) -> None:
    """C2: the proxy's search_path may be wrong; it must never make a write plaintext."""
    sql = "INSERT INTO patients (tenant_id, ssn) VALUES ('acme', '123-45-6789')"
    for path in [("x",), (), ("billing",)]:
        [plan] = analyze(sql, policies, path)
        assert plan.kind == "protected", path
        assert plan.literals, path
    [plan] = analyze("INSERT INTO patients (tenant_id, ssn) VALUES ($1, $2)", policies, ("x",))
    assert plan.kind == "protected" and plan.params
    [plan] = analyze("COPY patients (tenant_id, ssn) FROM STDIN", policies, ("x",))
    assert plan.kind == "protected"


def test_unqualified_name_protected_in_several_schemas_off_path_is_refused(
    tmp_path: Path,
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "version: 1\ntables:\n"
        "  a.t:\n    tenant: {column: tenant_id}\n    columns:\n      s: {type: text}\n"
        "  b.t:\n    tenant: {column: tenant_id}\n    columns:\n      s: {type: text}\n"
    )
    two = load_policies([path])
    for sql in ["INSERT INTO t (tenant_id, s) VALUES ('acme', 'x')", "COPY t (tenant_id, s) FROM STDIN"]:
        [plan] = analyze(sql, two, ("x",))
        assert plan.kind == "refused" and "schema-qualify" in plan.refusal.message, sql
    [plan] = analyze("INSERT INTO t (tenant_id, s) VALUES ('acme', 'x')", two, ("b",))
    assert plan.kind == "protected"

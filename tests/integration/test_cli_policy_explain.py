"""`pgseal policy check` and `pgseal explain "SQL"` run as a user runs them.

- policy check against the live PostgreSQL of the suite: a policy that fits its schema
  passes with the `policy ok` line; each kind of mismatch (missing table or column,
  an encrypted column that is not bytea, a missing tenant column, a search column with no
  index) is one stdout line naming the policy's file:line and the table.column, every
  problem is listed (not only the first), and stderr has the one summary line;
- the failures before any check (policy file unreadable or invalid, no policies, a DSN
  that does not answer) are one `pgseal: ` line on stderr, exit 1, no traceback, and
  never show the DSN's password;
- explain (no database): which parameters and literals are sealed, for which column,
  how and under which tenant; what is opened on the way out; what passes through;
  and what is refused, naming table.column and the construct.

Each test of policy check works in a schema of its own, dropped afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.localpg import free_port
from tests.conftest import PgTarget

pytestmark = pytest.mark.integration

# The installed entry point, as a user runs it (python -m proxy where it is not installed).
_SCRIPT = Path(sys.executable).parent / "pgseal"
PGSEAL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "proxy"]

# Settings that would let the developer's own environment choose the policies or the
# database these commands look at, instead of the test.
_ENV_SCRUBBED = ("PGSEAL_CONFIG", "PGSEAL_POLICIES", "PGSEAL_KEYSTORE_DSN")


def pgseal(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in _ENV_SCRUBBED}
    return subprocess.run([*PGSEAL, *args], capture_output=True, text=True, timeout=60,
                          env=env)


def assert_one_line_failure(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 1 with one `pgseal: ` line on stderr holding every needle (DESIGN.md 3)."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    err = result.stderr.strip()
    assert err.startswith("pgseal: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def line_of(path: Path, text: str) -> str:
    """`file:line` of the first line of `path` that starts (after indentation) with `text`:
    what the loader and check_policy put in front of a problem."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.lstrip().startswith(text):
            return f"{path}:{number}"
    raise AssertionError(f"{text!r} not in {path}")


# --------------------------------------------------------------------------------------
# pgseal policy check, against the live schema


@pytest.fixture
def schema(pg: PgTarget) -> Iterator[str]:
    """A schema of this test's own: the server is shared with every other test."""
    name = f"pgseal_pc_{uuid.uuid4().hex[:12]}"
    pg.execute(f"CREATE SCHEMA {name}")
    try:
        yield name
    finally:
        pg.execute(f"DROP SCHEMA {name} CASCADE")


def test_policy_check_passes_a_policy_that_fits_the_schema(
    pg: PgTarget, pg_dsn: str, schema: str, tmp_path: Path
) -> None:
    pg.execute(f"""
        CREATE TABLE {schema}.people (id int PRIMARY KEY, tenant_id text NOT NULL,
                                      ssn bytea, name bytea, dob bytea);
        CREATE INDEX ON {schema}.people (ssn);
        CREATE TABLE {schema}.notes (id int, body bytea, rating bytea);
    """)
    # A folder of two files: both are read, their tables counted together.
    folder = tmp_path / "policies"
    write(folder / "a.yaml", f"""
        version: 1
        tables:
          {schema}.people:
            tenant: {{column: tenant_id}}
            columns:
              ssn:  {{type: text, search: equality}}
              name: {{type: text}}
              dob:  {{type: date}}
    """)
    write(folder / "b.yml", f"""
        version: 1
        tables:
          {schema}.notes:
            tenant: {{session: true}}   # no tenant column to look for
            columns:
              body:   {{type: text}}
              rating: {{type: int4}}
    """)
    write(folder / "README.txt", "not a policy: ignored\n")
    result = pgseal("policy", "check", "--policies", str(folder), "--dsn", pg_dsn)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stdout == "policy ok: 2 tables, 5 encrypted columns\n"
    assert result.stderr == ""


def people_policy(folder: Path, schema: str, tenant: str, columns: str) -> Path:
    """A policy of `schema`.people alone; `columns` is a YAML flow mapping's body."""
    return write(folder / "policy.yaml", f"""
        version: 1
        tables:
          {schema}.people:
            tenant: {tenant}
            columns: {{{columns}}}
    """)


@pytest.mark.parametrize("index", [
    "CREATE UNIQUE INDEX ON {s}.people (tenant_id, ssn)",  # a tenant's searches use it
    "CREATE INDEX ON {s}.people USING hash (ssn)",
])
def test_policy_check_takes_any_index_that_finds_a_cell_by_equality(
    pg: PgTarget, pg_dsn: str, schema: str, tmp_path: Path, index: str
) -> None:
    pg.execute(f"CREATE TABLE {schema}.people (tenant_id text, ssn bytea);"
               + index.format(s=schema))
    policy = people_policy(tmp_path, schema, "{column: tenant_id}",
                           "ssn: {type: text, search: equality}")
    result = pgseal("policy", "check", "--policies", str(policy), "--dsn", pg_dsn)
    assert (result.returncode, result.stdout) == (0, "policy ok: 1 tables, 1 encrypted columns\n")


def test_policy_check_reads_policies_and_dsn_from_the_config(
    pg: PgTarget, pg_dsn: str, schema: str, tmp_path: Path
) -> None:
    """The form the README documents: `pgseal policy check --config FILE`; the policy path
    is relative to the config file, the database is the keystore's."""
    pg.execute(f"CREATE TABLE {schema}.cards (tenant_id text, number bytea)")
    write(tmp_path / "etc" / "policies" / "cards.yaml", f"""
        version: 1
        tables:
          {schema}.cards:
            tenant: {{column: tenant_id}}
            columns:
              number: {{type: text}}
    """)
    config = write(tmp_path / "etc" / "pgseal.yaml", f"""
        policies: [policies/cards.yaml]
        keystore: {{dsn: "{pg_dsn}"}}
    """)
    result = pgseal("policy", "check", "--config", str(config))
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stdout == "policy ok: 1 tables, 1 encrypted columns\n"


# One mismatch each: (DDL, policy columns (a YAML flow mapping's body), tenant, what the
# problem line must say after `file:line: `). `{s}` is the test's schema. Every table here
# fits its policy but for the one broken part.
_PROBLEMS = {
    "table-missing": (
        "",
        "ssn: {type: text}",
        "{column: tenant_id}",
        "table {s}.people does not exist",
    ),
    "column-missing": (
        "CREATE TABLE {s}.people (tenant_id text, ssn bytea)",
        "ssn: {type: text}, email: {type: text}",
        "{column: tenant_id}",
        "{s}.people.email does not exist",
    ),
    "column-not-bytea": (
        "CREATE TABLE {s}.people (tenant_id text, ssn varchar(11));"
        "CREATE INDEX ON {s}.people (ssn)",
        "ssn: {type: varchar, search: equality}",
        "{column: tenant_id}",
        "{s}.people.ssn is character varying(11); an encrypted column must be bytea "
        "(it holds varchar values sealed)",
    ),
    "tenant-column-missing": (
        "CREATE TABLE {s}.people (org text, ssn bytea)",
        "ssn: {type: text}",
        "{column: tenant_id}",
        "{s}.people: tenant column tenant_id does not exist",
    ),
    "search-without-index": (
        "CREATE TABLE {s}.people (id int PRIMARY KEY, tenant_id text, ssn bytea)",
        "ssn: {type: text, search: equality}",
        "{column: tenant_id}",
        "{s}.people.ssn has search: equality but no index",
    ),
    # Indexes that cannot find a cell by equality for every row: ssn as an INCLUDE payload,
    # a partial index, a BRIN one.
    **{
        f"search-with-{name}-index": (
            "CREATE TABLE {s}.people (id int, tenant_id text, ssn bytea);" + ddl,
            "ssn: {type: text, search: equality}",
            "{column: tenant_id}",
            "{s}.people.ssn has search: equality but no index",
        )
        for name, ddl in (
            ("include-only", "CREATE INDEX ON {s}.people (id) INCLUDE (ssn)"),
            ("partial", "CREATE INDEX ON {s}.people (ssn) WHERE id > 0"),
            ("brin", "CREATE INDEX ON {s}.people USING brin (ssn)"),
        )
    },
}


@pytest.mark.parametrize(("ddl", "columns", "tenant", "problem"),
                         list(_PROBLEMS.values()), ids=list(_PROBLEMS))
def test_policy_check_names_each_kind_of_problem(
    pg: PgTarget, pg_dsn: str, schema: str, tmp_path: Path,
    ddl: str, columns: str, tenant: str, problem: str,
) -> None:
    if ddl:
        pg.execute(ddl.format(s=schema))
    policy = people_policy(tmp_path, schema, tenant, columns)
    result = pgseal("policy", "check", "--policies", str(policy), "--dsn", pg_dsn)
    assert result.returncode == 1, (result.stdout, result.stderr)
    # The problem on stdout, where the policy defines the table; the count on stderr.
    lines = result.stdout.splitlines()
    assert len(lines) == 1, lines
    where = line_of(policy, f"{schema}.people:")
    assert lines[0].startswith(f"{where}: {problem.format(s=schema)}"), lines[0]
    assert result.stderr == "pgseal: 1 problem(s) in the policy\n"


def test_policy_check_lists_every_problem(
    pg: PgTarget, pg_dsn: str, schema: str, tmp_path: Path
) -> None:
    pg.execute(f"""
        CREATE TABLE {schema}.fine (tenant_id text, secret bytea);
        CREATE TABLE {schema}.people (tenant_id text, ssn bytea, name text);
        CREATE TABLE {schema}.orders (customer text, ref bytea);
        CREATE INDEX ON {schema}.orders (ref);
    """)
    policy = write(tmp_path / "policy.yaml", f"""
        version: 1
        tables:
          {schema}.fine:
            tenant: {{column: tenant_id}}
            columns:
              secret: {{type: text}}
          {schema}.people:
            tenant: {{column: tenant_id}}
            columns:
              ssn:   {{type: text, search: equality}}
              name:  {{type: text}}
              email: {{type: text}}
          {schema}.orders:
            tenant: {{column: tenant_id}}
            columns:
              ref: {{type: varchar, search: equality}}
          {schema}.ghost:
            tenant: {{session: true}}
            columns:
              x: {{type: int4}}
    """)
    result = pgseal("policy", "check", "--policies", str(policy), "--dsn", pg_dsn)
    assert result.returncode == 1, (result.stdout, result.stderr)
    people = line_of(policy, f"{schema}.people:")
    expected = [
        f"{line_of(policy, f'{schema}.ghost:')}: table {schema}.ghost does not exist",
        f"{line_of(policy, f'{schema}.orders:')}: {schema}.orders: "
        "tenant column tenant_id does not exist",
        f"{people}: {schema}.people.email does not exist",
        f"{people}: {schema}.people.name is text; an encrypted column must be bytea",
        f"{people}: {schema}.people.ssn has search: equality but no index",
    ]
    lines = result.stdout.splitlines()
    assert len(lines) == len(expected), lines
    for want in expected:
        assert any(line.startswith(want) for line in lines), (want, lines)
    assert not any(f"{schema}.fine" in line for line in lines)  # the fitting table is quiet
    assert result.stderr == f"pgseal: {len(expected)} problem(s) in the policy\n"


@pytest.fixture
def small_policy(tmp_path: Path) -> Path:
    return write(tmp_path / "small.yaml", """
        version: 1
        tables:
          public.people:
            tenant: {column: tenant_id}
            columns:
              ssn: {type: text}
    """)


_CLOSED = free_port()  # nothing listens there (free_port binds it and lets it go)


@pytest.mark.parametrize(("dsn", "where"), [
    pytest.param(f"postgresql://u:s3cretpw@127.0.0.1:{_CLOSED}/db", f"127.0.0.1:{_CLOSED}/db",
                 id="url"),
    # libpq, and the suite's own fixtures, put parameters in the query, the password too
    pytest.param(
        f"postgresql://u@127.0.0.1:{_CLOSED}/db?password=s3cretpw", f"127.0.0.1:{_CLOSED}/db",
        id="password-in-query"),
    pytest.param(
        "postgresql://u:s3cretpw@127.0.0.1:notaport/db", "the configured DSN",
        id="malformed-url"),
    pytest.param(
        f"host=127.0.0.1 port={_CLOSED} user=u password=s3cretpw dbname=db",
        "the configured DSN", id="keywords"),
    # asyncpg's own parse errors quote pieces of a password holding / ? or #
    *(pytest.param(f"postgresql://u:s3cret{c}pw@127.0.0.1:{_CLOSED}/db",
                   "the configured DSN", id=f"password-with-{name}")
      for c, name in (("/", "slash"), ("?", "question-mark"), ("#", "hash"))),
    pytest.param(f"jdbc:postgresql://u:s3cretpw@127.0.0.1:{_CLOSED}/db", "the configured DSN",
                 id="other-scheme"),
    pytest.param("postgresql://u:s3cretpw@127.0.0.1:99999/db", "the configured DSN",
                 id="port-out-of-range"),
])
def test_policy_check_unreachable_database_is_one_line_without_password(
    small_policy: Path, dsn: str, where: str
) -> None:
    result = pgseal("policy", "check", "--policies", str(small_policy), "--dsn", dsn)
    assert_one_line_failure(result, f"pgseal: cannot read the schema at {where}")
    assert result.stdout == ""
    assert "s3cret" not in result.stderr and "pw@" not in result.stderr


# --------------------------------------------------------------------------------------
# Failures before anything is checked or explained: the same for both commands.

_COMMANDS = {
    # policy check loads the policy before it connects, so the closed port is never tried
    "policy-check": ("policy", "check", "--dsn", f"postgresql://u@127.0.0.1:{_CLOSED}/db"),
    "explain": ("explain", "SELECT 1"),
}


@pytest.mark.parametrize("command", list(_COMMANDS.values()), ids=list(_COMMANDS))
def test_invalid_policy_file_is_one_line_with_file_and_line(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    policy = write(tmp_path / "typo.yaml", """
        version: 1
        tables:
          public.people:
            tenant: {column: tenant_id}
            colums:
              ssn: {type: text}
    """)
    err = assert_one_line_failure(pgseal(*command, "--policies", str(policy)),
                                  "unknown key 'colums'")
    assert err.startswith(f"pgseal: {line_of(policy, 'colums:')}: "), err


@pytest.mark.parametrize("command", list(_COMMANDS.values()), ids=list(_COMMANDS))
def test_missing_policy_path_is_one_line_naming_it(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    missing = tmp_path / "no-such-policies.yaml"
    assert_one_line_failure(pgseal(*command, "--policies", str(missing)),
                            f"pgseal: {missing}: ", "no such policy file or folder")


@pytest.mark.parametrize("command", list(_COMMANDS.values()), ids=list(_COMMANDS))
def test_no_policies_configured_is_one_line(command: tuple[str, ...]) -> None:
    result = pgseal(*command)
    assert_one_line_failure(result, "no policies configured")
    assert result.stdout == ""


# --------------------------------------------------------------------------------------
# pgseal explain "SQL" (no database: the analysis only)

_EXPLAIN_POLICY = """
    version: 1
    tables:
      shop.people:
        tenant: {column: tenant_id}
        columns:
          ssn:  {type: text, search: equality}
          name: {type: text}
          dob:  {type: date}
      shop.notes:
        tenant: {session: true}
        columns:
          body: {type: text}
"""


@pytest.fixture(scope="module")
def explain_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write(tmp_path_factory.mktemp("explain") / "policy.yaml", _EXPLAIN_POLICY)


def explain(policy: Path, sql: str) -> list[str]:
    result = pgseal("explain", sql, "--policies", str(policy))
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stderr == ""
    return result.stdout.splitlines()


def test_explain_insert_seals_the_parameters_of_encrypted_columns(explain_policy: Path) -> None:
    sql = "INSERT INTO shop.people (tenant_id, ssn, name) VALUES ($1, $2, $3)"
    assert explain(explain_policy, sql) == [
        f"statement: {sql}",
        "  $2: sealed for shop.people.ssn (text, store, deterministic (AES-SIV)); "
        "tenant from $1; sent as bytea",
        "  $3: sealed for shop.people.name (text, store, randomized (AES-GCM)); "
        "tenant from $1; sent as bytea",
        "  writes shop.people (row 1): row tenant from $1",
    ]  # $1, the tenant column, is not sealed: the proxy reads it to pick the key


def test_explain_insert_seals_literals_where_the_sql_has_them(explain_policy: Path) -> None:
    sql = ("INSERT INTO shop.people (tenant_id, ssn, name, dob) "
           "VALUES ('acme', '123-45-6789', 'Alice Example', '1980-02-03')")
    lines = explain(explain_policy, sql)
    assert lines[0] == f"statement: {sql}"
    sealed: dict[str, str] = {}
    for line in lines[1:]:
        if line.startswith("  literal at "):
            span, _, rest = line.removeprefix("  literal at ").partition(": ")
            start, _, end = span.partition("..")
            sealed[sql[int(start):int(end)]] = rest  # the offsets point at the literal
    assert sealed == {
        "'123-45-6789'": "sealed for shop.people.ssn (text, store, deterministic); "
                         "tenant from literal 'acme'",
        "'Alice Example'": "sealed for shop.people.name (text, store, randomized); "
                           "tenant from literal 'acme'",
        "'1980-02-03'": "sealed for shop.people.dob (date, store, randomized); "
                        "tenant from literal 'acme'",
    }
    assert "  writes shop.people (row 1): row tenant from literal 'acme'" in lines
    assert len(lines) == 5, lines
    # The description names columns, not values: the plaintexts only in the echoed SQL.
    for value in ("123-45-6789", "Alice Example", "1980-02-03"):
        assert [line for line in lines if value in line] == [lines[0]]


def test_explain_equality_search_compares_under_every_key_version(
    explain_policy: Path,
) -> None:
    sql = "SELECT name, dob FROM shop.people WHERE ssn = $1"
    assert explain(explain_policy, sql) == [
        f"statement: {sql}",
        # sealed under every live version and sent as an array: `ssn = ANY($1)`
        "  $1: sealed for shop.people.ssn (text, compare, deterministic (AES-SIV), "
        "under every live key version); tenant from session; sent as bytea[] (prepared "
        "with Parse: one bytea, compared as written, while the tenant has a single live "
        "key version)",
        "  output 1 (name): opened from shop.people.name as text; "
        "tenant check: row tenant column shop.people.tenant_id (output 3)",
        "  output 2 (dob): opened from shop.people.dob as date; "
        "tenant check: row tenant column shop.people.tenant_id (output 3)",
        "  output 3: row tenant column(s) the proxy adds to the select (or RETURNING) list "
        "to check each cell against its row; the client never sees them",
    ]


def test_explain_select_opens_only_the_encrypted_outputs(explain_policy: Path) -> None:
    # The tenant is pinned in the WHERE clause: nothing is added to the select list.
    sql = "SELECT id, name, dob FROM shop.people WHERE tenant_id = $1"
    assert explain(explain_policy, sql) == [
        f"statement: {sql}",
        "  output 2 (name): opened from shop.people.name as text; tenant check: $1",
        "  output 3 (dob): opened from shop.people.dob as date; tenant check: $1",
    ]


def test_explain_several_statements_and_a_session_tenant(explain_policy: Path) -> None:
    lines = explain(explain_policy, "SET pgseal.tenant = 'acme'; "
                                    "INSERT INTO shop.notes (body) VALUES ('dear diary')")
    assert lines[:3] == [
        "statement: SET pgseal.tenant = 'acme'",
        "  passthrough: touches no encrypted column; forwarded unchanged",
        "  session: SET pgseal.tenant = 'acme' (tracked, forwarded)",
    ]
    assert lines[3] == "statement: INSERT INTO shop.notes (body) VALUES ('dear diary')"
    assert lines[4].startswith("  literal at ")
    assert lines[4].endswith(": sealed for shop.notes.body (text, store, randomized); "
                             "tenant from session")
    assert lines[5:] == ["  writes shop.notes (row 1): row tenant from session"]


def test_explain_table_outside_the_policy_passes_through(explain_policy: Path) -> None:
    sql = "SELECT ssn, name FROM public.other WHERE ssn LIKE '12%'"
    assert explain(explain_policy, sql) == [
        f"statement: {sql}",
        "  passthrough: touches no encrypted column; forwarded unchanged",
    ]


# Refused statements: explain answers them like any other statement, with exit 0 (it
# succeeded in saying what the proxy would do: refuse). (SQL, what the refusal must say.)
_REFUSED = {
    "like": ("SELECT id FROM shop.people WHERE name LIKE 'Ali%'",
             "LIKE on encrypted column shop.people.name is not supported"),
    "greater-than": ("SELECT id FROM shop.people WHERE ssn > '123-00-0000'",
                     "comparison > on encrypted column shop.people.ssn is not supported"),
    "function": ("SELECT id FROM shop.people WHERE lower(ssn) = 'abc-de'",
                 "function lower() on encrypted column shop.people.ssn is not supported"),
    "search-on-randomized": (
        "SELECT id FROM shop.people WHERE name = 'Alice Example'",
        "equality comparison on randomized encrypted column shop.people.name "
        "is not supported"),
}


@pytest.mark.parametrize(("sql", "reason"), list(_REFUSED.values()), ids=list(_REFUSED))
def test_explain_refused_statement_names_column_and_construct(
    explain_policy: Path, sql: str, reason: str
) -> None:
    lines = explain(explain_policy, sql)  # asserts exit 0 and an empty stderr
    assert len(lines) == 3, lines
    assert lines[0] == f"statement: {sql}"
    assert lines[1].startswith(f"  refused (0A000): pgseal: {reason}"), lines[1]
    assert lines[2] == "  nothing of it is forwarded to PostgreSQL"
    # The refusal names the column and the construct, never the value compared with it.
    literal = sql.rpartition("'")[0].rpartition("'")[2]
    assert literal not in lines[1], lines[1]

"""The parser-free part of the analyzer: statement splitting, constants, session statements."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.rewrite import SessionSetting
from proxy.rewrite.lexer import (
    SavepointStatementError,
    SessionStatementError,
    decode_string_literal,
    first_keyword,
    glued_parameter_ends,
    parse_savepoint_statement,
    parse_session_statement,
    split_statements,
)


def _texts(sql: str) -> list[str]:
    return [sql[s.start : s.end] for s in split_statements(sql)]


@pytest.mark.parametrize(
    ("sql", "statements"),
    [
        ("SELECT 1", ["SELECT 1"]),
        ("  SELECT 1 ;  ", ["SELECT 1"]),
        ("SELECT 1; SELECT 2;", ["SELECT 1", "SELECT 2"]),
        (";;", []),
        ("", []),
        ("   \n\t", []),
        ("-- only a comment", []),
        ("/* only */ /* comments */", []),
        ("/* lead */ SELECT 1", ["SELECT 1"]),
        ("-- lead\nSELECT 1 -- trail", ["SELECT 1 -- trail"]),
        ("SELECT ';' AS a; SELECT 2", ["SELECT ';' AS a", "SELECT 2"]),
        ("SELECT 'it''s; ok'", ["SELECT 'it''s; ok'"]),
        ("SELECT E'it\\'s; ok'; SELECT 2", ["SELECT E'it\\'s; ok'", "SELECT 2"]),
        ("SELECT e'\\\\'; SELECT 2", ["SELECT e'\\\\'", "SELECT 2"]),
        ("SELECT 'a\\'; SELECT 2", ["SELECT 'a\\'", "SELECT 2"]),  # standard strings: \ is plain
        ('SELECT "semi;colon" FROM t; SELECT 2', ['SELECT "semi;colon" FROM t', "SELECT 2"]),
        ("SELECT $$a;b$$; SELECT 2", ["SELECT $$a;b$$", "SELECT 2"]),
        ("SELECT $fn$ $$; $fn$; SELECT 2", ["SELECT $fn$ $$; $fn$", "SELECT 2"]),
        ("SELECT $1; SELECT $2", ["SELECT $1", "SELECT $2"]),
        ("SELECT a$b$c FROM t; SELECT 2", ["SELECT a$b$c FROM t", "SELECT 2"]),
        ("SELECT 1 /* ; /* nested ; */ still ; */; SELECT 2", ["SELECT 1", "SELECT 2"]),
        ("/* a /* b */ c */ SELECT 1", ["SELECT 1"]),
        ("SELECT 1 -- ; not a split\n; SELECT 2", ["SELECT 1", "SELECT 2"]),
        ("SELECT 'unterminated; SELECT 2", ["SELECT 'unterminated; SELECT 2"]),
    ],
)
def test_split_statements(sql: str, statements: list[str]) -> None:
    assert _texts(sql) == statements


def test_first_keyword() -> None:
    sql = "/* c */ with x as (select 1) select * from x"
    (span,) = split_statements(sql)
    assert first_keyword(sql, span.start) == "WITH"
    assert first_keyword("(SELECT 1)", 0) == ""


@pytest.mark.parametrize(
    ("sql", "ends"),
    [
        ("SELECT $1, $2", [9]),  # cutting where it is harmless is fine
        ("SELECT $1,$2", [9]),
        ("VALUES ($1,$2,$3)", [10, 13, 16]),
        ("SELECT $1::text", [9]),
        ("SELECT '$1,$2', $3", []),
        ("SELECT $$ $1,$2 $$", []),
        ("SELECT 1 -- $1,$2\n", []),
    ],
)
def test_glued_parameters(sql: str, ends: list[int]) -> None:
    assert glued_parameter_ends(sql) == ends


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("'plain'", "plain"),
        ("''", ""),
        ("'it''s'", "it's"),
        ("'back\\slash'", "back\\slash"),
        ("E'tab\\there'", "tab\there"),
        ("e'nl\\n'", "nl\n"),
        ("E'q\\'q'", "q'q"),
        ("E'\\x41\\101\\u00e9\\U0001F600'", "AAé\U0001f600"),
        ("E'\\\\'", "\\"),
        ("E'\\z'", "z"),
        ("U&'d\\0061t\\+000061'", "data"),
        ("U&'a\\\\b'", "a\\b"),
        ("$$dollar 'quoted'$$", "dollar 'quoted'"),
        ("$tag$x$$y$tag$", "x$$y"),
        ("'ünïcödé'", "ünïcödé"),
    ],
)
def test_decode_string_literal(raw: str, value: str) -> None:
    assert decode_string_literal(raw) == value


@pytest.mark.parametrize(
    "raw",
    [
        "E'\\xff'",  # a raw byte: depends on the client encoding
        "E'\\0'",
        "E'\\ud800'",
        "U&'\\zz'",
        "B'1010'",
        "X'1f'",
        "$a$unterminated",
    ],
)
def test_decode_refuses_unclear_constants(raw: str) -> None:
    assert decode_string_literal(raw) is None


@pytest.mark.parametrize(
    ("sql", "setting"),
    [
        ("SET pgseal.tenant = 'acme'", SessionSetting("pgseal.tenant", "set", "acme")),
        ("set pgseal.tenant to acme", SessionSetting("pgseal.tenant", "set", "acme")),
        ("SET pgseal.tenant = ACME", SessionSetting("pgseal.tenant", "set", "acme")),
        ('SET pgseal.tenant = "ACME"', SessionSetting("pgseal.tenant", "set", "ACME")),
        ("SET pgseal.tenant = 42", SessionSetting("pgseal.tenant", "set", "42")),
        ("SET pgseal.tenant = E'a\\'b'", SessionSetting("pgseal.tenant", "set", "a'b")),
        ("SET PGSEAL.TENANT = 'x'", SessionSetting("pgseal.tenant", "set", "x")),
        ("SET LOCAL pgseal.tenant = 'x'", SessionSetting("pgseal.tenant", "set", "x", local=True)),
        ("SET SESSION pgseal.tenant = 'x'", SessionSetting("pgseal.tenant", "set", "x")),
        ("SET /* c */ pgseal.tenant -- c\n = 'x'", SessionSetting("pgseal.tenant", "set", "x")),
        ("SET pgseal.tenant TO DEFAULT", SessionSetting("pgseal.tenant", "reset")),
        ("RESET pgseal.tenant", SessionSetting("pgseal.tenant", "reset")),
        ("RESET ALL", SessionSetting("all", "reset")),
        ("DISCARD ALL", SessionSetting("discard_all", "reset")),
        ("DISCARD PLANS", None),
        (
            'SET search_path TO a, "B", public',
            SessionSetting("search_path", "set", ("a", "B", "public")),
        ),
        ("SET search_path = 'a, b'", SessionSetting("search_path", "set", ("a", "b"))),
        (
            "SET LOCAL search_path TO app",
            SessionSetting("search_path", "set", ("app",), local=True),
        ),
        ("RESET search_path", SessionSetting("search_path", "reset")),
        ("SET search_path TO DEFAULT", SessionSetting("search_path", "reset")),
        ("SET ROLE app", SessionSetting("role", "set", "app")),
        ("SET ROLE NONE", SessionSetting("role", "set", None)),
        ("RESET ROLE", SessionSetting("role", "reset")),
        ("SET SESSION AUTHORIZATION bob", SessionSetting("session_authorization", "set", "bob")),
        ("RESET SESSION AUTHORIZATION", SessionSetting("session_authorization", "reset")),
        ("SET statement_timeout TO 1000", None),
        ("SET TIME ZONE 'Europe/Paris'", None),
        ("SET application_name = 'pgseal; tenant'", None),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", None),
    ],
)
def test_session_statements(sql: str, setting: SessionSetting | None) -> None:
    assert parse_session_statement(sql) == setting


@pytest.mark.parametrize(
    "sql",
    [
        "SET pgseal.tenant = 'a', 'b'",
        "SET pgseal.tenant = ''",
        "SET pgseal.tenantt = 'a'",
        "SET pgseal.tenant 'a'",
        "RESET pgseal.other",
    ],
)
def test_session_statements_refused(sql: str) -> None:
    with pytest.raises(SessionStatementError):
        parse_session_statement(sql)


# Pieces that must never be split inside, joined by real statement separators.
_PIECE = st.sampled_from(
    [
        "SELECT 1",
        "SELECT ';'",
        "SELECT 'a'';b'",
        'SELECT "x;y"',
        "SELECT $$;$$",
        "SELECT $q$ ; $$ ; $q$",
        "SELECT 1 /* ; /* ; */ ; */ + 1",
        "SELECT E'\\';'",
        "SELECT $1,$2",
        "INSERT INTO patients (ssn) VALUES ('1;2')",
    ]
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_PIECE, min_size=1, max_size=6), st.sampled_from([";", " ; ", ";\n", "; -- c\n"]))
def test_split_matches_how_the_string_was_built(pieces: list[str], sep: str) -> None:
    sql = sep.join(pieces)
    assert _texts(sql) == [p for p in pieces]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_split_never_fails_and_spans_are_ordered(text: str) -> None:
    previous = 0
    for span in split_statements(text):
        assert previous <= span.start < span.end <= len(text)
        previous = span.end
    glued_parameter_ends(text)


# --- savepoint statements -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "text", "expected"),
    [
        ("SAVEPOINT", "SAVEPOINT s", ("savepoint", "s")),
        ("SAVEPOINT", "savepoint My_Sp;", ("savepoint", "my_sp")),
        ("SAVEPOINT", 'SAVEPOINT "My ""Sp"""', ("savepoint", 'My "Sp"')),
        ("SAVEPOINT", "SAVEPOINT Ärzte", ("savepoint", "Ärzte")),  # ASCII folding only
        ("RELEASE", "RELEASE SAVEPOINT s", ("release", "s")),
        ("RELEASE", "RELEASE s", ("release", "s")),
        ("RELEASE", "RELEASE savepoint", ("release", "savepoint")),  # a savepoint so named
        ("ROLLBACK", "ROLLBACK TO s", ("rollback_to", "s")),
        ("ROLLBACK", "rollback work to savepoint S", ("rollback_to", "s")),
        ("ROLLBACK", "ROLLBACK /* c */ TRANSACTION TO -- c\n s ;", ("rollback_to", "s")),
        ("ROLLBACK", "ROLLBACK", None),
        ("ROLLBACK", "ROLLBACK WORK;", None),
        ("ROLLBACK", "ROLLBACK AND NO CHAIN", None),
    ],
)
def test_savepoint_statements(command: str, text: str, expected: object) -> None:
    assert parse_savepoint_statement(command, text) == expected


@pytest.mark.parametrize(
    ("command", "text"),
    [
        ("ROLLBACK", 'ROLLBACK TO U&"\\0073"'),
        ("RELEASE", "RELEASE"),
        ("SAVEPOINT", "SAVEPOINT a b"),
        ("ROLLBACK", "ROLLBACK TO"),
        ("ROLLBACK", "ROLLBACK PREPARED 'gid'"),  # not in a block: PostgreSQL refuses it there
    ],
)
def test_savepoint_statements_not_read_are_errors(command: str, text: str) -> None:
    with pytest.raises(SavepointStatementError):
        parse_savepoint_statement(command, text)


def test_savepoint_names_are_cut_at_63_bytes_as_postgresql_does() -> None:
    long_x, long_y = "a" * 63 + "X", "a" * 63 + "Y"
    assert parse_savepoint_statement("SAVEPOINT", f"SAVEPOINT {long_x}") == (
        "savepoint",
        "a" * 63,
    )
    assert parse_savepoint_statement("ROLLBACK", f"ROLLBACK TO {long_y}") == (
        "rollback_to",
        "a" * 63,
    )
    # at a character boundary: 31 two-byte characters and a half are 62 bytes
    assert parse_savepoint_statement("SAVEPOINT", "SAVEPOINT " + "Ä" * 40)[1] == "Ä" * 31


def test_an_unquoted_tenant_value_is_read_as_postgresql_reads_an_identifier() -> None:
    # folded (ASCII letters only) and cut at 63 bytes, as PostgreSQL stores it
    setting = parse_session_statement("SET pgseal.tenant = ÄRZTE_" + "X" * 70)
    assert setting is not None and setting.value == ("Ärzte_" + "x" * 70)[:62]
    quoted = parse_session_statement("SET pgseal.tenant = 'ÄRZTE'")
    assert quoted is not None and quoted.value == "ÄRZTE"  # a string: as written


@pytest.mark.parametrize(
    "text",
    ["SET pgseal.tenant = U&'\\0062'", 'SET U&"\\0070gseal.tenant" = \'b\'', "RESET U&\"x\""],
)
def test_a_set_the_proxy_cannot_read_is_refused_not_passed_untracked(text: str) -> None:
    # PostgreSQL reads these (the first sets the tenant to 'b'); the proxy must not miss it.
    with pytest.raises(SessionStatementError):
        parse_session_statement(text)


def test_a_trailing_semicolon_does_not_make_a_set_unreadable() -> None:
    setting = parse_session_statement("SET pgseal.tenant = 'a' ;")
    assert setting is not None and setting.value == "a"

"""Cheap lexical work that must not need the SQL parser.

- `split_statements`: where each statement of a simple-Query string starts
  and ends, following PostgreSQL's lexer for quotes, dollar quotes and
  (nested) comments, so a `;` inside them does not split.
- `parse_session_statement`: SET / RESET / DISCARD that change what the proxy
  tracks (pgseal.tenant, search_path, role), read with a tiny tokenizer.
- `decode_string_literal`: the value of a string constant as PostgreSQL reads
  it ('..', E'..', U&'..', $tag$..$tag$).

Assumes standard_conforming_strings = on (PostgreSQL's default since 9.1):
backslashes are plain characters in '...' strings. The caller should refuse
simple-protocol statements with sealed literals when the server reports
standard_conforming_strings = off.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from proxy.rewrite.plan import SessionSetting

# Characters that can start a quote, a comment or end a statement; everything
# else is skipped in bulk by the regex engine.
_SPECIAL = re.compile(r"[;'\"$]|--|/\*")
_DOLLAR_TAG = re.compile(r"\$(?:[^\W\d]\w*)?\$")
_IDENT_CHAR = re.compile(r"[\w$]")
_PLAIN_STR_END = re.compile(r"(?:[^']|'')*'")
_ESCAPE_STR_END = re.compile(r"(?:[^'\\]|\\.|'')*'", re.DOTALL)
_IDENT_END = re.compile(r'(?:[^"]|"")*"')
_BLOCK_TOKEN = re.compile(r"/\*|\*/")


@dataclass(frozen=True, slots=True)
class StatementSpan:
    """One statement: `sql[start:end]`, without leading/trailing blanks and the `;`."""

    start: int
    end: int


def skip_block_comment(sql: str, pos: int) -> int:
    """Position after the block comment whose `/*` ends at pos (they nest in PostgreSQL)."""
    depth = 1
    while depth:
        m = _BLOCK_TOKEN.search(sql, pos)
        if m is None:
            return len(sql)
        depth += 1 if m.group() == "/*" else -1
        pos = m.end()
    return pos


def _skip_quoted(sql: str, m: re.Match[str]) -> int | None:
    """If the special at `m` opens a quote or comment: the position after it closes.

    None for `;` and for a `$` that is not a dollar quote (a parameter, or part
    of an identifier).
    """
    n = len(sql)
    opener = m.group()
    at = m.start()
    if opener == "'":
        if at > 0 and sql[at - 1] in "eE" and (at < 2 or not _IDENT_CHAR.match(sql, at - 2)):
            end = _ESCAPE_STR_END.match(sql, at + 1)  # E'...': backslash escapes
        else:
            end = _PLAIN_STR_END.match(sql, at + 1)
        return end.end() if end else n
    if opener == '"':
        end = _IDENT_END.match(sql, at + 1)
        return end.end() if end else n
    if opener == "--":
        nl = sql.find("\n", at)
        return n if nl < 0 else nl + 1
    if opener == "/*":
        return skip_block_comment(sql, m.end())
    if opener == "$":
        if at > 0 and _IDENT_CHAR.match(sql, at - 1):
            return None  # `$` inside an identifier (PostgreSQL allows it after the first char)
        tag = _DOLLAR_TAG.match(sql, at)
        if tag is None:
            return None  # $1: a parameter
        close = sql.find(tag.group(), tag.end())
        return n if close < 0 else close + len(tag.group())
    return None


_LEADING_BLANKS = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*(?:[^*/]|\*(?!/)|/(?!\*))*\*/)*")


def split_statements(sql: str) -> list[StatementSpan]:
    """The statements of a simple-Query string, as PostgreSQL would split it.

    Empty statements (only blanks or comments between semicolons) are
    dropped, as the server drops them. Unterminated quotes or comments run to
    the end (the server will reject the statement; the span still covers it).
    Known gap: SQL-standard function bodies (BEGIN ATOMIC ... END) contain
    semicolons that the server does not split on; they are split here.
    """
    if ";" not in sql:
        # One statement (the common case): only leading comments to skip.
        start = _LEADING_BLANKS.match(sql).end()  # type: ignore[union-attr]
        end = len(sql.rstrip())
        if start < end and not sql.startswith("/*", start):
            return [StatementSpan(start, end)]
        if start >= end and "/*" not in sql:
            return []
    spans: list[StatementSpan] = []
    n = len(sql)
    pos = 0
    first: int | None = None  # first significant character of the current statement
    last = 0  # end of the last significant character
    while pos < n:
        m = _SPECIAL.search(sql, pos)
        gap_end = m.start() if m is not None else n
        if pos < gap_end:
            gap = sql[pos:gap_end]
            if not gap.isspace():
                if first is None:
                    first = pos + (len(gap) - len(gap.lstrip()))
                last = pos + len(gap.rstrip())
        if m is None:
            break
        if m.group() == ";":
            if first is not None:
                spans.append(StatementSpan(first, last))
            first = None
            pos = m.end()
            continue
        after = _skip_quoted(sql, m)
        if m.group() in ("--", "/*"):
            pos = after if after is not None else m.end()
            continue
        if first is None:
            first = m.start()
        pos = after if after is not None else m.end()
        last = pos
    if first is not None:
        spans.append(StatementSpan(first, last))
    return spans


_PARAM_GLUED = re.compile(r"\$\d+(?=[^\s\d])")


def glued_parameter_ends(sql: str) -> list[int]:
    """End offsets of `$n` parameters directly followed by another character (`$1,$2`).

    sqlglot's tokenizer reads `$1,$` as the opening tag of a dollar quote (a
    tag cannot start with a digit in PostgreSQL) and fails; the analyzer
    tokenizes the text in pieces cut at these offsets. Parameters inside
    quotes and comments are skipped.
    """
    if "$" not in sql:
        return []
    ends: list[int] = []
    pos = 0
    n = len(sql)
    while pos < n:
        m = _SPECIAL.search(sql, pos)
        if m is None:
            break
        after = _skip_quoted(sql, m)
        if after is None:
            if m.group() == "$":
                glued = _PARAM_GLUED.match(sql, m.start())
                if glued is not None:
                    ends.append(glued.end())
            pos = m.end()
        else:
            pos = after
    return ends


_FIRST_WORD = re.compile(r"[A-Za-z_]+")


def first_keyword(sql: str, start: int) -> str:
    """The statement's first word, upper case ('' when it starts with `(` or the like)."""
    m = _FIRST_WORD.match(sql, start)
    return m.group().upper() if m else ""


# --- string constants -------------------------------------------------------

_SIMPLE_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_ESCAPE = re.compile(
    r"\\(?:(?P<oct>[0-7]{1,3})|x(?P<hex>[0-9A-Fa-f]{1,2})|u(?P<u4>[0-9A-Fa-f]{4})"
    r"|U(?P<u8>[0-9A-Fa-f]{8})|(?P<other>.))|(?P<quote>'')",
    re.DOTALL,
)
_UNICODE_ESCAPE = re.compile(
    r"\\(?:(?P<u4>[0-9A-Fa-f]{4})|\+(?P<u6>[0-9A-Fa-f]{6})|(?P<bs>\\))|(?P<quote>'')"
)


def _escape_string_value(body: str) -> str | None:
    """E'...' body: backslash escapes. Escapes that give raw bytes (\\x80, \\200)
    would make the value depend on the client encoding: None (refuse)."""
    out: list[str] = []
    pos = 0
    for m in _ESCAPE.finditer(body):
        out.append(body[pos : m.start()])
        pos = m.end()
        if m.group("quote"):
            out.append("'")
        elif m.group("oct") or m.group("hex"):
            code = int(m.group("oct"), 8) if m.group("oct") else int(m.group("hex"), 16)
            if code == 0 or code > 0x7F:
                return None
            out.append(chr(code))
        elif m.group("u4") or m.group("u8"):
            code = int(m.group("u4") or m.group("u8"), 16)
            if code == 0 or code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                return None  # surrogate pairs spelled as two \u escapes: not worth it
            out.append(chr(code))
        else:
            other = m.group("other")
            out.append(_SIMPLE_ESCAPES.get(other, other))
    out.append(body[pos:])
    return "".join(out)


def _unicode_string_value(body: str) -> str | None:
    out: list[str] = []
    pos = 0
    for m in _UNICODE_ESCAPE.finditer(body):
        out.append(body[pos : m.start()])
        pos = m.end()
        if m.group("quote"):
            out.append("'")
        elif m.group("bs"):
            out.append("\\")
        else:
            code = int(m.group("u4") or m.group("u6"), 16)
            if code == 0 or code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                return None
            out.append(chr(code))
    rest = body[pos:]
    if "\\" in rest:
        return None  # an invalid escape: the server would reject it
    out.append(rest)
    return "".join(out)


def decode_string_literal(raw: str) -> str | None:
    """The value of one string constant token as written in the SQL, or None.

    None means "not a form the proxy can read with certainty" (bit strings,
    U&'' with UESCAPE, escapes producing raw bytes): the caller refuses.
    """
    if raw.startswith("'") and raw.endswith("'") and len(raw) >= 2:
        return raw[1:-1].replace("''", "'")
    head = raw[:1].upper()
    if head == "E" and raw[1:2] == "'" and raw.endswith("'") and len(raw) >= 3:
        return _escape_string_value(raw[2:-1])
    if raw[:3].upper() == "U&'" and raw.endswith("'") and len(raw) >= 4:
        return _unicode_string_value(raw[3:-1])
    if head == "$":
        close = raw.find("$", 1)
        if close < 0:
            return None
        tag = raw[: close + 1]
        if len(raw) >= 2 * len(tag) and raw.endswith(tag):
            return raw[len(tag) : -len(tag)]
    return None


# --- session statements -----------------------------------------------------

_SESSION_TOKEN = re.compile(
    r"""
      (?P<space>[ \t\n\r\f\v]+|--[^\n]*|/\*(?:[^*]|\*(?!/))*\*/)
    | (?P<estr>[eE]'(?:[^'\\]|\\.|'')*')
    | (?P<str>'(?:[^']|'')*')
    | (?P<dollar>\$(?P<tag>(?:[^\W\d]\w*)?)\$.*?\$(?P=tag)\$)
    | (?P<qident>"(?:[^"]|"")+")
    | (?P<word>[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_$\x80-\U0010ffff]*)
    | (?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
    | (?P<punct>[=,.])
    """,
    re.VERBOSE | re.DOTALL,
)


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str  # word | qident | str | number | punct
    text: str  # words folded to lower case, identifiers and strings resolved

    def is_word(self, *words: str) -> bool:
        return self.kind == "word" and self.text in words


class SessionStatementError(ValueError):
    """A SET of a pgseal.* setting the proxy cannot honour (the caller refuses it)."""


def _session_tokens(text: str) -> list[_Tok] | None:
    toks: list[_Tok] = []
    pos = 0
    while pos < len(text):
        m = _SESSION_TOKEN.match(text, pos)
        if m is None:
            return None  # something we do not read: not a statement we track
        pos = m.end()
        kind = m.lastgroup
        value = m.group()
        if kind == "space":
            continue
        if kind == "word":  # an identifier as PostgreSQL reads it: folded, cut at 63 bytes
            toks.append(_Tok("word", truncate_identifier(fold_identifier(value))))
        elif kind == "qident":
            toks.append(_Tok("qident", truncate_identifier(value[1:-1].replace('""', '"'))))
        elif kind in ("str", "estr", "dollar"):
            decoded = decode_string_literal(value)
            if decoded is None:
                return None
            toks.append(_Tok("str", decoded))
        elif kind == "number":
            toks.append(_Tok("number", value))
        else:
            toks.append(_Tok("punct", value))
    return toks


def _setting_name(toks: list[_Tok], i: int) -> tuple[str, int] | None:
    """A (possibly dotted) GUC name at toks[i]: (lower-cased name, next index)."""
    parts: list[str] = []
    while i < len(toks) and toks[i].kind in ("word", "qident"):
        parts.append(toks[i].text.lower())
        i += 1
        if i < len(toks) and toks[i].text == "." and toks[i].kind == "punct":
            i += 1
            continue
        break
    return (".".join(parts), i) if parts else None


def _values(toks: list[_Tok], i: int) -> list[str] | None:
    """`value [, value]*` to the end; None if anything else follows."""
    values: list[str] = []
    while i < len(toks):
        tok = toks[i]
        if tok.kind == "punct":
            return None
        values.append(tok.text)
        i += 1
        if i == len(toks):
            break
        if toks[i].text != "," or toks[i].kind != "punct":
            return None
        i += 1
    return values or None


def fold_identifier(name: str) -> str:
    """PostgreSQL's folding of an unquoted identifier (UTF-8 databases): ASCII letters only."""
    return name.translate(_ASCII_LOWER)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")

SavepointAction = Literal["savepoint", "release", "rollback_to"]


class SavepointStatementError(ValueError):
    """A savepoint statement whose name cannot be read (the caller fails closed)."""


def parse_savepoint_statement(command: str, text: str) -> tuple[SavepointAction, str] | None:
    """What a SAVEPOINT, RELEASE or ROLLBACK statement does to the block's savepoints:
    ("savepoint" | "release" | "rollback_to", name as PostgreSQL resolves it), or None for
    a ROLLBACK that ends the block. `command`: the statement's first keyword, upper case.
    Raises SavepointStatementError for one that names a savepoint in a way not read here."""
    toks = _session_tokens(text.strip().removesuffix(";"))
    if toks is None:
        if command == "ROLLBACK" and not re.search(r"\bto\b", text, re.IGNORECASE):
            return None
        raise SavepointStatementError(text)
    words = [t.text if t.kind == "word" else None for t in toks]
    i = 1
    if command == "ROLLBACK":
        if i < len(toks) and words[i] in ("work", "transaction"):
            i += 1
        if i == len(toks) or words[i] == "and":  # ROLLBACK [AND [NO] CHAIN]: the block ends
            return None
        if words[i] != "to":
            raise SavepointStatementError(text)
        i += 1
        action: SavepointAction = "rollback_to"
    else:
        action = "savepoint" if command == "SAVEPOINT" else "release"
    if action != "savepoint" and i + 1 < len(toks) and words[i] == "savepoint":
        i += 1
    if i + 1 != len(toks) or toks[i].kind not in ("word", "qident"):
        raise SavepointStatementError(text)
    return action, toks[i].text


def truncate_identifier(name: str) -> str:
    """PostgreSQL keeps the first 63 bytes of an identifier (NAMEDATALEN - 1), cut at a
    character boundary: two longer names that share those are the same name."""
    raw = name.encode("utf-8")
    if len(raw) <= 63:
        return name
    return raw[:63].decode("utf-8", errors="ignore")


def parse_session_statement(text: str) -> SessionSetting | None:
    """The tracked setting a SET/RESET/DISCARD statement changes, or None.

    None for statements the proxy does not track (SET TIME ZONE, SET
    statement_timeout, ...). Raises SessionStatementError for a pgseal.*
    setting it will not pass on (an unknown pgseal.* name, several tenant
    values) and for text it cannot read (fail closed: it may set the tenant).
    """
    toks = _session_tokens(text.strip().removesuffix(";"))
    if toks is None:
        # PostgreSQL reads what this tokenizer does not (a U& string or identifier...): a
        # SET it cannot read may be one of pgseal.tenant, the role or search_path, and must
        # not go by untracked (the proxy would keep sealing under the old tenant).
        raise SessionStatementError(
            "a SET / RESET / DISCARD the proxy cannot read; write it without Unicode escapes"
        )
    if not toks:
        return None
    head = toks[0]
    if head.is_word("discard"):
        if len(toks) == 2 and toks[1].is_word("all"):
            return SessionSetting("discard_all", "reset")
        return None
    if head.is_word("reset"):
        if len(toks) == 2 and toks[1].is_word("all"):
            return SessionSetting("all", "reset")
        if len(toks) == 2 and toks[1].is_word("role"):
            return SessionSetting("role", "reset")
        if len(toks) == 3 and toks[1].is_word("session") and toks[2].is_word("authorization"):
            return SessionSetting("session_authorization", "reset")
        named = _setting_name(toks, 1)
        if named is None or named[1] != len(toks):
            return None
        return _tracked("reset", named[0], None, local=False)
    if not head.is_word("set"):
        return None
    i = 1
    local = False
    if i + 1 < len(toks) and toks[i].is_word("session") and toks[i + 1].is_word("authorization"):
        rest = toks[i + 2 :]
        if len(rest) == 1 and rest[0].is_word("default"):
            return SessionSetting("session_authorization", "reset")
        if len(rest) == 1:
            return SessionSetting("session_authorization", "set", rest[0].text)
        return None
    if i < len(toks) and toks[i].is_word("session", "local"):
        local = toks[i].text == "local"
        i += 1
    if i < len(toks) and toks[i].is_word("role"):
        rest = toks[i + 1 :]
        if len(rest) == 1 and rest[0].is_word("none"):
            return SessionSetting("role", "set", None, local=local)  # the session user
        if len(rest) == 1:
            return SessionSetting("role", "set", rest[0].text, local=local)
        return None
    named = _setting_name(toks, i)
    if named is None:
        return None
    name, i = named
    if i < len(toks) and (
        toks[i].is_word("to") or (toks[i].kind == "punct" and toks[i].text == "=")
    ):
        i += 1
    else:
        return _tracked("set", name, None, local=local, malformed=True)
    if i + 1 == len(toks) and toks[i].is_word("default"):
        return _tracked("reset", name, None, local=local)
    values = _values(toks, i)
    return _tracked("set", name, values, local=local, malformed=values is None)


def _tracked(
    action: str, name: str, values: list[str] | None, *, local: bool, malformed: bool = False
) -> SessionSetting | None:
    if name == "search_path":
        if action == "reset":
            return SessionSetting("search_path", "reset", local=local)
        if malformed or values is None:
            return None
        # Items are schema names; each may itself be a comma list in a string
        # ('a, b'), which PostgreSQL splits the same way.
        schemas: list[str] = []
        for item in values:
            schemas.extend(part.strip().strip('"') for part in item.split(",") if part.strip())
        return SessionSetting("search_path", "set", tuple(schemas), local=local)
    if name.startswith("pgseal."):
        if name != "pgseal.tenant":
            raise SessionStatementError(f"unknown setting {name} (the only one is pgseal.tenant)")
        if action == "reset":
            return SessionSetting("pgseal.tenant", "reset", local=local)
        if malformed or values is None or len(values) != 1 or values[0] == "":
            raise SessionStatementError("SET pgseal.tenant takes exactly one non-empty value")
        return SessionSetting("pgseal.tenant", "set", values[0], local=local)
    return None

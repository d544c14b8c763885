"""How many parameters a Parse'd statement has, as PostgreSQL counts them. Pure.

PostgreSQL's count is the highest `$n` written in the text (outside quotes,
dollar quotes and comments) or the number of declared types, whichever is
larger. The data path needs it exactly: it appends parameters of its own
after the client's (literals sealed at Bind time) and hides them again in
ParameterDescription.
"""

from __future__ import annotations

import re

from proxy.rewrite.lexer import skip_block_comment

_TOKENS = re.compile(
    r"""
      (?P<param>(?<![\w$])\$(?P<n>\d+))
    | (?P<line>--)
    | (?P<block>/\*)
    | (?P<estr>(?<![\w$])[eE]')
    | (?P<str>')
    | (?P<ident>")
    | (?P<dollar>(?<![\w$])\$(?:[^\W\d]\w*)?\$)
    """,
    re.VERBOSE,
)
_PLAIN_STR_END = re.compile(r"(?:[^']|'')*'")
_ESCAPE_STR_END = re.compile(r"(?:[^'\\]|\\.|'')*'", re.DOTALL)
_IDENT_END = re.compile(r'(?:[^"]|"")*"')


def highest_parameter(sql: str) -> int:
    """The largest n of a `$n` outside quotes and comments (0 when there is none). Not
    memoized: a memo would keep Parse texts, constants and all, after they are done."""
    highest = 0
    pos = 0
    n = len(sql)
    while pos < n:
        m = _TOKENS.search(sql, pos)
        if m is None:
            break
        kind = m.lastgroup
        if kind == "n" or m.group("param"):
            highest = max(highest, int(m.group("n")))
            pos = m.end()
        elif kind == "line":
            nl = sql.find("\n", m.end())
            pos = n if nl < 0 else nl + 1
        elif kind == "block":
            pos = skip_block_comment(sql, m.end())
        elif kind == "str":
            end = _PLAIN_STR_END.match(sql, m.end())
            pos = end.end() if end else n
        elif kind == "estr":
            end = _ESCAPE_STR_END.match(sql, m.end())
            pos = end.end() if end else n
        elif kind == "ident":
            end = _IDENT_END.match(sql, m.end())
            pos = end.end() if end else n
        else:  # dollar quote: runs to the same tag
            close = sql.find(m.group(), m.end())
            pos = n if close < 0 else close + len(m.group())
    return highest


def parameter_count(sql: str, declared_types: int) -> int:
    return max(highest_parameter(sql), declared_types)

"""SQL analysis: what the proxy must do with each statement to keep encrypted columns sealed.

Pure code (sqlglot, no I/O). The protocol session calls

    analyze(sql, policies, search_path=("public",)) -> list[StatementPlan]

once per statement text: a simple Query string (one plan per statement in it,
in order, matching the results the server will send) or a Parse's query (one
plan). Results are cached per (text, search_path, policy object); a text that
names no protected table is never parsed.

Contract for the caller
-----------------------
kind
    'passthrough': forward unchanged; nothing in the results needs opening.
    'refused': answer `refusal` (ErrorResponse with refusal.sqlstate and
    refusal.message) and forward nothing of the statement (in a simple Query
    with several statements, the server must not see any of them either:
    refuse the whole message, as an error in the first statement would).
    'protected': apply what follows.

params (extended protocol)
    $n -> ParamTarget: seal the Bind value of $n for `column` under `tenant`
    ('store': randomized for plain columns, deterministic for search
    columns; 'compare': deterministic). Declare the parameter as bytea (17),
    or bytea[] (1001) when `array` (`col = ANY($n)`: seal every element), in
    the forwarded Parse; report `policy.type` to the client in
    ParameterDescription. Parameters absent from `params` are left alone.

literals (simple protocol, and constants in a Parse text)
    Replace sql[start:end] (the whole constant expression, casts included)
    with the sealed cell as a bytea literal: `'\\x01...'::bytea`.

edits
    TextEdits to apply with the literal replacements (`apply_edits`): casts
    around a sealed parameter become `$n::bytea` (`$1::text` would not compare
    with a bytea column). Offsets are relative to the whole analyzed string,
    so edits of several statements of one Query apply in one pass.

outputs: resolving result columns to encrypted columns
    The analyzer does not know the live schema, so a `*` over a table has an
    unknown number of columns. Two cases:
    - outputs_exact True (no `*` over a table anywhere in the select list or
      RETURNING, directly or through subqueries/CTEs): `outputs` has one entry
      per result column, in order; None for plain columns. Match it with the
      RowDescription by position (a different field count is an error).
      The last `hidden_outputs` of them are row tenant columns the analyzer
      added at the end of a top-level SELECT list (an edit) because the
      statement neither selects nor pins the row's tenant: the caller checks
      each cell against its row's tenant there, and drops those fields from
      the RowDescription and every DataRow the client gets.
    - outputs_exact False: `outputs` is empty. Resolve each RowDescription
      field by its name and its table OID: PostgreSQL reports the originating
      table OID and attnum for every plain column reference, through
      subqueries and CTEs and in RETURNING, and the analyzer refuses the
      statements where an encrypted column would reach the result without that
      origin (through a UNION or scalar subquery next to a `*`). A field is a
      sealed cell iff outputs_by_name[field.name] holds a target whose
      `column.table_key` is the (schema, table) of the field's table OID
      (`resolve_outputs` does exactly this). `star_tables` lists the
      protected tables expanded by `*`; the caller needs an OID -> (schema,
      table) map only for protected tables (resolve them once per upstream,
      e.g. `SELECT 'public.patients'::regclass::oid`).
    outputs_by_name is filled in both cases (names as PostgreSQL reports
    them: the alias, else the column name).

key versions (search after rotation)
    A deterministic cell depends on the key version it was sealed with, so a
    column holds different cells for one value once its tenant's key was
    rotated. Every comparison with a value therefore matches the value's cells
    under all live versions: the analyzer rewrites `col = v` to
    `col = ANY(v)`, `col <> v` to `col <> ALL(v)`, `col IN (v1, v2)` to
    `col = ANY(v1 || v2)` (NOT IN: `<> ALL`), `col = ANY(ARRAY[v1, v2])` to
    `col = ANY((v1 || v2))` and IS [NOT] DISTINCT FROM to an equivalent
    expression, and marks those values `versions`: each is sent as a bytea[]
    of its cells, the active version first. A parameter also stored elsewhere
    in the statement (the CTE upsert) is written there as `($n::bytea[])[1]`.
    Row comparisons (`(a, col) = ($1, $2)`, `(a, col) IN (...)`) with a value
    for a search column are refused. Column-to-column equality (self-joins,
    UNIQUE, ON CONFLICT) compares stored cells and only matches cells of the
    same version.

    The narrow form (`analyze(..., narrow=True)`) is for prepared statements:
    PostgreSQL plans `col = $1` better than `col = ANY($1)` (a generic plan it
    keeps, where it plans `= ANY` again at every execution). In it a parameter
    compared on its own with `=` or `<>` stays as written and is marked
    `narrow`: one cell, right only while its tenant has a single live key
    version. The data path sends this form in the Parse and switches the
    statement to the wide one (Close, Parse) before a Bind whose tenant has
    more. A parameter also compared in a list or with IS DISTINCT FROM keeps
    the statement wide; constants always take every version.

tenant of a read (OutputTarget.tenant)
    A cell is opened with the key named in its header; AAD binds tenant and
    column, so an opened cell is authentic for its tenant. Isolation compares
    that tenant with the session tenant (unless the role is cross-tenant). To
    also catch a cell copied into another tenant's row, the plan points at the
    row's tenant column when the statement selects it ('output': by position
    when exact, by (table, name) otherwise) or at the tenant the WHERE clause
    pins (`tenant_id = $2`: 'param'/'literal'). Otherwise 'cell': the analyzer
    adds no column to the statement (a rewritten select list would change what
    the client sees), and the AAD binding is what remains.

tenant_writes
    For each write of sealed values: the table, the VALUES row (or None for
    every row), and the row tenant's source: the tenant column's value
    ($n / constant), or 'session' (tenant column omitted, DEFAULT,
    current_setting('pgseal.tenant'), or a `tenant: {session: true}` table).
    Strict isolation: refuse (42501) unless that resolves to the session
    tenant. Trusted: seal with that tenant's key. ParamTarget/LiteralTarget
    `tenant` already carries the same source per value.

copy (COPY ... FROM STDIN / TO STDOUT, text and CSV; see `CopyPlan`)
    The stream is sealed (FROM) or opened (TO) row by row by the caller; a
    statement without a column list gets one from the live catalog first.
    Binary COPY, server files and PROGRAM are refused on protected tables.

session_settings
    SET/RESET pgseal.tenant, search_path, ROLE, SESSION AUTHORIZATION,
    RESET ALL, DISCARD ALL: forwarded as they are; the caller updates its
    state when the server confirms (CommandComplete), honours SET LOCAL and
    ROLLBACK, and passes the new search_path to later analyze() calls (within
    one string, later statements are already analyzed under it). A "$user"
    entry of search_path should be replaced with the session user's name.

Assumptions: standard_conforming_strings is on; the policy matches the live
schema (`pgseal policy check`); views, functions, rules and triggers created
outside pgseal over protected tables are invisible to it.
"""

from proxy.rewrite.analyzer import CROSS_COLUMN_EQUALITY, DEFAULT_SEARCH_PATH, analyze, clear_cache
from proxy.rewrite.plan import (
    CELL_TENANT,
    DENIED,
    SESSION_TENANT,
    UNSUPPORTED,
    ColumnRef,
    CopyOptions,
    CopyPlan,
    LiteralTarget,
    OutputTarget,
    ParamTarget,
    PlanKind,
    Refusal,
    SessionSetting,
    StatementPlan,
    TenantSource,
    TenantWrite,
    TextEdit,
    Use,
    apply_edits,
    resolve_outputs,
)

__all__ = [
    "CELL_TENANT",
    "CROSS_COLUMN_EQUALITY",
    "DEFAULT_SEARCH_PATH",
    "DENIED",
    "SESSION_TENANT",
    "UNSUPPORTED",
    "ColumnRef",
    "CopyOptions",
    "CopyPlan",
    "LiteralTarget",
    "OutputTarget",
    "ParamTarget",
    "PlanKind",
    "Refusal",
    "SessionSetting",
    "StatementPlan",
    "TenantSource",
    "TenantWrite",
    "TextEdit",
    "Use",
    "analyze",
    "apply_edits",
    "clear_cache",
    "resolve_outputs",
]

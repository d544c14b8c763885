"""Protected writes pipelined behind a tenant change not yet answered, through the proxy to a
real PostgreSQL (README "Known limits": the statement waits for the answer).

PostgreSQL runs a statement of a later segment whatever became of an earlier one: when
the earlier one fails, its SET pgseal.tenant never happened. The proxy holds a statement
that seals values until such a segment is answered, so its values are sealed for the
tenant PostgreSQL runs it with; the raw client below sends everything at once, as a
pipelining driver does, and reads the answers only afterwards.
"""

from __future__ import annotations

import secrets
from typing import Any

import psycopg
import pytest

from proxy.wire import messages as m
from tests.integration.test_protocol_robustness import RawConn, error_of

pytestmark = pytest.mark.integration


def _tenant(tag: str) -> str:
    return f"{tag}-{secrets.token_hex(3)}"


def _answers(conn: RawConn, n: int) -> tuple[list[list[str]], list[int]]:
    """The messages (types; an error as E:<sqlstate>) up to each of the next n
    ReadyForQuery, and the ids of the DataRows after the first."""
    out, ids = [], []
    for i in range(n):
        frames = conn.read_until_ready()
        out.append(
            [f"E:{error_of(f).sqlstate}" if f.type == ord("E") else chr(f.type) for f in frames]
        )
        for f in frames:
            if f.type == ord("D") and i:  # (the first: pg_sleep's row)
                (value,) = m.decode_data_row(f.body).values
                assert value is not None
                ids.append(int(value))
    return out, ids


@pytest.mark.parametrize("fails", [False, True])
def test_a_write_pipelined_behind_a_tenant_change_is_sealed_for_the_tenant_that_ran_it(
    sealing_proxy: Any, fails: bool
) -> None:
    a, b = _tenant("pa"), _tenant("pb")
    body = f"pipelined-{secrets.token_hex(4)}"
    # pg_sleep: the statements behind reach the proxy well before the answer.
    change = f"SET pgseal.tenant = '{b}'; SELECT pg_sleep(0.3)" + ("; SELECT 1/0" if fails else "")
    with RawConn(sealing_proxy.host, sealing_proxy.port) as conn:
        conn.startup(options=f"-c pgseal.tenant={a}")
        conn.send(
            m.Query(change).encode(),
            # Extended: the Bind carries the value (sealed by the proxy), Sync'ed alone.
            m.Parse("", "INSERT INTO notes (body) VALUES ($1) RETURNING id").encode(),
            m.Bind("", "", (0,), (body.encode(),), ()).encode(),
            m.Execute("", 0).encode(),
            m.SYNC,
            # Simple: a literal, in a Query of its own.
            m.Query(f"INSERT INTO notes (body) VALUES ('{body}') RETURNING id").encode(),
        )
        answers, ids = _answers(conn, 3)
        assert answers[0][-2:] == (["E:22012", "Z"] if fails else ["C", "Z"])
        assert len(ids) == 2, answers
    ran_under = a if fails else b
    with psycopg.connect(sealing_proxy.dsn(), autocommit=True) as c:
        c.execute(f"SET pgseal.tenant = '{ran_under}'")
        rows = c.execute("SELECT body FROM notes WHERE id = ANY(%s)", [ids]).fetchall()
        # Each cell opens for the tenant PostgreSQL ran the INSERT under (a cell of the
        # other tenant would be refused here as another tenant's).
        assert rows == [(body,), (body,)]


def test_a_write_in_psycopg_pipeline_mode_behind_a_tenant_change(sealing_proxy: Any) -> None:
    """psycopg's pipeline mode with Syncs between: each statement under the tenant set
    before it (the proxy may hold the INSERT until the SET is answered)."""
    a, b = _tenant("ppa"), _tenant("ppb")
    body = f"pp-{secrets.token_hex(4)}"
    with psycopg.connect(sealing_proxy.dsn(), autocommit=True) as conn:
        conn.execute(f"SET pgseal.tenant = '{a}'")
        with conn.pipeline() as p:
            conn.execute(f"SET pgseal.tenant = '{b}'")
            p.sync()
            ins = conn.execute("INSERT INTO notes (body) VALUES (%s) RETURNING id", [body])
            p.sync()
        (row,) = ins.fetchall()
        read = conn.execute("SELECT body FROM notes WHERE id = %s", [row[0]])
        assert read.fetchall() == [(body,)]
        assert conn.execute("SELECT current_setting('pgseal.tenant')").fetchall() == [(b,)]

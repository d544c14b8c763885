# ruff: noqa: E501 - statements and expected rows read best one per line
"""Statements real applications send, run through the encrypting proxy in both protocols.

Each case is a short script of steps (most have one) written the way SQLAlchemy, Django,
Rails, Prisma, asyncpg users and people at psql write SQL, against the application-shaped
tables of tests/data/schema.sql (customers, orders, tickets, crm."Contacts") and the older
patients/payments. Every case runs three times, on the same freshly seeded rows:

- extended: psycopg with server-side parameters ($n, Parse/Bind; named statements
  when a step has no parameters), results in text format,
- binary: the same, results in binary format (cells opened into binary values),
- simple: the same statement with every parameter written in as a SQL literal, sent
  as a simple Query (the proxy must seal the literals by splicing the text).

A step either succeeds with the expected result (plaintext rows, row count) or is
refused with the expected SQLSTATE and a message naming schema.table(.column). After
each case: every cell in the tables is a pgseal cell (byte 0 is 0x01, search columns
deterministic, the rest randomized) and carries none of the plaintexts, and the server
log written during the case (log_statement=all, parameters included) holds none of
the sentinels every plaintext carries.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg import RawCursor

pytestmark = pytest.mark.integration

# -- seed data: every plaintext of an encrypted column carries a sentinel ------------------

S = "QZVK"  # not a hex digit in sight: never part of a cell's hex in the log
UTC = dt.UTC

E1, E2, E3 = f"ann.{S}@example.com", f"bob.{S}@example.com", f"cy.{S}@example.com"
N1, N2, N3 = f"Ann {S} Lee", f"Bob {S} Roe", f"Cy {S} Poe"
B1, B2 = dt.date(1961, 7, 23), dt.date(1973, 11, 2)
L1, L2, L3 = Decimal("7311.4401"), Decimal("8622.5502"), Decimal("-9933.6603")
P1, P2 = {"theme": f"dark-{S}", "n": 1}, {"theme": f"light-{S}"}
R1, R2, R3 = f"REF-{S}-1", f"REF-{S}-2", f"REF-{S}-3"
TOT1, TOT2, TOT3 = Decimal("120.0501"), Decimal("75.0302"), Decimal("310.0703")
NOTE1, NOTE3 = f"first {S}", f"gift {S}"
AT1 = dt.datetime(2021, 4, 5, 6, 7, 8, tzinfo=UTC)
AT2 = dt.datetime(2022, 5, 6, 7, 8, 9, tzinfo=UTC)
AT3 = dt.datetime(2023, 6, 7, 8, 9, 10, tzinfo=UTC)
SUB1, SUB2 = f"Login {S}", f"Invoice {S}"
BODY1, BODY2 = f"cannot log in {S}", f"wrong total {S}"
PR1, PR2 = 7310042, 9420017
OD1, OD2 = dt.date(1959, 1, 12), dt.date(1958, 2, 13)
PH1, PH2 = f"+1-555-{S}-01", f"+1-555-{S}-02"
DN1, DN2 = f"Dee {S}", f"Eve {S}"
SSN1, PN1 = f"900-{S}-01", f"Pat {S} Ent"
CARD1, AMT1 = f"4000-{S}-0001", Decimal("19.9901")
PAID1 = dt.datetime(2020, 3, 4, 5, 6, 7, tzinfo=UTC)

# Values the cases write (sentinels too).
NE, NN = f"new.{S}@example.com", f"New {S} Name"
NE2, NN2 = f"two.{S}@example.com", f"Two {S} Name"
NB = dt.date(1944, 8, 19)
NL = Decimal("4242.1717")
NP = {"theme": f"solar-{S}", "tags": [f"a-{S}", "b"]}
NR, NR2 = f"REF-{S}-NEW", f"REF-{S}-NEW2"
NT = Decimal("999.8811")
NNOTE = f"note {S} fresh"
NAT = dt.datetime(2024, 9, 10, 11, 12, 13, tzinfo=UTC)
NSUB, NBODY, NPR, NOD = f"Crash {S}", f"app crashes {S}", 8830077, dt.date(1957, 3, 14)
NPH, NDN = f"+44-20-{S}-99", f"Fay {S}"

SENTINELS = [
    S, "7311.4401", "8622.5502", "9933.6603", "120.0501", "75.0302", "310.0703",
    "1961-07-23", "1973-11-02", "1959-01-12", "1958-02-13", "7310042", "9420017",
    "19.9901", "2021-04-05", "2022-05-06", "2023-06-07", "2020-03-04", "4242.1717",
    "1944-08-19", "999.8811", "2024-09-10", "8830077", "1957-03-14",
]

# Physical layout: table -> (tenant column, {encrypted column: deterministic?}).
CELL_COLUMNS: dict[str, tuple[str, dict[str, bool]]] = {
    "public.customers": ("tenant_id", {"email": True, "full_name": False, "birth_date": False,
                                       "credit_limit": False, "prefs": False}),
    "public.orders": ("tenant_id", {"reference": True, "total": False, "note": False,
                                    "placed_at": False}),
    "public.tickets": ("owner", {"subject": True, "body": False, "priority": False,
                                 "opened_on": False}),
    'crm."Contacts"': ('"TenantId"', {'"PhoneNumber"': True, '"DisplayName"': False,
                                      '"Vip"': False}),
    "public.patients": ("tenant_id", {"ssn": True, "name": False, "dob": False,
                                      "balance": False, "profile": False}),
    "public.payments": ("tenant_id", {"card_number": True, "amount": False, "paid_at": False}),
}


# -- the table ------------------------------------------------------------------------------


class Ref(str):
    """A value known only when the case runs: a seeded row's id, the tenant, another tenant."""


T, OTHER = Ref("tenant"), Ref("other")
C1, C2, C3 = Ref("c1"), Ref("c2"), Ref("c3")
O1, O2, O3 = Ref("o1"), Ref("o2"), Ref("o3")
TK1, TK2 = Ref("t1"), Ref("t2")
K1, K2 = Ref("k1"), Ref("k2")


class _Any:
    def __repr__(self) -> str:
        return "ANY"


ANYV = _Any()  # matches any value (created_at, generated ids)


@dataclass(frozen=True)
class Arr:
    """A SQL array parameter (a list for psycopg, ARRAY[...] as a literal)."""

    items: tuple[Any, ...]


@dataclass
class Step:
    sql: str
    params: tuple[Any, ...] = ()
    rows: list[tuple[Any, ...]] | None = None
    ordered: bool = False
    count: int | None = None  # rowcount of a write
    refuse: tuple[str, str] | None = None  # (sqlstate, text the message must contain)
    error: str | None = None  # a PostgreSQL error SQLSTATE (not a refusal)
    nonempty: bool = False


@dataclass
class Case:
    steps: list[Step]
    note: str = ""
    only: str | None = None  # "extended" | "binary" | "simple"

    @property
    def label(self) -> str:
        return " ".join(self.steps[0].sql.split())[:80]


def q(sql: str, *params: Any, **expect: Any) -> Step:
    return Step(sql, params, **expect)


def one(sql: str, *params: Any, note: str = "", only: str | None = None, **expect: Any) -> Case:
    return Case([q(sql, *params, **expect)], note=note, only=only)


def refused(sql: str, *params: Any, state: str = "0A000", names: str, note: str = "") -> Case:
    return Case([q(sql, *params, refuse=(state, names))], note=note)


def seq(*steps: Step, note: str = "", only: str | None = None) -> Case:
    return Case(list(steps), note=note, only=only)


def cust_rows(*keys: str) -> list[tuple[Any, ...]]:
    full = {
        "c1": (C1, E1, N1, B1, L1, P1, "active"),
        "c2": (C2, E2, N2, B2, L2, P2, "active"),
        "c3": (C3, E3, N3, None, L3, None, "blocked"),
    }
    return [full[k] for k in keys]


CUST_STAR = {  # SELECT customers.* (id, tenant_id, email, ..., status, created_at)
    "c1": (C1, T, E1, N1, B1, L1, P1, "active", ANYV),
    "c2": (C2, T, E2, N2, B2, L2, P2, "active", ANYV),
    "c3": (C3, T, E3, N3, None, L3, None, "blocked", ANYV),
}
ORDER_STAR = {  # SELECT orders.*
    "o1": (O1, T, C1, R1, TOT1, NOTE1, AT1, 2),
    "o2": (O2, T, C1, R2, TOT2, None, AT2, 1),
    "o3": (O3, T, C2, R3, TOT3, NOTE3, AT3, 5),
}
CUST_COLS = "customers.id, customers.email, customers.full_name, customers.birth_date, " \
    "customers.credit_limit, customers.prefs, customers.status"

CASES: list[Case] = [
    # ---- SQLAlchemy (asyncpg/psycopg dialects: casts on parameters) -------------------------
    one(f"SELECT {CUST_COLS} FROM customers WHERE customers.email = $1::VARCHAR", E1,
        rows=cust_rows("c1")),
    one("SELECT customers.id AS customers_id, customers.email AS customers_email, "
        "customers.full_name AS customers_full_name, customers.birth_date AS customers_birth_date, "
        "customers.credit_limit AS customers_credit_limit, customers.prefs AS customers_prefs, "
        "customers.status AS customers_status \nFROM customers \nWHERE customers.id = $1::BIGINT",
        C2, rows=cust_rows("c2"), note="session.get()"),
    one("SELECT customers.email FROM customers WHERE customers.email IN ($1::VARCHAR, $2::VARCHAR)",
        E1, E3, rows=[(E1,), (E3,)]),
    one("SELECT customers.id FROM customers WHERE customers.email = ANY ($1::VARCHAR[])",
        Arr((E1, E2)), rows=[(C1,), (C2,)]),
    one("SELECT customers.full_name FROM customers WHERE customers.tenant_id = $1::VARCHAR "
        "AND customers.email = $2::VARCHAR", T, E2, rows=[(N2,)]),
    one("SELECT count(*) AS count_1 \nFROM (SELECT customers.id AS customers_id, customers.email "
        "AS customers_email \nFROM customers \nWHERE customers.email = $1::VARCHAR) AS anon_1",
        E3, rows=[(1,)]),
    one("SELECT customers.id, customers.full_name FROM customers ORDER BY customers.id "
        "LIMIT $1::INTEGER OFFSET $2::INTEGER", 2, 1, rows=[(C2, N2), (C3, N3)], ordered=True),
    one("SELECT customers.email, orders.reference, orders.total \nFROM customers JOIN orders ON "
        "customers.id = orders.customer_id \nWHERE customers.email = $1::VARCHAR ORDER BY orders.id",
        E1, rows=[(E1, R1, TOT1), (E1, R2, TOT2)], ordered=True),
    one("SELECT orders.id, orders.reference \nFROM orders \nWHERE orders.customer_id IN (SELECT "
        "customers.id \nFROM customers \nWHERE customers.email = $1::VARCHAR) ORDER BY orders.id",
        E2, rows=[(O3, R3)]),
    seq(q("INSERT INTO customers (tenant_id, email, full_name, birth_date, credit_limit, prefs, "
          "status) VALUES ($1::VARCHAR, $2::VARCHAR, $3::VARCHAR, $4::DATE, $5::NUMERIC, $6::JSONB, "
          "$7::VARCHAR) RETURNING customers.id", T, NE, NN, NB, NL, json.dumps(NP), "active",
          rows=[(ANYV,)]),
        q("SELECT customers.full_name, customers.birth_date, customers.credit_limit, customers.prefs "
          "FROM customers WHERE customers.email = $1::VARCHAR", NE, rows=[(NN, NB, NL, NP)])),
    seq(q("INSERT INTO customers (tenant_id, email, full_name) SELECT p0::VARCHAR, p1::VARCHAR, "
          "p2::VARCHAR FROM (VALUES ($1, $2, $3, 0), ($4, $5, $6, 1)) AS imp_sen(p0, p1, p2, "
          "sen_counter) ORDER BY sen_counter RETURNING customers.id, customers.id AS id__1",
          T, NE, NN, T, NE2, NN2, rows=[(ANYV, ANYV), (ANYV, ANYV)]),
        q("SELECT full_name FROM customers WHERE email IN ($1, $2)", NE, NE2,
          rows=[(NN,), (NN2,)]),
        note="SQLAlchemy 2 insertmanyvalues with sorted RETURNING"),
    seq(q("UPDATE customers SET full_name=$1::VARCHAR WHERE customers.id = $2::BIGINT", NN, C1,
          count=1),
        q("SELECT full_name FROM customers WHERE id = $1", C1, rows=[(NN,)])),
    seq(q("UPDATE customers SET credit_limit=$1::NUMERIC, prefs=$2::JSONB WHERE customers.email = "
          "$3::VARCHAR", NL, json.dumps(NP), E2, count=1),
        q("SELECT credit_limit, prefs FROM customers WHERE id = $1", C2, rows=[(NL, NP)])),
    seq(q("DELETE FROM orders WHERE orders.reference = $1::VARCHAR", R2, count=1),
        q("SELECT count(*) FROM orders", rows=[(2,)])),
    one("SELECT customers.id FROM customers WHERE customers.email = $1::VARCHAR FOR UPDATE", E2,
        rows=[(C2,)]),
    refused("SELECT orders.reference, orders.placed_at FROM orders WHERE orders.customer_id = "
            "$1::BIGINT ORDER BY orders.placed_at DESC", C1, names="public.orders.placed_at"),
    refused("SELECT customers.id FROM customers WHERE customers.full_name ILIKE $1::VARCHAR",
            "%ann%", names="public.customers.full_name"),
    one("SELECT customers.email, count(orders.id) AS count_1 FROM customers LEFT OUTER JOIN "
        "orders ON customers.id = orders.customer_id GROUP BY customers.email",
        rows=[(E1, 2), (E2, 1), (E3, 0)]),
    one("SELECT DISTINCT customers.status FROM customers", rows=[("active",), ("blocked",)]),
    refused("SELECT max(orders.total) AS max_1 FROM orders", names="public.orders.total"),
    refused("SELECT customers.id FROM customers WHERE customers.birth_date < $1::DATE",
            dt.date(1970, 1, 1), names="public.customers.birth_date"),
    one("SELECT customers.id FROM customers WHERE customers.birth_date IS NULL", rows=[(C3,)]),
    one("SELECT customers.id, customers.email FROM customers WHERE customers.email != $1::VARCHAR "
        "ORDER BY customers.id", E1, rows=[(C2, E2), (C3, E3)], ordered=True),
    refused("SELECT orders.id FROM orders WHERE (orders.total = $1::NUMERIC)", TOT1,
            names="public.orders.total"),
    refused("SELECT anon_1.customers_email FROM (SELECT customers.email AS customers_email FROM "
            "customers WHERE customers.status = $1::VARCHAR) AS anon_1 ORDER BY "
            "anon_1.customers_email", "active", names="public.customers.email"),
    one("SELECT EXISTS (SELECT * \nFROM customers \nWHERE customers.email = $1::VARCHAR) AS anon_1",
        E3, rows=[(True,)]),
    seq(q("UPDATE customers SET status=$1::VARCHAR WHERE customers.email IN ($2::VARCHAR, "
          "$3::VARCHAR)", "blocked", E1, E2, count=2),
        q("SELECT count(*) FROM customers WHERE status = 'blocked'", rows=[(3,)])),
    seq(q("DELETE FROM customers WHERE customers.id = $1::BIGINT RETURNING customers.email, "
          "customers.full_name", C3, rows=[(E3, N3)]),
        q("SELECT count(*) FROM customers", rows=[(2,)])),
    seq(q("INSERT INTO customers (tenant_id, email, full_name) VALUES ($1::VARCHAR, $2::VARCHAR, "
          "$3::VARCHAR) ON CONFLICT (tenant_id, email) DO UPDATE SET full_name = excluded.full_name "
          "RETURNING customers.id, customers.full_name", T, E1, NN, rows=[(C1, NN)]),
        q("SELECT count(*) FROM customers", rows=[(3,)]),
        note="insert().on_conflict_do_update()"),
    one("INSERT INTO customers (tenant_id, email, full_name) VALUES ($1::VARCHAR, $2::VARCHAR, "
        "$3::VARCHAR) ON CONFLICT (tenant_id, email) DO NOTHING", T, E2, NN, count=0),
    one("SELECT customers.email FROM customers WHERE customers.status = $1::VARCHAR UNION ALL "
        "SELECT customers.email FROM customers WHERE customers.email = $2::VARCHAR", "blocked", E1,
        rows=[(E3,), (E1,)]),
    one("SELECT customers.email, customers.full_name FROM customers WHERE customers.email = "
        "$1::VARCHAR OR customers.email = $2::VARCHAR", E1, E2, rows=[(E1, N1), (E2, N2)]),
    refused("SELECT lower(customers.email) AS lower_1 FROM customers",
            names="public.customers.email"),
    one("SELECT orders.reference, (SELECT customers.full_name FROM customers WHERE customers.id = "
        "orders.customer_id) AS anon_1 FROM orders WHERE orders.id = $1::BIGINT", O3,
        rows=[(R3, N2)]),
    one("WITH big AS (SELECT orders.customer_id AS cid, orders.reference AS ref FROM orders WHERE "
        "orders.quantity > $1::INTEGER) SELECT big.ref, customers.email FROM big JOIN customers ON "
        "customers.id = big.cid ORDER BY big.cid", 1, rows=[(R1, E1), (R3, E2)], ordered=True),
    one("SELECT customers.id FROM customers WHERE customers.email = $1::VARCHAR AND "
        "customers.status = $2::VARCHAR", E3, "blocked", rows=[(C3,)]),
    # ---- Django (psycopg 3 server-side binding: $n without casts) --------------------------
    one('SELECT "customers"."id", "customers"."tenant_id", "customers"."email", '
        '"customers"."full_name", "customers"."birth_date", "customers"."credit_limit", '
        '"customers"."prefs", "customers"."status", "customers"."created_at" FROM "customers" '
        'WHERE "customers"."email" = $1 LIMIT 21', E2, rows=[CUST_STAR["c2"]]),
    one('SELECT (1) AS "a" FROM "customers" WHERE "customers"."email" = $1 LIMIT 1', E1,
        rows=[(1,)], note=".exists()"),
    one('SELECT COUNT(*) AS "__count" FROM "customers" WHERE "customers"."status" = $1', "active",
        rows=[(2,)]),
    seq(q('INSERT INTO "customers" ("tenant_id", "email", "full_name", "birth_date", '
          '"credit_limit", "prefs", "status", "created_at") VALUES ($1, $2, $3, $4, $5, $6, $7, $8) '
          'RETURNING "customers"."id"', T, NE, NN, NB, NL, json.dumps(NP), "active",
          dt.datetime(2024, 1, 1, tzinfo=UTC), rows=[(ANYV,)]),
        q('SELECT "customers"."full_name", "customers"."prefs" FROM "customers" WHERE '
          '"customers"."email" = $1 LIMIT 21', NE, rows=[(NN, NP)])),
    seq(q('INSERT INTO "orders" ("tenant_id", "customer_id", "reference", "total", "note", '
          '"placed_at", "quantity") VALUES ($1, $2, $3, $4, $5, $6, $7), ($8, $9, $10, $11, $12, '
          '$13, $14) RETURNING "orders"."id"', T, C2, NR, NT, NNOTE, NAT, 3, T, C3, NR2, NT, None,
          NAT, 4, rows=[(ANYV,), (ANYV,)]),
        q('SELECT "orders"."reference", "orders"."total", "orders"."note", "orders"."placed_at" '
          'FROM "orders" WHERE "orders"."quantity" > $1 ORDER BY "orders"."id"', 2,
          rows=[(R3, TOT3, NOTE3, AT3), (NR, NT, NNOTE, NAT), (NR2, NT, None, NAT)], ordered=True),
        note="bulk_create"),
    seq(q('UPDATE "customers" SET "full_name" = $1, "status" = $2 WHERE "customers"."id" = $3',
          NN, "vip", C3, count=1),
        q('SELECT "customers"."full_name" FROM "customers" WHERE "customers"."status" = $1', "vip",
          rows=[(NN,)])),
    one('DELETE FROM "orders" WHERE "orders"."id" IN ($1, $2)', O1, O2, count=2),
    one('SELECT "orders"."id", "orders"."reference", "customers"."email" FROM "orders" INNER JOIN '
        '"customers" ON ("orders"."customer_id" = "customers"."id") WHERE "customers"."email" = $1 '
        'ORDER BY "orders"."id" ASC', E1, rows=[(O1, R1, E1), (O2, R2, E1)], ordered=True),
    one('SELECT "customers"."id" FROM "customers" WHERE NOT ("customers"."email" = $1) ORDER BY '
        '"customers"."id" ASC', E1, rows=[(C2,), (C3,)], ordered=True, note="exclude()"),
    one('SELECT "customers"."id" FROM "customers" WHERE "customers"."email" IN ($1, $2, $3) '
        'ORDER BY "customers"."id" ASC', E3, E2, f"nobody.{S}@example.com",
        rows=[(C2,), (C3,)], ordered=True),
    refused('SELECT "customers"."id" FROM "customers" WHERE UPPER("customers"."full_name"::text) '
            'LIKE UPPER($1)', "%ann%", names="public.customers.full_name", note="__icontains"),
    one('SELECT "customers"."id" FROM "customers" WHERE "customers"."prefs" IS NULL', rows=[(C3,)]),
    refused('SELECT "orders"."id" FROM "orders" WHERE "orders"."total" >= $1', TOT2,
            names="public.orders.total"),
    refused('SELECT "customers"."id" FROM "customers" ORDER BY "customers"."birth_date" DESC',
            names="public.customers.birth_date"),
    one('SELECT "customers"."email" FROM "customers" WHERE "customers"."status" = $1 ORDER BY '
        '"customers"."id" ASC', "active", rows=[(E1,), (E2,)], ordered=True, note="values_list"),
    one('SELECT "customers"."id", "customers"."email", "customers"."full_name" FROM "customers" '
        'WHERE "customers"."email" = $1 LIMIT 21 FOR UPDATE', E3, rows=[(C3, E3, N3)]),
    one('SELECT SUM("orders"."quantity") AS "quantity__sum" FROM "orders"', rows=[(8,)]),
    one('SELECT "customers"."id", COUNT("orders"."id") AS "n" FROM "customers" LEFT OUTER JOIN '
        '"orders" ON ("customers"."id" = "orders"."customer_id") GROUP BY "customers"."id" '
        'ORDER BY "customers"."id" ASC', rows=[(C1, 2), (C2, 1), (C3, 0)], ordered=True),
    one('SELECT "orders"."id", "orders"."reference", "orders"."total", "customers"."id", '
        '"customers"."full_name" FROM "orders" INNER JOIN "customers" ON ("orders"."customer_id" = '
        '"customers"."id") WHERE "orders"."id" = $1 LIMIT 21', O2,
        rows=[(O2, R2, TOT2, C1, N1)], note="select_related"),
    one('SELECT "orders"."id", "orders"."customer_id", "orders"."reference" FROM "orders" WHERE '
        '"orders"."customer_id" IN ($1, $2) ORDER BY "orders"."id"', C2, C3, rows=[(O3, C2, R3)],
        note="prefetch_related"),
    seq(q('DELETE FROM "orders" WHERE "orders"."customer_id" IN ($1)', C1, count=2),
        q('DELETE FROM "customers" WHERE "customers"."id" IN ($1)', C1, count=1),
        q('SELECT "customers"."email" FROM "customers" ORDER BY "customers"."id"',
          rows=[(E2,), (E3,)], ordered=True),
        note="delete() collector"),
    one('SELECT 1 AS "a" FROM "customers" WHERE ("customers"."email" = $1 AND NOT '
        '("customers"."id" = $2)) LIMIT 1', E1, C1, rows=[], note="validate_unique()"),
    seq(q('UPDATE "orders" SET "quantity" = ("orders"."quantity" + $1) WHERE "orders"."reference" '
          '= $2', 10, R3, count=1),
        q('SELECT "orders"."quantity" FROM "orders" WHERE "orders"."reference" = $1', R3,
          rows=[(15,)]),
        note="F() expression"),
    refused('UPDATE "orders" SET "total" = ("orders"."total" + $1) WHERE "orders"."id" = $2', 1, O1,
            names="public.orders.total"),
    one('SELECT "customers"."id", "customers"."email" FROM "customers" WHERE "customers"."id" = $1',
        C3, rows=[(C3, E3)], note=".only()"),
    refused('SELECT "orders"."id" FROM "orders" WHERE EXTRACT(YEAR FROM "orders"."placed_at") = $1',
            2021, names="public.orders.placed_at"),
    refused('SELECT "customers"."id" FROM "customers" WHERE "customers"."email"::text LIKE $1',
            "ann%", names="public.customers.email", note="__startswith"),
    one('SELECT "customers"."id" FROM "customers" WHERE "customers"."email" = $1 AND '
        '"customers"."tenant_id" = $2', E2, T, rows=[(C2,)]),
    # ---- Rails (ActiveRecord 7 prepared statements) -----------------------------------------
    one('SELECT "customers".* FROM "customers" WHERE "customers"."email" = $1 LIMIT $2', E1, 1,
        rows=[CUST_STAR["c1"]]),
    one('SELECT "customers".* FROM "customers" WHERE "customers"."id" = $1 LIMIT $2', C3, 1,
        rows=[CUST_STAR["c3"]]),
    one('SELECT 1 AS one FROM "customers" WHERE "customers"."email" = $1 AND "customers"."id" != $2 '
        "LIMIT $3", E2, C1, 1, rows=[(1,)], note="uniqueness validation"),
    seq(q('INSERT INTO "customers" ("tenant_id", "email", "full_name", "created_at") VALUES ($1, $2, '
          '$3, $4) RETURNING "id"', T, NE, NN, dt.datetime(2024, 2, 2, tzinfo=UTC), rows=[(ANYV,)]),
        q('SELECT "customers"."full_name" FROM "customers" WHERE "customers"."email" = $1 LIMIT $2',
          NE, 1, rows=[(NN,)])),
    seq(q('UPDATE "customers" SET "full_name" = $1 WHERE "customers"."id" = $2', NN2, C2, count=1),
        q('SELECT "customers"."full_name" FROM "customers" WHERE "customers"."id" = $1', C2,
          rows=[(NN2,)])),
    one('DELETE FROM "customers" WHERE "customers"."id" = $1', C3, count=1),
    one('SELECT "orders".* FROM "orders" WHERE "orders"."customer_id" = $1 ORDER BY "orders"."id" '
        "ASC", C1, rows=[ORDER_STAR["o1"], ORDER_STAR["o2"]], ordered=True),
    one('SELECT COUNT(*) FROM "orders" WHERE "orders"."reference" = $1', R2, rows=[(1,)]),
    one('SELECT "orders".* FROM "orders" INNER JOIN "customers" ON "customers"."id" = '
        '"orders"."customer_id" WHERE "customers"."email" = $1', E2, rows=[ORDER_STAR["o3"]]),
    one('SELECT "customers".* FROM "customers" WHERE "customers"."email" IN ($1, $2)', E2, E3,
        rows=[CUST_STAR["c2"], CUST_STAR["c3"]]),
    one('SELECT "customers".* FROM "customers" WHERE "customers"."id" = $1 LIMIT $2 FOR UPDATE', C1,
        1, rows=[CUST_STAR["c1"]], note="lock!"),
    one('SELECT "customers"."email" FROM "customers" WHERE "customers"."status" = $1', "blocked",
        rows=[(E3,)], note="pluck"),
    seq(q('INSERT INTO "customers" ("tenant_id","email","full_name") VALUES ($1, $2, $3) ON '
          'CONFLICT ("tenant_id","email") DO UPDATE SET "full_name"=excluded."full_name" RETURNING '
          '"id"', T, E3, NN, rows=[(C3,)]),
        q('SELECT "customers"."full_name" FROM "customers" WHERE "customers"."id" = $1', C3,
          rows=[(NN,)]),
        note="upsert_all"),
    seq(q('INSERT INTO "orders" ("tenant_id","customer_id","reference","quantity") VALUES ($1, $2, '
          '$3, $4), ($5, $6, $7, $8) ON CONFLICT  DO NOTHING RETURNING "id"', T, C1, NR, 7, T, C2,
          NR2, 9, rows=[(ANYV,), (ANYV,)]),
        q('SELECT "orders"."reference" FROM "orders" WHERE "orders"."quantity" IN ($1, $2) ORDER BY '
          '"orders"."quantity"', 7, 9, rows=[(NR,), (NR2,)], ordered=True),
        note="insert_all"),
    one('SELECT "customers".* FROM "customers" WHERE "customers"."email" != $1', E1,
        rows=[CUST_STAR["c2"], CUST_STAR["c3"]], note="where.not"),
    seq(q('UPDATE "orders" SET "note" = $1 WHERE "orders"."customer_id" = $2', NNOTE, C1, count=2),
        q('SELECT "orders"."note" FROM "orders" WHERE "orders"."customer_id" = $1', C1,
          rows=[(NNOTE,), (NNOTE,)]),
        note="update_all"),
    one('DELETE FROM "orders" WHERE "orders"."id" IN (SELECT "orders"."id" FROM "orders" WHERE '
        '"orders"."reference" = $1)', R1, count=1, note="delete_all"),
    one('SELECT 1 AS one FROM "orders" WHERE "orders"."reference" = $1 LIMIT $2', R3, 1,
        rows=[(1,)], note="exists?"),
    refused('SELECT "customers".* FROM "customers" ORDER BY "customers"."full_name" ASC',
            names="public.customers.full_name"),
    refused('SELECT "customers".* FROM "customers" WHERE (full_name LIKE $1)', "Ann%",
            names="public.customers.full_name"),
    one('SELECT "customers"."id" FROM "customers" WHERE "customers"."email" IS NULL', rows=[]),
    one('SELECT "orders"."id" FROM "orders" WHERE "orders"."note" IS NOT NULL ORDER BY "orders"."id"',
        rows=[(O1,), (O3,)], ordered=True),
    # ---- Prisma --------------------------------------------------------------------------------
    one('SELECT "public"."customers"."id", "public"."customers"."email", '
        '"public"."customers"."full_name" FROM "public"."customers" WHERE '
        '("public"."customers"."email" = $1 AND 1=1) LIMIT $2 OFFSET $3', E2, 1, 0,
        rows=[(C2, E2, N2)]),
    seq(q('INSERT INTO "public"."customers" ("tenant_id","email","full_name","birth_date") VALUES '
          '($1,$2,$3,$4) RETURNING "public"."customers"."id", "public"."customers"."email"', T, NE,
          NN, NB, rows=[(ANYV, NE)]),
        q('SELECT "public"."customers"."birth_date" FROM "public"."customers" WHERE '
          '"public"."customers"."email" = $1', NE, rows=[(NB,)])),
    one('UPDATE "public"."customers" SET "full_name" = $1 WHERE ("public"."customers"."id" = $2 AND '
        '1=1) RETURNING "public"."customers"."id", "public"."customers"."full_name"', NN, C2,
        rows=[(C2, NN)]),
    one('DELETE FROM "public"."orders" WHERE ("public"."orders"."id" = $1 AND 1=1) RETURNING '
        '"public"."orders"."reference", "public"."orders"."total"', O3, rows=[(R3, TOT3)]),
    one('SELECT "public"."orders"."id", "public"."orders"."reference" FROM "public"."orders" WHERE '
        '"public"."orders"."customer_id" IN ($1,$2) OFFSET $3', C1, C2, 0,
        rows=[(O1, R1), (O2, R2), (O3, R3)]),
    one('SELECT COUNT(*) AS "_count._all" FROM (SELECT "public"."customers"."id" FROM '
        '"public"."customers" WHERE "public"."customers"."email" = $1 OFFSET $2) AS "sub"', E1, 0,
        rows=[(1,)]),
    seq(q('INSERT INTO "public"."customers" ("tenant_id","email","full_name") VALUES ($1,$2,$3) ON '
          'CONFLICT ("tenant_id","email") DO UPDATE SET "full_name" = $4 RETURNING '
          '"public"."customers"."id"', T, E2, NN, NN2, rows=[(C2,)]),
        q('SELECT "full_name" FROM "public"."customers" WHERE "id" = $1', C2, rows=[(NN2,)]),
        note="upsert()"),
    one('SELECT "public"."customers"."id" FROM "public"."customers" WHERE '
        '"public"."customers"."email" IN ($1,$2) OFFSET $3', E1, E3, 0, rows=[(C1,), (C3,)]),
    one('SELECT "t1"."id", "t1"."full_name" FROM "public"."customers" AS "t1" WHERE '
        '"t1"."tenant_id" = $1 AND "t1"."status" = $2', T, "blocked", rows=[(C3, N3)]),
    refused('SELECT "public"."customers"."id" FROM "public"."customers" WHERE '
            '"public"."customers"."full_name"::text LIKE $1', "%Ann%",
            names="public.customers.full_name", note="contains"),
    seq(q('INSERT INTO "public"."orders" ("tenant_id","customer_id","reference","total") VALUES '
          '($1,$2,$3,$4), ($5,$6,$7,$8)', T, C3, NR, NT, T, C3, NR2, NT, count=2),
        q('SELECT "reference", "total" FROM "public"."orders" WHERE "customer_id" = $1', C3,
          rows=[(NR, NT), (NR2, NT)]),
        note="createMany"),
    seq(q('UPDATE "public"."orders" SET "note" = $1 WHERE "public"."orders"."reference" IN ($2,$3)',
          NNOTE, R1, R3, count=2),
        q('SELECT "reference" FROM "public"."orders" WHERE "note" IS NULL', rows=[(R2,)]),
        note="updateMany"),
    one('SELECT "public"."customers"."id", "public"."customers"."prefs" FROM "public"."customers" '
        'WHERE "public"."customers"."email" = $1 LIMIT $2 OFFSET $3', E1, 1, 0, rows=[(C1, P1)]),
    # ---- hand-written, asyncpg users, psql -----------------------------------------------------
    one("SELECT * FROM customers WHERE email = $1", E2, rows=[CUST_STAR["c2"]]),
    one("SELECT c.*, o.reference FROM customers c JOIN orders o ON o.customer_id = c.id WHERE "
        "o.reference = $1", R3, rows=[(*CUST_STAR["c2"], R3)]),
    one("SELECT o.* FROM orders o WHERE o.customer_id = (SELECT id FROM customers WHERE email = $1) "
        "ORDER BY o.id", E1, rows=[ORDER_STAR["o1"], ORDER_STAR["o2"]], ordered=True),
    one("TABLE tickets", rows=[(TK1, T, SUB1, BODY1, PR1, OD1, False),
                               (TK2, T, SUB2, BODY2, PR2, OD2, False)]),
    one("SELECT subject, body, priority, opened_on FROM tickets WHERE subject = $1", SUB2,
        rows=[(SUB2, BODY2, PR2, OD2)]),
    seq(q("INSERT INTO tickets (subject, body, priority, opened_on) VALUES ($1, $2, $3, $4) "
          "RETURNING id, subject", NSUB, NBODY, NPR, NOD, rows=[(ANYV, NSUB)]),
        q("SELECT body, priority, opened_on FROM tickets WHERE subject = $1", NSUB,
          rows=[(NBODY, NPR, NOD)])),
    one("UPDATE tickets SET priority = $1 WHERE subject = $2 RETURNING priority, opened_on", NPR,
        SUB1, rows=[(NPR, OD1)]),
    one("DELETE FROM tickets WHERE subject IN ($1, $2)", SUB1, SUB2, count=2),
    one("SELECT count(*) FROM tickets WHERE closed = false", rows=[(2,)]),
    refused("SELECT id FROM tickets WHERE priority > $1", 5, names="public.tickets.priority"),
    refused("SELECT id FROM tickets WHERE body = $1", BODY1, names="public.tickets.body"),
    one('SELECT "PhoneNumber", "DisplayName", "Vip" FROM crm."Contacts" WHERE "TenantId" = $1 AND '
        '"PhoneNumber" = $2', T, PH1, rows=[(PH1, DN1, True)]),
    seq(q('INSERT INTO crm."Contacts" ("TenantId", "PhoneNumber", "DisplayName", "Vip") VALUES ($1, '
          '$2, $3, $4) RETURNING "Id"', T, NPH, NDN, True, rows=[(ANYV,)]),
        q('SELECT "DisplayName", "Vip" FROM crm."Contacts" WHERE "PhoneNumber" = $1', NPH,
          rows=[(NDN, True)])),
    seq(q('UPDATE crm."Contacts" SET "Vip" = $1 WHERE "PhoneNumber" = $2', True, PH2, count=1),
        q('SELECT "Vip" FROM crm."Contacts" WHERE "Id" = $1', K2, rows=[(True,)])),
    seq(q("SET search_path TO crm, public"),
        q('SELECT "DisplayName" FROM "Contacts" WHERE "PhoneNumber" = $1', PH2, rows=[(DN2,)]),
        q("SELECT full_name FROM customers WHERE email = $1", E1, rows=[(N1,)]),
        q("RESET search_path"),
        note="search_path"),
    refused('SELECT "DisplayName" FROM crm."Contacts" ORDER BY "DisplayName"',
            names="crm.Contacts.DisplayName"),
    refused('SELECT c."DisplayName" AS name FROM crm."Contacts" c WHERE c."Vip" = $1', True,
            names="crm.Contacts.Vip"),
    one('SELECT "DisplayName" FROM crm.contacts', error="42P01",
        note="unquoted name folds to another (missing) table: PostgreSQL says so"),
    one("SELECT name, dob, balance FROM patients WHERE ssn = $1", SSN1, rows=[(PN1, None, None)]),
    seq(q("INSERT INTO payments (tenant_id, card_number, amount, paid_at) VALUES ($1, $2, $3, $4)",
          T, NR, NT, NAT, count=1),
        q("SELECT amount, paid_at FROM payments WHERE card_number = $1", NR, rows=[(NT, NAT)])),
    one("SELECT card_number, amount, paid_at FROM payments WHERE card_number = $1", CARD1,
        rows=[(CARD1, AMT1, PAID1)]),
    seq(q("INSERT INTO payments (tenant_id, card_number, amount) VALUES ($1, $2, $3)", OTHER, NR,
          NT, count=1),
        q("SELECT tenant_id, amount FROM payments WHERE tenant_id = $1 AND card_number = $2", OTHER,
          NR, rows=[(OTHER, NT)]),
        note="trusted isolation: the row's tenant picks the key"),
    refused("INSERT INTO customers (tenant_id, email) VALUES ($1, $2)", OTHER, NE, state="42501",
            names="public.customers"),
    refused("SELECT full_name FROM customers WHERE tenant_id = $1 AND email = $2", OTHER, E1,
            state="42501", names="public.customers"),
    refused("UPDATE customers SET full_name = $1 WHERE tenant_id = $2", NN, OTHER, state="42501",
            names="public.customers"),
    seq(q("INSERT INTO orders (tenant_id, customer_id, reference, total, note, placed_at, quantity) "
          "SELECT tenant_id, customer_id, reference, total, note, placed_at, quantity + 10 FROM "
          "orders WHERE id = $1 RETURNING reference, total, note, placed_at", O1,
          rows=[(R1, TOT1, NOTE1, AT1)]),
        q("SELECT count(*) FROM orders WHERE reference = $1", R1, rows=[(2,)]),
        note="INSERT ... SELECT within a table: cells stay in their columns and tenant"),
    refused("INSERT INTO orders (tenant_id, customer_id, reference, total) SELECT $1, customer_id, "
            "reference, total FROM orders WHERE id = $2", OTHER, O1,
            names="public.orders.tenant_id",
            note="copying cells into another tenant's rows: the tenant must come with them"),
    seq(q("UPDATE orders SET note = $1 FROM customers WHERE customers.id = orders.customer_id AND "
          "customers.email = $2", NNOTE, E1, count=2),
        q("SELECT note FROM orders WHERE customer_id = $1", C1, rows=[(NNOTE,), (NNOTE,)]),
        note="UPDATE ... FROM"),
    seq(q("UPDATE orders o SET total = src.total FROM orders src WHERE src.id = $1 AND o.id = $2",
          O3, O2, count=1),
        q("SELECT total FROM orders WHERE id = $1", O2, rows=[(TOT3,)]),
        note="cell copied within its column"),
    one("UPDATE customers SET email = $1 WHERE email = $2 RETURNING id, email", NE, E3,
        rows=[(C3, NE)]),
    one("DELETE FROM orders USING customers WHERE customers.id = orders.customer_id AND "
        "customers.email = $1 RETURNING orders.reference", E2, rows=[(R3,)]),
    one("DELETE FROM customers WHERE email = $1 RETURNING *", E3, rows=[CUST_STAR["c3"]]),
    seq(q("WITH upd AS (UPDATE customers SET full_name = $2 WHERE tenant_id = $3 AND email = $1 "
          "RETURNING id) INSERT INTO customers (tenant_id, email, full_name) SELECT $3, $1, $2 WHERE "
          "NOT EXISTS (SELECT 1 FROM upd)", E1, NN, T, count=0),
        q("WITH upd AS (UPDATE customers SET full_name = $2 WHERE tenant_id = $3 AND email = $1 "
          "RETURNING id) INSERT INTO customers (tenant_id, email, full_name) SELECT $3, $1, $2 WHERE "
          "NOT EXISTS (SELECT 1 FROM upd)", NE, NN2, T, count=1),
        q("SELECT email, full_name FROM customers WHERE email IN ($1, $2)", E1, NE,
          rows=[(E1, NN), (NE, NN2)]),
        note="CTE upsert (update, else insert)"),
    one("WITH ins AS (INSERT INTO orders (tenant_id, customer_id, reference, total) VALUES ($1, $2, "
        "$3, $4) RETURNING id, reference, total) SELECT * FROM ins", T, C1, NR, NT,
        rows=[(ANYV, NR, NT)]),
    one("WITH moved AS (DELETE FROM orders WHERE reference = $1 RETURNING customer_id, reference, "
        "total) SELECT reference, total FROM moved", R2, rows=[(R2, TOT2)]),
    one("SELECT email AS v FROM customers WHERE id = $1 UNION ALL SELECT email FROM customers WHERE "
        "id = $2", C1, C3, rows=[(E1,), (E3,)]),
    refused("SELECT email FROM customers UNION ALL SELECT reference FROM orders",
            names="public.customers.email"),
    refused("SELECT full_name FROM customers UNION SELECT full_name FROM customers",
            names="public.customers.full_name"),
    one("SELECT email FROM customers INTERSECT SELECT email FROM customers WHERE status = $1",
        "blocked", rows=[(E3,)]),
    one("SELECT a.id, b.id FROM customers a JOIN customers b ON a.email = b.email AND a.tenant_id = "
        "b.tenant_id WHERE a.id = $1", C2, rows=[(C2, C2)], note="self-join on a search column"),
    refused("SELECT c.id FROM customers c JOIN orders o ON c.email = o.reference",
            names="public.customers.email", note="two different search columns: refused by design"),
    refused("SELECT id FROM customers WHERE email = full_name", names="public.customers.full_name"),
    refused("SELECT email || 'x' FROM customers", names="public.customers.email"),
    refused("SELECT coalesce(full_name, 'n/a') FROM customers", names="public.customers.full_name"),
    refused("SELECT prefs->>'theme' FROM customers", names="public.customers.prefs"),
    refused("SELECT id FROM customers WHERE prefs @> $1", json.dumps(P1),
            names="public.customers.prefs"),
    refused("SELECT full_name::text FROM customers", names="public.customers.full_name"),
    one("SELECT count(DISTINCT email) FROM customers", rows=[(3,)]),
    one("SELECT count(full_name), count(*) FROM customers", rows=[(3, 3)]),
    one("SELECT email, count(*) FROM customers GROUP BY email HAVING count(*) > $1", 1, rows=[]),
    refused("SELECT DISTINCT full_name FROM customers", names="public.customers.full_name"),
    one("SELECT DISTINCT email FROM customers", rows=[(E1,), (E2,), (E3,)]),
    one("SELECT DISTINCT ON (email) email, id FROM customers", rows=[(E1, C1), (E2, C2), (E3, C3)]),
    one("SELECT id FROM customers WHERE email = ANY(ARRAY[$1, $2])", E1, E3, rows=[(C1,), (C3,)]),
    one("SELECT id FROM customers WHERE email NOT IN ($1, $2)", E1, E2, rows=[(C3,)]),
    one("SELECT id FROM customers WHERE email <> ALL($1)", Arr((E1, E3)), rows=[(C2,)]),
    one("SELECT id FROM customers WHERE email IS DISTINCT FROM $1", E1, rows=[(C2,), (C3,)]),
    one("SELECT id FROM customers WHERE email IS NOT DISTINCT FROM $1", E2, rows=[(C2,)]),
    one("SELECT id FROM customers WHERE $1 = email", E3, rows=[(C3,)]),
    one("SELECT full_name FROM customers WHERE email = NULL", rows=[]),
    one("INSERT INTO customers (tenant_id, email, full_name, birth_date) VALUES ($1, $2, $3, $4) "
        "RETURNING *", T, NE, NN, NB, rows=[(ANYV, T, NE, NN, NB, None, None, "active", ANYV)]),
    one("UPDATE orders SET note = $1 WHERE reference = $2 RETURNING *", NNOTE, R2,
        rows=[(O2, T, C1, R2, TOT2, NNOTE, AT2, 1)]),
    one("SELECT * FROM customers c LEFT JOIN orders o ON o.customer_id = c.id WHERE c.email = $1",
        E2, rows=[(*CUST_STAR["c2"], *ORDER_STAR["o3"])],
        note="two stars, duplicate column names: resolved by name and table"),
    refused("SELECT array_agg(email) FROM customers", names="public.customers.email"),
    one("INSERT INTO customers (tenant_id, email, full_name) VALUES ($1, $2, $3) ON CONFLICT "
        "(tenant_id, email) DO UPDATE SET full_name = EXCLUDED.full_name WHERE customers.status = $4 "
        "RETURNING full_name", T, E3, NN, "active", rows=[], note="conditional upsert: no update"),
    one("SELECT c.email, (SELECT count(*) FROM orders o WHERE o.customer_id = c.id) AS n FROM "
        "customers c ORDER BY c.id", rows=[(E1, 2), (E2, 1), (E3, 0)], ordered=True),
    one("SELECT email, count(*) AS n FROM customers c JOIN orders o ON o.customer_id = c.id GROUP BY "
        "email ORDER BY n DESC", rows=[(E1, 2), (E2, 1)], ordered=True),
    one("SELECT email, full_name FROM customers WHERE id = ANY($1::bigint[]) ORDER BY id",
        Arr((C1, C3)), rows=[(E1, N1), (E3, N3)], ordered=True),
    one("SELECT email, row_number() OVER (ORDER BY id) FROM customers WHERE status = $1", "active",
        rows=[(E1, 1), (E2, 2)]),
    one("WITH x AS MATERIALIZED (SELECT id, email, full_name FROM customers WHERE email = $1) "
        "SELECT full_name FROM x", E1, rows=[(N1,)]),
    one('SELECT "t0"."email", "t0"."full_name" FROM "public"."customers" AS "t0" WHERE '
        '("t0"."email" = $1 AND "t0"."tenant_id" = $2) LIMIT $3', E3, T, 1, rows=[(E3, N3)],
        note="Prisma 5 relation-load style aliases"),
    # Compared values match their cells under every key version (`= ANY`, `<> ALL`):
    # NULL semantics must stay SQL's.
    one("SELECT id FROM customers WHERE email = $1", None, rows=[]),
    one("SELECT id FROM customers WHERE email <> $1", None, rows=[]),
    one("SELECT id FROM customers WHERE email IN ($1, NULL)", E1, rows=[(C1,)]),
    one("SELECT id FROM customers WHERE email NOT IN ($1, NULL)", E1, rows=[]),
    one("SELECT id FROM customers WHERE email NOT IN ($1, $2)", E1, None, rows=[]),
    one("SELECT id FROM customers WHERE email IS DISTINCT FROM $1", None,
        rows=[(C1,), (C2,), (C3,)]),
    one("SELECT id FROM customers WHERE email IS NOT DISTINCT FROM $1", None, rows=[]),
    one("SELECT id FROM customers WHERE NOT (email IS NOT DISTINCT FROM $1) ORDER BY id", E2,
        rows=[(C1,), (C3,)], ordered=True),
    one("SELECT id FROM customers WHERE email = ANY($1)", Arr((E1, None)), rows=[(C1,)]),
    one("SELECT id FROM customers WHERE email = $1 AND email IN ($1, $2)", E2, E3, rows=[(C2,)]),
    one('SELECT "Id" FROM crm."Contacts" WHERE "PhoneNumber" = ANY (ARRAY[$1, $2]::varchar[])',
        PH1, PH2, rows=[(K1,), (K2,)]),
    seq(q("UPDATE customers SET email = $1 WHERE email = $1 RETURNING id", E1, rows=[(C1,)]),
        q("SELECT full_name FROM customers WHERE email = $1", E1, rows=[(N1,)]),
        note="one parameter stored and compared"),
    refused("SELECT id FROM customers WHERE (tenant_id, email) = ($1, $2)", T, E1,
            names="public.customers.email"),
    refused("SELECT id FROM customers WHERE (tenant_id, email) IN (($1, $2), ($1, $3))", T, E1, E2,
            names="public.customers.email", note="SQLAlchemy tuple_().in_()"),
    one("SELECT id FROM customers WHERE email = $1 FOR UPDATE SKIP LOCKED LIMIT 1", E1,
        rows=[(C1,)]),
    one("SELECT id FROM customers WHERE email = $1 FOR SHARE OF customers NOWAIT", E2, rows=[(C2,)]),
    one("SELECT id FROM customers WHERE email = (SELECT email FROM customers WHERE id = $1)", C3,
        rows=[(C3,)]),
    one("SELECT id FROM customers WHERE email IN (SELECT email FROM customers WHERE status = $1) "
        "ORDER BY id", "active", rows=[(C1,), (C2,)], ordered=True),
    one("SELECT c.full_name FROM customers c WHERE EXISTS (SELECT 1 FROM orders o WHERE "
        "o.customer_id = c.id AND o.reference = $1)", R3, rows=[(N2,)]),
    one("SELECT c.email, last.reference FROM customers c LEFT JOIN LATERAL (SELECT o.reference FROM "
        "orders o WHERE o.customer_id = c.id ORDER BY o.id DESC LIMIT 1) last ON true WHERE c.id = $1",
        C1, rows=[(E1, R2)]),
    one("SELECT x.e FROM (SELECT email FROM customers) AS x(e) WHERE x.e = $1", E2, rows=[(E2,)]),
    one("SELECT * FROM (SELECT id, email FROM customers) AS x WHERE x.email = $1", E3,
        rows=[(C3, E3)]),
    refused("SELECT p FROM customers p", names="public.customers"),
    refused("SELECT row_to_json(c) FROM customers c", names="public.customers"),
    one("EXPLAIN SELECT full_name FROM customers WHERE email = $1", E1, nonempty=True),
    refused("PREPARE find_customer (text) AS SELECT full_name FROM customers WHERE email = $1",
            names="public.customers"),
    refused("DECLARE cur CURSOR FOR SELECT email FROM customers", names="public.customers"),
    refused("DO $$ BEGIN UPDATE customers SET full_name = NULL; END $$", names="public.customers"),
    refused("CREATE TEMP TABLE leak AS SELECT email FROM customers", names="public.customers"),
    refused("SELECT email INTO TEMP leak2 FROM customers", names="public.customers"),
    refused("CREATE VIEW customer_names AS SELECT id, full_name FROM customers",
            names="public.customers"),
    refused("MERGE INTO customers c USING orders o ON c.id = o.customer_id WHEN MATCHED THEN UPDATE "
            "SET full_name = o.note", names="public.customers"),
    refused("SELECT set_config('pgseal.tenant', $1, false)", OTHER, names="pgseal.tenant"),
    refused("UPDATE customers SET tenant_id = $1 WHERE id = $2", OTHER, C1,
            names="public.customers.tenant_id"),
    refused("UPDATE customers SET full_name = full_name || $1", "x",
            names="public.customers.full_name"),
    refused("INSERT INTO customers (tenant_id, email) VALUES ($1, upper($2))", T, NE,
            names="public.customers.email"),
    refused("INSERT INTO customers VALUES (DEFAULT, $1, $2)", T, NE, names="public.customers"),
    seq(q("INSERT INTO customers (email, full_name) VALUES ($1, $2) RETURNING tenant_id, email", NE,
          NN, rows=[(T, NE)]),
        note="tenant column omitted: its default is the session tenant"),
    one("INSERT INTO customers (tenant_id, email) VALUES (current_setting('pgseal.tenant'), $1) "
        "RETURNING id, email", NE, rows=[(ANYV, NE)]),
    one("INSERT INTO customers DEFAULT VALUES RETURNING tenant_id", rows=[(T,)]),
    seq(q("UPDATE customers SET full_name = NULL, birth_date = DEFAULT WHERE id = $1", C1, count=1),
        q("SELECT full_name, birth_date, email FROM customers WHERE id = $1", C1,
          rows=[(None, None, E1)])),
    seq(q("UPDATE customers SET (full_name, birth_date) = ($1, $2) WHERE id = $3", NN, NB, C3,
          count=1),
        q("SELECT full_name, birth_date FROM customers WHERE id = $1", C3, rows=[(NN, NB)])),
    one("INSERT INTO orders (tenant_id, customer_id, reference, total, placed_at) VALUES ($1, $2, $3, "
        "$4, $5) ON CONFLICT DO NOTHING", T, C2, NR, NT, NAT, count=1),
    one("INSERT INTO customers (tenant_id, email, full_name, credit_limit) VALUES ($1, $2, $3, $4) ON "
        "CONFLICT (tenant_id, email) DO UPDATE SET full_name = EXCLUDED.full_name, credit_limit = "
        "EXCLUDED.credit_limit RETURNING id, full_name, credit_limit", T, E2, NN, NL,
        rows=[(C2, NN, NL)]),
    one("INSERT INTO customers (tenant_id, email) VALUES ($1, $2) ON CONFLICT (tenant_id, email) DO "
        "UPDATE SET email = EXCLUDED.email WHERE customers.email IS DISTINCT FROM EXCLUDED.email "
        "RETURNING id", T, E1, rows=[]),
    refused("INSERT INTO customers (tenant_id, full_name) VALUES ($1, $2) ON CONFLICT (full_name) DO "
            "NOTHING", T, NN, names="public.customers.full_name"),
    one("INSERT INTO customers (tenant_id, email) VALUES ($1, $2)", T, E1, error="23505",
        note="UNIQUE (tenant_id, email) holds on cells"),
    refused("SELECT id FROM customers WHERE email = upper($1)", E1, names="public.customers.email"),
    refused("SELECT sum(credit_limit) FROM customers", names="public.customers.credit_limit"),
    refused("SELECT id FROM customers WHERE birth_date BETWEEN $1 AND $2", B1, B2,
            names="public.customers.birth_date"),
    refused("SELECT row_number() OVER (PARTITION BY email) FROM customers",
            names="public.customers.email"),
    one("SELECT id, email IS NULL AS missing FROM customers WHERE id = $1", C2,
        rows=[(C2, False)]),
    one("SELECT CASE WHEN birth_date IS NULL THEN 'unknown' ELSE 'known' END FROM customers "
        "ORDER BY id", rows=[("known",), ("known",), ("unknown",)], ordered=True),
    one("SELECT id FROM customers WHERE email = $1 OR id = $2 ORDER BY id", E1, C3,
        rows=[(C1,), (C3,)]),
    # ---- transactions ----------------------------------------------------------------------------
    seq(q("BEGIN"),
        q("INSERT INTO customers (tenant_id, email, full_name) VALUES ($1, $2, $3)", T, NE, NN,
          count=1),
        q("SAVEPOINT sa_savepoint_1"),
        q("UPDATE customers SET full_name = $1 WHERE email = $2", NN2, NE, count=1),
        q("ROLLBACK TO SAVEPOINT sa_savepoint_1"),
        q("RELEASE SAVEPOINT sa_savepoint_1"),
        q("COMMIT"),
        q("SELECT full_name FROM customers WHERE email = $1", NE, rows=[(NN,)]),
        note="savepoints"),
    seq(q("BEGIN"),
        q("SELECT id FROM customers WHERE email = $1 FOR UPDATE", E2, rows=[(C2,)]),
        q("UPDATE customers SET credit_limit = $1 WHERE id = $2", NL, C2, count=1),
        q("COMMIT"),
        q("SELECT credit_limit FROM customers WHERE email = $1", E2, rows=[(NL,)])),
    seq(q("BEGIN"),
        q("SELECT id FROM customers WHERE full_name LIKE $1", "Ann%",
          refuse=("0A000", "public.customers.full_name")),
        q("SELECT 1", error="25P02"),
        q("ROLLBACK"),
        q("SELECT 1", rows=[(1,)]),
        note="a refusal aborts the transaction like any error"),
    seq(q("BEGIN ISOLATION LEVEL REPEATABLE READ"),
        q("SELECT email FROM customers WHERE id = $1", C1, rows=[(E1,)]),
        q("INSERT INTO orders (tenant_id, customer_id, reference) VALUES ($1, $2, $3)", T, C1, NR,
          count=1),
        q("ROLLBACK"),
        q("SELECT count(*) FROM orders WHERE reference = $1", NR, rows=[(0,)])),
    seq(q("RESET pgseal.tenant"),
        q("BEGIN"),
        q("SET LOCAL pgseal.tenant = '{T}'"),
        q("INSERT INTO customers (tenant_id, email, full_name) VALUES ($1, $2, $3)", T, NE, NN,
          count=1),
        q("COMMIT"),
        q("SELECT full_name FROM customers WHERE email = $1", NE,
          refuse=("42501", "public.customers")),
        q("SET pgseal.tenant = '{T}'"),
        q("SELECT full_name FROM customers WHERE email = $1", NE, rows=[(NN,)]),
        note="SET LOCAL ends with the transaction"),
    seq(q("RESET pgseal.tenant"),
        q("SELECT full_name FROM customers WHERE id = $1", C1, refuse=("42501", "public.customers")),
        q("SELECT id, status FROM customers WHERE id = $1", C1, rows=[(C1, "active")])),
    seq(q("DISCARD ALL"),
        q("SELECT email FROM customers WHERE id = $1", C2, refuse=("42501", "public.customers"))),
    seq(q("SET pgseal.tenant = '{T}-x'"),
        q("SELECT full_name FROM customers WHERE id = $1", C1,
          refuse=("42501", "public.customers.full_name"))),
    seq(q("SET pgseal.tenant = '{T}-x'"),
        q("SELECT amount FROM payments WHERE tenant_id = $1", T, rows=[(AMT1,)]),
        note="payments is trusted: the row's tenant decides"),
    seq(q("BEGIN"),
        q("DELETE FROM orders WHERE reference = $1 RETURNING total", R1, rows=[(TOT1,)]),
        q("DELETE FROM customers WHERE email = $1 RETURNING full_name", E1, rows=[(N1,)]),
        q("COMMIT"),
        q("SELECT count(*) FROM customers", rows=[(2,)])),
]

# Several statements in one simple Query (psycopg sends a string without parameters as is).
SIMPLE_ONLY: list[Case] = [
    one(f"BEGIN; INSERT INTO customers (tenant_id, email, full_name) VALUES ('{{T}}', '{NE}', '{NN}'); "
        f"UPDATE orders SET note = '{NNOTE}' WHERE reference = '{R1}'; COMMIT", only="simple"),
    one(f"SELECT full_name FROM customers WHERE email = '{E1}'; SELECT note FROM orders WHERE "
        f"reference = '{R3}'", only="simple", rows=[(NOTE3,)],
        note="two results, each opened with its own plan"),
    one(f"SELECT 1; SELECT full_name FROM customers WHERE full_name LIKE '{S}%'", only="simple",
        refuse=("0A000", "public.customers.full_name")),
    one(f"INSERT INTO customers (tenant_id, email, full_name, birth_date, credit_limit, prefs) VALUES "
        f"('{{T}}', E'esc.{S}\\n@x', 'O''Neil {S}', DATE '1944-08-19', -4242.1717, "
        f"'{{\"k\": \"{S}\"}}'::jsonb) RETURNING full_name, email, birth_date, credit_limit, prefs",
        only="simple", rows=[(f"O'Neil {S}", f"esc.{S}\n@x", NB, -NL, {"k": S})],
        note="escapes, typed literals, negative numbers"),
    one(f"SELECT full_name FROM customers WHERE email = $q${E2}$q$", only="simple", rows=[(N2,)]),
    one(f"UPDATE customers SET full_name = '{NN}', status = 'x' WHERE email = '{E3}' RETURNING "
        "full_name, status", only="simple", rows=[(NN, "x")]),
]


def expand(case: Case, tenant: str) -> Case:
    """Fill in the tenant for `{T}` in statement texts (SET pgseal.tenant, literals)."""
    steps = [Step(**{**s.__dict__, "sql": s.sql.replace("{T}", tenant)}) for s in case.steps]
    return Case(steps, case.note, case.only)


# -- running a case -------------------------------------------------------------------------


def literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, Decimal)):
        return str(value)
    if isinstance(value, dt.datetime):
        return f"'{value.isoformat()}'"
    if isinstance(value, dt.date):
        return f"'{value.isoformat()}'"
    if isinstance(value, Arr):
        return "ARRAY[" + ", ".join(literal(v) for v in value.items) + "]"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    raise TypeError(value)


_PARAM = re.compile(r"\$(\d+)")


def inline(sql: str, params: tuple[Any, ...]) -> str:
    def one(m: re.Match[str]) -> str:
        n = int(m.group(1))
        return literal(params[n - 1]) if n <= len(params) else m.group(0)  # PREPARE ... $1

    return _PARAM.sub(one, sql)


@dataclass
class Seeded:
    tenant: str
    ids: dict[str, int] = field(default_factory=dict)

    def resolve(self, value: Any) -> Any:
        if isinstance(value, Ref):
            if value == "tenant":
                return self.tenant
            if value == "other":
                return f"{self.tenant}-x"
            return self.ids[str(value)]
        if isinstance(value, Arr):
            return Arr(tuple(self.resolve(v) for v in value.items))
        if isinstance(value, tuple):
            return tuple(self.resolve(v) for v in value)
        return value


def seed(conn: psycopg.Connection[Any], tenant: str) -> Seeded:
    """The same rows for every case, written through the proxy in two pipelines."""
    seeded = Seeded(tenant)
    conn.execute(f"SET pgseal.tenant = '{tenant}'")
    first: list[tuple[str, str, tuple[Any, ...]]] = []
    for key, email, name, born, limit, prefs, status in [
        ("c1", E1, N1, B1, L1, P1, "active"),
        ("c2", E2, N2, B2, L2, P2, "active"),
        ("c3", E3, N3, None, L3, None, "blocked"),
    ]:
        first.append((key, "INSERT INTO customers (tenant_id, email, full_name, birth_date, "
                      "credit_limit, prefs, status) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                      (tenant, email, name, born, limit,
                       None if prefs is None else json.dumps(prefs), status)))
    for key, subject, body, prio, opened in [("t1", SUB1, BODY1, PR1, OD1),
                                             ("t2", SUB2, BODY2, PR2, OD2)]:
        first.append((key, "INSERT INTO tickets (subject, body, priority, opened_on) VALUES ($1, $2, "
                      "$3, $4) RETURNING id", (subject, body, prio, opened)))
    for key, phone, name, vip in [("k1", PH1, DN1, True), ("k2", PH2, DN2, False)]:
        first.append((key, 'INSERT INTO crm."Contacts" ("TenantId", "PhoneNumber", "DisplayName", '
                      '"Vip") VALUES ($1, $2, $3, $4) RETURNING "Id"', (tenant, phone, name, vip)))
    first.append(("p1", "INSERT INTO patients (tenant_id, ssn, name) VALUES ($1, $2, $3) RETURNING id",
                  (tenant, SSN1, PN1)))
    first.append(("pay1", "INSERT INTO payments (tenant_id, card_number, amount, paid_at) VALUES ($1, "
                  "$2, $3, $4) RETURNING id", (tenant, CARD1, AMT1, PAID1)))
    _pipeline(conn, first, seeded)
    orders = [
        (key, "INSERT INTO orders (tenant_id, customer_id, reference, total, note, placed_at, "
         "quantity) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
         (tenant, seeded.ids[cust], ref, total, note, at, qty))
        for key, cust, ref, total, note, at, qty in [
            ("o1", "c1", R1, TOT1, NOTE1, AT1, 2),
            ("o2", "c1", R2, TOT2, None, AT2, 1),
            ("o3", "c2", R3, TOT3, NOTE3, AT3, 5),
        ]
    ]
    _pipeline(conn, orders, seeded)
    return seeded


def _pipeline(conn: psycopg.Connection[Any], inserts: list[tuple[str, str, tuple[Any, ...]]],
              seeded: Seeded) -> None:
    cursors = []
    with conn.pipeline():
        for key, sql, params in inserts:
            cur = RawCursor(conn)
            cur.execute(sql, params)
            cursors.append((key, cur))
    for key, cur in cursors:
        row = cur.fetchone()
        assert row is not None
        seeded.ids[key] = row[0]


class Direct:
    """One plain connection straight to PostgreSQL (never through the proxy)."""

    def __init__(self, pg: Any) -> None:
        self.conn = psycopg.connect(pg.superuser_dsn, autocommit=True)

    def execute(self, sql: str) -> list[tuple[Any, ...]]:
        cur = self.conn.execute(sql)  # type: ignore[call-overload]
        rows = []
        while True:
            if cur.description is not None:
                rows = cur.fetchall()
            if not cur.nextset():
                return rows


def clean(pg: Any, tenant: str) -> None:
    like = tenant.replace("_", "\\_") + "%"
    pg.execute(
        f"DELETE FROM public.orders WHERE tenant_id LIKE '{like}';"
        f"DELETE FROM public.customers WHERE tenant_id LIKE '{like}';"
        f"DELETE FROM public.tickets WHERE owner LIKE '{like}';"
        f"DELETE FROM crm.\"Contacts\" WHERE \"TenantId\" LIKE '{like}';"
        f"DELETE FROM public.patients WHERE tenant_id LIKE '{like}';"
        f"DELETE FROM public.payments WHERE tenant_id LIKE '{like}';"
    )


def same(got: Any, want: Any) -> bool:
    if want is ANYV:
        return True
    if isinstance(want, tuple):
        return isinstance(got, tuple) and len(got) == len(want) and all(
            same(g, w) for g, w in zip(got, want, strict=True))
    if isinstance(want, bool) or isinstance(got, bool):
        return got is want
    return bool(got == want)


def rows_match(got: list[tuple[Any, ...]], want: list[tuple[Any, ...]], ordered: bool) -> bool:
    if len(got) != len(want):
        return False
    if ordered:
        return all(same(g, w) for g, w in zip(got, want, strict=True))
    remaining = list(got)
    for w in want:
        for i, g in enumerate(remaining):
            if same(g, w):
                del remaining[i]
                break
        else:
            return False
    return True


def run_step(conn: psycopg.Connection[Any], step: Step, seeded: Seeded, protocol: str) -> str:
    """Run one step; return a description of what went wrong, or ''."""
    params = seeded.resolve(tuple(step.params))
    if protocol == "simple":
        sql, args = inline(step.sql, params), None
    else:
        sql, args = step.sql, [list(p.items) if isinstance(p, Arr) else p for p in params]
    cur = RawCursor(conn)
    binary = protocol == "binary"
    try:
        if args:
            cur.execute(sql, args, binary=binary)
        elif protocol in ("extended", "binary"):
            cur.execute(sql, prepare=True, binary=binary)  # no parameters: still Parse/Bind/Execute
        else:
            cur.execute(sql)
        # Several statements in one Query: compare with the last result that has rows.
        got = None
        while True:
            if cur.description is not None:
                got = cur.fetchall()
            if not cur.nextset():
                break
    except psycopg.Error as exc:
        state = exc.sqlstate or ""
        message = exc.diag.message_primary or str(exc)
        if step.refuse is not None:
            want_state, names = step.refuse
            if state != want_state or names not in message or not message.startswith("pgseal: "):
                return f"refused with {state} {message!r}, expected {want_state} naming {names}"
            return ""
        if step.error is not None and state == step.error:
            return ""
        return f"failed: {state} {message}"
    if step.refuse is not None or step.error is not None:
        return f"expected {step.refuse or step.error}, but it ran (rows {got}, count {cur.rowcount})"
    if step.rows is not None:
        want = [seeded.resolve(r) for r in step.rows]
        if got is None or not rows_match(got, want, step.ordered):
            return f"rows {got}, expected {want}"
    if step.count is not None and cur.rowcount != step.count:
        return f"rowcount {cur.rowcount}, expected {step.count}"
    if step.nonempty and not got:
        return "expected some rows"
    return ""


def check_cells(pg: Any, tenant: str) -> list[str]:
    """Every cell of the case's rows is a pgseal cell of the right suite, with no plaintext."""
    problems = []
    like = tenant.replace("_", "\\_") + "%"
    for table, (tenant_col, columns) in CELL_COLUMNS.items():
        cols = list(columns)
        rows = pg.execute(f"SELECT {', '.join(cols)} FROM {table} WHERE {tenant_col} LIKE '{like}'")
        for row in rows:
            for col, value in zip(cols, row, strict=True):
                if value is None:
                    continue
                cell = bytes(value)
                suite = 2 if columns[col] else 1
                if cell[:2] != bytes([1, suite]):
                    problems.append(f"{table}.{col} holds {cell[:8].hex()}..., not a suite {suite} cell")
                if any(s.encode() in cell for s in SENTINELS):
                    problems.append(f"{table}.{col} holds plaintext")
    return problems


class ServerLog:
    """The part of the PostgreSQL server log written since `mark()`."""

    def __init__(self, pg: Any) -> None:
        self.path = pg.log_path
        self.offset = 0

    def mark(self) -> None:
        if self.path is not None:
            self.offset = self.path.stat().st_size

    def leaks(self) -> list[str]:
        if self.path is None:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            text = f.read().decode("utf-8", "replace")
        return [line for line in text.splitlines() if any(s in line for s in SENTINELS)]


@pytest.fixture(scope="module")
def direct(pg: Any, sealing_proxy: Any) -> Iterator[Direct]:
    """The tables this module uses, emptied; a direct connection to clean and inspect them."""
    d = Direct(pg)
    d.execute('TRUNCATE public.orders, public.customers, public.tickets, crm."Contacts"')
    yield d
    d.execute('TRUNCATE public.orders, public.customers, public.tickets, crm."Contacts"')
    d.conn.close()


def _params() -> list[Any]:
    out = []
    for i, case in enumerate(CASES + SIMPLE_ONLY):
        for protocol in ("extended", "simple", "binary"):
            if case.only not in (None, protocol):
                continue
            out.append(pytest.param(i, case, protocol, id=f"{i:03d}-{protocol[:3]}-{case.label}"))
    return out


@pytest.mark.parametrize(("index", "case", "protocol"), _params())
def test_statement(index: int, case: Case, protocol: str, pg: Any, sealing_proxy: Any,
                   direct: Direct) -> None:
    # One tenant per protocol: its key is made once, the rows are cleaned after every case.
    tenant = f"st-{protocol[0]}"
    log = ServerLog(pg)
    clean(direct, tenant)
    try:
        with psycopg.connect(sealing_proxy.dsn(), autocommit=True) as conn:
            seeded = seed(conn, tenant)
            log.mark()  # the seed is checked by the seed cases themselves
            case = expand(case, tenant)
            problems = []
            for n, step in enumerate(case.steps):
                problem = run_step(conn, step, seeded, protocol)
                if problem:
                    problems.append(f"step {n} {step.sql[:60]!r}: {problem}")
                    break
        problems += check_cells(direct, tenant)
        problems += [f"plaintext in the server log: {line}" for line in log.leaks()]
    finally:
        clean(direct, tenant)
    assert not problems, "\n".join(problems)


def test_table_size() -> None:
    statements = {s.sql for c in CASES + SIMPLE_ONLY for s in c.steps}
    assert len(CASES) + len(SIMPLE_ONLY) >= 150 or len(statements) >= 150


def test_psycopg_without_parameters_uses_the_simple_protocol(pg: Any, sealing_proxy: Any) -> None:
    """The 'simple' half of the table relies on it: check it in the server log."""
    if pg.log_path is None:
        pytest.skip("needs the local cluster's server log")
    log = ServerLog(pg)
    log.mark()
    with psycopg.connect(sealing_proxy.dsn(), autocommit=True) as conn:
        conn.execute("SELECT 'pgseal-simple-protocol-probe'")
    with open(pg.log_path, "rb") as f:
        f.seek(log.offset)
        text = f.read().decode()
    assert "statement: SELECT 'pgseal-simple-protocol-probe'" in text


def test_first_statement_of_a_connection_opens_star_columns(pg: Any, sealing_proxy: Any,
                                                             direct: Direct) -> None:
    """`SELECT *` as the very first statement (tenant from startup options) comes back opened:
    the proxy learns the protected tables' OIDs before the client's first statement."""
    tenant = "st-first"
    clean(direct, tenant)
    with psycopg.connect(sealing_proxy.dsn(), autocommit=True) as conn:
        seed(conn, tenant)
    options = f"-c pgseal.tenant={tenant}"
    for _ in range(2):
        with psycopg.connect(sealing_proxy.dsn(), autocommit=True, options=options) as conn:
            cur = RawCursor(conn)
            cur.execute("SELECT * FROM customers WHERE email = $1", [E1])
            row = cur.fetchone()
            assert row is not None and row[2:5] == (E1, N1, B1), row
    clean(direct, tenant)


def test_psql_script(pg: Any, sealing_proxy: Any, direct: Direct) -> None:
    """The real psql, several statements per -c, errors in the middle."""
    tenant = "st-psql"
    clean(direct, tenant)
    log = ServerLog(pg)
    with psycopg.connect(sealing_proxy.dsn(), autocommit=True) as conn:
        seed(conn, tenant)
    log.mark()
    script = [
        f"SET pgseal.tenant = '{tenant}'",
        f"SELECT full_name, birth_date, credit_limit FROM customers WHERE email = '{E1}'",
        f"INSERT INTO customers (tenant_id, email, full_name) VALUES ('{tenant}', '{NE}', '{NN}') "
        "RETURNING full_name",
        f"SELECT full_name FROM customers WHERE full_name LIKE '%{S}%'",
        f"UPDATE orders SET note = '{NNOTE}' WHERE reference IN ('{R1}', '{R2}') RETURNING note",
        "BEGIN; SELECT email FROM customers WHERE id = 0; ROLLBACK",
        f"SELECT subject, priority FROM tickets WHERE subject = '{SUB2}'",
    ]
    args = ["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=0", sealing_proxy.dsn()]
    for sql in script:
        args += ["-c", sql]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    lines = out.stdout.splitlines()
    assert f"{N1}|{B1}|{L1}" in lines, out
    assert NN in lines, out
    assert lines.count(NNOTE) == 2, out
    assert f"{SUB2}|{PR2}" in lines, out
    assert "public.customers.full_name" in out.stderr and "LIKE" in out.stderr, out.stderr
    assert not check_cells(direct, tenant)
    assert not log.leaks()
    clean(direct, tenant)

"""SQLAlchemy 2 models with ordinary column types on encrypted tables, through the proxy.

The application is written as if pgseal did not exist: `String`, `Date`, `Numeric`,
`JSONB`, `DateTime(timezone=True)` columns mapped onto tables whose encrypted columns
are bytea, a relationship between them, and the usual session work (add, add_all,
bulk insert, select by equality, IN, update, delete, joins, selectinload). Only the
connection URL points at the proxy. Two dialects: psycopg (text format; the tenant
set on every pool checkout by an event listener, one pooled connection shared by two
tenants) and asyncpg (binary format; the tenant in connect_args).
"""

from __future__ import annotations

import contextvars
import datetime as dt
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from sqlalchemy import (
    BigInteger,
    Date,
    DateTime,
    ForeignKey,
    Integer,
    Numeric,
    String,
    Text,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
)

pytestmark = pytest.mark.integration

S = "QZOR"  # in every plaintext; never in a cell


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "customers"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String)
    email: Mapped[str | None] = mapped_column(String)
    full_name: Mapped[str | None] = mapped_column(String(200))
    birth_date: Mapped[dt.date | None] = mapped_column(Date)
    credit_limit: Mapped[Decimal | None] = mapped_column(Numeric(12, 4))
    prefs: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    status: Mapped[str] = mapped_column(String, default="active")
    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now())
    orders: Mapped[list[Order]] = relationship(
        back_populates="customer", cascade="all, delete-orphan", order_by="Order.id")


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String)
    customer_id: Mapped[int | None] = mapped_column(ForeignKey("customers.id"))
    reference: Mapped[str | None] = mapped_column(String(40))
    total: Mapped[Decimal | None] = mapped_column(Numeric(12, 4))
    note: Mapped[str | None] = mapped_column(Text)
    placed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    quantity: Mapped[int] = mapped_column(Integer, default=1)
    customer: Mapped[Customer | None] = relationship(back_populates="orders")


def customer(tenant: str, n: int, **extra: Any) -> Customer:
    return Customer(
        tenant_id=tenant, email=f"c{n}.{S}@{tenant}.example", full_name=f"Customer {n} {S}",
        birth_date=dt.date(1950 + n, 1 + n % 12, 1 + n % 28),
        credit_limit=Decimal(f"{n}00.{n:04d}"), prefs={"n": n, "tag": f"t-{S}"}, **extra)


def order(tenant: str, n: int, **extra: Any) -> Order:
    return Order(tenant_id=tenant, reference=f"ORD-{S}-{tenant}-{n}", total=Decimal(f"{n}.5000"),
                 note=f"note {n} {S}",
                 placed_at=dt.datetime(2024, 1, 1 + n % 28, 12, tzinfo=dt.UTC),
                 quantity=n, **extra)


def check_cells(pg: Any, tenants: tuple[str, ...]) -> None:
    """The physical tables hold only pgseal cells for the encrypted columns."""
    names = ", ".join(f"'{t}'" for t in tenants)
    rows = pg.execute(
        f"SELECT email, full_name, birth_date, credit_limit, prefs FROM customers "
        f"WHERE tenant_id IN ({names}) UNION ALL SELECT reference, note, total, placed_at, NULL "
        f"FROM orders WHERE tenant_id IN ({names})")
    assert rows
    for row in rows:
        for value in row:
            if value is not None:
                cell = bytes(value)
                assert cell[:1] == b"\x01" and S.encode() not in cell, cell[:8]


def clean(pg: Any, tenants: tuple[str, ...]) -> None:
    names = ", ".join(f"'{t}'" for t in tenants)
    pg.execute(f"DELETE FROM orders WHERE tenant_id IN ({names}); "
               f"DELETE FROM customers WHERE tenant_id IN ({names})")


# -- psycopg dialect: tenant per checkout, one connection shared by tenants ---------------

current_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("current_tenant")
SYNC_TENANTS = ("orm-acme", "orm-globex")


@pytest.fixture
def engine(sealing_proxy: Any, pg: Any) -> Iterator[Engine]:
    clean(pg, SYNC_TENANTS)
    url = f"postgresql+psycopg://postgres@{sealing_proxy.host}:{sealing_proxy.port}/postgres"
    eng = create_engine(url, pool_size=1, max_overflow=0)

    @event.listens_for(eng, "checkout")
    def set_tenant(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        # What a multi-tenant app does: the request's tenant on every checkout. The
        # pooled connection still in a transaction must not exist here, so plain SET.
        with dbapi_connection.cursor() as cur:
            cur.execute(f"SET pgseal.tenant = '{current_tenant.get()}'")
        dbapi_connection.commit()

    yield eng
    eng.dispose()
    check_cells(pg, SYNC_TENANTS)
    clean(pg, SYNC_TENANTS)


def test_psycopg_orm_work(engine: Engine) -> None:
    acme, globex = SYNC_TENANTS
    ids: dict[str, int] = {}
    for tenant in SYNC_TENANTS:
        current_tenant.set(tenant)
        with Session(engine) as session, session.begin():
            c1 = customer(tenant, 1, orders=[order(tenant, 1), order(tenant, 2)])
            session.add(c1)
            session.add_all([customer(tenant, n) for n in range(2, 6)])  # insertmanyvalues
            session.flush()
            ids[tenant] = c1.id
        with Session(engine) as session, session.begin():
            session.execute(insert(Order), [  # executemany
                {"tenant_id": tenant, "customer_id": ids[tenant], "reference": f"BULK-{S}-{n}",
                 "total": Decimal(n), "quantity": 7} for n in range(3)])

    current_tenant.set(acme)
    with Session(engine) as session:
        found = session.scalars(
            select(Customer).where(Customer.email == f"c3.{S}@{acme}.example")).one()
        assert found.full_name == f"Customer 3 {S}" and found.birth_date == dt.date(1953, 4, 4)
        assert found.credit_limit == Decimal("300.0003")
        assert found.prefs == {"n": 3, "tag": f"t-{S}"}
        assert found.created_at.tzinfo is not None and found.status == "active"
        many = session.scalars(select(Customer.full_name).where(
            Customer.email.in_([f"c2.{S}@{acme}.example", f"c4.{S}@{acme}.example"]))).all()
        assert sorted(many) == [f"Customer 2 {S}", f"Customer 4 {S}"]
        # relationship: lazy load, selectinload, joinedload, explicit join on an equality
        c1 = session.get(Customer, ids[acme])
        assert c1 is not None and [o.reference for o in c1.orders][:2] == [
            f"ORD-{S}-{acme}-1", f"ORD-{S}-{acme}-2"]
        loaded = session.scalars(select(Customer).options(selectinload(Customer.orders))
                                 .where(Customer.tenant_id == acme).order_by(Customer.id)).all()
        assert [len(c.orders) for c in loaded] == [5, 0, 0, 0, 0]
        joined = session.scalars(select(Order).options(joinedload(Order.customer))
                                 .where(Order.reference == f"ORD-{S}-{acme}-2")).one()
        assert joined.customer is not None and joined.customer.email == f"c1.{S}@{acme}.example"
        rows = session.execute(
            select(Customer.email, Order.reference, Order.total, Order.placed_at)
            .join(Order.customer).where(Customer.email == f"c1.{S}@{acme}.example")
            .where(Order.quantity < 7).order_by(Order.id)).all()
        assert [tuple(r) for r in rows] == [
            (f"c1.{S}@{acme}.example", f"ORD-{S}-{acme}-1", Decimal("1.5000"),
             dt.datetime(2024, 1, 2, 12, tzinfo=dt.UTC)),
            (f"c1.{S}@{acme}.example", f"ORD-{S}-{acme}-2", Decimal("2.5000"),
             dt.datetime(2024, 1, 3, 12, tzinfo=dt.UTC)),
        ]
        with pytest.raises(DBAPIError) as info:  # LIKE on an encrypted column: refused
            session.scalars(select(Order.total).where(Order.reference.like("BULK%"))).all()
        assert info.value.orig.sqlstate == "0A000"  # type: ignore[union-attr]
        assert "public.orders.reference" in str(info.value.orig)
        session.rollback()
        count = session.scalar(select(func.count()).select_from(Order).where(
            Order.reference.in_([f"BULK-{S}-{n}" for n in range(3)])))
        assert count == 3

    # update: ORM dirty tracking, bulk UPDATE by equality; delete: ORM and bulk by equality
    with Session(engine) as session, session.begin():
        c2 = session.scalars(
            select(Customer).where(Customer.email == f"c2.{S}@{acme}.example")).one()
        c2.full_name, c2.prefs, c2.birth_date = f"Renamed {S}", {"renamed": True}, None
        session.execute(update(Customer).where(Customer.email == f"c3.{S}@{acme}.example")
                        .values(credit_limit=Decimal("-1.2500"), status="vip"))
        session.delete(session.scalars(select(Customer).where(
            Customer.email == f"c5.{S}@{acme}.example")).one())
        result = session.execute(delete(Order).where(Order.reference == f"BULK-{S}-0"))
        assert result.rowcount == 1  # type: ignore[attr-defined]
    with Session(engine) as session:
        rows = session.execute(select(Customer.email, Customer.full_name, Customer.prefs,
                                      Customer.birth_date, Customer.credit_limit, Customer.status)
                               .where(Customer.tenant_id == acme).order_by(Customer.id)).all()
        assert [tuple(r) for r in rows[1:3]] == [
            (f"c2.{S}@{acme}.example", f"Renamed {S}", {"renamed": True}, None, Decimal("200.0002"),
             "active"),
            (f"c3.{S}@{acme}.example", f"Customer 3 {S}", {"n": 3, "tag": f"t-{S}"},
             dt.date(1953, 4, 4), Decimal("-1.2500"), "vip"),
        ]
        assert len(rows) == 4

    # The same pooled connection, now for globex: sees its own rows only, opens them all.
    current_tenant.set(globex)
    with Session(engine) as session:
        names = session.scalars(select(Customer.full_name).where(Customer.tenant_id == globex)
                                .order_by(Customer.id)).all()
        assert names == [f"Customer {n} {S}" for n in range(1, 6)]
        assert session.scalar(select(Customer.id).where(
            Customer.email == f"c1.{S}@{acme}.example")) is None  # another tenant's cell
        with pytest.raises(DBAPIError) as info:
            session.execute(select(Customer.full_name).where(Customer.tenant_id == acme)).all()
        assert info.value.orig.sqlstate == "42501"  # type: ignore[union-attr]
        session.rollback()
        with pytest.raises(DBAPIError) as info:
            session.add(customer(acme, 99))
            session.flush()
        assert info.value.orig.sqlstate == "42501"  # type: ignore[union-attr]
        assert "public.customers" in str(info.value.orig)


def test_psycopg_tenant_in_connect_args(sealing_proxy: Any, pg: Any) -> None:
    """No listener: the tenant as a startup option (libpq `options`)."""
    tenant = "orm-opts"
    clean(pg, (tenant,))
    url = f"postgresql+psycopg://postgres@{sealing_proxy.host}:{sealing_proxy.port}/postgres"
    eng = create_engine(url, connect_args={"options": f"-c pgseal.tenant={tenant}"})
    try:
        with Session(eng) as session, session.begin():
            session.add_all([customer(tenant, n, orders=[order(tenant, n)]) for n in range(1, 4)])
        with Session(eng) as session:
            c = session.scalars(select(Customer).options(selectinload(Customer.orders))
                                .where(Customer.email == f"c2.{S}@{tenant}.example")).one()
            assert c.full_name == f"Customer 2 {S}" and c.orders[0].total == Decimal("2.5000")
    finally:
        eng.dispose()
    check_cells(pg, (tenant,))
    clean(pg, (tenant,))


# -- asyncpg dialect ------------------------------------------------------------------------

ASYNC_TENANT = "orm-async"


@pytest_asyncio.fixture
async def async_engine(sealing_proxy: Any, pg: Any) -> AsyncIterator[AsyncEngine]:
    clean(pg, (ASYNC_TENANT,))
    url = f"postgresql+asyncpg://postgres@{sealing_proxy.host}:{sealing_proxy.port}/postgres"
    eng = create_async_engine(
        url, connect_args={"server_settings": {"pgseal.tenant": ASYNC_TENANT}})
    yield eng
    await eng.dispose()
    check_cells(pg, (ASYNC_TENANT,))
    clean(pg, (ASYNC_TENANT,))


@pytest.mark.asyncio
async def test_asyncpg_orm_work(async_engine: AsyncEngine) -> None:
    t = ASYNC_TENANT
    sessions = async_sessionmaker(async_engine, expire_on_commit=False)
    async with sessions() as session, session.begin():
        session.add(customer(t, 1, orders=[order(t, 1), order(t, 2), order(t, 3)]))
        session.add_all([customer(t, n) for n in range(2, 8)])
    async with sessions() as session, session.begin():
        await session.execute(insert(Customer), [
            {"tenant_id": t, "email": f"bulk{n}.{S}@x", "full_name": f"Bulk {n} {S}",
             "birth_date": dt.date(2000, 1, n), "credit_limit": Decimal(n), "prefs": {"b": n}}
            for n in range(1, 4)])

    async with sessions() as session:
        c = (await session.scalars(select(Customer).where(
            Customer.email == f"c4.{S}@{t}.example"))).one()
        assert (c.full_name, c.birth_date, c.credit_limit, c.prefs) == (
            f"Customer 4 {S}", dt.date(1954, 5, 5), Decimal("400.0004"), {"n": 4, "tag": f"t-{S}"})
        bulk = (await session.execute(select(Customer.full_name, Customer.prefs)
                                      .where(Customer.email.in_([f"bulk1.{S}@x", f"bulk3.{S}@x"]))
                                      .order_by(Customer.id))).all()
        assert [tuple(r) for r in bulk] == [(f"Bulk 1 {S}", {"b": 1}), (f"Bulk 3 {S}", {"b": 3})]
        with_orders = (await session.scalars(
            select(Customer).options(selectinload(Customer.orders))
            .where(Customer.email == f"c1.{S}@{t}.example"))).one()
        assert [o.note for o in with_orders.orders] == [f"note {n} {S}" for n in (1, 2, 3)]
        rows = (await session.execute(
            select(Order.reference, Customer.full_name).join(Order.customer)
            .where(Order.reference == f"ORD-{S}-{t}-2"))).all()
        assert [tuple(r) for r in rows] == [(f"ORD-{S}-{t}-2", f"Customer 1 {S}")]

    async with sessions() as session, session.begin():
        c6 = (await session.scalars(select(Customer).where(
            Customer.email == f"c6.{S}@{t}.example"))).one()
        c6.email, c6.credit_limit = f"moved.{S}@{t}.example", None
        await session.execute(update(Order).where(Order.reference == f"ORD-{S}-{t}-3")
                              .values(note=None, total=Decimal("0.0001")))
        await session.delete((await session.scalars(select(Customer).where(
            Customer.email == f"c7.{S}@{t}.example"))).one())
        await session.execute(delete(Customer).where(Customer.email == f"bulk2.{S}@x"))
    async with sessions() as session:
        moved = (await session.execute(select(Customer.id, Customer.credit_limit).where(
            Customer.email == f"moved.{S}@{t}.example"))).all()
        assert len(moved) == 1 and moved[0][1] is None
        assert (await session.scalar(select(func.count()).select_from(Customer).where(
            Customer.email.in_([f"c6.{S}@{t}.example", f"c7.{S}@{t}.example",
                                f"bulk2.{S}@x"])))) == 0
        o3 = (await session.execute(select(Order.note, Order.total).where(
            Order.reference == f"ORD-{S}-{t}-3"))).one()
        assert tuple(o3) == (None, Decimal("0.0001"))
        assert (await session.scalar(select(func.count()).select_from(Customer).where(
            Customer.tenant_id == t))) == 8


@pytest.mark.asyncio
async def test_asyncpg_tenant_per_checkout(sealing_proxy: Any, pg: Any) -> None:
    """asyncpg dialect, one pooled connection, the tenant switched on every checkout."""
    tenants = ("orm-async-1", "orm-async-2")
    clean(pg, tenants)
    url = f"postgresql+asyncpg://postgres@{sealing_proxy.host}:{sealing_proxy.port}/postgres"
    eng = create_async_engine(url, pool_size=1, max_overflow=0)

    @event.listens_for(eng.sync_engine, "checkout")
    def set_tenant(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"SET pgseal.tenant = '{current_tenant.get()}'")
        cursor.close()

    sessions = async_sessionmaker(eng, expire_on_commit=False)
    try:
        for tenant in tenants:
            current_tenant.set(tenant)
            async with sessions() as session, session.begin():
                session.add_all([customer(tenant, n) for n in range(1, 4)])
        for tenant, other in (tenants, tenants[::-1]):
            current_tenant.set(tenant)
            async with sessions() as session:
                mine = (await session.scalars(select(Customer.full_name).where(
                    Customer.email == f"c2.{S}@{tenant}.example"))).all()
                assert mine == [f"Customer 2 {S}"]
                # The other tenant's value sealed under this session's key: no match.
                assert (await session.scalars(select(Customer.id).where(
                    Customer.email == f"c2.{S}@{other}.example"))).all() == []
                # Naming the other tenant's rows under strict isolation: refused.
                with pytest.raises(DBAPIError) as info:
                    await session.scalars(select(Customer.id).where(
                        Customer.tenant_id == other, Customer.email == f"c2.{S}@{other}.example"))
                assert info.value.orig.sqlstate == "42501"  # type: ignore[union-attr]
    finally:
        await eng.dispose()
    check_cells(pg, tenants)
    clean(pg, tenants)


def test_orm_statements_never_carry_plaintext(pg: Any, sealing_proxy: Any) -> None:
    """The server log of this module's run holds no plaintext (log_statement=all)."""
    if pg.log_path is None:
        pytest.skip("needs the local cluster's server log")
    with open(pg.log_path, "rb") as f:
        assert S.encode() not in f.read()
    with psycopg.connect(pg.superuser_dsn) as conn:  # and the tables were cleaned up
        assert conn.execute("SELECT count(*) FROM customers WHERE tenant_id LIKE 'orm-%'") \
            .fetchone() == (0,)

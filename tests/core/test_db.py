"""The canonical store: migrations match the models, types round-trip, bad URLs are explained."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import delete, insert, inspect, select

from gateway.core import db as gdb
from gateway.core.models import Base, Bill, BillDevice, BillKind, BillLine, Customer, Partner
from gateway.errors import DatabaseError


def test_migrations_produce_exactly_the_models_schema(db_engine):
    with db_engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    assert diff == [], f"migrations and models differ: {diff}; regenerate the migration"


def test_schema_is_current_after_upgrade(db_engine):
    gdb.check_schema_current(db_engine)
    assert gdb.current_revision(db_engine) == gdb.head_revision()


def test_m7_upgrade_from_0001_keeps_usage_rows_and_drops_their_bill_key(blank_engine):
    """0002 takes the foreign key off ``bill_devices`` (see BillDevice) without losing a row; 0001 puts it back."""
    config = gdb.alembic_config(blank_engine)
    command.upgrade(config, "0001")
    at = datetime(2026, 4, 2, tzinfo=UTC)
    with blank_engine.begin() as connection:
        # pool_mode: NOT NULL until 0005 (L15 "not set" is NULL since)
        connection.execute(insert(Partner.__table__).values(id=1, name="P", created_at=at, pool_mode="global"))
        connection.execute(insert(Customer.__table__).values(id=1, partner_id=1, name="C", timezone="UTC",
                                                             created_at=at))
        connection.execute(insert(Bill.__table__).values(
            id=7, partner_id=1, customer_id=1, kind=BillKind.MONTHLY, source_id=1, number="INV-2026-04-000001",
            period_start=date(2026, 3, 1), period_end=date(2026, 3, 31), currency="USD", total=Decimal("5"),
            issued_on=at.date(), due_on=at.date(), created_at=at))
        connection.execute(insert(BillDevice.__table__), [
            {"bill_id": 7, "device_id": d, "connection": "ninja", "external_id": str(d), "hostname": f"pc-{d}",
             "workspace": "Main", "days_active": d} for d in (1, 2)
        ])

    def state() -> tuple[list[tuple[object, ...]], list[tuple[str, str | None]]]:
        with blank_engine.connect() as connection:
            rows = connection.execute(select(BillDevice.__table__).order_by(BillDevice.device_id)).all()
            if blank_engine.dialect.name == "sqlite":  # the copies SQLite's batch mode makes stay one b-tree
                sql = connection.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = 'bill_devices'").scalar()
                assert "WITHOUT ROWID" in sql
        keys = [(fk["referred_table"], fk["options"].get("ondelete"))
                for fk in inspect(blank_engine).get_foreign_keys("bill_devices")]
        return [tuple(row) for row in rows], keys

    before, keys = state()
    assert keys == [("bills", "CASCADE")] and len(before) == 2
    command.upgrade(config, "head")
    assert state() == (before, [])
    command.downgrade(config, "0001")
    assert state() == (before, [("bills", "CASCADE")])


def test_m7_deleting_a_bill_or_its_customer_deletes_its_usage_rows(db_engine):
    """No foreign key, but the same cascade: migration 0002's trigger on ``bills``, on either database."""
    at = datetime(2026, 4, 2, tzinfo=UTC)
    with db_engine.begin() as connection:
        connection.execute(insert(Partner.__table__).values(id=1, name="P", created_at=at))
        connection.execute(insert(Customer.__table__), [
            {"id": c, "partner_id": 1, "name": f"C{c}", "timezone": "UTC", "created_at": at} for c in (1, 2)
        ])
        connection.execute(insert(Bill.__table__), [
            {"id": b, "partner_id": 1, "customer_id": c, "kind": BillKind.MONTHLY, "source_id": b,
             "number": f"INV-{b}", "period_start": date(2026, 3, 1), "period_end": date(2026, 3, 31),
             "currency": "USD", "total": Decimal("5"), "issued_on": at.date(), "due_on": at.date(), "created_at": at}
            for b, c in ((1, 1), (2, 1), (3, 2))
        ])
        connection.execute(insert(BillDevice.__table__), [
            {"bill_id": b, "device_id": d, "connection": "ninja", "external_id": str(d), "hostname": f"pc-{d}",
             "workspace": "Main", "days_active": 3} for b in (1, 2, 3) for d in (10, 11)
        ])

    def usage() -> list[int]:
        with db_engine.connect() as connection:
            return list(connection.execute(select(BillDevice.bill_id).order_by(BillDevice.bill_id)).scalars())

    with db_engine.begin() as connection:
        connection.execute(delete(Bill.__table__).where(Bill.id == 1))
    assert usage() == [2, 2, 3, 3]
    with db_engine.begin() as connection:  # the customer's bills go by the foreign key's cascade, their rows with them
        connection.execute(delete(Customer.__table__).where(Customer.id == 1))
    assert usage() == [3, 3]


def test_out_of_date_schema_refuses_with_instruction(tmp_path):
    engine = gdb.make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(DatabaseError, match="run 'gateway db upgrade' first"):
        gdb.check_schema_current(engine)


def test_money_is_decimal_and_timestamps_are_aware_utc(db):
    at = datetime(2026, 3, 29, 3, 30, tzinfo=timezone(timedelta(hours=2)))
    with gdb.transaction(db) as s:
        partner = Partner(name="P", created_at=at)
        customer = Customer(partner=partner, name="C", timezone="Europe/Berlin", created_at=at)
        s.add(customer)
        s.flush()
        bill = Bill(
            partner_id=partner.id, customer_id=customer.id, kind=BillKind.PLAN, source_id=1, number="INV-1",
            period_start=at.date(), period_end=at.date(), currency="EUR", total=Decimal("1234567.8901"),
            issued_on=at.date(), due_on=at.date(), created_at=at,
        )
        bill.lines.append(BillLine(position=1, kind="devices", description="d", quantity=Decimal("3"),
                                   unit_price=Decimal("0.1"), amount=Decimal("0.3")))
        s.add(bill)
    with db() as s:
        loaded = s.scalars(select(Bill)).one()
        assert loaded.total == Decimal("1234567.8901") and isinstance(loaded.total, Decimal)
        assert loaded.lines[0].amount == Decimal("0.3000")
        created = loaded.created_at
        assert created.tzinfo is not None and created.utcoffset() == timedelta(0)
        assert created == at


def test_naive_timestamp_is_refused(db):
    with pytest.raises(Exception, match="naive datetime"):
        with gdb.transaction(db) as s:
            s.add(Partner(name="P", created_at=datetime(2026, 1, 1)))


def test_bad_database_url_is_explained():
    with pytest.raises(DatabaseError, match="is not a database URL"):
        gdb.make_engine("not a url")


def test_unreachable_postgres_is_one_clear_line():
    engine = gdb.make_engine("postgresql://nobody@127.0.0.1:1/nothing")
    with pytest.raises(DatabaseError) as info:
        gdb.ping(engine)
    assert "cannot reach the database at postgresql+psycopg://nobody@127.0.0.1:1/nothing" in str(info.value)
    assert "\n" not in str(info.value)


def test_money_is_stored_exactly_never_as_a_float(db, db_engine):
    at = datetime(2026, 3, 1, tzinfo=UTC)
    with gdb.transaction(db) as s:
        s.add(Partner(name="P", created_at=at, discount_percent=Decimal("12345678901234.5678")))
    with db_engine.connect() as connection:
        if db_engine.dialect.name == "sqlite":
            kind, raw = connection.exec_driver_sql("SELECT typeof(discount_percent), discount_percent FROM partners").one()
            assert (kind, raw) == ("text", "12345678901234.5678")
        else:
            raw = connection.exec_driver_sql("SELECT discount_percent FROM partners").scalar()
            assert raw == Decimal("12345678901234.5678")
    with db() as s:
        assert s.scalars(select(Partner)).one().discount_percent == Decimal("12345678901234.5678")


def test_float_money_is_refused(db):
    with pytest.raises(Exception, match="money must be a Decimal"):
        with gdb.transaction(db) as s:
            s.add(Partner(name="P", created_at=datetime(2026, 1, 1, tzinfo=UTC), discount_percent=0.1))

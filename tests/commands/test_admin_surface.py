"""Issue 15: an MSP admin sets the gateway up with documented commands only: editions, partners, customers."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from decimal import Decimal

from alembic import command
from sqlalchemy import inspect

from gateway.core import db as gdb
from gateway.core import directory
from gateway.core.db import transaction
from gateway.core.models import Customer, Order
from tests.commands.test_first_day import cli, config_for, one_error_line


def test_l6_fresh_database_edition_partner_buy_with_the_partners_stored_discount(tmp_path, db_engine, capsys):
    config = config_for(tmp_path, db_engine)
    code, out, err = cli(capsys, "--config", config, "editions", "add", "--code", "enterprise-security",
                         "--name", "Enterprise Security", "--license-type", "computer", "--price", "45.00", "--json")
    assert code == 0, err
    edition = json.loads(out)
    assert edition["price_per_seat_year"] == "45.00" and edition["price_source"] == "stored"
    assert cli(capsys, "--config", config, "partners", "add", "Northwind MSP", "--discount", "10")[0] == 0
    code, out, err = cli(capsys, "--config", config, "partners", "update", "1", "--discount", "12", "--json")
    assert code == 0 and json.loads(out)["discount_percent"] == "12.00", err
    # 10 keys of 1 seat for 12 months: 450.00; the 5% tier applies on top of the partner's 12% (L6).
    code, out, err = cli(capsys, "--config", config, "licenses", "buy", "--edition", "enterprise-security",
                         "--customers", "10", "--seats", "1", "--term-months", "12", "--json")
    assert code == 0, err
    with gdb.session_factory(db_engine)() as session:
        order = session.query(Order).one()
        assert order.list_total == Decimal("450.00")
        assert order.discount_percent == Decimal("16.4")  # 1 - 0.88 * 0.95
        assert order.total == Decimal("376.20")
    code, out, err = cli(capsys, "--config", config, "partners", "show", "1", "--json")
    assert json.loads(out)["name"] == "Northwind MSP"


def test_l6_stored_edition_price_wins_over_the_config_price_with_a_warning(tmp_path, db_engine, capsys):
    config = config_for(tmp_path, db_engine, sections={"licensing.prices": {"pro": "30.00"}})
    code, out, err = cli(capsys, "--config", config, "editions", "add", "--code", "pro", "--name", "Pro", "--json")
    assert code == 0 and json.loads(out)["price_per_seat_year"] == "30.00", err  # seeded from the file
    code, out, err = cli(capsys, "--config", config, "editions", "update", "pro", "--price", "45", "--json")
    assert json.loads(out)["price_per_seat_year"] == "45.00"
    assert "prices.pro = 30.00 is ignored" in err
    code, out, err = cli(capsys, "--config", config, "editions", "archive", "pro")
    assert code == 0
    assert cli(capsys, "--config", config, "partners", "add", "Northwind MSP")[0] == 0
    code, out, err = cli(capsys, "--config", config, "licenses", "buy", "--edition", "pro", "--seats", "1",
                         "--term-months", "12")
    assert code == 2 and "archived" in one_error_line(err)


def test_partner_invoice_prefix_and_discount_are_validated(tmp_path, db_engine, capsys):
    config = config_for(tmp_path, db_engine)
    assert cli(capsys, "--config", config, "partners", "add", "Northwind MSP")[0] == 0
    code, _, err = cli(capsys, "--config", config, "partners", "update", "1", "--invoice-prefix", "=cmd")
    assert code == 2 and "invoice prefix" in one_error_line(err)
    code, _, err = cli(capsys, "--config", config, "partners", "update", "1", "--discount", "100")
    assert code == 2 and "discount" in one_error_line(err)


def test_s4_a_time_zone_change_applies_from_the_next_cycle_and_says_so(tmp_path, db_engine, capsys):
    config = config_for(tmp_path, db_engine)
    assert cli(capsys, "--config", config, "partners", "add", "Northwind MSP")[0] == 0
    assert cli(capsys, "--config", config, "customers", "add", "Acme", "--timezone", "Europe/Berlin")[0] == 0
    code, out, err = cli(capsys, "--config", config, "customers", "update", "1", "--timezone", "America/New_York",
                         "--json")
    assert code == 0, err
    row = json.loads(out)
    assert row["timezone"] == "Europe/Berlin" and row["pending_timezone"] == "America/New_York"
    assert "from the next cycle" in err
    factory = gdb.session_factory(db_engine)
    with transaction(factory) as session:
        customer = session.get_one(Customer, 1)
        start = customer.timezone_from
        assert start is not None and start.day == 1
        # Before the next cycle begins (local time of the old zone) nothing changes; from then on it does.
        before = datetime(start.year, start.month, start.day, tzinfo=UTC).replace(hour=0) - (
            datetime(2000, 1, 1, 1, tzinfo=UTC) - datetime(2000, 1, 1, tzinfo=UTC))
        assert directory.apply_due_timezones(session, before.replace(hour=21)) == []
        assert directory.apply_due_timezones(session, datetime(start.year, start.month, start.day, 1,
                                                                tzinfo=UTC), waiting={1}) == []
        assert directory.apply_due_timezones(session, datetime(start.year, start.month, start.day, 1,
                                                                tzinfo=UTC)) == [1]
        assert customer.timezone == "America/New_York" and customer.pending_timezone is None
    code, out, err = cli(capsys, "--config", config, "customers", "archive", "1")
    assert code == 0
    assert "Acme" not in cli(capsys, "--config", config, "customers", "list")[1]
    assert "Acme" in cli(capsys, "--config", config, "customers", "list", "--include-archived")[1]
    assert cli(capsys, "--config", config, "customers", "show", "1", "--json")[0] == 0


def test_workspaces_show_and_update_the_m3_maximum(tmp_path, db_engine, capsys):
    config = config_for(tmp_path, db_engine)
    assert cli(capsys, "--config", config, "partners", "add", "Northwind MSP")[0] == 0
    assert cli(capsys, "--config", config, "customers", "add", "Acme", "--timezone", "Europe/Berlin")[0] == 0
    assert cli(capsys, "--config", config, "workspaces", "add", "HQ", "--customer", "1")[0] == 0
    code, out, err = cli(capsys, "--config", config, "workspaces", "update", "1", "--max-devices", "5", "--json")
    assert code == 0 and json.loads(out)["max_devices"] == 5, err
    code, out, err = cli(capsys, "--config", config, "workspaces", "show", "1", "--json")
    assert json.loads(out)["max_devices"] == 5
    assert json.loads(cli(capsys, "--config", config, "workspaces", "update", "1", "--no-limit",
                          "--json")[1])["max_devices"] is None


def test_bills_list_for_a_customer_needs_no_partner_when_the_customer_implies_it(tmp_path, db_engine, capsys):
    config = config_for(tmp_path, db_engine)
    assert cli(capsys, "--config", config, "partners", "add", "Northwind MSP")[0] == 0
    assert cli(capsys, "--config", config, "partners", "add", "Other MSP", "--invoice-prefix", "OTH")[0] == 0
    assert cli(capsys, "--config", config, "customers", "add", "Acme", "--timezone", "UTC", "--partner", "2")[0] == 0
    code, out, err = cli(capsys, "--config", config, "bills", "list", "--customer", "1")
    assert code == 0, err


def test_migration_0007_adds_edition_prices_and_customer_archiving_and_removes_them(blank_engine):
    config = gdb.alembic_config(blank_engine)
    command.upgrade(config, "0006")

    def columns(table: str) -> set[str]:
        return {c["name"] for c in inspect(blank_engine).get_columns(table)}

    added = {"price_per_seat_year", "currency", "active"}
    assert not added & columns("editions")
    command.upgrade(config, "0007")
    assert added <= columns("editions")
    assert {"archived_at", "pending_timezone", "timezone_from"} <= columns("customers")
    command.downgrade(config, "0006")
    assert not added & columns("editions") and "archived_at" not in columns("customers")
    command.upgrade(config, "head")
    assert date(2026, 1, 1)  # the chain reaches head again

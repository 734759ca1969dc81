"""Migration 0006 (bill e-mail claims) upgrades and downgrades on SQLite and PostgreSQL, keeping bills."""

from __future__ import annotations

from alembic import command
from sqlalchemy import inspect, text

from gateway.core import db as gdb


def _columns(engine) -> set[str]:
    return {c["name"] for c in inspect(engine).get_columns("bills")}


def test_s2_migration_0006_adds_the_email_claim_columns_and_removes_them_on_downgrade(blank_engine):
    config = gdb.alembic_config(blank_engine)
    command.upgrade(config, "0005")
    assert not {"email_claimed_by", "email_claimed_until"} & _columns(blank_engine)
    command.upgrade(config, "0006")
    assert {"email_claimed_by", "email_claimed_until"} <= _columns(blank_engine)
    with blank_engine.connect() as connection:  # the other tables survived (no copy of bills cascaded)
        assert connection.execute(text("SELECT count(*) FROM bills")).scalar() == 0
    command.downgrade(config, "0005")
    assert not {"email_claimed_by", "email_claimed_until"} & _columns(blank_engine)
    command.upgrade(config, "0006")
    assert {"email_claimed_by", "email_claimed_until"} <= _columns(blank_engine)

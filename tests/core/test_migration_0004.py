"""Migration 0004 (M3 refused devices, S7 per-association price starts) goes up and down keeping the rows."""

from __future__ import annotations

from datetime import UTC, datetime

from alembic import command
from sqlalchemy import inspect, text

from gateway.core import db as gdb


def test_m3_s7_migration_0004_adds_refusal_columns_and_price_starts_and_downgrades(blank_engine):
    config = gdb.alembic_config(blank_engine)
    command.upgrade(config, "0003")
    at = datetime(2026, 4, 2, tzinfo=UTC).replace(tzinfo=None)
    with blank_engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO devices (id, connection, external_id, org_external_id, hostname, device_class, online, "
            "deleted, first_seen_at, updated_at, refused_reason) VALUES (1, 'rmm', 'd1', 'o', 'pc', '', false, "
            "false, :at, :at, 'Main: workspace is at its maximum of 1 device')"), {"at": at})
    command.upgrade(config, "0004")
    columns = {c["name"] for c in inspect(blank_engine).get_columns("devices")}
    assert {"refused_at", "refused_workspace_id"} <= columns
    assert "plan_price_starts" in inspect(blank_engine).get_table_names()
    with blank_engine.connect() as connection:
        row = connection.execute(text("SELECT refused_reason, refused_at FROM devices WHERE id = 1")).one()
    assert row == ("Main: workspace is at its maximum of 1 device", None)
    command.downgrade(config, "0003")
    assert "refused_at" not in {c["name"] for c in inspect(blank_engine).get_columns("devices")}
    assert "plan_price_starts" not in inspect(blank_engine).get_table_names()
    with blank_engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM devices")).scalar() == 1
    command.upgrade(config, "head")

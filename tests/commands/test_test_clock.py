"""Issue 15: ``gateway --now TIME`` / ``GATEWAY_NOW`` move the clock, only with ``[testing] clock_override = true``."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime

from builders import free_port, write_config
from sqlalchemy import func, select

from gateway.cli import main
from gateway.core.db import transaction
from gateway.core.models import Customer, Device, DeviceActivity, Partner, Workspace

T0 = datetime(2026, 11, 1, tzinfo=UTC)
MOVED = "2027-02-01T09:00:00Z"


def config_file(tmp_path, db_engine, *, override: bool) -> str:
    sections: dict[str, dict] = {
        "logging": {"level": "error"},
        "mail": {"host": "127.0.0.1", "port": free_port(), "from_address": "billing@msp.example", "starttls": False},
    }
    if override:
        sections["testing"] = {"clock_override": True}
    url = db_engine.url.render_as_string(hide_password=False)
    return str(write_config(tmp_path / "gateway.toml", database_url=url, sections=sections))


def cli(capsys, config: str, *args: str) -> tuple[int, str, str]:
    code = main(["--config", config, *args])
    out, err = capsys.readouterr()
    return code, out, err


def seed(db) -> int:
    """A customer with two devices active in January 2027, a month that ends after the real today."""
    with transaction(db) as s:
        p = Partner(name="Northwind IT", email="owner@northwind.example", created_at=T0)
        s.add(p)
        s.flush()
        c = Customer(partner_id=p.id, name="Acme", created_at=T0)
        s.add(c)
        s.flush()
        w = Workspace(customer_id=c.id, name="Main", created_at=T0)
        s.add(w)
        s.flush()
        for i in range(2):
            d = Device(connection="rmm", external_id=f"d{i}", org_external_id="o", workspace_id=w.id,
                       hostname=f"pc-{i}", first_seen_at=T0, updated_at=T0)
            s.add(d)
            s.flush()
            s.add(DeviceActivity(device_id=d.id, day=date(2027, 1, 10 + i)))
        return c.id


def test_issue15_now_is_refused_without_clock_override_and_writes_nothing(tmp_path, db, db_engine, capsys, monkeypatch):
    monkeypatch.delenv("GATEWAY_NOW", raising=False)
    config = config_file(tmp_path, db_engine, override=False)
    code, out, err = cli(capsys, config, "--now", MOVED, "partners", "add", "Contoso")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "--now" in err and "[testing] clock_override = true" in err
    monkeypatch.setenv("GATEWAY_NOW", MOVED)
    code, out, err = cli(capsys, config, "partners", "add", "Contoso")
    assert code == 2 and "GATEWAY_NOW" in err and "[testing] clock_override = true" in err
    with db() as s:
        assert s.scalar(select(func.count()).select_from(Partner)) == 0


def test_issue15_moved_clock_bills_a_period_that_is_only_due_at_that_time(tmp_path, db, db_engine, capsys, monkeypatch):
    monkeypatch.delenv("GATEWAY_NOW", raising=False)
    customer_id = seed(db)
    config = config_file(tmp_path, db_engine, override=True)
    code, out, _ = cli(capsys, config, "plans", "add", "--name", "Managed", "--price", "10", "--currency", "USD",
                       "--json")
    plan_id = json.loads(out)[0]["id"]
    code, out, _ = cli(capsys, config, "associations", "add", "--plan", str(plan_id), "--customer", str(customer_id),
                       "--cycle", "monthly", "--start", "2027-01-01", "--email", "ap@acme.example", "--json")
    assert code == 0
    # at the real time January 2027 has not ended: nothing is due
    code, out, _ = cli(capsys, config, "bill", "--period", "2027-01", "--dry-run", "--json")
    assert code == 0 and json.loads(out)["bills"] == []

    code, out, err = cli(capsys, config, "--now", MOVED, "bill", "--period", "2027-01", "--dry-run", "--json")
    assert code == 0
    assert err == "gateway: clock moved to 2027-02-01T09:00:00+00:00 ([testing] clock_override)\n"
    assert [(b["devices"], b["total"]) for b in json.loads(out)["bills"]] == [(2, "20.00")]

    monkeypatch.setenv("GATEWAY_NOW", "2027-02-01T10:00:00+01:00")
    code, out, err = cli(capsys, config, "bill", "--period", "2027-01", "--dry-run", "--json")
    assert code == 0 and "clock moved to 2027-02-01T09:00:00+00:00" in err
    assert len(json.loads(out)["bills"]) == 1


def test_issue15_a_time_without_a_zone_or_not_iso_is_refused_naming_the_argument(tmp_path, db, db_engine, capsys,
                                                                                   monkeypatch):
    monkeypatch.delenv("GATEWAY_NOW", raising=False)
    config = config_file(tmp_path, db_engine, override=True)
    for bad in ("2027-01-15T09:00:00", "next tuesday"):
        code, out, err = cli(capsys, config, "--now", bad, "partners", "list")
        assert code == 2 and out == "" and "--now" in err and repr(bad) in err and "with a zone" in err
    monkeypatch.setenv("GATEWAY_NOW", "2027-13-01T00:00Z")
    code, _, err = cli(capsys, config, "partners", "list")
    assert code == 2 and "GATEWAY_NOW" in err and "ISO 8601" in err

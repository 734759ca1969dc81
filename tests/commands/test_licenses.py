"""``gateway licenses``, ``gateway users`` and ``gateway tokens`` against a real SQLite file made by ``db upgrade``."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from builders import write_config
from sqlalchemy import select

from gateway.cli import main
from gateway.core import db as gdb
from gateway.core.models import ApiToken, Customer, Edition, Partner, Workspace

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def seeded_db(tmp_path_factory) -> Path:
    """A database made by ``gateway db upgrade`` and seeded once; each test works on its own copy."""
    folder = tmp_path_factory.mktemp("cli")
    db_path = folder / "seeded.db"
    path = write_config(folder / "gateway.toml", database_url=f"sqlite:///{db_path}")
    assert main(["--config", str(path), "db", "upgrade"]) == 0
    engine = gdb.make_engine(f"sqlite:///{db_path}")
    with gdb.transaction(gdb.session_factory(engine)) as s:
        partner = Partner(name="MSP", email="msp@example.test", created_at=NOW)
        s.add_all([partner, Edition(code="BUS", name="Business Security"), Edition(code="ENT", name="Enterprise")])
        s.flush()
        acme = Customer(partner_id=partner.id, name="Acme Corp", created_at=NOW)
        globex = Customer(partner_id=partner.id, name="Globex", created_at=NOW)
        s.add_all([acme, globex])
        s.flush()
        s.add_all([Workspace(customer_id=acme.id, name="acme-main", created_at=NOW),
                   Workspace(customer_id=globex.id, name="globex-main", created_at=NOW)])
    with engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    engine.dispose()
    return db_path


@pytest.fixture
def cfg(seeded_db: Path, tmp_path: Path, capsys) -> str:
    db_path = tmp_path / "gateway.db"
    shutil.copy(seeded_db, db_path)
    path = write_config(tmp_path / "gateway.toml", database_url=f"sqlite:///{db_path}",
                        sections={"licensing.prices": {"BUS": "30", "ENT": "50"}})
    capsys.readouterr()
    return str(path)


def run_json(capsys, cfg, *argv):
    code = main(["--config", cfg, *argv, "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


def run_text(capsys, cfg, *argv, code=0):
    assert main(["--config", cfg, *argv]) == code
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_l5_l7_l8_buy_assign_renew_show_and_history_from_the_shell(cfg, capsys):
    bought = run_json(capsys, cfg, "licenses", "buy", "--edition", "BUS", "--seats", "5", "--notes", "PO-9")
    key = bought["licenses"][0]["key"]
    assert bought["order"]["kind"] == "new" and bought["order"]["total"] == "150.00"
    assigned = run_json(capsys, cfg, "licenses", "assign", key, "1")
    assert assigned["status"] == "active" and assigned["customer"]["name"] == "Acme Corp"
    renewed = run_json(capsys, cfg, "licenses", "renew", key, "--years", "2")
    assert renewed["order"]["kind"] == "renewal" and renewed["license"]["expires_at"] > assigned["expires_at"]
    coupon = run_json(capsys, cfg, "licenses", "buy", "--edition", "BUS", "--seats", "5")["licenses"][0]["key"]
    out, _ = run_text(capsys, cfg, "licenses", "renew", key, "--coupon")
    assert f"renewed with coupon {coupon}" in out
    out, _ = run_text(capsys, cfg, "licenses", "show", key)
    assert f"key:                  {key}" in out and "Acme Corp (id 1)" in out
    history = run_json(capsys, cfg, "licenses", "history", key)
    assert [h["action"] for h in history] == ["purchased", "assigned", "renewed", "renewed_with_coupon"]
    assert history[0]["actor"].startswith("cli")
    out, _ = run_text(capsys, cfg, "licenses", "history", key)
    assert "notes='PO-9'" in out and "expires_at: None -> '20" in out


def test_l6_l12_bulk_purchase_and_order_history_from_the_shell(cfg, capsys):
    bulk = run_json(capsys, cfg, "licenses", "buy", "--edition", "BUS", "--seats", "2", "--customers", "10")
    assert len(bulk["licenses"]) == 10 and bulk["order"]["discount_percent"] == "5.00"
    assert all(lic["in_pool"] for lic in bulk["licenses"])
    run_json(capsys, cfg, "licenses", "assign", bulk["licenses"][0]["key"], "2")
    orders = run_json(capsys, cfg, "licenses", "orders")
    assert orders["total"] == 1 and (orders["items"][0]["used_keys"], orders["items"][0]["unused_keys"]) == (1, 9)
    out, _ = run_text(capsys, cfg, "licenses", "orders")
    assert "bulk" in out and bulk["licenses"][0]["key"] in out


def test_l11_search_with_filters_and_l10_notes(cfg, capsys):
    key = run_json(capsys, cfg, "licenses", "buy", "--edition", "BUS", "--seats", "1")["licenses"][0]["key"]
    other = run_json(capsys, cfg, "licenses", "buy", "--edition", "BUS", "--seats", "1")["licenses"][0]["key"]
    run_json(capsys, cfg, "licenses", "assign", other, "2")
    out, _ = run_text(capsys, cfg, "licenses", "notes", key, "for the new Globex office")
    assert "notes set to 'for the new Globex office'" in out
    found = run_json(capsys, cfg, "licenses", "search", "*globex*")
    assert {i["key"] for i in found["items"]} == {key, other}  # the note, and the customer's name
    found = run_json(capsys, cfg, "licenses", "search", "globex", "--expired")
    assert found["items"] == []
    found = run_json(capsys, cfg, "licenses", "search", "globex", "--coupon-deadline-soon")
    assert found["items"] == []  # bought today: a whole year to activate
    out, _ = run_text(capsys, cfg, "licenses", "list")
    assert "KEY" in out and key in out and other in out


def test_l16_delete_expired_previews_without_yes(cfg, capsys):
    out, _ = run_text(capsys, cfg, "licenses", "delete-expired", "--mode", "unassigned")
    assert "0 expired license(s) would be deleted (unassigned)" in out
    result = run_json(capsys, cfg, "licenses", "delete-expired", "--mode", "all", "--yes")
    assert result == {"mode": "all", "dry_run": False, "count": 0, "keys": []}


def test_l13_l14_l15_settings_auto_renew_and_daily_job(cfg, capsys):
    key = run_json(capsys, cfg, "licenses", "buy", "--edition", "BUS", "--seats", "1")["licenses"][0]["key"]
    run_json(capsys, cfg, "licenses", "assign", key, "1")
    out, _ = run_text(capsys, cfg, "licenses", "auto-renew", key, "off")
    assert "auto-renewal off; next renewal: none" in out
    settings = run_json(capsys, cfg, "licenses", "settings", "--automatic-exchange", "off")
    assert settings["automatic_exchange"] is False
    out, _ = run_text(capsys, cfg, "licenses", "settings", "--pool-mode", "limited", "--pool-limit", "3")
    assert "company allocation: limited pool (limit 3)" in out
    out, _ = run_text(capsys, cfg, "licenses", "settings", "--pool-mode", "none")
    assert "company allocation: not set (each user's own setting applies)" in out
    report = run_json(capsys, cfg, "licenses", "daily")
    assert report["expired"] == 0 and report["notifications"] == 0


def test_users_add_prints_the_token_once_and_stores_only_its_hash(cfg, capsys, tmp_path):
    out, _ = run_text(capsys, cfg, "users", "add", "carol", "--role", "customer_admin", "--customer", "1")
    token = out.split("keep it safe): ")[1].strip()
    assert token.startswith("gw_") and len(token) > 40
    users = run_json(capsys, cfg, "users", "list")
    assert users[0]["customers"] == [1] and users[0]["role"] == "customer_admin"
    out, _ = run_text(capsys, cfg, "tokens", "create", "1", "--name", "ci")
    second = out.rsplit(" ", 1)[1].strip()
    engine = gdb.make_engine(f"sqlite:///{tmp_path / 'gateway.db'}")
    with engine.connect() as connection:
        stored = list(connection.execute(select(ApiToken.token_hash)).scalars())
    engine.dispose()
    assert len(stored) == 2 and token not in stored and second not in stored
    listed, _ = run_text(capsys, cfg, "tokens", "list")
    assert token not in listed and "ci" in listed
    run_text(capsys, cfg, "tokens", "revoke", "1")
    assert run_json(capsys, cfg, "tokens", "list")[0]["revoked_at"] is not None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["licenses", "show", "ABCDE-FGHJK-MNPQR-STVWX-YZ012"], "license key is mistyped"),
        (["licenses", "show", "ABCDE"], "has 5 symbols, a key has 25"),
        (["licenses", "buy", "--edition", "XX", "--seats", "1"], "unknown edition 'XX' (known editions: BUS, ENT)"),
        (["licenses", "buy", "--edition", "BUS", "--seats", "0"], "seats must be between 1 and"),
        (["licenses", "--partner", "9", "list"], "no partner with id 9"),
        (["licenses", "allocation", "7"], "no user with id 7"),
        (["users", "add", "x", "--role", "customer_admin", "--customer", "99"], "no customer with id 99"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_code_2(cfg, capsys, argv, message):
    _out, err = run_text(capsys, cfg, *argv, code=2)
    lines = [line for line in err.splitlines() if line.startswith("gateway: error:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err


def test_an_unknown_key_is_not_found(cfg, capsys):
    from gateway.core.license_keys import new_key

    _out, err = run_text(capsys, cfg, "licenses", "show", new_key(), code=2)
    assert "no license with key" in err

"""The billing commands: ``gateway plans|associations|bills|billing`` and ``gateway bill``."""

from __future__ import annotations

import io
import json
from datetime import UTC, date, datetime

import pytest
from aiosmtpd.controller import Controller
from builders import free_port, write_config
from pypdf import PdfReader
from sqlalchemy import func, select

from gateway.cli import main
from gateway.core.db import transaction
from gateway.core.models import Bill, Customer, Device, DeviceActivity, Partner, Workspace

T0 = datetime(2025, 1, 1, tzinfo=UTC)


class Inbox:
    def __init__(self):
        self.messages = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        self.messages.append(envelope)
        return "250 OK"


@pytest.fixture
def smtp_port():
    port = free_port()
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield port, inbox
    controller.stop()


def config_file(tmp_path, db_engine, mail_port: int | None) -> str:
    """This module's gateway.toml: quiet logging, and the test's SMTP server when it has one."""
    sections: dict[str, dict] = {"logging": {"level": "error"}}
    if mail_port:
        sections["mail"] = {"host": "127.0.0.1", "port": mail_port, "from_address": "billing@msp.example",
                            "starttls": False}
    url = db_engine.url.render_as_string(hide_password=False)
    return str(write_config(tmp_path / "gateway.toml", database_url=url, sections=sections))


def seed(db) -> tuple[int, int]:
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
        for i in range(3):
            d = Device(connection="rmm", external_id=f"d{i}", org_external_id="o", workspace_id=w.id,
                       hostname=f"pc-{i}", first_seen_at=T0, updated_at=T0)
            s.add(d)
            s.flush()
            s.add(DeviceActivity(device_id=d.id, day=date(2025, 3, 10 + i)))
        return c.id, w.id


def cli(capsys, config: str, *args: str) -> tuple[int, str, str]:
    code = main(["--config", config, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_s2_cli_refuses_an_association_without_mail_settings_and_says_what_to_set(tmp_path, db, db_engine, capsys):
    customer_id, _ = seed(db)
    config = config_file(tmp_path, db_engine, None)
    code, out, _ = cli(capsys, config, "plans", "add", "--name", "Managed", "--price", "10", "--currency", "USD", "--json")
    assert code == 0
    plan_id = json.loads(out)[0]["id"]
    code, _, err = cli(capsys, config, "associations", "add", "--plan", str(plan_id), "--customer", str(customer_id),
                       "--cycle", "monthly", "--start", "2025-03-01", "--email", "ap@acme.example")
    assert code == 2
    assert "mail server settings are required" in err and "GATEWAY_MAIL__HOST" in err and "Traceback" not in err


def test_s3_cli_bill_run_dry_run_documents_and_payment(tmp_path, db, db_engine, capsys, smtp_port):
    port, inbox = smtp_port
    customer_id, _ = seed(db)
    config = config_file(tmp_path, db_engine, port)
    code, out, _ = cli(capsys, config, "plans", "add", "--name", "Managed", "--price", "10", "--currency", "USD", "--json")
    plan_id = json.loads(out)[0]["id"]
    code, out, _ = cli(capsys, config, "associations", "add", "--plan", str(plan_id), "--customer", str(customer_id),
                       "--cycle", "monthly", "--start", "2025-03-01", "--due-days", "14", "--email", "ap@acme.example",
                       "--json")
    assert code == 0 and json.loads(out)[0]["cycle"] == "monthly"

    code, out, _ = cli(capsys, config, "bill", "--period", "2025-03", "--as-of", "2025-04-01T01:00", "--dry-run", "--json")
    preview = json.loads(out)
    assert code == 0 and preview["dry_run"] is True
    assert [(b["number"], b["devices"], b["total"]) for b in preview["bills"]] == [("(dry run)", 3, "30.00")]
    with db() as s:
        assert s.scalar(select(func.count()).select_from(Bill)) == 0

    code, out, _ = cli(capsys, config, "bill", "--period", "2025-03", "--as-of", "2025-04-01T01:00", "--json")
    result = json.loads(out)
    assert code == 0 and [b["number"] for b in result["bills"]] == ["INV-2025-04-000001"]
    assert result["emailed"] == ["INV-2025-04-000001"] and len(inbox.messages) == 1
    assert inbox.messages[0].rcpt_tos == ["ap@acme.example"]
    code, out, _ = cli(capsys, config, "bill", "--period", "2025-03", "--as-of", "2025-04-01T01:00", "--json")
    again = json.loads(out)
    assert (again["bills"], again["already_billed"], again["emailed"]) == ([], 1, [])
    assert len(inbox.messages) == 1

    code, out, _ = cli(capsys, config, "bills", "list", "--json")
    (listed,) = json.loads(out)
    bill_id = str(listed["id"])
    assert (listed["status"], listed["total"], listed["due_on"]) == ("issued", "30.00", "2025-04-15")
    code, out, _ = cli(capsys, config, "bills", "csv", bill_id)
    assert code == 0 and "INV-2025-04-000001" in out and "30.00" in out
    pdf_path = tmp_path / "bill.pdf"
    code, _, err = cli(capsys, config, "bills", "pdf", bill_id, "-o", str(pdf_path))
    assert code == 0 and "written to" in err
    assert "Total: 30.00 USD" in PdfReader(io.BytesIO(pdf_path.read_bytes())).pages[0].extract_text()

    code, out, _ = cli(capsys, config, "bills", "paid", bill_id, "--json")
    assert code == 0 and json.loads(out)[0]["status"] == "paid"
    code, _, err = cli(capsys, config, "bills", "void", bill_id)
    assert code == 2 and "is paid and cannot change" in err
    code, out, _ = cli(capsys, config, "bills", "credit", bill_id, "--amount", "10", "--reason", "goodwill", "--json")
    assert code == 0 and json.loads(out)[0]["amount"] == "-10.00"
    code, _, err = cli(capsys, config, "bills", "show", "999")
    assert code == 2 and "no bill with id 999" in err


def test_m8_cli_cancel_shows_what_ends_and_needs_yes(tmp_path, db, db_engine, capsys):
    customer_id, workspace_id = seed(db)
    config = config_file(tmp_path, db_engine, None)
    code, out, _ = cli(capsys, config, "billing", "enable", "--json")
    assert code == 0 and json.loads(out)[0]["activation_total"] == "10.00"
    code, _, _ = cli(capsys, config, "billing", "join", "--workspace", str(workspace_id), "--max-devices", "10")
    assert code == 0
    code, out, _ = cli(capsys, config, "billing", "cancel")
    assert code == 0 and "offered end dates:" in out and "pc-0, pc-1, pc-2" in out and "nothing changed" in out
    code, out, _ = cli(capsys, config, "billing", "cancel", "--json")
    ends_on = json.loads(out)["offered_end_dates"][1]
    code, out, _ = cli(capsys, config, "billing", "cancel", "--ends-on", ends_on, "--yes")
    assert code == 0 and f"service ends on {ends_on}" in out
    code, out, _ = cli(capsys, config, "billing", "status", "--json")
    assert json.loads(out)[0]["ends_on"] == ends_on
    code, out, _ = cli(capsys, config, "billing", "reactivate", "--json")
    assert code == 0 and json.loads(out)[0]["ends_on"] is None


def test_m2_cli_leave_takes_one_workspace_off_the_plan_after_yes(tmp_path, db, db_engine, capsys):
    customer_id, workspace_id = seed(db)
    config = config_file(tmp_path, db_engine, None)
    assert cli(capsys, config, "billing", "enable")[0] == 0
    assert cli(capsys, config, "billing", "join", "--workspace", str(workspace_id), "--max-devices", "10")[0] == 0
    code, out, _ = cli(capsys, config, "billing", "leave", "--workspace", str(workspace_id))
    assert code == 0 and "pc-0" in out and "nothing changed: add --yes" in out
    code, out, _ = cli(capsys, config, "billing", "leave", "--workspace", str(workspace_id), "--yes", "--json")
    assert code == 0 and json.loads(out)["confirmed"] is True
    code, _, err = cli(capsys, config, "billing", "leave", "--workspace", str(workspace_id), "--yes")
    assert code == 2 and "nothing to leave" in err

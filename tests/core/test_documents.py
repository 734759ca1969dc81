"""S5 and M7 documents: bill and consolidated CSV/PDF, the device usage report."""

from __future__ import annotations

import csv
import io
from datetime import UTC, date, datetime
from decimal import Decimal

from pypdf import PdfReader
from sqlalchemy import select

from gateway.core.access import system_principal
from gateway.core.billing import associations, lifecycle, plans, reports, run, subscriptions
from gateway.core.billing.documents import csv as csv_docs
from gateway.core.billing.documents import format as fmt
from gateway.core.billing.documents import pdf as pdf_docs
from gateway.core.billing.rules import month_period
from gateway.core.db import transaction
from gateway.core.models import Bill, Customer, Device, DeviceActivity, Partner, Workspace
from gateway.core.settings import BillingSettings, MailSettings

UTC = UTC
T0 = datetime(2026, 1, 1, tzinfo=UTC)
MAIL = MailSettings(host="127.0.0.1", from_address="billing@msp.example")


def pdf_text(data: bytes) -> str:
    assert data.startswith(b"%PDF-")
    return "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(data)).pages)


def csv_rows(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode("utf-8"))))


def world(db):
    """Two months of bills for one customer: March with a charge and a discount, April with a price change."""
    with transaction(db) as s:
        p = Partner(name="Northwind IT", email="owner@northwind.example", created_at=T0)
        s.add(p)
        s.flush()
        c = Customer(partner_id=p.id, name="=Acme GmbH", timezone="Europe/Berlin", created_at=T0)
        s.add(c)
        s.flush()
        w = Workspace(customer_id=c.id, name="Main", created_at=T0)
        s.add(w)
        s.flush()
        admin = system_principal(p.id, "test")
        plan = plans.create_plan(s, admin, name="Managed Endpoint", price_per_device="12.50", currency="EUR", now=T0)
        associations.associate(s, admin, plan_id=plan.id, customer_ids=[c.id], cycle="monthly", starts_on=date(2026, 3, 1),
                               due_days=14, email="ap@acme.example", mail=MAIL, now=T0)
        for i in range(3):
            d = Device(connection="rmm", external_id=f"d{i}", org_external_id="o", workspace_id=w.id,
                       hostname=f"pc-{i}", first_seen_at=T0, updated_at=T0)
            s.add(d)
            s.flush()
            s.add_all([DeviceActivity(device_id=d.id, day=date(2026, 3, 5)), DeviceActivity(device_id=d.id, day=date(2026, 4, 5))])
        lifecycle.add_adjustment(s, admin, customer_id=c.id, kind="charge", description="On-site visit, 2 h", amount="150",
                                 currency="EUR", now=T0)
        lifecycle.add_adjustment(s, admin, customer_id=c.id, kind="discount", description="Loyalty", amount="10",
                                 currency="EUR", now=T0)
    with transaction(db) as s:
        run.run_billing(s, now=datetime(2026, 4, 1, 6, tzinfo=UTC), billing=BillingSettings())
        plans.change_price(s, admin, plan.id, price_per_device="15.00", effective_from=date(2026, 4, 16),
                           now=datetime(2026, 4, 16, tzinfo=UTC))
    with transaction(db) as s:
        run.run_billing(s, now=datetime(2026, 5, 1, 6, tzinfo=UTC), billing=BillingSettings())
    with transaction(db) as s:  # a second run changes nothing
        assert run.run_billing(s, now=datetime(2026, 5, 1, 6, tzinfo=UTC), billing=BillingSettings()).drafts == []
    return p.id, c.id


def load(db, partner_id, customer_id):
    s = db()
    admin = system_principal(partner_id, "test")
    customer, bills = lifecycle.customer_bills(s, admin, customer_id)
    return s, s.get(Partner, partner_id), customer, bills


def test_s5_single_bill_csv_has_one_row_per_line_and_the_total(db):
    s, partner, customer, (march, april) = load(db, *world(db))
    rows = csv_rows(csv_docs.bill_csv(march, customer))
    assert [(r["line_kind"], r["description"][:14], r["quantity"], r["unit_price"], r["amount"]) for r in rows] == [
        ("devices", "Service plan M", "3", "12.5", "37.50"),
        ("charge", "On-site visit,", "1", "150", "150.00"),
        ("discount", "Loyalty", "1", "-10", "-10.00"),
    ]
    assert {r["bill_total"] for r in rows} == {"177.50"}
    assert {r["bill_number"] for r in rows} == {march.number}
    assert rows[0]["customer"] == "'=Acme GmbH"  # a spreadsheet must not run it as a formula
    assert (rows[0]["period_start"], rows[0]["period_end"], rows[0]["due_on"]) == ("2026-03-01", "2026-03-31", "2026-04-15")
    s.close()


def test_s5_consolidated_csv_holds_every_bill_of_the_customer(db):
    s, partner, customer, bills = load(db, *world(db))
    rows = csv_rows(csv_docs.consolidated_csv(customer, bills))
    assert [r["bill_number"] for r in rows] == [bills[0].number] * 3 + [bills[1].number] * 2
    april = [r for r in rows if r["bill_number"] == bills[1].number]
    # S7: both parts of April, at the old and the new price.
    assert [r["amount"] for r in april] == ["18.75", "22.50"]
    assert {r["bill_total"] for r in april} == {"41.25"}
    s.close()


def test_s5_bill_pdf_is_a_readable_invoice(db):
    s, partner, customer, (march, april) = load(db, *world(db))
    text = pdf_text(pdf_docs.bill_pdf(march, customer, partner))
    for expected in (
        f"Invoice {march.number}", "Northwind IT", "=Acme GmbH", "2026-03-01 to 2026-03-31", "Europe/Berlin",
        "Due date:", "2026-04-15", "On-site visit, 2 h", "150.00", "-10.00", "Total: 177.50 EUR", "Devices:",
    ):
        assert expected in text, expected
    s.close()


def test_s5_consolidated_pdf_lists_all_bills_then_each_bill(db):
    s, partner, customer, (march, april) = load(db, *world(db))
    reader = PdfReader(io.BytesIO(pdf_docs.consolidated_pdf(customer, partner, [march, april])))
    summary = reader.pages[0].extract_text()
    assert "Consolidated bill: =Acme GmbH" in summary
    assert march.number in summary and april.number in summary
    assert "Outstanding: 218.75 EUR" in summary
    rest = "\n".join(page.extract_text() for page in reader.pages[1:])
    assert f"Invoice {march.number}" in rest and f"Invoice {april.number}" in rest and "(15/30 days)" in rest
    s.close()


def test_s5_pdf_prints_characters_outside_latin1_as_question_marks(db):
    s, partner, customer, (march, _) = load(db, *world(db))
    customer.name = "Żabka Sp. z o.o. – Kraków"
    text = pdf_text(pdf_docs.bill_pdf(march, customer, partner))
    assert "?abka Sp. z o.o. ? Kraków" in text
    s.rollback()
    s.close()


def test_m7_usage_csv_has_one_row_per_billed_device(db):
    with transaction(db) as s:
        p = Partner(name="P", created_at=T0)
        s.add(p)
        s.flush()
        c = Customer(partner_id=p.id, name="Acme", created_at=T0)
        s.add(c)
        s.flush()
        w = Workspace(customer_id=c.id, name="HQ", created_at=T0)
        s.add(w)
        s.flush()
        admin = system_principal(p.id, "test")
        subscriptions.enable_monthly(s, admin, settings=BillingSettings(), now=datetime(2026, 2, 3, tzinfo=UTC))
        subscriptions.join_monthly(s, admin, workspace_id=w.id, max_devices=10, now=datetime(2026, 2, 3, tzinfo=UTC))
        for name, days in (("a", [1, 2, 3]), ("b", [31]), ("idle", [])):
            d = Device(connection="ninja", external_id=name, org_external_id="o", workspace_id=w.id,
                       hostname=f"{name}.local", first_seen_at=T0, updated_at=T0)
            s.add(d)
            s.flush()
            s.add_all(DeviceActivity(device_id=d.id, day=date(2026, 3, day)) for day in days)
    with transaction(db) as s:
        run.run_billing(s, now=datetime(2026, 4, 1, 1, tzinfo=UTC), billing=BillingSettings())
    with db() as s:
        number = s.scalar(select(Bill.number).where(Bill.kind == "monthly"))
        rows = csv_rows(csv_docs.usage_csv(reports.usage_rows(s, admin, month_period(2026, 3))))
    assert rows == [
        {"bill_number": number, "customer": "Acme", "workspace": "HQ", "connection": "ninja", "device_id": "a",
         "hostname": "a.local", "period_start": "2026-03-01", "period_end": "2026-03-31", "days_active": "3"},
        {"bill_number": number, "customer": "Acme", "workspace": "HQ", "connection": "ninja", "device_id": "b",
         "hostname": "b.local", "period_start": "2026-03-01", "period_end": "2026-03-31", "days_active": "1"},
    ]


def test_money_is_shown_with_the_currencys_minor_digits():
    assert fmt.money(Decimal("14.5200"), "USD") == "14.52"
    assert fmt.money(Decimal("1250.0000"), "JPY") == "1250"
    assert fmt.money(Decimal("1.0010"), "KWD") == "1.001"

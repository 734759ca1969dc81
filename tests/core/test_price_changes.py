"""S7/S4: a plan's price change takes its day in each customer's zone and never re-prices a billed cycle.

Issue 13: at 31 March 10:30 UTC a Pacific/Kiritimati (UTC+14) customer's March is already
over and billed; a change "from today" was refused for the whole plan. Billing tests end
with a second run that changes nothing.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

from sqlalchemy import select

from gateway.core.access import system_principal
from gateway.core.billing import associations, plans
from gateway.core.billing import run as billing_run
from gateway.core.db import transaction
from gateway.core.models import Bill, BillingCycle, Customer, Device, DeviceActivity, Partner, Workspace
from gateway.core.settings import BillingSettings, MailSettings

T0 = datetime(2026, 1, 1, tzinfo=UTC)
BILLING = BillingSettings()
MAIL = MailSettings(host="127.0.0.1", port=2525, from_address="billing@msp.example", starttls=False)
LAST_DAY = datetime(2026, 3, 31, 10, 30, tzinfo=UTC)  # 1 April, 00:30 in Kiritimati


def setup(db):
    """One plan at 3.00 for two customers, Kiritimati and UTC, each with one device active every month."""
    with transaction(db) as s:
        partner = Partner(name="MSP", invoice_prefix="INV", email="owner@msp.example", created_at=T0)
        s.add(partner)
        s.flush()
        me = system_principal(partner.id, "test:admin")
        plan = plans.create_plan(s, me, name="Managed", price_per_device="3.00", currency="USD", now=T0)
        ids = {}
        for name, tz in (("Kiritimati", "Pacific/Kiritimati"), ("London", "UTC")):
            customer = Customer(partner_id=partner.id, name=name, timezone=tz, created_at=T0)
            s.add(customer)
            s.flush()
            workspace = Workspace(customer_id=customer.id, name="Main", created_at=T0)
            s.add(workspace)
            s.flush()
            device = Device(connection="rmm", external_id=name, org_external_id="o", workspace_id=workspace.id,
                            hostname=name.lower(), first_seen_at=T0, updated_at=T0)
            s.add(device)
            s.flush()
            s.add_all(DeviceActivity(device_id=device.id, day=date(2026, m, 15)) for m in (3, 4))
            associations.associate(s, me, plan_id=plan.id, customer_ids=[customer.id], cycle=BillingCycle.MONTHLY,
                                   starts_on=date(2026, 3, 1), due_days=14, email=f"ap@{name}.example", mail=MAIL,
                                   now=T0)
            ids[name] = customer.id
        return me, plan.id, ids


def run(db, now: datetime) -> list[int]:
    with transaction(db) as s:
        return billing_run.run_billing(s, now=now, billing=BILLING).bill_ids


def totals(db, customer_id: int) -> list[tuple[date, Decimal]]:
    with db() as s:
        return [(b.period_start, b.total) for b in s.scalars(
            select(Bill).where(Bill.customer_id == customer_id).order_by(Bill.period_start))]


def test_s7_s4_a_change_from_today_on_the_last_day_of_the_month_is_taken_in_each_customers_zone(db):
    me, plan_id, ids = setup(db)
    run(db, LAST_DAY)
    assert totals(db, ids["Kiritimati"]) == [(date(2026, 3, 1), Decimal("3.00"))]  # its March is over and billed
    with transaction(db) as s:
        change = plans.change_price(s, me, plan_id, price_per_device="6.20", now=LAST_DAY)
    days = {c.customer: (c.effective_from, c.deferred) for c in change.customers}
    assert days == {"Kiritimati": (date(2026, 4, 1), False), "London": (date(2026, 3, 31), False)}
    run(db, datetime(2026, 4, 1, 1, tzinfo=UTC))
    run(db, datetime(2026, 5, 1, 1, tzinfo=UTC))
    assert totals(db, ids["Kiritimati"]) == [(date(2026, 3, 1), Decimal("3.00")), (date(2026, 4, 1), Decimal("6.20"))]
    # London: 30 days at 3.00 and its last day, 31 March, at 6.20; April at 6.20.
    assert totals(db, ids["London"]) == [(date(2026, 3, 1), Decimal("3.10")), (date(2026, 4, 1), Decimal("6.20"))]
    assert run(db, datetime(2026, 5, 1, 2, tzinfo=UTC)) == []


def test_s7_a_change_reaching_into_one_customers_billed_cycle_applies_to_it_from_its_next_cycle(db):
    me, plan_id, ids = setup(db)
    run(db, LAST_DAY)
    with transaction(db) as s:  # 31 March for everyone: billed for Kiritimati, not yet for London
        change = plans.change_price(s, me, plan_id, price_per_device="6.20", effective_from=date(2026, 3, 31),
                                    now=LAST_DAY)
    assert [(c.customer, c.effective_from, c.billed_through) for c in change.deferred] == [
        ("Kiritimati", date(2026, 4, 1), date(2026, 3, 31))]
    assert change.effective_from == date(2026, 3, 31)
    run(db, datetime(2026, 4, 1, 1, tzinfo=UTC))
    run(db, datetime(2026, 5, 1, 1, tzinfo=UTC))
    assert totals(db, ids["Kiritimati"]) == [(date(2026, 3, 1), Decimal("3.00")), (date(2026, 4, 1), Decimal("6.20"))]
    assert totals(db, ids["London"]) == [(date(2026, 3, 1), Decimal("3.10")), (date(2026, 4, 1), Decimal("6.20"))]
    with transaction(db) as s:  # changed again the same day: the customers' own days follow
        again = plans.change_price(s, me, plan_id, price_per_device="7.00", effective_from=date(2026, 3, 31),
                                   now=datetime(2026, 5, 1, 2, tzinfo=UTC))
    assert {c.customer: c.effective_from for c in again.customers} == {
        "Kiritimati": date(2026, 5, 1), "London": date(2026, 5, 1)}
    assert run(db, datetime(2026, 5, 1, 3, tzinfo=UTC)) == []

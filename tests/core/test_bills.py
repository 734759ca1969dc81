"""Billing services over the store (M1-M8, S1-S8, G2): runs, bills, plans, associations, monthly billing.

Every test that runs billing ends by running it again and asserting that nothing changed.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError

from gateway import BillLineDoc, hookimpl
from gateway.core import store
from gateway.core.access import Principal, system_principal
from gateway.core.billing import associations, lifecycle, plans, reports, subscriptions
from gateway.core.billing import deliveries as billing_deliveries
from gateway.core.billing import run as billing_run
from gateway.core.billing.documents import csv as csv_docs
from gateway.core.billing.rules import Period, local_day, month_period
from gateway.core.db import transaction
from gateway.core.models import (
    Adjustment,
    Bill,
    BillDevice,
    BillingCycle,
    BillKind,
    BillLine,
    BillStatus,
    ConnectionState,
    Customer,
    Delivery,
    DeliveryStatus,
    Device,
    DeviceActivity,
    Edition,
    ExternalMapping,
    JobRun,
    License,
    LicenseType,
    MappingKind,
    MonthlySubscription,
    Order,
    Partner,
    User,
    UserCustomer,
    UserRole,
    Workspace,
)
from gateway.core.settings import BillingSettings, MailSettings
from gateway.errors import Conflict, DomainError, NotFound
from gateway.plugins import get_plugin_manager
from gateway.sync.jobs import bill_built_lines

UTC = UTC
D = Decimal
T0 = datetime(2026, 1, 1, tzinfo=UTC)
BILLING = BillingSettings()
MAIL = MailSettings(host="127.0.0.1", port=2525, from_address="billing@msp.example", starttls=False)


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# --- building a world -------------------------------------------------------------------------


def partner(s, name="MSP One", prefix="INV", email="owner@msp.example") -> Partner:
    p = Partner(name=name, invoice_prefix=prefix, email=email, created_at=T0)
    s.add(p)
    s.flush()
    return p


def customer(s, p: Partner, name: str, tz: str = "UTC") -> Customer:
    c = Customer(partner_id=p.id, name=name, timezone=tz, billing_email=f"{name.lower()}@example.com", created_at=T0)
    s.add(c)
    s.flush()
    return c


def workspace(s, c: Customer, name: str = "Main", since: date | None = None) -> Workspace:
    w = Workspace(customer_id=c.id, name=name, monthly_billing_since=since, created_at=T0)
    s.add(w)
    s.flush()
    return w


def device(s, w: Workspace, external_id: str, days: Iterable[date] = (), contacts: Iterable[datetime] = ()) -> Device:
    """A device and its activity; contacts are recorded as the customer-local day they fall on (S4)."""
    d = Device(connection="rmm", external_id=external_id, org_external_id="org", workspace_id=w.id,
               hostname=f"host-{external_id}", first_seen_at=T0, updated_at=T0)
    s.add(d)
    s.flush()
    tz = s.get(Customer, w.customer_id).timezone
    local = set(days) | {local_day(contact, tz) for contact in contacts}
    s.add_all(DeviceActivity(device_id=d.id, day=day) for day in sorted(local))
    s.flush()
    return d


def every_day(period: Period) -> list[date]:
    return [period.start + timedelta(days=i) for i in range(period.days)]


def admin(p: Partner) -> Principal:
    return system_principal(p.id, "test:admin")


def run(db, now: datetime, period: Period | None = None, **kwargs) -> billing_run.BillingRun:
    with transaction(db) as s:
        return billing_run.run_billing(s, now=now, billing=BILLING, period=period, **kwargs)


def snapshot(db) -> dict[str, list]:
    tables = [Bill, BillLine, BillDevice, Delivery, Adjustment, JobRun, Partner, MonthlySubscription, Workspace]
    with db() as s:
        return {
            model.__tablename__: sorted((tuple(row) for row in s.execute(select(*model.__table__.columns))), key=repr)
            for model in tables
        }


def assert_second_run_changes_nothing(db, now: datetime, period: Period | None = None) -> None:
    before = snapshot(db)
    again = run(db, now, period)
    assert again.drafts == [] and again.bill_ids == []
    assert snapshot(db) == before


def bills_of(db, **where) -> list[Bill]:
    with db() as s:
        stmt = select(Bill).order_by(Bill.period_start, Bill.id)
        for name, value in where.items():
            stmt = stmt.where(getattr(Bill, name) == value)
        result = list(s.scalars(stmt))
        for bill in result:
            _ = bill.lines
        return result


def monthly_setup(db, *, enabled: datetime, tz: str = "UTC", sub_tz: str = "UTC"):
    """A partner with monthly billing enabled at ``enabled`` and one customer whose workspace joined."""
    with transaction(db) as s:
        p = partner(s)
        c = customer(s, p, "Acme", tz)
        w = workspace(s, c)
    with transaction(db) as s:
        subscriptions.enable_monthly(s, admin(p), settings=BILLING, now=enabled, tz=sub_tz)
        subscriptions.join_monthly(s, admin(p), workspace_id=w.id, max_devices=100, now=enabled)
    return p, c, w


def plan_setup(db, *, cycle=BillingCycle.MONTHLY, starts_on=date(2026, 1, 1), tz="UTC", price="10.00",
               currency="USD", due_days=14):
    with transaction(db) as s:
        p = partner(s)
        c = customer(s, p, "Acme", tz)
        w = workspace(s, c)
        plan = plans.create_plan(s, admin(p), name="Managed", price_per_device=price, currency=currency, now=T0)
        (assoc,) = associations.associate(s, admin(p), plan_id=plan.id, customer_ids=[c.id], cycle=cycle, starts_on=starts_on,
                                          due_days=due_days, email="ap@acme.example", mail=MAIL, now=T0)
    return p, c, w, plan, assoc


# --- M1, M2, M4: enabling monthly billing ------------------------------------------------------


def test_m1_enabling_issues_a_ten_dollar_activation_bill_for_the_rest_of_the_month(db):
    with transaction(db) as s:
        p = partner(s)
    with transaction(db) as s:
        sub, bill = subscriptions.enable_monthly(s, admin(p), settings=BILLING, now=at(2026, 3, 10, 9))
    (bill,) = bills_of(db, kind=BillKind.ACTIVATION)
    assert bill.total == D("10.00") and bill.currency == "USD"
    assert (bill.period_start, bill.period_end) == (date(2026, 3, 10), date(2026, 3, 31))
    assert bill.status == BillStatus.ISSUED and bill.number == "INV-2026-03-000001"
    assert [line.amount for line in bill.lines] == [D("10.00")] and "not prorated" in bill.lines[0].description
    with db() as s:
        assert s.get(Customer, bill.customer_id).name == "MSP One (partner account)"
        assert s.scalar(select(func.count()).select_from(Order)) == 1  # L12: the subscription purchase
    with transaction(db) as s, pytest.raises(Conflict, match="already enabled"):
        subscriptions.enable_monthly(s, admin(p), settings=BILLING, now=at(2026, 3, 11))


def test_m2_enabling_changes_no_license_or_workspace(db):
    with transaction(db) as s:
        p = partner(s)
        c = customer(s, p, "Acme")
        w = workspace(s, c)
        edition = Edition(code="bs", name="Business Security", license_type=LicenseType.COMPUTER)
        s.add(edition)
        s.flush()
        s.add(License(key="K-1", partner_id=p.id, edition_id=edition.id, license_type=LicenseType.COMPUTER, seats=5,
                      term_months=12, purchased_at=T0, workspace_id=w.id))
    def state():
        with db() as s:
            return [tuple(r) for r in s.execute(select(*Workspace.__table__.columns))], \
                   [tuple(r) for r in s.execute(select(*License.__table__.columns))]
    before = state()
    with transaction(db) as s:
        subscriptions.enable_monthly(s, admin(p), settings=BILLING, now=at(2026, 3, 10))
    assert state() == before
    # Workspaces join one by one, with an edition and a maximum device count.
    with transaction(db) as s:
        joined = subscriptions.join_monthly(s, admin(p), workspace_id=w.id, max_devices=25, edition_id=edition.id,
                                            now=at(2026, 3, 12)).workspace
        assert (joined.monthly_billing_since, joined.max_devices, joined.edition_id) == (date(2026, 3, 12), 25, edition.id)


def test_m1_m4_enabled_on_the_last_day_of_the_month_first_charge_is_for_the_next_month(db):
    p, c, w = monthly_setup(db, enabled=at(2026, 3, 31, 22))
    with transaction(db) as s:
        device(s, w, "a", days=[date(2026, 3, 31)] + every_day(month_period(2026, 4)))
    assert run(db, at(2026, 4, 1, 0, 5)).drafts == []  # March: covered by the activation
    assert run(db, at(2026, 4, 15), period=month_period(2026, 3)).drafts == []
    result = run(db, at(2026, 5, 1, 0, 5))
    (bill,) = bills_of(db, kind=BillKind.MONTHLY)
    assert result.bill_ids == [bill.id]
    assert (bill.period_start, bill.period_end, bill.device_count) == (date(2026, 4, 1), date(2026, 4, 30), 1)
    assert bill.total == D("2.50") and bill.issued_on == date(2026, 5, 1)
    assert_second_run_changes_nothing(db, at(2026, 5, 1, 0, 5))


def test_m1_m4_the_subscriptions_zone_decides_the_enabling_month(db):
    # 12:00 UTC on 31 March is already 1 April in Auckland: the activation covers April, May is charged first.
    p, c, w = monthly_setup(db, enabled=at(2026, 3, 31, 12), sub_tz="Pacific/Auckland")
    (activation,) = bills_of(db, kind=BillKind.ACTIVATION)
    assert (activation.period_start, activation.period_end) == (date(2026, 4, 1), date(2026, 4, 30))
    with transaction(db) as s:
        device(s, w, "a", days=every_day(month_period(2026, 4)) + every_day(month_period(2026, 5)))
    assert run(db, at(2026, 5, 1, 1)).drafts == []
    run(db, at(2026, 6, 1, 1))
    assert [b.period_start for b in bills_of(db, kind=BillKind.MONTHLY)] == [date(2026, 5, 1)]
    assert_second_run_changes_nothing(db, at(2026, 6, 1, 1))


# --- M5 + S4: which devices count, in the customer's time zone ---------------------------------


def test_m5_s4_devices_active_only_on_the_first_or_last_local_day_in_far_zones(db):
    with transaction(db) as s:
        p = partner(s)
        east = customer(s, p, "East", "Pacific/Kiritimati")  # UTC+14
        west = customer(s, p, "West", "Pacific/Pago_Pago")  # UTC-11
        ws_east = workspace(s, east, since=date(2026, 1, 1))
        ws_west = workspace(s, west, since=date(2026, 1, 1))
        # East: 10:30 UTC on 28 Feb is 1 March locally (first day); 09:30 UTC on 31 March is its last day;
        # 10:30 UTC on 31 March is already April there.
        device(s, ws_east, "e-first", contacts=[at(2026, 2, 28, 10, 30)])
        device(s, ws_east, "e-last", contacts=[at(2026, 3, 31, 9, 30)])
        device(s, ws_east, "e-april", contacts=[at(2026, 3, 31, 10, 30)])
        # West: 10:59 UTC on 1 April is still 31 March there; 11:00 UTC on 1 March is its first day.
        device(s, ws_west, "w-last", contacts=[at(2026, 4, 1, 10, 59)])
        device(s, ws_west, "w-first", contacts=[at(2026, 3, 1, 11, 0)])
        device(s, ws_west, "w-february", contacts=[at(2026, 3, 1, 10, 59)])
        device(s, ws_west, "w-idle")
        s.add(MonthlySubscription(partner_id=p.id, enabled_at=at(2026, 2, 10), timezone="UTC",
                                  price_per_device=D("2.50"), currency="USD"))
    # 10:00 UTC on 31 March is midnight on Kiritimati: East's March is over, West's is not.
    run(db, at(2026, 3, 31, 10, 0))
    (east_bill,) = bills_of(db, kind=BillKind.MONTHLY)
    assert east_bill.customer_id == east.id and east_bill.device_count == 2
    assert east_bill.issued_on == date(2026, 4, 1)
    assert run(db, at(2026, 4, 1, 10, 59)).drafts == []  # still 31 March in Pago Pago
    run(db, at(2026, 4, 1, 11, 0))
    west_bill = bills_of(db, customer_id=west.id)[0]
    assert west_bill.device_count == 2 and west_bill.total == D("5.00")
    with db() as s:
        billed = set(s.scalars(select(BillDevice.external_id)))
    assert billed == {"e-first", "e-last", "w-last", "w-first"}
    assert_second_run_changes_nothing(db, at(2026, 4, 1, 11, 0))


def test_m7_deleting_a_device_keeps_its_usage_rows_and_report_as_billed(db):
    p, c, w = monthly_setup(db, enabled=at(2026, 2, 10))
    with transaction(db) as s:
        gone = device(s, w, "gone", days=every_day(month_period(2026, 3))[:3])
        stays = device(s, w, "stays", days=[date(2026, 3, 31)])
    run(db, at(2026, 4, 1, 1))
    with db() as s:
        before = reports.usage_rows(s, admin(p), month_period(2026, 3))
    with transaction(db) as s:  # after the bill: one device is deleted, the other and its workspace renamed
        s.execute(delete(Device).where(Device.id == gone.id))
        s.get(Device, stays.id).hostname = "renamed-host"
        s.get(Workspace, w.id).name = "Renamed"
    with db() as s:
        assert s.get(Device, gone.id) is None
        assert s.scalars(select(DeviceActivity).where(DeviceActivity.device_id == gone.id)).all() == []
        stored = s.execute(select(BillDevice.device_id, BillDevice.connection, BillDevice.external_id,
                                  BillDevice.hostname, BillDevice.workspace, BillDevice.days_active)
                           .order_by(BillDevice.device_id)).all()
        after = reports.usage_rows(s, admin(p), month_period(2026, 3))
    assert stored == [
        (gone.id, "rmm", "gone", "host-gone", "Main", 3), (stays.id, "rmm", "stays", "host-stays", "Main", 1)]
    assert after == before
    assert [(r.connection, r.device_id, r.hostname, r.workspace, r.days_active) for r in after] == [
        ("rmm", "gone", "host-gone", "Main", 3), ("rmm", "stays", "host-stays", "Main", 1)]
    report = csv_docs.usage_csv(after).decode()
    assert "gone,host-gone" in report and "renamed" not in report.lower()
    assert_second_run_changes_nothing(db, at(2026, 4, 1, 1))


def test_m5_m7_a_run_over_many_customers_bills_exactly_what_a_run_over_few_does(db, monkeypatch):
    """Past store.IN_LIMIT customers a run reads activity for all at once (on PostgreSQL: per device first)."""
    p, acme, w = monthly_setup(db, enabled=at(2026, 2, 10))
    with transaction(db) as s:
        device(s, w, "a1", days=every_day(month_period(2026, 3)))
        device(s, w, "a2", days=[date(2026, 3, 9)])
        device(s, w, "a-idle")
        beta = customer(s, p, "Beta", "Pacific/Auckland")
        late = workspace(s, beta, since=date(2026, 3, 20))  # joined mid-month: only its days on the plan count
        device(s, late, "b-before", days=[date(2026, 3, 5)])
        device(s, late, "b-after", days=[date(2026, 3, 5), date(2026, 3, 21), date(2026, 3, 22)])
        gamma = customer(s, p, "Gamma")
        plan = plans.create_plan(s, admin(p), name="Managed", price_per_device="7", currency="EUR", now=T0)
        associations.associate(s, admin(p), plan_id=plan.id, customer_ids=[gamma.id], cycle="monthly",
                               starts_on=date(2026, 3, 1), due_days=10, email="ap@gamma.example", mail=MAIL, now=T0)
        device(s, workspace(s, gamma), "g1", days=[date(2026, 3, 30)])

    def drafts() -> list[tuple]:
        found = run(db, at(2026, 4, 2), dry_run=True).drafts
        return [(d.customer_name, d.kind, sorted(d.devices.values()), d.total) for d in found]

    few = drafts()
    monkeypatch.setattr(store, "IN_LIMIT", 0)
    assert drafts() == few == [
        ("Acme", BillKind.MONTHLY, [1, 31], D("5.00")),
        ("Beta", BillKind.MONTHLY, [2], D("2.50")),
        ("Gamma", BillKind.PLAN, [1], D("7.00")),
    ]
    billed = run(db, at(2026, 4, 2))
    with db() as s:
        rows = s.execute(select(Bill.customer_id, BillDevice.external_id, BillDevice.hostname, BillDevice.workspace,
                                BillDevice.days_active)
                         .join(BillDevice, BillDevice.bill_id == Bill.id).order_by(BillDevice.external_id)).all()
    assert len(billed.bill_ids) == 3 and rows == [
        (acme.id, "a1", "host-a1", "Main", 31), (acme.id, "a2", "host-a2", "Main", 1),
        (beta.id, "b-after", "host-b-after", "Main", 2), (gamma.id, "g1", "host-g1", "Main", 1),
    ]
    assert_second_run_changes_nothing(db, at(2026, 4, 2))


def test_m5_activity_before_the_workspace_joined_is_not_billed(db):
    p, c, w = monthly_setup(db, enabled=at(2026, 2, 10))
    with transaction(db) as s:
        late = workspace(s, c, "Late", since=date(2026, 3, 20))
        device(s, late, "before", days=[date(2026, 3, 5)])
        device(s, late, "after", days=[date(2026, 3, 5), date(2026, 3, 25)])
        device(s, w, "main", days=[date(2026, 3, 1), date(2026, 3, 2)])
    run(db, at(2026, 4, 2))
    (bill,) = bills_of(db, kind=BillKind.MONTHLY)
    assert bill.device_count == 2
    with db() as s:
        days = dict(s.execute(select(BillDevice.external_id, BillDevice.days_active)).all())
    assert days == {"after": 1, "main": 2}
    assert_second_run_changes_nothing(db, at(2026, 4, 2))


def test_m7_usage_report_has_one_row_per_billed_device_with_its_days(db):
    p, c, w = monthly_setup(db, enabled=at(2026, 2, 10))
    with transaction(db) as s:
        device(s, w, "a", days=every_day(month_period(2026, 3))[:10])
        device(s, w, "b", days=[date(2026, 3, 31)])
        device(s, w, "idle")
    run(db, at(2026, 4, 1, 1))
    with db() as s:
        rows = reports.usage_rows(s, admin(p), month_period(2026, 3))
        history = reports.billing_history(s, admin(p))
    assert [(r.device_id, r.days_active, r.customer) for r in rows] == [("a", 10, "Acme"), ("b", 1, "Acme")]
    assert [(h.month, h.kind, h.devices, h.total) for h in history] == [
        ("2026-03", "monthly", 2, D("5.00")), ("2026-02", "activation", 0, D("10.00"))
    ]
    assert_second_run_changes_nothing(db, at(2026, 4, 1, 1))


def test_m6_each_run_queues_one_billing_report_per_partner_and_month(db):
    p, c, w = monthly_setup(db, enabled=at(2026, 2, 10))
    with transaction(db) as s:
        device(s, w, "a", days=[date(2026, 3, 3)])
    result = run(db, at(2026, 4, 1, 1))
    assert result.reports == [(p.id, month_period(2026, 3))]
    with db() as s:
        jobs = [(j.job, j.period, j.finished_at) for j in s.scalars(select(JobRun))]
    assert jobs == [(f"billing-report:{p.id}", "2026-03", None)]
    assert_second_run_changes_nothing(db, at(2026, 4, 1, 1))


# --- M8: cancellation and reactivation ---------------------------------------------------------


def test_m8_cancelling_lists_affected_workspaces_and_devices_and_waits_for_confirmation(db):
    p, c, w = monthly_setup(db, enabled=at(2026, 2, 10))
    with transaction(db) as s:
        device(s, w, "a")
        device(s, w, "b")
        workspace(s, customer(s, p, "Licensed"), "Licensed")  # not on monthly billing: not affected
    before = snapshot(db)
    with transaction(db) as s:
        preview = subscriptions.cancel_monthly(s, admin(p), now=at(2026, 3, 10))
    assert preview.offered_end_dates == [date(2026, 3, 31), date(2026, 4, 30), date(2026, 5, 31), date(2026, 6, 30)]
    assert [(a.workspace, a.customer, a.devices) for a in preview.workspaces] == [("Main", "Acme", ["host-a", "host-b"])]
    assert not preview.confirmed and preview.device_count == 2
    with transaction(db) as s:
        unconfirmed = subscriptions.cancel_monthly(s, admin(p), now=at(2026, 3, 10), ends_on=date(2026, 4, 30))
    assert not unconfirmed.confirmed
    assert snapshot(db) == before
    with transaction(db) as s, pytest.raises(DomainError, match="not an offered end date"):
        subscriptions.cancel_monthly(s, admin(p), now=at(2026, 3, 10), ends_on=date(2026, 4, 15), confirm=True)


@pytest.mark.parametrize("choice", [0, 1, 2, 3])
def test_m8_cancel_with_each_offered_end_date_bills_up_to_that_month(db, choice):
    p, c, w = monthly_setup(db, enabled=at(2026, 2, 10))
    with transaction(db) as s:
        device(s, w, "a", days=[date(2026, m, 15) for m in range(3, 10)])
    with transaction(db) as s:
        offered = subscriptions.cancel_monthly(s, admin(p), now=at(2026, 3, 10)).offered_end_dates
        done = subscriptions.cancel_monthly(s, admin(p), now=at(2026, 3, 10), ends_on=offered[choice], confirm=True)
    assert done.confirmed
    with db() as s:
        assert s.get(Workspace, w.id).monthly_billing_until == offered[choice]
    for month in range(4, 11):
        run(db, at(2026, month, 1, 1))
    billed = [b.period_start.month for b in bills_of(db, kind=BillKind.MONTHLY)]
    assert billed == list(range(3, 3 + choice + 1))
    with transaction(db) as s, pytest.raises(Conflict):  # after the final billing date: no reactivation
        subscriptions.reactivate_monthly(s, admin(p), now=at(2026, 10, 1))
    assert_second_run_changes_nothing(db, at(2026, 10, 1, 1))


def test_m8_enabling_again_bills_the_last_month_first_and_waits_for_far_zones(db):
    """Enabling anew restarts the first full month (M4); the ended subscription's last month must be billed
    first, and cannot be while a customer's local March is not over (Pago Pago is UTC-11)."""
    p, c, w = monthly_setup(db, enabled=at(2026, 1, 10), tz="Pacific/Pago_Pago")
    with transaction(db) as s:
        device(s, w, "a", days=[date(2026, 3, 30), date(2026, 3, 31)])
    with transaction(db) as s:
        subscriptions.cancel_monthly(s, admin(p), now=at(2026, 3, 10), ends_on=date(2026, 3, 31), confirm=True)
    with transaction(db) as s, pytest.raises(Conflict, match=r"last month is not over yet for customers in "
                                            r"Pacific/Pago_Pago.*from 2026-04-01T11:00:00\+00:00"):
        subscriptions.enable_monthly(s, admin(p), settings=BILLING, now=at(2026, 4, 1, 5))  # 31 March, 18:00 in Pago Pago
    assert bills_of(db, kind=BillKind.MONTHLY) == []  # the run of 1 April (UTC) found March not over there
    with transaction(db) as s:
        subscriptions.enable_monthly(s, admin(p), settings=BILLING, now=at(2026, 4, 1, 12))
        subscriptions.join_monthly(s, admin(p), workspace_id=w.id, max_devices=100, now=at(2026, 4, 1, 12))
    (march,) = bills_of(db, kind=BillKind.MONTHLY)
    assert (march.period_start, march.device_count, march.total) == (date(2026, 3, 1), 1, D("2.50"))
    assert [b.period_start for b in bills_of(db, kind=BillKind.ACTIVATION)] == [date(2026, 1, 10), date(2026, 4, 1)]
    assert_second_run_changes_nothing(db, at(2026, 4, 2, 12))


def test_m8_reactivation_before_the_final_billing_date_keeps_billing(db):
    p, c, w = monthly_setup(db, enabled=at(2026, 2, 10))
    with transaction(db) as s:
        device(s, w, "a", days=[date(2026, 3, 15), date(2026, 4, 15), date(2026, 5, 15)])
    with transaction(db) as s:
        subscriptions.cancel_monthly(s, admin(p), now=at(2026, 3, 10), ends_on=date(2026, 3, 31), confirm=True)
    with transaction(db) as s:  # the last moment: 23:59 on the end date
        sub = subscriptions.reactivate_monthly(s, admin(p), now=at(2026, 3, 31, 23, 59))
        assert sub.ends_on is None
    with db() as s:
        assert s.get(Workspace, w.id).monthly_billing_until is None
    for month in (4, 5, 6):
        run(db, at(2026, month, 1, 1))
    assert [b.period_start.month for b in bills_of(db, kind=BillKind.MONTHLY)] == [3, 4, 5]
    with transaction(db) as s:
        subscriptions.cancel_monthly(s, admin(p), now=at(2026, 6, 10), ends_on=date(2026, 6, 30), confirm=True)
    with transaction(db) as s, pytest.raises(Conflict, match="final billing date 2026-07-01 has been reached"):
        subscriptions.reactivate_monthly(s, admin(p), now=at(2026, 7, 1))
    assert_second_run_changes_nothing(db, at(2026, 7, 1, 1))


# --- S1, S2: plans and associations -----------------------------------------------------------


def test_s2_association_needs_mail_settings_first(db):
    with transaction(db) as s:
        p = partner(s)
        c = customer(s, p, "Acme")
        plan = plans.create_plan(s, admin(p), name="Managed", price_per_device="10", currency="usd", now=T0)
        assert plan.currency == "USD"
        with pytest.raises(DomainError, match=r"mail server settings are required.*\[mail\] host") as error:
            associations.associate(s, admin(p), plan_id=plan.id, customer_ids=[c.id], cycle="monthly",
                                   starts_on=date(2026, 1, 1), due_days=30, email="a@b.example", mail=MailSettings(), now=T0)
        assert error.value.code == "mail_not_configured"
        with pytest.raises(DomainError, match="not one of monthly, quarterly"):
            associations.associate(s, admin(p), plan_id=plan.id, customer_ids=[c.id], cycle="weekly",
                                   starts_on=date(2026, 1, 1), due_days=30, email="a@b.example", mail=MAIL, now=T0)
        with pytest.raises(DomainError, match="not an e-mail address"):
            associations.associate(s, admin(p), plan_id=plan.id, customer_ids=[c.id], cycle="monthly",
                                   starts_on=date(2026, 1, 1), due_days=30, email="nobody", mail=MAIL, now=T0)
        associations.associate(s, admin(p), plan_id=plan.id, customer_ids=[c.id], cycle="monthly",
                               starts_on=date(2026, 1, 1), due_days=30, email="a@b.example", mail=MAIL, now=T0)
        with pytest.raises(Conflict, match="already on plan"):
            associations.associate(s, admin(p), plan_id=plan.id, customer_ids=[c.id], cycle="monthly",
                                   starts_on=date(2026, 1, 1), due_days=30, email="a@b.example", mail=MAIL, now=T0)


def test_s1_plan_needs_a_name_a_price_and_a_currency(db):
    with transaction(db) as s:
        p = partner(s)
        with pytest.raises(DomainError, match="ISO 4217"):
            plans.create_plan(s, admin(p), name="X", price_per_device="1", currency="dollars", now=T0)
        with pytest.raises(DomainError, match="cannot be negative"):
            plans.create_plan(s, admin(p), name="X", price_per_device="-1", currency="USD", now=T0)
        with pytest.raises(DomainError, match="not a float"):
            plans.create_plan(s, admin(p), name="X", price_per_device=1.5, currency="USD", now=T0)
        plans.create_plan(s, admin(p), name="X", price_per_device="1", currency="USD", now=T0)
        with pytest.raises(Conflict, match="already exists"):
            plans.create_plan(s, admin(p), name="X", price_per_device="2", currency="USD", now=T0)


def test_s2_quarterly_association_starting_on_the_31st_is_billed_after_each_cycle(db):
    p, c, w, plan, assoc = plan_setup(db, cycle=BillingCycle.QUARTERLY, starts_on=date(2026, 1, 31))
    with transaction(db) as s:
        device(s, w, "a", days=[date(2026, 2, 1), date(2026, 5, 1)])
        device(s, w, "b", days=[date(2026, 4, 29), date(2026, 4, 30)])
    assert run(db, at(2026, 4, 29, 12)).drafts == []  # the cycle's last day
    run(db, at(2026, 4, 30, 0, 1))
    (first,) = bills_of(db)
    assert (first.period_start, first.period_end, first.device_count) == (date(2026, 1, 31), date(2026, 4, 29), 2)
    assert first.total == D("20.00") and first.due_on == date(2026, 5, 14) and first.email == "ap@acme.example"
    run(db, at(2026, 7, 31, 0, 1))
    second = bills_of(db)[1]
    assert (second.period_start, second.period_end, second.device_count) == (date(2026, 4, 30), date(2026, 7, 30), 2)
    assert_second_run_changes_nothing(db, at(2026, 7, 31, 0, 1))


def test_s2_yearly_association_starting_on_the_31st_with_explicit_period(db):
    p, c, w, plan, assoc = plan_setup(db, cycle=BillingCycle.YEARLY, starts_on=date(2025, 12, 31), price="120")
    with transaction(db) as s:
        device(s, w, "a", days=[date(2026, 6, 1)])
    assert run(db, at(2026, 12, 20), period=month_period(2026, 12)).drafts == []  # not over yet
    run(db, at(2027, 2, 3), period=month_period(2026, 12))  # a late catch-up of December
    (bill,) = bills_of(db)
    assert (bill.period_start, bill.period_end, bill.total) == (date(2025, 12, 31), date(2026, 12, 30), D("120.00"))
    assert_second_run_changes_nothing(db, at(2027, 2, 3), month_period(2026, 12))


def test_s4_dst_change_inside_a_cycle_bills_when_the_local_month_is_over(db):
    p, c, w, plan, assoc = plan_setup(db, tz="Europe/Berlin", starts_on=date(2026, 3, 1))
    with transaction(db) as s:
        # 23:30 UTC on 28 March is 00:30 on the 29th in Berlin, the day clocks go forward.
        device(s, w, "a", contacts=[at(2026, 3, 28, 23, 30)])
        device(s, w, "b", contacts=[at(2026, 3, 31, 21, 59)])  # 23:59 CEST on the 31st
        device(s, w, "c", contacts=[at(2026, 3, 31, 22, 0)])  # midnight: April
    assert run(db, at(2026, 3, 31, 21, 59)).drafts == []
    run(db, at(2026, 3, 31, 22, 0))
    (bill,) = bills_of(db)
    assert (bill.period_start, bill.period_end, bill.device_count) == (date(2026, 3, 1), date(2026, 3, 31), 2)
    assert bill.issued_on == date(2026, 4, 1)
    assert_second_run_changes_nothing(db, at(2026, 3, 31, 22, 0))


# --- S7: price change during a cycle -----------------------------------------------------------


def test_s7_mid_cycle_price_change_puts_both_parts_on_the_bill(db):
    p, c, w, plan, assoc = plan_setup(db, price="3.00", starts_on=date(2026, 3, 1))
    with transaction(db) as s:
        for i in range(10):
            device(s, w, f"d{i}", days=[date(2026, 3, 20)])
        plans.change_price(s, admin(p), plan.id, price_per_device="4.00", effective_from=date(2026, 3, 16),
                           now=at(2026, 3, 16))
    run(db, at(2026, 4, 1, 1))
    (bill,) = bills_of(db)
    assert [line.amount for line in bill.lines] == [D("14.52"), D("20.65")]
    assert "(15/31 days)" in bill.lines[0].description and "(16/31 days)" in bill.lines[1].description
    assert bill.total == D("35.17")
    # A change reaching into billed March applies from the customer's next cycle: April, at 5.00 only.
    with transaction(db) as s:
        change = plans.change_price(s, admin(p), plan.id, price_per_device="5.00", effective_from=date(2026, 3, 31),
                                    now=at(2026, 4, 2))
        assert [(c.effective_from, c.billed_through) for c in change.deferred] == [(date(2026, 4, 1), date(2026, 3, 31))]
    with transaction(db) as s:
        device(s, w, "april", days=[date(2026, 4, 2)])
    run(db, at(2026, 5, 1, 1))
    assert bills_of(db)[0].total == D("35.17") and bills_of(db)[1].total == D("5.00")
    assert_second_run_changes_nothing(db, at(2026, 5, 1, 1))


# --- S6: dissociation ----------------------------------------------------------------------------


def test_s6_dissociated_customers_get_no_bill_after_the_current_cycle(db):
    p, c, w, plan, assoc = plan_setup(db, starts_on=date(2026, 1, 15))
    with transaction(db) as s:
        other = customer(s, p, "Other")
        w2 = workspace(s, other)
        associations.associate(s, admin(p), plan_id=plan.id, customer_ids=[other.id], cycle="monthly",
                               starts_on=date(2026, 1, 15), due_days=10, email="o@other.example", mail=MAIL, now=T0)
        for ws in (w, w2):
            device(s, ws, f"dev-{ws.id}", days=[date(2026, 1, 15) + timedelta(days=7 * i) for i in range(20)])
    with transaction(db) as s, pytest.raises(NotFound, match="not associated"):
        associations.dissociate(s, admin(p), plan_id=plan.id, customer_ids=[customer(s, p, "Stranger").id], now=at(2026, 3, 20))
    with transaction(db) as s:
        (ended,) = associations.dissociate(s, admin(p), plan_id=plan.id, customer_ids=[c.id], now=at(2026, 3, 20))
        assert ended.ends_on == date(2026, 3, 20)
    for now in (at(2026, 2, 15, 1), at(2026, 3, 15, 1), at(2026, 4, 15, 1), at(2026, 5, 15, 1)):
        run(db, now)
    ends = {name: [b.period_end for b in bills_of(db, customer_id=cid)] for name, cid in (("acme", c.id), ("other", other.id))}
    # Acme's current cycle (15 Mar - 14 Apr) is billed in full; nothing after it.
    assert ends["acme"] == [date(2026, 2, 14), date(2026, 3, 14), date(2026, 4, 14)]
    assert ends["other"] == [date(2026, 2, 14), date(2026, 3, 14), date(2026, 4, 14), date(2026, 5, 14)]
    assert_second_run_changes_nothing(db, at(2026, 5, 15, 1))


# --- S3: status, lines, numbers, corrections ------------------------------------------------------


def test_s6_associating_again_after_dissociation_starts_after_the_last_billed_day(db):
    p, c, w, plan, assoc = plan_setup(db, starts_on=date(2026, 1, 15))
    with transaction(db) as s:
        device(s, w, "a", days=[date(2026, 3, 3), date(2026, 3, 20)])
        associations.dissociate(s, admin(p), plan_id=plan.id, customer_ids=[c.id], now=at(2026, 3, 20))
    for starts_on in (date(2026, 1, 15), date(2026, 3, 20), date(2026, 4, 14)):
        with transaction(db) as s, pytest.raises(Conflict, match=r"billed on plan 'Managed' through 2026-04-14 "
                                                r".*start the new association on 2026-04-15 or later"):
            associations.associate(s, admin(p), plan_id=plan.id, customer_ids=[c.id], cycle="monthly", starts_on=starts_on,
                                   due_days=14, email="ap@acme.example", mail=MAIL, now=at(2026, 3, 20))
    with transaction(db) as s:
        associations.associate(s, admin(p), plan_id=plan.id, customer_ids=[c.id], cycle="monthly",
                               starts_on=date(2026, 4, 15), due_days=14, email="ap@acme.example", mail=MAIL, now=at(2026, 3, 20))
        device(s, w, "b", days=[date(2026, 4, 20)])
    run(db, at(2026, 3, 21, 1))
    run(db, at(2026, 4, 15, 1))
    run(db, at(2026, 5, 15, 1))
    cycles = [(b.period_start, b.period_end) for b in bills_of(db)]
    assert cycles == [(date(2026, 2, 15), date(2026, 3, 14)), (date(2026, 3, 15), date(2026, 4, 14)),
                      (date(2026, 4, 15), date(2026, 5, 14))]  # no day twice; 15 Jan - 14 Feb had no active device
    assert_second_run_changes_nothing(db, at(2026, 5, 15, 1))


def test_s3_overdue_after_the_due_days_in_the_customers_zone(db):
    p, c, w, plan, assoc = plan_setup(db, tz="Pacific/Kiritimati", due_days=10, starts_on=date(2026, 3, 1))
    with transaction(db) as s:
        device(s, w, "a", days=[date(2026, 3, 3)])
    run(db, at(2026, 3, 31, 10, 0))  # 1 April on Kiritimati
    (bill,) = bills_of(db)
    assert (bill.issued_on, bill.due_on) == (date(2026, 4, 1), date(2026, 4, 11))
    with transaction(db) as s:
        assert lifecycle.mark_overdue(s, now=at(2026, 4, 10, 9, 59)) == []  # 23:59 on 10 April locally
        assert lifecycle.mark_overdue(s, now=at(2026, 4, 10, 10, 0)) == []  # the due date itself
        (late,) = lifecycle.mark_overdue(s, now=at(2026, 4, 11, 10, 0))  # 12 April locally
        assert late.id == bill.id
    assert bills_of(db)[0].status == BillStatus.OVERDUE
    with transaction(db) as s:
        assert lifecycle.mark_paid(s, admin(p), bill.id, now=at(2026, 4, 20)).status == BillStatus.PAID
    assert_second_run_changes_nothing(db, at(2026, 4, 20))


def test_s3_other_charges_and_discounts_are_separate_lines(db):
    p, c, w, plan, assoc = plan_setup(db, starts_on=date(2026, 3, 1))
    with transaction(db) as s:
        device(s, w, "a", days=[date(2026, 3, 3)])
        lifecycle.add_adjustment(s, admin(p), customer_id=c.id, kind="charge", description="On-site visit", amount="75.00",
                                 currency="USD", now=at(2026, 3, 5))
        lifecycle.add_adjustment(s, admin(p), customer_id=c.id, kind="discount", description="Loyalty", amount="5",
                                 currency="USD", now=at(2026, 3, 6))
        lifecycle.add_adjustment(s, admin(p), customer_id=c.id, kind="charge", description="Hardware in euro",
                                 amount="10.00", currency="EUR", now=at(2026, 3, 6))
        with pytest.raises(DomainError, match="not one of charge, discount, credit"):
            lifecycle.add_adjustment(s, admin(p), customer_id=c.id, kind="tip", description="x", amount="1", currency="USD",
                                     now=T0)
    run(db, at(2026, 4, 1, 1))
    (bill,) = bills_of(db)
    assert [(line.kind, line.amount) for line in bill.lines] == [
        ("devices", D("10.00")), ("charge", D("75.00")), ("discount", D("-5.00"))
    ]
    assert bill.total == D("80.00")
    with db() as s:  # the euro charge waits for a bill in euro
        assert s.scalar(select(Adjustment.applied_to_bill_id).where(Adjustment.currency == "EUR")) is None
    assert_second_run_changes_nothing(db, at(2026, 4, 1, 1))


def test_s3_a_paid_bill_cannot_change_and_corrections_are_credits_on_the_next_bill(db):
    p, c, w, plan, assoc = plan_setup(db, starts_on=date(2026, 3, 1))
    with transaction(db) as s:
        device(s, w, "a", days=[date(2026, 3, 3), date(2026, 4, 3)])
    run(db, at(2026, 4, 1, 1))
    (march,) = bills_of(db)
    with transaction(db) as s:
        lifecycle.mark_paid(s, admin(p), march.id, now=at(2026, 4, 2))
    for change in (lifecycle.mark_paid, lifecycle.void_bill):
        with transaction(db) as s, pytest.raises(Conflict, match="paid and cannot change"):
            change(s, admin(p), march.id, now=at(2026, 4, 3))
    with transaction(db) as s, pytest.raises(DomainError, match="more than the bill"):
        lifecycle.credit_bill(s, admin(p), march.id, amount="10.01", reason="too much", now=at(2026, 4, 3))
    with transaction(db) as s:
        lifecycle.credit_bill(s, admin(p), march.id, amount="4.00", reason="device billed twice", now=at(2026, 4, 3))
    run(db, at(2026, 5, 1, 1))
    paid, april = bills_of(db)
    assert paid.total == D("10.00") and paid.status == BillStatus.PAID
    assert [(line.kind, line.amount) for line in april.lines] == [("devices", D("10.00")), ("credit", D("-4.00"))]
    assert f"Credit for {march.number}: device billed twice" in april.lines[1].description
    assert april.total == D("6.00")
    assert_second_run_changes_nothing(db, at(2026, 5, 1, 1))


def test_s3_numbers_come_from_the_partners_sequence_and_are_never_reused(db):
    p, c, w, plan, assoc = plan_setup(db, starts_on=date(2026, 3, 1))
    with transaction(db) as s:
        device(s, w, "a", days=[date(2026, 3, 3), date(2026, 4, 3), date(2026, 5, 3)])
        s.get(Partner, p.id).invoice_prefix = "ACME"
    run(db, at(2026, 4, 1, 1))
    (first,) = bills_of(db)
    with transaction(db) as s:
        lifecycle.void_bill(s, admin(p), first.id, now=at(2026, 4, 2))
    run(db, at(2026, 5, 1, 1))
    run(db, at(2026, 6, 1, 1))
    assert [(b.number, b.status) for b in bills_of(db)] == [
        ("ACME-2026-04-000001", BillStatus.VOID),
        ("ACME-2026-05-000002", BillStatus.ISSUED),
        ("ACME-2026-06-000003", BillStatus.ISSUED),
    ]
    assert_second_run_changes_nothing(db, at(2026, 6, 1, 1))


def test_s3_a_credited_bill_cannot_be_voided_since_that_would_correct_it_twice(db):
    p, c, w, plan, assoc = plan_setup(db, starts_on=date(2026, 3, 1))
    with transaction(db) as s:
        device(s, w, "a", days=[date(2026, 3, 3)])
    run(db, at(2026, 4, 1, 1))
    (bill,) = bills_of(db)
    with transaction(db) as s:
        lifecycle.credit_bill(s, admin(p), bill.id, amount="4.00", reason="one device was a spare", now=at(2026, 4, 2))
    with transaction(db) as s, pytest.raises(Conflict, match=rf"bill {bill.number} was corrected by credits of "
                                            r"4.00 USD .*credit the rest of its total instead"):
        lifecycle.void_bill(s, admin(p), bill.id, now=at(2026, 4, 3))
    with transaction(db) as s:  # the rest is credited instead, and the next bill carries both credits
        lifecycle.credit_bill(s, admin(p), bill.id, amount="6.00", reason="not on the plan in March", now=at(2026, 4, 3))
        device(s, w, "b", days=[date(2026, 4, 3)])
    run(db, at(2026, 5, 1, 1))
    april = bills_of(db)[1]
    assert bills_of(db)[0].status == BillStatus.ISSUED
    assert [line.amount for line in april.lines] == [D("10.00"), D("-4.00"), D("-6.00")] and april.total == D("0.00")


def test_s3_two_partners_with_the_same_prefix_each_number_from_their_own_sequence(db):
    devices = {}
    with transaction(db) as s:
        for name, client, price in (("MSP One", "Acme", "10"), ("MSP Two", "Beta", "20")):
            p = partner(s, name, prefix="INV")  # both keep the default prefix
            c = customer(s, p, client)
            plan = plans.create_plan(s, admin(p), name="Managed", price_per_device=price, currency="USD", now=T0)
            associations.associate(s, admin(p), plan_id=plan.id, customer_ids=[c.id], cycle="monthly",
                                   starts_on=date(2026, 3, 1), due_days=10, email="ap@c.example", mail=MAIL, now=T0)
            devices[p.id] = device(s, workspace(s, c), f"dev-{client}", days=[date(2026, 3, 4)]).external_id
    run(db, at(2026, 4, 1, 1))
    bills = bills_of(db)
    assert sorted(b.partner_id for b in bills) == sorted(devices)
    assert [b.number for b in bills] == ["INV-2026-04-000001", "INV-2026-04-000001"]
    # each bill got its own lines and device rows, not those of the other partner's bill with the same number
    assert sorted((b.partner_id, b.total) for b in bills) == sorted(zip(devices, [D("10.00"), D("20.00")], strict=True))
    with db() as s:
        rows = s.execute(select(Bill.partner_id, BillDevice.external_id).join(BillDevice, BillDevice.bill_id == Bill.id)).all()
    assert sorted(rows) == sorted(devices.items())
    with db() as s, pytest.raises(IntegrityError):  # unique per partner: a second INV-2026-04-000001 is refused
        first = bills[0]
        s.add(Bill(partner_id=first.partner_id, customer_id=first.customer_id, kind=BillKind.PLAN, source_id=999,
                   number=first.number, period_start=date(2026, 1, 1), period_end=date(2026, 1, 31), currency="USD",
                   total=D(0), issued_on=date(2026, 2, 1), due_on=date(2026, 2, 1), created_at=T0))
        s.flush()
    assert_second_run_changes_nothing(db, at(2026, 4, 1, 1))


def test_s3_run_can_leave_drafts_that_are_issued_later(db):
    p, c, w, plan, assoc = plan_setup(db, starts_on=date(2026, 3, 1), due_days=14)
    with transaction(db) as s:
        device(s, w, "a", days=[date(2026, 3, 3)])
        s.add(ExternalMapping(connection="psa", kind=MappingKind.PSA_COMPANY, external_id="42", customer_id=c.id,
                              first_seen_at=T0, last_seen_at=T0))
    run(db, at(2026, 4, 1, 1), issue=False)
    (draft,) = bills_of(db)
    assert draft.status == BillStatus.DRAFT
    with db() as s:
        assert s.scalar(select(func.count()).select_from(Delivery)) == 0
    with transaction(db) as s, pytest.raises(Conflict, match="draft; issue it"):
        lifecycle.mark_paid(s, admin(p), draft.id, now=at(2026, 4, 2))
    with transaction(db) as s:
        issued = lifecycle.finalize_bill(s, admin(p), draft.id, now=at(2026, 4, 3, 9))
        assert (issued.status, issued.issued_on, issued.due_on) == (BillStatus.ISSUED, date(2026, 4, 3), date(2026, 4, 17))
    with db() as s:
        assert s.scalar(select(func.count()).select_from(Delivery)) == 1
    with transaction(db) as s, pytest.raises(Conflict, match="only a draft"):
        lifecycle.finalize_bill(s, admin(p), draft.id, now=at(2026, 4, 3, 9))
    assert_second_run_changes_nothing(db, at(2026, 4, 3, 9))


def test_dry_run_shows_the_bills_and_saves_nothing(db):
    p, c, w, plan, assoc = plan_setup(db, starts_on=date(2026, 3, 1))
    with transaction(db) as s:
        device(s, w, "a", days=[date(2026, 3, 3)])
    before = snapshot(db)
    preview = run(db, at(2026, 4, 1, 1), dry_run=True)
    assert [(d.customer_name, d.total, d.number) for d in preview.drafts] == [("Acme", D("10.00"), None)]
    assert snapshot(db) == before
    real = run(db, at(2026, 4, 1, 1))
    assert bills_of(db)[0].number == "INV-2026-04-000001" and len(real.bill_ids) == 1
    assert_second_run_changes_nothing(db, at(2026, 4, 1, 1))


# --- G2: the outbox is written with the bill ------------------------------------------------------


def test_g2_issuing_writes_one_delivery_per_mapped_psa_connection_in_the_same_transaction(db):
    p, c, w, plan, assoc = plan_setup(db, starts_on=date(2026, 3, 1))
    with transaction(db) as s:
        device(s, w, "a", days=[date(2026, 3, 3)])
        for connection, external_id in (("psa-a", "100"), ("psa-a", "101"), ("psa-b", "7")):
            s.add(ExternalMapping(connection=connection, kind=MappingKind.PSA_COMPANY, external_id=external_id,
                                  customer_id=c.id, first_seen_at=T0, last_seen_at=T0))
        s.add(ExternalMapping(connection="rmm", kind=MappingKind.RMM_ORG, external_id="org", workspace_id=w.id,
                              first_seen_at=T0, last_seen_at=T0))
        # M5: a complete pull begun after March ended (and settled) lets March be billed.
        s.add(ConnectionState(connection="rmm", updated_at=T0, complete_pass_started_at=at(2026, 4, 1, 0, 30)))
    run(db, at(2026, 4, 1, 1))
    (bill,) = bills_of(db)
    with db() as s:
        deliveries = list(s.scalars(select(Delivery).order_by(Delivery.connection)))
        assert [(d.connection, d.status) for d in deliveries] == [("psa-a", DeliveryStatus.PENDING),
                                                                  ("psa-b", DeliveryStatus.PENDING)]
        assert deliveries[0].key == f"gw-psa-a-{c.id}-plan-{assoc.id}-20260301-20260331"
        assert deliveries[0].key == billing_deliveries.delivery_key("psa-a", bill)
        document = billing_deliveries.bill_document(s, deliveries[0])
    assert (document.company_external_id, document.number, document.total) == ("100", bill.number, D("10.00"))
    assert document.lines[0].amount == D("10.00") and document.key == deliveries[0].key
    # Voiding stops what was not delivered yet.
    with transaction(db) as s:
        lifecycle.void_bill(s, admin(p), bill.id, now=at(2026, 4, 2))
    with db() as s:
        assert {d.status for d in s.scalars(select(Delivery))} == {DeliveryStatus.DEAD}
    assert_second_run_changes_nothing(db, at(2026, 4, 2))


def test_g2_a_failed_run_leaves_no_bill_and_no_delivery(db):
    p, c, w, plan, assoc = plan_setup(db, starts_on=date(2026, 3, 1))
    with transaction(db) as s:
        device(s, w, "a", days=[date(2026, 3, 3)])
        s.add(ExternalMapping(connection="psa", kind=MappingKind.PSA_COMPANY, external_id="1", customer_id=c.id,
                              first_seen_at=T0, last_seen_at=T0))
    before = snapshot(db)
    with pytest.raises(RuntimeError), transaction(db) as s:
        billing_run.run_billing(s, now=at(2026, 4, 1, 1), billing=BILLING)
        raise RuntimeError("crash before commit")
    assert snapshot(db) == before
    run(db, at(2026, 4, 1, 1))
    with db() as s:
        assert s.scalar(select(func.count()).select_from(Delivery)) == 1
    assert bills_of(db)[0].number == "INV-2026-04-000001"
    assert_second_run_changes_nothing(db, at(2026, 4, 1, 1))


# --- the bill-built hook ---------------------------------------------------------------------------


class TaxPlugin:
    @hookimpl
    def gateway_bill_built(self, bill):
        tax = (bill.total * D("0.19")).quantize(D("0.0001"))
        return [BillLineDoc(f"VAT 19% on {bill.total} {bill.currency}", D(1), tax, tax)]


class FloatPlugin:
    @hookimpl
    def gateway_bill_built(self, bill):
        return [BillLineDoc("float fee", D(1), 1.1, 1.1)]


def test_gateway_bill_built_plugin_lines_are_added_and_a_bad_line_is_refused(db):
    p, c, w, plan, assoc = plan_setup(db, price="10.05", starts_on=date(2026, 3, 1))
    with transaction(db) as s:
        device(s, w, "a", days=[date(2026, 3, 3)])
    plugins = get_plugin_manager(extra_plugins=[TaxPlugin(), FloatPlugin()], load_entry_points=False)
    run(db, at(2026, 4, 1, 1), extra_lines=bill_built_lines(plugins))
    (bill,) = bills_of(db)
    assert [(line.kind, line.amount) for line in bill.lines] == [("devices", D("10.05")), ("plugin", D("1.91"))]
    assert bill.total == D("11.96")  # 10.05 + 1.9095 rounded half up per line
    assert any("must be a finite Decimal" in failure.error for failure in plugins.failures)
    assert_second_run_changes_nothing(db, at(2026, 4, 1, 1))


def test_extra_lines_are_checked_by_the_core_and_a_refused_one_is_told_to_its_source(db):
    p, c, w, plan, assoc = plan_setup(db, price="10.00", starts_on=date(2026, 3, 1))
    with transaction(db) as s:
        device(s, w, "a", days=[date(2026, 3, 3)])
    refused: list[str] = []

    def extra_lines(draft):
        yield BillLineDoc(f"Fee for {draft.customer_name}", D(1), D("2.00"), D("2.00")), refused.append
        yield "not a line", refused.append
        yield BillLineDoc("nan fee", D(1), D("NaN"), D("NaN")), refused.append

    run(db, at(2026, 4, 1, 1), extra_lines=extra_lines)
    (bill,) = bills_of(db)
    assert [(line.kind, line.amount) for line in bill.lines] == [("devices", D("10.00")), ("plugin", D("2.00"))]
    assert refused == ["returned str, not a gateway.BillLineDoc",
                       "line 'nan fee': unit_price must be a finite Decimal, not Decimal"]
    assert bill_built_lines(get_plugin_manager(load_entry_points=False)) is None  # no hook implementation: no cost


# --- S8: who sees which bill ----------------------------------------------------------------------


def test_s8_customer_admin_sees_only_their_customers_bills_and_changes_nothing(db):
    p, c, w, plan, assoc = plan_setup(db, starts_on=date(2026, 3, 1))
    with transaction(db) as s:
        other = customer(s, p, "Other")
        associations.associate(s, admin(p), plan_id=plan.id, customer_ids=[other.id], cycle="monthly",
                               starts_on=date(2026, 3, 1), due_days=10, email="o@other.example", mail=MAIL, now=T0)
        device(s, w, "a", days=[date(2026, 3, 3)])
        device(s, workspace(s, other), "b", days=[date(2026, 3, 3)])
        user = User(partner_id=p.id, name="Ann", role=UserRole.CUSTOMER_ADMIN, created_at=T0)
        s.add(user)
        s.flush()
        s.add(UserCustomer(user_id=user.id, customer_id=c.id))
    run(db, at(2026, 4, 1, 1))
    mine, theirs = (bills_of(db, customer_id=c.id)[0], bills_of(db, customer_id=other.id)[0])
    ann = Principal(partner_id=p.id, role=UserRole.CUSTOMER_ADMIN, name="user:Ann", user_id=user.id)
    with db() as s:
        assert [b.id for b in lifecycle.list_bills(s, ann)] == [mine.id]
        assert lifecycle.get_bill(s, ann, mine.id).id == mine.id
        with pytest.raises(NotFound, match=f"no bill with id {theirs.id}"):
            lifecycle.get_bill(s, ann, theirs.id)
        with pytest.raises(NotFound):
            lifecycle.mark_paid(s, ann, mine.id, now=at(2026, 4, 2))
        assert [a.customer_id for a in associations.list_associations(s, ann)] == [c.id]
        assert len(lifecycle.list_bills(s, admin(p))) == 2
        with pytest.raises(NotFound):  # another partner's admin sees nothing of this partner
            lifecycle.get_bill(s, system_principal(p.id + 100, "x"), mine.id)
    assert_second_run_changes_nothing(db, at(2026, 4, 1, 1))


def test_m7_s3_a_bill_of_charges_alone_between_device_bills_gets_no_usage_rows(db):
    p, c, w, plan, assoc = plan_setup(db, starts_on=date(2026, 3, 1))
    with transaction(db) as s:
        device(s, w, "dev-acme", days=[date(2026, 3, 4)])
        for name in ("Beta", "Gamma"):
            other = customer(s, p, name)
            associations.associate(s, admin(p), plan_id=plan.id, customer_ids=[other.id], cycle="monthly",
                                   starts_on=date(2026, 3, 1), due_days=10, email=f"ap@{name.lower()}.example", mail=MAIL, now=T0)
            if name == "Beta":  # no device active in March, one charge waiting
                device(s, workspace(s, other), "dev-beta-idle")
                lifecycle.add_adjustment(s, admin(p), customer_id=other.id, kind="charge", description="On-site visit",
                                         amount="75.00", currency="USD", now=at(2026, 3, 5))
            else:
                device(s, workspace(s, other), "dev-gamma", days=[date(2026, 3, 9), date(2026, 3, 10)])
    run(db, at(2026, 4, 1, 1))
    with db() as s:
        rows = s.execute(select(Customer.name, Bill.total, BillDevice.external_id, BillDevice.days_active)
                         .join(Bill, Bill.customer_id == Customer.id)
                         .outerjoin(BillDevice, BillDevice.bill_id == Bill.id).order_by(Bill.id)).all()
    assert [tuple(r) for r in rows] == [
        ("Acme", D("10.00"), "dev-acme", 1), ("Beta", D("75.00"), None, None), ("Gamma", D("10.00"), "dev-gamma", 2),
    ]
    assert_second_run_changes_nothing(db, at(2026, 4, 1, 1))


def test_m7_usage_rows_go_to_this_runs_bills_when_another_transactions_bill_got_an_id_among_them(postgres_engine):
    """Usage rows are copied to bills by customer, period and kind within this run's ids. On PostgreSQL a
    concurrent insert can take an id in between; a trigger plays that insert here, for the same customer,
    kind and cycle (another plan association), so only matching by the run's exact ids keeps it empty."""
    from gateway.core import db as gdb

    db = gdb.session_factory(postgres_engine)
    p, c, w, plan, assoc = plan_setup(db, starts_on=date(2026, 3, 1))
    with transaction(db) as s:
        beta = customer(s, p, "Beta")
        associations.associate(s, admin(p), plan_id=plan.id, customer_ids=[beta.id], cycle="monthly",
                               starts_on=date(2026, 3, 1), due_days=10, email="ap@beta.example", mail=MAIL, now=T0)
        device(s, w, "dev-acme", days=[date(2026, 3, 4)])
        device(s, workspace(s, beta), "dev-beta", days=[date(2026, 3, 5), date(2026, 3, 6)])
    with postgres_engine.begin() as connection:
        connection.exec_driver_sql("""
            CREATE FUNCTION test_interleave() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF pg_trigger_depth() = 1 THEN
                    INSERT INTO bills (partner_id, customer_id, kind, source_id, number, period_start, period_end,
                                       currency, device_count, total, status, issued_on, due_on, created_at,
                                       email_attempts)
                    VALUES (NEW.partner_id, NEW.customer_id, NEW.kind, NEW.source_id + 1000, 'OTHER-' || NEW.number,
                            NEW.period_start, NEW.period_end, NEW.currency, 0, 0, 'draft', NEW.issued_on,
                            NEW.due_on, NEW.created_at, 0);
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER test_interleave BEFORE INSERT ON bills FOR EACH ROW EXECUTE FUNCTION test_interleave();
        """)
    try:
        run(db, at(2026, 4, 1, 1))
    finally:
        with postgres_engine.begin() as connection:
            connection.exec_driver_sql("DROP TRIGGER test_interleave ON bills; DROP FUNCTION test_interleave()")
    with db() as s:
        rows = s.execute(select(Bill.number, BillDevice.external_id, BillDevice.days_active)
                         .join(BillDevice, BillDevice.bill_id == Bill.id).order_by(Bill.number)).all()
        ids = s.scalars(select(Bill.id).order_by(Bill.id)).all()
    assert [tuple(r) for r in rows] == [("INV-2026-04-000001", "dev-acme", 1), ("INV-2026-04-000002", "dev-beta", 2)]
    assert len(ids) == 4 and ids[-1] - ids[0] == 3  # the other bills took ids among this run's


def test_s3_concurrent_runs_on_postgresql_bill_each_cycle_once_with_unique_numbers(postgres_engine):
    import threading
    import time as _time

    from gateway.core import db as gdb

    db = gdb.session_factory(postgres_engine)
    p, c, w, plan, assoc = plan_setup(db, starts_on=date(2026, 3, 1))
    with transaction(db) as s:
        for name in ("Beta", "Gamma"):
            other = customer(s, p, name)
            associations.associate(s, admin(p), plan_id=plan.id, customer_ids=[other.id], cycle="monthly",
                                   starts_on=date(2026, 3, 1), due_days=10, email=f"ap@{name.lower()}.example", mail=MAIL, now=T0)
            device(s, workspace(s, other), f"dev-{name}", days=[date(2026, 3, 4)])
        device(s, w, "dev-acme", days=[date(2026, 3, 4)])
    results: list[object] = []

    def one_run() -> None:
        try:
            results.append(run(db, at(2026, 4, 1, 1)).bill_ids)
        except Exception as exc:  # recorded: the assertion below shows it
            results.append(exc)

    with db() as blocker, blocker.begin():  # holds the partner's sequence while both runs compute their bills
        blocker.execute(select(Partner).where(Partner.id == p.id).with_for_update())
        threads = [threading.Thread(target=one_run) for _ in range(2)]
        for thread in threads:
            thread.start()
        _time.sleep(0.5)
    for thread in threads:
        thread.join(timeout=30)
    runs = [r for r in results if isinstance(r, list)]
    assert len(runs) == len(results) == 2, results  # neither run raised
    assert sorted(len(r) for r in runs) == [0, 3], results
    assert sorted(b.number for b in bills_of(db)) == [f"INV-2026-04-00000{i}" for i in (1, 2, 3)]
    with db() as s:
        assert s.get(Partner, p.id).next_bill_number == 4
    assert_second_run_changes_nothing(db, at(2026, 4, 1, 1))

"""M2: a workspace is covered by a license or by monthly billing, never both at once (issue 13).

Seed 000: a workspace joins "at 'License' ... change the license", so joining replaces the
license; "you can recycle any unused license period with a different workspace (only if the
license key wasn't exposed to end-users at all)"; and "assign other regular licenses with all
affected workspaces before you cancel the subscription". Billing tests end with a second run
that changes nothing.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from gateway.core.access import Principal, system_principal
from gateway.core.billing import run as billing_run
from gateway.core.billing import subscriptions
from gateway.core.clock import FrozenClock
from gateway.core.db import transaction
from gateway.core.licensing.assignment import assign
from gateway.core.licensing.daily import run_daily
from gateway.core.licensing.purchase import buy
from gateway.core.models import (
    Bill,
    BillKind,
    Customer,
    Device,
    DeviceActivity,
    Edition,
    License,
    LicenseHistory,
    LicenseReminder,
    LicenseType,
    Order,
    OrderKind,
    Partner,
    Workspace,
)
from gateway.core.settings import BillingSettings, LicensingSettings
from gateway.errors import Conflict

T0 = datetime(2026, 1, 5, 12, tzinfo=UTC)
CONFIG = LicensingSettings(prices={"BUS": Decimal("30")})
BILLING = BillingSettings()


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def world(db: sessionmaker[Session], tz: str = "UTC") -> tuple[Principal, int, int]:
    """A partner with monthly billing enabled on 5 January 2026 and one customer with two workspaces."""
    with transaction(db) as s:
        partner = Partner(name="MSP", email="msp@example.test", created_at=T0)
        s.add_all([partner, Edition(code="BUS", name="Business Security", license_type=LicenseType.COMPUTER)])
        s.flush()
        customer = Customer(partner_id=partner.id, name="Acme", timezone=tz, billing_email="it@acme.test",
                            created_at=T0)
        s.add(customer)
        s.flush()
        main, lab = (Workspace(customer_id=customer.id, name=name, created_at=T0) for name in ("main", "lab"))
        s.add_all([main, lab])
        s.flush()
        me = system_principal(partner.id, "test:admin")
        subscriptions.enable_monthly(s, me, settings=BILLING, now=T0)
        return me, main.id, lab.id


def licensed(db, me: Principal, workspace_id: int, now: datetime = T0) -> str:
    clock = FrozenClock(now)
    with transaction(db) as s:
        key = buy(s, clock, CONFIG, me, edition="BUS", seats=5, term_months=12).licenses[0].key
        assign(s, clock, CONFIG, me, key, workspace_id)
        return key


def active_devices(db, workspace_id: int, days: list[date]) -> None:
    with transaction(db) as s:
        device = Device(connection="rmm", external_id=f"d{workspace_id}", org_external_id="o",
                        workspace_id=workspace_id, hostname=f"pc-{workspace_id}", first_seen_at=T0, updated_at=T0)
        s.add(device)
        s.flush()
        s.add_all(DeviceActivity(device_id=device.id, day=day) for day in days)


def run(db, now: datetime) -> list[int]:
    with transaction(db) as s:
        return billing_run.run_billing(s, now=now, billing=BILLING).bill_ids


def monthly_bills(db) -> list[tuple[date, int]]:
    with db() as s:
        return [(b.period_start, b.device_count) for b in
                s.scalars(select(Bill).where(Bill.kind == BillKind.MONTHLY).order_by(Bill.period_start))]


def test_m2_joining_replaces_the_license_so_the_daily_job_never_renews_it_on_top_of_monthly_billing(db):
    me, main, _ = world(db)
    key = licensed(db, me, main, now=at(2025, 12, 20))
    with transaction(db) as s:
        joined = subscriptions.join_monthly(s, me, workspace_id=main, max_devices=10, now=at(2026, 1, 6))
        assert joined.released is not None and joined.released.key == key and joined.released.recyclable
    with db() as s:
        lic = s.scalars(select(License).where(License.key == key)).one()
        assert lic.workspace_id is None and lic.expires_at == at(2026, 12, 20)  # the period keeps running
        released = s.scalars(select(LicenseHistory).where(LicenseHistory.license_id == lic.id,
                                                          LicenseHistory.action == "released")).one()
        assert released.after["released_from"] == main and released.before == {"workspace_id": main}
    with transaction(db) as s:  # the expiry day: no paid renewal while the workspace pays monthly
        report = run_daily(s, FrozenClock(at(2026, 12, 20, 13)), CONFIG)
        assert report.auto_renewed == []
        assert s.scalar(select(func.count()).select_from(Order).where(Order.kind == OrderKind.RENEWAL)) == 0
        assert s.get_one(Workspace, main).monthly_billing_until is None


def test_m2_a_license_still_on_a_monthly_workspace_is_neither_renewed_nor_exchanged_by_the_daily_job(db):
    """Rows from before joining released the license: the daily job lets such a license expire."""
    me, main, _ = world(db)
    key = licensed(db, me, main, now=at(2025, 12, 20))
    with transaction(db) as s:
        s.get_one(Workspace, main).monthly_billing_since = date(2026, 1, 6)
    with transaction(db) as s:
        report = run_daily(s, FrozenClock(at(2026, 12, 20, 13)), CONFIG)
        assert report.auto_renewed == [] and report.expired == [key]
        assert s.scalar(select(func.count()).select_from(Order).where(Order.kind == OrderKind.RENEWAL)) == 0
        (expired,) = s.scalars(select(LicenseHistory.after).where(LicenseHistory.action == "expired"))
        assert "monthly billing" in expired["not_renewed"]


def test_m2_a_released_period_is_recycled_with_a_different_workspace_only_if_the_key_was_never_exposed(db):
    me, main, lab = world(db)
    clock = FrozenClock(at(2026, 1, 10))
    recyclable = licensed(db, me, main)
    with transaction(db) as s:
        subscriptions.join_monthly(s, me, workspace_id=main, max_devices=10, now=clock.now())
        lic = assign(s, clock, CONFIG, me, recyclable, lab)  # its unused period serves the lab
        assert lic.workspace_id == lab and lic.expires_at == datetime(2027, 1, 5, 12, tzinfo=UTC)

    me, main, lab = world_two(db)
    exposed = licensed(db, me, main)
    with transaction(db) as s:
        joined = subscriptions.join_monthly(s, me, workspace_id=main, max_devices=10, now=clock.now(),
                                            key_exposed=True)
        assert joined.released is not None and not joined.released.recyclable
    with transaction(db) as s, pytest.raises(Conflict, match="cannot"):
        assign(s, clock, CONFIG, me, exposed, lab)

    # The gateway's own end-user notice (L4) carries the key: that is an exposure it knows of.
    me, main, lab = world_two(db, "Initech")
    noticed = licensed(db, me, main)
    with transaction(db) as s:
        lic = s.scalars(select(License).where(License.key == noticed)).one()
        s.add(LicenseReminder(license_id=lic.id, kind="end-user-3d", expires_at=lic.expires_at, sent_at=T0))
    with transaction(db) as s:
        joined = subscriptions.join_monthly(s, me, workspace_id=main, max_devices=10, now=clock.now())
        assert joined.released is not None and not joined.released.recyclable
    with transaction(db) as s, pytest.raises(Conflict, match="cannot"):
        assign(s, clock, CONFIG, me, noticed, lab)
    with transaction(db) as s:  # back on the workspace it came from, it may go: it leaves the plan
        assert assign(s, clock, CONFIG, me, noticed, main).workspace_id == main
        assert s.get_one(Workspace, main).monthly_billing_until == date(2026, 1, 10)


def world_two(db, name: str = "Globex") -> tuple[Principal, int, int]:
    """Another customer of the first partner, with two workspaces."""
    with transaction(db) as s:
        partner = s.scalars(select(Partner).order_by(Partner.id)).first()
        assert partner is not None
        customer = Customer(partner_id=partner.id, name=name, timezone="UTC", created_at=T0)
        s.add(customer)
        s.flush()
        main, lab = (Workspace(customer_id=customer.id, name=n, created_at=T0) for n in ("main", "lab"))
        s.add_all([main, lab])
        s.flush()
        return system_principal(partner.id, "test:admin"), main.id, lab.id


def test_m2_assigning_a_regular_license_before_cancelling_takes_the_workspace_off_the_plan(db):
    me, main, _ = world(db)
    with transaction(db) as s:
        subscriptions.join_monthly(s, me, workspace_id=main, max_devices=10, now=at(2026, 1, 6))
    active_devices(db, main, [date(2026, 2, 10), date(2026, 2, 20)])
    key = licensed(db, me, main, now=at(2026, 2, 15, 9))  # seed 000: before cancelling, assign a license
    with db() as s:
        assert s.get_one(Workspace, main).monthly_billing_until == date(2026, 2, 15)
        entry = s.scalars(select(LicenseHistory).where(LicenseHistory.action == "assigned")).one()
        assert entry.after["left_monthly_billing"] == "2026-02-15"
    with transaction(db) as s:  # cancelling afterwards leaves the licensed workspace's last day alone
        plan = subscriptions.cancel_monthly(s, me, now=at(2026, 2, 16), ends_on=date(2026, 2, 28), confirm=True)
        assert plan.confirmed
        assert s.get_one(Workspace, main).monthly_billing_until == date(2026, 2, 15)
    run(db, at(2026, 3, 1, 1))
    assert monthly_bills(db) == [(date(2026, 2, 1), 1)]  # active on 10 February, while on the plan
    with db() as s:
        assert s.scalars(select(License.workspace_id).where(License.key == key)).one() == main
    assert run(db, at(2026, 3, 1, 2)) == []


def test_m2_one_workspace_leaves_the_plan_and_is_billed_up_to_its_last_day(db):
    me, main, lab = world(db, tz="Pacific/Kiritimati")
    with transaction(db) as s:
        for workspace_id in (main, lab):
            subscriptions.join_monthly(s, me, workspace_id=workspace_id, max_devices=10, now=at(2026, 1, 6))
    active_devices(db, main, [date(2026, 2, 20)])
    active_devices(db, lab, [date(2026, 2, 20)])
    with transaction(db) as s:  # 14 February, 12:00 UTC is 15 February (UTC+14) for the customer
        preview = subscriptions.leave_monthly(s, me, workspace_id=lab, now=at(2026, 2, 14, 12))
        assert (preview.confirmed, preview.last_day, preview.devices) == (False, date(2026, 2, 15), [f"pc-{lab}"])
        assert s.get_one(Workspace, lab).monthly_billing_until is None
    with transaction(db) as s:
        done = subscriptions.leave_monthly(s, me, workspace_id=lab, now=at(2026, 2, 14, 12), confirm=True)
        assert done.confirmed and s.get_one(Workspace, lab).monthly_billing_until == date(2026, 2, 15)
    with transaction(db) as s, pytest.raises(Conflict, match="not on monthly billing"):
        subscriptions.leave_monthly(s, me, workspace_id=lab, now=at(2026, 2, 16), confirm=True)
    with transaction(db) as s, pytest.raises(Conflict, match="join again once 2026-02-01 to 2026-02-28 is billed"):
        subscriptions.join_monthly(s, me, workspace_id=lab, max_devices=10, now=at(2026, 2, 20))
    with transaction(db) as s, pytest.raises(Conflict, match="not billed yet; run the billing"):
        subscriptions.join_monthly(s, me, workspace_id=lab, max_devices=10, now=at(2026, 3, 1, 1))
    run(db, at(2026, 3, 1, 1))
    assert monthly_bills(db) == [(date(2026, 2, 1), 1)]  # the lab's device was active after its last day
    with transaction(db) as s:
        subscriptions.join_monthly(s, me, workspace_id=lab, max_devices=10, now=at(2026, 3, 1, 2))
    assert run(db, at(2026, 3, 1, 3)) == []
    assert monthly_bills(db) == [(date(2026, 2, 1), 1)]

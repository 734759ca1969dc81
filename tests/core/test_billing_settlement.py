"""M5 and G1 over real pulls: a cycle is billed once its check-ins are in, a late one is corrected, and a
device's days stay with the workspace it was in on each day.

Every test that runs billing ends by running it again and asserting that nothing changed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from decimal import Decimal

from alembic import command
from sqlalchemy import insert, select

from gateway.adapters import DevicePage, RmmDevice, RmmOrganization
from gateway.core import db as gdb
from gateway.core.access import system_principal
from gateway.core.billing import associations, plans
from gateway.core.billing import run as billing_run
from gateway.core.clock import FrozenClock
from gateway.core.db import transaction
from gateway.core.models import (
    Adjustment,
    Bill,
    BillDevice,
    BillKind,
    BillLine,
    ConnectionState,
    Customer,
    Device,
    DeviceActivity,
    ExternalMapping,
    MappingKind,
    MonthlySubscription,
    Partner,
    Workspace,
)
from gateway.core.settings import BillingSettings, MailSettings
from gateway.sync.devices import map_organization, pull_devices

T0 = datetime(2026, 1, 1, tzinfo=UTC)
BILLING = BillingSettings()  # settling_minutes = 15
MAIL = MailSettings(host="127.0.0.1", port=2525, from_address="billing@msp.example", starttls=False)
NEW_YORK = "America/New_York"


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


class FakeRmm:
    """An RMM that lists what the test puts in it, in one page."""

    def __init__(self, *orgs: str) -> None:
        self.orgs = [RmmOrganization(org, org) for org in orgs]
        self.devices: dict[str, RmmDevice] = {}

    def contact(self, external_id: str, org: str, when: datetime) -> None:
        self.devices[external_id] = RmmDevice(external_id, org, f"host-{external_id}", online=True, last_contact=when)

    async def list_organizations(self) -> list[RmmOrganization]:
        return list(self.orgs)

    async def fetch_devices(self, cursor: str | None = None) -> AsyncIterator[DevicePage]:
        yield DevicePage(list(self.devices.values()), None)

    async def aclose(self) -> None:
        return None


async def pull(db, rmm: FakeRmm, clock: FrozenClock, when: datetime) -> None:
    clock.set(when)
    await pull_devices(rmm, "rmm", db, clock=clock)


def run(db, now: datetime) -> billing_run.BillingRun:
    with transaction(db) as s:
        return billing_run.run_billing(s, now=now, billing=BILLING)


def world(db, *names: str, tz: str = "UTC", monthly: bool = True) -> tuple[int, dict[str, int]]:
    """A partner with monthly billing since 10 February (March is its first full month) and one workspace
    per name, each of its own customer in ``tz``, on the plan; returns the partner and the workspace ids."""
    with transaction(db) as s:
        p = Partner(name="MSP One", created_at=T0)
        s.add(p)
        s.flush()
        if monthly:
            s.add(MonthlySubscription(partner_id=p.id, enabled_at=at(2026, 2, 10), timezone="UTC",
                                      price_per_device=Decimal("2.50"), currency="USD"))
        ids = {}
        for name in names:
            c = Customer(partner_id=p.id, name=name, timezone=tz, billing_email=f"{name}@example.com", created_at=T0)
            s.add(c)
            s.flush()
            w = Workspace(customer_id=c.id, name=f"{name} main", created_at=T0,
                          monthly_billing_since=date(2026, 2, 10) if monthly else None)
            s.add(w)
            s.flush()
            ids[name] = w.id
        return p.id, ids


def map_org(db, org: str, workspace_id: int) -> None:
    with transaction(db) as s:
        if s.scalar(select(ExternalMapping).where(ExternalMapping.external_id == org)) is None:
            s.add(ExternalMapping(connection="rmm", kind=MappingKind.RMM_ORG, external_id=org, external_name=org,
                                  first_seen_at=T0, last_seen_at=T0))
            s.flush()
        map_organization(s, "rmm", org, workspace_id)


def bills(db) -> list[tuple]:
    with db() as s:
        rows = s.execute(select(Bill.id, Customer.name, Bill.kind, Bill.period_start, Bill.device_count, Bill.total)
                         .join(Customer, Customer.id == Bill.customer_id).order_by(Bill.id)).all()
        return [tuple(r) for r in rows]


def usage(db, bill_id: int) -> list[tuple]:
    with db() as s:
        return [tuple(r) for r in s.execute(select(BillDevice.external_id, BillDevice.days_active, BillDevice.workspace)
                                            .where(BillDevice.bill_id == bill_id).order_by(BillDevice.external_id))]


def state(db) -> dict[str, list]:
    with db() as s:
        return {m.__tablename__: sorted((tuple(r) for r in s.execute(select(*m.__table__.columns))), key=repr)
                for m in (Bill, BillLine, BillDevice, Adjustment)}


# --- M5: a cycle waits until its check-ins are in ----------------------------------------------


async def test_m5_a_month_is_billed_only_after_a_pull_begun_after_it_ended(db, clock: FrozenClock):
    """The laptop's only March check-in is 31 March 23:59 in New York (1 April 03:59 UTC): the 04:02 run
    must not bill March before a pull that began after 04:00 + 15 minutes has stored it."""
    _, ws = world(db, "acme", tz=NEW_YORK)
    map_org(db, "org-1", ws["acme"])
    rmm = FakeRmm("org-1")
    rmm.contact("desk", "org-1", at(2026, 3, 16, 15))
    await pull(db, rmm, clock, at(2026, 3, 16, 16))
    rmm.contact("laptop", "org-1", at(2026, 2, 20, 15))  # seen in February only, so far
    await pull(db, rmm, clock, at(2026, 4, 1, 3, 50))
    rmm.contact("laptop", "org-1", at(2026, 4, 1, 3, 59))  # 31 March 23:59 in New York

    early = run(db, at(2026, 4, 1, 4, 2))
    assert early.drafts == [] and bills(db) == []
    (waiting,) = early.waiting
    assert (waiting.kind, waiting.period.start, waiting.connections) == (BillKind.MONTHLY, date(2026, 3, 1), ("rmm",))
    assert waiting.settles_at == at(2026, 4, 1, 4, 15)
    assert "rmm" in waiting.reason and "settling_minutes" in waiting.reason

    await pull(db, rmm, clock, at(2026, 4, 1, 4, 10))  # began before the month settled: still waiting
    assert [w.period.start for w in run(db, at(2026, 4, 1, 4, 12)).waiting] == [date(2026, 3, 1)]
    await pull(db, rmm, clock, at(2026, 4, 1, 4, 20))
    billed = run(db, at(2026, 4, 1, 4, 25))
    assert billed.waiting == []
    ((bill_id, name, kind, start, count, total),) = bills(db)
    assert (name, kind, start, count, total) == ("acme", BillKind.MONTHLY, date(2026, 3, 1), 2, Decimal("5.0000"))
    assert [row[0] for row in usage(db, bill_id)] == ["desk", "laptop"]

    before = state(db)
    again = run(db, at(2026, 4, 1, 4, 30))
    assert (again.drafts, again.already_billed, again.waiting) == ([], 1, [])
    assert state(db) == before


async def test_m5_a_plan_cycle_waits_for_the_pulls_too(db, clock: FrozenClock):
    p, ws = world(db, "acme", tz=NEW_YORK, monthly=False)
    map_org(db, "org-1", ws["acme"])
    with transaction(db) as s:
        customer_id = s.get_one(Workspace, ws["acme"]).customer_id
        plan = plans.create_plan(s, system_principal(p, "test"), name="Managed", price_per_device=Decimal("4"),
                                 currency="USD", now=T0)
        associations.associate(s, system_principal(p, "test"), plan_id=plan.id, customer_ids=[customer_id],
                               cycle="monthly", starts_on=date(2026, 3, 1), due_days=30, email="ap@acme.example",
                               mail=MAIL, now=T0)
    rmm = FakeRmm("org-1")
    rmm.contact("desk", "org-1", at(2026, 3, 16, 15))
    await pull(db, rmm, clock, at(2026, 3, 16, 16))
    waiting = run(db, at(2026, 4, 1, 4, 2)).waiting
    assert [(w.kind, w.period.start) for w in waiting] == [(BillKind.PLAN, date(2026, 3, 1))]
    await pull(db, rmm, clock, at(2026, 4, 1, 4, 20))
    run(db, at(2026, 4, 1, 4, 25))
    assert [(b[2], b[4], b[5]) for b in bills(db)] == [(BillKind.PLAN, 1, Decimal("4.0000"))]
    before = state(db)
    assert run(db, at(2026, 4, 1, 4, 30)).drafts == [] and state(db) == before


async def test_m5_late_check_in_is_billed_as_a_correction_on_the_next_bill(db, clock: FrozenClock):
    """The RMM reports the laptop's 31 March check-in only at 05:00, after March was billed without it:
    it becomes a charge on the next bill (April's), never dropped, and March's bill stays as issued."""
    _, ws = world(db, "acme", tz=NEW_YORK)
    map_org(db, "org-1", ws["acme"])
    rmm = FakeRmm("org-1")
    rmm.contact("desk", "org-1", at(2026, 3, 16, 15))
    await pull(db, rmm, clock, at(2026, 3, 16, 16))
    await pull(db, rmm, clock, at(2026, 4, 1, 4, 20))
    run(db, at(2026, 4, 1, 4, 25))
    ((march_id, *_rest),) = bills(db)
    assert _rest[3] == 1  # the desk alone

    rmm.contact("laptop", "org-1", at(2026, 4, 1, 3, 59))  # 31 March 23:59 in New York, reported late
    await pull(db, rmm, clock, at(2026, 4, 1, 5))
    noted = run(db, at(2026, 4, 1, 5, 10))
    assert noted.corrections == 1 and noted.drafts == []
    with db() as s:
        (correction,) = s.scalars(select(Adjustment)).all()
        assert (correction.corrects_bill_id, correction.amount, correction.applied_to_bill_id) == (
            march_id, Decimal("2.5000"), None)
        assert "host-laptop" in correction.description and "2026-03-31" in correction.description
    assert run(db, at(2026, 4, 1, 5, 20)).corrections == 0  # corrected once

    rmm.contact("desk", "org-1", at(2026, 4, 20, 15))
    await pull(db, rmm, clock, at(2026, 4, 20, 16))
    await pull(db, rmm, clock, at(2026, 5, 1, 4, 20))
    run(db, at(2026, 5, 1, 4, 25))
    (_march, (april_id, _, _, start, count, total)) = bills(db)
    assert (start, count, total) == (date(2026, 4, 1), 1, Decimal("5.0000"))  # the desk and the correction
    with db() as s:
        lines = s.scalars(select(BillLine.description).where(BillLine.bill_id == april_id)
                          .order_by(BillLine.position)).all()
        assert any("Correction of bill" in line and "host-laptop" in line for line in lines)
        assert s.scalar(select(Adjustment.applied_to_bill_id)) == april_id
    before = state(db)
    assert run(db, at(2026, 5, 1, 4, 30)).drafts == [] and state(db) == before


# --- M5/G1: a device's days stay with the workspace it was in -----------------------------------


async def test_m5_g1_a_moved_device_is_billed_to_each_workspace_for_its_own_days(db, clock: FrozenClock):
    """In Acme's workspace 1-20 March, its organisation mapped to Globex on 21 March, active to 22 March:
    Acme's March bill has the device with 20 days, Globex's with 2."""
    _, ws = world(db, "acme", "globex")
    map_org(db, "org-1", ws["acme"])
    rmm = FakeRmm("org-1")
    for day in range(1, 23):
        if day == 21:
            map_org(db, "org-1", ws["globex"])
        rmm.contact("laptop", "org-1", at(2026, 3, day, 11))
        await pull(db, rmm, clock, at(2026, 3, day, 12))
    await pull(db, rmm, clock, at(2026, 4, 1, 0, 20))
    run(db, at(2026, 4, 1, 0, 25))
    found = {name: (count, usage(db, bill_id)) for bill_id, name, _, _, count, _ in bills(db)}
    assert found == {"acme": (1, [("laptop", 20, "acme main")]), "globex": (1, [("laptop", 2, "globex main")])}
    before = state(db)
    assert run(db, at(2026, 4, 1, 0, 30)).drafts == [] and state(db) == before


async def test_m5_g1_a_device_moved_within_one_customer_is_one_device_with_all_its_days(db, clock: FrozenClock):
    _, ws = world(db, "acme")
    with transaction(db) as s:
        second = Workspace(customer_id=s.get_one(Workspace, ws["acme"]).customer_id, name="acme lab",
                           created_at=T0, monthly_billing_since=date(2026, 2, 10))
        s.add(second)
        s.flush()
        lab = second.id
    map_org(db, "org-1", ws["acme"])
    rmm = FakeRmm("org-1")
    for day in range(1, 6):
        if day == 4:
            map_org(db, "org-1", lab)
        rmm.contact("laptop", "org-1", at(2026, 3, day, 11))
        await pull(db, rmm, clock, at(2026, 3, day, 12))
    await pull(db, rmm, clock, at(2026, 4, 1, 0, 20))
    run(db, at(2026, 4, 1, 0, 25))
    ((bill_id, _, _, _, count, total),) = bills(db)
    assert (count, total, usage(db, bill_id)) == (1, Decimal("2.5000"), [("laptop", 5, "acme main")])
    before = state(db)
    assert run(db, at(2026, 4, 1, 0, 30)).drafts == [] and state(db) == before


async def test_m5_a_pull_resumed_from_a_cursor_settles_from_when_its_pass_began(db, clock: FrozenClock):
    """A pass that failed half-way and was finished later read its first pages when it began."""
    _, ws = world(db, "acme")
    map_org(db, "org-1", ws["acme"])
    clock.set(at(2026, 3, 31, 23, 50))
    with transaction(db) as s:
        s.add(ConnectionState(connection="rmm", cursor="page-2", updated_at=clock.now(),
                              pass_started_at=at(2026, 3, 31, 23, 50), consecutive_failures=1))
    rmm = FakeRmm("org-1")
    rmm.contact("desk", "org-1", at(2026, 3, 30, 10))
    await pull(db, rmm, clock, at(2026, 4, 1, 1))  # resumes the pass begun before the month ended
    assert [w.connections for w in run(db, at(2026, 4, 1, 1, 5)).waiting] == [("rmm",)]
    await pull(db, rmm, clock, at(2026, 4, 1, 1, 10))  # a pass of its own
    assert run(db, at(2026, 4, 1, 1, 15)).waiting == [] and len(bills(db)) == 1


# --- migration 0003 ------------------------------------------------------------------------------


def test_m5_g1_upgrade_to_0003_gives_recorded_activity_its_devices_workspace(blank_engine):
    config = gdb.alembic_config(blank_engine)
    command.upgrade(config, "0002")
    with blank_engine.begin() as connection:
        connection.execute(insert(Partner.__table__).values(id=1, name="P", pool_mode="global", created_at=T0))
        connection.execute(insert(Customer.__table__).values(id=1, partner_id=1, name="C", timezone="UTC",
                                                             created_at=T0))
        connection.execute(insert(Workspace.__table__).values(id=5, customer_id=1, name="W", created_at=T0))
        connection.execute(insert(Device.__table__).values(id=9, connection="rmm", external_id="d", workspace_id=5,
                                                           org_external_id="o", first_seen_at=T0, updated_at=T0))
        connection.exec_driver_sql("INSERT INTO device_activity (device_id, day) VALUES (9, '2026-03-02')")
    command.upgrade(config, "0003")
    with blank_engine.connect() as connection:
        assert connection.execute(select(DeviceActivity.__table__.c.workspace_id)).scalars().all() == [5]
    command.downgrade(config, "0002")
    with blank_engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT device_id FROM device_activity").scalars().all() == [9]
    command.upgrade(config, "0003")



"""Rules L1-L17 of the license lifecycle, on SQLite and (when configured) PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from gateway.core import db as gdb
from gateway.core.access import Principal, principal_for_user, system_principal
from gateway.core.clock import FrozenClock
from gateway.core.licensing.assignment import assign
from gateway.core.licensing.daily import run_daily
from gateway.core.licensing.history import license_history, set_notes
from gateway.core.licensing.orders import list_orders
from gateway.core.licensing.pool import (
    delete_expired,
    exchange,
    set_company_settings,
    set_user_allocation,
    user_allocation,
)
from gateway.core.licensing.purchase import buy, buy_bulk
from gateway.core.licensing.queries import license_info, list_licenses
from gateway.core.licensing.renewal import renew, renew_with_coupon, set_auto_renew
from gateway.core.licensing.rules import (
    DeleteMode,
    LicenseStatus,
    activation_deadline,
    add_months,
    license_status,
    tier_discount,
)
from gateway.core.models import (
    Customer,
    Edition,
    License,
    LicenseHistory,
    LicenseType,
    Order,
    OrderKind,
    Partner,
    PoolMode,
    User,
    UserCustomer,
    UserRole,
    Workspace,
)
from gateway.core.settings import LicensingSettings
from gateway.errors import Conflict, DomainError, NotFound
from gateway.hookspecs import hookimpl
from gateway.plugins import get_plugin_manager
from gateway.sync.jobs import run_daily_job

T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
CONFIG = LicensingSettings(prices={"BUS": Decimal("30"), "ENT": Decimal("50"), "VM": Decimal("100")})


@dataclass
class World:
    partner: Partner
    bus: Edition
    ent: Edition
    vm: Edition
    acme: Customer
    globex: Customer
    ws_acme: Workspace
    ws_acme_lab: Workspace
    ws_globex: Workspace
    admin: User
    cadmin: User

    @property
    def me(self) -> Principal:
        return system_principal(self.partner.id, "test:admin")


def make_world(session: Session, at: datetime = T0) -> World:
    partner = Partner(name="MSP", email="msp@example.test", discount_percent=Decimal("10"), created_at=at)
    session.add(partner)
    bus = Edition(code="BUS", name="Business Security", license_type=LicenseType.COMPUTER)
    ent = Edition(code="ENT", name="Enterprise Security", license_type=LicenseType.COMPUTER)
    vm = Edition(code="VM", name="Virtual Machine", license_type=LicenseType.HOST)
    session.add_all([bus, ent, vm])
    acme = Customer(partner=partner, name="Acme Corp", billing_email="it@acme.test", created_at=at)
    globex = Customer(partner=partner, name="Globex", billing_email="it@globex.test", created_at=at)
    session.add_all([acme, globex])
    session.flush()
    ws_acme = Workspace(customer_id=acme.id, name="acme-main", created_at=at)
    ws_acme_lab = Workspace(customer_id=acme.id, name="acme-lab", created_at=at)
    ws_globex = Workspace(customer_id=globex.id, name="globex-main", created_at=at)
    admin = User(partner_id=partner.id, name="alice", role=UserRole.ADMIN, created_at=at)
    cadmin = User(partner_id=partner.id, name="carol", role=UserRole.CUSTOMER_ADMIN, created_at=at)
    session.add_all([ws_acme, ws_acme_lab, ws_globex, admin, cadmin])
    session.flush()
    session.add(UserCustomer(user_id=cadmin.id, customer_id=acme.id))
    session.flush()
    return World(partner, bus, ent, vm, acme, globex, ws_acme, ws_acme_lab, ws_globex, admin, cadmin)


@pytest.fixture
def w(session: Session) -> World:
    return make_world(session)


def one(session, clock, w, *, edition="BUS", seats=5, term=12, notes="") -> License:
    return buy(session, clock, CONFIG, w.me, edition=edition, seats=seats, term_months=term, notes=notes).licenses[0]


def active(session, clock, w, workspace=None, **kw) -> License:
    lic = one(session, clock, w, **kw)
    return assign(session, clock, CONFIG, w.me, lic.key, (workspace or w.ws_acme).id)


def actions(session, lic) -> list[str]:
    return list(session.scalars(
        select(LicenseHistory.action).where(LicenseHistory.license_id == lic.id).order_by(LicenseHistory.id)))


# --- L1, L17 ------------------------------------------------------------------------------


def test_l1_license_holds_key_edition_type_seats_term_purchase_partner_and_notes(session, clock, w):
    lic = one(session, clock, w, seats=7, term=24, notes="PO-4711")
    info = license_info(session, w.me, lic.key).to_dict(clock.now(), CONFIG)
    assert info["key"] == lic.key and len(lic.key) == 29
    assert (info["edition"], info["license_type"], info["seats"], info["term_months"]) == ("BUS", "computer", 7, 24)
    assert info["purchased_at"] == clock.now() and lic.partner_id == w.partner.id
    assert info["notes"] == "PO-4711" and info["status"] == "unused"
    assert info["activation_deadline"] == datetime(2027, 3, 10, 12, 0, tzinfo=UTC)


def test_l1_status_is_derived_from_dates(session, clock, w):
    lic = active(session, clock, w)
    assert license_status(lic, clock.now(), CONFIG) == LicenseStatus.ACTIVE
    expires = lic.expires_at
    assert license_status(lic, expires - timedelta(days=31), CONFIG) == LicenseStatus.ACTIVE
    assert license_status(lic, expires - timedelta(days=30), CONFIG) == LicenseStatus.EXPIRING
    assert license_status(lic, expires - timedelta(seconds=1), CONFIG) == LicenseStatus.EXPIRING
    assert license_status(lic, expires, CONFIG) == LicenseStatus.EXPIRED
    clock.set(expires + timedelta(days=1))
    delete_expired(session, clock, CONFIG, w.me, DeleteMode.ALL)
    assert license_status(lic, clock.now(), CONFIG) == LicenseStatus.VOID


def test_l17_license_type_follows_the_edition(session, clock, w):
    host = active(session, clock, w, edition="VM", seats=2)
    assert host.license_type == LicenseType.HOST
    w.vm.license_type = LicenseType.SOCKET
    session.flush()
    migrated = renew(session, clock, CONFIG, w.me, host.key, years=1, edition="ENT").license
    assert migrated.license_type == LicenseType.COMPUTER
    assert {t.value for t in LicenseType} == {"computer", "host", "socket", "user", "administrator"}


# --- L2, L3, L5 -------------------------------------------------------------------------------


def test_l2_term_starts_at_assignment_not_at_purchase(session, clock, w):
    lic = one(session, clock, w, term=12)
    assert lic.activated_at is None and lic.expires_at is None
    clock.advance(days=75)
    assign(session, clock, CONFIG, w.me, lic.key, w.ws_acme.id)
    assert lic.activated_at == clock.now()
    assert lic.expires_at == add_months(clock.now(), 12) == datetime(2027, 5, 24, 12, 0, tzinfo=UTC)
    assert w.ws_acme.edition_id == w.bus.id


def test_l3_key_can_be_activated_on_the_last_day_of_the_window(session, clock, w):
    lic = one(session, clock, w)
    clock.set(activation_deadline(lic) - timedelta(seconds=1))
    assert clock.now().date() == datetime(2027, 3, 10).date()
    assign(session, clock, CONFIG, w.me, lic.key, w.ws_acme.id)
    assert license_status(lic, clock.now(), CONFIG) == LicenseStatus.ACTIVE


def test_l3_key_not_activated_within_12_months_expires_unused(session, clock, w):
    lic = one(session, clock, w)
    clock.set(activation_deadline(lic))
    assert license_status(lic, clock.now(), CONFIG) == LicenseStatus.EXPIRED
    with pytest.raises(Conflict, match="expired unused.*2027-03-10") as info:
        assign(session, clock, CONFIG, w.me, lic.key, w.ws_acme.id)
    assert info.value.field == "key"
    first = run_daily(session, clock, CONFIG)
    second = run_daily(session, clock, CONFIG)
    assert first.expired_unused == [lic.key] and second.expired_unused == []
    assert actions(session, lic) == ["purchased", "expired_unused"]


def test_l3_activation_window_of_a_month_end_purchase_is_clamped(session, clock, w):
    clock.set(datetime(2028, 2, 29, 9, 0, tzinfo=UTC))
    lic = one(session, clock, w)
    assert activation_deadline(lic) == datetime(2029, 2, 28, 9, 0, tzinfo=UTC)


def test_l5_one_purchase_gives_one_key_for_one_workspace(session, clock, w):
    purchase = buy(session, clock, CONFIG, w.me, edition="BUS", seats=3, term_months=12)
    assert len(purchase.licenses) == 1 and purchase.order.quantity == 1 and purchase.order.kind == OrderKind.NEW
    lic = purchase.licenses[0]
    assign(session, clock, CONFIG, w.me, lic.key, w.ws_acme.id)
    with pytest.raises(Conflict, match="exactly one"):
        assign(session, clock, CONFIG, w.me, lic.key, w.ws_globex.id)
    other = one(session, clock, w)
    with pytest.raises(Conflict, match="already covered by license"):
        assign(session, clock, CONFIG, w.me, other.key, w.ws_acme.id)


def test_l5_single_purchase_is_priced_with_the_partner_discount(session, clock, w):
    order = buy(session, clock, CONFIG, w.me, edition="BUS", seats=4, term_months=24).order
    # 30 per seat-year x 4 seats x 2 years = 240, less the partner's 10%.
    assert (order.list_total, order.discount_percent, order.total) == (Decimal("240"), Decimal("10"), Decimal("216"))


def test_l5_mistyped_and_unknown_keys_are_told_apart(session, clock, w):
    lic = one(session, clock, w)
    typo = lic.key[:3] + ("0" if lic.key[3] != "0" else "1") + lic.key[4:]
    with pytest.raises(DomainError, match="mistyped") as info:
        assign(session, clock, CONFIG, w.me, typo, w.ws_acme.id)
    assert info.value.field == "key" and not isinstance(info.value, NotFound)
    assert assign(session, clock, CONFIG, w.me, lic.key.lower().replace("-", " "), w.ws_acme.id).id == lic.id


# --- L6 ----------------------------------------------------------------------------------------


def test_l6_bulk_gives_customers_times_devices_keys_with_tier_on_top_of_partner_discount(session, clock, w):
    purchase = buy_bulk(session, clock, CONFIG, w.me, edition="BUS", customers=25, devices_per_customer=3,
                        term_months=12)
    assert len(purchase.licenses) == 25 and {lic.seats for lic in purchase.licenses} == {3}
    assert len({lic.key for lic in purchase.licenses}) == 25
    order = purchase.order
    assert order.kind == OrderKind.BULK and order.quantity == 25
    # 30 x 3 seats x 25 keys = 2250; tier 25 -> 10%, partner 10% on top: 0.9 x 0.9 = 19% off.
    assert order.list_total == Decimal("2250")
    assert order.discount_percent == Decimal("19")
    assert order.total == Decimal("1822.50")


@pytest.mark.parametrize(
    ("keys", "percent"),
    [(9, 0), (10, 5), (24, 5), (25, 10), (49, 10), (50, 15), (100, 20), (250, 25), (499, 25), (500, 30), (1000, 35)],
)
def test_l6_discount_tiers_start_at_10_25_50_100_250_500_1000(keys, percent):
    assert tier_discount(CONFIG, keys) == Decimal(percent)


def test_l6_tier_percentages_are_configuration(session, clock, w):
    config = CONFIG.model_copy(update={"bulk_discount_tiers": {2: Decimal("50")}})
    order = buy_bulk(session, clock, config, w.me, edition="BUS", customers=2, devices_per_customer=1,
                     term_months=12).order
    assert order.discount_percent == Decimal("55")  # 50% tier on top of 10% partner
    assert order.total == Decimal("27.00")


def test_l6_edition_without_price_is_refused_with_the_setting_to_fix(session, clock, w):
    with pytest.raises(DomainError, match="licensing.prices.BUS") as info:
        buy(session, clock, LicensingSettings(), w.me, edition="BUS", seats=1, term_months=12)
    assert info.value.field == "edition"
    with pytest.raises(DomainError, match="unknown edition 'NOPE'.*BUS, ENT, VM"):
        buy(session, clock, CONFIG, w.me, edition="NOPE", seats=1, term_months=12)


# --- L7, L8, L9 ----------------------------------------------------------------------------------


def test_l7_renewal_adds_whole_years_to_the_current_expiry(session, clock, w):
    lic = active(session, clock, w, seats=2)
    old_expiry = lic.expires_at
    clock.advance(days=200)
    renewal = renew(session, clock, CONFIG, w.me, lic.key, years=2)
    assert lic.expires_at == add_months(old_expiry, 24)
    assert renewal.order.kind == OrderKind.RENEWAL and renewal.order.term_months == 24
    assert renewal.order.total == Decimal("108.00")  # 30 x 2 seats x 2 years less 10%
    with pytest.raises(DomainError) as info:
        renew(session, clock, CONFIG, w.me, lic.key, years=0)
    assert info.value.field == "years"


def test_l7_an_expired_license_renews_from_the_renewal_date(session, clock, w):
    lic = active(session, clock, w)
    clock.set(lic.expires_at + timedelta(days=40))
    renew(session, clock, CONFIG, w.me, lic.key, years=1)
    assert lic.expires_at == add_months(clock.now(), 12)
    assert license_status(lic, clock.now(), CONFIG) == LicenseStatus.ACTIVE


def test_l7_an_unused_key_has_nothing_to_renew(session, clock, w):
    lic = one(session, clock, w)
    with pytest.raises(Conflict, match="not been activated"):
        renew(session, clock, CONFIG, w.me, lic.key, years=1)


def test_l8_renew_with_coupon_takes_soonest_expiry_and_skips_noted_coupons(session, clock, w):
    noted = one(session, clock, w, seats=5, notes="kept for Globex")
    clock.advance(days=1)
    soonest = one(session, clock, w, seats=5, term=24)
    clock.advance(days=1)
    later = one(session, clock, w, seats=5)
    wrong_seats = one(session, clock, w, seats=6)
    wrong_edition = one(session, clock, w, edition="ENT", seats=5)
    lic = active(session, clock, w, seats=5)
    old_expiry = lic.expires_at
    orders_before = session.scalar(select(func.count()).select_from(Order))

    renewal = renew_with_coupon(session, clock, CONFIG, w.me, lic.key)

    assert renewal.coupon.id == soonest.id and renewal.order is None
    assert lic.expires_at == add_months(old_expiry, 24)  # the coupon's own term
    assert license_status(soonest, clock.now(), CONFIG) == LicenseStatus.VOID
    for untouched in (noted, later, wrong_seats, wrong_edition):
        assert license_status(untouched, clock.now(), CONFIG) == LicenseStatus.UNUSED
    assert session.scalar(select(func.count()).select_from(Order)) == orders_before
    assert actions(session, lic)[-1] == "renewed_with_coupon"
    assert actions(session, soonest)[-1] == "consumed"
    second = renew_with_coupon(session, clock, CONFIG, w.me, lic.key)
    assert second.coupon.id == later.id


def test_l8_no_matching_coupon_is_a_conflict_that_says_what_to_do(session, clock, w):
    one(session, clock, w, seats=4)
    one(session, clock, w, seats=5, notes="reserved")
    lic = active(session, clock, w, seats=5)
    with pytest.raises(Conflict, match="no unused BUS key with 5 seats and no note") as info:
        renew_with_coupon(session, clock, CONFIG, w.me, lic.key)
    assert info.value.code == "no_coupon"


def test_l8_a_coupon_past_its_activation_window_is_not_used(session, clock, w):
    stale = one(session, clock, w, seats=5)
    clock.set(activation_deadline(stale) - timedelta(days=10))
    lic = active(session, clock, w, seats=5)
    clock.set(activation_deadline(stale))
    with pytest.raises(Conflict):
        renew_with_coupon(session, clock, CONFIG, w.me, lic.key)


def test_l8_renewing_an_expired_license_with_a_coupon_starts_today(session, clock, w):
    lic = active(session, clock, w, seats=5)
    clock.set(lic.expires_at + timedelta(days=3))
    one(session, clock, w, seats=5)
    renew_with_coupon(session, clock, CONFIG, w.me, lic.key)
    assert lic.expires_at == add_months(clock.now(), 12)


def test_l8_on_the_leap_day_the_coupon_with_the_earlier_deadline_is_taken(session, clock, w):
    # Bought later but expiring sooner: 29 Feb + 12 months clamps to 28 Feb (L3).
    clock.set(datetime(2024, 2, 28, 23, 0, tzinfo=UTC))
    bought_first = one(session, clock, w, seats=5)
    clock.set(datetime(2024, 2, 29, 1, 0, tzinfo=UTC))
    expires_first = one(session, clock, w, seats=5)
    assert activation_deadline(expires_first) < activation_deadline(bought_first)
    lic = active(session, clock, w, seats=5)

    renewal = renew_with_coupon(session, clock, CONFIG, w.me, lic.key)

    assert renewal.coupon.id == expires_first.id
    assert license_status(bought_first, clock.now(), CONFIG) == LicenseStatus.UNUSED


def _wait_until_blocked_or_done(engine: Engine, thread: threading.Thread, timeout: float = 10) -> None:
    """Return once ``thread`` has ended or some session of this database waits on a row lock."""
    deadline = time.monotonic() + timeout
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        while thread.is_alive() and time.monotonic() < deadline:
            waiting = conn.scalar(text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ))
            if waiting:
                return
            time.sleep(0.02)


def race(engine: Engine, first: Callable[[Session], object], second: Callable[[Session], object]) -> dict[str, object]:
    """Run ``first`` in a transaction kept open until ``second``, in its own, has ended or waits on a lock.

    Returns each side's result, or the exception it raised. Without a lock the second
    side reads past the first's uncommitted work; with one it waits for the commit.
    """
    factory = gdb.session_factory(engine)
    outcomes: dict[str, object] = {}
    first_ran, release = threading.Event(), threading.Event()

    def run_first() -> None:
        try:
            with gdb.transaction(factory) as s:
                outcomes["first"] = first(s)
                first_ran.set()
                release.wait(15)
        except Exception as exc:  # recorded and asserted by the caller
            outcomes["first"] = exc
        finally:
            first_ran.set()

    def run_second() -> None:
        try:
            with gdb.transaction(factory) as s:
                outcomes["second"] = second(s)
        except Exception as exc:
            outcomes["second"] = exc

    one_thread = threading.Thread(target=run_first)
    one_thread.start()
    assert first_ran.wait(15)
    other_thread = threading.Thread(target=run_second)
    other_thread.start()
    if engine.dialect.name == "postgresql":
        _wait_until_blocked_or_done(engine, other_thread)
    else:
        other_thread.join(0.2)  # SQLite shows no lock waits: a blocked writer sits in its busy handler
    release.set()
    one_thread.join(15)
    other_thread.join(15)
    return outcomes


@pytest.mark.postgres
def test_l8_two_concurrent_renewals_consume_one_coupon_once(postgres_engine):
    factory = gdb.session_factory(postgres_engine)
    clock = FrozenClock(T0)
    with gdb.transaction(factory) as s:
        w = make_world(s)
        coupon_key = buy(s, clock, CONFIG, w.me, edition="BUS", seats=5, term_months=12).licenses[0].key
        lic = buy(s, clock, CONFIG, w.me, edition="BUS", seats=5, term_months=12).licenses[0]
        assign(s, clock, CONFIG, w.me, lic.key, w.ws_acme.id)
        me, key, expiry = w.me, lic.key, lic.expires_at

    def renewing(s: Session) -> str:
        return renew_with_coupon(s, clock, CONFIG, me, key).coupon.key

    outcomes = race(postgres_engine, renewing, renewing)
    assert outcomes["first"] == coupon_key
    assert isinstance(outcomes["second"], Conflict)
    with factory() as s:
        renewed = s.scalar(select(License).where(License.key == key))
        assert renewed.expires_at == add_months(expiry, 12)
        coupon = s.scalar(select(License).where(License.key == coupon_key))
        assert coupon.consumed_at is not None
        consumed = s.scalars(select(LicenseHistory).where(LicenseHistory.action == "consumed")).all()
        assert len(consumed) == 1


@pytest.mark.postgres
def test_l8_concurrent_renewals_of_two_licenses_each_take_a_different_coupon(postgres_engine):
    # The coupon the first renewal holds is skipped (SKIP LOCKED), not waited on and lost as a Conflict.
    factory = gdb.session_factory(postgres_engine)
    clock = FrozenClock(T0)
    with gdb.transaction(factory) as s:
        w = make_world(s)
        coupons = {buy(s, clock, CONFIG, w.me, edition="BUS", seats=5, term_months=12).licenses[0].key
                   for _ in range(2)}
        keys, expiries = [], []
        for workspace in (w.ws_acme, w.ws_globex):
            lic = buy(s, clock, CONFIG, w.me, edition="BUS", seats=5, term_months=12).licenses[0]
            assign(s, clock, CONFIG, w.me, lic.key, workspace.id)
            keys.append(lic.key)
            expiries.append(lic.expires_at)
        me = w.me

    outcomes = race(
        postgres_engine,
        lambda s: renew_with_coupon(s, clock, CONFIG, me, keys[0]).coupon.key,
        lambda s: renew_with_coupon(s, clock, CONFIG, me, keys[1]).coupon.key,
    )
    assert {outcomes["first"], outcomes["second"]} == coupons, outcomes
    with factory() as s:
        for key, expiry in zip(keys, expiries, strict=True):
            assert s.scalar(select(License.expires_at).where(License.key == key)) == add_months(expiry, 12)
        consumed_at = list(s.scalars(select(License.consumed_at).where(License.key.in_(coupons))))
        assert len(consumed_at) == 2 and all(consumed_at)


def test_l9_renew_and_migrate_moves_license_and_workspace_to_the_new_edition(session, clock, w):
    lic = active(session, clock, w, seats=2)
    renewal = renew(session, clock, CONFIG, w.me, lic.key, years=1, edition="ENT")
    assert lic.edition_id == w.ent.id and w.ws_acme.edition_id == w.ent.id
    assert renewal.order.list_total == Decimal("100")  # priced at the edition migrated to: 50 x 2 seats
    entry = session.scalars(select(LicenseHistory).where(LicenseHistory.license_id == lic.id)
                            .order_by(LicenseHistory.id.desc())).first()
    assert entry.action == "renewed_migrated"
    assert entry.before["edition"] == "BUS" and entry.after["edition"] == "ENT"
    with pytest.raises(DomainError, match="already ENT"):
        renew(session, clock, CONFIG, w.me, lic.key, years=1, edition="ENT")


def test_l9_migrating_with_a_coupon_uses_a_coupon_of_the_target_edition(session, clock, w):
    one(session, clock, w, seats=2)  # same edition as the license: not the one wanted
    target = one(session, clock, w, edition="ENT", seats=2)
    lic = active(session, clock, w, seats=2)
    renewal = renew_with_coupon(session, clock, CONFIG, w.me, lic.key, edition="ENT")
    assert renewal.coupon.id == target.id and lic.edition_id == w.ent.id


# --- L10 ----------------------------------------------------------------------------------------


def test_l10_every_change_is_recorded_with_who_what_before_and_after(session, clock, w):
    alice = principal_for_user(w.admin)
    lic = buy(session, clock, CONFIG, alice, edition="BUS", seats=1, term_months=12).licenses[0]
    clock.advance(hours=1)
    assign(session, clock, CONFIG, alice, lic.key, w.ws_acme.id)
    set_notes(session, clock, alice, lic.key, "ticket 42")
    set_auto_renew(session, clock, CONFIG, alice, lic.key, False)
    renew(session, clock, CONFIG, alice, lic.key, years=1)
    rows, total = license_history(session, alice, lic.key)
    assert total == 5
    assert [r.action for r in rows] == ["purchased", "assigned", "notes_edited", "auto_renew_cancelled", "renewed"]
    assert {r.actor for r in rows} == {f"user:alice#{w.admin.id}"}
    purchased = rows[0]
    assert purchased.before == {} and purchased.after["edition"] == "BUS" and purchased.after["seats"] == 1
    notes = rows[2]
    assert notes.before == {"notes": ""} and notes.after == {"notes": "ticket 42"}
    assigned = rows[1]
    assert assigned.at == T0 + timedelta(hours=1)
    assert assigned.before["workspace_id"] is None and assigned.after["workspace_id"] == w.ws_acme.id
    assert "expires_at" in assigned.after


def test_l10_notes_can_be_edited_on_an_expired_or_void_license(session, clock, w):
    lic = active(session, clock, w)
    clock.set(lic.expires_at + timedelta(days=1))
    set_notes(session, clock, w.me, lic.key, "expired; call them")
    delete_expired(session, clock, CONFIG, w.me, DeleteMode.ALL)
    set_notes(session, clock, w.me, lic.key, "deleted on request")
    assert lic.notes == "deleted on request"
    with pytest.raises(DomainError) as info:
        set_notes(session, clock, w.me, lic.key, "x" * 2001)
    assert info.value.field == "notes"


# --- L11 ----------------------------------------------------------------------------------------


def test_l11_wildcard_search_over_key_notes_and_customer_name(session, clock, w):
    by_customer = active(session, clock, w, workspace=w.ws_globex)
    by_note = one(session, clock, w, notes="order 100% paid")
    other = one(session, clock, w, notes="order 1000 paid")

    def keys(q):
        return {i.license.key for i in list_licenses(session, clock, CONFIG, w.me, query=q)[0]}

    assert keys("globex") == {by_customer.key}
    assert keys("GLOB*") == {by_customer.key}
    assert keys("*100%*") == {by_note.key}  # % is literal, not a wildcard
    assert keys("order 100? paid") == {by_note.key, other.key}  # ? is exactly one character
    assert keys("order 10? paid") == set()
    assert keys("order*paid") == {by_note.key, other.key}
    assert keys(other.key[:11]) == {other.key}


def test_l11_filters_expired_expiring_soon_and_coupon_deadline_soon(session, clock, w):
    def at(y, m, d):
        clock.set(datetime(y, m, d, 12, 0, tzinfo=UTC))

    at(2026, 2, 1); coupon_dead = one(session, clock, w)  # noqa: E702 - deadline 2027-02-01
    at(2026, 2, 10); expired = active(session, clock, w, workspace=w.ws_globex)  # noqa: E702 - ends 2027-02-10
    at(2026, 3, 15); expiring = active(session, clock, w)  # noqa: E702 - ends 2027-03-15
    at(2026, 3, 20); coupon_soon = one(session, clock, w)  # noqa: E702 - deadline 2027-03-20
    at(2026, 10, 1); coupon_fresh = one(session, clock, w)  # noqa: E702 - deadline 2027-10-01
    at(2026, 12, 1); still_active = active(session, clock, w, workspace=w.ws_acme_lab)  # noqa: E702
    at(2027, 3, 1)

    def keys(**flags):
        return {i.license.key for i in list_licenses(session, clock, CONFIG, w.me, **flags)[0]}

    assert keys(expired=True) == {expired.key, coupon_dead.key}
    assert keys(expiring_soon=True) == {expiring.key}
    assert keys(coupon_deadline_soon=True) == {coupon_soon.key}
    assert keys(expired=True, expiring_soon=True) == {expired.key, coupon_dead.key, expiring.key}
    assert keys(status=LicenseStatus.ACTIVE) == {still_active.key}
    assert keys(status=LicenseStatus.UNUSED) == {coupon_soon.key, coupon_fresh.key}
    page, total = list_licenses(session, clock, CONFIG, w.me, limit=4, offset=4)
    assert total == 6 and len(page) == 2


# --- L12 ----------------------------------------------------------------------------------------


def test_l12_order_history_lists_every_purchase_and_which_keys_are_used(session, clock, w):
    single = one(session, clock, w)
    bulk = buy_bulk(session, clock, CONFIG, w.me, edition="BUS", customers=3, devices_per_customer=5,
                    term_months=12).licenses
    assign(session, clock, CONFIG, w.me, bulk[0].key, w.ws_acme.id)
    renew(session, clock, CONFIG, w.me, bulk[0].key, years=1)
    lic_b = assign(session, clock, CONFIG, w.me, single.key, w.ws_globex.id)
    renew_with_coupon(session, clock, CONFIG, w.me, lic_b.key)  # consumes bulk[1]
    infos, total = list_orders(session, clock, CONFIG, w.me)
    assert total == 3
    by_kind = {i.order.kind: i.to_dict() for i in infos}
    assert set(by_kind) == {OrderKind.NEW, OrderKind.BULK, OrderKind.RENEWAL}
    assert (by_kind[OrderKind.BULK]["used_keys"], by_kind[OrderKind.BULK]["unused_keys"]) == (2, 1)
    used = {k["key"]: k["used"] for k in by_kind[OrderKind.BULK]["keys"]}
    assert used == {bulk[0].key: True, bulk[1].key: True, bulk[2].key: False}
    assert by_kind[OrderKind.RENEWAL]["keys"][0]["key"] == bulk[0].key
    assert list_orders(session, clock, CONFIG, w.me, kind=OrderKind.NEW)[1] == 1


# --- L13 ----------------------------------------------------------------------------------------


def test_l13_auto_renewal_is_on_by_default_shows_next_date_and_can_be_cancelled(session, clock, w):
    lic = active(session, clock, w)
    info = license_info(session, w.me, lic.key).to_dict(clock.now(), CONFIG)
    assert info["auto_renew"] is True and info["next_renewal_date"] == lic.expires_at
    set_auto_renew(session, clock, CONFIG, w.me, lic.key, False)
    info = license_info(session, w.me, lic.key).to_dict(clock.now(), CONFIG)
    assert info["auto_renew"] is False and info["next_renewal_date"] is None
    set_auto_renew(session, clock, CONFIG, w.me, lic.key, True)
    assert actions(session, lic)[-2:] == ["auto_renew_cancelled", "auto_renew_restored"]


def test_l13_daily_job_auto_renews_on_the_renewal_date_without_losing_days(session, clock, w):
    lic = active(session, clock, w, seats=3)
    old_expiry = lic.expires_at
    clock.set(old_expiry + timedelta(hours=14))
    report = run_daily(session, clock, CONFIG)
    assert report.auto_renewed == [lic.key] and report.expired == []
    assert lic.expires_at == add_months(old_expiry, 12)
    order = session.scalars(select(Order).where(Order.kind == OrderKind.RENEWAL)).one()
    assert order.actor == "system:daily" and order.total == Decimal("81.00")
    assert run_daily(session, clock, CONFIG).auto_renewed == []


def test_l13_cancelled_auto_renewal_lets_the_license_expire(session, clock, w):
    lic = active(session, clock, w)
    set_auto_renew(session, clock, CONFIG, w.me, lic.key, False)
    old_expiry = lic.expires_at
    clock.set(old_expiry + timedelta(hours=1))
    report = run_daily(session, clock, CONFIG)
    assert report.expired == [lic.key] and report.auto_renewed == []
    assert lic.expires_at == old_expiry and session.scalars(select(Order).where(Order.kind == OrderKind.RENEWAL)).all() == []


# --- L14 ----------------------------------------------------------------------------------------


def test_l14_bulk_licenses_sit_in_the_pool_and_replace_an_expired_license(session, clock, w):
    lic = active(session, clock, w, seats=3)
    clock.advance(days=180)  # pool keys bought later are still inside their activation window
    pool = buy_bulk(session, clock, CONFIG, w.me, edition="BUS", customers=3, devices_per_customer=3,
                    term_months=12).licenses
    small = buy_bulk(session, clock, CONFIG, w.me, edition="BUS", customers=1, devices_per_customer=2,
                     term_months=12).licenses[0]
    assert all(p.in_pool for p in pool) and not lic.in_pool
    pool_keys = {i.license.key for i in list_licenses(session, clock, CONFIG, w.me, in_pool=True)[0]}
    assert pool_keys == {p.key for p in pool} | {small.key}
    clock.set(lic.expires_at + timedelta(hours=2))
    report = run_daily(session, clock, CONFIG)
    assert report.exchanged == [(lic.key, pool[0].key)] and report.auto_renewed == []
    assert lic.workspace_id is None and lic.replaced_by_id == pool[0].id
    assert pool[0].workspace_id == w.ws_acme.id and pool[0].activated_at == clock.now() and not pool[0].in_pool
    assert license_status(lic, clock.now(), CONFIG) == LicenseStatus.EXPIRED
    assert actions(session, lic)[-2:] == ["expired", "exchanged_out"]
    assert actions(session, pool[0])[-1] == "exchanged_in"
    assert run_daily(session, clock, CONFIG).exchanged == []


def test_l14_on_the_leap_day_the_pool_key_with_the_earlier_deadline_replaces_first(session, clock, w):
    clock.set(datetime(2024, 2, 28, 23, 0, tzinfo=UTC))
    bought_first = buy_bulk(session, clock, CONFIG, w.me, edition="BUS", customers=1, devices_per_customer=5,
                            term_months=12).licenses[0]
    clock.set(datetime(2024, 2, 29, 1, 0, tzinfo=UTC))
    expires_first = buy_bulk(session, clock, CONFIG, w.me, edition="BUS", customers=1, devices_per_customer=5,
                             term_months=12).licenses[0]
    lic = active(session, clock, w, seats=5, term=1)
    clock.set(lic.expires_at + timedelta(days=1))

    replacement = exchange(session, clock, CONFIG, w.me, lic.key)

    assert replacement.id == expires_first.id
    assert license_status(bought_first, clock.now(), CONFIG) == LicenseStatus.UNUSED


def test_l14_automatic_exchange_switched_off_leaves_the_pool_alone(session, clock, w):
    lic = active(session, clock, w, seats=3)
    set_auto_renew(session, clock, CONFIG, w.me, lic.key, False)
    clock.advance(days=180)
    pool = buy_bulk(session, clock, CONFIG, w.me, edition="BUS", customers=1, devices_per_customer=3,
                    term_months=12).licenses
    set_company_settings(session, w.me, automatic_exchange=False)
    clock.set(lic.expires_at + timedelta(hours=2))
    report = run_daily(session, clock, CONFIG)
    assert report.exchanged == [] and report.expired == [lic.key]
    assert lic.workspace_id == w.ws_acme.id and pool[0].in_pool and pool[0].activated_at is None
    replacement = exchange(session, clock, CONFIG, w.me, lic.key)  # by hand it still works
    assert replacement.id == pool[0].id and replacement.workspace_id == w.ws_acme.id


def test_l14_no_pool_key_of_the_edition_means_no_exchange(session, clock, w):
    lic = active(session, clock, w, seats=3)
    set_auto_renew(session, clock, CONFIG, w.me, lic.key, False)
    buy_bulk(session, clock, CONFIG, w.me, edition="ENT", customers=1, devices_per_customer=3, term_months=12)
    clock.set(lic.expires_at + timedelta(hours=2))
    assert run_daily(session, clock, CONFIG).exchanged == []
    with pytest.raises(Conflict, match="pool holds no unused key"):
        exchange(session, clock, CONFIG, w.me, lic.key)


# --- L15 ----------------------------------------------------------------------------------------


def test_l15_a_user_pool_limits_the_paid_licenses_a_user_can_activate(session, clock, w):
    set_user_allocation(session, w.me, w.admin.id, pool_mode=PoolMode.LIMITED, pool_limit=1)
    alice = principal_for_user(w.admin)
    first, second = one(session, clock, w), one(session, clock, w)
    assign(session, clock, CONFIG, alice, first.key, w.ws_acme.id)
    assert first.pool_user_id == w.admin.id
    with pytest.raises(Conflict, match="limited to 1 paid licenses") as info:
        assign(session, clock, CONFIG, alice, second.key, w.ws_globex.id)
    assert info.value.code == "pool_limit"
    # another user on the global pool is not limited
    bob = User(partner_id=w.partner.id, name="bob", role=UserRole.ADMIN, created_at=T0)
    session.add(bob)
    session.flush()
    assign(session, clock, CONFIG, principal_for_user(bob), second.key, w.ws_globex.id)


def test_l15_a_company_setting_overrides_the_user_setting(session, clock, w):
    set_user_allocation(session, w.me, w.admin.id, pool_mode=PoolMode.LIMITED, pool_limit=1)
    set_company_settings(session, w.me, pool_mode=PoolMode.LIMITED, pool_limit=2)
    alice = principal_for_user(w.admin)
    a, b, c = one(session, clock, w), one(session, clock, w), one(session, clock, w)
    assign(session, clock, CONFIG, alice, a.key, w.ws_acme.id)
    assign(session, clock, CONFIG, alice, b.key, w.ws_globex.id)  # the user's own limit of 1 is overridden
    with pytest.raises(Conflict, match="company's limited pool allows 2"):
        assign(session, clock, CONFIG, alice, c.key, w.ws_acme_lab.id)
    with pytest.raises(DomainError) as info:
        set_company_settings(session, w.me, pool_mode=PoolMode.LIMITED)
    assert info.value.field == "pool_limit"


def test_l15_renewing_an_expired_license_respects_the_user_pool_limit(session, clock, w):
    set_user_allocation(session, w.me, w.admin.id, pool_mode=PoolMode.LIMITED, pool_limit=1)
    alice = principal_for_user(w.admin)
    b = assign(session, clock, CONFIG, alice, one(session, clock, w).key, w.ws_acme.id)
    clock.set(b.expires_at + timedelta(days=1))
    a = assign(session, clock, CONFIG, alice, one(session, clock, w).key, w.ws_globex.id)  # b no longer counts
    one(session, clock, w)  # a coupon for b

    for renewing in (
        lambda: renew(session, clock, CONFIG, alice, b.key, years=1),
        lambda: renew_with_coupon(session, clock, CONFIG, alice, b.key),
        lambda: renew(session, clock, CONFIG, w.me, b.key, years=1),  # it counts in alice's pool, whoever renews
    ):
        with pytest.raises(Conflict, match="'alice' is limited to 1 paid licenses in their user pool and has 1") as info:
            renewing()
        assert (info.value.code, info.value.field) == ("pool_limit", "key")
    assert b.expires_at < clock.now()
    assert user_allocation(session, clock, w.me, w.admin.id)["effective"]["in_use"] == 1

    renew(session, clock, CONFIG, alice, a.key, years=1)  # an active license already counts
    set_user_allocation(session, w.me, w.admin.id, pool_mode=PoolMode.LIMITED, pool_limit=2)
    renew(session, clock, CONFIG, alice, b.key, years=1)
    assert user_allocation(session, clock, w.me, w.admin.id)["effective"]["in_use"] == 2


def test_l15_renewing_an_expired_license_respects_the_company_pool_limit(session, clock, w):
    set_company_settings(session, w.me, pool_mode=PoolMode.LIMITED, pool_limit=1)
    b = active(session, clock, w)
    clock.set(b.expires_at + timedelta(days=1))
    active(session, clock, w, workspace=w.ws_globex)
    with pytest.raises(Conflict, match="company's limited pool allows 1 active licenses and 1 are in use") as info:
        renew(session, clock, CONFIG, w.me, b.key, years=1)
    assert info.value.code == "pool_limit"


def _active_assigned(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(License).where(License.workspace_id.is_not(None))) or 0


def test_l15_concurrent_assignments_never_exceed_the_company_pool_limit(db_engine):
    factory = gdb.session_factory(db_engine)
    clock = FrozenClock(T0)
    with gdb.transaction(factory) as s:
        w = make_world(s)
        set_company_settings(s, w.me, pool_mode=PoolMode.LIMITED, pool_limit=1)
        first, second = one(s, clock, w), one(s, clock, w)
        me, keys, workspaces = w.me, (first.key, second.key), (w.ws_acme.id, w.ws_globex.id)

    outcomes = race(
        db_engine,
        lambda s: assign(s, clock, CONFIG, me, keys[0], workspaces[0]).key,
        lambda s: assign(s, clock, CONFIG, me, keys[1], workspaces[1]).key,
    )
    assert outcomes["first"] == keys[0]
    assert isinstance(outcomes["second"], Conflict) and outcomes["second"].code == "pool_limit", outcomes
    with factory() as s:
        assert _active_assigned(s) == 1


def test_l15_concurrent_assignments_never_exceed_a_user_pool_limit(db_engine):
    factory = gdb.session_factory(db_engine)
    clock = FrozenClock(T0)
    with gdb.transaction(factory) as s:
        w = make_world(s)
        set_user_allocation(s, w.me, w.admin.id, pool_mode=PoolMode.LIMITED, pool_limit=1)
        first, second = one(s, clock, w), one(s, clock, w)
        alice, keys, workspaces = principal_for_user(w.admin), (first.key, second.key), (w.ws_acme.id, w.ws_globex.id)

    outcomes = race(
        db_engine,
        lambda s: assign(s, clock, CONFIG, alice, keys[0], workspaces[0]).key,
        lambda s: assign(s, clock, CONFIG, alice, keys[1], workspaces[1]).key,
    )
    assert outcomes["first"] == keys[0]
    assert isinstance(outcomes["second"], Conflict) and outcomes["second"].code == "pool_limit", outcomes
    with factory() as s:
        assert _active_assigned(s) == 1


@pytest.mark.parametrize("renew_first", [True, False], ids=["renewal-first", "assignment-first"])
def test_l15_a_renewal_and_an_assignment_at_the_same_time_never_exceed_a_user_pool_limit(db_engine, renew_first):
    factory = gdb.session_factory(db_engine)
    clock = FrozenClock(T0)
    with gdb.transaction(factory) as s:
        w = make_world(s)
        set_user_allocation(s, w.me, w.admin.id, pool_mode=PoolMode.LIMITED, pool_limit=1)
        alice = principal_for_user(w.admin)
        expired = assign(s, clock, CONFIG, alice, one(s, clock, w).key, w.ws_acme.id)
        clock.set(expired.expires_at + timedelta(days=1))
        expired_key, new_key, workspace = expired.key, one(s, clock, w).key, w.ws_globex.id
        me, admin_id = w.me, w.admin.id

    def renewing(s: Session) -> str:
        return renew(s, clock, CONFIG, alice, expired_key, years=1).license.key

    def assigning(s: Session) -> str:
        return assign(s, clock, CONFIG, alice, new_key, workspace).key

    first, second = (renewing, assigning) if renew_first else (assigning, renewing)
    outcomes = race(db_engine, first, second)
    assert outcomes["first"] == (expired_key if renew_first else new_key)
    assert isinstance(outcomes["second"], Conflict) and outcomes["second"].code == "pool_limit", outcomes
    with factory() as s:
        assert user_allocation(s, clock, me, admin_id)["effective"]["in_use"] == 1


# --- L16 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (DeleteMode.ALL, {"assigned_auto", "unassigned_manual", "stale_coupon"}),
        (DeleteMode.AUTO_RENEW, {"assigned_auto", "stale_coupon"}),
        (DeleteMode.UNASSIGNED, {"unassigned_manual", "stale_coupon"}),
    ],
)
def test_l16_bulk_delete_of_expired_licenses_in_three_modes(session, clock, w, mode, expected):
    stale_coupon = one(session, clock, w)
    clock.advance(days=100)
    assigned_auto = active(session, clock, w)
    unassigned_manual = active(session, clock, w, workspace=w.ws_globex)
    set_auto_renew(session, clock, CONFIG, w.me, unassigned_manual.key, False)
    still_active = active(session, clock, w, workspace=w.ws_acme_lab, term=36)
    clock.set(assigned_auto.expires_at + timedelta(days=1))
    unassigned_manual.workspace_id = None  # e.g. its workspace was removed
    session.flush()
    names = {stale_coupon.key: "stale_coupon", assigned_auto.key: "assigned_auto",
             unassigned_manual.key: "unassigned_manual", still_active.key: "still_active"}
    preview = delete_expired(session, clock, CONFIG, w.me, mode, dry_run=True)
    assert {names[lic.key] for lic in preview} == expected and all(lic.voided_at is None for lic in preview)
    deleted = delete_expired(session, clock, CONFIG, w.me, mode)
    assert {names[lic.key] for lic in deleted} == expected
    remaining = {names[i.license.key] for i in list_licenses(session, clock, CONFIG, w.me)[0]}
    assert remaining == set(names.values()) - expected
    assert actions(session, deleted[0])[-1] == "deleted"  # history survives the delete


# --- S8 on licenses -----------------------------------------------------------------------------


def test_s8_a_customer_admin_reaches_only_licenses_of_assigned_customers(session, clock, w):
    mine = active(session, clock, w, workspace=w.ws_acme)
    theirs = active(session, clock, w, workspace=w.ws_globex)
    coupon = one(session, clock, w)
    carol = principal_for_user(w.cadmin)
    assert {i.license.key for i in list_licenses(session, clock, CONFIG, carol)[0]} == {mine.key}
    for key in (theirs.key, coupon.key):
        with pytest.raises(NotFound):
            license_info(session, carol, key)
        with pytest.raises(NotFound):
            set_notes(session, clock, carol, key, "probe")
    set_notes(session, clock, carol, mine.key, "carol was here")
    assert actions(session, mine)[-1] == "notes_edited"
    # spending the partner's money or changing coverage is the admin's, even on her own customer's license
    with pytest.raises(NotFound):
        renew(session, clock, CONFIG, carol, mine.key, years=1)
    with pytest.raises(NotFound):
        set_auto_renew(session, clock, CONFIG, carol, mine.key, False)
    with pytest.raises(NotFound):
        buy(session, clock, CONFIG, carol, edition="BUS", seats=1, term_months=12)
    with pytest.raises(NotFound):
        list_orders(session, clock, CONFIG, carol)


# --- L4: the daily job and its reminders -------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []

    @hookimpl
    def gateway_notify(self, event, payload):
        self.sent.append((event, dict(payload)))


async def _job(db, clock, recorder):
    plugins = get_plugin_manager(extra_plugins=[recorder], load_entry_points=False)
    return await run_daily_job(db, clock, CONFIG, plugins)


def _setup_expiring(db, clock, *, auto_renew=True) -> tuple[str, datetime]:
    with gdb.transaction(db) as s:
        w = make_world(s)
        lic = active(s, clock, w)
        if not auto_renew:
            set_auto_renew(s, clock, CONFIG, w.me, lic.key, False)
        return lic.key, lic.expires_at


async def test_l4_partner_reminders_at_30_14_and_7_days_each_sent_once(db, clock):
    recorder = Recorder()
    key, expires = _setup_expiring(db, clock)
    sent_on = {}
    day = expires.replace(hour=2) - timedelta(days=40)
    while day < expires:
        clock.set(day)
        await _job(db, clock, recorder)
        await _job(db, clock, recorder)  # twice a day: nothing new
        for _event, payload in recorder.sent:
            sent_on.setdefault(payload["reminder"], (expires.date() - day.date()).days)
        day += timedelta(days=1)
    reminders = [p["reminder"] for _e, p in recorder.sent]
    assert reminders == ["partner-30d", "partner-14d", "partner-7d"]
    assert sent_on == {"partner-30d": 30, "partner-14d": 14, "partner-7d": 7}
    assert {e for e, _p in recorder.sent} == {"license.reminder"}
    payload = recorder.sent[0][1]
    assert payload["audience"] == "partner" and payload["to"] == "msp@example.test"
    assert payload["license_key"] == key and payload["customer_name"] == "Acme Corp"


async def test_l4_end_user_is_told_only_at_3_days_when_not_renewed(db, clock):
    recorder = Recorder()
    key, expires = _setup_expiring(db, clock, auto_renew=False)
    for days_before in (7, 4, 3, 2):
        clock.set(expires.replace(hour=2) - timedelta(days=days_before))
        await _job(db, clock, recorder)
    end_user = [p for _e, p in recorder.sent if p["audience"] == "end_user"]
    assert len(end_user) == 1
    assert end_user[0]["days_left"] == 3 and end_user[0]["to"] == "it@acme.test"
    assert all(p["audience"] == "partner" for _e, p in recorder.sent if p is not end_user[0])


async def test_l4_a_renewed_license_sends_no_end_user_notice_and_restarts_reminders(db, clock):
    recorder = Recorder()
    key, expires = _setup_expiring(db, clock, auto_renew=False)
    clock.set(expires - timedelta(days=8))
    await _job(db, clock, recorder)
    assert [p["reminder"] for _e, p in recorder.sent] == ["partner-14d"]
    with gdb.transaction(db) as s:
        partner_id = s.scalar(select(Partner.id))
        renew(s, clock, CONFIG, system_principal(partner_id, "t"), key, years=1)
    clock.set(expires.replace(hour=2) - timedelta(days=3))
    await _job(db, clock, recorder)
    assert [p["reminder"] for _e, p in recorder.sent] == ["partner-14d"]
    clock.set(add_months(expires, 12) - timedelta(days=29))
    await _job(db, clock, recorder)
    assert [p["reminder"] for _e, p in recorder.sent] == ["partner-14d", "partner-30d"]


async def test_l4_after_missed_days_only_the_most_urgent_reminder_is_sent(db, clock):
    recorder = Recorder()
    _key, expires = _setup_expiring(db, clock)
    clock.set(expires - timedelta(days=6))
    await _job(db, clock, recorder)
    assert [p["reminder"] for _e, p in recorder.sent] == ["partner-7d"]


async def test_l4_a_failing_notifier_does_not_stop_the_others(db, clock):
    class Broken:
        @hookimpl
        def gateway_notify(self, event, payload):
            raise RuntimeError("smtp down")

    recorder = Recorder()
    _setup_expiring(db, clock)
    plugins = get_plugin_manager(extra_plugins=[Broken(), recorder], load_entry_points=False)
    clock.set(clock.now() + timedelta(days=360))
    await run_daily_job(db, clock, CONFIG, plugins)
    assert len(recorder.sent) == 1 and plugins.failures

"""Issue 13: license rules L2-L15 that had no test able to notice them broken, and the fixes of items 6-9.

Each test is named after the rule it proves (see tests/core/test_licensing.py for the rest).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from alembic import command
from sqlalchemy import insert, inspect, select
from test_licensing import CONFIG, Recorder, World, actions, active, make_world, one

from gateway.core import db as gdb
from gateway.core.access import principal_for_user
from gateway.core.licensing.assignment import assign
from gateway.core.licensing.daily import run_daily
from gateway.core.licensing.history import license_history, set_notes
from gateway.core.licensing.pool import (
    company_settings,
    exchange,
    set_company_settings,
    set_pool,
    set_user_allocation,
    user_allocation,
)
from gateway.core.licensing.purchase import buy_bulk
from gateway.core.licensing.queries import license_info, list_licenses
from gateway.core.licensing.renewal import renew, renew_with_coupon, set_auto_renew
from gateway.core.licensing.rules import LicenseStatus, activation_deadline, license_status
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
    UserRole,
    Workspace,
)
from gateway.core.settings import LicensingSettings
from gateway.errors import Conflict, DomainError
from gateway.plugins import get_plugin_manager
from gateway.sync.jobs import run_daily_job


@pytest.fixture
def w(session) -> World:
    return make_world(session)


def _pool_key(session, clock, w, *, seats: int, edition: str = "BUS") -> License:
    return buy_bulk(session, clock, CONFIG, w.me, edition=edition, customers=1, devices_per_customer=seats,
                    term_months=12).licenses[0]


def _exchanged_out(session, clock, w) -> tuple[License, License]:
    """An Acme license that expired and was exchanged for a pool key by the daily job (L14)."""
    lic = active(session, clock, w, seats=3)
    clock.advance(days=180)
    replacement = _pool_key(session, clock, w, seats=3)
    clock.set(lic.expires_at + timedelta(hours=2))
    assert run_daily(session, clock, CONFIG).exchanged == [(lic.key, replacement.key)]
    return lic, replacement


# --- item 6: L5, a key serves one customer with one workspace for life ---------------------------


def test_l5_a_key_exchanged_out_of_a_workspace_never_serves_another_customer(session, clock, w):
    lic, _replacement = _exchanged_out(session, clock, w)
    renew(session, clock, CONFIG, w.me, lic.key, years=1)  # the partner may still renew it
    assert license_status(lic, clock.now(), CONFIG) == LicenseStatus.ACTIVE and lic.workspace_id is None

    for other in (w.ws_globex, w.ws_acme_lab):  # another customer, and even another workspace of Acme's
        with pytest.raises(Conflict, match="bound to workspace 'acme-main'.*single workspace") as info:
            assign(session, clock, CONFIG, w.me, lic.key, other.id)
        assert (info.value.code, info.value.field) == ("bound_elsewhere", "key")
        assert lic.workspace_id is None
    # refused before the expiry check: an expired, exchanged-out key is told the same without paying first
    clock.set(lic.expires_at + timedelta(days=1))
    with pytest.raises(Conflict, match="bound to workspace 'acme-main'"):
        assign(session, clock, CONFIG, w.me, lic.key, w.ws_globex.id)


def test_l5_a_used_key_whose_workspace_is_gone_serves_no_other(session, clock, w):
    lic = active(session, clock, w)
    lic.workspace_id, lic.bound_workspace_id = None, None  # what deleting its workspace leaves behind
    session.flush()
    with pytest.raises(Conflict, match="a workspace that no longer exists"):
        assign(session, clock, CONFIG, w.me, lic.key, w.ws_globex.id)


def test_l2_a_key_that_returns_to_its_own_workspace_keeps_its_term(session, clock, w):
    lic, replacement = _exchanged_out(session, clock, w)
    renew(session, clock, CONFIG, w.me, lic.key, years=1)
    activated, expires = lic.activated_at, lic.expires_at
    replacement.workspace_id = None  # its replacement leaves the workspace (e.g. released, M2)
    session.flush()
    clock.advance(days=50)
    assign(session, clock, CONFIG, w.me, lic.key, w.ws_acme.id)
    assert lic.workspace_id == w.ws_acme.id
    assert (lic.activated_at, lic.expires_at) == (activated, expires)  # L2: the term started at first use


# --- item 7: L15, the company's global pool overrides a user's limit -------------------------------


def test_l15_a_company_on_the_global_pool_lifts_a_users_limit(session, clock, w):
    set_user_allocation(session, w.me, w.admin.id, pool_mode=PoolMode.LIMITED, pool_limit=1)
    set_company_settings(session, w.me, pool_mode=PoolMode.GLOBAL)
    alice = principal_for_user(w.admin)
    assign(session, clock, CONFIG, alice, one(session, clock, w).key, w.ws_acme.id)
    assign(session, clock, CONFIG, alice, one(session, clock, w).key, w.ws_globex.id)  # the user's 1 is overridden
    effective = user_allocation(session, clock, w.me, w.admin.id)["effective"]
    assert effective == {"source": "company", "pool_mode": "global", "pool_limit": None, "in_use": 2}
    assert company_settings(session, w.me)["pool_mode"] == "global"


def test_l15_a_company_without_a_setting_leaves_each_users_own_in_force(session, clock, w):
    assert company_settings(session, w.me) == {"automatic_exchange": True, "pool_mode": None, "pool_limit": None}
    set_user_allocation(session, w.me, w.admin.id, pool_mode=PoolMode.LIMITED, pool_limit=1)
    set_company_settings(session, w.me, pool_mode=PoolMode.GLOBAL)
    set_company_settings(session, w.me, unset_pool_mode=True)  # back to "not set"
    assert company_settings(session, w.me)["pool_mode"] is None
    alice = principal_for_user(w.admin)
    assign(session, clock, CONFIG, alice, one(session, clock, w).key, w.ws_acme.id)
    with pytest.raises(Conflict, match="'alice' is limited to 1"):
        assign(session, clock, CONFIG, alice, one(session, clock, w).key, w.ws_globex.id)
    bob = User(partner_id=w.partner.id, name="bob", role=UserRole.ADMIN, created_at=clock.now())
    session.add(bob)
    session.flush()
    assert user_allocation(session, clock, w.me, bob.id)["effective"]["source"] == "default"
    with pytest.raises(DomainError) as info:
        set_company_settings(session, w.me, unset_pool_mode=True, pool_mode=PoolMode.GLOBAL)
    assert info.value.field == "pool_mode"


def test_l15_a_company_limit_counts_the_licenses_of_every_user(session, clock, w):
    set_company_settings(session, w.me, pool_mode=PoolMode.LIMITED, pool_limit=1)
    bob = User(partner_id=w.partner.id, name="bob", role=UserRole.ADMIN, created_at=clock.now())
    session.add(bob)
    session.flush()
    assign(session, clock, CONFIG, principal_for_user(bob), one(session, clock, w).key, w.ws_acme.id)
    with pytest.raises(Conflict, match="company's limited pool allows 1 active licenses and 1 are in use"):
        assign(session, clock, CONFIG, principal_for_user(w.admin), one(session, clock, w).key, w.ws_globex.id)


# --- item 8: L4, an auto-renewal that cannot happen warns the partner and the end user --------------


NO_BUS_PRICE = LicensingSettings(prices={"ENT": Decimal("50")})


async def _run_job(db, clock, recorder, config):
    plugins = get_plugin_manager(extra_plugins=[recorder], load_entry_points=False)
    return await run_daily_job(db, clock, config, plugins)


async def test_l4_an_auto_renewal_that_will_fail_warns_the_partner_once_and_the_end_user_at_3_days(db, clock):
    with gdb.transaction(db) as s:
        w = make_world(s)
        lic = active(s, clock, w)
        key, expires = lic.key, lic.expires_at
    recorder = Recorder()
    day = expires.replace(hour=2) - timedelta(days=40)
    while day <= expires + timedelta(days=1):
        clock.set(day)
        await _run_job(db, clock, recorder, NO_BUS_PRICE)
        await _run_job(db, clock, recorder, NO_BUS_PRICE)  # twice a day: nothing new
        day += timedelta(days=1)

    sent = [(e, p.get("reminder"), p.get("days_left")) for e, p in recorder.sent]
    assert sent == [
        ("license.renewal_at_risk", "partner-renewal-at-risk", 30),
        ("license.reminder", "partner-30d", 30),
        ("license.reminder", "partner-14d", 14),
        ("license.reminder", "partner-7d", 7),
        ("license.reminder", "end-user-3d", 3),
        ("license.auto_renew_failed", None, None),
    ]
    at_risk, reminder = recorder.sent[0][1], recorder.sent[1][1]
    assert at_risk["audience"] == "partner" and at_risk["to"] == "msp@example.test"
    assert "licensing.prices.BUS" in at_risk["reason"] and "no pool key" in at_risk["reason"]
    assert reminder["next_renewal_date"] is None and reminder["renewal_blocked"] == at_risk["reason"]
    end_user = recorder.sent[4][1]
    assert end_user["audience"] == "end_user" and end_user["to"] == "it@acme.test"
    failed = recorder.sent[5][1]
    assert failed["license_key"] == key and failed["to"] == "msp@example.test"


async def test_l4_an_auto_renewal_a_pool_key_will_cover_is_not_at_risk(db, clock):
    with gdb.transaction(db) as s:
        w = make_world(s)
        lic = active(s, clock, w, seats=3)
        clock.advance(days=180)  # a pool key bought with the license would reach its own deadline (L3) first
        _pool_key(s, clock, w, seats=3)
        expires = lic.expires_at
    recorder = Recorder()
    for days_before in (30, 3):
        clock.set(expires.replace(hour=2) - timedelta(days=days_before))
        await _run_job(db, clock, recorder, NO_BUS_PRICE)
    # the partner's usual reminders only: no risk notice, no end-user notice
    assert [(e, p["reminder"]) for e, p in recorder.sent] == [("license.reminder", "partner-30d"),
                                                              ("license.reminder", "partner-7d")]
    assert recorder.sent[0][1]["next_renewal_date"] == expires.isoformat()


# --- item 9: L14, a pool key with a note is kept for its purpose -----------------------------------


def test_l14_the_exchange_keeps_noted_pool_keys_unless_no_other_fits(session, clock, w):
    acme = active(session, clock, w, seats=3)
    globex = active(session, clock, w, workspace=w.ws_globex, seats=3)
    clock.advance(days=180)
    noted = _pool_key(session, clock, w, seats=3)
    set_notes(session, clock, w.me, noted.key, "kept for Initech")
    plain = _pool_key(session, clock, w, seats=5)  # more seats, but no note
    clock.set(acme.expires_at + timedelta(hours=2))

    report = run_daily(session, clock, CONFIG)

    assert report.exchanged == [(acme.key, plain.key), (globex.key, noted.key)]
    history, _ = license_history(session, w.me, plain.key)
    assert "noted_key_used" not in history[-1].after
    history, _ = license_history(session, w.me, noted.key)
    assert history[-1].action == "exchanged_in"
    assert history[-1].after["noted_key_used"] == "no pool key without a note fits"


# --- tests that would notice a broken rule ---------------------------------------------------------


def test_l8_a_coupon_with_more_seats_is_not_used(session, clock, w):
    bigger = one(session, clock, w, seats=6)
    lic = active(session, clock, w, seats=5)
    with pytest.raises(Conflict, match="no unused BUS key with 5 seats") as info:
        renew_with_coupon(session, clock, CONFIG, w.me, lic.key)
    assert info.value.code == "no_coupon"
    assert license_status(bigger, clock.now(), CONFIG) == LicenseStatus.UNUSED


def test_l14_a_coupon_outside_the_pool_is_never_exchanged_in(session, clock, w):
    lic = active(session, clock, w, seats=3)
    set_auto_renew(session, clock, CONFIG, w.me, lic.key, False)
    clock.advance(days=180)
    single = one(session, clock, w, seats=3)  # a single purchase: a coupon, not a pool key
    assert not single.in_pool
    clock.set(lic.expires_at + timedelta(hours=2))
    assert run_daily(session, clock, CONFIG).exchanged == []
    with pytest.raises(Conflict) as info:
        exchange(session, clock, CONFIG, w.me, lic.key)
    assert info.value.code == "pool_empty"
    assert single.activated_at is None and single.workspace_id is None


def test_l3_the_daily_job_expires_a_leap_day_coupon_on_its_clamped_deadline(session, clock, w):
    clock.set(datetime(2024, 2, 29, 9, 0, tzinfo=UTC))
    lic = one(session, clock, w)
    clock.set(activation_deadline(lic))
    assert clock.now() == datetime(2025, 2, 28, 9, 0, tzinfo=UTC)
    assert run_daily(session, clock, CONFIG).expired_unused == [lic.key]
    assert actions(session, lic)[-1] == "expired_unused"


def test_l13_an_unassigned_license_shows_no_renewal_date_and_is_not_auto_renewed(session, clock, w):
    lic = active(session, clock, w)
    lic.workspace_id = None  # it serves no workspace any more (e.g. released, M2, or exchanged out and renewed)
    session.flush()
    info = license_info(session, w.me, lic.key).to_dict(clock.now(), CONFIG)
    assert info["auto_renew"] is True and info["status"] == "active" and info["next_renewal_date"] is None
    expires = lic.expires_at
    clock.set(expires + timedelta(hours=3))
    report = run_daily(session, clock, CONFIG)
    assert report.auto_renewed == [] and report.expired == [lic.key]
    assert lic.expires_at == expires
    assert session.scalars(select(Order).where(Order.kind == OrderKind.RENEWAL)).all() == []


def test_l11_coupon_deadline_soon_means_within_30_days(session, clock, w):
    within = one(session, clock, w)
    clock.advance(days=1)
    just_after = one(session, clock, w)
    clock.advance(days=44)
    later = one(session, clock, w)
    clock.set(activation_deadline(within) - timedelta(days=30))

    def keys():
        return {i.license.key for i in list_licenses(session, clock, CONFIG, w.me, coupon_deadline_soon=True)[0]}

    assert keys() == {within.key}
    assert license_status(just_after, clock.now(), CONFIG) == license_status(later, clock.now(), CONFIG) == \
        LicenseStatus.UNUSED


def test_l10_moving_a_key_into_and_out_of_the_pool_is_recorded(session, clock, w):
    lic = one(session, clock, w)
    set_pool(session, clock, CONFIG, w.me, lic.key, True)
    clock.advance(hours=1)
    set_pool(session, clock, CONFIG, w.me, lic.key, False)
    history, _ = license_history(session, w.me, lic.key)
    pooled, unpooled = history[-2], history[-1]
    assert (pooled.action, pooled.actor, pooled.before, pooled.after) == (
        "pooled", "test:admin", {"in_pool": False}, {"in_pool": True})
    assert (unpooled.action, unpooled.at, unpooled.before, unpooled.after) == (
        "unpooled", clock.now(), {"in_pool": True}, {"in_pool": False})


# --- migration 0005 ---------------------------------------------------------------------------------


def test_l5_l15_migration_0005_binds_used_keys_and_reads_the_old_global_default_as_not_set(blank_engine):
    config = gdb.alembic_config(blank_engine)
    command.upgrade(config, "0005-1")
    at = datetime(2026, 4, 2, tzinfo=UTC)
    with blank_engine.begin() as c:
        for pid, mode, limit in ((1, "global", None), (2, "limited", 4)):
            c.execute(insert(Partner.__table__).values(id=pid, name=f"P{pid}", created_at=at, pool_mode=mode,
                                                       pool_limit=limit))
        c.execute(insert(Customer.__table__).values(id=1, partner_id=1, name="C", timezone="UTC", created_at=at))
        c.execute(insert(Workspace.__table__).values([{"id": i, "customer_id": 1, "name": f"w{i}", "created_at": at}
                                                      for i in (1, 2)]))
        c.execute(insert(Edition.__table__).values(id=1, code="BUS", name="B", license_type=LicenseType.COMPUTER))
        common = {"partner_id": 1, "edition_id": 1, "license_type": LicenseType.COMPUTER, "seats": 1,
                  "term_months": 12, "purchased_at": at}
        c.execute(insert(License.__table__), [
            {**common, "id": 1, "key": "K1", "activated_at": at, "expires_at": at, "workspace_id": 1},
            {**common, "id": 2, "key": "K2", "activated_at": at, "expires_at": at, "workspace_id": None},
            {**common, "id": 3, "key": "K3", "activated_at": None, "expires_at": None, "workspace_id": None},
        ])
        c.execute(insert(LicenseHistory.__table__), [
            {"license_id": 2, "at": at, "actor": "a", "action": "purchased", "before": {}, "after": {"seats": 1}},
            {"license_id": 2, "at": at, "actor": "a", "action": "assigned", "before": {}, "after": {"workspace_id": 2}},
            {"license_id": 2, "at": at, "actor": "a", "action": "exchanged_out", "before": {"workspace_id": 2},
             "after": {"workspace_id": None}},
        ])

    def state():
        with blank_engine.connect() as c:
            partners = c.exec_driver_sql("SELECT id, pool_mode, pool_limit FROM partners ORDER BY id").all()
            columns = {col["name"] for col in inspect(c).get_columns("licenses")}
            bound = (c.exec_driver_sql("SELECT id, bound_workspace_id FROM licenses ORDER BY id").all()
                     if "bound_workspace_id" in columns else None)
            history = c.exec_driver_sql("SELECT count(*) FROM license_history").scalar()
            return [tuple(p) for p in partners], bound and [tuple(b) for b in bound], history

    assert state() == ([(1, "global", None), (2, "limited", 4)], None, 3)
    command.upgrade(config, "0005")
    assert state() == ([(1, None, None), (2, "limited", 4)], [(1, 1), (2, 2), (3, None)], 3)
    command.upgrade(config, "head")
    gdb.check_schema_current(blank_engine)
    command.downgrade(config, "0005-1")
    assert state() == ([(1, "global", None), (2, "limited", 4)], None, 3)
    with blank_engine.connect() as c:
        pool_mode = next(col for col in inspect(c).get_columns("partners") if col["name"] == "pool_mode")
    assert pool_mode["nullable"] is False

"""G3: reconciliation compares what each PSA holds with what the gateway billed, on SQLite and PostgreSQL.

Two PSA connections over loopback: HaloPSA (bills as invoices) and ConnectWise (bills as
the quantity of an agreement addition, where a person can change the quantity by hand).
"""

from __future__ import annotations

import asyncio
import copy
import json
from datetime import date, datetime
from decimal import Decimal

import pytest
from builders import make_gateway, write_config
from psa_world import (
    BILLED_AT,
    Recorder,
    autotask_connection,
    build_world,
    connectwise_connection,
    halo_connection,
    logging_restored,
    outbox_until_idle,
    reconcile_gateway,
)
from sqlalchemy import select

from gateway import cli
from gateway.app import Gateway
from gateway.core.access import system_principal
from gateway.core.billing import lifecycle
from gateway.core.billing.rules import month_period
from gateway.core.clock import FrozenClock
from gateway.core.db import transaction
from gateway.core.models import Bill, BillingCycle, Customer, Delivery
from gateway.core.settings import ConnectionSettings, OutboxSettings, Settings
from gateway.plugins.connectwise import simulator as cw_sim
from gateway.plugins.halopsa import simulator as halo_sim
from gateway.sync.reconcile import Difference

HALO, CW = "halo", "cw"
MARCH = (date(2026, 3, 1), date(2026, 3, 31))
NOW = datetime(2026, 4, 1, 2, 0, tzinfo=BILLED_AT.tzinfo)
MAPPED, UNMAPPED, COMPANIES = 5, 1, 7


@pytest.fixture
async def sims(aiohttp_server):
    halo = halo_sim.create_app(clients=COMPANIES)
    cw = cw_sim.create_app(companies=COMPANIES)
    halo_server, cw_server = await aiohttp_server(halo), await aiohttp_server(cw)
    return {HALO: (halo, str(halo_server.make_url("")).rstrip("/")), CW: (cw, str(cw_server.make_url("")).rstrip("/"))}


def connections(sims) -> list[dict]:
    return [halo_connection(HALO, sims[HALO][1]), connectwise_connection(CW, sims[CW][1], delivery="addition")]


@pytest.fixture
def keep_logging():
    """The CLI configures logging for the captured stream; later tests must not log into it once it is closed."""
    with logging_restored():
        yield


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def gateway(db_engine, db, sims, recorder) -> Gateway:
    settings = Settings(connections=[ConnectionSettings(**c) for c in connections(sims)], outbox=OutboxSettings())
    return make_gateway(db_engine, FrozenClock(NOW), recorder, settings=settings, db=db)


def company_ids(sims) -> dict[str, list[str]]:
    return {HALO: [str(i) for i in sorted(sims[HALO][0][halo_sim.STATE].clients)],
            CW: [str(i) for i in sorted(sims[CW][0][cw_sim.STATE].companies)]}


def bills_by_customer(db) -> dict[str, Bill]:
    with db() as s:
        return {name: bill for bill, name in s.execute(select(Bill, Customer.name).join(Customer))}


def key_of(db, connection: str, bill: Bill) -> str:
    with db() as s:
        return s.scalar(select(Delivery.key).where(Delivery.bill_id == bill.id, Delivery.connection == connection))


def money(value: Decimal) -> str:
    return str(value.quantize(Decimal("0.01")))


async def test_g3_after_delivery_nothing_differs_and_every_difference_is_then_reported_with_both_numbers(
    db, db_engine, gateway, sims, recorder, tmp_path, capsys, keep_logging
):
    ids = company_ids(sims)
    world = build_world(db, customers=MAPPED, unmapped_customers=UNMAPPED,
                        psa={HALO: ids[HALO][:MAPPED], CW: ids[CW][:MAPPED]}, issue=False)
    principal = system_principal(world.partner_id, "test")
    late = world.bill_ids[MAPPED - 1]  # the last mapped customer's bill stays a draft for now
    with transaction(db) as s:
        for bill_id in world.bill_ids:
            if bill_id != late:
                lifecycle.finalize_bill(s, principal, bill_id, now=NOW)
    done = await outbox_until_idle(gateway, "w1")
    assert (done.delivered, done.dead, done.failed) == (2 * (MAPPED - 1), 0, 0)

    report = await reconcile_gateway(gateway, *MARCH)

    assert report.clean and report.differences == [] and report.errors == []
    assert (report.checked, report.matched) == (2 * (MAPPED - 1), 2 * (MAPPED - 1))
    assert report.customers_without_psa == [f"Customer {MAPPED:05d}"]
    names = {HALO: {str(i): c["name"] for i, c in sims[HALO][0][halo_sim.STATE].clients.items()},
             CW: {str(i): c["name"] for i, c in sims[CW][0][cw_sim.STATE].companies.items()}}
    assert sorted(report.unmapped_psa_companies, key=lambda c: (c["connection"], int(c["external_id"]))) == [
        {"connection": connection, "external_id": external_id, "name": names[connection][external_id]}
        for connection in (CW, HALO) for external_id in ids[connection][MAPPED:]
    ]
    assert not [event for event, _ in recorder.notes if event == "reconciliation.difference"]

    # Now the PSAs and the gateway drift apart, in every way reconciliation knows.
    bills = bills_by_customer(db)
    halo_state, cw_state = sims[HALO][0][halo_sim.STATE], sims[CW][0][cw_sim.STATE]
    # 1. HaloPSA: a person changes the unit price on customer 0's invoice.
    repriced = bills["Customer 00000"]
    invoice = _halo_invoice(halo_state, key_of(db, HALO, repriced))
    line = invoice["lines"][0]
    line["unit_price"] = 12.5
    line["net_amount"] = float(Decimal(str(line["qty_order"])) * Decimal("12.5"))
    invoice["total"] = line["net_amount"]
    # 2. ConnectWise: a person raises the quantity on customer 1's agreement addition by two devices.
    recounted = bills["Customer 00001"]
    addition = _cw_addition(cw_state, key_of(db, CW, recounted))
    addition["quantity"] = float(recounted.device_count + 2)
    # 3. HaloPSA: customer 2's invoice is deleted.
    deleted = bills["Customer 00002"]
    del halo_state.invoices[_halo_invoice(halo_state, key_of(db, HALO, deleted))["id"]]
    # 4. HaloPSA: an invoice carries a gateway key this gateway never made (another install, a copy by hand).
    stranger_key = "gw-halo-9999-plan-9999-20260301-20260331"
    halo_state.invoices[99999] = {
        "id": 99999, "client_id": int(ids[HALO][-1]), "reference": stranger_key, "total": 30.0,
        "internal_note": f"gateway-bill key={stranger_key} period=2026-03-01/2026-03-31 devices=3",
        "lines": [{"id": 99999, "item_shortdescription": "Devices", "qty_order": 3.0, "unit_price": 10.0,
                   "net_amount": 30.0, "tax_amount": 0.0}],
    }
    # 5. The draft is issued now: its deliveries are queued but not pushed yet.
    with transaction(db) as s:
        lifecycle.finalize_bill(s, principal, late, now=NOW)
    pending = bills_by_customer(db)[f"Customer {MAPPED - 1:05d}"]

    report = await reconcile_gateway(gateway, *MARCH)

    devices = f"{pending.device_count} devices, {pending.total:.2f} USD"
    expected = {
        Difference(HALO, "Customer 00000", key_of(db, HALO, repriced), "amount", money(repriced.total),
                   money(Decimal(repriced.device_count) * Decimal("12.5"))),
        Difference(CW, "Customer 00001", key_of(db, CW, recounted), "quantity", str(recounted.device_count),
                   str(recounted.device_count + 2)),
        Difference(CW, "Customer 00001", key_of(db, CW, recounted), "amount", money(recounted.total),
                   money(recounted.total / recounted.device_count * (recounted.device_count + 2))),
        Difference(HALO, "Customer 00002", key_of(db, HALO, deleted), "missing_in_psa",
                   f"{deleted.device_count} devices, {deleted.total:.2f} USD", "nothing"),
        Difference(HALO, ids[HALO][-1], stranger_key, "unknown_in_psa", "nothing", "3 x, 30.00"),
        Difference(HALO, f"Customer {MAPPED - 1:05d}", key_of(db, HALO, pending), "not_delivered", devices,
                   "delivery pending"),
        Difference(CW, f"Customer {MAPPED - 1:05d}", key_of(db, CW, pending), "not_delivered", devices,
                   "delivery pending"),
    }
    assert set(report.differences) == expected and len(report.differences) == len(expected)
    assert not report.clean and report.errors == []
    assert (report.checked, report.matched) == (2 * MAPPED, 2 * MAPPED - 2 - 3)
    noted = [payload for event, payload in recorder.notes if event == "reconciliation.difference"]
    assert sorted(noted, key=repr) == sorted((d.__dict__ for d in expected), key=repr)

    # `gateway reconcile --period 2026-03 --json` says the same, and exits 1 because it is not clean.
    config = write_config(tmp_path / "gateway.toml", database_url=db_engine.url.render_as_string(hide_password=False),
                          sections={"logging": {"level": "error"}}, connections=connections(sims))
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, ["--config", str(config), "reconcile", "--period", "2026-03", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1
    assert (out["period_start"], out["period_end"], out["checked"], out["matched"]) == (
        "2026-03-01", "2026-03-31", report.checked, report.matched)
    assert sorted(out["differences"], key=repr) == sorted((d.__dict__ for d in expected), key=repr)
    assert out["unmapped_psa_companies"] == report.unmapped_psa_companies
    assert out["customers_without_psa"] == [f"Customer {MAPPED:05d}"] and out["errors"] == []


async def test_g3_a_psa_that_cannot_be_read_is_reported_and_the_other_is_still_reconciled(
    db, gateway, sims, recorder
):
    ids = company_ids(sims)
    build_world(db, customers=2, psa={HALO: ids[HALO][:2], CW: ids[CW][:2]})
    assert (await outbox_until_idle(gateway, "w1")).delivered == 4
    sims[CW][0][cw_sim.STATE].private_key = "rotated"  # the ConnectWise API key was rotated on the ConnectWise side

    report = await reconcile_gateway(gateway, *MARCH)

    assert report.differences == [] and report.matched == 2
    (error,) = report.errors
    assert error.startswith(f"{CW}: AuthError") and "rotated" not in error
    assert not report.clean


async def test_g3_s2_a_quarterly_cycle_starting_in_the_month_matches_and_later_monthly_bills_are_not_unknown(
    db, gateway, sims, recorder
):
    ids = company_ids(sims)
    # Customer 0 is billed quarterly (March to May), customer 1 monthly (March, April, May).
    build_world(db, customers=2, psa={HALO: ids[HALO][:2], CW: ids[CW][:2]},
                cycle=lambda i: BillingCycle.QUARTERLY if i == 0 else BillingCycle.MONTHLY,
                billed_at=datetime(2026, 6, 1, 1, tzinfo=BILLED_AT.tzinfo),
                periods=[month_period(2026, m) for m in (3, 4, 5)])
    with db() as s:
        cycles = sorted((b.customer_id, b.period_start, b.period_end) for b in s.scalars(select(Bill)))
    assert [(start, end) for _, start, end in cycles] == [
        (date(2026, 3, 1), date(2026, 5, 31)),
        (date(2026, 3, 1), date(2026, 3, 31)), (date(2026, 4, 1), date(2026, 4, 30)), (date(2026, 5, 1), date(2026, 5, 31)),
    ]
    gateway.clock.set(datetime(2026, 6, 1, 2, tzinfo=BILLED_AT.tzinfo))
    # ConnectWise additions hold one cycle at a time, so only HaloPSA (invoices) keeps every bill.
    gateway.settings.connections = [c for c in gateway.settings.connections if c.name == HALO]
    assert (await outbox_until_idle(gateway, "w1")).delivered == 4

    march = await reconcile_gateway(gateway, *MARCH)

    # March's cycles are the quarter and customer 1's March; April's and May's invoices are known keys.
    assert march.differences == [] and march.errors == [] and (march.checked, march.matched) == (2, 2)
    april = await reconcile_gateway(gateway, date(2026, 4, 1), date(2026, 4, 30))
    assert april.differences == [] and (april.checked, april.matched) == (1, 1)


async def test_g3_a_voided_bill_still_in_the_psa_is_reported_until_it_is_removed_there(db, gateway, sims, recorder):
    ids = company_ids(sims)
    world = build_world(db, customers=2, psa={HALO: ids[HALO][:2], CW: ids[CW][:2]})
    assert (await outbox_until_idle(gateway, "w1")).delivered == 4
    with transaction(db) as s:
        voided = lifecycle.void_bill(s, system_principal(world.partner_id, "test"), world.bill_ids[0], now=NOW)
        number, devices, total = voided.number, voided.device_count, voided.total

    report = await reconcile_gateway(gateway, *MARCH)

    held = f"{devices} x, {money(total)}"
    assert sorted((d.connection, d.kind, d.gateway_value, d.psa_value) for d in report.differences) == [
        (CW, "void_in_psa", f"void ({number})", held), (HALO, "void_in_psa", f"void ({number})", held)]
    assert (report.checked, report.matched) == (2, 2) and report.customers_without_psa == []
    halo_state = sims[HALO][0][halo_sim.STATE]
    del halo_state.invoices[_halo_invoice(halo_state, key_of(db, HALO, bills_by_customer(db)["Customer 00000"]))["id"]]
    assert [(d.connection, d.kind) for d in (await reconcile_gateway(gateway, *MARCH)).differences] == [(CW, "void_in_psa")]


async def test_g3_a_bill_held_twice_in_the_psa_is_reported_with_both_copies(
    db, db_engine, gateway, sims, recorder, tmp_path, capsys, keep_logging
):
    """One record per invoice or addition comes back; two with one key means the customer is billed twice."""
    ids = company_ids(sims)
    build_world(db, customers=2, psa={HALO: ids[HALO][:2], CW: ids[CW][:2]})
    assert (await outbox_until_idle(gateway, "w1")).delivered == 4
    bills = bills_by_customer(db)
    halo_state, cw_state = sims[HALO][0][halo_sim.STATE], sims[CW][0][cw_sim.STATE]
    # HaloPSA: a person copies customer 0's invoice (the same key, the same numbers).
    twice = bills["Customer 00000"]
    invoice = _halo_invoice(halo_state, key_of(db, HALO, twice))
    duplicate = copy.deepcopy(invoice)
    duplicate["id"] = halo_state.next_id("invoice", 1000)
    halo_state.invoices[duplicate["id"]] = duplicate
    # ConnectWise: a second addition for customer 1's bill, one device more than the first.
    also_twice = bills["Customer 00001"]
    addition = _cw_addition(cw_state, key_of(db, CW, also_twice))
    extra = copy.deepcopy(addition)
    extra["id"] = cw_state.next_id("addition")
    extra["quantity"] = float(also_twice.device_count + 1)
    cw_state.additions[extra["id"]] = extra

    report = await reconcile_gateway(gateway, *MARCH)

    unit = also_twice.total / also_twice.device_count
    expected = [
        Difference(CW, "Customer 00001", key_of(db, CW, also_twice), "duplicate_in_psa",
                   f"{also_twice.device_count} devices, {also_twice.total:.2f} USD",
                   f"2 copies: {also_twice.device_count} x, {money(also_twice.total)} (id {addition['id']}); "
                   f"{also_twice.device_count + 1} x, {money(unit * (also_twice.device_count + 1))} (id {extra['id']})"),
        Difference(HALO, "Customer 00000", key_of(db, HALO, twice), "duplicate_in_psa",
                   f"{twice.device_count} devices, {twice.total:.2f} USD",
                   f"2 copies: {twice.device_count} x, {money(twice.total)} (id {invoice['id']}); "
                   f"{twice.device_count} x, {money(twice.total)} (id {duplicate['id']})"),
    ]
    assert sorted(report.differences, key=lambda d: d.connection) == expected
    assert not report.clean and report.errors == []
    assert (report.checked, report.matched) == (4, 2)
    noted = [payload for event, payload in recorder.notes if event == "reconciliation.difference"]
    assert sorted(noted, key=repr) == sorted((d.__dict__ for d in expected), key=repr)

    # `gateway reconcile --json` carries the new kind in the same shape as every other difference.
    config = write_config(tmp_path / "gateway.toml", database_url=db_engine.url.render_as_string(hide_password=False),
                          sections={"logging": {"level": "error"}}, connections=connections(sims))
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, ["--config", str(config), "reconcile", "--period", "2026-03", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1
    assert sorted(out["differences"], key=repr) == sorted((d.__dict__ for d in expected), key=repr)


async def test_g5_a_misconfigured_psa_connection_does_not_stop_reconciling_the_others(db, gateway, sims, recorder):
    """An Autotask connection without its required billing code cannot build its adapter; the others are still checked."""
    ids = company_ids(sims)
    build_world(db, customers=2, psa={HALO: ids[HALO][:2], CW: ids[CW][:2]})
    assert (await outbox_until_idle(gateway, "w1")).delivered == 4
    broken = autotask_connection("at", sims[HALO][1])
    del broken["options"]["billing_code_id"]  # charge delivery needs it
    gateway.settings.connections = [ConnectionSettings(**broken), *gateway.settings.connections]

    report = await reconcile_gateway(gateway, *MARCH)

    assert report.differences == [] and (report.checked, report.matched) == (4, 4)
    (error,) = report.errors
    assert error.startswith("at: ConfigError: ") and "billing_code_id" in error
    assert not any(secret in error for secret in ("sim-secret", "SIMINTEGRATIONCODE000000001"))
    assert not report.clean


def _halo_invoice(state, key: str) -> dict:
    (invoice,) = [i for i in state.invoices.values() if f"key={key} " in (i.get("internal_note") or "")]
    return invoice


def _cw_addition(state, key: str) -> dict:
    (addition,) = [a for a in state.additions.values() if f"key={key} " in (a.get("invoiceDescription") or "")]
    return addition

"""The billing admin API over real HTTP (aiohttp test client on loopback): rules, documents, S8 on every endpoint."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import date, timedelta

import pytest
from builders import make_gateway
from openapi_spec_validator import validate
from pypdf import PdfReader

from gateway.app import Gateway
from gateway.core import db as gdb
from gateway.core.models import Customer, Device, DeviceActivity, Partner, UserRole, Workspace
from gateway.core.settings import MailSettings
from gateway.core.users import create_token, create_user
from gateway.web import billing as billing_routes
from gateway.web.app import create_app

MAIL = MailSettings(host="127.0.0.1", port=2525, from_address="billing@msp.example", starttls=False)


@dataclass
class Seed:
    admin: str
    cadmin: str
    stranger: str
    acme: int
    globex: int
    acme_ws: int
    globex_ws: int


@pytest.fixture
def gateway(db_engine, clock) -> Gateway:
    return make_gateway(db_engine, clock, mail=MAIL)


def seed_world(gateway: Gateway) -> Seed:
    """Two customers with a workspace and two devices each, active in February 2026; three users."""
    now = gateway.clock.now()
    with gdb.transaction(gateway.db) as s:
        partner = Partner(name="Northwind IT", email="owner@northwind.example", created_at=now)
        other = Partner(name="Other MSP", invoice_prefix="OTH", created_at=now)
        s.add_all([partner, other])
        s.flush()
        acme = Customer(partner_id=partner.id, name="Acme", timezone="Europe/Berlin", created_at=now)
        globex = Customer(partner_id=partner.id, name="Globex", timezone="America/New_York", created_at=now)
        s.add_all([acme, globex])
        s.flush()
        workspaces = []
        for customer in (acme, globex):
            workspace = Workspace(customer_id=customer.id, name=f"{customer.name} HQ", created_at=now)
            s.add(workspace)
            s.flush()
            workspaces.append(workspace)
            for i in range(2):
                device = Device(connection="rmm", external_id=f"{customer.name}-{i}", org_external_id="o",
                                workspace_id=workspace.id, hostname=f"{customer.name.lower()}-{i}",
                                first_seen_at=now, updated_at=now)
                s.add(device)
                s.flush()
                s.add_all(DeviceActivity(device_id=device.id, day=day)
                          for day in (date(2026, 2, 3), date(2026, 3, 3), date(2026, 4, 3)))
        admin = create_user(s, partner_id=partner.id, name="alice", role=UserRole.ADMIN, now=now)
        cadmin = create_user(s, partner_id=partner.id, name="carol", role=UserRole.CUSTOMER_ADMIN, now=now,
                             customer_ids=[acme.id])
        stranger = create_user(s, partner_id=other.id, name="mallory", role=UserRole.ADMIN, now=now)
        tokens = [create_token(s, u, name="test", now=now)[1] for u in (admin, cadmin, stranger)]
        return Seed(*tokens, acme.id, globex.id, workspaces[0].id, workspaces[1].id)


@pytest.fixture
def seed(gateway) -> Seed:
    return seed_world(gateway)


@pytest.fixture
async def client(aiohttp_client, gateway):
    return await aiohttp_client(create_app(gateway))


async def call(client, method, path, token, *, status, raw=False, **kwargs):
    response = await client.request(method, f"/api/v1{path}", headers={"Authorization": f"Bearer {token}"}, **kwargs)
    body = await (response.read() if raw else response.json())
    assert response.status == status, body
    return (body, response) if raw else body


async def plan_with_bills(client, seed) -> dict:
    """A plan on both customers from 1 February, billed for February (the clock is 10 March)."""
    plan = await call(client, "POST", "/plans", seed.admin, status=201,
                      json={"name": "Managed", "price_per_device": "12.50", "currency": "EUR"})
    associations = await call(client, "POST", "/associations", seed.admin, status=201, json={
        "plan_id": plan["id"], "customer_ids": [seed.acme, seed.globex], "cycle": "monthly",
        "starts_on": "2026-02-01", "due_days": 14, "email": "ap@example.com"})
    run = await call(client, "POST", "/billing/runs", seed.admin, json={}, status=200)
    return {"plan": plan, "associations": associations["items"], "run": run}


# --- the rules over HTTP ---------------------------------------------------------------------------


async def march_with_a_price_change(client, seed, clock) -> dict:
    """Acme on a 3.00 plan from 1 March, 4.00 from 16 March; the clock then at 1 April, 12:00 UTC (Berlin's March
    is over). Returns the plan as the price change answered it."""
    plan = await call(client, "POST", "/plans", seed.admin, status=201,
                      json={"name": "Managed", "price_per_device": "3.00", "currency": "USD"})
    await call(client, "POST", "/associations", seed.admin, status=201, json={
        "plan_id": plan["id"], "customer_ids": [seed.acme], "cycle": "monthly", "starts_on": "2026-03-01",
        "email": "ap@acme.example"})
    clock.set(clock.now().replace(day=16))
    changed = await call(client, "POST", f"/plans/{plan['id']}/prices", seed.admin, status=200,
                         json={"price_per_device": "4.00"})
    clock.set(clock.now() + timedelta(days=16))
    return changed


async def march_bill(client, seed, clock) -> dict:
    """The bill of the March above, from a billing run for 2026-03."""
    await march_with_a_price_change(client, seed, clock)
    run = await call(client, "POST", "/billing/runs", seed.admin, json={"period": "2026-03"}, status=200)
    (bill_id,) = run["bill_ids"]
    return await call(client, "GET", f"/bills/{bill_id}", seed.admin, status=200)


async def test_s7_a_new_price_takes_effect_from_the_day_it_is_set(client, seed, clock):
    changed = await march_with_a_price_change(client, seed, clock)
    assert [p["effective_from"] for p in changed["prices"]] == [None, "2026-03-16"]


async def test_s7_a_cycle_with_a_price_change_is_billed_in_two_parts_prorated_by_days(client, seed, clock):
    bill = await march_bill(client, seed, clock)
    # 2 devices x 3.00 x 15/31 and 2 devices x 4.00 x 16/31, both parts on the bill.
    assert [line["amount"] for line in bill["lines"]] == ["2.90", "4.13"] and bill["total"] == "7.03"


async def test_s3_a_dry_run_shows_the_bills_but_stores_none_and_takes_no_number(client, seed, clock):
    await march_with_a_price_change(client, seed, clock)
    preview = await call(client, "POST", "/billing/runs", seed.admin, json={"dry_run": True}, status=200)
    assert preview["bill_ids"] == [] and [b["number"] for b in preview["bills"]] == [None]
    assert (await call(client, "GET", "/bills", seed.admin, status=200))["total"] == 0
    run = await call(client, "POST", "/billing/runs", seed.admin, json={"period": "2026-03"}, status=200)
    assert [b["number"] for b in run["bills"]] == ["INV-2026-04-000001"]


async def test_s3_an_issued_bill_shows_its_status_due_date_and_number(client, seed, clock):
    bill = await march_bill(client, seed, clock)
    assert (bill["status"], bill["due_on"], bill["number"]) == ("issued", "2026-05-01", "INV-2026-04-000001")


async def test_s3_a_cycle_already_billed_is_not_billed_again(client, seed, clock):
    await march_bill(client, seed, clock)
    again = await call(client, "POST", "/billing/runs", seed.admin, json={"period": "2026-03"}, status=200)
    assert (again["bills"], again["already_billed"]) == ([], 1)


async def test_s5_a_bill_downloads_as_csv_and_as_pdf(client, seed, clock):
    bill = await march_bill(client, seed, clock)
    data, response = await call(client, "GET", f"/bills/{bill['id']}/document?format=csv", seed.admin, status=200,
                                raw=True)
    assert response.content_type == "text/csv" and bill["number"] in response.headers["Content-Disposition"]
    assert [row["amount"] for row in csv.DictReader(io.StringIO(data.decode()))] == ["2.90", "4.13"]
    data, response = await call(client, "GET", f"/bills/{bill['id']}/document", seed.admin, status=200, raw=True)
    assert response.content_type == "application/pdf"
    assert "Total: 7.03 USD" in PdfReader(io.BytesIO(data)).pages[0].extract_text()


async def test_s5_a_customers_consolidated_bill_lists_its_bills(client, seed, clock):
    bill = await march_bill(client, seed, clock)
    data, _ = await call(client, "GET", f"/customers/{seed.acme}/consolidated-bill?format=pdf", seed.admin,
                         status=200, raw=True)
    assert bill["number"] in PdfReader(io.BytesIO(data)).pages[0].extract_text()


async def test_s3_a_paid_bill_shows_when_it_was_paid_and_can_no_longer_be_voided(client, seed, clock):
    bill = await march_bill(client, seed, clock)
    paid = await call(client, "POST", f"/bills/{bill['id']}/paid", seed.admin, status=200)
    assert paid["status"] == "paid" and paid["paid_at"] is not None
    refused = await call(client, "POST", f"/bills/{bill['id']}/void", seed.admin, status=409)
    assert "paid and cannot change" in refused["error"]["message"]


async def test_s3_a_credit_on_a_paid_bill_waits_as_an_adjustment_for_the_next_bill(client, seed, clock):
    bill = await march_bill(client, seed, clock)
    await call(client, "POST", f"/bills/{bill['id']}/paid", seed.admin, status=200)
    credit = await call(client, "POST", f"/bills/{bill['id']}/credit", seed.admin, status=201,
                        json={"amount": "1.00", "reason": "goodwill"})
    assert credit["amount"] == "-1.00" and credit["applied_to_bill_id"] is None
    pending = await call(client, "GET", f"/adjustments?customer_id={seed.acme}", seed.admin, status=200)
    assert [a["id"] for a in pending["items"]] == [credit["id"]]


async def test_s2_association_without_mail_settings_is_refused_and_says_what_to_set(aiohttp_client, db_engine, clock):
    gateway = make_gateway(db_engine, clock, mail=MailSettings())
    seed = seed_world(gateway)
    client = await aiohttp_client(create_app(gateway))
    plan = await call(client, "POST", "/plans", seed.admin, status=201,
                      json={"name": "Managed", "price_per_device": "10", "currency": "USD"})
    error = await call(client, "POST", "/associations", seed.admin, status=422, json={
        "plan_id": plan["id"], "customer_ids": [seed.acme], "cycle": "monthly", "starts_on": "2026-03-01",
        "email": "ap@acme.example"})
    assert error["error"]["code"] == "mail_not_configured" and "GATEWAY_MAIL__HOST" in error["error"]["message"]


async def monthly_on_acme(client, seed) -> dict:
    """Monthly billing enabled on 10 March (Berlin), Acme HQ's workspace on it (up to 5 devices); what enabling gave."""
    enabled = await call(client, "POST", "/billing/monthly", seed.admin, json={"timezone": "Europe/Berlin"}, status=201)
    await call(client, "POST", "/billing/monthly/workspaces", seed.admin, status=201,
               json={"workspace_id": seed.acme_ws, "max_devices": 5})
    return enabled


async def cancelled_at_end_of_april(client, seed) -> None:
    await monthly_on_acme(client, seed)
    done = await call(client, "POST", "/billing/monthly/cancel", seed.admin, status=200,
                      json={"ends_on": "2026-04-30", "confirm": True})
    assert done["confirmed"]


async def april_billed(client, seed, clock) -> dict:
    """The billing run of 1 May, 12:00 UTC (April is billed) after the set-up above."""
    await monthly_on_acme(client, seed)
    clock.set(clock.now().replace(month=5, day=1))
    return await call(client, "POST", "/billing/runs", seed.admin, json={}, status=200)


async def test_m1_enabling_monthly_billing_issues_the_activation_bill_of_10(client, seed):
    enabled = await monthly_on_acme(client, seed)
    assert enabled["activation_bill"]["total"] == "10.00" and enabled["activation_bill"]["kind"] == "activation"


async def test_m4_first_charge_after_first_full_month(client, seed):
    enabled = await monthly_on_acme(client, seed)
    assert enabled["subscription"]["first_charge_on"] == "2026-05-01"


async def test_m8_cancelling_without_confirmation_offers_end_dates_and_lists_the_workspaces_and_devices(client, seed):
    await monthly_on_acme(client, seed)
    preview = await call(client, "POST", "/billing/monthly/cancel", seed.admin, json={}, status=200)
    assert not preview["confirmed"] and preview["offered_end_dates"][0] == "2026-03-31"
    assert [(w["workspace"], w["devices"]) for w in preview["workspaces"]] == [("Acme HQ", ["acme-0", "acme-1"])]


async def test_m8_a_confirmed_cancellation_shows_its_end_and_final_billing_date(client, seed):
    await cancelled_at_end_of_april(client, seed)
    status = await call(client, "GET", "/billing/monthly", seed.admin, status=200)
    assert (status["ends_on"], status["final_billing_date"]) == ("2026-04-30", "2026-05-01")


async def test_m8_a_cancelled_subscription_can_be_reactivated_before_its_final_billing_date(client, seed, clock):
    await cancelled_at_end_of_april(client, seed)
    await call(client, "POST", "/billing/monthly/reactivate", seed.admin, status=200)
    clock.set(clock.now().replace(month=5, day=1))  # 1 May, 12:00 UTC: April is billed
    run = await call(client, "POST", "/billing/runs", seed.admin, json={}, status=200)
    assert [(b["kind"], b["device_count"], b["total"]) for b in run["bills"]] == [("monthly", 2, "5.00")]


async def test_m5_the_first_monthly_run_bills_the_devices_active_in_the_month(client, seed, clock):
    run = await april_billed(client, seed, clock)
    assert [(b["kind"], b["device_count"], b["total"]) for b in run["bills"]] == [("monthly", 2, "5.00")]


async def test_m7_billing_history_lists_every_payment(client, seed, clock):
    await april_billed(client, seed, clock)
    history = await call(client, "GET", "/billing/history", seed.admin, status=200)
    assert [(h["month"], h["kind"], h["total"]) for h in history["items"]] == [
        ("2026-04", "monthly", "5.0000"), ("2026-03", "activation", "10.0000")]


async def test_m7_a_months_device_usage_downloads_as_csv_one_row_per_billed_device(client, seed, clock):
    await april_billed(client, seed, clock)
    data, response = await call(client, "GET", "/billing/usage?period=2026-04", seed.admin, status=200, raw=True)
    assert response.content_type == "text/csv"
    assert [(r["device_id"], r["days_active"]) for r in csv.DictReader(io.StringIO(data.decode()))] == [
        ("Acme-0", "1"), ("Acme-1", "1")]


async def test_m4_a_month_already_billed_is_not_billed_again(client, seed, clock):
    await april_billed(client, seed, clock)
    again = await call(client, "POST", "/billing/runs", seed.admin, json={}, status=200)
    assert (again["bills"], again["already_billed"]) == ([], 1)


async def test_openapi_documents_every_billing_route_with_its_media_types(client, seed):
    document = await (await client.get("/api/v1/openapi.json")).json()
    validate(document)
    for endpoint in billing_routes.routes.endpoints:
        assert endpoint.summary == document["paths"][endpoint.path][endpoint.method.lower()]["summary"]
    content = document["paths"]["/api/v1/bills/{bill_id}/document"]["get"]["responses"]["200"]["content"]
    assert set(content) == {"text/csv", "application/pdf"}


# --- S8: two users over every billing endpoint --------------------------------------------------------


async def test_s8_a_customer_admin_gets_404_for_every_id_outside_their_customers(client, seed):
    world = await plan_with_bills(client, seed)
    plan_id = world["plan"]["id"]
    only_globex = await call(client, "POST", "/plans", seed.admin, status=201,
                             json={"name": "Globex only", "price_per_device": "1", "currency": "USD"})
    await call(client, "POST", "/associations", seed.admin, status=201, json={
        "plan_id": only_globex["id"], "customer_ids": [seed.globex], "cycle": "monthly", "starts_on": "2026-03-01",
        "email": "ap@globex.example"})
    assoc = {a["customer_id"]: a["id"] for a in world["associations"]}
    bills = {b["customer_id"]: b["id"] for b in (await call(client, "GET", "/bills", seed.admin, status=200))["items"]}
    assert set(bills) == {seed.acme, seed.globex}
    adjustments = {}
    for customer in (seed.acme, seed.globex):
        adjustments[customer] = (await call(client, "POST", "/adjustments", seed.admin, status=201, json={
            "customer_id": customer, "kind": "charge", "description": "visit", "amount": "5", "currency": "EUR"}))["id"]
    await call(client, "POST", "/billing/monthly", seed.admin, json={}, status=201)

    exercised: set[tuple[str, str]] = set()

    async def check(method, template, path, status, token=seed.cadmin, **kwargs):
        exercised.add((method, "/api/v1" + template))
        response = await client.request(method, f"/api/v1{path}", headers={"Authorization": f"Bearer {token}"},
                                        **kwargs)
        assert response.status == status, (method, path, await response.text())
        if status == 404:
            assert (await response.json())["error"]["code"] == "not_found"
        return response

    # Lists show only Acme (carol's customer).
    listed = await (await check("GET", "/plans", "/plans", 200)).json()
    assert [p["id"] for p in listed["items"]] == [plan_id]
    listed = await (await check("GET", "/associations", "/associations", 200)).json()
    assert [a["customer_id"] for a in listed["items"]] == [seed.acme]
    listed = await (await check("GET", "/bills", "/bills", 200)).json()
    assert [b["customer_id"] for b in listed["items"]] == [seed.acme]
    listed = await (await check("GET", "/adjustments", "/adjustments", 200)).json()
    assert [a["customer_id"] for a in listed["items"]] == [seed.acme]

    # Reading her own customer's things works ...
    await check("GET", "/plans/{plan_id}", f"/plans/{plan_id}", 200)
    await check("GET", "/associations/{association_id}", f"/associations/{assoc[seed.acme]}", 200)
    await check("GET", "/bills/{bill_id}", f"/bills/{bills[seed.acme]}", 200)
    await check("GET", "/bills/{bill_id}/document", f"/bills/{bills[seed.acme]}/document?format=csv", 200)
    await check("GET", "/customers/{customer_id}/consolidated-bill",
                f"/customers/{seed.acme}/consolidated-bill", 200)
    # ... every id outside her customers is answered as if it did not exist ...
    await check("GET", "/plans/{plan_id}", f"/plans/{only_globex['id']}", 404)
    await check("GET", "/associations/{association_id}", f"/associations/{assoc[seed.globex]}", 404)
    await check("GET", "/bills/{bill_id}", f"/bills/{bills[seed.globex]}", 404)
    await check("GET", "/bills/{bill_id}/document", f"/bills/{bills[seed.globex]}/document", 404)
    await check("GET", "/customers/{customer_id}/consolidated-bill",
                f"/customers/{seed.globex}/consolidated-bill?format=csv", 404)
    await check("GET", "/bills/{bill_id}", "/bills/999999", 404)
    # ... and every change, even on her own customer, is not there for her.
    for bill in (bills[seed.acme], bills[seed.globex]):
        for action in ("paid", "void", "finalize"):
            await check("POST", f"/bills/{{bill_id}}/{action}", f"/bills/{bill}/{action}", 404)
        await check("POST", "/bills/{bill_id}/credit", f"/bills/{bill}/credit", 404,
                    json={"amount": "1", "reason": "x"})
    await check("POST", "/plans", "/plans", 404, json={"name": "Mine", "price_per_device": "1", "currency": "USD"})
    for plan in (plan_id, only_globex["id"]):
        await check("POST", "/plans/{plan_id}/prices", f"/plans/{plan}/prices", 404, json={"price_per_device": "2"})
        await check("POST", "/plans/{plan_id}/archive", f"/plans/{plan}/archive", 404)
        await check("POST", "/plans/{plan_id}/dissociate", f"/plans/{plan}/dissociate", 404,
                    json={"customer_ids": [seed.acme]})
    await check("POST", "/associations", "/associations", 404, json={
        "plan_id": plan_id, "customer_ids": [seed.acme], "cycle": "monthly", "starts_on": "2026-03-01",
        "email": "x@acme.example"})
    await check("POST", "/adjustments", "/adjustments", 404, json={
        "customer_id": seed.globex, "kind": "charge", "description": "x", "amount": "1", "currency": "EUR"})
    await check("POST", "/billing/runs", "/billing/runs", 404, json={"dry_run": True})
    await check("GET", "/billing/monthly", "/billing/monthly", 404)
    await check("POST", "/billing/monthly", "/billing/monthly", 404, json={})
    await check("POST", "/billing/monthly/cancel", "/billing/monthly/cancel", 404, json={})
    await check("POST", "/billing/monthly/reactivate", "/billing/monthly/reactivate", 404)
    await check("POST", "/billing/monthly/workspaces", "/billing/monthly/workspaces", 404,
                json={"workspace_id": seed.acme_ws, "max_devices": 3})
    await check("POST", "/billing/monthly/workspaces/{workspace_id}/leave",
                f"/billing/monthly/workspaces/{seed.acme_ws}/leave", 404, json={"confirm": True})
    await check("GET", "/billing/history", "/billing/history", 404)
    await check("GET", "/billing/usage", "/billing/usage?period=2026-02", 404)

    # Another partner's admin sees nothing of this partner at all.
    for method, template, path, kwargs in (
        ("GET", "/plans/{plan_id}", f"/plans/{plan_id}", {}),
        ("GET", "/associations/{association_id}", f"/associations/{assoc[seed.acme]}", {}),
        ("GET", "/bills/{bill_id}", f"/bills/{bills[seed.acme]}", {}),
        ("GET", "/bills/{bill_id}/document", f"/bills/{bills[seed.acme]}/document", {}),
        ("GET", "/customers/{customer_id}/consolidated-bill", f"/customers/{seed.acme}/consolidated-bill", {}),
        ("POST", "/bills/{bill_id}/paid", f"/bills/{bills[seed.acme]}/paid", {}),
        ("POST", "/plans/{plan_id}/dissociate", f"/plans/{plan_id}/dissociate", {"json": {"customer_ids": [seed.acme]}}),
        ("POST", "/adjustments", "/adjustments", {"json": {"customer_id": seed.acme, "kind": "charge",
                                                           "description": "x", "amount": "1", "currency": "EUR"}}),
        ("POST", "/billing/monthly/workspaces", "/billing/monthly/workspaces",
         {"json": {"workspace_id": seed.acme_ws, "max_devices": 3}}),
        ("POST", "/billing/monthly/workspaces/{workspace_id}/leave",
         f"/billing/monthly/workspaces/{seed.acme_ws}/leave", {"json": {"confirm": True}}),
    ):
        await check(method, template, path, 404, token=seed.stranger, **kwargs)
    for template in ("/plans", "/associations", "/bills", "/adjustments"):
        body = await (await check("GET", template, template, 200, token=seed.stranger)).json()
        assert body["total"] == 0
    stranger_run = await (await check("POST", "/billing/runs", "/billing/runs", 200, token=seed.stranger,
                                      json={"dry_run": True})).json()
    assert stranger_run["bills"] == []

    # The admin still reaches everything the others could not (nothing above changed anything).
    bill = await call(client, "GET", f"/bills/{bills[seed.globex]}", seed.admin, status=200)
    assert bill["status"] == "issued"
    assert len((await call(client, "GET", "/adjustments", seed.admin, status=200))["items"]) == 2

    every_endpoint = {(e.method, e.path) for e in billing_routes.routes.endpoints}
    assert every_endpoint - exercised == set(), "an endpoint is missing from the S8 proof"

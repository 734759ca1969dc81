"""Input that used to answer 500 or be stored as-is: path ids in other scripts' digits, a body that claims gzip
but is not, NUL and control characters in names, notes and searches, months past the calendar, zones that are
no place. Each is refused with the project's error body, naming the field and what to do."""

from __future__ import annotations

import gzip
import json

import pytest
from builders import make_gateway
from test_billing_api import MAIL, Seed, call, seed_world

from gateway.app import Gateway
from gateway.web.app import create_app


@pytest.fixture
def seed(gateway) -> Seed:
    return seed_world(gateway)


@pytest.fixture
async def client(aiohttp_client, gateway):
    return await aiohttp_client(create_app(gateway))


@pytest.fixture
def gateway(db_engine, clock) -> Gateway:
    return make_gateway(db_engine, clock, mail=MAIL)


@pytest.mark.parametrize("raw", ["\u00b2", "\u0661", "\u0661\u0662", "\uff11", "1\u00b2"])
async def test_path_ids_are_ascii_digits_only_other_scripts_digits_are_404_not_500_or_bill_1(client, seed, raw):
    """'²' made int() fail (500); Arabic-Indic '١' was read as 1 and showed bill 1."""
    await call(client, "POST", "/plans", seed.admin, status=201,
               json={"name": "Managed", "price_per_device": "1", "currency": "EUR"})
    body = await call(client, "GET", f"/plans/{raw}", seed.admin, status=404)
    assert body["error"]["field"] == "plan_id", body
    await call(client, "GET", f"/bills/{raw}", seed.admin, status=404)
    await call(client, "GET", "/plans/1", seed.admin, status=200)


async def test_a_body_that_claims_gzip_but_is_not_is_400_with_the_error_body(client, seed):
    response = await client.post("/api/v1/plans", data=b'{"name": "x"}', headers={
        "Authorization": f"Bearer {seed.admin}", "Content-Type": "application/json", "Content-Encoding": "gzip"})
    body = await response.json()
    assert response.status == 400, body
    assert body["error"]["code"] == "bad_request" and "gzip" in body["error"]["message"], body


async def test_a_gzip_body_that_is_gzip_is_read(client, seed):
    data = gzip.compress(json.dumps({"name": "Zipped", "price_per_device": "1", "currency": "EUR"}).encode())
    response = await client.post("/api/v1/plans", data=data, headers={
        "Authorization": f"Bearer {seed.admin}", "Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert response.status == 201, await response.text()


async def test_a_nul_in_a_search_is_422_naming_q(client, seed):
    for path in ("/licenses", "/orders"):
        body = await call(client, "GET", f"{path}?q=ab%00cd", seed.admin, status=422)
        assert body["error"]["field"] == "q" and "U+0000" in body["error"]["message"], body


@pytest.mark.parametrize("bad", ["Mana\x00ged", "Mana\x1bged", "evil\u202eexe.pdf", "two\nlines", "iso\u2066late"])
async def test_control_and_bidi_override_characters_in_a_plan_name_are_422(client, seed, bad):
    body = await call(client, "POST", "/plans", seed.admin, status=422,
                      json={"name": bad, "price_per_device": "1", "currency": "EUR"})
    assert body["error"]["field"] == "name", body
    assert "U+" in body["error"]["message"], body


async def test_control_characters_in_adjustment_descriptions_credit_reasons_and_license_notes_are_422(
        client, seed):
    body = await call(client, "POST", "/adjustments", seed.admin, status=422, json={
        "customer_id": seed.acme, "kind": "charge", "description": "setup\x07fee", "amount": "5", "currency": "EUR"})
    assert body["error"]["field"] == "description", body
    body = await call(client, "POST", "/adjustments", seed.admin, status=422, json={
        "customer_id": seed.acme, "kind": "charge", "description": "setup \u202efee", "amount": "5",
        "currency": "EUR"})
    assert body["error"]["field"] == "description", body
    # A note or description may span lines.
    await call(client, "POST", "/adjustments", seed.admin, status=201, json={
        "customer_id": seed.acme, "kind": "charge", "description": "setup fee\nonsite", "amount": "5",
        "currency": "EUR"})
    body = await call(client, "POST", "/licenses", seed.admin, status=422,
                      json={"edition": "standard", "seats": 1, "notes": "po\x00123"})
    assert body["error"]["field"] == "notes", body


async def test_a_billing_run_for_a_month_past_the_range_is_422_with_the_range(client, seed):
    for period in ("9999-12", "1999-12", "2026-13", "\u0662\u0660\u0662\u0666-\u0660\u0663"):
        body = await call(client, "POST", "/billing/runs", seed.admin, status=422, json={"period": period})
        assert body["error"]["field"] == "period", body
    body = await call(client, "POST", "/billing/runs", seed.admin, status=422, json={"period": "9999-12"})
    assert "2000-01" in body["error"]["message"] and "2999-12" in body["error"]["message"], body
    await call(client, "POST", "/billing/runs", seed.admin, status=200, json={"period": "2026-02"})


@pytest.mark.parametrize("zone", ["posixrules", "Factory", "localtime", "Mars/Olympus"])
async def test_a_zone_that_is_no_place_is_refused_for_monthly_billing(client, seed, zone):
    body = await call(client, "POST", "/billing/monthly", seed.admin, status=422, json={"timezone": zone})
    assert body["error"]["field"] == "timezone" and "Europe/Berlin" in body["error"]["message"], body

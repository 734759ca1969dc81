"""Issue 20: bad input to the admin API is a 4xx in the error body saying what was wrong, never a 500 or a 200."""

from __future__ import annotations

import pytest
from builders import make_gateway
from sqlalchemy import text

from gateway.core import db as gdb
from gateway.core.models import Partner, UserRole
from gateway.core.settings import MailSettings
from gateway.core.users import create_token, create_user
from gateway.web.api import MAX_BODY_DEPTH
from gateway.web.app import create_app
from gateway.web.types import MAX_ID

MAIL = MailSettings(host="127.0.0.1", port=2525, from_address="billing@msp.example", starttls=False)


@pytest.fixture
def gateway(db_engine, clock):
    return make_gateway(db_engine, clock, mail=MAIL)


@pytest.fixture
async def api(aiohttp_client, gateway):
    now = gateway.clock.now()
    with gdb.transaction(gateway.db) as s:
        partner = Partner(name="Northwind IT", email="owner@northwind.example", created_at=now)
        s.add(partner)
        s.flush()
        admin = create_user(s, partner_id=partner.id, name="alice", role=UserRole.ADMIN, now=now)
        token = create_token(s, admin, name="test", now=now)[1]
    client = await aiohttp_client(create_app(gateway))

    async def call(method, path, headers=(), **kwargs):
        response = await client.request(method, f"/api/v1{path}",
                                        headers={"Authorization": f"Bearer {token}", **dict(headers)}, **kwargs)
        return response.status, await response.json()

    return call


@pytest.mark.parametrize("path", [
    "/plans?offset=14129768723089461248",
    f"/plans?offset={MAX_ID + 1}",
    f"/bills?customer_id={MAX_ID + 1}",
    "/adjustments?customer_id=0",
    f"/associations?plan_id={2**64}",
    f"/devices?workspace_id={2**63}",
    f"/licenses?customer_id={2**70}",
])
async def test_i20_an_integer_out_of_range_in_the_query_answers_422_naming_it(api, path):
    status, body = await api("GET", path)
    assert status == 422, body
    assert body["error"]["field"] == path.split("?")[1].split("=")[0]


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/adjustments", {"customer_id": 2**64, "kind": "charge", "description": "x", "amount": "1", "currency": "USD"},
     "customer_id"),
    ("/associations", {"plan_id": 1, "customer_ids": [MAX_ID + 1], "cycle": "monthly", "starts_on": "2026-03-01",
                       "email": "ap@example.com"}, "customer_ids.0"),
    ("/billing/monthly/workspaces", {"workspace_id": 1, "max_devices": 1, "edition_id": 2**40}, "edition_id"),
    ("/licenses/7K3QD-0M9ZX-4T2WB-8HNCV-RY5FD/assign", {"workspace_id": 2**31}, "workspace_id"),
])
async def test_i20_an_id_out_of_range_in_a_body_answers_422_naming_it(api, path, body, field):
    status, answer = await api("POST", path, json=body)
    assert status == 422, answer
    assert answer["error"]["field"] == field


async def test_i20_a_body_nested_too_deeply_answers_400(api):
    deep = "[" * 100_000 + "]" * 100_000
    status, body = await api("POST", "/adjustments", data=deep, headers={"Content-Type": "application/json"})
    assert status == 400, body
    assert body["error"]["code"] == "bad_request" and "levels deep" in body["error"]["message"]
    # Past the limit but shallow enough for the JSON parser: still 400, the same message.
    shallow = '{"description": ' + "[" * (MAX_BODY_DEPTH + 1) + "]" * (MAX_BODY_DEPTH + 1) + "}"
    status, body = await api("POST", "/adjustments", data=shallow, headers={"Content-Type": "application/json"})
    assert status == 400 and "levels deep" in body["error"]["message"], body


async def test_i20_a_body_past_the_size_limit_answers_413(api):
    status, body = await api("POST", "/plans", data=b'{"name": "' + b"x" * (2 * 1024 * 1024) + b'"}',
                             headers={"Content-Type": "application/json"})
    assert status == 413, body
    assert body["error"]["code"] == "too_large" and "bytes" in body["error"]["message"]


@pytest.mark.parametrize(("method", "path"), [
    ("PATCH", "/settings/licensing"),
    ("POST", "/billing/monthly/cancel"),
    ("POST", "/billing/runs"),
])
async def test_i20_a_missing_required_body_answers_422_naming_the_body(api, gateway, method, path):
    status, body = await api(method, path)
    assert status == 422, body
    assert body["error"]["field"] == "body" and "body is required" in body["error"]["message"]
    with gdb.transaction(gateway.db) as s:  # the billing run did not run
        assert s.scalar(text("select count(*) from bills")) == 0


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/plans", {"name": "P", "price_per_device": 12.5, "currency": "USD"}, "price_per_device"),
    ("/plans", {"name": "P", "price_per_device": "1e3", "currency": "USD"}, "price_per_device"),
    ("/plans", {"name": "P", "price_per_device": "1.00001", "currency": "USD"}, "price_per_device"),
    ("/plans", {"name": "P", "price_per_device": "1", "currency": "US1"}, "currency"),
    ("/adjustments", {"customer_id": 1, "kind": "charge", "description": "x", "amount": "--1", "currency": "USD"},
     "amount"),
    ("/associations", {"plan_id": 1, "customer_ids": [1], "cycle": "monthly", "starts_on": "2026-03-01",
                       "email": "not an address"}, "email"),
    ("/billing/runs", {"period": "2026-13"}, "period"),
    ("/billing/runs", {"period": "2026-00"}, "period"),
    ("/billing/monthly", {"timezone": "Mars/Olympus_Mons"}, "timezone"),
])
async def test_i20_types_in_the_document_are_what_the_server_enforces(api, path, body, field):
    status, answer = await api("POST", path, json=body)
    assert status == 422, answer
    assert answer["error"]["field"] == field


async def test_i20_l15_pool_limit_needs_pool_mode_beside_it(api):
    status, body = await api("PATCH", "/settings/licensing", json={"pool_limit": 5})
    assert status == 422 and "pool_limit needs pool_mode" in body["error"]["message"], body
    status, body = await api("PATCH", "/settings/licensing", json={"pool_mode": "limited", "pool_limit": 5})
    assert status == 200 and body["pool_limit"] == 5, body


async def test_i20_the_document_states_bounds_patterns_and_every_error_status(api):
    status, document = await api("GET", "/openapi.json")
    assert status == 200
    schemas = document["components"]["schemas"]
    assert schemas["PlanBody"]["properties"]["price_per_device"]["pattern"] == r"^\d{1,14}(\.\d{1,4})?$"
    assert schemas["PlanBody"]["properties"]["currency"]["pattern"] == "^[A-Z]{3}$"
    assert schemas["AdjustmentBody"]["properties"]["customer_id"]["maximum"] == MAX_ID
    assert schemas["CompanySettingsPatch"]["dependentRequired"] == {"pool_limit": ["pool_mode"]}
    assert schemas["AssociationBody"]["properties"]["email"]["format"] == "email"
    offset = next(p for p in document["paths"]["/api/v1/plans"]["get"]["parameters"] if p["name"] == "offset")
    assert offset["schema"]["maximum"] == MAX_ID
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            expected = {"400", "404", "405", "413", "422"} | (set() if operation.get("security") == [] else {"401"})
            assert expected <= set(operation["responses"]), (method, path)

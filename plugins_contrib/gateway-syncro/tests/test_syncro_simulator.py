"""The Syncro simulator answers the way the adapters rely on: auth, paging, invoice rules, the rate limit."""

from __future__ import annotations

import pytest

from gateway_syncro.simulator import DEFAULT_API_TOKEN, STATE, create_app

AUTH = {"Authorization": f"Bearer {DEFAULT_API_TOKEN}"}


@pytest.fixture
async def syncro(aiohttp_client):
    return await aiohttp_client(create_app(customers=30, assets=60))


async def test_api_token_in_a_header_or_legacy_query_else_401(syncro):
    assert (await syncro.get("/api/v1/customers", headers=AUTH)).status == 200
    assert (await syncro.get("/api/v1/customers", headers={"Authorization": DEFAULT_API_TOKEN})).status == 200
    assert (await syncro.get("/api/v1/customers", params={"api_key": DEFAULT_API_TOKEN})).status == 200
    refused = await syncro.get("/api/v1/customers", headers={"Authorization": "Bearer wrong"})
    assert refused.status == 401 and "error" in await refused.json()


async def test_lists_page_by_25_with_meta(syncro):
    body = await (await syncro.get("/api/v1/customer_assets", params={"page": 3}, headers=AUTH)).json()
    assert body["meta"] == {"total_pages": 3, "total_entries": 60, "per_page": 25, "page": 3}
    assert len(body["assets"]) == 10
    ids = [a["id"] for a in body["assets"]]
    assert ids == sorted(ids)


async def test_disabled_customers_are_listed_only_on_request(syncro):
    state = syncro.server.app[STATE]
    state.customers[0]["disabled"] = True
    enabled = sum(not c["disabled"] for c in state.customers)
    default = await (await syncro.get("/api/v1/customers", params={"page": 1}, headers=AUTH)).json()
    everyone = await (await syncro.get("/api/v1/customers", params={"include_disabled": "true"}, headers=AUTH)).json()
    assert default["meta"]["total_entries"] == enabled < everyone["meta"]["total_entries"] == 30
    assert state.customers[0]["id"] not in [c["id"] for c in default["customers"]]


async def test_g2_invoice_numbers_are_unique_and_customers_must_exist(syncro):
    customer = syncro.server.app[STATE].customers[1]["id"]
    body = {"customer_id": customer, "number": "INV-1", "date": "2026-03-01",
            "line_items": [{"name": "Devices", "quantity": "3", "price": "2.50"}]}
    created = await (await syncro.post("/api/v1/invoices", json=body, headers=AUTH)).json()
    assert created["invoice"]["subtotal"] == "7.50" and created["invoice"]["total"] == "7.50"
    again = await syncro.post("/api/v1/invoices", json=body, headers=AUTH)
    assert again.status == 422 and "Number has already been taken" in (await again.json())["message"]
    stranger = await syncro.post("/api/v1/invoices", json={**body, "number": "INV-2", "customer_id": 1}, headers=AUTH)
    assert stranger.status == 422 and "Customer must exist" in (await stranger.json())["message"]
    by_number = await (await syncro.get("/api/v1/invoices/INV-1", headers=AUTH)).json()
    by_id = await (await syncro.get(f"/api/v1/invoices/{created['invoice']['id']}", headers=AUTH)).json()
    assert by_number == by_id and by_number["invoice"]["line_items"][0]["quantity"] == "3"
    assert (await syncro.get("/api/v1/invoices/INV-9", headers=AUTH)).status == 404


async def test_more_than_the_minute_allows_is_429_with_retry_after(aiohttp_client):
    client = await aiohttp_client(create_app(customers=3, assets=0, rate_limit=(3, 60.0)))
    statuses = [(await client.get("/api/v1/customers", headers=AUTH)).status for _ in range(3)]
    throttled = await client.get("/api/v1/customers", headers=AUTH)
    assert statuses == [200, 200, 200] and throttled.status == 429
    assert 1 <= int(throttled.headers["Retry-After"]) <= 60

"""The licensing admin API over real HTTP (aiohttp test client on loopback): rules, S8, errors, OpenAPI."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

import pytest
from aiohttp import web
from builders import make_gateway
from openapi_spec_validator import validate
from sqlalchemy import select

from gateway.app import Gateway
from gateway.core import db as gdb
from gateway.core.models import ApiToken, Customer, Edition, LicenseType, Partner, UserRole, Workspace
from gateway.core.settings import LicensingSettings
from gateway.core.users import create_token, create_user, hash_token
from gateway.web.api import Routes
from gateway.web.app import create_app

PRICES = {"BUS": Decimal("30"), "ENT": Decimal("50")}

# A route module of this test: proves that an unexpected exception leaks nothing.
routes = Routes(tag="test")


@routes.get("/boom", summary="raises")
async def boom(request: web.Request) -> web.Response:
    raise RuntimeError("password=hunter2 at /srv/secret.py line 3")


@dataclass
class Seed:
    admin: str
    cadmin: str
    stranger: str
    revoked: str
    acme_ws: int
    globex_ws: int
    acme_id: int
    admin_id: int


@pytest.fixture
def gateway(db_engine, clock) -> Gateway:
    return make_gateway(db_engine, clock, licensing=LicensingSettings(prices=PRICES))


@pytest.fixture
def seed(gateway, clock) -> Seed:
    now = clock.now()
    with gdb.transaction(gateway.db) as s:
        partner, other = Partner(name="MSP", discount_percent=Decimal("10"), created_at=now), Partner(name="Other MSP", created_at=now)
        s.add_all([partner, other, Edition(code="BUS", name="Business Security", license_type=LicenseType.COMPUTER),
                   Edition(code="ENT", name="Enterprise Security", license_type=LicenseType.COMPUTER)])
        s.flush()
        acme = Customer(partner_id=partner.id, name="Acme Corp", created_at=now)
        globex = Customer(partner_id=partner.id, name="Globex", created_at=now)
        s.add_all([acme, globex])
        s.flush()
        acme_ws = Workspace(customer_id=acme.id, name="acme", created_at=now)
        globex_ws = Workspace(customer_id=globex.id, name="globex", created_at=now)
        s.add_all([acme_ws, globex_ws])
        admin = create_user(s, partner_id=partner.id, name="alice", role=UserRole.ADMIN, now=now)
        cadmin = create_user(s, partner_id=partner.id, name="carol", role=UserRole.CUSTOMER_ADMIN, now=now,
                             customer_ids=[acme.id])
        stranger = create_user(s, partner_id=other.id, name="mallory", role=UserRole.ADMIN, now=now)
        tokens = [create_token(s, u, name="test", now=now)[1] for u in (admin, cadmin, stranger)]
        revoked_row, revoked = create_token(s, admin, name="old", now=now)
        revoked_row.revoked_at = now
        return Seed(*tokens, revoked, acme_ws.id, globex_ws.id, acme.id, admin.id)


@pytest.fixture
async def client(aiohttp_client, gateway):
    return await aiohttp_client(create_app(gateway, route_modules=("gateway.web.licenses", __name__)))


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def call(client, method, path, token, *, status, **kwargs):
    response = await client.request(method, f"/api/v1{path}", headers=auth(token), **kwargs)
    body = await response.json()
    assert response.status == status, body
    return body


async def buy(client, token, **body):
    body = {"edition": "BUS", "seats": 5, "term_months": 12, **body}
    return (await call(client, "POST", "/licenses", token, json=body, status=201))["licenses"][0]


async def active(client, token, workspace_id, **body):
    key = (await buy(client, token, **body))["key"]
    return await call(client, "POST", f"/licenses/{key}/assign", token, json={"workspace_id": workspace_id},
                      status=200)


# --- rules over HTTP --------------------------------------------------------------------------


async def test_l5_buy_then_assign_starts_the_term_and_shows_the_customer(client, seed, clock):
    purchase = await call(client, "POST", "/licenses", seed.admin, status=201,
                          json={"edition": "BUS", "seats": 3, "term_months": 24, "notes": "PO-1"})
    assert purchase["order"]["total"] == "162.00"  # 30 x 3 seats x 2 years, less the partner's 10%
    licence = purchase["licenses"][0]
    assert licence["status"] == "unused" and licence["activated_at"] is None and licence["notes"] == "PO-1"
    clock.advance(days=10)
    assigned = await call(client, "POST", f"/licenses/{licence['key']}/assign", seed.admin,
                          json={"workspace_id": seed.acme_ws}, status=200)
    assert assigned["status"] == "active" and assigned["customer"] == {"id": seed.acme_id, "name": "Acme Corp"}
    assert assigned["activated_at"].startswith("2026-03-20")
    assert assigned["expires_at"].startswith("2028-03-20")
    conflict = await call(client, "POST", f"/licenses/{licence['key']}/assign", seed.admin,
                          json={"workspace_id": seed.globex_ws}, status=409)
    assert conflict["error"]["field"] == "key"


async def test_l6_bulk_purchase_applies_the_tier_discount(client, seed):
    body = {"edition": "BUS", "customers": 10, "devices_per_customer": 2, "term_months": 12}
    purchase = await call(client, "POST", "/licenses/bulk", seed.admin, json=body, status=201)
    assert len(purchase["licenses"]) == 10 and all(lic["in_pool"] for lic in purchase["licenses"])
    assert (purchase["order"]["list_total"], purchase["order"]["discount_percent"], purchase["order"]["total"]) == (
        "600.00", "14.50", "513.00")  # tier 10 -> 5% on top of the partner's 10%
    pool = await call(client, "GET", "/pool?limit=4", seed.admin, status=200)
    assert pool["total"] == 10 and len(pool["items"]) == 4 and pool["next"].endswith("limit=4&offset=4")


async def test_l7_l8_l9_renew_by_years_with_a_coupon_and_with_migration(client, seed):
    licence = await active(client, seed.admin, seed.acme_ws, seats=2)
    key = licence["key"]
    by_years = await call(client, "POST", f"/licenses/{key}/renew", seed.admin, json={"years": 1}, status=200)
    assert by_years["order"]["kind"] == "renewal" and by_years["coupon"] is None
    assert by_years["license"]["expires_at"].startswith("2028-03-10")
    coupon = await buy(client, seed.admin, seats=2)
    await buy(client, seed.admin, seats=2, notes="kept")
    with_coupon = await call(client, "POST", f"/licenses/{key}/renew", seed.admin, json={"coupon": True}, status=200)
    assert with_coupon["coupon"] == coupon["key"] and with_coupon["order"] is None
    assert with_coupon["license"]["expires_at"].startswith("2029-03-10")
    none_left = await call(client, "POST", f"/licenses/{key}/renew", seed.admin, json={"coupon": True}, status=409)
    assert none_left["error"]["code"] == "no_coupon"
    migrated = await call(client, "POST", f"/licenses/{key}/renew", seed.admin,
                          json={"years": 1, "edition": "ENT"}, status=200)
    assert migrated["license"]["edition"] == "ENT" and migrated["order"]["list_total"] == "100.00"
    both = await call(client, "POST", f"/licenses/{key}/renew", seed.admin, json={"years": 1, "coupon": True},
                      status=422)
    assert both["error"]["code"] == "validation_error"


async def test_l10_l13_patch_notes_and_auto_renewal_then_read_the_paged_history(client, seed):
    key = (await active(client, seed.admin, seed.acme_ws))["key"]
    patched = await call(client, "PATCH", f"/licenses/{key}", seed.admin, json={"notes": "call Bob", "auto_renew": False},
                         status=200)
    assert patched["notes"] == "call Bob" and patched["auto_renew"] is False and patched["next_renewal_date"] is None
    history = await call(client, "GET", f"/licenses/{key}/history?limit=2", seed.admin, status=200)
    assert history["total"] == 4 and [h["action"] for h in history["items"]] == ["purchased", "assigned"]
    rest = await call(client, "GET", history["next"].removeprefix("/api/v1"), seed.admin, status=200)
    assert [h["action"] for h in rest["items"]] == ["notes_edited", "auto_renew_cancelled"]
    assert rest["items"][0]["actor"] == f"user:alice#{seed.admin_id}"
    assert rest["items"][0]["before"] == {"notes": ""} and rest["items"][0]["after"] == {"notes": "call Bob"}
    assert rest["next"] is None
    empty = await call(client, "PATCH", f"/licenses/{key}", seed.admin, json={}, status=422)
    assert "give notes, auto_renew or both" in empty["error"]["message"]


async def test_l11_search_and_filters(client, seed, clock):
    acme = await active(client, seed.admin, seed.acme_ws, notes="ticket 7")
    globex = await active(client, seed.admin, seed.globex_ws)
    coupon = await buy(client, seed.admin)
    found = await call(client, "GET", "/licenses?q=glob*", seed.admin, status=200)
    assert [i["key"] for i in found["items"]] == [globex["key"]]
    found = await call(client, "GET", "/licenses?q=ticket", seed.admin, status=200)
    assert [i["key"] for i in found["items"]] == [acme["key"]]
    clock.set(clock.now() + timedelta(days=350))
    soon = await call(client, "GET", "/licenses?expiring_soon=true", seed.admin, status=200)
    assert {i["key"] for i in soon["items"]} == {acme["key"], globex["key"]}
    deadline = await call(client, "GET", "/licenses?coupon_deadline_soon=1", seed.admin, status=200)
    assert [i["key"] for i in deadline["items"]] == [coupon["key"]]
    clock.set(clock.now() + timedelta(days=20))
    expired = await call(client, "GET", "/licenses?expired=true", seed.admin, status=200)
    assert {i["key"] for i in expired["items"]} == {acme["key"], globex["key"], coupon["key"]}
    bad = await call(client, "GET", "/licenses?status=sleeping", seed.admin, status=422)
    assert bad["error"]["field"] == "status"


async def test_l12_order_history_resource(client, seed):
    key = (await active(client, seed.admin, seed.acme_ws))["key"]
    await buy(client, seed.admin)
    await call(client, "POST", f"/licenses/{key}/renew", seed.admin, json={"years": 2}, status=200)
    orders = await call(client, "GET", "/orders", seed.admin, status=200)
    assert orders["total"] == 3
    assert [o["kind"] for o in orders["items"]] == ["renewal", "new", "new"]
    assert [(o["used_keys"], o["unused_keys"]) for o in orders["items"]] == [(1, 0), (0, 1), (1, 0)]
    one = await call(client, "GET", f"/orders/{orders['items'][2]['id']}", seed.admin, status=200)
    assert one["keys"] == [{"key": key, "status": "active", "used": True}]
    renewals = await call(client, "GET", "/orders?kind=renewal", seed.admin, status=200)
    assert renewals["total"] == 1


async def test_l14_l15_settings_pool_and_user_allocation(client, seed):
    settings = await call(client, "GET", "/settings/licensing", seed.admin, status=200)
    assert settings == {"automatic_exchange": True, "pool_mode": None, "pool_limit": None}  # L15: not set
    changed = await call(client, "PATCH", "/settings/licensing", seed.admin, json={"automatic_exchange": False},
                         status=200)
    assert changed["automatic_exchange"] is False
    allocation = await call(client, "PUT", f"/users/{seed.admin_id}/allocation", seed.admin,
                            json={"pool_mode": "limited", "pool_limit": 1}, status=200)
    assert allocation["effective"] == {"source": "user", "pool_mode": "limited", "pool_limit": 1, "in_use": 0}
    await active(client, seed.admin, seed.acme_ws)
    key = (await buy(client, seed.admin))["key"]
    refused = await call(client, "POST", f"/licenses/{key}/assign", seed.admin, json={"workspace_id": seed.globex_ws},
                         status=409)
    assert refused["error"]["code"] == "pool_limit"
    await call(client, "PATCH", "/settings/licensing", seed.admin, json={"pool_mode": "limited", "pool_limit": 5},
               status=200)
    overridden = await call(client, "GET", f"/users/{seed.admin_id}/allocation", seed.admin, status=200)
    assert overridden["effective"]["source"] == "company" and overridden["pool_mode"] == "limited"
    removed = await call(client, "PATCH", "/settings/licensing", seed.admin, json={"pool_mode": None}, status=200)
    assert (removed["pool_mode"], removed["pool_limit"], removed["automatic_exchange"]) == (None, None, False)
    restored = await call(client, "GET", f"/users/{seed.admin_id}/allocation", seed.admin, status=200)
    assert restored["effective"]["source"] == "user"  # L15: without a company setting the user's applies
    pooled = await call(client, "POST", "/pool", seed.admin, json={"key": key}, status=200)
    assert pooled["in_pool"] is True
    unpooled = await call(client, "DELETE", f"/pool/{key}", seed.admin, status=200)
    assert unpooled["in_pool"] is False


async def test_l16_delete_expired_previews_then_voids(client, seed, clock):
    expired = await active(client, seed.admin, seed.acme_ws)
    clock.set(clock.now() + timedelta(days=400))
    await call(client, "PATCH", "/settings/licensing", seed.admin, json={"automatic_exchange": False}, status=200)
    preview = await call(client, "POST", "/licenses/delete-expired", seed.admin,
                         json={"mode": "unassigned", "dry_run": True}, status=200)
    assert preview["count"] == 0
    preview = await call(client, "POST", "/licenses/delete-expired", seed.admin,
                         json={"mode": "auto-renew", "dry_run": True}, status=200)
    assert preview["keys"] == [expired["key"]]
    done = await call(client, "POST", "/licenses/delete-expired", seed.admin, json={"mode": "all"}, status=200)
    assert done["count"] == 1 and not done["dry_run"]
    shown = await call(client, "GET", f"/licenses/{expired['key']}", seed.admin, status=200)
    assert shown["status"] == "void" and shown["workspace"] is None
    listed = await call(client, "GET", "/licenses", seed.admin, status=200)
    assert listed["total"] == 0


# --- S8 ---------------------------------------------------------------------------------------


async def test_s8_a_customer_admin_reaches_only_their_customers_and_404_elsewhere(client, seed):
    mine = await active(client, seed.admin, seed.acme_ws)
    theirs = await active(client, seed.admin, seed.globex_ws)
    coupon = await buy(client, seed.admin)
    listed = await call(client, "GET", "/licenses", seed.cadmin, status=200)
    assert [i["key"] for i in listed["items"]] == [mine["key"]]
    await call(client, "GET", f"/licenses/{mine['key']}", seed.cadmin, status=200)
    await call(client, "PATCH", f"/licenses/{mine['key']}", seed.cadmin, json={"notes": "ok"}, status=200)
    await call(client, "POST", f"/licenses/{mine['key']}/renew", seed.cadmin, json={"years": 1}, status=404)
    for key in (theirs["key"], coupon["key"]):
        await call(client, "GET", f"/licenses/{key}", seed.cadmin, status=404)
        await call(client, "GET", f"/licenses/{key}/history", seed.cadmin, status=404)
        await call(client, "PATCH", f"/licenses/{key}", seed.cadmin, json={"notes": "x"}, status=404)
        await call(client, "POST", f"/licenses/{key}/renew", seed.cadmin, json={"years": 1}, status=404)
    # an id that does not exist and one that is not theirs answer the same
    missing = await call(client, "GET", f"/licenses/{coupon['key'][:-1]}", seed.cadmin, status=422)
    assert missing["error"]["code"] == "invalid_key"
    await call(client, "POST", "/licenses", seed.cadmin, json={"edition": "BUS", "seats": 1}, status=404)
    await call(client, "GET", "/orders", seed.cadmin, status=404)
    await call(client, "GET", "/pool", seed.cadmin, status=404)
    await call(client, "GET", "/settings/licensing", seed.cadmin, status=404)
    await call(client, "POST", f"/licenses/{coupon['key']}/assign", seed.cadmin,
               json={"workspace_id": seed.acme_ws}, status=404)


async def test_s8_another_partners_admin_sees_none_of_our_licenses(client, seed):
    mine = await active(client, seed.admin, seed.acme_ws)
    assert (await call(client, "GET", "/licenses", seed.stranger, status=200))["total"] == 0
    await call(client, "GET", f"/licenses/{mine['key']}", seed.stranger, status=404)
    await call(client, "POST", f"/licenses/{(await buy(client, seed.stranger))['key']}/assign", seed.stranger,
               json={"workspace_id": seed.acme_ws}, status=404)


# --- authentication, errors, OpenAPI ------------------------------------------------------------


async def test_tokens_are_stored_hashed_and_bad_tokens_get_401(client, seed, gateway):
    with gateway.db() as s:
        hashes = set(s.scalars(select(ApiToken.token_hash)))
    assert hash_token(seed.admin) in hashes and seed.admin not in hashes
    for headers in ({}, {"Authorization": "Basic abc"}, auth("gw_not-a-token"), auth(seed.revoked)):
        response = await client.get("/api/v1/licenses", headers=headers)
        body = await response.json()
        assert response.status == 401 and body["error"]["code"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    unknown = await client.get("/api/v1/nothing-here")
    assert unknown.status == 401  # no token: not even whether the route exists is told


async def test_errors_share_one_shape_and_leak_nothing(client, seed):
    bad_json = await client.post("/api/v1/licenses", data="{nope", headers=auth(seed.admin))
    assert bad_json.status == 400 and (await bad_json.json())["error"]["code"] == "bad_request"
    extra = await call(client, "POST", "/licenses", seed.admin, json={"edition": "BUS", "seats": 1, "colour": "red"},
                       status=422)
    assert extra["error"]["field"] == "colour" and "unknown field" in extra["error"]["message"]
    low = await call(client, "POST", "/licenses", seed.admin, json={"edition": "BUS", "seats": 0}, status=422)
    assert low["error"]["field"] == "seats"
    unpriced = await call(client, "POST", "/licenses", seed.admin, json={"edition": "NOPE", "seats": 1}, status=422)
    assert unpriced["error"] == {"code": "unknown_edition", "field": "edition",
                                 "message": "unknown edition 'NOPE' (known editions: BUS, ENT)"}
    licence = await buy(client, seed.admin)
    typo = licence["key"][:-1] + ("0" if licence["key"][-1] != "0" else "1")
    mistyped = await call(client, "GET", f"/licenses/{typo}", seed.admin, status=422)
    assert mistyped["error"]["code"] == "invalid_key" and "mistyped" in mistyped["error"]["message"]
    route = await call(client, "GET", "/nothing-here", seed.admin, status=404)
    assert route["error"]["code"] == "not_found"
    limit = await call(client, "GET", "/licenses?limit=0", seed.admin, status=422)
    assert limit["error"]["field"] == "limit"
    response = await client.get("/api/v1/boom", headers={**auth(seed.admin), "X-Request-ID": "req-42"})
    text = await response.text()
    assert response.status == 500 and "hunter2" not in text and "secret.py" not in text
    assert (await response.json())["error"] == {
        "code": "internal_error", "message": "internal error; quote request id req-42 when reporting it", "field": None}
    assert response.headers["X-Request-ID"] == "req-42"


async def test_openapi_document_is_valid_public_and_lists_every_route(client, seed):
    response = await client.get("/api/v1/openapi.json")
    assert response.status == 200
    document = await response.json()
    validate(document)
    import gateway.web.licenses as module

    for endpoint in module.routes.endpoints:
        operation = document["paths"][endpoint.path][endpoint.method.lower()]
        assert operation["summary"] == endpoint.summary
    renew = document["paths"]["/api/v1/licenses/{key}/renew"]["post"]
    assert renew["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/RenewBody"}
    listing = document["paths"]["/api/v1/licenses"]["get"]
    assert {p["name"] for p in listing["parameters"]} >= {"q", "expired", "expiring_soon", "coupon_deadline_soon",
                                                          "limit", "offset"}
    assert document["components"]["schemas"]["BuyBody"]["additionalProperties"] is False

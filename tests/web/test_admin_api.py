"""Issue 15 over HTTP: editions, partners, customers and workspaces; S8 with two customer admins."""

from __future__ import annotations

import pytest
from openapi_spec_validator import validate

from gateway.core import db as gdb
from gateway.core.models import UserRole
from gateway.core.users import create_token, create_user
from tests.web.test_billing_api import call, client, gateway, seed, seed_world  # noqa: F401

__all__ = ["client", "gateway", "seed", "seed_world"]


@pytest.fixture
def dave(gateway, seed) -> str:  # noqa: F811
    """A second customer admin, of Globex only."""
    with gdb.transaction(gateway.db) as s:
        from gateway.core.models import Customer

        partner_id = s.get_one(Customer, seed.globex).partner_id
        user = create_user(s, partner_id=partner_id, name="dave", role=UserRole.CUSTOMER_ADMIN,
                           now=gateway.clock.now(), customer_ids=[seed.globex])
        return create_token(s, user, name="test", now=gateway.clock.now())[1]


async def test_s8_each_customer_admin_sees_only_their_customer_and_workspace_and_changes_nothing(
        client, seed, dave):  # noqa: F811
    for token, mine, mine_ws, other, other_ws in ((seed.cadmin, seed.acme, seed.acme_ws, seed.globex, seed.globex_ws),
                                                  (dave, seed.globex, seed.globex_ws, seed.acme, seed.acme_ws)):
        assert (await call(client, "GET", f"/customers/{mine}", token, status=200))["id"] == mine
        assert (await call(client, "GET", f"/workspaces/{mine_ws}", token, status=200))["id"] == mine_ws
        await call(client, "GET", f"/customers/{other}", token, status=404)
        await call(client, "GET", f"/workspaces/{other_ws}", token, status=404)
        await call(client, "PATCH", f"/customers/{mine}", token, status=404, json={"name": "X"})
        await call(client, "POST", f"/customers/{mine}/archive", token, status=404)
        await call(client, "PATCH", f"/workspaces/{mine_ws}", token, status=404, json={"max_devices": 3})
        await call(client, "GET", "/partners", token, status=404)
        await call(client, "GET", "/partners/1", token, status=404)
        await call(client, "POST", "/editions", token, status=404, json={"code": "x", "name": "X"})
        assert (await call(client, "GET", "/editions", token, status=200))["total"] == 0
    # Another partner's admin sees none of them.
    await call(client, "GET", f"/customers/{seed.acme}", seed.stranger, status=404)
    await call(client, "GET", f"/workspaces/{seed.acme_ws}", seed.stranger, status=404)
    await call(client, "GET", "/partners/1", seed.stranger, status=404)
    await call(client, "GET", "/customers/99999999999", seed.admin, status=404)


async def test_s4_admin_changes_a_customer_and_its_workspace_over_the_api(client, seed):  # noqa: F811
    body = await call(client, "PATCH", f"/customers/{seed.acme}", seed.admin, status=200,
                      json={"timezone": "Asia/Tokyo", "billing_email": "ap@acme.example"})
    assert body["timezone"] == "Europe/Berlin" and body["pending_timezone"] == "Asia/Tokyo"
    assert "next cycle" in body["notice"]
    await call(client, "PATCH", f"/customers/{seed.acme}", seed.admin, status=422, json={"timezone": "Mars/Base"})
    ws = await call(client, "PATCH", f"/workspaces/{seed.acme_ws}", seed.admin, status=200, json={"max_devices": 7})
    assert ws["max_devices"] == 7
    archived = await call(client, "POST", f"/customers/{seed.acme}/archive", seed.admin, status=200)
    assert archived["archived_at"] is not None
    partners = await call(client, "GET", "/partners", seed.admin, status=200)
    assert partners["total"] == 1
    pid = partners["items"][0]["id"]
    patched = await call(client, "PATCH", f"/partners/{pid}", seed.admin, status=200, json={"invoice_prefix": "NW-26"})
    assert patched["invoice_prefix"] == "NW-26"
    await call(client, "PATCH", f"/partners/{pid}", seed.admin, status=422, json={"invoice_prefix": "=1+1"})
    await call(client, "PATCH", f"/partners/{pid}", seed.admin, status=422, json={"discount_percent": "50"})


async def test_editions_catalogue_is_changed_only_on_a_single_partner_install(client, seed):  # noqa: F811
    body = await call(client, "POST", "/editions", seed.admin, status=409,
                      json={"code": "enterprise-security", "name": "Enterprise Security", "price_per_seat_year": "45"})
    assert "gateway editions" in body["error"]["message"] if "error" in body else str(body)


async def test_openapi_documents_the_admin_surface(client, seed):  # noqa: F811
    document = await (await client.get("/api/v1/openapi.json")).json()
    validate(document)
    for path in ("/api/v1/editions", "/api/v1/editions/{code}", "/api/v1/partners/{partner_id}",
                 "/api/v1/customers/{customer_id}", "/api/v1/workspaces/{workspace_id}"):
        assert path in document["paths"], path

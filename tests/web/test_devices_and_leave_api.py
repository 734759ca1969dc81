"""The admin API for M2 (one workspace leaves monthly billing) and M3 (devices, refused ones with the reason)."""

from __future__ import annotations

from datetime import datetime

import pytest
from builders import make_gateway

from gateway.app import Gateway
from gateway.core import db as gdb
from gateway.core.models import Customer, Device, Partner, UserRole, Workspace
from gateway.core.users import create_token, create_user
from gateway.web import devices as device_routes
from gateway.web.app import create_app


@pytest.fixture
def gateway(db_engine, clock) -> Gateway:
    return make_gateway(db_engine, clock)


def seed(gateway: Gateway) -> dict:
    """Acme (with a customer admin) and Globex, a workspace each with an admitted and a refused device."""
    now = gateway.clock.now()
    with gdb.transaction(gateway.db) as s:
        partner = Partner(name="Northwind IT", email="owner@northwind.example", created_at=now)
        s.add(partner)
        s.flush()
        ids: dict = {}
        for name in ("Acme", "Globex"):
            customer = Customer(partner_id=partner.id, name=name, timezone="UTC", created_at=now)
            s.add(customer)
            s.flush()
            workspace = Workspace(customer_id=customer.id, name=f"{name} HQ", max_devices=1, created_at=now)
            s.add(workspace)
            s.flush()
            s.add_all([
                Device(connection="rmm", external_id=f"{name}-1", org_external_id="o", workspace_id=workspace.id,
                       hostname=f"{name.lower()}-1", first_seen_at=now, updated_at=now),
                Device(connection="rmm", external_id=f"{name}-2", org_external_id="o", refused_workspace_id=workspace.id,
                       refused_reason=f"{name} HQ: workspace is at its maximum of 1 device", refused_at=now,
                       hostname=f"{name.lower()}-2", first_seen_at=now, updated_at=now),
            ])
            ids[name] = (customer.id, workspace.id)
        admin = create_user(s, partner_id=partner.id, name="alice", role=UserRole.ADMIN, now=now)
        cadmin = create_user(s, partner_id=partner.id, name="carol", role=UserRole.CUSTOMER_ADMIN, now=now,
                             customer_ids=[ids["Acme"][0]])
        ids["admin"], ids["cadmin"] = (create_token(s, u, name="t", now=now)[1] for u in (admin, cadmin))
        return ids


async def call(client, method, path, token, *, status, **kwargs):
    response = await client.request(method, f"/api/v1{path}", headers={"Authorization": f"Bearer {token}"}, **kwargs)
    body = await response.json()
    assert response.status == status, body
    return body


async def test_m3_the_devices_list_shows_refused_devices_with_the_reason_and_time(aiohttp_client, gateway):
    ids = seed(gateway)
    client = await aiohttp_client(create_app(gateway))
    acme_ws, globex_ws = ids["Acme"][1], ids["Globex"][1]
    refused = await call(client, "GET", f"/devices?refused=true&workspace_id={acme_ws}", ids["admin"], status=200)
    (item,) = refused["items"]
    assert (item["hostname"], item["workspace_id"], item["workspace"], item["refused"]) == ("acme-2", acme_ws,
                                                                                            "Acme HQ", True)
    assert "maximum of 1 device" in item["refused_reason"]
    assert datetime.fromisoformat(item["refused_at"]) == gateway.clock.now()
    everything = await call(client, "GET", "/devices", ids["admin"], status=200)
    assert everything["total"] == 4 and sum(i["refused"] for i in everything["items"]) == 2
    # S8: a customer admin sees only her customers' devices; another workspace is not there for her.
    mine = await call(client, "GET", "/devices", ids["cadmin"], status=200)
    assert {i["workspace"] for i in mine["items"]} == {"Acme HQ"}
    await call(client, "GET", f"/devices?workspace_id={globex_ws}", ids["cadmin"], status=404)
    document = await (await client.get("/api/v1/openapi.json")).json()
    for endpoint in device_routes.routes.endpoints:
        assert endpoint.summary == document["paths"][endpoint.path][endpoint.method.lower()]["summary"]


async def test_m2_one_workspace_leaves_monthly_billing_after_a_confirmation(aiohttp_client, gateway):
    ids = seed(gateway)
    client = await aiohttp_client(create_app(gateway))
    acme_ws = ids["Acme"][1]
    await call(client, "POST", "/billing/monthly", ids["admin"], json={}, status=201)
    await call(client, "POST", "/billing/monthly/workspaces", ids["admin"], status=201,
               json={"workspace_id": acme_ws, "max_devices": 5})
    path = f"/billing/monthly/workspaces/{acme_ws}/leave"
    preview = await call(client, "POST", path, ids["admin"], json={}, status=200)  # the body is required
    today = gateway.clock.now().date().isoformat()
    assert (preview["confirmed"], preview["last_day"], preview["devices"]) == (False, today, ["acme-1"])
    done = await call(client, "POST", path, ids["admin"], json={"confirm": True}, status=200)
    assert done["confirmed"]
    again = await call(client, "POST", path, ids["admin"], json={"confirm": True}, status=409)
    assert "not on monthly billing" in again["error"]["message"]
    document = await (await client.get("/api/v1/openapi.json")).json()
    assert "post" in document["paths"]["/api/v1/billing/monthly/workspaces/{workspace_id}/leave"]

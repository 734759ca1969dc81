"""Health, readiness and metrics endpoints."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import date, timedelta
from decimal import Decimal

from aiohttp import web
from builders import client_for, make_gateway
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import Gateway
from gateway.core import db as gdb
from gateway.core.models import (
    Bill,
    BillKind,
    BillStatus,
    ConnectionState,
    Customer,
    Delivery,
    DeliveryStatus,
    Device,
    Partner,
)
from gateway.core.settings import ConnectionSettings
from gateway.sync.webhooks import add_webhook_routes
from gateway.web.health import add_health_routes
from gateway.web.metrics import Metrics, get_metrics

CONNECTIONS = [
    ConnectionSettings(name="ninja", plugin="ninjaone", base_url="https://ninja.example"),
    ConnectionSettings(name="cw", plugin="connectwise", base_url="https://cw.example", webhook_scheme="connectwise",
                       webhook_secret="cw-key"),
    ConnectionSettings(name="datto", plugin="datto_rmm", base_url="https://datto.example"),
    ConnectionSettings(name="old", plugin="datto_rmm", base_url="https://old.example", enabled=False),
]


def health_gateway(engine, clock) -> Gateway:
    return make_gateway(engine, clock, connections=CONNECTIONS)


def health_and_webhook_routes(app: web.Application, gateway: Gateway) -> None:
    add_health_routes(app, gateway)
    add_webhook_routes(app, gateway, get_metrics(gateway))


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_healthz_answers_while_the_process_lives(aiohttp_client, db_engine, clock):
    client = await client_for(aiohttp_client, health_gateway(db_engine, clock), health_and_webhook_routes)
    response = await client.get("/healthz")
    assert (response.status, await response.json()) == (200, {"status": "ok"})


async def test_g5_readyz_is_ready_with_a_current_schema_and_reports_each_connection(aiohttp_client, db_engine, clock):
    gateway = health_gateway(db_engine, clock)
    now = clock.now()
    with gdb.transaction(gateway.db) as s:
        s.add(ConnectionState(connection="ninja", last_success_at=now, consecutive_failures=0, updated_at=now))
        s.add(ConnectionState(connection="cw", last_success_at=now - timedelta(hours=2), consecutive_failures=3,
                              last_error="cw: 503 from the server", last_error_at=now, updated_at=now))
    client = await client_for(aiohttp_client, gateway, health_and_webhook_routes)
    response = await client.get("/readyz")
    body = await response.json()
    # A failing tool does not make the gateway unready (G5): only the database does.
    assert response.status == 200 and body["status"] == "ready"
    assert body["database"] == {"status": "ok", "revision": gdb.head_revision()}
    states = {c["name"]: c for c in body["connections"]}
    assert set(states) == {"ninja", "cw", "datto"}  # the disabled one is not listed
    assert states["ninja"]["status"] == "ok" and states["ninja"]["last_success_at"] == now.isoformat()
    assert states["cw"]["status"] == "degraded" and states["cw"]["consecutive_failures"] == 3
    assert states["cw"]["last_error"] == "cw: 503 from the server"
    assert states["datto"]["status"] == "unknown"


async def test_readyz_is_503_on_a_database_without_the_current_schema(aiohttp_client, tmp_path, clock):
    engine = gdb.make_engine(f"sqlite:///{tmp_path / 'blank.db'}")
    client = await client_for(aiohttp_client, health_gateway(engine, clock), health_and_webhook_routes)
    response = await client.get("/readyz")
    body = await response.json()
    assert response.status == 503 and body["status"] == "not_ready"
    assert "run 'gateway db upgrade' first" in body["database"]["error"]
    assert all(c["status"] == "unknown" for c in body["connections"])
    engine.dispose()


async def test_readyz_is_503_when_the_database_cannot_be_reached(aiohttp_client, tmp_path, clock):
    engine = gdb.make_engine(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}")
    client = await client_for(aiohttp_client, health_gateway(engine, clock), health_and_webhook_routes)
    response = await client.get("/readyz")
    assert response.status == 503
    assert "cannot reach the database" in (await response.json())["database"]["error"]


def _seed(gateway, clock):
    now = clock.now()
    with gdb.transaction(gateway.db) as s:
        partner = Partner(name="MSP", created_at=now)
        customer = Customer(partner=partner, name="Acme", created_at=now)
        s.add(customer)
        s.flush()
        for n, (bill_status, delivery_status) in enumerate(
            [(BillStatus.ISSUED, DeliveryStatus.PENDING), (BillStatus.ISSUED, DeliveryStatus.PENDING),
             (BillStatus.PAID, DeliveryStatus.DELIVERED), (BillStatus.DRAFT, None)]
        ):
            bill = Bill(
                partner_id=partner.id, customer_id=customer.id, kind=BillKind.PLAN, source_id=n, number=f"INV-{n}",
                period_start=date(2026, 2, 1), period_end=date(2026, 2, 28), currency="USD", total=Decimal("10"),
                status=bill_status, issued_on=date(2026, 3, 1), due_on=date(2026, 3, 31), created_at=now,
            )
            s.add(bill)
            s.flush()
            if delivery_status is not None:
                s.add(Delivery(bill_id=bill.id, connection="cw", key=f"k{n}", status=delivery_status,
                               next_attempt_at=now, created_at=now))
        for n, (connection, online, deleted) in enumerate(
            [("ninja", True, False), ("ninja", True, False), ("ninja", False, False), ("ninja", False, True),
             ("datto", False, False)]
        ):
            s.add(Device(connection=connection, external_id=f"d{n}", org_external_id="o", online=online,
                         deleted=deleted, first_seen_at=now, updated_at=now))
        s.add(ConnectionState(connection="cw", consecutive_failures=2, updated_at=now))


async def test_metrics_text_parses_and_reports_stored_state_and_counted_events(aiohttp_client, db_engine, clock):
    gateway = health_gateway(db_engine, clock)
    _seed(gateway, clock)
    client = await client_for(aiohttp_client, gateway, health_and_webhook_routes)
    body = b'{"Type":"invoice"}'
    signature = base64.b64encode(hmac.new(hashlib.sha256(b"cw-key").digest(), body, hashlib.sha256).digest()).decode()
    headers = {"Content-Type": "application/json", "x-content-signature": signature}
    assert (await client.post("/webhooks/cw", data=body, headers=headers)).status == 200
    assert (await client.post("/webhooks/cw", data=body, headers=headers)).status == 200  # duplicate
    assert (await client.post("/webhooks/cw", data=body, headers={**headers, "x-content-signature": "x"})).status == 401
    assert (await client.post("/webhooks/whoever", data=body, headers=headers)).status == 404
    metrics = get_metrics(gateway)
    metrics.pull("ninja")
    metrics.pull("ninja", "error")
    metrics.retry("cw")
    metrics.rate_limited("cw")
    metrics.rate_limited("cw")

    response = await client.get("/metrics")
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
    samples = metric_samples(await response.text())
    assert samples[("gateway_database_up", ())] == 1
    assert samples[("gateway_deliveries", (("status", "pending"),))] == 2
    assert samples[("gateway_deliveries", (("status", "delivered"),))] == 1
    assert samples[("gateway_deliveries", (("status", "dead"),))] == 0
    assert samples[("gateway_bills", (("status", "issued"),))] == 2
    assert samples[("gateway_bills", (("status", "paid"),))] == 1
    assert samples[("gateway_bills", (("status", "draft"),))] == 1
    assert samples[("gateway_devices", (("connection", "ninja"), ("online", "true")))] == 2
    assert samples[("gateway_devices", (("connection", "ninja"), ("online", "false")))] == 1  # the deleted one is not
    assert samples[("gateway_devices", (("connection", "datto"), ("online", "false")))] == 1
    assert samples[("gateway_connection_consecutive_failures", (("connection", "cw"),))] == 2
    assert samples[("gateway_webhook_requests_total", (("connection", "cw"), ("outcome", "accepted")))] == 1
    assert samples[("gateway_webhook_requests_total", (("connection", "cw"), ("outcome", "duplicate")))] == 1
    assert samples[("gateway_webhook_requests_total", (("connection", "cw"), ("outcome", "unauthorized")))] == 1
    assert samples[("gateway_webhook_requests_total", (("connection", "_unknown"), ("outcome", "unknown_connection")))] == 1
    assert samples[("gateway_webhook_duration_seconds_count", ())] == 4
    assert samples[("gateway_pulls_total", (("connection", "ninja"), ("outcome", "ok")))] == 1
    assert samples[("gateway_pulls_total", (("connection", "ninja"), ("outcome", "error")))] == 1
    assert samples[("gateway_http_retries_total", (("connection", "cw"),))] == 1
    assert samples[("gateway_http_rate_limited_total", (("connection", "cw"),))] == 2


async def test_metrics_still_answer_when_the_database_is_down(aiohttp_client, tmp_path, clock):
    engine = gdb.make_engine(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}")
    client = await client_for(aiohttp_client, health_gateway(engine, clock), health_and_webhook_routes)
    response = await client.get("/metrics")
    samples = metric_samples(await response.text())
    assert response.status == 200 and samples[("gateway_database_up", ())] == 0
    assert not any(name == "gateway_deliveries" for name, _ in samples)


def test_each_gateway_has_its_own_registry():
    first, second = Metrics(), Metrics()
    first.retry("cw")
    assert metric_samples(first.render().decode())[("gateway_http_retries_total", (("connection", "cw"),))] == 1
    assert ("gateway_http_retries_total", (("connection", "cw"),)) not in metric_samples(second.render().decode())

"""Issue 22: a webhook refused for want of a webhook_secret answers 404 like any unknown name, and the log says why."""

from __future__ import annotations

from builders import client_for, make_gateway
from structlog.testing import capture_logs

from gateway.core.settings import ConnectionSettings
from gateway.sync.webhooks import add_webhook_routes
from gateway.web.metrics import Metrics


def _routes(app, gateway) -> None:
    add_webhook_routes(app, gateway, Metrics())


async def test_g4_a_webhook_for_a_connection_without_secret_is_404_and_logged_with_the_reason(
        aiohttp_client, db_engine, clock):
    gateway = make_gateway(db_engine, clock, connections=[
        ConnectionSettings(name="cw", plugin="connectwise", base_url="https://cw.example"),
        ConnectionSettings(name="off", plugin="connectwise", base_url="https://off.example", enabled=False),
    ])
    client = await client_for(aiohttp_client, gateway, _routes)
    answers = {}
    with capture_logs() as logs:
        for name in ("cw", "off", "nobody"):
            response = await client.post(f"/webhooks/{name}", data=b"{}", headers={"Content-Type": "application/json"})
            answers[name] = (response.status, await response.json())
    assert answers["cw"] == answers["off"] == answers["nobody"]  # nothing to tell an outsider apart
    assert answers["cw"][0] == 404
    refused = {entry["connection"]: entry for entry in logs if entry["event"] == "webhook.refused"}
    assert refused["cw"]["log_level"] == "warning" and "no webhook_secret" in refused["cw"]["reason"]
    assert "set webhook_secret" in refused["cw"]["reason"]
    assert "disabled" in refused["off"]["reason"]
    assert refused["nobody"]["reason"] == "no connection of that name is configured"

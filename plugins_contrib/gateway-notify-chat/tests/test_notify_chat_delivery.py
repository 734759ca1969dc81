"""Posting gateway events to a local Slack/Teams webhook receiver on 127.0.0.1."""

from __future__ import annotations

import socket

import pytest
from structlog.testing import capture_logs

import gateway_notify_chat
from gateway import ConfigError, PermanentError, TransientError, get_plugin_manager
from gateway_notify_chat import ENV_EVENTS, ENV_STYLE, ENV_URL, ChatNotifier, from_environment
from gateway_notify_chat.simulator import FAULTS, RECEIVED, REQUESTS, SLACK_PATH, TEAMS_PATH, create_app

SECRETS = ("simulatedsecret0001", "simulatedsecret0002")
DEAD_LETTER = {"delivery_id": 17, "connection": "halo-main", "key": "halo-main/cust-17/2026-02", "attempts": 8,
               "error": "PermanentError: HTTP 400"}


class Sleeps:
    """Records the waits a notifier asks for instead of waiting them."""

    def __init__(self):
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


@pytest.fixture(autouse=True)
def no_environment_notifier(monkeypatch):
    # The installed plugin reads these; tests choose them explicitly.
    for name in (ENV_URL, ENV_STYLE, ENV_EVENTS):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def receiver(aiohttp_server):
    app = create_app()
    server = await aiohttp_server(app, host="127.0.0.1")
    return app, f"http://127.0.0.1:{server.port}"


async def test_g2_dead_lettered_delivery_reaches_slack_as_a_valid_message(receiver):
    app, base = receiver
    await ChatNotifier(base + SLACK_PATH, style="slack").send("delivery.dead_lettered", DEAD_LETTER)
    (received,) = app[RECEIVED]
    assert received.service == "slack"
    assert received.body["blocks"][0]["text"]["text"] == "Bill delivery failed for good"
    fields = [f["text"] for b in received.body["blocks"] if b["type"] == "section" for f in b.get("fields", [])]
    assert "*Key*\nhalo-main/cust-17/2026-02" in fields


async def test_l4_license_reminder_reaches_teams_as_an_adaptive_card(receiver):
    app, base = receiver
    payload = {"license_key": "EMS-ABCD-1234", "days_left": 14}
    await ChatNotifier(base + TEAMS_PATH, style="teams").send("license.reminder", payload)
    (received,) = app[RECEIVED]
    card = received.body["attachments"][0]["content"]
    assert received.service == "teams" and card["body"][0]["text"] == "License renewal reminder"
    assert {"title": "License key", "value": "EMS-ABCD-1234"} in card["body"][2]["facts"]


async def test_g3_reconciliation_difference_goes_out_through_the_gateway_notify_hook(receiver):
    app, base = receiver
    notifier = ChatNotifier(base + SLACK_PATH, style="slack")
    manager = get_plugin_manager(extra_plugins=[notifier], load_entry_points=False)
    payload = {"connection": "cw", "customer": "Acme Dental", "key": "cw/7/2026-02", "kind": "amount",
               "gateway_value": "41 x, 102.50", "psa_value": "40 x, 100.00"}
    await manager.call_each_async("gateway_notify", event="reconciliation.difference", payload=payload)
    assert not manager.failures
    (received,) = app[RECEIVED]
    fields = [f["text"] for b in received.body["blocks"] if b["type"] == "section" for f in b.get("fields", [])]
    assert "*Gateway value*\n41 x, 102.50" in fields and "*Psa value*\n40 x, 100.00" in fields


async def test_installed_plugin_is_found_by_its_entry_point_and_silent_until_configured(receiver, monkeypatch):
    app, base = receiver
    manager = get_plugin_manager()
    assert manager.pm.get_plugin("notify-chat") is gateway_notify_chat
    await manager.call_each_async("gateway_notify", event="license.reminder", payload={"days_left": 7})
    assert app[REQUESTS] == [] and not manager.failures

    monkeypatch.setenv(ENV_URL, base + TEAMS_PATH)
    monkeypatch.setenv(ENV_STYLE, "teams")
    monkeypatch.setenv(ENV_EVENTS, "license.reminder, delivery.dead_lettered")
    await manager.call_each_async("gateway_notify", event="license.reminder", payload={"days_left": 7})
    await manager.call_each_async("gateway_notify", event="connection.recovered", payload={"connection": "cw"})
    assert [r.service for r in app[RECEIVED]] == ["teams"]  # connection.recovered is filtered out
    assert not manager.failures


async def test_throttled_webhook_is_retried_after_its_retry_after(receiver):
    app, base = receiver
    app[FAULTS].throttle(2, retry_after=3)
    sleeps = Sleeps()
    await ChatNotifier(base + SLACK_PATH, style="slack", sleep=sleeps).send("license.reminder", {"days_left": 30})
    assert sleeps.waits == [3.0, 3.0]
    assert len(app[REQUESTS]) == 3 and len(app[RECEIVED]) == 1


async def test_server_errors_and_dropped_connections_are_retried_with_backoff(receiver):
    app, base = receiver
    app[FAULTS].fail(1, status=502).drop(1)
    sleeps = Sleeps()
    await ChatNotifier(base + TEAMS_PATH, style="teams", sleep=sleeps, max_attempts=3).send("connection.degraded", {})
    assert sleeps.waits == [1.0, 2.0] and len(app[RECEIVED]) == 1


async def test_retries_that_run_out_raise_a_transient_error(receiver):
    app, base = receiver
    app[FAULTS].fail(5, status=503)
    notifier = ChatNotifier(base + SLACK_PATH, style="slack", sleep=Sleeps(), max_attempts=3)
    with pytest.raises(TransientError, match="after 3 attempt"):
        await notifier.send("delivery.dead_lettered", DEAD_LETTER)
    assert len(app[REQUESTS]) == 3 and app[RECEIVED] == []


async def test_a_refused_message_is_not_retried_and_the_error_says_why(receiver):
    app, base = receiver
    wrong = base + "/services/T0SIM0001/B0SIM0001/simulatedsecret0001-revoked"
    sleeps = Sleeps()
    with pytest.raises(PermanentError, match=r"HTTP 404 \(no_service\)") as caught:
        await ChatNotifier(wrong, style="slack", sleep=sleeps).send("license.reminder", {})
    assert caught.value.status == 404 and "127.0.0.1" in str(caught.value)
    assert len(app[REQUESTS]) == 1 and sleeps.waits == []


async def test_webhook_secrets_never_reach_a_log_line_or_an_error(receiver, gateway_redact):
    app, base = receiver
    app[FAULTS].throttle(1, retry_after=0).fail(9, status=503)
    notifier = ChatNotifier(base + SLACK_PATH, style="slack", sleep=Sleeps(), max_attempts=2)
    manager = get_plugin_manager(extra_plugins=[notifier], load_entry_points=False)
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    with capture_logs() as logs:
        await manager.call_each_async("gateway_notify", event="delivery.dead_lettered", payload=DEAD_LETTER)
        with pytest.raises(TransientError, match="ClientConnectorError") as refused:
            await ChatNotifier(f"http://127.0.0.1:{closed_port}{SLACK_PATH}", style="slack", max_attempts=1).send(
                "license.reminder", {}
            )
    assert [entry["event"] for entry in logs] == ["notify_chat.retry", "plugin.hook_failed"]
    assert "did not take the delivery.dead_lettered message after 2 attempt(s)" in manager.failures[0].error
    text = repr(logs) + repr(manager.failures) + str(refused.value) + repr(notifier)
    for secret in SECRETS:
        assert secret not in text
    # And should anything else ever log the URL, the gateway's redaction removes it.
    assert SECRETS[0] not in str(gateway_redact({"event": "x", "url": base + SLACK_PATH}))


def test_configuration_is_checked_without_echoing_the_url():
    secret_url = "http://chat.example.com/services/T1/B1/topsecretvalue"
    with pytest.raises(ConfigError) as caught:
        ChatNotifier(secret_url)
    assert "https://" in str(caught.value) and "topsecretvalue" not in str(caught.value)
    assert ChatNotifier("https://hooks.slack.com/services/T1/B1/abc").style == "slack"
    assert ChatNotifier("https://acme.webhook.office.com/webhookb2/x/IncomingWebhook/y/z").style == "teams"
    with pytest.raises(ConfigError, match="GATEWAY_NOTIFY_CHAT_STYLE"):
        ChatNotifier("https://chat.example.com/hook/abc")
    assert from_environment({}) is None
    configured = from_environment({ENV_URL: "https://chat.example.com/h", ENV_STYLE: "Teams", ENV_EVENTS: "a,b"})
    assert configured is not None and configured.style == "teams" and configured.events == {"a", "b"}

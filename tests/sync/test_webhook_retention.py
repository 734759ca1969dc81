"""G4 retention: webhook ids are kept as long as a replay or a sender's retry can need them, then pruned."""

from __future__ import annotations

import base64
from datetime import timedelta

from builders import make_gateway
from sqlalchemy import select

from gateway.adapters import AdapterSpec
from gateway.core import db as gdb
from gateway.core.models import ReceivedWebhook
from gateway.core.retention import prune_received_webhooks
from gateway.core.settings import ConnectionSettings, WebhookSettings
from gateway.hookspecs import hookimpl
from gateway.sync.jobs import prune_webhook_ids, webhook_id_cutoffs

SECRET = "whsec_" + base64.b64encode(b"gateway-test-key-0123456789abcd").decode()


class Kinds:
    @hookimpl
    def gateway_register_adapters(self):
        return [AdapterSpec(kind="ret-rmm", role="rmm", factory=lambda c, x: None, webhook_scheme="standard-webhooks")]


class LongWindow:
    """A plugin scheme whose timestamps are good for a week: its ids must outlive the default."""

    name = "long-window"
    replay_window_seconds = 60 * 86400.0

    def verify(self, headers, raw_body, secret, now):  # pragma: no cover - never called here
        raise NotImplementedError

    @hookimpl
    def gateway_webhook_schemes(self):
        return {self.name: self}


def _gateway(engine, clock):
    conns = [ConnectionSettings(name="rmm", plugin="ret-rmm", base_url="https://rmm.example", webhook_secret=SECRET),
             ConnectionSettings(name="cw", plugin="ret-rmm", base_url="https://cw.example",
                                webhook_scheme="connectwise", webhook_secret="k"),
             ConnectionSettings(name="long", plugin="ret-rmm", base_url="https://l.example",
                                webhook_scheme="long-window", webhook_secret="k")]
    return make_gateway(engine, clock, Kinds(), LongWindow(), connections=conns,
                        webhooks=WebhookSettings(keep_ids_days=30))


def _ids(gateway) -> set[tuple[str, str]]:
    with gateway.db() as s:
        return set(s.execute(select(ReceivedWebhook.connection, ReceivedWebhook.event_id)).all())


async def test_g4_webhook_ids_are_pruned_after_the_retention_and_kept_while_a_replay_could_come(db_engine, clock):
    gateway = _gateway(db_engine, clock)
    now = clock.now()
    with gdb.transaction(gateway.db) as s:
        for connection in ("rmm", "cw", "long", "gone"):
            for age_days in (1, 29, 31, 59, 61):
                s.add(ReceivedWebhook(connection=connection, event_id=f"e{age_days}",
                                      received_at=now - timedelta(days=age_days)))
            s.add(ReceivedWebhook(connection=connection, event_id="e1 plugin:x", received_at=now - timedelta(days=40)))
    cutoffs = webhook_id_cutoffs(gateway.settings, gateway.plugins, now)
    assert cutoffs == {"rmm": now - timedelta(days=30), "cw": now - timedelta(days=30),
                       "long": now - timedelta(days=60)}

    assert await prune_webhook_ids(gateway.db, clock, gateway.settings, gateway.plugins) == 3 * 4 + 1  # 31, 40, 59, 61 days; 61 on "long"
    kept = _ids(gateway)
    for connection in ("rmm", "cw", "gone"):  # 30 days; a connection no longer configured: the default too
        assert {e for c, e in kept if c == connection} == {"e1", "e29"}
    assert {e for c, e in kept if c == "long"} == {"e1", "e29", "e31", "e59", "e1 plugin:x"}
    # Pruning again changes nothing.
    assert await prune_webhook_ids(gateway.db, clock, gateway.settings, gateway.plugins) == 0


def test_g4_pruning_is_one_core_call_with_a_session_and_a_cutoff(db_engine, clock):
    gateway = _gateway(db_engine, clock)
    now = clock.now()
    with gdb.transaction(gateway.db) as s:
        s.add_all([ReceivedWebhook(connection="a", event_id="old", received_at=now - timedelta(seconds=601)),
                   ReceivedWebhook(connection="a", event_id="new", received_at=now - timedelta(seconds=599)),
                   ReceivedWebhook(connection="b", event_id="old", received_at=now - timedelta(seconds=601))])
    with gdb.transaction(gateway.db) as s:
        assert prune_received_webhooks(s, now - timedelta(seconds=600), connection="a") == 1
    assert _ids(gateway) == {("a", "new"), ("b", "old")}


def test_g4_the_daemon_schedules_the_pruning(db_engine, clock):
    import asyncio

    from gateway.daemon import _jobs
    gateway = _gateway(db_engine, clock)
    jobs = {job.name: job for job in _jobs(gateway, asyncio.Event(), "w")}
    assert jobs["webhook-ids"].interval == gateway.settings.webhooks.prune_interval_seconds
    assert jobs["webhook-ids"].leader_only

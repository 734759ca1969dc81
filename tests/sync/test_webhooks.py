"""The webhook receiver (G4) and plugin isolation in its handlers (G5).

Signatures in these tests are computed here, from the vendors' descriptions,
not with the schemes' own ``sign()``, so a mistake shared by signer and
verifier cannot pass unnoticed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import aiohttp
import pytest
from aiohttp import web
from builders import client_for, make_gateway
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, insert, select

from gateway.adapters import AdapterSpec
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
    DeviceActivity,
    Partner,
    ReceivedWebhook,
    Workspace,
)
from gateway.core.settings import ConnectionSettings
from gateway.errors import ConfigError
from gateway.hookspecs import hookimpl
from gateway.sync.webhook_schemes import AutotaskWebhooks, ConnectWiseCallbacks, HaloPsaWebhooks, StandardWebhooks
from gateway.sync.webhooks import (
    MAX_BODY_BYTES,
    WEBHOOK_RECEIVER,
    add_webhook_routes,
)
from gateway.web.metrics import Metrics  # what the daemon hands the receiver as its counters
from gateway.webhook_contract import WebhookPayloadError, WebhookVerificationError

SW_KEY = b"gateway-test-key-0123456789abcd"
SW_SECRET = "whsec_" + base64.b64encode(SW_KEY).decode()
SW_OLD_KEY = b"the-previous-key-0123456789abcd"
SW_OLD_SECRET = "whsec_" + base64.b64encode(SW_OLD_KEY).decode()
CW_KEY = "cw-signing-key-7f3a"
AT_KEY = "autotask-Secret_Key!42"
HALO_SECRET = "gateway:halo pass:word"


# --- signing as the vendors describe it -------------------------------------------------------------


def sw_sign(body: bytes, ts: int, msg_id: str, key: bytes = SW_KEY) -> str:
    return "v1," + base64.b64encode(hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()).decode()


def sw_headers(body: bytes, ts: int, msg_id: str = "msg_1", key: bytes = SW_KEY) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sw_sign(body, ts, msg_id, key),
    }


def cw_headers(body: bytes, key: str = CW_KEY) -> dict[str, str]:
    digest = hmac.new(hashlib.sha256(key.encode()).digest(), body, hashlib.sha256).digest()
    return {"Content-Type": "application/json", "x-content-signature": base64.b64encode(digest).decode()}


def at_headers(body: bytes, key: str = AT_KEY) -> dict[str, str]:
    digest = hmac.new(key.encode(), body, hashlib.sha1).digest()
    return {"Content-Type": "application/json", "X-Hook-Signature": "sha1=" + base64.b64encode(digest).decode()}


def halo_headers(body: bytes, secret: str = HALO_SECRET) -> dict[str, str]:
    return {"Content-Type": "application/json", "Authorization": "Basic " + base64.b64encode(secret.encode()).decode()}


def ts_of(clock) -> int:
    return int(clock.now().timestamp())


# --- the gateway under test -----------------------------------------------------------------------------


def _no_adapter(connection, context):
    raise TypeError("webhook tests build no adapter")


class HookTestKinds:
    """Adapter kinds for these tests; the RMM kind names a default webhook scheme, as a tool plugin would."""

    @hookimpl
    def gateway_register_adapters(self):
        return [
            AdapterSpec(kind="hooktest-rmm", role="rmm", factory=_no_adapter, webhook_scheme="standard-webhooks"),
            AdapterSpec(kind="hooktest-psa", role="psa", factory=_no_adapter),
        ]


class Recorder:
    """A plugin that keeps every event it is handed and writes a marker row in the event's transaction."""

    def __init__(self):
        self.events = []

    @hookimpl
    def gateway_webhook_received(self, connection, event):
        self.events.append((connection, event))
        event.session.add(ConnectionState(connection=f"rec:{event.id}"[:100], updated_at=event.received_at))


class Faulty:
    """A plugin whose handler writes a marker row, then raises while ``broken``."""

    def __init__(self):
        self.broken = True
        self.calls = 0

    @hookimpl
    async def gateway_webhook_received(self, connection, event):
        self.calls += 1
        event.session.add(ConnectionState(connection=f"bad:{event.id}"[:100], updated_at=event.received_at))
        event.session.flush()
        if self.broken:
            raise RuntimeError("handler bug")


def connections(**overrides) -> list[ConnectionSettings]:
    rows = [
        dict(name="rmm", plugin="hooktest-rmm", base_url="https://rmm.example", webhook_secret=SW_SECRET,
             credentials={"webhook_secret_previous": SW_OLD_SECRET}),
        dict(name="cw", plugin="hooktest-psa", base_url="https://cw.example", webhook_scheme="connectwise",
             webhook_secret=CW_KEY, credentials={"webhook_secret_previous": "cw-old-key"}),
        dict(name="at", plugin="hooktest-psa", base_url="https://at.example", webhook_scheme="autotask",
             webhook_secret=AT_KEY, credentials={"webhook_secret_previous": "autotask-old"}),
        dict(name="halo", plugin="hooktest-psa", base_url="https://halo.example", webhook_scheme="halopsa",
             webhook_secret=HALO_SECRET, credentials={"webhook_secret_previous": "gateway:old"}),
        dict(name="quiet", plugin="hooktest-psa", base_url="https://quiet.example"),
        dict(name="off", plugin="hooktest-rmm", base_url="https://off.example", enabled=False, webhook_secret=SW_SECRET),
    ]
    return [ConnectionSettings(**row) for row in rows]


def webhook_gateway(engine, clock, *plugins, conns=None) -> Gateway:
    """A gateway with the hook-test adapter kinds, ``plugins``, and this module's connections (or ``conns``)."""
    return make_gateway(engine, clock, HookTestKinds(), *plugins,
                        connections=conns if conns is not None else connections())


def webhook_routes(app: web.Application, gateway: Gateway) -> None:
    add_webhook_routes(app, gateway, Metrics())


def received(gateway) -> list[tuple[str, str]]:
    with gateway.db() as s:
        return sorted(tuple(row) for row in s.execute(select(ReceivedWebhook.connection, ReceivedWebhook.event_id)))


def markers(gateway) -> list[str]:
    with gateway.db() as s:
        return sorted(s.scalars(select(ConnectionState.connection)))


@pytest.fixture
def recorder():
    return Recorder()


@pytest.fixture
def gateway(db_engine, clock, recorder):
    return webhook_gateway(db_engine, clock, recorder)


@pytest.fixture
async def client(aiohttp_client, gateway):
    return await client_for(aiohttp_client, gateway, webhook_routes)


# --- the schemes on their own --------------------------------------------------------------------------------

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


def test_g4_standard_webhooks_accepts_the_specifications_test_vector():
    # The test vector published with the Standard Webhooks reference libraries.
    headers = {
        "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "webhook-timestamp": "1614265330",
        "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    }
    now = datetime.fromtimestamp(1614265330, tz=UTC)
    event = StandardWebhooks().verify(headers, b'{"test": 2432232314}', "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", now)
    assert event.id == "msg_p5jXN8AQM9LWM0D4loKWxJek"
    assert event.payload == {"test": 2432232314}
    assert event.timestamp == now


def test_g4_standard_webhooks_refuses_altered_body_wrong_secret_and_missing_headers():
    scheme, ts, body = StandardWebhooks(), int(NOW.timestamp()), b'{"type":"device.online"}'
    assert scheme.verify(sw_headers(body, ts), body, SW_SECRET, NOW).id == "msg_1"
    with pytest.raises(WebhookVerificationError, match="does not match"):
        scheme.verify(sw_headers(body, ts), body + b" ", SW_SECRET, NOW)
    with pytest.raises(WebhookVerificationError, match="does not match"):
        scheme.verify(sw_headers(body, ts), body, SW_OLD_SECRET, NOW)
    for missing in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        headers = {k: v for k, v in sw_headers(body, ts).items() if k != missing}
        with pytest.raises(WebhookVerificationError, match="headers are required"):
            scheme.verify(headers, body, SW_SECRET, NOW)
    with pytest.raises(WebhookVerificationError, match="whole Unix seconds"):
        scheme.verify({**sw_headers(body, ts), "webhook-timestamp": "1.7e9"}, body, SW_SECRET, NOW)


def test_g4_standard_webhooks_accepts_one_matching_signature_among_several_during_rotation():
    scheme, ts, body = StandardWebhooks(), int(NOW.timestamp()), b"{}"
    rotated = f"v1a,ignored-other-version {sw_sign(body, ts, 'msg_1', SW_OLD_KEY)} {sw_sign(body, ts, 'msg_1')}"
    headers = {**sw_headers(body, ts), "webhook-signature": rotated}
    assert scheme.verify(headers, body, SW_SECRET, NOW).id == "msg_1"
    # Only the old key's signature, checked against the new secret: refused.
    headers["webhook-signature"] = sw_sign(body, ts, "msg_1", SW_OLD_KEY)
    with pytest.raises(WebhookVerificationError):
        scheme.verify(headers, body, SW_SECRET, NOW)


@pytest.mark.parametrize("offset", [-301, 301, -3600, 10**9])
def test_g4_standard_webhooks_refuses_stale_and_future_timestamps(offset):
    ts, body = int(NOW.timestamp()) + offset, b"{}"
    with pytest.raises(WebhookVerificationError, match="only 300 s either way"):
        StandardWebhooks().verify(sw_headers(body, ts), body, SW_SECRET, NOW)


@pytest.mark.parametrize("offset", [-300, 300])
def test_g4_standard_webhooks_accepts_timestamps_at_the_edge_of_the_window(offset):
    ts, body = int(NOW.timestamp()) + offset, b"{}"
    assert StandardWebhooks().verify(sw_headers(body, ts), body, SW_SECRET, NOW).timestamp == NOW + timedelta(seconds=offset)


def test_g4_connectwise_signature_is_hmac_sha256_keyed_with_the_signing_keys_digest():
    scheme, body = ConnectWiseCallbacks(), b'{"Type":"invoice","Action":"updated","ID":77}'
    event = scheme.verify(cw_headers(body), body, CW_KEY, NOW)
    assert event.id == "sha256:" + hashlib.sha256(body).hexdigest() and event.payload["ID"] == 77
    with pytest.raises(WebhookVerificationError, match="does not match"):
        scheme.verify(cw_headers(body), body.replace(b"77", b"78"), CW_KEY, NOW)
    with pytest.raises(WebhookVerificationError, match="does not match"):
        scheme.verify(cw_headers(body, "another-key"), body, CW_KEY, NOW)
    # Keyed with the raw key instead of its digest: not what ConnectWise sends.
    raw_keyed = base64.b64encode(hmac.new(CW_KEY.encode(), body, hashlib.sha256).digest()).decode()
    with pytest.raises(WebhookVerificationError):
        scheme.verify({"x-content-signature": raw_keyed}, body, CW_KEY, NOW)
    with pytest.raises(WebhookVerificationError, match="required"):
        scheme.verify({}, body, CW_KEY, NOW)


def test_g4_autotask_signature_is_sha1_hmac_of_the_raw_body_in_base64():
    scheme, body = AutotaskWebhooks(), b'{"Action":"Update","Guid":"g-1","EntityType":"Ticket","Id":5}'
    assert scheme.verify(at_headers(body), body, AT_KEY, NOW).payload["EntityType"] == "Ticket"
    with pytest.raises(WebhookVerificationError, match="does not match"):
        scheme.verify(at_headers(body, "wrong"), body, AT_KEY, NOW)
    sha256_signed = "sha256=" + base64.b64encode(hmac.new(AT_KEY.encode(), body, hashlib.sha256).digest()).decode()
    with pytest.raises(WebhookVerificationError, match="sha1="):
        scheme.verify({"X-Hook-Signature": sha256_signed}, body, AT_KEY, NOW)


def test_g4_halopsa_basic_credentials_must_match_the_configured_pair():
    scheme, body = HaloPsaWebhooks(), b'{"id": 12, "event": "ticket updated"}'
    assert scheme.verify(halo_headers(body), body, HALO_SECRET, NOW).payload["id"] == 12
    with pytest.raises(WebhookVerificationError, match="wrong"):
        scheme.verify(halo_headers(body, "gateway:halo pass:wordX"), body, HALO_SECRET, NOW)
    with pytest.raises(WebhookVerificationError, match="required"):
        scheme.verify({"Authorization": "Bearer abc"}, body, HALO_SECRET, NOW)
    with pytest.raises(WebhookVerificationError, match="required"):
        scheme.verify({"Authorization": "Basic not*base64"}, body, HALO_SECRET, NOW)


def test_g4_authentic_body_that_is_not_json_is_a_payload_error():
    body = b"{not json"
    with pytest.raises(WebhookPayloadError, match="not valid JSON"):
        AutotaskWebhooks().verify(at_headers(body), body, AT_KEY, NOW)
    body = b"[NaN]"
    with pytest.raises(WebhookPayloadError):
        AutotaskWebhooks().verify(at_headers(body), body, AT_KEY, NOW)
    body = b'"\xff"'
    with pytest.raises(WebhookPayloadError, match="UTF-8"):
        AutotaskWebhooks().verify(at_headers(body), body, AT_KEY, NOW)


# --- configuration -------------------------------------------------------------------------------------------


def _conn(**kwargs) -> ConnectionSettings:
    return ConnectionSettings(**{"name": "x", "plugin": "hooktest-psa", "base_url": "https://x.example", **kwargs})


@pytest.mark.parametrize(
    ("conn", "message"),
    [
        (_conn(webhook_scheme="nope", webhook_secret="s"), "webhook_scheme 'nope' is not installed"),
        (_conn(webhook_secret="s"), "has a webhook_secret but no webhook_scheme"),
        (_conn(webhook_scheme="halopsa"), "sets webhook_scheme but no webhook_secret"),
        (_conn(webhook_scheme="standard-webhooks", webhook_secret="whsec_!!"), "whsec_"),
        (_conn(webhook_scheme="halopsa", webhook_secret="no-colon"), "username:password"),
    ],
)
def test_g4_webhook_settings_mistakes_are_start_up_errors_that_name_the_connection(sqlite_engine, clock, conn, message):
    gateway = webhook_gateway(sqlite_engine, clock, conns=[conn])
    with pytest.raises(ConfigError, match=message) as info:
        add_webhook_routes(web.Application(), gateway, Metrics())
    assert "'x'" in str(info.value)
    assert "no-colon" not in str(info.value) and "whsec_!!" not in str(info.value)


def test_g4_connection_uses_its_adapters_default_scheme(sqlite_engine, clock):
    receiver = add_webhook_routes(web.Application(), webhook_gateway(sqlite_engine, clock), Metrics())
    assert receiver.endpoints["rmm"].scheme_name == "standard-webhooks"
    assert set(receiver.endpoints) == {"rmm", "cw", "at", "halo"}  # "quiet" has no secret, "off" is disabled


# --- the receiver over HTTP ----------------------------------------------------------------------------------


async def test_g4_every_refusal_has_its_status_and_stores_nothing(client, gateway, clock, recorder):
    body, ts = b'{"type":"device.online","data":{"device_id":"d1"}}', ts_of(clock)
    cases = [
        ("/webhooks/nobody", sw_headers(body, ts), body, 404),
        ("/webhooks/off", sw_headers(body, ts), body, 404),  # disabled connection
        ("/webhooks/quiet", cw_headers(body), body, 404),  # no webhook secret configured
        ("/webhooks/rmm", {**sw_headers(body, ts), "Content-Type": "text/plain"}, body, 415),
        ("/webhooks/rmm", {**sw_headers(body, ts), "Content-Type": "application/json; charset=latin-1"}, body, 415),
        ("/webhooks/rmm", {k: v for k, v in sw_headers(body, ts).items() if k != "Content-Type"}, body, 415),
        ("/webhooks/rmm", {**sw_headers(body, ts), "webhook-signature": "v1,AAAA"}, body, 401),
        ("/webhooks/rmm", sw_headers(body, ts - 301), body, 401),
        ("/webhooks/rmm", sw_headers(body, ts + 301), body, 401),
        ("/webhooks/rmm", sw_headers(b"{oops", ts), b"{oops", 400),
        ("/webhooks/cw", cw_headers(body, "wrong"), body, 401),
    ]
    for path, headers, data, status in cases:
        response = await client.post(path, data=data, headers=headers)
        assert response.status == status, (path, headers, await response.text())
        assert "error" in await response.json()
    big = b'{"pad":"' + b"x" * MAX_BODY_BYTES + b'"}'
    response = await client.post("/webhooks/rmm", data=big, headers=sw_headers(big, ts))
    assert response.status == 413

    async def chunks():  # no Content-Length: the limit holds while reading
        for _ in range(5):
            yield b" " * (MAX_BODY_BYTES // 4)

    response = await client.post("/webhooks/rmm", data=chunks(), headers={"Content-Type": "application/json"})
    assert response.status == 413
    assert received(gateway) == [] and recorder.events == [] and markers(gateway) == []


async def test_g4_duplicate_delivered_twice_is_processed_once(client, gateway, clock, recorder):
    body = b'{"type":"ping"}'
    headers = sw_headers(body, ts_of(clock), msg_id="msg_dup")
    first = await client.post("/webhooks/rmm", data=body, headers=headers)
    clock.advance(seconds=30)  # the sender's retry, re-signed 30 s later with the same id
    second = await client.post("/webhooks/rmm", data=body, headers=sw_headers(body, ts_of(clock), msg_id="msg_dup"))
    assert (first.status, await first.json()) == (200, {"status": "accepted", "event_id": "msg_dup"})
    assert (second.status, await second.json()) == (200, {"status": "duplicate", "event_id": "msg_dup"})
    assert len(recorder.events) == 1
    assert received(gateway) == [("rmm", "msg_dup")]
    # The same id on another connection is another event.
    other = {**cw_headers(body)}
    assert (await client.post("/webhooks/cw", data=body, headers=other)).status == 200
    assert len(recorder.events) == 2


@pytest.mark.parametrize(
    ("connection", "sign", "old_sign", "wrong_sign"),
    [
        ("rmm", lambda b, ts: sw_headers(b, ts, msg_id="msg_x"), lambda b, ts: sw_headers(b, ts, "msg_y", SW_OLD_KEY),
         lambda b, ts: sw_headers(b, ts, "msg_z", b"not-the-key-0123456789abcdefgh")),
        ("cw", lambda b, ts: cw_headers(b), lambda b, ts: cw_headers(b, "cw-old-key"), lambda b, ts: cw_headers(b, "x")),
        ("at", lambda b, ts: at_headers(b), lambda b, ts: at_headers(b, "autotask-old"), lambda b, ts: at_headers(b, "x")),
        ("halo", lambda b, ts: halo_headers(b), lambda b, ts: halo_headers(b, "gateway:old"),
         lambda b, ts: halo_headers(b, "gateway:halo pass")),
    ],
    ids=["standard-webhooks", "connectwise", "autotask", "halopsa"],
)
async def test_g4_each_scheme_accepts_valid_and_rotated_secrets_refuses_wrong_and_dedupes_replays(
    client, gateway, clock, recorder, connection, sign, old_sign, wrong_sign
):
    body, ts = b'{"type":"thing.changed","n":1}', ts_of(clock)
    assert (await client.post(f"/webhooks/{connection}", data=body, headers=sign(body, ts))).status == 200
    replay = await client.post(f"/webhooks/{connection}", data=body, headers=sign(body, ts))
    assert (await replay.json())["status"] == "duplicate"
    rotated_body = b'{"type":"thing.changed","n":2}'
    response = await client.post(f"/webhooks/{connection}", data=rotated_body, headers=old_sign(rotated_body, ts))
    assert response.status == 200, await response.text()  # signed with the previous secret during a rotation
    wrong_body = b'{"type":"thing.changed","n":3}'
    assert (await client.post(f"/webhooks/{connection}", data=wrong_body, headers=wrong_sign(wrong_body, ts))).status == 401
    assert [c for c, _ in recorder.events] == [connection, connection]
    assert len(received(gateway)) == 2


async def test_g4_plugin_hook_receives_the_verified_event(client, clock, recorder):
    body = json.dumps({"type": "ticket.updated", "data": {"id": 9}}).encode()
    response = await client.post("/webhooks/halo", data=body, headers={**halo_headers(body), "X-Halo-Event": "t"})
    assert response.status == 200
    [(connection, event)] = recorder.events
    assert connection == "halo"
    assert event.id == "sha256:" + hashlib.sha256(body).hexdigest()
    assert event.payload == {"type": "ticket.updated", "data": {"id": 9}} and event.type == "ticket.updated"
    assert event.scheme == "halopsa" and event.received_at == clock.now()
    assert event.headers["x-halo-event"] == "t"
    assert "authorization" not in event.headers  # credentials never reach plugins


async def test_g5_raising_plugin_neither_undoes_nor_blocks_the_others_and_gets_the_retry(
    aiohttp_client, db_engine, clock
):
    good, bad = Recorder(), Faulty()
    gateway = webhook_gateway(db_engine, clock, good, bad)
    client = await client_for(aiohttp_client, gateway, webhook_routes)
    body = b'{"type":"ping"}'

    first = await client.post("/webhooks/rmm", data=body, headers=sw_headers(body, ts_of(clock), "msg_g5"))
    assert first.status == 500 and (await first.json())["event_id"] == "msg_g5"
    assert markers(gateway) == ["rec:msg_g5"]  # the good plugin's work is kept, the faulty one's rolled back
    assert any("handler bug" in f.error for f in gateway.plugins.failures)

    retry = await client.post("/webhooks/rmm", data=body, headers=sw_headers(body, ts_of(clock), "msg_g5"))
    assert retry.status == 500 and bad.calls == 2 and len(good.events) == 1  # only the failed handler re-runs

    bad.broken = False
    fixed = await client.post("/webhooks/rmm", data=body, headers=sw_headers(body, ts_of(clock), "msg_g5"))
    assert (fixed.status, (await fixed.json())["status"]) == (200, "accepted")
    again = await client.post("/webhooks/rmm", data=body, headers=sw_headers(body, ts_of(clock), "msg_g5"))
    assert (await again.json())["status"] == "duplicate"
    assert bad.calls == 3 and len(good.events) == 1
    assert markers(gateway) == ["bad:msg_g5", "rec:msg_g5"]
    assert received(gateway) == [("rmm", "msg_g5")]  # the per-handler receipts are gone once the event is done


class Hanging:
    """A plugin whose handler writes a marker row, then waits for ever while ``hanging``."""

    def __init__(self):
        self.hanging = True
        self.cancelled = 0

    @hookimpl
    async def gateway_webhook_received(self, connection, event):
        event.session.add(ConnectionState(connection=f"hang:{event.id}"[:100], updated_at=event.received_at))
        event.session.flush()
        if self.hanging:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise


async def test_g5_a_handler_that_hangs_is_cancelled_and_the_receiver_goes_on(aiohttp_client, db_engine, clock):
    """The webhook writer is one task: a handler that never returns would hold every later event (and, on
    SQLite, the write lock). It is cancelled after the hook time limit, reported, and its writes undone."""
    good, stuck = Recorder(), Hanging()
    gateway = webhook_gateway(db_engine, clock, good, stuck)
    gateway.plugins.hook_timeout_seconds = 0.2
    client = await client_for(aiohttp_client, gateway, webhook_routes)
    body = b'{"type":"ping"}'

    first = await asyncio.wait_for(
        client.post("/webhooks/rmm", data=body, headers=sw_headers(body, ts_of(clock), "msg_hang")), timeout=10)
    assert first.status == 500 and stuck.cancelled == 1
    assert any("did not finish within 0.2 s" in f.error for f in gateway.plugins.failures)
    assert markers(gateway) == ["rec:msg_hang"]  # the hanging handler's write is rolled back, the other kept

    stuck.hanging = False
    later = await client.post("/webhooks/rmm", data=body, headers=sw_headers(body, ts_of(clock), "msg_after"))
    assert (later.status, (await later.json())["status"]) == (200, "accepted")
    retry = await client.post("/webhooks/rmm", data=body, headers=sw_headers(body, ts_of(clock), "msg_hang"))
    assert (retry.status, (await retry.json())["status"]) == (200, "accepted")
    assert markers(gateway) == ["hang:msg_after", "hang:msg_hang", "rec:msg_after", "rec:msg_hang"]


async def test_g4_database_down_is_503_and_retryable(aiohttp_client, tmp_path, clock):
    engine = gdb.make_engine(f"sqlite:///{tmp_path / 'missing' / 'dir' / 'gateway.db'}")
    client = await client_for(aiohttp_client, webhook_gateway(engine, clock), webhook_routes)
    body = b"{}"
    response = await client.post("/webhooks/rmm", data=body, headers=sw_headers(body, ts_of(clock)))
    assert response.status == 503 and response.headers["Retry-After"] == "5"



# --- group commit: several events in one transaction ---------------------------------------------------------


class Scripted:
    """The only handler: does what the event's ``do`` says and keeps the session each event was handled in.

    ``wait`` holds the writer inside its handler until ``gate`` is set, so the events posted meanwhile queue up
    and are written together in the next transaction.
    """

    def __init__(self):
        self.gate = asyncio.Event()
        self.calls: list[str] = []
        self.sessions: dict[str, object] = {}

    @hookimpl
    async def gateway_webhook_received(self, connection, event):
        self.calls.append(event.id)
        self.sessions[event.id] = event.session
        do = event.payload.get("do")
        if do == "wait":
            await self.gate.wait()
        mark = f"mark:{event.id}"
        if do == "raise_after_core":  # written on the connection itself, beside the ORM session
            event.session.get_bind().execute(insert(ConnectionState), {"connection": mark, "updated_at": NOW})
            raise RuntimeError("handler bug after a Core write")
        if do == "bad_core":  # a statement that fails (PostgreSQL then refuses all but a rollback to the savepoint)
            event.session.get_bind().execute(insert(ConnectionState), {"connection": mark, "updated_at": NOW})
            event.session.get_bind().execute(insert(ConnectionState), {"connection": "taken", "updated_at": NOW})
        event.session.add(ConnectionState(connection=mark, updated_at=NOW))
        if do == "raise":
            event.session.flush()
            raise RuntimeError("handler bug")
        if do == "bad_flush":  # the key exists: the flush fails when the receiver commits the handler's work
            event.session.add(ConnectionState(connection="taken", updated_at=NOW))


def plugin_name(gateway, plugin) -> str:
    return gateway.plugins.pm.get_name(plugin)


async def _until(condition, seconds=10.0):
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.005)


async def _batched(aiohttp_client, db_engine, clock, sends):
    """Post ``sends`` ((msg_id, do) pairs) so that all of them are written in one transaction; the responses."""
    plugin = Scripted()
    gateway = webhook_gateway(db_engine, clock, plugin)
    gateway.plugins.pm.unregister(name="gateway.sync.webhook_handlers")  # Scripted is the only handler
    with gdb.transaction(gateway.db) as s:
        s.add(ConnectionState(connection="taken", updated_at=NOW))
    client = await client_for(aiohttp_client, gateway, webhook_routes)
    receiver = client.app[WEBHOOK_RECEIVER]

    async def post(msg_id, do):
        body = json.dumps({"type": "test", "do": do}).encode()
        response = await client.post("/webhooks/rmm", data=body, headers=sw_headers(body, ts_of(clock), msg_id))
        return response.status, await response.json()

    gate = asyncio.create_task(post("msg_gate", "wait"))
    await _until(lambda: plugin.calls == ["msg_gate"])  # the writer is inside the gate's transaction
    posted = []
    for msg_id, do in sends:  # one at a time, so they queue in this order
        posted.append(asyncio.create_task(post(msg_id, do)))
        await _until(lambda: len(receiver._pending) == len(posted))
    plugin.gate.set()
    assert (await gate)[0] == 200
    answers = [await task for task in posted]
    batch_sessions = {id(plugin.sessions[msg_id]) for msg_id in plugin.sessions if msg_id != "msg_gate"}
    assert len(batch_sessions) == 1  # all of them in one transaction (after the gate's)
    assert id(plugin.sessions["msg_gate"]) not in batch_sessions
    return gateway, plugin, answers


async def test_g5_a_failing_event_in_a_batch_neither_fails_nor_undoes_its_neighbours(aiohttp_client, db_engine, clock):
    sends = [("msg_a", "ok"), ("msg_b", "raise"), ("msg_c", "raise_after_core"), ("msg_d", "bad_flush"),
             ("msg_e", "bad_core"), ("msg_f", "ok")]
    gateway, plugin, answers = await _batched(aiohttp_client, db_engine, clock, sends)
    assert [(status, body.get("status")) for status, body in answers] == [
        (200, "accepted"), (500, None), (500, None), (500, None), (500, None), (200, "accepted")
    ]
    assert [body["failed_plugins"] for status, body in answers if status == 500] == [[plugin_name(gateway, plugin)]] * 4
    # Each failure undid its own writes only: ORM, Core on the connection, a flush or a statement that failed.
    assert markers(gateway) == ["mark:msg_a", "mark:msg_f", "mark:msg_gate", "taken"]
    assert received(gateway) == [("rmm", "msg_a"), ("rmm", "msg_f"), ("rmm", "msg_gate")]
    errors = [failure.error.removeprefix("gateway_webhook_received: ") for failure in gateway.plugins.failures]
    assert errors[:2] == ["RuntimeError: handler bug", "RuntimeError: handler bug after a Core write"]
    assert [error.split(" ", 1)[0] for error in errors[2:]] == ["IntegrityError:", "IntegrityError:"]


async def test_g4_the_same_event_twice_in_one_batch_is_processed_once(aiohttp_client, db_engine, clock):
    sends = [("msg_x", "ok"), ("msg_x", "ok"), ("msg_y", "raise"), ("msg_y", "ok")]
    gateway, plugin, answers = await _batched(aiohttp_client, db_engine, clock, sends)
    assert [(status, body.get("status")) for status, body in answers] == [
        (200, "accepted"), (200, "duplicate"), (500, None), (200, "accepted")
    ]
    # msg_x ran once; msg_y failed, so its second delivery in the same batch is the retry and is processed.
    assert plugin.calls == ["msg_gate", "msg_x", "msg_y", "msg_y"]
    assert markers(gateway) == ["mark:msg_gate", "mark:msg_x", "mark:msg_y", "taken"]
    assert received(gateway) == [("rmm", "msg_gate"), ("rmm", "msg_x"), ("rmm", "msg_y")]


# --- built-in handlers: canonical state ------------------------------------------------------------------------------


def _seed_device(gateway, clock, *, tz="Pacific/Auckland", mapped=True) -> int:
    at = clock.now()
    with gdb.transaction(gateway.db) as s:
        partner = Partner(name="MSP", created_at=at)
        customer = Customer(partner=partner, name="Kiwi Ltd", timezone=tz, created_at=at)
        workspace = Workspace(customer=customer, name="HQ", created_at=at)
        s.add(workspace)
        s.flush()
        device = Device(
            connection="rmm", external_id="dev-1", org_external_id="org-1", hostname="pc1",
            workspace_id=workspace.id if mapped else None, online=False,
            last_contact=at - timedelta(days=2), first_seen_at=at - timedelta(days=30), updated_at=at - timedelta(days=2),
        )
        s.add(device)
        s.flush()
        return device.id


async def _send(client, clock, connection, payload, msg_id):
    body = json.dumps(payload).encode()
    headers = sw_headers(body, ts_of(clock), msg_id) if connection == "rmm" else cw_headers(body)
    response = await client.post(f"/webhooks/{connection}", data=body, headers=headers)
    assert response.status == 200, await response.text()


async def test_g4_device_online_updates_the_device_and_records_the_customer_local_day(client, gateway, clock):
    device_id = _seed_device(gateway, clock)
    # 12:00 UTC on 10 March is already 11 March in Auckland (UTC+13): activity belongs to the customer's day (S4).
    await _send(client, clock, "rmm", {"type": "device.online", "data": {"device_id": "dev-1"}}, "msg_on")
    with gateway.db() as s:
        device = s.get(Device, device_id)
        assert device.online is True and device.last_contact == clock.now()
        assert s.scalars(select(DeviceActivity.day)).all() == [date(2026, 3, 11)]

    clock.advance(minutes=10)
    await _send(client, clock, "rmm", {"type": "device.offline", "data": {"device_id": "dev-1"}}, "msg_off")
    # A late "online" from before the offline: activity is recorded, the newer offline state stays.
    late = {"type": "device.online", "data": {"device_id": "dev-1", "last_contact": "2026-03-09T08:00:00Z"}}
    await _send(client, clock, "rmm", late, "msg_late")
    with gateway.db() as s:
        device = s.get(Device, device_id)
        assert device.online is False and device.last_contact == datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
        assert s.scalars(select(DeviceActivity.day).order_by(DeviceActivity.day)).all() == [
            date(2026, 3, 9), date(2026, 3, 11)
        ]


async def test_g4_device_online_for_an_unmapped_or_unknown_device_records_no_activity(client, gateway, clock):
    device_id = _seed_device(gateway, clock, mapped=False)
    await _send(client, clock, "rmm", {"type": "device.online", "data": {"device_id": "dev-1"}}, "msg_1")
    await _send(client, clock, "rmm", {"type": "device.online", "data": {"device_id": "ghost"}}, "msg_2")
    await _send(client, clock, "rmm", {"type": "device.online", "data": "garbage"}, "msg_3")
    with gateway.db() as s:
        assert s.get(Device, device_id).online is True
        assert s.scalar(select(func.count()).select_from(DeviceActivity)) == 0
        assert s.scalar(select(func.count()).select_from(Device)) == 1


def _seed_bill(gateway, clock, status=BillStatus.ISSUED) -> int:
    at = clock.now()
    with gdb.transaction(gateway.db) as s:
        partner = Partner(name="MSP", created_at=at)
        customer = Customer(partner=partner, name="Acme", timezone="Europe/Berlin", created_at=at)
        s.add(customer)
        s.flush()
        bill = Bill(
            partner_id=partner.id, customer_id=customer.id, kind=BillKind.PLAN, source_id=1, number="INV-7",
            period_start=date(2026, 2, 1), period_end=date(2026, 2, 28), currency="EUR", total=Decimal("25.00"),
            status=status, issued_on=date(2026, 3, 1), due_on=date(2026, 3, 31), created_at=at,
        )
        s.add(bill)
        s.flush()
        s.add(Delivery(bill_id=bill.id, connection="cw", key="cw/acme/2026-02", status=DeliveryStatus.DELIVERED,
                       next_attempt_at=at, created_at=at, external_id="4711", delivered_at=at))
        return bill.id


async def test_g4_invoice_paid_in_the_psa_marks_the_bill_paid(client, gateway, clock):
    bill_id = _seed_bill(gateway, clock)
    await _send(client, clock, "cw", {"type": "invoice.paid", "data": {"invoice_id": "9999"}}, "x")  # not ours
    with gateway.db() as s:
        assert s.get(Bill, bill_id).status == BillStatus.ISSUED
    payload = {"type": "invoice.paid", "data": {"invoice_id": 4711, "paid_at": "2026-03-09T15:30:00+01:00"}}
    await _send(client, clock, "cw", payload, "y")
    with gateway.db() as s:
        bill = s.get(Bill, bill_id)
        assert bill.status == BillStatus.PAID
        assert bill.paid_at == datetime(2026, 3, 9, 14, 30, tzinfo=UTC)


async def test_g4_invoice_paid_does_not_revive_a_void_bill(client, gateway, clock):
    bill_id = _seed_bill(gateway, clock, status=BillStatus.VOID)
    await _send(client, clock, "cw", {"type": "invoice.paid", "data": {"invoice_id": "4711"}}, "z")
    with gateway.db() as s:
        assert s.get(Bill, bill_id).status == BillStatus.VOID


# --- fuzz ------------------------------------------------------------------------------------------------------------

HEADER_NAMES = ["webhook-id", "webhook-timestamp", "webhook-signature", "x-content-signature", "X-Hook-Signature",
                "Authorization", "Content-Encoding", "X-Anything"]
header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40)


def plausible_value(name: str):
    b64 = st.binary(min_size=1, max_size=40).map(lambda b: base64.b64encode(b).decode())
    if name == "webhook-timestamp":
        return st.one_of(st.integers(-(10**12), 10**12).map(str), header_text)
    if name == "webhook-signature":
        return st.lists(st.one_of(b64.map(lambda s: "v1," + s), header_text), max_size=4).map(" ".join)
    if name == "X-Hook-Signature":
        return st.one_of(b64.map(lambda s: "sha1=" + s), header_text)
    if name == "Content-Encoding":
        return st.one_of(st.sampled_from(["gzip", "deflate", "br", "identity"]), header_text)
    if name == "Authorization":
        return st.one_of(st.binary(max_size=40).map(lambda b: "Basic " + base64.b64encode(b).decode()), header_text)
    return st.one_of(b64, header_text)


random_headers = st.fixed_dictionaries(
    {}, optional={name: plausible_value(name) for name in HEADER_NAMES}
)
content_types = st.sampled_from(
    ["application/json", "application/json; charset=utf-8", "application/cloudevents+json", "text/plain",
     "application/x-www-form-urlencoded", "application/json; charset=utf-16", "multipart/form-data; boundary=x"]
)
json_bodies = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
).map(lambda value: json.dumps(value).encode())
big_bodies = st.integers(MAX_BODY_BYTES - 4, MAX_BODY_BYTES + 4).map(lambda n: b"[" + b" " * (n - 2) + b"]")
# Mostly small bodies (the fuzz stays fast); one in ten at the size limit, just under or over it.
bodies = st.integers(0, 9).flatmap(lambda k: big_bodies if k == 0 else st.binary(max_size=512) if k < 5 else json_bodies)


@st.composite
def near_misses(draw):
    """Correctly signed requests with one thing changed afterwards: still refused."""
    body = draw(st.one_of(st.binary(max_size=512), json_bodies))
    connection = draw(st.sampled_from(["rmm", "cw", "at", "halo"]))
    ts = int(NOW.timestamp()) + draw(st.integers(-300, 300))
    if connection == "halo":  # Basic credentials do not cover the body: change the credentials instead
        secret = HALO_SECRET.encode()
        position = draw(st.integers(0, len(secret) - 1))
        wrong = secret[:position] + bytes([secret[position] ^ draw(st.integers(1, 127))]) + secret[position + 1:]
        return "/webhooks/halo", halo_headers(body, wrong.decode("latin-1")), body
    headers = {"rmm": sw_headers(body, ts, "msg_fuzz"), "cw": cw_headers(body), "at": at_headers(body)}[connection]
    position = draw(st.integers(0, max(len(body) - 1, 0)))
    flipped = body[:position] + bytes([body[position] ^ draw(st.integers(1, 255))]) + body[position + 1:] if body else b"x"
    return f"/webhooks/{connection}", headers, flipped


@st.composite
def random_requests(draw):
    connection = draw(st.one_of(st.sampled_from(["rmm", "cw", "at", "halo", "quiet", "off"]),
                                st.from_regex(r"[A-Za-z0-9_.-]{1,30}", fullmatch=True)))
    headers = dict(draw(random_headers))
    headers["Content-Type"] = draw(content_types)
    return f"/webhooks/{connection}", headers, draw(bodies)


@pytest.mark.slow
@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(sent=st.one_of(random_requests(), near_misses()))
async def test_g4_fuzzed_requests_never_get_5xx_and_never_store_anything(client, gateway, recorder, sent):
    path, headers, body = sent
    if "Content-Encoding" in headers:
        # A body that does not decode with its Content-Encoding makes aiohttp itself drop the connection once the
        # answer is sent; a client still uploading a large body may see the drop first, and a pooled connection
        # must not carry the drop over to the next example.
        headers = {**headers, "Connection": "close"}
    try:
        response = await client.post(path, data=body, headers=headers)
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
        assert "Content-Encoding" in headers  # never a 5xx; nothing stored (checked below)
    else:
        assert response.status in (400, 401, 404, 413, 415), (response.status, await response.text())
    assert recorder.events == []
    with gateway.db() as s:
        assert s.scalar(select(func.count()).select_from(ReceivedWebhook)) == 0


async def test_g4_a_lone_raising_handler_leaves_no_trace_and_the_retry_is_processed(aiohttp_client, db_engine, clock):
    bad = Faulty()
    gateway = webhook_gateway(db_engine, clock, bad)
    gateway.plugins.pm.unregister(name="gateway.sync.webhook_handlers")  # the faulty plugin is the only handler
    client = await client_for(aiohttp_client, gateway, webhook_routes)
    body = b'{"type":"ping"}'
    failed = await client.post("/webhooks/rmm", data=body, headers=sw_headers(body, ts_of(clock), "msg_lone"))
    assert failed.status == 500
    assert received(gateway) == [] and markers(gateway) == []
    bad.broken = False
    retried = await client.post("/webhooks/rmm", data=body, headers=sw_headers(body, ts_of(clock), "msg_lone"))
    assert (await retried.json())["status"] == "accepted"
    assert received(gateway) == [("rmm", "msg_lone")] and markers(gateway) == ["bad:msg_lone"]


class TokenScheme:
    """A scheme a third-party plugin might add: a shared token in a header."""

    name = "test-token"

    def verify(self, headers, raw_body, secret, now):
        from gateway import WebhookEvent
        from gateway.sync.webhooks import body_event_id, ci_headers, constant_time_equal, parse_json

        if not constant_time_equal(ci_headers(headers).get("x-token", ""), secret):
            raise WebhookVerificationError("x-token is wrong")
        return WebhookEvent(id=body_event_id(raw_body), payload=parse_json(raw_body))


class TokenSchemePlugin:
    def __init__(self, name="test-token"):
        self.scheme_name = name

    @hookimpl
    def gateway_webhook_schemes(self):
        return {self.scheme_name: TokenScheme()}


async def test_g4_a_plugin_adds_a_scheme_through_the_hook(aiohttp_client, db_engine, clock):
    recorder = Recorder()
    conns = [ConnectionSettings(name="tok", plugin="hooktest-psa", base_url="https://t.example",
                                webhook_scheme="test-token", webhook_secret="s3cret-token")]
    gateway = webhook_gateway(db_engine, clock, TokenSchemePlugin(), recorder, conns=conns)
    client = await client_for(aiohttp_client, gateway, webhook_routes)
    body = b'{"type":"x"}'
    headers = {"Content-Type": "application/json"}
    assert (await client.post("/webhooks/tok", data=body, headers={**headers, "x-token": "nope"})).status == 401
    assert (await client.post("/webhooks/tok", data=body, headers={**headers, "x-token": "s3cret-token"})).status == 200
    assert [(c, e.scheme) for c, e in recorder.events] == [("tok", "test-token")]


def test_g4_two_plugins_providing_one_scheme_name_is_a_start_up_error(sqlite_engine, clock):
    gateway = webhook_gateway(sqlite_engine, clock, TokenSchemePlugin("halopsa"))
    with pytest.raises(ConfigError, match="webhook scheme 'halopsa' is provided by both plugin"):
        add_webhook_routes(web.Application(), gateway, Metrics())


@pytest.mark.parametrize("edge", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00Z"])
async def test_g5_a_signed_event_dated_at_the_calendars_edge_is_logged_and_ignored_not_500(client, gateway, clock,
                                                                                           edge):
    """An authentic event whose time overflows on conversion is answered 200 (else the sender retries it for
    ever): the time is unreadable, logged, and the event is dated by its arrival as any unreadable time is."""
    from structlog.testing import capture_logs
    device_id = _seed_device(gateway, clock)
    bill_id = _seed_bill(gateway, clock)
    with capture_logs() as logs:
        await _send(client, clock, "rmm", {"type": "device.online",
                                           "data": {"device_id": "dev-1", "last_contact": edge}}, "msg_edge")
        await _send(client, clock, "cw", {"type": "invoice.paid", "data": {"invoice_id": 4711, "paid_at": edge}}, "z")
    assert [e["field"] for e in logs if e["event"] == "webhook.time_unreadable"] == ["data.last_contact",
                                                                                     "data.paid_at"]
    with gateway.db() as s:
        assert s.get(Device, device_id).last_contact == clock.now()
        assert s.get(Bill, bill_id).paid_at == clock.now()

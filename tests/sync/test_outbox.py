"""G2: the outbox worker pushes each finalised bill to a PSA exactly once, on SQLite and PostgreSQL.

Bills are made by the real billing services (``psa_world.build_world``) and pushed by
the real HaloPSA adapter to the HaloPSA simulator on a loopback port.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta
from decimal import Decimal

import pytest
from builders import make_gateway, write_config
from psa_world import (
    BILLED_AT,
    Recorder,
    build_world,
    halo_connection,
    logging_restored,
    outbox_round,
)
from sqlalchemy import select, update

from gateway import cli
from gateway.adapters import AdapterContext, PushResult
from gateway.app import Gateway
from gateway.core.access import system_principal
from gateway.core.billing import deliveries, lifecycle
from gateway.core.clock import FrozenClock
from gateway.core.db import transaction
from gateway.core.models import Bill, Delivery, DeliveryStatus, ExternalMapping
from gateway.core.settings import ConnectionSettings, OutboxSettings, Settings
from gateway.errors import Conflict, NotFound
from gateway.plugins.halopsa.client import HaloPsaAdapter
from gateway.plugins.halopsa.simulator import FAULTS, STATE, create_app
from gateway.sync import outbox

CONNECTION = "halo"
NOW = datetime(2026, 4, 1, 2, 0, tzinfo=BILLED_AT.tzinfo)
POSTS = "POST /api/Invoice"


@pytest.fixture
async def sim(aiohttp_server):
    app = create_app(clients=4)
    server = await aiohttp_server(app)
    return app, str(server.make_url("")).rstrip("/")


@pytest.fixture
def keep_logging():
    """The CLI configures logging for the captured stream; later tests must not log into it once it is closed."""
    with logging_restored():
        yield


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def gateway(db_engine, db, sim, recorder) -> Gateway:
    app, url = sim
    settings = Settings(
        connections=[ConnectionSettings(**halo_connection(CONNECTION, url))],
        outbox=OutboxSettings(base_delay_seconds=30, max_delay_seconds=600, claim_seconds=300, max_attempts=3),
    )
    return make_gateway(db_engine, FrozenClock(NOW), recorder, settings=settings, db=db)


@pytest.fixture
async def no_wait_adapter(gateway):
    """The real HaloPSA adapter whose connector retries without sleeping (the connector's sleep is injectable)."""
    made = []

    async def no_wait(seconds: float) -> None:
        return None

    def make() -> HaloPsaAdapter:
        adapter = HaloPsaAdapter(gateway.settings.connection(CONNECTION), AdapterContext(clock=gateway.clock),
                                 sleep=no_wait)
        made.append(adapter)
        return adapter

    yield make
    for adapter in made:
        await adapter.aclose()


def clients(app) -> list[int]:
    return sorted(app[STATE].clients)


def gateway_invoices(app) -> list[dict]:
    return [i for i in app[STATE].invoices.values() if "gateway-bill" in (i.get("internal_note") or "")]


def delivery(db, delivery_id: int | None = None) -> Delivery:
    with db() as s:
        query = select(Delivery).order_by(Delivery.id)
        if delivery_id is not None:
            query = query.where(Delivery.id == delivery_id)
        return s.scalars(query).first()


def bill_of(db, d: Delivery) -> Bill:
    with db() as s:
        return s.get(Bill, d.bill_id)


# --- delivered once ---------------------------------------------------------------------------------


async def test_g2_a_finalised_bill_is_pushed_once_and_recorded_with_the_psa_id(db, gateway, sim, recorder):
    app, _ = sim
    world = build_world(db, customers=1, psa={CONNECTION: [str(clients(app)[0])]}, issue=False)
    # A draft has no delivery yet: nothing to push.
    assert (await outbox_round(gateway, "w1")).claimed == 0
    with transaction(db) as s:
        lifecycle.finalize_bill(s, system_principal(world.partner_id, "test"), world.bill_ids[0], now=NOW)

    result = await outbox_round(gateway, "w1")

    assert (result.claimed, result.delivered, result.already_present, result.dead) == (1, 1, 0, 0)
    (invoice,) = gateway_invoices(app)
    d = delivery(db)
    bill = bill_of(db, d)
    assert d.status == DeliveryStatus.DELIVERED and d.external_id == str(invoice["id"])
    assert (d.attempts, d.delivered_at, d.claimed_by, d.claimed_until, d.last_error) == (1, NOW, None, None, None)
    assert d.key == deliveries.delivery_key(CONNECTION, bill)
    assert invoice["client_id"] == clients(app)[0] and invoice["order_number"] == bill.number
    assert invoice["reference"] == d.key and Decimal(str(invoice["total"])) == bill.total
    assert recorder.delivered == [(CONNECTION, d.key, PushResult(external_id=str(invoice["id"]), created=True))]
    # Delivered means done: a later round claims nothing and sends nothing.
    posts = app[STATE].requests[POSTS]
    assert (await outbox_round(gateway, "w2")).claimed == 0
    assert app[STATE].requests[POSTS] == posts == 1


async def test_g2_a_push_repeated_after_a_crash_before_recording_finds_the_invoice_and_creates_no_copy(
    db, gateway, sim, recorder
):
    app, _ = sim
    build_world(db, customers=1, psa={CONNECTION: [str(clients(app)[0])]})
    # Worker A claims and pushes, the PSA accepts, and A dies before it records anything.
    ((delivery_id, _),) = outbox.claim_due(gateway.db, gateway.clock, gateway.settings.outbox, "worker-a", limit=10)
    adapter = gateway.build_psa(CONNECTION)
    try:
        with db() as s:
            first = await adapter.push_bill(deliveries.bill_document(s, s.get(Delivery, delivery_id)))
    finally:
        await adapter.aclose()
    assert first.created and len(gateway_invoices(app)) == 1
    assert delivery(db).status == DeliveryStatus.PENDING
    # While A's lease runs, nobody else takes the delivery.
    assert (await outbox_round(gateway, "worker-b")).claimed == 0
    gateway.clock.advance(seconds=gateway.settings.outbox.claim_seconds + 1)

    result = await outbox_round(gateway, "worker-b")

    assert (result.claimed, result.delivered, result.already_present) == (1, 0, 1)
    assert len(gateway_invoices(app)) == 1 and app[STATE].requests[POSTS] == 1
    d = delivery(db)
    assert (d.status, d.external_id) == (DeliveryStatus.DELIVERED, first.external_id)
    assert recorder.delivered == [(CONNECTION, d.key, PushResult(external_id=first.external_id, created=False))]


async def test_g2_a_delivery_put_back_to_pending_is_recognised_and_not_sent_twice(db, gateway, sim, recorder):
    app, _ = sim
    build_world(db, customers=2, psa={CONNECTION: [str(c) for c in clients(app)[:2]]})
    assert (await outbox_round(gateway, "w1")).delivered == 2
    before = {i["id"]: (i["reference"], i["total"]) for i in gateway_invoices(app)}
    with transaction(db) as s:  # as if the recording transaction had been lost
        s.execute(update(Delivery).values(status=DeliveryStatus.PENDING, external_id=None, delivered_at=None))

    result = await outbox_round(gateway, "w2")

    assert (result.claimed, result.delivered, result.already_present) == (2, 0, 2)
    assert {i["id"]: (i["reference"], i["total"]) for i in gateway_invoices(app)} == before
    assert app[STATE].requests[POSTS] == 2
    with db() as s:
        assert {d.external_id for d in s.scalars(select(Delivery))} == {str(i) for i in before}


# --- failures ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 503])
async def test_g2_a_transient_failure_is_retried_with_back_off_and_its_state_is_stored(
    db, gateway, sim, recorder, no_wait_adapter, status
):
    app, _ = sim
    build_world(db, customers=1, psa={CONNECTION: [str(clients(app)[0])]})
    adapters = {CONNECTION: no_wait_adapter()}
    await adapters[CONNECTION].list_companies()  # token and connection ready; the faults hit the push
    calls = sum(app[STATE].requests.values())
    if status == 429:
        app[FAULTS].throttle(6)
    else:
        app[FAULTS].fail(6, status=503)

    result = await outbox_round(gateway, "w1", adapters=adapters)

    assert (result.claimed, result.failed, result.delivered, result.dead) == (1, 1, 0, 0)
    assert sum(app[STATE].requests.values()) - calls == 6  # the connector's own retries, then the outbox's
    d = delivery(db)
    settings = gateway.settings.outbox
    assert d.status == DeliveryStatus.PENDING and d.attempts == 1
    assert f"HTTP {status}" in d.last_error and ("RateLimited" if status == 429 else "TransientError") in d.last_error
    delay = (d.next_attempt_at - NOW).total_seconds()
    assert settings.base_delay_seconds / 2 <= delay <= settings.base_delay_seconds * 2
    assert (d.claimed_by, d.claimed_until) == (None, None)
    assert gateway_invoices(app) == [] and recorder.notes == []
    # Not due yet: a round now leaves it alone.
    assert (await outbox_round(gateway, "w1", adapters=adapters)).claimed == 0
    gateway.clock.set(d.next_attempt_at)

    again = await outbox_round(gateway, "w1", adapters=adapters)

    assert again.delivered == 1
    d = delivery(db)
    (invoice,) = gateway_invoices(app)
    assert (d.status, d.attempts, d.last_error, d.external_id) == (DeliveryStatus.DELIVERED, 2, None, str(invoice["id"]))


async def test_g2_back_off_grows_with_each_attempt_and_exhausted_retries_are_dead_lettered(
    db, gateway, sim, recorder, no_wait_adapter
):
    app, _ = sim
    build_world(db, customers=1, psa={CONNECTION: [str(clients(app)[0])]})
    adapters = {CONNECTION: no_wait_adapter()}
    settings = gateway.settings.outbox
    delays = []
    for attempt in range(1, settings.max_attempts + 1):
        app[FAULTS].fail(6, status=502)
        result = await outbox_round(gateway, "w1", adapters=adapters)
        assert result.claimed == 1
        d = delivery(db)
        assert d.attempts == attempt and "HTTP 502" in d.last_error
        if attempt < settings.max_attempts:
            assert d.status == DeliveryStatus.PENDING
            delays.append((d.next_attempt_at - gateway.clock.now()).total_seconds())
            gateway.clock.set(d.next_attempt_at)
    # Full jitter within a ceiling that doubles: attempt n waits at most base * 2**n.
    assert all(settings.base_delay_seconds / 2 <= x <= settings.base_delay_seconds * 2 ** n
               for n, x in enumerate(delays, start=1))
    assert d.status == DeliveryStatus.DEAD and result.dead == 1
    assert [event for event, _ in recorder.notes] == ["delivery.dead_lettered"]
    payload = recorder.notes[0][1]
    assert payload["key"] == d.key and payload["attempts"] == settings.max_attempts and "HTTP 502" in payload["error"]
    # Dead means out of the queue, however much time passes.
    gateway.clock.advance(days=30)
    assert (await outbox_round(gateway, "w1", adapters=adapters)).claimed == 0


async def dead_lettered(db, gateway, app) -> Delivery:
    """One bill for a customer mapped to a client HaloPSA does not have, after one outbox round."""
    missing_client = max(clients(app)) + 100
    build_world(db, customers=1, psa={CONNECTION: [str(missing_client)]})
    result = await outbox_round(gateway, "w1")
    assert (result.claimed, result.dead, result.failed) == (1, 1, 0)
    return delivery(db)


def cli_config(tmp_path, db_engine, url):
    return write_config(tmp_path / "gateway.toml", database_url=db_engine.url.render_as_string(hide_password=False),
                        sections={"logging": {"level": "error"}}, connections=[halo_connection(CONNECTION, url)])


async def test_g2_a_permanent_failure_is_dead_lettered_at_once_and_nothing_is_delivered(db, gateway, sim, recorder):
    app, _ = sim
    d = await dead_lettered(db, gateway, app)
    assert (d.status, d.attempts) == (DeliveryStatus.DEAD, 1)
    assert "PermanentError" in d.last_error and "HTTP 400" in d.last_error and "valid Client" in d.last_error
    assert gateway_invoices(app) == [] and recorder.delivered == []


async def test_g2_a_dead_lettered_delivery_is_notified_with_its_key_attempts_and_error(db, gateway, sim, recorder):
    app, _ = sim
    d = await dead_lettered(db, gateway, app)
    assert recorder.notes == [("delivery.dead_lettered", {
        "delivery_id": d.id, "connection": CONNECTION, "key": d.key, "attempts": 1, "error": d.last_error})]


async def test_g2_deliveries_list_shows_a_dead_delivery_with_its_error(
    db, db_engine, gateway, sim, tmp_path, capsys, keep_logging
):
    app, url = sim
    d = await dead_lettered(db, gateway, app)
    config = cli_config(tmp_path, db_engine, url)
    capsys.readouterr()
    assert cli.main(["--config", str(config), "deliveries", "list", "--status", "dead", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert (listed["id"], listed["key"], listed["status"], listed["last_error"]) == (d.id, d.key, "dead", d.last_error)


async def test_g2_a_dead_delivery_retried_by_hand_after_its_mapping_is_fixed_is_delivered(
    db, db_engine, gateway, sim, tmp_path, capsys, keep_logging
):
    app, url = sim
    d = await dead_lettered(db, gateway, app)
    config = cli_config(tmp_path, db_engine, url)
    with transaction(db) as s:  # the person fixes the mapping first
        s.execute(update(ExternalMapping).values(external_id=str(clients(app)[0])))
    capsys.readouterr()
    assert cli.main(["--config", str(config), "deliveries", "retry", str(d.id)]) == 0
    assert f"delivery {d.id} ({d.key}) queued again" in capsys.readouterr().out
    requeued = delivery(db)
    assert (requeued.status, requeued.attempts) == (DeliveryStatus.PENDING, 0)
    gateway.clock.set(requeued.next_attempt_at)  # the CLI queued it for its own (real) now

    assert (await outbox_round(gateway, "w1")).delivered == 1
    (invoice,) = gateway_invoices(app)
    assert delivery(db).external_id == str(invoice["id"]) and invoice["client_id"] == clients(app)[0]


async def test_g2_only_a_dead_delivery_is_retried_by_hand_and_an_unknown_id_is_not_found(db, gateway, sim):
    app, _ = sim
    build_world(db, customers=1, psa={CONNECTION: [str(clients(app)[0])]})
    assert (await outbox_round(gateway, "w1")).delivered == 1
    with pytest.raises(Conflict, match="not dead"), transaction(db) as s:
        outbox.retry_dead(s, delivery(db).id, NOW)
    with pytest.raises(NotFound, match="no delivery with id 999"), transaction(db) as s:
        outbox.retry_dead(s, 999, NOW)


async def test_g2_a_bill_whose_customer_lost_its_psa_mapping_is_dead_lettered_with_what_to_do(
    db, gateway, sim, recorder
):
    app, _ = sim
    build_world(db, customers=2, psa={CONNECTION: [str(c) for c in clients(app)[:2]]})
    first, second = (d.id for d in _deliveries(db))
    with transaction(db) as s:
        s.execute(update(ExternalMapping).where(ExternalMapping.customer_id == bill_of(db, delivery(db, first)).customer_id)
                  .values(customer_id=None))

    result = await outbox_round(gateway, "w1")

    # The other bill of the batch is delivered; the unmapped one is dead-lettered, not left leased.
    assert (result.claimed, result.delivered, result.dead) == (2, 1, 1)
    lost, fine = delivery(db, first), delivery(db, second)
    assert fine.status == DeliveryStatus.DELIVERED
    assert (lost.status, lost.claimed_by) == (DeliveryStatus.DEAD, None)
    assert "no longer mapped" in lost.last_error and "retry the delivery" in lost.last_error
    assert [event for event, _ in recorder.notes] == ["delivery.dead_lettered"]


async def test_g2_an_answer_the_adapter_cannot_read_is_a_failed_attempt_not_a_stuck_delivery(
    db, gateway, sim, recorder
):
    app, _ = sim
    client = clients(app)[0]
    build_world(db, customers=2, psa={CONNECTION: [str(c) for c in clients(app)[:2]]})
    key = delivery(db).key
    # Someone (or some other tool) left an invoice with the bill's marker but an id that is not a number.
    state = app[STATE]
    for invoice_id in [i for i, inv in state.invoices.items() if inv["client_id"] == client]:
        del state.invoices[invoice_id]
    state.invoices["x1"] = {"id": "x1", "client_id": client, "reference": key, "lines": [], "total": 0.0,
                            "internal_note": f"gateway-bill key={key} period=2026-03-01/2026-03-31 devices=1"}

    result = await outbox_round(gateway, "w1")

    assert (result.claimed, result.delivered, result.failed) == (2, 1, 1)
    stuck = delivery(db)
    assert (stuck.status, stuck.attempts, stuck.claimed_by) == (DeliveryStatus.PENDING, 1, None)
    assert "ValueError" in stuck.last_error and stuck.next_attempt_at > NOW


def _deliveries(db) -> list[Delivery]:
    with db() as s:
        return list(s.scalars(select(Delivery).order_by(Delivery.id)))


# --- leases ----------------------------------------------------------------------------------------------


async def test_g2_a_worker_whose_lease_expired_cannot_overwrite_the_new_owners_record(db, gateway, sim, recorder):
    app, url = sim
    build_world(db, customers=1, psa={CONNECTION: [str(clients(app)[0])]})
    # Worker A's adapter has credentials that were revoked; its token request is also slow, so
    # its lease runs out while it waits.
    stale = ConnectionSettings(**{**halo_connection(CONNECTION, url),
                                  "credentials": {"client_id": "sim-client", "client_secret": "revoked"}})
    adapter_a = HaloPsaAdapter(stale, AdapterContext(clock=gateway.clock))
    app[FAULTS].slow(1, seconds=1.0)
    try:
        task_a = asyncio.create_task(outbox_round(gateway, "worker-a", adapters={CONNECTION: adapter_a}))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if app[FAULTS].pending == 0 and delivery(db).claimed_by == "worker-a":
                break
        assert delivery(db).claimed_by == "worker-a" and not task_a.done()
        gateway.clock.advance(seconds=gateway.settings.outbox.claim_seconds + 1)

        result_b = await outbox_round(gateway, "worker-b")
        assert result_b.delivered == 1
        result_a = await task_a
    finally:
        await adapter_a.aclose()

    # A's push failed for good (credentials refused), but it no longer held the lease: nothing recorded.
    assert (result_a.claimed, result_a.dead, result_a.delivered) == (1, 0, 0)
    assert "AuthError" in result_a.errors[0]
    (invoice,) = gateway_invoices(app)
    d = delivery(db)
    assert (d.status, d.external_id, d.last_error, d.attempts) == (DeliveryStatus.DELIVERED, str(invoice["id"]), None, 1)
    assert recorder.notes == []
    assert [(c, k, r.created) for c, k, r in recorder.delivered] == [(CONNECTION, d.key, True)]


# --- connection-level failures, leases, one customer at a time ----------------------------------------


async def test_g2_refused_credentials_retry_with_back_off_instead_of_dead_lettering(db, gateway, sim):
    app, url = sim
    build_world(db, customers=1, psa={CONNECTION: [str(clients(app)[0])]})
    wrong = ConnectionSettings(**{**halo_connection(CONNECTION, url), "credentials": {"client_id": "sim-client",
                                                                                      "client_secret": "rotated"}})
    adapter = HaloPsaAdapter(wrong, AdapterContext(clock=gateway.clock))
    try:
        result = await outbox_round(gateway, "w1", adapters={CONNECTION: adapter})
    finally:
        await adapter.aclose()
    d = delivery(db)
    assert (result.failed, result.dead) == (1, 0)
    assert d.status == DeliveryStatus.PENDING and "AuthError" in d.last_error and d.next_attempt_at > NOW
    assert "rotated" not in d.last_error
    # With the credentials fixed, the waiting bill goes through without anyone retrying it by hand.
    gateway.clock.set(d.next_attempt_at)
    assert (await outbox_round(gateway, "w1")).delivered == 1


async def test_g2_a_slow_push_keeps_its_lease_so_no_other_worker_takes_it_over(db, gateway, sim):
    app, _ = sim
    build_world(db, customers=1, psa={CONNECTION: [str(clients(app)[0])]})
    gateway.settings.outbox.claim_seconds = 0.6  # renewed every 0.2 s while the push runs
    real = gateway.build_psa(CONNECTION)
    release = asyncio.Event()

    class Slow:
        async def push_bill(self, document):
            await release.wait()  # a push held up by rate limits and retries
            return await real.push_bill(document)

        async def aclose(self):
            await real.aclose()

    pushing = asyncio.create_task(outbox_round(gateway, "slow", adapters={CONNECTION: Slow()}))
    for _ in range(9):  # time passes on both clocks, well past the first lease (NOW + 0.6 s)
        await asyncio.sleep(0.1)
        gateway.clock.advance(seconds=0.1)
    assert gateway.clock.now() > NOW + timedelta(seconds=0.6)
    assert outbox.claim_due(gateway.db, gateway.clock, gateway.settings.outbox, "other", limit=5) == []
    release.set()
    result = await pushing
    await real.aclose()
    assert result.delivered == 1 and delivery(db).status == DeliveryStatus.DELIVERED


async def test_g2_one_customers_bills_go_to_a_psa_one_after_another(db, gateway, sim):
    app, _ = sim
    build_world(db, customers=2, psa={CONNECTION: [str(c) for c in clients(app)[:2]]})
    with db() as s:
        first = s.scalars(select(Delivery)).first()
        bill = s.get(Bill, first.bill_id)
    # A second bill for the first customer (another plan, same cycle), delivered in the same round.
    with transaction(db) as s:
        twin = Bill(**{c: getattr(bill, c) for c in ("partner_id", "customer_id", "kind", "period_start", "period_end",
                                                  "currency", "device_count", "total", "status", "issued_on",
                                                  "due_on", "created_at")},
                    source_id=bill.source_id + 1000, number=bill.number + "-B")
        s.add(twin)
        s.flush()
        s.add(Delivery(bill_id=twin.id, connection=CONNECTION, key=first.key + "-b", next_attempt_at=NOW,
                       created_at=NOW))
    customer_of = {}
    with db() as s:
        for d in s.scalars(select(Delivery)):
            customer_of[d.key] = s.get(Bill, d.bill_id).customer_id
    real = gateway.build_psa(CONNECTION)
    active: dict[int, int] = {}
    overlap = []

    class Watching:
        async def push_bill(self, document):
            customer = customer_of[document.key]
            active[customer] = active.get(customer, 0) + 1
            overlap.append(active[customer])
            try:
                await asyncio.sleep(0.05)
                return PushResult(external_id=document.key, created=True)
            finally:
                active[customer] -= 1

        async def aclose(self):
            await real.aclose()

    result = await outbox_round(gateway, "w1", adapters={CONNECTION: Watching()})
    await real.aclose()
    assert result.delivered == 3 and max(overlap) == 1


def add_twin_delivery(db) -> None:
    """A second bill (another plan, same cycle) and its delivery for the first delivery's customer."""
    with db() as s:
        first = s.scalars(select(Delivery).order_by(Delivery.id)).first()
        bill = s.get(Bill, first.bill_id)
    with transaction(db) as s:
        twin = Bill(**{c: getattr(bill, c) for c in ("partner_id", "customer_id", "kind", "period_start", "period_end",
                                                  "currency", "device_count", "total", "status", "issued_on",
                                                  "due_on", "created_at")},
                    source_id=bill.source_id + 1000, number=bill.number + "-B")
        s.add(twin)
        s.flush()
        s.add(Delivery(bill_id=twin.id, connection=CONNECTION, key=first.key + "-b", next_attempt_at=NOW,
                       created_at=NOW))


async def test_g2_a_delivery_claimed_by_another_worker_while_it_waited_its_turn_is_not_pushed(db, gateway, sim):
    """One worker claims a customer's two bills; while the first push is slow, the second's lease runs out
    and another worker claims it. The first worker must leave it alone: pushing it too would race the
    other worker's push of the same bill (two copies, or a correction that undoes the other)."""
    app, _ = sim
    build_world(db, customers=1, psa={CONNECTION: [str(clients(app)[0])]})
    add_twin_delivery(db)
    gateway.settings.outbox.claim_seconds = 0.6  # the first push's lease is renewed every 0.2 s
    real = gateway.build_psa(CONNECTION)
    release = asyncio.Event()
    pushed_by_a: list[str] = []

    class Slow:
        async def push_bill(self, document):
            pushed_by_a.append(document.key)
            await release.wait()
            return await real.push_bill(document)

        async def aclose(self):
            pass

    a = asyncio.create_task(outbox_round(gateway, "worker-a", adapters={CONNECTION: Slow()}))
    for _ in range(9):
        await asyncio.sleep(0.1)
        gateway.clock.advance(seconds=0.1)
    # only the waiting one had an expired lease
    taken = outbox.claim_due(gateway.db, gateway.clock, gateway.settings.outbox, "worker-b", limit=5)
    assert [connection for _, connection in taken] == [CONNECTION] and len(pushed_by_a) == 1
    release.set()
    result_a = await a
    assert (result_a.claimed, result_a.delivered) == (2, 1) and len(pushed_by_a) == 1
    assert len(gateway_invoices(app)) == 1
    gateway.clock.advance(seconds=1)  # worker B's lease on it expires unused; any worker delivers it once
    result = await outbox_round(gateway, "worker-c", adapters={CONNECTION: real})
    await real.aclose()
    assert result.delivered == 1 and len(gateway_invoices(app)) == 2
    with db() as s:
        assert {d.status for d in s.scalars(select(Delivery))} == {DeliveryStatus.DELIVERED}


async def test_g2_a_bug_while_building_the_document_costs_an_attempt_and_ends_dead_lettered(db, gateway, sim, recorder):
    app, _ = sim
    build_world(db, customers=1, psa={CONNECTION: [str(clients(app)[0])]})

    def broken(session, delivery):
        raise ZeroDivisionError("division by zero in a tax rule")

    for attempt in range(1, gateway.settings.outbox.max_attempts + 1):
        result = await outbox_round(gateway, "w1", build=broken)
        d = delivery(db)
        assert d.attempts == attempt and "ZeroDivisionError: division by zero in a tax rule" in d.last_error
        assert d.claimed_by is None  # released, not left leased
        if d.status == DeliveryStatus.PENDING:
            assert result.failed == 1
            gateway.clock.set(d.next_attempt_at)
    assert (d.status, result.dead) == (DeliveryStatus.DEAD, 1)
    assert [event for event, _ in recorder.notes] == ["delivery.dead_lettered"]
    assert gateway_invoices(app) == []

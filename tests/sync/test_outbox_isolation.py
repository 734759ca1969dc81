"""G5: one PSA that accepts connections and never answers holds none of the other PSAs' deliveries.

The daemon's jobs (``build_jobs`` as ``gateway run`` wires them) run against two HaloPSA
connections: one to the simulator, one to a loopback server that accepts every connection and
never answers a byte. The healthy connection's bills all arrive; the hung connection's pushes are
cut off, recorded as failed attempts with back-off, and ``/readyz`` shows it and the outbox degraded
with the reason.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime

import pytest
from builders import make_gateway
from psa_world import BILLED_AT, Recorder, build_world, halo_connection
from sqlalchemy import select

from gateway.core.clock import FrozenClock
from gateway.core.models import Delivery, DeliveryStatus
from gateway.core.settings import ConnectionSettings, OutboxSettings, SchedulerSettings, Settings
from gateway.daemon import _jobs
from gateway.plugins.halopsa.simulator import STATE, create_app
from gateway.sync.scheduler import Scheduler
from gateway.web.health import SCHEDULER_KEY, readiness

NOW = datetime(2026, 4, 1, 2, 0, tzinfo=BILLED_AT.tzinfo)
CUSTOMERS = 6


@pytest.fixture
async def hung_url():
    """A loopback server that accepts connections and never answers (it reads and holds them)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        try:
            while await reader.read(65536):
                pass
        except (ConnectionError, asyncio.CancelledError):
            pass

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    for writer in held:
        writer.close()
    server.close()


@pytest.fixture
async def healthy(aiohttp_server):
    app = create_app(clients=CUSTOMERS)
    server = await aiohttp_server(app)
    return app, str(server.make_url("")).rstrip("/")


def _deliveries(db, connection: str) -> list[Delivery]:
    with db() as s:
        return list(s.scalars(select(Delivery).where(Delivery.connection == connection).order_by(Delivery.id)))


async def test_g5_a_psa_that_never_answers_holds_no_other_psas_deliveries_and_readyz_shows_it_degraded(
    db_engine, db, healthy, hung_url
):
    app, url = healthy
    settings = Settings(
        connections=[
            ConnectionSettings(**halo_connection("halo", url)),
            ConnectionSettings(**halo_connection("hung", hung_url), timeout_seconds=0.5),
        ],
        # A small batch: a round of the old single outbox loop mixed both connections and waited for all.
        outbox=OutboxSettings(batch_size=2, push_timeout_seconds=1.5, base_delay_seconds=30, max_delay_seconds=600),
        scheduler=SchedulerSettings(outbox_interval_seconds=0.2),
    )
    gateway = make_gateway(db_engine, FrozenClock(NOW), Recorder(), settings=settings, db=db)
    companies = [str(c) for c in sorted(app[STATE].clients)]
    build_world(db, customers=CUSTOMERS, psa={"halo": companies, "hung": [str(900 + i) for i in range(CUSTOMERS)]})
    stop = asyncio.Event()
    jobs = [job for job in _jobs(gateway, stop, "worker-test") if job.name.startswith("outbox")]
    scheduler = Scheduler(jobs, stop_event=stop)
    gateway.stash[SCHEDULER_KEY] = scheduler
    started = time.monotonic()
    scheduler.start()
    try:
        deadline = started + 20
        while time.monotonic() < deadline:
            done = all(d.status == DeliveryStatus.DELIVERED for d in _deliveries(db, "halo"))
            tried = all(d.attempts >= 1 for d in _deliveries(db, "hung"))
            if done and tried:
                break
            await asyncio.sleep(0.1)
        healthy_done = time.monotonic() - started
        ready, body = await asyncio.to_thread(readiness, gateway)
    finally:
        await scheduler.stop(timeout=5)
    halo = _deliveries(db, "halo")
    assert [d.status for d in halo] == [DeliveryStatus.DELIVERED] * CUSTOMERS, (
        f"the healthy PSA's deliveries waited on the hung one: {[d.status.value for d in halo]}")
    hung = _deliveries(db, "hung")
    # Each hung push is a failed attempt, recorded with its reason and a retry time in the future.
    assert all(d.status == DeliveryStatus.PENDING and d.attempts == 1 for d in hung)
    assert all("did not finish within 1.5 s" in (d.last_error or "") for d in hung)
    assert all(d.next_attempt_at.replace(tzinfo=None) > NOW.replace(tzinfo=None) for d in hung)
    assert healthy_done < 15
    # /readyz: still 200 (G5: a tool is down, not the gateway), but the hung connection and the outbox say so.
    assert ready and body["status"] == "ready"
    assert body["outbox"]["status"] == "degraded"
    assert body["outbox"]["connections"]["hung"]["retrying"] == CUSTOMERS
    assert "did not finish" in body["outbox"]["connections"]["hung"]["reason"]
    assert body["outbox"]["connections"]["halo"]["status"] == "ok"
    states = {c["name"]: c for c in body["connections"]}
    assert states["hung"]["status"] == "degraded" and "did not finish" in states["hung"]["outbox"]["reason"]
    assert states["halo"]["status"] != "degraded"
    assert {"outbox:halo", "outbox:hung"} <= set(body["jobs"])

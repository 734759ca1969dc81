"""G2 end to end: a worker killed with SIGKILL at random points while pushing 200 bills, restarted, on SQLite
and PostgreSQL, leaves the PSA with exactly 200 invoices and the right totals.

The HaloPSA simulator runs in this process on a loopback port; the worker is the real
command line (``python -m gateway --config CFG deliveries run``) in a subprocess. Each
kill lands while the worker is pushing (after the simulator has seen a random number of
new invoices, plus a random few milliseconds). A killed worker's leases last one second
(``outbox.claim_seconds = 1``), after which the next worker takes its deliveries over.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest
from builders import write_config
from psa_world import ServedApp, build_world, expected_bills, halo_connection
from sqlalchemy import func, select

from gateway.core.models import Delivery, DeliveryStatus
from gateway.plugins.halopsa.simulator import STATE, create_app

BILLS = 200
KILLS = 4
CONNECTION = "halo"
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def gateway_invoices(app) -> list[dict]:
    return [dict(i) for i in app[STATE].invoices.values() if "gateway-bill" in (i.get("internal_note") or "")]


def worker(config: Path, log: Path, name: str) -> subprocess.Popen:
    with log.open("a") as stream:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", "--config", str(config), "deliveries", "run", "--worker-id", name],
            stdout=stream, stderr=stream, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def pending(db) -> int:
    with db() as s:
        return s.scalar(select(func.count()).select_from(Delivery).where(Delivery.status != DeliveryStatus.DELIVERED))


def test_g2_sigkill_at_random_points_while_pushing_200_bills_leaves_exactly_200_invoices_with_right_totals(
    db, db_engine, tmp_path
):
    seed = int(os.environ.get("GATEWAY_TEST_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    log = tmp_path / "workers.log"
    with ServedApp(create_app(clients=BILLS)) as sim:
        clients = sim.call(lambda app: sorted(app[STATE].clients))
        build_world(db, customers=BILLS, psa={CONNECTION: [str(c) for c in clients]})
        expected = expected_bills(db, CONNECTION)
        assert len(expected) == BILLS
        config = write_config(
            tmp_path / "gateway.toml",
            database_url=db_engine.url.render_as_string(hide_password=False),
            sections={"outbox": {"claim_seconds": 1.0, "batch_size": 10, "base_delay_seconds": 0.5},
                      "logging": {"level": "info", "format": "json"}},
            connections=[halo_connection(CONNECTION, sim.url, max_concurrent=4)],
        )
        kills = []
        for n in range(KILLS):
            before = len(sim.call(gateway_invoices))
            target = min(BILLS, before + rng.randint(5, 35))
            process = worker(config, log, f"crashing-{n}")
            deadline = time.monotonic() + 20
            while process.poll() is None and time.monotonic() < deadline:
                if len(sim.call(gateway_invoices)) >= target:
                    time.sleep(rng.uniform(0, 0.05))
                    break
                time.sleep(0.005)
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                kills.append(len(sim.call(gateway_invoices)))
            process.wait(10)
            time.sleep(1.1)  # the killed worker's leases run out
        # At least one worker died mid-push, with work left behind.
        assert kills and min(kills) < BILLS, f"seed {seed}: no worker was killed while pushing ({kills})"

        # Restart until the queue is empty: a worker exits when nothing is due.
        for _ in range(10):
            if not pending(db):
                break
            finisher = worker(config, log, "finisher")
            assert finisher.wait(60) == 0, f"seed {seed}: the finishing worker failed, see {log}"
            time.sleep(1.1)
        invoices = sim.call(gateway_invoices)
        requests = sim.call(lambda app: Counter(app[STATE].requests))

    context = f"seed {seed}, killed at {kills} invoices, log {log}"
    assert pending(db) == 0, context
    assert len(invoices) == BILLS, context
    by_key = Counter(i["reference"] for i in invoices)
    assert set(by_key) == set(expected) and max(by_key.values()) == 1, context
    assert requests["DELETE /api/Invoice/{invoice_id}"] == 0, context  # no copy was ever made and removed
    for invoice in invoices:
        devices, total = expected[invoice["reference"]]
        assert Decimal(str(invoice["total"])) == total, context
        assert f"devices={devices}" in invoice["internal_note"], context
    with db() as s:
        recorded = dict(s.execute(select(Delivery.key, Delivery.external_id)).all())
    assert recorded == {i["reference"]: str(i["id"]) for i in invoices}, context
    assert sum(total for _, total in expected.values()) == sum(Decimal(str(i["total"])) for i in invoices)
    found_again = sum(1 for line in log.read_text().splitlines()
                      if '"outbox.delivered"' in line and '"created": false' in line)
    print(f"outbox crash: seed {seed}, killed at {kills} invoices, {found_again} pushes found their invoice already there")



def test_g2_three_workers_started_at_once_share_the_queue_without_errors_or_copies(db, db_engine, tmp_path):
    log = tmp_path / "workers.log"
    with ServedApp(create_app(clients=BILLS)) as sim:
        clients = sim.call(lambda app: sorted(app[STATE].clients))
        build_world(db, customers=BILLS, psa={CONNECTION: [str(c) for c in clients]})
        expected = expected_bills(db, CONNECTION)
        config = write_config(
            tmp_path / "gateway.toml", database_url=db_engine.url.render_as_string(hide_password=False),
            sections={"outbox": {"batch_size": 5}, "logging": {"level": "info", "format": "json"}},
            connections=[halo_connection(CONNECTION, sim.url, max_concurrent=4)],
        )
        workers = [worker(config, log, f"parallel-{n}") for n in range(3)]
        codes = [w.wait(60) for w in workers]
        invoices = sim.call(gateway_invoices)
        posts = sim.call(lambda app: app[STATE].requests["POST /api/Invoice"])
    assert codes == [0, 0, 0], log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()
    assert pending(db) == 0 and len(invoices) == posts == BILLS
    assert {i["reference"]: Decimal(str(i["total"])) for i in invoices} == {k: t for k, (_, t) in expected.items()}
    claims = Counter(line.split('"worker": "')[1].split('"')[0] for line in log.read_text().splitlines()
                     if '"outbox.claimed"' in line)
    assert len(claims) > 1, claims

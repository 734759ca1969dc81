"""Scale-out on PostgreSQL: three ``gateway run`` processes share the outbox and hand the billing calendar on.

The processes claim deliveries with ``FOR UPDATE SKIP LOCKED``; the billing calendar
belongs to whoever holds the PostgreSQL advisory lock. The test delivers 2,000 bills to the
HaloPSA simulator (in this process, on loopback), SIGKILLs the process that leads while the
bills are being pushed, and proves that another process takes the lock over, that every bill
reaches the PSA exactly once with its total, and that more than one process did the work.
Each process connects with its own ``application_name``, so ``pg_locks`` says who leads.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest
from builders import free_port, write_config
from psa_world import ServedApp, build_world, expected_bills, halo_connection
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url

from gateway.core import db as gdb
from gateway.core.models import Delivery, DeliveryStatus
from gateway.plugins.halopsa.simulator import STATE, create_app
from gateway.sync.scheduler import LEADER_LOCK_KEY

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

BILLS = 2_000
PROCESSES = 3
CONNECTION = "halo"
REPO = Path(__file__).resolve().parents[2]

LEADER_SQL = text(
    """
    SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'advisory' AND l.granted AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND ((l.classid::bigint << 32) | l.objid::bigint) = :key
    """
)


def wait_until(condition, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
            return json.loads(response.read()).get("status") == "ok"
    except OSError:
        return False


def invoices_created(app) -> int:
    return app[STATE].requests["POST /api/Invoice"]


def gateway_invoices(app) -> list[dict]:
    return [dict(i) for i in app[STATE].invoices.values() if "gateway-bill" in (i.get("internal_note") or "")]


def events(log: Path) -> list[dict]:
    found = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:  # the last line of a killed process may be cut short
                pass
    return found


def test_g2_three_processes_share_2000_deliveries_exactly_once_and_the_billing_leader_moves_when_killed(
    postgres_engine, tmp_path
):
    db = gdb.session_factory(postgres_engine)
    url = postgres_engine.url.render_as_string(hide_password=False)

    def leader() -> str | None:
        with postgres_engine.connect() as connection:
            names = connection.execute(LEADER_SQL, {"key": LEADER_LOCK_KEY}).scalars().all()
        assert len(names) <= 1, f"two processes hold the billing lock: {names}"
        return names[0] if names else None

    def undelivered() -> int:
        with db() as s:
            return s.scalar(select(func.count()).select_from(Delivery).where(Delivery.status != DeliveryStatus.DELIVERED))

    started = time.monotonic()
    with ServedApp(create_app(clients=BILLS)) as sim:
        clients = sim.call(lambda app: sorted(app[STATE].clients))
        build_world(db, customers=BILLS, psa={CONNECTION: [str(c) for c in clients]})
        expected = expected_bills(db, CONNECTION)
        config = write_config(
            tmp_path / "gateway.toml", database_url=url,
            sections={"outbox": {"claim_seconds": 10.0, "batch_size": 20, "base_delay_seconds": 0.5},
                      "scheduler": {"outbox_interval_seconds": 0.2, "billing_interval_seconds": 2.0},
                      "server": {"shutdown_timeout_seconds": 5.0},
                      "logging": {"level": "info", "format": "json"}},
            connections=[halo_connection(CONNECTION, sim.url, max_concurrent=4)],
        )
        built = time.monotonic()
        processes: dict[str, subprocess.Popen] = {}
        logs: dict[str, Path] = {}
        ports: dict[str, int] = {}
        try:
            for n in range(PROCESSES):
                name = f"gw-{n}"
                ports[name], logs[name] = free_port(), tmp_path / f"{name}.log"
                env = {**os.environ, "PYTHONUNBUFFERED": "1", "GATEWAY_SERVER__PORT": str(ports[name]),
                       "GATEWAY_DATABASE__URL": make_url(url).update_query_dict({"application_name": name})
                       .render_as_string(hide_password=False)}
                with logs[name].open("w") as stream:
                    processes[name] = subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(config), "run"],
                                                       stdout=stream, stderr=stream, cwd=REPO, env=env)
            for name, port in ports.items():
                wait_until(lambda port=port, name=name: healthy(port) or processes[name].poll() is not None, 30,
                           f"{name} to serve")
                assert processes[name].poll() is None, logs[name].read_text()[-3000:]
            first_leader = wait_until(leader, 15, "a process to take the billing lock")
            # Kill the leader while the bills are being pushed.
            wait_until(lambda: sim.call(invoices_created) >= BILLS // 4, 40, "a quarter of the bills to arrive")
            processes[first_leader].send_signal(signal.SIGKILL)
            processes[first_leader].wait(10)
            delivered_at_kill = sim.call(invoices_created)
            assert delivered_at_kill < BILLS, "the work was over before the leader was killed; nothing was proven"
            second_leader = wait_until(lambda: (who := leader()) not in (None, first_leader) and who, 15,
                                       "another process to take the billing lock")
            wait_until(lambda: undelivered() == 0, 90, "every delivery to be recorded", interval=0.5)
            finished = time.monotonic()
        finally:
            for process in processes.values():
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process in processes.values():
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
        invoices = sim.call(gateway_invoices)
        requests = sim.call(lambda app: Counter(app[STATE].requests))

    survivors = [name for name in processes if name != first_leader]
    assert all(processes[name].returncode == 0 for name in survivors), {n: p.returncode for n, p in processes.items()}
    # Exactly once: one invoice per bill, each made by one create, none made twice and removed, totals right.
    assert len(invoices) == BILLS
    by_key = Counter(i["reference"] for i in invoices)
    assert set(by_key) == set(expected) and max(by_key.values()) == 1
    assert requests["POST /api/Invoice"] == BILLS and requests["DELETE /api/Invoice/{invoice_id}"] == 0
    assert all(Decimal(str(i["total"])) == expected[i["reference"]][1] for i in invoices)
    with db() as s:
        recorded = dict(s.execute(select(Delivery.key, Delivery.external_id)).all())
    assert recorded == {i["reference"]: str(i["id"]) for i in invoices}
    # The work was shared: each process logs the deliveries it recorded.
    delivered_by = {name: sum(1 for e in events(logs[name]) if e.get("event") == "outbox.delivered") for name in processes}
    assert sum(1 for count in delivered_by.values() if count) > 1, delivered_by
    assert sum(delivered_by[name] for name in survivors) <= BILLS
    # The billing calendar moved: the new leader says so in its log, and it ran the billing job after that.
    second = [e.get("event") for e in events(logs[second_leader])]
    assert "scheduler.leader_acquired" in second
    assert "billing.run" in second[second.index("scheduler.leader_acquired"):], second_leader
    for name in survivors:
        assert not [e for e in events(logs[name]) if e.get("event") == "job.failed"], name
    print(f"scale-out: delivered by {delivered_by}, leader {first_leader} killed at {delivered_at_kill} invoices, "
          f"{second_leader} took over; world built in {built - started:.1f} s, delivered in {finished - built:.1f} s")

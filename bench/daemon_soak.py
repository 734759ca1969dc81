"""Soak: pulls, webhooks, billing and deliveries together for minutes, through the daemon's real jobs.

One process, SQLite, everything on 127.0.0.1. The daemon application (``build_daemon_app``, as
``gateway run`` builds it: admin API, webhooks, and the scheduler with every job of ``build_jobs``)
runs against:

- a NinjaOne simulator, pulled every ``--pull-interval`` seconds, whose devices also get signed
  ``device.online`` webhooks (Standard Webhooks) at ``--webhooks-per-second``;
- two HaloPSA simulators: ``halo`` (healthy) and ``flaky``, reached through a loopback proxy that is
  *hung* for the middle third of the run (it accepts connections and never answers a byte, as in
  tests/sync/test_outbox_isolation.py) and forwards otherwise;
- a local SMTP server (aiosmtpd, as the demo uses) that keeps every bill e-mail.

Every ``--wave-seconds`` the soak adds ``--wave`` customers with last month's device activity and a monthly
plan from last month's start, each mapped to a company in both PSAs; the billing job bills them, which
sends their e-mails and writes their deliveries. Loops are bounded by ``--seconds``; at the end every
healthy delivery must have arrived.

Reported: job failures (the scheduler's count of failed runs), duplicate e-mails (more than one message
for a bill number), duplicate PSA invoices (more than one invoice in a simulator for one delivery), and the
worst delay of the healthy PSA's deliveries (delivery written -> delivered). The floor is measured in the
same run: the outbox interval plus the slowest healthy push round-trip the daemon itself took (the one
push's request-to-answer time is timed on the healthy simulator). The target: a healthy delivery waits at
most ``TARGET`` floors, whatever the hung PSA does. The last line is the machine-readable result.

    python bench/daemon_soak.py [--seconds 150] [--wave 8] [--wave-seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import logging
import socket
import sys
import tempfile
import time
import uuid
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from aiohttp import ClientSession, web
from sqlalchemy import insert, select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# The imports below follow this line, hence their noqa: E402: the benchmark runs from a checkout, installed or not.

from gateway.app import Gateway  # noqa: E402
from gateway.core import db as gdb  # noqa: E402
from gateway.core.access import system_principal  # noqa: E402
from gateway.core.billing import plans  # noqa: E402
from gateway.core.clock import SystemClock  # noqa: E402
from gateway.core.models import (  # noqa: E402
    BillingCycle,
    Customer,
    Delivery,
    DeliveryStatus,
    Device,
    DeviceActivity,
    ExternalMapping,
    MappingKind,
    Partner,
    PlanAssociation,
    Workspace,
)
from gateway.core.settings import (  # noqa: E402
    BillingSettings,
    ConnectionSettings,
    MailSettings,
    OutboxSettings,
    SchedulerSettings,
    Settings,
)
from gateway.daemon import SCHEDULER, build_daemon_app  # noqa: E402
from gateway.plugins import get_plugin_manager  # noqa: E402
from gateway.plugins.halopsa import simulator as halo_sim  # noqa: E402
from gateway.plugins.ninjaone import simulator as ninja_sim  # noqa: E402

TARGET = 3.0
SW_KEY = b"daemon-soak-key-0123456789abcdef"
SW_SECRET = "whsec_" + base64.b64encode(SW_KEY).decode()
HALO_CREDENTIALS = {"client_id": "sim-client", "client_secret": "sim-secret"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- loopback servers -----------------------------------------------------------------------------


class Proxy:
    """A TCP proxy to ``target_port`` that, while ``hung``, accepts and holds connections and answers nothing."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.hung = False
        self.held: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.hung:
            self.held.append(writer)
            try:
                while await reader.read(65536):
                    pass
            except (ConnectionError, asyncio.CancelledError):
                pass
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def release(self) -> None:
        for writer in self.held:
            writer.close()
        self.held.clear()

    async def close(self) -> None:
        self.release()
        if self.server is not None:
            self.server.close()


def start_smtp() -> tuple[Any, list[Any], int]:
    from aiosmtpd.controller import Controller
    from aiosmtpd.handlers import Sink

    messages: list[Any] = []

    class Keep(Sink):
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd API
            messages.append(envelope)
            return "250 OK"

    port = free_port()
    controller = Controller(Keep(), hostname="127.0.0.1", port=port)
    controller.start()
    return controller, messages, port


def timed(app: web.Application, timings: list[float]) -> web.Application:
    """Time every request the simulator answers (request in, answer out), for the floor."""

    @web.middleware
    async def clock_it(request: web.Request, handler: Any) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            return await handler(request)
        finally:
            timings.append(time.perf_counter() - started)

    app.middlewares.insert(0, clock_it)
    return app


async def serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


# --- the world ------------------------------------------------------------------------------------


def last_month(today: date) -> tuple[date, date]:
    end = today.replace(day=1) - timedelta(days=1)
    return end.replace(day=1), end


def seed_partner(gateway: Gateway) -> tuple[int, int]:
    now = gateway.clock.now()
    with gdb.transaction(gateway.db) as s:
        partner = Partner(name="Soak MSP", invoice_prefix="SOAK", email="owner@msp.example", created_at=now)
        s.add(partner)
        s.flush()
        plan = plans.create_plan(s, system_principal(partner.id, "soak"), name="Managed", price_per_device="10",
                                 currency="USD", now=now)
        return partner.id, plan.id


def add_wave(gateway: Gateway, partner_id: int, plan_id: int, first: int, count: int,
             companies: dict[str, list[int]]) -> None:
    """``count`` customers billed for last month, each mapped to company ``first + i`` of each PSA."""
    now = gateway.clock.now()
    start, end = last_month(now.date())
    with gdb.transaction(gateway.db) as s:
        people = [Customer(partner_id=partner_id, name=f"Soak customer {first + i:05d}", timezone="UTC",
                           billing_email=f"c{first + i}@example.com", created_at=now) for i in range(count)]
        s.add_all(people)
        s.flush()
        spaces = [Workspace(customer_id=c.id, name="Main", created_at=now) for c in people]
        s.add_all(spaces)
        s.flush()
        devices = [Device(connection="static", external_id=f"s{first + i}-{n}", org_external_id=f"o{first + i}",
                          workspace_id=w.id, hostname=f"h{first + i}-{n}", first_seen_at=now, updated_at=now)
                   for i, w in enumerate(spaces) for n in range(1 + i % 3)]
        s.add_all(devices)
        s.flush()
        s.execute(insert(DeviceActivity), [{"device_id": d.id, "day": start + timedelta(days=d.id % 28)}
                                           for d in devices])
        for connection, ids in companies.items():
            s.execute(insert(ExternalMapping), [
                {"connection": connection, "kind": MappingKind.PSA_COMPANY, "external_id": str(ids[first + i]),
                 "external_name": f"company {ids[first + i]}", "customer_id": c.id, "auto_created": False,
                 "first_seen_at": now, "last_seen_at": now} for i, c in enumerate(people)])
        s.add_all(PlanAssociation(plan_id=plan_id, customer_id=c.id, cycle=BillingCycle.MONTHLY, starts_on=start,
                                  due_days=30, email=f"ap{c.id}@example.com", created_at=now) for c in people)
    del end


def sw_headers(body: bytes, msg_id: str) -> dict[str, str]:
    ts = int(time.time())
    signature = base64.b64encode(hmac.new(SW_KEY, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest())
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": f"v1,{signature.decode()}",
            "Content-Type": "application/json"}


# --- the run --------------------------------------------------------------------------------------


async def soak(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    smtp, messages, smtp_port = start_smtp()
    halo_timings: list[float] = []
    ninja_app = ninja_sim.create_app(organizations=4, devices=args.devices)
    halo_app = timed(halo_sim.create_app(clients=args.customers_max), halo_timings)
    flaky_app = halo_sim.create_app(clients=args.customers_max, seed_value=2)
    runners = []
    ninja_runner, ninja_port = await serve(ninja_app)
    halo_runner, halo_port = await serve(halo_app)
    flaky_runner, flaky_port = await serve(flaky_app)
    runners += [ninja_runner, halo_runner, flaky_runner]
    proxy = Proxy(flaky_port)
    await proxy.start()

    def halo(name: str, port: int) -> ConnectionSettings:
        return ConnectionSettings(name=name, plugin="halopsa", base_url=f"http://127.0.0.1:{port}",
                                  credentials=dict(HALO_CREDENTIALS), timeout_seconds=1.0,
                                  rate_limit={"requests": 100_000, "per_seconds": 1.0, "max_concurrent": 8})

    settings = Settings(
        database={"url": f"sqlite:///{directory / 'soak.db'}"},
        mail=MailSettings(host="127.0.0.1", port=smtp_port, from_address="billing@msp.example", starttls=False,
                          timeout_seconds=5),
        billing=BillingSettings(invoice_prefix="SOAK", settling_minutes=0),
        outbox=OutboxSettings(batch_size=5, push_timeout_seconds=2.0, base_delay_seconds=1.0, max_delay_seconds=4.0,
                              max_attempts=1000),
        scheduler=SchedulerSettings(outbox_interval_seconds=args.outbox_interval, billing_interval_seconds=2.0,
                                    licensing_interval_seconds=30.0),
        connections=[
            ConnectionSettings(name="ninja", plugin="ninjaone", base_url=f"http://127.0.0.1:{ninja_port}",
                               poll_interval_seconds=args.pull_interval, webhook_scheme="standard-webhooks",
                               webhook_secret=SW_SECRET,
                               credentials={"client_id": ninja_sim.DEFAULT_CLIENT_ID,
                                            "client_secret": ninja_sim.DEFAULT_CLIENT_SECRET}),
            halo("halo", halo_port),
            halo("flaky", proxy.port),
        ],
    )
    engine = gdb.make_engine(settings.database.url)
    gdb.upgrade(engine)
    gateway = Gateway(settings=settings, engine=engine, db=gdb.session_factory(engine),
                      plugins=get_plugin_manager(load_entry_points=False), clock=SystemClock())
    partner_id, plan_id = seed_partner(gateway)
    companies = {"halo": sorted(halo_app[halo_sim.STATE].clients), "flaky": sorted(flaky_app[halo_sim.STATE].clients)}
    seeded = {name: set(a[halo_sim.STATE].invoices) for name, a in (("halo", halo_app), ("flaky", flaky_app))}
    seen: dict[int, datetime] = {}  # healthy delivery id -> when the soak first saw it committed

    async def watch() -> None:
        """When each healthy delivery became visible (committed): its delay is counted from then, not from the
        billing run's start (the run's own time is the billing job's, not the outbox's)."""
        while True:
            def ids() -> list[int]:
                with gateway.db() as s:
                    return list(s.scalars(select(Delivery.id).where(Delivery.connection == "halo",
                                                                    Delivery.id.not_in(list(seen) or [0]))))
            fresh = await asyncio.to_thread(ids)
            at = datetime.now(UTC)
            for delivery_id in fresh:
                seen.setdefault(delivery_id, at)
            await asyncio.sleep(0.1)

    app = build_daemon_app(gateway, scheduler=True)
    daemon_runner, daemon_port = await serve(app)
    runners.insert(0, daemon_runner)
    watcher = asyncio.create_task(watch())
    webhooks_sent = webhook_errors = 0
    started = time.monotonic()
    deadline = started + args.seconds
    hung_from, hung_until = started + args.seconds / 3, started + 2 * args.seconds / 3
    customers = 0
    next_wave = started
    try:
        async with ClientSession() as http:
            while time.monotonic() < deadline:
                now = time.monotonic()
                proxy.hung = hung_from <= now < hung_until
                if not proxy.hung and proxy.held:
                    proxy.release()
                if now >= next_wave and customers + args.wave <= args.customers_max and now < deadline - 15:
                    await asyncio.to_thread(add_wave, gateway, partner_id, plan_id, customers, args.wave, companies)
                    customers += args.wave
                    next_wave = now + args.wave_seconds
                with gateway.db() as s:
                    ids = list(s.scalars(select(Device.external_id).where(Device.connection == "ninja").limit(50)))
                for external_id in ids[: max(1, int(args.webhooks_per_second / 4))]:
                    body = json.dumps({"type": "device.online", "data": {"device_id": external_id}}).encode()
                    async with http.post(f"http://127.0.0.1:{daemon_port}/webhooks/ninja", data=body,
                                         headers=sw_headers(body, f"msg_{uuid.uuid4().hex}")) as response:
                        webhooks_sent += 1
                        webhook_errors += response.status != 200
                await asyncio.sleep(0.25)
            proxy.hung = False
            proxy.release()
            # Drain: bounded wait for every delivery (the healthy PSA's and, once it answers again, the flaky one's).
            drain_until = time.monotonic() + args.drain_seconds
            while time.monotonic() < drain_until:
                with gateway.db() as s:
                    pending = s.scalar(select(Delivery.id).where(Delivery.status != DeliveryStatus.DELIVERED).limit(1))
                if pending is None:
                    break
                await asyncio.sleep(0.5)
        scheduler = app[SCHEDULER]
        status = scheduler.status()
    finally:
        watcher.cancel()
        for runner in runners:
            await runner.cleanup()
        await proxy.close()
        smtp.stop()
    with gateway.db() as s:
        rows = s.execute(select(Delivery.id, Delivery.connection, Delivery.status, Delivery.created_at,
                                Delivery.delivered_at, Delivery.attempts)).all()
    engine.dispose()
    healthy = [r for r in rows if r.connection == "halo"]
    # Polled every 0.1 s: a delivery is seen at most that late, so its delay is under-counted by < 0.1 s.
    delays = [(r.delivered_at - max(r.created_at, seen.get(r.id, r.created_at))).total_seconds()
              for r in healthy if r.delivered_at is not None]
    written = [(r.delivered_at - r.created_at).total_seconds() for r in healthy if r.delivered_at is not None]
    subjects = Counter(_bill_number(m) for m in messages)
    invoices = {name: Counter(str(inv.get("client_id")) for key, inv in app_[halo_sim.STATE].invoices.items()
                              if key not in seeded[name])
                for name, app_ in (("halo", halo_app), ("flaky", flaky_app))}
    floor = args.outbox_interval + (max(halo_timings) if halo_timings else 0.0)
    return {
        "seconds": round(time.monotonic() - started, 1),
        "customers": customers,
        "job_failures": sum(j["failures"] for j in status.values()),
        "failed_jobs": {name: j["last_error"] for name, j in status.items() if j["failures"]},
        "job_runs": sum(j["runs"] for j in status.values()),
        "emails": len(messages),
        "duplicate_emails": sum(n - 1 for n in subjects.values() if n > 1),
        "duplicate_invoices": sum(n - 1 for c in invoices.values() for n in c.values() if n > 1),
        "webhooks": webhooks_sent, "webhook_errors": webhook_errors,
        "healthy_deliveries": len(healthy),
        "healthy_undelivered": sum(r.status != DeliveryStatus.DELIVERED for r in healthy),
        "flaky_deliveries": sum(r.connection == "flaky" for r in rows),
        "flaky_undelivered": sum(r.connection == "flaky" and r.status != DeliveryStatus.DELIVERED for r in rows),
        "flaky_max_attempts": max((r.attempts for r in rows if r.connection == "flaky"), default=0),
        "worst_delay_s": round(max(delays, default=0.0), 3),
        "worst_delay_from_billing_run_start_s": round(max(written, default=0.0), 3),
        "floor_s": round(floor, 3),
        "slowest_healthy_request_s": round(max(halo_timings, default=0.0), 3),
    }


def _bill_number(envelope: Any) -> str:
    content = envelope.content.decode("utf-8", "replace") if isinstance(envelope.content, bytes) else envelope.content
    for line in content.splitlines():
        if line.lower().startswith("subject:"):
            return line.split(":", 1)[1].strip()
    return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=150.0, help="how long the load runs (then a bounded drain)")
    parser.add_argument("--wave", type=int, default=8, help="customers added per wave")
    parser.add_argument("--wave-seconds", type=float, default=10.0)
    parser.add_argument("--customers-max", type=int, default=200, help="companies per PSA simulator, the cap")
    parser.add_argument("--devices", type=int, default=120, help="devices in the RMM simulator")
    parser.add_argument("--pull-interval", type=float, default=3.0)
    parser.add_argument("--outbox-interval", type=float, default=1.0)
    parser.add_argument("--webhooks-per-second", type=float, default=20.0)
    parser.add_argument("--drain-seconds", type=float, default=30.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    with tempfile.TemporaryDirectory(prefix="daemon-soak-") as tmp:
        result = asyncio.run(soak(args, Path(tmp)))
    ratio = result["worst_delay_s"] / result["floor_s"] if result["floor_s"] else float("inf")
    print(json.dumps(result, indent=2, default=str))
    ok = (ratio <= TARGET and result["job_failures"] == 0 and result["duplicate_emails"] == 0
          and result["duplicate_invoices"] == 0 and result["healthy_undelivered"] == 0)
    print(f"daemon_soak: ratio={ratio:.2f} target={TARGET} job_failures={result['job_failures']} "
          f"duplicate_emails={result['duplicate_emails']} duplicate_invoices={result['duplicate_invoices']} "
          f"worst_delay_s={result['worst_delay_s']} floor_s={result['floor_s']} "
          f"healthy_deliveries={result['healthy_deliveries']} emails={result['emails']} "
          f"webhooks={result['webhooks']} webhook_errors={result['webhook_errors']} "
          f"flaky_undelivered={result['flaky_undelivered']} {'ok' if ok else 'FAILED'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

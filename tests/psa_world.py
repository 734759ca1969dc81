"""Shared by the outbox, reconciliation and end-to-end tests (and bench/psa_push.py): bills that are due for PSAs.

``build_world`` makes real bills through the billing services: a partner with a monthly
service plan, customers each with a workspace and devices active in March 2026, every
customer mapped to a company in the given PSA connections, then ``run_billing`` as of
1 April 2026, which issues one bill per customer and writes its outbox deliveries.

``ServedApp`` serves a simulator on 127.0.0.1 from its own thread and event loop, for
tests whose gateway runs in subprocesses or calls ``asyncio.run`` itself (the CLI).

``outbox_round``, ``outbox_until_idle`` and ``reconcile_gateway`` call the outbox worker
and reconciliation with a test gateway's parts, wired as the daemon and the CLI wire them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar

import structlog
from aiohttp import web
from sqlalchemy import insert, select
from sqlalchemy.orm import Session, sessionmaker

from gateway import hookimpl
from gateway.core.access import system_principal
from gateway.core.billing import plans
from gateway.core.billing import run as billing_run
from gateway.core.billing.rules import Period
from gateway.core.db import transaction
from gateway.core.models import (
    Bill,
    BillingCycle,
    Customer,
    Delivery,
    Device,
    DeviceActivity,
    ExternalMapping,
    MappingKind,
    Partner,
    PlanAssociation,
    Workspace,
)
from gateway.core.settings import BillingSettings
from gateway.sync import outbox
from gateway.sync.reconcile import ReconciliationReport, reconcile

if TYPE_CHECKING:
    from gateway.app import Gateway

UTC = UTC
T0 = datetime(2026, 1, 1, tzinfo=UTC)
MARCH = (date(2026, 3, 1), date(2026, 3, 31))
#: Every customer's March is over (UTC customers), so the run bills March.
BILLED_AT = datetime(2026, 4, 1, 1, 0, tzinfo=UTC)
PRICE = Decimal("10.00")

#: Credentials the bundled simulators accept by default.
HALO_CREDENTIALS = {"client_id": "sim-client", "client_secret": "sim-secret"}
CONNECTWISE_CREDENTIALS = {"company": "simmsp", "public_key": "sim-public", "private_key": "sim-private",
                           "client_id": "sim-client-id"}
AUTOTASK_CREDENTIALS = {"username": "api-user@sim.example", "secret": "sim-secret",
                        "integration_code": "SIMINTEGRATIONCODE000000001"}


def devices_for(index: int) -> int:
    """How many devices customer ``index`` has active in March: 1 to 5, so totals differ."""
    return 1 + index % 5


@dataclass
class World:
    partner_id: int
    customer_ids: list[int]
    bill_ids: list[int]


def build_world(
    db: sessionmaker[Session],
    *,
    customers: int,
    psa: Mapping[str, Sequence[str]],
    unmapped_customers: int = 0,
    devices: Callable[[int], int] = devices_for,
    issue: bool = True,
    cycle: Callable[[int], BillingCycle] = lambda i: BillingCycle.MONTHLY,
    billed_at: datetime = BILLED_AT,
    periods: Sequence[Period] = (),
) -> World:
    """``customers`` mapped customers (customer i -> ``psa[connection][i]``) plus ``unmapped_customers``, billed.

    Every customer's plan starts on 1 March 2026 with the billing ``cycle(i)``. One billing run as of
    ``billed_at`` bills what is due then, or one run per month in ``periods``. ``issue=False`` leaves the
    bills as drafts (no deliveries until :func:`finalize_bill`).
    """
    total = customers + unmapped_customers
    with transaction(db) as s:
        partner = Partner(name="MSP One", invoice_prefix="INV", email="owner@msp.example", created_at=T0)
        s.add(partner)
        s.flush()
        principal = system_principal(partner.id, "test:world")
        plan = plans.create_plan(s, principal, name="Managed", price_per_device=str(PRICE), currency="USD", now=T0)
        people = [Customer(partner_id=partner.id, name=f"Customer {i:05d}", timezone="UTC",
                           billing_email=f"c{i}@example.com", created_at=T0) for i in range(total)]
        s.add_all(people)
        s.flush()
        spaces = [Workspace(customer_id=c.id, name="Main", created_at=T0) for c in people]
        s.add_all(spaces)
        s.flush()
        machines = [
            Device(connection="rmm", external_id=f"d{i}-{n}", org_external_id=f"org{i}", workspace_id=w.id,
                   hostname=f"host-{i}-{n}", first_seen_at=T0, updated_at=T0)
            for i, w in enumerate(spaces)
            for n in range(devices(i))
        ]
        s.add_all(machines)
        s.flush()
        # Active on one day of each month from March to May, so monthly cycles after March have bills too.
        s.execute(insert(DeviceActivity), [{"device_id": d.id, "day": date(2026, month, 1 + d.id % 28)}
                                           for d in machines for month in (3, 4, 5)])
        for connection, company_ids in psa.items():
            if len(company_ids) < customers:
                raise ValueError(f"{connection}: {customers} customers need as many companies, got {len(company_ids)}")
            s.execute(insert(ExternalMapping), [
                {"connection": connection, "kind": MappingKind.PSA_COMPANY, "external_id": str(company),
                 "external_name": f"PSA company {company}", "customer_id": c.id, "auto_created": False,
                 "first_seen_at": T0, "last_seen_at": T0}
                for c, company in zip(people[:customers], company_ids, strict=False)  # extra companies stay unmapped
            ])
        # The rows associations.associate writes, in one flush (it checks and flushes customer by customer: slow for 2,000).
        s.add_all(PlanAssociation(plan_id=plan.id, customer_id=c.id, cycle=cycle(i), starts_on=MARCH[0], due_days=30,
                                  email="ap@example.com", created_at=T0) for i, c in enumerate(people))
        partner_id, customer_ids = partner.id, [c.id for c in people]
    bill_ids = []
    for period in periods or [None]:
        with transaction(db) as s:
            bill_ids += billing_run.run_billing(s, now=billed_at, billing=BillingSettings(), issue=issue, period=period).bill_ids
    if not periods:
        assert len(bill_ids) == total, f"the billing run made {len(bill_ids)} bills, expected {total}"
    return World(partner_id, customer_ids, bill_ids)


def expected_bills(db: sessionmaker[Session], connection: str) -> dict[str, tuple[int, Decimal]]:
    """Delivery key -> (device count, total) of every bill that has a delivery to ``connection``."""
    with db() as s:
        rows = s.execute(
            select(Delivery.key, Bill.device_count, Bill.total)
            .join(Bill, Bill.id == Delivery.bill_id)
            .where(Delivery.connection == connection)
        )
        return {key: (count, total.quantize(Decimal("0.01"))) for key, count, total in rows}


class Recorder:
    """A plugin that remembers what the gateway told it (``gateway_notify``, ``gateway_bill_delivered``)."""

    def __init__(self) -> None:
        self.notes: list[tuple[str, dict[str, Any]]] = []
        self.delivered: list[tuple[str, str, Any]] = []

    @hookimpl
    def gateway_notify(self, event: str, payload: Mapping[str, Any]) -> None:
        self.notes.append((event, dict(payload)))

    @hookimpl
    def gateway_bill_delivered(self, connection: str, bill_key: str, result: Any) -> None:
        self.delivered.append((connection, bill_key, result))


# --- settings ----------------------------------------------------------------------------------


def halo_connection(name: str, base_url: str, *, requests: int = 100_000, per_seconds: float = 1.0,
                    max_concurrent: int = 8, **options: Any) -> dict[str, Any]:
    return {"name": name, "plugin": "halopsa", "base_url": base_url, "credentials": dict(HALO_CREDENTIALS),
            "rate_limit": {"requests": requests, "per_seconds": per_seconds, "max_concurrent": max_concurrent},
            "options": options}


def connectwise_connection(name: str, base_url: str, *, requests: int = 100_000, per_seconds: float = 1.0,
                          max_concurrent: int = 8, **options: Any) -> dict[str, Any]:
    return {"name": name, "plugin": "connectwise", "base_url": base_url, "credentials": dict(CONNECTWISE_CREDENTIALS),
            "rate_limit": {"requests": requests, "per_seconds": per_seconds, "max_concurrent": max_concurrent},
            "options": options}


def autotask_connection(name: str, base_url: str, *, requests: int = 100_000, per_seconds: float = 1.0,
                        max_concurrent: int = 3, **options: Any) -> dict[str, Any]:
    options = {"billing_code_id": 2001, **options}
    return {"name": name, "plugin": "autotask", "base_url": base_url, "credentials": dict(AUTOTASK_CREDENTIALS),
            "rate_limit": {"requests": requests, "per_seconds": per_seconds, "max_concurrent": max_concurrent},
            "options": options}


@contextmanager
def logging_restored() -> Iterator[None]:
    """Put back the logging set-up after the CLI configured it for a stream that a test then closes."""
    root = logging.getLogger()
    handlers, level, config = root.handlers[:], root.level, structlog.get_config()
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.configure(**config)


# --- a simulator in a thread -----------------------------------------------------------------------

R = TypeVar("R")


class ServedApp:
    """Serve an aiohttp app on 127.0.0.1 (a free port) from a thread with its own event loop."""

    def __init__(self, app: web.Application):
        self.app = app
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="simulator", daemon=True)
        self._runner: web.AppRunner | None = None

    def __enter__(self) -> ServedApp:
        self._thread.start()

        async def start() -> int:
            self._runner = web.AppRunner(self.app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            port: int = self._runner.addresses[0][1]  # the port the system chose for port 0
            return port

        self.url = f"http://127.0.0.1:{self._submit(start())}"
        return self

    def _submit(self, coroutine: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def call(self, fn: Callable[[web.Application], R]) -> R:
        """Run ``fn(app)`` on the simulator's loop (read or change its state without racing a request)."""

        async def run() -> R:
            return fn(self.app)

        return self._submit(run())

    def __exit__(self, *exc: object) -> None:
        if self._runner is not None:
            self._submit(self._runner.cleanup())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


# --- the outbox and reconciliation, wired from a test's gateway ---------------------------------


async def outbox_round(gateway: Gateway, worker_id: str, **options: Any) -> outbox.RoundResult:
    """One ``deliver_round`` of ``worker_id`` with the gateway's parts (``options``: limit, adapters, build)."""
    return await outbox.deliver_round(gateway.db, gateway.clock, gateway.settings.outbox, gateway.build_psa,
                                      gateway.notify, worker_id, delivered=gateway.bill_delivered, **options)


async def outbox_until_idle(gateway: Gateway, worker_id: str, **options: Any) -> outbox.RoundResult:
    """``deliver_until_idle`` of ``worker_id`` over the gateway's PSA connections (``options``: stop)."""
    return await outbox.deliver_until_idle(gateway.db, gateway.clock, gateway.settings.outbox, gateway.build_psa,
                                           gateway.notify, worker_id, delivered=gateway.bill_delivered,
                                           connections=[c.name for c in gateway.connections("psa")], **options)


async def reconcile_gateway(gateway: Gateway, period_start: date, period_end: date,
                            **options: Any) -> ReconciliationReport:
    """``reconcile`` over the gateway's PSA connections (``options``: adapters)."""
    return await reconcile(gateway.db, gateway.connections("psa"), gateway.build_psa, gateway.notify,
                           period_start, period_end, **options)

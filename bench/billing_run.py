"""Benchmark: one month's billing run for 10,000 customers and 200,000 devices, against its floor.

The store is a migrated database of the bench's own: a temporary SQLite file
(``--backend sqlite``, the default), or with ``--backend postgresql`` a scratch
database created on the server of ``--database-url`` (or
``GATEWAY_TEST_POSTGRES_URL``) and dropped at the end. It holds partners with
monthly billing enabled, customers in several time zones, one workspace each on
the monthly plan, devices, and one month (March 2026) of activity in which most
devices check in on most days. Every customer is mapped to a PSA company, so
each bill also gets its outbox delivery.

- gateway: ``run_billing`` for the whole store as of 2 April 2026 (every zone's
  March is over), committed: which devices count (M5), one bill per customer
  with its lines, numbers from each partner's sequence, the M7 device rows
  (each a snapshot of its device), the G2 deliveries, the M6 report queue.
- floor, in the same run: one SQL aggregate of active devices per workspace
  for the month, plus one executemany of the bill rows into ``bills`` (its
  indexes and foreign keys included), rolled back.

Both are measured in each of ``--rounds`` rounds (floor first, so the gateway
never has the warmer cache). Before each round, outside the clock, a previous
run's bills and everything they brought are removed and the store is compacted
(SQLite: VACUUM; PostgreSQL: TRUNCATE, identities restarted), so every round,
the first included, starts from the same state and no round writes into space
an earlier one freed.
The best round of each counts: on a shared machine a single timing of either
varies by a third from process to process, and the minimum is the figure least
disturbed by the neighbours. Every round's figures are printed too.

Peak RSS is the process's maximum resident set, generation of the data included.
The last line is the machine-readable result.

    python bench/billing_run.py [--customers 10000] [--devices 200000] [--rounds 5]
    python bench/billing_run.py --backend postgresql --database-url postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import resource
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import structlog
from sqlalchemy import Engine, Table, create_engine, delete, func, insert, select, text, update
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# The imports below follow this line, hence their noqa: E402: the benchmark runs from a checkout, installed or not.

from gateway.core import db as gdb  # noqa: E402
from gateway.core.billing.run import run_billing  # noqa: E402
from gateway.core.models import (  # noqa: E402
    Adjustment,
    Bill,
    BillDevice,
    BillKind,
    BillLine,
    BillStatus,
    Customer,
    Delivery,
    Device,
    DeviceActivity,
    ExternalMapping,
    JobRun,
    MappingKind,
    MonthlySubscription,
    Partner,
    Workspace,
)
from gateway.core.settings import BillingSettings  # noqa: E402
from gateway.plugins import get_plugin_manager  # noqa: E402
from gateway.sync.jobs import bill_built_lines  # noqa: E402

TARGET = 2
ZONES = ["UTC", "Europe/Berlin", "America/New_York", "America/Los_Angeles", "Pacific/Auckland", "Asia/Kolkata",
         "Pacific/Kiritimati", "Pacific/Pago_Pago"]
MONTH_START, MONTH_END = date(2026, 3, 1), date(2026, 3, 31)
AS_OF = datetime(2026, 4, 2, 0, 0, tzinfo=UTC)
T0 = datetime(2026, 1, 1, tzinfo=UTC)
CHUNK = 50_000


def _insert(engine: Engine, table: Any, rows: list[dict[str, Any]]) -> None:
    with engine.begin() as connection:
        for start in range(0, len(rows), CHUNK):
            connection.execute(insert(table), rows[start : start + CHUNK])


def populate(engine: Engine, customers: int, devices: int, partners: int, seed: int) -> int:
    """Write the store; returns the number of activity rows."""
    rng = random.Random(seed)
    _insert(engine, Partner.__table__, [
        {"id": p, "name": f"Partner {p}", "email": f"owner@p{p}.example", "currency": "USD",
         "discount_percent": Decimal(0), "invoice_prefix": f"P{p:03d}", "next_bill_number": 1, "pool_mode": "global",
         "automatic_exchange": True, "created_at": T0}
        for p in range(1, partners + 1)
    ])
    _insert(engine, MonthlySubscription.__table__, [
        {"partner_id": p, "enabled_at": datetime(2026, 1, 10, tzinfo=UTC), "timezone": "UTC",
         "price_per_device": Decimal("2.50"), "currency": "USD"}
        for p in range(1, partners + 1)
    ])
    _insert(engine, Customer.__table__, [
        {"id": c, "partner_id": 1 + (c - 1) % partners, "name": f"Customer {c}", "timezone": ZONES[c % len(ZONES)],
         "billing_email": f"ap@c{c}.example", "created_at": T0}
        for c in range(1, customers + 1)
    ])
    _insert(engine, Workspace.__table__, [
        {"id": c, "customer_id": c, "name": "Main", "max_devices": 1000, "monthly_billing_since": date(2026, 1, 15),
         "created_at": T0}
        for c in range(1, customers + 1)
    ])
    _insert(engine, ExternalMapping.__table__, [
        {"connection": "bench-psa", "kind": MappingKind.PSA_COMPANY, "external_id": str(c), "customer_id": c,
         "external_name": f"Customer {c}", "auto_created": False, "first_seen_at": T0, "last_seen_at": T0}
        for c in range(1, customers + 1)
    ])
    _insert(engine, Device.__table__, [
        {"id": d, "connection": "bench-rmm", "external_id": str(d), "org_external_id": str(1 + (d - 1) % customers),
         "workspace_id": 1 + (d - 1) % customers, "hostname": f"pc-{d}", "device_class": "WINDOWS_WORKSTATION",
         "online": True, "deleted": False, "first_seen_at": T0, "updated_at": T0}
        for d in range(1, devices + 1)
    ])
    days = [MONTH_START + timedelta(days=i) for i in range((MONTH_END - MONTH_START).days + 1)]
    total = 0
    batch: list[dict[str, Any]] = []
    for d in range(1, devices + 1):
        if rng.random() < 0.08:  # idle all month: not billed (M5)
            continue
        share = rng.choice((0.15, 0.6, 0.9, 1.0))
        for day in days:
            if rng.random() < share:
                batch.append({"device_id": d, "day": day, "workspace_id": 1 + (d - 1) % customers})
        if len(batch) >= CHUNK:
            _insert(engine, DeviceActivity.__table__, batch)
            total += len(batch)
            batch = []
    _insert(engine, DeviceActivity.__table__, batch)
    total += len(batch)
    # Fresh statistics, as a running store has them (and on PostgreSQL, as autovacuum leaves it).
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("ANALYZE" if engine.dialect.name == "sqlite" else "VACUUM ANALYZE"))
    return total


def run_floor(engine: Engine) -> tuple[float, int]:
    """One aggregate of active devices per workspace, one executemany of the bill rows into ``bills``
    (with its indexes and foreign keys, as the gateway's bills get them); rolled back afterwards."""
    started = time.perf_counter()
    with engine.connect() as connection:
        transaction = connection.begin()
        counts = connection.execute(
            select(Workspace.id, Workspace.customer_id, Customer.partner_id,
                   func.count(func.distinct(DeviceActivity.device_id)))
            .select_from(DeviceActivity)
            .join(Device, Device.id == DeviceActivity.device_id)
            .join(Workspace, Workspace.id == Device.workspace_id)
            .join(Customer, Customer.id == Workspace.customer_id)
            .where(DeviceActivity.day >= MONTH_START, DeviceActivity.day <= MONTH_END)
            .group_by(Workspace.id, Workspace.customer_id, Customer.partner_id)
        ).all()
        rows = [
            {"partner_id": partner_id, "customer_id": customer_id, "kind": BillKind.MONTHLY, "source_id": workspace_id,
             "number": f"F-{workspace_id:08d}", "period_start": MONTH_START, "period_end": MONTH_END,
             "currency": "USD", "device_count": n, "total": Decimal("2.50") * n, "status": BillStatus.ISSUED,
             "issued_on": AS_OF.date(), "due_on": AS_OF.date() + timedelta(days=30), "created_at": AS_OF,
             "email_attempts": 0}
            for workspace_id, customer_id, partner_id, n in counts
        ]
        connection.execute(insert(cast(Table, Bill.__table__)), rows)  # __table__ is typed as any FromClause
        elapsed = time.perf_counter() - started
        transaction.rollback()
    return elapsed, len(rows)


def run_gateway(engine: Engine) -> tuple[float, int]:
    factory = gdb.session_factory(engine)
    # Built before the clock starts, as in the daemon: the gateway_bill_built hook as the run's extra lines.
    extra_lines = bill_built_lines(get_plugin_manager(load_entry_points=False))
    started = time.perf_counter()
    with gdb.transaction(factory) as session:
        run = run_billing(session, now=AS_OF, billing=BillingSettings(), extra_lines=extra_lines)
    return time.perf_counter() - started, len(run.bill_ids)


#: What a billing run writes (besides the partners' bill sequences), children first.
RUN_TABLES = (BillDevice, BillLine, Delivery, Adjustment, JobRun, Bill)


def reset(engine: Engine) -> None:
    """Remove a gateway run (its bills, their lines, device rows and deliveries, the report queue,
    the bill sequences) and compact the store, so the next round writes into fresh space as the
    first one does."""
    names = ", ".join(model.__tablename__ for model in RUN_TABLES)
    with engine.begin() as connection:
        if engine.dialect.name == "sqlite":
            for model in RUN_TABLES:
                connection.execute(delete(model))
        else:
            connection.execute(text(f"TRUNCATE {names} RESTART IDENTITY"))
        connection.execute(update(Partner).values(next_bill_number=1))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        if engine.dialect.name == "sqlite":
            connection.execute(text("VACUUM"))
            connection.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
        else:
            connection.execute(text(f"VACUUM ANALYZE {names}, partners"))


def count(engine: Engine, model: Any) -> int:
    with engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(model)).scalar_one()


@contextmanager
def scratch_database(backend: str, server_url: str | None) -> Iterator[str]:
    """The URL of an empty database of the bench's own: a temporary SQLite file, or a PostgreSQL
    database created on ``server_url``'s server and dropped afterwards (nobody else's rows are touched)."""
    if backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix="billing_run_") as tmp:
            yield f"sqlite:///{Path(tmp) / 'billing.db'}"
        return
    if not server_url:
        raise SystemExit("--backend postgresql needs --database-url postgresql://USER@HOST:PORT/DB (or "
                         "GATEWAY_TEST_POSTGRES_URL); the bench creates and drops a scratch database on that server")
    server = make_url(server_url).set(drivername="postgresql+psycopg")
    name = f"billing_run_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def main(args: argparse.Namespace) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    backend = args.backend or ("postgresql" if args.database_url else "sqlite")
    server_url = args.database_url or os.environ.get("GATEWAY_TEST_POSTGRES_URL")
    with scratch_database(backend, server_url) as url:
        engine = gdb.make_engine(url)
        gdb.upgrade(engine)
        started = time.perf_counter()
        activity = populate(engine, args.customers, args.devices, args.partners, args.seed)
        setup_s = time.perf_counter() - started
        print(f"customers={args.customers} devices={args.devices} partners={args.partners} activity_rows={activity} "
              f"setup_s={setup_s:.1f}")
        floors, gateways = [], []
        for round_ in range(1, args.rounds + 1):
            reset(engine)
            floor_s, floor_bills = run_floor(engine)
            gateway_s, bills = run_gateway(engine)
            billed_devices, deliveries = count(engine, BillDevice), count(engine, Delivery)
            if bills != floor_bills:
                raise SystemExit(f"gateway built {bills} bills but the floor counted {floor_bills} workspaces with "
                                 "activity")
            print(f"round {round_}: gateway {gateway_s:.2f} s for {bills} bills, {billed_devices} billed devices, "
                  f"{deliveries} deliveries; floor {floor_s:.2f} s; ratio {gateway_s / floor_s:.2f}")
            floors.append(floor_s)
            gateways.append(gateway_s)
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        engine.dispose()
    gateway_s, floor_s = min(gateways), min(floors)
    ratio = gateway_s / floor_s
    print(f"billing_run: ratio={ratio:.2f} target={TARGET} backend={backend} gateway_s={gateway_s:.2f} "
          f"floor_s={floor_s:.2f} rounds={args.rounds} peak_rss_mb={rss_mb:.0f}")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--devices", type=int, default=200_000)
    parser.add_argument("--partners", type=int, default=10)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rounds", type=_positive, default=5, help="floor and gateway timings per run; the best "
                        "counts")
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default=None,
                        help="sqlite (a temporary file; the default) or postgresql (a scratch database on the server "
                        "of --database-url)")
    parser.add_argument("--database-url", help="the PostgreSQL server to create the scratch database on, as "
                        "postgresql://USER@HOST:PORT/DB (default: GATEWAY_TEST_POSTGRES_URL); implies --backend "
                        "postgresql")
    return parser.parse_args()


if __name__ == "__main__":
    main(parse_args())

"""How a billing run reads its devices and writes its bills: in bulk, inside the database where it can.

A run handles one row per billed device, and each such row through the ORM
would cost more than the billing itself (``bench/billing_run.py``). So the
active devices of each period (M5) go into a temporary table
(:data:`RUN_DEVICES`) with their snapshots, the drafts read back only their
counts, and each bill's device rows are copied from that table inside the
database; bills, lines and deliveries go to the driver in bulk
(:func:`gateway.core.store.bulk_insert`: COPY on PostgreSQL).

Decision: a bill's device rows (M7) are a snapshot of each device as billed,
with no foreign key to it: usage reports never depend on the device row, and
deleting a device keeps the reports it appeared in. Nor to their bill: they are
written once, with it, and checked against it (``BillDevice`` says why).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import date, datetime
from typing import Any, cast

import structlog
from sqlalchemy import (
    ARRAY,
    Column,
    Date,
    Integer,
    MetaData,
    String,
    Table,
    and_,
    any_,
    bindparam,
    case,
    func,
    insert,
    literal,
    literal_column,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from gateway.core import store
from gateway.core.billing.deliveries import write_deliveries
from gateway.core.billing.drafts import BillDraft
from gateway.core.billing.numbering import allocate_numbers, lock_partners
from gateway.core.billing.rules import Period
from gateway.core.models import (
    Adjustment,
    Bill,
    BillDevice,
    BillKind,
    BillLine,
    BillStatus,
    Device,
    DeviceActivity,
    Workspace,
)
from gateway.core.settings import BillingSettings

log = structlog.get_logger(__name__)


def existing_keys(session: Session, keys: Sequence[tuple[int, BillKind, int, date]]) -> set[tuple[Any, ...]]:
    """Which of these bill identities (customer, kind, source, cycle start) already have a bill."""
    if not keys:
        return set()
    stmt = select(Bill.customer_id, Bill.kind, Bill.source_id, Bill.period_start).where(
        Bill.period_start >= min(k[3] for k in keys), Bill.period_start <= max(k[3] for k in keys),
        Bill.kind.in_({k[1] for k in keys}),
    )
    wanted = set(keys)
    return {tuple(row) for row in session.execute(stmt)} & wanted


#: A run's active devices per period (M5) with their snapshots (M7), in a temporary table: the bills'
#: device rows are copied from it inside the database. The drafts need the devices read out; writing
#: them back from Python, one row per device, would cost a run more than the rest of its billing.
RUN_DEVICES = Table(
    "gateway_run_devices", MetaData(),
    Column("period_start", Date), Column("period_end", Date), Column("kind", String(32)),
    Column("customer_id", Integer), Column("device_id", Integer), Column("days_active", Integer),
    Column("connection", String(100)), Column("external_id", String(100)), Column("hostname", String(255)),
    Column("workspace", String(200)), Column("workspace_id", Integer),
    prefixes=["TEMPORARY"], postgresql_on_commit="DROP",
)


def activity(
    session: Session, period: Period, customer_ids: set[int], *, monthly: bool
) -> dict[int, dict[int, int]]:
    """Active days per device per customer in ``period`` (M5); monthly: only days the workspace was on the plan.

    A day counts for the workspace the device was in on that day (``DeviceActivity.workspace_id``, M5/G1):
    a device moved to another customer's workspace mid-cycle is on both bills, each with its own days.
    The devices are also kept, with their snapshots, in ``RUN_DEVICES`` for :func:`_store_device_rows`.
    """
    day: Any = DeviceActivity.day
    if session.get_bind().dialect.name == "sqlite":
        # SQLite's planner would take the activity-by-day index for the day bounds, look every row
        # up in the table and sort for the GROUP BY (4-5x slower for 3,000 customers here). A unary
        # "+" disqualifies the bounds from index use (SQLite's documented way, "query planner",
        # section "Disqualifying WHERE clause terms"), so it walks the covering index of activity by
        # workspace, device and day instead.
        day = literal_column("+device_activity.day", Date)
    in_period = and_(day >= period.start, day <= period.end)
    kind = (BillKind.MONTHLY if monthly else BillKind.PLAN).value
    tag = (literal(period.start, Date), literal(period.end, Date), literal(kind, String))
    with_snapshot = _snapshot_while_counting(session)
    snapshot = _SNAPSHOT if with_snapshot else (null(),) * len(_SNAPSHOT)
    # Workspace -> activity, grouped by workspace and device: SQLite then walks the covering index
    # of activity by workspace, device and day with no sort step. The snapshot columns depend on
    # the grouped primary keys.
    probe = (
        select(*tag, Workspace.customer_id, DeviceActivity.device_id, func.count(), *snapshot, Workspace.id)
        .select_from(Workspace)
        .join(DeviceActivity, DeviceActivity.workspace_id == Workspace.id)
        .where(in_period)
    )
    if with_snapshot:
        probe = (
            probe.with_only_columns(*tag, Workspace.customer_id, Device.id, func.count(), *snapshot, Workspace.id)
            .join(Device, Device.id == DeviceActivity.device_id)
            .group_by(Workspace.id, Device.id)
        )
    else:
        probe = probe.group_by(Workspace.id, DeviceActivity.device_id)  # customer_id depends on workspaces.id
    stmt = probe
    if len(customer_ids) <= store.IN_LIMIT:
        stmt = probe = probe.where(Workspace.customer_id.in_(customer_ids))
    elif session.get_bind().dialect.name == "postgresql":
        # Many customers: PostgreSQL counts the period's activity per device first and joins the
        # devices to those counts (one pass over the activity index, no per-device search, about
        # 40% faster here); its planner still picks how, from its statistics of the history.
        days = (
            select(DeviceActivity.device_id, DeviceActivity.workspace_id, func.count().label("days"))
            .where(in_period)
            .group_by(DeviceActivity.device_id, DeviceActivity.workspace_id)
            .subquery()
        )
        stmt = (
            select(*tag, Workspace.customer_id, Device.id, days.c.days, *snapshot, Workspace.id)
            .select_from(days)
            .join(Device, Device.id == days.c.device_id)
            .join(Workspace, Workspace.id == days.c.workspace_id)
        )
    statements = [stmt]
    if monthly:
        # Only days the workspace was on the plan count (rules.workspace_billing_window, in SQL).
        # Workspaces on it all period long need no per-day bound; the others get their window as
        # bounds on the day, so the activity index is searched for exactly those days.
        since, until = Workspace.monthly_billing_since, Workspace.monthly_billing_until
        whole = and_(since <= period.start, or_(until.is_(None), until >= period.end))
        statements = [
            stmt.where(whole),
            probe.where(
                since.is_not(None),
                or_(since > period.start, until < period.end),
                day >= case((since > period.start, since), else_=period.start),
                day <= case((until < period.end, until), else_=period.end),
            ),
        ]
    connection = session.connection()
    run_devices = RUN_DEVICES.c
    for statement in statements:  # the groups of workspaces are disjoint: one row per device
        connection.execute(insert(RUN_DEVICES).from_select(list(run_devices.keys()), statement))
    result: dict[int, dict[int, int]] = defaultdict(dict)
    moved: set[tuple[int, int]] = set()
    for customer_id, device_id, count in store.plain_rows(session, select(
        run_devices.customer_id, run_devices.device_id, run_devices.days_active
    ).where(*_same_period(run_devices, period.start, period.end, kind))):
        if customer_id in customer_ids:
            if device_id in result[customer_id]:
                moved.add((customer_id, device_id))
                count += result[customer_id][device_id]
            result[customer_id][device_id] = count
    if moved:
        _merge_moved(session, period, kind, moved, result)
    return result


def _merge_moved(
    session: Session, period: Period, kind: str, moved: set[tuple[int, int]], days: dict[int, dict[int, int]]
) -> None:
    """A device that moved between two workspaces of one customer in the cycle is one device on its bill,
    with the days of both; the row kept is that of the workspace with more of its days (then the later one)."""
    found = RUN_DEVICES.c
    connection = session.connection()
    same = _same_period(found, period.start, period.end, kind)
    for customer_id, device_id in sorted(moved):
        mine = and_(*same, found.customer_id == customer_id, found.device_id == device_id)
        rows = connection.execute(select(RUN_DEVICES).where(mine)).mappings().all()
        keep = dict(max(rows, key=lambda row: (row["days_active"], row["workspace_id"] or 0)))
        keep["days_active"] = days[customer_id][device_id]
        connection.execute(RUN_DEVICES.delete().where(mine))
        connection.execute(insert(RUN_DEVICES), [keep])


#: What a bill's device row keeps of its device (M7).
_SNAPSHOT = (Device.connection, Device.external_id, Device.hostname, Workspace.name)


def _snapshot_while_counting(session: Session) -> bool:
    """PostgreSQL reads the snapshots while it counts the activity: its plans join the device rows
    anyway. SQLite counts from indexes alone and reads them when it copies the device rows, which
    costs it about 0.1 s less per 180,000 devices (bench/billing_run.py)."""
    return session.get_bind().dialect.name == "postgresql"


def _same_period(columns: Any, start: Any, end: Any, kind: Any) -> tuple[Any, ...]:
    """``RUN_DEVICES`` rows of one period and kind of bill (values or another table's columns)."""
    return (columns.period_start == start, columns.period_end == end, columns.kind == kind)


_BILL_COLUMNS = ("partner_id", "customer_id", "kind", "source_id", "number", "period_start", "period_end", "currency",
                 "device_count", "total", "status", "issued_on", "due_on", "email", "created_at", "finalized_at",
                 "email_attempts")


def store_drafts(
    session: Session, drafts: list[BillDraft], *, now: datetime, issue: bool, billing: BillingSettings
) -> list[int]:
    """Insert bills, lines, device rows and (when issuing) deliveries in bulk; returns the bill ids.

    Drafts that another run billed while this one waited for the partner locks are
    dropped (and removed from ``drafts``), so concurrent runs never fail or double-bill.
    """
    partners = lock_partners(session, {d.partner_id for d in drafts})
    existing = existing_keys(session, [d.key for d in drafts])
    if existing:
        log.info("billing.billed_meanwhile", bills=len(existing))
        drafts[:] = [d for d in drafts if d.key not in existing]
        if not drafts:
            return []
    allocate_numbers(session, drafts, partners, billing)
    status = (BillStatus.ISSUED if issue else BillStatus.DRAFT).value
    finalized = now if issue else None
    before = session.scalar(select(func.max(Bill.id))) or 0
    store.bulk_insert(session, Bill.__table__, _BILL_COLUMNS, [
        (d.partner_id, d.customer_id, d.kind.value, d.source_id, d.number, d.period.start, d.period.end, d.currency,
         d.device_count, d.total, status, d.issued_on, d.due_on, d.email, now, finalized, 0)
        for d in drafts
    ])
    # A bulk insert returns no ids: they are read back by (partner, number), which is unique, from the
    # ids above the largest one before the insert (new ids only grow; other partners' new bills may be
    # among them, which the key tells apart).
    by_number = {(partner_id, number): bill_id for bill_id, partner_id, number in store.plain_rows(
        session, select(Bill.id, Bill.partner_id, Bill.number).where(Bill.id > before))}
    ids = [by_number[(d.partner_id, d.number)] for d in drafts]
    line_rows = []
    adjustment_rows: list[dict[str, int]] = []
    for bill_id, draft in zip(ids, drafts, strict=True):
        for position, line in enumerate(draft.lines, start=1):
            line_rows.append((bill_id, position, line.kind[:32], line.description[:500], line.quantity,
                              line.unit_price, line.amount))
        adjustment_rows.extend({"id": adjustment, "applied_to_bill_id": bill_id} for adjustment in draft.adjustment_ids)
    store.bulk_insert(session, BillLine.__table__,
                      ("bill_id", "position", "kind", "description", "quantity", "unit_price", "amount"), line_rows)
    _store_device_rows(session, ids, drafts)
    if adjustment_rows:
        session.execute(update(Adjustment), adjustment_rows)
    if issue:
        write_deliveries(session, [(bill_id, d.customer_id, d.kind, d.source_id, d.period)
                                   for bill_id, d in zip(ids, drafts, strict=True)], now)
    return ids


def _store_device_rows(session: Session, ids: Sequence[int], drafts: Sequence[BillDraft]) -> None:
    """M7: each bill's device rows with their snapshots, copied inside the database from ``RUN_DEVICES``.

    A bill takes its customer's devices of its period and kind; only this run's
    bills (``ids``, in the order of ``drafts``) take any. The copy is checked
    against the drafts: it must be exactly their devices.
    """
    expected = sum(len(d.devices) for d in drafts)
    if not expected:
        return
    found = RUN_DEVICES.c
    rows = (
        select(Bill.id, found.device_id, found.days_active, found.connection, found.external_id, found.hostname,
               found.workspace)
        .select_from(RUN_DEVICES)
        .join(Bill, and_(Bill.customer_id == found.customer_id,
                         *_same_period(found, Bill.period_start, Bill.period_end, Bill.kind)))
        .where(Bill.id.between(min(ids), max(ids)))
    )
    if len(ids) != max(ids) - min(ids) + 1:
        # Another transaction's bills got ids among this run's, which one bulk insert numbered: only
        # PostgreSQL's sequences serve concurrent inserts (SQLite has one writer at a time). One of
        # them may be for a customer, period and kind found here, so the run's ids are matched exactly.
        rows = rows.where(Bill.id == any_(bindparam("run_bill_ids", list(ids), type_=ARRAY(Integer))))
    if not _snapshot_while_counting(session):
        rows = (
            rows.with_only_columns(Bill.id, found.device_id, found.days_active, *_SNAPSHOT)
            .join(Device, Device.id == found.device_id)
            .join(Workspace, Workspace.id == found.workspace_id)  # the workspace of the billed days
        )
    copy = insert(cast(Table, BillDevice.__table__)).from_select(
        ["bill_id", "device_id", "days_active", "connection", "external_id", "hostname", "workspace"], rows
    )
    copied = session.connection().execute(copy.execution_options(preserve_rowcount=True)).rowcount
    if copied != expected:  # the drafts were read from the same rows: this is a bug, never a state of the data
        raise RuntimeError(f"billing run: {copied} device rows copied for {expected} billed devices")

"""Monthly billing reports (M6, M7): the usage rows, the payment history, the month's summary.

A billing run queues one report per partner and month in its own transaction
(:func:`queue_reports`, a ``JobRun`` row named :data:`REPORT_JOB`); the mailer
(:mod:`gateway.sync.mail`) sends it from these queries. The usage report is
read from the bills' device rows (M7), which are snapshots of the devices as
billed: it never depends on the device rows, and deleting a device keeps the
reports it appeared in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.core.access import Principal, require_admin
from gateway.core.billing.rules import Period
from gateway.core.models import Bill, BillDevice, BillKind, BillStatus, Customer, JobRun

#: The JobRun name of a queued billing report (M6): ``billing-report:<partner id>``, period ``YYYY-MM``.
REPORT_JOB = "billing-report"


def queue_reports(session: Session, reports: Sequence[tuple[int, Period]], now: datetime) -> None:
    """M6: queue one billing report per (partner, month) in the run's own transaction; the mailer sends it."""
    for partner_id, month in reports:
        job, period = f"{REPORT_JOB}:{partner_id}", f"{month.start:%Y-%m}"
        if session.get(JobRun, (job, period)) is None:
            session.add(JobRun(job=job, period=period, started_at=now))
    session.flush()


@dataclass(frozen=True)
class UsageRow:
    """M7: one billed device of a month's monthly bills."""

    bill_number: str
    customer: str
    workspace: str
    connection: str
    device_id: str
    hostname: str
    days_active: int
    period_start: date
    period_end: date


def usage_rows(session: Session, principal: Principal, month: Period) -> list[UsageRow]:
    """M7: the device usage report of one month: one row per billed device with its active days, as billed."""
    require_admin(principal, "usage report")
    rows = session.execute(
        select(Bill.number, Customer.name, BillDevice.workspace, BillDevice.connection, BillDevice.external_id,
               BillDevice.hostname, BillDevice.days_active, Bill.period_start, Bill.period_end)
        .join(BillDevice, BillDevice.bill_id == Bill.id)
        .join(Customer, Customer.id == Bill.customer_id)
        .where(Bill.partner_id == principal.partner_id, Bill.kind == BillKind.MONTHLY,
               Bill.period_start == month.start, Bill.status != BillStatus.VOID)
        .order_by(Customer.name, Bill.number, BillDevice.hostname, BillDevice.external_id)
    )
    return [UsageRow(*row) for row in rows]


@dataclass(frozen=True)
class HistoryEntry:
    """M7: one past payment of the partner's monthly billing: the activation or one month's charge."""

    month: str
    kind: str
    bills: int
    devices: int
    total: Decimal
    currency: str
    paid: bool


def billing_history(session: Session, principal: Principal) -> list[HistoryEntry]:
    """M7: every past payment of monthly billing, newest first."""
    require_admin(principal, "billing history")
    rows = session.execute(
        select(Bill.period_start, Bill.kind, Bill.currency, Bill.device_count, Bill.total, Bill.status)
        .where(Bill.partner_id == principal.partner_id, Bill.kind.in_([BillKind.MONTHLY, BillKind.ACTIVATION]),
               Bill.status != BillStatus.VOID)
    )
    groups: dict[tuple[date, BillKind, str], list[Any]] = {}
    for start, kind, currency, devices, total, status in rows:  # money is summed in Python, exactly
        entry = groups.setdefault((start, BillKind(kind), currency), [0, 0, Decimal(0), True])
        entry[0] += 1
        entry[1] += devices
        entry[2] += total
        entry[3] = entry[3] and status == BillStatus.PAID
    return [
        HistoryEntry(f"{start:%Y-%m}", kind.value, count, devices, total, currency, paid)
        for (start, kind, currency), (count, devices, total, paid) in sorted(
            groups.items(), key=lambda item: (item[0][0], item[0][1].value), reverse=True)
    ]


def monthly_summary(session: Session, partner_id: int, month: Period) -> list[Bill]:
    """M6: the month's monthly bills of one partner (the billing report's body)."""
    return list(session.scalars(
        select(Bill).where(Bill.partner_id == partner_id, Bill.kind == BillKind.MONTHLY, Bill.period_start == month.start,
                           Bill.status != BillStatus.VOID).order_by(Bill.number)
    ))

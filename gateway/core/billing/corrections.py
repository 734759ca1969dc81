"""M5: a check-in that reaches the gateway after its cycle was billed becomes a correction on the next bill.

A billing run bills a cycle only once every RMM connection of the customer has
completed a pull that began after the cycle ended (``run.py``). A check-in can
still arrive later: the RMM reported it late, or the pull that should have seen
it was incomplete. Such a check-in is *noted* where it is stored
(:func:`note_late_activity`: a pull that stores a check-in whose day had ended
before the connection's last complete pass began), and the next billing run
turns the notes into corrections (:func:`correct_late_activity`).

Decisions:

- Noted at the ingest, corrected by the run. The pull alone knows that a check-in
  is new and older than what it had already seen; the run alone knows the bills.
  The alternative, each run comparing every billed cycle's device rows with the
  activity, would recount the previous month on every run (every 5 minutes by
  default) for what is a rare event; a note costs nothing unless one arrives.
- The correction is a pending charge (an :class:`Adjustment` with
  ``corrects_bill_id`` and ``device_id``): one device's charge for the bill's
  cycle at the bill's prices (what the bill would have charged for one more
  device), named after the device, the day and the bill. Pending charges go on the
  customer's next bill in that currency (S3, ``run._apply_adjustments``), so a late
  device is never dropped and no issued bill changes. A bill is corrected once
  per device (a unique index): two late days of one device in one cycle are one
  charge, as on the bill.
- A note whose day lies in no bill (its cycle is not billed yet, or the customer
  has no plan) is removed: the bill made later counts the day from the activity.
  That holds because a run locks the partners before it reads the activity and
  the notes (a run that read the activity before the check-in was stored has
  committed its bills before another run reads the note).
- A device that was on the bill for another day of the cycle needs no correction
  (a bill charges per device, not per day). A monthly bill only counts the day if
  the workspace was on monthly billing that day (M2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import cast

import structlog
from sqlalchemy import Connection, Table, bindparam, delete, select
from sqlalchemy.orm import Session

from gateway.core import store
from gateway.core.billing.drafts import PricePoint, device_lines
from gateway.core.billing.plans import SINCE_ALWAYS, plan_prices
from gateway.core.billing.rules import Period, round_money
from gateway.core.models import (
    Adjustment,
    Bill,
    BillDevice,
    BillKind,
    BillStatus,
    Customer,
    Device,
    LateActivity,
    MonthlySubscription,
    PlanAssociation,
    Workspace,
)

log = structlog.get_logger(__name__)


def note_late_activity(
    db: Session | Connection, rows: Sequence[tuple[int, date, int | None]], now: datetime
) -> None:
    """Note check-ins (device id, customer-local day, workspace) that may be missing from a bill of their cycle."""
    if not rows:
        return
    dialect = db.dialect.name if isinstance(db, Connection) else db.get_bind().dialect.name
    db.execute(store.insert_ignore(cast(Table, LateActivity.__table__), dialect), [
        {"device_id": device_id, "day": day, "workspace_id": workspace_id, "noted_at": now}
        for device_id, day, workspace_id in rows
    ])
    log.info("billing.late_activity_noted", check_ins=len(rows))


@dataclass(frozen=True, slots=True)
class _Note:
    device_id: int
    day: date
    workspace_id: int | None
    customer_id: int
    partner_id: int
    on_plan_since: date | None
    on_plan_until: date | None


def late_partners(session: Session, partner_id: int | None = None) -> set[int]:
    """The partners whose customers have noted late check-ins (the run locks them with its own)."""
    stmt = (
        select(Customer.partner_id)
        .select_from(LateActivity)
        .join(Workspace, Workspace.id == LateActivity.workspace_id)
        .join(Customer, Customer.id == Workspace.customer_id)
        .distinct()
    )
    if partner_id is not None:
        stmt = stmt.where(Customer.partner_id == partner_id)
    return set(session.scalars(stmt))


def correct_late_activity(session: Session, *, now: datetime, partner_id: int | None = None) -> list[Adjustment]:
    """Turn the noted late check-ins into corrections of the bills that missed them; removes the notes.

    The caller holds the locks of the notes' partners (``numbering.lock_partners``).
    """
    stmt = (
        select(LateActivity.device_id, LateActivity.day, LateActivity.workspace_id, Workspace.customer_id,
               Customer.partner_id, Workspace.monthly_billing_since, Workspace.monthly_billing_until)
        .join(Workspace, Workspace.id == LateActivity.workspace_id)
        .join(Customer, Customer.id == Workspace.customer_id)
        .order_by(LateActivity.device_id, LateActivity.day)
    )
    if partner_id is not None:
        stmt = stmt.where(Customer.partner_id == partner_id)
    notes = [_Note(*row) for row in session.execute(stmt)]  # typed rows: dates on every database
    orphans = delete(LateActivity).where(LateActivity.workspace_id.not_in(select(Workspace.id)))
    if partner_id is None:
        session.execute(orphans)  # their workspace is gone: nothing can bill them
    if not notes:
        return []
    corrections: list[Adjustment] = []
    done: set[tuple[int, int]] = set()
    for note in notes:
        for bill in session.scalars(
            select(Bill).where(
                Bill.customer_id == note.customer_id, Bill.kind.in_((BillKind.PLAN, BillKind.MONTHLY)),
                Bill.status != BillStatus.VOID, Bill.period_start <= note.day, Bill.period_end >= note.day,
            ).order_by(Bill.id)
        ):
            if (bill.id, note.device_id) in done or not _counts(bill, note):
                continue
            done.add((bill.id, note.device_id))
            if session.get(BillDevice, (bill.id, note.device_id)) is not None:
                continue  # billed for another day of the cycle: a bill charges per device
            if session.scalar(select(Adjustment.id).where(
                Adjustment.corrects_bill_id == bill.id, Adjustment.device_id == note.device_id
            )) is not None:
                continue
            corrections.append(_correction(session, bill, note, now))
    table = cast(Table, LateActivity.__table__)
    notes_table = table.c
    session.connection().execute(
        delete(table).where(notes_table.device_id == bindparam("note_device"),
                                             notes_table.day == bindparam("note_day")),
        [{"note_device": n.device_id, "note_day": n.day} for n in notes],
    )
    session.flush()
    if corrections:
        log.info("billing.late_activity_corrected", corrections=len(corrections))
    return corrections


def _counts(bill: Bill, note: _Note) -> bool:
    """A monthly bill counts a day only while the workspace was on monthly billing (M2)."""
    if bill.kind != BillKind.MONTHLY:
        return True
    if note.on_plan_since is None or note.on_plan_since > note.day:
        return False
    return note.on_plan_until is None or note.on_plan_until >= note.day


def _correction(session: Session, bill: Bill, note: _Note, now: datetime) -> Adjustment:
    period = Period(bill.period_start, bill.period_end)
    amount = _one_device(session, bill, period)
    device = session.get(Device, note.device_id)
    name = device.hostname or device.external_id if device is not None else f"device {note.device_id}"
    adjustment = Adjustment(
        customer_id=bill.customer_id, kind="charge", currency=bill.currency, amount=amount, created_at=now,
        description=(f"Correction of bill {bill.number} ({period.label()}): {name} checked in on "
                     f"{note.day.isoformat()}, reported after the bill")[:500],
        corrects_bill_id=bill.id, device_id=note.device_id,
    )
    session.add(adjustment)
    return adjustment


def _one_device(session: Session, bill: Bill, period: Period) -> Decimal:
    """What ``bill`` charged one device: its device lines' prices per device (each part of the cycle, S7)."""
    units = [line.unit_price for line in bill.lines if line.kind == "devices"]
    if units:
        return sum((round_money(unit, bill.currency) for unit in units), Decimal(0))
    # A bill of charges alone: the cycle's prices.
    if bill.kind == BillKind.MONTHLY:
        sub = session.get_one(MonthlySubscription, bill.source_id)
        prices = [PricePoint(SINCE_ALWAYS, sub.price_per_device)]
    else:
        prices = plan_prices(session, session.get_one(PlanAssociation, bill.source_id).plan_id)
    return sum((line.amount for line in device_lines("", period, 1, prices, bill.currency)), Decimal(0))

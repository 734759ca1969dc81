"""The billing run: every bill that is due, built once: tasks, drafts, adjustments, extra lines, store.

A run finds the cycles that are due (service plan cycles and monthly months),
drops those already billed, counts each one's active devices (M5), builds the
drafts with :mod:`~gateway.core.billing.rules`, puts the pending adjustments on
them, adds the caller's extra lines (``extra_lines``: the plugins' tax and
fees, which the core validates) and stores them in bulk
(:mod:`~gateway.core.billing.run_store`).

Decisions the rules leave open, made here:

- A billing run *issues* the bills it builds (status ``issued`` with their
  outbox deliveries) unless asked for drafts; a draft is issued by
  :func:`~gateway.core.billing.lifecycle.finalize_bill`. A cycle with no
  billable device and no pending charge produces no bill (no zero invoices in
  the PSA); a later run still bills it if late activity arrives before the
  cycle is billed.
- Monthly billing (M) produces one bill per customer per month for the
  customer's workspaces on the plan, so each customer's share can reach the PSA.
- Months and cycles are counted in each customer's time zone (S4), because
  device activity is recorded in customer-local days.
- Pending charges, discounts and credits (S3) go on the customer's first bill
  of the run in their currency (:mod:`~gateway.core.billing.lifecycle`).
- The cycle collector is paused during a run (:func:`_collector_paused` says why);
  more than :data:`gateway.core.store.IN_LIMIT` customers are read whole and
  filtered in Python rather than listed in one ``IN (...)``.
"""

from __future__ import annotations

import gc
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import NamedTuple, cast

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.adapters import BillLineDoc
from gateway.core import store
from gateway.core.billing import rules
from gateway.core.billing.corrections import correct_late_activity, late_partners
from gateway.core.billing.drafts import BillDraft, DraftLine, PricePoint, device_lines, due_date
from gateway.core.billing.numbering import lock_partners
from gateway.core.billing.plans import SINCE_ALWAYS, PriceBook, price_book
from gateway.core.billing.reports import queue_reports
from gateway.core.billing.rules import Period
from gateway.core.billing.run_store import RUN_DEVICES, activity, existing_keys, store_drafts
from gateway.core.directory import apply_due_timezones
from gateway.core.models import (
    Adjustment,
    BillKind,
    ConnectionState,
    Customer,
    ExternalMapping,
    MappingKind,
    MonthlySubscription,
    PlanAssociation,
    ServicePlan,
    Workspace,
)
from gateway.core.settings import BillingSettings

log = structlog.get_logger(__name__)

#: Told that one line was refused, and why: the source of the line reports it (a plugin's failure, G5).
Refuse = Callable[[str], None]
#: A caller's extra lines for a draft (tax, fees): each line with whom to tell if it is refused. A line
#: is a :class:`gateway.BillLineDoc`; anything else, or one whose numbers are not finite Decimals, is refused.
ExtraLines = Callable[[BillDraft], Iterable[tuple[object, Refuse]]]


@dataclass
class BillingRun:
    """What one run built (and saved, unless it was a dry run)."""

    as_of: datetime
    period: Period | None
    dry_run: bool
    drafts: list[BillDraft] = field(default_factory=list)
    bill_ids: list[int] = field(default_factory=list)
    already_billed: int = 0
    #: M5: due cycles left for a later run because a pull of the customer's RMM connections has not settled.
    waiting: list[Waiting] = field(default_factory=list)
    #: M5: late check-ins of cycles billed before they arrived, now pending corrections (on this run's bills).
    corrections: int = 0
    #: (partner id, month) pairs that got monthly bills: each gets a billing report (M6).
    reports: list[tuple[int, Period]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Waiting:
    """M5: a due cycle not billed yet: these connections have not completed a pull begun after ``settles_at``."""

    customer_id: int
    kind: BillKind
    source_id: int
    period: Period
    settles_at: datetime
    connections: tuple[str, ...]

    @property
    def reason(self) -> str:
        return (f"waiting for a complete pull of {', '.join(self.connections)} begun after "
                f"{self.settles_at.isoformat()} (the cycle's end plus [billing] settling_minutes)")

    def as_dict(self) -> dict[str, object]:
        return {"customer_id": self.customer_id, "kind": self.kind.value, "source_id": self.source_id,
                "period": self.period.label(), "settles_at": self.settles_at.isoformat(),
                "connections": list(self.connections), "reason": self.reason}


@dataclass(slots=True)
class _Task:
    partner_id: int
    customer_id: int
    kind: BillKind
    source_id: int
    period: Period
    currency: str
    label: str
    due_days: int
    email: str | None
    prices: list[PricePoint] | None = None


def run_billing(
    session: Session,
    *,
    now: datetime,
    billing: BillingSettings,
    extra_lines: ExtraLines | None = None,
    period: Period | None = None,
    dry_run: bool = False,
    issue: bool = True,
    partner_id: int | None = None,
) -> BillingRun:
    """Build every bill that is due as of ``now`` in each customer's time zone (S4), once.

    ``period`` (a month) bills the cycles whose last day lies in it; without it,
    the cycles that ended since the start of each customer's previous month
    (:func:`gateway.core.billing.rules.due_window`). A cycle whose bill exists is
    skipped, so running twice creates nothing new. A dry run computes the same
    drafts (extra lines included) and stores nothing, numbers included.
    """
    with _collector_paused():
        run = _run(session, now=now, billing=billing, extra_lines=extra_lines, period=period, dry_run=dry_run,
                   issue=issue, partner_id=partner_id)
    if not dry_run and period is None:
        # S4: a time-zone change takes effect once the last cycle in the old zone is billed (directory.py).
        apply_due_timezones(session, now, waiting={w.customer_id for w in run.waiting}, partner_id=partner_id)
    return run


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cycle collector during a run, then let it resume as usual.

    A run allocates a few small objects per billed device, which live until it ends
    and form no cycles; the collector would walk them (and the whole heap) again and
    again for nothing: 10-15% of a 10,000-customer run (bench/billing_run.py). A run
    inside a paused one leaves the resuming to the outer one.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _run(
    session: Session,
    *,
    now: datetime,
    billing: BillingSettings,
    extra_lines: ExtraLines | None,
    period: Period | None,
    dry_run: bool,
    issue: bool,
    partner_id: int | None,
) -> BillingRun:
    run = BillingRun(as_of=now, period=period, dry_run=dry_run)
    customers = _customers(session, partner_id)
    tasks = _monthly_tasks(session, customers, now, period, partner_id) + _plan_tasks(
        session, customers, now, period, partner_id
    )
    tasks, run.already_billed = _drop_existing(session, tasks)
    tasks, run.waiting = _drop_unsettled(session, tasks, customers, billing)
    if not dry_run:
        # The partners are locked before the activity is read (corrections.py says why).
        lock_partners(session, {t.partner_id for t in tasks} | late_partners(session, partner_id))
        run.corrections = len(correct_late_activity(session, now=now, partner_id=partner_id))
    if tasks:
        # One left behind by a failed run whose caller still committed would be in the way.
        RUN_DEVICES.drop(session.connection(), checkfirst=True)
        RUN_DEVICES.create(session.connection())
    drafts = _build_drafts(session, tasks, customers, now, billing)
    _apply_adjustments(session, drafts)
    drafts = [d for d in drafts if d.device_count > 0 or d.adjustment_ids]
    drafts.sort(key=lambda d: (d.partner_id, d.customer_id, d.period.start, d.kind.value, d.source_id))
    apply_extra_lines(drafts, extra_lines)
    run.drafts = drafts
    run.reports = sorted({(d.partner_id, d.period) for d in drafts if d.kind == BillKind.MONTHLY})
    if not dry_run and drafts:
        run.bill_ids = store_drafts(session, drafts, now=now, issue=issue, billing=billing)
        run.reports = sorted({(d.partner_id, d.period) for d in drafts if d.kind == BillKind.MONTHLY})
        queue_reports(session, run.reports, now)
    if tasks:
        RUN_DEVICES.drop(session.connection())
    log.info("billing.run", bills=len(drafts), already_billed=run.already_billed, waiting=len(run.waiting),
             corrections=run.corrections, dry_run=dry_run,
             period=period.label() if period else "due")
    return run


class _CustomerRow(NamedTuple):
    id: int
    partner_id: int
    name: str
    timezone: str
    billing_email: str | None


def _customers(session: Session, partner_id: int | None) -> dict[int, _CustomerRow]:
    stmt = select(Customer.id, Customer.partner_id, Customer.name, Customer.timezone, Customer.billing_email)
    if partner_id is not None:
        stmt = stmt.where(Customer.partner_id == partner_id)
    return {row[0]: _CustomerRow._make(row) for row in store.plain_rows(session, stmt)}


def _window(period: Period | None, today: date) -> Period:
    return period if period is not None else rules.due_window(today)


def _monthly_tasks(
    session: Session, customers: dict[int, _CustomerRow], now: datetime, period: Period | None, partner_id: int | None
) -> list[_Task]:
    stmt = select(MonthlySubscription)
    if partner_id is not None:
        stmt = stmt.where(MonthlySubscription.partner_id == partner_id)
    subs = {sub.partner_id: sub for sub in session.scalars(stmt)}
    if not subs:
        return []
    on_plan = [row[0] for row in store.plain_rows(
        session, select(Workspace.customer_id).where(Workspace.monthly_billing_since.is_not(None)).distinct()
    )]
    tasks = []
    due: dict[tuple[str, int], list[Period]] = {}  # customers in one zone share one answer per subscription
    sub_prices: dict[int, list[PricePoint]] = {}
    for customer_id in on_plan:
        customer = customers.get(customer_id)
        sub = subs.get(customer.partner_id) if customer else None
        if customer is None or sub is None:
            continue
        months = due.get((customer.timezone, sub.id))
        if months is None:
            today = rules.local_day(now, customer.timezone)
            enabled_on = rules.local_day(sub.enabled_at, sub.timezone)
            months = rules.monthly_months_due(enabled_on, _window(period, today), today, ends_on=sub.ends_on)
            due[(customer.timezone, sub.id)] = months
        prices = sub_prices.get(sub.id) or sub_prices.setdefault(sub.id, [PricePoint(SINCE_ALWAYS, sub.price_per_device)])
        for month in months:
            tasks.append(_Task(customer.partner_id, customer.id, BillKind.MONTHLY, sub.id, month, sub.currency,
                               "Monthly billing, active devices", -1, None, prices))
    return tasks


def _plan_tasks(
    session: Session, customers: dict[int, _CustomerRow], now: datetime, period: Period | None, partner_id: int | None
) -> list[_Task]:
    stmt = select(PlanAssociation, ServicePlan.name, ServicePlan.currency, ServicePlan.partner_id).join(
        ServicePlan, ServicePlan.id == PlanAssociation.plan_id
    )
    if partner_id is not None:
        stmt = stmt.where(ServicePlan.partner_id == partner_id)
    tasks = []
    prices: dict[int, PriceBook] = {}
    for association, plan_name, currency, plan_partner in session.execute(stmt):
        customer = customers.get(association.customer_id)
        if customer is None or customer.partner_id != plan_partner:
            continue
        today = rules.local_day(now, customer.timezone)
        for cycle in rules.cycles_ending_within(
            association.starts_on, association.cycle, _window(period, today), ends_on=association.ends_on
        ):
            if not rules.is_over(cycle, today):
                continue
            if association.plan_id not in prices:
                prices[association.plan_id] = price_book(session, association.plan_id)
            tasks.append(_Task(plan_partner, customer.id, BillKind.PLAN, association.id, cycle, currency,
                               f"Service plan {plan_name}", association.due_days, association.email,
                               prices[association.plan_id].for_association(association.id)))
    return tasks


def _drop_existing(session: Session, tasks: list[_Task]) -> tuple[list[_Task], int]:
    existing = existing_keys(session, [(t.customer_id, t.kind, t.source_id, t.period.start) for t in tasks])
    kept = [t for t in tasks if (t.customer_id, t.kind, t.source_id, t.period.start) not in existing]
    return kept, len(tasks) - len(kept)


def _drop_unsettled(
    session: Session, tasks: list[_Task], customers: dict[int, _CustomerRow], billing: BillingSettings
) -> tuple[list[_Task], list[Waiting]]:
    """M5: keep the cycles whose check-ins are all in; the others wait for a later run.

    Seed 000: the payment is processed "after the first full month is completed and
    the number of active devices can be determined". They can be once every RMM
    connection mapped to one of the customer's workspaces has completed a pull
    (from its first page to its last) that began after the cycle ended in the
    customer's time zone plus ``settling_minutes``: a check-in just before local
    midnight is in the RMM by then, and such a pull has stored it. A connection
    never pulled, or whose pulls keep failing, keeps its customers waiting, and the
    run says which (``BillingRun.waiting``); unmapping the organisation releases them.
    """
    if not tasks:
        return tasks, []
    wanted = {t.customer_id for t in tasks}
    stmt = (
        select(Workspace.customer_id, ExternalMapping.connection, ConnectionState.complete_pass_started_at)
        .select_from(ExternalMapping)
        .join(Workspace, Workspace.id == ExternalMapping.workspace_id)
        .outerjoin(ConnectionState, ConnectionState.connection == ExternalMapping.connection)
        .where(ExternalMapping.kind == MappingKind.RMM_ORG)
        .distinct()
    )
    if len(wanted) <= store.IN_LIMIT:
        stmt = stmt.where(Workspace.customer_id.in_(wanted))
    pulls: dict[int, dict[str, datetime | None]] = defaultdict(dict)
    for customer_id, connection, started in session.execute(stmt):  # typed rows: aware datetimes
        if customer_id in wanted:
            pulls[customer_id][connection] = started
    if not pulls:
        return tasks, []
    settling = timedelta(minutes=billing.settling_minutes)
    kept, waiting = [], []
    for task in tasks:
        connections = pulls.get(task.customer_id)
        if connections:
            settles_at = task.period.end_at(customers[task.customer_id].timezone) + settling
            pending = tuple(sorted(c for c, started in connections.items() if started is None or started < settles_at))
            if pending:
                waiting.append(Waiting(task.customer_id, task.kind, task.source_id, task.period, settles_at, pending))
                continue
        kept.append(task)
    if waiting:
        log.info("billing.waiting_for_pulls", cycles=len(waiting))
    return kept, waiting


def _build_drafts(
    session: Session, tasks: list[_Task], customers: dict[int, _CustomerRow], now: datetime, billing: BillingSettings
) -> list[BillDraft]:
    groups: dict[tuple[Period, bool], list[_Task]] = defaultdict(list)
    for task in tasks:
        groups[(task.period, task.kind == BillKind.MONTHLY)].append(task)
    drafts = []
    for (period, monthly), group in groups.items():
        found = activity(session, period, {t.customer_id for t in group}, monthly=monthly)
        # Most bills of a period share a price and one of few device counts: each set of lines is computed once.
        lines: dict[tuple[str, int, tuple[PricePoint, ...], str], list[DraftLine]] = {}
        for task in group:
            customer = customers[task.customer_id]
            devices = rules.billable_devices(found.get(task.customer_id, {}))
            issued_on = rules.local_day(now, customer.timezone)
            due_days = billing.default_due_days if task.due_days < 0 else task.due_days
            draft = BillDraft(
                partner_id=task.partner_id, customer_id=customer.id, customer_name=customer.name,
                timezone=customer.timezone, kind=task.kind, source_id=task.source_id, period=period,
                currency=task.currency, issued_on=issued_on, due_on=due_date(issued_on, due_days),
                email=task.email, device_count=len(devices), devices=devices,
            )
            if devices:
                key = (task.label, len(devices), tuple(task.prices or ()), task.currency)
                if key not in lines:
                    lines[key] = device_lines(task.label, period, len(devices), key[2], task.currency)
                draft.lines.extend(replace(line) for line in lines[key])  # each bill owns its lines
            drafts.append(draft)
    return drafts


def _apply_adjustments(session: Session, drafts: list[BillDraft]) -> None:
    """S3: pending charges, discounts and credits go on the customer's first bill of this run in their currency."""
    if not drafts:
        return
    wanted = {d.customer_id for d in drafts}
    stmt = select(Adjustment).where(Adjustment.applied_to_bill_id.is_(None)).order_by(Adjustment.id)
    if len(wanted) <= store.IN_LIMIT:
        stmt = stmt.where(Adjustment.customer_id.in_(wanted))
    first: dict[tuple[int, str], BillDraft] = {}
    for draft in sorted(drafts, key=lambda d: (d.period.start, d.kind.value, d.source_id)):
        first.setdefault((draft.customer_id, draft.currency), draft)
    for adjustment in session.scalars(stmt):
        target = first.get((adjustment.customer_id, adjustment.currency))
        if target is None:
            continue
        target.add_line(adjustment.kind, adjustment.description, Decimal(1), adjustment.amount, adjustment.amount)
        target.adjustment_ids.append(adjustment.id)


def apply_extra_lines(drafts: Iterable[BillDraft], extra_lines: ExtraLines | None) -> None:
    """The caller's extra lines on each draft (tax, fees); a malformed line is refused and reported to its source (G5)."""
    if extra_lines is None:
        return
    for draft in drafts:
        for line, refuse in extra_lines(draft):
            problem = line_problem(line)
            if problem:
                refuse(problem)
                continue
            doc = cast(BillLineDoc, line)  # line_problem found none
            draft.add_line("plugin", f"{doc.description}"[:500], doc.quantity, doc.unit_price, doc.amount)


def line_problem(line: object) -> str | None:
    """Why an extra line cannot go on a bill, or None: it must be a BillLineDoc of finite Decimals."""
    if not isinstance(line, BillLineDoc):
        return f"returned {type(line).__name__}, not a gateway.BillLineDoc"
    for name in ("quantity", "unit_price", "amount"):
        value = getattr(line, name)
        if not isinstance(value, Decimal) or not value.is_finite():
            return f"line {line.description!r}: {name} must be a finite Decimal, not {type(value).__name__}"
    return None

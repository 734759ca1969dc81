"""Monthly active-device billing (M1-M8): enabling it, workspaces joining, cancelling, reactivating.

The subscription is the partner's; its workspaces are billed by the billing run
(:mod:`~gateway.core.billing.run`), one bill per customer per month.

Decisions:

- The M1 activation payment is the partner's own, billed to the partner's own
  account (a customer named "<partner> (partner account)", like the "owner
  company" that PSA tools keep for the MSP itself), and issued at once.
- The subscription's own time zone dates its enabling (M1/M4) and its
  cancellation (M8); its workspaces' months are each customer's (S4).
- A subscription that ended is enabled anew with a new activation and a new
  first full month, after billing what it still owes
  (:func:`_bill_before_enabling_anew`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal

import structlog
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from gateway.core.access import Principal, get_workspace, require_admin
from gateway.core.billing import rules
from gateway.core.billing.drafts import BillDraft, due_date
from gateway.core.billing.rules import Period
from gateway.core.billing.run import ExtraLines, apply_extra_lines, run_billing
from gateway.core.billing.run_store import existing_keys, store_drafts
from gateway.core.licensing import assignment
from gateway.core.models import (
    Bill,
    BillKind,
    Customer,
    Device,
    Edition,
    License,
    MonthlySubscription,
    Order,
    OrderKind,
    Partner,
    Workspace,
)
from gateway.core.settings import BillingSettings
from gateway.core.text import check_zone
from gateway.errors import Conflict, DomainError, NotFound

log = structlog.get_logger(__name__)


def partner_account(session: Session, partner: Partner, *, tz: str = "UTC") -> Customer:
    """The partner's own account, which the partner's own payments (M1 activation) are billed to."""
    name = f"{partner.name} (partner account)"[:200]
    customer = session.scalar(select(Customer).where(Customer.partner_id == partner.id, Customer.name == name))
    if customer is None:
        customer = Customer(
            partner_id=partner.id, name=name, timezone=tz, billing_email=partner.email, created_at=partner.created_at
        )
        session.add(customer)
        session.flush()
    return customer


def get_subscription(session: Session, principal: Principal) -> MonthlySubscription:
    require_admin(principal, "monthly subscription")
    sub = session.scalar(select(MonthlySubscription).where(MonthlySubscription.partner_id == principal.partner_id))
    if sub is None:
        raise NotFound("monthly billing is not enabled for this partner; enable it first ('gateway billing enable')")
    return sub


def subscription_active(sub: MonthlySubscription, now: datetime) -> bool:
    """Enabled and not past its final billing date."""
    return sub.ends_on is None or rules.local_day(now, sub.timezone) < rules.final_billing_date(sub.ends_on)


def enable_monthly(
    session: Session,
    principal: Principal,
    *,
    settings: BillingSettings,
    now: datetime,
    tz: str = "UTC",
    extra_lines: ExtraLines | None = None,
) -> tuple[MonthlySubscription, Bill]:
    """M1/M2: enable monthly billing with the activation payment; no license or workspace changes.

    The activation bill covers the rest of the current month (not prorated) and
    is issued at once; the first recurring charge follows the first full month (M4).
    """
    require_admin(principal, "monthly subscription")
    check_zone(tz, field="timezone")
    partner = session.get(Partner, principal.partner_id, with_for_update=True)
    if partner is None:
        raise NotFound(f"no partner with id {principal.partner_id}")
    sub = session.scalar(select(MonthlySubscription).where(MonthlySubscription.partner_id == partner.id))
    if sub is not None and subscription_active(sub, now):
        state = f"cancelled, ending {sub.ends_on}; reactivate it instead" if sub.ends_on else "already enabled"
        raise Conflict(f"monthly billing is {state}")
    currency = rules.check_currency(settings.default_currency)
    if sub is None:
        sub = MonthlySubscription(partner_id=partner.id, enabled_at=now, timezone=tz,
                                  price_per_device=settings.monthly_price_per_device, currency=currency)
        session.add(sub)
    else:  # a subscription that ended is enabled anew (a new activation, a new first full month)
        _bill_before_enabling_anew(session, sub, now=now, settings=settings, extra_lines=extra_lines)
        sub.enabled_at, sub.timezone, sub.ends_on, sub.cancelled_at = now, tz, None, None
        sub.price_per_device, sub.currency = settings.monthly_price_per_device, currency
    session.flush()
    enabled_on = rules.local_day(now, tz)
    account = partner_account(session, partner, tz=tz)
    fee = rules.round_money(settings.monthly_activation_fee, currency)
    covers = rules.activation_period(enabled_on)
    draft = BillDraft(
        partner_id=partner.id, customer_id=account.id, customer_name=account.name, timezone=tz,
        kind=BillKind.ACTIVATION, source_id=sub.id, period=covers, currency=currency, issued_on=enabled_on,
        due_on=due_date(enabled_on, settings.default_due_days), email=partner.email,
    )
    draft.add_line("activation", f"Monthly billing activation: all devices {covers.label()} (not prorated)",
                   Decimal(1), fee, fee)
    apply_extra_lines([draft], extra_lines)
    session.add(Order(partner_id=partner.id, kind=OrderKind.MONTHLY, placed_at=now, quantity=1, term_months=1,
                      currency=currency, list_total=fee, total=fee, actor=principal.name))
    ids = store_drafts(session, [draft], now=now, issue=True, billing=settings)
    log.info("billing.monthly_enabled", partner=partner.id, first_charge=rules.first_charge_date(enabled_on).isoformat())
    return sub, session.get_one(Bill, ids[0])


def _bill_before_enabling_anew(
    session: Session,
    sub: MonthlySubscription,
    *,
    now: datetime,
    settings: BillingSettings,
    extra_lines: ExtraLines | None,
) -> None:
    """M8: bill what an ended subscription still owes before it is enabled anew, or refuse.

    Enabling again gives the subscription a new first full month (M4) and its
    workspaces rejoin from then on, which hides the months before its end from
    every later run. So its last month, and the one before as an unattended run
    would catch up, are billed now, in this transaction. A customer whose local
    calendar has not finished the last month cannot be billed for it yet (S4):
    then enabling waits, and says until when.
    """
    assert sub.ends_on is not None  # an active subscription is refused before this
    last_month = rules.month_of(sub.ends_on)
    zones = set(session.scalars(
        select(Customer.timezone).join(Workspace, Workspace.customer_id == Customer.id)
        .where(Customer.partner_id == sub.partner_id, Workspace.monthly_billing_since.is_not(None))
    ))
    waiting = sorted(tz for tz in zones if not rules.is_over(last_month, rules.local_day(now, tz)))
    if waiting:
        over_at = max(rules.local_midnight(sub.ends_on + timedelta(days=1), tz) for tz in waiting)
        raise Conflict(
            f"monthly billing ended on {sub.ends_on}, and its last month is not over yet for customers in "
            f"{', '.join(waiting)}, so it cannot be billed yet; enable it again from {over_at.isoformat()}"
        )
    window = Period(rules.month_of(last_month.start - timedelta(days=1)).start, last_month.end)
    run_billing(session, now=now, billing=settings, extra_lines=extra_lines, period=window, partner_id=sub.partner_id)


@dataclass
class ReleasedLicense:
    """M2: the license a joining workspace gave up; its period keeps running."""

    key: str
    expires_at: datetime | None
    #: Its unused period may serve a different workspace (the key was never exposed to end users).
    recyclable: bool


@dataclass
class JoinedWorkspace:
    """M2: a workspace on monthly billing, and the license joining released (None: it had none)."""

    workspace: Workspace
    released: ReleasedLicense | None = None


def join_monthly(
    session: Session,
    principal: Principal,
    *,
    workspace_id: int,
    max_devices: int,
    now: datetime,
    edition_id: int | None = None,
    key_exposed: bool = False,
) -> JoinedWorkspace:
    """M2: a workspace joins monthly billing with an edition and a maximum device count, from today on.

    Decision (seed 000: joining is done "at 'License' ... change the license"): joining
    replaces the workspace's license, which is released in the same transaction and never
    auto-renewed or exchanged on the workspace's behalf again. Its period keeps running and
    can be recycled with a different workspace unless its key was exposed to end users
    (``key_exposed``, or known to the gateway: see
    :func:`~gateway.core.licensing.assignment.release`). A workspace that left the plan
    joins again only once the month it left in is billed (its single window would hide
    that month's days from the run).
    """
    require_admin(principal, "workspace")
    sub = get_subscription(session, principal)
    if not subscription_active(sub, now) or sub.ends_on is not None:
        raise Conflict("monthly billing is cancelled; reactivate it before adding workspaces")
    workspace = get_workspace(session, principal, workspace_id)
    if max_devices < 1:
        raise DomainError("max_devices must be at least 1", field="max_devices")
    if edition_id is not None and session.get(Edition, edition_id) is None:
        raise NotFound(f"no edition with id {edition_id}", field="edition_id")
    customer = session.get_one(Customer, workspace.customer_id)
    today = rules.local_day(now, customer.timezone)
    if workspace.monthly_billing_since is not None and workspace.monthly_billing_until is None:
        raise Conflict(f"workspace {workspace.name!r} is already on monthly billing since {workspace.monthly_billing_since}")
    if workspace.monthly_billing_until is not None:
        _check_rejoin(session, sub, workspace, customer, today)
    held = session.scalar(select(License).where(License.workspace_id == workspace.id))
    released = None
    if held is not None:
        recyclable = assignment.release(session, held, now, principal.name, exposed=key_exposed,
                                        reason=f"workspace {workspace.id} joined monthly billing (M2)")
        released = ReleasedLicense(held.key, held.expires_at, recyclable)
    workspace.monthly_billing_since = today
    workspace.monthly_billing_until = None
    workspace.max_devices = max_devices
    if edition_id is not None:
        workspace.edition_id = edition_id
    log.info("billing.workspace_joined", workspace=workspace.id, released=held.key if held else None)
    return JoinedWorkspace(workspace, released)


def _check_rejoin(
    session: Session, sub: MonthlySubscription, workspace: Workspace, customer: Customer, today: date
) -> None:
    """M2/M5: refuse joining again while the days of the workspace's last stay are not billed.

    A workspace keeps one stay on the plan (since..until); joining again starts a new
    one, so the month the last stay ended in must have been billed first.
    """
    until = workspace.monthly_billing_until
    assert until is not None
    if until >= today:
        raise Conflict(
            f"workspace {workspace.name!r} is on monthly billing until {until}; "
            f"it can join again from {until + timedelta(days=1)}"
        )
    month = rules.month_of(until)
    if not rules.is_over(month, today):
        raise Conflict(
            f"workspace {workspace.name!r} left monthly billing on {until}; it can join again once "
            f"{month.label()} is billed, from {month.end + timedelta(days=1)} (customer-local)"
        )
    enabled_on = rules.local_day(sub.enabled_at, sub.timezone)
    due = rules.monthly_months_due(enabled_on, month, today, ends_on=sub.ends_on)
    if due and not existing_keys(session, [(customer.id, BillKind.MONTHLY, sub.id, month.start)]):
        raise Conflict(
            f"workspace {workspace.name!r} left monthly billing on {until} and {month.label()} is not billed yet; "
            "run the billing ('gateway bill') and join again"
        )


@dataclass
class LeavingWorkspace:
    """M2/M8: a workspace leaving monthly billing: its last day on the plan and the devices it leaves."""

    workspace_id: int
    workspace: str
    last_day: date
    devices: list[str]
    confirmed: bool = False


def leave_monthly(
    session: Session, principal: Principal, *, workspace_id: int, now: datetime, confirm: bool = False
) -> LeavingWorkspace:
    """M2: one workspace leaves the plan; today (customer-local) is its last day on it, billed as one.

    Like cancelling (M8), this ends the workspace's monthly license: without ``confirm``
    nothing changes and the answer lists the devices left unprotected until a regular
    license is assigned (which alone also takes a workspace off the plan).
    """
    require_admin(principal, "workspace")
    get_subscription(session, principal)
    workspace = get_workspace(session, principal, workspace_id)
    today = rules.local_day(now, session.get_one(Customer, workspace.customer_id).timezone)
    if not assignment.on_monthly_billing(workspace, today):
        raise Conflict(f"workspace {workspace.name!r} is not on monthly billing; there is nothing to leave",
                       field="workspace_id")
    if workspace.monthly_billing_until is not None and workspace.monthly_billing_until <= today:
        raise Conflict(f"workspace {workspace.name!r} is not on monthly billing after today, its last day on it; "
                       "there is nothing to leave", field="workspace_id")
    devices = [
        hostname or external_id
        for hostname, external_id in session.execute(
            select(Device.hostname, Device.external_id)
            .where(Device.workspace_id == workspace.id, Device.deleted.is_(False))
            .order_by(Device.hostname, Device.external_id)
        )
    ]
    leaving = LeavingWorkspace(workspace.id, workspace.name, today, devices)
    if not confirm:
        return leaving
    workspace.monthly_billing_until = today
    leaving.confirmed = True
    log.info("billing.workspace_left", workspace=workspace.id, last_day=today.isoformat(), devices=len(devices))
    return leaving


@dataclass
class AffectedWorkspace:
    workspace_id: int
    workspace: str
    customer: str
    devices: list[str]


@dataclass
class CancellationPlan:
    """M8: what cancelling would do, shown before the partner confirms."""

    offered_end_dates: list[date]
    workspaces: list[AffectedWorkspace]
    ends_on: date | None = None
    confirmed: bool = False

    @property
    def device_count(self) -> int:
        return sum(len(w.devices) for w in self.workspaces)


def _monthly_workspaces(session: Session, partner_id: int, today: date | None = None) -> list[AffectedWorkspace]:
    rows = session.execute(
        select(Workspace.id, Workspace.name, Customer.name)
        .join(Customer, Customer.id == Workspace.customer_id)
        .where(
            Customer.partner_id == partner_id,
            Workspace.monthly_billing_since.is_not(None),
            or_(Workspace.monthly_billing_until.is_(None), Workspace.monthly_billing_until >= (today or date.min)),
        )
        .order_by(Customer.name, Workspace.name)
    ).all()
    devices: dict[int | None, list[str]] = defaultdict(list)
    if rows:
        for workspace_id, hostname, external_id in session.execute(
            select(Device.workspace_id, Device.hostname, Device.external_id)
            .where(Device.workspace_id.in_([r[0] for r in rows]), Device.deleted.is_(False))
            .order_by(Device.hostname)
        ):
            devices[workspace_id].append(hostname or external_id)
    return [AffectedWorkspace(wid, wname, cname, devices[wid]) for wid, wname, cname in rows]


def cancel_monthly(
    session: Session, principal: Principal, *, now: datetime, ends_on: date | None = None, confirm: bool = False
) -> CancellationPlan:
    """M8: cancel monthly billing at one of the offered end dates.

    Without ``confirm`` (or without an end date) nothing changes: the answer
    lists the offered end dates and every workspace and device whose monthly
    license the cancellation ends, for the partner to confirm. Confirmed, the
    workspaces leave monthly billing on the end date.
    """
    sub = get_subscription(session, principal)
    today = rules.local_day(now, sub.timezone)
    if not subscription_active(sub, now):
        raise Conflict(f"monthly billing already ended on {sub.ends_on}")
    offered = rules.offered_end_dates(today)
    plan = CancellationPlan(offered, _monthly_workspaces(session, principal.partner_id, today), ends_on)
    if ends_on is not None and ends_on not in offered:
        raise DomainError(
            f"{ends_on} is not an offered end date; choose one of {', '.join(d.isoformat() for d in offered)}",
            field="ends_on",
        )
    if ends_on is None or not confirm:
        return plan
    sub.ends_on = ends_on
    sub.cancelled_at = now
    for affected in plan.workspaces:
        workspace = session.get_one(Workspace, affected.workspace_id)
        if workspace.monthly_billing_until is None or workspace.monthly_billing_until > ends_on:
            workspace.monthly_billing_until = ends_on  # a workspace that already left keeps its last day
    plan.confirmed = True
    log.info("billing.monthly_cancelled", partner=principal.partner_id, ends_on=ends_on.isoformat(),
             workspaces=len(plan.workspaces), devices=plan.device_count)
    return plan


def reactivate_monthly(session: Session, principal: Principal, *, now: datetime) -> MonthlySubscription:
    """M8: undo a cancellation before the final billing date; the workspaces it ended stay on the plan."""
    sub = get_subscription(session, principal)
    if sub.ends_on is None:
        raise Conflict("monthly billing is not cancelled; there is nothing to reactivate")
    today = rules.local_day(now, sub.timezone)
    if not rules.can_reactivate(sub.ends_on, today):
        raise Conflict(
            f"the final billing date {rules.final_billing_date(sub.ends_on)} has been reached; "
            "enable monthly billing again instead (a new activation)"
        )
    ended_on = sub.ends_on
    session.execute(
        update(Workspace)
        .where(
            Workspace.monthly_billing_until == ended_on,
            Workspace.customer_id.in_(select(Customer.id).where(Customer.partner_id == sub.partner_id)),
        )
        .values(monthly_billing_until=None)
    )
    sub.ends_on = None
    sub.cancelled_at = None
    log.info("billing.monthly_reactivated", partner=sub.partner_id)
    return sub

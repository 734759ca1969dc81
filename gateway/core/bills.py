"""Billing services over the canonical store: plans, associations, monthly billing, runs and bills.

The rules are computed by :mod:`gateway.core.billing`; this module loads what
they need, stores what they return and never commits (the caller owns the
transaction). Callers that act for a person pass a
:class:`~gateway.core.access.Principal`: customer admins see only their
customers' associations and bills and change nothing (S8); whatever they may
not see is answered with :class:`NotFound`.

Decisions the rules leave open, made here:

- A billing run *issues* the bills it builds (status ``issued`` with their
  outbox deliveries) unless asked for drafts; a draft is issued by
  :func:`finalize_bill`. A cycle with no billable device and no pending
  charge produces no bill (no zero invoices in the PSA); a later run still
  bills it if late activity arrives before the cycle is billed.
- Monthly billing (M) produces one bill per customer per month for the
  customer's workspaces on the plan, so each customer's share can reach the
  PSA; the M1 activation payment is the partner's own, billed to the
  partner's own account (a customer named "<partner> (partner account)",
  like the "owner company" that PSA tools keep for the MSP itself).
- Months and cycles are counted in each customer's time zone (S4), because
  device activity is recorded in customer-local days. The subscription's own
  zone dates its enabling (M1/M4) and its cancellation (M8).
- Bill numbers are ``PREFIX-YYYY-MM-NNNNNN`` from the partner's sequence,
  incremented under a row lock; a number is never reused, a void bill keeps it.
  Numbers are unique per partner (the sequence is the partner's), so two
  partners may use the same prefix.
- A bill's device rows (M7) are a snapshot of each device as billed, with no
  foreign key to it: usage reports never depend on the device row, and
  deleting a device keeps the reports it appeared in. Nor to their bill: they
  are written once, with it, and checked against it (``BillDevice`` says why).
- Pending charges, discounts and credits (S3) go on the customer's next bill
  in their currency, one bill taking them all; a paid bill never changes, a
  correction is a credit on the next bill. A total may go below zero when
  credits exceed charges: the customer is owed money.
"""

from __future__ import annotations

import gc
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, NamedTuple

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
    null,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session, selectinload

from gateway.adapters import BillDocument, BillLineDoc
from gateway.core import billing as rules
from gateway.core.access import Principal, customer_clause, get_customer, get_workspace, require_admin
from gateway.core.billing import BillDraft, Period, PricePoint
from gateway.core.models import (
    Adjustment,
    Bill,
    BillDevice,
    BillingCycle,
    BillKind,
    BillLine,
    BillStatus,
    Customer,
    Delivery,
    DeliveryStatus,
    Device,
    DeviceActivity,
    Edition,
    ExternalMapping,
    JobRun,
    MappingKind,
    MonthlySubscription,
    Order,
    OrderKind,
    Partner,
    PlanAssociation,
    ServicePlan,
    ServicePlanPrice,
    Workspace,
)
from gateway.core.settings import BillingSettings, MailSettings
from gateway.errors import Conflict, DomainError, NotFound

if TYPE_CHECKING:  # pragma: no cover
    from gateway.plugins import GatewayPluginManager

log = structlog.get_logger(__name__)

#: The JobRun name of a queued billing report (M6): ``billing-report:<partner id>``, period ``YYYY-MM``.
REPORT_JOB = "billing-report"
#: "Since always": the first price of a plan applies to every day before a change.
SINCE_ALWAYS = date(1970, 1, 1)
#: Up to this many ids go into one IN (...) list; larger sets are filtered in Python.
_IN_LIMIT = 500
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
ADJUSTMENT_KINDS = ("charge", "discount", "credit")


def _today(now: datetime, tz: str) -> date:
    return rules.local_day(now, tz)


def _check_email(value: str, field: str = "email") -> str:
    value = (value or "").strip()
    if not _EMAIL.match(value):
        raise DomainError(f"{field} {value!r} is not an e-mail address; write it like billing@example.com", field=field)
    return value


# --- service plans (S1, S7) ------------------------------------------------------------


def create_plan(
    session: Session, principal: Principal, *, name: str, price_per_device: Any, currency: str, now: datetime
) -> ServicePlan:
    """S1: a price per device per cycle in one currency; the first price applies since always."""
    require_admin(principal, "service plan")
    name = (name or "").strip()
    if not name:
        raise DomainError("a service plan needs a name", field="name")
    price = _check_price(price_per_device)
    currency = rules.check_currency(currency)
    taken = session.scalar(select(ServicePlan.id).where(ServicePlan.partner_id == principal.partner_id, ServicePlan.name == name))
    if taken is not None:
        raise Conflict(f"a service plan named {name!r} already exists (id {taken}); choose another name", field="name")
    plan = ServicePlan(
        partner_id=principal.partner_id, name=name, price_per_device=price, currency=currency, created_at=now
    )
    session.add(plan)
    session.flush()
    session.add(ServicePlanPrice(plan_id=plan.id, effective_from=SINCE_ALWAYS, price_per_device=price))
    session.flush()
    log.info("billing.plan_created", plan=plan.id, currency=currency)
    return plan


def _check_price(value: Any) -> Decimal:
    price = rules.to_money(value, field="price_per_device")
    if price < 0:
        raise DomainError("price_per_device cannot be negative; use a discount for money off", field="price_per_device")
    if price != price.quantize(rules.STORED_PLACES):
        raise DomainError("price_per_device has more than four decimal places", field="price_per_device")
    return price


def plans_query(principal: Principal):  # type: ignore[no-untyped-def]
    """Plans the principal may see: all of the partner's for an admin; for a customer admin, those
    associated with one of their customers."""
    stmt = select(ServicePlan).where(ServicePlan.partner_id == principal.partner_id)
    if not principal.is_admin:
        associated = select(PlanAssociation.plan_id).where(customer_clause(principal, PlanAssociation.customer_id))
        stmt = stmt.where(ServicePlan.id.in_(associated))
    return stmt


def plans_select(principal: Principal, *, include_archived: bool = False):  # type: ignore[no-untyped-def]
    stmt = plans_query(principal).order_by(ServicePlan.name, ServicePlan.id)
    if not include_archived:
        stmt = stmt.where(ServicePlan.archived_at.is_(None))
    return stmt


def list_plans(session: Session, principal: Principal, *, include_archived: bool = False) -> list[ServicePlan]:
    return list(session.scalars(plans_select(principal, include_archived=include_archived)))


def paged(session: Session, stmt: Any, *, limit: int, offset: int) -> tuple[list[Any], int]:
    """One page of ``stmt``'s objects and the total count (for the API's lists)."""
    total = session.scalar(select(func.count()).select_from(stmt.order_by(None).subquery())) or 0
    return list(session.scalars(stmt.limit(limit).offset(offset))), total


def get_plan(session: Session, principal: Principal, plan_id: int, *, field: str = "plan_id") -> ServicePlan:
    plan = session.scalar(plans_query(principal).where(ServicePlan.id == plan_id))
    if plan is None:
        raise NotFound(f"no service plan with id {plan_id}", field=field)
    return plan


def plan_prices(session: Session, plan_id: int) -> list[PricePoint]:
    rows = session.execute(
        select(ServicePlanPrice.effective_from, ServicePlanPrice.price_per_device)
        .where(ServicePlanPrice.plan_id == plan_id)
        .order_by(ServicePlanPrice.effective_from)
    )
    return [PricePoint(day, price) for day, price in rows]


def change_price(
    session: Session, principal: Principal, plan_id: int, *, price_per_device: Any, effective_from: date, now: datetime
) -> ServicePlan:
    """S7: a new price from a (customer-local) day on; cycles already billed keep their price.

    Decision: a change may not reach back into a cycle that has a bill; such a
    correction is a credit or charge on the next bill instead.
    """
    require_admin(principal, "service plan")
    plan = get_plan(session, principal, plan_id)
    if plan.archived_at is not None:
        raise Conflict(f"service plan {plan.name!r} is archived; its price cannot change", field="plan_id")
    price = _check_price(price_per_device)
    billed = session.scalar(
        select(func.max(Bill.period_end))
        .join(PlanAssociation, and_(Bill.kind == BillKind.PLAN, Bill.source_id == PlanAssociation.id))
        .where(PlanAssociation.plan_id == plan.id, Bill.status != BillStatus.VOID)
    )
    if billed is not None and effective_from <= billed:
        raise Conflict(
            f"cycles up to {billed} are already billed on plan {plan.name!r}; a price change must take effect "
            f"on {billed + timedelta(days=1)} or later (correct billed cycles with a credit or charge)",
            field="effective_from",
        )
    row = session.scalar(
        select(ServicePlanPrice).where(ServicePlanPrice.plan_id == plan.id, ServicePlanPrice.effective_from == effective_from)
    )
    if row is None:
        session.add(ServicePlanPrice(plan_id=plan.id, effective_from=effective_from, price_per_device=price))
    else:
        row.price_per_device = price
    session.flush()
    latest = plan_prices(session, plan.id)[-1]
    plan.price_per_device = latest.price
    log.info("billing.price_changed", plan=plan.id, effective_from=effective_from.isoformat())
    return plan


def archive_plan(session: Session, principal: Principal, plan_id: int, *, now: datetime) -> ServicePlan:
    """A plan with no open association can be archived; it keeps its history and bills."""
    require_admin(principal, "service plan")
    plan = get_plan(session, principal, plan_id)
    open_customers = session.scalars(
        select(Customer.name)
        .join(PlanAssociation, PlanAssociation.customer_id == Customer.id)
        .where(PlanAssociation.plan_id == plan.id, PlanAssociation.ends_on.is_(None))
    ).all()
    if open_customers:
        raise Conflict(
            f"service plan {plan.name!r} is still associated with {', '.join(sorted(open_customers))}; dissociate them first",
            field="plan_id",
        )
    plan.archived_at = plan.archived_at or now
    return plan


# --- associations (S2, S6) ------------------------------------------------------------------


def require_mail(mail: MailSettings) -> None:
    """S2: bills are e-mailed, so the mail server must be configured before any association."""
    if not mail.configured:
        raise DomainError(
            "mail server settings are required before a service plan can be associated with customers (S2): "
            "set [mail] host and from_address in the configuration file, or GATEWAY_MAIL__HOST and "
            "GATEWAY_MAIL__FROM_ADDRESS in the environment, then try again",
            code="mail_not_configured",
            field="mail",
        )


def associations_query(principal: Principal):  # type: ignore[no-untyped-def]
    return (
        select(PlanAssociation)
        .join(ServicePlan, ServicePlan.id == PlanAssociation.plan_id)
        .where(ServicePlan.partner_id == principal.partner_id, customer_clause(principal, PlanAssociation.customer_id))
    )


def associations_select(principal: Principal, *, plan_id: int | None = None, customer_id: int | None = None):  # type: ignore[no-untyped-def]
    stmt = associations_query(principal).order_by(PlanAssociation.id)
    if plan_id is not None:
        stmt = stmt.where(PlanAssociation.plan_id == plan_id)
    if customer_id is not None:
        stmt = stmt.where(PlanAssociation.customer_id == customer_id)
    return stmt


def list_associations(
    session: Session, principal: Principal, *, plan_id: int | None = None, customer_id: int | None = None
) -> list[PlanAssociation]:
    return list(session.scalars(associations_select(principal, plan_id=plan_id, customer_id=customer_id)))


def get_association(session: Session, principal: Principal, association_id: int) -> PlanAssociation:
    found = session.scalar(associations_query(principal).where(PlanAssociation.id == association_id))
    if found is None:
        raise NotFound(f"no plan association with id {association_id}", field="association_id")
    return found


def associate(
    session: Session,
    principal: Principal,
    *,
    plan_id: int,
    customer_ids: Sequence[int],
    cycle: BillingCycle | str,
    starts_on: date,
    due_days: int,
    email: str,
    mail: MailSettings,
    now: datetime,
) -> list[PlanAssociation]:
    """S2: associate a plan with customers: cycle, start date, due days, the e-mail the bills go to.

    Decision: a customer may hold several plans, but one plan only once at a time;
    after a dissociation, a new association of the same plan starts after the last
    day the ended one bills (S6), so no day is billed twice.
    """
    require_admin(principal, "service plan")
    require_mail(mail)
    plan = get_plan(session, principal, plan_id)
    if plan.archived_at is not None:
        raise Conflict(f"service plan {plan.name!r} is archived; it cannot be associated", field="plan_id")
    try:
        cycle = BillingCycle(cycle)
    except ValueError:
        choices = ", ".join(c.value for c in BillingCycle)
        raise DomainError(f"billing cycle {cycle!r} is not one of {choices}", field="cycle") from None
    if due_days < 0 or due_days > 365:
        raise DomainError("due_days must be between 0 and 365", field="due_days")
    email = _check_email(email)
    if not customer_ids:
        raise DomainError("name at least one customer to associate", field="customer_ids")
    created = []
    for customer_id in dict.fromkeys(customer_ids):
        customer = get_customer(session, principal, customer_id)
        current = session.scalar(
            select(PlanAssociation).where(
                PlanAssociation.plan_id == plan.id,
                PlanAssociation.customer_id == customer.id,
                PlanAssociation.ends_on.is_(None),
            )
        )
        if current is not None:
            raise Conflict(
                f"customer {customer.name!r} is already on plan {plan.name!r} (association {current.id})",
                field="customer_ids",
            )
        ended = session.scalars(
            select(PlanAssociation).where(
                PlanAssociation.plan_id == plan.id,
                PlanAssociation.customer_id == customer.id,
                PlanAssociation.ends_on.is_not(None),
            )
        )
        billed = [day for a in ended if (day := rules.billed_through(a.starts_on, a.cycle, a.ends_on)) is not None]
        if billed and starts_on <= max(billed):
            last = max(billed)
            raise Conflict(
                f"customer {customer.name!r} is billed on plan {plan.name!r} through {last} (the cycle of its "
                f"dissociation is billed in full, S6); start the new association on {last + timedelta(days=1)} "
                "or later",
                field="starts_on",
            )
        association = PlanAssociation(
            plan_id=plan.id,
            customer_id=customer.id,
            cycle=cycle,
            starts_on=starts_on,
            due_days=due_days,
            email=email,
            created_at=now,
        )
        session.add(association)
        created.append(association)
    session.flush()
    log.info("billing.associated", plan=plan.id, customers=len(created), cycle=cycle.value)
    return created


def dissociate(
    session: Session, principal: Principal, *, plan_id: int, customer_ids: Sequence[int], now: datetime
) -> list[PlanAssociation]:
    """S6: name the plan and the customers; they get no bill for any cycle after the current one.

    The current cycle (the one containing the customer's local today) is billed
    in full (S6 decision); an association that has not started yet ends without a bill.
    """
    require_admin(principal, "service plan")
    plan = get_plan(session, principal, plan_id)
    if not customer_ids:
        raise DomainError("name at least one customer to dissociate", field="customer_ids")
    ended = []
    for customer_id in dict.fromkeys(customer_ids):
        customer = get_customer(session, principal, customer_id)
        association = session.scalar(
            select(PlanAssociation).where(
                PlanAssociation.plan_id == plan.id,
                PlanAssociation.customer_id == customer.id,
                PlanAssociation.ends_on.is_(None),
            )
        )
        if association is None:
            raise NotFound(f"customer {customer.name!r} is not associated with plan {plan.name!r}", field="customer_ids")
        today = _today(now, customer.timezone)
        association.ends_on = today if today >= association.starts_on else association.starts_on - timedelta(days=1)
        ended.append(association)
    session.flush()
    log.info("billing.dissociated", plan=plan.id, customers=len(ended))
    return ended


# --- monthly active-device billing (M1-M8) -----------------------------------------------


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
    return sub.ends_on is None or _today(now, sub.timezone) < rules.final_billing_date(sub.ends_on)


def enable_monthly(
    session: Session,
    principal: Principal,
    *,
    settings: BillingSettings,
    now: datetime,
    tz: str = "UTC",
    plugins: GatewayPluginManager | None = None,
) -> tuple[MonthlySubscription, Bill]:
    """M1/M2: enable monthly billing with the activation payment; no license or workspace changes.

    The activation bill covers the rest of the current month (not prorated) and
    is issued at once; the first recurring charge follows the first full month (M4).
    """
    require_admin(principal, "monthly subscription")
    rules.zone(tz)
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
        _bill_before_enabling_anew(session, sub, now=now, settings=settings, plugins=plugins)
        sub.enabled_at, sub.timezone, sub.ends_on, sub.cancelled_at = now, tz, None, None
        sub.price_per_device, sub.currency = settings.monthly_price_per_device, currency
    session.flush()
    enabled_on = _today(now, tz)
    account = partner_account(session, partner, tz=tz)
    fee = rules.round_money(settings.monthly_activation_fee, currency)
    covers = rules.activation_period(enabled_on)
    draft = BillDraft(
        partner_id=partner.id, customer_id=account.id, customer_name=account.name, timezone=tz,
        kind=BillKind.ACTIVATION, source_id=sub.id, period=covers, currency=currency, issued_on=enabled_on,
        due_on=rules.due_date(enabled_on, settings.default_due_days), email=partner.email,
    )
    draft.add_line("activation", f"Monthly billing activation: all devices {covers.label()} (not prorated)",
                   Decimal(1), fee, fee)
    _apply_plugin_lines([draft], plugins)
    session.add(Order(partner_id=partner.id, kind=OrderKind.MONTHLY, placed_at=now, quantity=1, term_months=1,
                      currency=currency, list_total=fee, total=fee, actor=principal.name))
    ids = _store_drafts(session, [draft], now=now, issue=True, billing=settings)
    log.info("billing.monthly_enabled", partner=partner.id, first_charge=rules.first_charge_date(enabled_on).isoformat())
    return sub, session.get_one(Bill, ids[0])


def _bill_before_enabling_anew(
    session: Session,
    sub: MonthlySubscription,
    *,
    now: datetime,
    settings: BillingSettings,
    plugins: GatewayPluginManager | None,
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
    waiting = sorted(tz for tz in zones if not rules.is_over(last_month, _today(now, tz)))
    if waiting:
        over_at = max(rules.local_midnight(sub.ends_on + timedelta(days=1), tz) for tz in waiting)
        raise Conflict(
            f"monthly billing ended on {sub.ends_on}, and its last month is not over yet for customers in "
            f"{', '.join(waiting)}, so it cannot be billed yet; enable it again from {over_at.isoformat()}"
        )
    window = Period(rules.month_of(last_month.start - timedelta(days=1)).start, last_month.end)
    run_billing(session, now=now, billing=settings, plugins=plugins, period=window, partner_id=sub.partner_id)


def join_monthly(
    session: Session,
    principal: Principal,
    *,
    workspace_id: int,
    max_devices: int,
    now: datetime,
    edition_id: int | None = None,
) -> Workspace:
    """M2: a workspace joins monthly billing with an edition and a maximum device count, from today on."""
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
    today = _today(now, customer.timezone)
    if workspace.monthly_billing_since is not None and (
        workspace.monthly_billing_until is None or workspace.monthly_billing_until >= today
    ):
        raise Conflict(f"workspace {workspace.name!r} is already on monthly billing since {workspace.monthly_billing_since}")
    workspace.monthly_billing_since = today
    workspace.monthly_billing_until = None
    workspace.max_devices = max_devices
    if edition_id is not None:
        workspace.edition_id = edition_id
    return workspace


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
    devices: dict[int, list[str]] = defaultdict(list)
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
    today = _today(now, sub.timezone)
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
        workspace.monthly_billing_until = ends_on
    plan.confirmed = True
    log.info("billing.monthly_cancelled", partner=principal.partner_id, ends_on=ends_on.isoformat(),
             workspaces=len(plan.workspaces), devices=plan.device_count)
    return plan


def reactivate_monthly(session: Session, principal: Principal, *, now: datetime) -> MonthlySubscription:
    """M8: undo a cancellation before the final billing date; the workspaces it ended stay on the plan."""
    sub = get_subscription(session, principal)
    if sub.ends_on is None:
        raise Conflict("monthly billing is not cancelled; there is nothing to reactivate")
    today = _today(now, sub.timezone)
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


# --- billing runs -------------------------------------------------------------------------------


@dataclass
class BillingRun:
    """What one run built (and saved, unless it was a dry run)."""

    as_of: datetime
    period: Period | None
    dry_run: bool
    drafts: list[BillDraft] = field(default_factory=list)
    bill_ids: list[int] = field(default_factory=list)
    already_billed: int = 0
    #: (partner id, month) pairs that got monthly bills: each gets a billing report (M6).
    reports: list[tuple[int, Period]] = field(default_factory=list)


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
    plugins: GatewayPluginManager | None = None,
    period: Period | None = None,
    dry_run: bool = False,
    issue: bool = True,
    partner_id: int | None = None,
) -> BillingRun:
    """Build every bill that is due as of ``now`` in each customer's time zone (S4), once.

    ``period`` (a month) bills the cycles whose last day lies in it; without it,
    the cycles that ended since the start of each customer's previous month
    (:func:`gateway.core.billing.due_window`). A cycle whose bill exists is
    skipped, so running twice creates nothing new. A dry run computes the same
    drafts (plugin lines included) and stores nothing, numbers included.
    """
    with _collector_paused():
        return _run(session, now=now, billing=billing, plugins=plugins, period=period, dry_run=dry_run, issue=issue,
                    partner_id=partner_id)


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
    plugins: GatewayPluginManager | None,
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
    if tasks:
        # One left behind by a failed run whose caller still committed would be in the way.
        _RUN_DEVICES.drop(session.connection(), checkfirst=True)
        _RUN_DEVICES.create(session.connection())
    drafts = _build_drafts(session, tasks, customers, now, billing)
    _apply_adjustments(session, drafts)
    drafts = [d for d in drafts if d.device_count > 0 or d.adjustment_ids]
    drafts.sort(key=lambda d: (d.partner_id, d.customer_id, d.period.start, d.kind.value, d.source_id))
    _apply_plugin_lines(drafts, plugins)
    run.drafts = drafts
    run.reports = sorted({(d.partner_id, d.period) for d in drafts if d.kind == BillKind.MONTHLY})
    if not dry_run and drafts:
        run.bill_ids = _store_drafts(session, drafts, now=now, issue=issue, billing=billing)
        run.reports = sorted({(d.partner_id, d.period) for d in drafts if d.kind == BillKind.MONTHLY})
        queue_reports(session, run.reports, now)
    if tasks:
        _RUN_DEVICES.drop(session.connection())
    log.info("billing.run", bills=len(drafts), already_billed=run.already_billed, dry_run=dry_run,
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
    return {row[0]: _CustomerRow._make(row) for row in _plain_rows(session, stmt)}


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
    on_plan = [row[0] for row in _plain_rows(
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
            today = _today(now, customer.timezone)
            enabled_on = _today(sub.enabled_at, sub.timezone)
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
    prices: dict[int, list[PricePoint]] = {}
    for association, plan_name, currency, plan_partner in session.execute(stmt):
        customer = customers.get(association.customer_id)
        if customer is None or customer.partner_id != plan_partner:
            continue
        today = _today(now, customer.timezone)
        for cycle in rules.cycles_ending_within(
            association.starts_on, association.cycle, _window(period, today), ends_on=association.ends_on
        ):
            if not rules.is_over(cycle, today):
                continue
            if association.plan_id not in prices:
                prices[association.plan_id] = plan_prices(session, association.plan_id)
            tasks.append(_Task(plan_partner, customer.id, BillKind.PLAN, association.id, cycle, currency,
                               f"Service plan {plan_name}", association.due_days, association.email,
                               prices[association.plan_id]))
    return tasks


def _existing_keys(session: Session, keys: Sequence[tuple[int, BillKind, int, date]]) -> set[tuple[Any, ...]]:
    """Which of these bill identities (customer, kind, source, cycle start) already have a bill."""
    if not keys:
        return set()
    stmt = select(Bill.customer_id, Bill.kind, Bill.source_id, Bill.period_start).where(
        Bill.period_start >= min(k[3] for k in keys), Bill.period_start <= max(k[3] for k in keys),
        Bill.kind.in_({k[1] for k in keys}),
    )
    wanted = set(keys)
    return {tuple(row) for row in session.execute(stmt)} & wanted


def _drop_existing(session: Session, tasks: list[_Task]) -> tuple[list[_Task], int]:
    existing = _existing_keys(session, [(t.customer_id, t.kind, t.source_id, t.period.start) for t in tasks])
    kept = [t for t in tasks if (t.customer_id, t.kind, t.source_id, t.period.start) not in existing]
    return kept, len(tasks) - len(kept)


#: A run's active devices per period (M5) with their snapshots (M7), in a temporary table: the bills'
#: device rows are copied from it inside the database. The drafts need the devices read out; writing
#: them back from Python, one row per device, would cost a run more than the rest of its billing.
_RUN_DEVICES = Table(
    "gateway_run_devices", MetaData(),
    Column("period_start", Date), Column("period_end", Date), Column("kind", String(32)),
    Column("customer_id", Integer), Column("device_id", Integer), Column("days_active", Integer),
    Column("connection", String(100)), Column("external_id", String(100)), Column("hostname", String(255)),
    Column("workspace", String(200)),
    prefixes=["TEMPORARY"], postgresql_on_commit="DROP",
)


def _activity(
    session: Session, period: Period, customer_ids: set[int], *, monthly: bool
) -> dict[int, dict[int, int]]:
    """Active days per device per customer in ``period`` (M5); monthly: only days the workspace was on the plan.

    The devices are also kept, with their snapshots, in ``_RUN_DEVICES`` for :func:`_store_device_rows`.
    """
    in_period = and_(DeviceActivity.day >= period.start, DeviceActivity.day <= period.end)
    kind = (BillKind.MONTHLY if monthly else BillKind.PLAN).value
    tag = (literal(period.start, Date), literal(period.end, Date), literal(kind, String))
    snapshot = _SNAPSHOT if _snapshot_while_counting(session) else (null(),) * len(_SNAPSHOT)
    # Workspace -> device -> activity, grouped in that order: SQLite then walks the covering
    # indexes (devices by workspace, activity by device and day) with no sort step. The snapshot
    # columns depend on the grouped primary keys.
    probe = (
        select(*tag, Workspace.customer_id, Device.id, func.count(), *snapshot)
        .select_from(Workspace)
        .join(Device, Device.workspace_id == Workspace.id)
        .join(DeviceActivity, DeviceActivity.device_id == Device.id)
        .where(in_period)
        .group_by(Workspace.id, Device.id)  # customer_id depends on workspaces.id (its primary key)
    )
    stmt = probe
    if len(customer_ids) <= _IN_LIMIT:
        stmt = probe = probe.where(Workspace.customer_id.in_(customer_ids))
    elif session.get_bind().dialect.name == "postgresql":
        # Many customers: PostgreSQL counts the period's activity per device first and joins the
        # devices to those counts (one pass over the activity index, no per-device search, about
        # 40% faster here); its planner still picks how, from its statistics of the history.
        days = (
            select(DeviceActivity.device_id, func.count().label("days"))
            .where(in_period)
            .group_by(DeviceActivity.device_id)
            .subquery()
        )
        stmt = (
            select(*tag, Workspace.customer_id, Device.id, days.c.days, *snapshot)
            .select_from(days)
            .join(Device, Device.id == days.c.device_id)
            .join(Workspace, Workspace.id == Device.workspace_id)
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
                DeviceActivity.day >= case((since > period.start, since), else_=period.start),
                DeviceActivity.day <= case((until < period.end, until), else_=period.end),
            ),
        ]
    connection = session.connection()
    run_devices = _RUN_DEVICES.c
    for statement in statements:  # the groups of workspaces are disjoint: one row per device
        connection.execute(insert(_RUN_DEVICES).from_select(list(run_devices.keys()), statement))
    result: dict[int, dict[int, int]] = defaultdict(dict)
    for customer_id, device_id, count in _plain_rows(session, select(
        run_devices.customer_id, run_devices.device_id, run_devices.days_active
    ).where(*_same_period(run_devices, period.start, period.end, kind))):
        if customer_id in customer_ids:
            result[customer_id][device_id] = count
    return result


#: What a bill's device row keeps of its device (M7).
_SNAPSHOT = (Device.connection, Device.external_id, Device.hostname, Workspace.name)


def _snapshot_while_counting(session: Session) -> bool:
    """PostgreSQL reads the snapshots while it counts the activity: its plans join the device rows
    anyway. SQLite counts from indexes alone and reads them when it copies the device rows, which
    costs it about 0.1 s less per 180,000 devices (bench/billing_run.py)."""
    return session.get_bind().dialect.name == "postgresql"


def _same_period(columns: Any, start: Any, end: Any, kind: Any) -> tuple[Any, ...]:
    """``_RUN_DEVICES`` rows of one period and kind of bill (values or another table's columns)."""
    return (columns.period_start == start, columns.period_end == end, columns.kind == kind)


def _plain_rows(session: Session, stmt: Any) -> list[tuple[Any, ...]]:
    """Rows of plain integers and strings straight from the driver's cursor: the bulk reads of a
    run return one row per device, and skipping result-row processing halves their cost."""
    result = session.connection().execute(stmt)
    try:
        return result.cursor.fetchall()
    finally:
        result.close()


def _build_drafts(
    session: Session, tasks: list[_Task], customers: dict[int, _CustomerRow], now: datetime, billing: BillingSettings
) -> list[BillDraft]:
    groups: dict[tuple[Period, bool], list[_Task]] = defaultdict(list)
    for task in tasks:
        groups[(task.period, task.kind == BillKind.MONTHLY)].append(task)
    drafts = []
    for (period, monthly), group in groups.items():
        activity = _activity(session, period, {t.customer_id for t in group}, monthly=monthly)
        # Most bills of a period share a price and one of few device counts: each set of lines is computed once.
        lines: dict[tuple[str, int, tuple[PricePoint, ...], str], list[rules.DraftLine]] = {}
        for task in group:
            customer = customers[task.customer_id]
            devices = rules.billable_devices(activity.get(task.customer_id, {}))
            issued_on = _today(now, customer.timezone)
            due_days = billing.default_due_days if task.due_days < 0 else task.due_days
            draft = BillDraft(
                partner_id=task.partner_id, customer_id=customer.id, customer_name=customer.name,
                timezone=customer.timezone, kind=task.kind, source_id=task.source_id, period=period,
                currency=task.currency, issued_on=issued_on, due_on=rules.due_date(issued_on, due_days),
                email=task.email, device_count=len(devices), devices=devices,
            )
            if devices:
                key = (task.label, len(devices), tuple(task.prices or ()), task.currency)
                if key not in lines:
                    lines[key] = rules.device_lines(task.label, period, len(devices), key[2], task.currency)
                draft.lines.extend(replace(line) for line in lines[key])  # each bill owns its lines
            drafts.append(draft)
    return drafts


def _apply_adjustments(session: Session, drafts: list[BillDraft]) -> None:
    """S3: pending charges, discounts and credits go on the customer's first bill of this run in their currency."""
    if not drafts:
        return
    wanted = {d.customer_id for d in drafts}
    stmt = select(Adjustment).where(Adjustment.applied_to_bill_id.is_(None)).order_by(Adjustment.id)
    if len(wanted) <= _IN_LIMIT:
        stmt = stmt.where(Adjustment.customer_id.in_(wanted))
    first: dict[tuple[int, str], BillDraft] = {}
    for draft in sorted(drafts, key=lambda d: (d.period.start, d.kind.value, d.source_id)):
        first.setdefault((draft.customer_id, draft.currency), draft)
    for adjustment in session.scalars(stmt):
        draft = first.get((adjustment.customer_id, adjustment.currency))
        if draft is None:
            continue
        draft.add_line(adjustment.kind, adjustment.description, Decimal(1), adjustment.amount, adjustment.amount)
        draft.adjustment_ids.append(adjustment.id)


def _apply_plugin_lines(drafts: Iterable[BillDraft], plugins: GatewayPluginManager | None) -> None:
    """Lines from ``gateway_bill_built`` (tax, fees); a plugin's malformed line is refused and reported (G5)."""
    if plugins is None or not plugins.pm.hook.gateway_bill_built.get_hookimpls():
        return
    for draft in drafts:
        for plugin_name, lines in plugins.call_each("gateway_bill_built", bill=draft):
            for line in lines or ():
                problem = _plugin_line_problem(line)
                if problem:
                    plugins.report_failure(plugin_name, "gateway_bill_built", DomainError(problem))
                    continue
                draft.add_line("plugin", f"{line.description}"[:500], line.quantity, line.unit_price, line.amount)


def _plugin_line_problem(line: Any) -> str | None:
    if not isinstance(line, BillLineDoc):
        return f"returned {type(line).__name__}, not a gateway.BillLineDoc"
    for name in ("quantity", "unit_price", "amount"):
        value = getattr(line, name)
        if not isinstance(value, Decimal) or not value.is_finite():
            return f"line {line.description!r}: {name} must be a finite Decimal, not {type(value).__name__}"
    return None


def _lock_partners(session: Session, partner_ids: set[int]) -> dict[int, Partner]:
    """Lock the partners' rows (their bill sequences), in one order for every process: no lock cycles.

    Fresh values are read after the lock is granted (``populate_existing``), so a
    run that waited for another sees the sequence and the bills that one committed.
    """
    locked = {}
    for partner_id in sorted(partner_ids):
        partner = session.scalar(
            select(Partner).where(Partner.id == partner_id).with_for_update().execution_options(populate_existing=True)
        )
        if partner is None:
            raise NotFound(f"no partner with id {partner_id}")
        locked[partner_id] = partner
    return locked


def _allocate_numbers(
    session: Session, drafts: Sequence[BillDraft], partners: dict[int, Partner], billing: BillingSettings
) -> None:
    """Give each draft the next number of its (locked) partner's sequence; numbers are never reused."""
    by_partner: dict[int, list[BillDraft]] = defaultdict(list)
    for draft in drafts:
        by_partner[draft.partner_id].append(draft)
    for partner_id, partner_drafts in sorted(by_partner.items()):
        partner = partners[partner_id]
        prefix = partner.invoice_prefix or billing.invoice_prefix
        start = partner.next_bill_number
        for offset, draft in enumerate(partner_drafts):
            draft.number = rules.format_bill_number(prefix, draft.issued_on, start + offset)
        partner.next_bill_number = start + len(partner_drafts)
    session.flush()


_BILL_COLUMNS = ("partner_id", "customer_id", "kind", "source_id", "number", "period_start", "period_end", "currency",
                 "device_count", "total", "status", "issued_on", "due_on", "email", "created_at", "finalized_at",
                 "email_attempts")


def _store_drafts(
    session: Session, drafts: Sequence[BillDraft], *, now: datetime, issue: bool, billing: BillingSettings
) -> list[int]:
    """Insert bills, lines, device rows and (when issuing) deliveries in bulk; returns the bill ids.

    Drafts that another run billed while this one waited for the partner locks are
    dropped (and removed from ``drafts``), so concurrent runs never fail or double-bill.
    """
    partners = _lock_partners(session, {d.partner_id for d in drafts})
    existing = _existing_keys(session, [d.key for d in drafts])
    if existing:
        log.info("billing.billed_meanwhile", bills=len(existing))
        drafts[:] = [d for d in drafts if d.key not in existing]
        if not drafts:
            return []
    _allocate_numbers(session, drafts, partners, billing)
    status = (BillStatus.ISSUED if issue else BillStatus.DRAFT).value
    finalized = now if issue else None
    before = session.scalar(select(func.max(Bill.id))) or 0
    _bulk_insert(session, Bill.__table__, _BILL_COLUMNS, [
        (d.partner_id, d.customer_id, d.kind.value, d.source_id, d.number, d.period.start, d.period.end, d.currency,
         d.device_count, d.total, status, d.issued_on, d.due_on, d.email, now, finalized, 0)
        for d in drafts
    ])
    # A bulk insert returns no ids: they are read back by (partner, number), which is unique, from the
    # ids above the largest one before the insert (new ids only grow; other partners' new bills may be
    # among them, which the key tells apart).
    by_number = {(partner_id, number): bill_id for bill_id, partner_id, number in _plain_rows(
        session, select(Bill.id, Bill.partner_id, Bill.number).where(Bill.id > before))}
    ids = [by_number[(d.partner_id, d.number)] for d in drafts]  # type: ignore[index]
    line_rows = []
    adjustment_rows = []
    for bill_id, draft in zip(ids, drafts, strict=True):
        for position, line in enumerate(draft.lines, start=1):
            line_rows.append((bill_id, position, line.kind[:32], line.description[:500], line.quantity,
                              line.unit_price, line.amount))
        adjustment_rows.extend({"id": adjustment, "applied_to_bill_id": bill_id} for adjustment in draft.adjustment_ids)
    _bulk_insert(session, BillLine.__table__,
                 ("bill_id", "position", "kind", "description", "quantity", "unit_price", "amount"), line_rows)
    _store_device_rows(session, ids, drafts)
    if adjustment_rows:
        session.execute(update(Adjustment), adjustment_rows)
    if issue:
        _write_deliveries(session, [(bill_id, d.customer_id, d.kind, d.source_id, d.period) for bill_id, d in zip(ids, drafts)], now)
    return ids


def _store_device_rows(session: Session, ids: Sequence[int], drafts: Sequence[BillDraft]) -> None:
    """M7: each bill's device rows with their snapshots, copied inside the database from ``_RUN_DEVICES``.

    A bill takes its customer's devices of its period and kind; only this run's
    bills (``ids``, in the order of ``drafts``) take any. The copy is checked
    against the drafts: it must be exactly their devices.
    """
    expected = sum(len(d.devices) for d in drafts)
    if not expected:
        return
    found = _RUN_DEVICES.c
    rows = (
        select(Bill.id, found.device_id, found.days_active, found.connection, found.external_id, found.hostname,
               found.workspace)
        .select_from(_RUN_DEVICES)
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
            .join(Workspace, Workspace.id == Device.workspace_id)
        )
    copy = insert(BillDevice.__table__).from_select(
        ["bill_id", "device_id", "days_active", "connection", "external_id", "hostname", "workspace"], rows
    )
    copied = session.connection().execute(copy.execution_options(preserve_rowcount=True)).rowcount
    if copied != expected:  # the drafts were read from the same rows: this is a bug, never a state of the data
        raise RuntimeError(f"billing run: {copied} device rows copied for {expected} billed devices")


def _bulk_insert(session: Session, table: Any, columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    """Rows straight to the driver: COPY on PostgreSQL, one executemany on SQLite.

    A run writes one row per billed device (M7) besides its lines and deliveries;
    going through the ORM's per-row parameter handling would cost more than the
    billing itself. On SQLite each value goes through its column's own bind
    conversion, once per distinct value.
    """
    if not rows:
        return
    connection = session.connection()
    dialect = connection.dialect
    cursor = connection.connection.driver_connection.cursor()
    try:
        if dialect.name == "postgresql":
            with cursor.copy(f"COPY {table.name} ({', '.join(columns)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            return
        processors = [table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in columns]
        active = [(i, process, {}) for i, process in enumerate(processors) if process is not None]
        if active:
            converted = []
            for row in rows:
                values = list(row)
                for i, process, memo in active:  # repeated values (now, a status, a price) convert once
                    value = values[i]
                    if value in memo:
                        values[i] = memo[value]
                    else:
                        values[i] = memo[value] = process(value)
                converted.append(values)
            rows = converted
        marks = ", ".join("?" for _ in columns)
        cursor.executemany(f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({marks})", rows)
    finally:
        cursor.close()


def queue_reports(session: Session, reports: Sequence[tuple[int, Period]], now: datetime) -> None:
    """M6: queue one billing report per (partner, month) in the run's own transaction; the mailer sends it."""
    for partner_id, month in reports:
        job, period = f"{REPORT_JOB}:{partner_id}", f"{month.start:%Y-%m}"
        if session.get(JobRun, (job, period)) is None:
            session.add(JobRun(job=job, period=period, started_at=now))
    session.flush()


# --- deliveries (G2) ---------------------------------------------------------------------------


def delivery_key(connection: str, bill: Bill) -> str:
    """The deterministic key of one bill in one PSA connection (G2), written into the PSA object.

    ``gw-<connection>-<customer id>-<kind>-<source id>-<YYYYMMDD>-<YYYYMMDD>``: one
    per (connection, customer, cycle) and bill source, so a retried, crashed or
    repeated push finds the object it created before.
    """
    return _key(connection, bill.customer_id, bill.kind, bill.source_id, Period(bill.period_start, bill.period_end))


def _key(connection: str, customer_id: int, kind: BillKind, source_id: int, period: Period) -> str:
    kind_value = kind.value if isinstance(kind, BillKind) else BillKind(kind).value
    span = f"{period.start.isoformat()}-{period.end.isoformat()}".replace("-", "")  # YYYYMMDDYYYYMMDD, fast
    return f"gw-{connection}-{customer_id}-{kind_value}-{source_id}-{span[:8]}-{span[8:]}"


def _psa_connections(session: Session, customer_ids: set[int]) -> dict[int, list[str]]:
    """PSA connections per customer; one per connection (the earliest mapping wins)."""
    stmt = (
        select(ExternalMapping.customer_id, ExternalMapping.connection)
        .where(ExternalMapping.kind == MappingKind.PSA_COMPANY, ExternalMapping.customer_id.is_not(None))
        .order_by(ExternalMapping.id)
    )
    if len(customer_ids) <= _IN_LIMIT:
        stmt = stmt.where(ExternalMapping.customer_id.in_(customer_ids))
    result: dict[int, list[str]] = defaultdict(list)
    for customer_id, connection in _plain_rows(session, stmt):
        if customer_id in customer_ids and connection not in result[customer_id]:
            result[customer_id].append(connection)
    return result


def _write_deliveries(
    session: Session, bills: Sequence[tuple[int, int, BillKind, int, Period]], now: datetime
) -> None:
    """The outbox: one Delivery per PSA connection of the customer, in the bill's transaction (G2)."""
    connections = _psa_connections(session, {customer_id for _, customer_id, _, _, _ in bills})
    rows = [
        (bill_id, connection, _key(connection, customer_id, kind, source_id, period), DeliveryStatus.PENDING.value,
         0, now, now)
        for bill_id, customer_id, kind, source_id, period in bills
        for connection in connections.get(customer_id, ())
    ]
    _bulk_insert(session, Delivery.__table__,
                 ("bill_id", "connection", "key", "status", "attempts", "next_attempt_at", "created_at"), rows)


def bill_document(session: Session, delivery: Delivery) -> BillDocument:
    """The bill of ``delivery`` as its PSA connection receives it (used by the outbox worker)."""
    bill = session.get(Bill, delivery.bill_id, options=[selectinload(Bill.lines)])
    if bill is None:
        raise NotFound(f"delivery {delivery.id}: its bill {delivery.bill_id} no longer exists")
    company = session.scalar(
        select(ExternalMapping.external_id)
        .where(
            ExternalMapping.connection == delivery.connection,
            ExternalMapping.kind == MappingKind.PSA_COMPANY,
            ExternalMapping.customer_id == bill.customer_id,
        )
        .order_by(ExternalMapping.id)
        .limit(1)
    )
    if company is None:
        raise NotFound(
            f"bill {bill.number}: its customer is no longer mapped to a company in {delivery.connection!r}; "
            "map the customer again, then retry the delivery"
        )
    customer = session.get_one(Customer, bill.customer_id)
    return BillDocument(
        key=delivery.key,
        number=bill.number,
        company_external_id=company,
        customer_name=customer.name,
        currency=bill.currency,
        period_start=bill.period_start,
        period_end=bill.period_end,
        issued_on=bill.issued_on,
        due_on=bill.due_on,
        device_count=bill.device_count,
        total=bill.total,
        lines=tuple(BillLineDoc(line.description, line.quantity, line.unit_price, line.amount) for line in bill.lines),
    )


# --- bills (S3, S5, S8) ---------------------------------------------------------------------


def bills_query(principal: Principal):  # type: ignore[no-untyped-def]
    return select(Bill).where(Bill.partner_id == principal.partner_id, customer_clause(principal, Bill.customer_id))


def get_bill(session: Session, principal: Principal, bill_id: int, *, lock: bool = False) -> Bill:
    """The bill if the principal may see it, else NotFound (S8: a hidden bill looks absent)."""
    stmt = bills_query(principal).where(Bill.id == bill_id).options(selectinload(Bill.lines))
    if lock:
        stmt = stmt.with_for_update(of=Bill)
    bill = session.scalar(stmt)
    if bill is None:
        raise NotFound(f"no bill with id {bill_id}", field="bill_id")
    return bill


def bills_select(
    principal: Principal,
    *,
    customer_id: int | None = None,
    status: BillStatus | str | None = None,
    kind: BillKind | str | None = None,
):  # type: ignore[no-untyped-def]
    """The principal's bills, newest cycle first, optionally filtered."""
    stmt = bills_query(principal).order_by(Bill.period_start.desc(), Bill.id.desc())
    if customer_id is not None:
        stmt = stmt.where(Bill.customer_id == customer_id)
    if status is not None:
        stmt = stmt.where(Bill.status == BillStatus(status))
    if kind is not None:
        stmt = stmt.where(Bill.kind == BillKind(kind))
    return stmt


def list_bills(
    session: Session,
    principal: Principal,
    *,
    customer_id: int | None = None,
    status: BillStatus | str | None = None,
    kind: BillKind | str | None = None,
) -> list[Bill]:
    return list(session.scalars(bills_select(principal, customer_id=customer_id, status=status, kind=kind)))


def adjustments_select(principal: Principal, *, customer_id: int | None = None, pending: bool = True):  # type: ignore[no-untyped-def]
    """Charges, discounts and credits of the principal's customers (pending: not on a bill yet)."""
    stmt = (
        select(Adjustment)
        .join(Customer, Customer.id == Adjustment.customer_id)
        .where(Customer.partner_id == principal.partner_id, customer_clause(principal, Adjustment.customer_id))
        .order_by(Adjustment.id)
    )
    if customer_id is not None:
        stmt = stmt.where(Adjustment.customer_id == customer_id)
    if pending:
        stmt = stmt.where(Adjustment.applied_to_bill_id.is_(None))
    return stmt


def customer_bills(session: Session, principal: Principal, customer_id: int) -> tuple[Customer, list[Bill]]:
    """S5: every bill of one customer, oldest first, for the consolidated bill."""
    customer = get_customer(session, principal, customer_id)
    bills = session.scalars(
        bills_query(principal)
        .where(Bill.customer_id == customer.id)
        .order_by(Bill.period_start, Bill.id)
        .options(selectinload(Bill.lines))
    ).all()
    return customer, list(bills)


def finalize_bill(session: Session, principal: Principal, bill_id: int, *, now: datetime) -> Bill:
    """Issue a draft: it is dated today (same due days) and its outbox deliveries are written with it."""
    require_admin(principal, "bill")
    bill = get_bill(session, principal, bill_id, lock=True)
    if bill.status != BillStatus.DRAFT:
        raise Conflict(f"bill {bill.number} is {bill.status.value}; only a draft can be issued", field="status")
    customer = session.get_one(Customer, bill.customer_id)
    due_days = (bill.due_on - bill.issued_on).days
    bill.issued_on = _today(now, customer.timezone)
    bill.due_on = rules.due_date(bill.issued_on, due_days)
    bill.status = BillStatus.ISSUED
    bill.finalized_at = now
    session.flush()
    _write_deliveries(session, [(bill.id, bill.customer_id, bill.kind, bill.source_id,
                                 Period(bill.period_start, bill.period_end))], now)
    return bill


def _unchangeable(bill: Bill) -> Conflict:
    if bill.status == BillStatus.PAID:
        return Conflict(
            f"bill {bill.number} is paid and cannot change; add a credit to the customer's next bill instead",
            field="status",
        )
    return Conflict(f"bill {bill.number} is void and cannot change", field="status")


def mark_paid(session: Session, principal: Principal, bill_id: int, *, now: datetime) -> Bill:
    """S3: an issued or overdue bill is paid; a paid bill never changes again."""
    require_admin(principal, "bill")
    bill = get_bill(session, principal, bill_id, lock=True)
    if bill.status in (BillStatus.PAID, BillStatus.VOID):
        raise _unchangeable(bill)
    if bill.status == BillStatus.DRAFT:
        raise Conflict(f"bill {bill.number} is a draft; issue it before marking it paid", field="status")
    bill.status = BillStatus.PAID
    bill.paid_at = now
    return bill


def void_bill(session: Session, principal: Principal, bill_id: int, *, now: datetime) -> Bill:
    """Void an unpaid bill; it keeps its number, and its undelivered pushes are stopped.

    Decision: deliveries still pending are dead-lettered with the reason, so no
    PSA receives a void bill; one already delivered must be voided in the PSA too
    (the gateway says so in the log). Its adjustments return to the queue. A bill
    already corrected by a credit cannot be voided: that would correct it twice.
    """
    require_admin(principal, "bill")
    bill = get_bill(session, principal, bill_id, lock=True)
    if bill.status in (BillStatus.PAID, BillStatus.VOID):
        raise _unchangeable(bill)
    credits = list(session.scalars(_credits_of(bill)))
    if credits:
        total = rules.round_money(-sum((c.amount for c in credits), Decimal(0)), bill.currency)
        raise Conflict(
            f"bill {bill.number} was corrected by credits of {total} {bill.currency} (adjustments "
            f"{', '.join(str(c.id) for c in credits)}); voiding it would correct it twice: credit the rest "
            "of its total instead",
            field="status",
        )
    bill.status = BillStatus.VOID
    bill.voided_at = now
    session.execute(
        update(Delivery)
        .where(Delivery.bill_id == bill.id, Delivery.status == DeliveryStatus.PENDING)
        .values(status=DeliveryStatus.DEAD, last_error=f"bill {bill.number} was voided before delivery")
    )
    session.execute(update(Adjustment).where(Adjustment.applied_to_bill_id == bill.id).values(applied_to_bill_id=None))
    delivered = session.scalars(
        select(Delivery.connection).where(Delivery.bill_id == bill.id, Delivery.status == DeliveryStatus.DELIVERED)
    ).all()
    if delivered:
        log.warning("billing.void_bill_in_psa", bill=bill.number, connections=list(delivered))
    return bill


def mark_overdue(session: Session, *, now: datetime, partner_id: int | None = None) -> list[Bill]:
    """S3: issued bills past their due days (in the customer's local calendar) become overdue."""
    horizon = now.date() + timedelta(days=1)  # no zone is more than a day ahead of UTC
    stmt = (
        select(Bill, Customer.timezone)
        .join(Customer, Customer.id == Bill.customer_id)
        .where(Bill.status == BillStatus.ISSUED, Bill.due_on < horizon)
    )
    if partner_id is not None:
        stmt = stmt.where(Bill.partner_id == partner_id)
    changed = []
    for bill, tz in session.execute(stmt):
        if rules.is_overdue(bill.due_on, _today(now, tz)):
            bill.status = BillStatus.OVERDUE
            changed.append(bill)
    if changed:
        log.info("billing.overdue", bills=len(changed))
    return changed


def add_adjustment(
    session: Session,
    principal: Principal,
    *,
    customer_id: int,
    kind: str,
    description: str,
    amount: Any,
    currency: str,
    now: datetime,
) -> Adjustment:
    """S3: a one-off charge (positive) or discount/credit (negative) for the customer's next bill."""
    require_admin(principal, "adjustment")
    customer = get_customer(session, principal, customer_id)
    if kind not in ADJUSTMENT_KINDS:
        raise DomainError(f"kind {kind!r} is not one of {', '.join(ADJUSTMENT_KINDS)}", field="kind")
    currency = rules.check_currency(currency)
    value = rules.round_money(rules.to_money(amount), currency)
    if value == 0:
        raise DomainError("amount must not be zero", field="amount")
    if kind == "charge" and value < 0:
        raise DomainError("a charge is a positive amount; use kind discount or credit for money off", field="amount")
    if kind in ("discount", "credit") and value > 0:
        value = -value  # "a discount of 5" means 5 off
    description = (description or "").strip()
    if not description:
        raise DomainError("describe the adjustment; the description is printed on the bill", field="description")
    adjustment = Adjustment(customer_id=customer.id, kind=kind, description=description[:500], amount=value,
                            currency=currency, created_at=now)
    session.add(adjustment)
    session.flush()
    return adjustment


def credit_bill(session: Session, principal: Principal, bill_id: int, *, amount: Any, reason: str, now: datetime) -> Adjustment:
    """A correction of an issued or paid bill: a credit line on the customer's next bill, never an edit."""
    require_admin(principal, "bill")
    bill = get_bill(session, principal, bill_id)
    if bill.status in (BillStatus.DRAFT, BillStatus.VOID):
        raise Conflict(f"bill {bill.number} is {bill.status.value}; only an issued or paid bill can be credited", field="status")
    value = rules.round_money(abs(rules.to_money(amount)), bill.currency)
    already = -sum((c.amount for c in session.scalars(_credits_of(bill))), Decimal(0))  # exact, on every database
    if value + already > bill.total:
        raise DomainError(
            f"credits for bill {bill.number} would total {value + already} {bill.currency}, more than the bill's "
            f"{bill.total} {bill.currency}", field="amount")
    return add_adjustment(session, principal, customer_id=bill.customer_id, kind="credit",
                          description=f"Credit for {bill.number}: {reason or 'correction'}", amount=-value,
                          currency=bill.currency, now=now)


def _credits_of(bill: Bill):  # type: ignore[no-untyped-def]
    """The credits made for ``bill`` (pending or applied): the customer's credits that name its number."""
    return select(Adjustment).where(
        Adjustment.customer_id == bill.customer_id, Adjustment.kind == "credit",
        Adjustment.description.startswith(f"Credit for {bill.number}:", autoescape=True),
    ).order_by(Adjustment.id)


# --- reports (M6, M7) --------------------------------------------------------------------------


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

"""Service plans (S1, S7): a price per device per cycle in one currency, and its changes.

A plan keeps every price it had (``ServicePlanPrice``), each from a
customer-local day on; the first applies since always (:data:`SINCE_ALWAYS`).
Cycles already billed keep their price: a change that reaches back into a
customer's billed cycle applies to that customer from its next cycle (a billed
cycle's correction is a credit or charge on the next bill instead).
A plan still associated with a customer cannot be archived; an archived plan
keeps its history and bills.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

import structlog
from sqlalchemy import Select, and_, func, select
from sqlalchemy.orm import Session

from gateway.core.access import Principal, customer_clause, require_admin
from gateway.core.billing import rules
from gateway.core.billing.drafts import PricePoint
from gateway.core.models import (
    Bill,
    BillKind,
    BillStatus,
    Customer,
    PlanAssociation,
    PlanPriceStart,
    ServicePlan,
    ServicePlanPrice,
)
from gateway.core.text import check_text
from gateway.errors import Conflict, DomainError, NotFound

log = structlog.get_logger(__name__)

#: "Since always": the first price of a plan applies to every day before a change.
SINCE_ALWAYS = date(1970, 1, 1)


def create_plan(
    session: Session, principal: Principal, *, name: str, price_per_device: Any, currency: str, now: datetime
) -> ServicePlan:
    """S1: a price per device per cycle in one currency; the first price applies since always."""
    require_admin(principal, "service plan")
    name = (name or "").strip()
    if not name:
        raise DomainError("a service plan needs a name", field="name")
    check_text(name, field="name", what="the service plan name")
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


def plans_query(principal: Principal) -> Select[ServicePlan]:
    """Plans the principal may see: all of the partner's for an admin; for a customer admin, those
    associated with one of their customers."""
    stmt = select(ServicePlan).where(ServicePlan.partner_id == principal.partner_id)
    if not principal.is_admin:
        associated = select(PlanAssociation.plan_id).where(customer_clause(principal, PlanAssociation.customer_id))
        stmt = stmt.where(ServicePlan.id.in_(associated))
    return stmt


def plans_select(principal: Principal, *, include_archived: bool = False) -> Select[ServicePlan]:
    stmt = plans_query(principal).order_by(ServicePlan.name, ServicePlan.id)
    if not include_archived:
        stmt = stmt.where(ServicePlan.archived_at.is_(None))
    return stmt


def list_plans(session: Session, principal: Principal, *, include_archived: bool = False) -> list[ServicePlan]:
    return list(session.scalars(plans_select(principal, include_archived=include_archived)))


def get_plan(session: Session, principal: Principal, plan_id: int, *, field: str = "plan_id") -> ServicePlan:
    plan = session.scalar(plans_query(principal).where(ServicePlan.id == plan_id))
    if plan is None:
        raise NotFound(f"no service plan with id {plan_id}", field=field)
    return plan


def plan_prices(session: Session, plan_id: int) -> list[PricePoint]:
    """The plan-wide price history (each change from its plan-wide day; see :class:`PriceBook`)."""
    rows = session.execute(
        select(ServicePlanPrice.effective_from, ServicePlanPrice.price_per_device)
        .where(ServicePlanPrice.plan_id == plan_id)
        .order_by(ServicePlanPrice.effective_from)
    )
    return [PricePoint(day, price) for day, price in rows]


@dataclass
class PriceBook:
    """S7/S4: a plan's prices as each association sees them.

    A change applies from its plan-wide day, except for the associations that
    start it on another day of their own (``PlanPriceStart``): the change was
    made "from today" and their customer's local today differed, or the day
    reached into a cycle of theirs already billed.
    """

    points: list[tuple[int, PricePoint]]
    starts: dict[int, dict[int, date]] = field(default_factory=dict)

    def for_association(self, association_id: int) -> list[PricePoint]:
        own = self.starts.get(association_id)
        if not own:
            return [point for _, point in self.points]
        # Stable sort: on a shared day the later change (in plan order) wins (drafts.price_segments).
        return sorted((PricePoint(own.get(price_id, point.effective_from), point.price)
                       for price_id, point in self.points), key=lambda p: p.effective_from)


def price_book(session: Session, plan_id: int) -> PriceBook:
    rows = session.execute(
        select(ServicePlanPrice.id, ServicePlanPrice.effective_from, ServicePlanPrice.price_per_device)
        .where(ServicePlanPrice.plan_id == plan_id)
        .order_by(ServicePlanPrice.effective_from, ServicePlanPrice.id)
    ).all()
    book = PriceBook([(price_id, PricePoint(day, price)) for price_id, day, price in rows])
    for price_id, association_id, day in session.execute(
        select(PlanPriceStart.price_id, PlanPriceStart.association_id, PlanPriceStart.effective_from)
        .where(PlanPriceStart.price_id.in_([r[0] for r in rows]))
    ):
        book.starts.setdefault(association_id, {})[price_id] = day
    return book


@dataclass
class CustomerPriceStart:
    """S7: the day one customer's association takes a price change from."""

    association_id: int
    customer_id: int
    customer: str
    effective_from: date
    #: The day reached into a cycle already billed for this customer: the change starts with its next cycle.
    billed_through: date | None = None

    @property
    def deferred(self) -> bool:
        return self.billed_through is not None


@dataclass
class PriceChange:
    """S7: what a price change did: the plan, its plan-wide day, and each customer's own day."""

    plan: ServicePlan
    effective_from: date
    customers: list[CustomerPriceStart]

    @property
    def deferred(self) -> list[CustomerPriceStart]:
        return [c for c in self.customers if c.deferred]


def change_price(
    session: Session,
    principal: Principal,
    plan_id: int,
    *,
    price_per_device: Any,
    effective_from: date | None = None,
    now: datetime,
) -> PriceChange:
    """S7: a new price from a (customer-local) day on; cycles already billed keep their price.

    Decisions (S4: the day of a change is each customer's own):

    - Without ``effective_from`` the change applies "from today", and today is each
      customer's local day (the plan-wide day, for associations made later, is today in UTC).
    - A day that reaches into a cycle already billed for a customer applies to that
      customer from its next cycle (the day after its last billed one), and the answer says
      so; the other customers take the change from the day asked. A billed cycle is
      corrected with a credit or charge, never by re-pricing it.
    """
    require_admin(principal, "service plan")
    plan = get_plan(session, principal, plan_id)
    if plan.archived_at is not None:
        raise Conflict(f"service plan {plan.name!r} is archived; its price cannot change", field="plan_id")
    price = _check_price(price_per_device)
    plan_day = effective_from if effective_from is not None else now.date()
    row = session.scalar(
        select(ServicePlanPrice).where(ServicePlanPrice.plan_id == plan.id, ServicePlanPrice.effective_from == plan_day)
    )
    if row is None:
        row = ServicePlanPrice(plan_id=plan.id, effective_from=plan_day, price_per_device=price)
        session.add(row)
    else:
        row.price_per_device = price
    session.flush()
    billed = dict(session.execute(
        select(Bill.source_id, func.max(Bill.period_end))
        .join(PlanAssociation, and_(Bill.kind == BillKind.PLAN, Bill.source_id == PlanAssociation.id))
        .where(PlanAssociation.plan_id == plan.id, Bill.status != BillStatus.VOID)
        .group_by(Bill.source_id)
    ).all())
    starts = {start.association_id: start for start in session.scalars(
        select(PlanPriceStart).where(PlanPriceStart.price_id == row.id))}
    customers = []
    for association, customer in session.execute(
        select(PlanAssociation, Customer)
        .join(Customer, Customer.id == PlanAssociation.customer_id)
        .where(PlanAssociation.plan_id == plan.id)
        .order_by(Customer.name, PlanAssociation.id)
    ).tuples():
        day = effective_from if effective_from is not None else rules.local_day(now, customer.timezone)
        billed_through = billed.get(association.id)
        if billed_through is not None and day <= billed_through:
            day = billed_through + timedelta(days=1)
        else:
            billed_through = None
        start = starts.get(association.id)
        if day == plan_day:
            if start is not None:
                session.delete(start)
        elif start is None:
            session.add(PlanPriceStart(price_id=row.id, association_id=association.id, effective_from=day))
        else:
            start.effective_from = day
        customers.append(CustomerPriceStart(association.id, customer.id, customer.name, day, billed_through))
    session.flush()
    latest = plan_prices(session, plan.id)[-1]
    plan.price_per_device = latest.price
    change = PriceChange(plan, plan_day, customers)
    log.info("billing.price_changed", plan=plan.id, effective_from=plan_day.isoformat(),
             deferred=len(change.deferred))
    return change


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

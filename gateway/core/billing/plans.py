"""Service plans (S1, S7): a price per device per cycle in one currency, and its changes.

A plan keeps every price it had (``ServicePlanPrice``), each from a
customer-local day on; the first applies since always (:data:`SINCE_ALWAYS`).
Cycles already billed keep their price: a change may not reach back into a
billed cycle, whose correction is a credit or charge on the next bill instead.
A plan still associated with a customer cannot be archived; an archived plan
keeps its history and bills.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

import structlog
from sqlalchemy import Select, and_, func, select
from sqlalchemy.orm import Session

from gateway.core.access import Principal, customer_clause, require_admin
from gateway.core.billing import rules
from gateway.core.billing.drafts import PricePoint
from gateway.core.models import Bill, BillKind, BillStatus, Customer, PlanAssociation, ServicePlan, ServicePlanPrice
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

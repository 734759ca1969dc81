"""Plan associations (S2, S6): which customers are on a service plan, on what cycle, billed to whom.

Bills are e-mailed (S2), so no association is made before the mail server is
configured. A customer may hold several plans, but one plan only once at a
time; a dissociated customer gets no bill for any cycle after the current one,
which is billed in full (S6), and a new association of the same plan starts
after the last day the ended one bills, so no day is billed twice.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import date, datetime, timedelta

import structlog
from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from gateway.core.access import Principal, customer_clause, get_customer, require_admin
from gateway.core.billing import rules
from gateway.core.billing.plans import get_plan
from gateway.core.models import BillingCycle, PlanAssociation, ServicePlan
from gateway.core.settings import MailSettings
from gateway.errors import Conflict, DomainError, NotFound

log = structlog.get_logger(__name__)

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def _check_email(value: str, field: str = "email") -> str:
    value = (value or "").strip()
    if not _EMAIL.match(value):
        raise DomainError(f"{field} {value!r} is not an e-mail address; write it like billing@example.com", field=field)
    return value


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


def associations_query(principal: Principal) -> Select[PlanAssociation]:
    return (
        select(PlanAssociation)
        .join(ServicePlan, ServicePlan.id == PlanAssociation.plan_id)
        .where(ServicePlan.partner_id == principal.partner_id, customer_clause(principal, PlanAssociation.customer_id))
    )


def associations_select(
    principal: Principal, *, plan_id: int | None = None, customer_id: int | None = None
) -> Select[PlanAssociation]:
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
        billed = [day for a in ended
                  if a.ends_on is not None and (day := rules.billed_through(a.starts_on, a.cycle, a.ends_on)) is not None]
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
        today = rules.local_day(now, customer.timezone)
        association.ends_on = today if today >= association.starts_on else association.starts_on - timedelta(days=1)
        ended.append(association)
    session.flush()
    log.info("billing.dissociated", plan=plan.id, customers=len(ended))
    return ended

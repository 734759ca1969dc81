"""A bill's life (S3, S5, S8): draft, issued, overdue, paid or void; adjustments and credits.

A billing run issues its bills unless asked for drafts; a draft is issued by
:func:`finalize_bill`, with its outbox deliveries. Customer admins see their
customers' bills and change nothing (S8); a bill they may not see looks absent.

Decisions:

- Pending charges, discounts and credits (S3) go on the customer's next bill
  in their currency, one bill taking them all (the run applies them); a paid
  bill never changes, a correction is a credit on the next bill. A total may go
  below zero when credits exceed charges: the customer is owed money.
- A void bill keeps its number; its undelivered pushes are stopped and its
  adjustments return to the queue (:func:`void_bill` says why).
- A PSA's "invoice paid" webhook marks the bill it was delivered as paid
  (:func:`mark_bill_paid`); an unknown or void bill is logged and left alone.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import structlog
from sqlalchemy import Select, select, update
from sqlalchemy.orm import Session, selectinload

from gateway.core.access import Principal, customer_clause, get_customer, require_admin
from gateway.core.billing import rules
from gateway.core.billing.deliveries import write_deliveries
from gateway.core.billing.drafts import due_date, is_overdue
from gateway.core.billing.rules import Period
from gateway.core.models import Adjustment, Bill, BillKind, BillStatus, Customer, Delivery, DeliveryStatus
from gateway.core.text import check_text
from gateway.errors import Conflict, DomainError, NotFound

log = structlog.get_logger(__name__)

ADJUSTMENT_KINDS = ("charge", "discount", "credit")


def bills_query(principal: Principal) -> Select[Bill]:
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
) -> Select[Bill]:
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


def adjustments_select(
    principal: Principal, *, customer_id: int | None = None, pending: bool = True
) -> Select[Adjustment]:
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
    bill.issued_on = rules.local_day(now, customer.timezone)
    bill.due_on = due_date(bill.issued_on, due_days)
    bill.status = BillStatus.ISSUED
    bill.finalized_at = now
    session.flush()
    write_deliveries(session, [(bill.id, bill.customer_id, bill.kind, bill.source_id,
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
        if is_overdue(bill.due_on, rules.local_day(now, tz)):
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
    check_text(description, field="description", what="the description", multiline=True)
    adjustment = Adjustment(customer_id=customer.id, kind=kind, description=description[:500], amount=value,
                            currency=currency, created_at=now)
    session.add(adjustment)
    session.flush()
    return adjustment


def credit_bill(session: Session, principal: Principal, bill_id: int, *, amount: Any, reason: str, now: datetime) -> Adjustment:
    """A correction of an issued or paid bill: a credit line on the customer's next bill, never an edit."""
    require_admin(principal, "bill")
    check_text(reason or "", field="reason", what="the reason", multiline=True)
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


def _credits_of(bill: Bill) -> Select[Adjustment]:
    """The credits made for ``bill`` (pending or applied): the customer's credits that name its number."""
    return select(Adjustment).where(
        Adjustment.customer_id == bill.customer_id, Adjustment.kind == "credit",
        Adjustment.description.startswith(f"Credit for {bill.number}:", autoescape=True),
    ).order_by(Adjustment.id)


def mark_bill_paid(session: Session, connection: str, invoice_external_id: str, *, paid_at: datetime) -> Bill | None:
    """Mark the bill delivered to ``connection`` as ``invoice_external_id`` paid; None if unknown or void."""
    delivery = session.scalars(
        select(Delivery)
        .where(Delivery.connection == connection, Delivery.external_id == invoice_external_id)
        .order_by(Delivery.id)
    ).first()
    if delivery is None:
        log.info("webhook.invoice_unknown", connection=connection, invoice=invoice_external_id)
        return None
    bill = session.get(Bill, delivery.bill_id)
    if bill is None or bill.status == BillStatus.VOID:
        log.warning(
            "webhook.invoice_paid_ignored", connection=connection, invoice=invoice_external_id, reason="bill is void"
        )
        return None
    if bill.status != BillStatus.PAID:
        bill.status = BillStatus.PAID
        bill.paid_at = paid_at
        log.info("bill.paid", bill=bill.number, connection=connection, invoice=invoice_external_id)
    return bill

"""Billing as JSON resources under ``/api/v1/``: plans, associations, bills, adjustments, runs, monthly billing.

Every handler is a thin shell over the use cases of :mod:`gateway.core.billing`, the
functions the CLI calls, with the caller's principal. S8: a customer admin reads the plans,
associations, bills, documents and adjustments of their own customers; every
other id, and every change, answers 404 as if it did not exist. Runs bill the
caller's partner only; the bills they issue are e-mailed by the scheduler's
billing job (or ``gateway bills email``), not inside the request.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Literal
from urllib.parse import quote

from aiohttp import web
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from gateway.core import store
from gateway.core.access import require_admin
from gateway.core.billing import associations, lifecycle, reports, rules, subscriptions
from gateway.core.billing import plans as billing_plans
from gateway.core.billing import run as billing_run
from gateway.core.billing.documents import csv as csv_docs
from gateway.core.billing.drafts import BillDraft
from gateway.core.models import (
    Adjustment,
    Bill,
    BillingCycle,
    BillKind,
    BillStatus,
    Customer,
    MonthlySubscription,
    Partner,
    PlanAssociation,
    ServicePlan,
)
from gateway.errors import NotFound
from gateway.sync.jobs import bill_built_lines
from gateway.web.api import (
    MAX_PATH_ID,
    Body,
    Routes,
    gateway_of,
    in_db,
    principal_of,
    read_body,
    read_query,
    respond,
)
from gateway.web.openapi import Download
from gateway.web.pagination import Page, PageParams, page
from gateway.web.types import Currency, Email, Id, Money, Period, SignedMoney, TimeZone

routes = Routes(tag="billing")

CSV, PDF = "text/csv", "application/pdf"
MONTH_PATTERN = r"^[0-9]{4}-[0-9]{2}$"  # ASCII digits: \d would take any script's digits


# --- models -------------------------------------------------------------------------------------


class PriceOut(BaseModel):
    #: null: the plan's first price, in force since the start.
    effective_from: date | None
    price_per_device: Decimal


class PlanOut(BaseModel):
    id: int
    name: str
    price_per_device: Decimal
    currency: str
    created_at: datetime
    archived_at: datetime | None
    prices: list[PriceOut]


class AssociationOut(BaseModel):
    id: int
    plan_id: int
    customer_id: int
    cycle: BillingCycle
    starts_on: date
    #: S6: no bill for cycles after the one containing this day.
    ends_on: date | None
    due_days: int
    email: str
    created_at: datetime


class AssociationsOut(BaseModel):
    items: list[AssociationOut]


class LineOut(BaseModel):
    position: int
    kind: str
    description: str
    quantity: Decimal
    unit_price: Decimal
    amount: Decimal


class BillOut(BaseModel):
    id: int
    number: str
    customer_id: int
    kind: BillKind
    source_id: int
    period_start: date
    period_end: date
    currency: str
    device_count: int
    total: Decimal
    status: BillStatus
    issued_on: date
    due_on: date
    email: str | None
    emailed_at: datetime | None
    email_attempts: int
    email_error: str | None
    paid_at: datetime | None
    voided_at: datetime | None
    lines: list[LineOut]


class AdjustmentOut(BaseModel):
    id: int
    customer_id: int
    kind: str
    description: str
    amount: Decimal
    currency: str
    created_at: datetime
    applied_to_bill_id: int | None


class DraftLineOut(BaseModel):
    kind: str
    description: str
    quantity: Decimal
    unit_price: Decimal
    amount: Decimal


class DraftOut(BaseModel):
    #: null in a dry run: numbers are taken only when bills are saved.
    number: str | None
    customer_id: int
    customer_name: str
    kind: BillKind
    source_id: int
    period_start: date
    period_end: date
    currency: str
    device_count: int
    total: Decimal
    issued_on: date
    due_on: date
    lines: list[DraftLineOut]


class RunOut(BaseModel):
    dry_run: bool
    bills: list[DraftOut]
    bill_ids: list[int]
    #: Due cycles that already had a bill and were left unchanged.
    already_billed: int


class SubscriptionOut(BaseModel):
    partner_id: int
    enabled_at: datetime
    timezone: str
    price_per_device: Decimal
    currency: str
    #: M4: the first recurring charge (after the first full month).
    first_charge_on: date
    #: M8: the last day of service chosen when cancelling.
    ends_on: date | None
    #: M8: reactivation is possible until this day.
    final_billing_date: date | None
    cancelled_at: datetime | None


class EnableOut(BaseModel):
    subscription: SubscriptionOut
    activation_bill: BillOut


class AffectedWorkspaceOut(BaseModel):
    workspace_id: int
    workspace: str
    customer: str
    devices: list[str]


class CancellationOut(BaseModel):
    offered_end_dates: list[date]
    ends_on: date | None
    #: False: nothing changed yet; repeat with an offered ``ends_on`` and ``confirm: true``.
    confirmed: bool
    workspaces: list[AffectedWorkspaceOut]


class ReleasedLicenseOut(BaseModel):
    key: str
    expires_at: datetime | None
    recyclable: bool = Field(description="its unused period may serve a different workspace (key never exposed)")


class CustomerPriceStartOut(BaseModel):
    customer_id: int
    customer: str
    effective_from: date = Field(description="the customer-local day this customer takes the new price from")
    billed_through: date | None = Field(description="set when the day reached into a billed cycle (deferred)")
    deferred: bool = Field(description="the new price starts with this customer's next cycle")


class PriceChangeOut(PlanOut):
    effective_from: date = Field(description="the plan-wide day (for customers associated later)")
    customers: list[CustomerPriceStartOut]


class JoinedWorkspaceOut(BaseModel):
    workspace_id: int
    name: str
    monthly_billing_since: date
    max_devices: int | None
    edition_id: int | None
    released_license: ReleasedLicenseOut | None = Field(
        default=None, description="the license joining replaced (M2): released, its period keeps running")


class LeavingWorkspaceOut(BaseModel):
    workspace_id: int
    workspace: str
    last_day: date = Field(description="its last (billed) day on the plan, customer-local")
    devices: list[str]
    #: False: nothing changed yet; repeat with ``confirm: true``.
    confirmed: bool


class HistoryEntryOut(BaseModel):
    month: str
    kind: str
    bills: int
    devices: int
    total: Decimal
    currency: str
    paid: bool


class HistoryOut(BaseModel):
    items: list[HistoryEntryOut]


class PlanQuery(PageParams):
    include_archived: bool = False


class AssociationQuery(PageParams):
    plan_id: Id | None = None
    customer_id: Id | None = None


class BillQuery(PageParams):
    customer_id: Id | None = None
    status: BillStatus | None = None
    kind: BillKind | None = None


class AdjustmentQuery(PageParams):
    customer_id: Id | None = None
    pending: bool = Field(default=True, description="only those not yet on a bill")


class DocumentQuery(BaseModel):
    format: Literal["csv", "pdf"] = "pdf"


class UsageQuery(BaseModel):
    period: Period = Field(description="the month, YYYY-MM")


class PlanBody(Body):
    name: str = Field(min_length=1, max_length=200)
    price_per_device: Money
    currency: Currency


class PriceBody(Body):
    price_per_device: Money
    effective_from: date | None = Field(
        default=None, description="first (customer-local) day; default: today in each customer's zone")


class AssociationBody(Body):
    plan_id: Id
    customer_ids: list[Id] = Field(min_length=1, max_length=1000)
    cycle: BillingCycle
    starts_on: date
    due_days: int | None = Field(default=None, ge=0, le=365, description="default: the configured due days")
    email: Email = Field(description="where the bills are sent")


class DissociateBody(Body):
    customer_ids: list[Id] = Field(min_length=1, max_length=1000)


class CreditBody(Body):
    amount: Money = Field(gt=0, description="more than 0, as a decimal string")
    reason: str = Field(min_length=1, max_length=400)


class AdjustmentBody(Body):
    customer_id: Id
    kind: Literal["charge", "discount", "credit"]
    description: str = Field(min_length=1, max_length=500)
    amount: SignedMoney
    currency: Currency


class RunBody(Body):
    period: Period | None = Field(default=None,
                                  description="bill the cycles ending in this month (default: every due cycle)")
    dry_run: bool = Field(default=False, description="compute and show the bills, save nothing")
    draft: bool = Field(default=False, description="save as drafts, to be issued one by one")


class EnableBody(Body):
    timezone: TimeZone = Field(default="UTC", description="the partner's billing time zone (IANA)")


class CancelBody(Body):
    ends_on: date | None = Field(default=None, description="one of the offered end dates")
    confirm: bool = Field(default=False, description="end every monthly license on that date (M8)")


class JoinBody(Body):
    workspace_id: Id
    max_devices: int = Field(ge=1, le=1_000_000)
    edition_id: Id | None = None
    key_exposed: bool = Field(default=False, description="the license key reached end users: not recycled (M2)")


class LeaveBody(Body):
    confirm: bool = Field(default=False, description="end the workspace's monthly license today (M2)")


# --- conversions ----------------------------------------------------------------------------------


def _money(amount: Decimal, currency: str) -> Decimal:
    return amount.quantize(Decimal(1).scaleb(-rules.minor_units(currency)))


def _plain(value: Decimal) -> Decimal:
    """10.0000 -> 10, 1.4516 stays (never an exponent such as 1E+1)."""
    return Decimal(f"{value.normalize():f}")


def _plan(session: Session, plan: ServicePlan) -> dict[str, Any]:
    prices = [{"effective_from": None if p.effective_from == billing_plans.SINCE_ALWAYS else p.effective_from,
               "price_per_device": p.price} for p in billing_plans.plan_prices(session, plan.id)]
    return {"id": plan.id, "name": plan.name, "price_per_device": plan.price_per_device, "currency": plan.currency,
            "created_at": plan.created_at, "archived_at": plan.archived_at, "prices": prices}


def _association(association: PlanAssociation) -> dict[str, Any]:
    return {name: getattr(association, name) for name in AssociationOut.model_fields}


def _bill(bill: Bill) -> dict[str, Any]:
    data = {name: getattr(bill, name) for name in BillOut.model_fields if name != "lines"}
    data["total"] = _money(bill.total, bill.currency)
    data["lines"] = [{"position": line.position, "kind": line.kind, "description": line.description,
                      "quantity": _plain(line.quantity), "unit_price": _plain(line.unit_price),
                      "amount": _money(line.amount, bill.currency)} for line in bill.lines]
    return data


def _adjustment(adjustment: Adjustment) -> dict[str, Any]:
    data = {name: getattr(adjustment, name) for name in AdjustmentOut.model_fields}
    data["amount"] = _money(adjustment.amount, adjustment.currency)
    return data


def _draft(draft: BillDraft) -> dict[str, Any]:
    return {"number": draft.number, "customer_id": draft.customer_id, "customer_name": draft.customer_name,
            "kind": draft.kind, "source_id": draft.source_id, "period_start": draft.period.start,
            "period_end": draft.period.end, "currency": draft.currency, "device_count": draft.device_count,
            "total": draft.total, "issued_on": draft.issued_on, "due_on": draft.due_on,
            "lines": [{"kind": line.kind, "description": line.description, "quantity": line.quantity,
                       "unit_price": line.unit_price, "amount": line.amount} for line in draft.lines]}


def _subscription(sub: MonthlySubscription) -> dict[str, Any]:
    enabled_on = rules.local_day(sub.enabled_at, sub.timezone)
    return {"partner_id": sub.partner_id, "enabled_at": sub.enabled_at, "timezone": sub.timezone,
            "price_per_device": sub.price_per_device, "currency": sub.currency,
            "first_charge_on": rules.first_charge_date(enabled_on), "ends_on": sub.ends_on,
            "final_billing_date": rules.final_billing_date(sub.ends_on) if sub.ends_on else None,
            "cancelled_at": sub.cancelled_at}


def _cancellation(plan: subscriptions.CancellationPlan) -> dict[str, Any]:
    return {"offered_end_dates": plan.offered_end_dates, "ends_on": plan.ends_on, "confirmed": plan.confirmed,
            "workspaces": [vars(w) for w in plan.workspaces]}


def _int_path(request: web.Request, name: str) -> int:
    raw = request.match_info[name]
    # ASCII digits only: str.isdigit() also takes '²' (int() then fails) and '١' (int() reads 1).
    if not (raw.isascii() and raw.isdigit()) or int(raw) > MAX_PATH_ID:  # past any integer column: no row
        raise NotFound(f"no {name.removesuffix('_id')} with id {raw!r}", field=name)
    return int(raw)


def content_disposition(filename: str) -> str:
    """RFC 6266: ``attachment`` with an ASCII ``filename`` fallback (nothing that could end the quoted string
    or the header) and the exact name as ``filename*`` (RFC 5987 UTF-8 percent-encoding)."""
    fallback = re.sub(r"[^A-Za-z0-9._-]", "_", filename) or "download"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def _file(data: bytes, media_type: str, filename: str) -> web.Response:
    return web.Response(body=data, content_type=media_type,
                        headers={"Content-Disposition": content_disposition(filename)})


# --- plans (S1, S6, S7) ------------------------------------------------------------------------------


@routes.get("/plans", summary="service plans (S1)", query=PlanQuery, response=Page[PlanOut])
async def list_plans(request: web.Request) -> web.Response:
    params = read_query(request, PlanQuery)
    principal = principal_of(request)

    def work(session: Session) -> tuple[list[dict[str, Any]], int]:
        stmt = billing_plans.plans_select(principal, include_archived=params.include_archived)
        plans, total = store.paged(session, stmt, limit=params.limit, offset=params.offset)
        return [_plan(session, p) for p in plans], total

    items, total = await in_db(request, work)
    return respond(Page[PlanOut], page(request, items, total, params))


@routes.post("/plans", summary="create a service plan: a price per device per cycle (S1)", body=PlanBody,
             response=PlanOut, status=201)
async def create_plan(request: web.Request) -> web.Response:
    body = await read_body(request, PlanBody)
    gw, principal = gateway_of(request), principal_of(request)

    def work(session: Session) -> dict[str, Any]:
        plan = billing_plans.create_plan(session, principal, name=body.name, price_per_device=body.price_per_device,
                                         currency=body.currency, now=gw.clock.now())
        return _plan(session, plan)

    return respond(PlanOut, await in_db(request, work), status=201)


@routes.get("/plans/{plan_id}", summary="one plan and its price history", response=PlanOut)
async def get_plan(request: web.Request) -> web.Response:
    principal, plan_id = principal_of(request), _int_path(request, "plan_id")
    return respond(PlanOut, await in_db(request, lambda s: _plan(s, billing_plans.get_plan(s, principal, plan_id))))


@routes.post("/plans/{plan_id}/prices", summary="change the price from a day on, prorated by days (S7)",
             body=PriceBody, response=PriceChangeOut)
async def change_price(request: web.Request) -> web.Response:
    body = await read_body(request, PriceBody)
    gw, principal, plan_id = gateway_of(request), principal_of(request), _int_path(request, "plan_id")

    def work(session: Session) -> dict[str, Any]:
        now = gw.clock.now()
        change = billing_plans.change_price(session, principal, plan_id, price_per_device=body.price_per_device,
                                            effective_from=body.effective_from, now=now)
        return {**_plan(session, change.plan), "effective_from": change.effective_from,
                "customers": [{"customer_id": c.customer_id, "customer": c.customer,
                               "effective_from": c.effective_from, "billed_through": c.billed_through,
                               "deferred": c.deferred} for c in change.customers]}

    return respond(PriceChangeOut, await in_db(request, work))


@routes.post("/plans/{plan_id}/archive", summary="archive a plan with no open association", response=PlanOut)
async def archive_plan(request: web.Request) -> web.Response:
    gw, principal, plan_id = gateway_of(request), principal_of(request), _int_path(request, "plan_id")

    def work(session: Session) -> dict[str, Any]:
        return _plan(session, billing_plans.archive_plan(session, principal, plan_id, now=gw.clock.now()))

    return respond(PlanOut, await in_db(request, work))


@routes.post("/plans/{plan_id}/dissociate", summary="remove customers from a plan after their current cycle (S6)",
             body=DissociateBody, response=AssociationsOut)
async def dissociate(request: web.Request) -> web.Response:
    body = await read_body(request, DissociateBody)
    gw, principal, plan_id = gateway_of(request), principal_of(request), _int_path(request, "plan_id")

    def work(session: Session) -> dict[str, Any]:
        ended = associations.dissociate(session, principal, plan_id=plan_id, customer_ids=body.customer_ids,
                                        now=gw.clock.now())
        return {"items": [_association(a) for a in ended]}

    return respond(AssociationsOut, await in_db(request, work))


# --- associations (S2) --------------------------------------------------------------------------------


@routes.get("/associations", summary="which customers the plans bill, how often, to whom (S2)",
            query=AssociationQuery, response=Page[AssociationOut])
async def list_associations(request: web.Request) -> web.Response:
    params = read_query(request, AssociationQuery)
    principal = principal_of(request)

    def work(session: Session) -> tuple[list[dict[str, Any]], int]:
        stmt = associations.associations_select(principal, plan_id=params.plan_id, customer_id=params.customer_id)
        rows, total = store.paged(session, stmt, limit=params.limit, offset=params.offset)
        return [_association(a) for a in rows], total

    items, total = await in_db(request, work)
    return respond(Page[AssociationOut], page(request, items, total, params))


@routes.post("/associations", summary="associate a plan with customers (S2; needs the mail settings)",
             body=AssociationBody, response=AssociationsOut, status=201)
async def associate(request: web.Request) -> web.Response:
    body = await read_body(request, AssociationBody)
    gw, principal = gateway_of(request), principal_of(request)

    def work(session: Session) -> dict[str, Any]:
        due_days = body.due_days if body.due_days is not None else gw.settings.billing.default_due_days
        created = associations.associate(session, principal, plan_id=body.plan_id, customer_ids=body.customer_ids,
                                         cycle=body.cycle, starts_on=body.starts_on, due_days=due_days,
                                         email=body.email, mail=gw.settings.mail, now=gw.clock.now())
        return {"items": [_association(a) for a in created]}

    return respond(AssociationsOut, await in_db(request, work), status=201)


@routes.get("/associations/{association_id}", summary="one plan association", response=AssociationOut)
async def get_association(request: web.Request) -> web.Response:
    principal, association_id = principal_of(request), _int_path(request, "association_id")
    return respond(AssociationOut,
                   await in_db(request,
                               lambda s: _association(associations.get_association(s, principal, association_id))))


# --- bills (S3, S5) ---------------------------------------------------------------------------------------


@routes.get("/bills", summary="bills, newest cycle first (S3)", query=BillQuery, response=Page[BillOut])
async def list_bills(request: web.Request) -> web.Response:
    params = read_query(request, BillQuery)
    principal = principal_of(request)

    def work(session: Session) -> tuple[list[dict[str, Any]], int]:
        stmt = lifecycle.bills_select(principal, customer_id=params.customer_id, status=params.status, kind=params.kind)
        rows, total = store.paged(session, stmt, limit=params.limit, offset=params.offset)
        return [_bill(b) for b in rows], total

    items, total = await in_db(request, work)
    return respond(Page[BillOut], page(request, items, total, params))


@routes.get("/bills/{bill_id}", summary="one bill with its lines (S3)", response=BillOut)
async def get_bill(request: web.Request) -> web.Response:
    principal, bill_id = principal_of(request), _int_path(request, "bill_id")
    return respond(BillOut, await in_db(request, lambda s: _bill(lifecycle.get_bill(s, principal, bill_id))))


@routes.get("/bills/{bill_id}/document", summary="the bill as CSV or PDF (S5)", query=DocumentQuery,
            response=Download((CSV, PDF)))
async def bill_document(request: web.Request) -> web.Response:
    params = read_query(request, DocumentQuery)
    principal, bill_id = principal_of(request), _int_path(request, "bill_id")

    def work(session: Session) -> tuple[bytes, str]:
        bill = lifecycle.get_bill(session, principal, bill_id)
        customer = session.get_one(Customer, bill.customer_id)
        if params.format == "csv":
            return csv_docs.bill_csv(bill, customer), bill.number
        from gateway.core.billing.documents import pdf as pdf_docs  # fpdf2 loads with the first PDF, not at start-up

        return pdf_docs.bill_pdf(bill, customer, session.get_one(Partner, bill.partner_id)), bill.number

    data, number = await in_db(request, work)
    return _file(data, CSV if params.format == "csv" else PDF, f"{number}.{params.format}")


@routes.get("/customers/{customer_id}/consolidated-bill", summary="every bill of a customer as CSV or PDF (S5)",
            query=DocumentQuery, response=Download((CSV, PDF)))
async def consolidated_bill(request: web.Request) -> web.Response:
    params = read_query(request, DocumentQuery)
    principal, customer_id = principal_of(request), _int_path(request, "customer_id")

    def work(session: Session) -> bytes:
        customer, bills = lifecycle.customer_bills(session, principal, customer_id)
        if params.format == "csv":
            return csv_docs.consolidated_csv(customer, bills)
        from gateway.core.billing.documents import pdf as pdf_docs  # fpdf2 loads with the first PDF, not at start-up

        return pdf_docs.consolidated_pdf(customer, session.get_one(Partner, principal.partner_id), bills)

    data = await in_db(request, work)
    return _file(data, CSV if params.format == "csv" else PDF, f"bills-customer-{customer_id}.{params.format}")


async def _bill_change(request: web.Request, change: Any) -> web.Response:
    gw, principal, bill_id = gateway_of(request), principal_of(request), _int_path(request, "bill_id")

    def work(session: Session) -> dict[str, Any]:
        changed = change(session, principal, bill_id, now=gw.clock.now())
        session.flush()
        return _bill(lifecycle.get_bill(session, principal, changed.id))

    return respond(BillOut, await in_db(request, work))


@routes.post("/bills/{bill_id}/paid", summary="mark paid; a paid bill never changes again (S3)", response=BillOut)
async def mark_paid(request: web.Request) -> web.Response:
    return await _bill_change(request, lifecycle.mark_paid)


@routes.post("/bills/{bill_id}/void", summary="void an unpaid bill; its number is not reused", response=BillOut)
async def void_bill(request: web.Request) -> web.Response:
    return await _bill_change(request, lifecycle.void_bill)


@routes.post("/bills/{bill_id}/finalize", summary="issue a draft and queue it for the PSAs (G2)", response=BillOut)
async def finalize_bill(request: web.Request) -> web.Response:
    return await _bill_change(request, lifecycle.finalize_bill)


@routes.post("/bills/{bill_id}/credit", summary="correct a bill with a credit on the customer's next bill",
             body=CreditBody, response=AdjustmentOut, status=201)
async def credit_bill(request: web.Request) -> web.Response:
    body = await read_body(request, CreditBody)
    gw, principal, bill_id = gateway_of(request), principal_of(request), _int_path(request, "bill_id")

    def work(session: Session) -> dict[str, Any]:
        return _adjustment(lifecycle.credit_bill(session, principal, bill_id, amount=body.amount, reason=body.reason,
                                                 now=gw.clock.now()))

    return respond(AdjustmentOut, await in_db(request, work), status=201)


# --- adjustments (S3) -----------------------------------------------------------------------------------


@routes.get("/adjustments", summary="charges, discounts and credits for the next bills (S3)",
            query=AdjustmentQuery, response=Page[AdjustmentOut])
async def list_adjustments(request: web.Request) -> web.Response:
    params = read_query(request, AdjustmentQuery)
    principal = principal_of(request)

    def work(session: Session) -> tuple[list[dict[str, Any]], int]:
        stmt = lifecycle.adjustments_select(principal, customer_id=params.customer_id, pending=params.pending)
        rows, total = store.paged(session, stmt, limit=params.limit, offset=params.offset)
        return [_adjustment(a) for a in rows], total

    items, total = await in_db(request, work)
    return respond(Page[AdjustmentOut], page(request, items, total, params))


@routes.post("/adjustments", summary="a one-off charge, discount or credit for the customer's next bill (S3)",
             body=AdjustmentBody, response=AdjustmentOut, status=201)
async def add_adjustment(request: web.Request) -> web.Response:
    body = await read_body(request, AdjustmentBody)
    gw, principal = gateway_of(request), principal_of(request)

    def work(session: Session) -> dict[str, Any]:
        return _adjustment(lifecycle.add_adjustment(session, principal, customer_id=body.customer_id, kind=body.kind,
                                                    description=body.description, amount=body.amount,
                                                    currency=body.currency, now=gw.clock.now()))

    return respond(AdjustmentOut, await in_db(request, work), status=201)


# --- runs ---------------------------------------------------------------------------------------------------


@routes.post("/billing/runs", summary="build the partner's due bills once (or show them: dry_run)", body=RunBody,
             response=RunOut)
async def run_billing(request: web.Request) -> web.Response:
    body = await read_body(request, RunBody)
    gw, principal = gateway_of(request), principal_of(request)

    def work(session: Session) -> dict[str, Any]:
        require_admin(principal, "billing run")
        period = rules.parse_month(body.period) if body.period else None
        now = gw.clock.now()
        if not body.dry_run:
            lifecycle.mark_overdue(session, now=now, partner_id=principal.partner_id)
        run = billing_run.run_billing(session, now=now, billing=gw.settings.billing,
                                      extra_lines=bill_built_lines(gw.plugins), period=period, dry_run=body.dry_run,
                                      issue=not body.draft, partner_id=principal.partner_id)
        return {"dry_run": run.dry_run, "bills": [_draft(d) for d in run.drafts], "bill_ids": run.bill_ids,
                "already_billed": run.already_billed}

    return respond(RunOut, await in_db(request, work))


# --- monthly billing (M1-M8) ------------------------------------------------------------------------------


@routes.get("/billing/monthly", summary="the partner's monthly billing subscription (M1, M4, M8)",
            response=SubscriptionOut)
async def get_subscription(request: web.Request) -> web.Response:
    principal = principal_of(request)
    return respond(SubscriptionOut,
                   await in_db(request, lambda s: _subscription(subscriptions.get_subscription(s, principal))))


@routes.post("/billing/monthly", summary="enable monthly billing with the activation payment (M1, M2)",
             body=EnableBody, response=EnableOut, status=201)
async def enable_monthly(request: web.Request) -> web.Response:
    body = await read_body(request, EnableBody)
    gw, principal = gateway_of(request), principal_of(request)

    def work(session: Session) -> dict[str, Any]:
        sub, bill = subscriptions.enable_monthly(session, principal, settings=gw.settings.billing, now=gw.clock.now(),
                                                 tz=body.timezone, extra_lines=bill_built_lines(gw.plugins))
        session.flush()
        return {"subscription": _subscription(sub),
                "activation_bill": _bill(lifecycle.get_bill(session, principal, bill.id))}

    return respond(EnableOut, await in_db(request, work), status=201)


@routes.post("/billing/monthly/cancel", summary="cancel at an offered end date; lists what ends, needs confirm (M8)",
             body=CancelBody, response=CancellationOut)
async def cancel_monthly(request: web.Request) -> web.Response:
    body = await read_body(request, CancelBody)
    gw, principal = gateway_of(request), principal_of(request)

    def work(session: Session) -> dict[str, Any]:
        return _cancellation(subscriptions.cancel_monthly(session, principal, now=gw.clock.now(), ends_on=body.ends_on,
                                                          confirm=body.confirm))

    return respond(CancellationOut, await in_db(request, work))


@routes.post("/billing/monthly/reactivate", summary="undo a cancellation before the final billing date (M8)",
             response=SubscriptionOut)
async def reactivate_monthly(request: web.Request) -> web.Response:
    gw, principal = gateway_of(request), principal_of(request)
    return respond(SubscriptionOut, await in_db(
        request, lambda s: _subscription(subscriptions.reactivate_monthly(s, principal, now=gw.clock.now()))))


@routes.post("/billing/monthly/workspaces", summary="put a workspace on monthly billing (M2)", body=JoinBody,
             response=JoinedWorkspaceOut, status=201)
async def join_monthly(request: web.Request) -> web.Response:
    body = await read_body(request, JoinBody)
    gw, principal = gateway_of(request), principal_of(request)

    def work(session: Session) -> dict[str, Any]:
        joined = subscriptions.join_monthly(session, principal, workspace_id=body.workspace_id,
                                            max_devices=body.max_devices, edition_id=body.edition_id,
                                            now=gw.clock.now(), key_exposed=body.key_exposed)
        workspace = joined.workspace
        return {"workspace_id": workspace.id, "name": workspace.name,
                "monthly_billing_since": workspace.monthly_billing_since, "max_devices": workspace.max_devices,
                "edition_id": workspace.edition_id,
                "released_license": vars(joined.released) if joined.released else None}

    return respond(JoinedWorkspaceOut, await in_db(request, work), status=201)


@routes.post("/billing/monthly/workspaces/{workspace_id}/leave",
             summary="take one workspace off monthly billing today; lists its devices, needs confirm (M2)",
             body=LeaveBody, response=LeavingWorkspaceOut)
async def leave_monthly(request: web.Request) -> web.Response:
    workspace_id = _int_path(request, "workspace_id")
    body = await read_body(request, LeaveBody)
    gw, principal = gateway_of(request), principal_of(request)

    def work(session: Session) -> dict[str, Any]:
        return vars(subscriptions.leave_monthly(session, principal, workspace_id=workspace_id, now=gw.clock.now(),
                                                confirm=body.confirm))

    return respond(LeavingWorkspaceOut, await in_db(request, work))


@routes.get("/billing/history", summary="every past payment of monthly billing (M7)",
            response=HistoryOut)
async def billing_history(request: web.Request) -> web.Response:
    principal = principal_of(request)
    return respond(HistoryOut,
                   await in_db(request, lambda s: {"items": [vars(e) for e in reports.billing_history(s, principal)]}))


@routes.get("/billing/usage", summary="a month's device usage report as CSV, one row per billed device (M7)",
            query=UsageQuery, response=Download((CSV,)))
async def usage_report(request: web.Request) -> web.Response:
    params = read_query(request, UsageQuery)
    principal = principal_of(request)
    month = rules.parse_month(params.period)
    data = await in_db(request, lambda s: csv_docs.usage_csv(reports.usage_rows(s, principal, month)))
    return _file(data, CSV, f"usage-{params.period}.csv")

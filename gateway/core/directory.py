"""Partners, customers and workspaces, and the mapping of PSA companies to customers.

The records every other rule hangs on. Creating them validates what a person
types (a time zone that exists, a name that is not taken) and says what to fix.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.core.models import Customer, ExternalMapping, MappingKind, Partner, Workspace
from gateway.core.text import check_text, check_zone
from gateway.errors import Conflict, DomainError, NotFound


def _name(value: str, what: str) -> str:
    value = (value or "").strip()
    if not value:
        raise DomainError(f"a {what} needs a name", field="name")
    if len(value) > 200:
        raise DomainError(f"a {what} name is at most 200 characters", field="name")
    return check_text(value, field="name", what=f"the {what} name")


#: A bill number starts with the prefix and appears in CSV cells, file names and e-mail subjects: letters,
#: digits and dashes only, so it can never be read as a spreadsheet formula or break a header.
INVOICE_PREFIX = re.compile(r"[A-Z0-9-]{1,16}")


def check_invoice_prefix(value: str) -> str:
    """The prefix, or a DomainError saying what a prefix may contain."""
    if not isinstance(value, str) or not INVOICE_PREFIX.fullmatch(value):
        shown = value if isinstance(value, str) and len(value) <= 40 else f"{str(value)[:40]}..."
        raise DomainError(
            f"invoice prefix {shown!r} is not allowed: use 1 to 16 capital letters, digits or dashes "
            "(for example INV or MSP-2026)",
            field="invoice_prefix",
        )
    return value


def create_partner(session: Session, *, name: str, now: datetime, email: str | None = None,
                   currency: str = "USD", invoice_prefix: str = "INV") -> Partner:
    """A new partner (MSP) with its own bill number sequence."""
    currency = (currency or "").upper()
    if len(currency) != 3 or not currency.isalpha():
        raise DomainError(f"currency {currency!r} is not an ISO 4217 code such as USD or EUR", field="currency")
    partner = Partner(name=_name(name, "partner"), email=email, currency=currency,
                      invoice_prefix=check_invoice_prefix(invoice_prefix), created_at=now)
    session.add(partner)
    session.flush()
    return partner


def only_partner(session: Session, partner_id: int | None = None) -> Partner:
    """The partner named, or the only one there is (a single-MSP install needs no --partner)."""
    if partner_id is not None:
        partner = session.get(Partner, partner_id)
        if partner is None:
            raise NotFound(f"no partner with id {partner_id}", field="partner_id")
        return partner
    partners = session.scalars(select(Partner).order_by(Partner.id).limit(2)).all()
    if not partners:
        raise NotFound("there is no partner yet; create one with 'gateway partners add NAME'")
    if len(partners) > 1:
        raise DomainError("there are several partners; say which with --partner ID", field="partner_id")
    return partners[0]


def create_customer(session: Session, partner: Partner, *, name: str, timezone: str, now: datetime,
                    billing_email: str | None = None) -> Customer:
    """A customer of ``partner``; its IANA time zone decides its days and billing cycles (S4)."""
    name = _name(name, "customer")
    check_zone(timezone, field="timezone")
    taken = session.scalar(select(Customer.id).where(Customer.partner_id == partner.id, Customer.name == name))
    if taken is not None:
        raise Conflict(f"customer {name!r} already exists (id {taken})", field="name")
    customer = Customer(partner_id=partner.id, name=name, timezone=timezone, billing_email=billing_email,
                        created_at=now)
    session.add(customer)
    session.flush()
    return customer


def create_workspace(session: Session, customer: Customer, *, name: str, now: datetime,
                     max_devices: int | None = None, edition_id: int | None = None) -> Workspace:
    """A workspace of ``customer``; ``max_devices`` is the M3 limit (None: none)."""
    name = _name(name, "workspace")
    if max_devices is not None and max_devices < 1:
        raise DomainError("max_devices must be at least 1, or left out for no limit", field="max_devices")
    taken = session.scalar(select(Workspace.id).where(Workspace.customer_id == customer.id, Workspace.name == name))
    if taken is not None:
        raise Conflict(f"customer {customer.name!r} already has a workspace {name!r} (id {taken})", field="name")
    workspace = Workspace(customer_id=customer.id, name=name, max_devices=max_devices, edition_id=edition_id,
                          created_at=now)
    session.add(workspace)
    session.flush()
    return workspace


def map_psa_company(session: Session, *, connection: str, external_id: str, customer_id: int | None,
                    now: datetime, name: str = "") -> ExternalMapping:
    """Map a PSA company to a customer (None: unmap); bills of the customer then go to that PSA (G2)."""
    if customer_id is not None and session.get(Customer, customer_id) is None:
        raise NotFound(f"no customer with id {customer_id}", field="customer_id")
    mapping = session.scalar(
        select(ExternalMapping).where(
            ExternalMapping.connection == connection,
            ExternalMapping.kind == MappingKind.PSA_COMPANY,
            ExternalMapping.external_id == external_id,
        )
    )
    if mapping is None:
        mapping = ExternalMapping(connection=connection, kind=MappingKind.PSA_COMPANY, external_id=external_id,
                                  external_name=name, first_seen_at=now, last_seen_at=now)
        session.add(mapping)
    mapping.customer_id = customer_id
    if name:
        mapping.external_name = name
    mapping.last_seen_at = now
    session.flush()
    return mapping


# --- changing and archiving (issue 15) -----------------------------------------------------------


def check_discount(value: Decimal | str | float | int) -> Decimal:
    """A partner's own discount in percent (L6: tier discounts apply on top of it)."""
    try:
        discount = Decimal(str(value))
    except InvalidOperation:
        raise DomainError(f"discount {value!r} is not a number; give a percentage such as 10", field="discount") from None
    if not discount.is_finite() or not Decimal("0") <= discount < Decimal("100"):
        raise DomainError(f"discount {value!r} must be a percentage from 0 up to (not including) 100", field="discount")
    if discount != discount.quantize(Decimal("0.01")):
        raise DomainError(f"discount {value!r} has more than two decimal places", field="discount")
    return discount


def _currency(value: str) -> str:
    currency = (value or "").upper()
    if len(currency) != 3 or not currency.isalpha() or not currency.isascii():
        raise DomainError(f"currency {value!r} is not an ISO 4217 code such as USD or EUR", field="currency")
    return currency


def update_partner(session: Session, partner: Partner, *, name: str | None = None, email: str | None = None,
                   discount: Decimal | str | None = None, invoice_prefix: str | None = None,
                   currency: str | None = None) -> Partner:
    """Change what is given. A new discount prices orders from now on; a new prefix or currency, bills from now on."""
    if name is not None:
        partner.name = _name(name, "partner")
    if email is not None:
        partner.email = email.strip() or None
    if discount is not None:
        partner.discount_percent = check_discount(discount)
    if invoice_prefix is not None:
        partner.invoice_prefix = check_invoice_prefix(invoice_prefix)
    if currency is not None:
        partner.currency = _currency(currency)
    session.flush()
    return partner


def partner_dict(partner: Partner) -> dict[str, Any]:
    return {"id": partner.id, "name": partner.name, "email": partner.email, "currency": partner.currency,
            "discount_percent": Decimal(partner.discount_percent).quantize(Decimal("0.01")),
            "invoice_prefix": partner.invoice_prefix, "created_at": partner.created_at}


def next_cycle_start(now: datetime, timezone: str) -> date:
    """The first local day of the customer's next monthly cycle (S4: cycles end at local midnight)."""
    today = now.astimezone(ZoneInfo(timezone)).date()
    return date(today.year + 1, 1, 1) if today.month == 12 else date(today.year, today.month + 1, 1)


def update_customer(session: Session, customer: Customer, *, now: datetime, name: str | None = None,
                    timezone: str | None = None, billing_email: str | None = None) -> Customer:
    """Change what is given; a new time zone waits for the next cycle (``pending_timezone`` from ``timezone_from``).

    S4 counts a cycle from local midnight to local midnight; switching zones in the middle of a cycle would
    move its ends and count a few hours twice or not at all, so the running cycle keeps the zone it began in.
    """
    if name is not None:
        name = _name(name, "customer")
        taken = session.scalar(select(Customer.id).where(Customer.partner_id == customer.partner_id,
                                                         Customer.name == name, Customer.id != customer.id))
        if taken is not None:
            raise Conflict(f"customer {name!r} already exists (id {taken})", field="name")
        customer.name = name
    if billing_email is not None:
        customer.billing_email = billing_email.strip() or None
    if timezone is not None:
        timezone = check_zone(timezone, field="timezone")
        if timezone == customer.timezone:
            customer.pending_timezone = customer.timezone_from = None
        else:
            customer.pending_timezone = timezone
            customer.timezone_from = next_cycle_start(now, customer.timezone)
    session.flush()
    return customer


def timezone_notice(customer: Customer) -> str | None:
    """What a pending time-zone change will do, in words (None: none pending)."""
    if not customer.pending_timezone or customer.timezone_from is None:
        return None
    return (f"the time zone changes from {customer.timezone} to {customer.pending_timezone} from the next cycle, "
            f"which starts {customer.timezone_from.isoformat()} (local midnight); the current cycle stays in "
            f"{customer.timezone} (S4)")


def apply_due_timezones(session: Session, now: datetime, *, waiting: frozenset[int] | set[int] = frozenset(),
                        partner_id: int | None = None) -> list[int]:
    """Switch customers whose next cycle has begun to their new zone, once their old cycle has been billed.

    Called at the end of a billing run: the cycle that ended in the old zone was billed (or is ``waiting``
    for a pull, M5, in which case the customer keeps its old zone until it is).
    """
    query = select(Customer).where(Customer.pending_timezone.is_not(None))
    if partner_id is not None:
        query = query.where(Customer.partner_id == partner_id)
    switched = []
    for customer in session.scalars(query):
        if customer.id in waiting or customer.timezone_from is None:
            continue
        if now.astimezone(ZoneInfo(customer.timezone)).date() >= customer.timezone_from:
            customer.timezone = str(customer.pending_timezone)
            customer.pending_timezone = customer.timezone_from = None
            switched.append(customer.id)
    session.flush()
    return switched


def archive_customer(session: Session, customer: Customer, *, now: datetime) -> Customer:
    """Archived: hidden from lists by default, nothing deleted (bills, licenses and history stay)."""
    if customer.archived_at is None:
        customer.archived_at = now
        session.flush()
    return customer


def customer_dict(customer: Customer) -> dict[str, Any]:
    return {"id": customer.id, "partner_id": customer.partner_id, "name": customer.name,
            "timezone": customer.timezone, "pending_timezone": customer.pending_timezone,
            "timezone_from": customer.timezone_from, "billing_email": customer.billing_email,
            "created_at": customer.created_at, "archived_at": customer.archived_at,
            "notice": timezone_notice(customer)}


def update_workspace(session: Session, workspace: Workspace, *, name: str | None = None,
                     max_devices: int | None = None, no_limit: bool = False) -> Workspace:
    """Change the name or the M3 maximum (``no_limit``: remove it). Devices already in stay in."""
    if name is not None:
        name = _name(name, "workspace")
        taken = session.scalar(select(Workspace.id).where(Workspace.customer_id == workspace.customer_id,
                                                          Workspace.name == name, Workspace.id != workspace.id))
        if taken is not None:
            raise Conflict(f"this customer already has a workspace {name!r} (id {taken})", field="name")
        workspace.name = name
    if no_limit:
        workspace.max_devices = None
    elif max_devices is not None:
        if max_devices < 1:
            raise DomainError("max_devices must be at least 1 (or remove the limit)", field="max_devices")
        workspace.max_devices = max_devices
    session.flush()
    return workspace


def workspace_dict(workspace: Workspace) -> dict[str, Any]:
    return {"id": workspace.id, "customer_id": workspace.customer_id, "name": workspace.name,
            "max_devices": workspace.max_devices, "edition_id": workspace.edition_id,
            "monthly_billing_since": workspace.monthly_billing_since,
            "monthly_billing_until": workspace.monthly_billing_until, "created_at": workspace.created_at}

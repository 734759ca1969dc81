"""Partners, customers and workspaces, and the mapping of PSA companies to customers.

The records every other rule hangs on. Creating them validates what a person
types (a time zone that exists, a name that is not taken) and says what to fix.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.core.models import Customer, ExternalMapping, MappingKind, Partner, Workspace
from gateway.core.settings import check_timezone
from gateway.errors import Conflict, DomainError, NotFound


def _name(value: str, what: str) -> str:
    value = (value or "").strip()
    if not value:
        raise DomainError(f"a {what} needs a name", field="name")
    if len(value) > 200:
        raise DomainError(f"a {what} name is at most 200 characters", field="name")
    return value


def create_partner(session: Session, *, name: str, now: datetime, email: str | None = None,
                   currency: str = "USD", invoice_prefix: str = "INV") -> Partner:
    """A new partner (MSP) with its own bill number sequence."""
    currency = (currency or "").upper()
    if len(currency) != 3 or not currency.isalpha():
        raise DomainError(f"currency {currency!r} is not an ISO 4217 code such as USD or EUR", field="currency")
    partner = Partner(name=_name(name, "partner"), email=email, currency=currency,
                      invoice_prefix=invoice_prefix, created_at=now)
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
    try:
        check_timezone(timezone)
    except ValueError as exc:
        raise DomainError(str(exc), field="timezone") from None
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

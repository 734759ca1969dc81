"""Buying keys (L5 one at a time, L6 in bulk) and the orders they place (L12).

Decisions the rules leave open:

- **Bulk** (L6, L14): bulk keys go to the partner's global pool; single purchases do not.
- **Orders** are in ``licensing.currency`` (the vendor's price list), not the partner's
  billing currency. :func:`place_order` is shared with paid renewals
  (:mod:`~gateway.core.licensing.renewal`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import structlog
from sqlalchemy.orm import Session

from gateway.core.access import Principal, get_partner, require_admin
from gateway.core.clock import Clock
from gateway.core.license_keys import new_key
from gateway.core.licensing.history import flush, record
from gateway.core.licensing.queries import get_edition
from gateway.core.licensing.rules import (
    MAX_BULK_KEYS,
    MAX_SEATS,
    MAX_TERM_MONTHS,
    check_notes,
    check_range,
    combine_discounts,
    discounted,
    list_price,
    price_currency,
    tier_discount,
    unit_price,
)
from gateway.core.models import Edition, License, Order, OrderKind, OrderLicense, Partner
from gateway.core.settings import LicensingSettings
from gateway.errors import DomainError

log = structlog.get_logger(__name__)


@dataclass
class Purchase:
    order: Order
    licenses: list[License]


def _new_license(
    partner: Partner, edition: Edition, seats: int, term_months: int, now: datetime, order: Order, *, in_pool: bool
) -> License:
    return License(
        key=new_key(),
        partner_id=partner.id,
        edition_id=edition.id,
        license_type=edition.license_type,
        seats=seats,
        term_months=term_months,
        purchased_at=now,
        notes="",
        auto_renew=True,
        in_pool=in_pool,
        order_id=order.id,
    )


def place_order(
    session: Session,
    partner: Partner,
    kind: OrderKind,
    now: datetime,
    actor: str,
    *,
    quantity: int,
    term_months: int,
    currency: str,
    list_total: Decimal,
    discount: Decimal,
) -> Order:
    """L12: record an order at ``list_total`` less ``discount`` percent (flushed, so it has an id)."""
    order = Order(
        partner_id=partner.id,
        kind=kind,
        placed_at=now,
        quantity=quantity,
        term_months=term_months,
        currency=currency,
        list_total=list_total,
        discount_percent=discount,
        total=discounted(list_total, discount),
        actor=actor,
    )
    session.add(order)
    session.flush()
    return order


def _issue(
    session: Session,
    partner: Partner,
    edition: Edition,
    order: Order,
    now: datetime,
    actor: str,
    *,
    count: int,
    seats: int,
    term_months: int,
    in_pool: bool,
    notes: str = "",
) -> list[License]:
    licenses = [_new_license(partner, edition, seats, term_months, now, order, in_pool=in_pool) for _ in range(count)]
    session.add_all(licenses)
    flush(session)
    for lic in licenses:
        if notes:
            lic.notes = notes
        session.add(OrderLicense(order_id=order.id, license_id=lic.id))
        record(session, lic, "purchased", actor, now, None, order_id=order.id, key=lic.key)
    flush(session)
    return licenses


def buy(
    session: Session,
    clock: Clock,
    config: LicensingSettings,
    principal: Principal,
    *,
    edition: str,
    seats: int,
    term_months: int,
    notes: str = "",
) -> Purchase:
    """L5: one purchase, one key, at the partner's discount."""
    require_admin(principal, "operation")
    check_range(seats, 1, MAX_SEATS, "seats", "seats")
    check_range(term_months, 1, MAX_TERM_MONTHS, "term_months", "term_months")
    check_notes(notes)
    now = clock.now()
    partner = get_partner(session, principal)
    ed = for_sale(get_edition(session, edition))
    list_total = list_price(unit_price(config, ed), seats, term_months, 1)
    order = place_order(
        session, partner, OrderKind.NEW, now, principal.name, quantity=1, term_months=term_months,
        currency=price_currency(config, ed), list_total=list_total, discount=Decimal(partner.discount_percent),
    )
    licenses = _issue(
        session, partner, ed, order, now, principal.name, count=1, seats=seats, term_months=term_months,
        in_pool=False, notes=notes,
    )
    log.info("license.bought", key=licenses[0].key, edition=ed.code, seats=seats, order=order.id)
    return Purchase(order, licenses)


def for_sale(edition: Edition) -> Edition:
    """An archived edition is sold no more (its licenses keep working and renew)."""
    if not edition.active:
        raise DomainError(f"edition {edition.code!r} is archived and no longer sold; "
                          f"reactivate it with 'gateway editions update {edition.code} --active'",
                          field="edition", code="edition_archived")
    return edition


def buy_bulk(
    session: Session,
    clock: Clock,
    config: LicensingSettings,
    principal: Principal,
    *,
    edition: str,
    customers: int,
    devices_per_customer: int,
    term_months: int,
) -> Purchase:
    """L6: one key per customer, each for ``devices_per_customer`` seats, into the global pool (L14)."""
    require_admin(principal, "operation")
    check_range(customers, 1, MAX_BULK_KEYS, "customers", "customers")
    check_range(devices_per_customer, 1, MAX_SEATS, "devices_per_customer", "devices_per_customer")
    check_range(term_months, 1, MAX_TERM_MONTHS, "term_months", "term_months")
    now = clock.now()
    partner = get_partner(session, principal)
    ed = for_sale(get_edition(session, edition))
    list_total = list_price(unit_price(config, ed), devices_per_customer, term_months, customers)
    discount = combine_discounts(Decimal(partner.discount_percent), tier_discount(config, customers))
    order = place_order(
        session, partner, OrderKind.BULK, now, principal.name, quantity=customers, term_months=term_months,
        currency=price_currency(config, ed), list_total=list_total, discount=discount,
    )
    licenses = _issue(
        session, partner, ed, order, now, principal.name, count=customers, seats=devices_per_customer,
        term_months=term_months, in_pool=True,
    )
    log.info("license.bulk_bought", edition=ed.code, keys=customers, order=order.id, discount=str(discount))
    return Purchase(order, licenses)

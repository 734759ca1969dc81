"""The order history (L12): every purchase and renewal of the partner, with its keys used or not.

Orders are placed by :mod:`~gateway.core.licensing.purchase` (and paid renewals); this
module only reads them, and only for the partner's admins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.orm import Session

from gateway.core.access import Principal, require_admin
from gateway.core.clock import Clock
from gateway.core.licensing.queries import like_pattern
from gateway.core.licensing.rules import CENT, license_status
from gateway.core.models import License, Order, OrderKind, OrderLicense
from gateway.core.settings import LicensingSettings
from gateway.errors import NotFound


@dataclass
class OrderInfo:
    """L12: an order and, for each of its keys, whether it is used."""

    order: Order
    keys: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        o = self.order
        used = sum(1 for k in self.keys if k["used"])
        return {
            "id": o.id,
            "kind": o.kind.value,
            "placed_at": o.placed_at,
            "quantity": o.quantity,
            "term_months": o.term_months,
            "currency": o.currency,
            # Stored with four places; shown as money and a percentage, whatever the database returned.
            "list_total": Decimal(o.list_total).quantize(CENT),
            "discount_percent": Decimal(o.discount_percent).quantize(CENT),
            "total": Decimal(o.total).quantize(CENT),
            "actor": o.actor,
            "used_keys": used,
            "unused_keys": len(self.keys) - used,
            "keys": self.keys,
        }


def list_orders(
    session: Session,
    clock: Clock,
    config: LicensingSettings,
    principal: Principal,
    *,
    kind: OrderKind | None = None,
    query: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[OrderInfo], int]:
    """L12: every purchase of the partner, newest first, with its keys used or not."""
    require_admin(principal, "order")
    where: list[ColumnElement[bool]] = [Order.partner_id == principal.partner_id]
    if kind is not None:
        where.append(Order.kind == kind)
    if query:
        pattern = like_pattern(query.strip())
        where.append(
            Order.id.in_(
                select(OrderLicense.order_id)
                .join(License, License.id == OrderLicense.license_id)
                .where(or_(License.key.ilike(pattern, escape="\\"), License.notes.ilike(pattern, escape="\\")))
            )
        )
    total = session.scalar(select(func.count()).select_from(Order).where(*where)) or 0
    orders = session.scalars(
        select(Order).where(*where).order_by(Order.placed_at.desc(), Order.id.desc()).limit(limit).offset(offset)
    ).all()
    return _order_infos(session, clock.now(), config, orders), total


def get_order(
    session: Session, clock: Clock, config: LicensingSettings, principal: Principal, order_id: int
) -> OrderInfo:
    require_admin(principal, "order")
    order = session.scalar(select(Order).where(Order.id == order_id, Order.partner_id == principal.partner_id))
    if order is None:
        raise NotFound(f"no order with id {order_id}", field="order_id")
    return _order_infos(session, clock.now(), config, [order])[0]


def _order_infos(
    session: Session, now: datetime, config: LicensingSettings, orders: Sequence[Order]
) -> list[OrderInfo]:
    keys: dict[int, list[dict[str, Any]]] = {order.id: [] for order in orders}
    rows = session.execute(
        select(OrderLicense.order_id, License)
        .join(License, License.id == OrderLicense.license_id)
        .where(OrderLicense.order_id.in_(list(keys)))
        .order_by(License.id)
    ).all()
    for order_id, lic in rows:
        keys[order_id].append(
            {
                "key": lic.key,
                "status": license_status(lic, now, config).value,
                # A key is used once activated, or consumed as a coupon.
                "used": lic.activated_at is not None or lic.consumed_at is not None,
            }
        )
    return [OrderInfo(order, keys[order.id]) for order in orders]

"""The outbox of the PSA pushes (G2): one delivery per bill and PSA connection, and what it sends.

A bill's deliveries are written in the bill's own transaction, one for each PSA
connection its customer is mapped to, so a bill is never issued without them
and never pushed before it is committed (the outbox worker in
:mod:`gateway.sync.outbox` sends them). Each carries a deterministic key
(:func:`delivery_key`) that is written into the PSA object, so a retried,
crashed or repeated push finds the object it created before.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from gateway.adapters import BillDocument, BillLineDoc
from gateway.core import store
from gateway.core.billing.rules import Period
from gateway.core.models import Bill, BillKind, Customer, Delivery, DeliveryStatus, ExternalMapping, MappingKind
from gateway.errors import NotFound


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
    if len(customer_ids) <= store.IN_LIMIT:
        stmt = stmt.where(ExternalMapping.customer_id.in_(customer_ids))
    result: dict[int, list[str]] = defaultdict(list)
    for customer_id, connection in store.plain_rows(session, stmt):
        if customer_id in customer_ids and connection not in result[customer_id]:
            result[customer_id].append(connection)
    return result


def write_deliveries(
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
    store.bulk_insert(session, Delivery.__table__,
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

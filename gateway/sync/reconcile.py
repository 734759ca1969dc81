"""Reconciliation (G3): what each PSA holds against what the gateway computed.

For every PSA connection and every bill of the period that has a delivery to
it, the PSA's record with the delivery key is read back and compared: device
count against quantity, bill total against amount. Every difference is reported
with both numbers. Also reported: bills the PSA does not hold, bills the PSA holds
more than once, void bills the PSA still holds, objects in the PSA that carry a
gateway key the gateway does not know, PSA companies mapped to no customer, and
customers billed in the period that have no PSA mapping.

A PSA returns one record per invoice or agreement addition, so one key can come
back several times: a duplicate invoice bills the customer twice. Records are
therefore grouped by key, never collapsed; a bill held more than once is one
``duplicate_in_psa`` difference listing every copy (its PSA id, quantity and
amount) beside the gateway's numbers, and is not compared copy by copy.

A connection whose adapter cannot be built (a bad option, a missing credential)
or whose PSA cannot be read is reported in ``errors`` as not reconciled, with the
exception's type and message (which by convention never carry a secret; known
credential values are masked anyway), and the other connections are still
reconciled (G5).

A cycle that starts in the period may end after it (quarterly, yearly: S2), so
the PSAs are read back up to the end of the longest such cycle; what they hold
for other cycles in that stretch is ignored unless its key is unknown.

It is handed what it uses: the session factory, the PSA connections, a builder
of their adapters (``psa_for``) and the ``gateway_notify`` hook (``notify``,
called once per difference).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from gateway.adapters import PsaAdapter, PsaRecord
from gateway.core.models import Bill, BillStatus, Customer, Delivery, DeliveryStatus, ExternalMapping, MappingKind
from gateway.core.settings import ConnectionSettings
from gateway.sync.ports import Notify

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Difference:
    """One disagreement between the gateway and a PSA."""

    connection: str
    customer: str
    key: str
    kind: str  # quantity, amount, missing_in_psa, duplicate_in_psa, not_delivered, void_in_psa, unknown_in_psa
    gateway_value: str
    psa_value: str


@dataclass
class ReconciliationReport:
    period_start: date
    period_end: date
    checked: int = 0
    matched: int = 0
    differences: list[Difference] = field(default_factory=list)
    unmapped_psa_companies: list[dict[str, str]] = field(default_factory=list)
    customers_without_psa: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.differences or self.errors)


def _money(value: Decimal) -> Decimal:
    return value.quantize(Decimal("0.01"))


async def reconcile(
    db: sessionmaker[Session],
    connections: Sequence[ConnectionSettings],
    psa_for: Callable[[ConnectionSettings], PsaAdapter],
    notify: Notify,
    period_start: date,
    period_end: date,
    *,
    adapters: dict[str, PsaAdapter] | None = None,
) -> ReconciliationReport:
    """Compare every PSA connection with the bills whose cycle starts in [period_start, period_end]."""
    report = ReconciliationReport(period_start, period_end)
    with db() as session:
        bills = session.execute(
            select(Bill, Customer.name)
            .join(Customer, Customer.id == Bill.customer_id)
            .where(Bill.period_start >= period_start, Bill.period_start <= period_end)
        ).all()
        deliveries = session.scalars(select(Delivery).where(Delivery.bill_id.in_([b.id for b, _ in bills]))).all()
        mappings = session.scalars(select(ExternalMapping).where(ExternalMapping.kind == MappingKind.PSA_COMPANY)).all()
    bill_by_id = {bill.id: (bill, name) for bill, name in bills}
    mapped_customers = {m.customer_id for m in mappings if m.customer_id is not None}
    report.customers_without_psa = sorted(
        {name for bill, name in bills if bill.status != BillStatus.VOID and bill.customer_id not in mapped_customers}
    )
    read_until = max([period_end, *(bill.period_end for bill, _ in bills)])

    for connection in connections:
        adapter = (adapters or {}).get(connection.name)
        owned = adapter is None
        if adapter is None:
            try:
                adapter = psa_for(connection)
            except Exception as exc:  # one misconfigured PSA must not hide the others' results (G5)
                _not_reconciled(report, connection, exc)
                continue
        try:
            held: dict[str, list[PsaRecord]] = defaultdict(list)
            for record in await adapter.read_back(period_start, read_until):
                held[record.key].append(record)
            companies = await adapter.list_companies()
        except Exception as exc:  # one broken PSA must not hide the others' results (G5)
            _not_reconciled(report, connection, exc)
            continue
        finally:
            if owned:
                await adapter.aclose()
        mapped_ids = {m.external_id for m in mappings if m.connection == connection.name and m.customer_id is not None}
        report.unmapped_psa_companies += [
            {"connection": connection.name, "external_id": c.external_id, "name": c.name}
            for c in companies
            if c.external_id not in mapped_ids
        ]
        seen = set()
        for delivery in (d for d in deliveries if d.connection == connection.name):
            bill, customer = bill_by_id[delivery.bill_id]
            seen.add(delivery.key)
            copies = held.get(delivery.key, [])

            # This delivery's connection, customer and key are bound as defaults: the closure is made once per loop pass.
            def differ(
                kind: str, ours: object, theirs: object, where: str = connection.name, customer: str = customer,
                key: str = delivery.key,
            ) -> None:
                report.differences.append(Difference(where, customer, key, kind, str(ours), str(theirs)))

            if bill.status == BillStatus.VOID:
                if copies:  # the customer is still billed in the PSA for a bill that was voided
                    differ("void_in_psa", f"void ({bill.number})", "; ".join(_held(r) for r in copies))
                continue
            report.checked += 1
            billed = f"{bill.device_count} devices, {bill.total:.2f} {bill.currency}"
            if not copies:
                if delivery.status == DeliveryStatus.DELIVERED:
                    differ("missing_in_psa", billed, "nothing")
                else:
                    differ("not_delivered", billed, f"delivery {delivery.status.value}")
                continue
            if len(copies) > 1:  # the customer is billed once per copy
                differ("duplicate_in_psa", billed, _copies(copies))
                continue
            (record,) = copies
            ok = True
            if Decimal(record.quantity) != Decimal(bill.device_count):
                differ("quantity", bill.device_count, record.quantity.normalize())
                ok = False
            if _money(record.amount) != _money(bill.total):
                differ("amount", _money(bill.total), _money(record.amount))
                ok = False
            report.matched += ok
        known = seen | _known_keys(db, [key for key in held if key not in seen])
        for key, copies in held.items():
            if key not in known:
                report.differences += [
                    Difference(connection.name, record.company_external_id, key, "unknown_in_psa", "nothing",
                               _held(record))
                    for record in copies
                ]
    for difference in report.differences:
        await notify("reconciliation.difference", difference.__dict__)
    return report


def _held(record: PsaRecord) -> str:
    return f"{record.quantity.normalize()} x, {_money(record.amount)}"


def _copies(copies: list[PsaRecord]) -> str:
    """How many objects the PSA holds for one key and what each says, with its PSA id so a person can find it."""
    return f"{len(copies)} copies: " + "; ".join(f"{_held(r)} (id {r.external_id})" for r in copies)


def _not_reconciled(report: ReconciliationReport, connection: ConnectionSettings, exc: Exception) -> None:
    """Report one connection as not reconciled, saying why without any of its credential values."""
    reason = f"{connection.name}: {type(exc).__name__}: {exc}"
    for secret in connection.credentials.values():
        if value := secret.get_secret_value():
            reason = reason.replace(value, "***")
    report.errors.append(reason)
    log.error("reconcile.connection_failed", connection=connection.name, error=reason)


def _known_keys(db: sessionmaker[Session], keys: list[str]) -> set[str]:
    """Those of ``keys`` that belong to a delivery of this gateway (any cycle)."""
    found: set[str] = set()
    with db() as session:
        for start in range(0, len(keys), 500):
            found.update(session.scalars(select(Delivery.key).where(Delivery.key.in_(keys[start : start + 500]))))
    return found

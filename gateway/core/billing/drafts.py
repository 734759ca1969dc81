"""Bills as pure calculations: prices over a cycle (S1, S7), the lines they make, the draft a run stores.

Like :mod:`~gateway.core.billing.rules`, nothing here opens a session or does
I/O. A :class:`BillDraft` is what a billing run builds, what the
``gateway_bill_built`` hook sees and may add lines to, and what is stored.

Decisions the rules leave open (each is also stated where it is made):

- Every line is rounded on its own, ROUND_HALF_UP, to the currency's ISO 4217
  minor unit; the total is the sum of the rounded lines.
- S7 proration is by calendar days, never by hours, so a DST change inside a
  cycle moves no money: a 31-day March is 31 days whether it has 743 or 744 hours.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal

from gateway.core.billing.rules import STORED_PLACES, Period, minor_units, round_money
from gateway.core.models import BillKind
from gateway.errors import DomainError

# --- prices and proration (S1, S7) --------------------------------------------------------


@dataclass(frozen=True)
class PricePoint:
    """S7: a plan price that applies from a customer-local day on."""

    effective_from: date
    price: Decimal


def price_segments(period: Period, prices: Sequence[PricePoint]) -> list[tuple[Period, Decimal]]:
    """Split a cycle at each price change inside it; each part carries the price of its days."""
    ordered = sorted(prices, key=lambda p: p.effective_from)
    if not ordered or ordered[0].effective_from > period.start:
        raise DomainError(f"the plan has no price for {period.start}; set a price effective from that day or earlier")
    segments: list[tuple[Period, Decimal]] = []
    for index, point in enumerate(ordered):
        until = ordered[index + 1].effective_from - timedelta(days=1) if index + 1 < len(ordered) else None
        part = period.intersect(point.effective_from, until)
        if part is not None:
            segments.append((part, point.price))
    return segments


@dataclass
class DraftLine:
    """One line of a bill before it is stored. ``amount`` is authoritative and already rounded."""

    kind: str
    description: str
    quantity: Decimal
    unit_price: Decimal
    amount: Decimal


def device_lines(
    label: str, period: Period, device_count: int, prices: Sequence[PricePoint], currency: str
) -> list[DraftLine]:
    """S1/S7: devices x price per cycle; one line per price in force during the cycle.

    A part of a cycle is charged ``devices x price x part_days / cycle_days``,
    rounded once per line (S7 decision). The stored unit price is the prorated
    price per device at four places; the amount is computed from the exact
    fraction, so it never inherits the unit price's rounding.
    """
    segments = price_segments(period, prices)
    count = Decimal(device_count)
    lines = []
    for part, price in segments:
        if part == period:
            unit, exact = price, count * price
            description = f"{label}: {device_count} device(s) x {price.normalize():f} {currency}, {period.label()}"
        else:
            fraction = Decimal(part.days) / Decimal(period.days)
            exact = count * price * Decimal(part.days) / Decimal(period.days)
            unit = (price * fraction).quantize(STORED_PLACES, rounding=ROUND_HALF_UP)
            description = (
                f"{label}: {device_count} device(s) x {price.normalize():f} {currency}, {part.label()} "
                f"({part.days}/{period.days} days)"
            )
        lines.append(DraftLine("devices", description, count, unit, round_money(exact, currency)))
    return lines


# --- bill drafts (S3) --------------------------------------------------------------------------


@dataclass
class BillDraft:
    """A computed bill, not yet stored: what ``gateway_bill_built`` hooks see and may add lines to.

    ``devices`` maps device ids to their active days in the cycle (the M7 usage
    rows); ``adjustment_ids`` are the pending charges, discounts and credits the
    bill takes up (S3).
    """

    partner_id: int
    customer_id: int
    customer_name: str
    timezone: str
    kind: BillKind
    source_id: int
    period: Period
    currency: str
    issued_on: date
    due_on: date
    email: str | None = None
    device_count: int = 0
    lines: list[DraftLine] = field(default_factory=list)
    devices: dict[int, int] = field(default_factory=dict)
    adjustment_ids: list[int] = field(default_factory=list)
    number: str | None = None

    @property
    def total(self) -> Decimal:
        return sum((line.amount for line in self.lines), Decimal(0)).quantize(
            Decimal(1).scaleb(-minor_units(self.currency))
        )

    @property
    def key(self) -> tuple[int, BillKind, int, date]:
        """The bill's identity: one per (customer, kind, source, cycle start); running twice adds nothing."""
        return (self.customer_id, self.kind, self.source_id, self.period.start)

    def add_line(self, kind: str, description: str, quantity: Decimal, unit_price: Decimal, amount: Decimal) -> DraftLine:
        line = DraftLine(kind, description, quantity, unit_price, round_money(amount, self.currency))
        self.lines.append(line)
        return line


def due_date(issued_on: date, due_days: int) -> date:
    """S3: a bill is due ``due_days`` after its issue day (customer-local)."""
    return issued_on + timedelta(days=due_days)


def is_overdue(due_on: date, today: date) -> bool:
    """S3: overdue from the first local day after the due date (the due date itself is still on time)."""
    return today > due_on


def format_bill_number(prefix: str, issued_on: date, sequence: int) -> str:
    """``PREFIX-YYYY-MM-NNNNNN``: the issue month and the partner's sequence number."""
    return f"{prefix}-{issued_on:%Y-%m}-{sequence:06d}"

"""Rules M1-M8 and S1-S8 as pure calculations: money, time zones, cycles, the monthly calendar.

Nothing here opens a session or does I/O; the other modules of
:mod:`gateway.core.billing` load the data, call these functions and store
what they return. Calendar days are plain ``date`` objects in the customer's
time zone (S4); instants are aware UTC ``datetime`` objects. Money is ``Decimal``.

Decisions the rules leave open (each is also stated where it is made):

- Cycles are anchored on the association's start date and computed from the
  anchor each time, so a cycle starting on the 31st keeps its day: Jan 31 ->
  Feb 28 (29) -> Mar 31 (month-end clamping, as Stripe and Chargebee do).
- Bills are built in arrears, after the cycle's last local day: only then is it
  known which devices were active (M5, and the same rule for service plans).
- A device counts for a cycle when it was active on at least one day of it.
- Amounts are rounded to the currency's ISO 4217 minor unit (:func:`round_money`);
  how a bill's lines are priced and rounded is in :mod:`~gateway.core.billing.drafts`.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway.core.models import BillingCycle
from gateway.errors import DomainError

# --- money --------------------------------------------------------------------------

#: ISO 4217 currencies whose minor unit is not 2 digits (all others have 2).
_MINOR_UNITS = {
    **dict.fromkeys(
        ("BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "UYI", "VND", "VUV", "XAF", "XOF", "XPF"),
        0,
    ),
    **dict.fromkeys(("BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"), 3),
    **dict.fromkeys(("CLF", "UYW"), 4),
}

#: Money columns keep four places; unit prices are stored at this precision.
STORED_PLACES = Decimal("0.0001")


def check_currency(code: str) -> str:
    """An ISO 4217 code, upper-cased; anything else is a DomainError saying what is expected."""
    value = (code or "").strip().upper()
    if len(value) != 3 or not value.isalpha() or not value.isascii():
        raise DomainError(f"currency {code!r} is not an ISO 4217 code; use three letters such as USD, EUR or JPY", field="currency")
    return value


def minor_units(currency: str) -> int:
    """Digits after the decimal point for ``currency`` (JPY 0, most 2, KWD 3)."""
    return _MINOR_UNITS.get(currency.upper(), 2)


def round_money(amount: Decimal, currency: str) -> Decimal:
    """Round one line's amount to the currency's minor unit, half up (0.005 USD -> 0.01)."""
    exponent = Decimal(1).scaleb(-minor_units(currency))
    return amount.quantize(exponent, rounding=ROUND_HALF_UP)


def to_money(value: Any, *, field: str = "amount") -> Decimal:
    """Parse user input into a Decimal; floats are refused (they cannot hold cents exactly)."""
    if isinstance(value, float) or isinstance(value, bool):
        raise DomainError(f"{field} must be given as a decimal string such as \"12.50\", not a float", field=field)
    try:
        result = Decimal(str(value).strip())
    except (InvalidOperation, ValueError):
        raise DomainError(f"{field} {value!r} is not a number; write it like 12.50", field=field) from None
    if not result.is_finite():
        raise DomainError(f"{field} must be a finite number", field=field)
    return result


# --- time zones and days (S4) -------------------------------------------------------


def zone(name: str) -> ZoneInfo:
    """The IANA zone ``name``; an unknown name is a DomainError naming it."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise DomainError(
            f"{name!r} is not an IANA time zone name (e.g. Europe/Berlin, America/New_York)", field="timezone"
        ) from None


def local_day(instant: datetime, tz: str) -> date:
    """The calendar day in zone ``tz`` on which an aware instant falls (activity days, S4)."""
    if instant.tzinfo is None:
        raise ValueError("local_day needs an aware datetime")
    return instant.astimezone(zone(tz)).date()


def local_midnight(day: date, tz: str) -> datetime:
    """The first instant of ``day`` in zone ``tz``, as aware UTC.

    Where midnight falls in a DST gap (e.g. America/Santiago), the first instant
    of the day is the moment of the change; ``fold=0`` gives exactly that.
    """
    return datetime.combine(day, time(0), tzinfo=zone(tz)).astimezone(UTC)


# --- periods and cycles (S2, S4) ------------------------------------------------------


@dataclass(frozen=True, order=True)
class Period:
    """A run of customer-local calendar days, both ends included."""

    start: date
    end: date

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise ValueError(f"period ends ({self.end}) before it starts ({self.start})")

    @property
    def days(self) -> int:
        return (self.end - self.start).days + 1

    def __contains__(self, day: object) -> bool:
        return isinstance(day, date) and self.start <= day <= self.end

    def start_at(self, tz: str) -> datetime:
        """The cycle's first instant: local midnight of its first day."""
        return local_midnight(self.start, tz)

    def end_at(self, tz: str) -> datetime:
        """The instant the cycle is over (exclusive): local midnight after its last day."""
        return local_midnight(self.end + timedelta(days=1), tz)

    def intersect(self, start: date | None, end: date | None) -> Period | None:
        """The part of this period between ``start`` and ``end`` (None: unbounded), or None."""
        lo = max(self.start, start) if start else self.start
        hi = min(self.end, end) if end else self.end
        return Period(lo, hi) if lo <= hi else None

    def label(self) -> str:
        return f"{self.start.isoformat()} to {self.end.isoformat()}"


CYCLE_MONTHS: Mapping[BillingCycle, int] = {
    BillingCycle.MONTHLY: 1,
    BillingCycle.QUARTERLY: 3,
    BillingCycle.HALF_YEARLY: 6,
    BillingCycle.YEARLY: 12,
}


def add_months(anchor: date, months: int) -> date:
    """``anchor`` moved by whole months, clamped to the month's last day (Jan 31 + 1 -> Feb 28/29)."""
    index = anchor.year * 12 + anchor.month - 1 + months
    year, month = divmod(index, 12)
    month += 1
    return date(year, month, min(anchor.day, calendar.monthrange(year, month)[1]))


def month_period(year: int, month: int) -> Period:
    """One calendar month."""
    return Period(date(year, month, 1), date(year, month, calendar.monthrange(year, month)[1]))


def month_of(day: date) -> Period:
    return month_period(day.year, day.month)


#: The months a billing period may name. Bills, due dates and yearly cycles are computed from the month on,
#: so a month near the end of the calendar (``9999-12``) would run past the last date there is.
FIRST_MONTH, LAST_MONTH = "2000-01", "2999-12"
_MONTH = re.compile(r"([0-9]{4})-([0-9]{1,2})")


def parse_month(text: str) -> Period:
    """``YYYY-MM`` (ASCII digits) as a month period from FIRST_MONTH to LAST_MONTH; else a DomainError saying so."""
    found = _MONTH.fullmatch(text.strip()) if isinstance(text, str) else None
    if found is None or not 1 <= int(found[2]) <= 12:
        raise DomainError(f"period {text!r} is not a month; write it as YYYY-MM, e.g. 2026-03", field="period")
    year, month = int(found[1]), int(found[2])
    if not FIRST_MONTH <= f"{year:04d}-{month:02d}" <= LAST_MONTH:
        raise DomainError(f"period {text!r} is out of range: a billing period is a month from {FIRST_MONTH} "
                          f"to {LAST_MONTH}", field="period")
    return month_period(year, month)


def cycle_number(anchor: date, cycle: BillingCycle, index: int) -> Period:
    """The ``index``-th cycle (0 = the first) of an association starting on ``anchor``.

    Each boundary is computed from the anchor, never from the previous boundary,
    so clamping in February does not drift the anchor day (Jan 31, Feb 28, Mar 31).
    """
    months = CYCLE_MONTHS[cycle]
    start = add_months(anchor, index * months)
    return Period(start, add_months(anchor, (index + 1) * months) - timedelta(days=1))


def cycle_at(anchor: date, cycle: BillingCycle, day: date) -> Period:
    """The cycle containing ``day`` (which must not be before the anchor)."""
    if day < anchor:
        raise ValueError(f"{day} is before the first cycle, which starts on {anchor}")
    months = CYCLE_MONTHS[cycle]
    index = ((day.year - anchor.year) * 12 + day.month - anchor.month) // months
    index = max(index, 0)
    while True:  # the estimate is off by at most one cycle either way
        period = cycle_number(anchor, cycle, index)
        if day < period.start:
            index -= 1
        elif day > period.end:
            index += 1
        else:
            return period


def billed_through(anchor: date, cycle: BillingCycle, ends_on: date) -> date | None:
    """S6: the last day an ended association bills: the end of the cycle it ended in (billed in
    full); None when it ended before its first cycle began."""
    return cycle_at(anchor, cycle, ends_on).end if ends_on >= anchor else None


def cycles_ending_within(
    anchor: date, cycle: BillingCycle, window: Period, *, ends_on: date | None = None
) -> list[Period]:
    """Cycles whose last day lies in ``window``, no later than the cycle containing ``ends_on`` (S6).

    S6 decision: the cycle in which the plan is dissociated is billed in full;
    later cycles are not billed.
    """
    last_allowed = billed_through(anchor, cycle, ends_on) if ends_on is not None else None
    if ends_on is not None and ends_on < anchor:
        return []
    first_day = max(window.start, anchor)
    if first_day > window.end:
        return []
    result = []
    period = cycle_at(anchor, cycle, first_day)
    while period.end <= window.end:
        if last_allowed is not None and period.end > last_allowed:
            break
        if period.end >= window.start:
            result.append(period)
        period = cycle_at(anchor, cycle, period.end + timedelta(days=1))
    return result


def due_window(today: date) -> Period:
    """What an unattended run bills for a customer whose local day is ``today``.

    Decision: cycles that ended in the previous calendar month or earlier this
    month (up to yesterday). Running every few minutes, the scheduler bills a
    cycle on the first local day after it ends; the previous month is included
    so a run missed on the 1st is caught up. Longer outages are caught up with
    ``gateway bill --period YYYY-MM`` per missed month.
    """
    previous = month_of(month_of(today).start - timedelta(days=1))
    return Period(previous.start, max(previous.start, today - timedelta(days=1)))


def is_over(period: Period, today: date) -> bool:
    """A cycle may be billed once its last local day has passed (in arrears)."""
    return period.end < today


# --- monthly active-device billing (M1, M4, M5, M8) -------------------------------------


def activation_period(enabled_on: date) -> Period:
    """M1: the activation payment covers the rest of the calendar month it was made in, unprorated."""
    return Period(enabled_on, month_of(enabled_on).end)


def first_billed_month(enabled_on: date) -> Period:
    """M4: the first full month after enabling; the activation covered the enabling month.

    Decision: enabling on the 1st is treated like any other day (the activation
    covers that month, the next month is the first one charged), so the rule has
    no special case and a partner never pays twice for one month.
    """
    return month_of(month_of(enabled_on).end + timedelta(days=1))


def first_charge_date(enabled_on: date) -> date:
    """M4: the first recurring charge runs on the 1st after the first full month (10 Mar -> 1 May)."""
    return first_billed_month(enabled_on).end + timedelta(days=1)


def offered_end_dates(today: date, months_ahead: int = 3) -> list[date]:
    """M8: the end dates a cancellation may choose: the end of this month or of one of the next months.

    Decision: the current month and the next three, as month ends (the vendor
    bills whole months).
    """
    result = []
    day = today
    for _ in range(months_ahead + 1):
        end = month_of(day).end
        result.append(end)
        day = end + timedelta(days=1)
    return result


def final_billing_date(ends_on: date) -> date:
    """M8: the day the last month is charged: the 1st after the chosen end date."""
    return ends_on + timedelta(days=1)


def can_reactivate(ends_on: date | None, today: date) -> bool:
    """M8: a cancelled subscription can be reactivated until its final billing date is reached."""
    return ends_on is not None and today < final_billing_date(ends_on)


def monthly_months_due(
    enabled_on: date, window: Period, today: date, *, ends_on: date | None = None
) -> list[Period]:
    """M4/M5/M8: the months a subscription charges whose last day lies in ``window`` and has passed."""
    result = []
    month = first_billed_month(enabled_on)
    while month.end <= window.end:
        if ends_on is not None and month.start > ends_on:
            break
        if month.end >= window.start and is_over(month, today):
            result.append(month)
        month = month_of(month.end + timedelta(days=1))
    return result


def workspace_billing_window(month: Period, since: date | None, until: date | None) -> Period | None:
    """M2/M5: the days of ``month`` on which a workspace was on monthly billing (None: not at all).

    Decision: only activity on days the workspace was on the plan counts; before
    joining, its devices were covered by a license.
    """
    if since is None:
        return None
    return month.intersect(since, until)


def billable_devices(days_active: Mapping[int, int]) -> dict[int, int]:
    """M5: devices with at least one active day in the cycle, with their day counts."""
    return {device: days for device, days in days_active.items() if days > 0}


def device_refusal(max_devices: int | None, registered: int) -> str | None:
    """M3: why a workspace refuses one more device, or None when it has room."""
    if max_devices is not None and registered >= max_devices:
        return (
            f"workspace is at its maximum of {max_devices} device{'s' if max_devices != 1 else ''}; "
            "raise the workspace's maximum device count to accept this device"
        )
    return None

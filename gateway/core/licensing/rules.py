"""Pure rules of the license lifecycle: status and dates, prices and discounts, limits.

Nothing here reads or writes the database: each function takes a license (or plain
numbers) and the settings, so every use case and every view shares one definition.

Decisions the rules leave open:

- **Status** (L1): ``void`` is a license deleted (L16) or consumed as a coupon (L8);
  ``expired`` covers both an activated license past its expiry and a coupon past
  its activation deadline (L3); ``expiring`` is an active license that ends within
  ``licensing.expiring_soon_days`` (30, as L1 says).
- **Activation window** (L3): the deadline is the purchase instant plus 12 calendar
  months (31 Jan -> 31 Jan next year; 29 Feb -> 28 Feb). Activation is allowed up to,
  not at, that instant.
- **Prices**: the edition's stored price (else ``licensing.prices.<code>``) is the price of one seat for
  one year, in the edition's currency (else ``licensing.currency``); a purchase costs
  ``price x seats x term_months / 12`` per key, rounded to cents (renewals:
  :mod:`~gateway.core.licensing.renewal`).
- **Discounts** (L6): the partner's discount and the bulk tier discount compound
  (``1 - (1-p)(1-t)``), the way "on top of" reads; the order stores the combined percent.
  Tiers count keys bought together (customers), not seats.
"""

from __future__ import annotations

import calendar
import enum
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

from gateway.core.models import Edition, License
from gateway.core.settings import LicensingSettings
from gateway.core.text import check_text
from gateway.errors import DomainError

ACTIVATION_WINDOW_MONTHS = 12
MAX_TERM_MONTHS = 120
MAX_RENEWAL_YEARS = 10
MAX_SEATS = 100_000
MAX_BULK_KEYS = 10_000
MAX_NOTES = 2000
CENT = Decimal("0.01")
HUNDRED = Decimal("100")


class LicenseStatus(str, enum.Enum):
    """L1: derived from the dates, never stored."""

    UNUSED = "unused"
    ACTIVE = "active"
    EXPIRING = "expiring"
    EXPIRED = "expired"
    VOID = "void"


class DeleteMode(str, enum.Enum):
    """L16: the three bulk deletions of expired licenses."""

    ALL = "all"
    AUTO_RENEW = "auto-renew"
    UNASSIGNED = "unassigned"


# --- dates and status (L1, L3) ----------------------------------------------------------------


def add_months(at: datetime, months: int) -> datetime:
    """Calendar months later (or earlier), clamped to the month's last day (31 Jan + 1 month = 28/29 Feb)."""
    index = at.year * 12 + at.month - 1 + months
    year, month = divmod(index, 12)
    month += 1
    return at.replace(year=year, month=month, day=min(at.day, calendar.monthrange(year, month)[1]))


def activation_deadline(lic: License) -> datetime:
    """L3: the instant an unused key expires."""
    return add_months(lic.purchased_at, ACTIVATION_WINDOW_MONTHS)


def license_status(lic: License, now: datetime, config: LicensingSettings) -> LicenseStatus:
    if lic.voided_at is not None or lic.consumed_at is not None:
        return LicenseStatus.VOID
    if lic.activated_at is None or lic.expires_at is None:
        return LicenseStatus.EXPIRED if now >= activation_deadline(lic) else LicenseStatus.UNUSED
    if lic.expires_at <= now:
        return LicenseStatus.EXPIRED
    if lic.expires_at - now <= timedelta(days=config.expiring_soon_days):
        return LicenseStatus.EXPIRING
    return LicenseStatus.ACTIVE


def next_renewal_date(lic: License, now: datetime, config: LicensingSettings) -> datetime | None:
    """L13: when auto-renewal will renew an active license (None when cancelled, not active or unassigned).

    The daily job renews only licenses that serve a workspace: auto-renewal keeps
    protection going, and a key that protects nothing (e.g. exchanged out, L14, then
    renewed by hand) would be charged for nothing; it expires, and L16 deletes it.
    """
    if (
        lic.auto_renew
        and lic.workspace_id is not None
        and license_status(lic, now, config) in (LicenseStatus.ACTIVE, LicenseStatus.EXPIRING)
    ):
        return lic.expires_at
    return None


# --- money (L6) -------------------------------------------------------------------------------


def unit_price(config: LicensingSettings, edition: Edition) -> Decimal:
    """The price of one seat of ``edition`` for one year, or a DomainError saying how to set it.

    The price stored with the edition (``gateway editions update CODE --price``) wins; ``[licensing]
    prices.<code>`` of the configuration prices only an edition with no stored price (how every install
    priced editions before they had one), so a price set by an admin is never undone by a file.
    """
    stored = getattr(edition, "price_per_seat_year", None)
    if stored is not None:
        return Decimal(stored)
    price = config.prices.get(edition.code)
    if price is None:
        raise DomainError(
            f"no price for edition {edition.code!r}; set one with "
            f"'gateway editions update {edition.code} --price AMOUNT' (or licensing.prices.{edition.code} "
            "in the config file)",
            field="edition",
            code="no_price",
        )
    return Decimal(price)


def price_currency(config: LicensingSettings, edition: Edition) -> str:
    """The currency of :func:`unit_price`: the edition's own with a stored price, else ``[licensing] currency``."""
    if getattr(edition, "price_per_seat_year", None) is not None and getattr(edition, "currency", None):
        return str(edition.currency)
    return config.currency


def tier_discount(config: LicensingSettings, quantity: int) -> Decimal:
    """L6: the percentage of the highest tier ``quantity`` reaches (0 below the first)."""
    reached = [Decimal(pct) for threshold, pct in config.bulk_discount_tiers.items() if quantity >= int(threshold)]
    return max(reached, default=Decimal("0"))


def combine_discounts(*percents: Decimal) -> Decimal:
    """Discounts "on top of" each other compound: 10% then 20% is 28% off."""
    remaining = Decimal("1")
    for pct in percents:
        remaining *= (HUNDRED - Decimal(pct)) / HUNDRED
    return ((Decimal("1") - remaining) * HUNDRED).quantize(Decimal("0.0001"))


def list_price(unit: Decimal, seats: int, months: int, keys: int) -> Decimal:
    """``unit x seats x months / 12`` per key, rounded to cents, before any discount."""
    return (unit * seats * months * keys / 12).quantize(CENT, ROUND_HALF_UP)


def discounted(list_total: Decimal, percent: Decimal) -> Decimal:
    """``list_total`` less ``percent`` off, rounded to cents."""
    return (list_total * (HUNDRED - percent) / HUNDRED).quantize(CENT, ROUND_HALF_UP)


# --- limits -----------------------------------------------------------------------------------


def check_range(value: int, low: int, high: int, field_name: str, what: str) -> None:
    """A DomainError on ``field_name`` unless ``low <= value <= high``."""
    if not low <= value <= high:
        raise DomainError(f"{what} must be between {low} and {high}, got {value}", field=field_name)


def check_notes(notes: str) -> None:
    """A DomainError when ``notes`` is longer than MAX_NOTES."""
    if len(notes) > MAX_NOTES:
        raise DomainError(f"notes may hold at most {MAX_NOTES} characters, got {len(notes)}", field="notes")
    check_text(notes, field="notes", what="the notes", multiline=True)

"""Editions: the products a partner sells licenses of, each with its license type (L17) and price.

Decisions:

- **Where a price lives.** The price of one seat for one year is stored with the edition and set with
  ``gateway editions add|update --price`` or the admin API. ``[licensing] prices.<code>`` in the
  configuration file (the only place before) still prices an edition that has no stored price, and seeds
  the stored price when an edition is added without ``--price``. A stored price wins over the file: it is
  what an admin last set on purpose, it is the same in every process without a restart, and a stale line
  in a file must not silently re-price orders. A file price that differs from a stored one is reported as
  a warning (:func:`shadowed_config_prices`) so the file can be cleaned up.
- **Currency.** A stored price has its currency (default ``[licensing] currency``); orders of the edition
  are placed in it.
- **Archiving** sets ``active`` false: the edition is sold no more, its licenses keep working and renew.
  Nothing is ever deleted (licenses and orders refer to it).
- The catalogue is shared by every partner of the install.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.core.models import Edition, LicenseType
from gateway.core.settings import LicensingSettings
from gateway.errors import Conflict, DomainError, NotFound

#: Edition codes appear in commands, URLs, order lines and the ``[licensing] prices`` table.
CODE = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
MAX_PRICE = Decimal("1000000")


def check_code(value: str) -> str:
    if not isinstance(value, str) or not CODE.fullmatch(value):
        raise DomainError(f"edition code {str(value)[:70]!r} is not allowed: use 1 to 64 lower-case letters, digits "
                          "or dashes, starting with a letter or digit (for example enterprise-security)",
                          field="code")
    return value


def check_license_type(value: str | LicenseType) -> LicenseType:
    try:
        return LicenseType(value)
    except ValueError:
        known = ", ".join(t.value for t in LicenseType)
        raise DomainError(f"license type {value!r} is not one of {known} (L17)", field="license_type") from None


def check_price(value: Decimal | str | float | int) -> Decimal:
    try:
        price = Decimal(str(value))
    except InvalidOperation:
        raise DomainError(f"price {value!r} is not a number; give the price of one seat for one year, e.g. 45.00",
                          field="price") from None
    if not price.is_finite() or price < 0 or price > MAX_PRICE:
        raise DomainError(f"price {value!r} must be between 0 and {MAX_PRICE} (one seat for one year)", field="price")
    if price != price.quantize(Decimal("0.0001")):
        raise DomainError(f"price {value!r} has more than four decimal places", field="price")
    return price


def check_currency(value: str) -> str:
    currency = (value or "").upper()
    if len(currency) != 3 or not currency.isalpha() or not currency.isascii():
        raise DomainError(f"currency {value!r} is not an ISO 4217 code such as USD or EUR", field="currency")
    return currency


def _name(value: str) -> str:
    value = (value or "").strip()
    if not value:
        raise DomainError("an edition needs a name", field="name")
    if len(value) > 200:
        raise DomainError("an edition name is at most 200 characters", field="name")
    return value


def get_edition(session: Session, ref: str | int) -> Edition:
    """The edition with this code (or numeric id), or NotFound listing the known codes."""
    edition = None
    if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit() and len(ref) < 10):
        edition = session.get(Edition, int(ref))
    if edition is None and isinstance(ref, str):
        edition = session.scalar(select(Edition).where(Edition.code == ref))
    if edition is None:
        known = ", ".join(session.scalars(select(Edition.code).order_by(Edition.code).limit(20))) or "none yet"
        raise NotFound(f"no edition {ref!r} (known: {known}); add one with 'gateway editions add'", field="edition")
    return edition


def create_edition(session: Session, config: LicensingSettings, *, code: str, name: str,
                   license_type: str | LicenseType = LicenseType.COMPUTER,
                   price: Decimal | str | None = None, currency: str | None = None) -> Edition:
    """A new edition; without ``price`` the configuration's ``prices.<code>`` (if any) is stored as its price."""
    code = check_code(code)
    taken = session.scalar(select(Edition.id).where(Edition.code == code))
    if taken is not None:
        raise Conflict(f"edition {code!r} already exists (id {taken}); change it with 'gateway editions update {code}'",
                       field="code")
    if price is None and code in config.prices:
        price = config.prices[code]
    edition = Edition(code=code, name=_name(name), license_type=check_license_type(license_type),
                      price_per_seat_year=None if price is None else check_price(price),
                      currency=check_currency(currency or config.currency), active=True)
    session.add(edition)
    session.flush()
    return edition


def update_edition(session: Session, edition: Edition, *, name: str | None = None,
                   license_type: str | LicenseType | None = None, price: Decimal | str | None = None,
                   currency: str | None = None, active: bool | None = None) -> Edition:
    """Change what is given. A price change prices orders placed from now on; past orders keep theirs (L12)."""
    if name is not None:
        edition.name = _name(name)
    if license_type is not None:
        edition.license_type = check_license_type(license_type)
    if price is not None:
        edition.price_per_seat_year = check_price(price)
    if currency is not None:
        edition.currency = check_currency(currency)
    if active is not None:
        edition.active = active
    session.flush()
    return edition


def list_editions(session: Session, *, include_archived: bool = True) -> list[Edition]:
    query = select(Edition).order_by(Edition.code)
    if not include_archived:
        query = query.where(Edition.active.is_(True))
    return list(session.scalars(query))


def edition_dict(edition: Edition, config: LicensingSettings) -> dict[str, Any]:
    """The edition as shown by the CLI and the API: the price it sells at and where that price comes from."""
    stored = edition.price_per_seat_year
    file_price = config.prices.get(edition.code)
    if stored is not None:
        price, source, currency = Decimal(stored), "stored", edition.currency or config.currency
    elif file_price is not None:
        price, source, currency = Decimal(file_price), "config", config.currency
    else:
        price, source, currency = None, None, edition.currency or config.currency
    return {"id": edition.id, "code": edition.code, "name": edition.name, "license_type": edition.license_type.value,
            "price_per_seat_year": None if price is None else price.quantize(Decimal("0.01")),
            "currency": currency, "price_source": source, "active": bool(edition.active)}


def shadowed_config_prices(session: Session, config: LicensingSettings) -> list[str]:
    """Warnings for ``[licensing] prices`` entries that a stored edition price overrides."""
    warnings = []
    for edition in session.scalars(select(Edition).where(Edition.code.in_(list(config.prices)))):
        stored, file_price = edition.price_per_seat_year, Decimal(config.prices[edition.code])
        if stored is not None and Decimal(stored) != file_price:
            warnings.append(f"[licensing] prices.{edition.code} = {file_price} is ignored: edition "
                            f"{edition.code!r} has the stored price {Decimal(stored).quantize(Decimal('0.01'))} "
                            "(remove the line from the config file)")
    return warnings

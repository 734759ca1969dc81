"""The license lifecycle: rules L1-L17 over the canonical store.

Every function takes the caller's session (and never commits: the caller owns the
unit of work), the injected clock, and the :class:`~gateway.core.access.Principal`
acting, whose name is written into the license history (L10) of every change.

Decisions the rules leave open (DOMAIN.md's own decisions are not repeated):

- **Status** (L1): ``void`` is a license deleted (L16) or consumed as a coupon (L8);
  ``expired`` covers both an activated license past its expiry and a coupon past
  its activation deadline (L3); ``expiring`` is an active license that ends within
  ``licensing.expiring_soon_days`` (30, as L1 says).
- **Activation window** (L3): the deadline is the purchase instant plus 12 calendar
  months (31 Jan -> 31 Jan next year; 29 Feb -> 28 Feb). Activation is allowed up to,
  not at, that instant.
- **Term** (L2): ``expires_at = activated_at + term_months`` in calendar months (UTC).
  ``term_months`` stays the term the key was bought with; renewals move ``expires_at``.
- **Prices**: ``licensing.prices`` is the price of one seat for one year; a purchase costs
  ``price x seats x term_months / 12`` per key, rounded to cents. A renewal costs the
  same for the years added, at the price of the edition renewed into (L9). Renewing with
  a coupon (L8) costs nothing and places no order: the coupon's own order already paid.
  Orders are in ``licensing.currency`` (the vendor's price list), not the partner's billing currency.
- **Discounts** (L6): the partner's discount and the bulk tier discount compound
  (``1 - (1-p)(1-t)``), the way "on top of" reads; the order stores the combined percent.
  Tiers count keys bought together (customers), not seats. Renewals get the partner's
  discount only.
- **Bulk** (L6, L14): bulk keys go to the partner's global pool; single purchases do not.
- **Coupons** (L8): a coupon must be unused, inside its activation window, of the same
  edition (the target edition when migrating, L9) and seat count, without a note; pool
  keys are coupons too. It extends the license by the coupon's own term.
- **Auto-renewal** (L13): the next renewal date is the expiry of an active license with
  auto-renewal on. On that date the daily job renews it by one year at the configured
  price, counting from the old expiry so no day is lost; an automatic exchange (L14) is
  tried first, because a pool key is already paid for. Without a price the renewal is
  logged as failed and the license expires.
- **Automatic exchange** (L14): the replacement is an unused, unexpired pool key of the
  same edition with at least as many seats (fewest seats first, then the soonest
  activation deadline). It is assigned to the workspace and activated; the old license
  stays expired, unassigned, and points at its replacement.
- **Allocation** (L15): the "company" is the partner. A company on a limited pool applies
  its limit to all its users and their own settings are ignored; a company on the global
  pool (the default) leaves each user's own setting in force. A limit counts active
  (assigned, unexpired) licenses: of the whole partner for a company pool, or those the
  user assigned for a user pool. Renewing an expired license that still serves a
  workspace makes it count again, so it is checked like an assignment, against the pool
  it counts in (its assigning user's). An assignment or such a renewal locks the row
  holding the limit (the partner or the user) before counting, so concurrent ones
  cannot overshoot it.
- **Bulk delete** (L16) voids licenses rather than removing rows, so that their history
  (L10) and the order history (L12) stay whole; lists hide void licenses unless asked.
- **Reminders** (L4): counted in whole UTC days before the expiry day. When the job
  missed a day, only the most urgent reminder due is sent, never a stale one. The end
  user is told 3 days before when the license has not been renewed and auto-renewal is
  off (with it on, protection is not at risk). A reminder row is written in the same
  transaction that decides it and the notice is sent after commit: each is sent at most
  once, even when two jobs run at the same time.
- **Who may do what** (S8): a customer admin sees the licenses of their customers and
  may edit their notes; everything that spends the partner's money or changes what
  is covered (buy, assign, renew, auto-renewal, pool, exchange, delete, settings, orders)
  is the admin's, and answers a customer admin 404 like anything else they cannot see.
- **Lists** evaluate status filters in Python over one partner's licenses, because the
  activation deadline is calendar arithmetic no SQL dialect shares; that is fine for
  tens of thousands of licenses per partner.
"""

from __future__ import annotations

import asyncio
import calendar
import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import structlog
from sqlalchemy import ColumnElement, Select, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from gateway.core import db as gdb
from gateway.core.access import (
    Principal,
    customer_clause,
    get_partner,
    get_user,
    get_workspace,
    require_admin,
)
from gateway.core.clock import Clock
from gateway.core.license_keys import new_key, normalize_key
from gateway.core.models import (
    Customer,
    Edition,
    License,
    LicenseHistory,
    LicenseReminder,
    Order,
    OrderKind,
    OrderLicense,
    Partner,
    PoolMode,
    User,
    Workspace,
)
from gateway.core.settings import LicensingSettings
from gateway.errors import Conflict, DomainError, NotFound

log = structlog.get_logger(__name__)

ACTIVATION_WINDOW_MONTHS = 12
MAX_TERM_MONTHS = 120
MAX_RENEWAL_YEARS = 10
MAX_SEATS = 100_000
MAX_BULK_KEYS = 10_000
MAX_NOTES = 2000
CENT = Decimal("0.01")
HUNDRED = Decimal("100")
DAILY_ACTOR = "system:daily"


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


# --- dates and status ------------------------------------------------------------------


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
    """L13: when auto-renewal will renew an active license (None when cancelled or not active)."""
    if lic.auto_renew and license_status(lic, now, config) in (LicenseStatus.ACTIVE, LicenseStatus.EXPIRING):
        return lic.expires_at
    return None


# --- views -------------------------------------------------------------------------------


@dataclass
class LicenseInfo:
    """A license with what a person needs to read it: edition, workspace and customer."""

    license: License
    edition: Edition
    workspace: Workspace | None
    customer: Customer | None

    def status(self, now: datetime, config: LicensingSettings) -> LicenseStatus:
        return license_status(self.license, now, config)

    def to_dict(self, now: datetime, config: LicensingSettings) -> dict[str, Any]:
        lic = self.license
        return {
            "key": lic.key,
            "edition": self.edition.code,
            "edition_name": self.edition.name,
            "license_type": lic.license_type.value,
            "seats": lic.seats,
            "term_months": lic.term_months,
            "status": license_status(lic, now, config).value,
            "purchased_at": lic.purchased_at,
            "activation_deadline": activation_deadline(lic),
            "activated_at": lic.activated_at,
            "expires_at": lic.expires_at,
            "auto_renew": lic.auto_renew,
            "next_renewal_date": next_renewal_date(lic, now, config),
            "notes": lic.notes,
            "in_pool": lic.in_pool,
            "pool_user_id": lic.pool_user_id,
            "customer": {"id": self.customer.id, "name": self.customer.name} if self.customer else None,
            "workspace": {"id": self.workspace.id, "name": self.workspace.name} if self.workspace else None,
            "order_id": lic.order_id,
            "voided_at": lic.voided_at,
            "consumed_at": lic.consumed_at,
            "version": lic.version,
        }


@dataclass
class Purchase:
    order: Order
    licenses: list[License]


@dataclass
class Renewal:
    license: License
    order: Order | None = None
    coupon: License | None = None


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


@dataclass(frozen=True)
class Allocation:
    """L15: where an assignment's license is counted, and the limit there (None: unlimited)."""

    source: str  # "company" or "user"
    mode: PoolMode
    limit: int | None


# --- history (L10) ---------------------------------------------------------------------------


def _snapshot(session: Session, lic: License) -> dict[str, Any]:
    edition = session.get(Edition, lic.edition_id)
    return {
        "edition": edition.code if edition else None,
        "license_type": lic.license_type.value,
        "seats": lic.seats,
        "activated_at": _iso(lic.activated_at),
        "expires_at": _iso(lic.expires_at),
        "workspace_id": lic.workspace_id,
        "notes": lic.notes,
        "auto_renew": lic.auto_renew,
        "in_pool": lic.in_pool,
        "pool_user_id": lic.pool_user_id,
        "voided_at": _iso(lic.voided_at),
        "consumed_at": _iso(lic.consumed_at),
        "replaced_by_id": lic.replaced_by_id,
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _record(
    session: Session,
    lic: License,
    action: str,
    actor: str,
    now: datetime,
    before: dict[str, Any] | None,
    **extra: Any,
) -> LicenseHistory:
    """Write one history row holding only the fields that changed, plus ``extra`` facts (coupon, order...).

    ``before=None`` records a creation: an empty "before" and every field that has a value "after".
    """
    after_full = _snapshot(session, lic)
    if before is None:
        changed, before = [name for name, value in after_full.items() if value not in (None, "")], {}
    else:
        changed = [name for name in after_full if before.get(name) != after_full[name]]
    entry = LicenseHistory(
        license_id=lic.id,
        at=now,
        actor=actor,
        action=action,
        before={name: before[name] for name in changed if name in before},
        after={**{name: after_full[name] for name in changed}, **extra},
    )
    session.add(entry)
    return entry


def _flush(session: Session) -> None:
    """Flush, turning a lost race (optimistic version, unique key) into a Conflict the caller can retry."""
    try:
        session.flush()
    except StaleDataError:
        raise Conflict("the license was changed by someone else at the same time; reload it and try again") from None
    except IntegrityError as exc:
        log.info("licensing.integrity_conflict", error=str(exc.orig).splitlines()[0] if exc.orig else str(exc))
        raise Conflict("another change to the same license or workspace won; reload and try again") from None


# --- lookups ---------------------------------------------------------------------------------


def _visible(principal: Principal) -> list[ColumnElement[bool]]:
    """S8 for licenses: the partner's own; a customer admin only those assigned to their customers."""
    clauses: list[ColumnElement[bool]] = [License.partner_id == principal.partner_id]
    if not principal.is_admin:
        clauses.append(
            License.workspace_id.in_(select(Workspace.id).where(customer_clause(principal, Workspace.customer_id)))
        )
    return clauses


def get_license(session: Session, principal: Principal, key: str, *, field: str = "key") -> License:
    """The license with ``key`` (typed any way), or NotFound; a mistyped key is a DomainError saying so."""
    canonical = normalize_key(key, field=field)
    lic = session.scalar(select(License).where(License.key == canonical, *_visible(principal)))
    if lic is None:
        raise NotFound(f"no license with key {canonical}", field=field)
    return lic


def _info_select() -> Select[tuple[License, Edition, Workspace, Customer]]:
    return (
        select(License, Edition, Workspace, Customer)
        .join(Edition, Edition.id == License.edition_id)
        .outerjoin(Workspace, Workspace.id == License.workspace_id)
        .outerjoin(Customer, Customer.id == Workspace.customer_id)
    )


def _infos(session: Session, stmt: Select[Any]) -> list[LicenseInfo]:
    return [LicenseInfo(*row) for row in session.execute(stmt).all()]


def license_info(session: Session, principal: Principal, key: str) -> LicenseInfo:
    lic = get_license(session, principal, key)
    return _infos(session, _info_select().where(License.id == lic.id))[0]


def infos_for(session: Session, licenses: Iterable[License]) -> list[LicenseInfo]:
    """Views of licenses already loaded (e.g. just bought), in the given order."""
    ids = [lic.id for lic in licenses]
    by_id = {info.license.id: info for info in _infos(session, _info_select().where(License.id.in_(ids)))}
    return [by_id[i] for i in ids]


def _edition(session: Session, code: str, *, field: str = "edition") -> Edition:
    edition = session.scalar(select(Edition).where(Edition.code == code))
    if edition is None:
        known = ", ".join(session.scalars(select(Edition.code).order_by(Edition.code))) or "none"
        raise DomainError(f"unknown edition {code!r} (known editions: {known})", field=field, code="unknown_edition")
    return edition


def like_pattern(query: str) -> str:
    """L11: ``*`` and ``?`` are wildcards; without one the text matches anywhere. ``%``/``_`` are literal."""
    escaped = query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    pattern = escaped.replace("*", "%").replace("?", "_")
    return pattern if ("*" in query or "?" in query) else f"%{pattern}%"


def list_licenses(
    session: Session,
    clock: Clock,
    config: LicensingSettings,
    principal: Principal,
    *,
    query: str | None = None,
    status: LicenseStatus | None = None,
    expired: bool = False,
    expiring_soon: bool = False,
    coupon_deadline_soon: bool = False,
    customer_id: int | None = None,
    in_pool: bool | None = None,
    include_void: bool = False,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[LicenseInfo], int]:
    """L11: licenses the principal may see, searched and filtered; returns (page, total).

    The filters combine with OR between them (the portal's "expired or expiring
    soon" follow-up view) and with AND against ``query``, ``status`` and the rest.
    "Expiring soon" means status ``expiring``; "coupon deadline soon" means an unused
    key whose activation deadline falls within ``licensing.coupon_deadline_soon_days``.
    """
    now = clock.now()
    stmt = _info_select().where(*_visible(principal))
    if query:
        pattern = like_pattern(query.strip())
        stmt = stmt.where(
            or_(
                License.key.ilike(pattern, escape="\\"),
                License.notes.ilike(pattern, escape="\\"),
                Customer.name.ilike(pattern, escape="\\"),
            )
        )
    if customer_id is not None:
        stmt = stmt.where(Workspace.customer_id == customer_id)
    if in_pool is not None:
        stmt = stmt.where(License.in_pool.is_(in_pool))
    if not include_void and status != LicenseStatus.VOID:
        stmt = stmt.where(License.voided_at.is_(None), License.consumed_at.is_(None))
    stmt = stmt.order_by(License.purchased_at.desc(), License.id.desc())

    soon = timedelta(days=config.coupon_deadline_soon_days)

    def keep(info: LicenseInfo) -> bool:
        current = info.status(now, config)
        if status is not None and current != status:
            return False
        if not (expired or expiring_soon or coupon_deadline_soon):
            return True
        return (
            (expired and current == LicenseStatus.EXPIRED)
            or (expiring_soon and current == LicenseStatus.EXPIRING)
            or (
                coupon_deadline_soon
                and current == LicenseStatus.UNUSED
                and activation_deadline(info.license) - now <= soon
            )
        )

    matching = [info for info in _infos(session, stmt) if keep(info)]
    return matching[offset : offset + limit], len(matching)


def license_history(
    session: Session, principal: Principal, key: str, *, limit: int = 100, offset: int = 0
) -> tuple[list[LicenseHistory], int]:
    """L10: the license's changes, oldest first."""
    lic = get_license(session, principal, key)
    where = LicenseHistory.license_id == lic.id
    total = session.scalar(select(func.count()).select_from(LicenseHistory).where(where)) or 0
    rows = session.scalars(
        select(LicenseHistory).where(where).order_by(LicenseHistory.at, LicenseHistory.id).limit(limit).offset(offset)
    ).all()
    return list(rows), total


def history_dict(entry: LicenseHistory) -> dict[str, Any]:
    return {
        "at": entry.at,
        "actor": entry.actor,
        "action": entry.action,
        "before": entry.before,
        "after": entry.after,
    }


# --- money -------------------------------------------------------------------------------------


def _unit_price(config: LicensingSettings, edition: Edition) -> Decimal:
    price = config.prices.get(edition.code)
    if price is None:
        raise DomainError(
            f"no price configured for edition {edition.code!r}; set licensing.prices.{edition.code} in the config file",
            field="edition",
            code="no_price",
        )
    return Decimal(price)


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


def _price(unit: Decimal, seats: int, months: int, keys: int) -> Decimal:
    return (unit * seats * months * keys / 12).quantize(CENT, ROUND_HALF_UP)


def _discounted(list_total: Decimal, percent: Decimal) -> Decimal:
    return (list_total * (HUNDRED - percent) / HUNDRED).quantize(CENT, ROUND_HALF_UP)


# --- purchase (L5, L6, L12) ------------------------------------------------------------------


def _check_range(value: int, low: int, high: int, field_name: str, what: str) -> None:
    if not low <= value <= high:
        raise DomainError(f"{what} must be between {low} and {high}, got {value}", field=field_name)


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


def _place_order(
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
    order = Order(
        partner_id=partner.id,
        kind=kind,
        placed_at=now,
        quantity=quantity,
        term_months=term_months,
        currency=currency,
        list_total=list_total,
        discount_percent=discount,
        total=_discounted(list_total, discount),
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
    _flush(session)
    for lic in licenses:
        if notes:
            lic.notes = notes
        session.add(OrderLicense(order_id=order.id, license_id=lic.id))
        _record(session, lic, "purchased", actor, now, None, order_id=order.id, key=lic.key)
    _flush(session)
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
    _check_range(seats, 1, MAX_SEATS, "seats", "seats")
    _check_range(term_months, 1, MAX_TERM_MONTHS, "term_months", "term_months")
    _check_notes(notes)
    now = clock.now()
    partner = get_partner(session, principal)
    ed = _edition(session, edition)
    list_total = _price(_unit_price(config, ed), seats, term_months, 1)
    order = _place_order(
        session, partner, OrderKind.NEW, now, principal.name, quantity=1, term_months=term_months,
        currency=config.currency, list_total=list_total, discount=Decimal(partner.discount_percent),
    )
    licenses = _issue(
        session, partner, ed, order, now, principal.name, count=1, seats=seats, term_months=term_months,
        in_pool=False, notes=notes,
    )
    log.info("license.bought", key=licenses[0].key, edition=ed.code, seats=seats, order=order.id)
    return Purchase(order, licenses)


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
    _check_range(customers, 1, MAX_BULK_KEYS, "customers", "customers")
    _check_range(devices_per_customer, 1, MAX_SEATS, "devices_per_customer", "devices_per_customer")
    _check_range(term_months, 1, MAX_TERM_MONTHS, "term_months", "term_months")
    now = clock.now()
    partner = get_partner(session, principal)
    ed = _edition(session, edition)
    list_total = _price(_unit_price(config, ed), devices_per_customer, term_months, customers)
    discount = combine_discounts(Decimal(partner.discount_percent), tier_discount(config, customers))
    order = _place_order(
        session, partner, OrderKind.BULK, now, principal.name, quantity=customers, term_months=term_months,
        currency=config.currency, list_total=list_total, discount=discount,
    )
    licenses = _issue(
        session, partner, ed, order, now, principal.name, count=customers, seats=devices_per_customer,
        term_months=term_months, in_pool=True,
    )
    log.info("license.bulk_bought", edition=ed.code, keys=customers, order=order.id, discount=str(discount))
    return Purchase(order, licenses)


# --- assignment and activation (L2, L3, L5, L15) ------------------------------------------


def effective_allocation(partner: Partner, user: User | None) -> Allocation:
    """L15: a company limited pool overrides its users; otherwise the user's own setting applies."""
    if partner.pool_mode == PoolMode.LIMITED:
        return Allocation("company", PoolMode.LIMITED, partner.pool_limit)
    if user is not None and user.pool_mode == PoolMode.LIMITED:
        return Allocation("user", PoolMode.LIMITED, user.pool_limit)
    return Allocation("company", PoolMode.GLOBAL, None)


def _active_count(session: Session, now: datetime, *, partner_id: int, user_id: int | None = None) -> int:
    stmt = (
        select(func.count())
        .select_from(License)
        .where(
            License.partner_id == partner_id,
            License.activated_at.is_not(None),
            License.workspace_id.is_not(None),
            License.expires_at > now,
            License.voided_at.is_(None),
            License.consumed_at.is_(None),
        )
    )
    if user_id is not None:
        stmt = stmt.where(License.pool_user_id == user_id)
    return session.scalar(stmt) or 0


def _lock_allocation(session: Session, partner: Partner, user: User | None) -> Allocation:
    """Lock the row holding the limit in force; return the allocation with that row re-read.

    Concurrent assignments under the same limit queue on that row, so each counts the
    licenses the others committed and a limit is never exceeded.
    """
    allocation = effective_allocation(partner, user)
    if allocation.mode != PoolMode.LIMITED:
        return allocation
    owner: type[Partner] | type[User] = Partner
    owner_id = partner.id
    if allocation.source == "user":
        assert user is not None
        owner, owner_id = User, user.id
    if session.get_bind().dialect.name == "sqlite":
        # SQLite has no row locks: writing the row takes its one write lock, which queues assignments instead.
        session.execute(
            update(owner).where(owner.id == owner_id).values(pool_limit=owner.pool_limit)
            .execution_options(synchronize_session=False)
        )
    # FOR NO KEY UPDATE: assignments queue on the row; purchases, which only reference it, do not.
    session.scalar(
        select(owner).where(owner.id == owner_id)
        .with_for_update(key_share=True)
        .execution_options(populate_existing=True)
    )
    return effective_allocation(partner, user)


def _check_allocation(
    session: Session, partner: Partner, user: User | None, now: datetime, *, field: str = "workspace_id"
) -> None:
    """L15: refuse one more active license where the limit in force is reached (locking its row first)."""
    allocation = _lock_allocation(session, partner, user)
    if allocation.mode != PoolMode.LIMITED:
        return
    limit = allocation.limit or 0
    if allocation.source == "company":
        used = _active_count(session, now, partner_id=partner.id)
        if used >= limit:
            raise Conflict(
                f"the company's limited pool allows {limit} active licenses and {used} are in use; "
                "raise the limit or free a license",
                field=field,
                code="pool_limit",
            )
    else:
        assert user is not None
        used = _active_count(session, now, partner_id=partner.id, user_id=user.id)
        if used >= limit:
            raise Conflict(
                f"user {user.name!r} is limited to {limit} paid licenses in their user pool and has {used}; "
                "raise the user's limit or switch them to the global pool",
                field=field,
                code="pool_limit",
            )


def _check_workspace_free(session: Session, workspace: Workspace, lic: License) -> None:
    holder = session.scalar(select(License).where(License.workspace_id == workspace.id, License.id != lic.id))
    if holder is not None:
        raise Conflict(
            f"workspace {workspace.name!r} is already covered by license {holder.key}; a workspace has one license",
            field="workspace_id",
        )
    if workspace.monthly_billing_since is not None and workspace.monthly_billing_until is None:
        raise Conflict(
            f"workspace {workspace.name!r} is covered by monthly billing; end that first (M2)", field="workspace_id"
        )


def _activate(lic: License, workspace: Workspace, now: datetime) -> None:
    lic.workspace_id = workspace.id
    lic.in_pool = False
    if lic.activated_at is None:
        lic.activated_at = now
        lic.expires_at = add_months(now, lic.term_months)
    workspace.edition_id = lic.edition_id


def assign(
    session: Session,
    clock: Clock,
    config: LicensingSettings,
    principal: Principal,
    key: str,
    workspace_id: int,
) -> License:
    """L2/L5: assign a key to one workspace; its term starts now if it was unused."""
    require_admin(principal, "license")
    now = clock.now()
    lic = get_license(session, principal, key)
    workspace = get_workspace(session, principal, workspace_id)
    status = license_status(lic, now, config)
    if lic.workspace_id == workspace.id:
        return lic
    if lic.workspace_id is not None:
        raise Conflict(
            f"license {lic.key} already serves another workspace; a key serves exactly one (L5)", field="key"
        )
    if status == LicenseStatus.VOID:
        raise Conflict(f"license {lic.key} is void and cannot be assigned", field="key")
    if status == LicenseStatus.EXPIRED:
        if lic.activated_at is None:
            raise Conflict(
                f"license {lic.key} expired unused: it had to be activated by "
                f"{activation_deadline(lic).isoformat()} (12 months from purchase, L3)",
                field="key",
                code="expired",
            )
        raise Conflict(f"license {lic.key} has expired; renew it before assigning it", field="key", code="expired")
    _check_workspace_free(session, workspace, lic)
    partner = get_partner(session, principal)
    user = session.get(User, principal.user_id) if principal.user_id is not None else None
    _check_allocation(session, partner, user, now)
    before = _snapshot(session, lic)
    _activate(lic, workspace, now)
    if user is not None:
        lic.pool_user_id = user.id
    _flush(session)
    _record(session, lic, "assigned", principal.name, now, before)
    _flush(session)
    log.info("license.assigned", key=lic.key, workspace=workspace.id)
    return lic


# --- renewal (L7, L8, L9) ------------------------------------------------------------------


def _renewal_base(lic: License, now: datetime) -> datetime:
    """L7: add to the current expiry; an expired license renews from today."""
    assert lic.expires_at is not None
    return lic.expires_at if lic.expires_at > now else now


def _check_renewable(lic: License, now: datetime, config: LicensingSettings) -> None:
    status = license_status(lic, now, config)
    if status == LicenseStatus.VOID:
        raise Conflict(f"license {lic.key} is void and cannot be renewed", field="key")
    if lic.activated_at is None:
        raise Conflict(
            f"license {lic.key} has not been activated yet; its term starts when it is assigned, so there is nothing "
            "to renew", field="key",
        )


def _check_reactivation(session: Session, lic: License, now: datetime) -> None:
    """L15 for a renewal: an expired license that still serves a workspace counts again once renewed.

    So it must fit the limit in force, exactly like an assignment, or a user at their
    limit could let a key expire, assign another and renew the first. The limit is the
    one of the user whose pool the license counts in (who assigned it), not of whoever
    renews it. A license that counts now (active) or will not count (unassigned) is
    not checked. The limit's row is locked before any other row is written, as in assign.
    """
    if lic.workspace_id is None or lic.expires_at is None or lic.expires_at > now:
        return
    partner = session.get(Partner, lic.partner_id)
    assert partner is not None
    user = session.get(User, lic.pool_user_id) if lic.pool_user_id is not None else None
    _check_allocation(session, partner, user, now, field="key")


def _target_edition(session: Session, lic: License, edition: str | None) -> Edition:
    current = session.get(Edition, lic.edition_id)
    assert current is not None
    if edition is None:
        return current
    target = _edition(session, edition)
    if target.id == current.id:
        raise DomainError(
            f"license {lic.key} is already {current.code}; leave out the edition to renew without migrating",
            field="edition",
        )
    return target


def _migrate(session: Session, lic: License, target: Edition) -> None:
    """L9: the license and its workspace move to the edition; devices pick it up at their next check-in."""
    lic.edition_id = target.id
    lic.license_type = target.license_type
    if lic.workspace_id is not None:
        workspace = session.get(Workspace, lic.workspace_id)
        if workspace is not None:
            workspace.edition_id = target.id


def _priced_renewal(
    session: Session,
    config: LicensingSettings,
    lic: License,
    *,
    years: int,
    target: Edition,
    base: datetime,
    now: datetime,
    actor: str,
    action: str,
) -> Renewal:
    partner = session.get(Partner, lic.partner_id)
    assert partner is not None
    months = 12 * years
    list_total = _price(_unit_price(config, target), lic.seats, months, 1)
    before = _snapshot(session, lic)
    order = _place_order(
        session, partner, OrderKind.RENEWAL, now, actor, quantity=1, term_months=months,
        currency=config.currency, list_total=list_total, discount=Decimal(partner.discount_percent),
    )
    if target.id != lic.edition_id:
        _migrate(session, lic, target)
    lic.expires_at = add_months(base, months)
    session.add(OrderLicense(order_id=order.id, license_id=lic.id))
    _flush(session)
    _record(session, lic, action, actor, now, before, order_id=order.id, years=years)
    _flush(session)
    return Renewal(lic, order=order)


def renew(
    session: Session,
    clock: Clock,
    config: LicensingSettings,
    principal: Principal,
    key: str,
    *,
    years: int,
    edition: str | None = None,
) -> Renewal:
    """L7 (and L9 with ``edition``): a paid renewal by whole years."""
    require_admin(principal, "license")
    _check_range(years, 1, MAX_RENEWAL_YEARS, "years", "years")
    now = clock.now()
    lic = get_license(session, principal, key)
    _check_renewable(lic, now, config)
    target = _target_edition(session, lic, edition)
    _check_reactivation(session, lic, now)
    action = "renewed_migrated" if target.id != lic.edition_id else "renewed"
    renewal = _priced_renewal(
        session, config, lic, years=years, target=target, base=_renewal_base(lic, now), now=now,
        actor=principal.name, action=action,
    )
    log.info("license.renewed", key=lic.key, years=years, edition=target.code, order=renewal.order.id if renewal.order else None)
    return renewal


def _live_purchase_bound(now: datetime) -> datetime:
    """The earliest purchase instant whose coupon may still be live (L3), a day early.

    A superset bound for SQL: because of month-end clamping (29 Feb), subtracting 12
    months from now is not the exact inverse of adding them to the purchase, and the
    day of slack keeps every live coupon in; _first_usable then applies the exact rule.
    """
    return add_months(now, -ACTIVATION_WINDOW_MONTHS) - timedelta(days=1)


def _coupon_candidates(lic: License, target: Edition, now: datetime) -> Select[tuple[License]]:
    return select(License).where(
        License.partner_id == lic.partner_id,
        License.id != lic.id,
        License.edition_id == target.id,
        License.seats == lic.seats,
        License.activated_at.is_(None),
        License.workspace_id.is_(None),
        License.voided_at.is_(None),
        License.consumed_at.is_(None),
        License.purchased_at >= _live_purchase_bound(now),
        func.trim(License.notes) == "",
    )


def _soonest_deadline(lic: License) -> tuple[datetime, int]:
    """L8 order: the coupon that expires soonest first, then the older row.

    Not the purchase date: clamping makes the deadline non-monotonic in it (bought
    28 Feb 2024 23:00 -> 28 Feb 2025 23:00, but 29 Feb 2024 01:00 -> 28 Feb 2025 01:00).
    """
    return activation_deadline(lic), lic.id


def _first_usable(
    session: Session,
    config: LicensingSettings,
    candidates: Select[tuple[License]],
    now: datetime,
    order: Callable[[License], Any] = _soonest_deadline,
) -> License | None:
    """The first candidate by ``order`` that is unused by the exact rule (L3), locked ``FOR UPDATE SKIP LOCKED``.

    Candidates are read unlocked and sorted here, because the activation deadline is
    calendar arithmetic no SQL dialect shares (the SQL filters leave a handful of rows).
    Only the chosen row is locked, so a concurrent transaction about to consume it hides
    it and this one moves on to the next. SQLite has no row locks; there the license's
    version column turns the loser into a Conflict.
    """
    usable = [c for c in session.scalars(candidates) if license_status(c, now, config) == LicenseStatus.UNUSED]
    for candidate in sorted(usable, key=order):
        locked = session.scalar(
            select(License)
            .where(License.id == candidate.id, License.consumed_at.is_(None), License.activated_at.is_(None))
            .with_for_update(skip_locked=True)
            .execution_options(populate_existing=True)
        )
        if locked is not None and locked.voided_at is None:
            return locked
    return None


def find_coupon(
    session: Session, config: LicensingSettings, lic: License, target: Edition, now: datetime
) -> License | None:
    """L8: the usable coupon that expires soonest, skipping those with a note; locked for this transaction."""
    return _first_usable(session, config, _coupon_candidates(lic, target, now), now)


def renew_with_coupon(
    session: Session,
    clock: Clock,
    config: LicensingSettings,
    principal: Principal,
    key: str,
    *,
    edition: str | None = None,
) -> Renewal:
    """L8 (and L9 with ``edition``): renew by consuming an unused key; nothing is charged."""
    require_admin(principal, "license")
    now = clock.now()
    lic = get_license(session, principal, key)
    _check_renewable(lic, now, config)
    target = _target_edition(session, lic, edition)
    _check_reactivation(session, lic, now)
    coupon = find_coupon(session, config, lic, target, now)
    if coupon is None:
        raise Conflict(
            f"no unused {target.code} key with {lic.seats} seats and no note is available to renew {lic.key}; "
            "buy one, clear the note of one you want used, or renew by years",
            field="key",
            code="no_coupon",
        )
    before_license, before_coupon = _snapshot(session, lic), _snapshot(session, coupon)
    if target.id != lic.edition_id:
        _migrate(session, lic, target)
    lic.expires_at = add_months(_renewal_base(lic, now), coupon.term_months)
    coupon.consumed_at = now
    coupon.in_pool = False
    _flush(session)
    action = "renewed_migrated_with_coupon" if edition is not None else "renewed_with_coupon"
    _record(session, lic, action, principal.name, now, before_license, coupon=coupon.key)
    _record(session, coupon, "consumed", principal.name, now, before_coupon, renewed=lic.key)
    _flush(session)
    log.info("license.renewed_with_coupon", key=lic.key, coupon=coupon.key)
    return Renewal(lic, coupon=coupon)


# --- notes and auto-renewal (L10, L13) ----------------------------------------------------------


def _check_notes(notes: str) -> None:
    if len(notes) > MAX_NOTES:
        raise DomainError(f"notes may hold at most {MAX_NOTES} characters, got {len(notes)}", field="notes")


def set_notes(session: Session, clock: Clock, principal: Principal, key: str, notes: str) -> License:
    """L10: notes can be edited at any time, whatever the license's state."""
    _check_notes(notes)
    lic = get_license(session, principal, key)
    if lic.notes == notes:
        return lic
    before = _snapshot(session, lic)
    lic.notes = notes
    _flush(session)
    _record(session, lic, "notes_edited", principal.name, clock.now(), before)
    _flush(session)
    return lic


def set_auto_renew(
    session: Session, clock: Clock, config: LicensingSettings, principal: Principal, key: str, enabled: bool
) -> License:
    """L13: cancel or restore auto-renewal of one license."""
    require_admin(principal, "license")
    now = clock.now()
    lic = get_license(session, principal, key)
    if license_status(lic, now, config) == LicenseStatus.VOID:
        raise Conflict(f"license {lic.key} is void; auto-renewal cannot be changed", field="key")
    if lic.auto_renew == enabled:
        return lic
    before = _snapshot(session, lic)
    lic.auto_renew = enabled
    _flush(session)
    _record(session, lic, "auto_renew_restored" if enabled else "auto_renew_cancelled", principal.name, now, before)
    _flush(session)
    return lic


# --- pool and automatic exchange (L14) ------------------------------------------------------------


def set_pool(
    session: Session, clock: Clock, config: LicensingSettings, principal: Principal, key: str, in_pool: bool
) -> License:
    """Move an unused key into the partner's global pool, or take it out."""
    require_admin(principal, "license")
    now = clock.now()
    lic = get_license(session, principal, key)
    if in_pool and license_status(lic, now, config) != LicenseStatus.UNUSED:
        raise Conflict(f"only unused keys can go into the pool; {lic.key} is {license_status(lic, now, config).value}",
                       field="key")
    if lic.in_pool == in_pool:
        return lic
    before = _snapshot(session, lic)
    lic.in_pool = in_pool
    _flush(session)
    _record(session, lic, "pooled" if in_pool else "unpooled", principal.name, now, before)
    _flush(session)
    return lic


def find_pool_replacement(
    session: Session, config: LicensingSettings, expired: License, now: datetime
) -> License | None:
    """L14: an available pool key of the same edition with enough seats (fewest seats, soonest deadline first)."""
    stmt = (
        select(License)
        .where(
            License.partner_id == expired.partner_id,
            License.id != expired.id,
            License.in_pool.is_(True),
            License.edition_id == expired.edition_id,
            License.seats >= expired.seats,
            License.activated_at.is_(None),
            License.workspace_id.is_(None),
            License.voided_at.is_(None),
            License.consumed_at.is_(None),
            License.purchased_at >= _live_purchase_bound(now),
        )
    )
    return _first_usable(session, config, stmt, now, order=lambda c: (c.seats, *_soonest_deadline(c)))


def _exchange(session: Session, lic: License, replacement: License, now: datetime, actor: str) -> None:
    workspace = session.get(Workspace, lic.workspace_id)
    assert workspace is not None
    before_old, before_new = _snapshot(session, lic), _snapshot(session, replacement)
    lic.workspace_id = None
    lic.replaced_by_id = replacement.id
    _flush(session)  # the workspace must be free before the replacement takes it
    _activate(replacement, workspace, now)
    replacement.pool_user_id = lic.pool_user_id
    _flush(session)
    _record(session, lic, "exchanged_out", actor, now, before_old, replaced_by=replacement.key)
    _record(session, replacement, "exchanged_in", actor, now, before_new, replaces=lic.key)
    _flush(session)
    log.info("license.exchanged", expired=lic.key, replacement=replacement.key, workspace=workspace.id)


def exchange(
    session: Session, clock: Clock, config: LicensingSettings, principal: Principal, key: str
) -> License:
    """L14 by hand: replace an expired, assigned license with a pool key (works with automatic exchange off)."""
    require_admin(principal, "license")
    now = clock.now()
    lic = get_license(session, principal, key)
    if license_status(lic, now, config) != LicenseStatus.EXPIRED or lic.workspace_id is None:
        raise Conflict(f"only an expired license that serves a workspace can be exchanged; {lic.key} cannot",
                       field="key")
    replacement = find_pool_replacement(session, config, lic, now)
    if replacement is None:
        raise Conflict(
            f"the pool holds no unused key of this edition with at least {lic.seats} seats", field="key",
            code="pool_empty",
        )
    _exchange(session, lic, replacement, now, principal.name)
    return replacement


# --- settings (L14, L15) -------------------------------------------------------------------------


def _check_pool(mode: PoolMode, limit: int | None) -> None:
    if mode == PoolMode.LIMITED and (limit is None or limit < 0):
        raise DomainError("a limited pool needs a limit of 0 or more licenses", field="pool_limit")
    if mode == PoolMode.GLOBAL and limit is not None:
        raise DomainError("the global pool has no limit; leave pool_limit out", field="pool_limit")


def set_company_settings(
    session: Session,
    principal: Principal,
    *,
    automatic_exchange: bool | None = None,
    pool_mode: PoolMode | None = None,
    pool_limit: int | None = None,
) -> Partner:
    """L14 automatic exchange on/off; L15 the company's allocation (applies to all its users)."""
    require_admin(principal, "settings")
    partner = get_partner(session, principal)
    if automatic_exchange is not None:
        partner.automatic_exchange = automatic_exchange
    if pool_mode is not None:
        _check_pool(pool_mode, pool_limit)
        partner.pool_mode, partner.pool_limit = pool_mode, pool_limit
    elif pool_limit is not None:
        raise DomainError("give pool_mode with pool_limit", field="pool_mode")
    session.flush()
    log.info("licensing.company_settings", partner=partner.id, automatic_exchange=partner.automatic_exchange,
             pool_mode=partner.pool_mode.value, pool_limit=partner.pool_limit, actor=principal.name)
    return partner


def company_settings(session: Session, principal: Principal) -> dict[str, Any]:
    require_admin(principal, "settings")
    partner = get_partner(session, principal)
    return {
        "automatic_exchange": partner.automatic_exchange,
        "pool_mode": partner.pool_mode.value,
        "pool_limit": partner.pool_limit,
    }


def set_user_allocation(
    session: Session, principal: Principal, user_id: int, *, pool_mode: PoolMode | None, pool_limit: int | None
) -> User:
    """L15: a user on the global pool (``None``: no own setting) or limited to a user pool of N paid licenses."""
    user = get_user(session, principal, user_id)
    if pool_mode is not None:
        _check_pool(pool_mode, pool_limit)
    elif pool_limit is not None:
        raise DomainError("give pool_mode with pool_limit", field="pool_mode")
    user.pool_mode, user.pool_limit = pool_mode, pool_limit
    session.flush()
    return user


def user_allocation(session: Session, clock: Clock, principal: Principal, user_id: int) -> dict[str, Any]:
    """The user's own setting, what is in force for them, and how much of the limit is used."""
    user = get_user(session, principal, user_id)
    partner = get_partner(session, principal)
    effective = effective_allocation(partner, user)
    now = clock.now()
    used = (
        _active_count(session, now, partner_id=partner.id, user_id=user.id)
        if effective.source == "user"
        else _active_count(session, now, partner_id=partner.id)
    )
    return {
        "user_id": user.id,
        "pool_mode": user.pool_mode.value if user.pool_mode else None,
        "pool_limit": user.pool_limit,
        "effective": {"source": effective.source, "pool_mode": effective.mode.value, "pool_limit": effective.limit,
                      "in_use": used},
    }


# --- bulk delete (L16) ------------------------------------------------------------------------------


def delete_expired(
    session: Session,
    clock: Clock,
    config: LicensingSettings,
    principal: Principal,
    mode: DeleteMode,
    *,
    dry_run: bool = False,
) -> list[License]:
    """L16: void every expired license (all / with auto-renewal / unassigned); returns them."""
    require_admin(principal, "operation")
    now = clock.now()
    stmt = select(License).where(
        License.partner_id == principal.partner_id, License.voided_at.is_(None), License.consumed_at.is_(None)
    )
    if mode == DeleteMode.AUTO_RENEW:
        stmt = stmt.where(License.auto_renew.is_(True))
    elif mode == DeleteMode.UNASSIGNED:
        stmt = stmt.where(License.workspace_id.is_(None))
    chosen = [
        lic for lic in session.scalars(stmt.order_by(License.id))
        if license_status(lic, now, config) == LicenseStatus.EXPIRED
    ]
    if dry_run:
        return chosen
    for lic in chosen:
        before = _snapshot(session, lic)
        lic.voided_at = now
        lic.workspace_id = None
        lic.in_pool = False
        _flush(session)
        _record(session, lic, "deleted", principal.name, now, before, mode=mode.value)
    _flush(session)
    log.info("license.bulk_deleted", mode=mode.value, count=len(chosen), actor=principal.name)
    return chosen


# --- order history (L12) ----------------------------------------------------------------------------


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


# --- the daily job (L3, L4, L13, L14) -----------------------------------------------------------


@dataclass
class Notification:
    event: str
    payload: dict[str, Any]


@dataclass
class DailyReport:
    expired_unused: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    exchanged: list[tuple[str, str]] = field(default_factory=list)
    auto_renewed: list[str] = field(default_factory=list)
    notifications: list[Notification] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        return {
            "expired_unused": len(self.expired_unused),
            "expired": len(self.expired),
            "exchanged": len(self.exchanged),
            "auto_renewed": len(self.auto_renewed),
            "notifications": len(self.notifications),
        }


def _already_recorded(session: Session, lic: License, action: str, since: datetime | None = None) -> bool:
    stmt = select(LicenseHistory.id).where(LicenseHistory.license_id == lic.id, LicenseHistory.action == action)
    if since is not None:
        stmt = stmt.where(LicenseHistory.at >= since)
    return session.scalar(stmt.limit(1)) is not None


def run_daily(session: Session, clock: Clock, config: LicensingSettings) -> DailyReport:
    """Expire unused coupons (L3) and licenses (auto-renewing or exchanging them, L13/L14), decide reminders (L4).

    Safe to run any number of times a day: every step checks what was already done.
    """
    now = clock.now()
    report = DailyReport()
    live = (License.voided_at.is_(None), License.consumed_at.is_(None))

    # L3: coupons past their activation window.
    unused = session.scalars(
        select(License)
        .where(*live, License.activated_at.is_(None), License.purchased_at <= add_months(now, -11))
        .order_by(License.id)
    ).all()
    for lic in unused:
        if now >= activation_deadline(lic) and not _already_recorded(session, lic, "expired_unused"):
            session.add(LicenseHistory(license_id=lic.id, at=now, actor=DAILY_ACTOR, action="expired_unused",
                                       before={"status": "unused"}, after={"status": "expired",
                                       "deadline": activation_deadline(lic).isoformat()}))
            report.expired_unused.append(lic.key)

    # Licenses whose term ended: exchange (L14), else auto-renew (L13), else let them expire.
    ended = session.scalars(
        select(License).where(*live, License.activated_at.is_not(None), License.expires_at <= now).order_by(License.id)
    ).all()
    for lic in ended:
        assert lic.expires_at is not None
        if _already_recorded(session, lic, "expired", since=lic.expires_at):
            continue
        partner = session.get(Partner, lic.partner_id)
        assert partner is not None
        assigned = lic.workspace_id is not None
        replacement = (
            find_pool_replacement(session, config, lic, now) if assigned and partner.automatic_exchange else None
        )
        if replacement is None and assigned and lic.auto_renew and _auto_renew(session, config, lic, now):
            report.auto_renewed.append(lic.key)
            continue
        session.add(LicenseHistory(license_id=lic.id, at=now, actor=DAILY_ACTOR, action="expired",
                                   before={"status": "active"}, after={"status": "expired"}))
        report.expired.append(lic.key)
        if replacement is not None:
            _flush(session)
            _exchange(session, lic, replacement, now, DAILY_ACTOR)
            report.exchanged.append((lic.key, replacement.key))
    _flush(session)

    _decide_reminders(session, config, now, report)
    _flush(session)
    log.info("licensing.daily", **report.summary())
    return report


def _auto_renew(session: Session, config: LicensingSettings, lic: License, now: datetime) -> bool:
    """L13: renew for a year from the old expiry; False (logged) when the edition has no price."""
    edition = session.get(Edition, lic.edition_id)
    assert edition is not None and lic.expires_at is not None
    try:
        _priced_renewal(session, config, lic, years=1, target=edition, base=lic.expires_at, now=now,
                        actor=DAILY_ACTOR, action="auto_renewed")
    except DomainError as exc:
        log.warning("license.auto_renew_failed", key=lic.key, error=exc.message)
        return False
    return True


def _decide_reminders(session: Session, config: LicensingSettings, now: datetime, report: DailyReport) -> None:
    horizon = max([*config.reminder_days, config.end_user_notice_days, 0])
    rows = session.execute(
        _info_select()
        .add_columns(Partner)
        .join(Partner, Partner.id == License.partner_id)
        .where(
            License.voided_at.is_(None),
            License.consumed_at.is_(None),
            License.workspace_id.is_not(None),
            License.expires_at > now,
            License.expires_at <= now + timedelta(days=horizon + 1),
        )
        .order_by(License.id)
    ).all()
    for lic, edition, workspace, customer, partner in rows:
        days_left = (lic.expires_at.date() - now.date()).days
        due = [d for d in sorted(config.reminder_days) if days_left <= d]
        base = {
            "license_key": lic.key,
            "edition": edition.code,
            "seats": lic.seats,
            "expires_at": lic.expires_at.isoformat(),
            "days_left": days_left,
            "auto_renew": lic.auto_renew,
            "partner_id": partner.id,
            "partner_name": partner.name,
            "customer_id": customer.id if customer else None,
            "customer_name": customer.name if customer else None,
            "workspace_id": workspace.id if workspace else None,
        }
        if due:
            kind = f"partner-{due[0]}d"
            if _claim_reminder(session, lic, kind, now):
                report.notifications.append(Notification("license.reminder", {
                    **base, "reminder": kind, "audience": "partner", "to": partner.email,
                    "next_renewal_date": lic.expires_at.isoformat() if lic.auto_renew else None,
                }))
        if days_left <= config.end_user_notice_days and not lic.auto_renew:
            kind = f"end-user-{config.end_user_notice_days}d"
            if _claim_reminder(session, lic, kind, now):
                report.notifications.append(Notification("license.reminder", {
                    **base, "reminder": kind, "audience": "end_user", "to": customer.billing_email if customer else None,
                }))


def _claim_reminder(session: Session, lic: License, kind: str, now: datetime) -> bool:
    """Record the reminder unless it exists; the unique key stops a concurrent job from sending it too."""
    assert lic.expires_at is not None
    exists = session.scalar(
        select(LicenseReminder.id).where(
            LicenseReminder.license_id == lic.id, LicenseReminder.kind == kind,
            LicenseReminder.expires_at == lic.expires_at,
        )
    )
    if exists is not None:
        return False
    session.add(LicenseReminder(license_id=lic.id, kind=kind, expires_at=lic.expires_at, sent_at=now))
    return True


async def run_daily_job(
    factory: sessionmaker[Session], clock: Clock, config: LicensingSettings, plugins: Any
) -> DailyReport:
    """The scheduled entry point: decide and record in one transaction, then notify through ``gateway_notify``.

    Notices go out only after the commit, so a run that fails or loses a race to a
    concurrent run (the reminder's unique key) sends nothing.
    """
    def work() -> DailyReport:
        try:
            with gdb.transaction(factory) as session:
                return run_daily(session, clock, config)
        except Conflict as exc:
            # Another instance ran the job at the same moment and recorded the same reminders first.
            log.warning("licensing.daily_lost_race", error=exc.message)
            return DailyReport()

    report = await asyncio.to_thread(work)
    for notification in report.notifications:
        await plugins.call_each_async("gateway_notify", event=notification.event, payload=notification.payload)
    return report

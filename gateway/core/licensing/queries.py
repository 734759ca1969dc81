"""Reading licenses: lookups by key under S8, the views people read, searches (L11), unused keys.

Decisions the rules leave open:

- **Lists** evaluate status filters in Python over one partner's licenses, because the
  activation deadline is calendar arithmetic no SQL dialect shares; that is fine for
  tens of thousands of licenses per partner. They hide void licenses (deleted, L16, or
  consumed, L8) unless asked.
- **Unused keys** (L3, L8, L14): the coupon and pool-key searches of
  :mod:`~gateway.core.licensing.renewal` and :mod:`~gateway.core.licensing.pool` share
  :func:`first_usable`: a superset bound in SQL, the exact activation rule here, and a
  lock on the chosen row only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Select, or_, select
from sqlalchemy.orm import Session

from gateway.core.access import Principal, customer_clause
from gateway.core.clock import Clock
from gateway.core.license_keys import normalize_key
from gateway.core.licensing.rules import (
    ACTIVATION_WINDOW_MONTHS,
    LicenseStatus,
    activation_deadline,
    add_months,
    license_status,
    next_renewal_date,
)
from gateway.core.models import Customer, Edition, License, Workspace
from gateway.core.settings import LicensingSettings
from gateway.core.text import check_search
from gateway.errors import DomainError, NotFound


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


# --- lookups (S8) -----------------------------------------------------------------------------


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


def info_select() -> Select[License, Edition, Workspace, Customer]:
    """Licenses with their edition, workspace and customer (outer joins), the rows of :class:`LicenseInfo`."""
    return (
        select(License, Edition, Workspace, Customer)
        .join(Edition, Edition.id == License.edition_id)
        .outerjoin(Workspace, Workspace.id == License.workspace_id)
        .outerjoin(Customer, Customer.id == Workspace.customer_id)
    )


def _infos(session: Session, stmt: Select[License, Edition, Workspace, Customer]) -> list[LicenseInfo]:
    return [LicenseInfo(*row) for row in session.execute(stmt).all()]


def license_info(session: Session, principal: Principal, key: str) -> LicenseInfo:
    lic = get_license(session, principal, key)
    return _infos(session, info_select().where(License.id == lic.id))[0]


def infos_for(session: Session, licenses: Iterable[License]) -> list[LicenseInfo]:
    """Views of licenses already loaded (e.g. just bought), in the given order."""
    ids = [lic.id for lic in licenses]
    by_id = {info.license.id: info for info in _infos(session, info_select().where(License.id.in_(ids)))}
    return [by_id[i] for i in ids]


def get_edition(session: Session, code: str, *, field: str = "edition") -> Edition:
    """The edition with ``code``, or a DomainError listing the known ones."""
    edition = session.scalar(select(Edition).where(Edition.code == code))
    if edition is None:
        known = ", ".join(session.scalars(select(Edition.code).order_by(Edition.code))) or "none"
        raise DomainError(f"unknown edition {code!r} (known editions: {known})", field=field, code="unknown_edition")
    return edition


# --- search (L11) -----------------------------------------------------------------------------


def like_pattern(query: str) -> str:
    """L11: ``*`` and ``?`` are wildcards; without one the text matches anywhere. ``%``/``_`` are literal.

    A control character (a NUL, which PostgreSQL cannot take) is a DomainError on ``q``.
    """
    check_search(query, field="q")
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
    stmt = info_select().where(*_visible(principal))
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


# --- unused keys (L3, L8, L14) ----------------------------------------------------------------


def live_purchase_bound(now: datetime) -> datetime:
    """The earliest purchase instant whose coupon may still be live (L3), a day early.

    A superset bound for SQL: because of month-end clamping (29 Feb), subtracting 12
    months from now is not the exact inverse of adding them to the purchase, and the
    day of slack keeps every live coupon in; first_usable then applies the exact rule.
    """
    return add_months(now, -ACTIVATION_WINDOW_MONTHS) - timedelta(days=1)


def soonest_deadline(lic: License) -> tuple[datetime, int]:
    """L8 order: the coupon that expires soonest first, then the older row.

    Not the purchase date: clamping makes the deadline non-monotonic in it (bought
    28 Feb 2024 23:00 -> 28 Feb 2025 23:00, but 29 Feb 2024 01:00 -> 28 Feb 2025 01:00).
    """
    return activation_deadline(lic), lic.id


def first_usable(
    session: Session,
    config: LicensingSettings,
    candidates: Select[License],
    now: datetime,
    order: Callable[[License], Any] = soonest_deadline,
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

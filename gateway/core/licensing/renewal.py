"""Renewing a license: paid by years (L7), with a coupon (L8), into another edition (L9); auto-renewal on/off (L13).

Decisions the rules leave open:

- **Prices** of renewals: a renewal costs what a purchase would for the years added, at
  the price of the edition renewed into (L9), with the partner's discount only (no bulk
  tier, L6). Renewing with a coupon (L8) costs nothing and places no order: the coupon's
  own order already paid.
- **Coupons** (L8): a coupon must be unused, inside its activation window, of the same
  edition (the target edition when migrating, L9) and seat count, without a note; pool
  keys are coupons too. It extends the license by the coupon's own term.
- A renewal that makes an expired, assigned license count again is checked against the
  allocation in force (L15, :func:`~gateway.core.licensing.assignment.check_allocation`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import structlog
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from gateway.core.access import Principal, require_admin
from gateway.core.clock import Clock
from gateway.core.licensing.assignment import check_allocation
from gateway.core.licensing.history import flush, record, snapshot
from gateway.core.licensing.purchase import place_order
from gateway.core.licensing.queries import first_usable, get_edition, get_license, live_purchase_bound
from gateway.core.licensing.rules import (
    MAX_RENEWAL_YEARS,
    LicenseStatus,
    add_months,
    check_range,
    license_status,
    list_price,
    price_currency,
    unit_price,
)
from gateway.core.models import Edition, License, Order, OrderKind, OrderLicense, Partner, User, Workspace
from gateway.core.settings import LicensingSettings
from gateway.errors import Conflict, DomainError

log = structlog.get_logger(__name__)


@dataclass
class Renewal:
    license: License
    order: Order | None = None
    coupon: License | None = None


# --- paid renewal (L7, L9) --------------------------------------------------------------------


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
    check_allocation(session, partner, user, now, field="key")


def _target_edition(session: Session, lic: License, edition: str | None) -> Edition:
    current = session.get(Edition, lic.edition_id)
    assert current is not None
    if edition is None:
        return current
    target = get_edition(session, edition)
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


def priced_renewal(
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
    """L7/L9/L13: extend ``lic`` by ``years`` from ``base`` at the price of ``target``, placing a renewal order."""
    partner = session.get(Partner, lic.partner_id)
    assert partner is not None
    months = 12 * years
    list_total = list_price(unit_price(config, target), lic.seats, months, 1)
    before = snapshot(session, lic)
    order = place_order(
        session, partner, OrderKind.RENEWAL, now, actor, quantity=1, term_months=months,
        currency=price_currency(config, target), list_total=list_total, discount=Decimal(partner.discount_percent),
    )
    if target.id != lic.edition_id:
        _migrate(session, lic, target)
    lic.expires_at = add_months(base, months)
    session.add(OrderLicense(order_id=order.id, license_id=lic.id))
    flush(session)
    record(session, lic, action, actor, now, before, order_id=order.id, years=years)
    flush(session)
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
    check_range(years, 1, MAX_RENEWAL_YEARS, "years", "years")
    now = clock.now()
    lic = get_license(session, principal, key)
    _check_renewable(lic, now, config)
    target = _target_edition(session, lic, edition)
    _check_reactivation(session, lic, now)
    action = "renewed_migrated" if target.id != lic.edition_id else "renewed"
    renewal = priced_renewal(
        session, config, lic, years=years, target=target, base=_renewal_base(lic, now), now=now,
        actor=principal.name, action=action,
    )
    log.info("license.renewed", key=lic.key, years=years, edition=target.code, order=renewal.order.id if renewal.order else None)
    return renewal


# --- renewal with a coupon (L8) ---------------------------------------------------------------


def _coupon_candidates(lic: License, target: Edition, now: datetime) -> Select[License]:
    return select(License).where(
        License.partner_id == lic.partner_id,
        License.id != lic.id,
        License.edition_id == target.id,
        License.seats == lic.seats,
        License.activated_at.is_(None),
        License.workspace_id.is_(None),
        License.voided_at.is_(None),
        License.consumed_at.is_(None),
        License.purchased_at >= live_purchase_bound(now),
        func.trim(License.notes) == "",
    )


def find_coupon(
    session: Session, config: LicensingSettings, lic: License, target: Edition, now: datetime
) -> License | None:
    """L8: the usable coupon that expires soonest, skipping those with a note; locked for this transaction."""
    return first_usable(session, config, _coupon_candidates(lic, target, now), now)


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
    before_license, before_coupon = snapshot(session, lic), snapshot(session, coupon)
    if target.id != lic.edition_id:
        _migrate(session, lic, target)
    lic.expires_at = add_months(_renewal_base(lic, now), coupon.term_months)
    coupon.consumed_at = now
    coupon.in_pool = False
    flush(session)
    action = "renewed_migrated_with_coupon" if edition is not None else "renewed_with_coupon"
    record(session, lic, action, principal.name, now, before_license, coupon=coupon.key)
    record(session, coupon, "consumed", principal.name, now, before_coupon, renewed=lic.key)
    flush(session)
    log.info("license.renewed_with_coupon", key=lic.key, coupon=coupon.key)
    return Renewal(lic, coupon=coupon)


# --- auto-renewal (L13) -----------------------------------------------------------------------


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
    before = snapshot(session, lic)
    lic.auto_renew = enabled
    flush(session)
    record(session, lic, "auto_renew_restored" if enabled else "auto_renew_cancelled", principal.name, now, before)
    flush(session)
    return lic

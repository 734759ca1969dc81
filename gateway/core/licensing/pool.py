"""The partner's pool and licensing settings: pool keys and exchange (L14), allocation (L15), bulk delete (L16).

The allocation settings live here rather than in :mod:`~gateway.core.licensing.assignment`
because an allocation is a pool mode (the global pool or a limited one) and the same
company settings switch automatic exchange; the assignment module enforces them.

Decisions the rules leave open:

- **Automatic exchange** (L14): the replacement is an unused, unexpired pool key of the
  same edition with at least as many seats (fewest seats first, then the soonest
  activation deadline). A key that carries a note is kept for a purpose, as L8 says of
  coupons, so it is taken only when no key without a note fits; its ``exchanged_in``
  history then says so (``noted_key_used``). It is assigned to the workspace and activated; the old license
  stays expired, unassigned, and points at its replacement. The daily job
  (:mod:`~gateway.core.licensing.daily`) tries it on expiry; :func:`exchange` does it by hand.
- **Bulk delete** (L16) voids licenses rather than removing rows, so that their history
  (L10) and the order history (L12) stay whole; lists hide void licenses unless asked.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from gateway.core.access import Principal, get_partner, get_user, require_admin
from gateway.core.clock import Clock
from gateway.core.licensing.assignment import activate, active_count, effective_allocation
from gateway.core.licensing.history import flush, record, snapshot
from gateway.core.licensing.queries import first_usable, get_license, live_purchase_bound, soonest_deadline
from gateway.core.licensing.rules import DeleteMode, LicenseStatus, license_status
from gateway.core.models import License, Partner, PoolMode, User, Workspace
from gateway.core.settings import LicensingSettings
from gateway.errors import Conflict, DomainError

log = structlog.get_logger(__name__)


# --- pool and automatic exchange (L14) --------------------------------------------------------


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
    before = snapshot(session, lic)
    lic.in_pool = in_pool
    flush(session)
    record(session, lic, "pooled" if in_pool else "unpooled", principal.name, now, before)
    flush(session)
    return lic


def _pool_candidates(expired: License, now: datetime) -> Select[License]:
    return (
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
            License.purchased_at >= live_purchase_bound(now),
        )
    )


def _has_note(lic: License) -> bool:
    return bool(lic.notes.strip())


def _replacement_order(candidate: License) -> tuple[Any, ...]:
    """L14 (with L8's reading of notes): keys without a note first, then fewest seats, then soonest deadline."""
    return (_has_note(candidate), candidate.seats, *soonest_deadline(candidate))


def find_pool_replacement(
    session: Session, config: LicensingSettings, expired: License, now: datetime
) -> License | None:
    """L14: an available pool key of the same edition with enough seats; noted keys only when no other fits."""
    return first_usable(session, config, _pool_candidates(expired, now), now, order=_replacement_order)


def pool_replacement_available(session: Session, config: LicensingSettings, lic: License, at: datetime) -> bool:
    """L14 looking ahead: would a pool key still be usable at ``at`` to replace ``lic``? (No row is locked.)"""
    return any(
        license_status(candidate, at, config) == LicenseStatus.UNUSED
        for candidate in session.scalars(_pool_candidates(lic, at))
    )


def apply_exchange(session: Session, lic: License, replacement: License, now: datetime, actor: str) -> None:
    """L14: move the expired license's workspace to ``replacement`` and activate it, both recorded."""
    workspace = session.get(Workspace, lic.workspace_id)
    assert workspace is not None
    before_old, before_new = snapshot(session, lic), snapshot(session, replacement)
    lic.workspace_id = None
    lic.replaced_by_id = replacement.id
    flush(session)  # the workspace must be free before the replacement takes it
    activate(replacement, workspace, now)
    replacement.pool_user_id = lic.pool_user_id
    flush(session)
    record(session, lic, "exchanged_out", actor, now, before_old, replaced_by=replacement.key)
    noted = {"noted_key_used": "no pool key without a note fits"} if _has_note(replacement) else {}
    record(session, replacement, "exchanged_in", actor, now, before_new, replaces=lic.key, **noted)
    flush(session)
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
    apply_exchange(session, lic, replacement, now, principal.name)
    return replacement


# --- settings (L14, L15) ----------------------------------------------------------------------


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
    unset_pool_mode: bool = False,
) -> Partner:
    """L14 automatic exchange on/off; L15 the company's allocation (applies to all its users).

    ``pool_mode`` None leaves the allocation as it is; ``unset_pool_mode`` removes the
    company's own setting, so that each user's own applies again.
    """
    require_admin(principal, "settings")
    partner = get_partner(session, principal)
    if automatic_exchange is not None:
        partner.automatic_exchange = automatic_exchange
    if unset_pool_mode:
        if pool_mode is not None or pool_limit is not None:
            raise DomainError("removing the company's allocation takes no pool_mode or pool_limit", field="pool_mode")
        partner.pool_mode, partner.pool_limit = None, None
    elif pool_mode is not None:
        _check_pool(pool_mode, pool_limit)
        partner.pool_mode, partner.pool_limit = pool_mode, pool_limit
    elif pool_limit is not None:
        raise DomainError("give pool_mode with pool_limit", field="pool_mode")
    session.flush()
    log.info("licensing.company_settings", partner=partner.id, automatic_exchange=partner.automatic_exchange,
             pool_mode=partner.pool_mode.value if partner.pool_mode else None, pool_limit=partner.pool_limit,
             actor=principal.name)
    return partner


def company_settings(session: Session, principal: Principal) -> dict[str, Any]:
    require_admin(principal, "settings")
    partner = get_partner(session, principal)
    return {
        "automatic_exchange": partner.automatic_exchange,
        "pool_mode": partner.pool_mode.value if partner.pool_mode else None,
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
        active_count(session, now, partner_id=partner.id, user_id=user.id)
        if effective.source == "user"
        else active_count(session, now, partner_id=partner.id)
    )
    return {
        "user_id": user.id,
        "pool_mode": user.pool_mode.value if user.pool_mode else None,
        "pool_limit": user.pool_limit,
        "effective": {"source": effective.source, "pool_mode": effective.mode.value, "pool_limit": effective.limit,
                      "in_use": used},
    }


# --- bulk delete (L16) ------------------------------------------------------------------------


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
        before = snapshot(session, lic)
        lic.voided_at = now
        lic.workspace_id = None
        lic.in_pool = False
        flush(session)
        record(session, lic, "deleted", principal.name, now, before, mode=mode.value)
    flush(session)
    log.info("license.bulk_deleted", mode=mode.value, count=len(chosen), actor=principal.name)
    return chosen

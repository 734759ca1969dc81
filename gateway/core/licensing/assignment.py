"""Assigning a key to a workspace (L2, L3, L5) and enforcing the allocation limits (L15).

The allocation settings are written in :mod:`~gateway.core.licensing.pool`; what is in
force and the checks against it live here, next to the assignment they guard, and
serve renewals (:mod:`~gateway.core.licensing.renewal`) too.

Decisions the rules leave open:

- **Term** (L2): ``expires_at = activated_at + term_months`` in calendar months (UTC).
  ``term_months`` stays the term the key was bought with; renewals move ``expires_at``.
- **Allocation** (L15): the "company" is the partner. A company on a limited pool applies
  its limit to all its users and their own settings are ignored; a company on the global
  pool (the default) leaves each user's own setting in force. A limit counts active
  (assigned, unexpired) licenses: of the whole partner for a company pool, or those the
  user assigned for a user pool. Renewing an expired license that still serves a
  workspace makes it count again, so it is checked like an assignment, against the pool
  it counts in (its assigning user's). An assignment or such a renewal locks the row
  holding the limit (the partner or the user) before counting, so concurrent ones
  cannot overshoot it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import structlog
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from gateway.core.access import Principal, get_partner, get_workspace, require_admin
from gateway.core.clock import Clock
from gateway.core.licensing.history import flush, record, snapshot
from gateway.core.licensing.queries import get_license
from gateway.core.licensing.rules import LicenseStatus, activation_deadline, add_months, license_status
from gateway.core.models import License, Partner, PoolMode, User, Workspace
from gateway.core.settings import LicensingSettings
from gateway.errors import Conflict

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Allocation:
    """L15: where an assignment's license is counted, and the limit there (None: unlimited)."""

    source: str  # "company" or "user"
    mode: PoolMode
    limit: int | None


# --- allocation (L15) -------------------------------------------------------------------------


def effective_allocation(partner: Partner, user: User | None) -> Allocation:
    """L15: a company limited pool overrides its users; otherwise the user's own setting applies."""
    if partner.pool_mode == PoolMode.LIMITED:
        return Allocation("company", PoolMode.LIMITED, partner.pool_limit)
    if user is not None and user.pool_mode == PoolMode.LIMITED:
        return Allocation("user", PoolMode.LIMITED, user.pool_limit)
    return Allocation("company", PoolMode.GLOBAL, None)


def active_count(session: Session, now: datetime, *, partner_id: int, user_id: int | None = None) -> int:
    """L15: the partner's active (assigned, unexpired) licenses, or only those ``user_id`` assigned."""
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


def check_allocation(
    session: Session, partner: Partner, user: User | None, now: datetime, *, field: str = "workspace_id"
) -> None:
    """L15: refuse one more active license where the limit in force is reached (locking its row first)."""
    allocation = _lock_allocation(session, partner, user)
    if allocation.mode != PoolMode.LIMITED:
        return
    limit = allocation.limit or 0
    if allocation.source == "company":
        used = active_count(session, now, partner_id=partner.id)
        if used >= limit:
            raise Conflict(
                f"the company's limited pool allows {limit} active licenses and {used} are in use; "
                "raise the limit or free a license",
                field=field,
                code="pool_limit",
            )
    else:
        assert user is not None
        used = active_count(session, now, partner_id=partner.id, user_id=user.id)
        if used >= limit:
            raise Conflict(
                f"user {user.name!r} is limited to {limit} paid licenses in their user pool and has {used}; "
                "raise the user's limit or switch them to the global pool",
                field=field,
                code="pool_limit",
            )


# --- assignment and activation (L2, L3, L5) ---------------------------------------------------


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


def activate(lic: License, workspace: Workspace, now: datetime) -> None:
    """Put ``lic`` on ``workspace``; its term starts now if it was unused (L2)."""
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
    check_allocation(session, partner, user, now)
    before = snapshot(session, lic)
    activate(lic, workspace, now)
    if user is not None:
        lic.pool_user_id = user.id
    flush(session)
    record(session, lic, "assigned", principal.name, now, before)
    flush(session)
    log.info("license.assigned", key=lic.key, workspace=workspace.id)
    return lic

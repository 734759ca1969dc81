"""Assigning a key to a workspace (L2, L3, L5) and enforcing the allocation limits (L15).

The allocation settings are written in :mod:`~gateway.core.licensing.pool`; what is in
force and the checks against it live here, next to the assignment they guard, and
serve renewals (:mod:`~gateway.core.licensing.renewal`) too.

Decisions the rules leave open:

- **Term** (L2): ``expires_at = activated_at + term_months`` in calendar months (UTC).
  ``term_months`` stays the term the key was bought with; renewals move ``expires_at``.
- **Binding** (L5: a key "can only be used by one customer with a single workspace"): the
  first use binds a key to its workspace (``bound_workspace_id``) for life. A key that
  left its workspace (exchanged out, L14) may come back to that same workspace, which
  is still the one customer with the single workspace the rule allows (e.g. renewed
  after its replacement was deleted), but never to another workspace, not even another
  of the same customer's. An activated key whose workspace is gone serves nothing again.
- **Allocation** (L15): the "company" is the partner. A company's own setting, a limited
  pool or the global pool, applies to all its users and their own settings are ignored:
  the global pool lifts a user's limit. A company with no setting of its own (None, the
  default) leaves each user's own setting in force. A limit counts active
  (assigned, unexpired) licenses: of the whole partner for a company pool, or those the
  user assigned for a user pool. Renewing an expired license that still serves a
  workspace makes it count again, so it is checked like an assignment, against the pool
  it counts in (its assigning user's). An assignment or such a renewal locks the row
  holding the limit (the partner or the user) before counting, so concurrent ones
  cannot overshoot it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

import structlog
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from gateway.core.access import Principal, get_partner, get_workspace, require_admin
from gateway.core.billing.rules import local_day
from gateway.core.clock import Clock
from gateway.core.licensing.history import flush, record, snapshot
from gateway.core.licensing.queries import get_license
from gateway.core.licensing.rules import LicenseStatus, activation_deadline, add_months, license_status
from gateway.core.models import (
    Customer,
    License,
    LicenseHistory,
    LicenseReminder,
    Partner,
    PoolMode,
    User,
    Workspace,
)
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
    """L15: the company's setting (limited or global pool) overrides its users; without one the user's applies.

    ``source`` is "company" for the company's setting, "user" for the user's limited
    pool, "default" when neither has a setting (the global pool).
    """
    if partner.pool_mode == PoolMode.LIMITED:
        return Allocation("company", PoolMode.LIMITED, partner.pool_limit)
    if partner.pool_mode == PoolMode.GLOBAL:
        return Allocation("company", PoolMode.GLOBAL, None)
    if user is not None and user.pool_mode == PoolMode.LIMITED:
        return Allocation("user", PoolMode.LIMITED, user.pool_limit)
    return Allocation("default", PoolMode.GLOBAL, None)


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
    problem = recycling_problem(session, lic, workspace)
    if problem is not None:
        raise Conflict(problem, field="key", code="key_exposed")


def _released_recyclable(session: Session, lic: License) -> bool:
    """M2: the key's last move off or onto a workspace was a release whose period may be recycled elsewhere."""
    last = session.scalars(
        select(LicenseHistory)
        .where(LicenseHistory.license_id == lic.id,
               LicenseHistory.action.in_(("assigned", "released", "exchanged_in", "exchanged_out")))
        .order_by(LicenseHistory.at.desc(), LicenseHistory.id.desc())
        .limit(1)
    ).first()
    return last is not None and last.action == "released" and last.after.get("recyclable") is True


def _check_binding(session: Session, lic: License, workspace: Workspace) -> None:
    """L5: a key once used serves the workspace it was bound to and no other, ever.

    Checked before the expiry, so nobody renews a key only to learn it cannot go where they want.
    The one exception is M2's (seed 000): a key released with a period that may be recycled
    (:func:`release`, its key never exposed) may be bound to another workspace.
    """
    if lic.activated_at is None or lic.bound_workspace_id == workspace.id or _released_recyclable(session, lic):
        return
    bound = session.get(Workspace, lic.bound_workspace_id) if lic.bound_workspace_id is not None else None
    where = f"workspace {bound.name!r}" if bound is not None else "a workspace that no longer exists"
    raise Conflict(
        f"license {lic.key} was bound to {where} when first used; a key serves one customer with a single "
        f"workspace for its whole life (L5), so it cannot serve {workspace.name!r}: assign an unused key instead",
        field="key",
        code="bound_elsewhere",
    )


def activate(lic: License, workspace: Workspace, now: datetime) -> None:
    """Put ``lic`` on ``workspace``; its term starts now if it was unused (L2)."""
    lic.workspace_id = workspace.id
    lic.in_pool = False
    if lic.activated_at is None:
        lic.activated_at = now
        lic.expires_at = add_months(now, lic.term_months)
        lic.bound_workspace_id = workspace.id
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
    _check_binding(session, lic, workspace)
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
    left = leave_monthly_for_license(session, workspace, now)
    activate(lic, workspace, now)
    lic.bound_workspace_id = workspace.id  # L5 (a recycled key, M2, is bound anew)
    if user is not None:
        lic.pool_user_id = user.id
    flush(session)
    extra = {"left_monthly_billing": left.isoformat()} if left is not None else {}
    record(session, lic, "assigned", principal.name, now, before, **extra)
    flush(session)
    log.info("license.assigned", key=lic.key, workspace=workspace.id)
    return lic


# --- monthly billing and licenses (M2) ----------------------------------------------------------


def on_monthly_billing(workspace: Workspace, today: date) -> bool:
    """M2: whether ``workspace`` is on the monthly billing plan on its customer-local ``today``."""
    since, until = workspace.monthly_billing_since, workspace.monthly_billing_until
    return since is not None and (until is None or until >= today)


def leave_monthly_for_license(session: Session, workspace: Workspace, now: datetime) -> date | None:
    """M2: a regular license assigned to a workspace on monthly billing takes it off the plan today.

    Seed 000 has the partner "assign other regular licenses with all affected workspaces
    before you cancel the subscription": the license change at the workspace replaces its
    monthly license. Today (customer-local) is its last day on the plan, billed as one, as
    the day it joined is. Returns that day, or None when the workspace was not on the plan.
    """
    today = local_day(now, session.get_one(Customer, workspace.customer_id).timezone)
    if not on_monthly_billing(workspace, today):
        return None
    workspace.monthly_billing_until = today
    log.info("license.workspace_left_monthly_billing", workspace=workspace.id, last_day=today.isoformat())
    return today


def key_exposed(session: Session, lic: License) -> bool:
    """M2: whether the key is known to have reached end users.

    The gateway knows of two ways: it sent the key to the end user itself (the L4
    end-user notice carries it), or an earlier release said so. Other exposures only
    the partner knows of, and says so when releasing.
    """
    sent = session.scalar(
        select(LicenseReminder.id)
        .where(LicenseReminder.license_id == lic.id, LicenseReminder.kind.like("end-user%"))
        .limit(1)
    )
    if sent is not None:
        return True
    releases = session.scalars(
        select(LicenseHistory.after).where(LicenseHistory.license_id == lic.id, LicenseHistory.action == "released")
    )
    return any(after.get("recyclable") is False for after in releases)


def release(
    session: Session, lic: License, now: datetime, actor: str, *, reason: str, exposed: bool = False
) -> bool:
    """M2: take ``lic`` off its workspace, keeping its period; True when that period can be recycled.

    Seed 000: "you can recycle any unused license period with a different workspace
    (only if the license key wasn't exposed to end-users at all)". A released key whose
    key was exposed (``exposed``, or :func:`key_exposed`) may only go back to the
    workspace it was released from (:func:`recycling_problem`). Its term keeps running.
    """
    workspace_id = lic.workspace_id
    recyclable = not (exposed or key_exposed(session, lic))
    before = snapshot(session, lic)
    lic.workspace_id = None
    flush(session)
    record(session, lic, "released", actor, now, before, reason=reason, released_from=workspace_id,
           recyclable=recyclable)
    flush(session)
    log.info("license.released", key=lic.key, workspace=workspace_id, recyclable=recyclable)
    return recyclable


def recycling_problem(session: Session, lic: License, workspace: Workspace) -> str | None:
    """M2: why a released, exposed key may not serve ``workspace`` (None: it may)."""
    last = session.scalars(
        select(LicenseHistory)
        .where(LicenseHistory.license_id == lic.id, LicenseHistory.action == "released")
        .order_by(LicenseHistory.at.desc(), LicenseHistory.id.desc())
        .limit(1)
    ).first()
    if last is None or last.after.get("recyclable") is not False:
        return None
    origin = last.after.get("released_from")
    if origin is None or origin == workspace.id:
        return None
    return (
        f"license {lic.key} was released from workspace {origin} and its key was exposed to end users, so its "
        "unused period cannot be recycled with a different workspace (seed 000); assign it back to workspace "
        f"{origin} or use another key"
    )

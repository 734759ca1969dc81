"""The daily job's decisions (L3, L4, L13, L14), synchronous over the caller's session.

:func:`run_daily` records everything it decides (history and reminder rows) in the
caller's transaction and returns the notices to send. Sending them after the commit is
the scheduled job's (:func:`gateway.sync.jobs.run_daily_job`), which keeps this core
free of asyncio and plugins.

Decisions the rules leave open:

- **Auto-renewal** (L13): the next renewal date is the expiry of an active license with
  auto-renewal on. On that date the daily job renews it by one year at the configured
  price, counting from the old expiry so no day is lost; an automatic exchange (L14) is
  tried first, because a pool key is already paid for. Without a price the renewal
  fails, the license expires, and the partner gets ``license.auto_renew_failed``. Only
  licenses that serve a workspace are renewed (see
  :func:`~gateway.core.licensing.rules.next_renewal_date`).
- **Reminders** (L4): counted in whole UTC days before the expiry day. When the job
  missed a day, only the most urgent reminder due is sent, never a stale one. The end
  user is told 3 days before when the license has not been renewed and auto-renewal is
  off, or is on but will fail (seed 001: the end user hears when "protection is at
  immediate risk"). An auto-renewal will fail when, at the expiry, no pool key can
  replace the license (automatic exchange off or the pool empty) and the edition has no
  price. That is known as soon as the license comes within the reminder horizon (30
  days), and the partner is told then, once per expiry, with its own event
  ``license.renewal_at_risk``; its 30/14/7-day reminders then show no next renewal date
  and say why (``renewal_blocked``). A reminder row is written in the same
  transaction that decides it and the notice is sent after commit: each is sent at most
  once, even when two jobs run at the same time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.core.billing.rules import local_day
from gateway.core.clock import Clock
from gateway.core.licensing.assignment import on_monthly_billing
from gateway.core.licensing.history import flush
from gateway.core.licensing.pool import apply_exchange, find_pool_replacement, pool_replacement_available
from gateway.core.licensing.queries import info_select
from gateway.core.licensing.renewal import priced_renewal
from gateway.core.licensing.rules import activation_deadline, add_months, unit_price
from gateway.core.models import Customer, Edition, License, LicenseHistory, LicenseReminder, Partner, Workspace
from gateway.core.settings import LicensingSettings
from gateway.errors import DomainError

log = structlog.get_logger(__name__)

DAILY_ACTOR = "system:daily"


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
        monthly = assigned and _on_monthly_billing(session, lic, now)
        replacement = (
            find_pool_replacement(session, config, lic, now)
            if assigned and not monthly and partner.automatic_exchange else None
        )
        failure = None
        if replacement is None and assigned and not monthly and lic.auto_renew:
            failure = _auto_renew(session, config, lic, now)
            if failure is None:
                report.auto_renewed.append(lic.key)
                continue
        after: dict[str, Any] = {"status": "expired"}
        if monthly:
            after["not_renewed"] = "the workspace is on monthly billing (M2): it pays for its devices monthly"
        session.add(LicenseHistory(license_id=lic.id, at=now, actor=DAILY_ACTOR, action="expired",
                                   before={"status": "active"}, after=after))
        report.expired.append(lic.key)
        if failure is not None:
            report.notifications.append(Notification("license.auto_renew_failed", {
                "license_key": lic.key, "expires_at": lic.expires_at.isoformat(), "partner_id": partner.id,
                "partner_name": partner.name, "audience": "partner", "to": partner.email, "reason": failure,
                "workspace_id": lic.workspace_id,
            }))
        if replacement is not None:
            flush(session)
            apply_exchange(session, lic, replacement, now, DAILY_ACTOR)
            report.exchanged.append((lic.key, replacement.key))
    flush(session)

    _decide_reminders(session, config, now, report)
    flush(session)
    log.info("licensing.daily", **report.summary())
    return report


def _on_monthly_billing(session: Session, lic: License, now: datetime) -> bool:
    """M2: a workspace on monthly billing pays for its devices monthly; its license is neither renewed
    nor exchanged (a paid order on top of the monthly bill). Joining releases the license
    (:func:`~gateway.core.billing.subscriptions.join_monthly`); this guards rows from before that."""
    workspace = session.get(Workspace, lic.workspace_id)
    if workspace is None:
        return False
    customer = session.get_one(Customer, workspace.customer_id)
    return on_monthly_billing(workspace, local_day(now, customer.timezone))


def _auto_renew(session: Session, config: LicensingSettings, lic: License, now: datetime) -> str | None:
    """L13: renew for a year from the old expiry; the reason (logged) when it cannot, else None."""
    edition = session.get(Edition, lic.edition_id)
    assert edition is not None and lic.expires_at is not None
    try:
        priced_renewal(session, config, lic, years=1, target=edition, base=lic.expires_at, now=now,
                        actor=DAILY_ACTOR, action="auto_renewed")
    except DomainError as exc:
        log.warning("license.auto_renew_failed", key=lic.key, error=exc.message)
        return exc.message
    return None


def renewal_blocker(
    session: Session, config: LicensingSettings, lic: License, edition: Edition, partner: Partner
) -> str | None:
    """L4/L13: why the auto-renewal of ``lic`` will fail at its expiry, or None (it will renew, or is off)."""
    assert lic.expires_at is not None
    if not lic.auto_renew:
        return None
    if partner.automatic_exchange and pool_replacement_available(session, config, lic, lic.expires_at):
        return None
    try:
        unit_price(config, edition)
    except DomainError as exc:
        return (f"{exc.message}, and no pool key can replace it (automatic exchange is "
                f"{'on' if partner.automatic_exchange else 'off'}); renew it by hand before it expires")
    return None


def _decide_reminders(session: Session, config: LicensingSettings, now: datetime, report: DailyReport) -> None:
    horizon = max([*config.reminder_days, config.end_user_notice_days, 0])
    rows = session.execute(
        info_select()
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
        blocker = renewal_blocker(session, config, lic, edition, partner)
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
        if blocker is not None and _claim_reminder(session, lic, "partner-renewal-at-risk", now):
            report.notifications.append(Notification("license.renewal_at_risk", {
                **base, "reminder": "partner-renewal-at-risk", "audience": "partner", "to": partner.email,
                "reason": blocker,
            }))
        if due:
            kind = f"partner-{due[0]}d"
            if _claim_reminder(session, lic, kind, now):
                report.notifications.append(Notification("license.reminder", {
                    **base, "reminder": kind, "audience": "partner", "to": partner.email,
                    "next_renewal_date": lic.expires_at.isoformat() if lic.auto_renew and blocker is None else None,
                    "renewal_blocked": blocker,
                }))
        if days_left <= config.end_user_notice_days and (not lic.auto_renew or blocker is not None):
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

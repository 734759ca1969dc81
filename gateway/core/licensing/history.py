"""The license history (L10): one row per change, holding only what changed; and the notes.

Every change in this package follows one pattern: :func:`snapshot` the license, change
it, :func:`flush`, :func:`record` the difference under the acting principal's name,
flush again. :func:`flush` turns a lost race (the optimistic version column, a unique
key) into a :class:`~gateway.errors.Conflict` the caller can retry. Notes are free text
the history keeps too, editable at any time whatever the license's state, so their
edit lives here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from gateway.core.access import Principal
from gateway.core.clock import Clock
from gateway.core.licensing.queries import get_license
from gateway.core.licensing.rules import check_notes
from gateway.core.models import Edition, License, LicenseHistory
from gateway.errors import Conflict

log = structlog.get_logger(__name__)


def snapshot(session: Session, lic: License) -> dict[str, Any]:
    """The license's recorded fields, as JSON values, to diff against after a change."""
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


def record(
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
    after_full = snapshot(session, lic)
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


def flush(session: Session) -> None:
    """Flush, turning a lost race (optimistic version, unique key) into a Conflict the caller can retry."""
    try:
        session.flush()
    except StaleDataError:
        raise Conflict("the license was changed by someone else at the same time; reload it and try again") from None
    except IntegrityError as exc:
        log.info("licensing.integrity_conflict", error=str(exc.orig).splitlines()[0] if exc.orig else str(exc))
        raise Conflict("another change to the same license or workspace won; reload and try again") from None


# --- reading the history ----------------------------------------------------------------------


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


# --- notes ------------------------------------------------------------------------------------


def set_notes(session: Session, clock: Clock, principal: Principal, key: str, notes: str) -> License:
    """L10: notes can be edited at any time, whatever the license's state."""
    check_notes(notes)
    lic = get_license(session, principal, key)
    if lic.notes == notes:
        return lic
    before = snapshot(session, lic)
    lic.notes = notes
    flush(session)
    record(session, lic, "notes_edited", principal.name, clock.now(), before)
    flush(session)
    return lic

"""API users and their tokens (S8): who may use the admin API, and as whom.

A token is 32 random bytes from ``secrets`` (``gw_`` + URL-safe base64), shown
once when created; only its SHA-256 is stored. A plain hash (not a slow password
hash) is right here: the token has 256 bits of entropy, so there is nothing to
brute-force, and the lookup is one indexed equality. The CLI and the web layer
both use this module; the HTTP side (the ``Authorization`` header, 401 answers)
lives in :mod:`gateway.web.auth`.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.core.access import Principal, principal_for_user
from gateway.core.models import ApiToken, Customer, Partner, User, UserCustomer, UserRole
from gateway.errors import DomainError, NotFound

log = structlog.get_logger(__name__)

TOKEN_PREFIX = "gw_"
#: ``last_used_at`` is written at most this often per token, not on every request.
LAST_USED_RESOLUTION = timedelta(minutes=5)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_user(
    session: Session,
    *,
    partner_id: int,
    name: str,
    role: UserRole,
    now: datetime,
    customer_ids: Sequence[int] = (),
    email: str | None = None,
) -> User:
    """A user of the partner; a customer admin reaches only ``customer_ids`` (S8)."""
    if session.get(Partner, partner_id) is None:
        raise NotFound(f"no partner with id {partner_id}", field="partner_id")
    if not name.strip():
        raise DomainError("a user needs a name", field="name")
    if role == UserRole.ADMIN and customer_ids:
        raise DomainError("an admin sees every customer; assign customers only to a customer admin", field="customer")
    found = set(session.scalars(select(Customer.id).where(Customer.id.in_(customer_ids),
                                                          Customer.partner_id == partner_id)))
    missing = sorted(set(customer_ids) - found)
    if missing:
        raise NotFound(f"no customer with id {', '.join(map(str, missing))} at this partner", field="customer")
    user = User(partner_id=partner_id, name=name.strip(), email=email, role=role, created_at=now)
    session.add(user)
    session.flush()
    session.add_all(UserCustomer(user_id=user.id, customer_id=cid) for cid in sorted(found))
    session.flush()
    return user


def create_token(session: Session, user: User, *, name: str, now: datetime) -> tuple[ApiToken, str]:
    """A new token for ``user``; returns the row and the plain token, which is never stored or shown again."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(user_id=user.id, name=name, token_hash=hash_token(token), created_at=now)
    session.add(row)
    session.flush()
    log.info("token.created", user=user.id, token_id=row.id)
    return row, token


def revoke_token(session: Session, token_id: int, *, now: datetime) -> ApiToken:
    row = session.get(ApiToken, token_id)
    if row is None:
        raise NotFound(f"no token with id {token_id}", field="token_id")
    if row.revoked_at is None:
        row.revoked_at = now
        session.flush()
    return row


def authenticate(session: Session, token: str, now: datetime) -> Principal | None:
    """The principal a presented token stands for, or None (unknown or revoked: the caller says 401)."""
    row = session.execute(
        select(ApiToken, User)
        .join(User, User.id == ApiToken.user_id)
        .where(ApiToken.token_hash == hash_token(token), ApiToken.revoked_at.is_(None))
    ).first()
    if row is None:
        return None
    api_token, user = row
    if api_token.last_used_at is None or now - api_token.last_used_at >= LAST_USED_RESOLUTION:
        api_token.last_used_at = now
    return principal_for_user(user)


def describe_user(session: Session, user: User) -> dict[str, Any]:
    customers = list(session.scalars(
        select(UserCustomer.customer_id).where(UserCustomer.user_id == user.id).order_by(UserCustomer.customer_id)))
    return {"id": user.id, "name": user.name, "email": user.email, "role": user.role.value,
            "partner_id": user.partner_id, "customers": customers}

"""Who may see what (S8).

An admin sees every customer of their partner; a customer admin sees only the
customers assigned to them (``UserCustomer``). Everything else is answered as if
it did not exist: helpers raise :class:`NotFound`, never a "forbidden", so ids
cannot be probed. Licenses, workspaces and bills all hang off a customer, so the
same clause filters every one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import ColumnElement, Select, SQLColumnExpression, select
from sqlalchemy.orm import Session

from gateway.core.models import Customer, Partner, User, UserCustomer, UserRole, Workspace
from gateway.errors import NotFound


@dataclass(frozen=True)
class Principal:
    """The caller of an operation: a user of the API, the CLI, or the system itself."""

    partner_id: int
    role: UserRole
    #: Recorded as the actor of every change (L10).
    name: str
    user_id: int | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == UserRole.ADMIN


def principal_for_user(user: User) -> Principal:
    return Principal(partner_id=user.partner_id, role=user.role, name=f"user:{user.name}#{user.id}", user_id=user.id)


def system_principal(partner_id: int, name: str) -> Principal:
    """An admin principal for the CLI and scheduled jobs (``name`` is e.g. ``cli:alice`` or ``system:daily``)."""
    return Principal(partner_id=partner_id, role=UserRole.ADMIN, name=name)


def require_admin(principal: Principal, what: str = "resource") -> None:
    """Admin-only operations look absent to a customer admin (S8: 404, never 403)."""
    if not principal.is_admin:
        raise NotFound(f"no such {what}")


def visible_customer_ids(principal: Principal) -> Select[int]:
    """A subquery of the customer ids the principal may see."""
    stmt = select(Customer.id).where(Customer.partner_id == principal.partner_id)
    if not principal.is_admin:
        assigned = select(UserCustomer.customer_id).where(UserCustomer.user_id == principal.user_id)
        stmt = stmt.where(Customer.id.in_(assigned))
    return stmt


def customer_clause(principal: Principal, customer_id_column: SQLColumnExpression[int]) -> ColumnElement[bool]:
    """A WHERE clause keeping only rows whose ``customer_id_column`` the principal may see."""
    return customer_id_column.in_(visible_customer_ids(principal))


def can_see_customer(session: Session, principal: Principal, customer_id: int) -> bool:
    found = session.scalar(visible_customer_ids(principal).where(Customer.id == customer_id))
    return found is not None


def get_customer(session: Session, principal: Principal, customer_id: int, *, field: str = "customer_id") -> Customer:
    """The customer if the principal may see it, else NotFound (the same answer as for a missing one)."""
    customer = session.scalar(select(Customer).where(Customer.id == customer_id, customer_clause(principal, Customer.id)))
    if customer is None:
        raise NotFound(f"no customer with id {customer_id}", field=field)
    return customer


def get_workspace(session: Session, principal: Principal, workspace_id: int, *, field: str = "workspace_id") -> Workspace:
    workspace = session.scalar(
        select(Workspace).where(Workspace.id == workspace_id, customer_clause(principal, Workspace.customer_id))
    )
    if workspace is None:
        raise NotFound(f"no workspace with id {workspace_id}", field=field)
    return workspace


def get_partner(session: Session, principal: Principal) -> Partner:
    partner = session.get(Partner, principal.partner_id)
    if partner is None:
        raise NotFound(f"no partner with id {principal.partner_id}")
    return partner


def get_user(session: Session, principal: Principal, user_id: int, *, field: str = "user_id") -> User:
    """Users of the principal's partner; admins only (a customer admin manages nobody)."""
    require_admin(principal, "user")
    user = session.scalar(select(User).where(User.id == user_id, User.partner_id == principal.partner_id))
    if user is None:
        raise NotFound(f"no user with id {user_id}", field=field)
    return user


"""Listing devices (G1, M3): where each one is, and why a refused one was refused.

A refused device (M3) has no workspace; it keeps the workspace that refused it
(``refused_workspace_id``), when it was first refused and the reason, so it is
listed under that workspace with the reason until a pull admits it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, or_, select
from sqlalchemy.orm import Session, aliased

from gateway.core.access import Principal, customer_clause, get_workspace
from gateway.core.models import Device, Workspace


def devices_select(
    principal: Principal, *, workspace_id: int | None = None, refused: bool = False
) -> Select[*tuple[Any, ...]]:
    """The devices the principal may see (of its customers' workspaces, admitted or refused), by hostname.

    ``workspace_id`` keeps the devices in that workspace and those it refused;
    ``refused`` keeps only refused devices. Devices of unmapped organisations
    belong to no customer and are listed by ``gateway mappings --unmapped``.
    """
    placed = aliased(Workspace)
    refuser = aliased(Workspace)
    stmt: Select[*tuple[Any, ...]] = (
        select(
            Device.id, Device.connection, Device.external_id, Device.hostname, Device.online, Device.deleted,
            Device.last_contact, func.coalesce(placed.id, refuser.id).label("workspace_id"),
            func.coalesce(placed.name, refuser.name).label("workspace"), Device.refused_reason, Device.refused_at,
        )
        .outerjoin(placed, placed.id == Device.workspace_id)
        .outerjoin(refuser, refuser.id == Device.refused_workspace_id)
        .where(
            or_(placed.id.is_not(None), refuser.id.is_not(None)),
            customer_clause(principal, func.coalesce(placed.customer_id, refuser.customer_id)),
        )
        .order_by(Device.hostname, Device.connection, Device.external_id)
    )
    if workspace_id is not None:
        stmt = stmt.where(or_(Device.workspace_id == workspace_id, Device.refused_workspace_id == workspace_id))
    if refused:
        stmt = stmt.where(Device.refused_reason.is_not(None))
    return stmt


def device_row(row: Any) -> dict[str, Any]:
    last_contact: datetime | None = row.last_contact
    return {
        "id": row.id, "connection": row.connection, "external_id": row.external_id, "hostname": row.hostname,
        "workspace_id": row.workspace_id, "workspace": row.workspace, "online": row.online, "deleted": row.deleted,
        "last_contact": last_contact, "refused": row.refused_reason is not None,
        "refused_reason": row.refused_reason, "refused_at": row.refused_at,
    }


def list_devices(
    session: Session,
    principal: Principal,
    *,
    workspace_id: int | None = None,
    refused: bool = False,
    limit: int | None = None,
    offset: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    """M3: devices with their workspace and, for a refused one, the reason and the time; and the total."""
    if workspace_id is not None:
        get_workspace(session, principal, workspace_id)  # an unknown or hidden workspace is a 404
    stmt = devices_select(principal, workspace_id=workspace_id, refused=refused)
    total = session.scalar(select(func.count()).select_from(stmt.order_by(None).subquery())) or 0
    if limit is not None:
        stmt = stmt.limit(limit)
    rows = session.execute(stmt.offset(offset)).all()
    return [device_row(row) for row in rows], total

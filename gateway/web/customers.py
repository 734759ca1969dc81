"""Customers and workspaces under ``/api/v1/customers/{id}`` and ``/api/v1/workspaces/{id}``.

S8: a customer admin sees the customers assigned to them and their workspaces, and changes nothing; every
other id is a 404, as for one that does not exist. Archiving keeps everything billed.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from gateway.core import directory
from gateway.core.access import get_customer, get_workspace, require_admin
from gateway.web.api import Body, Routes, gateway_of, in_db, principal_of, read_body, respond
from gateway.web.partners import path_id
from gateway.web.types import Email, TimeZone

routes = Routes(tag="customers")


class CustomerOut(BaseModel):
    id: int
    partner_id: int
    name: str
    timezone: str
    pending_timezone: str | None = Field(description="S4: the zone the customer moves to from timezone_from")
    timezone_from: date | None = Field(description="the first local day of the cycle the new zone applies from")
    billing_email: str | None
    created_at: datetime
    archived_at: datetime | None
    notice: str | None = Field(description="what a pending time-zone change will do, in words")


class CustomerPatch(Body):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    timezone: TimeZone | None = Field(default=None, description="applies from the customer's next cycle (S4)")
    billing_email: Email | None = None


class WorkspaceOut(BaseModel):
    id: int
    customer_id: int
    name: str
    max_devices: int | None = Field(description="M3: no new device beyond this many; null: no limit")
    edition_id: int | None
    monthly_billing_since: date | None
    monthly_billing_until: date | None
    created_at: datetime


class WorkspacePatch(Body):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    max_devices: int | None = Field(default=None, ge=1, le=2**31 - 1, description="M3 maximum")
    no_limit: bool = Field(default=False, description="remove the maximum")


@routes.get("/customers/{customer_id}", summary="one customer (S8)", response=CustomerOut)
async def show_customer(request: web.Request) -> web.Response:
    principal, customer_id = principal_of(request), path_id(request, "customer_id")

    def work(session: Session) -> dict[str, Any]:
        return directory.customer_dict(get_customer(session, principal, customer_id))

    return respond(CustomerOut, await in_db(request, work))


@routes.patch("/customers/{customer_id}", summary="change a customer; a new time zone applies from the next cycle "
              "(admin)", body=CustomerPatch, response=CustomerOut)
async def patch_customer(request: web.Request) -> web.Response:
    body = await read_body(request, CustomerPatch)
    gw, principal, customer_id = gateway_of(request), principal_of(request), path_id(request, "customer_id")

    def work(session: Session) -> dict[str, Any]:
        customer = get_customer(session, principal, customer_id)
        require_admin(principal, "customer")
        directory.update_customer(session, customer, now=gw.clock.now(), name=body.name, timezone=body.timezone,
                                  billing_email=body.billing_email)
        return directory.customer_dict(customer)

    return respond(CustomerOut, await in_db(request, work))


@routes.post("/customers/{customer_id}/archive", summary="archive a customer; its bills and licenses stay (admin)",
             response=CustomerOut)
async def archive_customer(request: web.Request) -> web.Response:
    gw, principal, customer_id = gateway_of(request), principal_of(request), path_id(request, "customer_id")

    def work(session: Session) -> dict[str, Any]:
        customer = get_customer(session, principal, customer_id)
        require_admin(principal, "customer")
        return directory.customer_dict(directory.archive_customer(session, customer, now=gw.clock.now()))

    return respond(CustomerOut, await in_db(request, work))


@routes.get("/workspaces/{workspace_id}", summary="one workspace (S8)", response=WorkspaceOut)
async def show_workspace(request: web.Request) -> web.Response:
    principal, workspace_id = principal_of(request), path_id(request, "workspace_id")

    def work(session: Session) -> dict[str, Any]:
        return directory.workspace_dict(get_workspace(session, principal, workspace_id))

    return respond(WorkspaceOut, await in_db(request, work))


@routes.patch("/workspaces/{workspace_id}", summary="rename a workspace or change its maximum (M3) (admin)",
              body=WorkspacePatch, response=WorkspaceOut)
async def patch_workspace(request: web.Request) -> web.Response:
    body = await read_body(request, WorkspacePatch)
    principal, workspace_id = principal_of(request), path_id(request, "workspace_id")

    def work(session: Session) -> dict[str, Any]:
        workspace = get_workspace(session, principal, workspace_id)
        require_admin(principal, "workspace")
        directory.update_workspace(session, workspace, name=body.name, max_devices=body.max_devices,
                                   no_limit=body.no_limit)
        return directory.workspace_dict(workspace)

    return respond(WorkspaceOut, await in_db(request, work))

"""Devices as JSON resources under ``/api/v1/``: the list, with refused devices and their reasons (M3)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from gateway.core.devices import list_devices
from gateway.web.api import Routes, in_db, principal_of, read_query, respond
from gateway.web.pagination import Page, PageParams, page
from gateway.web.types import Id

routes = Routes(tag="devices")


class DeviceQuery(PageParams):
    workspace_id: Id | None = Field(default=None, description="only this workspace's devices and refusals")
    refused: bool = Field(default=False, description="only devices a workspace refused (M3)")


class DeviceOut(BaseModel):
    id: int
    connection: str
    external_id: str
    hostname: str
    workspace_id: int | None = Field(description="its workspace, or for a refused device the one that refused it")
    workspace: str | None
    online: bool
    deleted: bool
    last_contact: datetime | None
    refused: bool
    refused_reason: str | None = Field(description="M3: why the workspace refused it (its maximum)")
    refused_at: datetime | None = Field(description="when it was first refused")


@routes.get("/devices", summary="devices by workspace; refused ones with the reason and time (M3)",
            query=DeviceQuery, response=Page[DeviceOut])
async def devices(request: web.Request) -> web.Response:
    params = read_query(request, DeviceQuery)
    principal = principal_of(request)

    def work(session: Session) -> tuple[list[dict[str, Any]], int]:
        return list_devices(session, principal, workspace_id=params.workspace_id, refused=params.refused,
                            limit=params.limit, offset=params.offset)

    items, total = await in_db(request, work)
    return respond(Page[DeviceOut], page(request, items, total, params))

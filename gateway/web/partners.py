"""The caller's partner under ``/api/v1/partners``: name, e-mail, currency, invoice prefix and discount (L6).

An admin sees and changes their own partner only; another partner's id, and any partner for a customer
admin, is a 404 (S8). Partners are added on the server (``gateway partners add``): no API user stands above
a partner. The discount is read-only here: it is what the partner is given, not what it chooses (it is set
with ``gateway partners update ID --discount``).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from gateway.core import directory
from gateway.core.access import Principal, get_partner, require_admin
from gateway.core.models import Partner
from gateway.errors import NotFound
from gateway.web.api import MAX_PATH_ID, Body, Routes, in_db, principal_of, read_body, read_query, respond
from gateway.web.pagination import Page, PageParams, page
from gateway.web.types import Currency, Email

routes = Routes(tag="partners")


class PartnerOut(BaseModel):
    id: int
    name: str
    email: str | None
    currency: str
    discount_percent: Decimal = Field(description="the partner's own discount; bulk tiers apply on top (L6)")
    invoice_prefix: str
    created_at: datetime


class PartnerPatch(Body):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    email: Email | None = None
    currency: Currency | None = Field(default=None, description="currency of bills from now on")
    invoice_prefix: str | None = Field(default=None, pattern=r"^[A-Z0-9-]{1,16}$", description="bills from now on")


def path_id(request: web.Request, name: str) -> int:
    raw = request.match_info[name]
    if not raw.isdigit() or int(raw) > MAX_PATH_ID:
        raise NotFound(f"no {name.removesuffix('_id')} with id {raw!r}", field=name)
    return int(raw)


def _own(session: Session, principal: Principal, partner_id: int) -> Partner:
    require_admin(principal, "partner")
    if partner_id != principal.partner_id:
        raise NotFound(f"no partner with id {partner_id}", field="partner_id")
    return get_partner(session, principal)


@routes.get("/partners", summary="the caller's partner (admin)", query=PageParams, response=Page[PartnerOut])
async def list_partners(request: web.Request) -> web.Response:
    params, principal = read_query(request, PageParams), principal_of(request)

    def work(session: Session) -> list[dict[str, Any]]:
        require_admin(principal, "partner")
        return [directory.partner_dict(get_partner(session, principal))]

    items = await in_db(request, work)
    return respond(Page[PartnerOut], page(request, items[params.offset:params.offset + params.limit], len(items), params))


@routes.get("/partners/{partner_id}", summary="one partner: the caller's own (admin)", response=PartnerOut)
async def get_one(request: web.Request) -> web.Response:
    principal, partner_id = principal_of(request), path_id(request, "partner_id")

    def work(session: Session) -> dict[str, Any]:
        return directory.partner_dict(_own(session, principal, partner_id))

    return respond(PartnerOut, await in_db(request, work))


@routes.patch("/partners/{partner_id}", summary="change the caller's partner (admin)", body=PartnerPatch,
              response=PartnerOut)
async def patch_one(request: web.Request) -> web.Response:
    body = await read_body(request, PartnerPatch)
    principal, partner_id = principal_of(request), path_id(request, "partner_id")

    def work(session: Session) -> dict[str, Any]:
        partner = directory.update_partner(session, _own(session, principal, partner_id), name=body.name,
                                           email=body.email, currency=body.currency,
                                           invoice_prefix=body.invoice_prefix)
        return directory.partner_dict(partner)

    return respond(PartnerOut, await in_db(request, work))

"""Editions as JSON resources under ``/api/v1/``: the catalogue and its prices (L17, L6).

Everyone signed in can read the catalogue (licenses name their edition). Changing it is for an admin, and
only on an install with one partner: the catalogue is shared by every partner, so on a multi-partner
install one partner's admin must not re-price another's orders; there it is changed with
``gateway editions`` on the server (409 says so).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gateway.core import editions
from gateway.core.access import Principal, require_admin
from gateway.core.models import LicenseType, Partner
from gateway.errors import Conflict
from gateway.web.api import Body, Routes, gateway_of, in_db, principal_of, read_body, read_query, respond
from gateway.web.pagination import Page, PageParams, page
from gateway.web.types import Currency, Money

routes = Routes(tag="editions")

CODE_PATTERN = r"^[a-z0-9][a-z0-9-]{0,63}$"


class EditionQuery(PageParams):
    active: bool = Field(default=False, description="only editions that are sold (not archived)")


class EditionOut(BaseModel):
    id: int
    code: str
    name: str
    license_type: LicenseType
    price_per_seat_year: Decimal | None = Field(description="one seat for one year; null: no price, not for sale")
    currency: str
    price_source: str | None = Field(description="stored (set on the edition) or config ([licensing] prices)")
    active: bool


class EditionBody(Body):
    code: str = Field(pattern=CODE_PATTERN, examples=["enterprise-security"])
    name: str = Field(min_length=1, max_length=200)
    license_type: LicenseType = LicenseType.COMPUTER
    price_per_seat_year: Money | None = Field(default=None, description="default: [licensing] prices.<code>")
    currency: Currency | None = None


class EditionPatch(Body):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    license_type: LicenseType | None = None
    price_per_seat_year: Money | None = None
    currency: Currency | None = None
    active: bool | None = Field(default=None, description="false archives (no longer sold), true sells it again")


def _code(request: web.Request) -> str:
    return request.match_info["code"]


def _may_change(session: Session, principal: Principal) -> None:
    require_admin(principal, "edition")
    partners = session.scalar(select(func.count()).select_from(Partner)) or 0
    if partners > 1:
        raise Conflict(f"the edition catalogue is shared by the {partners} partners of this install; change it "
                       "on the server with 'gateway editions add|update|archive'", field="code")


@routes.get("/editions", summary="the editions licenses are sold of, with their price (L17)", query=EditionQuery,
            response=Page[EditionOut])
async def list_editions(request: web.Request) -> web.Response:
    params = read_query(request, EditionQuery)
    config = gateway_of(request).settings.licensing

    def work(session: Session) -> tuple[list[dict[str, Any]], int]:
        rows = [editions.edition_dict(e, config) for e in editions.list_editions(session, include_archived=not params.active)]
        return rows[params.offset:params.offset + params.limit], len(rows)

    items, total = await in_db(request, work)
    return respond(Page[EditionOut], page(request, items, total, params))


@routes.get("/editions/{code}", summary="one edition", response=EditionOut)
async def get_edition(request: web.Request) -> web.Response:
    config, code = gateway_of(request).settings.licensing, _code(request)

    def work(session: Session) -> dict[str, Any]:
        return editions.edition_dict(editions.get_edition(session, code), config)

    return respond(EditionOut, await in_db(request, work))


@routes.post("/editions", summary="add an edition (admin; single-partner installs)", body=EditionBody,
             response=EditionOut, status=201)
async def add_edition(request: web.Request) -> web.Response:
    body = await read_body(request, EditionBody)
    config, principal = gateway_of(request).settings.licensing, principal_of(request)

    def work(session: Session) -> dict[str, Any]:
        _may_change(session, principal)
        edition = editions.create_edition(session, config, code=body.code, name=body.name,
                                          license_type=body.license_type, price=body.price_per_seat_year,
                                          currency=body.currency)
        return editions.edition_dict(edition, config)

    return respond(EditionOut, await in_db(request, work), status=201)


@routes.patch("/editions/{code}", summary="change an edition; a new price prices orders from now on (admin)",
              body=EditionPatch, response=EditionOut)
async def patch_edition(request: web.Request) -> web.Response:
    body = await read_body(request, EditionPatch)
    config, principal, code = gateway_of(request).settings.licensing, principal_of(request), _code(request)

    def work(session: Session) -> dict[str, Any]:
        edition = editions.get_edition(session, code)
        _may_change(session, principal)
        editions.update_edition(session, edition, name=body.name, license_type=body.license_type,
                                price=body.price_per_seat_year, currency=body.currency, active=body.active)
        return editions.edition_dict(edition, config)

    return respond(EditionOut, await in_db(request, work))

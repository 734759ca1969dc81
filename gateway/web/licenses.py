"""Licenses, the pool, orders (L12) and licensing settings as JSON resources under ``/api/v1/``.

Every handler is a thin shell over :mod:`gateway.core.licensing`: the same
functions the CLI calls, with the caller's principal (S8 applies to licenses:
a customer admin reaches only licenses of their customers, and admin-only
resources answer 404 to them).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy.orm import Session

from gateway.core.access import require_admin
from gateway.core.licensing import assignment, history, orders, pool, purchase, queries, renewal
from gateway.core.licensing.rules import (
    MAX_BULK_KEYS,
    MAX_NOTES,
    MAX_RENEWAL_YEARS,
    MAX_SEATS,
    MAX_TERM_MONTHS,
    DeleteMode,
    LicenseStatus,
)
from gateway.core.models import OrderKind, PoolMode
from gateway.errors import NotFound
from gateway.web.api import (
    MAX_PATH_ID,
    Body,
    Routes,
    gateway_of,
    in_db,
    principal_of,
    read_body,
    read_query,
    respond,
)
from gateway.web.pagination import Page, PageParams, page
from gateway.web.types import Count, Id

routes = Routes(tag="licenses")


# --- models ---------------------------------------------------------------------------------


class Ref(BaseModel):
    id: int
    name: str


class LicenseOut(BaseModel):
    key: str
    edition: str
    edition_name: str
    license_type: str
    seats: int
    term_months: int
    status: LicenseStatus
    purchased_at: datetime
    activation_deadline: datetime
    activated_at: datetime | None
    expires_at: datetime | None
    auto_renew: bool
    next_renewal_date: datetime | None
    notes: str
    in_pool: bool
    pool_user_id: int | None
    customer: Ref | None
    workspace: Ref | None
    order_id: int | None
    voided_at: datetime | None
    consumed_at: datetime | None
    version: int


class OrderKeyOut(BaseModel):
    key: str
    status: LicenseStatus
    used: bool


class OrderOut(BaseModel):
    id: int
    kind: OrderKind
    placed_at: datetime
    quantity: int
    term_months: int
    currency: str
    list_total: Decimal
    discount_percent: Decimal
    total: Decimal
    actor: str
    used_keys: int
    unused_keys: int
    keys: list[OrderKeyOut]


class PurchaseOut(BaseModel):
    order: OrderOut
    licenses: list[LicenseOut]


class RenewalOut(BaseModel):
    license: LicenseOut
    order: OrderOut | None
    #: The key consumed by a renewal with a coupon (L8).
    coupon: str | None


class HistoryOut(BaseModel):
    at: datetime
    actor: str
    action: str
    before: dict[str, Any]
    after: dict[str, Any]


class DeleteExpiredOut(BaseModel):
    mode: DeleteMode
    dry_run: bool
    count: int
    keys: list[str]


class CompanySettingsOut(BaseModel):
    automatic_exchange: bool
    #: L15: null when the company has no allocation setting of its own (each user's applies).
    pool_mode: PoolMode | None
    pool_limit: int | None


class EffectiveAllocation(BaseModel):
    source: str
    pool_mode: PoolMode
    pool_limit: int | None
    in_use: int


class UserAllocationOut(BaseModel):
    user_id: int
    pool_mode: PoolMode | None
    pool_limit: int | None
    effective: EffectiveAllocation


class LicenseQuery(PageParams):
    q: str | None = Field(default=None, max_length=200,
                          description="wildcard search over key, notes and customer name (* any text, ? one character)")
    status: LicenseStatus | None = None
    expired: bool = Field(default=False, description="only expired licenses and coupons (or'ed with the other flags)")
    expiring_soon: bool = Field(default=False, description="only active licenses that end within 30 days")
    coupon_deadline_soon: bool = Field(default=False, description="only unused keys whose activation deadline is near")
    customer_id: Id | None = None
    in_pool: bool | None = None
    include_void: bool = False


class OrderQuery(PageParams):
    kind: OrderKind | None = None
    q: str | None = Field(default=None, max_length=200, description="wildcard search over the orders' keys and notes")


class BuyBody(Body):
    edition: str = Field(min_length=1, max_length=64)
    seats: int = Field(ge=1, le=MAX_SEATS)
    term_months: int = Field(default=12, ge=1, le=MAX_TERM_MONTHS)
    notes: str = Field(default="", max_length=MAX_NOTES)


class BulkBuyBody(Body):
    edition: str = Field(min_length=1, max_length=64)
    customers: int = Field(ge=1, le=MAX_BULK_KEYS)
    devices_per_customer: int = Field(ge=1, le=MAX_SEATS)
    term_months: int = Field(default=12, ge=1, le=MAX_TERM_MONTHS)


class LicensePatch(Body):
    notes: str | None = Field(default=None, max_length=MAX_NOTES)
    auto_renew: bool | None = None

    @model_validator(mode="after")
    def _something(self) -> LicensePatch:
        if self.notes is None and self.auto_renew is None:
            raise ValueError("give notes, auto_renew or both")
        return self


class AssignBody(Body):
    workspace_id: Id


class RenewBody(Body):
    """Either ``years`` or ``coupon: true``, not both and not neither (else 422)."""

    years: int | None = Field(default=None, ge=1, le=MAX_RENEWAL_YEARS)
    coupon: bool = Field(default=False, description="renew by consuming an unused key (L8) instead of by years")
    edition: str | None = Field(default=None, min_length=1, max_length=64,
                                description="migrate to this edition with the renewal (L9)")

    @model_validator(mode="after")
    def _one_way(self) -> RenewBody:
        if self.coupon == (self.years is not None):
            raise ValueError("give either years or coupon: true")
        return self


class PoolBody(Body):
    key: str = Field(min_length=1, max_length=64)


class DeleteExpiredBody(Body):
    mode: DeleteMode
    dry_run: bool = False


class CompanySettingsPatch(Body):
    """Only the fields given change; ``pool_limit`` needs ``pool_mode`` beside it (L15), else 422."""

    model_config = ConfigDict(json_schema_extra={"dependentRequired": {"pool_limit": ["pool_mode"]}})

    automatic_exchange: bool | None = None
    pool_mode: PoolMode | None = Field(
        default=None,
        description="global or limited: the company's setting, which overrides its users' (L15); "
                    "null removes it so each user's own applies; left out: unchanged",
    )
    pool_limit: Count | None = Field(default=None, description="with pool_mode limited only (L15)")

    @model_validator(mode="after")
    def _limit_needs_mode(self) -> CompanySettingsPatch:
        if "pool_limit" in self.model_fields_set and "pool_mode" not in self.model_fields_set:
            raise ValueError("pool_limit needs pool_mode beside it, e.g. {\"pool_mode\": \"limited\", \"pool_limit\": 5} (L15)")
        return self


class UserAllocationBody(Body):
    pool_mode: PoolMode | None = Field(description="null: no own setting (the global pool)")
    pool_limit: Count | None = Field(default=None, description="with pool_mode limited only (L15)")


# --- helpers ------------------------------------------------------------------------------------


def _license_dicts(request: web.Request, session: Session, licenses: list[Any]) -> list[dict[str, Any]]:
    gw = gateway_of(request)
    now = gw.clock.now()
    return [info.to_dict(now, gw.settings.licensing) for info in queries.infos_for(session, licenses)]


def _order_dict(request: web.Request, session: Session, order: Any) -> dict[str, Any]:
    gw = gateway_of(request)
    return orders.get_order(session, gw.clock, gw.settings.licensing, principal_of(request), order.id).to_dict()


# --- licenses -------------------------------------------------------------------------------------


@routes.get("/licenses", summary="list and search licenses (L11)", query=LicenseQuery, response=Page[LicenseOut])
async def list_licenses(request: web.Request) -> web.Response:
    params = read_query(request, LicenseQuery)
    gw, principal = gateway_of(request), principal_of(request)

    def work(session: Session) -> tuple[list[dict[str, Any]], int]:
        infos, total = queries.list_licenses(
            session, gw.clock, gw.settings.licensing, principal, query=params.q, status=params.status,
            expired=params.expired, expiring_soon=params.expiring_soon,
            coupon_deadline_soon=params.coupon_deadline_soon, customer_id=params.customer_id,
            in_pool=params.in_pool, include_void=params.include_void, limit=params.limit, offset=params.offset,
        )
        now = gw.clock.now()
        return [i.to_dict(now, gw.settings.licensing) for i in infos], total

    items, total = await in_db(request, work)
    return respond(Page[LicenseOut], page(request, items, total, params))


@routes.post("/licenses", summary="buy one license (L5)", body=BuyBody, response=PurchaseOut, status=201)
async def buy_license(request: web.Request) -> web.Response:
    body = await read_body(request, BuyBody)
    gw, principal = gateway_of(request), principal_of(request)

    def work(session: Session) -> dict[str, Any]:
        bought = purchase.buy(session, gw.clock, gw.settings.licensing, principal, edition=body.edition,
                              seats=body.seats, term_months=body.term_months, notes=body.notes)
        return {"order": _order_dict(request, session, bought.order),
                "licenses": _license_dicts(request, session, bought.licenses)}

    return respond(PurchaseOut, await in_db(request, work), status=201)


@routes.post("/licenses/bulk", summary="buy licenses for many customers at a tier discount (L6)", body=BulkBuyBody,
             response=PurchaseOut, status=201)
async def buy_bulk(request: web.Request) -> web.Response:
    body = await read_body(request, BulkBuyBody)
    gw, principal = gateway_of(request), principal_of(request)

    def work(session: Session) -> dict[str, Any]:
        bought = purchase.buy_bulk(session, gw.clock, gw.settings.licensing, principal, edition=body.edition,
                                   customers=body.customers, devices_per_customer=body.devices_per_customer,
                                   term_months=body.term_months)
        return {"order": _order_dict(request, session, bought.order),
                "licenses": _license_dicts(request, session, bought.licenses)}

    return respond(PurchaseOut, await in_db(request, work), status=201)


@routes.post("/licenses/delete-expired", summary="void expired licenses in bulk (L16)", body=DeleteExpiredBody,
             response=DeleteExpiredOut)
async def delete_expired(request: web.Request) -> web.Response:
    body = await read_body(request, DeleteExpiredBody)
    gw, principal = gateway_of(request), principal_of(request)

    def work(session: Session) -> dict[str, Any]:
        chosen = pool.delete_expired(session, gw.clock, gw.settings.licensing, principal, body.mode,
                                     dry_run=body.dry_run)
        return {"mode": body.mode, "dry_run": body.dry_run, "count": len(chosen), "keys": [c.key for c in chosen]}

    return respond(DeleteExpiredOut, await in_db(request, work))


@routes.get("/licenses/{key}", summary="one license", response=LicenseOut)
async def get_license(request: web.Request) -> web.Response:
    gw, principal, key = gateway_of(request), principal_of(request), request.match_info["key"]

    def work(session: Session) -> dict[str, Any]:
        return queries.license_info(session, principal, key).to_dict(gw.clock.now(), gw.settings.licensing)

    return respond(LicenseOut, await in_db(request, work))


@routes.patch("/licenses/{key}", summary="edit notes (L10) or cancel/restore auto-renewal (L13)", body=LicensePatch,
              response=LicenseOut)
async def patch_license(request: web.Request) -> web.Response:
    body = await read_body(request, LicensePatch)
    gw, principal, key = gateway_of(request), principal_of(request), request.match_info["key"]

    def work(session: Session) -> dict[str, Any]:
        if body.notes is not None:
            history.set_notes(session, gw.clock, principal, key, body.notes)
        if body.auto_renew is not None:
            renewal.set_auto_renew(session, gw.clock, gw.settings.licensing, principal, key, body.auto_renew)
        return queries.license_info(session, principal, key).to_dict(gw.clock.now(), gw.settings.licensing)

    return respond(LicenseOut, await in_db(request, work))


@routes.post("/licenses/{key}/assign", summary="assign to a workspace; the term starts now (L2, L5)",
             body=AssignBody, response=LicenseOut)
async def assign_license(request: web.Request) -> web.Response:
    body = await read_body(request, AssignBody)
    gw, principal, key = gateway_of(request), principal_of(request), request.match_info["key"]

    def work(session: Session) -> dict[str, Any]:
        assigned = assignment.assign(session, gw.clock, gw.settings.licensing, principal, key, body.workspace_id)
        return _license_dicts(request, session, [assigned])[0]

    return respond(LicenseOut, await in_db(request, work))


@routes.post("/licenses/{key}/renew", summary="renew by years or with a coupon, optionally migrating (L7-L9)",
             body=RenewBody, response=RenewalOut)
async def renew_license(request: web.Request) -> web.Response:
    body = await read_body(request, RenewBody)
    gw, principal, key = gateway_of(request), principal_of(request), request.match_info["key"]

    def work(session: Session) -> dict[str, Any]:
        config = gw.settings.licensing
        if body.coupon:
            renewed = renewal.renew_with_coupon(session, gw.clock, config, principal, key, edition=body.edition)
        else:
            assert body.years is not None
            renewed = renewal.renew(session, gw.clock, config, principal, key, years=body.years, edition=body.edition)
        return {
            "license": _license_dicts(request, session, [renewed.license])[0],
            "order": _order_dict(request, session, renewed.order) if renewed.order else None,
            "coupon": renewed.coupon.key if renewed.coupon else None,
        }

    return respond(RenewalOut, await in_db(request, work))


@routes.post("/licenses/{key}/exchange", summary="replace an expired license with a pool key (L14)",
             response=LicenseOut)
async def exchange_license(request: web.Request) -> web.Response:
    gw, principal, key = gateway_of(request), principal_of(request), request.match_info["key"]

    def work(session: Session) -> dict[str, Any]:
        replacement = pool.exchange(session, gw.clock, gw.settings.licensing, principal, key)
        return _license_dicts(request, session, [replacement])[0]

    return respond(LicenseOut, await in_db(request, work))


@routes.get("/licenses/{key}/history", summary="the license's change history (L10)", query=PageParams,
            response=Page[HistoryOut])
async def license_history(request: web.Request) -> web.Response:
    params = read_query(request, PageParams)
    principal, key = principal_of(request), request.match_info["key"]

    def work(session: Session) -> tuple[list[dict[str, Any]], int]:
        rows, total = history.license_history(session, principal, key, limit=params.limit, offset=params.offset)
        return [history.history_dict(r) for r in rows], total

    items, total = await in_db(request, work)
    return respond(Page[HistoryOut], page(request, items, total, params))


# --- pool -----------------------------------------------------------------------------------------


@routes.get("/pool", summary="the partner's global pool of unused keys (L14)", query=PageParams,
            response=Page[LicenseOut])
async def list_pool(request: web.Request) -> web.Response:
    params = read_query(request, PageParams)
    gw, principal = gateway_of(request), principal_of(request)

    def work(session: Session) -> tuple[list[dict[str, Any]], int]:
        require_admin(principal, "pool")
        infos, total = queries.list_licenses(session, gw.clock, gw.settings.licensing, principal, in_pool=True,
                                             status=LicenseStatus.UNUSED, limit=params.limit, offset=params.offset)
        now = gw.clock.now()
        return [i.to_dict(now, gw.settings.licensing) for i in infos], total

    items, total = await in_db(request, work)
    return respond(Page[LicenseOut], page(request, items, total, params))


@routes.post("/pool", summary="put an unused key into the pool", body=PoolBody, response=LicenseOut)
async def add_to_pool(request: web.Request) -> web.Response:
    body = await read_body(request, PoolBody)
    gw, principal = gateway_of(request), principal_of(request)

    def work(session: Session) -> dict[str, Any]:
        pooled = pool.set_pool(session, gw.clock, gw.settings.licensing, principal, body.key, True)
        return _license_dicts(request, session, [pooled])[0]

    return respond(LicenseOut, await in_db(request, work))


@routes.delete("/pool/{key}", summary="take a key out of the pool", response=LicenseOut)
async def remove_from_pool(request: web.Request) -> web.Response:
    gw, principal, key = gateway_of(request), principal_of(request), request.match_info["key"]

    def work(session: Session) -> dict[str, Any]:
        unpooled = pool.set_pool(session, gw.clock, gw.settings.licensing, principal, key, False)
        return _license_dicts(request, session, [unpooled])[0]

    return respond(LicenseOut, await in_db(request, work))


# --- orders (L12) ---------------------------------------------------------------------------------


@routes.get("/orders", summary="the order history: every purchase and which of its keys are used (L12)",
            query=OrderQuery, response=Page[OrderOut])
async def list_orders(request: web.Request) -> web.Response:
    params = read_query(request, OrderQuery)
    gw, principal = gateway_of(request), principal_of(request)

    def work(session: Session) -> tuple[list[dict[str, Any]], int]:
        infos, total = orders.list_orders(session, gw.clock, gw.settings.licensing, principal, kind=params.kind,
                                          query=params.q, limit=params.limit, offset=params.offset)
        return [i.to_dict() for i in infos], total

    items, total = await in_db(request, work)
    return respond(Page[OrderOut], page(request, items, total, params))


@routes.get("/orders/{order_id}", summary="one order and its keys", response=OrderOut)
async def get_order(request: web.Request) -> web.Response:
    gw, principal = gateway_of(request), principal_of(request)
    order_id = _int_path(request, "order_id")

    def work(session: Session) -> dict[str, Any]:
        return orders.get_order(session, gw.clock, gw.settings.licensing, principal, order_id).to_dict()

    return respond(OrderOut, await in_db(request, work))


# --- settings (L14, L15) ---------------------------------------------------------------------------


@routes.get("/settings/licensing", summary="automatic exchange and the company's license allocation",
            response=CompanySettingsOut)
async def get_company_settings(request: web.Request) -> web.Response:
    principal = principal_of(request)
    return respond(CompanySettingsOut, await in_db(request, lambda s: pool.company_settings(s, principal)))


@routes.patch("/settings/licensing", summary="switch automatic exchange (L14) or set the company allocation (L15)",
              body=CompanySettingsPatch, response=CompanySettingsOut)
async def patch_company_settings(request: web.Request) -> web.Response:
    body = await read_body(request, CompanySettingsPatch)
    principal = principal_of(request)

    def work(session: Session) -> dict[str, Any]:
        unset = "pool_mode" in body.model_fields_set and body.pool_mode is None
        pool.set_company_settings(session, principal, automatic_exchange=body.automatic_exchange,
                                  pool_mode=body.pool_mode, pool_limit=body.pool_limit, unset_pool_mode=unset)
        return pool.company_settings(session, principal)

    return respond(CompanySettingsOut, await in_db(request, work))


@routes.get("/users/{user_id}/allocation", summary="a user's license allocation and what is in force (L15)",
            response=UserAllocationOut)
async def get_user_allocation(request: web.Request) -> web.Response:
    gw, principal = gateway_of(request), principal_of(request)
    user_id = _int_path(request, "user_id")
    return respond(UserAllocationOut,
                   await in_db(request, lambda s: pool.user_allocation(s, gw.clock, principal, user_id)))


@routes.put("/users/{user_id}/allocation", summary="set a user's license allocation (L15)", body=UserAllocationBody,
            response=UserAllocationOut)
async def put_user_allocation(request: web.Request) -> web.Response:
    body = await read_body(request, UserAllocationBody)
    gw, principal = gateway_of(request), principal_of(request)
    user_id = _int_path(request, "user_id")

    def work(session: Session) -> dict[str, Any]:
        pool.set_user_allocation(session, principal, user_id, pool_mode=body.pool_mode, pool_limit=body.pool_limit)
        return pool.user_allocation(session, gw.clock, principal, user_id)

    return respond(UserAllocationOut, await in_db(request, work))


def _int_path(request: web.Request, name: str) -> int:
    raw = request.match_info[name]
    # ASCII digits only: str.isdigit() also takes '²' (int() then fails) and '١' (int() reads 1).
    if not (raw.isascii() and raw.isdigit()) or int(raw) > MAX_PATH_ID:  # past any integer column: no row
        raise NotFound(f"no {name.removesuffix('_id')} with id {raw!r}", field=name)
    return int(raw)

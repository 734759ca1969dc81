"""A Syncro API v1 simulator: customers, assets and invoices, for tests and trying the plugin.

It reproduces what the adapters rely on (sources in ``protocol.py``):

- ``/api/v1/...`` with ``Authorization: Bearer <token>`` (a bare token and the legacy
  ``?api_key=`` are accepted too, as Syncro does); anything else is 401.
- ``GET /customers``, ``GET /customer_assets``, ``GET /invoices``: 25 rows a page,
  ``?page=N``, ``meta`` with ``total_pages``, ``total_entries``, ``per_page``, ``page``;
  rows in id order. ``/customers`` leaves out disabled customers unless
  ``include_disabled=true``; ``/customer_assets`` filters by ``customer_id``;
  ``/invoices`` by ``since_updated_at``.
- ``GET /invoices/{id or number}``: 404 ``{"error": "Not found"}`` when neither matches.
- ``POST /invoices``: needs an existing ``customer_id`` and a ``number`` no other invoice
  has (422 ``{"message": [...]}`` otherwise, as Rails validations answer); lines are
  stored with their ``quantity`` and ``price``; ``subtotal`` is their sum, ``tax`` 0,
  ``total`` the sum of both, all as strings with two decimals.
- 180 requests per minute per client address, then 429 with ``Retry-After`` (seconds
  until a request leaves the window). Syncro does not document a ``Retry-After``; the
  simulator sends one so clients that honour it are exercised.

The population comes from ``random.Random(seed)``; ``last_synced_at`` is spread over the
last ~40 days of the simulator's clock. ``app[FAULTS]`` plans 429/5xx answers, dropped
connections and token expiry (:mod:`gateway.simulators`); ``app[STATE]`` is the data.
"""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from aiohttp import web

from gateway import Clock, SystemClock
from gateway.simulators import Faults, RequestWindow, company_names

DEFAULT_API_TOKEN = "sim-syncro-api-token-0001"
PAGE_SIZE = 25
CENT = Decimal("0.01")
_ASSET_TYPES = (("Syncro Device", 70), ("Laptop", 15), ("Server", 10), ("Desktop", 5))
_FIRST_NAMES = ("Alex", "Sam", "Jordan", "Taylor", "Morgan", "Casey", "Riley", "Jamie", "Avery", "Quinn")
_LAST_NAMES = ("Nguyen", "Smith", "Garcia", "Müller", "Kowalski", "Okafor", "Tanaka", "Silva", "Dubois", "Larsen")


class SyncroState:
    """The simulated account: tokens, customers, assets, invoices and the request window."""

    def __init__(self, *, seed: int, customers: int, assets: int, api_tokens: set[str], clock: Clock,
                 rate_limit: tuple[int, float] | None, page_size: int):
        self.clock = clock
        self.api_tokens = api_tokens
        self.page_size = page_size
        self.rate_limit = rate_limit
        self.windows: dict[str, RequestWindow] = {}
        self.requests: dict[str, int] = defaultdict(int)  # "GET /api/v1/customers" -> count
        rng = random.Random(seed)
        now = clock.now()
        self.customers: list[dict[str, Any]] = []
        for index, business in enumerate(company_names(rng, customers)):
            first, last = rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)
            personal = rng.random() < 0.1  # a few customers are people, not businesses
            created = now - timedelta(days=rng.uniform(60, 1500))
            self.customers.append({
                "id": 1_000_001 + index,
                "firstname": first,
                "lastname": last,
                "fullname": f"{first} {last}",
                "business_name": None if personal else business,
                "business_then_name": f"{first} {last}" if personal else business,
                "email": f"{first.lower()}@example.com",
                "disabled": rng.random() < 0.05,
                "created_at": _iso(created),
                "updated_at": _iso(created + timedelta(days=rng.uniform(0, 30))),
            })
        self.assets: list[dict[str, Any]] = [self._asset(rng, index, now) for index in range(assets)]
        self.invoices: list[dict[str, Any]] = []

    def _asset(self, rng: random.Random, index: int, now: datetime) -> dict[str, Any]:
        customer = rng.choice(self.customers)
        kind = rng.choices([k for k, _ in _ASSET_TYPES], weights=[w for _, w in _ASSET_TYPES])[0]
        roll = rng.random()
        ago = rng.uniform(0, 600) if roll < 0.7 else rng.uniform(3600, 40 * 86400)
        synced = now - timedelta(seconds=ago)
        created = synced - timedelta(days=rng.uniform(20, 700))
        name = f"{kind.split()[0][:3].upper()}-{rng.randrange(16**5):05X}"
        return {
            "id": 5_000_001 + index,
            "name": name,
            "customer_id": customer["id"],
            "contact_id": None,
            "asset_type": kind,
            "asset_serial": f"SN{rng.randrange(10**9):09d}",
            "properties": {"kabuto_information": {"last_synced_at": _iso(synced), "general": {"name": name}}},
            "created_at": _iso(created),
            "updated_at": _iso(synced),
        }

    def customer(self, customer_id: Any) -> dict[str, Any] | None:
        return next((c for c in self.customers if str(c["id"]) == str(customer_id)), None)

    def invoice(self, id_or_number: str) -> dict[str, Any] | None:
        if id_or_number.isdigit():
            found = next((i for i in self.invoices if str(i["id"]) == id_or_number), None)
            if found is not None:
                return found
        return next((i for i in self.invoices if i["number"] == id_or_number), None)

    def admit(self, client: str) -> float | None:
        """Count a request against the client's minute; seconds to wait when over the limit."""
        if self.rate_limit is None:
            return None
        window = self.windows.setdefault(client, RequestWindow(*self.rate_limit))
        return window.admit()


STATE = web.AppKey("syncro_state", SyncroState)
FAULTS = web.AppKey("syncro_faults", Faults)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def _error(status: int, message: str) -> dict[str, Any]:
    return {"error": message}


@web.middleware
async def _gatekeeper(request: web.Request, handler: Any) -> web.StreamResponse:
    """Quota, planned faults and the API token, in that order, for every API path."""
    if not request.path.startswith("/api/v1/"):
        return await handler(request)
    state = request.app[STATE]
    wait = state.admit(request.remote or "?")
    if wait is not None:
        return web.json_response({"error": "Rate limit exceeded: 180 requests per minute"}, status=429,
                                 headers={"Retry-After": str(max(1, round(wait)))})
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else request.path
    state.requests[f"{request.method} {route}"] += 1
    fault = await request.app[FAULTS].inject(request, _error)
    if fault is not None:
        return fault
    header = request.headers.get("Authorization", "").strip()
    token = header.removeprefix("Bearer ").strip() or request.query.get("api_key", "")
    if token not in state.api_tokens or request.app[FAULTS].token_generation:
        return web.json_response({"error": "Not authorized"}, status=401)
    return await handler(request)


def _page(request: web.Request, rows: list[dict[str, Any]], key: str) -> web.Response:
    size = request.app[STATE].page_size
    try:
        page = max(1, int(request.query.get("page", "1")))
    except ValueError:
        return web.json_response({"message": ["page must be a number"]}, status=422)
    total_pages = (len(rows) + size - 1) // size
    chunk = rows[(page - 1) * size : page * size]
    meta = {"total_pages": total_pages, "total_entries": len(rows), "per_page": size, "page": page}
    return web.json_response({key: chunk, "meta": meta})


async def _customers(request: web.Request) -> web.Response:
    state = request.app[STATE]
    include_disabled = request.query.get("include_disabled", "false").lower() == "true"
    rows = [c for c in state.customers if include_disabled or not c["disabled"]]
    return _page(request, rows, "customers")


async def _assets(request: web.Request) -> web.Response:
    state = request.app[STATE]
    customer_id = request.query.get("customer_id")
    rows = [a for a in state.assets if customer_id is None or str(a["customer_id"]) == customer_id]
    return _page(request, rows, "assets")


async def _invoices(request: web.Request) -> web.Response:
    state = request.app[STATE]
    since = request.query.get("since_updated_at")
    if since:
        try:
            since_at = datetime.fromisoformat(since.replace("Z", "+00:00"))
        except ValueError:
            return web.json_response({"message": ["since_updated_at is not a date"]}, status=422)
        rows = [i for i in state.invoices if datetime.fromisoformat(i["updated_at"]) >= since_at]
    else:
        rows = list(state.invoices)
    return _page(request, [_listed(i) for i in rows], "invoices")


def _listed(invoice: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in invoice.items() if k != "line_items"}


async def _invoice(request: web.Request) -> web.Response:
    invoice = request.app[STATE].invoice(request.match_info["id"])
    if invoice is None:
        return web.json_response({"error": "Not found"}, status=404)
    return web.json_response({"invoice": invoice})


async def _create_invoice(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        body = await request.json()
    except ValueError:
        return web.json_response({"message": ["body is not JSON"]}, status=400)
    if not isinstance(body, dict):
        return web.json_response({"message": ["body must be an object"]}, status=400)
    problems = []
    customer = state.customer(body.get("customer_id"))
    if customer is None:
        problems.append("Customer must exist")
    number = str(body.get("number") or "")
    if not number:
        problems.append("Number can't be blank")
    elif any(i["number"] == number for i in state.invoices):
        problems.append("Number has already been taken")
    if not body.get("date"):
        problems.append("Date can't be blank")
    lines = []
    for position, line in enumerate(body.get("line_items") or [], start=1):
        try:
            quantity, price = Decimal(str(line["quantity"])), Decimal(str(line["price"]))
        except (KeyError, TypeError, InvalidOperation):
            problems.append(f"Line item {position} needs a numeric quantity and price")
            continue
        lines.append({"id": 9_000_000 + len(state.invoices) * 100 + position, "position": position,
                      "item": line.get("item") or "", "name": line.get("name") or "",
                      "quantity": str(quantity), "price": str(price), "taxable": bool(line.get("taxable"))})
    if problems:
        return web.json_response({"message": problems}, status=422)
    assert customer is not None  # a missing customer is one of the problems answered above
    subtotal = sum((Decimal(item["quantity"]) * Decimal(item["price"]) for item in lines), Decimal(0)).quantize(CENT)
    now = _iso(state.clock.now())
    invoice = {
        "id": 7_000_001 + len(state.invoices),
        "number": number,
        "customer_id": customer["id"],
        "customer_business_then_name": customer["business_then_name"],
        "date": body["date"],
        "due_date": body.get("due_date"),
        "po_number": body.get("po_number"),
        "note": body.get("note") or "",
        "subtotal": str(subtotal),
        "tax": "0.00",
        "total": str(subtotal),
        "is_paid": False,
        "created_at": now,
        "updated_at": now,
        "line_items": lines,
    }
    state.invoices.append(invoice)
    return web.json_response({"invoice": invoice})


def create_app(
    *,
    seed: int = 1,
    customers: int = 30,
    assets: int = 200,
    api_tokens: set[str] | None = None,
    clock: Clock | None = None,
    rate_limit: tuple[int, float] | None = (180, 60.0),
    page_size: int = PAGE_SIZE,
) -> web.Application:
    """A Syncro account with ``customers`` customers and ``assets`` assets, and no invoices yet."""
    app = web.Application(middlewares=[_gatekeeper])
    app[STATE] = SyncroState(seed=seed, customers=customers, assets=assets,
                             api_tokens=api_tokens or {DEFAULT_API_TOKEN}, clock=clock or SystemClock(),
                             rate_limit=rate_limit, page_size=page_size)
    app[FAULTS] = Faults()
    app.router.add_get("/api/v1/customers", _customers)
    app.router.add_get("/api/v1/customer_assets", _assets)
    app.router.add_get("/api/v1/invoices", _invoices)
    app.router.add_post("/api/v1/invoices", _create_invoice)
    app.router.add_get("/api/v1/invoices/{id}", _invoice)
    return app

"""A faithful fake of the HaloPSA REST API, for tests, benchmarks and the demo.

What it reproduces, and where that behaviour is described:

- ``POST /auth/token`` (form: ``grant_type=client_credentials``, ``client_id``, ``client_secret``,
  ``scope=all``; optional ``?tenant=``) answering ``{"access_token", "token_type": "Bearer",
  "expires_in", "scope"}``, refusals as OAuth2 errors (401 ``invalid_client``, 400
  ``unsupported_grant_type``/``invalid_scope``); every ``/api`` call needs a live bearer token and gets
  401 otherwise. Source: https://agentskills.market/skills/asachs01-msp-claude-plugins-msp-claude-plugins-halopsa-halopsa-skills-api-patterns
- ``GET /api/Client`` and ``GET /api/Invoice`` with ``pageinate=true&page_size=&page_no=`` (the vendor's
  spelling), answering ``{"page_no", "page_size", "record_count", "clients"|"invoices": [...]}``;
  ``client_id`` and ``includelines`` filters on invoices. Writes are ``POST`` of a JSON array (no ``id``:
  create, ``id``: update) answering the saved object (one) or objects (several); ``DELETE
  /api/Invoice/{id}`` removes an unposted invoice. Invoice and line field
  names (``client_id``, ``invoice_date``, ``duedate``, ``reference``, ``internal_note``, ``notes_1``,
  ``period_start_date``, ``lines[].item_shortdescription``/``qty_order``/``unit_price``/``net_amount``,
  ``total``) as in https://github.com/redanthrax/halopsa-node (nodes/HaloPSA/actions/interfaces/invoices.ts)
  and https://hk.jiaoweilu.com/redanthrax/halopsa-node/blob/master/docs/invoices.md
- Validation errors are HTTP 400 with a plain-text message, as Halo sends them.
- Throttling: an optional ``rate_limit=(requests, per_seconds)`` answered with 429. HaloPSA does not
  publish its hosted limit; benchmarks set one.

Test hooks: ``app[STATE]`` (``clients``, ``invoices``, ``tokens_issued``, ``requests``);
``app[FAULTS]`` (a :class:`gateway.simulators.Faults`) plans 429s (with or without Retry-After),
5xx, slow answers, dropped connections and ``expire_tokens()`` at run time. Token lifetimes run on
the injected ``clock``.
"""

from __future__ import annotations

import random
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from aiohttp import web

from gateway.core.clock import Clock, SystemClock
from gateway.simulators import Faults, RequestWindow, company_names

# --- state -------------------------------------------------------------------------------


@dataclass
class State:
    """Everything the fake HaloPSA tenant holds; tests read and change it directly."""

    client_id: str
    client_secret: str
    tenant: str | None
    token_lifetime: float
    clock: Clock
    window: RequestWindow | None = None
    clients: dict[int, dict[str, Any]] = field(default_factory=dict)
    invoices: dict[int, dict[str, Any]] = field(default_factory=dict)
    tokens: dict[str, tuple[int, datetime]] = field(default_factory=dict)  # token -> (fault generation, expiry)
    tokens_issued: int = 0
    requests: Counter[str] = field(default_factory=Counter)
    _ids: Counter[str] = field(default_factory=Counter)

    def next_id(self, kind: str, start: int) -> int:
        self._ids[kind] += 1
        return start + self._ids[kind]


STATE = web.AppKey("halopsa_state", State)
FAULTS = web.AppKey("halopsa_faults", Faults)



def _money(value: Decimal) -> float:
    return float(value.quantize(Decimal("0.01"), ROUND_HALF_UP))


def seed(state: State, *, clients: int, seed_value: int) -> None:
    """Deterministic clients, each with one older invoice typed by a person (no gateway marker)."""
    rng = random.Random(seed_value)
    for name in company_names(rng, clients):
        client_id = state.next_id("client", 10)
        state.clients[client_id] = {
            "id": client_id,
            "name": name,
            "inactive": False,
            "toplevel_id": 1,
            "toplevel_name": "Customers",
        }
        invoice = {
            "client_id": client_id,
            "invoice_date": "2025-12-01",
            "duedate": "2025-12-31",
            "reference": f"PO-{rng.randint(1000, 9999)}",
            "internal_note": "Hardware, typed by hand",
            "lines": [{"item_shortdescription": "Laptop", "qty_order": 1, "unit_price": rng.choice([899, 1099])}],
        }
        _save_invoice(state, invoice)


# --- errors --------------------------------------------------------------------------------


class _Invalid(Exception):
    pass


def _bad_request(message: str) -> web.Response:
    return web.Response(status=400, text=message, content_type="text/plain")


# --- middleware ------------------------------------------------------------------------------


@web.middleware
async def _faults(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    state = request.app[STATE]
    route = request.match_info.route.resource
    state.requests[f"{request.method} {route.canonical if route is not None else request.path}"] += 1
    fault = await request.app[FAULTS].inject(request, lambda status, message: {"error": message})
    if fault is not None:
        return fault
    if state.window is not None and state.window.admit() is not None:
        return web.Response(status=429, text="Too many requests, please slow down.")
    return await handler(request)


@web.middleware
async def _bearer(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    if not request.path.lower().startswith("/api/"):
        return await handler(request)
    state = request.app[STATE]
    header = request.headers.get("Authorization", "")
    token = header[7:] if header.startswith("Bearer ") else ""
    issued = state.tokens.get(token)
    if issued is None or issued[0] != request.app[FAULTS].token_generation or state.clock.now() >= issued[1]:
        state.tokens.pop(token, None)
        return web.Response(status=401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    return await handler(request)


# --- auth ----------------------------------------------------------------------------------------


async def token(request: web.Request) -> web.Response:
    state = request.app[STATE]
    form = await request.post()
    if state.tenant and request.query.get("tenant") != state.tenant:
        return web.json_response({"error": "invalid_request", "error_description": "unknown tenant"}, status=400)
    if form.get("grant_type") != "client_credentials":
        return web.json_response({"error": "unsupported_grant_type"}, status=400)
    if form.get("client_id") != state.client_id or form.get("client_secret") != state.client_secret:
        return web.json_response({"error": "invalid_client"}, status=401)
    if form.get("scope") not in ("all", None, ""):
        return web.json_response({"error": "invalid_scope"}, status=400)
    value = secrets.token_urlsafe(24)
    expires = state.clock.now() + timedelta(seconds=state.token_lifetime)
    state.tokens[value] = (request.app[FAULTS].token_generation, expires)
    state.tokens_issued += 1
    return web.json_response(
        {"access_token": value, "token_type": "Bearer", "expires_in": int(state.token_lifetime), "scope": "all"}
    )


# --- lists ---------------------------------------------------------------------------------------


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() == "true"


def _paged(request: web.Request, rows: list[dict[str, Any]], field_name: str) -> web.Response:
    rows = sorted(rows, key=lambda row: row["id"])
    body: dict[str, Any] = {"record_count": len(rows)}
    if _flag(request, "pageinate"):
        try:
            size = int(request.query.get("page_size", "50"))
            number = int(request.query.get("page_no", "1"))
        except ValueError:
            return _bad_request("page_size and page_no must be whole numbers")
        if size < 1 or number < 1:
            return _bad_request("page_size and page_no must be at least 1")
        rows = rows[(number - 1) * size : number * size]
        body.update(page_no=number, page_size=size)
    body[field_name] = rows
    return web.json_response(body)


async def list_clients(request: web.Request) -> web.Response:
    rows = list(request.app[STATE].clients.values())
    if not _flag(request, "includeinactive"):
        rows = [row for row in rows if not row.get("inactive")]
    return _paged(request, rows, "clients")


async def list_invoices(request: web.Request) -> web.Response:
    state = request.app[STATE]
    rows = list(state.invoices.values())
    if "client_id" in request.query:
        try:
            wanted = int(request.query["client_id"])
        except ValueError:
            return _bad_request("client_id must be a whole number")
        rows = [row for row in rows if row["client_id"] == wanted]
    include_lines = _flag(request, "includelines")
    rows = [row if include_lines else {k: v for k, v in row.items() if k != "lines"} for row in rows]
    return _paged(request, rows, "invoices")


# --- writes ---------------------------------------------------------------------------------------


def _decimal(value: Any, name: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _Invalid(f"{name} must be a number")
    try:
        return Decimal(str(value))
    except Exception:
        raise _Invalid(f"{name} must be a number") from None


def _date(value: Any, name: str) -> str:
    try:
        return date.fromisoformat(str(value)[:10]).isoformat()
    except ValueError:
        raise _Invalid(f"{name} must be a date (yyyy-mm-dd)") from None


_TEXT_FIELDS = {"reference": 100, "order_number": 100, "notes_1": 2000, "internal_note": 4000, "thirdpartyinvoicenumber": 100}


def _save_invoice(state: State, body: dict[str, Any]) -> dict[str, Any]:
    """Create (no id) or update (id) one invoice; raises _Invalid and changes nothing on a bad one."""
    invoice_id = body.get("id")
    if invoice_id not in (None, 0) and invoice_id not in state.invoices:
        raise _Invalid(f"Invoice {invoice_id} not found")
    current = dict(state.invoices.get(invoice_id) or {}) if invoice_id else {}
    client_id = body.get("client_id", current.get("client_id"))
    if client_id not in state.clients:
        raise _Invalid("Please select a valid Client.")
    invoice = {**current, "client_id": client_id, "client_name": state.clients[client_id]["name"]}
    for name in ("invoice_date", "duedate", "period_start_date", "period_end_date"):
        if body.get(name) is not None:
            invoice[name] = _date(body[name], name)
    for name, limit in _TEXT_FIELDS.items():
        if name in body:
            value = body[name]
            if value is not None and (not isinstance(value, str) or len(value) > limit):
                raise _Invalid(f"{name} must be text of at most {limit} characters")
            invoice[name] = value
    if "lines" in body:
        if not isinstance(body["lines"], list):
            raise _Invalid("lines must be a list")
        lines = []
        for number, line in enumerate(body["lines"], start=1):
            if not isinstance(line, dict) or not line.get("item_shortdescription"):
                raise _Invalid(f"Line {number} needs an item_shortdescription")
            quantity = _decimal(line.get("qty_order", 1), f"lines[{number}].qty_order")
            price = _decimal(line.get("unit_price", 0), f"lines[{number}].unit_price")
            lines.append(
                {
                    "id": state.next_id("line", 0),
                    "item_shortdescription": line["item_shortdescription"],
                    "qty_order": float(quantity),
                    "unit_price": float(price),
                    "net_amount": _money(quantity * price),
                    "tax_amount": 0.0,
                }
            )
        invoice["lines"] = lines
    invoice.setdefault("lines", [])
    net = sum((Decimal(str(line["net_amount"])) for line in invoice["lines"]), Decimal(0))
    invoice["total"] = _money(net)
    invoice["tax_total"] = 0.0
    invoice.setdefault("invoice_date", date.today().isoformat())
    if not invoice_id:
        invoice_id = state.next_id("invoice", 1000)
        invoice["invoicenumber"] = f"INV{invoice_id:06d}"
        invoice["posted"] = False
    invoice["id"] = invoice_id
    state.invoices[invoice_id] = invoice
    return invoice


async def post_invoices(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        body = await request.json()
    except ValueError:
        return _bad_request("The request body is not valid JSON")
    if not isinstance(body, list) or not body or not all(isinstance(item, dict) for item in body):
        return _bad_request("The body must be a JSON array of invoices")
    snapshot = {k: dict(v) for k, v in state.invoices.items()}
    try:
        saved = [_save_invoice(state, item) for item in body]
    except _Invalid as exc:
        state.invoices = snapshot  # a batch is saved whole or not at all
        return _bad_request(str(exc))
    return web.json_response(saved[0] if len(saved) == 1 else saved, status=201)


async def delete_invoice(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        invoice_id = int(request.match_info["invoice_id"])
    except ValueError:
        return _bad_request("The invoice id must be a whole number")
    invoice = state.invoices.get(invoice_id)
    if invoice is None:
        return web.Response(status=404, text=f"Invoice {invoice_id} not found")
    if invoice.get("posted"):
        return _bad_request("A posted invoice cannot be deleted")
    del state.invoices[invoice_id]
    return web.Response(status=200)


# --- the application --------------------------------------------------------------------------------


def create_app(
    *,
    clients: int = 25,
    seed_value: int = 1,
    client_id: str = "sim-client",
    client_secret: str = "sim-secret",
    tenant: str | None = None,
    token_lifetime: float = 3600.0,
    rate_limit: tuple[int, float] | None = None,
    clock: Clock | None = None,
) -> web.Application:
    """The fake HaloPSA tenant; ``rate_limit=(requests, per_seconds)`` turns on throttling with 429s."""
    state = State(
        client_id=client_id,
        client_secret=client_secret,
        tenant=tenant,
        token_lifetime=token_lifetime,
        clock=clock or SystemClock(),
        window=RequestWindow(*rate_limit) if rate_limit else None,
    )
    seed(state, clients=clients, seed_value=seed_value)
    app = web.Application(middlewares=[_faults, _bearer])
    app[STATE] = state
    app[FAULTS] = Faults()
    app.router.add_post("/auth/token", token)
    app.router.add_get("/api/Client", list_clients)
    app.router.add_get("/api/Invoice", list_invoices)
    app.router.add_post("/api/Invoice", post_invoices)
    app.router.add_delete("/api/Invoice/{invoice_id}", delete_invoice)
    return app

"""A faithful fake of ConnectWise Manage's REST API 3.0, for tests, benchmarks and the demo.

What it reproduces, and where that behaviour is described:

- Codebase look-up ``GET /login/companyinfo/{company}`` (no auth), then everything under
  ``/{codebase}/apis/3.0``; auth is ``Authorization: Basic base64(company+public:private)``
  plus a registered ``clientId`` header, both refused with ConnectWise's ``{"code", "message"}``
  error body. Sources: https://gist.github.com/bersfo/12efa79de156aa6f96d80ff14a060822 ,
  https://github.com/covenanttechnologysolutions/connectwise-rest/issues/22 ,
  https://github.com/christaylorcodes/ConnectWiseManageAPI/issues/18
- ``conditions=`` with ``=``, ``!=``, ``<``, ``<=``, ``>``, ``>=``, ``like`` (``%`` wildcards),
  ``contains``, ``and``/``or``, parentheses, ``"strings"``, numbers, ``true``/``false``/``null`` and
  ``[dates]``; ``page``/``pageSize`` (default 25, capped at 1000) with a ``Link`` header of
  ``first``/``prev`` (past page 1) and ``next``/``last`` (before the last page) whose URLs end
  ``…&pageSize=1000&page=2`` (``page`` last), e.g.
  ``<https://…/company/companies?pageSize=1000&page=2>; rel="next"``. Source:
  https://www.thelazyadministrator.com/2024/06/06/how-the-connectwise-manage-api-handles-pagination-with-powershell/
- Field names of companies, agreements, agreement additions (``product``, ``quantity``, ``unitPrice``,
  ``effectiveDate``, ``cancelledDate``, ``invoiceDescription``), invoices (``type``, ``company``,
  ``reference`` ≤ 50, ``customerPO`` ≤ 50, ``internalNotes``, ``total``) and procurement products
  (``catalogItem``, ``billableOption``, ``quantity``, ``price``, ``invoice``), from the 3.0 schema as
  generated into https://github.com/Jetbuilt/connect_wise (docs/Invoice.md, docs/Addition.md,
  docs/ProductItem.md). Additions are updated with JSON Patch (``[{"op": "replace", "path": …}]``);
  invoices, products and additions can be deleted (``DELETE …/{id}`` → 204).
- Validation errors: HTTP 400 ``{"code": "InvalidObject", "message", "errors": [{"code", "message",
  "resource", "field"}]}``; unknown records: 404 ``{"code": "NotFound", …}``.
- Throttling: 429 *without* a ``Retry-After`` header (ConnectWise sends none that can be relied on),
  and 500 whose body mentions a timeout when the database is slow; optionally Cloudflare's
  rate limiting in front (429, an HTML "error 1015" page, no ``Retry-After``, a block for a while).

Test hooks: ``app[STATE]`` holds everything (``companies``, ``agreements``, ``additions``,
``invoices``, ``products``, ``requests`` per route); ``app[FAULTS]`` (a
:class:`gateway.simulators.Faults`) plans failures at run time: 429 with or without
Retry-After, 5xx (a 500 says "Timeout expired", as ConnectWise's does), slow answers, dropped
connections. Seeding is deterministic for a given ``seed_value``.
"""

from __future__ import annotations

import base64
import random
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from gateway.simulators import Faults, RequestWindow, company_names

API_PREFIX = "/{codebase}/apis/3.0"


# --- state -------------------------------------------------------------------------------


@dataclass
class State:
    """Everything the fake ConnectWise holds; tests read and change it directly."""

    company: str
    public_key: str
    private_key: str
    client_ids: set[str]
    codebase: str
    companies: dict[int, dict[str, Any]] = field(default_factory=dict)
    agreements: dict[int, dict[str, Any]] = field(default_factory=dict)
    additions: dict[int, dict[str, Any]] = field(default_factory=dict)
    invoices: dict[int, dict[str, Any]] = field(default_factory=dict)
    products: dict[int, dict[str, Any]] = field(default_factory=dict)
    catalog: dict[str, dict[str, Any]] = field(default_factory=dict)
    window: RequestWindow | None = None
    #: Whether the Link header's URLs keep ``conditions`` (a client must not depend on it).
    links_keep_conditions: bool = True
    #: A Cloudflare-style throttle in front of the API: its window, the block it imposes, and how
    #: many requests it answered with its HTML 429.
    cloudflare: RequestWindow | None = None
    cloudflare_block_seconds: float = 60.0
    cloudflare_blocked_until: float = 0.0
    cloudflare_throttled: int = 0
    monotonic: Callable[[], float] = time.monotonic
    requests: Counter[str] = field(default_factory=Counter)
    _ids: Counter[str] = field(default_factory=Counter)

    def next_id(self, kind: str) -> int:
        self._ids[kind] += 1
        return self._ids[kind]


STATE = web.AppKey("connectwise_state", State)
FAULTS = web.AppKey("connectwise_faults", Faults)

def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def seed(state: State, *, companies: int, agreements: int | None, seed_value: int) -> None:
    """Deterministic companies, one active agreement for the first ``agreements`` of them, a catalog."""
    rng = random.Random(seed_value)
    state.catalog["MSP-DEVICE"] = {"id": 1, "identifier": "MSP-DEVICE", "description": "Managed device"}
    state.catalog["MSP-FEE"] = {"id": 2, "identifier": "MSP-FEE", "description": "Service fee"}
    with_agreement = companies if agreements is None else agreements
    for n, name in enumerate(company_names(rng, companies), start=1):
        cid = state.next_id("company")
        state.companies[cid] = {
            "id": cid,
            "identifier": f"C{cid:05d}",
            "name": name,
            "status": {"id": 1, "name": "Active"},
            "deletedFlag": False,
            "_info": {"lastUpdated": "2026-01-01T00:00:00Z"},
        }
        if n <= with_agreement:
            aid = state.next_id("agreement")
            state.agreements[aid] = {
                "id": aid,
                "name": f"Managed Services - {name}",
                "type": {"id": 1, "name": "Managed Services"},
                "company": {"id": cid, "identifier": f"C{cid:05d}", "name": name},
                "agreementStatus": "Active",
                "cancelledFlag": False,
                "startDate": "2025-01-01T00:00:00Z",
                "billCycleId": 1,
            }


# --- errors ------------------------------------------------------------------------------


def _error(status: int, code: str, message: str, errors: list[dict[str, str]] | None = None) -> web.Response:
    body: dict[str, Any] = {"code": code, "message": message}
    if errors:
        body["errors"] = errors
    return web.json_response(body, status=status)


class _Invalid(Exception):
    def __init__(self, resource: str, field_name: str, message: str, code: str = "InvalidField"):
        super().__init__(message)
        self.resource, self.field_name, self.code = resource, field_name, code


def _invalid(exc: _Invalid) -> web.Response:
    return _error(
        400,
        "InvalidObject",
        f"{exc.resource} object is invalid",
        [{"code": exc.code, "message": str(exc), "resource": exc.resource, "field": exc.field_name}],
    )


# --- conditions ----------------------------------------------------------------------------

_TOKEN = re.compile(
    r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<date>\[[^\]]*\])|(?P<op>!=|<=|>=|=|<|>)|(?P<lp>\()|(?P<rp>\))'
    r"|(?P<word>[A-Za-z_][A-Za-z0-9_/.]*)|(?P<num>-?\d+(?:\.\d+)?))"
)


class _ConditionError(Exception):
    pass


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if match is None:
            raise _ConditionError(f"unexpected text at position {pos}: {text[pos:pos + 20]!r}")
        kind = match.lastgroup or ""
        out.append((kind, match.group(kind)))
        pos = match.end()
    return out


def _literal(kind: str, value: str) -> Any:
    if kind == "str":
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    if kind == "date":
        return _parse_date(value[1:-1].strip())
    if kind == "num":
        return Decimal(value)
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "null":
        return None
    raise _ConditionError(f"{value!r} is not a value; quote strings with double quotes")


def _parse_date(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise _ConditionError(f"{value!r} is not a date") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _field(row: dict[str, Any], path: str) -> Any:
    value: Any = row
    for part in path.split("/"):
        if not isinstance(value, dict):
            return None
        lowered = {k.lower(): v for k, v in value.items()}
        value = lowered.get(part.lower())
    return value


def _compare(actual: Any, op: str, expected: Any) -> bool:
    if op in ("like", "not like", "contains"):
        if actual is None:
            return op == "not like"
        pattern = f"%{expected}%" if op == "contains" else str(expected)
        regex = "^" + ".*".join(re.escape(part) for part in pattern.split("%")) + "$"
        hit = re.match(regex, str(actual), re.IGNORECASE | re.DOTALL) is not None
        return not hit if op == "not like" else hit
    if expected is None or actual is None:
        return (actual is None) == (expected is None) if op == "=" else (actual is None) != (expected is None)
    if isinstance(expected, datetime):
        actual = _parse_date(str(actual))
    elif isinstance(expected, bool):
        actual = bool(actual)
    elif isinstance(expected, Decimal):
        try:
            actual = Decimal(str(actual))
        except Exception:
            return False
    else:
        actual, expected = str(actual).lower(), str(expected).lower()
    return {
        "=": actual == expected,
        "!=": actual != expected,
        "<": actual < expected,
        "<=": actual <= expected,
        ">": actual > expected,
        ">=": actual >= expected,
    }[op]


def compile_conditions(text: str) -> Callable[[dict[str, Any]], bool]:
    """Parse a ``conditions`` string into a predicate over one record (``or`` binds looser than ``and``)."""
    tokens = _tokens(text)
    pos = 0

    def peek() -> tuple[str, str] | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> tuple[str, str]:
        nonlocal pos
        if pos >= len(tokens):
            raise _ConditionError("conditions end too early")
        pos += 1
        return tokens[pos - 1]

    def keyword(word: str) -> bool:
        token = peek()
        return token is not None and token[0] == "word" and token[1].lower() == word

    def parse_or() -> Callable[[dict[str, Any]], bool]:
        parts = [parse_and()]
        while keyword("or"):
            take()
            parts.append(parse_and())
        return parts[0] if len(parts) == 1 else (lambda row: any(p(row) for p in parts))

    def parse_and() -> Callable[[dict[str, Any]], bool]:
        parts = [parse_term()]
        while keyword("and"):
            take()
            parts.append(parse_term())
        return parts[0] if len(parts) == 1 else (lambda row: all(p(row) for p in parts))

    def parse_term() -> Callable[[dict[str, Any]], bool]:
        kind, value = take()
        if kind == "lp":
            inner = parse_or()
            if take()[0] != "rp":
                raise _ConditionError("a parenthesis is not closed")
            return inner
        if kind != "word":
            raise _ConditionError(f"expected a field name, got {value!r}")
        path = value
        op_kind, op = take()
        if op_kind == "word" and op.lower() == "not" and keyword("like"):
            take()
            op = "not like"
        elif op_kind == "word" and op.lower() in ("like", "contains"):
            op = op.lower()
        elif op_kind != "op":
            raise _ConditionError(f"expected an operator after {path!r}, got {op!r}")
        literal = _literal(*take())
        return lambda row: _compare(_field(row, path), op, literal)

    predicate = parse_or()
    if pos != len(tokens):
        raise _ConditionError(f"unexpected {tokens[pos][1]!r} after a complete condition")
    return predicate


# --- middleware ------------------------------------------------------------------------------


@web.middleware
async def _faults(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    state = request.app[STATE]
    state.requests[f"{request.method} {_route(request)}"] += 1
    if state.cloudflare is not None:
        now = state.monotonic()
        if now < state.cloudflare_blocked_until or state.cloudflare.admit() is not None:
            if now >= state.cloudflare_blocked_until:
                state.cloudflare_blocked_until = now + state.cloudflare_block_seconds
            state.cloudflare_throttled += 1
            return web.Response(status=429, text=_CLOUDFLARE_PAGE, content_type="text/html")  # no Retry-After
    fault = await request.app[FAULTS].inject(request, _fault_body)
    if fault is not None:
        return fault
    if state.window is not None and state.window.admit() is not None:
        # ConnectWise sends no Retry-After that a client can rely on.
        return _error(429, "TooManyRequests", "The API rate limit was exceeded; slow down and try again")
    return await handler(request)


_CLOUDFLARE_PAGE = """<!DOCTYPE html>
<html lang="en-US"><head><title>Access denied | api-na.myconnectwise.net used Cloudflare to restrict access</title></head>
<body><div id="cf-wrapper"><h1><span class="cf-error-type">Error</span> <span class="cf-error-code">1015</span></h1>
<h2 class="cf-subheadline">You are being rate limited</h2>
<p>The owner of this website (api-na.myconnectwise.net) has banned you temporarily from accessing this website.</p>
<p>Cloudflare Ray ID: <strong class="font-semibold">8f0c0ffee0000000</strong></p></div></body></html>
"""


def _fault_body(status: int, message: str) -> dict[str, str]:
    if status == 429:
        return {"code": "TooManyRequests", "message": "The API rate limit was exceeded; slow down and try again"}
    if status == 500:
        return {
            "code": "Unexpected",
            "message": "An unexpected error occurred: Execution Timeout Expired. "
            "The timeout period elapsed prior to completion of the operation.",
        }
    return {"code": "Unexpected", "message": message}


def _route(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else request.path


@web.middleware
async def _auth(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    if request.path.startswith("/login/"):
        return await handler(request)
    state = request.app[STATE]
    client_id = request.headers.get("clientId")
    if not client_id:
        return _error(401, "Unauthorized", "A clientId header is required; register an integration at developer.connectwise.com")
    if client_id not in state.client_ids:
        return _error(401, "Unauthorized", "The clientId is not registered for this server")
    header = request.headers.get("Authorization", "")
    expected = f"{state.company}+{state.public_key}:{state.private_key}"
    try:
        given = base64.b64decode(header[6:]).decode() if header.startswith("Basic ") else ""
    except (ValueError, UnicodeDecodeError):
        given = ""
    if given != expected:
        return _error(401, "Unauthorized", "Authentication failed: company, public key or private key is wrong")
    return await handler(request)


# --- listing ----------------------------------------------------------------------------------


def _page(request: web.Request, rows: list[dict[str, Any]]) -> web.Response:
    try:
        page = int(request.query.get("page", "1"))
        size = min(int(request.query.get("pageSize", "25")), 1000)
    except ValueError:
        return _error(400, "InvalidObject", "page and pageSize must be integers")
    if page < 1 or size < 1:
        return _error(400, "InvalidObject", "page and pageSize must be at least 1")
    conditions = request.query.get("conditions")
    if conditions:
        try:
            predicate = compile_conditions(conditions)
        except _ConditionError as exc:
            return _error(400, "InvalidObject", f"conditions could not be parsed: {exc}")
        rows = [row for row in rows if predicate(row)]
    rows = sorted(rows, key=lambda row: row["id"])
    chunk = rows[(page - 1) * size : page * size]
    last = max(1, -(-len(rows) // size))
    state = request.app[STATE]

    def link(number: int, rel: str) -> str:
        # As ConnectWise writes them: the other parameters first, then pageSize, page last.
        query = [(k, v) for k, v in request.query.items() if k not in ("page", "pageSize")]
        if not state.links_keep_conditions:
            query = [(k, v) for k, v in query if k != "conditions"]
        target = request.url.with_query([*query, ("pageSize", str(size)), ("page", str(number))])
        return f'<{target}>; rel="{rel}"'

    links = []
    if page > 1:
        links += [link(1, "first"), link(page - 1, "prev")]
    if page < last:
        links += [link(page + 1, "next"), link(last, "last")]
    headers = {"Link": ", ".join(links)} if links else {}
    return web.json_response(chunk, headers=headers)


async def company_info(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if unquote(request.match_info["company"]).lower() != state.company.lower():
        return web.json_response(None, status=404)
    return web.json_response(
        {
            "CompanyName": "Simulated MSP",
            "Codebase": state.codebase,
            "VersionCode": "v2025.1",
            "VersionNumber": "v4.6.99999",
            "CompanyID": state.company,
            "IsCloud": True,
            "SiteUrl": request.host,
        }
    )


async def list_companies(request: web.Request) -> web.Response:
    return _page(request, list(request.app[STATE].companies.values()))


async def list_agreements(request: web.Request) -> web.Response:
    return _page(request, list(request.app[STATE].agreements.values()))


async def list_invoices(request: web.Request) -> web.Response:
    return _page(request, list(request.app[STATE].invoices.values()))


async def list_products(request: web.Request) -> web.Response:
    return _page(request, list(request.app[STATE].products.values()))


def _agreement(request: web.Request) -> dict[str, Any] | None:
    try:
        return request.app[STATE].agreements.get(int(request.match_info["agreement_id"]))
    except ValueError:
        return None


async def list_additions(request: web.Request) -> web.Response:
    agreement = _agreement(request)
    if agreement is None:
        return _error(404, "NotFound", f"Agreement recId {request.match_info['agreement_id']} not found")
    rows = [row for row in request.app[STATE].additions.values() if row["agreementId"] == agreement["id"]]
    return _page(request, rows)


# --- creating and changing ---------------------------------------------------------------------


async def _json_object(request: web.Request, resource: str) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise _Invalid(resource, "", "The request body is not valid JSON", "InvalidJson") from None
    if not isinstance(body, dict):
        raise _Invalid(resource, "", "The request body must be a JSON object", "InvalidJson")
    return body


def _number(body: dict[str, Any], name: str, resource: str, *, default: Any = None) -> Decimal:
    value = body.get(name, default)
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _Invalid(resource, name, f"{name} must be a number", "InvalidField")
    try:
        return Decimal(str(value))
    except Exception:
        raise _Invalid(resource, name, f"{name} must be a number", "InvalidField") from None


def _text(body: dict[str, Any], name: str, resource: str, max_length: int) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Invalid(resource, name, f"{name} must be a string", "InvalidField")
    if len(value) > max_length:
        raise _Invalid(resource, name, f"{name} may not be more than {max_length} characters", "MaxLength")
    return value


def _company_ref(state: State, body: dict[str, Any], resource: str) -> dict[str, Any]:
    ref = body.get("company")
    company_id = ref.get("id") if isinstance(ref, dict) else None
    if company_id is None:
        raise _Invalid(resource, "company", "company is required", "NullOrEmpty")
    company = state.companies.get(company_id) if isinstance(company_id, int) else None
    if company is None:
        raise _Invalid(resource, "company", f"company id {company_id} was not found", "InvalidField")
    return {"id": company["id"], "identifier": company["identifier"], "name": company["name"]}


def _catalog_ref(state: State, body: dict[str, Any], name: str, resource: str) -> dict[str, Any]:
    ref = body.get(name)
    identifier = ref.get("identifier") if isinstance(ref, dict) else None
    item = state.catalog.get(identifier) if isinstance(identifier, str) else None
    if item is None and isinstance(ref, dict) and isinstance(ref.get("id"), int):
        item = next((c for c in state.catalog.values() if c["id"] == ref["id"]), None)
    if item is None:
        raise _Invalid(resource, name, f"{name} is required and must name a catalog item", "NullOrEmpty")
    return {"id": item["id"], "identifier": item["identifier"]}


def _money(value: Decimal) -> float:
    return float(value.quantize(Decimal("0.01"), ROUND_HALF_UP))


def _recalculate(state: State, invoice_id: int) -> None:
    invoice = state.invoices[invoice_id]
    total = sum(
        (Decimal(str(p["quantity"])) * Decimal(str(p["price"])) for p in state.products.values()
         if (p.get("invoice") or {}).get("id") == invoice_id),
        Decimal(0),
    )
    invoice["subtotal"] = invoice["total"] = invoice["productTotal"] = _money(total)
    invoice["balance"] = _money(total)


_INVOICE_TYPES = {"Standard", "Agreement", "CreditMemo", "DownPayment", "Miscellaneous", "Progress"}


async def create_invoice(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        body = await _json_object(request, "invoice")
        if body.get("type") not in _INVOICE_TYPES:
            raise _Invalid("invoice", "type", f"type must be one of {', '.join(sorted(_INVOICE_TYPES))}", "InvalidField")
        company = _company_ref(state, body, "invoice")
        reference = _text(body, "reference", "invoice", 50)
        customer_po = _text(body, "customerPO", "invoice", 50)
        notes = _text(body, "internalNotes", "invoice", 4000)
        for name in ("date", "dueDate"):
            if body.get(name) is not None:
                try:
                    _parse_date(str(body[name]))
                except _ConditionError:
                    raise _Invalid("invoice", name, f"{name} must be a date", "InvalidField") from None
    except _Invalid as exc:
        return _invalid(exc)
    invoice_id = state.next_id("invoice")
    invoice = {
        "id": invoice_id,
        "invoiceNumber": f"{invoice_id:06d}",
        "type": body["type"],
        "status": {"id": 1, "name": "New"},
        "company": company,
        "billToCompany": company,
        "applyToType": body.get("applyToType", "All"),
        "reference": reference,
        "customerPO": customer_po,
        "date": body.get("date") or _now(),
        "dueDate": body.get("dueDate"),
        "internalNotes": notes,
        "subtotal": 0.0,
        "total": 0.0,
        "productTotal": 0.0,
        "balance": 0.0,
        "_info": {"lastUpdated": _now()},
    }
    state.invoices[invoice_id] = invoice
    return web.json_response(invoice, status=201)


async def create_product(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        body = await _json_object(request, "productItem")
        catalog = _catalog_ref(state, body, "catalogItem", "productItem")
        if body.get("billableOption") not in ("Billable", "DoNotBill", "NoCharge"):
            raise _Invalid("productItem", "billableOption", "billableOption is required", "NullOrEmpty")
        quantity = _number(body, "quantity", "productItem", default=1)
        price = _number(body, "price", "productItem", default=0)
        description = _text(body, "description", "productItem", 2000)
        invoice_ref = body.get("invoice")
        invoice_id = invoice_ref.get("id") if isinstance(invoice_ref, dict) else None
        if invoice_id is not None and invoice_id not in state.invoices:
            raise _Invalid("productItem", "invoice", f"invoice id {invoice_id} was not found", "InvalidField")
        company = _company_ref(state, body, "productItem") if body.get("company") else None
    except _Invalid as exc:
        return _invalid(exc)
    product_id = state.next_id("product")
    product = {
        "id": product_id,
        "catalogItem": catalog,
        "billableOption": body["billableOption"],
        "description": description,
        "quantity": float(quantity),
        "price": float(price),
        "extPrice": _money(quantity * price),
        "sequenceNumber": body.get("sequenceNumber"),
        "company": company,
        "invoice": {"id": invoice_id, "identifier": state.invoices[invoice_id]["invoiceNumber"]} if invoice_id else None,
    }
    state.products[product_id] = product
    if invoice_id:
        _recalculate(state, invoice_id)
    return web.json_response(product, status=201)


def _addition_fields(state: State, body: dict[str, Any], addition: dict[str, Any]) -> None:
    if "quantity" in body:
        quantity = _number(body, "quantity", "agreementAddition")
        if quantity < 0:
            raise _Invalid("agreementAddition", "quantity", "quantity may not be negative", "InvalidField")
        addition["quantity"] = float(quantity)
    if "unitPrice" in body:
        addition["unitPrice"] = float(_number(body, "unitPrice", "agreementAddition"))
    if "invoiceDescription" in body:
        addition["invoiceDescription"] = _text(body, "invoiceDescription", "agreementAddition", 6000)
    if "effectiveDate" in body and body["effectiveDate"] is not None:
        try:
            _parse_date(str(body["effectiveDate"]))
        except _ConditionError:
            raise _Invalid("agreementAddition", "effectiveDate", "effectiveDate must be a date", "InvalidField") from None
        addition["effectiveDate"] = body["effectiveDate"]
    if "cancelledDate" in body:
        addition["cancelledDate"] = body["cancelledDate"]
    addition["extPrice"] = _money(Decimal(str(addition["quantity"])) * Decimal(str(addition["unitPrice"])))


async def create_addition(request: web.Request) -> web.Response:
    state = request.app[STATE]
    agreement = _agreement(request)
    if agreement is None:
        return _error(404, "NotFound", f"Agreement recId {request.match_info['agreement_id']} not found")
    try:
        body = await _json_object(request, "agreementAddition")
        product = _catalog_ref(state, body, "product", "agreementAddition")
        if body.get("billCustomer") not in ("Billable", "DoNotBill", "NoCharge"):
            raise _Invalid("agreementAddition", "billCustomer", "billCustomer is required", "NullOrEmpty")
        addition: dict[str, Any] = {
            "id": 0,
            "product": product,
            "billCustomer": body["billCustomer"],
            "quantity": 0.0,
            "unitPrice": 0.0,
            "effectiveDate": None,
            "cancelledDate": None,
            "invoiceDescription": None,
            "agreementId": agreement["id"],
        }
        _addition_fields(state, body, addition)
    except _Invalid as exc:
        return _invalid(exc)
    addition["id"] = state.next_id("addition")
    state.additions[addition["id"]] = addition
    return web.json_response(addition, status=201)


_PATCHABLE = {"quantity", "unitPrice", "invoiceDescription", "effectiveDate", "cancelledDate"}


async def patch_addition(request: web.Request) -> web.Response:
    state = request.app[STATE]
    agreement = _agreement(request)
    try:
        addition_id = int(request.match_info["addition_id"])
    except ValueError:
        addition_id = -1
    addition = state.additions.get(addition_id)
    if agreement is None or addition is None or addition["agreementId"] != agreement["id"]:
        return _error(404, "NotFound", f"AgreementAddition recId {request.match_info['addition_id']} not found")
    try:
        operations = await request.json()
    except ValueError:
        return _error(400, "InvalidObject", "The request body is not valid JSON")
    if not isinstance(operations, list) or not operations:
        return _error(
            400, "InvalidObject", 'The body must be a JSON Patch array, e.g. [{"op": "replace", "path": "quantity", "value": 5}]'
        )
    changes: dict[str, Any] = {}
    for operation in operations:
        if not isinstance(operation, dict) or operation.get("op") != "replace" or "value" not in operation:
            return _error(400, "InvalidObject", "Each operation needs op \"replace\", a path and a value")
        path = str(operation.get("path", "")).strip("/")
        if path not in _PATCHABLE:
            return _invalid(_Invalid("agreementAddition", path, f"{path!r} cannot be patched", "InvalidField"))
        changes[path] = operation["value"]
    updated = dict(addition)
    try:
        _addition_fields(state, changes, updated)
    except _Invalid as exc:
        return _invalid(exc)
    state.additions[addition_id] = updated  # all operations apply, or none
    return web.json_response(updated)


async def get_invoice(request: web.Request) -> web.Response:
    invoice = request.app[STATE].invoices.get(_int(request.match_info["invoice_id"]))
    if invoice is None:
        return _error(404, "NotFound", f"Invoice recId {request.match_info['invoice_id']} not found")
    return web.json_response(invoice)


async def delete_invoice(request: web.Request) -> web.Response:
    state = request.app[STATE]
    invoice_id = _int(request.match_info["invoice_id"])
    if invoice_id not in state.invoices:
        return _error(404, "NotFound", f"Invoice recId {request.match_info['invoice_id']} not found")
    del state.invoices[invoice_id]
    for product_id in [k for k, p in state.products.items() if (p.get("invoice") or {}).get("id") == invoice_id]:
        del state.products[product_id]
    return web.Response(status=204)


async def delete_product(request: web.Request) -> web.Response:
    state = request.app[STATE]
    product = state.products.pop(_int(request.match_info["product_id"]), None)
    if product is None:
        return _error(404, "NotFound", f"ProductItem recId {request.match_info['product_id']} not found")
    if product.get("invoice") and product["invoice"]["id"] in state.invoices:
        _recalculate(state, product["invoice"]["id"])
    return web.Response(status=204)


async def delete_addition(request: web.Request) -> web.Response:
    state = request.app[STATE]
    agreement = _agreement(request)
    addition = state.additions.get(_int(request.match_info["addition_id"]))
    if agreement is None or addition is None or addition["agreementId"] != agreement["id"]:
        return _error(404, "NotFound", f"AgreementAddition recId {request.match_info['addition_id']} not found")
    del state.additions[addition["id"]]
    return web.Response(status=204)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return -1


# --- the application -------------------------------------------------------------------------


def create_app(
    *,
    companies: int = 25,
    agreements: int | None = None,
    seed_value: int = 1,
    company: str = "simmsp",
    public_key: str = "sim-public",
    private_key: str = "sim-private",
    client_id: str = "sim-client-id",
    codebase: str = "v4_6_release/",
    rate_limit: tuple[int, float] | None = None,
    links_keep_conditions: bool = True,
    cloudflare: tuple[int, float] | None = None,
    cloudflare_block_seconds: float = 60.0,
    monotonic: Callable[[], float] = time.monotonic,
) -> web.Application:
    """The fake ConnectWise; ``rate_limit=(requests, per_seconds)`` turns on throttling with 429s.

    ``cloudflare=(requests, per_seconds)`` puts a Cloudflare-style rate-limiting rule in front:
    past it, every request is answered 429 with Cloudflare's HTML page (error 1015) and no
    ``Retry-After`` for ``cloudflare_block_seconds``. ``links_keep_conditions=False`` makes the
    ``Link`` header drop ``conditions``. ``monotonic`` may be a test's virtual time.
    """
    state = State(
        company=company,
        public_key=public_key,
        private_key=private_key,
        client_ids={client_id},
        codebase=codebase,
        window=RequestWindow(*rate_limit, monotonic=monotonic) if rate_limit else None,
        links_keep_conditions=links_keep_conditions,
        cloudflare=RequestWindow(*cloudflare, monotonic=monotonic) if cloudflare else None,
        cloudflare_block_seconds=cloudflare_block_seconds,
        monotonic=monotonic,
    )
    seed(state, companies=companies, agreements=agreements, seed_value=seed_value)
    app = web.Application(middlewares=[_faults, _auth])
    app[STATE] = state
    app[FAULTS] = Faults()
    prefix = API_PREFIX.format(codebase=codebase.strip("/"))
    app.router.add_get("/login/companyinfo/{company}", company_info)
    app.router.add_get(f"{prefix}/company/companies", list_companies)
    app.router.add_get(f"{prefix}/finance/agreements", list_agreements)
    app.router.add_get(f"{prefix}/finance/agreements/{{agreement_id}}/additions", list_additions)
    app.router.add_post(f"{prefix}/finance/agreements/{{agreement_id}}/additions", create_addition)
    app.router.add_patch(f"{prefix}/finance/agreements/{{agreement_id}}/additions/{{addition_id}}", patch_addition)
    app.router.add_delete(f"{prefix}/finance/agreements/{{agreement_id}}/additions/{{addition_id}}", delete_addition)
    app.router.add_get(f"{prefix}/finance/invoices", list_invoices)
    app.router.add_post(f"{prefix}/finance/invoices", create_invoice)
    app.router.add_get(f"{prefix}/finance/invoices/{{invoice_id}}", get_invoice)
    app.router.add_delete(f"{prefix}/finance/invoices/{{invoice_id}}", delete_invoice)
    app.router.add_get(f"{prefix}/procurement/products", list_products)
    app.router.add_post(f"{prefix}/procurement/products", create_product)
    app.router.add_delete(f"{prefix}/procurement/products/{{product_id}}", delete_product)
    return app

"""A faithful fake of the Autotask PSA REST API v1.0, for tests, benchmarks and the demo.

What it reproduces, and where that behaviour is described:

- Zone look-up ``GET /atservicesrest/v1.0/zoneInformation?user=…`` answering ``{"url": "<zone>/atservicesrest/"}``
  (here: the simulator's own loopback URL), then header auth on every call (``ApiIntegrationCode``, ``UserName``,
  ``Secret``). Sources: https://ww1.autotask.net/help/DeveloperHelp/Content/APIs/SOAP/APICalls/GetZoneInfoCall.htm ,
  https://docs.nango.dev/integrations/all/autotask/connect
- Queries ``POST /{Entity}/query`` with ``{"filter": [{"op", "field", "value"}…], "MaxRecords": n}`` (n ≤ 500;
  ops eq, noteq, gt, gte, lt, lte, beginsWith, endsWith, contains, exist, notExist, in, notIn, and and/or
  groups; field names case-insensitive), answered ``{"items": […], "pageDetails": {"count", "requestCount",
  "prevPageUrl", "nextPageUrl"}}`` with ``nextPageUrl`` a GET-able URL. Sources:
  https://ww1.autotask.net/help/DeveloperHelp/Content/APIs/REST/API_Calls/REST_Basic_Query_Calls.htm ,
  https://autotask.net/help/developerhelp/content/apis/REST/API_Calls/REST_Advanced_Query_Features.htm
- Creates answer ``{"itemId": N}``; child entities are created under their parent
  (``POST /Contracts/{id}/Charges``, ``PATCH /Contracts/{id}/Services``); ``ContractServiceAdjustments`` are
  create-only (no query) and create the contract service when it is missing; ``ContractServiceUnits`` are
  read-only, one per billing period, split at an adjustment's effective date; ``ContractCharges`` need a
  ``billingCodeID`` or ``productID``, are refused on block/retainer/incident contracts and can be deleted
  until billed (``DELETE /Contracts/{id}/Charges/{chargeId}``); ``Invoices`` can
  be queried but not created. Sources:
  https://www.autotask.net/help/developerhelp/Content/APIs/REST/Entities/ContractServiceAdjustmentsEntity.htm ,
  https://ww1.autotask.net/help/DeveloperHelp/Content/APIs/REST/Entities/ContractServiceUnitsEntity.htm ,
  https://autotask.net/help/developerhelp/Content/APIs/REST/Entities/ContractChargesEntity.htm ,
  https://ww1.autotask.net/help/DeveloperHelp/Content/APIs/REST/Entities/InvoicesEntity.htm
- Errors as ``{"errors": ["…"]}`` (https://github.com/apigrate/autotask-restapi/issues/19). Real Autotask
  answers an unknown user name or integration code with HTTP 500 and some business-rule violations with 500
  too; the simulator answers 401 for every credential problem and 400 for validation, which is what a client
  must treat them as.
- Limits: 10,000 requests per rolling hour per database, shared by every integration, and 3 simultaneous
  requests per (integration code, object endpoint); zoneInformation is exempt from the thread limit. A breach
  is answered 429. Both numbers are constructor arguments so tests and benchmarks can set them low. Sources:
  https://ww1.autotask.net/help/DeveloperHelp/Content/APIs/General/ThreadLimiting.htm ,
  https://ww1.autotask.net/help/DeveloperHelp/Content/APIs/REST/General_Topics/REST_Thresholds_Limits.htm

Test hooks: ``app[STATE]`` (``companies``, ``contracts``, ``contract_services``, ``adjustments``,
``charges``, ``units_on(cs_id, day)``, ``requests``, ``throttled``, ``peak_threads``); ``app[FAULTS]``
(a :class:`gateway.simulators.Faults`) plans 429s (with or without Retry-After), 5xx, slow answers
and dropped connections at run time.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from aiohttp import web

from gateway.simulators import Faults, RequestWindow, company_names

ROOT = "/atservicesrest/v1.0"


# --- state -------------------------------------------------------------------------------


@dataclass
class State:
    """Everything the fake Autotask database holds; tests read and change it directly."""

    username: str
    secret: str
    integration_code: str
    hourly_limit: int = 10_000
    window_seconds: float = 3600.0
    thread_limit: int = 3
    latency: float = 0.0
    companies: dict[int, dict[str, Any]] = field(default_factory=dict)
    contracts: dict[int, dict[str, Any]] = field(default_factory=dict)
    services: dict[int, dict[str, Any]] = field(default_factory=dict)
    billing_codes: dict[int, dict[str, Any]] = field(default_factory=dict)
    contract_services: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: per contract service: (effective date, unit change, unit price from then on or None)
    service_events: dict[int, list[tuple[date, int, Decimal | None]]] = field(default_factory=dict)
    adjustments: list[dict[str, Any]] = field(default_factory=list)
    charges: dict[int, dict[str, Any]] = field(default_factory=dict)
    invoices: dict[int, dict[str, Any]] = field(default_factory=dict)
    requests: Counter[str] = field(default_factory=Counter)
    throttled: int = 0
    peak_threads: int = 0
    window: RequestWindow | None = None
    _threads: Counter[tuple[str, str]] = field(default_factory=Counter)
    _ids: Counter[str] = field(default_factory=Counter)

    def next_id(self, kind: str, start: int) -> int:
        self._ids[kind] += 1
        return start + self._ids[kind]

    def units_on(self, contract_service_id: int, day: date) -> int:
        return sum(change for when, change, _ in self.service_events.get(contract_service_id, []) if when <= day)

    def price_on(self, contract_service_id: int, day: date) -> Decimal:
        price = Decimal(str(self.contract_services[contract_service_id]["unitPrice"]))
        for when, _, new_price in sorted(self.service_events.get(contract_service_id, []), key=lambda e: e[0]):
            if when <= day and new_price is not None:
                price = new_price
        return price


STATE = web.AppKey("autotask_state", State)
FAULTS = web.AppKey("autotask_faults", Faults)

CONTRACT_START = date(2025, 1, 1)
CONTRACT_END = date(2027, 12, 31)


def _iso(day: date) -> str:
    return f"{day.isoformat()}T00:00:00"


def seed(state: State, *, companies: int, contracts: int | None, seed_value: int) -> None:
    """Deterministic companies; the first ``contracts`` get an active recurring service contract.

    Every other contract already has service 1 with a few units; the rest have none, so the
    adjustment has to create the contract service (as Autotask does).
    """
    rng = random.Random(seed_value)
    state.services[1] = {"id": 1, "name": "Managed Device", "unitPrice": 2.5, "isActive": True}
    state.services[2] = {"id": 2, "name": "Cloud Backup", "unitPrice": 4.0, "isActive": True}
    state.billing_codes[2001] = {"id": 2001, "name": "Managed Services", "useType": 3, "isActive": True}
    with_contract = companies if contracts is None else contracts
    for n, name in enumerate(company_names(rng, companies), start=1):
        cid = state.next_id("company", 100)
        state.companies[cid] = {
            "id": cid,
            "companyName": name,
            "companyType": 1,
            "isActive": True,
        }
        if n > with_contract:
            continue
        contract_id = state.next_id("contract", 29684000)
        state.contracts[contract_id] = {
            "id": contract_id,
            "companyID": cid,
            "contractName": "Managed Services",
            "contractType": 7,
            "status": 1,
            "startDate": _iso(CONTRACT_START),
            "endDate": _iso(CONTRACT_END),
        }
        if n % 2 == 1:
            cs_id = state.next_id("contract_service", 5000)
            state.contract_services[cs_id] = _contract_service(cs_id, contract_id, 1, Decimal("2.5"))
            state.service_events[cs_id] = [(CONTRACT_START, rng.randint(1, 20), None)]


def _contract_service(cs_id: int, contract_id: int, service_id: int, price: Decimal) -> dict[str, Any]:
    return {
        "id": cs_id,
        "contractID": contract_id,
        "serviceID": service_id,
        "unitPrice": float(price),
        "adjustedPrice": float(price),
        "internalDescription": None,
        "invoiceDescription": None,
    }


def _months(start: date, end: date) -> Iterable[tuple[date, date]]:
    first = start
    while first <= end:
        following = date(first.year + (first.month // 12), first.month % 12 + 1, 1)
        yield first, min(following - timedelta(days=1), end)
        first = following


def service_units(state: State) -> list[dict[str, Any]]:
    """ContractServiceUnits as Autotask derives them: per billing period, split at adjustments."""
    rows = []
    for cs_id, service in state.contract_services.items():
        contract = state.contracts[service["contractID"]]
        start, end = date.fromisoformat(contract["startDate"][:10]), date.fromisoformat(contract["endDate"][:10])
        changes = sorted({when for when, _, _ in state.service_events.get(cs_id, [])})
        sequence = 0
        for period_start, period_end in _months(start, end):
            cuts = [period_start] + [d for d in changes if period_start < d <= period_end]
            for index, segment_start in enumerate(cuts):
                segment_end = cuts[index + 1] - timedelta(days=1) if index + 1 < len(cuts) else period_end
                sequence += 1
                rows.append(
                    {
                        "id": cs_id * 10_000 + sequence,
                        "contractID": contract["id"],
                        "contractServiceID": cs_id,
                        "serviceID": service["serviceID"],
                        "startDate": _iso(segment_start),
                        "endDate": _iso(segment_end),
                        "units": state.units_on(cs_id, segment_start),
                        "price": float(state.price_on(cs_id, segment_start)),
                        "cost": 0.0,
                        "approveAndPostDate": None,
                    }
                )
    return rows


# --- errors --------------------------------------------------------------------------------


def _errors(status: int, *messages: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"errors": list(messages)}, status=status, headers=headers)


class _Invalid(Exception):
    pass


# --- filters ----------------------------------------------------------------------------------


def _lookup(item: dict[str, Any], name: object) -> tuple[bool, Any]:
    for key, value in item.items():
        if key.lower() == str(name).lower():
            return True, value
    return False, None


def _coerce(actual: Any, expected: Any) -> tuple[Any, Any]:
    if isinstance(expected, bool) or isinstance(actual, bool):
        return bool(actual), bool(expected)
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        try:
            return Decimal(str(actual)), Decimal(str(expected))
        except Exception:
            raise _Invalid(f"{actual!r} cannot be compared with the number {expected!r}") from None
    if isinstance(expected, str) and isinstance(actual, str) and len(expected) >= 10 and expected[4:5] == "-":
        try:
            return datetime.fromisoformat(actual.replace("Z", "")), datetime.fromisoformat(expected.replace("Z", ""))
        except ValueError:
            pass
    return str(actual).lower(), str(expected).lower()


def matches(item: dict[str, Any], condition: Any, entity: str) -> bool:
    """Evaluate one Autotask filter expression (or and/or group) against an item."""
    if not isinstance(condition, dict):
        raise _Invalid("Each filter must be an object with op, field and value")
    op = str(condition.get("op", "")).lower()
    if op in ("and", "or"):
        items = condition.get("items")
        if not isinstance(items, list) or not items:
            raise _Invalid(f"A grouping with op {op!r} needs a non-empty items list")
        results = (matches(item, sub, entity) for sub in items)
        return all(results) if op == "and" else any(results)
    name = condition.get("field")
    present, actual = _lookup(item, name)
    if not present:
        raise _Invalid(f"Unable to find field {name} in the {entity} Entity.")
    value = condition.get("value")
    if op == "exist":
        return actual not in (None, "")
    if op == "notexist":
        return actual in (None, "")
    if op in ("in", "notin"):
        if not isinstance(value, list):
            raise _Invalid(f"The {op} operator needs a list value")
        hit = any(_coerce(actual, v)[0] == _coerce(actual, v)[1] for v in value)
        return hit if op == "in" else not hit
    if actual is None:
        return op == "noteq"
    if op in ("beginswith", "endswith", "contains"):
        text, needle = str(actual).lower(), str(value).lower()
        return {"beginswith": text.startswith, "endswith": text.endswith, "contains": text.__contains__}[op](needle)
    if op not in ("eq", "noteq", "gt", "gte", "lt", "lte"):
        raise _Invalid(f"Unknown filter operator {condition.get('op')!r}")
    left, right = _coerce(actual, value)
    return {
        "eq": left == right,
        "noteq": left != right,
        "gt": left > right,
        "gte": left >= right,
        "lt": left < right,
        "lte": left <= right,
    }[op]


# --- middleware --------------------------------------------------------------------------------


def _entity_of(request: web.Request) -> str:
    parts = request.path.split("/")
    return parts[3].lower() if len(parts) > 3 else ""


@web.middleware
async def _faults(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    state = request.app[STATE]
    route = request.match_info.route.resource
    state.requests[f"{request.method} {route.canonical if route is not None else request.path}"] += 1
    fault = await request.app[FAULTS].inject(request, lambda status, message: {"errors": [message]})
    return fault if fault is not None else await handler(request)


@web.middleware
async def _auth_and_limits(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    state = request.app[STATE]
    if _entity_of(request) == "zoneinformation":
        return await handler(request)
    headers = request.headers
    if (
        headers.get("ApiIntegrationCode") != state.integration_code
        or str(headers.get("UserName", "")).lower() != state.username.lower()
        or headers.get("Secret") != state.secret
    ):
        return _errors(401, "Unauthorized: the UserName, Secret or ApiIntegrationCode is not valid.")
    assert state.window is not None
    if state.window.count() >= state.hourly_limit:
        state.throttled += 1
        return _errors(
            429,
            f"Request threshold of {state.hourly_limit} requests per {state.window_seconds:g} seconds exceeded for "
            "this database; API access is suspended until usage drops.",
        )
    slot = (state.integration_code, _entity_of(request))
    if state._threads[slot] >= state.thread_limit:
        state.throttled += 1
        return _errors(
            429, f"Thread threshold of {state.thread_limit} concurrent requests for endpoint {slot[1]} exceeded."
        )
    state.window.admit()
    state._threads[slot] += 1
    state.peak_threads = max(state.peak_threads, state._threads[slot])
    try:
        if state.latency:
            await asyncio.sleep(state.latency)
        return await handler(request)
    finally:
        state._threads[slot] -= 1


# --- zone ---------------------------------------------------------------------------------------


async def zone_information(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if request.query.get("user", "").lower() != state.username.lower():
        return _errors(404, "Zone information could not be determined for that user.")
    base = f"{request.scheme}://{request.host}"
    return web.json_response({"zoneName": "Simulator", "url": f"{base}/atservicesrest/", "webUrl": f"{base}/", "ci": 1})


# --- queries ------------------------------------------------------------------------------------

_ENTITIES: dict[str, tuple[str, Callable[[State], Iterable[dict[str, Any]]]]] = {
    "companies": ("Companies", lambda s: s.companies.values()),
    "contracts": ("Contracts", lambda s: s.contracts.values()),
    "services": ("Services", lambda s: s.services.values()),
    "contractservices": ("ContractServices", lambda s: s.contract_services.values()),
    "contractserviceunits": ("ContractServiceUnits", service_units),
    "contractcharges": ("ContractCharges", lambda s: s.charges.values()),
    "invoices": ("Invoices", lambda s: s.invoices.values()),
}


def _run_query(request: web.Request, entity_key: str, search: dict[str, Any], after: int) -> web.Response:
    state = request.app[STATE]
    if entity_key not in _ENTITIES:
        return _errors(404, f"The entity {request.match_info['entity']} does not support query.")
    entity, rows = _ENTITIES[entity_key]
    filters = search.get("filter")
    max_records = search.get("MaxRecords", search.get("maxRecords", 500))
    if not isinstance(filters, list) or not filters:
        return _errors(400, "A query needs a filter; to get everything use {\"op\": \"gte\", \"field\": \"id\", \"value\": 0}.")
    if not isinstance(max_records, int) or not 1 <= max_records <= 500:
        return _errors(400, "MaxRecords must be a whole number between 1 and 500.")
    try:
        found = [row for row in rows(state) if all(matches(row, f, entity) for f in filters)]
    except _Invalid as exc:
        return _errors(400, str(exc))
    found = sorted((row for row in found if row["id"] > after), key=lambda row: row["id"])
    page, more = found[:max_records], len(found) > max_records
    next_url = None
    if more:
        token = base64.urlsafe_b64encode(
            json.dumps({"filter": filters, "MaxRecords": max_records, "after": page[-1]["id"]}).encode()
        ).decode()
        next_url = f"{request.scheme}://{request.host}{ROOT}/{entity}/query/next?paging={token}"
    return web.json_response(
        {
            "items": page,
            "pageDetails": {"count": len(page), "requestCount": max_records, "prevPageUrl": None, "nextPageUrl": next_url},
        }
    )


async def query(request: web.Request) -> web.Response:
    try:
        search = await request.json()
    except ValueError:
        return _errors(400, "The query body is not valid JSON.")
    if not isinstance(search, dict):
        return _errors(400, "The query body must be a JSON object.")
    return _run_query(request, request.match_info["entity"].lower(), search, after=-1)


async def query_next(request: web.Request) -> web.Response:
    try:
        paging = json.loads(base64.urlsafe_b64decode(request.query["paging"]))
        after = int(paging.pop("after"))
    except (KeyError, ValueError, TypeError):
        return _errors(400, "The paging token is not valid.")
    return _run_query(request, request.match_info["entity"].lower(), paging, after=after)


# --- creates and updates -------------------------------------------------------------------------


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise _Invalid("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise _Invalid("The request body must be a JSON object.")
    return body


def _required(body: dict[str, Any], name: str) -> Any:
    present, value = _lookup(body, name)
    if not present or value in (None, ""):
        raise _Invalid(f"Missing Required Field: {name}")
    return value


def _optional(body: dict[str, Any], name: str, default: Any = None) -> Any:
    present, value = _lookup(body, name)
    return value if present and value is not None else default


def _decimal(value: Any, name: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _Invalid(f"The value for {name} is not a number.")
    try:
        return Decimal(str(value))
    except Exception:
        raise _Invalid(f"The value for {name} is not a number.") from None


def _date(value: Any, name: str) -> date:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "")).date()
    except ValueError:
        raise _Invalid(f"The value for {name} is not a date.") from None


def _text(body: dict[str, Any], name: str, limit: int) -> str | None:
    value = _optional(body, name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Invalid(f"The value for {name} must be a string.")
    if len(value) > limit:
        raise _Invalid(f"The value for {name} exceeds the maximum length of {limit}.")
    return value


def _contract(state: State, contract_id: Any) -> dict[str, Any]:
    contract = state.contracts.get(contract_id) if isinstance(contract_id, int) else None
    if contract is None:
        raise _Invalid(f"Contract {contract_id} does not exist or is not visible to this resource.")
    return contract


async def create_adjustment(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        body = await _body(request)
        contract = _contract(state, _required(body, "contractID"))
        if contract["contractType"] != 7:
            raise _Invalid("Service adjustments can only be made to Recurring Service contracts.")
        service_id = _required(body, "serviceID")
        if service_id not in state.services:
            raise _Invalid(f"Service {service_id} does not exist.")
        effective = _date(_required(body, "effectiveDate"), "effectiveDate")
        change = _required(body, "unitChange")
        if not isinstance(change, int) or isinstance(change, bool):
            raise _Invalid("The value for unitChange must be a whole number.")
        price = _optional(body, "adjustedUnitPrice")
        price = _decimal(price, "adjustedUnitPrice") if price is not None else None
    except _Invalid as exc:
        return _errors(400, str(exc))
    cs = next(
        (s for s in state.contract_services.values() if s["contractID"] == contract["id"] and s["serviceID"] == service_id),
        None,
    )
    if cs is None:  # Autotask creates the contract service the adjustment is for
        cs_id = state.next_id("contract_service", 5000)
        cs = _contract_service(cs_id, contract["id"], service_id, Decimal(str(state.services[service_id]["unitPrice"])))
        state.contract_services[cs_id] = cs
        state.service_events[cs_id] = []
    events = state.service_events[cs["id"]]
    if state.units_on(cs["id"], effective) + change < 0 or any(
        state.units_on(cs["id"], when) + change < 0 for when, _, _ in events if when > effective
    ):
        return _errors(400, "The adjustment would make the number of units negative.")
    events.append((effective, change, price))
    adjustment_id = state.next_id("adjustment", 0)
    state.adjustments.append(
        {"id": adjustment_id, "contractID": contract["id"], "contractServiceID": cs["id"], "serviceID": service_id,
         "effectiveDate": _iso(effective), "unitChange": change, "adjustedUnitPrice": float(price) if price else None}
    )
    return web.json_response({"itemId": adjustment_id})


async def create_charge(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        contract = _contract(state, _parent_id(request))
        body = await _body(request)
        if _optional(body, "contractID", contract["id"]) != contract["id"]:
            raise _Invalid("contractID does not match the parent contract in the URL.")
        if contract["contractType"] in (4, 6, 8):
            raise _Invalid("Charges cannot be added to Block Hour, Retainer or Per Ticket contracts.")
        name = _text(body, "name", 100)
        if not name:
            raise _Invalid("Missing Required Field: name")
        billing_code = _optional(body, "billingCodeID")
        product = _optional(body, "productID")
        if billing_code is None and product is None:
            raise _Invalid("A ContractCharge must have either a productID or a billingCodeID.")
        if billing_code is not None and billing_code not in state.billing_codes:
            raise _Invalid(f"billingCodeID {billing_code} does not exist.")
        quantity = _decimal(_required(body, "unitQuantity"), "unitQuantity")
        price = _decimal(_optional(body, "unitPrice", 0), "unitPrice")
        purchased = _date(_required(body, "datePurchased"), "datePurchased")
        description = _text(body, "description", 2000)
        internal_po = _text(body, "internalPurchaseOrderNumber", 50)
        po = _text(body, "purchaseOrderNumber", 50)
    except _Invalid as exc:
        return _errors(400, str(exc))
    # Autotask rounds units, cost and price to four places and the amount to two.
    quantity, price = quantity.quantize(Decimal("0.0001")), price.quantize(Decimal("0.0001"))
    charge_id = state.next_id("charge", 700_000)
    state.charges[charge_id] = {
        "id": charge_id,
        "contractID": contract["id"],
        "name": name,
        "description": description,
        "unitQuantity": float(quantity),
        "unitPrice": float(price),
        "unitCost": float(_decimal(_optional(body, "unitCost", 0), "unitCost")),
        "billableAmount": float((quantity * price).quantize(Decimal("0.01"), ROUND_HALF_UP)),
        "datePurchased": _iso(purchased),
        "billingCodeID": billing_code,
        "productID": product,
        "isBillableToCompany": bool(_optional(body, "isBillableToCompany", True)),
        "isBilled": False,
        "status": 1,
        "internalPurchaseOrderNumber": internal_po,
        "purchaseOrderNumber": po,
    }
    return web.json_response({"itemId": charge_id})


_SERVICE_UPDATABLE = {"internaldescription": "internalDescription", "invoicedescription": "invoiceDescription"}


async def update_contract_service(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        contract = _contract(state, _parent_id(request))
        body = await _body(request)
        cs = state.contract_services.get(_required(body, "id"))
        if cs is None or cs["contractID"] != contract["id"]:
            raise _Invalid(f"ContractService {body.get('id')} does not exist on contract {contract['id']}.")
        changes = {}
        for name in body:
            if name.lower() == "id":
                continue
            if name.lower() not in _SERVICE_UPDATABLE:
                raise _Invalid(f"The field {name} cannot be updated.")
            canonical = _SERVICE_UPDATABLE[name.lower()]
            changes[canonical] = _text(body, name, 2000)
    except _Invalid as exc:
        return _errors(400, str(exc))
    cs.update(changes)
    return web.json_response({"itemId": cs["id"]})


async def delete_charge(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        contract = _contract(state, _parent_id(request))
        charge_id = int(request.match_info["charge_id"])
    except (_Invalid, ValueError) as exc:
        return _errors(400, str(exc))
    charge = state.charges.get(charge_id)
    if charge is None or charge["contractID"] != contract["id"]:
        return _errors(404, f"ContractCharge {charge_id} does not exist on contract {contract['id']}.")
    if charge["isBilled"]:
        return _errors(400, "A ContractCharge that has been billed cannot be deleted.")
    del state.charges[charge_id]
    return web.json_response({"itemId": charge_id})


async def create_invoice(request: web.Request) -> web.Response:
    return _errors(405, "The Invoices entity does not support create; invoices are generated in Autotask from billing items.")


def _parent_id(request: web.Request) -> int:
    try:
        return int(request.match_info["parent_id"])
    except ValueError:
        raise _Invalid(f"{request.match_info['parent_id']!r} is not a valid parent id.") from None


# --- the application ---------------------------------------------------------------------------


def create_app(
    *,
    companies: int = 25,
    contracts: int | None = None,
    seed_value: int = 1,
    username: str = "api-user@sim.example",
    secret: str = "sim-secret",
    integration_code: str = "SIMINTEGRATIONCODE000000001",
    hourly_limit: int = 10_000,
    window_seconds: float = 3600.0,
    thread_limit: int = 3,
    latency: float = 0.0,
) -> web.Application:
    """The fake Autotask database; limits default to Autotask's own (10,000/hour, 3 threads per endpoint)."""
    state = State(
        username=username,
        secret=secret,
        integration_code=integration_code,
        hourly_limit=hourly_limit,
        window_seconds=window_seconds,
        thread_limit=thread_limit,
        latency=latency,
        window=RequestWindow(hourly_limit, window_seconds),
    )
    seed(state, companies=companies, contracts=contracts, seed_value=seed_value)
    app = web.Application(middlewares=[_faults, _auth_and_limits])
    app[STATE] = state
    app[FAULTS] = Faults()
    for root in (ROOT, ROOT.replace("v1.0", "V1.0")):
        app.router.add_get(f"{root}/zoneInformation", zone_information)
        app.router.add_post(f"{root}/ContractServiceAdjustments", create_adjustment)
        app.router.add_post(f"{root}/Contracts/{{parent_id}}/Charges", create_charge)
        app.router.add_delete(f"{root}/Contracts/{{parent_id}}/Charges/{{charge_id}}", delete_charge)
        app.router.add_patch(f"{root}/Contracts/{{parent_id}}/Services", update_contract_service)
        app.router.add_post(f"{root}/Invoices", create_invoice)
        app.router.add_post(f"{root}/{{entity}}/query", query)
        app.router.add_get(f"{root}/{{entity}}/query/next", query_next)
    return app

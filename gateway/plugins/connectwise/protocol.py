"""ConnectWise Manage (PSA) REST API 3.0, sans I/O: requests to build, responses to read.

Nothing here touches the network; ``client.py`` sends what these functions build
and hands back what came in. Field names follow the ConnectWise Manage 3.0 schema
(``/finance/invoices``, ``/procurement/products``, ``/finance/agreements/{id}/additions``).

How a bill reaches ConnectWise (``options.delivery``):

``"invoice"`` (default)
    A *Standard* invoice for the company with one product line per bill line. The
    bill key goes into the invoice ``reference`` (max 50 characters; longer keys are
    replaced by a stable digest) and a machine-readable marker line into
    ``internalNotes`` (never printed for the customer). ConnectWise computes the
    invoice total from its product lines, so the amount read back is the PSA's own.

``"addition"``
    The quantity of one agreement addition (the catalog item ``options.catalog_item``)
    on the company's active agreement (of type ``options.agreement_type`` if set) is
    set to the device count of the cycle, with a JSON-Patch PATCH, together with the
    marker in the addition's ``invoiceDescription`` — one request, so the quantity
    and the marker never disagree. The addition's unit price is the bill total
    divided by the device count (6 decimal places), so quantity × price equals the
    total to the cent for any realistic device count. An addition holds one cycle at a
    time: read-back sees the latest cycle only, and a late bill for a cycle *before* the
    one the addition holds is refused rather than rolling the quantity back.

The marker (``gateway-bill key=… period=…/… devices=N``) is what makes a push
idempotent (G2) and what read-back (G3) parses to know which bill and cycle an
object belongs to.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any
from urllib.parse import quote, unquote

from gateway.adapters import BillDocument, PsaCompany, PsaRecord
from gateway.errors import ConfigError, PermanentError

API_PATH = "apis/3.0"
MAX_PAGE_SIZE = 1000
REFERENCE_MAX = 50
CUSTOMER_PO_MAX = 50
DELIVERIES = ("invoice", "addition")
MARKER_PREFIX = "gateway-bill"
CENT = Decimal("0.01")
UNIT_PRICE_STEP = Decimal("0.000001")


@dataclass(frozen=True)
class Request:
    """One HTTP request to send; ``url`` is relative to the API base unless absolute."""

    method: str
    url: str
    params: Mapping[str, Any] | None = None
    json: Any = None


@dataclass(frozen=True)
class Config:
    """The per-connection options of a ConnectWise connection, checked once."""

    delivery: str = "invoice"
    catalog_item: str = "MSP-DEVICE"
    agreement_type: str | None = None
    invoice_type: str = "Standard"
    codebase: str | None = None
    page_size: int = MAX_PAGE_SIZE

    @classmethod
    def from_options(cls, connection: str, options: Mapping[str, Any]) -> "Config":
        known = {"delivery", "catalog_item", "agreement_type", "invoice_type", "codebase", "page_size"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"connection {connection!r}: unknown option(s) {', '.join(unknown)} for ConnectWise "
                f"(known: {', '.join(sorted(known))})"
            )
        delivery = str(options.get("delivery", "invoice"))
        if delivery not in DELIVERIES:
            raise ConfigError(
                f"connection {connection!r}: options.delivery must be one of {', '.join(DELIVERIES)}, got {delivery!r}"
            )
        page_size = int(options.get("page_size", MAX_PAGE_SIZE))
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ConfigError(f"connection {connection!r}: options.page_size must be 1..{MAX_PAGE_SIZE}")
        return cls(
            delivery=delivery,
            catalog_item=str(options.get("catalog_item", "MSP-DEVICE")),
            agreement_type=str(options["agreement_type"]) if options.get("agreement_type") else None,
            invoice_type=str(options.get("invoice_type", "Standard")),
            codebase=str(options["codebase"]) if options.get("codebase") else None,
            page_size=page_size,
        )


# --- auth and the API base -----------------------------------------------------------


def auth_headers(company: str, public_key: str, private_key: str, client_id: str) -> dict[str, str]:
    """``Authorization: Basic base64(company+public:private)`` plus the integration's ``clientId``."""
    token = base64.b64encode(f"{company}+{public_key}:{private_key}".encode()).decode("ascii")
    return {"Authorization": f"Basic {token}", "clientId": client_id, "Accept": "application/json"}


def company_info_request(site_url: str, company: str) -> Request:
    """The unauthenticated look-up that tells which codebase (release path) the company runs on."""
    return Request("GET", f"{site_url.rstrip('/')}/login/companyinfo/{quote(company, safe='')}")


def api_base(site_url: str, company_info: Any) -> str:
    """``{site}/{Codebase}apis/3.0`` from a ``companyinfo`` body (``Codebase`` is e.g. ``v4_6_release/``)."""
    codebase = company_info.get("Codebase") if isinstance(company_info, dict) else None
    if not isinstance(codebase, str) or not codebase.strip("/"):
        raise PermanentError("ConnectWise companyinfo answered without a Codebase; check base_url and credentials.company")
    return f"{site_url.rstrip('/')}/{codebase.strip('/')}/{API_PATH}"


def api_base_from_codebase(site_url: str, codebase: str) -> str:
    return f"{site_url.rstrip('/')}/{codebase.strip('/')}/{API_PATH}"


# --- conditions and paging -------------------------------------------------------------


def quoted(value: str) -> str:
    """A string literal for ``conditions`` (double quotes, inner quotes escaped)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def list_request(path: str, *, conditions: str | None = None, page_size: int = MAX_PAGE_SIZE) -> Request:
    params: dict[str, Any] = {"page": 1, "pageSize": min(page_size, MAX_PAGE_SIZE)}
    if conditions:
        params["conditions"] = conditions
    return Request("GET", path, params=params)


_LINK = re.compile(r'<([^>]*)>\s*;\s*rel="?([A-Za-z]+)"?')


def next_page_url(headers: Mapping[str, str]) -> str | None:
    """The ``rel="next"`` target of a ``Link`` header, or None on the last page."""
    for target, rel in _LINK.findall(headers.get("Link", "") or ""):
        if rel.lower() == "next":
            return target
    return None


def parse_list(body: Any, what: str) -> list[dict[str, Any]]:
    if not isinstance(body, list) or not all(isinstance(item, dict) for item in body):
        raise PermanentError(f"ConnectWise answered a {what} list that is not a JSON array of objects")
    return body


def parse_companies(rows: Sequence[Mapping[str, Any]]) -> list[PsaCompany]:
    companies = []
    for row in rows:
        if row.get("deletedFlag"):
            continue
        companies.append(PsaCompany(external_id=str(row["id"]), name=str(row.get("name") or row.get("identifier") or "")))
    return companies


def companies_request(page_size: int = MAX_PAGE_SIZE) -> Request:
    return list_request("company/companies", conditions="deletedFlag = false", page_size=page_size)


# --- the marker ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Marker:
    """What the gateway writes into the PSA object so it can recognise it later."""

    key: str
    period_start: date
    period_end: date
    devices: int

    def render(self) -> str:
        return (
            f"{MARKER_PREFIX} key={quote(self.key, safe=':-_./@')} "
            f"period={self.period_start.isoformat()}/{self.period_end.isoformat()} devices={self.devices}"
        )


_MARKER = re.compile(
    rf"{MARKER_PREFIX} key=(?P<key>\S+) period=(?P<start>\d{{4}}-\d{{2}}-\d{{2}})/(?P<end>\d{{4}}-\d{{2}}-\d{{2}}) "
    r"devices=(?P<devices>\d+)"
)


def marker_for(bill: BillDocument) -> Marker:
    return Marker(bill.key, bill.period_start, bill.period_end, bill.device_count)


def parse_marker(text: Any) -> Marker | None:
    """The marker in a free-text field, or None if the object was not written by the gateway."""
    if not isinstance(text, str):
        return None
    match = _MARKER.search(text)
    if match is None:
        return None
    return Marker(
        unquote(match["key"]),
        date.fromisoformat(match["start"]),
        date.fromisoformat(match["end"]),
        int(match["devices"]),
    )


def reference_for(key: str) -> str:
    """The key itself if it fits ``reference`` (50), else a stable digest of it."""
    if len(key) <= REFERENCE_MAX:
        return key
    return "gw-" + hashlib.sha256(key.encode()).hexdigest()[: REFERENCE_MAX - 3]


def in_period(marker: Marker, period_start: date, period_end: date) -> bool:
    return period_start <= marker.period_start and marker.period_end <= period_end


# --- money --------------------------------------------------------------------------------


def priced_lines(bill: BillDocument) -> list[tuple[str, Decimal, Decimal]]:
    """(description, quantity, unit price) per bill line, so that the PSA's quantity × price is the line amount.

    A line whose amount is not quantity × unit price (a prorated part, S7) is sent as
    one unit at its amount, with the original figures in the description.
    """
    lines = []
    for line in bill.lines:
        if (line.quantity * line.unit_price).quantize(CENT, ROUND_HALF_UP) == line.amount.quantize(CENT, ROUND_HALF_UP):
            lines.append((line.description, line.quantity, line.unit_price))
        else:
            lines.append((f"{line.description} ({line.quantity} × {line.unit_price}, prorated)", Decimal(1), line.amount))
    if not lines and bill.total:
        lines.append((f"{bill.customer_name} {bill.period_start}–{bill.period_end}", Decimal(1), bill.total))
    return lines


def unit_price_for(bill: BillDocument) -> Decimal:
    """Total / device count at 6 places: the unit price of a quantity-only delivery."""
    if bill.device_count <= 0:
        return Decimal(0)
    return (bill.total / bill.device_count).quantize(UNIT_PRICE_STEP, ROUND_HALF_UP)


def money(value: Any, what: str) -> Decimal:
    try:
        return Decimal(str(value if value is not None else 0))
    except InvalidOperation:
        raise PermanentError(f"ConnectWise answered a {what} that is not a number: {value!r}") from None


def _num(value: Decimal) -> float | int:
    # ConnectWise's JSON numbers are doubles; integral values go out as integers.
    return int(value) if value == value.to_integral_value() else float(value)


def _day(value: date) -> str:
    return f"{value.isoformat()}T00:00:00Z"


# --- invoice delivery ---------------------------------------------------------------------


def company_id(bill: BillDocument) -> int:
    """The PSA company id of a bill; ConnectWise ids are integers."""
    try:
        return int(bill.company_external_id)
    except ValueError:
        raise PermanentError(
            f"bill {bill.number} is addressed to company {bill.company_external_id!r}, which is not a ConnectWise "
            "company id (an integer); fix the customer's PSA mapping"
        ) from None


def find_invoice_request(bill: BillDocument) -> Request:
    return list_request(
        "finance/invoices",
        conditions=f"reference = {quoted(reference_for(bill.key))} and company/id = {company_id(bill)}",
    )


def matching(rows: Sequence[Mapping[str, Any]], field: str, key: str) -> list[Mapping[str, Any]]:
    """Rows whose marker in ``field`` carries ``key``, oldest (lowest id) first."""
    found = [row for row in rows if (m := parse_marker(row.get(field))) is not None and m.key == key]
    return sorted(found, key=lambda row: int(row["id"]))


def refuse_duplicates(found: Sequence[Mapping[str, Any]], bill: BillDocument, what: str) -> None:
    """Two objects for one bill key bill the customer twice: a person must delete one, the gateway won't guess.

    This only happens when a create was accepted but its answer lost, and the request re-sent.
    """
    if len(found) > 1:
        ids = ", ".join(str(row["id"]) for row in found)
        raise PermanentError(
            f"ConnectWise holds {len(found)} {what} for bill {bill.number} (key {bill.key}): ids {ids}; "
            "delete all but one in ConnectWise, then retry the delivery"
        )


def extras(rows: Sequence[Mapping[str, Any]], group: Callable[[Mapping[str, Any]], Any]) -> list[Mapping[str, Any]]:
    """All but the oldest (lowest id) row of each group: the copies a re-sent create left behind.

    The connector re-sends a request whose answer was lost; for a create that can make a
    second object. The adapter looks right after its own create and removes them.
    """
    kept: dict[Any, Mapping[str, Any]] = {}
    copies = []
    for row in sorted(rows, key=lambda r: int(r["id"])):
        if group(row) in kept:
            copies.append(row)
        else:
            kept[group(row)] = row
    return copies


def create_invoice_request(bill: BillDocument, config: Config) -> Request:
    return Request(
        "POST",
        "finance/invoices",
        json={
            "type": config.invoice_type,
            "company": {"id": company_id(bill)},
            "applyToType": "All",
            "reference": reference_for(bill.key),
            "customerPO": bill.number[:CUSTOMER_PO_MAX],
            "date": _day(bill.issued_on),
            "dueDate": _day(bill.due_on),
            "internalNotes": marker_for(bill).render(),
        },
    )


def invoice_products_request(invoice_id: int) -> Request:
    return list_request("procurement/products", conditions=f"invoice/id = {invoice_id}")


def missing_product_requests(
    bill: BillDocument, invoice_id: int, existing: Sequence[Mapping[str, Any]], config: Config
) -> list[Request]:
    """Product lines still to add to the invoice (all of them, or the rest after an interrupted push)."""
    have = {int(row.get("sequenceNumber") or 0) for row in existing}
    requests = []
    for number, (description, quantity, price) in enumerate(priced_lines(bill), start=1):
        if number in have:
            continue
        requests.append(
            Request(
                "POST",
                "procurement/products",
                json={
                    "catalogItem": {"identifier": config.catalog_item},
                    "billableOption": "Billable",
                    "description": description[:2000],
                    "quantity": _num(quantity),
                    "price": _num(price),
                    "sequenceNumber": number,
                    "company": {"id": company_id(bill)},
                    "invoice": {"id": invoice_id},
                },
            )
        )
    return requests


def delete_invoice_request(invoice_id: int) -> Request:
    return Request("DELETE", f"finance/invoices/{invoice_id}")


def delete_product_request(product_id: int) -> Request:
    return Request("DELETE", f"procurement/products/{product_id}")


def invoices_in_period_request(period_start: date) -> Request:
    # An invoice is issued on or after its cycle starts, so the date bound only trims.
    return list_request(
        "finance/invoices",
        conditions=f'internalNotes like "{MARKER_PREFIX}%" and date >= [{_day(period_start)}]',
    )


def invoice_records(rows: Sequence[Mapping[str, Any]], period_start: date, period_end: date) -> list[PsaRecord]:
    """Records of the gateway's invoices whose cycle lies in the period."""
    return [r for row in rows if (r := invoice_record(row, period_start, period_end)) is not None]


def invoice_record(row: Mapping[str, Any], period_start: date = date.min, period_end: date = date.max) -> PsaRecord | None:
    marker = parse_marker(row.get("internalNotes"))
    if marker is None or not in_period(marker, period_start, period_end):
        return None
    company = row.get("company") or {}
    return PsaRecord(
        key=marker.key,
        company_external_id=str(company.get("id", "")),
        external_id=str(row["id"]),
        quantity=Decimal(marker.devices),
        amount=money(row.get("total"), "invoice total").quantize(CENT, ROUND_HALF_UP),
    )


# --- addition delivery --------------------------------------------------------------------


def agreements_request(bill: BillDocument, config: Config) -> Request:
    conditions = f"company/id = {company_id(bill)} and cancelledFlag = false"
    if config.agreement_type:
        conditions += f" and type/name = {quoted(config.agreement_type)}"
    return list_request("finance/agreements", conditions=conditions)


def all_agreements_request() -> Request:
    return list_request("finance/agreements", conditions="cancelledFlag = false")


def pick_agreement(rows: Sequence[Mapping[str, Any]], bill: BillDocument, config: Config) -> Mapping[str, Any]:
    active = [row for row in rows if not row.get("cancelledFlag")]
    if not active:
        kind = f" of type {config.agreement_type!r}" if config.agreement_type else ""
        raise PermanentError(
            f"ConnectWise company {bill.company_external_id} has no active agreement{kind} to carry the addition; "
            'create one in ConnectWise, or deliver with options.delivery = "invoice"'
        )
    return min(active, key=lambda row: int(row["id"]))


def additions_request(agreement_id: int, config: Config) -> Request:
    return list_request(
        f"finance/agreements/{agreement_id}/additions",
        conditions=f"product/identifier = {quoted(config.catalog_item)}",
    )


def gateway_additions_request(agreement_id: int) -> Request:
    return list_request(
        f"finance/agreements/{agreement_id}/additions",
        conditions=f'invoiceDescription like "%{MARKER_PREFIX}%"',
    )


def pick_addition(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    live = [row for row in rows if not row.get("cancelledDate")]
    return min(live, key=lambda row: int(row["id"])) if live else None


def refuse_going_back(marker: Marker | None, bill: BillDocument, where: str) -> None:
    """A quantity holds one cycle; a late bill for an earlier cycle must not overwrite a later one."""
    if marker is not None and marker.key != bill.key and marker.period_start > bill.period_start:
        raise PermanentError(
            f"{where} already carries the cycle from {marker.period_start} (bill key {marker.key}); bill "
            f"{bill.number} for {bill.period_start} is earlier and cannot be applied to a quantity after the fact; "
            'deliver it with options.delivery = "invoice" or enter it by hand'
        )


def _addition_text(bill: BillDocument) -> str:
    return f"Managed devices {bill.period_start.isoformat()} to {bill.period_end.isoformat()}\n{marker_for(bill).render()}"


def create_addition_request(agreement_id: int, bill: BillDocument, config: Config) -> Request:
    return Request(
        "POST",
        f"finance/agreements/{agreement_id}/additions",
        json={
            "product": {"identifier": config.catalog_item},
            "billCustomer": "Billable",
            "quantity": bill.device_count,
            "unitPrice": _num(unit_price_for(bill)),
            "effectiveDate": _day(bill.period_start),
            "invoiceDescription": _addition_text(bill),
        },
    )


def update_addition_request(agreement_id: int, addition_id: int, bill: BillDocument) -> Request:
    """One JSON-Patch PATCH: quantity, price and marker change together or not at all."""
    return Request(
        "PATCH",
        f"finance/agreements/{agreement_id}/additions/{addition_id}",
        json=[
            {"op": "replace", "path": "quantity", "value": bill.device_count},
            {"op": "replace", "path": "unitPrice", "value": _num(unit_price_for(bill))},
            {"op": "replace", "path": "invoiceDescription", "value": _addition_text(bill)},
        ],
    )


def delete_addition_request(agreement_id: int, addition_id: int) -> Request:
    return Request("DELETE", f"finance/agreements/{agreement_id}/additions/{addition_id}")


def addition_record(
    row: Mapping[str, Any], agreement: Mapping[str, Any], period_start: date = date.min, period_end: date = date.max
) -> PsaRecord | None:
    """The record of a gateway addition whose (latest) cycle lies in the period, else None."""
    marker = parse_marker(row.get("invoiceDescription"))
    if marker is None or row.get("cancelledDate") or not in_period(marker, period_start, period_end):
        return None
    quantity = money(row.get("quantity"), "addition quantity")
    price = money(row.get("unitPrice"), "addition unit price")
    company = agreement.get("company") or {}
    return PsaRecord(
        key=marker.key,
        company_external_id=str(company.get("id", "")),
        external_id=str(row["id"]),
        quantity=quantity,
        amount=(quantity * price).quantize(CENT, ROUND_HALF_UP),
    )


def created_id(body: Any, what: str) -> int:
    if not isinstance(body, dict) or not isinstance(body.get("id"), int):
        raise PermanentError(f"ConnectWise answered the {what} create without an id")
    return body["id"]

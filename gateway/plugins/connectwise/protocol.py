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
    total to the cent for any realistic device count. An addition holds one bill at a
    time: read-back sees the latest cycle only. A second bill for the cycle the addition
    holds (a customer with two plans, or a plan and monthly billing) and a late bill for
    an earlier cycle are refused rather than overwriting it; such customers need
    ``"invoice"`` delivery.

The marker (``gateway-bill key=… period=…/… devices=N``) is what makes a push
idempotent (G2) and what read-back (G3) parses to know which bill and cycle an
object belongs to.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from gateway.adapters import BillDocument, PsaCompany, PsaRecord
from gateway.errors import PermanentError
from gateway.options import choice_option, int_option, refuse_unknown, text_option
from gateway.plugins import psa_bills
from gateway.plugins.sans_io import Request

VENDOR = "ConnectWise"
API_PATH = "apis/3.0"
MAX_PAGE_SIZE = 1000
CUSTOMER_PO_MAX = 50
DELIVERIES = ("invoice", "addition")
OPTIONS = ("delivery", "catalog_item", "agreement_type", "invoice_type", "codebase", "page_size")


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
    def from_options(cls, connection: str, options: Mapping[str, Any]) -> Config:
        """Every bad option is a ConfigError naming the connection, the option and what it takes."""
        refuse_unknown(connection, VENDOR, options, OPTIONS)
        return cls(
            delivery=choice_option(connection, options, "delivery", DELIVERIES, "invoice"),
            catalog_item=text_option(connection, options, "catalog_item", "MSP-DEVICE", example="MSP-DEVICE"),
            agreement_type=text_option(connection, options, "agreement_type", example="Managed Services"),
            invoice_type=text_option(connection, options, "invoice_type", "Standard", example="Standard"),
            codebase=text_option(connection, options, "codebase", example="v4_6_release/"),
            page_size=int_option(connection, options, "page_size", MAX_PAGE_SIZE, 1, MAX_PAGE_SIZE),
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


Row = Mapping[str, Any]


@dataclass(frozen=True)
class ListRequest(Request):
    """A list request and the same filter as a predicate: every row that comes back is checked
    against it, because a page reached through a ``Link`` may not carry the ``conditions``."""

    keep: Callable[[Row], bool] | None = None

    def page(self, number: int) -> ListRequest:
        """The same request for page ``number`` (1-based), conditions and all."""
        params = {**(self.params or {}), "page": number}
        return ListRequest(self.method, self.url, params=params, json=self.json, keep=self.keep)

    def wanted(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        return list(rows) if self.keep is None else [row for row in rows if self.keep(row)]


def list_request(
    path: str,
    *,
    conditions: str | None = None,
    page_size: int = MAX_PAGE_SIZE,
    keep: Callable[[Row], bool] | None = None,
) -> ListRequest:
    params: dict[str, Any] = {"page": 1, "pageSize": min(page_size, MAX_PAGE_SIZE)}
    if conditions:
        params["conditions"] = conditions
    return ListRequest("GET", path, params=params, keep=keep)


def field(row: Row, path: str) -> Any:
    """``row["company"]["id"]`` for ``"company/id"`` (None where a part is missing)."""
    value: Any = row
    for part in path.split("/"):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


_LINK = re.compile(r'<([^>]*)>\s*;\s*rel="?([A-Za-z]+)"?')


def next_page_url(headers: Mapping[str, str]) -> str | None:
    """The ``rel="next"`` target of a ``Link`` header, or None on the last page."""
    for target, rel in _LINK.findall(headers.get("Link", "") or ""):
        if rel.lower() == "next":
            return target
    return None


def next_page_number(headers: Mapping[str, str], current: int) -> int | None:
    """The page the ``rel="next"`` link points at (its ``page``, wherever it stands), None on the last page.

    Only the number is taken from the link: the adapter asks for it with its own request, so
    a link that drops ``conditions`` (or reorders the query) cannot widen the filter.
    """
    target = next_page_url(headers)
    if target is None:
        return None
    values = parse_qs(urlsplit(target).query).get("page")
    try:
        number = int(values[0]) if values else current + 1
    except ValueError:
        number = current + 1
    if number <= current:
        raise PermanentError(f"ConnectWise's next link points back to page {number} from page {current}")
    return number


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


def companies_request(page_size: int = MAX_PAGE_SIZE) -> ListRequest:
    return list_request(
        "company/companies",
        conditions="deletedFlag = false",
        page_size=page_size,
        keep=lambda row: not row.get("deletedFlag"),
    )


def _day(value: date) -> str:
    return f"{value.isoformat()}T00:00:00Z"


# --- invoice delivery ---------------------------------------------------------------------


def company_id(bill: BillDocument) -> int:
    return psa_bills.company_id(bill, VENDOR)


def money(value: Any, what: str) -> Decimal:
    return psa_bills.number(value, what, VENDOR)


def find_invoice_request(bill: BillDocument) -> ListRequest:
    reference, company = psa_bills.reference_for(bill.key), company_id(bill)
    return list_request(
        "finance/invoices",
        conditions=f"reference = {quoted(reference)} and company/id = {company}",
        keep=lambda row: row.get("reference") == reference and field(row, "company/id") == company,
    )


def bill_invoices(rows: Sequence[Mapping[str, Any]], bill: BillDocument) -> list[Mapping[str, Any]]:
    """The invoices whose marker carries the bill's key, oldest first."""
    return psa_bills.matching(rows, "internalNotes", bill.key)


def refuse_duplicates(found: Sequence[Mapping[str, Any]], bill: BillDocument, what: str) -> None:
    psa_bills.refuse_duplicates(found, bill, what, VENDOR)


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
            "reference": psa_bills.reference_for(bill.key),
            "customerPO": bill.number[:CUSTOMER_PO_MAX],
            "date": _day(bill.issued_on),
            "dueDate": _day(bill.due_on),
            "internalNotes": psa_bills.marker_for(bill).render(),
        },
    )


def invoice_products_request(invoice_id: int) -> ListRequest:
    return list_request(
        "procurement/products",
        conditions=f"invoice/id = {invoice_id}",
        keep=lambda row: field(row, "invoice/id") == invoice_id,
    )


def missing_product_requests(
    bill: BillDocument, invoice_id: int, existing: Sequence[Mapping[str, Any]], config: Config
) -> list[Request]:
    """Product lines still to add to the invoice (all of them, or the rest after an interrupted push)."""
    have = {int(row.get("sequenceNumber") or 0) for row in existing}
    requests = []
    for number, (description, quantity, price) in enumerate(psa_bills.priced_lines(bill), start=1):
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
                    "quantity": psa_bills.json_number(quantity),
                    "price": psa_bills.json_number(price),
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


def invoices_in_period_request(period_start: date) -> ListRequest:
    # An invoice is issued on or after its cycle starts, so the date bound only trims.
    day = _day(period_start)
    return list_request(
        "finance/invoices",
        conditions=f'internalNotes like "{psa_bills.MARKER_PREFIX}%" and date >= [{day}]',
        keep=lambda row: str(row.get("internalNotes") or "").startswith(psa_bills.MARKER_PREFIX)
        and str(row.get("date") or "")[:10] >= day[:10],
    )


def invoice_records(rows: Sequence[Mapping[str, Any]], period_start: date, period_end: date) -> list[PsaRecord]:
    """Records of the gateway's invoices whose cycle lies in the period."""
    return [r for row in rows if (r := invoice_record(row, period_start, period_end)) is not None]


def invoice_record(row: Mapping[str, Any], period_start: date = date.min, period_end: date = date.max) -> PsaRecord | None:
    marker = psa_bills.marker_in_period(row.get("internalNotes"), period_start, period_end)
    if marker is None:
        return None
    company = (row.get("company") or {}).get("id")
    return psa_bills.bill_record(marker, company, row["id"], money(row.get("total"), "invoice total"))


# --- addition delivery --------------------------------------------------------------------


def agreements_request(bill: BillDocument, config: Config) -> ListRequest:
    company, kind = company_id(bill), config.agreement_type
    conditions = f"company/id = {company} and cancelledFlag = false"
    if kind:
        conditions += f" and type/name = {quoted(kind)}"
    return list_request(
        "finance/agreements",
        conditions=conditions,
        keep=lambda row: field(row, "company/id") == company
        and not row.get("cancelledFlag")
        and (not kind or field(row, "type/name") == kind),
    )


def all_agreements_request() -> ListRequest:
    return list_request("finance/agreements", conditions="cancelledFlag = false", keep=lambda row: not row.get("cancelledFlag"))


def pick_agreement(rows: Sequence[Mapping[str, Any]], bill: BillDocument, config: Config) -> Mapping[str, Any]:
    active = [row for row in rows if not row.get("cancelledFlag")]
    if not active:
        kind = f" of type {config.agreement_type!r}" if config.agreement_type else ""
        raise PermanentError(
            f"ConnectWise company {bill.company_external_id} has no active agreement{kind} to carry the addition; "
            'create one in ConnectWise, or deliver with options.delivery = "invoice"'
        )
    return min(active, key=lambda row: int(row["id"]))


def additions_request(agreement_id: int, config: Config) -> ListRequest:
    item = config.catalog_item
    return list_request(
        f"finance/agreements/{agreement_id}/additions",
        conditions=f"product/identifier = {quoted(item)}",
        keep=lambda row: field(row, "product/identifier") == item,
    )


def gateway_additions_request(agreement_id: int) -> ListRequest:
    return list_request(
        f"finance/agreements/{agreement_id}/additions",
        conditions=f'invoiceDescription like "%{psa_bills.MARKER_PREFIX}%"',
        keep=lambda row: psa_bills.MARKER_PREFIX in str(row.get("invoiceDescription") or ""),
    )


def bill_additions(rows: Sequence[Mapping[str, Any]], bill: BillDocument) -> list[Mapping[str, Any]]:
    """The additions whose marker carries the bill's key, oldest first."""
    return psa_bills.matching(rows, "invoiceDescription", bill.key)


def pick_addition(rows: Sequence[Mapping[str, Any]], config: Config) -> Mapping[str, Any] | None:
    """The oldest live addition of the configured product (never another product's, whatever the list held)."""
    live = [
        row for row in rows if not row.get("cancelledDate") and field(row, "product/identifier") == config.catalog_item
    ]
    return min(live, key=lambda row: int(row["id"])) if live else None


def refuse_overwrite(addition: Mapping[str, Any], bill: BillDocument) -> None:
    """An addition holds one bill: not a second one for its cycle, nor one for an earlier cycle."""
    psa_bills.refuse_overwrite(
        psa_bills.parse_marker(addition.get("invoiceDescription")),
        bill,
        f"ConnectWise agreement addition {addition['id']}",
        'options.delivery = "invoice" (one invoice per bill)',
    )


def _addition_text(bill: BillDocument) -> str:
    marker = psa_bills.marker_for(bill).render()
    return f"Managed devices {bill.period_start.isoformat()} to {bill.period_end.isoformat()}\n{marker}"


def create_addition_request(agreement_id: int, bill: BillDocument, config: Config) -> Request:
    return Request(
        "POST",
        f"finance/agreements/{agreement_id}/additions",
        json={
            "product": {"identifier": config.catalog_item},
            "billCustomer": "Billable",
            "quantity": bill.device_count,
            "unitPrice": psa_bills.json_number(psa_bills.unit_price_for(bill)),
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
            {"op": "replace", "path": "unitPrice", "value": psa_bills.json_number(psa_bills.unit_price_for(bill))},
            {"op": "replace", "path": "invoiceDescription", "value": _addition_text(bill)},
        ],
    )


def delete_addition_request(agreement_id: int, addition_id: int) -> Request:
    return Request("DELETE", f"finance/agreements/{agreement_id}/additions/{addition_id}")


def addition_record(
    row: Mapping[str, Any], agreement: Mapping[str, Any], period_start: date = date.min, period_end: date = date.max
) -> PsaRecord | None:
    """The record of a gateway addition whose (latest) cycle lies in the period, else None."""
    marker = psa_bills.marker_in_period(row.get("invoiceDescription"), period_start, period_end)
    if marker is None or row.get("cancelledDate"):
        return None
    quantity = money(row.get("quantity"), "addition quantity")
    price = money(row.get("unitPrice"), "addition unit price")
    company = (agreement.get("company") or {}).get("id")
    return psa_bills.bill_record(marker, company, row["id"], quantity * price, quantity)


def created_id(body: Any, what: str) -> int:
    if not isinstance(body, dict) or not isinstance(body.get("id"), int):
        raise PermanentError(f"ConnectWise answered the {what} create without an id")
    return body["id"]

"""HaloPSA REST API, sans I/O: requests to build, responses to read.

HaloPSA takes a whole invoice, lines included, in one write: ``POST /api/Invoice`` with a
JSON *array* of invoice objects (no ``id``: create; ``id``: update) answers the saved
object(s). So a bill is delivered as one invoice (the only delivery this adapter offers;
Halo's recurring invoices and contracts are for Halo's own billing runs): one line per
bill line (``item_shortdescription``, ``qty_order``, ``unit_price``), the bill key in
``reference`` and a marker line in ``internal_note`` (not printed). Halo computes each
line's ``net_amount``; read-back adds those up (``includelines=true``), falling back to
the invoice ``total`` when no lines come back.

Lists are paged with ``pageinate=true&page_size=&page_no=`` (Halo's spelling) and
answer ``{"record_count": N, "<things>": [...]}``. Authentication is an OAuth2
client-credentials token from ``POST /auth/token`` (form, ``scope=all``; ``?tenant=``
for hosted tenants), handled by the shared connector.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any
from urllib.parse import quote, unquote

from gateway.adapters import BillDocument, PsaCompany, PsaRecord
from gateway.errors import ConfigError, PermanentError

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 500
REFERENCE_MAX = 50
MARKER_PREFIX = "gateway-bill"
CENT = Decimal("0.01")


@dataclass(frozen=True)
class Request:
    """One HTTP request; ``url`` is relative to ``{base_url}/api`` unless absolute."""

    method: str
    url: str
    params: Mapping[str, Any] | None = None
    json: Any = None


@dataclass(frozen=True)
class Config:
    """The per-connection options of a HaloPSA connection, checked once."""

    tenant: str | None = None
    page_size: int = DEFAULT_PAGE_SIZE

    @classmethod
    def from_options(cls, connection: str, options: Mapping[str, Any]) -> "Config":
        known = {"delivery", "tenant", "page_size"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"connection {connection!r}: unknown option(s) {', '.join(unknown)} for HaloPSA "
                f"(known: {', '.join(sorted(known))})"
            )
        if options.get("delivery", "invoice") != "invoice":
            raise ConfigError(
                f'connection {connection!r}: HaloPSA bills are delivered as invoices; options.delivery must be "invoice"'
            )
        page_size = int(options.get("page_size", DEFAULT_PAGE_SIZE))
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ConfigError(f"connection {connection!r}: options.page_size must be 1..{MAX_PAGE_SIZE}")
        tenant = str(options["tenant"]) if options.get("tenant") else None
        return cls(tenant=tenant, page_size=page_size)


def token_url(base_url: str, tenant: str | None) -> str:
    url = f"{base_url.rstrip('/')}/auth/token"
    return f"{url}?tenant={quote(tenant, safe='')}" if tenant else url


def api_base(base_url: str) -> str:
    return f"{base_url.rstrip('/')}/api"


# --- paging ------------------------------------------------------------------------------


def page_request(path: str, page_no: int, page_size: int, **filters: Any) -> Request:
    params: dict[str, Any] = {"pageinate": True, "page_size": page_size, "page_no": page_no}
    params.update({k: v for k, v in filters.items() if v is not None})
    return Request("GET", path, params=params)


def parse_page(body: Any, field: str) -> tuple[list[dict[str, Any]], int | None]:
    """The rows of one page and the total number of records (None if Halo did not say)."""
    if not isinstance(body, dict) or not isinstance(body.get(field), list):
        raise PermanentError(f"HaloPSA answered a list without {field!r}")
    total = body.get("record_count")
    rows = [row for row in body[field] if isinstance(row, dict)]
    return rows, total if isinstance(total, int) else None


def has_more(page_no: int, page_size: int, rows_on_page: int, record_count: int | None) -> bool:
    """Whether another page follows; without a record count, a full page means maybe."""
    if rows_on_page == 0:
        return False
    if record_count is None:
        return rows_on_page >= page_size
    return page_no * page_size < record_count


def parse_clients(rows: Sequence[Mapping[str, Any]]) -> list[PsaCompany]:
    return [
        PsaCompany(external_id=str(row["id"]), name=str(row.get("name") or ""))
        for row in rows
        if not row.get("inactive")
    ]


# --- the marker ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Marker:
    """What the gateway writes into the invoice so it can recognise it later."""

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
    if not isinstance(text, str):
        return None
    match = _MARKER.search(text)
    if match is None:
        return None
    return Marker(
        unquote(match["key"]), date.fromisoformat(match["start"]), date.fromisoformat(match["end"]), int(match["devices"])
    )


def reference_for(key: str) -> str:
    """The key itself if it fits ``reference`` (kept to 50), else a stable digest of it."""
    if len(key) <= REFERENCE_MAX:
        return key
    return "gw-" + hashlib.sha256(key.encode()).hexdigest()[: REFERENCE_MAX - 3]


def in_period(marker: Marker, period_start: date, period_end: date) -> bool:
    return period_start <= marker.period_start and marker.period_end <= period_end


# --- invoices ------------------------------------------------------------------------------


def client_id(bill: BillDocument) -> int:
    try:
        return int(bill.company_external_id)
    except ValueError:
        raise PermanentError(
            f"bill {bill.number} is addressed to client {bill.company_external_id!r}, which is not a HaloPSA "
            "client id (an integer); fix the customer's PSA mapping"
        ) from None


def client_invoices_request(bill: BillDocument, page_no: int, page_size: int) -> Request:
    return page_request("Invoice", page_no, page_size, client_id=client_id(bill))


def all_invoices_request(page_no: int, page_size: int) -> Request:
    return page_request("Invoice", page_no, page_size, includelines=True)


def matching(rows: Sequence[Mapping[str, Any]], key: str) -> list[Mapping[str, Any]]:
    """Invoices carrying ``key`` (reference and marker), oldest first."""
    reference = reference_for(key)
    found = [
        row
        for row in rows
        if row.get("reference") == reference
        and (m := parse_marker(row.get("internal_note"))) is not None
        and m.key == key
    ]
    return sorted(found, key=lambda row: int(row["id"]))


def refuse_duplicates(found: Sequence[Mapping[str, Any]], bill: BillDocument) -> None:
    """Two invoices for one bill key bill the client twice: a person must delete one, the gateway won't guess.

    This only happens when a create was accepted but its answer lost, and the request re-sent.
    """
    if len(found) > 1:
        ids = ", ".join(str(row["id"]) for row in found)
        raise PermanentError(
            f"HaloPSA holds {len(found)} invoices for bill {bill.number} (key {bill.key}): ids {ids}; "
            "delete all but one in HaloPSA, then retry the delivery"
        )


def delete_invoice_request(invoice_id: int) -> Request:
    return Request("DELETE", f"Invoice/{invoice_id}")


def _lines(bill: BillDocument) -> list[dict[str, Any]]:
    lines = []
    for line in bill.lines:
        quantity, price, text = line.quantity, line.unit_price, line.description
        if (quantity * price).quantize(CENT, ROUND_HALF_UP) != line.amount.quantize(CENT, ROUND_HALF_UP):
            # A prorated part (S7): one unit at its amount keeps Halo's net amount exact.
            quantity, price, text = Decimal(1), line.amount, f"{text} ({line.quantity} × {line.unit_price}, prorated)"
        lines.append({"item_shortdescription": text[:255], "qty_order": _num(quantity), "unit_price": _num(price)})
    if not lines and bill.total:
        lines.append({"item_shortdescription": f"{bill.customer_name} {bill.period_start}–{bill.period_end}",
                      "qty_order": 1, "unit_price": _num(bill.total)})
    return lines


def create_invoice_request(bill: BillDocument) -> Request:
    """One invoice with all its lines: Halo saves it whole or not at all."""
    return Request(
        "POST",
        "Invoice",
        json=[
            {
                "client_id": client_id(bill),
                "invoice_date": bill.issued_on.isoformat(),
                "duedate": bill.due_on.isoformat(),
                "reference": reference_for(bill.key),
                "order_number": bill.number,
                "notes_1": f"{bill.device_count} devices, {bill.period_start.isoformat()} to {bill.period_end.isoformat()}",
                "internal_note": marker_for(bill).render(),
                "period_start_date": bill.period_start.isoformat(),
                "period_end_date": bill.period_end.isoformat(),
                "lines": _lines(bill),
            }
        ],
    )


def saved_id(body: Any) -> int:
    """The id of the saved invoice; Halo answers the object, or a list of them."""
    saved = body[0] if isinstance(body, list) and body else body
    if not isinstance(saved, dict) or not isinstance(saved.get("id"), int):
        raise PermanentError("HaloPSA answered the invoice write without the saved invoice's id")
    return saved["id"]


def _number(value: Any, what: str) -> Decimal:
    try:
        return Decimal(str(value if value is not None else 0))
    except InvalidOperation:
        raise PermanentError(f"HaloPSA answered a {what} that is not a number: {value!r}") from None


def _num(value: Decimal) -> float | int:
    return int(value) if value == value.to_integral_value() else float(value)


def invoice_records(rows: Sequence[Mapping[str, Any]], period_start: date, period_end: date) -> list[PsaRecord]:
    """Records of the gateway's invoices whose cycle lies in the period."""
    return [r for row in rows if (r := invoice_record(row, period_start, period_end)) is not None]


def invoice_record(row: Mapping[str, Any], period_start: date = date.min, period_end: date = date.max) -> PsaRecord | None:
    marker = parse_marker(row.get("internal_note"))
    if marker is None or not in_period(marker, period_start, period_end):
        return None
    lines = row.get("lines")
    if isinstance(lines, list) and lines:
        amounts = (_number(line.get("net_amount"), "line net_amount") for line in lines if isinstance(line, dict))
        amount = sum(amounts, Decimal(0))
    else:
        amount = _number(row.get("total"), "invoice total")
    return PsaRecord(
        key=marker.key,
        company_external_id=str(row.get("client_id", "")),
        external_id=str(row["id"]),
        quantity=Decimal(marker.devices),
        amount=amount.quantize(CENT, ROUND_HALF_UP),
    )

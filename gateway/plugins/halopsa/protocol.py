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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any
from urllib.parse import quote

from gateway.adapters import BillDocument, PsaCompany, PsaRecord
from gateway.errors import PermanentError
from gateway.options import choice_option, int_option, refuse_unknown, text_option
from gateway.plugins import psa_bills
from gateway.plugins.sans_io import Request

VENDOR = "HaloPSA"
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 500
OPTIONS = ("delivery", "tenant", "page_size")


@dataclass(frozen=True)
class Config:
    """The per-connection options of a HaloPSA connection, checked once."""

    tenant: str | None = None
    page_size: int = DEFAULT_PAGE_SIZE

    @classmethod
    def from_options(cls, connection: str, options: Mapping[str, Any]) -> Config:
        """Every bad option is a ConfigError naming the connection, the option and what it takes.

        HaloPSA bills go out as invoices only, so ``delivery`` takes just ``"invoice"``.
        """
        refuse_unknown(connection, VENDOR, options, OPTIONS)
        choice_option(connection, options, "delivery", ("invoice",), "invoice")
        return cls(
            tenant=text_option(connection, options, "tenant", example="yourcompany"),
            page_size=int_option(connection, options, "page_size", DEFAULT_PAGE_SIZE, 1, MAX_PAGE_SIZE),
        )


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


# --- invoices ------------------------------------------------------------------------------


def client_id(bill: BillDocument) -> int:
    return psa_bills.company_id(bill, VENDOR, noun="client")


def client_invoices_request(bill: BillDocument, page_no: int, page_size: int) -> Request:
    return page_request("Invoice", page_no, page_size, client_id=client_id(bill))


def all_invoices_request(page_no: int, page_size: int) -> Request:
    return page_request("Invoice", page_no, page_size, includelines=True)


def matching(rows: Sequence[Mapping[str, Any]], key: str) -> list[Mapping[str, Any]]:
    """Invoices carrying ``key`` (reference and marker), oldest first."""
    reference = psa_bills.reference_for(key)
    return psa_bills.matching([row for row in rows if row.get("reference") == reference], "internal_note", key)


def refuse_duplicates(found: Sequence[Mapping[str, Any]], bill: BillDocument) -> None:
    psa_bills.refuse_duplicates(found, bill, "invoices", VENDOR)


def delete_invoice_request(invoice_id: int) -> Request:
    return Request("DELETE", f"Invoice/{invoice_id}")


def _lines(bill: BillDocument) -> list[dict[str, Any]]:
    return [
        {
            "item_shortdescription": text[:255],
            "qty_order": psa_bills.json_number(quantity),
            "unit_price": psa_bills.json_number(price),
        }
        for text, quantity, price in psa_bills.priced_lines(bill)
    ]


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
                "reference": psa_bills.reference_for(bill.key),
                "order_number": bill.number,
                "notes_1": f"{bill.device_count} devices, {bill.period_start.isoformat()} to {bill.period_end.isoformat()}",
                "internal_note": psa_bills.marker_for(bill).render(),
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
    return psa_bills.number(value, what, VENDOR)


def invoice_records(rows: Sequence[Mapping[str, Any]], period_start: date, period_end: date) -> list[PsaRecord]:
    """Records of the gateway's invoices whose cycle lies in the period."""
    return [r for row in rows if (r := invoice_record(row, period_start, period_end)) is not None]


def invoice_record(row: Mapping[str, Any], period_start: date = date.min, period_end: date = date.max) -> PsaRecord | None:
    marker = psa_bills.marker_in_period(row.get("internal_note"), period_start, period_end)
    if marker is None:
        return None
    lines = row.get("lines")
    if isinstance(lines, list) and lines:
        amounts = (_number(line.get("net_amount"), "line net_amount") for line in lines if isinstance(line, dict))
        amount = sum(amounts, Decimal(0))
    else:
        amount = _number(row.get("total"), "invoice total")
    return psa_bills.bill_record(marker, row.get("client_id"), row["id"], amount)

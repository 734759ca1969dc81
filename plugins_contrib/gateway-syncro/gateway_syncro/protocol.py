"""Syncro (SyncroMSP) REST API v1, sans I/O: what to ask for and how to read the answers.

Syncro is a PSA and an RMM in one tool, so this plugin provides two adapter kinds over
the same API: ``syncro-rmm`` (customers as organisations, assets as devices) and
``syncro-psa`` (customers as companies, invoices as bills). Where each fact comes from:

- Base ``https://<subdomain>.syncromsp.com/api/v1``; the API token goes in
  ``Authorization: Bearer <token>`` (the swagger's ``bearerAuth`` scheme; the legacy
  ``?api_key=`` query parameter would put the secret in every logged URL, so it is never
  used). Tokens are made under *Admin → API Tokens* with per-area permissions
  (https://api-docs.syncromsp.com/, https://docs.n8n.io/integrations/builtin/credentials/syncromsp/).
- Lists take ``?page=N`` (1-based, 25 rows a page, not adjustable) and answer
  ``{"<things>": [...], "meta": {"total_pages", "total_entries", "per_page", "page"}}``
  (swagger ``customers_get``, ``customer_assets_get``, ``invoices_get``: "each 'page'
  contains 25 results"; generated client watchmanmonitoring/wm-syncromsp-swagger-client,
  docs/CustomerApi.md, docs/AssetApi.md, docs/InvoiceApi.md).
- Limit: 180 requests per minute per IP address (as public Syncro clients state it, e.g.
  a connector "checked against api-docs.syncromsp.com/swagger.json", and the Syncro API
  notes of wyre-technology/msp-claude-plugins). Decision: each kind defaults to 90 a
  minute, so an RMM and a PSA connection to the same Syncro account stay under the
  account's limit together; a connection used alone can raise it with ``rate_limit``.
- Customers: ``id``, ``business_name``, ``firstname``, ``lastname``, ``fullname``,
  ``business_then_name``. The name shown is ``business_then_name`` (Syncro's own choice:
  the business name, else the person's), then ``business_name``, then ``fullname``.
- Assets (``GET /customer_assets``): ``id``, ``name``, ``customer_id``, ``asset_type``,
  ``asset_serial``, ``created_at``, and the agent's last check-in at
  ``properties.kabuto_information.last_synced_at`` (Syncro's agent was called Kabuto;
  public Syncro asset-export scripts read it there). The list has no online flag.
  Decision: a device counts as online when it checked in within the last 15 minutes.
- Invoices: ``POST /invoices`` takes ``customer_id``, ``number``, ``date``, ``due_date``,
  ``po_number``, ``note`` and ``line_items`` (``name``, ``item``, ``quantity``, ``price``,
  ``taxable``); ``GET /invoices/{id}`` "retrieves an Invoice by ID or Number"; a listed or
  fetched invoice has ``subtotal``, ``tax`` and ``total`` as strings (swagger ``Body12``,
  ``InvoicesLineItems``, ``InlineResponse2002``). ``GET /invoices`` filters by
  ``since_updated_at``.

How a bill stays exactly-once (G2): the invoice ``number`` is the gateway's bill number,
and the first line of the invoice ``note`` is a marker ``gateway-bill key=… period=…/…
devices=N``. A push first fetches the invoice by number: found with the same key means
delivered already. Syncro refuses a second invoice with a number that is taken (422), so
a create whose response was lost and that was sent again is recognised by fetching the
number once more. Read-back (G3) lists invoices updated since the period began and keeps
those whose marker names a cycle inside the period; the amount read back is Syncro's
``subtotal`` (the sum of the lines it holds, before any tax Syncro adds).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any
from urllib.parse import quote, unquote

from gateway import BillDocument, PermanentError, PsaCompany, PsaRecord, RateLimit, RmmDevice, RmmOrganization

API_PREFIX = "/api/v1"
CUSTOMERS_PATH = f"{API_PREFIX}/customers"
ASSETS_PATH = f"{API_PREFIX}/customer_assets"
INVOICES_PATH = f"{API_PREFIX}/invoices"
PAGE_SIZE = 25
TOOL_RATE_LIMIT = RateLimit(requests=180, per_seconds=60.0)
DEFAULT_RATE_LIMIT = RateLimit(requests=90, per_seconds=60.0, max_concurrent=2)
ONLINE_WITHIN = timedelta(minutes=15)
MARKER_PREFIX = "gateway-bill"
CENT = Decimal("0.01")


# --- auth and paging -------------------------------------------------------------------


def auth_headers(api_token: str) -> dict[str, str]:
    """Headers that authenticate every request."""
    return {"Authorization": f"Bearer {api_token}", "Accept": "application/json"}


def page_params(page: int, **extra: Any) -> dict[str, Any]:
    """Query for page ``page`` (1-based) of a list."""
    return {**extra, "page": page}


@dataclass(frozen=True)
class Page:
    """One page of a list: its rows and the number of the next page (None after the last)."""

    rows: list[dict[str, Any]]
    next_page: int | None


def parse_page(body: Any, key: str) -> Page:
    """One page of a ``GET`` list answered as ``{key: [...], "meta": {...}}``."""
    if not isinstance(body, dict) or not isinstance(body.get(key), list):
        raise PermanentError(f"Syncro answered the {key} list without a {key!r} array")
    rows = body[key]
    if not all(isinstance(row, dict) for row in rows):
        raise PermanentError(f"Syncro sent a {key} row that is not an object")
    meta = body.get("meta")
    if not isinstance(meta, dict):
        raise PermanentError(f"Syncro answered the {key} list without 'meta' paging information")
    try:
        page = int(meta.get("page", 1))
        total_pages = int(meta.get("total_pages", 0))
    except (TypeError, ValueError):
        raise PermanentError(f"Syncro sent paging information that is not numeric: {meta!r}") from None
    return Page(rows, page + 1 if page < total_pages else None)


def cursor_page(cursor: str | None) -> int:
    """The page a device pull resumes at; the cursor is the next page's number."""
    if cursor is None:
        return 1
    if not cursor.isdigit() or int(cursor) < 1:
        raise PermanentError(f"the stored cursor {cursor!r} is not a Syncro page number; reset the connection's cursor")
    return int(cursor)


# --- customers, organisations, companies ------------------------------------------------


def customer_name(row: Mapping[str, Any]) -> str:
    """The name Syncro shows for a customer."""
    for key in ("business_then_name", "business_name", "fullname"):
        if row.get(key):
            return str(row[key])
    return " ".join(str(row[k]) for k in ("firstname", "lastname") if row.get(k)) or f"customer {row.get('id')}"


def parse_organizations(rows: list[dict[str, Any]]) -> list[RmmOrganization]:
    return [RmmOrganization(external_id=str(_required(row, "id", "customer")), name=customer_name(row)) for row in rows]


def parse_companies(rows: list[dict[str, Any]]) -> list[PsaCompany]:
    return [PsaCompany(external_id=str(_required(row, "id", "customer")), name=customer_name(row)) for row in rows]


# --- assets -----------------------------------------------------------------------------


def parse_asset(row: Mapping[str, Any], now: datetime) -> RmmDevice:
    """One asset of ``GET /customer_assets`` as a device; ``now`` decides ``online``."""
    asset_id = _required(row, "id", "asset")
    customer_id = _required(row, "customer_id", f"asset {asset_id}")
    properties = row.get("properties")
    if not isinstance(properties, dict):
        properties = {}
    kabuto = properties.get("kabuto_information")
    if not isinstance(kabuto, dict):
        kabuto = {}
    last_contact = timestamp(kabuto.get("last_synced_at"), f"asset {asset_id} last_synced_at")
    return RmmDevice(
        external_id=str(asset_id),
        org_external_id=str(customer_id),
        hostname=str(row.get("name") or asset_id),
        device_class=str(row.get("asset_type") or ""),
        online=last_contact is not None and now - last_contact <= ONLINE_WITHIN,
        deleted=False,  # Syncro does not list deleted assets
        last_contact=last_contact,
        created_at=timestamp(row.get("created_at"), f"asset {asset_id} created_at"),
    )


def timestamp(value: Any, what: str) -> datetime | None:
    """Syncro's ISO 8601 timestamps (with an offset) as aware UTC datetimes."""
    if value in (None, ""):
        return None
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise PermanentError(f"Syncro sent {what} that is not an ISO 8601 time: {value!r}") from None
    if parsed.tzinfo is None:
        raise PermanentError(f"Syncro sent {what} without a time zone: {value!r}")
    return parsed.astimezone(UTC)


# --- invoices ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Marker:
    """What the gateway writes on the first line of an invoice note."""

    key: str
    period_start: date
    period_end: date
    devices: int

    def text(self) -> str:
        return (
            f"{MARKER_PREFIX} key={quote(self.key, safe=':-_./@')} "
            f"period={self.period_start.isoformat()}/{self.period_end.isoformat()} devices={self.devices}"
        )


_MARKER = re.compile(
    rf"^{MARKER_PREFIX} key=(?P<key>\S+) period=(?P<start>\d{{4}}-\d{{2}}-\d{{2}})/(?P<end>\d{{4}}-\d{{2}}-\d{{2}}) "
    r"devices=(?P<devices>\d+)",
    re.MULTILINE,
)


def parse_marker(note: Any) -> Marker | None:
    """The marker in an invoice note, or None when the gateway did not write the invoice."""
    match = _MARKER.search(note) if isinstance(note, str) else None
    if match is None:
        return None
    return Marker(unquote(match["key"]), date.fromisoformat(match["start"]), date.fromisoformat(match["end"]),
                  int(match["devices"]))


def invoice_path(id_or_number: str) -> str:
    """``GET /invoices/{id}`` accepts an id or an invoice number."""
    return f"{INVOICES_PATH}/{quote(id_or_number, safe='')}"


def invoice_body(bill: BillDocument) -> dict[str, Any]:
    """The body of ``POST /invoices`` for ``bill``."""
    marker = Marker(bill.key, bill.period_start, bill.period_end, bill.device_count)
    note = (
        f"{marker.text()}\n"
        f"Devices {bill.period_start.isoformat()} to {bill.period_end.isoformat()}: {bill.device_count}. "
        "Written by the license gateway; edit the bill there, not here."
    )
    try:
        customer_id = int(bill.company_external_id)
    except ValueError:
        raise PermanentError(
            f"bill {bill.number} is addressed to Syncro customer {bill.company_external_id!r}, which is not a "
            "Syncro customer id; map the customer to a Syncro customer"
        ) from None
    return {
        "customer_id": customer_id,
        "number": bill.number,
        "date": bill.issued_on.isoformat(),
        "due_date": bill.due_on.isoformat(),
        "note": note,
        "line_items": [
            {
                "item": line.description[:60],
                "name": line.description,
                "quantity": str(line.quantity),
                "price": str(line.unit_price),
                "taxable": False,
            }
            for line in bill.lines
        ],
    }


def parse_invoice(body: Any) -> dict[str, Any]:
    """The invoice object of ``GET /invoices/{id}`` or ``POST /invoices`` (``{"invoice": {...}}``)."""
    invoice = body.get("invoice") if isinstance(body, dict) else None
    if not isinstance(invoice, dict) or invoice.get("id") is None:
        raise PermanentError("Syncro answered without an 'invoice' object that has an id")
    return invoice


def is_same_bill(invoice: Mapping[str, Any], bill: BillDocument) -> bool:
    """Whether ``invoice`` is ``bill`` as the gateway wrote it (its number and its key)."""
    marker = parse_marker(invoice.get("note"))
    return str(invoice.get("number")) == bill.number and marker is not None and marker.key == bill.key


def invoice_record(invoice: Mapping[str, Any], period_start: date, period_end: date) -> PsaRecord | None:
    """What Syncro holds for a gateway bill whose cycle lies in the period, else None."""
    marker = parse_marker(invoice.get("note"))
    if marker is None or marker.period_start < period_start or marker.period_end > period_end:
        return None
    return PsaRecord(
        key=marker.key,
        company_external_id=str(invoice.get("customer_id", "")),
        external_id=str(invoice["id"]),
        quantity=Decimal(marker.devices),
        amount=money(invoice.get("subtotal"), f"invoice {invoice['id']} subtotal"),
    )


def money(value: Any, what: str) -> Decimal:
    """Syncro's money strings as Decimal cents."""
    try:
        return Decimal(str(value if value is not None else "0")).quantize(CENT, ROUND_HALF_UP)
    except InvalidOperation:
        raise PermanentError(f"Syncro sent {what} that is not a number: {value!r}") from None


def _required(row: Mapping[str, Any], key: str, what: str) -> Any:
    value = row.get(key)
    if value is None:
        raise PermanentError(f"Syncro sent a {what} without {key!r}")
    return value

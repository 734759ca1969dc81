"""Autotask PSA REST API v1.0, sans I/O: requests to build, responses to read.

What Autotask lets an integration write decides how a bill is delivered. ``Invoices``
can be queried and updated but **not created** over REST (Autotask makes invoices in
its own *Approve and Post → Invoices* run from billing items), so the gateway writes
the billing items that run turns into invoice lines (``options.delivery``):

``"charge"`` (default)
    One ``ContractCharges`` row per bill line on the company's active contract
    (``POST /Contracts/{id}/Charges``, with ``billingCodeID`` = ``options.billing_code_id``),
    each carrying the bill key in ``internalPurchaseOrderNumber`` and a marker line in
    ``description``. Autotask computes ``billableAmount`` = units × unit price; read-back
    adds those up per bill. A push interrupted between lines adds the missing lines next time.

``"contract_service"``
    The units of service ``options.service_id`` on the company's active *Recurring
    Service* contract are brought to the cycle's device count by one
    ``ContractServiceAdjustments`` create (``unitChange`` = wanted − current,
    ``effectiveDate`` = cycle start). Adjustments are create-only and cannot be queried,
    so the push is made idempotent by the state itself: the current units for the cycle
    come from ``ContractServiceUnits``, and nothing is sent when they already match. The
    marker goes into the contract service's ``internalDescription`` *before* the units
    change (after the adjustment when that creates the service; a repeated push writes
    it again, so a crash in between heals). The unit price is the bill total / device
    count (6 places). A contract service holds one marker, the
    latest bill's: read-back sees that cycle. A second bill for that cycle (a customer
    with two plans, or a plan and monthly billing) is refused rather than overwriting
    it (such customers need ``"charge"`` delivery), and so is a late bill for an earlier
    cycle (a back-dated adjustment would change every later period's units too).

Every query is ``POST /{Entity}/query`` with a JSON filter, at most 500 records a page,
followed through ``pageDetails.nextPageUrl``. ``"invoice"`` is refused with a
ConfigError that says why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any

from gateway.adapters import BillDocument, PsaCompany, PsaRecord
from gateway.errors import ConfigError, PermanentError
from gateway.options import choice_option, int_option, refuse_unknown, url_option
from gateway.plugins import psa_bills
from gateway.plugins.sans_io import Request

VENDOR = "Autotask"
MAX_RECORDS = 500
PO_MAX = 50
DELIVERIES = ("charge", "contract_service")
OPTIONS = ("delivery", "billing_code_id", "service_id", "zone_url", "page_size")
ZONE_URL_EXAMPLE = "https://webservices15.autotask.net/atservicesrest/"
RECURRING_SERVICE = 7  # Contracts.contractType picklist value
CHARGEABLE_TYPES = (1, 3, RECURRING_SERVICE)  # time & materials, fixed price, recurring service
ACTIVE = 1  # Contracts.status picklist value


@dataclass(frozen=True)
class Config:
    """The per-connection options of an Autotask connection, checked once."""

    delivery: str = "charge"
    billing_code_id: int | None = None
    service_id: int | None = None
    zone_url: str | None = None
    page_size: int = MAX_RECORDS

    @classmethod
    def from_options(cls, connection: str, options: Mapping[str, Any]) -> Config:
        """Every bad option is a ConfigError naming the connection, the option and what it takes."""
        refuse_unknown(connection, VENDOR, options, OPTIONS)
        if options.get("delivery") == "invoice":
            raise ConfigError(
                f"connection {connection!r}: Autotask does not let integrations create invoices over REST "
                '(the Invoices entity is query/update only); use options.delivery = "charge" (contract charges '
                'that Autotask invoices) or "contract_service" (units of a recurring service)'
            )
        delivery = choice_option(connection, options, "delivery", DELIVERIES, "charge")
        billing_code_id = int_option(connection, options, "billing_code_id", None)
        service_id = int_option(connection, options, "service_id", None)
        if delivery == "charge" and billing_code_id is None:
            raise ConfigError(
                f"connection {connection!r}: charge delivery needs options.billing_code_id, the id of the "
                "Material Cost Code (billing code) the charges are booked to"
            )
        if delivery == "contract_service" and service_id is None:
            raise ConfigError(
                f"connection {connection!r}: contract_service delivery needs options.service_id, the id of the "
                "Autotask service whose units carry the device count"
            )
        page_size = int_option(connection, options, "page_size", MAX_RECORDS, 1, MAX_RECORDS)
        zone = url_option(connection, options, "zone_url", ZONE_URL_EXAMPLE)
        return cls(delivery, billing_code_id, service_id, zone, page_size)


# --- zone and auth ---------------------------------------------------------------------


def auth_headers(username: str, secret: str, integration_code: str) -> dict[str, str]:
    """Autotask authenticates every request with these three headers."""
    return {"ApiIntegrationCode": integration_code, "UserName": username, "Secret": secret, "Accept": "application/json"}


def zone_request(lookup_base: str, username: str) -> Request:
    return Request("GET", f"{lookup_base.rstrip('/')}/atservicesrest/v1.0/zoneInformation", params={"user": username})


def api_base(zone_body: Any) -> str:
    """``{zone url}v1.0`` from a ``zoneInformation`` answer (``url`` ends in ``/atservicesrest/``)."""
    url = zone_body.get("url") if isinstance(zone_body, dict) else None
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise PermanentError("Autotask zoneInformation answered without a zone url; check credentials.username")
    return f"{url.rstrip('/')}/v1.0"


# --- queries and paging ----------------------------------------------------------------------


def eq(field: str, value: Any) -> dict[str, Any]:
    return {"op": "eq", "field": field, "value": value}


def query_request(entity: str, filters: Sequence[Mapping[str, Any]], page_size: int = MAX_RECORDS) -> Request:
    return Request("POST", f"{entity}/query", json={"filter": list(filters), "MaxRecords": min(page_size, MAX_RECORDS)})


def parse_page(body: Any, entity: str) -> tuple[list[dict[str, Any]], str | None]:
    """The items of one query answer and the URL of the next page (None on the last)."""
    if not isinstance(body, dict) or not isinstance(body.get("items"), list):
        raise PermanentError(f"Autotask answered a {entity} query without an items list")
    details = body.get("pageDetails") or {}
    next_url = details.get("nextPageUrl") if isinstance(details, dict) else None
    return [item for item in body["items"] if isinstance(item, dict)], next_url or None


def companies_request(page_size: int = MAX_RECORDS) -> Request:
    return query_request("Companies", [eq("isActive", True)], page_size)


def parse_companies(rows: Sequence[Mapping[str, Any]]) -> list[PsaCompany]:
    return [PsaCompany(external_id=str(row["id"]), name=str(row.get("companyName") or "")) for row in rows]


def created_item_id(body: Any, entity: str) -> int:
    if not isinstance(body, dict) or not isinstance(body.get("itemId"), int):
        raise PermanentError(f"Autotask answered the {entity} create without an itemId")
    return body["itemId"]


def company_id(bill: BillDocument) -> int:
    return psa_bills.company_id(bill, VENDOR)


def number(value: Any, what: str) -> Decimal:
    return psa_bills.number(value, what, VENDOR)


def _day(value: date) -> str:
    # Date-only fields: Autotask keeps the date and ignores the time for these.
    return f"{value.isoformat()}T00:00:00"


# --- contracts ------------------------------------------------------------------------------------


def contracts_request(bill: BillDocument, *, recurring_only: bool) -> Request:
    filters = [eq("companyID", company_id(bill)), eq("status", ACTIVE)]
    if recurring_only:
        filters.append(eq("contractType", RECURRING_SERVICE))
    return query_request("Contracts", filters)


def contracts_by_id_request(ids: Sequence[int]) -> Request:
    return query_request("Contracts", [{"op": "in", "field": "id", "value": sorted(set(ids))}])


def pick_contract(rows: Sequence[Mapping[str, Any]], bill: BillDocument, *, recurring_only: bool) -> Mapping[str, Any]:
    allowed = (RECURRING_SERVICE,) if recurring_only else CHARGEABLE_TYPES
    usable = [row for row in rows if row.get("status") == ACTIVE and row.get("contractType") in allowed]
    if not usable:
        kind = "recurring service contract" if recurring_only else "time & materials, fixed price or recurring contract"
        raise PermanentError(
            f"Autotask company {bill.company_external_id} has no active {kind} to bill bill {bill.number} against; "
            "create one in Autotask (Contracts > New Contract)"
        )
    return min(usable, key=lambda row: int(row["id"]))


# --- charge delivery ----------------------------------------------------------------------------


def charges_for_key_request(bill: BillDocument) -> Request:
    return query_request("ContractCharges", [eq("internalPurchaseOrderNumber", psa_bills.reference_for(bill.key))])


def charges_by_line(rows: Sequence[Mapping[str, Any]], bill: BillDocument) -> dict[int, list[Mapping[str, Any]]]:
    """The bill's charges grouped by line number, oldest (lowest id) first in each group."""
    groups: dict[int, list[Mapping[str, Any]]] = {}
    for row in sorted(rows, key=lambda r: int(r["id"])):
        marker = psa_bills.parse_marker(row.get("description"))
        if marker is not None and marker.key == bill.key:
            groups.setdefault(marker.line, []).append(row)
    return groups


def lines_present(rows: Sequence[Mapping[str, Any]], bill: BillDocument) -> dict[int, Mapping[str, Any]]:
    """Charges already written for the bill, by line number.

    Two charges for one line found before a push bill the customer twice: a person must
    delete one (the gateway only removes copies it just made itself, see :func:`extra_charges`).
    """
    present = {}
    for line, group in charges_by_line(rows, bill).items():
        psa_bills.refuse_duplicates(group, bill, "contract charges", VENDOR, part=f"line {line} of ")
        present[line] = group[0]
    return present


def extra_charges(rows: Sequence[Mapping[str, Any]], bill: BillDocument) -> list[Mapping[str, Any]]:
    """All but the oldest charge of each line: the copies a re-sent create (lost answer) left behind."""
    return [row for group in charges_by_line(rows, bill).values() for row in group[1:]]


def delete_charge_request(contract_id: int, charge_id: int) -> Request:
    return Request("DELETE", f"Contracts/{contract_id}/Charges/{charge_id}")


def missing_charge_requests(
    bill: BillDocument, contract_id: int, present: Mapping[int, Any], config: Config
) -> list[tuple[int, Request]]:
    """(line number, create request) for each bill line not yet in Autotask."""
    requests = []
    for line, (description, quantity, price) in enumerate(psa_bills.priced_lines(bill), start=1):
        if line in present:
            continue
        requests.append((
            line,
            Request(
                "POST",
                f"Contracts/{contract_id}/Charges",
                json={
                    "contractID": contract_id,
                    "name": description[:100],
                    "description": f"{description}\n{psa_bills.marker_for(bill, line).render()}",
                    "unitQuantity": psa_bills.json_number(quantity),
                    "unitPrice": psa_bills.json_number(price),
                    "unitCost": 0,
                    "datePurchased": _day(bill.issued_on),
                    "billingCodeID": config.billing_code_id,
                    "isBillableToCompany": True,
                    "internalPurchaseOrderNumber": psa_bills.reference_for(bill.key),
                    "purchaseOrderNumber": bill.number[:PO_MAX],
                },
            ),
        ))
    return requests


def gateway_charges_request(period_start: date) -> Request:
    # A charge is dated when the bill is issued, never before its cycle starts.
    return query_request(
        "ContractCharges",
        [
            {"op": "contains", "field": "description", "value": psa_bills.MARKER_PREFIX},
            {"op": "gte", "field": "datePurchased", "value": _day(period_start)},
        ],
    )


def charge_records(
    rows: Sequence[Mapping[str, Any]], company_of_contract: Mapping[int, int], period_start: date, period_end: date
) -> list[PsaRecord]:
    """One record per bill key: the sum of all its charges' ``billableAmount``, duplicates included (G3 shows them)."""
    grouped: dict[str, list[tuple[psa_bills.Marker, Mapping[str, Any]]]] = {}
    for row in rows:
        if (marker := psa_bills.marker_in_period(row.get("description"), period_start, period_end)) is not None:
            grouped.setdefault(marker.key, []).append((marker, row))
    records = []
    for items in grouped.values():
        items.sort(key=lambda item: (item[0].line, int(item[1]["id"])))
        marker, first = items[0]
        amount = sum((number(row.get("billableAmount"), "charge billableAmount") for _, row in items), Decimal(0))
        company = company_of_contract.get(int(first.get("contractID") or 0))
        records.append(psa_bills.bill_record(marker, company, first["id"], amount))
    return records


# --- contract service delivery ----------------------------------------------------------------------


def contract_service_request(contract_id: int, config: Config) -> Request:
    return query_request("ContractServices", [eq("contractID", contract_id), eq("serviceID", config.service_id)])


def units_request(contract_service_id: int, on: date) -> Request:
    return query_request(
        "ContractServiceUnits",
        [
            eq("contractServiceID", contract_service_id),
            {"op": "lte", "field": "startDate", "value": _day(on)},
            {"op": "gte", "field": "endDate", "value": _day(on)},
        ],
    )


def current_units(rows: Sequence[Mapping[str, Any]]) -> tuple[int, Decimal]:
    """Units and unit price in force on the day asked for (0 when the service has none yet)."""
    if not rows:
        return 0, Decimal(0)
    row = max(rows, key=lambda r: str(r.get("startDate") or ""))
    return int(number(row.get("units"), "units")), number(row.get("price"), "unit price")


def refuse_overwrite(service: Mapping[str, Any], bill: BillDocument) -> None:
    """Units hold one bill: not a second one for their cycle, nor one for an earlier cycle.

    (An adjustment dated in the past changes every later period too.)
    """
    psa_bills.refuse_overwrite(
        psa_bills.parse_marker(service.get("internalDescription")),
        bill,
        f"Autotask contract service {service['id']}",
        'options.delivery = "charge" (contract charges per bill)',
    )


def adjustment_request(contract_id: int, bill: BillDocument, current: int, config: Config) -> Request:
    return Request(
        "POST",
        "ContractServiceAdjustments",
        json={
            "contractID": contract_id,
            "serviceID": config.service_id,
            "effectiveDate": _day(bill.period_start),
            "unitChange": bill.device_count - current,
            "adjustedUnitPrice": psa_bills.json_number(psa_bills.unit_price_for(bill)),
        },
    )


def mark_service_request(contract_id: int, contract_service_id: int, bill: BillDocument) -> Request:
    return Request(
        "PATCH",
        f"Contracts/{contract_id}/Services",
        json={"id": contract_service_id, "internalDescription": psa_bills.marker_for(bill).render()},
    )


def bill_services(rows: Sequence[Mapping[str, Any]], bill: BillDocument) -> list[Mapping[str, Any]]:
    """The contract services whose marker carries the bill's key, oldest first."""
    return psa_bills.matching(rows, "internalDescription", bill.key)


def marked_services_request() -> Request:
    marked = {"op": "contains", "field": "internalDescription", "value": psa_bills.MARKER_PREFIX}
    return query_request("ContractServices", [marked])


def service_record(service: Mapping[str, Any], units: int, price: Decimal, company: int | None) -> PsaRecord | None:
    marker = psa_bills.parse_marker(service.get("internalDescription"))
    if marker is None:
        return None
    return psa_bills.bill_record(marker, company, service["id"], units * price, Decimal(units))

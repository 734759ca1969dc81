"""Autotask protocol functions on recorded-shape bodies: no network."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from functools import partial

import builders
import pytest

from gateway.errors import ConfigError, PermanentError
from gateway.plugins.autotask import protocol as p
from gateway.plugins.psa_bills import marker_for, parse_marker

bill = partial(builders.bill, "29683579", devices=12, key="at-main:cust-3:2026-02", number="INV-2026-0107",
               customer_name="Northwind Clinic")


# A zoneInformation answer as Autotask returns it.
ZONE = {"zoneName": "America West 2", "url": "https://webservices15.autotask.net/ATServicesRest/",
        "webUrl": "https://ww15.autotask.net/", "ci": 12345}

# A query page as Autotask returns it (trimmed to the fields the adapter reads).
PAGE = {
    "items": [
        {"id": 29683579, "companyName": "Northwind Clinic", "isActive": True, "companyType": 1},
        {"id": 29683580, "companyName": "Tailspin Toys", "isActive": True, "companyType": 1},
    ],
    "pageDetails": {
        "count": 2,
        "requestCount": 2,
        "prevPageUrl": None,
        "nextPageUrl": "https://webservices15.autotask.net/ATServicesRest/V1.0/Companies/query/next?paging=%7B%22pageSize%22%3A2%7D&search=%7B%7D",
    },
}


def test_zone_answer_gives_the_versioned_api_base():
    assert p.api_base(ZONE) == "https://webservices15.autotask.net/ATServicesRest/v1.0"


def test_zone_answer_without_url_is_a_permanent_error_about_the_username():
    with pytest.raises(PermanentError, match="username"):
        p.api_base({"url": None})


def test_auth_is_three_headers():
    assert p.auth_headers("api@msp.example", "s3cr3t", "CODE") == {
        "ApiIntegrationCode": "CODE", "UserName": "api@msp.example", "Secret": "s3cr3t", "Accept": "application/json"}


def test_query_page_items_and_next_url():
    items, next_url = p.parse_page(PAGE, "Companies")
    assert [c.name for c in p.parse_companies(items)] == ["Northwind Clinic", "Tailspin Toys"]
    assert next_url.startswith("https://webservices15.autotask.net/") and "/Companies/query/next" in next_url
    assert p.parse_page({"items": [], "pageDetails": {"nextPageUrl": None}}, "Companies") == ([], None)


def test_query_body_caps_max_records_at_500():
    request = p.query_request("Companies", [p.eq("isActive", True)], page_size=900)
    assert request.method == "POST" and request.url == "Companies/query"
    assert request.json == {"filter": [{"op": "eq", "field": "isActive", "value": True}], "MaxRecords": 500}


def test_invoice_delivery_is_refused_because_autotask_invoices_cannot_be_created():
    with pytest.raises(ConfigError, match="cannot|not let") as info:
        p.Config.from_options("at-main", {"delivery": "invoice"})
    assert "charge" in str(info.value) and "contract_service" in str(info.value)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"delivery": "charge"}, "charge delivery needs options.billing_code_id"),
        ({"delivery": "contract_service"}, "contract_service delivery needs options.service_id"),
        ({"delivery": "charge", "billing_code_id": "abc"},
         "options.billing_code_id must be a whole number of at least 1, got 'abc'"),
        ({"billing_code_id": 0}, "options.billing_code_id must be a whole number of at least 1, got 0"),
        ({"billing_code_id": 2001.5}, "options.billing_code_id must be a whole number"),
        ({"delivery": "contract_service", "service_id": "one"}, "options.service_id must be a whole number"),
        ({"delivery": "units", "service_id": 1}, "options.delivery must be one of charge, contract_service, got 'units'"),
        ({"billing_code_id": 1, "page_size": 501}, "options.page_size must be a whole number from 1 to 500, got 501"),
        ({"billing_code_id": 1, "page_size": "x"}, "options.page_size must be a whole number from 1 to 500, got 'x'"),
        ({"billing_code_id": 1, "zone_url": "webservices15.autotask.net"}, "options.zone_url must be an http.s. URL"),
        ({"billing_code_id": 1, "zone_url": 15}, "options.zone_url must be a non-blank text"),
        ({"billing_code_id": 1, "zone": "x"}, "unknown option.*zone .*known: billing_code_id"),
    ],
)
def test_missing_or_bad_options_are_config_errors_naming_the_connection_and_the_option(options, message):
    with pytest.raises(ConfigError, match=message) as info:
        p.Config.from_options("at-main", options)
    assert str(info.value).startswith("connection 'at-main': ")


def test_good_options_are_read_with_their_defaults():
    options = {"delivery": "contract_service", "service_id": "3", "page_size": " 50", "zone_url": ZONE["url"]}
    assert p.Config.from_options("at-main", options) == p.Config("contract_service", None, 3, ZONE["url"], 50)
    assert p.Config.from_options("at-main", {"billing_code_id": 2001}) == p.Config("charge", 2001, None, None, 500)


def test_g2_charges_carry_the_key_and_one_marker_line_each():
    config = p.Config(billing_code_id=2001)
    requests = p.missing_charge_requests(bill(), 77, {}, config)
    assert [line for line, _ in requests] == [1, 2]
    first = requests[0][1]
    assert first.url == "Contracts/77/Charges" and first.json["internalPurchaseOrderNumber"] == "at-main:cust-3:2026-02"
    assert (first.json["unitQuantity"], first.json["unitPrice"], first.json["billingCodeID"]) == (12, 2.5, 2001)
    assert parse_marker(first.json["description"]).line == 1


def test_g2_present_lines_are_not_sent_again():
    rows = [
        {"id": 5, "description": marker_for(bill(), 1).render()},
        {"id": 6, "description": marker_for(bill(key="other"), 2).render()},
    ]
    present = p.lines_present(rows, bill())
    assert {line: row["id"] for line, row in present.items()} == {1: 5}
    assert [line for line, _ in p.missing_charge_requests(bill(), 77, present, p.Config(billing_code_id=1))] == [2]


def test_g2_two_charges_for_one_line_are_refused_naming_both_ids():
    rows = [{"id": 9, "description": marker_for(bill(), 1).render()},
            {"id": 5, "description": marker_for(bill(), 1).render()}]
    with pytest.raises(PermanentError, match="line 1 of bill INV-2026-0107.*ids 5, 9"):
        p.lines_present(rows, bill())


def test_g3_charge_records_add_up_the_billable_amounts_per_bill():
    rows = [
        {"id": 1, "contractID": 77, "billableAmount": 30.0, "description": marker_for(bill(), 1).render()},
        {"id": 2, "contractID": 77, "billableAmount": 10.0, "description": marker_for(bill(), 2).render()},
        {"id": 3, "contractID": 77, "billableAmount": 99.0,
         "description": marker_for(bill(key="march", period_start=date(2026, 3, 1), period_end=date(2026, 3, 31))).render()},
    ]
    records = p.charge_records(rows, {77: 29683579}, date(2026, 2, 1), date(2026, 2, 28))
    assert [(r.key, r.company_external_id, r.external_id, r.quantity, r.amount) for r in records] == [
        ("at-main:cust-3:2026-02", "29683579", "1", Decimal(12), Decimal("40.00"))]


def test_adjustment_changes_units_by_the_difference_from_the_current_count():
    request = p.adjustment_request(77, bill(device_count=12), current=9, config=p.Config(service_id=3, delivery="contract_service"))
    assert request.url == "ContractServiceAdjustments"
    assert request.json["unitChange"] == 3 and request.json["serviceID"] == 3
    assert request.json["effectiveDate"] == "2026-02-01T00:00:00"
    assert Decimal(str(request.json["adjustedUnitPrice"])) == Decimal("3.333333")


def test_current_units_come_from_the_latest_unit_row_covering_the_day():
    rows = [
        {"id": 1, "startDate": "2026-02-01T00:00:00", "endDate": "2026-02-14T00:00:00", "units": 4, "price": 2.5},
        {"id": 2, "startDate": "2026-02-15T00:00:00", "endDate": "2026-02-28T00:00:00", "units": 6, "price": 2.5},
    ]
    assert p.current_units(rows) == (6, Decimal("2.5"))
    assert p.current_units([]) == (0, Decimal(0))


def test_no_usable_contract_is_a_permanent_error_naming_company_and_bill():
    rows = [{"id": 1, "status": 1, "contractType": 4}]  # a block hours contract cannot take charges
    with pytest.raises(PermanentError, match="29683579.*INV-2026-0107"):
        p.pick_contract(rows, bill(), recurring_only=False)

"""ConnectWise protocol functions on recorded-shape bodies: no network."""

from __future__ import annotations

import base64
from datetime import date
from decimal import Decimal
from functools import partial

import builders
import pytest

from gateway.errors import ConfigError, PermanentError
from gateway.plugins.connectwise import protocol as p
from gateway.plugins.psa_bills import marker_for, parse_marker

bill = partial(builders.bill, key="cw-main:cust-7:2026-02", number="INV-2026-0042", unit_price="5.00")


# A companyinfo body as ConnectWise cloud returns it.
COMPANY_INFO = {
    "CompanyName": "Example MSP",
    "Codebase": "v2025_1/",
    "VersionCode": "v2025.1",
    "VersionNumber": "v4.6.12345",
    "CompanyID": "examplemsp",
    "IsCloud": True,
    "SiteUrl": "api-na.myconnectwise.net",
}

LINK = (
    '<https://api-na.myconnectwise.net/v4_6_release/apis/3.0/company/companies?pageSize=1000&page=2>; rel="next", '
    '<https://api-na.myconnectwise.net/v4_6_release/apis/3.0/company/companies?pageSize=1000&page=9>; rel="last"'
)


def test_auth_header_is_basic_of_company_plus_public_colon_private_and_carries_client_id():
    headers = p.auth_headers("examplemsp", "pubKEY", "privKEY", "1234-client")
    assert base64.b64decode(headers["Authorization"].removeprefix("Basic ")).decode() == "examplemsp+pubKEY:privKEY"
    assert headers["clientId"] == "1234-client"


def test_api_base_uses_the_codebase_from_companyinfo():
    assert p.api_base("https://api-na.myconnectwise.net/", COMPANY_INFO) == "https://api-na.myconnectwise.net/v2025_1/apis/3.0"


def test_api_base_without_codebase_is_a_permanent_error():
    with pytest.raises(PermanentError, match="Codebase"):
        p.api_base("https://x.example", {"CompanyName": "x"})


def test_next_page_is_read_from_the_link_header_and_absent_on_the_last_page():
    assert p.next_page_url({"Link": LINK}).endswith("page=2")
    assert p.next_page_url({"Link": LINK.split(", ")[1]}) is None
    assert p.next_page_url({}) is None


def test_companies_skip_deleted_ones():
    rows = [
        {"id": 2, "identifier": "Acme", "name": "Acme Dental", "deletedFlag": False},
        {"id": 3, "identifier": "Gone", "name": "Gone Inc", "deletedFlag": True},
    ]
    assert [(c.external_id, c.name) for c in p.parse_companies(rows)] == [("2", "Acme Dental")]


def test_g2_find_invoice_queries_the_reference_of_the_company():
    request = p.find_invoice_request(bill())
    assert request.params["conditions"] == 'reference = "cw-main:cust-7:2026-02" and company/id = 12'


def test_a_company_id_that_is_not_a_connectwise_id_is_a_permanent_error_naming_the_bill():
    with pytest.raises(PermanentError, match="INV-2026-0042"):
        p.find_invoice_request(bill(company_external_id="acme"))


def test_invoice_create_carries_reference_po_dates_and_marker():
    body = p.create_invoice_request(bill(), p.Config()).json
    assert body["type"] == "Standard" and body["company"] == {"id": 12}
    assert body["reference"] == "cw-main:cust-7:2026-02" and body["customerPO"] == "INV-2026-0042"
    assert body["date"] == "2026-03-01T00:00:00Z" and body["dueDate"] == "2026-03-31T00:00:00Z"
    assert parse_marker(body["internalNotes"]).key == "cw-main:cust-7:2026-02"


def test_only_missing_product_lines_are_created_after_an_interrupted_push():
    existing = [{"id": 90, "sequenceNumber": 1}]
    requests = p.missing_product_requests(bill(), 5, existing, p.Config())
    assert [r.json["sequenceNumber"] for r in requests] == [2]
    assert requests[0].json["invoice"] == {"id": 5} and requests[0].json["price"] == 10


def test_addition_patch_is_one_json_patch_with_quantity_price_and_marker():
    ops = p.update_addition_request(4, 77, bill(total=Decimal("25.00"))).json
    assert ops[0] == {"op": "replace", "path": "quantity", "value": 3}
    assert ops[1]["path"] == "unitPrice" and Decimal(str(ops[1]["value"])) == Decimal("8.333333")
    assert parse_marker(ops[2]["value"]).devices == 3


def test_g3_addition_record_amount_is_quantity_times_price_to_the_cent():
    row = {"id": 77, "quantity": 3.0, "unitPrice": 8.333333, "invoiceDescription": marker_for(bill()).render()}
    record = p.addition_record(row, {"company": {"id": 12}})
    assert (record.key, record.quantity, record.amount, record.company_external_id) == (
        "cw-main:cust-7:2026-02", Decimal("3.0"), Decimal("25.00"), "12")


def test_g3_invoice_record_takes_the_psa_total_and_the_marked_device_count():
    row = {"id": 31, "company": {"id": 12}, "total": 24.99, "internalNotes": marker_for(bill()).render()}
    record = p.invoice_record(row)
    assert (record.external_id, record.quantity, record.amount) == ("31", Decimal(3), Decimal("24.99"))
    assert p.invoice_record({"id": 32, "total": 5, "internalNotes": None}) is None


def test_no_active_agreement_names_the_company_and_the_way_out():
    with pytest.raises(PermanentError, match='company 12 has no active agreement.*delivery = "invoice"'):
        p.pick_agreement([{"id": 1, "cancelledFlag": True}], bill(), p.Config(delivery="addition"))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"delivery": "email"}, "options.delivery must be one of invoice, addition, got 'email'"),
        ({"colour": "red"}, "unknown option.*colour.*known: agreement_type"),
        ({"page_size": 5000}, "options.page_size must be a whole number from 1 to 1000, got 5000"),
        ({"page_size": "lots"}, "options.page_size must be a whole number from 1 to 1000, got 'lots'"),
        ({"page_size": 2.5}, "options.page_size must be a whole number"),
        ({"page_size": True}, "options.page_size must be a whole number"),
        ({"page_size": [10]}, "options.page_size must be a whole number"),
        ({"catalog_item": 1001}, "options.catalog_item must be a non-blank text such as 'MSP-DEVICE', got 1001"),
        ({"agreement_type": "   "}, "options.agreement_type must be a non-blank text"),
        ({"invoice_type": {"name": "Standard"}}, "options.invoice_type must be a non-blank text"),
        ({"codebase": 4.6}, "options.codebase must be a non-blank text such as 'v4_6_release/'"),
    ],
)
def test_bad_options_are_config_errors_naming_the_connection_the_option_and_what_it_takes(options, message):
    with pytest.raises(ConfigError, match=message) as info:
        p.Config.from_options("cw-main", options)
    assert str(info.value).startswith("connection 'cw-main': ")


def test_good_options_are_read_with_their_defaults():
    config = p.Config.from_options("cw-main", {"delivery": "addition", "page_size": "25", "agreement_type": ""})
    assert config == p.Config(delivery="addition", catalog_item="MSP-DEVICE", agreement_type=None, page_size=25)


def test_g3_invoice_records_are_limited_to_bills_whose_cycle_lies_in_the_period():
    march = bill(key="march", period_start=date(2026, 3, 1), period_end=date(2026, 3, 31))
    rows = [
        {"id": 1, "company": {"id": 12}, "total": 25, "internalNotes": marker_for(bill()).render()},
        {"id": 2, "company": {"id": 12}, "total": 30, "internalNotes": marker_for(march).render()},
        {"id": 3, "company": {"id": 12}, "total": 99, "internalNotes": "typed by a person"},
    ]
    assert [r.external_id for r in p.invoice_records(rows, date(2026, 2, 1), date(2026, 2, 28))] == ["1"]


def test_g2_extras_are_all_but_the_oldest_of_each_group():
    rows = [{"id": 9, "sequenceNumber": 1}, {"id": 4, "sequenceNumber": 1}, {"id": 5, "sequenceNumber": 2},
            {"id": 7, "sequenceNumber": 1}]
    assert [row["id"] for row in p.extras(rows, lambda row: row["sequenceNumber"])] == [7, 9]
    assert p.extras([{"id": 1}], lambda row: "k") == []

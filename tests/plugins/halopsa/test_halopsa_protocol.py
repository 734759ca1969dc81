"""HaloPSA protocol functions on recorded-shape bodies: no network."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from functools import partial

import builders
import pytest

from gateway.errors import ConfigError, PermanentError
from gateway.plugins.halopsa import protocol as p
from gateway.plugins.psa_bills import marker_for, parse_marker

bill = partial(builders.bill, devices=5, key="halo:cust-9:2026-02", number="INV-2026-0300",
               customer_name="Red Kite Surgery", currency="GBP")


# A page of GET /api/Client?pageinate=true&page_size=2&page_no=1 as Halo answers it (trimmed).
CLIENTS = {
    "page_no": 1,
    "page_size": 2,
    "record_count": 3,
    "clients": [
        {"id": 12, "name": "Red Kite Surgery", "toplevel_id": 1, "inactive": False, "colour": "#ff0000"},
        {"id": 13, "name": "Closed Ltd", "toplevel_id": 1, "inactive": True},
    ],
}


def test_token_url_carries_the_tenant_for_hosted_instances():
    assert p.token_url("https://msp.halopsa.com/", None) == "https://msp.halopsa.com/auth/token"
    assert p.token_url("https://msp.halopsa.com", "msp") == "https://msp.halopsa.com/auth/token?tenant=msp"


def test_pages_use_the_vendor_spelling_pageinate():
    request = p.page_request("Client", 2, 50)
    assert request.params == {"pageinate": True, "page_size": 50, "page_no": 2}


def test_client_page_skips_inactive_clients_and_knows_there_is_more():
    rows, total = p.parse_page(CLIENTS, "clients")
    assert [(c.external_id, c.name) for c in p.parse_clients(rows)] == [("12", "Red Kite Surgery")]
    assert p.has_more(1, 2, len(rows), total) and not p.has_more(2, 2, 1, total)
    assert not p.has_more(1, 2, 0, 99)  # an empty page ends the walk even if the count is off


def test_a_list_without_its_field_is_a_permanent_error():
    with pytest.raises(PermanentError, match="clients"):
        p.parse_page({"record_count": 0}, "clients")


def test_invoice_write_is_one_array_with_lines_reference_and_marker():
    body = p.create_invoice_request(bill()).json
    assert isinstance(body, list) and len(body) == 1 and "id" not in body[0]
    invoice = body[0]
    assert invoice["client_id"] == 12 and invoice["reference"] == "halo:cust-9:2026-02"
    assert invoice["invoice_date"] == "2026-03-01" and invoice["duedate"] == "2026-03-31"
    assert invoice["lines"] == [
        {"item_shortdescription": "Managed devices", "qty_order": 5, "unit_price": 2.5},
        {"item_shortdescription": "Activation fee", "qty_order": 1, "unit_price": 10},
    ]
    assert parse_marker(invoice["internal_note"]).devices == 5


def test_g2_matching_needs_both_reference_and_marker():
    note = marker_for(bill()).render()
    rows = [
        {"id": 7, "reference": "halo:cust-9:2026-02", "internal_note": "typed by hand"},
        {"id": 9, "reference": "halo:cust-9:2026-02", "internal_note": note},
        {"id": 8, "reference": "halo:cust-9:2026-02", "internal_note": note},
    ]
    found = p.matching(rows, bill().key)
    assert [row["id"] for row in found] == [8, 9]
    with pytest.raises(PermanentError, match="2 invoices for bill INV-2026-0300.*ids 8, 9"):
        p.refuse_duplicates(found, bill())


def test_saved_id_reads_an_object_or_a_list():
    assert p.saved_id({"id": 1042, "client_id": 12}) == 1042
    assert p.saved_id([{"id": 1043}, {"id": 1044}]) == 1043
    with pytest.raises(PermanentError):
        p.saved_id({"client_id": 12})


def test_g3_record_adds_up_line_net_amounts_or_falls_back_to_total():
    note = marker_for(bill()).render()
    with_lines = {"id": 5, "client_id": 12, "total": 27.0, "internal_note": note,
                  "lines": [{"net_amount": 12.5}, {"net_amount": 10.0}]}
    record = p.invoice_record(with_lines)
    assert (record.key, record.company_external_id, record.quantity, record.amount) == (
        "halo:cust-9:2026-02", "12", Decimal(5), Decimal("22.50"))
    assert p.invoice_record({"id": 6, "client_id": 12, "total": 22.5, "internal_note": note}).amount == Decimal("22.50")
    assert p.invoice_record({"id": 7, "total": 1, "internal_note": None}) is None


@pytest.mark.parametrize(
    "options, message",
    [
        ({"delivery": "contract"}, "options.delivery must be one of invoice, got 'contract'"),
        ({"page_size": 0}, "options.page_size must be a whole number from 1 to 500, got 0"),
        ({"page_size": "100 rows"}, "options.page_size must be a whole number from 1 to 500, got '100 rows'"),
        ({"page_size": 12.0}, "options.page_size must be a whole number"),
        ({"tenant": 42}, "options.tenant must be a non-blank text such as 'yourcompany', got 42"),
        ({"x": 1}, "unknown option.*x.*known: delivery, page_size, tenant"),
    ],
)
def test_bad_options_are_config_errors_naming_the_connection_the_option_and_what_it_takes(options, message):
    with pytest.raises(ConfigError, match=message) as info:
        p.Config.from_options("halo", options)
    assert str(info.value).startswith("connection 'halo': ")


def test_good_options_are_read_with_their_defaults():
    assert p.Config.from_options("halo", {"tenant": " msp ", "page_size": "250"}) == p.Config("msp", 250)
    assert p.Config.from_options("halo", {"delivery": "invoice", "tenant": ""}) == p.Config(None, 100)


def test_without_a_record_count_a_full_page_means_there_may_be_more():
    assert p.parse_page({"invoices": [{"id": 1}]}, "invoices") == ([{"id": 1}], None)
    assert p.has_more(1, 1, 1, None) and not p.has_more(1, 2, 1, None)


def test_g3_records_are_limited_to_bills_whose_cycle_lies_in_the_period():
    feb = {"id": 1, "client_id": 12, "total": 22.5, "internal_note": marker_for(bill()).render()}
    march = {"id": 2, "client_id": 12, "total": 30, "internal_note": marker_for(
        bill(key="m", period_start=date(2026, 3, 1), period_end=date(2026, 3, 31))).render()}
    assert [r.external_id for r in p.invoice_records([feb, march], date(2026, 2, 1), date(2026, 2, 28))] == ["1"]
    assert [r.external_id for r in p.invoice_records([feb, march], date(2026, 1, 1), date(2026, 3, 31))] == ["1", "2"]

"""Syncro requests and responses, sans I/O: paging, names, assets, invoices and the bill marker."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest

from gateway import BillDocument, BillLineDoc, PermanentError
from gateway_syncro import protocol as p

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


def bill(**changes) -> BillDocument:
    values = dict(
        key="syncro-psa:1000003:2026-02",
        number="INV-2026-0042",
        company_external_id="1000003",
        customer_name="Acme Dental",
        currency="USD",
        period_start=date(2026, 2, 1),
        period_end=date(2026, 2, 28),
        issued_on=date(2026, 3, 1),
        due_on=date(2026, 3, 31),
        device_count=41,
        total=Decimal("102.50"),
        lines=(BillLineDoc("Managed devices February 2026", Decimal(41), Decimal("2.50"), Decimal("102.50")),),
    )
    values.update(changes)
    return BillDocument(**values)


def test_pages_follow_meta_total_pages_to_the_end():
    middle = p.parse_page({"assets": [{"id": 1}], "meta": {"page": 2, "total_pages": 3}}, "assets")
    last = p.parse_page({"assets": [{"id": 2}], "meta": {"page": 3, "total_pages": 3}}, "assets")
    empty = p.parse_page({"assets": [], "meta": {"page": 1, "total_pages": 0}}, "assets")
    assert (middle.next_page, last.next_page, empty.next_page) == (3, None, None)
    assert p.page_params(4, customer_id=7) == {"customer_id": 7, "page": 4}


@pytest.mark.parametrize(
    "body",
    [[], {"assets": {}}, {"assets": []}, {"assets": [1], "meta": {}}, {"assets": [], "meta": {"page": "x"}}],
)
def test_unreadable_pages_are_permanent_errors(body):
    with pytest.raises(PermanentError):
        p.parse_page(body, "assets")


def test_g1_device_cursor_is_the_next_page_number():
    assert p.cursor_page(None) == 1 and p.cursor_page("4") == 4
    for bad in ("0", "-1", "abc", "2.5"):
        with pytest.raises(PermanentError, match="not a Syncro page number"):
            p.cursor_page(bad)


def test_customer_name_prefers_syncros_business_then_name():
    assert p.customer_name({"business_then_name": "Acme", "business_name": "Acme Inc", "fullname": "A B"}) == "Acme"
    assert p.customer_name({"business_name": None, "fullname": "Alex Smith"}) == "Alex Smith"
    assert p.customer_name({"id": 9, "firstname": "Sam", "lastname": None}) == "Sam"
    assert p.customer_name({"id": 9}) == "customer 9"
    assert p.parse_companies([{"id": 5, "business_name": "Beta"}])[0].external_id == "5"


def test_g1_asset_becomes_a_device_with_utc_times_and_online_from_its_last_sync():
    row = {
        "id": 5000001,
        "name": "LAP-0A1B2",
        "customer_id": 1000003,
        "asset_type": "Laptop",
        "created_at": "2025-06-01T08:00:00-04:00",
        "properties": {"kabuto_information": {"last_synced_at": "2026-03-10T06:55:00-05:00"}},
    }
    device = p.parse_asset(row, NOW)
    assert (device.external_id, device.org_external_id, device.hostname) == ("5000001", "1000003", "LAP-0A1B2")
    assert device.last_contact == datetime(2026, 3, 10, 11, 55, tzinfo=UTC)
    assert device.created_at == datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    assert device.online and device.device_class == "Laptop"
    assert not p.parse_asset(row, NOW + p.ONLINE_WITHIN - timedelta(minutes=4)).online
    never = p.parse_asset({"id": 1, "customer_id": 2, "properties": None}, NOW)
    assert never.last_contact is None and not never.online


def test_asset_times_without_a_zone_or_ids_are_refused():
    with pytest.raises(PermanentError, match="without a time zone"):
        p.parse_asset({"id": 1, "customer_id": 2, "created_at": "2026-01-01T00:00:00"}, NOW)
    with pytest.raises(PermanentError, match="without 'customer_id'"):
        p.parse_asset({"id": 1}, NOW)


def test_g2_invoice_body_carries_the_number_the_marker_and_exact_money():
    body = p.invoice_body(bill())
    assert body["customer_id"] == 1000003 and body["number"] == "INV-2026-0042"
    assert (body["date"], body["due_date"]) == ("2026-03-01", "2026-03-31")
    assert body["note"].splitlines()[0] == (
        "gateway-bill key=syncro-psa:1000003:2026-02 period=2026-02-01/2026-02-28 devices=41"
    )
    assert body["line_items"] == [
        {
            "item": "Managed devices February 2026",
            "name": "Managed devices February 2026",
            "quantity": "41",
            "price": "2.50",
            "taxable": False,
        }
    ]


def test_g2_marker_round_trips_any_key_and_is_found_only_at_a_line_start():
    odd = bill(key="conn/with space:ä&=")
    marker = p.parse_marker(p.invoice_body(odd)["note"])
    assert marker == p.Marker("conn/with space:ä&=", date(2026, 2, 1), date(2026, 2, 28), 41)
    assert p.parse_marker("typed by hand") is None and p.parse_marker(None) is None
    assert p.parse_marker("see gateway-bill key=x period=2026-02-01/2026-02-28 devices=1") is None


def test_a_bill_for_a_company_id_syncro_cannot_have_is_refused():
    with pytest.raises(PermanentError, match="not a Syncro customer id"):
        p.invoice_body(bill(company_external_id="acme"))


def test_g2_same_bill_means_same_number_and_same_key():
    invoice = {"id": 7, "number": "INV-2026-0042", "note": p.invoice_body(bill())["note"]}
    assert p.is_same_bill(invoice, bill())
    assert not p.is_same_bill(invoice, bill(key="other"))
    assert not p.is_same_bill({**invoice, "note": "typed by hand"}, bill())


def test_g3_invoice_record_uses_syncros_subtotal_and_the_marked_cycle():
    invoice = {"id": 7000001, "customer_id": 1000003, "subtotal": "102.5", "total": "110.70",
               "note": p.invoice_body(bill())["note"]}
    record = p.invoice_record(invoice, date(2026, 2, 1), date(2026, 2, 28))
    assert record is not None
    assert (record.key, record.external_id, record.company_external_id) == (
        "syncro-psa:1000003:2026-02", "7000001", "1000003")
    assert record.quantity == Decimal(41) and record.amount == Decimal("102.50")
    assert p.invoice_record(invoice, date(2026, 3, 1), date(2026, 3, 31)) is None
    assert p.invoice_record({**invoice, "note": ""}, date(2026, 2, 1), date(2026, 2, 28)) is None
    with pytest.raises(PermanentError, match="not a number"):
        p.invoice_record({**invoice, "subtotal": "lots"}, date(2026, 2, 1), date(2026, 2, 28))


def test_both_kinds_together_stay_under_syncros_account_limit():
    assert 2 * p.DEFAULT_RATE_LIMIT.requests <= p.TOOL_RATE_LIMIT.requests
    assert p.DEFAULT_RATE_LIMIT.per_seconds == p.TOOL_RATE_LIMIT.per_seconds == 60
    assert p.auth_headers("tok")["Authorization"] == "Bearer tok"

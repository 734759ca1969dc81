"""What the PSA adapters share about bills: the marker, line pricing, PSA numbers and refusals. No network."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from functools import partial

import builders
import pytest

from gateway.adapters import BillDocument, BillLineDoc
from gateway.errors import PermanentError
from gateway.plugins import psa_bills as c

FEB = (date(2026, 2, 1), date(2026, 2, 28))


bill = partial(builders.bill, key="gw-main-7-plan-3-20260201-20260228", number="INV-2026-0042", unit_price="5.00")


def cycle(start: date, end: date, key: str) -> BillDocument:
    return bill(key=key, number=f"B-{key}", period_start=start, period_end=end)


# --- the marker ----------------------------------------------------------------------------------


def test_g2_marker_round_trips_through_free_text_with_and_without_a_line():
    b = bill(key="conn:customer 7/2026-02")
    for line in (0, 2):
        text = "Billed by the gateway\n" + c.marker_for(b, line).render() + "\nthanks"
        assert c.parse_marker(text) == c.Marker("conn:customer 7/2026-02", FEB[0], FEB[1], 3, line)
    assert "line=" not in c.marker_for(b).render()
    assert c.parse_marker("typed by a person") is None and c.parse_marker(None) is None


def test_g2_long_keys_get_a_stable_reference_that_fits_the_field():
    key = "k" * 80
    assert len(c.reference_for(key)) == 50 and len(c.reference_for(key, 30)) == 30
    assert c.reference_for(key) == c.reference_for(key) != c.reference_for(key + "x")
    assert c.reference_for("short") == "short"


def test_g2_matching_finds_the_rows_marked_with_the_key_oldest_first():
    mine, other = c.marker_for(bill()).render(), c.marker_for(bill(key="other")).render()
    rows = [{"id": 9, "note": mine}, {"id": 3, "note": other}, {"id": 4, "note": mine}, {"id": 5, "note": None}]
    assert [row["id"] for row in c.matching(rows, "note", bill().key)] == [4, 9]


def test_g3_in_period_needs_the_whole_cycle_inside():
    marker = c.marker_for(bill())
    assert c.in_period(marker, date(2026, 1, 1), date(2026, 3, 31)) and c.in_period(marker, *FEB)
    assert not c.in_period(marker, date(2026, 2, 2), date(2026, 3, 31))


# --- money -------------------------------------------------------------------------------------


def test_s7_a_prorated_line_is_sent_as_one_unit_at_its_amount_and_a_whole_line_as_it_is():
    whole = BillLineDoc("Plan A", Decimal(3), Decimal("5.00"), Decimal("15.00"))
    prorated = BillLineDoc("Plan B from 15 Feb", Decimal(333), Decimal("1.7419"), Decimal("580.06"))
    assert c.priced_lines(bill(lines=(whole, prorated), total=Decimal("595.06"))) == [
        ("Plan A", Decimal(3), Decimal("5.00")),
        ("Plan B from 15 Feb (333 × 1.7419, prorated)", Decimal(1), Decimal("580.06")),
    ]


def test_a_bill_without_lines_is_one_line_at_its_total_and_nothing_when_it_is_zero():
    assert c.priced_lines(bill(lines=())) == [("Acme Dental 2026-02-01–2026-02-28", Decimal(1), Decimal("25.00"))]
    assert c.priced_lines(bill(lines=(), total=Decimal(0))) == []


def test_unit_price_of_a_quantity_delivery_gives_back_the_total_to_the_cent():
    for devices, total in ((3, "25.00"), (7, "27.50"), (997, "1804.64")):
        price = c.unit_price_for(bill(device_count=devices, total=Decimal(total)))
        assert (price * devices).quantize(c.CENT) == Decimal(total)
    assert c.unit_price_for(bill(device_count=0)) == 0


def test_numbers_from_the_psa_are_decimals_and_anything_else_is_a_permanent_error_naming_the_vendor():
    assert c.number(24.99, "total", "HaloPSA") == Decimal("24.99") and c.number(None, "total", "HaloPSA") == 0
    for bad in ("abc", "NaN", "Infinity", [1]):
        with pytest.raises(PermanentError, match="HaloPSA answered a total that is not a number"):
            c.number(bad, "total", "HaloPSA")


def test_json_numbers_are_integers_when_integral():
    assert c.json_number(Decimal("10.00")) == 10 and isinstance(c.json_number(Decimal("10.00")), int)
    assert c.json_number(Decimal("1.7419")) == 1.7419


def test_a_company_id_that_is_not_an_integer_names_the_bill_vendor_and_noun():
    assert c.company_id(bill(), "Autotask") == 12
    with pytest.raises(PermanentError, match="bill INV-2026-0042 .*client 'acme'.*not a HaloPSA client id"):
        c.company_id(bill(company_external_id="acme"), "HaloPSA", noun="client")


# --- refusals ------------------------------------------------------------------------------------


def test_g2_two_objects_for_one_bill_are_refused_naming_their_ids():
    c.refuse_duplicates([{"id": 4}], bill(), "invoices", "HaloPSA")
    with pytest.raises(PermanentError, match=r"Autotask holds 2 contract charges for line 1 of bill INV-2026-0042 "
                                             r"\(key gw-main-7-plan-3-20260201-20260228\): ids 4, 9; delete all but one"):
        c.refuse_duplicates([{"id": 4}, {"id": 9}], bill(), "contract charges", "Autotask", part="line 1 of ")


HELD = cycle(*FEB, "gw-main-7-plan-3-20260201-20260228")


@pytest.mark.parametrize(
    "incoming",
    [
        cycle(*FEB, "gw-main-7-plan-4-20260201-20260228"),  # a second plan of the customer
        cycle(*FEB, "gw-main-7-monthly-1-20260201-20260228"),  # a plan and monthly billing
        cycle(date(2026, 1, 1), date(2026, 3, 31), "gw-main-7-plan-5-20260101-20260331"),  # a quarter over it
    ],
)
def test_g2_a_second_bill_for_the_cycle_a_quantity_holds_is_refused_naming_both_keys(incoming):
    with pytest.raises(PermanentError) as info:
        c.refuse_overwrite(c.marker_for(HELD), incoming, "Addition 5", 'options.delivery = "invoice"')
    message = str(info.value)
    assert message.startswith(f"Addition 5 already carries bill key {HELD.key}")
    assert incoming.key in message
    assert 'several plans, or a plan and monthly billing, use options.delivery = "invoice"' in message


def test_g2_a_late_bill_for_an_earlier_cycle_is_refused():
    january = cycle(date(2026, 1, 1), date(2026, 1, 31), "gw-main-7-plan-3-20260101-20260131")
    with pytest.raises(PermanentError, match=f"already carries the cycle from 2026-02-01 .*{january.key}.* is earlier"):
        c.refuse_overwrite(c.marker_for(HELD), january, "Addition 5", 'options.delivery = "invoice"')


def test_g2_the_same_bill_the_next_cycle_or_an_unmarked_object_may_be_written():
    march = cycle(date(2026, 3, 1), date(2026, 3, 31), "gw-main-7-plan-3-20260301-20260331")
    for marker, incoming in ((c.marker_for(HELD), HELD), (c.marker_for(HELD), march), (None, HELD)):
        assert c.refuse_overwrite(marker, incoming, "Addition 5", "x") is None

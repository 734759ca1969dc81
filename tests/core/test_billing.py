"""The pure billing rules (M1-M8, S1-S8): cycles, local days, proration, rounding."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.billing import drafts, rules
from gateway.core.billing.drafts import BillDraft, PricePoint
from gateway.core.billing.rules import Period
from gateway.core.models import BillingCycle, BillKind
from gateway.errors import DomainError

D = Decimal


# --- S2: cycles, month-end anchors --------------------------------------------------------


def cycles(anchor: date, cycle: BillingCycle, n: int) -> list[tuple[date, date]]:
    return [(p.start, p.end) for p in (rules.cycle_number(anchor, cycle, i) for i in range(n))]


def test_s2_monthly_cycle_starting_on_31st_keeps_its_anchor_day():
    assert cycles(date(2026, 1, 31), BillingCycle.MONTHLY, 4) == [
        (date(2026, 1, 31), date(2026, 2, 27)),
        (date(2026, 2, 28), date(2026, 3, 30)),
        (date(2026, 3, 31), date(2026, 4, 29)),
        (date(2026, 4, 30), date(2026, 5, 30)),
    ]
    # In a leap year February's cycle starts on the 29th, then returns to the 31st.
    starts = [p[0] for p in cycles(date(2028, 1, 31), BillingCycle.MONTHLY, 3)]
    assert starts == [date(2028, 1, 31), date(2028, 2, 29), date(2028, 3, 31)]


def test_s2_quarterly_cycle_starting_on_31st():
    assert cycles(date(2026, 1, 31), BillingCycle.QUARTERLY, 4) == [
        (date(2026, 1, 31), date(2026, 4, 29)),
        (date(2026, 4, 30), date(2026, 7, 30)),
        (date(2026, 7, 31), date(2026, 10, 30)),
        (date(2026, 10, 31), date(2027, 1, 30)),
    ]


def test_s2_half_yearly_cycle_starting_on_31st():
    assert cycles(date(2025, 8, 31), BillingCycle.HALF_YEARLY, 3) == [
        (date(2025, 8, 31), date(2026, 2, 27)),
        (date(2026, 2, 28), date(2026, 8, 30)),
        (date(2026, 8, 31), date(2027, 2, 27)),
    ]


def test_s2_yearly_cycles_starting_on_31st_and_on_29_february():
    assert cycles(date(2025, 12, 31), BillingCycle.YEARLY, 2) == [
        (date(2025, 12, 31), date(2026, 12, 30)),
        (date(2026, 12, 31), date(2027, 12, 30)),
    ]
    starts = [p[0] for p in cycles(date(2024, 2, 29), BillingCycle.YEARLY, 5)]
    assert starts == [date(2024, 2, 29), date(2025, 2, 28), date(2026, 2, 28), date(2027, 2, 28), date(2028, 2, 29)]


@settings(max_examples=300, deadline=None)
@given(
    anchor=st.dates(min_value=date(2000, 1, 1), max_value=date(2040, 12, 31)),
    offset=st.integers(min_value=0, max_value=4000),
    cycle=st.sampled_from(list(BillingCycle)),
)
def test_s2_every_day_after_the_anchor_lies_in_exactly_one_cycle(anchor, offset, cycle):
    day = anchor + timedelta(days=offset)
    period = rules.cycle_at(anchor, cycle, day)
    assert day in period
    following = rules.cycle_at(anchor, cycle, period.end + timedelta(days=1))
    assert following.start == period.end + timedelta(days=1)
    months = rules.CYCLE_MONTHS[cycle]
    assert 28 * months - 3 <= period.days <= 31 * months + 1
    # The anchor day is kept wherever the month has it.
    if period.start.day != anchor.day:
        assert anchor.day > 28 and period.start == rules.month_of(period.start).end


def test_s2_cycles_ending_within_a_month_window():
    window = rules.month_period(2026, 4)
    found = rules.cycles_ending_within(date(2026, 1, 31), BillingCycle.QUARTERLY, window)
    assert found == [Period(date(2026, 1, 31), date(2026, 4, 29))]
    assert rules.cycles_ending_within(date(2026, 1, 31), BillingCycle.QUARTERLY, rules.month_period(2026, 5)) == []
    # A cycle that starts after the window is not there.
    assert rules.cycles_ending_within(date(2026, 5, 1), BillingCycle.MONTHLY, window) == []


def test_s6_no_cycle_after_the_one_containing_the_end_is_billed():
    year = Period(date(2026, 1, 1), date(2026, 12, 31))
    found = rules.cycles_ending_within(date(2026, 1, 15), BillingCycle.MONTHLY, year, ends_on=date(2026, 3, 20))
    # Dissociated on 20 March: the cycle 15 Mar - 14 Apr is billed in full, nothing after it.
    assert [p.start for p in found] == [date(2026, 1, 15), date(2026, 2, 15), date(2026, 3, 15)]
    assert found[-1].end == date(2026, 4, 14)
    # Ended before it started: no cycle at all.
    assert rules.cycles_ending_within(date(2026, 5, 1), BillingCycle.MONTHLY, year, ends_on=date(2026, 4, 30)) == []


def test_s2_due_window_covers_previous_month_and_this_month_so_far():
    assert rules.due_window(date(2026, 4, 1)) == Period(date(2026, 3, 1), date(2026, 3, 31))
    assert rules.due_window(date(2026, 4, 30)) == Period(date(2026, 3, 1), date(2026, 4, 29))
    assert rules.due_window(date(2026, 1, 1)) == Period(date(2025, 12, 1), date(2025, 12, 31))


def test_s2_period_parsing_names_the_format():
    assert rules.parse_month("2026-02") == Period(date(2026, 2, 1), date(2026, 2, 28))
    with pytest.raises(DomainError, match="YYYY-MM"):
        rules.parse_month("March 2026")


# --- S4: time zones, local midnight, DST -------------------------------------------------


def test_s4_activity_day_is_the_customers_local_day_in_far_zones():
    # 10:30 UTC on 31 March is already 1 April on Kiritimati (UTC+14) ...
    assert rules.local_day(datetime(2026, 3, 31, 10, 30, tzinfo=UTC), "Pacific/Kiritimati") == date(2026, 4, 1)
    # ... and 10:00 UTC on 1 April is still 31 March in Pago Pago (UTC-11).
    assert rules.local_day(datetime(2026, 4, 1, 10, 0, tzinfo=UTC), "Pacific/Pago_Pago") == date(2026, 3, 31)
    assert rules.local_day(datetime(2026, 4, 1, 10, 0, tzinfo=UTC), "UTC") == date(2026, 4, 1)


def test_s4_cycle_starts_and_ends_at_local_midnight():
    march = rules.month_period(2026, 3)
    assert march.start_at("Pacific/Kiritimati") == datetime(2026, 2, 28, 10, 0, tzinfo=UTC)
    assert march.end_at("Pacific/Kiritimati") == datetime(2026, 3, 31, 10, 0, tzinfo=UTC)
    assert march.start_at("Pacific/Pago_Pago") == datetime(2026, 3, 1, 11, 0, tzinfo=UTC)


def test_s4_dst_change_inside_a_cycle_moves_the_boundary_not_the_days():
    march = rules.month_period(2026, 3)  # Berlin moves to summer time on 29 March
    start, end = march.start_at("Europe/Berlin"), march.end_at("Europe/Berlin")
    assert start == datetime(2026, 2, 28, 23, 0, tzinfo=UTC)
    assert end == datetime(2026, 3, 31, 22, 0, tzinfo=UTC)
    assert end - start == timedelta(days=31, hours=-1)
    assert march.days == 31
    # Proration counts days: a change on the DST day splits 28/31 and 3/31 whatever the hours.
    lines = drafts.device_lines(
        "Plan", march, 31, [PricePoint(date(1970, 1, 1), D("1.00")), PricePoint(date(2026, 3, 29), D("2.00"))], "EUR"
    )
    assert [line.amount for line in lines] == [D("28.00"), D("6.00")]
    # Late on the last local day (summer time) is still March; just after local midnight is April.
    assert rules.local_day(datetime(2026, 3, 31, 21, 59, tzinfo=UTC), "Europe/Berlin") == date(2026, 3, 31)
    assert rules.local_day(datetime(2026, 3, 31, 22, 0, tzinfo=UTC), "Europe/Berlin") == date(2026, 4, 1)


def test_s4_midnight_inside_a_dst_gap_is_the_moment_of_the_change():
    # Santiago skips from 00:00 to 01:00 on 6 September 2026: the day starts at 04:00 UTC.
    first = rules.local_midnight(date(2026, 9, 6), "America/Santiago")
    assert first == datetime(2026, 9, 6, 4, 0, tzinfo=UTC)
    assert rules.local_day(first, "America/Santiago") == date(2026, 9, 6)
    assert rules.local_day(first - timedelta(seconds=1), "America/Santiago") == date(2026, 9, 5)


def test_s4_unknown_time_zone_is_named():
    with pytest.raises(DomainError, match="Mars/Olympus"):
        rules.local_day(datetime(2026, 1, 1, tzinfo=UTC), "Mars/Olympus")


# --- money: S1, S3 rounding per currency ------------------------------------------------


def test_s1_rounding_is_half_up_to_each_currencys_minor_unit():
    assert rules.round_money(D("0.005"), "USD") == D("0.01")
    assert rules.round_money(D("0.0049"), "USD") == D("0.00")
    assert rules.round_money(D("-0.005"), "EUR") == D("-0.01")
    assert rules.round_money(D("2.5"), "JPY") == D("3")
    assert rules.round_money(D("1.0005"), "KWD") == D("1.001")
    assert rules.round_money(D("1.00005"), "CLF") == D("1.0001")
    assert [rules.minor_units(c) for c in ("JPY", "USD", "eur", "BHD")] == [0, 2, 2, 3]


def test_s1_currency_codes_are_checked_and_floats_refused():
    assert rules.check_currency(" eur ") == "EUR"
    with pytest.raises(DomainError, match="ISO 4217"):
        rules.check_currency("EURO")
    with pytest.raises(DomainError, match="not a float"):
        rules.to_money(1.1)
    with pytest.raises(DomainError, match="not a number"):
        rules.to_money("ten")
    assert rules.to_money("12.50") == D("12.50")


def test_s1_full_cycle_line_is_devices_times_price():
    march = rules.month_period(2026, 3)
    (line,) = drafts.device_lines("Plan A", march, 7, [PricePoint(date(1970, 1, 1), D("12.345"))], "USD")
    assert (line.quantity, line.unit_price, line.amount) == (D(7), D("12.345"), D("86.42"))  # 86.415 half up
    assert "7 device(s)" in line.description and "2026-03-01 to 2026-03-31" in line.description


# --- S7: price change during a cycle ------------------------------------------------------


def test_s7_change_mid_cycle_prorates_by_days_and_shows_both_parts():
    march = rules.month_period(2026, 3)
    prices = [PricePoint(date(1970, 1, 1), D("3.00")), PricePoint(date(2026, 3, 16), D("4.00"))]
    old, new = drafts.device_lines("Plan", march, 10, prices, "USD")
    assert old.amount == D("14.52")  # 10 x 3.00 x 15/31 = 14.516...
    assert new.amount == D("20.65")  # 10 x 4.00 x 16/31 = 20.645...
    assert "2026-03-01 to 2026-03-15 (15/31 days)" in old.description
    assert "2026-03-16 to 2026-03-31 (16/31 days)" in new.description
    assert old.unit_price == D("1.4516") and new.unit_price == D("2.0645")


def test_s7_change_on_the_first_day_of_a_cycle_is_a_single_line():
    march = rules.month_period(2026, 3)
    prices = [PricePoint(date(1970, 1, 1), D("3.00")), PricePoint(date(2026, 3, 1), D("4.00"))]
    (line,) = drafts.device_lines("Plan", march, 2, prices, "USD")
    assert line.amount == D("8.00")


def test_s7_two_changes_in_one_cycle_give_three_parts_in_yen():
    april = rules.month_period(2026, 4)
    prices = [
        PricePoint(date(1970, 1, 1), D("300")),
        PricePoint(date(2026, 4, 11), D("450")),
        PricePoint(date(2026, 4, 21), D("500")),
    ]
    lines = drafts.device_lines("Plan", april, 3, prices, "JPY")
    assert [line.amount for line in lines] == [D("300"), D("450"), D("500")]  # 3 x p x 10/30 each
    draft = BillDraft(1, 1, "C", "Asia/Tokyo", BillKind.PLAN, 1, april, "JPY", date(2026, 5, 1), date(2026, 5, 31),
                      lines=lines)
    assert draft.total == D("1250")


def test_s7_a_cycle_before_the_first_price_is_refused():
    with pytest.raises(DomainError, match="no price"):
        drafts.price_segments(rules.month_period(2026, 3), [PricePoint(date(2026, 3, 5), D("1"))])


# --- M1, M4, M5, M8: monthly billing --------------------------------------------------------


def test_m1_activation_covers_the_rest_of_the_month_unprorated():
    assert rules.activation_period(date(2026, 3, 10)) == Period(date(2026, 3, 10), date(2026, 3, 31))


def test_m4_first_charge_runs_on_the_first_after_the_first_full_month():
    assert rules.first_billed_month(date(2026, 3, 10)) == rules.month_period(2026, 4)
    assert rules.first_charge_date(date(2026, 3, 10)) == date(2026, 5, 1)


def test_m1_m4_enabling_on_the_last_day_of_a_month():
    assert rules.activation_period(date(2026, 3, 31)) == Period(date(2026, 3, 31), date(2026, 3, 31))
    assert rules.first_charge_date(date(2026, 3, 31)) == date(2026, 5, 1)
    assert rules.first_charge_date(date(2026, 2, 28)) == date(2026, 4, 1)
    assert rules.first_charge_date(date(2025, 12, 31)) == date(2026, 2, 1)


def test_m4_enabling_on_the_first_of_a_month_still_charges_from_the_next_month():
    assert rules.activation_period(date(2026, 4, 1)) == rules.month_period(2026, 4)
    assert rules.first_charge_date(date(2026, 4, 1)) == date(2026, 6, 1)


def test_m5_months_are_billed_only_once_over_and_only_from_the_first_full_month():
    enabled = date(2026, 3, 10)
    march, april = rules.month_period(2026, 3), rules.month_period(2026, 4)
    assert rules.monthly_months_due(enabled, march, date(2026, 4, 1)) == []  # covered by the activation
    assert rules.monthly_months_due(enabled, april, date(2026, 4, 30)) == []  # April not over yet
    assert rules.monthly_months_due(enabled, april, date(2026, 5, 1)) == [april]


def test_m5_only_devices_with_an_active_day_are_billed():
    assert rules.billable_devices({1: 3, 2: 0, 3: 1}) == {1: 3, 3: 1}


def test_m5_workspace_counts_only_from_the_day_it_joined():
    march = rules.month_period(2026, 3)
    assert rules.workspace_billing_window(march, date(2026, 3, 20), None) == Period(date(2026, 3, 20), date(2026, 3, 31))
    assert rules.workspace_billing_window(march, date(2026, 1, 1), date(2026, 2, 28)) is None
    assert rules.workspace_billing_window(march, None, None) is None


def test_m3_full_workspace_refuses_with_the_reason():
    assert rules.device_refusal(None, 10_000) is None
    assert rules.device_refusal(5, 4) is None
    reason = rules.device_refusal(5, 5)
    assert reason is not None and "maximum of 5 devices" in reason


def test_m8_offered_end_dates_are_this_and_the_next_month_ends():
    assert rules.offered_end_dates(date(2026, 3, 10)) == [
        date(2026, 3, 31), date(2026, 4, 30), date(2026, 5, 31), date(2026, 6, 30)
    ]
    assert rules.offered_end_dates(date(2026, 12, 31), 1) == [date(2026, 12, 31), date(2027, 1, 31)]


def test_m8_reactivation_possible_until_the_final_billing_date():
    assert rules.final_billing_date(date(2026, 4, 30)) == date(2026, 5, 1)
    assert rules.can_reactivate(date(2026, 4, 30), date(2026, 4, 30))
    assert not rules.can_reactivate(date(2026, 4, 30), date(2026, 5, 1))
    assert not rules.can_reactivate(None, date(2026, 4, 1))


def test_m8_no_month_after_the_end_date_is_billed():
    enabled, ends = date(2026, 1, 15), date(2026, 4, 30)
    year = Period(date(2026, 1, 1), date(2026, 12, 31))
    months = rules.monthly_months_due(enabled, year, date(2027, 1, 1), ends_on=ends)
    assert [m.start.month for m in months] == [2, 3, 4]


# --- S3: dates, status, numbers ---------------------------------------------------------


def test_s3_overdue_from_the_day_after_the_due_date():
    due = drafts.due_date(date(2026, 4, 1), 30)
    assert due == date(2026, 5, 1)
    assert not drafts.is_overdue(due, date(2026, 5, 1))
    assert drafts.is_overdue(due, date(2026, 5, 2))


def test_s3_bill_number_has_prefix_month_and_sequence():
    assert drafts.format_bill_number("INV", date(2026, 11, 1), 123) == "INV-2026-11-000123"


def test_s3_draft_lines_are_rounded_and_summed():
    draft = BillDraft(1, 1, "C", "UTC", BillKind.PLAN, 1, rules.month_period(2026, 3), "USD", date(2026, 4, 1),
                      date(2026, 5, 1))
    draft.add_line("charge", "Setup", D(1), D("10.005"), D("10.005"))
    draft.add_line("discount", "Loyalty", D(1), D("-0.994"), D("-0.994"))
    assert [line.amount for line in draft.lines] == [D("10.01"), D("-0.99")]
    assert draft.total == D("9.02")

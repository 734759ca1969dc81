"""CSV injection through the bill number: the partner's invoice prefix is checked, every CSV text cell is
escaped, and a download's file name is quoted as RFC 6266 says."""

from __future__ import annotations

import csv
import io
from datetime import UTC, date, datetime
from decimal import Decimal
from urllib.parse import unquote

import pytest
from pydantic import ValidationError

from gateway.core import directory
from gateway.core.billing.documents import csv as csv_docs
from gateway.core.models import Bill, BillKind, BillLine, BillStatus, Customer
from gateway.core.settings import BillingSettings
from gateway.errors import DomainError
from gateway.web.billing import _file, content_disposition

NOW = datetime(2026, 4, 1, tzinfo=UTC)
FORMULA = '=HYPERLINK("http://evil.example";"x")'


@pytest.mark.parametrize("prefix", [FORMULA, "inv", "", "A" * 17, "INV 1", 'IN"V', "+1", "INV;x"])
def test_s5_a_partner_prefix_outside_capitals_digits_and_dashes_is_refused_with_what_is_allowed(session, prefix):
    with pytest.raises(DomainError) as refused:
        directory.create_partner(session, name="MSP", now=NOW, invoice_prefix=prefix)
    assert refused.value.field == "invoice_prefix"
    assert "1 to 16 capital letters, digits or dashes" in str(refused.value)


@pytest.mark.parametrize("prefix", ["INV", "MSP-2026", "A", "0123456789ABCDEF"])
def test_s5_a_partner_prefix_of_capitals_digits_and_dashes_is_kept(session, prefix):
    assert directory.create_partner(session, name="MSP", now=NOW, invoice_prefix=prefix).invoice_prefix == prefix


def test_s5_the_configured_default_prefix_is_checked_too():
    with pytest.raises(ValidationError):
        BillingSettings(invoice_prefix=FORMULA)
    assert BillingSettings(invoice_prefix="NW").invoice_prefix == "NW"


def _bill(number: str) -> tuple[Bill, Customer]:
    customer = Customer(id=1, partner_id=1, name="Acme", timezone="UTC", created_at=NOW)
    bill = Bill(id=1, partner_id=1, customer_id=1, kind=BillKind.PLAN, source_id=1, number=number,
                period_start=date(2026, 3, 1), period_end=date(2026, 3, 31), currency="USD", device_count=1,
                total=Decimal("-5.00"), status=BillStatus.ISSUED, issued_on=date(2026, 4, 1), due_on=date(2026, 5, 1),
                created_at=NOW)
    bill.lines = [BillLine(position=1, kind="credit", description="Credit", quantity=Decimal("1"),
                           unit_price=Decimal("-5.00"), amount=Decimal("-5.00"))]
    return bill, customer


def test_s5_a_bill_number_made_before_the_check_is_escaped_in_the_csv_and_numbers_stay_numbers():
    bill, customer = _bill(f"{FORMULA}-2026-04-000001")
    rows = list(csv.DictReader(io.StringIO(csv_docs.bill_csv(bill, customer).decode())))
    assert rows[0]["bill_number"] == f"'{FORMULA}-2026-04-000001"
    assert not any(value.startswith(("=", "+", "@")) for row in rows for value in row.values())
    assert (rows[0]["amount"], rows[0]["bill_total"]) == ("-5.00", "-5.00")  # a credit is still a number


def test_s5_a_download_file_name_is_quoted_with_an_ascii_fallback_and_the_exact_name_as_filename_star():
    name = f"{FORMULA}-2026-04-000001.csv"
    header = content_disposition(name)
    fallback = header.split('filename="', 1)[1].split('"', 1)[0]
    assert header.startswith("attachment; filename=\"")
    assert all(c.isalnum() or c in "._-" for c in fallback) and fallback.endswith(".csv")
    assert header.count('"') == 2 and "\r" not in header and "\n" not in header
    star = header.split("filename*=UTF-8''", 1)[1]
    assert unquote(star) == name and ";" not in star and '"' not in star
    assert content_disposition("Rechnung-März.pdf").endswith("filename*=UTF-8''Rechnung-M%C3%A4rz.pdf")
    assert _file(b"x", "text/csv", name).headers["Content-Disposition"] == header

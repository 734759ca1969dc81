"""Bill documents: CSV and PDF per bill and per customer (S5), the device usage report (M7).

Rendering only: callers load the bills (with their lines) and pass them in.
The PDF layout is in :mod:`gateway.core.invoice_pdf`, imported when a PDF is
made. CSV cells that a spreadsheet would run as a formula are prefixed with
``'`` (OWASP's CSV injection advice).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from decimal import Decimal

from gateway.core.billing import minor_units
from gateway.core.bills import UsageRow
from gateway.core.models import Bill, Customer, Partner

BILL_COLUMNS = (
    "bill_number", "customer", "kind", "period_start", "period_end", "issued_on", "due_on", "status", "currency",
    "device_count", "line", "line_kind", "description", "quantity", "unit_price", "amount", "bill_total",
)
USAGE_COLUMNS = (
    "bill_number", "customer", "workspace", "connection", "device_id", "hostname", "period_start", "period_end",
    "days_active",
)


def money(amount: Decimal, currency: str) -> str:
    """An amount shown with exactly the currency's minor digits (stored values keep four)."""
    return f"{amount.quantize(Decimal(1).scaleb(-minor_units(currency))):f}"


def number(value: Decimal) -> str:
    """A quantity or unit price without trailing zeros (10.0000 -> 10, 1.4516 stays)."""
    text = f"{value.normalize():f}"
    return text


def _safe_cell(text: str) -> str:
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _csv(header: Sequence[str], rows: Iterable[Sequence[object]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def _bill_rows(bill: Bill, customer: Customer) -> list[list[object]]:
    head = [
        bill.number, _safe_cell(customer.name), bill.kind.value, bill.period_start.isoformat(), bill.period_end.isoformat(),
        bill.issued_on.isoformat(), bill.due_on.isoformat(), bill.status.value, bill.currency, bill.device_count,
    ]
    total = money(bill.total, bill.currency)
    return [
        head + [line.position, line.kind, _safe_cell(line.description), number(line.quantity), number(line.unit_price),
                money(line.amount, bill.currency), total]
        for line in bill.lines
    ] or [head + ["", "", "", "", "", "", total]]


def bill_csv(bill: Bill, customer: Customer) -> bytes:
    """S5: one bill, one row per line (bill columns repeated, so each row stands on its own)."""
    return _csv(BILL_COLUMNS, _bill_rows(bill, customer))


def consolidated_csv(customer: Customer, bills: Sequence[Bill]) -> bytes:
    """S5: every bill of a customer in one file, oldest cycle first."""
    rows: list[list[object]] = []
    for bill in bills:
        rows.extend(_bill_rows(bill, customer))
    return _csv(BILL_COLUMNS, rows)


def usage_csv(rows: Sequence[UsageRow]) -> bytes:
    """M7: the month's device usage report, one row per billed device with its active days."""
    return _csv(
        USAGE_COLUMNS,
        (
            [r.bill_number, _safe_cell(r.customer), _safe_cell(r.workspace), r.connection, _safe_cell(r.device_id),
             _safe_cell(r.hostname), r.period_start.isoformat(), r.period_end.isoformat(), r.days_active]
            for r in rows
        ),
    )


# --- PDF (gateway.core.invoice_pdf) ----------------------------------------------------------


def bill_pdf(bill: Bill, customer: Customer, partner: Partner) -> bytes:
    """S5: one bill as a readable invoice: partner, customer, cycle, lines, total, due date."""
    # fpdf2 is imported on the first PDF, not at start-up.
    from gateway.core import invoice_pdf

    return invoice_pdf.bill_pdf(bill, customer, partner)


def consolidated_pdf(customer: Customer, partner: Partner, bills: Sequence[Bill]) -> bytes:
    """S5: a summary of every bill of the customer, then each bill on its own page."""
    from gateway.core import invoice_pdf

    return invoice_pdf.consolidated_pdf(customer, partner, bills)

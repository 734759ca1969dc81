"""Bills as CSV: per bill and per customer (S5), and the device usage report (M7).

Every text cell that a spreadsheet would run as a formula is prefixed with ``'``
(OWASP's CSV injection advice), whatever column it is in (the bill number too: it
carries the partner's prefix); a plain number such as ``-10.00`` stays a number.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Sequence

from gateway.core.billing.documents.format import money, number
from gateway.core.billing.reports import UsageRow
from gateway.core.models import Bill, Customer

BILL_COLUMNS = (
    "bill_number", "customer", "kind", "period_start", "period_end", "issued_on", "due_on", "status", "currency",
    "device_count", "line", "line_kind", "description", "quantity", "unit_price", "amount", "bill_total",
)
USAGE_COLUMNS = (
    "bill_number", "customer", "workspace", "connection", "device_id", "hostname", "period_start", "period_end",
    "days_active",
)


_NUMBER = re.compile(r"-?\d+(\.\d+)?")


def _safe_cell(text: str) -> str:
    if text[:1] in ("=", "+", "-", "@", "\t", "\r") and not _NUMBER.fullmatch(text):
        return "'" + text
    return text


def _safe_row(row: Sequence[object]) -> list[object]:
    return [_safe_cell(cell) if isinstance(cell, str) else cell for cell in row]


def _csv(header: Sequence[str], rows: Iterable[Sequence[object]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(header)
    writer.writerows(_safe_row(row) for row in rows)
    return buffer.getvalue().encode("utf-8")


def _bill_rows(bill: Bill, customer: Customer) -> list[list[object]]:
    head: list[object] = [
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

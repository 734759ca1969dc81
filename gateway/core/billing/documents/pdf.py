"""Bills as PDF invoices (S5), rendered with fpdf2.

A module of its own because fpdf2 takes a third of a second to import: the
CLI and the daemon import this module where they first make a PDF, not at
start-up. It uses fpdf2's built-in Helvetica, which covers Latin-1; characters
outside it are printed as "?" (decision: no font file to ship or find at run
time, and a readable invoice rather than a failed one).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, date, datetime, time
from decimal import Decimal

from fpdf import FPDF
from fpdf.fonts import FontFace

from gateway.core.billing.documents.format import money, number
from gateway.core.models import Bill, BillStatus, Customer, Partner


def _latin1(text: str) -> str:
    return text.encode("latin-1", "replace").decode("latin-1")


class _Invoice(FPDF):
    def __init__(self, stamp: date):
        super().__init__(format="A4")
        self.set_creation_date(datetime.combine(stamp, time(0), tzinfo=UTC))
        self.set_auto_page_break(auto=True, margin=18)
        self.set_margins(18, 18, 18)

    def text_line(self, text: str, *, size: float = 10, bold: bool = False, height: float = 5.5) -> None:
        self.set_font("helvetica", "B" if bold else "", size)
        self.multi_cell(0, height, _latin1(text), new_x="LMARGIN", new_y="NEXT")

    def field(self, label: str, value: str) -> None:
        self.set_font("helvetica", "B", 10)
        self.cell(42, 5.5, _latin1(label))
        self.set_font("helvetica", "", 10)
        self.cell(0, 5.5, _latin1(value), new_x="LMARGIN", new_y="NEXT")


def _status_text(bill: Bill) -> str:
    return {BillStatus.ISSUED: "unpaid", BillStatus.DRAFT: "draft (not issued)"}.get(bill.status, bill.status.value)


def _bill_page(pdf: _Invoice, bill: Bill, customer: Customer, partner: Partner) -> None:
    pdf.add_page()
    pdf.text_line(f"Invoice {bill.number}", size=18, bold=True, height=9)
    pdf.ln(2)
    pdf.text_line(f"From: {partner.name}" + (f" <{partner.email}>" if partner.email else ""))
    pdf.text_line(f"Bill to: {customer.name}" + (f" <{bill.email}>" if bill.email else ""))
    pdf.ln(3)
    pdf.field("Billing cycle:", f"{bill.period_start.isoformat()} to {bill.period_end.isoformat()} ({customer.timezone})")
    pdf.field("Issued on:", bill.issued_on.isoformat())
    pdf.field("Due date:", bill.due_on.isoformat())
    pdf.field("Status:", _status_text(bill))
    pdf.field("Devices:", str(bill.device_count))
    pdf.ln(4)
    header = FontFace(emphasis="BOLD", fill_color=(225, 225, 225))
    pdf.set_font("helvetica", "", 9)
    with pdf.table(
        col_widths=(104, 18, 26, 26),
        text_align=("LEFT", "RIGHT", "RIGHT", "RIGHT"),
        headings_style=header,
        line_height=5,
    ) as table:
        row = table.row()
        for title in ("Description", "Qty", f"Unit ({bill.currency})", f"Amount ({bill.currency})"):
            row.cell(title)
        for line in bill.lines:
            row = table.row()
            row.cell(_latin1(line.description))
            row.cell(number(line.quantity))
            row.cell(number(line.unit_price))
            row.cell(money(line.amount, bill.currency))
    pdf.ln(3)
    pdf.set_font("helvetica", "B", 12)
    pdf.cell(0, 7, _latin1(f"Total: {money(bill.total, bill.currency)} {bill.currency}"), align="R",
             new_x="LMARGIN", new_y="NEXT")
    pdf.ln(2)
    if bill.status in (BillStatus.ISSUED, BillStatus.OVERDUE):
        pdf.text_line(f"Please pay by {bill.due_on.isoformat()}, quoting {bill.number}.", size=9)


def bill_pdf(bill: Bill, customer: Customer, partner: Partner) -> bytes:
    """S5: one bill as a readable invoice: partner, customer, cycle, lines, total, due date."""
    pdf = _Invoice(bill.issued_on)
    pdf.set_title(_latin1(f"Invoice {bill.number}"))
    _bill_page(pdf, bill, customer, partner)
    return bytes(pdf.output())


def consolidated_pdf(customer: Customer, partner: Partner, bills: Sequence[Bill]) -> bytes:
    """S5: a summary of every bill of the customer, then each bill on its own page."""
    pdf = _Invoice(max((b.issued_on for b in bills), default=date(1970, 1, 1)))
    pdf.set_title(_latin1(f"Consolidated bill {customer.name}"))
    pdf.add_page()
    pdf.text_line(f"Consolidated bill: {customer.name}", size=16, bold=True, height=8)
    pdf.text_line(f"From: {partner.name}")
    pdf.ln(3)
    pdf.set_font("helvetica", "", 9)
    with pdf.table(col_widths=(44, 50, 26, 24, 30), text_align=("LEFT", "LEFT", "LEFT", "LEFT", "RIGHT"),
                   headings_style=FontFace(emphasis="BOLD", fill_color=(225, 225, 225)), line_height=5) as table:
        row = table.row()
        for title in ("Number", "Cycle", "Due date", "Status", "Total"):
            row.cell(title)
        for bill in bills:
            row = table.row()
            row.cell(bill.number)
            row.cell(f"{bill.period_start.isoformat()} to {bill.period_end.isoformat()}")
            row.cell(bill.due_on.isoformat())
            row.cell(_status_text(bill))
            row.cell(f"{money(bill.total, bill.currency)} {bill.currency}")
    outstanding: dict[str, Decimal] = defaultdict(Decimal)
    for bill in bills:
        if bill.status in (BillStatus.ISSUED, BillStatus.OVERDUE):
            outstanding[bill.currency] += bill.total
    pdf.ln(3)
    if not bills:
        pdf.text_line("No bills.")
    for currency, amount in sorted(outstanding.items()):
        pdf.text_line(f"Outstanding: {money(amount, currency)} {currency}", bold=True)
    for bill in bills:
        _bill_page(pdf, bill, customer, partner)
    return bytes(pdf.output())

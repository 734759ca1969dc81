"""E-mail: bills to their association's address (S2), billing reports to the partner (M6).

Sending goes through SMTP with aiosmtplib. What must reach someone is written
to the store first and marked done only after the server accepted it, so a
failed or interrupted send is retried and never loses a bill:

- a bill is due for e-mail while it is issued (or overdue), has an address and
  no ``emailed_at``; each try counts in ``email_attempts`` and keeps the last
  error in ``email_error``. After ``mail.max_attempts`` failed tries it is left
  for a person (``gateway bills email --bill ID`` tries again) and reported:
  logged, and announced to plugins as the ``gateway_notify`` event
  ``bill.email_failed``. Errors never carry the mail password, even when a
  server echoes it.
- a billing report is queued by the billing run itself (a ``JobRun`` row
  ``billing-report:<partner id>`` / ``YYYY-MM`` in the run's transaction) and
  marked finished once sent.

A bill row is locked while it is sent (``FOR UPDATE SKIP LOCKED`` on
PostgreSQL), so two processes never send one bill twice. The one remaining
window, a crash after the server accepted a message and before ``emailed_at``
was committed, is closed on the reader's side: every message carries a
Message-ID derived from the partner and bill number, which mail clients use
to drop the second copy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from email.message import EmailMessage
from email.utils import formatdate
from typing import TYPE_CHECKING

import aiosmtplib
import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload, sessionmaker

from gateway.core.access import system_principal
from gateway.core.billing.documents import csv as csv_docs
from gateway.core.billing.documents import format as fmt
from gateway.core.billing.reports import REPORT_JOB, monthly_summary, usage_rows
from gateway.core.billing.rules import Period, parse_month
from gateway.core.clock import Clock
from gateway.core.db import transaction
from gateway.core.logging import REDACTED
from gateway.core.models import Bill, BillStatus, Customer, JobRun, Partner
from gateway.core.settings import MailSettings
from gateway.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from gateway.plugins import GatewayPluginManager

log = structlog.get_logger(__name__)

Sleep = Callable[[float], Awaitable[None]]


@dataclass
class MailOutcome:
    """What one sending pass did; ``failed`` pairs say what could not be sent and why."""

    sent: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


class Mailer:
    """One SMTP server from the settings; ``send`` retries with exponential back-off."""

    def __init__(self, mail: MailSettings, *, sleep: Sleep = asyncio.sleep, retry_delay: float = 2.0):
        if not mail.configured:
            raise ConfigError("mail is not configured: set [mail] host and from_address (or GATEWAY_MAIL__HOST, "
                              "GATEWAY_MAIL__FROM_ADDRESS)")
        self.mail = mail
        self.sleep = sleep
        self.retry_delay = retry_delay

    @property
    def sender(self) -> str:
        return self.mail.from_address or ""

    async def send_once(self, message: EmailMessage) -> None:
        await aiosmtplib.send(
            message,
            hostname=self.mail.host,
            port=self.mail.port,
            username=self.mail.username,
            password=self.mail.password.get_secret_value() if self.mail.password else None,
            use_tls=self.mail.use_tls,
            start_tls=self.mail.starttls and not self.mail.use_tls,
            timeout=self.mail.timeout_seconds,
        )

    async def send(self, message: EmailMessage, attempts: int, on_failure: Callable[[str], None]) -> bool:
        """Try up to ``attempts`` times; ``on_failure`` records each error. True when the server accepted it."""
        for attempt in range(attempts):
            try:
                await self.send_once(message)
                return True
            except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
                on_failure(self.describe(exc))
                if attempt + 1 < attempts:
                    await self.sleep(self.retry_delay * (2**attempt))
        return False

    def describe(self, exc: BaseException) -> str:
        """The error as text without the mail password: a server's reply may echo what it was sent."""
        text = _describe(exc)
        password = self.mail.password.get_secret_value() if self.mail.password else ""
        return text.replace(password, REDACTED) if password else text


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:1000]


def _domain(address: str) -> str:
    return address.rsplit("@", 1)[-1] if "@" in address else "gateway.invalid"


def bill_message(sender: str, bill: Bill, customer: Customer, partner: Partner) -> EmailMessage:
    """S2: the bill to its association's e-mail, with the bill as PDF and CSV."""
    from gateway.core.billing.documents import pdf as pdf_docs  # fpdf2 loads with the first PDF, not at start-up

    message = EmailMessage()
    message["From"] = sender
    message["To"] = bill.email or ""
    message["Subject"] = (
        f"Invoice {bill.number} from {partner.name}: {fmt.money(bill.total, bill.currency)} {bill.currency}, "
        f"due {bill.due_on.isoformat()}"
    )
    message["Date"] = formatdate(usegmt=True)
    # Deterministic, so a copy sent twice after a crash is recognised as the same message; numbers are
    # unique per partner only, and one gateway sends for every partner.
    message["Message-ID"] = f"<bill-{bill.partner_id}-{bill.number}@{_domain(sender)}>"
    lines = [
        f"Dear {customer.name},",
        "",
        f"please find attached invoice {bill.number} from {partner.name}.",
        "",
        f"Billing cycle: {bill.period_start.isoformat()} to {bill.period_end.isoformat()}",
        f"Devices: {bill.device_count}",
        f"Total: {fmt.money(bill.total, bill.currency)} {bill.currency}",
        f"Due date: {bill.due_on.isoformat()}",
        "",
        f"{partner.name}",
    ]
    message.set_content("\n".join(lines))
    message.add_attachment(pdf_docs.bill_pdf(bill, customer, partner), maintype="application", subtype="pdf",
                           filename=f"{bill.number}.pdf")
    message.add_attachment(csv_docs.bill_csv(bill, customer), maintype="text", subtype="csv",
                           filename=f"{bill.number}.csv")
    return message


def _locked_bill(session: Session, bill_id: int) -> Bill | None:
    stmt = (
        select(Bill)
        .where(Bill.id == bill_id, Bill.emailed_at.is_(None))
        .options(selectinload(Bill.lines))
    )
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True, of=Bill)
    return session.scalar(stmt)


async def send_bill_emails(
    db: sessionmaker[Session],
    *,
    mail: MailSettings,
    clock: Clock,
    bill_ids: Sequence[int] | None = None,
    sleep: Sleep = asyncio.sleep,
    retry_delay: float = 2.0,
    plugins: GatewayPluginManager | None = None,
) -> MailOutcome:
    """E-mail every issued bill not yet e-mailed (or just ``bill_ids``, whatever their attempts so far).

    A bill whose tries all failed is announced to ``plugins`` as ``bill.email_failed``, after its
    attempts and error are committed.
    """
    mailer = Mailer(mail, sleep=sleep, retry_delay=retry_delay)
    outcome = MailOutcome()
    with db() as session:
        stmt = select(Bill.id).where(
            Bill.emailed_at.is_(None),
            Bill.email.is_not(None),
            Bill.status.in_([BillStatus.ISSUED, BillStatus.OVERDUE]),
        )
        if bill_ids is not None:
            stmt = stmt.where(Bill.id.in_(list(bill_ids)))
        else:
            stmt = stmt.where(Bill.email_attempts < mail.max_attempts)
        candidates = list(session.scalars(stmt.order_by(Bill.id)))
    for bill_id in candidates:
        notice: dict[str, object] | None = None
        with transaction(db) as session:
            bill = _locked_bill(session, bill_id)
            if bill is None:  # sent meanwhile, or being sent by another process
                continue
            customer = session.get_one(Customer, bill.customer_id)
            partner = session.get_one(Partner, bill.partner_id)
            message = bill_message(mailer.sender, bill, customer, partner)

            def failed(error: str, bill: Bill = bill) -> None:
                bill.email_attempts += 1
                bill.email_error = error
                log.warning("mail.bill_attempt_failed", bill=bill.number, attempts=bill.email_attempts, error=error)

            if await mailer.send(message, mail.max_attempts, failed):
                bill.email_attempts += 1
                bill.emailed_at = clock.now()
                bill.email_error = None
                outcome.sent.append(bill.number)
                log.info("mail.bill_sent", bill=bill.number, attempts=bill.email_attempts)
            else:
                outcome.failed.append((bill.number, bill.email_error or "unknown error"))
                log.error("mail.bill_failed", bill=bill.number, attempts=bill.email_attempts, error=bill.email_error,
                          to_retry="gateway bills email --bill ID")
                notice = {"bill": bill.number, "bill_id": bill.id, "partner_id": bill.partner_id,
                          "customer": customer.name, "customer_id": customer.id, "email": bill.email,
                          "attempts": bill.email_attempts, "error": bill.email_error or "unknown error"}
        if notice is not None and plugins is not None:
            await plugins.call_each_async("gateway_notify", event="bill.email_failed", payload=notice)
    return outcome


# --- M6: the billing report ---------------------------------------------------------------


def report_message(sender: str, partner: Partner, month: Period, bills: Sequence[Bill], usage: bytes,
                   customers: dict[int, str]) -> EmailMessage:
    """M6: the month's monthly bills of a partner, with the device usage report (M7) attached."""
    devices = sum(bill.device_count for bill in bills)
    totals: dict[str, Decimal] = {}
    for bill in bills:
        totals[bill.currency] = totals.get(bill.currency, Decimal(0)) + bill.total
    total_text = ", ".join(f"{fmt.money(amount, cur)} {cur}" for cur, amount in sorted(totals.items())) or "0"
    message = EmailMessage()
    message["From"] = sender
    message["To"] = partner.email or ""
    message["Subject"] = f"Billing report {month.start:%Y-%m}: {len(bills)} bill(s), {devices} device(s), {total_text}"
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = f"<billing-report-{partner.id}-{month.start:%Y-%m}@{_domain(sender)}>"
    lines = [f"Monthly billing for {month.start:%B %Y} has been processed.", "",
             f"{'Bill':<22} {'Customer':<30} {'Devices':>7} {'Total':>14}"]
    for bill in bills:
        lines.append(f"{bill.number:<22} {customers.get(bill.customer_id, '?')[:30]:<30} {bill.device_count:>7} "
                     f"{fmt.money(bill.total, bill.currency) + ' ' + bill.currency:>14}")
    lines += ["", f"Active devices billed: {devices}", f"Total: {total_text}", "",
              "The device usage report (one row per billed device) is attached."]
    message.set_content("\n".join(lines))
    message.add_attachment(usage, maintype="text", subtype="csv", filename=f"usage-{month.start:%Y-%m}.csv")
    return message


async def send_billing_reports(
    db: sessionmaker[Session],
    *,
    mail: MailSettings,
    clock: Clock,
    sleep: Sleep = asyncio.sleep,
    retry_delay: float = 2.0,
) -> MailOutcome:
    """Send every queued billing report; a sent one is marked finished and never sent again.

    A report that fails is retried at the next pass, up to ``mail.max_attempts``
    passes (counted in the job's ``owner`` field as ``attempts=N``), then reported.
    """
    mailer = Mailer(mail, sleep=sleep, retry_delay=retry_delay)
    outcome = MailOutcome()
    with db() as session:
        queued = [
            (job.job, job.period, _attempts(job.owner))
            for job in session.scalars(
                select(JobRun).where(JobRun.job.like(f"{REPORT_JOB}:%"), JobRun.finished_at.is_(None))
            )
        ]
    for job_name, period, attempts in queued:
        if attempts >= mail.max_attempts:
            continue
        what = f"billing report {period} for partner {job_name.split(':', 1)[1]}"
        with transaction(db) as session:
            stmt = select(JobRun).where(JobRun.job == job_name, JobRun.period == period, JobRun.finished_at.is_(None))
            if session.get_bind().dialect.name == "postgresql":
                stmt = stmt.with_for_update(skip_locked=True)
            job = session.scalar(stmt)
            if job is None:
                continue
            partner = session.get(Partner, int(job_name.split(":", 1)[1]))
            if partner is None or not partner.email:
                error = "the partner has no e-mail address; set one, and the report is sent at the next pass"
                job.owner = f"attempts={attempts + 1}"
                outcome.failed.append((what, error))
                log.error("mail.report_failed", partner=job_name, period=period, error=error)
                continue
            month = parse_month(period)
            principal = system_principal(partner.id, "system:billing-report")
            bills = monthly_summary(session, partner.id, month)
            customers = dict(session.execute(select(Customer.id, Customer.name).where(Customer.partner_id == partner.id)).all())
            usage = csv_docs.usage_csv(usage_rows(session, principal, month))
            message = report_message(mailer.sender, partner, month, bills, usage, customers)
            errors: list[str] = []
            if await mailer.send(message, 1, errors.append):
                job.finished_at = clock.now()
                job.owner = f"attempts={attempts + 1}"
                outcome.sent.append(what)
                log.info("mail.report_sent", partner=partner.id, period=period)
            else:
                job.owner = f"attempts={attempts + 1}"
                outcome.failed.append((what, errors[-1]))
                log.error("mail.report_failed", partner=partner.id, period=period, attempts=attempts + 1, error=errors[-1])
    return outcome


def _attempts(owner: str | None) -> int:
    if owner and owner.startswith("attempts="):
        try:
            return int(owner.split("=", 1)[1])
        except ValueError:
            return 0
    return 0


# --- the billing calendar ------------------------------------------------------------------

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

A bill is **claimed** before it is sent: one conditional UPDATE (still not
e-mailed, and no live claim of another sender) sets ``email_claimed_by`` and a
lease ``email_claimed_until`` and is committed before the SMTP conversation
starts; the outcome is recorded only while the claim is still ours. So two
processes never send one bill twice, on SQLite (which has no ``FOR UPDATE SKIP
LOCKED``) as on PostgreSQL, and no transaction is held open while a server is
slow. A sender that dies leaves a claim that expires; the bill goes out at a
later pass. The one remaining window, a crash after the server accepted a message and before ``emailed_at``
was committed, is closed on the reader's side: every message carries a
Message-ID derived from the partner and bill number, which mail clients use
to drop the second copy.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from email.message import EmailMessage
from email.utils import formatdate
from typing import TYPE_CHECKING, Any, cast

import aiosmtplib
import structlog
from sqlalchemy import CursorResult, or_, select, update
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


def _sender_id() -> str:
    """This sending pass in claims: host, process and a random part (two passes of one process differ too)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"[:100]


def _claim_seconds(mail: MailSettings, retry_delay: float) -> float:
    """A claim outlives every try of one bill (timeouts and back-off sleeps), with a minute to spare."""
    sleeps = sum(retry_delay * (2**attempt) for attempt in range(max(mail.max_attempts - 1, 0)))
    return mail.max_attempts * mail.timeout_seconds + sleeps + 60.0


def _claim_bill(db: sessionmaker[Session], bill_id: int, sender: str, now: datetime, until: datetime,
                max_attempts: int | None) -> bool:
    """Claim one bill for sending; False if it was e-mailed meanwhile or another sender holds a live claim.

    One UPDATE, committed before anything is sent: the database orders two claims (SQLite's write lock,
    PostgreSQL's row lock with the condition re-checked), so only one sender wins.
    """
    conditions = [
        Bill.id == bill_id,
        Bill.emailed_at.is_(None),
        Bill.email.is_not(None),
        Bill.status.in_([BillStatus.ISSUED, BillStatus.OVERDUE]),
        or_(Bill.email_claimed_until.is_(None), Bill.email_claimed_until < now),
    ]
    if max_attempts is not None:
        conditions.append(Bill.email_attempts < max_attempts)
    with transaction(db) as session:
        result = session.execute(
            update(Bill).where(*conditions).values(email_claimed_by=sender, email_claimed_until=until)
            .execution_options(synchronize_session=False)
        )
        # an UPDATE gives a CursorResult; Session.execute is typed as giving any Result
        return cast(CursorResult[Any], result).rowcount == 1


def _record_bill(db: sessionmaker[Session], bill_id: int, sender: str, **values: object) -> bool:
    """Write the outcome and release the claim, only while the claim is still ours."""
    with transaction(db) as session:
        result = session.execute(
            update(Bill).where(Bill.id == bill_id, Bill.email_claimed_by == sender)
            .values(email_claimed_by=None, email_claimed_until=None, **values)
            .execution_options(synchronize_session=False)
        )
        return cast(CursorResult[Any], result).rowcount == 1


def _bill_and_message(db: sessionmaker[Session], sender: str, bill_id: int) -> tuple[Bill, Customer, EmailMessage]:
    with db() as session:
        bill = session.scalars(select(Bill).where(Bill.id == bill_id).options(selectinload(Bill.lines))).one()
        customer = session.get_one(Customer, bill.customer_id)
        partner = session.get_one(Partner, bill.partner_id)
        return bill, customer, bill_message(sender, bill, customer, partner)


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

    Each bill is claimed before it is sent (see the module docstring), so concurrent passes in
    several processes send each bill once. A bill whose tries all failed is announced to
    ``plugins`` as ``bill.email_failed``, after its attempts and error are committed.
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
    sender = _sender_id()
    lease = timedelta(seconds=_claim_seconds(mail, retry_delay))
    for bill_id in candidates:
        now = clock.now()
        claimed = await asyncio.to_thread(_claim_bill, db, bill_id, sender, now, now + lease,
                                          None if bill_ids is not None else mail.max_attempts)
        if not claimed:  # sent meanwhile, or being sent by another process
            continue
        try:
            bill, customer, message = await asyncio.to_thread(_bill_and_message, db, mailer.sender, bill_id)
        except Exception:
            await asyncio.to_thread(_record_bill, db, bill_id, sender)  # release the claim, then report the bug
            raise
        errors: list[str] = []

        def failed(error: str, bill: Bill = bill, errors: list[str] = errors) -> None:
            errors.append(error)
            log.warning("mail.bill_attempt_failed", bill=bill.number, attempts=bill.email_attempts + len(errors),
                        error=error)

        sent = await mailer.send(message, mail.max_attempts, failed)
        attempts = bill.email_attempts + len(errors) + (1 if sent else 0)
        if sent:
            recorded = await asyncio.to_thread(_record_bill, db, bill_id, sender, email_attempts=attempts,
                                               emailed_at=clock.now(), email_error=None)
            outcome.sent.append(bill.number)
            log.info("mail.bill_sent", bill=bill.number, attempts=attempts)
        else:
            error = errors[-1] if errors else "unknown error"
            recorded = await asyncio.to_thread(_record_bill, db, bill_id, sender, email_attempts=attempts,
                                               email_error=error)
            outcome.failed.append((bill.number, error))
            log.error("mail.bill_failed", bill=bill.number, attempts=attempts, error=error,
                      to_retry="gateway bills email --bill ID")
            if recorded and plugins is not None:
                notice = {"bill": bill.number, "bill_id": bill.id, "partner_id": bill.partner_id,
                          "customer": customer.name, "customer_id": customer.id, "email": bill.email,
                          "attempts": attempts, "error": error}
                await plugins.call_each_async("gateway_notify", event="bill.email_failed", payload=notice)
        if not recorded:
            log.warning("mail.bill_claim_lost", bill=bill.number, sender=sender, sent=sent)
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
    Like a bill, a report is claimed before it is sent (``owner`` gains ``;until=`` and the
    sender, by a compare-and-set UPDATE committed first), so two processes send it once.
    """
    mailer = Mailer(mail, sleep=sleep, retry_delay=retry_delay)
    outcome = MailOutcome()
    sender = _sender_id()
    with db() as session:
        queued = [
            (job.job, job.period, job.owner)
            for job in session.scalars(
                select(JobRun).where(JobRun.job.like(f"{REPORT_JOB}:%"), JobRun.finished_at.is_(None))
            )
        ]
    for job_name, period, owner in queued:
        attempts = _attempts(owner)
        if attempts >= mail.max_attempts:
            continue
        now = clock.now()
        claim = f"attempts={attempts};until={int(now.timestamp() + _claim_seconds(mail, retry_delay))};by={sender}"
        if not await asyncio.to_thread(_claim_report, db, job_name, period, owner, claim[:100], now):
            continue  # sent meanwhile, or being sent by another process
        claim = claim[:100]
        what = f"billing report {period} for partner {job_name.split(':', 1)[1]}"
        done = f"attempts={attempts + 1}"
        built = await asyncio.to_thread(_report, db, mailer.sender, job_name, period)
        if isinstance(built, str):
            await asyncio.to_thread(_record_report, db, job_name, period, claim, owner=done)
            outcome.failed.append((what, built))
            log.error("mail.report_failed", partner=job_name, period=period, error=built)
            continue
        partner_id, message = built
        errors: list[str] = []
        if await mailer.send(message, 1, errors.append):
            await asyncio.to_thread(_record_report, db, job_name, period, claim, owner=done, finished_at=clock.now())
            outcome.sent.append(what)
            log.info("mail.report_sent", partner=partner_id, period=period)
        else:
            await asyncio.to_thread(_record_report, db, job_name, period, claim, owner=done)
            outcome.failed.append((what, errors[-1]))
            log.error("mail.report_failed", partner=partner_id, period=period, attempts=attempts + 1, error=errors[-1])
    return outcome


def _claim_report(db: sessionmaker[Session], job_name: str, period: str, seen: str | None, claim: str,
                  now: datetime) -> bool:
    """Compare-and-set the job's ``owner`` from what we read to our claim; refuse a live claim of another."""
    if _claimed_until(seen) > now.timestamp():
        return False
    with transaction(db) as session:
        result = session.execute(
            update(JobRun)
            .where(JobRun.job == job_name, JobRun.period == period, JobRun.finished_at.is_(None),
                   JobRun.owner.is_(None) if seen is None else JobRun.owner == seen)
            .values(owner=claim)
            .execution_options(synchronize_session=False)
        )
        return cast(CursorResult[Any], result).rowcount == 1


def _record_report(db: sessionmaker[Session], job_name: str, period: str, claim: str, **values: object) -> bool:
    with transaction(db) as session:
        result = session.execute(
            update(JobRun).where(JobRun.job == job_name, JobRun.period == period, JobRun.owner == claim)
            .values(**values).execution_options(synchronize_session=False)
        )
        return cast(CursorResult[Any], result).rowcount == 1


def _report(db: sessionmaker[Session], sender: str, job_name: str, period: str) -> tuple[int, EmailMessage] | str:
    """The report's message, or why there is none."""
    with db() as session:
        partner = session.get(Partner, int(job_name.split(":", 1)[1]))
        if partner is None or not partner.email:
            return "the partner has no e-mail address; set one, and the report is sent at the next pass"
        month = parse_month(period)
        principal = system_principal(partner.id, "system:billing-report")
        bills = monthly_summary(session, partner.id, month)
        customers = dict(session.execute(select(Customer.id, Customer.name).where(Customer.partner_id == partner.id)).all())
        usage = csv_docs.usage_csv(usage_rows(session, principal, month))
        return partner.id, report_message(sender, partner, month, bills, usage, customers)


def _owner_fields(owner: str | None) -> dict[str, str]:
    fields: dict[str, str] = {}
    for part in (owner or "").split(";"):
        key, _, value = part.partition("=")
        fields[key] = value
    return fields


def _attempts(owner: str | None) -> int:
    try:
        return int(_owner_fields(owner).get("attempts", "0") or 0)
    except ValueError:
        return 0


def _claimed_until(owner: str | None) -> float:
    try:
        return float(_owner_fields(owner).get("until", "0") or 0)
    except ValueError:
        return 0.0


# --- the billing calendar ------------------------------------------------------------------

"""E-mail of bills (S2) and billing reports (M6) through a real SMTP server on loopback."""

from __future__ import annotations

import csv
import email
import io
import json
from datetime import UTC, date, datetime
from email.message import EmailMessage
from email.policy import default as default_policy

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from builders import free_port, make_gateway
from pypdf import PdfReader
from sqlalchemy import select
from structlog.testing import capture_logs

from gateway import hookimpl
from gateway.core.access import system_principal
from gateway.core.billing import associations, plans, subscriptions
from gateway.core.billing import run as billing_run
from gateway.core.clock import FrozenClock
from gateway.core.db import transaction
from gateway.core.models import Bill, BillKind, BillStatus, Customer, Device, DeviceActivity, JobRun, Partner, Workspace
from gateway.core.settings import BillingSettings, MailSettings
from gateway.plugins import get_plugin_manager
from gateway.sync import jobs, mail

UTC = UTC
T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Inbox:
    """An aiosmtpd handler that keeps what it accepted and can refuse the first N messages."""

    def __init__(self, refuse: int = 0):
        self.refuse = refuse
        self.received: list[tuple[list[str], EmailMessage]] = []
        self.refused = 0

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's name
        if self.refused < self.refuse:
            self.refused += 1
            return "451 4.3.0 Mailbox temporarily unavailable"
        message = email.message_from_bytes(envelope.content, policy=default_policy)
        self.received.append((list(envelope.rcpt_tos), message))
        return "250 OK"


PASSWORD = "smtp-pass-Zq81x"


def echoing_rejection(server, session, envelope, mechanism, auth_data) -> AuthResult:
    """A careless server that refuses every login and repeats the credentials it was given in its reply."""
    login, password = auth_data.login.decode(), auth_data.password.decode()
    return AuthResult(success=False, handled=False, message=f"535 5.7.8 login {login}:{password} refused")


@pytest.fixture
def smtp():
    """Start an SMTP server on 127.0.0.1; yields (inbox, mail settings).

    ``reject_login``: the server asks for a login (as user ``billing``, password ``PASSWORD``) and refuses it.
    """
    servers = []

    def start(refuse: int = 0, max_attempts: int = 3, reject_login: bool = False) -> tuple[Inbox, MailSettings]:
        inbox = Inbox(refuse)
        port = free_port()
        auth = {"authenticator": echoing_rejection, "auth_require_tls": False} if reject_login else {}
        controller = Controller(inbox, hostname="127.0.0.1", port=port, **auth)
        controller.start()
        servers.append(controller)
        credentials = {"username": "billing", "password": PASSWORD} if reject_login else {}
        settings = MailSettings(host="127.0.0.1", port=port, from_address="billing@msp.example", starttls=False,
                                timeout_seconds=5, max_attempts=max_attempts, **credentials)
        return inbox, settings

    yield start
    for controller in servers:
        controller.stop()


async def no_sleep(_: float) -> None:
    return None


def billed_world(db, settings: MailSettings) -> int:
    """One customer with a plan, billed for March; returns the bill id."""
    with transaction(db) as s:
        p = Partner(name="Northwind IT", email="owner@northwind.example", created_at=T0)
        s.add(p)
        s.flush()
        c = Customer(partner_id=p.id, name="Acme", created_at=T0)
        s.add(c)
        s.flush()
        w = Workspace(customer_id=c.id, name="Main", created_at=T0)
        s.add(w)
        s.flush()
        admin = system_principal(p.id, "test")
        plan = plans.create_plan(s, admin, name="Managed", price_per_device="9.99", currency="USD", now=T0)
        associations.associate(s, admin, plan_id=plan.id, customer_ids=[c.id], cycle="monthly", starts_on=date(2026, 3, 1),
                               due_days=14, email="ap@acme.example", mail=settings, now=T0)
        d = Device(connection="rmm", external_id="d1", org_external_id="o", workspace_id=w.id, first_seen_at=T0,
                   updated_at=T0)
        s.add(d)
        s.flush()
        s.add(DeviceActivity(device_id=d.id, day=date(2026, 3, 9)))
    with transaction(db) as s:
        run = billing_run.run_billing(s, now=datetime(2026, 4, 1, 1, tzinfo=UTC), billing=BillingSettings())
    return run.bill_ids[0]


def bill(db, bill_id: int) -> Bill:
    with db() as s:
        return s.get(Bill, bill_id)


def attachments(message: EmailMessage) -> dict[str, bytes]:
    return {part.get_filename(): part.get_payload(decode=True) for part in message.iter_attachments()}


async def test_s2_bill_is_emailed_to_the_associations_address_with_pdf_and_csv(db, smtp):
    inbox, settings = smtp()
    bill_id = billed_world(db, settings)
    clock = FrozenClock(datetime(2026, 4, 1, 2, tzinfo=UTC))
    outcome = await mail.send_bill_emails(db, mail=settings, clock=clock, sleep=no_sleep)
    sent = bill(db, bill_id)
    assert outcome.sent == [sent.number] and outcome.failed == []
    ((recipients, message),) = inbox.received
    assert recipients == ["ap@acme.example"]
    assert message["From"] == "billing@msp.example"
    assert sent.number in message["Subject"] and "9.99 USD" in message["Subject"]
    assert message["Message-ID"] == f"<bill-{sent.partner_id}-{sent.number}@msp.example>"
    files = attachments(message)
    assert set(files) == {f"{sent.number}.pdf", f"{sent.number}.csv"}
    text = PdfReader(io.BytesIO(files[f"{sent.number}.pdf"])).pages[0].extract_text()
    assert f"Invoice {sent.number}" in text and "Total: 9.99 USD" in text and "2026-04-15" in text
    rows = list(csv.DictReader(io.StringIO(files[f"{sent.number}.csv"].decode())))
    assert rows[0]["bill_total"] == "9.99"
    assert (sent.emailed_at, sent.email_attempts, sent.email_error) == (clock.now(), 1, None)
    # A second pass never sends the bill again.
    again = await mail.send_bill_emails(db, mail=settings, clock=clock, sleep=no_sleep)
    assert again.sent == [] and len(inbox.received) == 1


class Notices:
    """A plugin that keeps what ``gateway_notify`` told it."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    @hookimpl
    def gateway_notify(self, event, payload):
        self.events.append((event, dict(payload)))


async def test_s2_a_failed_send_is_retried_and_the_bill_sent_once(db, smtp):
    inbox, settings = smtp(refuse=2, max_attempts=3)
    bill_id = billed_world(db, settings)
    delays: list[float] = []
    notices = Notices()

    async def sleep(seconds: float) -> None:
        delays.append(seconds)

    outcome = await mail.send_bill_emails(db, mail=settings, clock=FrozenClock(T0), sleep=sleep, retry_delay=0.5,
                                          plugins=get_plugin_manager(extra_plugins=[notices], load_entry_points=False))
    assert outcome.failed == [] and len(outcome.sent) == 1
    assert notices.events == []  # a send that succeeded in the end is nothing to tell
    assert inbox.refused == 2 and len(inbox.received) == 1
    assert delays == [0.5, 1.0]
    sent = bill(db, bill_id)
    assert sent.email_attempts == 3 and sent.emailed_at is not None and sent.email_error is None


async def test_s2_a_send_that_keeps_failing_is_reported_and_the_bill_kept(db, smtp):
    inbox, settings = smtp(refuse=100, max_attempts=3)
    bill_id = billed_world(db, settings)
    outcome = await mail.send_bill_emails(db, mail=settings, clock=FrozenClock(T0), sleep=no_sleep)
    failed = bill(db, bill_id)
    assert outcome.sent == [] and [number for number, _ in outcome.failed] == [failed.number]
    assert "451" in outcome.failed[0][1]
    assert failed.status == BillStatus.ISSUED and failed.emailed_at is None
    assert failed.email_attempts == 3 and "Mailbox temporarily unavailable" in failed.email_error
    # Automatic passes leave it alone now; asking for the bill by id tries again.
    assert (await mail.send_bill_emails(db, mail=settings, clock=FrozenClock(T0), sleep=no_sleep)).failed == []
    assert inbox.refused == 3
    inbox.refuse = 0
    retried = await mail.send_bill_emails(db, mail=settings, clock=FrozenClock(T0), bill_ids=[bill_id], sleep=no_sleep)
    assert retried.sent == [failed.number] and len(inbox.received) == 1
    assert bill(db, bill_id).email_attempts == 4


async def test_s2_a_bill_whose_email_finally_fails_is_notified_to_plugins_without_the_password(db, smtp):
    inbox, settings = smtp(max_attempts=2, reject_login=True)
    bill_id = billed_world(db, settings)
    notices = Notices()
    plugins = get_plugin_manager(extra_plugins=[notices], load_entry_points=False)
    with capture_logs() as logs:
        outcome = await mail.send_bill_emails(db, mail=settings, clock=FrozenClock(T0), sleep=no_sleep, plugins=plugins)
    failed = bill(db, bill_id)
    assert inbox.received == [] and failed.emailed_at is None and failed.email_attempts == 2
    ((event, payload),) = notices.events
    assert event == "bill.email_failed"
    assert payload == {
        "bill": failed.number, "bill_id": bill_id, "partner_id": failed.partner_id, "customer": "Acme",
        "customer_id": failed.customer_id, "email": "ap@acme.example", "attempts": 2, "error": failed.email_error,
    }
    assert "535" in payload["error"] and "billing:[REDACTED] refused" in payload["error"]
    json.dumps(payload)  # JSON-serialisable, as the hook promises
    for seen in (repr(notices.events), failed.email_error, repr(outcome.failed), repr(logs)):
        assert PASSWORD not in seen
    # A pass that does not try the bill again (its attempts are used up) announces nothing new.
    await mail.send_bill_emails(db, mail=settings, clock=FrozenClock(T0), sleep=no_sleep, plugins=plugins)
    assert len(notices.events) == 1


async def test_s2_an_unreachable_server_is_recorded_not_raised(db):
    settings = MailSettings(host="127.0.0.1", port=free_port(), from_address="billing@msp.example", starttls=False,
                            timeout_seconds=2, max_attempts=2)
    bill_id = billed_world(db, settings)
    outcome = await mail.send_bill_emails(db, mail=settings, clock=FrozenClock(T0), sleep=no_sleep)
    assert len(outcome.failed) == 1
    failed = bill(db, bill_id)
    assert failed.email_attempts == 2 and failed.emailed_at is None and failed.email_error


def monthly_world(db) -> Partner:
    with transaction(db) as s:
        p = Partner(name="Northwind IT", email="owner@northwind.example", created_at=T0)
        s.add(p)
        s.flush()
        admin = system_principal(p.id, "test")
        subscriptions.enable_monthly(s, admin, settings=BillingSettings(), now=datetime(2026, 2, 10, tzinfo=UTC))
        for name in ("Acme", "Beta"):
            c = Customer(partner_id=p.id, name=name, created_at=T0)
            s.add(c)
            s.flush()
            w = Workspace(customer_id=c.id, name="Main", created_at=T0)
            s.add(w)
            s.flush()
            subscriptions.join_monthly(s, admin, workspace_id=w.id, max_devices=10, now=datetime(2026, 2, 10, tzinfo=UTC))
            for i in range(2 if name == "Acme" else 1):
                d = Device(connection="rmm", external_id=f"{name}-{i}", org_external_id="o", workspace_id=w.id,
                           hostname=f"{name.lower()}-{i}", first_seen_at=T0, updated_at=T0)
                s.add(d)
                s.flush()
                s.add(DeviceActivity(device_id=d.id, day=date(2026, 3, 3 + i)))
    return p


async def billing_job(gateway) -> jobs.BillingPass:
    """One pass of the billing calendar with the gateway's parts, e-mail retries without waiting."""
    return await jobs.billing_job(gateway.db, gateway.clock, gateway.settings.billing, gateway.settings.mail,
                                  gateway.plugins, sleep=no_sleep)


async def test_m6_after_a_run_the_partner_gets_the_billing_report_once(db, db_engine, smtp):
    inbox, settings = smtp()
    p = monthly_world(db)
    gateway = make_gateway(db_engine, FrozenClock(datetime(2026, 4, 1, 0, 30, tzinfo=UTC)), mail=settings, db=db)
    first = await billing_job(gateway)
    assert len(first.run.bill_ids) == 2
    # The activation bill went to the partner when it was issued; the report follows the run.
    reports = [(to, m) for to, m in inbox.received if m["Subject"].startswith("Billing report")]
    ((recipients, report),) = reports
    assert recipients == ["owner@northwind.example"]
    assert report["Subject"] == "Billing report 2026-03: 2 bill(s), 3 device(s), 7.50 USD"
    body = report.get_body(("plain",)).get_content()
    assert "Acme" in body and "Beta" in body
    usage = attachments(report)["usage-2026-03.csv"].decode()
    assert [row["device_id"] for row in csv.DictReader(io.StringIO(usage))] == ["Acme-0", "Acme-1", "Beta-0"]
    with db() as s:
        assert s.scalar(select(JobRun.finished_at).where(JobRun.job == f"billing-report:{p.id}")) is not None
    second = await billing_job(gateway)
    assert second.run.bill_ids == [] and second.mail.sent == []
    assert len([m for _, m in inbox.received if m["Subject"].startswith("Billing report")]) == 1


async def test_m6_a_report_that_could_not_be_sent_is_retried_at_the_next_pass(db, db_engine, smtp):
    inbox, settings = smtp(refuse=100)
    monthly_world(db)
    gateway = make_gateway(db_engine, FrozenClock(datetime(2026, 4, 1, 0, 30, tzinfo=UTC)), mail=settings, db=db)
    first = await billing_job(gateway)
    assert any("billing report 2026-03" in what for what, _ in first.mail.failed)
    inbox.refuse = 0
    second = await billing_job(gateway)
    assert second.run.bill_ids == []
    assert [what for what in second.mail.sent if what.startswith("billing report")] == [
        "billing report 2026-03 for partner 1"
    ]
    assert len([m for _, m in inbox.received if m["Subject"].startswith("Billing report")]) == 1
    with db() as s:  # the activation bill used up its attempts in the first pass: it waits for a person
        activation = s.scalar(select(Bill).where(Bill.kind == BillKind.ACTIVATION))
        assert activation.emailed_at is None and activation.email_attempts == 3

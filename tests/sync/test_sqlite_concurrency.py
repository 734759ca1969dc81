"""SQLite shared by the daemon's own jobs, and by several ``gateway bill`` runs at once.

- A unit of work (``transaction``) that reads and then writes takes SQLite's write lock first
  (``BEGIN IMMEDIATE``): it waits behind another writer instead of failing with "database is
  locked" because that writer committed after its read began.
- A job that still meets a lock retries soon, not a whole interval later.
- Two senders at once e-mail each bill once (S2, the mail module's promise): a bill is claimed
  with a committed conditional UPDATE before it is sent; on SQLite and PostgreSQL.
- A lock met by the CLI is one clear line, not a traceback.
"""

from __future__ import annotations

import asyncio
import email
import sqlite3
import threading
from datetime import timedelta
from email.policy import default as default_policy

import pytest
from aiosmtpd.controller import Controller
from builders import free_port, write_config
from psa_world import BILLED_AT, build_world, logging_restored
from sqlalchemy import select, text, update
from sqlalchemy.exc import OperationalError

from gateway import cli
from gateway.core import db as gdb
from gateway.core.clock import FrozenClock
from gateway.core.models import Bill, Partner
from gateway.core.settings import MailSettings
from gateway.sync import mail
from gateway.sync.coordinator import Coordinator

NOW = BILLED_AT + timedelta(hours=1)


class Inbox:
    def __init__(self) -> None:
        self.received: list[email.message.EmailMessage] = []
        self._lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's name
        with self._lock:
            self.received.append(email.message_from_bytes(envelope.content, policy=default_policy))
        return "250 OK"


@pytest.fixture
def smtp():
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    settings = MailSettings(host="127.0.0.1", port=port, from_address="billing@msp.example", starttls=False,
                            timeout_seconds=5, max_attempts=2)
    yield inbox, settings
    controller.stop()


# --- the daemon's jobs on SQLite ---------------------------------------------------------------------


def test_g5_sqlite_a_unit_of_work_that_reads_then_writes_waits_for_another_writer_instead_of_failing(sqlite_engine):
    factory = gdb.session_factory(sqlite_engine)
    with gdb.transaction(factory) as s:
        s.add(Partner(name="P", created_at=NOW))
    other_done = threading.Event()
    errors: list[BaseException] = []

    def other_writer() -> None:
        try:
            with gdb.transaction(factory) as s:
                s.execute(update(Partner).values(next_bill_number=Partner.next_bill_number + 10))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        other_done.set()

    # A job reads, another job of the process writes and commits meanwhile, then the first writes:
    # with a deferred BEGIN the first one's snapshot is stale and SQLite refuses at once ("database is locked").
    with gdb.transaction(factory) as s:
        number = s.scalar(select(Partner.next_bill_number))
        thread = threading.Thread(target=other_writer)
        thread.start()
        other_done.wait(1.0)  # BEGIN IMMEDIATE: the other writer waits for us, so this times out
        s.execute(update(Partner).values(next_bill_number=number + 1))
    thread.join(10)
    assert errors == []
    with factory() as s:
        assert s.scalar(select(Partner.next_bill_number)) == number + 11  # both writes, one after the other


async def test_g5_a_job_that_meets_a_database_lock_retries_soon_not_a_whole_interval_later():
    calls = 0

    async def job() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OperationalError("UPDATE partners SET x=?", (1,), sqlite3.OperationalError("database is locked"))
        return "ok"

    coordinator = Coordinator("billing", interval=300.0, job=job)
    assert not await coordinator.run_once()
    assert coordinator.next_delay() <= 1.0  # not 300 s, nor the doubled failure back-off
    assert await coordinator.run_once()
    assert coordinator.next_delay() == 300.0
    # An ordinary failure still backs off from the interval.
    failing = Coordinator("pull", interval=10.0, job=_boom)
    await failing.run_once()
    assert failing.next_delay() == 20.0


async def _boom() -> None:
    raise RuntimeError("the tool is broken")


# --- two senders at once (S2: a bill is e-mailed once) -----------------------------------------------


def test_s2_two_senders_at_once_email_each_bill_once(db, smtp):
    inbox, settings = smtp
    world = build_world(db, customers=12, psa={})
    with db() as s:
        assert all(bill.email for bill in s.scalars(select(Bill)))
    clock = FrozenClock(NOW)
    outcomes: list[mail.MailOutcome] = []
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def process() -> None:  # each "process" has its own event loop and connections
        start.wait()
        try:
            outcomes.append(asyncio.run(mail.send_bill_emails(db, mail=settings, clock=clock, retry_delay=0)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=process) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    numbers = sorted(m["Message-ID"] for m in inbox.received)
    assert len(numbers) == len(world.bill_ids) == len(set(numbers)), f"{len(numbers)} messages for 12 bills"
    assert sorted(n for o in outcomes for n in o.sent) == sorted(_numbers(db))
    with db() as s:
        bills = list(s.scalars(select(Bill)))
    assert all(b.emailed_at is not None and b.email_attempts == 1 and b.email_claimed_by is None for b in bills)
    # A second pass changes nothing.
    assert asyncio.run(mail.send_bill_emails(db, mail=settings, clock=clock)).sent == []
    assert len(inbox.received) == 12


def _numbers(db) -> list[str]:
    with db() as s:
        return list(s.scalars(select(Bill.number)))


def test_s2_a_bill_claimed_by_a_live_sender_is_skipped_and_a_dead_senders_claim_expires(db, smtp):
    inbox, settings = smtp
    build_world(db, customers=2, psa={})
    first, second = _numbers(db)
    with gdb.transaction(db) as s:
        s.execute(update(Bill).where(Bill.number == first)
                  .values(email_claimed_by="other:1", email_claimed_until=NOW + timedelta(minutes=5)))
        s.execute(update(Bill).where(Bill.number == second)
                  .values(email_claimed_by="dead:2", email_claimed_until=NOW - timedelta(seconds=1)))
    outcome = asyncio.run(mail.send_bill_emails(db, mail=settings, clock=FrozenClock(NOW)))
    assert outcome.sent == [second] and len(inbox.received) == 1
    later = asyncio.run(mail.send_bill_emails(db, mail=settings, clock=FrozenClock(NOW + timedelta(minutes=6))))
    assert later.sent == [first] and len(inbox.received) == 2


def test_s2_a_cli_bill_run_that_meets_a_database_lock_says_so_in_one_line(sqlite_engine, tmp_path, capsys,
                                                                           monkeypatch):
    path = sqlite_engine.url.database
    config = write_config(tmp_path / "gateway.toml", database_url=f"sqlite:///{path}")
    monkeypatch.setattr(gdb, "SQLITE_BUSY_TIMEOUT_MS", 200)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process is writing, and keeps at it
    try:
        with logging_restored():
            code = cli.main(["--config", str(config), "bill"])
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    err = capsys.readouterr().err
    assert code != 0
    assert err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert "database is busy" in err and "run the command again" in err


def test_g5_the_lock_check_knows_a_lock_from_other_database_errors():
    locked = OperationalError("SELECT 1", {}, sqlite3.OperationalError("database is locked"))
    assert gdb.is_lock_error(locked)
    assert not gdb.is_lock_error(OperationalError("SELECT 1", {}, sqlite3.OperationalError("no such table: x")))
    assert not gdb.is_lock_error(RuntimeError("database is locked"))
    with pytest.raises(OperationalError):
        with gdb.make_engine("sqlite://").connect() as connection:
            connection.execute(text("SELECT * FROM nowhere"))


def test_m6_two_senders_at_once_send_a_billing_report_once(db, smtp):
    from gateway.core.billing.reports import REPORT_JOB
    from gateway.core.models import JobRun

    inbox, settings = smtp
    world = build_world(db, customers=2, psa={})
    with gdb.transaction(db) as s:
        s.query(JobRun).filter(JobRun.job.like(f"{REPORT_JOB}:%")).delete(synchronize_session=False)
        s.add(JobRun(job=f"{REPORT_JOB}:{world.partner_id}", period="2026-03", started_at=NOW))
    clock = FrozenClock(NOW)
    start = threading.Barrier(3)
    errors: list[BaseException] = []

    def process() -> None:
        start.wait()
        try:
            asyncio.run(mail.send_billing_reports(db, mail=settings, clock=clock, retry_delay=0))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=process) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert [m["Message-ID"] for m in inbox.received] == [f"<billing-report-{world.partner_id}-2026-03@msp.example>"]
    with db() as s:
        job = s.scalar(select(JobRun).where(JobRun.job == f"{REPORT_JOB}:{world.partner_id}"))
        assert job.finished_at is not None and job.owner == "attempts=1"
    assert asyncio.run(mail.send_billing_reports(db, mail=settings, clock=clock)).sent == []

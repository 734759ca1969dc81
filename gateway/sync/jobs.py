"""Every scheduled job of a gateway process, each with one signature.

A job is an ``async () -> object`` built here from what it uses (session
factory, clock, settings, adapters, plugin hooks), never from the whole
``Gateway``. This is also where the core's plugin-free use cases meet the
plugin hooks: the core takes plain callables, and the adapters from hooks to
those callables live here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import structlog
from sqlalchemy.orm import Session, sessionmaker

from gateway.core import db as gdb
from gateway.core.billing.lifecycle import mark_overdue
from gateway.core.billing.rules import Period
from gateway.core.billing.run import BillingRun, run_billing
from gateway.core.clock import Clock
from gateway.core.db import transaction
from gateway.core.licensing.daily import DailyReport, run_daily
from gateway.core.retention import prune_received_webhooks
from gateway.core.settings import BillingSettings, LicensingSettings, MailSettings
from gateway.errors import Conflict, DomainError
from gateway.sync.devices import pull_connection
from gateway.sync.mail import MailOutcome, Sleep, send_bill_emails, send_billing_reports
from gateway.sync.outbox import deliver_connection_until_idle
from gateway.sync.scheduler import ScheduledJob, exclusive

if TYPE_CHECKING:  # pragma: no cover
    from sqlalchemy import Engine

    from gateway.core.billing.drafts import BillDraft
    from gateway.core.billing.run import ExtraLines, Refuse
    from gateway.core.settings import ConnectionSettings, Settings
    from gateway.plugins import GatewayPluginManager
    from gateway.sync.outbox import Delivered, PsaFor
    from gateway.sync.ports import Notify, PullCounters

log = structlog.get_logger(__name__)

# --- licensing job (expiries, renewals, reminders) ---


async def run_daily_job(
    factory: sessionmaker[Session], clock: Clock, config: LicensingSettings, plugins: GatewayPluginManager
) -> DailyReport:
    """The scheduled entry point: decide and record in one transaction, then notify through ``gateway_notify``.

    Notices go out only after the commit, so a run that fails or loses a race to a
    concurrent run (the reminder's unique key) sends nothing.
    """
    def work() -> DailyReport:
        try:
            with gdb.transaction(factory) as session:
                return run_daily(session, clock, config)
        except Conflict as exc:
            # Another instance ran the job at the same moment and recorded the same reminders first.
            log.warning("licensing.daily_lost_race", error=exc.message)
            return DailyReport()

    report = await asyncio.to_thread(work)
    for notification in report.notifications:
        await plugins.call_each_async("gateway_notify", event=notification.event, payload=notification.payload)
    return report


# --- billing job (the gateway_bill_built hook as the billing run's extra_lines) ---


def bill_built_lines(plugins: GatewayPluginManager | None) -> ExtraLines | None:
    """The ``gateway_bill_built`` hook as the billing run's ``extra_lines``: each plugin's lines (tax, fees).

    The core checks each line; one it refuses is reported as that plugin's failure in the
    hook (G5). None when no plugin implements the hook, so a run spends nothing on it.
    """
    if plugins is None or not plugins.pm.hook.gateway_bill_built.get_hookimpls():
        return None
    manager = plugins

    def extra_lines(draft: BillDraft) -> Iterator[tuple[object, Refuse]]:
        for plugin_name, lines in manager.call_each("gateway_bill_built", bill=draft):
            refuse = _refuse_for(manager, plugin_name)
            for line in lines or ():
                yield line, refuse

    return extra_lines


def _refuse_for(plugins: GatewayPluginManager, plugin_name: str) -> Refuse:
    def refuse(problem: str) -> None:
        plugins.report_failure(plugin_name, "gateway_bill_built", DomainError(problem))

    return refuse


@dataclass
class BillingPass:
    """One pass of the billing calendar: what was billed, what turned overdue, what was e-mailed."""

    run: BillingRun
    overdue: int
    mail: MailOutcome


async def billing_job(
    db: sessionmaker[Session],
    clock: Clock,
    billing: BillingSettings,
    mail: MailSettings,
    plugins: GatewayPluginManager,
    *,
    period: Period | None = None,
    sleep: Sleep = asyncio.sleep,
) -> BillingPass:
    """The scheduler's billing job (and ``gateway bill``): overdue bills (S3), due bills, then e-mail.

    Run every few minutes: each customer's cycles are billed once its local
    day has rolled over (S4), so the run "on the 1st" happens per time zone.
    Bills and report requests are committed before any e-mail is tried.
    """
    now = clock.now()

    def bill() -> tuple[int, BillingRun]:
        with transaction(db) as session:
            overdue = len(mark_overdue(session, now=now))
            return overdue, run_billing(session, now=now, billing=billing, extra_lines=bill_built_lines(plugins),
                                        period=period)

    # In a thread: on SQLite the run waits for the write lock (BEGIN IMMEDIATE) without stalling the event loop.
    overdue, run = await asyncio.to_thread(bill)
    outcome = MailOutcome()
    if mail.configured:
        for part in (
            await send_bill_emails(db, mail=mail, clock=clock, sleep=sleep, plugins=plugins),
            await send_billing_reports(db, mail=mail, clock=clock, sleep=sleep),
        ):
            outcome.sent += part.sent
            outcome.failed += part.failed
    elif run.bill_ids:
        log.warning("mail.not_configured", bills=len(run.bill_ids), hint="set [mail] to e-mail bills and reports")
    return BillingPass(run, overdue, outcome)


# --- the daemon's job list ---


def webhook_id_cutoffs(settings: Settings, plugins: GatewayPluginManager, now: datetime) -> dict[str, datetime]:
    """Per connection with webhooks: ids received before this are no longer needed (see gateway.core.retention).

    Each is ``webhooks.keep_ids_days`` back, or the connection's scheme's replay window when that is longer.
    """
    from gateway.sync.webhooks import load_schemes

    schemes = load_schemes(plugins)
    adapters = plugins.adapters()
    keep = timedelta(days=settings.webhooks.keep_ids_days)
    cutoffs: dict[str, datetime] = {}
    for connection in settings.connections:
        spec = adapters.get(connection.plugin)
        scheme = schemes.get(connection.webhook_scheme or (spec.webhook_scheme if spec is not None else None) or "")
        window = getattr(scheme, "replay_window_seconds", None)
        cutoffs[connection.name] = now - max(keep, timedelta(seconds=window or 0))
    return cutoffs


async def prune_webhook_ids(db: sessionmaker[Session], clock: Clock, settings: Settings,
                            plugins: GatewayPluginManager) -> int:
    """The ``webhook-ids`` job: delete the webhook ids no replay or retry can need any more; how many."""
    now = clock.now()
    cutoffs = webhook_id_cutoffs(settings, plugins, now)

    def work() -> int:
        with transaction(db) as session:
            pruned = sum(prune_received_webhooks(session, cutoff, connection=name) for name, cutoff in cutoffs.items())
            # Connections no longer configured: their ids are kept as long as the default says, then go too.
            return pruned + prune_received_webhooks(session, now - timedelta(days=settings.webhooks.keep_ids_days),
                                                    excluding=list(cutoffs))

    pruned = await asyncio.to_thread(work)
    if pruned:
        log.info("webhooks.ids_pruned", count=pruned)
    return pruned


def build_jobs(
    settings: Settings,
    engine: Engine,
    db: sessionmaker[Session],
    clock: Clock,
    plugins: GatewayPluginManager,
    *,
    rmm: Sequence[ConnectionSettings],
    psa: Sequence[str],
    psa_for: PsaFor,
    notify: Notify,
    delivered: Delivered,
    counters: PullCounters,
    worker: str,
    stop: asyncio.Event,
) -> list[ScheduledJob]:
    """The recurring jobs of one gateway process."""
    # rmm, psa: the enabled connections of each role (a pull job per RMM connection; the outbox keeps an
    # adapter per PSA connection open). worker: this process in outbox claims. stop: the scheduler's stop
    # event (the outbox stops claiming once it is set).
    jobs: list[ScheduledJob] = []
    for connection in rmm:

        async def pull(connection: ConnectionSettings = connection) -> object:
            try:
                summary = await pull_connection(connection, db, plugins, clock=clock)
            except Exception:
                counters.pull(connection.name, "error")
                raise
            counters.pull(connection.name, "ok")
            counters.retry(connection.name, summary.retries)
            counters.rate_limited(connection.name, summary.throttled)
            return summary

        jobs.append(ScheduledJob(f"pull:{connection.name}", connection.poll_interval_seconds,
                                 exclusive(engine, f"pull:{connection.name}", pull)))

    # G5: each PSA connection's deliveries are their own job (claims, pushes, back-off), so a tool that hangs
    # holds only its own; "outbox" takes deliveries of connections no longer enabled (dead-lettered, said why).
    for name in psa:

        async def connection_outbox(name: str = name) -> object:
            return await deliver_connection_until_idle(db, clock, settings.outbox, psa_for, notify, worker,
                                                       delivered=delivered, connection=name, stop=stop)

        jobs.append(ScheduledJob(f"outbox:{name}", settings.scheduler.outbox_interval_seconds, connection_outbox))

    async def outbox() -> object:
        return await deliver_connection_until_idle(db, clock, settings.outbox, psa_for, notify, worker,
                                                   delivered=delivered, connection=None, excluding=list(psa), stop=stop)

    async def billing() -> object:
        return len((await billing_job(db, clock, settings.billing, settings.mail, plugins)).run.bill_ids)

    async def licensing_daily() -> object:
        return await run_daily_job(db, clock, settings.licensing, plugins)

    jobs += [
        ScheduledJob("outbox", settings.scheduler.outbox_interval_seconds, outbox),
        ScheduledJob("billing", settings.scheduler.billing_interval_seconds, billing, leader_only=True),
        # The job records each reminder once, so running it often is safe and catches up after downtime.
        ScheduledJob("licensing", settings.scheduler.licensing_interval_seconds, licensing_daily, leader_only=True),
        ScheduledJob("webhook-ids", settings.webhooks.prune_interval_seconds,
                     lambda: prune_webhook_ids(db, clock, settings, plugins), leader_only=True),
    ]
    return jobs

"""``gateway run``: the admin API, webhooks, health and metrics, and the scheduler, in one process.

The scheduler and everything it holds live in the aiohttp app's ``cleanup_ctx``,
so SIGTERM/SIGINT (handled by ``web.run_app``) stop it the same way as a test
does: no new work is claimed, work in flight gets ``server.shutdown_timeout_seconds``
to finish, and what is still leased after that is released by its lease
running out (deliveries) or by its transaction rolling back (everything else).

Jobs (each a coordinator, so one failing never stops another, G5):

- ``pull:<connection>`` per enabled RMM connection, on its ``poll_interval_seconds``;
  exclusive across processes (an advisory lock per connection on PostgreSQL);
- ``outbox``: deliveries, shared by every process through row claims;
- ``billing``: the billing calendar, leader only;
- ``licensing``: expiries and reminders, leader only, hourly (each reminder is recorded and sent once).
"""

from __future__ import annotations

import asyncio
import os
import socket
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from gateway.app import Gateway
from gateway.sync.scheduler import AdvisoryLock, Leadership, ScheduledJob, Scheduler
from gateway.web.app import create_app
from gateway.web.metrics import get_metrics

log = structlog.get_logger(__name__)

SCHEDULER = web.AppKey("scheduler", Scheduler)
SCHEDULER_EXTRA = "scheduler"


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def exclusive(gateway: Gateway, name: str, run: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
    """Run ``run`` only if no other process is running the job of that name (an advisory lock per job)."""
    lock = AdvisoryLock(gateway.engine, zlib.crc32(f"gateway-job:{name}".encode()))

    async def guarded() -> Any:
        if not await asyncio.to_thread(lock.try_acquire):
            return "running elsewhere"
        try:
            return await run()
        finally:
            await asyncio.to_thread(lock.release)

    return guarded


def build_jobs(gateway: Gateway, scheduler_stop: asyncio.Event, worker: str) -> list[ScheduledJob]:
    """The recurring jobs of one gateway process."""
    from gateway.core.licensing import run_daily_job
    from gateway.sync.mail import billing_job
    from gateway.sync.devices import pull_connection
    from gateway.sync.outbox import deliver_until_idle

    settings = gateway.settings
    metrics = get_metrics(gateway)
    jobs: list[ScheduledJob] = []
    for connection in gateway.connections("rmm"):

        async def pull(connection=connection) -> Any:  # type: ignore[no-untyped-def]
            try:
                summary = await pull_connection(connection, gateway.db, gateway.plugins, clock=gateway.clock)
            except Exception:
                metrics.pull(connection.name, "error")
                raise
            metrics.pull(connection.name, "ok")
            metrics.retry(connection.name, summary.retries)
            metrics.rate_limited(connection.name, summary.throttled)
            return summary

        jobs.append(ScheduledJob(f"pull:{connection.name}", connection.poll_interval_seconds,
                                 exclusive(gateway, f"pull:{connection.name}", pull)))

    async def outbox() -> Any:
        return await deliver_until_idle(gateway, worker, stop=scheduler_stop)

    async def billing() -> Any:
        return len((await billing_job(gateway)).run.bill_ids)

    async def licensing_daily() -> Any:
        return await run_daily_job(gateway.db, gateway.clock, settings.licensing, gateway.plugins)

    jobs += [
        ScheduledJob("outbox", settings.scheduler.outbox_interval_seconds, outbox),
        ScheduledJob("billing", settings.scheduler.billing_interval_seconds, billing, leader_only=True),
        # The job records each reminder once, so running it often is safe and catches up after downtime.
        ScheduledJob("licensing", settings.scheduler.licensing_interval_seconds, licensing_daily, leader_only=True),
    ]
    return jobs


def build_daemon_app(gateway: Gateway, *, scheduler: bool | None = None) -> web.Application:
    """The daemon's application: admin API + health + metrics + webhooks, and the scheduler in cleanup_ctx."""
    from gateway.sync.webhooks import add_webhook_routes

    app = create_app(gateway)
    add_webhook_routes(app, gateway)
    run_scheduler = gateway.settings.scheduler.enabled if scheduler is None else scheduler

    async def scheduler_ctx(app: web.Application) -> AsyncIterator[None]:
        if not run_scheduler:
            yield
            return
        stop = asyncio.Event()
        worker = worker_id()
        instance = Scheduler(build_jobs(gateway, stop, worker), Leadership(gateway.engine),
                             notify=_notifier(gateway), stop_event=stop)
        app[SCHEDULER] = instance
        gateway.extras[SCHEDULER_EXTRA] = instance  # /readyz shows the jobs' state
        instance.start()
        log.info("daemon.scheduler_started", worker=worker, jobs=[c.name for c in instance.coordinators])
        yield
        await instance.stop(timeout=gateway.settings.server.shutdown_timeout_seconds)
        log.info("daemon.scheduler_stopped", worker=worker)

    app.cleanup_ctx.append(scheduler_ctx)
    return app


def _notifier(gateway: Gateway) -> Callable[[str, dict[str, Any]], Awaitable[None]]:
    async def notify(event: str, payload: dict[str, Any]) -> None:
        await gateway.plugins.call_each_async("gateway_notify", event=event, payload=payload)

    return notify


def run(gateway: Gateway) -> int:
    """Serve until SIGTERM/SIGINT; exit 0 after a graceful stop."""
    server = gateway.settings.server
    app = build_daemon_app(gateway)
    log.info("daemon.starting", host=server.host, port=server.port)
    web.run_app(app, host=server.host, port=server.port, print=None,
                shutdown_timeout=server.shutdown_timeout_seconds, handle_signals=True)
    log.info("daemon.stopped")
    return 0

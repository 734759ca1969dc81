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

The jobs are built in :func:`gateway.sync.jobs.build_jobs` from the gateway's
parts; this module wires those parts in (the metrics as the pull counters,
:meth:`~gateway.app.Gateway.notify` as the notifier) and keeps the scheduler
under :data:`gateway.web.health.SCHEDULER_KEY` for ``/readyz``.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from gateway.app import Gateway
from gateway.errors import ConfigError
from gateway.sync.scheduler import Leadership, ScheduledJob, Scheduler
from gateway.web.app import create_app
from gateway.web.health import SCHEDULER_KEY
from gateway.web.metrics import get_metrics

log = structlog.get_logger(__name__)

SCHEDULER = web.AppKey("scheduler", Scheduler)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _jobs(gateway: Gateway, stop: asyncio.Event, worker: str) -> list[ScheduledJob]:
    """The jobs of :func:`gateway.sync.jobs.build_jobs`, handed this gateway's parts."""
    from gateway.sync.jobs import build_jobs

    return build_jobs(
        gateway.settings, gateway.engine, gateway.db, gateway.clock, gateway.plugins,
        rmm=gateway.connections("rmm"), psa=[c.name for c in gateway.connections("psa")],
        psa_for=gateway.build_psa, notify=gateway.notify, delivered=gateway.bill_delivered,
        counters=get_metrics(gateway), worker=worker, stop=stop,
    )


def build_daemon_app(gateway: Gateway, *, scheduler: bool | None = None) -> web.Application:
    """The daemon's application: admin API + health + metrics + webhooks, and the scheduler in cleanup_ctx."""
    from gateway.sync.webhooks import add_webhook_routes

    app = create_app(gateway)
    add_webhook_routes(app, gateway, get_metrics(gateway))
    run_scheduler = gateway.settings.scheduler.enabled if scheduler is None else scheduler

    async def scheduler_ctx(app: web.Application) -> AsyncIterator[None]:
        if not run_scheduler:
            yield
            return
        stop = asyncio.Event()
        worker = worker_id()
        instance = Scheduler(_jobs(gateway, stop, worker), Leadership(gateway.engine),
                             notify=gateway.notify, stop_event=stop)
        app[SCHEDULER] = instance
        gateway.stash[SCHEDULER_KEY] = instance  # /readyz shows the jobs' state
        instance.start()
        log.info("daemon.scheduler_started", worker=worker, jobs=[c.name for c in instance.coordinators])
        yield
        await instance.stop(timeout=gateway.settings.server.shutdown_timeout_seconds)
        log.info("daemon.scheduler_stopped", worker=worker)

    app.cleanup_ctx.append(scheduler_ctx)
    return app


#: How to move the daemon's port, for :func:`bind_error`.
RUN_PORT_SETTING = "set [server] port in the config file or GATEWAY_SERVER__PORT"


def bind_error(exc: OSError, host: str, port: int, how_to_move: str) -> ConfigError | None:
    """One clear line for a listening socket that cannot be opened (the port is taken, or not ours to take).

    ``None`` for any other OSError, which stays a bug with a traceback.
    """
    if exc.errno == errno.EADDRINUSE:
        return ConfigError(f"port {port} on {host} is already in use by another program; {how_to_move} "
                           "to another port")
    if exc.errno in (errno.EACCES, errno.EADDRNOTAVAIL):
        return ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); {how_to_move}")
    return None


def run(gateway: Gateway) -> int:
    """Serve until SIGTERM/SIGINT; exit 0 after a graceful stop."""
    server = gateway.settings.server
    app = build_daemon_app(gateway)
    log.info("daemon.starting", host=server.host, port=server.port)
    try:
        web.run_app(app, host=server.host, port=server.port, print=None,
                    shutdown_timeout=server.shutdown_timeout_seconds, handle_signals=True)
    except OSError as exc:
        error = bind_error(exc, server.host, server.port, RUN_PORT_SETTING)
        if error is None:
            raise
        raise error from exc
    log.info("daemon.stopped")
    return 0

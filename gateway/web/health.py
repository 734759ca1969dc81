"""Health and metrics endpoints: ``/healthz``, ``/readyz``, ``/metrics``.

- ``GET /healthz``: the process answers (200, always). For a liveness probe.
- ``GET /readyz``: 200 when the database answers and its schema is the one this
  code expects, else 503 with the reason (the same message ``gateway`` prints,
  e.g. "run 'gateway db upgrade' first"). The body also lists each enabled
  connection's sync state from :class:`ConnectionState`. **Decision:** a failing
  connection does not make the gateway unready: the tool is down, not the
  gateway, and taking the gateway out of a load balancer would stop every other
  connection's webhooks too (G5). In the daemon the body also has each job's
  state: the daemon puts its scheduler under :data:`SCHEDULER_KEY` in
  ``gateway.stash``, typed as the one method read here (:class:`JobsStatus`),
  so this module knows nothing of the scheduler.
- ``GET /metrics``: Prometheus text from the gateway's own registry
  (:mod:`gateway.web.metrics`).

Database work runs in a worker thread so a slow database never blocks the event loop.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from gateway.core import db as gdb
from gateway.core.models import ConnectionState
from gateway.errors import DatabaseError
from gateway.stash import StashKey
from gateway.web.metrics import get_metrics

if TYPE_CHECKING:  # pragma: no cover - typing only
    from gateway.app import Gateway


class JobsStatus(Protocol):
    """What /readyz reads of the daemon's scheduler."""

    def status(self) -> dict[str, dict[str, Any]]: ...


#: The daemon's scheduler in ``gateway.stash`` (set by :func:`gateway.daemon.build_daemon_app`).
SCHEDULER_KEY = StashKey[JobsStatus]("scheduler")


def readiness(gateway: Gateway) -> tuple[bool, dict[str, Any]]:
    """Whether the gateway can serve, and the details for the /readyz body (blocking: call it in a thread)."""
    try:
        gdb.check_schema_current(gateway.engine)
        database: dict[str, Any] = {"status": "ok", "revision": gdb.head_revision()}
    except DatabaseError as exc:
        database = {"status": "error", "error": str(exc)}
    except SQLAlchemyError as exc:
        where = gdb.describe_url(gateway.engine)
        database = {"status": "error", "error": f"the database at {where} failed: {type(exc).__name__}"}
    ready = database["status"] == "ok"
    states: dict[str, ConnectionState] = {}
    if ready:
        try:
            with gateway.db() as session:
                states = {s.connection: s for s in session.scalars(select(ConnectionState))}
        except SQLAlchemyError as exc:
            ready = False
            database = {"status": "error", "error": f"cannot read connection state: {type(exc).__name__}"}
    connections = [_connection_state(c.name, states.get(c.name)) for c in gateway.settings.connections if c.enabled]
    body = {"status": "ready" if ready else "not_ready", "database": database, "connections": connections}
    scheduler = gateway.stash.get(SCHEDULER_KEY, None)
    if scheduler is not None:
        body["jobs"] = scheduler.status()
    return ready, body


def _connection_state(name: str, state: ConnectionState | None) -> dict[str, Any]:
    if state is None:
        return {"name": name, "status": "unknown", "last_success_at": None, "consecutive_failures": 0}
    if state.consecutive_failures:
        status = "degraded"
    else:
        status = "ok" if state.last_success_at is not None else "unknown"
    return {
        "name": name,
        "status": status,
        "last_success_at": state.last_success_at.isoformat() if state.last_success_at else None,
        "consecutive_failures": state.consecutive_failures,
        "last_error": state.last_error,
        "last_error_at": state.last_error_at.isoformat() if state.last_error_at else None,
    }


def add_health_routes(app: web.Application, gateway: Gateway) -> None:
    """Mount ``/healthz``, ``/readyz`` and ``/metrics`` on ``app``."""
    metrics = get_metrics(gateway)

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        ready, body = await asyncio.to_thread(readiness, gateway)
        return web.json_response(body, status=200 if ready else 503)

    async def metrics_text(_request: web.Request) -> web.Response:
        body = await asyncio.to_thread(metrics.render)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_text)

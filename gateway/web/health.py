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
- The body's ``outbox`` lists each PSA connection's deliveries: pending, retrying (the last
  attempt failed and waits for its back-off), dead, and ``status`` ``degraded`` with the
  ``reason`` while any is retrying; such a connection is listed as degraded too (G5: still 200).
- ``/readyz`` answers without a token, so no error text it shows comes raw from a library
  (SQL, bound values, links): a failed check names the check and the error class, and the
  detail goes to the log. The gateway's own errors (messages written for people) are shown.
- ``GET /metrics``: Prometheus text from the gateway's own registry
  (:mod:`gateway.web.metrics`).

Database work runs in a worker thread so a slow database never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import re
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import case, func, select
from sqlalchemy.exc import SQLAlchemyError

from gateway import errors as gateway_errors
from gateway.core import db as gdb
from gateway.core.models import ConnectionState, Delivery, DeliveryStatus
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

log = structlog.get_logger(__name__)

#: The gateway's own error classes: their messages are written for people and may be shown.
_GATEWAY_ERRORS = frozenset(
    name for name, value in vars(gateway_errors).items()
    if isinstance(value, type) and issubclass(value, gateway_errors.GatewayError)
)
_CLASS_PREFIX = re.compile(r"^\(?([A-Za-z_][\w.]*)\)?:? ")


def public_error(text: str | None) -> str | None:
    """``text`` as /readyz may show it: a library's raw error becomes its class name, the rest goes to the log.

    Stored errors read ``"ClassName: message"``; a gateway error's message is kept, any other
    exception's is not (an SQLAlchemy error carries the statement, its bound values and a link).
    """
    if text is None:
        return None
    match = _CLASS_PREFIX.match(text)
    name = match.group(1) if match else None
    raw = "[SQL:" in text or "sqlalche.me" in text or "[parameters:" in text
    if name is not None and name not in _GATEWAY_ERRORS and (
        raw or name.endswith(("Error", "Exception", "Exit", "Interrupt")) or "." in name
    ):
        return f"{name.rsplit('.', 1)[-1]} (details in the log)"
    if raw:
        return "error (details in the log)"
    return text[:500]


def readiness(gateway: Gateway) -> tuple[bool, dict[str, Any]]:
    """Whether the gateway can serve, and the details for the /readyz body (blocking: call it in a thread)."""
    try:
        gdb.check_schema_current(gateway.engine)
        database: dict[str, Any] = {"status": "ok", "revision": gdb.head_revision()}
    except DatabaseError as exc:
        log.warning("health.check_failed", check="schema", error=str(exc))
        database = {"status": "error", "check": "schema", "error": str(exc)}
    except SQLAlchemyError as exc:
        log.warning("health.check_failed", check="schema", error=str(exc))
        where = gdb.describe_url(gateway.engine)
        database = {"status": "error", "check": "schema",
                    "error": f"the database at {where} failed: {type(exc).__name__} (details in the log)"}
    ready = database["status"] == "ok"
    states: dict[str, ConnectionState] = {}
    outbox: dict[str, dict[str, Any]] = {}
    psa = _psa_connections(gateway)
    if ready:
        try:
            with gateway.db() as session:
                states = {s.connection: s for s in session.scalars(select(ConnectionState))}
                outbox = _outbox_state(session, psa)
        except SQLAlchemyError as exc:
            log.warning("health.check_failed", check="connection_state", error=str(exc))
            ready = False
            database = {"status": "error", "check": "connection_state",
                        "error": f"cannot read connection state: {type(exc).__name__} (details in the log)"}
    connections = [_connection_state(c.name, states.get(c.name), outbox.get(c.name))
                   for c in gateway.settings.connections if c.enabled]
    body: dict[str, Any] = {"status": "ready" if ready else "not_ready", "database": database,
                            "connections": connections}
    if outbox:
        degraded = {name: o for name, o in outbox.items() if o["status"] == "degraded"}
        body["outbox"] = {
            "status": "degraded" if degraded else "ok",
            "reason": "; ".join(f"{name}: {o['reason']}" for name, o in degraded.items()) or None,
            "connections": outbox,
        }
    scheduler = gateway.stash.get(SCHEDULER_KEY, None)
    if scheduler is not None:
        body["jobs"] = {name: {**job, "last_error": public_error(job.get("last_error"))}
                        for name, job in scheduler.status().items()}
    return ready, body


def _psa_connections(gateway: Gateway) -> list[str]:
    adapters = gateway.plugins.adapters()
    return [c.name for c in gateway.settings.connections
            if c.enabled and c.plugin in adapters and adapters[c.plugin].role == "psa"]


def _outbox_state(session: Any, connections: list[str]) -> dict[str, dict[str, Any]]:
    """Per PSA connection: deliveries pending, retrying after a failed attempt, dead; the newest reason."""
    if not connections:
        return {}
    retrying = (Delivery.status == DeliveryStatus.PENDING) & (Delivery.attempts > 0)
    counts = {
        row.connection: row
        for row in session.execute(
            select(
                Delivery.connection,
                func.sum(case((Delivery.status == DeliveryStatus.PENDING, 1), else_=0)).label("pending"),
                func.sum(case((retrying, 1), else_=0)).label("retrying"),
                func.sum(case((Delivery.status == DeliveryStatus.DEAD, 1), else_=0)).label("dead"),
                func.min(case((Delivery.status == DeliveryStatus.PENDING, Delivery.created_at))).label("oldest"),
            )
            .where(Delivery.connection.in_(connections), Delivery.status != DeliveryStatus.DELIVERED)
            .group_by(Delivery.connection)
        )
    }
    state: dict[str, dict[str, Any]] = {}
    for name in connections:
        row = counts.get(name)
        pending, failing, dead = (int(row.pending or 0), int(row.retrying or 0), int(row.dead or 0)) if row else (0, 0, 0)
        reason = None
        if failing:
            last = session.scalar(
                select(Delivery.last_error).where(Delivery.connection == name, retrying)
                .order_by(Delivery.attempts.desc(), Delivery.id.desc()).limit(1)
            )
            reason = public_error(last) or "the last push failed"
        oldest = row.oldest if row else None
        state[name] = {
            "status": "degraded" if failing else "ok",
            "pending": pending,
            "retrying": failing,
            "dead": dead,
            "oldest_pending_since": oldest.isoformat() if isinstance(oldest, datetime) else oldest,
            "reason": reason,
        }
    return state


def _connection_state(name: str, state: ConnectionState | None, outbox: dict[str, Any] | None = None) -> dict[str, Any]:
    if state is None:
        shown: dict[str, Any] = {"name": name, "status": "unknown", "last_success_at": None, "consecutive_failures": 0}
    else:
        if state.consecutive_failures:
            status = "degraded"
        else:
            status = "ok" if state.last_success_at is not None else "unknown"
        shown = {
            "name": name,
            "status": status,
            "last_success_at": state.last_success_at.isoformat() if state.last_success_at else None,
            "consecutive_failures": state.consecutive_failures,
            "last_error": public_error(state.last_error),
            "last_error_at": state.last_error_at.isoformat() if state.last_error_at else None,
        }
    if outbox is not None and outbox["status"] == "degraded":
        # A PSA connection whose pushes fail is degraded whatever its pulls say (G5).
        shown["status"] = "degraded"
        shown["outbox"] = {"retrying": outbox["retrying"], "reason": outbox["reason"]}
    return shown


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

"""Prometheus metrics: one registry per gateway (never the global one), so tests and apps stay independent.

Events are counted as they happen through :class:`Metrics` methods (the webhook
receiver, the pull loop, the HTTP connector call them). The sync layer never
imports this module: it declares the counters it increments
(:class:`~gateway.sync.ports.WebhookCounters`, :class:`~gateway.sync.ports.PullCounters`),
:class:`Metrics` implements them, and the daemon hands the gateway's instance in. Stored state (deliveries
and bills by status, devices per connection, connection health) is read from the
database at scrape time, so it is never stale and costs nothing between scrapes.

Get the gateway's instance with :func:`get_metrics` (kept under :data:`METRICS_KEY`
in ``gateway.stash``); ``GET /metrics`` renders it (:mod:`gateway.web.health`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from gateway.core.models import Bill, BillStatus, ConnectionState, Delivery, DeliveryStatus, Device
from gateway.stash import StashKey

if TYPE_CHECKING:  # pragma: no cover - typing only
    from gateway.app import Gateway

log = structlog.get_logger(__name__)



class Metrics:
    """The gateway's counters, and a collector that reads stored state at scrape time."""

    def __init__(self, db: sessionmaker[Session] | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        self._webhooks = Counter(
            "gateway_webhook_requests", "Webhook requests by connection and outcome.", ["connection", "outcome"],
            registry=r,
        )
        self._webhook_seconds = Histogram(
            "gateway_webhook_duration_seconds", "Time to answer a webhook request.", registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )
        self._handler_failures = Counter(
            "gateway_webhook_handler_failures", "Webhook handlers that raised, by plugin (G5).",
            ["connection", "plugin"], registry=r,
        )
        self._pulls = Counter(
            "gateway_pulls", "Pulls from a connection by outcome.", ["connection", "outcome"], registry=r
        )
        self._retries = Counter(
            "gateway_http_retries", "HTTP requests retried, per connection.", ["connection"], registry=r
        )
        self._rate_limited = Counter(
            "gateway_http_rate_limited", "HTTP 429 answers received, per connection.", ["connection"], registry=r
        )
        if db is not None:
            r.register(StoredStateCollector(db))

    def webhook(self, connection: str, outcome: str, seconds: float | None = None) -> None:
        """Count one webhook request (``outcome``: accepted, duplicate, unauthorized, ...)."""
        self._webhooks.labels(connection, outcome).inc()
        if seconds is not None:
            self._webhook_seconds.observe(seconds)

    def webhook_handler_failed(self, connection: str, plugin: str) -> None:
        self._handler_failures.labels(connection, plugin).inc()

    def pull(self, connection: str, outcome: str = "ok") -> None:
        """Count one pull of a connection (``outcome``: ok, error)."""
        self._pulls.labels(connection, outcome).inc()

    def retry(self, connection: str, count: int = 1) -> None:
        self._retries.labels(connection).inc(count)

    def rate_limited(self, connection: str, count: int = 1) -> None:
        self._rate_limited.labels(connection).inc(count)

    def render(self) -> bytes:
        """The Prometheus text exposition (reads the database: call it off the event loop)."""
        return generate_latest(self.registry)


class StoredStateCollector(Collector):
    """Deliveries and bills by status, devices per connection and connection health, read at scrape time."""

    def __init__(self, db: sessionmaker[Session]):
        self.db = db

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("gateway_database_up", "1 when the last scrape could read the database.")
        try:
            families = self._read()
        except SQLAlchemyError as exc:
            log.warning("metrics.database_unavailable", error=type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _read(self) -> list[Metric]:
        with self.db() as session:
            deliveries = dict(session.execute(select(Delivery.status, func.count()).group_by(Delivery.status)).all())
            bills = dict(session.execute(select(Bill.status, func.count()).group_by(Bill.status)).all())
            devices = session.execute(
                select(Device.connection, Device.online, func.count())
                .where(Device.deleted.is_(False))
                .group_by(Device.connection, Device.online)
            ).all()
            states = session.execute(select(ConnectionState.connection, ConnectionState.consecutive_failures)).all()
        delivery_family = GaugeMetricFamily(
            "gateway_deliveries", "Outbox deliveries by status (G2).", labels=["status"]
        )
        for delivery_status in DeliveryStatus:
            delivery_family.add_metric([delivery_status.value], deliveries.get(delivery_status, 0))
        bill_family = GaugeMetricFamily("gateway_bills", "Bills by status (S3).", labels=["status"])
        for bill_status in BillStatus:
            bill_family.add_metric([bill_status.value], bills.get(bill_status, 0))
        device_family = GaugeMetricFamily(
            "gateway_devices", "Devices not deleted, per RMM connection and online state.",
            labels=["connection", "online"],
        )
        for connection, online, count in devices:
            device_family.add_metric([connection, "true" if online else "false"], count)
        failure_family = GaugeMetricFamily(
            "gateway_connection_consecutive_failures", "Failed syncs in a row, per connection.", labels=["connection"]
        )
        for connection, failures in states:
            failure_family.add_metric([connection], failures or 0)
        return [delivery_family, bill_family, device_family, failure_family]


#: The gateway's :class:`Metrics` in ``gateway.stash`` (set by :func:`get_metrics`).
METRICS_KEY = StashKey[Metrics]("metrics")


def get_metrics(gateway: Gateway) -> Metrics:
    """The gateway's Metrics, created on first use and kept in ``gateway.stash``."""
    metrics = gateway.stash.get(METRICS_KEY, None)
    if metrics is None:
        metrics = gateway.stash[METRICS_KEY] = Metrics(gateway.db)
    return metrics

"""Exactly-once delivery of bills to PSA tools (G2).

Finalising a bill writes one :class:`~gateway.core.models.Delivery` row per
PSA connection of its customer, in the same transaction (the outbox). This
worker then:

1. **claims** due deliveries with one ``UPDATE … WHERE id IN (SELECT …) RETURNING``:
   the subquery is ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so several processes
   share the work without waiting on each other; on SQLite the one statement holds
   the write lock from read to write, so two processes never claim one row. A claim is a lease
   (``claimed_until``): a worker killed mid-push leaves a lease that expires, and
   another worker takes the delivery over.
2. **pushes** outside any transaction. Each push carries the delivery's
   deterministic key; the adapter looks for an object already carrying that key
   before it creates one, so a crash between "PSA accepted" and "gateway
   recorded" never creates a second copy.
3. **records** the PSA's id, or the error with the next attempt time (full-jitter
   exponential back-off), in a second short transaction guarded by the lease, so
   a worker whose lease was taken over cannot overwrite the new owner's result.

Transient failures (and unexpected errors, which must cost an attempt rather than
leave a delivery leased forever) retry up to ``outbox.max_attempts``; permanent ones
(a 4xx, refused credentials, a customer no longer mapped) and exhausted retries are
dead-lettered at once, reported through ``gateway_notify``, listed by ``gateway
deliveries`` and retried by hand.

The worker is handed what it uses, not the wired gateway: the session factory,
the clock, the ``[outbox]`` settings, a builder of PSA adapters by connection
name (``psa_for``) and the two hooks it calls as plain callables (``notify`` for
``gateway_notify``, ``delivered`` for ``gateway_bill_delivered``).
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

import structlog
from sqlalchemy import CursorResult, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from gateway.adapters import BillDocument, PsaAdapter, PushResult
from gateway.core.clock import Clock
from gateway.core.db import transaction
from gateway.core.models import Bill, Delivery, DeliveryStatus
from gateway.core.settings import OutboxSettings
from gateway.errors import AuthError, ConfigError, Conflict, GatewayError, NotFound, PermanentError, TransientError
from gateway.sync.ports import Notify

log = structlog.get_logger(__name__)

DocumentBuilder = Callable[[Session, Delivery], BillDocument]
#: A new PSA adapter for a connection name (the caller closes it); ConfigError/KeyError if there is none.
PsaFor = Callable[[str], PsaAdapter]
#: ``gateway_bill_delivered``: (connection, bill key, push result).
Delivered = Callable[[str, str, PushResult], Awaitable[None]]


@dataclass
class RoundResult:
    """What one worker round did."""

    claimed: int = 0
    delivered: int = 0
    already_present: int = 0
    failed: int = 0
    dead: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Outbox:
    """What one worker's helpers share."""

    db: sessionmaker[Session]
    clock: Clock
    settings: OutboxSettings
    notify: Notify
    delivered: Delivered


def _default_document_builder() -> DocumentBuilder:
    from gateway.core.billing.deliveries import bill_document

    return bill_document


def claim_due(
    db: sessionmaker[Session],
    clock: Clock,
    settings: OutboxSettings,
    worker_id: str,
    *,
    limit: int,
    connection: str | None = None,
    excluding: Sequence[str] = (),
) -> list[tuple[int, str]]:
    """Lease up to ``limit`` due deliveries to ``worker_id``; returns (delivery id, connection) pairs.

    ``connection`` claims only that connection's deliveries (each PSA connection has its own loop, so a
    hung tool never holds another's, G5); ``excluding`` skips the named connections.
    """
    now = clock.now()
    lease = now + timedelta(seconds=settings.claim_seconds)
    with transaction(db) as session:
        due = (
            select(Delivery.id)
            .where(
                Delivery.status == DeliveryStatus.PENDING,
                Delivery.next_attempt_at <= now,
                or_(Delivery.claimed_until.is_(None), Delivery.claimed_until < now),
            )
            .order_by(Delivery.next_attempt_at, Delivery.id)
            .limit(limit)
        )
        if connection is not None:
            due = due.where(Delivery.connection == connection)
        if excluding:
            due = due.where(Delivery.connection.not_in(list(excluding)))
        if session.get_bind().dialect.name == "postgresql":
            due = due.with_for_update(skip_locked=True)
        # One statement, so the rows read are the rows written: SQLite takes its write lock before it
        # reads (a SELECT then an UPDATE would each run on their own there, and two workers could
        # claim one delivery), PostgreSQL skips the rows another worker is claiming.
        rows = session.execute(
            update(Delivery)
            .where(Delivery.id.in_(due))
            .values(claimed_by=worker_id, claimed_until=lease)
            .returning(Delivery.id, Delivery.connection)
            .execution_options(synchronize_session=False)
        ).all()
    claimed = sorted((row.id, row.connection) for row in rows)
    if claimed:
        log.info("outbox.claimed", worker=worker_id, deliveries=len(claimed))
    return claimed


def _retry_delay(settings: OutboxSettings, attempts: int) -> float:
    ceiling = min(settings.max_delay_seconds, settings.base_delay_seconds * (2 ** min(attempts, 30)))
    return random.uniform(settings.base_delay_seconds / 2, max(ceiling, settings.base_delay_seconds / 2))


def _record(db: sessionmaker[Session], delivery_id: int, worker_id: str, **values: object) -> bool:
    """Write a result only while we still hold the lease; False if another worker took it over."""
    with transaction(db) as session:
        result = session.execute(
            update(Delivery)
            .where(Delivery.id == delivery_id, Delivery.claimed_by == worker_id)
            .values(claimed_by=None, claimed_until=None, **values)
        )
        # an UPDATE gives a CursorResult; Session.execute is typed as giving any Result
        return cast(CursorResult[Any], result).rowcount == 1


async def _deliver_one(
    outbox: _Outbox,
    adapter: PsaAdapter,
    delivery_id: int,
    worker_id: str,
    build: DocumentBuilder,
    result: RoundResult,
) -> None:
    # A round claims a batch, but one customer's deliveries are pushed one after another: a later
    # one's lease may run out while an earlier push is slow, and another worker may claim it. So the
    # lease is extended (which proves it is still ours) before anything is loaded or pushed.
    if not await asyncio.to_thread(_extend_lease, outbox, delivery_id, worker_id):
        log.warning("outbox.lease_lost_before_push", delivery=delivery_id, worker=worker_id)
        return
    lease = asyncio.create_task(_keep_lease(outbox, delivery_id, worker_id))
    push: PushResult | None = None
    structlog.contextvars.bind_contextvars(delivery=delivery_id)
    try:
        loaded = await asyncio.to_thread(_load, outbox.db, delivery_id, build)
        if loaded is None:
            return
        attempts, key, connection, document, problem = loaded
        structlog.contextvars.bind_contextvars(connection=connection)
        try:
            if problem is None:
                assert document is not None  # _load gives either a document or the problem that stopped it
                push = await _push_within(adapter, document, outbox.settings.push_timeout_seconds, connection)
        except Exception as exc:  # an adapter's bug must cost an attempt, not leave the delivery leased forever
            problem = exc
    finally:
        lease.cancel()
        await asyncio.gather(lease, return_exceptions=True)
        structlog.contextvars.unbind_contextvars("delivery", "connection")
    if problem is not None or push is None:
        await _failed(outbox, delivery_id, worker_id, key, connection, attempts,
                      problem or PermanentError("the adapter answered the push with nothing"), result)
        return
    if not await asyncio.to_thread(
        _record,
        outbox.db,
        delivery_id,
        worker_id,
        status=DeliveryStatus.DELIVERED,
        attempts=attempts,
        external_id=push.external_id,
        delivered_at=outbox.clock.now(),
        last_error=None,
    ):
        log.warning("outbox.lease_lost", key=key, connection=connection, worker=worker_id, external_id=push.external_id)
        return
    if push.created:
        result.delivered += 1
    else:
        result.already_present += 1
    log.info("outbox.delivered", key=key, external_id=push.external_id, created=push.created)
    await outbox.delivered(connection, key, push)


async def _push_within(adapter: PsaAdapter, document: BillDocument, seconds: float, connection: str) -> PushResult:
    """The push, cut off after ``seconds``: a tool that accepts connections and never answers costs a
    failed attempt with back-off, recorded, instead of holding the delivery (and its loop) for the
    connector's whole retry deadline. Cutting a push off is safe: the next attempt looks for the key first."""
    try:
        return await asyncio.wait_for(adapter.push_bill(document), timeout=seconds)
    except TimeoutError:
        raise TransientError(
            f"the push did not finish within {seconds:g} s ([outbox] push_timeout_seconds); the tool accepts "
            "connections but does not answer in time; retrying with back-off",
            connection=connection,
        ) from None


def _load(
    db: sessionmaker[Session], delivery_id: int, build: DocumentBuilder
) -> tuple[int, str, str, BillDocument | None, Exception | None] | None:
    """The delivery's attempt number, key, connection, and the document to push (or why there is none)."""
    with db() as session:
        delivery = session.get(Delivery, delivery_id)
        if delivery is None:
            return None
        try:
            document, problem = build(session, delivery), None
        except Exception as exc:  # noqa: BLE001 - a GatewayError (e.g. the customer is no longer mapped) waits
            # for a person; anything else is a bug that costs an attempt, so it ends dead-lettered and
            # reported instead of being retried unseen every lease.
            document, problem = None, exc
        return delivery.attempts + 1, delivery.key, delivery.connection, document, problem


def _extend_lease(outbox: _Outbox, delivery_id: int, worker_id: str) -> bool:
    """Extend our lease by a claim period; False if another worker has claimed the delivery since.

    One UPDATE, so it and a competing claim are ordered by the database: either
    this extends the lease before the claim sees it expired, or the claim wins.
    """
    with transaction(outbox.db) as session:
        result = session.execute(
            update(Delivery)
            .where(Delivery.id == delivery_id, Delivery.claimed_by == worker_id)
            .values(claimed_until=outbox.clock.now() + timedelta(seconds=outbox.settings.claim_seconds))
        )
        # an UPDATE gives a CursorResult; Session.execute is typed as giving any Result
        return cast(CursorResult[Any], result).rowcount == 1


async def _keep_lease(outbox: _Outbox, delivery_id: int, worker_id: str) -> None:
    """Extend our lease while a push runs, so a slow push (rate limits, retries) is never taken over mid-way."""
    while True:
        await asyncio.sleep(outbox.settings.claim_seconds / 3)
        await asyncio.to_thread(_extend_lease, outbox, delivery_id, worker_id)


async def _failed(
    outbox: _Outbox,
    delivery_id: int,
    worker_id: str,
    key: str,
    connection: str,
    attempts: int,
    exc: Exception,
    result: RoundResult,
) -> None:
    """Record a failed attempt: retry later (transient, or an unexpected error), or dead-letter it."""
    now = outbox.clock.now()
    error = f"{type(exc).__name__}: {exc}"
    # A refused bill (a 4xx, a customer no longer mapped) waits for a person. Refused credentials are a
    # problem of the connection, not of this bill: they retry with back-off like a transient failure,
    # so fixing the credentials lets every waiting bill through without retrying each by hand.
    permanent = isinstance(exc, GatewayError) and not isinstance(exc, TransientError | AuthError)
    dead = permanent or attempts >= outbox.settings.max_attempts
    values: dict[str, object] = {"attempts": attempts, "last_error": error[:2000]}
    if dead:
        values["status"] = DeliveryStatus.DEAD
    else:
        values["next_attempt_at"] = now + timedelta(seconds=_retry_delay(outbox.settings, attempts))
    if not isinstance(exc, GatewayError):
        log.error("outbox.push_error", key=key, connection=connection, error=error, exc_info=exc)
    result.errors.append(error)
    if not await asyncio.to_thread(_record, outbox.db, delivery_id, worker_id, **values):
        log.warning("outbox.lease_lost", key=key, connection=connection, worker=worker_id, error=error)
        return
    if dead:
        result.dead += 1
        log.error("outbox.dead_lettered", key=key, connection=connection, attempts=attempts, error=error)
        await outbox.notify(
            "delivery.dead_lettered",
            {"delivery_id": delivery_id, "connection": connection, "key": key, "attempts": attempts, "error": error},
        )
    else:
        result.failed += 1
        log.warning("outbox.push_failed", key=key, connection=connection, attempts=attempts, error=error)


async def deliver_round(
    db: sessionmaker[Session],
    clock: Clock,
    settings: OutboxSettings,
    psa_for: PsaFor,
    notify: Notify,
    worker_id: str,
    *,
    delivered: Delivered,
    limit: int | None = None,
    adapters: dict[str, PsaAdapter] | None = None,
    build: DocumentBuilder | None = None,
    connection: str | None = None,
    excluding: Sequence[str] = (),
) -> RoundResult:
    """Claim and push one batch. ``adapters`` (by connection) are reused if given, else built and closed here.

    ``connection``/``excluding`` limit what is claimed (see :func:`claim_due`).
    """
    outbox = _Outbox(db, clock, settings, notify, delivered)
    build = build or _default_document_builder()
    result = RoundResult()
    claimed = await asyncio.to_thread(claim_due, db, clock, settings, worker_id, limit=limit or settings.batch_size,
                                      connection=connection, excluding=excluding)
    result.claimed = len(claimed)
    if not claimed:
        return result
    by_connection: dict[str, list[int]] = defaultdict(list)
    for delivery_id, connection in claimed:
        by_connection[connection].append(delivery_id)
    customers = await asyncio.to_thread(_customers_of, db, [delivery_id for delivery_id, _ in claimed])
    owned: dict[str, PsaAdapter] = {}
    try:
        tasks = []
        for connection, ids in by_connection.items():
            adapter = (adapters or {}).get(connection)
            if adapter is None:
                try:
                    adapter = owned[connection] = psa_for(connection)
                except (ConfigError, KeyError) as exc:
                    for delivery_id in ids:
                        _record(db, delivery_id, worker_id, status=DeliveryStatus.DEAD,
                                last_error=f"connection {connection!r} is not configured: {exc}")
                        result.dead += 1
                    continue
            # One customer's bills go to a PSA one after another (a quantity on an agreement addition
            # must not be raced by a second bill of the same cycle); different customers go in parallel.
            queues: dict[int | None, list[int]] = defaultdict(list)
            for delivery_id in ids:
                queues[customers.get(delivery_id)].append(delivery_id)
            tasks += [_deliver_in_turn(outbox, adapter, queue, worker_id, build, result) for queue in queues.values()]
        # Every push runs to its end before the adapters close; then a failure (the store, say) is raised.
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome
    finally:
        for adapter in owned.values():
            await adapter.aclose()
    return result


async def _deliver_in_turn(
    outbox: _Outbox, adapter: PsaAdapter, ids: list[int], worker_id: str, build: DocumentBuilder, result: RoundResult
) -> None:
    for delivery_id in ids:
        await _deliver_one(outbox, adapter, delivery_id, worker_id, build, result)


def _customers_of(db: sessionmaker[Session], delivery_ids: list[int]) -> dict[int, int]:
    with db() as session:
        rows = session.execute(
            select(Delivery.id, Bill.customer_id).join(Bill, Bill.id == Delivery.bill_id).where(Delivery.id.in_(delivery_ids))
        )
        return {delivery_id: customer_id for delivery_id, customer_id in rows}


async def deliver_until_idle(
    db: sessionmaker[Session],
    clock: Clock,
    settings: OutboxSettings,
    psa_for: PsaFor,
    notify: Notify,
    worker_id: str,
    *,
    delivered: Delivered,
    connections: Iterable[str],
    stop: asyncio.Event | None = None,
) -> RoundResult:
    """Run rounds until nothing is due (or ``stop`` is set), each connection on its own loop (G5).

    Every named connection claims and pushes only its own deliveries, so a tool that hangs holds
    its own loop and nobody else's; one more loop takes the deliveries of connections not named
    (removed or disabled ones), which are dead-lettered with the reason. Adapters are kept open
    across rounds and closed at the end.
    """
    names = list(connections)  # the enabled PSA connections: an adapter each, built before the first round
    total = RoundResult()
    results = await asyncio.gather(
        *(deliver_connection_until_idle(db, clock, settings, psa_for, notify, worker_id, delivered=delivered,
                                        connection=name, stop=stop) for name in names),
        deliver_connection_until_idle(db, clock, settings, psa_for, notify, worker_id, delivered=delivered,
                                      connection=None, excluding=names, stop=stop),
        return_exceptions=True,
    )
    for result in results:
        if isinstance(result, BaseException):
            raise result
        _add(total, result)
    return total


def _add(total: RoundResult, result: RoundResult) -> None:
    for name in ("claimed", "delivered", "already_present", "failed", "dead"):
        setattr(total, name, getattr(total, name) + getattr(result, name))
    total.errors += result.errors


async def deliver_connection_until_idle(
    db: sessionmaker[Session],
    clock: Clock,
    settings: OutboxSettings,
    psa_for: PsaFor,
    notify: Notify,
    worker_id: str,
    *,
    delivered: Delivered,
    connection: str | None,
    excluding: Sequence[str] = (),
    stop: asyncio.Event | None = None,
) -> RoundResult:
    """Rounds of one connection's deliveries (``connection=None``: every connection not in ``excluding``)
    until none is due or ``stop`` is set; the daemon runs one of these per PSA connection as its own job."""
    total = RoundResult()
    adapters: dict[str, PsaAdapter] = {}
    try:
        while stop is None or not stop.is_set():
            if connection is not None and connection not in adapters:
                adapters[connection] = psa_for(connection)
            result = await deliver_round(db, clock, settings, psa_for, notify, worker_id, delivered=delivered,
                                         adapters=adapters, connection=connection, excluding=excluding)
            _add(total, result)
            if not result.claimed:
                break
    finally:
        for adapter in adapters.values():
            await adapter.aclose()
    return total


def retry_dead(session: Session, delivery_id: int, now: datetime) -> Delivery:
    """Put a dead-lettered delivery back in the queue, due now (``gateway deliveries retry ID``)."""
    delivery = session.get(Delivery, delivery_id)
    if delivery is None:
        raise NotFound(f"no delivery with id {delivery_id}", field="delivery_id")
    if delivery.status != DeliveryStatus.DEAD:
        raise Conflict(f"delivery {delivery_id} is {delivery.status.value}, not dead; only dead deliveries are retried by hand")
    delivery.status = DeliveryStatus.PENDING
    delivery.attempts = 0
    delivery.next_attempt_at = now
    delivery.claimed_by = None
    delivery.claimed_until = None
    return delivery

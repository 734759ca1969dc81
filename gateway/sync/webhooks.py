"""The webhook receiver (G4): verify, refuse stale or replayed events, de-duplicate, dispatch to plugins.

``POST /webhooks/{connection}``. The connection's ``webhook_scheme`` (or its
adapter's default, :attr:`gateway.adapters.AdapterSpec.webhook_scheme`) names
the scheme that verifies it; schemes come from the ``gateway_webhook_schemes``
hook (the built-ins are in :mod:`gateway.sync.webhook_schemes`). Answers, in the
order they are checked:

=====  ==================================================================
404    unknown or disabled connection, or no webhook secret configured for it
415    the content type is not JSON (``application/json`` or ``*/*+json``, UTF-8),
       or the body is compressed (``Content-Encoding``)
413    the body is over 256 KiB
401    signature or credentials wrong, or timestamp more than 300 s away
       (either direction); nothing is stored
400    authentic, but not JSON (or not what the scheme needs)
200    ``{"status": "accepted"}`` the first time, ``{"status": "duplicate"}``
       for an event id already processed (nothing is processed again)
500    a plugin's handler raised (see below); 503: the database is unavailable
=====  ==================================================================

Decisions:

- **Secrets.** ``webhook_secret`` of the connection; while rotating, the old one
  can stay in ``credentials.webhook_secret_previous`` and both are accepted.
- **The event id is committed with the event's work (G4), and events are
  committed in groups.** Verified events queue for the process's one writer
  task, which takes every event waiting (at most ``MAX_BATCH``) into one
  transaction: for each event it inserts the id (``INSERT ... ON CONFLICT DO
  NOTHING``; nothing inserted means the event was processed already, perhaps
  earlier in the same batch) and runs the handlers; then it commits once and
  answers each request with its own outcome. So a duplicate is still processed
  once, while the commit and the connection are paid once per batch: under load
  they were most of an event's cost. There is no timer: an idle receiver writes
  a lone event at once, and events that arrive while a batch is written form the
  next one. A failed commit, or any database error outside a handler, answers
  the whole batch 503 with nothing stored; the senders retry.
- **A handler that raises (G5).** Each call of a plugin's
  ``gateway_webhook_received`` runs in its own SAVEPOINT. A raising handler's
  writes are rolled back; the other handlers' work, and the other events of the
  batch, are kept and committed. With several handlers, each one that succeeded
  gets a receipt; the event id itself is *not* recorded, and the answer is 500.
  The sender retries (every scheme here retries on 5xx), and the retry runs only
  the handlers that have no receipt yet. So one broken plugin neither undoes nor
  blocks the others, each handler processes an event once, and the failed one
  gets the event again when it is fixed. Handler receipts are keyed by plugin
  name: an unnamed plugin object (tests, embedding) gets a new name in each
  process, so only named plugins are guaranteed once-only across restarts.
- **``event.session``** is one ORM session per batch on the writer's connection
  (``join_transaction_mode="create_savepoint"``): it opens a savepoint of its own
  the first time a handler uses it and is committed after that handler, so a
  flush that fails undoes that handler's work only, and no handler can commit or
  roll back the batch. Plain Core statements may run on ``session.get_bind()``,
  the connection, already inside the handler's savepoint (cheaper than
  ``session.connection()``, which opens the session's savepoint).
- **Savepoints and per-event statements go straight to the driver**
  (:class:`DriverStatement`). Through SQLAlchemy each statement costs some 15 µs
  of bookkeeping, and each SAVEPOINT is compiled afresh; a device event runs six
  statements, and that bookkeeping was the largest part of the receiver's CPU
  time (``bench/webhooks.py``). Values still pass their column types'
  conversions, so rows are stored exactly as SQLAlchemy stores them.
- **One writer per process.** Sessions are synchronous; if a handler awaited
  while another transaction's INSERT waited for the SQLite write lock on the same
  event-loop thread, both would stall. SQLite has a single writer anyway; with
  PostgreSQL, scale out with processes.
- **Schemes without an event id or a timestamp** (ConnectWise, Autotask,
  HaloPSA) get the id ``sha256:<hex of the raw body>``: a replayed body is
  always a duplicate, which is the replay protection those tools allow.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import inspect
import json
import logging
import time
from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast
from weakref import WeakKeyDictionary

import structlog
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from sqlalchemy import ClauseElement, Table, bindparam, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler

from gateway.core import store
from gateway.core.models import ReceivedWebhook
from gateway.errors import ConfigError
from gateway.plugins import PluginFailure
from gateway.webhook_contract import (
    WebhookError,
    WebhookEvent,
    WebhookPayloadError,
    WebhookScheme,
    WebhookVerificationError,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from sqlalchemy import Connection, Dialect

    from gateway.app import Gateway
    from gateway.core.settings import ConnectionSettings
    from gateway.sync.ports import WebhookCounters

log = structlog.get_logger(__name__)
_stdlib_log = logging.getLogger(__name__)  # the level structlog filters by

_RECEIVED = cast(Table, ReceivedWebhook.__table__)  # a mapped class's __table__ is typed as any FromClause
_SAVEPOINT = "SAVEPOINT gateway_webhook_handler"
_ROLLBACK_TO_SAVEPOINT = "ROLLBACK TO SAVEPOINT gateway_webhook_handler"
_RELEASE_SAVEPOINT = "RELEASE SAVEPOINT gateway_webhook_handler"
_DELETE_RECEIVED = _RECEIVED.delete().where(
    _RECEIVED.c.connection == bindparam("connection"), _RECEIVED.c.event_id == bindparam("event_id")
)

MAX_BODY_BYTES = 256 * 1024
#: A sender that has not finished sending its body by then is cut off (a slow client must not hold a connection).
BODY_TIMEOUT_SECONDS = 30
TOLERANCE_SECONDS = 300
MAX_EVENT_ID_LENGTH = 128
#: Events in one transaction at most. Each handler call is a savepoint, and PostgreSQL keeps 64 subtransactions
#: of a transaction in shared memory: a transaction with more slows every snapshot on the server.
MAX_BATCH = 64
PREVIOUS_SECRET_CREDENTIAL = "webhook_secret_previous"
#: Request headers never handed to plugins (they carry credentials).
PRIVATE_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})


# --- helpers for schemes -------------------------------------------------------------


def ci_headers(headers: Mapping[str, str]) -> CIMultiDictProxy[str] | CIMultiDict[str]:
    """``headers`` with case-insensitive lookup (aiohttp's are already)."""
    if isinstance(headers, CIMultiDictProxy | CIMultiDict):
        return headers
    return CIMultiDict(headers)


def constant_time_equal(given: str | bytes, expected: str | bytes) -> bool:
    """Compare secrets or signatures without leaking where they differ."""
    a = given.encode("utf-8", "surrogateescape") if isinstance(given, str) else given
    b = expected.encode("utf-8", "surrogateescape") if isinstance(expected, str) else expected
    return hmac.compare_digest(a, b)


def hmac_base64(key: bytes, message: bytes, digest: str = "sha256") -> str:
    return base64.b64encode(hmac.new(key, message, digest).digest()).decode("ascii")


def valid_event_id(value: str) -> bool:
    """1 to 128 visible ASCII characters: safe to store, log and key on."""
    return 0 < len(value) <= MAX_EVENT_ID_LENGTH and value.isascii() and value.isprintable() and " " not in value


def body_event_id(raw_body: bytes) -> str:
    """The event id of a scheme without one: the body's SHA-256, so a replayed body is a duplicate."""
    return "sha256:" + hashlib.sha256(raw_body).hexdigest()


def check_timestamp(sent_at: int, now: datetime, header: str) -> datetime:
    """Refuse a Unix-seconds timestamp more than 300 s before or after ``now``; return it as a datetime."""
    skew = sent_at - int(now.timestamp())
    if abs(skew) > TOLERANCE_SECONDS:
        direction = "in the future" if skew > 0 else "old"
        raise WebhookVerificationError(
            f"{header} is {abs(skew)} s {direction}; only {TOLERANCE_SECONDS} s either way is accepted "
            "(check the sender's clock; a replayed request is refused)"
        )
    return datetime.fromtimestamp(sent_at, tz=UTC)


def parse_json(raw_body: bytes) -> Any:
    """The body as JSON (UTF-8, no NaN/Infinity), or WebhookPayloadError saying why not."""
    try:
        text = raw_body.decode("utf-8")
        return json.loads(text, parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise WebhookPayloadError("the body is not UTF-8 text; send JSON encoded as UTF-8") from None
    except (ValueError, RecursionError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply or invalid"
        raise WebhookPayloadError(f"the body is not valid JSON ({reason})") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# --- the receiver ----------------------------------------------------------------------


@dataclass(frozen=True)
class WebhookEndpoint:
    """One connection that accepts webhooks: its scheme and the secrets that may sign."""

    connection: str
    scheme_name: str
    scheme: WebhookScheme
    secrets: tuple[str, ...] = field(repr=False)


def load_schemes(plugins: Any) -> dict[str, WebhookScheme]:
    """Every scheme the plugins provide; two plugins naming one scheme is a start-up error."""
    schemes: dict[str, WebhookScheme] = {}
    owners: dict[str, str] = {}
    for plugin_name, provided in plugins.call_each("gateway_webhook_schemes"):
        for name, scheme in (provided or {}).items():
            if name in schemes:
                raise ConfigError(
                    f"webhook scheme {name!r} is provided by both plugin {owners[name]!r} and plugin "
                    f"{plugin_name!r}; uninstall one of them"
                )
            if not callable(getattr(scheme, "verify", None)):
                raise ConfigError(f"plugin {plugin_name!r} provides webhook scheme {name!r} without a verify() method")
            schemes[name] = scheme
            owners[name] = plugin_name
    return schemes


def build_endpoints(gateway: Gateway, schemes: Mapping[str, WebhookScheme]) -> dict[str, WebhookEndpoint]:
    """The enabled connections that have a webhook secret; wrong settings are a ConfigError naming the key."""
    adapters = gateway.plugins.adapters()
    where = gateway.settings.source or "the configuration"
    endpoints: dict[str, WebhookEndpoint] = {}
    for connection in gateway.settings.connections:
        if not connection.enabled:
            continue
        spec = adapters.get(connection.plugin)
        scheme_name = connection.webhook_scheme or (spec.webhook_scheme if spec is not None else None)
        secrets = _secrets_of(connection)
        if not secrets:
            if connection.webhook_scheme:
                raise ConfigError(
                    f"config error in {where}: connection {connection.name!r} sets webhook_scheme but no "
                    "webhook_secret; set the secret the tool signs with, or remove webhook_scheme"
                )
            continue
        known = ", ".join(sorted(schemes)) or "none"
        if scheme_name is None:
            raise ConfigError(
                f"config error in {where}: connection {connection.name!r} has a webhook_secret but no "
                f"webhook_scheme, and plugin {connection.plugin!r} names no default; "
                f"set webhook_scheme to one of: {known}"
            )
        scheme = schemes.get(scheme_name)
        if scheme is None:
            raise ConfigError(
                f"config error in {where}: connection {connection.name!r}: webhook_scheme {scheme_name!r} is not "
                f"installed (installed: {known})"
            )
        validate = getattr(scheme, "validate_secret", None)
        if callable(validate):
            for secret in secrets:
                try:
                    validate(secret)
                except ValueError as exc:
                    raise ConfigError(
                        f"config error in {where}: connection {connection.name!r}: webhook secret: {exc}"
                    ) from None
        endpoints[connection.name] = WebhookEndpoint(connection.name, scheme_name, scheme, secrets)
    return endpoints


def webhook_refusals(
    connections: Sequence[ConnectionSettings], endpoints: Mapping[str, WebhookEndpoint]
) -> dict[str, str]:
    """For each configured connection that accepts no webhooks, why (the receiver logs it; config check warns)."""
    reasons: dict[str, str] = {}
    for connection in connections:
        if connection.name in endpoints:
            continue
        if not connection.enabled:
            reasons[connection.name] = "the connection is disabled (enabled = false)"
        else:
            reasons[connection.name] = (
                f"connection {connection.name!r} has no webhook_secret, so no webhook is accepted for it; set "
                "webhook_secret (the secret the tool signs with) in its [[connections]] table"
            )
    return reasons


def _secrets_of(connection: ConnectionSettings) -> tuple[str, ...]:
    current = connection.webhook_secret.get_secret_value() if connection.webhook_secret else ""
    previous = connection.credentials.get(PREVIOUS_SECRET_CREDENTIAL)
    values = [current, previous.get_secret_value() if previous else ""]
    return tuple(v for v in values if v) if current else ()


class WebhookReceiver:
    """Handles ``POST /webhooks/{connection}`` for one gateway."""

    def __init__(self, gateway: Gateway, counters: WebhookCounters):
        self.gateway = gateway
        self.counters = counters
        self.schemes = load_schemes(gateway.plugins)
        self.endpoints = build_endpoints(gateway, self.schemes)
        #: Why a configured connection has no endpoint, for the log line of a refused request.
        self.refusals = webhook_refusals(gateway.settings.connections, self.endpoints)
        store.insert_ignore(_RECEIVED, gateway.engine.dialect.name)  # another database: a start-up error
        # Answered 503 (retry later): the database or its driver failed, not a handler.
        self._database_errors = (SQLAlchemyError, gateway.engine.dialect.loaded_dbapi.Error)
        self._pending: list[_Delivery] = []
        self._writer: asyncio.Task[None] | None = None

    async def handle(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        name = request.match_info.get("connection", "")
        endpoint = self.endpoints.get(name)
        if endpoint is None:
            # The answer is the same 404 for every reason (nothing to probe); the log says which reason it was.
            # Unknown names are not used as metric labels: anyone can invent them.
            reason = self.refusals.get(name)
            if reason is not None:
                log.warning("webhook.refused", connection=name, status=404, reason=reason)
            else:
                log.info("webhook.refused", connection=name[:64], status=404,
                         reason="no connection of that name is configured")
            return self._answer("_unknown", "unknown_connection", 404, {"error": "no webhook endpoint here"}, started)
        if not _is_json_type(request):
            return self._answer(
                name, "unsupported_media_type", 415,
                {"error": "send the body as application/json (UTF-8)"}, started,
            )
        if request.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity"):
            # No webhook sender here compresses, and signatures are over the bytes as sent.
            return self._answer(
                name, "unsupported_media_type", 415,
                {"error": "send the body uncompressed (no Content-Encoding)"}, started,
            )
        try:
            raw_body = await _read_body(request)
        except (web.RequestPayloadError, TimeoutError):
            response = self._answer(
                name, "bad_request", 400,
                {"error": f"the body was malformed or not sent in full within {BODY_TIMEOUT_SECONDS} s"}, started,
            )
            response.force_close()
            return response
        if raw_body is None:
            response = self._answer(
                name, "too_large", 413, {"error": f"the body is over {MAX_BODY_BYTES} bytes"}, started
            )
            response.force_close()  # do not read the rest of an oversized body
            return response
        now = self.gateway.clock.now()
        try:
            event = self._verify(endpoint, request.headers, raw_body, now)
        except WebhookError as exc:
            refused = "unauthorized" if exc.status == 401 else "bad_request"
            log.warning(
                "webhook.refused", connection=name, scheme=endpoint.scheme_name, status=exc.status, reason=str(exc)
            )
            return self._answer(name, refused, exc.status, {"error": str(exc)}, started)
        decided = asyncio.get_running_loop().create_future()
        delivery = await self._deliver(
            _Delivery(name, event, _plugin_headers(request.headers), endpoint.scheme_name, now, decided)
        )
        if delivery.error is not None:
            if not isinstance(delivery.error, self._database_errors):
                raise delivery.error
            log.error(
                "webhook.database_error", connection=name, event_id=event.id, error=type(delivery.error).__name__
            )
            response = self._answer(
                name, "database_error", 503, {"error": "the database is unavailable; retry later"}, started
            )
            response.headers["Retry-After"] = "5"
            return response
        if delivery.outcome == "handler_failed":
            return self._answer(
                name, delivery.outcome, 500,
                {
                    "error": "a handler failed; the event was not marked as received, so a retry delivers it again",
                    "event_id": event.id,
                    "failed_plugins": delivery.failed,
                },
                started,
            )
        outcome = delivery.outcome
        assert outcome is not None  # _deliver returns decided deliveries only
        if _stdlib_log.isEnabledFor(logging.INFO):  # skipped cheaply: this runs for every event
            log.info("webhook." + outcome, connection=name, event_id=event.id, event_type=event.type)
        return self._answer(name, outcome, 200, {"status": outcome, "event_id": event.id}, started)

    def _verify(
        self, endpoint: WebhookEndpoint, headers: Mapping[str, str], raw_body: bytes, now: datetime
    ) -> WebhookEvent:
        first_error: WebhookVerificationError | None = None
        for secret in endpoint.secrets:
            try:
                event = endpoint.scheme.verify(headers, raw_body, secret, now)
            except WebhookVerificationError as exc:
                first_error = first_error or exc
                continue
            except WebhookError:
                raise
            except Exception as exc:  # a third-party scheme's bug must not become a 5xx or store anything
                log.error("webhook.scheme_failed", scheme=endpoint.scheme_name, error=f"{type(exc).__name__}: {exc}")
                raise WebhookVerificationError("the request could not be verified") from None
            if not isinstance(event, WebhookEvent) or not isinstance(event.id, str) or not valid_event_id(event.id):
                log.error("webhook.scheme_bad_event", scheme=endpoint.scheme_name)
                raise WebhookPayloadError("the event has no usable id (1-128 visible ASCII characters)")
            return event
        assert first_error is not None
        raise first_error

    async def _deliver(self, delivery: _Delivery) -> _Delivery:
        """Queue the event and wait until a transaction has decided it."""
        self._pending.append(delivery)
        if self._writer is None or self._writer.done():
            # Started, not run: requests already received queue up behind this one before it takes a batch.
            self._writer = asyncio.get_running_loop().create_task(self._write_pending())
        await delivery.decided
        return delivery

    async def _write_pending(self) -> None:
        """The one writer: write queued events in batches until none is left, then end."""
        batch: list[_Delivery] = []
        try:
            await asyncio.sleep(0)  # requests read in the same pass of the event loop join this batch
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                await self._write_batch(batch)
        finally:  # cancelled (shutdown): nobody may wait for ever
            for delivery in [*batch, *self._pending]:
                if not delivery.decided.done():
                    delivery.error = delivery.error or asyncio.CancelledError()
                    delivery.decided.set_result(None)

    async def _write_batch(self, batch: list[_Delivery]) -> None:
        try:
            decided = await self._write(batch)
        except Exception as exc:  # nothing of the batch is stored: every event in it answers alike
            for delivery in batch:
                delivery.error = exc
        else:
            for delivery, (outcome, failed) in zip(batch, decided, strict=True):
                delivery.outcome, delivery.failed = outcome, failed
        for delivery in batch:
            if not delivery.decided.done():
                delivery.decided.set_result(None)

    async def _write(self, batch: list[_Delivery]) -> list[tuple[str, list[str]]]:
        """Record and process ``batch`` in one transaction; each event's outcome, valid once committed."""
        impls = list(reversed(self.gateway.plugins.hook.gateway_webhook_received.get_hookimpls()))
        with self.gateway.engine.connect() as db, db.begin():
            # Handlers' ORM work: the session opens its own savepoint on first use and is committed after each
            # handler, so a failing flush undoes that handler's work only, never the batch.
            with Session(bind=db, join_transaction_mode="create_savepoint") as session:
                return [await self._process(db, session, delivery, impls) for delivery in batch]

    async def _process(
        self, db: Connection, session: Session, delivery: _Delivery, impls: list[Any]
    ) -> tuple[str, list[str]]:
        connection, received_at = delivery.connection, delivery.received_at
        record = {"connection": connection, "event_id": delivery.event.id, "received_at": received_at}
        if not _RECORD.execute(db, record).rowcount:
            return "duplicate", []  # recorded before, or earlier in this batch
        event = replace(delivery.event, headers=delivery.headers, scheme=delivery.scheme, received_at=received_at,
                        session=session)
        # Handler receipts only matter when one handler can fail while another succeeds.
        several = len(impls) > 1
        receipts = {impl.plugin_name: handler_receipt(event.id, impl.plugin_name) for impl in impls} if several else {}
        done = self._handled_before(db, connection, list(receipts.values())) if several else set()
        driver = db.connection.driver_connection
        assert driver is not None  # a live connection has its driver's connection
        succeeded: list[str] = []
        failed: list[str] = []
        for impl in impls:
            if several and receipts[impl.plugin_name] in done:
                continue
            offered = {"connection": connection, "event": event}
            args = {name: value for name, value in offered.items() if name in impl.argnames}
            # Each handler in a savepoint of its own: one that raises loses its own writes only, never another
            # handler's or another event's. Sent to the driver as is: SQLAlchemy compiles a savepoint statement
            # afresh each time, which costs as much as the handler's own statements.
            driver.execute(_SAVEPOINT)
            try:
                result = impl.function(**args)
                if inspect.isawaitable(result):
                    await self.gateway.plugins.bounded(result)
                if session.in_transaction():
                    session.commit()  # flushes and releases the session's own savepoint
            except Exception as exc:  # G5: one plugin's fault is reported and contained
                session.rollback()
                driver.execute(_ROLLBACK_TO_SAVEPOINT)
                failed.append(impl.plugin_name)
                self._report(connection, event, impl.plugin_name, exc)
            else:
                succeeded.append(impl.plugin_name)
            driver.execute(_RELEASE_SAVEPOINT)
        if failed:
            # Forget the event so the sender's retry delivers it again; the handlers that succeeded keep their
            # work and get a receipt, so the retry runs only the ones that failed.
            db.execute(_DELETE_RECEIVED, [{"connection": connection, "event_id": event.id}])
            if several and succeeded:
                db.execute(
                    _RECEIVED.insert(),
                    [{"connection": connection, "event_id": receipts[plugin], "received_at": received_at}
                     for plugin in succeeded],
                )
            return "handler_failed", failed
        if done:  # the event's own id now covers the receipts of the earlier attempts
            db.execute(_DELETE_RECEIVED, [{"connection": connection, "event_id": receipt} for receipt in done])
        return "accepted", []

    @staticmethod
    def _handled_before(db: Connection, connection: str, receipt_ids: list[str]) -> set[str]:
        return set(
            db.scalars(
                select(_RECEIVED.c.event_id).where(
                    _RECEIVED.c.connection == connection, _RECEIVED.c.event_id.in_(receipt_ids)
                )
            )
        )

    def _report(self, connection: str, event: WebhookEvent, plugin: str, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}"
        self.gateway.plugins.failures.append(PluginFailure(plugin, f"gateway_webhook_received: {error}"))
        self.counters.webhook_handler_failed(connection, plugin)
        log.error("webhook.handler_failed", connection=connection, event_id=event.id, plugin=plugin, error=error)

    def _answer(
        self, connection: str, outcome: str, status: int, body: dict[str, Any], started: float
    ) -> web.Response:
        self.counters.webhook(connection, outcome, time.perf_counter() - started)
        return web.json_response(body, status=status)


class DriverStatement:
    """A Core statement compiled once per dialect and run on the driver's own cursor, for per-event work.

    Through SQLAlchemy, executing a statement costs some 15 µs of bookkeeping (cache key, execution
    context, result object): more than SQLite needs to run these statements, and the receiver runs
    several per event. Values and results still go through their column types' conversions, so what is
    written and read is what SQLAlchemy would write and read (``gateway.core.store`` takes the driver
    route for bulk rows for the same reason). No SQLAlchemy events fire, and errors are the driver's own.

    ``statement`` is a Core statement whose every bind parameter is given by name on each call, or a
    function of the dialect name that returns one (for dialect-specific constructs such as ON CONFLICT).
    """

    def __init__(self, statement: ClauseElement | Callable[[str], ClauseElement]):
        self._statement = statement
        self._compiled: WeakKeyDictionary[Dialect, _CompiledStatement] = WeakKeyDictionary()

    def execute(self, db: Connection, params: Mapping[str, Any]) -> Any:
        """Run in ``db``'s transaction; the driver's cursor."""
        return self._run(db, params)[1]

    def first(self, db: Connection, params: Mapping[str, Any]) -> Any:
        """The first row (a named tuple, values converted by their column types), or None."""
        compiled, cursor = self._run(db, params)
        row = cursor.fetchone()
        return None if row is None else compiled.row(row)

    def _run(self, db: Connection, params: Mapping[str, Any]) -> tuple[_CompiledStatement, Any]:
        if not db.in_transaction():  # SQLAlchemy would not commit what the driver wrote
            raise ValueError("DriverStatement runs in a transaction: call db.begin() first")
        compiled = self._compiled.get(db.dialect) or self._compile(db.dialect)
        driver = db.connection.driver_connection
        assert driver is not None  # a live connection has its driver's connection
        return compiled, driver.execute(compiled.sql, compiled.parameters(params))

    def _compile(self, dialect: Dialect) -> _CompiledStatement:
        statement = self._statement if isinstance(self._statement, ClauseElement) else self._statement(dialect.name)
        compiled = self._compiled[dialect] = _CompiledStatement(statement, dialect)
        return compiled


class _CompiledStatement:
    def __init__(self, statement: ClauseElement, dialect: Dialect):
        compiled = statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)  # a SELECT, INSERT or UPDATE, never DDL
        if compiled.escaped_bind_names:
            raise ValueError("DriverStatement needs plain bind parameter names")
        self.sql = compiled.string
        self._order = tuple(compiled.positiontup or ()) if compiled.positional else None
        self._convert = {
            name: process
            for name, bind in compiled.binds.items()
            if (process := bind.type.dialect_impl(dialect).bind_processor(dialect)) is not None
        }
        columns = list(getattr(statement, "selected_columns", ()))
        self._results = [column.type.dialect_impl(dialect).result_processor(dialect, None) for column in columns]
        # A named tuple of this statement's columns: a class made at run time, so typed as any class.
        self._row: type[Any] | None = (
            namedtuple("Row", [column.key for column in columns], rename=True) if columns else None
        )

    def parameters(self, params: Mapping[str, Any]) -> Any:
        convert = self._convert
        if self._order is None:
            return {name: convert[name](value) if name in convert else value for name, value in params.items()}
        return [convert[name](params[name]) if name in convert else params[name] for name in self._order]

    def row(self, values: Any) -> Any:
        assert self._row is not None
        return self._row._make(
            value if process is None else process(value) for process, value in zip(self._results, values, strict=True)
        )


def insert_new_only(table: Table) -> DriverStatement:
    """``INSERT`` of every column that skips a row whose key exists: no read first, and no race between two writers."""
    return DriverStatement(lambda dialect_name: store.insert_ignore(table, dialect_name))


_RECORD = insert_new_only(_RECEIVED)


@dataclass(eq=False)
class _Delivery:
    """One verified event waiting for its transaction, and what became of it."""

    connection: str
    event: WebhookEvent  # as the scheme returned it; handlers get it with the fields below filled in
    headers: dict[str, str] = field(repr=False)
    scheme: str
    received_at: datetime
    decided: asyncio.Future[None] = field(repr=False)  # done once outcome or error is set
    outcome: str | None = None  # accepted, duplicate or handler_failed, once committed
    failed: list[str] = field(default_factory=list)
    error: BaseException | None = None  # the batch's transaction failed: nothing of it is stored


def handler_receipt(event_id: str, plugin_name: str) -> str:
    """The ReceivedWebhook id that says one plugin's handler processed an event (space cannot occur in ids)."""
    if len(plugin_name) > 200 - MAX_EVENT_ID_LENGTH - 1 or not valid_event_id(plugin_name):
        plugin_name = "plugin-" + hashlib.sha256(plugin_name.encode("utf-8", "surrogateescape")).hexdigest()[:40]
    return f"{event_id} {plugin_name}"


def _is_json_type(request: web.Request) -> bool:
    mime = request.content_type.lower()
    charset = (request.charset or "utf-8").lower()
    return (mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))) and charset in (
        "utf-8",
        "utf8",
    )


async def _read_body(request: web.Request) -> bytes | None:
    """The body, or None when it is over MAX_BODY_BYTES; TimeoutError when it takes over BODY_TIMEOUT_SECONDS."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        return None
    if request.content.is_eof():  # all of it has arrived (the usual case): nothing to wait for
        body = request.content.read_nowait()
        return body if len(body) <= MAX_BODY_BYTES else None
    async with asyncio.timeout(BODY_TIMEOUT_SECONDS):
        return await _read_capped(request, MAX_BODY_BYTES)


async def _read_capped(request: web.Request, limit: int) -> bytes | None:
    """The body, or None as soon as it exceeds ``limit`` (whatever Content-Length claims)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _plugin_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower() not in PRIVATE_HEADERS}


WEBHOOK_RECEIVER = web.AppKey("webhook_receiver", WebhookReceiver)


def add_webhook_routes(app: web.Application, gateway: Gateway, counters: WebhookCounters) -> WebhookReceiver:
    """Mount ``POST /webhooks/{connection}`` on ``app``; settings errors raise ConfigError now, not per request."""
    receiver = WebhookReceiver(gateway, counters)
    app[WEBHOOK_RECEIVER] = receiver
    app.router.add_post("/webhooks/{connection}", receiver.handle)
    return receiver


__all__ = [
    "DriverStatement",
    "MAX_BODY_BYTES",
    "TOLERANCE_SECONDS",
    "WebhookEndpoint",
    "WebhookReceiver",
    "add_webhook_routes",
    "body_event_id",
    "check_timestamp",
    "insert_new_only",
    "parse_json",
]

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
- **One transaction per event.** The :class:`ReceivedWebhook` row (the event id)
  and every handler's work are committed together; a unique violation on the
  id means the event was processed already (G4: delivered twice, processed once).
- **A handler that raises (G5).** Each plugin's ``gateway_webhook_received``
  runs in its own SAVEPOINT. A raising handler's writes are rolled back; the
  other handlers' work is kept and committed together with one receipt per
  handler that succeeded, the event id itself is *not* recorded, and the answer
  is 500. The sender retries (every scheme here retries on 5xx), and the retry
  runs only the handlers that have no receipt yet. So one broken plugin neither
  undoes nor blocks the others, each handler processes an event once, and the
  failed one gets the event again when it is fixed. Handler receipts are keyed
  by plugin name: an unnamed plugin object (tests, embedding) gets a new name in
  each process, so only named plugins are guaranteed once-only across restarts.
- **One webhook transaction at a time per process** (an asyncio lock). Sessions
  are synchronous; if a handler awaited while another request's INSERT waited
  for the SQLite write lock on the same event-loop thread, both would stall.
  SQLite has a single writer anyway; with PostgreSQL, scale out with processes.
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
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import structlog
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from gateway.core.models import ReceivedWebhook
from gateway.errors import ConfigError, GatewayError
from gateway.plugins import PluginFailure

if TYPE_CHECKING:  # pragma: no cover - typing only
    from sqlalchemy.orm import Session

    from gateway.app import Gateway
    from gateway.core.settings import ConnectionSettings
    from gateway.web.metrics import Metrics

log = structlog.get_logger(__name__)

_RECEIVED = ReceivedWebhook.__table__
_INSERT_RECEIVED = _RECEIVED.insert()

MAX_BODY_BYTES = 256 * 1024
#: A sender that has not finished sending its body by then is cut off (a slow client must not hold a connection).
BODY_TIMEOUT_SECONDS = 30
TOLERANCE_SECONDS = 300
MAX_EVENT_ID_LENGTH = 128
PREVIOUS_SECRET_CREDENTIAL = "webhook_secret_previous"
#: Request headers never handed to plugins (they carry credentials).
PRIVATE_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})


class WebhookError(GatewayError):
    """A webhook was refused; ``status`` is the HTTP answer."""

    status = 400


class WebhookVerificationError(WebhookError):
    """The signature, the credentials or the timestamp did not pass: answered 401, nothing stored."""

    status = 401


class WebhookPayloadError(WebhookError):
    """The request is authentic but its body is not what the scheme needs: answered 400."""

    status = 400


@dataclass(frozen=True)
class WebhookEvent:
    """One verified webhook event, as schemes return it and handlers receive it.

    ``timestamp`` is the sender's signed send time where the scheme has one.
    The receiver fills ``headers`` (without credentials), ``scheme``,
    ``received_at`` and ``session``: the open transaction handlers write in
    (they never commit it).
    """

    id: str
    payload: Any
    timestamp: datetime | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    scheme: str = ""
    received_at: datetime | None = None
    session: Session | None = field(default=None, repr=False, compare=False)

    @property
    def type(self) -> str | None:
        """The payload's ``type`` (Standard Webhooks convention), if it has one."""
        value = self.payload.get("type") if isinstance(self.payload, dict) else None
        return value if isinstance(value, str) else None


@runtime_checkable
class WebhookScheme(Protocol):
    """How one kind of sender signs its webhooks (returned by ``gateway_webhook_schemes``).

    ``verify`` checks ``raw_body`` (the exact bytes received) and ``headers``
    (case-insensitive) against ``secret`` (the connection's plain secret) at
    ``now`` (the injected clock). It compares in constant time, raises
    :class:`WebhookVerificationError` when anything does not match or the
    timestamp is more than 300 s away, :class:`WebhookPayloadError` when the
    authentic body is unusable, and returns the event otherwise. It must not do
    I/O. A scheme may also define ``validate_secret(secret)`` raising ValueError,
    called at start-up so a malformed secret is a configuration error.
    """

    name: str

    def verify(self, headers: Mapping[str, str], raw_body: bytes, secret: str, now: datetime) -> WebhookEvent: ...


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
    return datetime.fromtimestamp(sent_at, tz=timezone.utc)


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
        for secret in secrets if callable(validate) else ():
            try:
                validate(secret)
            except ValueError as exc:
                raise ConfigError(
                    f"config error in {where}: connection {connection.name!r}: webhook secret: {exc}"
                ) from None
        endpoints[connection.name] = WebhookEndpoint(connection.name, scheme_name, scheme, secrets)
    return endpoints


def _secrets_of(connection: ConnectionSettings) -> tuple[str, ...]:
    current = connection.webhook_secret.get_secret_value() if connection.webhook_secret else ""
    previous = connection.credentials.get(PREVIOUS_SECRET_CREDENTIAL)
    values = [current, previous.get_secret_value() if previous else ""]
    return tuple(v for v in values if v) if current else ()


class WebhookReceiver:
    """Handles ``POST /webhooks/{connection}`` for one gateway."""

    def __init__(self, gateway: Gateway, metrics: Metrics):
        self.gateway = gateway
        self.metrics = metrics
        self.schemes = load_schemes(gateway.plugins)
        self.endpoints = build_endpoints(gateway, self.schemes)
        self._lock = asyncio.Lock()

    async def handle(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        name = request.match_info.get("connection", "")
        endpoint = self.endpoints.get(name)
        if endpoint is None:
            # Unknown names are not used as metric labels: anyone can invent them.
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
            async with asyncio.timeout(BODY_TIMEOUT_SECONDS):
                raw_body = await _read_capped(request, MAX_BODY_BYTES)
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
            outcome = "unauthorized" if exc.status == 401 else "bad_request"
            log.warning(
                "webhook.refused", connection=name, scheme=endpoint.scheme_name, status=exc.status, reason=str(exc)
            )
            return self._answer(name, outcome, exc.status, {"error": str(exc)}, started)
        event = replace(event, headers=_plugin_headers(request.headers), scheme=endpoint.scheme_name, received_at=now)
        try:
            async with self._lock:
                outcome, failed = await self._process(name, event, now)
        except SQLAlchemyError as exc:
            log.error("webhook.database_error", connection=name, event_id=event.id, error=type(exc).__name__)
            response = self._answer(
                name, "database_error", 503, {"error": "the database is unavailable; retry later"}, started
            )
            response.headers["Retry-After"] = "5"
            return response
        if outcome == "handler_failed":
            return self._answer(
                name, outcome, 500,
                {
                    "error": "a handler failed; the event was not marked as received, so a retry delivers it again",
                    "event_id": event.id,
                    "failed_plugins": failed,
                },
                started,
            )
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

    async def _process(self, connection: str, event: WebhookEvent, now: datetime) -> tuple[str, list[str]]:
        impls = list(reversed(self.gateway.plugins.hook.gateway_webhook_received.get_hookimpls()))
        # Savepoints and handler receipts only matter when one handler can fail while another succeeds.
        isolate = len(impls) > 1
        receipts = {impl.plugin_name: handler_receipt(event.id, impl.plugin_name) for impl in impls} if isolate else {}
        with self.gateway.db() as session:
            try:
                session.connection().execute(
                    _INSERT_RECEIVED, {"connection": connection, "event_id": event.id, "received_at": now}
                )
            except IntegrityError:
                session.rollback()
                return "duplicate", []
            done = self._handled_before(session, connection, list(receipts.values())) if isolate else set()
            event = replace(event, session=session)
            succeeded: list[str] = []
            failed: list[str] = []
            for impl in impls:
                if isolate and receipts[impl.plugin_name] in done:
                    continue
                offered = {"connection": connection, "event": event}
                args = {name: value for name, value in offered.items() if name in impl.argnames}
                savepoint = session.begin_nested() if isolate else None
                try:
                    result = impl.function(**args)
                    if inspect.isawaitable(result):
                        await result
                    session.flush()
                except Exception as exc:  # G5: one plugin's fault is reported and contained
                    if savepoint is None:
                        session.rollback()
                    else:
                        savepoint.rollback()
                    failed.append(impl.plugin_name)
                    self._report(connection, event, impl.plugin_name, exc)
                else:
                    if savepoint is not None:
                        savepoint.commit()
                    succeeded.append(impl.plugin_name)
            if failed:
                if isolate:
                    # Keep the others' work with their receipts; forget the event so the retry runs the rest.
                    session.execute(
                        _RECEIVED.delete().where(_RECEIVED.c.connection == connection, _RECEIVED.c.event_id == event.id)
                    )
                    if succeeded:
                        session.execute(
                            _RECEIVED.insert(),
                            [
                                {"connection": connection, "event_id": receipts[plugin], "received_at": now}
                                for plugin in succeeded
                            ],
                        )
                    session.commit()
                return "handler_failed", failed
            if done:  # an earlier attempt's handler receipts: the event's own receipt now covers them
                session.execute(
                    _RECEIVED.delete().where(_RECEIVED.c.connection == connection, _RECEIVED.c.event_id.in_(done))
                )
            session.commit()
            return "accepted", []

    @staticmethod
    def _handled_before(session: Session, connection: str, receipt_ids: list[str]) -> set[str]:
        return set(
            session.scalars(
                select(_RECEIVED.c.event_id).where(
                    _RECEIVED.c.connection == connection, _RECEIVED.c.event_id.in_(receipt_ids)
                )
            )
        )

    def _report(self, connection: str, event: WebhookEvent, plugin: str, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}"
        self.gateway.plugins.failures.append(PluginFailure(plugin, f"gateway_webhook_received: {error}"))
        self.metrics.webhook_handler_failed(connection, plugin)
        log.error("webhook.handler_failed", connection=connection, event_id=event.id, plugin=plugin, error=error)

    def _answer(
        self, connection: str, outcome: str, status: int, body: dict[str, Any], started: float
    ) -> web.Response:
        self.metrics.webhook(connection, outcome, time.perf_counter() - started)
        return web.json_response(body, status=status)


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


def add_webhook_routes(app: web.Application, gateway: Gateway) -> WebhookReceiver:
    """Mount ``POST /webhooks/{connection}`` on ``app``; settings errors raise ConfigError now, not per request."""
    from gateway.web.metrics import get_metrics

    receiver = WebhookReceiver(gateway, get_metrics(gateway))
    app[WEBHOOK_RECEIVER] = receiver
    app.router.add_post("/webhooks/{connection}", receiver.handle)
    return receiver


__all__ = [
    "MAX_BODY_BYTES",
    "TOLERANCE_SECONDS",
    "WebhookEndpoint",
    "WebhookError",
    "WebhookEvent",
    "WebhookPayloadError",
    "WebhookReceiver",
    "WebhookScheme",
    "WebhookVerificationError",
    "add_webhook_routes",
    "body_event_id",
    "check_timestamp",
    "parse_json",
]

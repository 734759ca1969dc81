"""The admin HTTP API: ``create_app(gateway)`` wires middlewares, route modules, OpenAPI and health.

To add routes, write a module with a :class:`~gateway.web.api.Routes` table named
``routes`` and list it in :data:`ROUTE_MODULES`; its routes are mounted,
authenticated and documented in ``/api/v1/openapi.json`` with nothing else to do.
"""

from __future__ import annotations

import importlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from gateway import __version__
from gateway.core.access import Principal
from gateway.core.users import authenticate
from gateway.web.api import API_PREFIX, DB_EXECUTOR, GATEWAY, MAX_BODY_BYTES, PRINCIPAL, Endpoint, in_db
from gateway.web.auth import bearer_token, invalid_token
from gateway.web.errors import REQUEST_ID, error_middleware
from gateway.web.health import add_health_routes
from gateway.web.openapi import build_document

if TYPE_CHECKING:  # pragma: no cover - typing only
    from gateway.app import Gateway

log = structlog.get_logger(__name__)

#: Route modules of the admin API, each exposing ``routes``.
ROUTE_MODULES: tuple[str, ...] = ("gateway.web.licenses", "gateway.web.billing", "gateway.web.devices",
                                   "gateway.web.editions", "gateway.web.partners", "gateway.web.customers")

OPENAPI = web.AppKey("openapi", dict)
PUBLIC_HANDLERS = web.AppKey("public_handlers", frozenset)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def create_app(gateway: Gateway, *, route_modules: Sequence[str] = ROUTE_MODULES) -> web.Application:
    """The admin API application; the caller keeps owning ``gateway`` (its engine is not disposed here)."""
    app = web.Application(middlewares=[request_context, error_middleware, auth_middleware],
                          client_max_size=MAX_BODY_BYTES)
    app[GATEWAY] = gateway
    endpoints: list[Endpoint] = []
    for name in route_modules:
        endpoints.extend(importlib.import_module(name).routes.endpoints)
    openapi_endpoint = Endpoint("GET", f"{API_PREFIX}/openapi.json", openapi_document,
                                "this document (OpenAPI 3.1)", "meta", public=True)
    # Fixed paths before templated ones, so /licenses/bulk is never read as a key.
    ordered = sorted(endpoints, key=lambda e: "{" in e.path)
    for endpoint in ordered:
        app.router.add_route(endpoint.method, endpoint.path, endpoint.handler)
    app.router.add_get(openapi_endpoint.path, openapi_document)
    app[OPENAPI] = build_document(endpoints, title="MSP license gateway admin API", version=__version__)
    app[PUBLIC_HANDLERS] = frozenset([openapi_document, *(e.handler for e in endpoints if e.public)])
    add_health_routes(app, gateway)
    app.cleanup_ctx.append(_db_executor)
    quiet_malformed_requests()
    return app


class MalformedRequestFilter(logging.Filter):
    """A request aiohttp cannot parse (a NUL byte in a header, a broken request line) is the client's fault.

    aiohttp answers it 400 and logs an ERROR with the parser's traceback; this turns that record into one
    WARNING line: who sent it and what was wrong, without the offending bytes (a header may hold a secret).
    Any other record, including a real server error, passes unchanged.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and (exc.code or 400) < 500:
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            reason = (exc.message or type(exc).__name__).strip().splitlines()[0].rstrip(":")
            record.msg, record.args = "malformed HTTP request from %s answered 400: %s", (remote, reason)
            record.exc_info, record.exc_text, record.stack_info = None, None, None
            if record.levelno > logging.WARNING:  # aiohttp logs a bad first request line at DEBUG: keep that
                record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_MALFORMED_FILTER = MalformedRequestFilter()


def quiet_malformed_requests() -> None:
    """Install :class:`MalformedRequestFilter` on aiohttp's server logger (once, however many apps are built)."""
    server_logger = logging.getLogger("aiohttp.server")
    if _MALFORMED_FILTER not in server_logger.filters:
        server_logger.addFilter(_MALFORMED_FILTER)


async def _db_executor(app: web.Application) -> AsyncIterator[None]:
    """Database work runs on as many threads as the engine has connections, so requests queue, not the pool."""
    size = app[GATEWAY].settings.database.pool_size
    executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="gateway-db")
    app[DB_EXECUTOR] = executor
    yield
    executor.shutdown(wait=True)


async def openapi_document(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])


@web.middleware
async def request_context(request: web.Request, handler: Any) -> web.StreamResponse:
    """A request id on every log line and response; one access line per request."""
    given = request.headers.get("X-Request-ID", "")
    request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    started = time.perf_counter()
    response = await handler(request)
    response.headers["X-Request-ID"] = request_id
    log.info("http.request", method=request.method, path=request.path, status=response.status,
             ms=round((time.perf_counter() - started) * 1000, 1))
    return response


@web.middleware
async def auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every ``/api/`` route needs a valid token unless it is public; unknown paths too (nothing to probe)."""
    if request.path.startswith("/api/") and request.match_info.handler not in request.app[PUBLIC_HANDLERS]:
        principal = await _authenticate(request)
        request[PRINCIPAL] = principal
        structlog.contextvars.bind_contextvars(user=principal.name)
    return await handler(request)


async def _authenticate(request: web.Request) -> Principal:
    # Its own frame, so the token is gone before the handler runs and never shows in a traceback's locals.
    token = bearer_token(request)
    clock = request.app[GATEWAY].clock
    principal = await in_db(request, lambda session: authenticate(session, token, clock.now()))
    if principal is None:
        raise invalid_token()
    return principal

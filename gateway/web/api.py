"""What every route module of the admin API uses: a route table and the request helpers.

A route module declares ``routes = Routes(tag="...")`` and decorates its
handlers with ``@routes.get(path, summary=..., query=..., response=...)``; the
module is listed in :data:`gateway.web.app.ROUTE_MODULES`. The metadata given
there (body, query and response models) is what the OpenAPI document is built
from, so a new route is documented by being declared. Handlers read their input
with :func:`read_body`/:func:`read_query` (pydantic, ``extra="forbid"``), run
their database work with :func:`in_db` (a worker thread, one transaction) and
answer with :func:`respond`.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, TypeAdapter
from sqlalchemy.orm import Session

from gateway.core import db as gdb
from gateway.core.access import Principal
from gateway.web.errors import HttpProblem

if TYPE_CHECKING:  # pragma: no cover - typing only
    from gateway.app import Gateway

API_PREFIX = "/api/v1"
#: The largest id a path can name: ids are INTEGER columns (signed 32 bits on PostgreSQL). A larger one is
#: answered 404 before it reaches the database (which would refuse it); the OpenAPI document says so.
MAX_PATH_ID = 2**31 - 1

GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway")
DB_EXECUTOR = web.AppKey("db_executor", ThreadPoolExecutor)
PRINCIPAL = web.RequestKey("principal", Principal)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
R = TypeVar("R")
M = TypeVar("M", bound=BaseModel)


class Body(BaseModel):
    """Base of request bodies: unknown fields are refused, so a misspelt field is never silently ignored."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    response: Any = None
    status: int = 200
    public: bool = False


class Routes:
    """A module's routes and their metadata."""

    def __init__(self, tag: str, prefix: str = API_PREFIX):
        self.tag = tag
        self.prefix = prefix
        self.endpoints: list[Endpoint] = []

    def route(self, method: str, path: str, *, summary: str, body: type[BaseModel] | None = None,
              query: type[BaseModel] | None = None, response: Any = None, status: int = 200,
              public: bool = False) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            self.endpoints.append(Endpoint(method.upper(), self.prefix + path, handler, summary, self.tag, body, query,
                                           response, status, public))
            return handler

        return register

    def get(self, path: str, **meta: Any) -> Callable[[Handler], Handler]:
        return self.route("GET", path, **meta)

    def post(self, path: str, **meta: Any) -> Callable[[Handler], Handler]:
        return self.route("POST", path, **meta)

    def put(self, path: str, **meta: Any) -> Callable[[Handler], Handler]:
        return self.route("PUT", path, **meta)

    def patch(self, path: str, **meta: Any) -> Callable[[Handler], Handler]:
        return self.route("PATCH", path, **meta)

    def delete(self, path: str, **meta: Any) -> Callable[[Handler], Handler]:
        return self.route("DELETE", path, **meta)


def gateway_of(request: web.Request) -> Gateway:
    return request.app[GATEWAY]


def principal_of(request: web.Request) -> Principal:
    return request[PRINCIPAL]


#: The largest request body (bytes): aiohttp's ``client_max_size``; a larger one is answered 413.
MAX_BODY_BYTES = 1024 * 1024
#: How deeply a JSON body may nest arrays and objects; no body of this API needs more than a few levels.
MAX_BODY_DEPTH = 32


async def read_body(request: web.Request, model: type[M]) -> M:
    """The JSON body as ``model``: 413 when too large, 422 when missing, 400 when it is not a JSON object (or
    nests too deeply), 422 (with the field) when it does not fit the model."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise HttpProblem(413, "too_large", f"the request body is larger than {request.client_max_size} bytes; "
                          "send less per request") from None
    if not raw.strip():
        raise HttpProblem(422, "validation_error", "the request body is required: send a JSON object "
                          "(see /api/v1/openapi.json; {} takes every default)", field="body")
    try:
        data = json.loads(raw)
    except RecursionError:
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError):
        raise HttpProblem(400, "bad_request", "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise HttpProblem(400, "bad_request", "the request body must be a JSON object")
    if _depth(data) > MAX_BODY_DEPTH:
        raise _too_deep()
    return model.model_validate(data)


def _too_deep() -> HttpProblem:
    return HttpProblem(400, "bad_request", f"the request body nests arrays or objects more than {MAX_BODY_DEPTH} "
                       "levels deep; no field of this API takes that")


def _depth(data: Any) -> int:
    """How deeply ``data`` nests lists and dicts (iteratively: a deep value cannot exhaust the stack here)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict | list):
            deepest = max(deepest, level)
            if deepest > MAX_BODY_DEPTH:
                return deepest
            stack.extend((item, level + 1) for item in (value.values() if isinstance(value, dict) else value))
    return deepest


def read_query(request: web.Request, model: type[M]) -> M:
    """The query string as ``model`` (a repeated parameter keeps its last value)."""
    return model.model_validate(dict(request.query))


async def in_db(request: web.Request, work: Callable[[Session], R]) -> R:
    """Run ``work(session)`` in one transaction on a worker thread, with the request's log context."""
    gateway = gateway_of(request)
    context = contextvars.copy_context()

    def run() -> R:
        with gdb.transaction(gateway.db) as session:
            return work(session)

    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(request.app[DB_EXECUTOR], context.run, run)


def respond(model: Any, data: Any, *, status: int = 200) -> web.Response:
    """Validate ``data`` against the response model (the contract in the OpenAPI document) and send it."""
    payload = TypeAdapter(model).dump_python(TypeAdapter(model).validate_python(data), mode="json")
    return web.json_response(payload, status=status)

"""Every error of the admin API as one JSON shape: ``{"error": {"code", "message", "field"}}``.

The middleware maps the gateway's error types to statuses at one boundary:
malformed JSON -> 400, a rule broken or a body that fails validation -> 422,
not found (or not visible, S8) -> 404, a state conflict or a lost race -> 409,
no or bad token -> 401, a database that cannot be reached -> 503, anything
else -> 500 with the request id and nothing of the internals.
"""

from __future__ import annotations

from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm.exc import StaleDataError

from gateway.errors import Conflict, DatabaseError, DomainError, NotFound

log = structlog.get_logger(__name__)

#: Set by the request-context middleware; quoted in 500 answers so a report can be matched to the log.
REQUEST_ID = web.RequestKey("request_id", str)


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


class HttpProblem(Exception):
    """An error that is about HTTP itself (authentication, a malformed body), with its status."""

    def __init__(self, status: int, code: str, message: str, *, field: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"code": code, "message": message, "field": field}}
    return web.json_response(body, status=status, headers=headers)


def _validation_problem(exc: ValidationError) -> web.Response:
    errors = exc.errors(include_input=False, include_url=False)
    first_loc = errors[0].get("loc", ()) if errors else ()
    field = ".".join(str(part) for part in first_loc) or None
    parts = []
    for error in errors:
        loc = ".".join(str(part) for part in error.get("loc", ()))
        message = error.get("msg", "invalid value")
        if error.get("type") == "extra_forbidden":
            message = "unknown field; check the spelling against /api/v1/openapi.json"
        parts.append(f"{loc}: {message}" if loc else message)
    return error_response(422, "validation_error", "; ".join(parts) or "invalid request", field)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type"}


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except HttpProblem as exc:
        return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)
    except NotFound as exc:
        return error_response(404, exc.code, exc.message, exc.field)
    except Conflict as exc:
        return error_response(409, exc.code, exc.message, exc.field)
    except DomainError as exc:
        return error_response(422, exc.code, exc.message, exc.field)
    except ValidationError as exc:
        return _validation_problem(exc)
    except RequestPayloadError:  # the body could not be read: a Content-Encoding that does not fit it, a cut body
        encoding = request.headers.get("Content-Encoding")
        message = (f"the request body says Content-Encoding: {encoding[:40]} but is not {encoding[:40]}-encoded; "
                   "send it uncompressed or compress it as it says" if encoding else
                   "the request body could not be read (cut short or malformed); send it again")
        return error_response(400, "bad_request", message)
    except StaleDataError:
        return error_response(409, "conflict", "the resource was changed by someone else at the same time; "
                              "reload it and try again")
    except (DatabaseError, OperationalError) as exc:
        log.error("http.database_unavailable", error=type(exc).__name__)
        return error_response(503, "unavailable", "the database is unavailable or busy; try again shortly")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        message = f"no route {request.method} {request.path}" if exc.status in (404, 405) else exc.reason
        allow = exc.headers.get("Allow")  # a 405 says which methods the path has (RFC 9110)
        return error_response(exc.status, code, message, headers={"Allow": allow} if allow is not None else None)
    except Exception:
        request_id = request.get(REQUEST_ID, "?")
        log.exception("http.unhandled", path=request.path, method=request.method)
        return error_response(500, "internal_error", f"internal error; quote request id {request_id} when reporting it")

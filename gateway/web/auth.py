"""The HTTP side of API tokens: ``Authorization: Bearer <token>`` and the 401 answers.

Every route under ``/api/`` needs a token, except the routes marked public (the
OpenAPI document). Users, tokens and checking a token are domain code in
:mod:`gateway.core.users`, shared with the CLI.
"""

from __future__ import annotations

from aiohttp import web

from gateway.web.errors import HttpProblem


def bearer_token(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise _unauthorized("this API needs a token: send 'Authorization: Bearer <token>' "
                            "(create one with 'gateway tokens create')")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("the Authorization header must be 'Bearer <token>'")
    return token.strip()


def _unauthorized(message: str) -> HttpProblem:
    return HttpProblem(401, "unauthorized", message, headers={"WWW-Authenticate": 'Bearer realm="gateway"'})


def invalid_token() -> HttpProblem:
    return _unauthorized("the token is unknown or revoked")

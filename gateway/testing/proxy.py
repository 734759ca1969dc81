"""A fault-injecting reverse proxy on loopback, put between an adapter and any simulator.

The contract kit cannot know how each simulator injects faults, so it does not ask: it
serves a :class:`FaultProxy` on 127.0.0.1 in front of the simulator and points the
adapter at the proxy. The proxy forwards every request unchanged (the ``Host`` header
included, so links a simulator builds from the request URL point back at the proxy) and
can instead, per planned fault:

- answer 429 (with ``Retry-After``) or a 5xx/4xx itself, without bothering the simulator;
- close the connection before forwarding (the tool never saw the request);
- forward the request and then close the connection (the tool did the work, the answer
  was lost: the case that makes a non-idempotent push create a duplicate);
- reject bearer tokens it saw before ``faults.expire_tokens()`` with 401, as a tool does
  when a token's lifetime ends, so an OAuth2 adapter has to fetch a new one.

Faults are planned on a :class:`gateway.simulators.Faults` (the same calls as the
bundled simulators'), plus :meth:`FaultProxy.lose_responses`. Every request is recorded
in :attr:`FaultProxy.seen`, so a test can count what was sent and what came back.
"""

from __future__ import annotations

import hashlib
import re
from collections import deque
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from gateway.simulators import Faults

_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer", "content-length"}
)


@dataclass
class Seen:
    """One request as the proxy saw it; ``status`` None means the connection was closed on it."""

    method: str
    path: str
    credential: str | None  # a short fingerprint of the Authorization header, never the header itself
    status: int | None = None
    forwarded: bool = False


def _fingerprint(header: str | None) -> str | None:
    return hashlib.sha256(header.encode()).hexdigest()[:12] if header else None


def _error_body(status: int, message: str) -> dict[str, Any]:
    return {"error": message, "status": status, "injected_by": "gateway.testing.proxy"}


class FaultProxy:
    """Forwards to ``upstream`` (a base URL on loopback) and injects the faults planned on :attr:`faults`."""

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.faults = Faults()
        self.seen: list[Seen] = []
        self._lost: deque[tuple[str, re.Pattern[str] | None]] = deque()  # answers to lose after forwarding
        self._token_generation: dict[str, int] = {}
        self._session: aiohttp.ClientSession | None = None
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self._handle)
        self.app.on_cleanup.append(self._close)

    def lose_responses(self, times: int = 1, *, method: str = "POST", path: str | None = None) -> FaultProxy:
        """The next ``times`` ``method`` requests (whose path matches the regex ``path``, if given)
        reach the tool, but their answers never arrive."""
        pattern = re.compile(path) if path else None
        self._lost.extend((method.upper(), pattern) for _ in range(times))
        return self

    def requests(self, method: str | None = None) -> list[Seen]:
        """What was sent, optionally only one method's requests."""
        return [s for s in self.seen if method is None or s.method == method.upper()]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        header = request.headers.get("Authorization")
        seen = Seen(request.method, request.path_qs, _fingerprint(header))
        self.seen.append(seen)
        if header and header.startswith("Bearer "):
            first_seen = self._token_generation.setdefault(header, self.faults.token_generation)
            if first_seen < self.faults.token_generation:
                seen.status = 401
                return web.json_response(
                    {"error": "invalid_token", "error_description": "The access token expired"},
                    status=401,
                    headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
                )
        fault = await self.faults.inject(request, _error_body)
        if fault is not None:
            dropped = request.transport is None or request.transport.is_closing()
            seen.status = None if dropped else fault.status
            return fault
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        async with self._client().request(
            request.method, self.upstream + request.path_qs, data=body, headers=headers, allow_redirects=False
        ) as upstream:
            payload = await upstream.read()
            status = upstream.status
            answer_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}
        seen.forwarded = True
        if self._lost and self._lost[0][0] == request.method and (
            self._lost[0][1] is None or self._lost[0][1].search(request.path)
        ):
            self._lost.popleft()
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=500)  # never reaches the client
        seen.status = status
        return web.Response(status=status, headers=answer_headers, body=payload)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            # No automatic decompression: bodies pass through byte for byte.
            self._session = aiohttp.ClientSession(auto_decompress=False)
        return self._session

    async def _close(self, _app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

"""Fault injection for a simulator: 429s, 5xx, slow answers, dropped connections and expired tokens, on plan.

A simulator keeps one :class:`Faults` in its app (``app[FAULTS]``) and asks it, at the
start of every API request, whether this response should be a fault. Tests and
benchmarks plan faults at runtime; they are served in order, one response each::

    faults = app[FAULTS]
    faults.throttle(2, retry_after=1)   # the next two responses are 429 with Retry-After: 1
    faults.fail(1, status=502)          # then one 502
    faults.allow(3).drop()              # three normal responses, then a dropped connection
    faults.expire_tokens()              # every token issued so far is now rejected with 401
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

ErrorBody = Callable[[int, str], dict[str, Any]]


@dataclass(frozen=True)
class _Fault:
    kind: str  # allow | throttle | fail | slow | drop
    status: int = 0
    retry_after: float | None = None
    seconds: float = 0.0


class Faults:
    """A queue of planned faults plus a token generation that ``expire_tokens`` moves on."""

    def __init__(self) -> None:
        self._planned: deque[_Fault] = deque()
        self.token_generation = 0
        self.served = 0

    def allow(self, times: int = 1) -> Faults:
        """The next ``times`` responses are normal (to place a later fault mid-way)."""
        self._planned.extend(_Fault("allow") for _ in range(times))
        return self

    def throttle(self, times: int = 1, *, retry_after: float | None = None) -> Faults:
        """The next ``times`` responses are 429, with ``Retry-After`` when given."""
        self._planned.extend(_Fault("throttle", 429, retry_after) for _ in range(times))
        return self

    def fail(self, times: int = 1, *, status: int = 503) -> Faults:
        """The next ``times`` responses are server errors."""
        self._planned.extend(_Fault("fail", status) for _ in range(times))
        return self

    def slow(self, times: int = 1, *, seconds: float = 1.0) -> Faults:
        """The next ``times`` responses are delayed by ``seconds``, then served normally."""
        self._planned.extend(_Fault("slow", seconds=seconds) for _ in range(times))
        return self

    def drop(self, times: int = 1) -> Faults:
        """The next ``times`` requests have their connection closed without a response."""
        self._planned.extend(_Fault("drop") for _ in range(times))
        return self

    def expire_tokens(self) -> Faults:
        """Every token issued so far is rejected from now on (401), as after a token lifetime."""
        self.token_generation += 1
        return self

    def clear(self) -> None:
        self._planned.clear()

    @property
    def pending(self) -> int:
        return len(self._planned)

    async def inject(self, request: web.Request, error_body: ErrorBody) -> web.StreamResponse | None:
        """Serve the next planned fault for ``request``; None means answer normally."""
        if not self._planned:
            return None
        fault = self._planned.popleft()
        if fault.kind == "allow":
            return None
        self.served += 1
        if fault.kind == "slow":
            await asyncio.sleep(fault.seconds)
            return None
        if fault.kind == "drop":
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=500)  # never reaches the client
        headers = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = f"{fault.retry_after:g}"
        message = "Too many requests" if fault.status == 429 else "Service temporarily unavailable"
        return web.json_response(error_body(fault.status, message), status=fault.status, headers=headers)

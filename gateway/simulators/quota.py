"""A tool's request quota, for a simulator that answers 429 where the real tool would.

The window runs on real (monotonic) time, like the connector's rate limiter it tests:
a simulator counts the requests it was sent in the last ``per_seconds`` and refuses the
one over ``limit`` with the seconds until a slot frees, which it sends as ``Retry-After``.
"""

from __future__ import annotations

import time
from collections import deque


class RequestWindow:
    """A tool's sliding request quota: ``limit`` requests in the last ``per_seconds`` (real time)."""

    def __init__(self, limit: int, per_seconds: float):
        self.limit = limit
        self.per_seconds = per_seconds
        self._times: deque[float] = deque()

    def _trim(self, now: float) -> None:
        while self._times and self._times[0] <= now - self.per_seconds:
            self._times.popleft()

    def count(self) -> int:
        """Requests inside the window now."""
        self._trim(time.monotonic())
        return len(self._times)

    def admit(self) -> float | None:
        """Count a request; None if it fits, else the seconds until a slot frees (it is not counted)."""
        now = time.monotonic()
        self._trim(now)
        if len(self._times) >= self.limit:
            return max(0.0, self._times[0] + self.per_seconds - now)
        self._times.append(now)
        return None

"""A tool's request quota, for a simulator that answers 429 where the real tool would.

The window runs on real (monotonic) time, like the connector's rate limiter it tests:
a simulator counts the requests it was sent in the last ``per_seconds`` and refuses the
one over ``limit`` with the seconds until a slot frees, which it sends as ``Retry-After``.
``monotonic`` may be a test's virtual time; ``reserved`` is the part of the quota other
callers of the same account keep spending (Datto RMM counts its quota for all users), so
only ``limit - reserved`` is left in any window.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class RequestWindow:
    """A tool's sliding request quota: ``limit`` requests in the last ``per_seconds`` (real time)."""

    def __init__(
        self, limit: int, per_seconds: float, *, reserved: int = 0, monotonic: Callable[[], float] = time.monotonic
    ):
        if not 0 <= reserved < limit:
            raise ValueError(f"reserved must be between 0 and limit - 1 ({limit - 1}), got {reserved}")
        self.limit = limit
        self.per_seconds = per_seconds
        self.reserved = reserved
        self._monotonic = monotonic
        self._times: deque[float] = deque()

    def _trim(self, now: float) -> None:
        while self._times and self._times[0] <= now - self.per_seconds:
            self._times.popleft()

    def count(self) -> int:
        """Requests inside the window now, other callers' included."""
        self._trim(self._monotonic())
        return len(self._times) + self.reserved

    def admit(self) -> float | None:
        """Count a request; None if it fits, else the seconds until a slot frees (it is not counted)."""
        now = self._monotonic()
        self._trim(now)
        if len(self._times) + self.reserved >= self.limit:
            return max(0.0, self._times[0] + self.per_seconds - now)
        self._times.append(now)
        return None

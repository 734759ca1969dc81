"""The injected clock.

Domain code never calls ``datetime.now()``: it asks a clock, so billing and
licensing can be tested across month ends, time zones and DST changes by
handing them a :class:`FrozenClock`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """Something that tells the current time as an aware UTC datetime."""

    def now(self) -> datetime: ...


class SystemClock:
    """The real clock, used by the CLI and the daemon."""

    def now(self) -> datetime:
        return datetime.now(UTC)


class FrozenClock:
    """A clock that stands still until told to move; for tests and dry runs."""

    def __init__(self, at: datetime):
        self._at = _require_aware(at)

    def now(self) -> datetime:
        return self._at

    def set(self, at: datetime) -> None:
        self._at = _require_aware(at)

    def advance(self, delta: timedelta | None = None, **kwargs: float) -> datetime:
        self._at = self._at + (delta if delta is not None else timedelta(**kwargs))
        return self._at


def _require_aware(at: datetime) -> datetime:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"clock times must be timezone-aware, got naive {at.isoformat()}")
    return at.astimezone(UTC)


class OffsetClock:
    """A clock that starts at ``at`` and then ticks with the real clock (``[testing] clock_override``).

    Ticking rather than frozen: ``gateway --now`` also moves the daemon, whose scheduled jobs (outbox,
    billing, licensing) decide what is due by comparing the time now with the time they last ran; a
    frozen clock would make every later tick see the same instant, so nothing scheduled after the
    first run would ever come due and back-off delays would never pass. A one-shot command sees the
    same instant either way, give or take the seconds it runs.
    """

    def __init__(self, at: datetime, base: Clock | None = None):
        self._base = base or SystemClock()
        self._offset = _require_aware(at) - self._base.now()

    def now(self) -> datetime:
        return self._base.now() + self._offset

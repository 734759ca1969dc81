"""Virtual time for a test: a monotonic clock that only ``sleep`` moves on.

Hand ``monotonic`` and ``sleep`` to both the connector (``Connector(monotonic=..., sleep=...)``)
and a simulator that takes them (its quota window, slow-downs and blocks), and a pull that
waits out a 60-second quota window finishes in milliseconds of real time, while both sides
agree on how much time has passed.
"""

from __future__ import annotations

import asyncio


class VirtualTime:
    """``monotonic()`` starts at ``start`` and moves only when someone ``await sleep(seconds)``."""

    def __init__(self, start: float = 1000.0):
        self._now = start
        self.slept = 0.0

    def monotonic(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._now += seconds
            self.slept += seconds
        await asyncio.sleep(0)  # let the other side run, as a real sleep would

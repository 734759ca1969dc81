"""One polling job with coordinator semantics (after Home Assistant's DataUpdateCoordinator).

A job runs on its interval. When it starts failing, the failure is logged once
(at error level) and later failures only at debug level; the first success
after a failure is logged once as a recovery. While failing, the delay grows
exponentially up to ``max_backoff`` so a broken tool is not hammered. Errors
never escape the coordinator: one failing connection never stops the others (G5).

A job that met a database lock (SQLite's one writer held it past the busy timeout,
a PostgreSQL deadlock or lock timeout) is not broken: it retries soon
(``lock_retry_seconds``, doubling, never later than its interval) instead of a
whole interval later.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from gateway.core.db import is_lock_error
from gateway.errors import GatewayError

log = structlog.get_logger(__name__)


@dataclass
class CoordinatorState:
    """What /readyz and the metrics show about a job."""

    runs: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_error: str | None = None
    last_success_monotonic: float | None = None
    last_result: Any = None
    running: bool = False
    #: The last failure was a database lock: retry soon.
    locked: bool = False
    #: The failure was reported (logged at error, ``on_failure`` called): the recovery is reported too.
    reported: bool = False


@dataclass
class Coordinator:
    """Runs ``job`` every ``interval`` seconds until stopped; see the module docstring for failure handling."""

    name: str
    interval: float
    job: Callable[[], Awaitable[Any]]
    max_backoff: float = 3600.0
    lock_retry_seconds: float = 1.0
    on_failure: Callable[[str, BaseException], Awaitable[None] | None] | None = None
    on_recovery: Callable[[str], Awaitable[None] | None] | None = None
    state: CoordinatorState = field(default_factory=CoordinatorState)

    async def run_once(self) -> bool:
        """Run the job once; True on success. Exceptions are caught, logged per the rules above."""
        self.state.runs += 1
        self.state.running = True
        try:
            result = await self.job()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.state.failures += 1
            self.state.consecutive_failures += 1
            self.state.last_error = f"{type(exc).__name__}: {exc}"
            self.state.locked = is_lock_error(exc)
            if self.state.locked:
                log.warning("job.database_locked", job=self.name, failures=self.state.consecutive_failures,
                            retry_in=self.next_delay())
            elif not self.state.reported:
                self.state.reported = True
                # A GatewayError is an expected failure with a clear message; anything else is a bug: keep its traceback.
                log.error("job.failed", job=self.name, error=self.state.last_error,
                          exc_info=None if isinstance(exc, GatewayError) else exc)
                await _maybe_await(self.on_failure(self.name, exc) if self.on_failure else None)
            else:
                log.debug("job.still_failing", job=self.name, failures=self.state.consecutive_failures)
            return False
        finally:
            self.state.running = False
        self.state.locked = False
        if self.state.consecutive_failures:
            failures, self.state.consecutive_failures = self.state.consecutive_failures, 0
            self.state.last_error = None
            if self.state.reported:  # a lock that passed was never reported as a failure
                self.state.reported = False
                log.info("job.recovered", job=self.name, after_failures=failures)
                await _maybe_await(self.on_recovery(self.name) if self.on_recovery else None)
        self.state.last_success_monotonic = time.monotonic()
        self.state.last_result = result
        return True

    def next_delay(self) -> float:
        """The interval, or the back-off while failing."""
        if not self.state.consecutive_failures:
            return self.interval
        if self.state.locked:
            return min(self.interval, self.lock_retry_seconds * (2 ** min(self.state.consecutive_failures - 1, 10)))
        return min(self.interval * (2 ** min(self.state.consecutive_failures, 20)), max(self.max_backoff, self.interval))

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Run now, then on the interval, until ``stop`` is set; a running job is let finish."""
        while not stop.is_set():
            await self.run_once()
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.next_delay())
            except TimeoutError:
                continue


async def _maybe_await(value: Any) -> None:
    if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
        try:
            await value
        except Exception as exc:  # a notifier failing must not break the coordinator
            log.warning("job.callback_failed", error=f"{type(exc).__name__}: {exc}")

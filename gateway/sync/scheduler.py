"""Runs the gateway's recurring work: pulls, deliveries, the billing calendar, the daily licensing job.

Every job is a :class:`~gateway.sync.coordinator.Coordinator`, so a failing
job is logged once, backs off, and never stops another (G5). Jobs marked
``leader_only`` (the billing calendar, the daily licensing job) run only in the
process that holds :class:`Leadership`: with PostgreSQL that is a session-level
advisory lock held on a dedicated connection, so when the holder dies its
connection drops, the lock is released, and another process takes over at its
next attempt. Work that any process may do (outbox deliveries) is shared
through row claims (``FOR UPDATE SKIP LOCKED``) in the jobs themselves; a job
that must run in one process at a time but on any of them (a connection's
pull) is wrapped in :func:`exclusive`, an advisory lock per job name.
"""

from __future__ import annotations

import asyncio
import threading
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import Connection, Engine, text

from gateway.sync.coordinator import Coordinator

log = structlog.get_logger(__name__)

#: The advisory lock key of the billing calendar (any constant unique to the gateway).
LEADER_LOCK_KEY = 0x6761_7465_7761_79  # "gateway"


class AdvisoryLock:
    """A PostgreSQL session-level advisory lock, held on a connection of its own.

    The connection runs in AUTOCOMMIT, so it never sits "idle in transaction"
    (where ``idle_in_transaction_session_timeout`` would end it and silently drop
    the lock). Calls come from worker threads, so a mutex keeps the one
    connection to one thread at a time. On any other database the lock is
    always ours: SQLite serves one process.
    """

    def __init__(self, engine: Engine, key: int):
        self.engine = engine
        self.key = key
        self._connection: Connection | None = None
        self._mutex = threading.Lock()

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def try_acquire(self) -> bool:
        """True if we hold the lock now (blocking: call it in a thread from async code). Re-entrant."""
        if not self.is_postgres:
            return True
        with self._mutex:
            if self._connection is not None:
                try:
                    self._connection.execute(text("SELECT 1"))
                    return True
                except Exception:  # our connection died, and the lock with it
                    self._drop()
            connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            try:
                got = connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": self.key}).scalar()
            except Exception:
                connection.close()
                raise
            if got:
                self._connection = connection
                return True
            connection.close()
            return False

    def release(self) -> None:
        with self._mutex:
            if self._connection is not None:
                try:
                    self._connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
                except Exception:
                    pass
                self._drop()

    def _drop(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except Exception:
                pass
        self._connection = None


class Leadership(AdvisoryLock):
    """Who owns the leader-only jobs (the billing calendar, the licensing job)."""

    def __init__(self, engine: Engine, key: int = LEADER_LOCK_KEY):
        super().__init__(engine, key)

    def try_acquire(self) -> bool:
        held = self._connection is not None
        got = super().try_acquire()
        if got and not held and self.is_postgres:
            log.info("scheduler.leader_acquired")
        return got

    def release(self) -> None:
        held = self._connection is not None
        super().release()
        if held:
            log.info("scheduler.leader_released")


def exclusive(engine: Engine, name: str, run: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
    """Run ``run`` only if no other process is running the job of that name (an advisory lock per job)."""
    lock = AdvisoryLock(engine, zlib.crc32(f"gateway-job:{name}".encode()))

    async def guarded() -> Any:
        if not await asyncio.to_thread(lock.try_acquire):
            return "running elsewhere"
        try:
            return await run()
        finally:
            await asyncio.to_thread(lock.release)

    return guarded


@dataclass
class ScheduledJob:
    """A recurring job: a name, an interval and an async function."""

    name: str
    interval: float
    run: Callable[[], Awaitable[Any]]
    leader_only: bool = False


class Scheduler:
    """Starts one coordinator per job and stops them all together."""

    def __init__(
        self,
        jobs: list[ScheduledJob],
        leadership: Leadership | None = None,
        *,
        max_backoff: float = 3600.0,
        notify: Callable[[str, dict[str, Any]], Awaitable[None]] | None = None,
        stop_event: asyncio.Event | None = None,
    ):
        self.leadership = leadership
        #: Set when stopping; jobs that loop (the outbox) watch it to stop claiming new work.
        self.stop_event = stop_event or asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.coordinators = [
            Coordinator(
                job.name,
                job.interval,
                self._leader_guard(job) if job.leader_only else job.run,
                max_backoff=max_backoff,
                on_failure=(lambda name, exc: notify("connection.degraded", {"job": name, "error": str(exc)})) if notify else None,
                on_recovery=(lambda name: notify("connection.recovered", {"job": name})) if notify else None,
            )
            for job in jobs
        ]

    def _leader_guard(self, job: ScheduledJob) -> Callable[[], Awaitable[Any]]:
        async def run() -> Any:
            if self.leadership is not None and not await asyncio.to_thread(self.leadership.try_acquire):
                return "not leader"
            return await job.run()

        return run

    def start(self) -> None:
        self.stop_event.clear()
        self._tasks = [asyncio.create_task(c.run_forever(self.stop_event), name=c.name) for c in self.coordinators]

    async def stop(self, timeout: float = 30.0) -> None:
        """No new runs start; runs in flight get ``timeout`` seconds, then are cancelled."""
        self.stop_event.set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self.leadership is not None:
            await asyncio.to_thread(self.leadership.release)

    def status(self) -> dict[str, dict[str, Any]]:
        return {
            c.name: {
                "runs": c.state.runs,
                "failures": c.state.failures,
                "failing": c.state.consecutive_failures > 0,
                "last_error": c.state.last_error,
            }
            for c in self.coordinators
        }

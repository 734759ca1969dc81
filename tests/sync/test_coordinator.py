"""Coordinator semantics: failures logged once, recovery once, back-off while failing, errors contained (G5)."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from gateway.sync.coordinator import Coordinator


async def test_g5_failure_logged_once_recovery_once_and_errors_contained():
    outcomes = iter([ValueError("down"), ValueError("down"), ValueError("down"), "ok", "ok"])
    notified = []

    async def job():
        value = next(outcomes)
        if isinstance(value, Exception):
            raise value
        return value

    coordinator = Coordinator(
        "pull:ninja", 10, job, on_failure=lambda name, exc: notified.append(("failed", name, str(exc))),
        on_recovery=lambda name: notified.append(("recovered", name)),
    )
    with capture_logs() as logs:
        results = [await coordinator.run_once() for _ in range(5)]
    assert results == [False, False, False, True, True]
    assert [e["event"] for e in logs if e["log_level"] in ("error", "info")] == ["job.failed", "job.recovered"]
    assert notified == [("failed", "pull:ninja", "down"), ("recovered", "pull:ninja")]
    assert coordinator.state.failures == 3 and coordinator.state.last_result == "ok"


async def test_backoff_grows_while_failing_and_is_capped():
    async def job():
        raise ConnectionError("refused")

    coordinator = Coordinator("c", 5, job, max_backoff=60)
    delays = []
    for _ in range(5):
        await coordinator.run_once()
        delays.append(coordinator.next_delay())
    assert delays == [10, 20, 40, 60, 60]


async def test_run_forever_stops_when_told_and_one_failing_job_does_not_stop_another():
    good_runs = 0

    async def good():
        nonlocal good_runs
        good_runs += 1

    async def bad():
        raise RuntimeError("plugin bug")

    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(Coordinator("good", 0.01, good).run_forever(stop)),
        asyncio.create_task(Coordinator("bad", 0.01, bad).run_forever(stop)),
    ]
    await asyncio.sleep(0.1)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=2)
    assert good_runs >= 3

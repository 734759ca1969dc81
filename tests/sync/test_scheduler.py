"""The scheduler: leader-only jobs run in one process; PostgreSQL leadership moves when the holder dies."""

from __future__ import annotations

import asyncio

import pytest

from gateway.sync.scheduler import Leadership, ScheduledJob, Scheduler


def test_sqlite_process_always_leads(sqlite_engine):
    assert Leadership(sqlite_engine).try_acquire()


def test_postgres_advisory_lock_has_one_holder_and_is_taken_over(postgres_engine):
    first, second = Leadership(postgres_engine, key=4242), Leadership(postgres_engine, key=4242)
    assert first.try_acquire() and first.try_acquire()  # re-entrant for the holder
    assert not second.try_acquire()
    first._connection.invalidate()  # the holder's connection dies, as when its process is killed
    first._connection = None
    assert second.try_acquire()
    second.release()


async def test_leader_only_job_is_skipped_by_a_follower(postgres_engine):
    holder = Leadership(postgres_engine, key=4343)
    assert holder.try_acquire()
    ran = []

    async def bill():
        ran.append("bill")

    scheduler = Scheduler([ScheduledJob("billing", 0.01, bill, leader_only=True)], Leadership(postgres_engine, key=4343))
    scheduler.start()
    await asyncio.sleep(0.1)
    await scheduler.stop()
    assert ran == []
    holder.release()


async def test_stop_lets_running_work_finish():
    finished = []

    async def slow():
        await asyncio.sleep(0.05)
        finished.append(True)

    scheduler = Scheduler([ScheduledJob("slow", 10, slow)])
    scheduler.start()
    await asyncio.sleep(0.01)
    await scheduler.stop(timeout=2)
    assert finished == [True]
    assert scheduler.status()["slow"]["runs"] == 1

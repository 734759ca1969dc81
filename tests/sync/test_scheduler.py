"""The scheduler: leader-only jobs run in one process; PostgreSQL leadership moves when the holder dies."""

from __future__ import annotations

import asyncio
import time

from gateway.sync.scheduler import Leadership, ScheduledJob, Scheduler


def test_sqlite_process_always_leads(sqlite_engine):
    assert Leadership(sqlite_engine).try_acquire()


def test_postgres_advisory_lock_has_one_holder_and_is_taken_over(postgres_engine):
    first, second = Leadership(postgres_engine, key=4242), Leadership(postgres_engine, key=4242)
    assert first.try_acquire() and first.try_acquire()  # re-entrant for the holder
    assert not second.try_acquire()
    first._connection.invalidate()  # the holder's connection dies, as when its process is killed
    first._connection = None
    # The server frees the lock when it has noticed the closed connection and ended that session,
    # which is not instant; a follower asks again on its next tick, as this does.
    deadline = time.monotonic() + 10
    while not second.try_acquire():
        assert time.monotonic() < deadline, "the dead holder's lock was never released"
        time.sleep(0.05)
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


def test_lock_connection_is_never_idle_in_transaction(postgres_engine):
    from sqlalchemy import text

    lock = Leadership(postgres_engine, key=4444)
    assert lock.try_acquire()
    with postgres_engine.connect() as probe:
        states = probe.execute(
            text("SELECT state FROM pg_stat_activity WHERE pid = :pid"),
            {"pid": lock._connection.connection.dbapi_connection.info.backend_pid},
        ).scalars().all()
    assert states == ["idle"]
    lock.release()


async def test_leader_keeps_leading_when_its_jobs_ask_at_once(postgres_engine):
    import asyncio

    lock = Leadership(postgres_engine, key=4545)
    results = await asyncio.gather(*(asyncio.to_thread(lock.try_acquire) for _ in range(8)))
    assert all(results)
    lock.release()


async def test_exclusive_job_runs_in_one_process_at_a_time(postgres_engine):
    import zlib

    from gateway.sync.scheduler import AdvisoryLock, exclusive

    other = AdvisoryLock(postgres_engine, zlib.crc32(b"gateway-job:pull:x"))
    assert other.try_acquire()  # another process is pulling this connection
    ran = []

    async def pull():
        ran.append(True)

    guarded = exclusive(postgres_engine, "pull:x", pull)
    assert await guarded() == "running elsewhere" and ran == []
    other.release()
    await guarded()
    assert ran == [True]

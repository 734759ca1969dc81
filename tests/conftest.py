"""Shared fixtures: a fresh canonical store on SQLite, and on PostgreSQL when one answers.

``db_engine`` is parametrised: every test that uses it runs on SQLite, and a
second time on PostgreSQL when ``GATEWAY_TEST_POSTGRES_URL`` is set. That URL
names a server; this run creates its own database there and drops it at the
end, so parallel runs never see each other's rows.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from gateway.core import db as gdb
from gateway.core.clock import FrozenClock
from gateway.core.models import Base

POSTGRES_URL = os.environ.get("GATEWAY_TEST_POSTGRES_URL")

BACKENDS = [
    "sqlite",
    pytest.param(
        "postgres",
        marks=[
            pytest.mark.postgres,
            pytest.mark.skipif(not POSTGRES_URL, reason="GATEWAY_TEST_POSTGRES_URL is not set"),
        ],
    ),
]


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated to head once per run; each test gets a copy."""
    path = tmp_path_factory.mktemp("template") / "template.db"
    engine = gdb.make_engine(f"sqlite:///{path}")
    gdb.upgrade(engine)
    with engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    engine.dispose()
    return path


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """A database of our own on the PostgreSQL server, migrated to head, dropped at the end."""
    if not POSTGRES_URL:
        pytest.skip("GATEWAY_TEST_POSTGRES_URL is not set")
    server = make_url(POSTGRES_URL).set(drivername="postgresql+psycopg")
    name = f"gw_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = server.set(database=name).render_as_string(hide_password=False)
    engine = gdb.make_engine(url)
    gdb.upgrade(engine)
    engine.dispose()
    try:
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _truncate_all(engine: Engine) -> None:
    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))


@pytest.fixture
def sqlite_engine(sqlite_template: Path, tmp_path: Path) -> Iterator[Engine]:
    path = tmp_path / "gateway.db"
    shutil.copy(sqlite_template, path)
    engine = gdb.make_engine(f"sqlite:///{path}")
    yield engine
    engine.dispose()


@pytest.fixture(params=BACKENDS)
def db_engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    """An engine on a migrated, empty database: SQLite, then PostgreSQL when available."""
    if request.param == "sqlite":
        yield request.getfixturevalue("sqlite_engine")
        return
    url = request.getfixturevalue("postgres_server_url")
    engine = gdb.make_engine(url)
    _truncate_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture(params=BACKENDS)
def blank_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine on an empty, unmigrated database of the test's own, for migration tests."""
    if request.param == "sqlite":
        engine = gdb.make_engine(f"sqlite:///{tmp_path / 'blank.db'}")
        yield engine
        engine.dispose()
        return
    server = make_url(POSTGRES_URL).set(drivername="postgresql+psycopg")
    name = f"gw_blank_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    engine = gdb.make_engine(server.set(database=name).render_as_string(hide_password=False))
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def postgres_engine(postgres_server_url: str) -> Iterator[Engine]:
    """PostgreSQL only, for tests of row locking and advisory locks."""
    engine = gdb.make_engine(postgres_server_url)
    _truncate_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def db(db_engine: Engine) -> sessionmaker[Session]:
    """A session factory over ``db_engine``."""
    return gdb.session_factory(db_engine)


@pytest.fixture
def session(db: sessionmaker[Session]) -> Iterator[Session]:
    with db() as session:
        yield session


@pytest.fixture
def clock() -> FrozenClock:
    """10 March 2026, 12:00 UTC, unless a test moves it."""
    return FrozenClock(datetime(2026, 3, 10, 12, 0, tzinfo=UTC))


@pytest.fixture
def ninja_simulator_url():
    """The NinjaOne simulator (3 organisations, 30 devices) on a loopback port, in a thread of its own,
    for tests that run the CLI or a subprocess with an event loop of their own."""
    import asyncio
    import threading

    from aiohttp import web

    from gateway.plugins.ninjaone import simulator

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict = {}

    async def start():
        runner = web.AppRunner(simulator.create_app(organizations=3, devices=30))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        holder["runner"] = runner
        holder["url"] = f"http://127.0.0.1:{runner.addresses[0][1]}"
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    ready.wait(10)
    yield holder["url"]
    asyncio.run_coroutine_threadsafe(holder["runner"].cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)

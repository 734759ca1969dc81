"""Engine, sessions and schema migrations.

SQLite is the default (one file, WAL so readers do not block the writer,
foreign keys on); PostgreSQL is chosen by URL. The schema is owned by the
Alembic migrations shipped in ``gateway/migrations``: ``gateway db upgrade``
applies them, and :func:`check_schema_current` refuses to run against a
database that is behind, with a message that says so.

Sessions are opened by the caller (a request, a sync run, a CLI command) and
passed in; code that reads or changes data never commits on its own.

SQLite has one writer at a time. A deferred transaction that reads and then writes
fails at once with "database is locked" when another connection committed since
its read began (the busy timeout cannot help: its snapshot is stale), which is how
the daemon's own jobs used to collide. So :func:`transaction` (the unit of work
that writes) starts with ``BEGIN IMMEDIATE`` on SQLite: it takes the write lock
first, waiting up to the busy timeout (:data:`SQLITE_BUSY_TIMEOUT_MS`) behind the
writer of the moment, and then cannot meet a lock. Plain sessions (reads) stay
deferred and never wait. :func:`is_lock_error` tells a lock that still ran out
(a writer held it longer than the timeout) from other failures, so a job retries
soon instead of a whole interval later.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

from gateway.errors import DatabaseError

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

# Money has its own type (models.Money) that keeps exact text on SQLite; this silences
# the warning for any plain Numeric a query expression may still produce there.
warnings.filterwarnings("ignore", message=r"Dialect sqlite\+pysqlite does \*not\* support Decimal", category=sa_exc.SAWarning)


def make_engine(url: str, *, echo: bool = False, pool_size: int = 5) -> Engine:
    """An engine for ``url``; a malformed URL or a missing driver is a DatabaseError naming it."""
    try:
        parsed = make_url(url)
    except sa_exc.ArgumentError:
        # The text is not echoed: a mistyped URL may still carry a password.
        raise DatabaseError(
            "database.url is not a database URL; use e.g. sqlite:///gateway.db or "
            "postgresql+psycopg://user:password@host/dbname"
        ) from None
    safe = parsed.render_as_string(hide_password=True)
    try:
        if parsed.get_backend_name() == "sqlite":
            engine = create_engine(parsed, echo=echo)
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            if parsed.drivername == "postgresql":
                parsed = parsed.set(drivername="postgresql+psycopg")
            engine = create_engine(parsed, echo=echo, pool_size=pool_size, pool_pre_ping=True)
    except (sa_exc.NoSuchModuleError, ModuleNotFoundError) as exc:
        raise DatabaseError(
            f"database.url {safe}: no driver for {parsed.drivername!r} ({exc}); for PostgreSQL install "
            "'msp-license-gateway[postgres]'"
        ) from None
    return engine


#: How long a SQLite writer waits for the write lock before "database is locked" (a billing run of many
#: customers holds it for seconds; the jobs of one process queue behind each other within this).
SQLITE_BUSY_TIMEOUT_MS = 30_000


def _sqlite_pragmas(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit (callers often return them)."""
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any exception.

    On SQLite it begins with ``BEGIN IMMEDIATE`` (see the module docstring): the write lock is
    taken before the first read, so a read-then-write never fails on another writer's commit.
    """
    with factory() as session, session.begin():
        connection = session.connection()
        if connection.dialect.name == "sqlite" and not getattr(connection.connection.driver_connection,
                                                                 "in_transaction", True):
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        yield session


_LOCK_TEXTS = ("database is locked", "database table is locked", "database is busy")
#: PostgreSQL: deadlock detected, lock not available (lock_timeout), serialization failure.
_LOCK_SQLSTATES = frozenset({"40P01", "55P03", "40001"})


def is_lock_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) is a database lock that ran out, worth retrying soon."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, sa_exc.DBAPIError) and current.orig is not None:
            current = current.orig
            continue
        if getattr(current, "sqlstate", None) in _LOCK_SQLSTATES:
            return True
        if type(current).__name__ == "OperationalError" and any(t in str(current).lower() for t in _LOCK_TEXTS):
            return True
        current = current.__cause__ or current.__context__
    return False


def describe_url(engine: Engine) -> str:
    """The engine's URL with any password hidden, for messages and logs."""
    return engine.url.render_as_string(hide_password=True)


def ping(engine: Engine) -> None:
    """Raise DatabaseError (never a traceback) when the database cannot be reached."""
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except sa_exc.OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise DatabaseError(f"cannot reach the database at {describe_url(engine)}: {reason}") from None


def alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["engine"] = engine
    return config


def head_revision() -> str | None:
    return ScriptDirectory.from_config(_script_only_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply the migrations up to ``revision`` (``gateway db upgrade``)."""
    ping(engine)
    command.upgrade(alembic_config(engine), revision)


def check_schema_current(engine: Engine) -> None:
    """Refuse to start on an out-of-date schema, saying what to run."""
    ping(engine)
    current, head = current_revision(engine), head_revision()
    if current != head:
        state = "has no gateway schema yet" if current is None else f"is at schema revision {current}, not {head}"
        raise DatabaseError(f"the database at {describe_url(engine)} {state}; run 'gateway db upgrade' first")


def _script_only_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config

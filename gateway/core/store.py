"""The fast-SQL kit the core and the sync modules share: bulk rows past the ORM, plain rows, insert-ignore.

Billing runs, device pulls and the webhook receiver each handle one row per
device; the ORM's per-row bookkeeping would cost them more than their own work
(``bench/billing_run.py``, ``bench/rmm_pull.py``, ``bench/webhooks.py``). So:

- :func:`bulk_insert` hands rows straight to the driver: ``COPY`` on
  PostgreSQL, one ``executemany`` on SQLite. Values still pass their column
  types' bind conversions, so rows are stored exactly as SQLAlchemy stores them.
- :func:`plain_rows` reads rows of plain values straight from the driver's
  cursor, skipping result-row processing.
- :func:`insert_ignore` is ``INSERT ... ON CONFLICT DO NOTHING`` on both
  databases: no read first, and no race between two writers.
- Up to :data:`IN_LIMIT` ids go into one ``IN (...)`` list; larger sets are
  read whole and filtered in Python.

SQLite and PostgreSQL are the gateway's databases; another is refused with a
:class:`~gateway.errors.ConfigError`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

from sqlalchemy import Executable, Insert, Select, Table, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import FromClause

from gateway.errors import ConfigError

#: Up to this many ids go into one IN (...) list; larger sets are filtered in Python.
IN_LIMIT = 500


def plain_rows(session: Session, stmt: Executable) -> list[tuple[Any, ...]]:
    """Rows of plain integers and strings straight from the driver's cursor: the bulk reads of a
    run return one row per device, and skipping result-row processing halves their cost."""
    result = session.connection().execute(stmt)
    try:
        return cast("list[tuple[Any, ...]]", result.cursor.fetchall())
    finally:
        result.close()


def bulk_insert(session: Session, table: FromClause, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Rows straight to the driver: COPY on PostgreSQL, one executemany on SQLite.

    A run writes one row per billed device (M7) besides its lines and deliveries;
    going through the ORM's per-row parameter handling would cost more than the
    billing itself. On SQLite each value goes through its column's own bind
    conversion, once per distinct value.
    """
    if not rows:
        return
    name = cast(Table, table).name
    connection = session.connection()
    dialect = connection.dialect
    driver = connection.connection.driver_connection
    assert driver is not None  # a live connection has its driver's connection
    cursor = driver.cursor()
    try:
        if dialect.name == "postgresql":
            with cursor.copy(f"COPY {name} ({', '.join(columns)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            return
        processors = [table.c[column].type.dialect_impl(dialect).bind_processor(dialect) for column in columns]
        active: list[tuple[int, Callable[[Any], Any], dict[Any, Any]]] = [
            (i, process, {}) for i, process in enumerate(processors) if process is not None
        ]
        if active:
            converted = []
            for row in rows:
                values = list(row)
                for i, process, memo in active:  # repeated values (now, a status, a price) convert once
                    value = values[i]
                    if value in memo:
                        values[i] = memo[value]
                    else:
                        values[i] = memo[value] = process(value)
                converted.append(values)
            rows = converted
        marks = ", ".join("?" for _ in columns)
        cursor.executemany(f"INSERT INTO {name} ({', '.join(columns)}) VALUES ({marks})", rows)
    finally:
        cursor.close()


def insert_ignore(table: FromClause, dialect_name: str) -> Insert:
    """INSERT ... ON CONFLICT DO NOTHING on SQLite and PostgreSQL."""
    target = cast(Table, table)  # a mapped class's __table__ is typed as any FromClause
    if dialect_name == "postgresql":
        return postgresql.insert(target).on_conflict_do_nothing()
    if dialect_name == "sqlite":
        return sqlite.insert(target).on_conflict_do_nothing()
    raise ConfigError(f"the gateway supports SQLite and PostgreSQL, not {dialect_name!r}")


def paged(session: Session, stmt: Select[Any], *, limit: int, offset: int) -> tuple[list[Any], int]:
    """One page of ``stmt``'s objects and the total count (for the API's lists)."""
    total = session.scalar(select(func.count()).select_from(stmt.order_by(None).subquery())) or 0
    return list(session.scalars(stmt.limit(limit).offset(offset))), total

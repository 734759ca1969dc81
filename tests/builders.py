"""Builders of test worlds, one version of each for the whole suite (imported as ``builders``, like ``psa_world``).

- ``bill``: a bill as the billing core hands it to a PSA adapter, for the adapter and protocol tests.
  A module fixes its own defaults once with ``functools.partial(builders.bill, ...)``; the
  keywords of a call still win over the partial's.
- ``make_gateway``: a :class:`~gateway.app.Gateway` over a test database with the built-in plugins
  (never entry points, so an installed contrib plugin cannot change a test) and the test's own.
- ``client_for``: an aiohttp test client on an app with the route groups a test names
  (``add_health_routes``, or a test's own wrapper of a group that takes more than the gateway).
- ``write_config``: a gateway TOML file, for tests that run the ``gateway`` command or a subprocess;
  ``free_port``: a loopback port for the server or SMTP server such a test starts.

Fixtures stay in conftest.py; these are plain functions because each test calls them with a world
of its own (its settings, its plugins, its bill).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping, Sequence
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from aiohttp import web
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from gateway.adapters import BillDocument, BillLineDoc
from gateway.app import Gateway
from gateway.core import db as gdb
from gateway.core.clock import Clock
from gateway.core.settings import Settings
from gateway.plugins import get_plugin_manager

FEB = (date(2026, 2, 1), date(2026, 2, 28))


# --- bills for PSA adapters ----------------------------------------------------------------------


def bill(company: int | str = "12", period: tuple[date, date] = FEB, devices: int = 3, *,
         connection: str = "test", unit_price: str = "2.50", fee: str | None = "10.00", **fields: Any) -> BillDocument:
    """A bill for one cycle: ``devices`` at ``unit_price``, then an activation fee line (none when ``fee`` is None).

    The key and number follow the connection, the company and the month; issued the day after the
    cycle, due 30 days later. ``fields`` replace any :class:`BillDocument` field as given.
    """
    start, end = period
    price = Decimal(unit_price)
    lines = [BillLineDoc("Managed devices", Decimal(devices), price, price * devices)]
    if fee is not None:
        lines.append(BillLineDoc("Activation fee", Decimal(1), Decimal(fee), Decimal(fee)))
    issued = end + timedelta(days=1)
    values: dict[str, Any] = dict(
        key=f"{connection}:{company}:{start:%Y-%m}",
        number=f"INV-{company}-{start:%m}",
        company_external_id=str(company),
        customer_name="Acme Dental",
        currency="USD",
        period_start=start,
        period_end=end,
        issued_on=issued,
        due_on=issued + timedelta(days=30),
        device_count=devices,
        total=sum((line.amount for line in lines), Decimal(0)),
        lines=tuple(lines),
    )
    values.update(fields)
    return BillDocument(**values)


# --- a gateway and an HTTP client on it ----------------------------------------------------------


def make_gateway(engine: Engine, clock: Clock, *plugins: Any, settings: Settings | None = None,
                 db: sessionmaker[Session] | None = None, **settings_fields: Any) -> Gateway:
    """A gateway over ``engine``: ``settings`` (or ``Settings(**settings_fields)``), built-ins plus ``plugins``."""
    return Gateway(
        settings=settings if settings is not None else Settings(**settings_fields),
        engine=engine,
        db=db if db is not None else gdb.session_factory(engine),
        plugins=get_plugin_manager(extra_plugins=plugins, load_entry_points=False),
        clock=clock,
    )


async def client_for(aiohttp_client: Callable[..., Any], gateway: Gateway,
                     *route_groups: Callable[[web.Application, Gateway], None]) -> Any:
    """A test client on an app with the given route groups, each called as ``group(app, gateway)``."""
    app = web.Application()
    for add_routes in route_groups:
        add_routes(app, gateway)
    return await aiohttp_client(app)


# --- configuration files -------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"cannot write {value!r} as TOML")


def write_config(path: Path, *, database_url: str, sections: Mapping[str, Mapping[str, Any]] | None = None,
                 connections: Sequence[Mapping[str, Any]] = ()) -> Path:
    """A gateway TOML file: plain sections (``outbox``, ``server``…) and ``[[connections]]`` with sub-tables."""
    lines = ["[database]", f"url = {_toml_value(database_url)}"]
    for name, values in (sections or {}).items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    for connection in connections:
        lines.append("[[connections]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in connection.items() if not isinstance(v, Mapping)]
        for k, v in connection.items():
            if isinstance(v, Mapping) and v:
                lines.append(f"[connections.{k}]")
                lines += [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

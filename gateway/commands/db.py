"""``gateway db upgrade|current``: apply and inspect the schema migrations."""

from __future__ import annotations

import argparse

from gateway.commands.common import settings_from_args
from gateway.core import db as gdb


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("db", help="database schema: upgrade, current")
    actions = parser.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    upgrade = actions.add_parser("upgrade", help="apply the schema migrations up to the newest")
    upgrade.set_defaults(handler=_upgrade)
    current = actions.add_parser("current", help="show the schema revision of the database")
    current.set_defaults(handler=_current)


def _upgrade(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    engine = gdb.make_engine(settings.database.url)
    try:
        gdb.ping(engine)
        before = gdb.current_revision(engine)
        gdb.upgrade(engine)
        after = gdb.current_revision(engine)
    finally:
        engine.dispose()
    where = gdb.describe_url(engine)
    if before == after:
        print(f"{where}: schema already at revision {after}")
    else:
        print(f"{where}: schema upgraded from {before or 'empty'} to {after}")
    return 0


def _current(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    engine = gdb.make_engine(settings.database.url)
    try:
        gdb.ping(engine)
        current, head = gdb.current_revision(engine), gdb.head_revision()
    finally:
        engine.dispose()
    state = "current" if current == head else f"behind (newest is {head}); run 'gateway db upgrade'"
    print(f"{gdb.describe_url(engine)}: revision {current or 'none'}, {state}")
    return 0

"""``gateway config check``: load and validate the configuration without starting anything."""

from __future__ import annotations

import argparse

from gateway.app import validate_connections
from gateway.commands.common import settings_from_args
from gateway.plugins import get_plugin_manager


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("config", help="check the configuration")
    actions = parser.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="validate the config file and environment; print a summary")
    check.set_defaults(handler=_check)


def _check(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    validate_connections(settings, get_plugin_manager())
    print(f"configuration OK ({settings.source or 'defaults and environment'}): "
          f"{len(settings.connections)} connection(s), database {settings.database.url.split('://')[0]}")
    for connection in settings.connections:
        print(f"  {connection.name}: {connection.plugin} at {connection.base_url}")
    return 0

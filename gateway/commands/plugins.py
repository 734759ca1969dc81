"""``gateway plugins``: which plugins are loaded, their versions and adapter kinds."""

from __future__ import annotations

import argparse

from gateway.commands.common import add_json_flag, print_json, print_table
from gateway.plugins import get_plugin_manager


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("plugins", help="list plugins, their versions and adapter kinds")
    add_json_flag(parser)
    parser.add_argument("--hook-reference", action="store_true", help="print the hook reference (Markdown) and exit")
    parser.set_defaults(handler=_list)


def _list(args: argparse.Namespace) -> int:
    if args.hook_reference:
        from gateway.hook_reference import render

        print(render(), end="")
        return 0
    rows = get_plugin_manager().describe()
    if args.json:
        print_json(rows)
    else:
        print_table(rows, ["name", "version", "adapters", "error"])
    return 1 if any(row.get("error") for row in rows) else 0

"""``gateway devices list``: devices by workspace, with the reason a refused one was refused (M3)."""

from __future__ import annotations

import argparse

from gateway.commands.common import add_json_flag, gateway_from_args, partner_id_from_args, print_json, print_table
from gateway.core.access import system_principal
from gateway.core.devices import list_devices


def register(subparsers: argparse._SubParsersAction) -> None:
    devices = subparsers.add_parser("devices", help="devices from the RMM connections, and refused ones (M3)")
    actions = devices.add_subparsers(dest="devices_command", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="list devices with their workspace; a refused one with its reason")
    listing.add_argument("--workspace", type=int, metavar="ID", help="only this workspace's devices and refusals")
    listing.add_argument("--refused", action="store_true", help="only devices a workspace refused (M3)")
    listing.add_argument("--partner", type=int, metavar="ID", help="the partner to act for (default: the only one)")
    add_json_flag(listing)
    listing.set_defaults(handler=_list)


def _list(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    with gateway.db() as session:
        principal = system_principal(partner_id_from_args(session, args), "cli")
        rows, total = list_devices(session, principal, workspace_id=args.workspace, refused=args.refused)
    if args.json:
        print_json(rows)
        return 0
    columns = ["id", "connection", "external_id", "hostname", "workspace_id", "workspace", "last_contact"]
    if args.refused or any(row["refused"] for row in rows):
        columns += ["refused_at", "refused_reason"]
    print_table(rows, columns, title=f"{total} device(s)" + (" refused" if args.refused else ""))
    return 0

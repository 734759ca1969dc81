"""``gateway workspaces show|update``, beside ``add|list`` (:mod:`gateway.commands.directory`)."""

from __future__ import annotations

import argparse
from typing import Any

from gateway.commands.common import add_json_flag, gateway_from_args, print_record
from gateway.core import directory
from gateway.core.db import transaction
from gateway.core.models import Workspace
from gateway.errors import NotFound

COLUMNS = ["id", "customer_id", "name", "max_devices", "edition_id", "monthly_billing_since", "monthly_billing_until"]


def register_actions(actions: argparse._SubParsersAction) -> None:
    show = actions.add_parser("show", help="one workspace")
    show.add_argument("workspace_id", type=int, metavar="ID")
    add_json_flag(show)
    show.set_defaults(handler=_show)
    update = actions.add_parser("update", help="rename a workspace or change its maximum of devices (M3)")
    update.add_argument("workspace_id", type=int, metavar="ID")
    update.add_argument("--name")
    limit = update.add_mutually_exclusive_group()
    limit.add_argument("--max-devices", type=int, help="refuse new devices beyond this many (M3)")
    limit.add_argument("--no-limit", action="store_true", help="remove the maximum")
    add_json_flag(update)
    update.set_defaults(handler=_update)


def _get(session: Any, workspace_id: int) -> Workspace:
    workspace = session.get(Workspace, workspace_id)
    if workspace is None:
        raise NotFound(f"no workspace with id {workspace_id}; list them with 'gateway workspaces list'",
                       field="workspace")
    return workspace


def _show(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    with gateway.db() as session:
        row = directory.workspace_dict(_get(session, args.workspace_id))
    return print_record(args, row, COLUMNS, f"workspace {row['id']}")


def _update(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    with transaction(gateway.db) as session:
        workspace = directory.update_workspace(session, _get(session, args.workspace_id), name=args.name,
                                               max_devices=args.max_devices, no_limit=args.no_limit)
        row = directory.workspace_dict(workspace)
    return print_record(args, row, COLUMNS, f"workspace {row['id']} updated")

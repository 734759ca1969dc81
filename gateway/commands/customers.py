"""``gateway customers show|update|archive``, beside ``add|list`` (:mod:`gateway.commands.directory`)."""

from __future__ import annotations

import argparse
from typing import Any

from gateway.commands.common import add_json_flag, gateway_from_args, print_record
from gateway.core import directory
from gateway.core.db import transaction
from gateway.core.models import Customer
from gateway.errors import NotFound

COLUMNS = ["id", "partner_id", "name", "timezone", "pending_timezone", "timezone_from", "billing_email", "archived_at"]


def register_actions(actions: argparse._SubParsersAction) -> None:
    show = actions.add_parser("show", help="one customer")
    show.add_argument("customer_id", type=int, metavar="ID")
    add_json_flag(show)
    show.set_defaults(handler=_show)
    update = actions.add_parser("update", help="change a customer (a new time zone applies from the next cycle)")
    update.add_argument("customer_id", type=int, metavar="ID")
    update.add_argument("--name")
    update.add_argument("--timezone", help="IANA time zone; applies from the customer's next cycle (S4)")
    update.add_argument("--email", help="billing e-mail ('' to remove)")
    add_json_flag(update)
    update.set_defaults(handler=_update)
    archive = actions.add_parser("archive", help="archive a customer (its bills, licenses and history stay)")
    archive.add_argument("customer_id", type=int, metavar="ID")
    add_json_flag(archive)
    archive.set_defaults(handler=_archive)


def get_customer(session: Any, customer_id: int) -> Customer:
    customer = session.get(Customer, customer_id)
    if customer is None:
        raise NotFound(f"no customer with id {customer_id}; list them with 'gateway customers list'", field="customer")
    return customer


def _show(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    with gateway.db() as session:
        row = directory.customer_dict(get_customer(session, args.customer_id))
    return print_record(args, row, COLUMNS, f"customer {row['id']}")


def _update(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    with transaction(gateway.db) as session:
        customer = directory.update_customer(session, get_customer(session, args.customer_id),
                                             now=gateway.clock.now(), name=args.name, timezone=args.timezone,
                                             billing_email=args.email)
        row = directory.customer_dict(customer)
    return print_record(args, row, COLUMNS, f"customer {row['id']} updated")


def _archive(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    with transaction(gateway.db) as session:
        customer = directory.archive_customer(session, get_customer(session, args.customer_id),
                                              now=gateway.clock.now())
        row = directory.customer_dict(customer)
    return print_record(args, row, COLUMNS, f"customer {row['id']} archived; its bills, licenses and history are kept")

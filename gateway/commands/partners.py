"""``gateway partners show|update``, beside ``add|list`` (:mod:`gateway.commands.directory`)."""

from __future__ import annotations

import argparse
from typing import Any

from gateway.commands.common import add_json_flag, gateway_from_args, print_record
from gateway.core import directory
from gateway.core.db import transaction
from gateway.core.models import Partner
from gateway.errors import NotFound

COLUMNS = ["id", "name", "email", "currency", "discount_percent", "invoice_prefix"]


def register_actions(actions: argparse._SubParsersAction) -> None:
    show = actions.add_parser("show", help="one partner")
    show.add_argument("partner_id", type=int, metavar="ID")
    add_json_flag(show)
    show.set_defaults(handler=_show)
    update = actions.add_parser("update", help="change a partner (a new discount prices orders from now on, L6)")
    update.add_argument("partner_id", type=int, metavar="ID")
    update.add_argument("--name")
    update.add_argument("--email")
    update.add_argument("--discount", metavar="PERCENT", help="the partner's own discount; bulk tiers apply on top (L6)")
    update.add_argument("--invoice-prefix", help="bill number prefix: 1-16 of A-Z, 0-9 and -")
    update.add_argument("--currency", help="currency of bills from now on")
    add_json_flag(update)
    update.set_defaults(handler=_update)


def _get(session: Any, partner_id: int) -> Partner:
    partner = session.get(Partner, partner_id)
    if partner is None:
        raise NotFound(f"no partner with id {partner_id}; list them with 'gateway partners list'", field="partner")
    return partner


def _show(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    with gateway.db() as session:
        row = directory.partner_dict(_get(session, args.partner_id))
    return print_record(args, row, COLUMNS, f"partner {row['id']}")


def _update(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    with transaction(gateway.db) as session:
        partner = directory.update_partner(session, _get(session, args.partner_id), name=args.name, email=args.email,
                                           discount=args.discount, invoice_prefix=args.invoice_prefix,
                                           currency=args.currency)
        row = directory.partner_dict(partner)
    return print_record(args, row, COLUMNS, f"partner {row['id']} updated")

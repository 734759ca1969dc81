"""``gateway editions add|list|show|update|archive``: the products licenses are sold of, with their price.

The catalogue is shared by every partner of the install. A stored price wins over ``[licensing] prices``
of the configuration (:mod:`gateway.core.editions` says why); a file price it overrides is a warning here.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from gateway.commands.common import add_json_flag, gateway_from_args, print_json, print_table
from gateway.core import editions
from gateway.core.db import transaction
from gateway.core.models import LicenseType

COLUMNS = ["id", "code", "name", "license_type", "price_per_seat_year", "currency", "price_source", "active"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("editions", help="editions (products) and their prices: add, list, show, update, archive")
    actions = parser.add_subparsers(dest="editions_command", metavar="ACTION", required=True)
    types = [t.value for t in LicenseType]

    add = actions.add_parser("add", help="add an edition")
    add.add_argument("--code", required=True, help="short code used in commands and orders, e.g. enterprise-security")
    add.add_argument("--name", required=True, help="the name shown on orders, e.g. \"Enterprise Security\"")
    add.add_argument("--license-type", default=LicenseType.COMPUTER.value, choices=types,
                     help="what one seat counts (L17; default computer)")
    add.add_argument("--price", help="price of one seat for one year (default: [licensing] prices.CODE, if set)")
    add.add_argument("--currency", help="currency of the price (default: [licensing] currency)")
    add_json_flag(add)
    add.set_defaults(handler=_add)

    listing = actions.add_parser("list", help="list editions")
    listing.add_argument("--active", action="store_true", help="only editions that are sold (not archived)")
    add_json_flag(listing)
    listing.set_defaults(handler=_list)

    show = actions.add_parser("show", help="one edition")
    show.add_argument("edition", metavar="CODE", help="its code (or id)")
    add_json_flag(show)
    show.set_defaults(handler=_show)

    update = actions.add_parser("update", help="change an edition (a new price prices orders from now on)")
    update.add_argument("edition", metavar="CODE", help="its code (or id)")
    update.add_argument("--name")
    update.add_argument("--license-type", choices=types)
    update.add_argument("--price", help="price of one seat for one year")
    update.add_argument("--currency")
    update.add_argument("--active", action="store_true", default=None, help="sell it again (undo archive)")
    add_json_flag(update)
    update.set_defaults(handler=_update)

    archive = actions.add_parser("archive", help="stop selling an edition (its licenses keep working and renew)")
    archive.add_argument("edition", metavar="CODE", help="its code (or id)")
    add_json_flag(archive)
    archive.set_defaults(handler=_archive)


def _out(args: argparse.Namespace, row: dict[str, Any], message: str, warnings: list[str]) -> int:
    for warning in warnings:
        print(f"gateway: warning: {warning}", file=sys.stderr)
    if args.json:
        print_json(row)
    else:
        print(message)
        print_table([row], COLUMNS)
    return 0


def _add(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    config = gateway.settings.licensing
    with transaction(gateway.db) as session:
        edition = editions.create_edition(session, config, code=args.code, name=args.name,
                                          license_type=args.license_type, price=args.price, currency=args.currency)
        row = editions.edition_dict(edition, config)
        warnings = editions.shadowed_config_prices(session, config)
    if row["price_per_seat_year"] is None:
        warnings.append(f"edition {row['code']!r} has no price and cannot be bought until it has one: "
                        f"'gateway editions update {row['code']} --price AMOUNT'")
    return _out(args, row, f"edition {row['id']} added: {row['code']} ({row['name']})", warnings)


def _list(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    config = gateway.settings.licensing
    with gateway.db() as session:
        rows = [editions.edition_dict(e, config) for e in editions.list_editions(session, include_archived=not args.active)]
        warnings = editions.shadowed_config_prices(session, config)
    for warning in warnings:
        print(f"gateway: warning: {warning}", file=sys.stderr)
    print_json(rows) if args.json else print_table(rows, COLUMNS)
    return 0


def _show(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    config = gateway.settings.licensing
    with gateway.db() as session:
        edition = editions.get_edition(session, args.edition)
        row = editions.edition_dict(edition, config)
        warnings = [w for w in editions.shadowed_config_prices(session, config) if f"prices.{edition.code} " in w]
    return _out(args, row, f"edition {row['id']}", warnings)


def _update(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    config = gateway.settings.licensing
    with transaction(gateway.db) as session:
        edition = editions.update_edition(session, editions.get_edition(session, args.edition), name=args.name,
                                          license_type=args.license_type, price=args.price, currency=args.currency,
                                          active=args.active)
        row = editions.edition_dict(edition, config)
        warnings = [w for w in editions.shadowed_config_prices(session, config) if f"prices.{edition.code} " in w]
    return _out(args, row, f"edition {row['id']} updated: {row['code']}", warnings)


def _archive(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    config = gateway.settings.licensing
    with transaction(gateway.db) as session:
        edition = editions.update_edition(session, editions.get_edition(session, args.edition), active=False)
        row = editions.edition_dict(edition, config)
    return _out(args, row, f"edition {row['code']} archived: no longer sold; its licenses keep working and renew", [])

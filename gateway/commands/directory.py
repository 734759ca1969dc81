"""``gateway partners|customers|workspaces|mappings|sync``: the records devices and bills hang on, and pulls."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from sqlalchemy import select

from gateway.commands import customers as customer_commands
from gateway.commands import partners as partner_commands
from gateway.commands import workspaces as workspace_commands
from gateway.commands.common import add_json_flag, gateway_from_args, infer_partner_id, print_json, print_table
from gateway.core import directory
from gateway.core.db import transaction
from gateway.core.models import Customer, ExternalMapping, Partner, Workspace
from gateway.errors import DomainError
from gateway.hookspecs import hookimpl


def register(subparsers: argparse._SubParsersAction) -> None:
    partners = subparsers.add_parser("partners", help="partners (MSPs): add, list")
    actions = partners.add_subparsers(dest="partners_command", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="add a partner")
    add.add_argument("name")
    add.add_argument("--email")
    add.add_argument("--currency", default="USD")
    add.add_argument("--invoice-prefix", default=None, help="bill number prefix (default: [billing] invoice_prefix)")
    add.add_argument("--discount", metavar="PERCENT", help="the partner's own discount; bulk tiers apply on top (L6)")
    add.set_defaults(handler=_partner_add)
    listing = actions.add_parser("list", help="list partners")
    add_json_flag(listing)
    listing.set_defaults(handler=_partner_list)
    partner_commands.register_actions(actions)

    customers = subparsers.add_parser("customers", help="customers: add, list")
    actions = customers.add_subparsers(dest="customers_command", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="add a customer")
    add.add_argument("name")
    add.add_argument("--timezone", required=True, help="IANA time zone, e.g. Europe/Berlin (S4)")
    add.add_argument("--email", help="billing e-mail")
    add.add_argument("--partner", type=int, metavar="ID")
    add.set_defaults(handler=_customer_add)
    listing = actions.add_parser("list", help="list customers")
    listing.add_argument("--include-archived", action="store_true", help="also archived customers")
    add_json_flag(listing)
    listing.set_defaults(handler=_customer_list)
    customer_commands.register_actions(actions)

    workspaces = subparsers.add_parser("workspaces", help="workspaces: add, list")
    actions = workspaces.add_subparsers(dest="workspaces_command", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="add a workspace to a customer")
    add.add_argument("name")
    add.add_argument("--customer", type=int, metavar="ID", required=True)
    add.add_argument("--max-devices", type=int, help="refuse new devices beyond this many (M3)")
    add.set_defaults(handler=_workspace_add)
    listing = actions.add_parser("list", help="list workspaces")
    add_json_flag(listing)
    listing.set_defaults(handler=_workspace_list)
    workspace_commands.register_actions(actions)

    mappings = subparsers.add_parser("mappings", help="RMM organisations -> workspaces, PSA companies -> customers (G1)")
    mappings.add_argument("--unmapped", action="store_true", help="only RMM organisations mapped to no workspace")
    mappings.add_argument("--connection", help="only this connection")
    add_json_flag(mappings)
    mappings.set_defaults(handler=_mappings_list)
    actions = mappings.add_subparsers(dest="mappings_command", metavar="ACTION")
    rmm = actions.add_parser("rmm", help="map an RMM organisation/site to a workspace")
    rmm.add_argument("connection")
    rmm.add_argument("external_id")
    target = rmm.add_mutually_exclusive_group(required=True)
    target.add_argument("--workspace", type=int, metavar="ID", help="the workspace its devices belong to")
    target.add_argument("--unmap", action="store_true", help="map it to nothing: its devices stop being billed")
    rmm.set_defaults(handler=_map_rmm)
    psa = actions.add_parser("psa", help="map a PSA company to a customer")
    psa.add_argument("connection")
    psa.add_argument("external_id")
    target = psa.add_mutually_exclusive_group(required=True)
    target.add_argument("--customer", type=int, metavar="ID", help="the customer whose bills go to this company")
    target.add_argument("--unmap", action="store_true", help="map it to nothing: bills stop going there")
    psa.add_argument("--name", default="", help="the company's name, for listings (default: the name the PSA lists)")
    psa.set_defaults(handler=_map_psa)

    sync = subparsers.add_parser("sync", help="pull devices and activity from RMM connections")
    sync.add_argument("--once", action="store_true", required=True, help="one pull now, then exit")
    sync.add_argument("--connection", action="append", metavar="NAME", help="only this connection (repeatable)")
    add_json_flag(sync)
    sync.set_defaults(handler=_sync)


def _partner_add(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    with transaction(gateway.db) as session:
        partner = directory.create_partner(
            session, name=args.name, email=args.email, currency=args.currency, now=gateway.clock.now(),
            invoice_prefix=args.invoice_prefix or gateway.settings.billing.invoice_prefix,
        )
        if args.discount is not None:
            directory.update_partner(session, partner, discount=args.discount)
        print(f"partner {partner.id} added: {partner.name}")
    return 0


def _partner_list(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    with gateway.db() as session:
        rows = [directory.partner_dict(p) for p in session.scalars(select(Partner).order_by(Partner.id))]
    print_json(rows) if args.json else print_table(rows, ["id", "name", "currency", "discount_percent", "invoice_prefix"])
    return 0


def _customer_add(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    with transaction(gateway.db) as session:
        partner = session.get_one(Partner, infer_partner_id(session, args.partner))
        customer = directory.create_customer(session, partner, name=args.name, timezone=args.timezone,
                                             billing_email=args.email, now=gateway.clock.now())
        print(f"customer {customer.id} added: {customer.name} ({customer.timezone})")
    return 0


def _customer_list(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    with gateway.db() as session:
        rows = [{"id": c.id, "partner": c.partner_id, "name": c.name, "timezone": c.timezone,
                 "billing_email": c.billing_email, "archived_at": c.archived_at}
                for c in session.scalars(select(Customer).order_by(Customer.id))
                if args.include_archived or c.archived_at is None]
    print_json(rows) if args.json else print_table(rows, ["id", "partner", "name", "timezone", "billing_email"])
    return 0


def _workspace_add(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    with transaction(gateway.db) as session:
        customer = session.get(Customer, args.customer)
        if customer is None:
            raise DomainError(f"no customer with id {args.customer}; list them with 'gateway customers list'",
                              field="customer")
        workspace = directory.create_workspace(session, customer, name=args.name, max_devices=args.max_devices,
                                               now=gateway.clock.now())
        print(f"workspace {workspace.id} added to {customer.name}: {workspace.name}")
    return 0


def _workspace_list(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    with gateway.db() as session:
        rows = [{"id": w.id, "customer": w.customer_id, "name": w.name, "max_devices": w.max_devices,
                 "monthly_billing_since": w.monthly_billing_since}
                for w in session.scalars(select(Workspace).order_by(Workspace.id))]
    print_json(rows) if args.json else print_table(rows, ["id", "customer", "name", "max_devices", "monthly_billing_since"])
    return 0


def _mappings_list(args: argparse.Namespace) -> int:
    from gateway.sync.devices import unmapped_organizations

    gateway = gateway_from_args(args)
    with gateway.db() as session:
        if args.unmapped:
            rows = unmapped_organizations(session, args.connection)
            columns = ["connection", "external_id", "name", "devices", "last_seen_at"]
        else:
            query = select(ExternalMapping).order_by(ExternalMapping.connection, ExternalMapping.kind, ExternalMapping.external_id)
            if args.connection:
                query = query.where(ExternalMapping.connection == args.connection)
            rows = [
                {"connection": m.connection, "kind": m.kind, "external_id": m.external_id, "name": m.external_name,
                 "workspace": m.workspace_id, "customer": m.customer_id, "auto_created": m.auto_created}
                for m in session.scalars(query)
            ]
            columns = ["connection", "kind", "external_id", "name", "workspace", "customer", "auto_created"]
    print_json(rows) if args.json else print_table(rows, columns)
    return 0


def _map_rmm(args: argparse.Namespace) -> int:
    from gateway.sync.devices import map_organization

    gateway = gateway_from_args(args)
    with transaction(gateway.db) as session:
        map_organization(session, args.connection, args.external_id, args.workspace)
    target = f"workspace {args.workspace}" if args.workspace else "nothing (unmapped)"
    print(f"{args.connection} organisation {args.external_id} -> {target}")
    return 0


def _map_psa(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    gateway.settings.connection(args.connection)  # a typo in the name is an error, not a dead mapping
    if args.customer and not args.name:
        args.name = asyncio.run(_psa_company_name(gateway, args.connection, args.external_id))
    with transaction(gateway.db) as session:
        directory.map_psa_company(session, connection=args.connection, external_id=args.external_id,
                                  customer_id=args.customer, name=args.name, now=gateway.clock.now())
    target = f"customer {args.customer}" if args.customer else "nothing (unmapped)"
    print(f"{args.connection} company {args.external_id} -> {target}")
    return 0


async def _psa_company_name(gateway: Any, connection: str, external_id: str) -> str:
    """The company's name as the PSA lists it; a PSA that cannot be asked leaves it blank, with a warning."""
    from gateway.errors import AdapterError

    adapter = gateway.build_psa(connection)
    try:
        companies = await adapter.list_companies()
    except AdapterError as exc:
        print(f"gateway: warning: could not ask {connection} for the name of company {external_id} ({exc}); "
              "mapped without a name (give it with --name)", file=sys.stderr)
        return ""
    finally:
        await adapter.aclose()
    for company in companies:
        if str(company.external_id) == str(external_id):
            return company.name
    known = ", ".join(f"{c.external_id} ({c.name})" for c in companies[:5]) + (", ..." if len(companies) > 5 else "")
    raise DomainError(f"{connection} has no company with id {external_id!r}; its companies: {known or 'none'}",
                      field="external_id")


class PullProgress:
    """Prints devices seen per connection as pages arrive (a plugin on the gateway_devices_seen hook)."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.seen: dict[str, int] = {}

    @hookimpl
    def gateway_devices_seen(self, connection: str, devices: Any) -> None:
        self.seen[connection] = self.seen.get(connection, 0) + len(devices)
        line = "  ".join(f"{name}: {count:,} devices" for name, count in sorted(self.seen.items()))
        if self.stream.isatty():
            self.stream.write(f"\r{line}")
        else:
            self.stream.write(f"{line}\n")
        self.stream.flush()


def _print_refusals(rows: list[dict[str, Any]]) -> None:
    """M3: each refused device, the workspace that refused it and its maximum, and what to do."""
    refusals = [(row["connection"], refusal) for row in rows for refusal in row.get("refusals", [])]
    refused = sum(row.get("devices_refused", 0) for row in rows)
    if not refused:
        return
    print(f"\n{refused} device(s) refused (M3):")
    for connection, r in refusals:
        device = f"{r['hostname']} ({r['external_id']})" if r.get("hostname") else r["external_id"]
        print(f"  {connection} device {device}, refused by workspace {r['workspace_id']} {r['workspace']!r} "
              f"(maximum {r['max_devices']}): {r['reason']}")
    if refused > len(refusals):
        print(f"  ... and {refused - len(refusals)} more")
    print("  list them any time with 'gateway devices list --refused'")


def _sync(args: argparse.Namespace) -> int:
    from gateway.sync.devices import pull_all

    gateway = gateway_from_args(args)
    if args.connection:
        for name in args.connection:
            gateway.settings.connection(name)
    if not args.json:
        gateway.plugins.pm.register(PullProgress(sys.stderr), name="cli-progress")
    results = asyncio.run(pull_all(gateway.settings, gateway.db, gateway.plugins, clock=gateway.clock,
                                   only=args.connection))
    rows: list[dict[str, Any]] = []
    for name, result in results.items():
        if isinstance(result, Exception):
            rows.append({"connection": name, "error": str(result)})
        else:
            summary = result.as_dict()
            rows.append({"connection": name, **{k: v for k, v in summary.items() if not isinstance(v, list)},
                         "unmapped": len(result.unmapped_organizations), "refusals": result.refusals})
    if args.json:
        print_json(rows)
    else:
        if sys.stderr.isatty():
            sys.stderr.write("\n")
        print_table(rows, ["connection", "pages", "devices_new", "devices_updated", "devices_refused", "unmapped",
                           "retries", "throttled", "duration_seconds", "error"])
        _print_refusals(rows)
    return 1 if any("error" in row for row in rows) else 0

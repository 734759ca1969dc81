"""``gateway plans|associations|bills|billing`` and ``gateway bill``: billing from the command line.

Every command acts for the partner named by ``--partner ID`` (optional when
the store holds one partner) as an admin, and changes the store in one
transaction. ``gateway bill`` is the billing run: overdue bills, due bills,
then e-mail (bills and the partner's billing report), as the scheduler does.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from gateway.commands.common import add_json_flag, gateway_from_args, partner_id_from_args, print_json, print_table
from gateway.core.access import Principal, system_principal
from gateway.core.billing import associations, lifecycle, plans, reports, subscriptions
from gateway.core.billing import run as billing_run
from gateway.core.billing.documents import csv as csv_docs
from gateway.core.billing.documents import format as fmt
from gateway.core.billing.drafts import BillDraft
from gateway.core.billing.rules import final_billing_date, parse_month
from gateway.core.clock import FrozenClock
from gateway.core.db import transaction
from gateway.core.models import Bill, BillingCycle, BillStatus, Customer, Partner, PlanAssociation, ServicePlan
from gateway.errors import DomainError

# ``bill`` and ``billing`` are too close to tell apart by name: each one's help says what it is and names the other.
BILL_HELP = "the billing run: build every bill that is due, once (service-plan cycles and monthly months), e-mail them"
BILL_HELP_MORE = ("It bills customers on service plans (S: 'gateway plans', 'gateway associations') per cycle and, "
                  "for partners with monthly active-device billing (M), each month's active devices.")
BILL_OTHER = "To enable, join, cancel or look back on monthly active-device billing, use 'gateway billing'."
BILLING_HELP = ("monthly active-device billing (M): enable, join, cancel, history; "
                "not the billing run ('gateway bill')")
BILLING_HELP_MORE = ("It is the partner's monthly subscription: an activation payment, then each month a price per "
                     "device active in the workspaces that joined it, with no service plan involved.")
BILLING_OTHER = ("Its monthly bills, like the service-plan bills (S: 'gateway plans'), are built by the billing "
                 "run, 'gateway bill', or by the daemon's scheduler.")


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_plans(subparsers)
    _register_associations(subparsers)
    _register_bills(subparsers)
    _register_billing(subparsers)
    _register_bill(subparsers)


def _partner_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--partner", type=int, metavar="ID", help="the partner to act for (default: the only one)")


def _action(actions: argparse._SubParsersAction, name: str, handler: Any, help: str) -> argparse.ArgumentParser:
    parser = actions.add_parser(name, help=help)
    _partner_flag(parser)
    add_json_flag(parser)
    parser.set_defaults(handler=handler)
    return parser


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date; write it as YYYY-MM-DD") from None


def _principal(session: Session, args: argparse.Namespace) -> Principal:
    return system_principal(partner_id_from_args(session, args), f"cli:{_user()}")


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name (containers): still a usable actor
        return "unknown"


def _out(args: argparse.Namespace, rows: list[dict[str, Any]], columns: list[str], title: str | None = None) -> None:
    if args.json:
        print_json(rows)
    else:
        print_table(rows, columns, title=title)


# --- plans ----------------------------------------------------------------------------------


def _plan_row(plan: ServicePlan) -> dict[str, Any]:
    return {"id": plan.id, "name": plan.name, "price_per_device": plan.price_per_device, "currency": plan.currency,
            "archived_at": plan.archived_at}


def _register_plans(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("plans", help="service plans: a price per device per billing cycle (S1, S7)")
    actions = parser.add_subparsers(dest="plans_command", metavar="ACTION", required=True)
    listing = _action(actions, "list", _plans_list, "list service plans")
    listing.add_argument("--all", action="store_true", help="include archived plans")
    add = _action(actions, "add", _plans_add, "create a service plan")
    add.add_argument("--name", required=True)
    add.add_argument("--price", required=True, help="price per device per cycle, e.g. 12.50")
    add.add_argument("--currency", help="ISO 4217 code, e.g. USD (default: [billing] default_currency)")
    show = _action(actions, "show", _plans_show, "a plan and its price history")
    show.add_argument("plan_id", type=int)
    price = _action(actions, "price", _plans_price, "change a plan's price from a day on (S7: prorated by days)")
    price.add_argument("plan_id", type=int)
    price.add_argument("--price", required=True)
    price.add_argument("--from", dest="effective_from", type=_day,
                       help="first day of the new price, customer-local (default: today in each customer's zone)")
    archive = _action(actions, "archive", _plans_archive, "archive a plan that has no open association")
    archive.add_argument("plan_id", type=int)


def _plans_list(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    with gateway.db() as session:
        rows = [_plan_row(p) for p in plans.list_plans(session, _principal(session, args), include_archived=args.all)]
    _out(args, rows, ["id", "name", "price_per_device", "currency", "archived_at"])
    return 0


def _plans_add(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    with transaction(gateway.db) as session:
        plan = plans.create_plan(session, _principal(session, args), name=args.name, price_per_device=args.price,
                                 currency=args.currency or gateway.settings.billing.default_currency,
                                 now=gateway.clock.now())
        row = _plan_row(plan)
    _out(args, [row], ["id", "name", "price_per_device", "currency"])
    return 0


def _plans_show(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    with gateway.db() as session:
        plan = plans.get_plan(session, _principal(session, args), args.plan_id)
        row = _plan_row(plan)
        row["prices"] = [{"effective_from": None if p.effective_from == plans.SINCE_ALWAYS else p.effective_from,
                          "price_per_device": p.price} for p in plans.plan_prices(session, plan.id)]
    if args.json:
        print_json(row)
    else:
        print_table([row], ["id", "name", "price_per_device", "currency", "archived_at"])
        print_table(row["prices"], ["effective_from", "price_per_device"], title="prices (effective_from '-' = since the start)")
    return 0


def _plans_price(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    now = gateway.clock.now()
    with transaction(gateway.db) as session:
        change = plans.change_price(session, _principal(session, args), args.plan_id, price_per_device=args.price,
                                    effective_from=args.effective_from, now=now)
        row = _plan_row(change.plan)
        customers = [{"customer_id": c.customer_id, "customer": c.customer, "effective_from": c.effective_from,
                      "billed_through": c.billed_through} for c in change.customers]
    if args.json:
        print_json({**row, "effective_from": change.effective_from, "customers": customers})
        return 0
    print_table([row], ["id", "name", "price_per_device", "currency"])
    print_table(customers, ["customer_id", "customer", "effective_from", "billed_through"],
                title="the new price applies to each customer from (its local day):")
    for c in change.deferred:
        print(f"note: {c.customer} is billed through {c.billed_through}, so the new price applies to it from its "
              f"next cycle, {c.effective_from} (correct a billed cycle with a credit or charge)")
    return 0


def _plans_archive(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    with transaction(gateway.db) as session:
        row = _plan_row(plans.archive_plan(session, _principal(session, args), args.plan_id, now=gateway.clock.now()))
    _out(args, [row], ["id", "name", "archived_at"])
    return 0


# --- associations ------------------------------------------------------------------------------


def _association_row(association: PlanAssociation) -> dict[str, Any]:
    return {"id": association.id, "plan_id": association.plan_id, "customer_id": association.customer_id,
            "cycle": association.cycle, "starts_on": association.starts_on, "ends_on": association.ends_on,
            "due_days": association.due_days, "email": association.email}


_ASSOCIATION_COLUMNS = ["id", "plan_id", "customer_id", "cycle", "starts_on", "ends_on", "due_days", "email"]


def _register_associations(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("associations", help="which customers a plan bills, how often, to whom (S2, S6)")
    actions = parser.add_subparsers(dest="associations_command", metavar="ACTION", required=True)
    listing = _action(actions, "list", _associations_list, "list plan associations")
    listing.add_argument("--plan", type=int, metavar="ID")
    listing.add_argument("--customer", type=int, metavar="ID")
    add = _action(actions, "add", _associations_add, "associate a plan with customers (needs [mail] settings)")
    add.add_argument("--plan", type=int, metavar="ID", required=True)
    add.add_argument("--customer", type=int, metavar="ID", action="append", required=True, help="repeat for several")
    add.add_argument("--cycle", choices=[c.value for c in BillingCycle], required=True)
    add.add_argument("--start", type=_day, required=True, help="first day of the first cycle (customer-local)")
    add.add_argument("--due-days", type=int, default=None, help="days until a bill is due (default: [billing])")
    add.add_argument("--email", help="where the bills are sent (default: each customer's billing e-mail)")
    remove = _action(actions, "remove", _associations_remove,
                     "dissociate customers from a plan; the current cycle is still billed (S6)")
    remove.add_argument("--plan", type=int, metavar="ID", required=True)
    remove.add_argument("--customer", type=int, metavar="ID", action="append", required=True)


def _associations_list(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    with gateway.db() as session:
        rows = [_association_row(a) for a in associations.list_associations(
            session, _principal(session, args), plan_id=args.plan, customer_id=args.customer)]
    _out(args, rows, _ASSOCIATION_COLUMNS)
    return 0


def _associations_add(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    due_days = args.due_days if args.due_days is not None else gateway.settings.billing.default_due_days
    with transaction(gateway.db) as session:
        principal = _principal(session, args)
        created = []
        for email, customer_ids in _association_emails(session, principal, args).items():
            created += associations.associate(session, principal, plan_id=args.plan, customer_ids=customer_ids,
                                              cycle=args.cycle, starts_on=args.start, due_days=due_days, email=email,
                                              mail=gateway.settings.mail, now=gateway.clock.now())
        rows = [_association_row(a) for a in created]
    _out(args, rows, _ASSOCIATION_COLUMNS)
    return 0


def _association_emails(session: Session, principal: Principal, args: argparse.Namespace) -> dict[str, list[int]]:
    """Where each customer's bills go: ``--email`` for all, else each customer's own billing e-mail."""
    if args.email is not None:
        return {args.email: list(args.customer)}
    from gateway.core.access import get_customer

    by_email: dict[str, list[int]] = {}
    lacking = []
    for customer_id in dict.fromkeys(args.customer):
        customer = get_customer(session, principal, customer_id)
        if customer.billing_email:
            by_email.setdefault(customer.billing_email, []).append(customer.id)
        else:
            lacking.append(f"{customer.name!r} (id {customer.id})")
    if lacking:
        raise DomainError(f"customer {', '.join(lacking)} has no billing e-mail; give --email ADDRESS, or add "
                          "the customer with --email", field="email")
    return by_email


def _associations_remove(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    with transaction(gateway.db) as session:
        ended = associations.dissociate(session, _principal(session, args), plan_id=args.plan,
                                        customer_ids=args.customer, now=gateway.clock.now())
        rows = [_association_row(a) for a in ended]
    _out(args, rows, _ASSOCIATION_COLUMNS)
    return 0


# --- bills -------------------------------------------------------------------------------------


def bill_row(bill: Bill) -> dict[str, Any]:
    return {"id": bill.id, "number": bill.number, "customer_id": bill.customer_id, "kind": bill.kind,
            "period_start": bill.period_start, "period_end": bill.period_end, "devices": bill.device_count,
            "total": fmt.money(bill.total, bill.currency), "currency": bill.currency, "status": bill.status,
            "issued_on": bill.issued_on, "due_on": bill.due_on, "email": bill.email, "emailed_at": bill.emailed_at,
            "email_error": bill.email_error}


_BILL_COLUMNS = ["id", "number", "customer_id", "kind", "period_start", "period_end", "devices", "total", "currency",
                 "status", "due_on"]


def _register_bills(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bills", help="bills: list, show, paid, void, credit, documents, e-mail (S3, S5)")
    actions = parser.add_subparsers(dest="bills_command", metavar="ACTION", required=True)
    listing = _action(actions, "list", _bills_list, "list bills, newest first")
    listing.add_argument("--customer", type=int, metavar="ID")
    listing.add_argument("--status", choices=[s.value for s in BillStatus])
    show = _action(actions, "show", _bills_show, "one bill with its lines")
    show.add_argument("bill_id", type=int)
    for name, handler, help in (
        ("paid", _bills_paid, "mark a bill paid (it can never change afterwards)"),
        ("void", _bills_void, "void an unpaid bill (its number is not reused)"),
        ("finalize", _bills_finalize, "issue a draft bill and queue it for the PSAs"),
    ):
        action = _action(actions, name, handler, help)
        action.add_argument("bill_id", type=int)
    credit = _action(actions, "credit", _bills_credit, "correct a bill with a credit line on the customer's next bill")
    credit.add_argument("bill_id", type=int)
    credit.add_argument("--amount", required=True)
    credit.add_argument("--reason", required=True)
    charge = _action(actions, "adjust", _bills_adjust, "a one-off charge, discount or credit for the next bill (S3)")
    charge.add_argument("--customer", type=int, metavar="ID", required=True)
    charge.add_argument("--kind", choices=lifecycle.ADJUSTMENT_KINDS, required=True)
    charge.add_argument("--amount", required=True)
    charge.add_argument("--currency", required=True)
    charge.add_argument("--description", required=True)
    for name, handler, help in (
        ("csv", _bills_csv, "a bill as CSV (S5)"),
        ("pdf", _bills_pdf, "a bill as PDF (S5)"),
    ):
        action = _action(actions, name, handler, help)
        action.add_argument("bill_id", type=int)
        action.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    consolidated = _action(actions, "consolidated", _bills_consolidated, "every bill of a customer in one document (S5)")
    consolidated.add_argument("--customer", type=int, metavar="ID", required=True)
    consolidated.add_argument("--format", choices=["csv", "pdf"], default="pdf")
    consolidated.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    send = _action(actions, "email", _bills_email, "e-mail bills not yet sent (or one bill again after failures)")
    send.add_argument("--bill", type=int, metavar="ID", action="append", help="only these bills, whatever failed before")


def _bills_list(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    with gateway.db() as session:
        rows = [bill_row(b) for b in lifecycle.list_bills(session, _principal(session, args), customer_id=args.customer,
                                                     status=args.status)]
    _out(args, rows, _BILL_COLUMNS)
    return 0


def _bills_show(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    with gateway.db() as session:
        bill = lifecycle.get_bill(session, _principal(session, args), args.bill_id)
        row = bill_row(bill)
        row["lines"] = [{"position": line.position, "kind": line.kind, "description": line.description,
                         "quantity": fmt.number(line.quantity), "unit_price": fmt.number(line.unit_price),
                         "amount": fmt.money(line.amount, bill.currency)} for line in bill.lines]
    if args.json:
        print_json(row)
    else:
        print_table([row], _BILL_COLUMNS + ["email", "emailed_at", "email_error"])
        print_table(row["lines"], ["position", "kind", "description", "quantity", "unit_price", "amount"], title="lines")
    return 0


def _bill_change(args: argparse.Namespace, change: Any) -> int:
    gateway = gateway_from_args(args)
    with transaction(gateway.db) as session:
        row = bill_row(change(session, _principal(session, args), args.bill_id, now=gateway.clock.now()))
    _out(args, [row], _BILL_COLUMNS)
    return 0


def _bills_paid(args: argparse.Namespace) -> int:
    return _bill_change(args, lifecycle.mark_paid)


def _bills_void(args: argparse.Namespace) -> int:
    return _bill_change(args, lifecycle.void_bill)


def _bills_finalize(args: argparse.Namespace) -> int:
    return _bill_change(args, lifecycle.finalize_bill)


def _adjustment_row(adjustment: Any) -> dict[str, Any]:
    return {"id": adjustment.id, "customer_id": adjustment.customer_id, "kind": adjustment.kind,
            "description": adjustment.description, "amount": adjustment.amount, "currency": adjustment.currency}


def _bills_credit(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    with transaction(gateway.db) as session:
        row = _adjustment_row(lifecycle.credit_bill(session, _principal(session, args), args.bill_id,
                                                    amount=args.amount, reason=args.reason, now=gateway.clock.now()))
    _out(args, [row], ["id", "customer_id", "kind", "description", "amount", "currency"])
    return 0


def _bills_adjust(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    with transaction(gateway.db) as session:
        row = _adjustment_row(lifecycle.add_adjustment(
            session, _principal(session, args), customer_id=args.customer, kind=args.kind, description=args.description,
            amount=args.amount, currency=args.currency, now=gateway.clock.now()))
    _out(args, [row], ["id", "customer_id", "kind", "description", "amount", "currency"])
    return 0


def _write(data: bytes, output: Path | None, what: str) -> None:
    if output is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    try:
        output.write_bytes(data)
    except OSError as exc:
        raise DomainError(f"cannot write {what} to {output}: {exc.strerror or exc}", field="output") from None
    print(f"{what} written to {output} ({len(data)} bytes)", file=sys.stderr)


def _bill_document(args: argparse.Namespace, kind: str) -> int:
    gateway = gateway_from_args(args)
    with gateway.db() as session:
        bill = lifecycle.get_bill(session, _principal(session, args), args.bill_id)
        customer = session.get_one(Customer, bill.customer_id)
        if kind == "csv":
            data = csv_docs.bill_csv(bill, customer)
        else:
            from gateway.core.billing.documents import pdf as pdf_docs  # fpdf2 loads with the first PDF only

            data = pdf_docs.bill_pdf(bill, customer, session.get_one(Partner, bill.partner_id))
    _write(data, args.output, f"bill {bill.number} ({kind})")
    return 0


def _bills_csv(args: argparse.Namespace) -> int:
    return _bill_document(args, "csv")


def _bills_pdf(args: argparse.Namespace) -> int:
    return _bill_document(args, "pdf")


def _bills_consolidated(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    with gateway.db() as session:
        principal = _principal(session, args)
        customer, bills = lifecycle.customer_bills(session, principal, args.customer)
        if args.format == "csv":
            data = csv_docs.consolidated_csv(customer, bills)
        else:
            from gateway.core.billing.documents import pdf as pdf_docs  # fpdf2 loads with the first PDF only

            data = pdf_docs.consolidated_pdf(customer, session.get_one(Partner, principal.partner_id), bills)
    _write(data, args.output, f"consolidated bill of {customer.name} ({args.format})")
    return 0


def _bills_email(args: argparse.Namespace) -> int:
    from gateway.sync.mail import send_bill_emails

    gateway = gateway_from_args(args)
    if args.bill:
        with gateway.db() as session:
            principal = _principal(session, args)
            for bill_id in args.bill:
                lifecycle.get_bill(session, principal, bill_id)
    outcome = asyncio.run(send_bill_emails(gateway.db, mail=gateway.settings.mail, clock=gateway.clock,
                                           bill_ids=args.bill, plugins=gateway.plugins))
    rows = [{"bill": number, "result": "sent"} for number in outcome.sent]
    rows += [{"bill": number, "result": f"failed: {error}"} for number, error in outcome.failed]
    _out(args, rows, ["bill", "result"])
    return 1 if outcome.failed else 0


# --- monthly billing ---------------------------------------------------------------------------


def _register_billing(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "billing", help=BILLING_HELP, description=f"{BILLING_HELP}. {BILLING_HELP_MORE} {BILLING_OTHER}")
    actions = parser.add_subparsers(dest="billing_command", metavar="ACTION", required=True)
    _action(actions, "status", _billing_status, "the partner's monthly billing subscription")
    enable = _action(actions, "enable", _billing_enable, "enable monthly billing (activation payment, M1)")
    enable.add_argument("--timezone", default="UTC", help="the partner's billing time zone (IANA name)")
    join = _action(actions, "join", _billing_join, "put a workspace on monthly billing (M2)")
    join.add_argument("--workspace", type=int, metavar="ID", required=True)
    join.add_argument("--max-devices", type=int, required=True)
    join.add_argument("--edition", type=int, metavar="ID")
    join.add_argument("--key-exposed", action="store_true",
                      help="the workspace's license key reached its end users: its released period is not recycled")
    leave = _action(actions, "leave", _billing_leave,
                    "take one workspace off monthly billing today; lists its devices, --yes to confirm (M2)")
    leave.add_argument("--workspace", type=int, metavar="ID", required=True)
    leave.add_argument("--yes", action="store_true", help="confirm: end the workspace's monthly license today")
    cancel = _action(actions, "cancel", _billing_cancel,
                     "cancel monthly billing: shows end dates and affected workspaces; --yes to confirm (M8)")
    cancel.add_argument("--ends-on", type=_day, help="one of the offered end dates")
    cancel.add_argument("--yes", action="store_true", help="confirm: end every monthly license on that date")
    _action(actions, "reactivate", _billing_reactivate, "undo a cancellation before the final billing date (M8)")
    _action(actions, "history", _billing_history, "every past payment of monthly billing (M7)")
    usage = _action(actions, "usage", _billing_usage, "a month's device usage report as CSV (M7)")
    usage.add_argument("--period", required=True, metavar="YYYY-MM")
    usage.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")


def _subscription_row(sub: Any) -> dict[str, Any]:
    from gateway.core.billing.rules import final_billing_date, first_charge_date, local_day

    enabled_on = local_day(sub.enabled_at, sub.timezone)
    return {"partner_id": sub.partner_id, "enabled_on": enabled_on, "timezone": sub.timezone,
            "price_per_device": sub.price_per_device, "currency": sub.currency,
            "first_charge_on": first_charge_date(enabled_on), "ends_on": sub.ends_on,
            "final_billing_date": final_billing_date(sub.ends_on) if sub.ends_on else None}


_SUB_COLUMNS = ["partner_id", "enabled_on", "timezone", "price_per_device", "currency", "first_charge_on", "ends_on",
                "final_billing_date"]


def _billing_status(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    with gateway.db() as session:
        row = _subscription_row(subscriptions.get_subscription(session, _principal(session, args)))
    _out(args, [row], _SUB_COLUMNS)
    return 0


def _billing_enable(args: argparse.Namespace) -> int:
    from gateway.sync.jobs import bill_built_lines

    gateway = gateway_from_args(args)
    with transaction(gateway.db) as session:
        sub, bill = subscriptions.enable_monthly(session, _principal(session, args), settings=gateway.settings.billing,
                                                 now=gateway.clock.now(), tz=args.timezone,
                                                 extra_lines=bill_built_lines(gateway.plugins))
        row = _subscription_row(sub)
        row["activation_bill"] = bill.number
        row["activation_total"] = fmt.money(bill.total, bill.currency)
    _out(args, [row], _SUB_COLUMNS + ["activation_bill", "activation_total"])
    return 0


def _billing_join(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    with transaction(gateway.db) as session:
        joined = subscriptions.join_monthly(session, _principal(session, args), workspace_id=args.workspace,
                                            max_devices=args.max_devices, edition_id=args.edition,
                                            now=gateway.clock.now(), key_exposed=args.key_exposed)
        workspace, released = joined.workspace, joined.released
        row = {"workspace_id": workspace.id, "name": workspace.name, "since": workspace.monthly_billing_since,
               "max_devices": workspace.max_devices, "edition_id": workspace.edition_id,
               "released_license": released.key if released else None}
    _out(args, [row], ["workspace_id", "name", "since", "max_devices", "edition_id", "released_license"])
    if released is not None and not args.json:
        until = f" until {released.expires_at:%Y-%m-%d}" if released.expires_at else ""
        print(f"license {released.key} was released; its period runs on{until} and "
              + ("can be recycled with a different workspace" if released.recyclable
                 else "cannot serve a different workspace: its key was exposed to end users"))
    return 0


def _billing_leave(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    with transaction(gateway.db) as session:
        leaving = subscriptions.leave_monthly(session, _principal(session, args), workspace_id=args.workspace,
                                              now=gateway.clock.now(), confirm=args.yes)
    if args.json:
        print_json(vars(leaving))
    elif leaving.confirmed:
        print(f"workspace {leaving.workspace!r} left monthly billing; {leaving.last_day} is its last billed day. "
              f"Its {len(leaving.devices)} device(s) need a regular license ('gateway licenses assign').")
    else:
        print_table([{"device": name} for name in leaving.devices], ["device"],
                    title=f"leaving ends the monthly license of workspace {leaving.workspace!r} on {leaving.last_day}, "
                          f"{len(leaving.devices)} device(s):")
        print("nothing changed: add --yes to confirm (or assign a regular license, which also leaves the plan)")
    return 0  # a preview is a success, as for cancel; a refusal is an error (exit 2)


def _billing_cancel(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    with transaction(gateway.db) as session:
        plan = subscriptions.cancel_monthly(session, _principal(session, args), now=gateway.clock.now(),
                                            ends_on=args.ends_on, confirm=args.yes)
    affected = [{"workspace_id": w.workspace_id, "workspace": w.workspace, "customer": w.customer,
                 "devices": len(w.devices), "device_names": w.devices} for w in plan.workspaces]
    if args.json:
        print_json({"offered_end_dates": plan.offered_end_dates, "ends_on": plan.ends_on, "confirmed": plan.confirmed,
                    "confirm_with": None if plan.confirmed else _confirm_command(plan), "workspaces": affected})
    else:
        print("offered end dates: " + ", ".join(d.isoformat() for d in plan.offered_end_dates))
        print_table(affected, ["workspace_id", "workspace", "customer", "devices", "device_names"],
                    title=f"cancelling ends the monthly license of {len(affected)} workspace(s), {plan.device_count} device(s):")
        if plan.confirmed:
            assert plan.ends_on is not None  # cancel_monthly confirms only with an end date
            print(f"monthly billing cancelled: service ends on {plan.ends_on}; it can be reactivated until "
                  f"{final_billing_date(plan.ends_on)}")
        else:
            print(f"preview only, nothing changed; to cancel, run: {_confirm_command(plan)}")
    return 0  # a preview is a success; a refusal (a wrong date, nothing to cancel) is an error, exit 2


def _confirm_command(plan: Any) -> str:
    """The command that confirms a previewed cancellation (at the chosen end date, else the first offered)."""
    ends_on = plan.ends_on or (plan.offered_end_dates[0] if plan.offered_end_dates else "DATE")
    return f"gateway billing cancel --ends-on {ends_on} --yes (or another offered end date)"


def _billing_reactivate(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    with transaction(gateway.db) as session:
        row = _subscription_row(subscriptions.reactivate_monthly(session, _principal(session, args),
                                                                 now=gateway.clock.now()))
    _out(args, [row], _SUB_COLUMNS)
    return 0


def _billing_history(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    with gateway.db() as session:
        rows = [vars(entry) for entry in reports.billing_history(session, _principal(session, args))]
    _out(args, rows, ["month", "kind", "bills", "devices", "total", "currency", "paid"])
    return 0


def _billing_usage(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    month = parse_month(args.period)
    with gateway.db() as session:
        data = csv_docs.usage_csv(reports.usage_rows(session, _principal(session, args), month))
    _write(data, args.output, f"usage report {args.period}")
    return 0


# --- the billing run ---------------------------------------------------------------------------


def _register_bill(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bill", help=BILL_HELP, description=f"{BILL_HELP}. {BILL_HELP_MORE} {BILL_OTHER}")
    parser.add_argument("--period", metavar="YYYY-MM", help="bill the cycles ending in this month (default: all due)")
    parser.add_argument("--dry-run", action="store_true", help="show the bills without saving anything")
    parser.add_argument("--draft", action="store_true", help="save them as drafts (issue with 'gateway bills finalize')")
    parser.add_argument("--no-email", action="store_true", help="do not e-mail bills and reports now")
    parser.add_argument("--as-of", metavar="YYYY-MM-DDTHH:MM", help="run as at this earlier UTC time (catch-up)")
    add_json_flag(parser)
    parser.set_defaults(handler=_bill)


def _draft_row(draft: BillDraft) -> dict[str, Any]:
    return {"number": draft.number or "(dry run)", "customer": draft.customer_name, "kind": draft.kind,
            "period_start": draft.period.start, "period_end": draft.period.end, "devices": draft.device_count,
            "total": fmt.money(draft.total, draft.currency), "currency": draft.currency, "due_on": draft.due_on,
            "lines": [{"description": line.description, "amount": fmt.money(line.amount, draft.currency)}
                      for line in draft.lines]}


def _as_of(text: str | None, now: datetime) -> datetime:
    if text is None:
        return now
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise DomainError(f"--as-of {text!r} is not a time; write it as YYYY-MM-DDTHH:MM (UTC)", field="as_of") from None
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    if moment > now:
        raise DomainError("--as-of cannot be in the future: cycles that have not ended cannot be billed", field="as_of")
    return moment


def _bill(args: argparse.Namespace) -> int:
    from gateway.sync.jobs import bill_built_lines, billing_job
    from gateway.sync.mail import MailOutcome

    gateway = gateway_from_args(args)
    period = parse_month(args.period) if args.period else None
    gateway.clock = FrozenClock(_as_of(args.as_of, gateway.clock.now()))
    if args.dry_run:
        with gateway.db() as session:  # read only: nothing is committed
            run = billing_run.run_billing(session, now=gateway.clock.now(), billing=gateway.settings.billing,
                                          extra_lines=bill_built_lines(gateway.plugins), period=period, dry_run=True)
        outcome = MailOutcome()
    elif args.draft or args.no_email:
        with transaction(gateway.db) as session:
            lifecycle.mark_overdue(session, now=gateway.clock.now())
            run = billing_run.run_billing(session, now=gateway.clock.now(), billing=gateway.settings.billing,
                                          extra_lines=bill_built_lines(gateway.plugins), period=period,
                                          issue=not args.draft)
        outcome = MailOutcome()
    else:
        result = asyncio.run(billing_job(gateway.db, gateway.clock, gateway.settings.billing, gateway.settings.mail,
                                         gateway.plugins, period=period))
        run, outcome = result.run, result.mail
    rows = [_draft_row(d) for d in run.drafts]
    if args.json:
        print_json({"dry_run": run.dry_run, "bills": rows, "already_billed": run.already_billed,
                    "emailed": outcome.sent, "email_failed": [{"what": w, "error": e} for w, e in outcome.failed]})
    else:
        title = "bills that would be built (dry run, nothing saved):" if run.dry_run else "bills built:"
        print_table(rows, ["number", "customer", "kind", "period_start", "period_end", "devices", "total", "currency",
                           "due_on"], title=title)
        print(f"{run.already_billed} due cycle(s) were billed before and left unchanged")
        for what in outcome.sent:
            print(f"e-mailed: {what}")
        for what, error in outcome.failed:
            print(f"e-mail failed: {what}: {error}", file=sys.stderr)
    return 1 if outcome.failed else 0

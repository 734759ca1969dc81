"""``gateway deliveries`` (the outbox: list, retry, run) and ``gateway reconcile`` (G2, G3)."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from datetime import date, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import select

from gateway.commands.common import add_json_flag, gateway_from_args, print_json, print_table
from gateway.core.db import transaction
from gateway.core.models import Delivery, DeliveryStatus
from gateway.errors import DomainError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("deliveries", help="bills waiting for, delivered to, or dead-lettered by PSAs")
    actions = parser.add_subparsers(dest="deliveries_command", metavar="ACTION")
    parser.set_defaults(handler=_list, status=None, json=False)
    listing = actions.add_parser("list", help="list deliveries (default action)")
    listing.add_argument("--status", choices=[s.value for s in DeliveryStatus])
    add_json_flag(listing)
    listing.set_defaults(handler=_list)
    retry = actions.add_parser("retry", help="put a dead-lettered delivery back in the queue")
    retry.add_argument("delivery_id", type=int)
    retry.set_defaults(handler=_retry)
    run = actions.add_parser("run", help="push every due delivery now, then exit")
    run.add_argument("--worker-id", default=None, help="name of this worker in claims (default: host:pid)")
    add_json_flag(run)
    run.set_defaults(handler=_run)

    reconcile = subparsers.add_parser("reconcile", help="compare what the PSAs hold with what the gateway billed")
    reconcile.add_argument("--period", metavar="YYYY-MM", help="cycles starting in this month (default: last month)")
    add_json_flag(reconcile)
    reconcile.set_defaults(handler=_reconcile)


def _list(args: argparse.Namespace) -> int:
    gateway = gateway_from_args(args)
    with gateway.db() as session:
        query = select(Delivery).order_by(Delivery.id)
        if args.status:
            query = query.where(Delivery.status == DeliveryStatus(args.status))
        rows = [
            {
                "id": d.id, "connection": d.connection, "key": d.key, "status": d.status, "attempts": d.attempts,
                "next_attempt_at": d.next_attempt_at if d.status == DeliveryStatus.PENDING else None,
                "external_id": d.external_id, "last_error": d.last_error,
            }
            for d in session.scalars(query)
        ]
    if args.json:
        print_json(rows)
    else:
        print_table(rows, ["id", "connection", "key", "status", "attempts", "external_id", "last_error"])
    return 0


def _retry(args: argparse.Namespace) -> int:
    from gateway.sync.outbox import retry_dead

    gateway = gateway_from_args(args)
    with transaction(gateway.db) as session:
        delivery = retry_dead(session, args.delivery_id, gateway.clock.now())
        key = delivery.key
    print(f"delivery {args.delivery_id} ({key}) queued again")
    return 0


def _run(args: argparse.Namespace) -> int:
    from gateway.sync.outbox import deliver_until_idle

    gateway = gateway_from_args(args)
    worker = args.worker_id or f"{socket.gethostname()}:{os.getpid()}"
    result = asyncio.run(deliver_until_idle(gateway.db, gateway.clock, gateway.settings.outbox, gateway.build_psa,
                                            gateway.notify, worker, delivered=gateway.bill_delivered,
                                            connections=[c.name for c in gateway.connections("psa")]))
    summary = {k: getattr(result, k) for k in ("claimed", "delivered", "already_present", "failed", "dead")}
    if args.json:
        print_json(summary)
    else:
        print(", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in summary.items()))
    return 0 if not result.dead else 1


def parse_period(text: str | None, today: date) -> tuple[date, date]:
    """``YYYY-MM`` to (first day, last day); None means the month before ``today``."""
    if text is None:
        last = today.replace(day=1) - timedelta(days=1)
        return last.replace(day=1), last
    try:
        year, month = (int(part) for part in text.split("-"))
        first = date(year, month, 1)
    except ValueError:
        raise DomainError(f"--period {text!r} is not a month; use YYYY-MM, e.g. 2026-10", field="period") from None
    following = (first.replace(day=28) + timedelta(days=4)).replace(day=1)
    return first, following - timedelta(days=1)


def _reconcile(args: argparse.Namespace) -> int:
    from gateway.sync.reconcile import reconcile

    gateway = gateway_from_args(args)
    start, end = parse_period(args.period, gateway.clock.now().astimezone(ZoneInfo("UTC")).date())
    report = asyncio.run(reconcile(gateway.db, gateway.connections("psa"), gateway.build_psa, gateway.notify, start, end))
    if args.json:
        print_json(
            {
                "period_start": start, "period_end": end, "checked": report.checked, "matched": report.matched,
                "differences": [d.__dict__ for d in report.differences],
                "unmapped_psa_companies": report.unmapped_psa_companies,
                "customers_without_psa": report.customers_without_psa, "errors": report.errors,
            }
        )
    else:
        print(f"reconciliation {start} .. {end}: {report.checked} checked, {report.matched} matched")
        print_table([d.__dict__ for d in report.differences],
                    ["connection", "customer", "key", "kind", "gateway_value", "psa_value"], title="differences:")
        print_table(report.unmapped_psa_companies, ["connection", "external_id", "name"], title="unmapped PSA companies:")
        print_table([{"customer": c} for c in report.customers_without_psa], ["customer"], title="customers without a PSA mapping:")
        for error in report.errors:
            print(f"error: {error}", file=sys.stderr)
    return 0 if report.clean else 1

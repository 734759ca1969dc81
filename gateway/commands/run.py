"""``gateway run``: the daemon (admin API, webhooks, health, metrics and the scheduler)."""

from __future__ import annotations

import argparse

from gateway.commands.common import gateway_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help="run the daemon: admin API, webhooks, health, metrics, scheduler")
    parser.add_argument("--no-scheduler", action="store_true", help="serve HTTP only; run no background jobs")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from gateway import daemon

    gateway = gateway_from_args(args)
    if args.no_scheduler:
        gateway.settings.scheduler.enabled = False
    try:
        return daemon.run(gateway)
    finally:
        gateway.close()

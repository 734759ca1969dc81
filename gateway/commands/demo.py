"""``gateway demo``: the full cycle against the bundled simulators on loopback (see gateway.demo)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the whole cycle against bundled simulators: pull, bill last month, deliver, reconcile"
    )
    parser.add_argument("--dir", type=Path, default=Path("demo"),
                        help="where the demo's configuration and SQLite database go (recreated; default ./demo)")
    parser.add_argument("--serve", action="store_true", help="afterwards keep the admin API running until Ctrl-C")
    parser.add_argument("--port", type=_port, default=8080, metavar="N",
                        help="the port --serve listens on, on 127.0.0.1 (default 8080)")
    parser.set_defaults(handler=_demo)


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)")
    return int(text)


def _demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    try:
        return asyncio.run(run_demo(args.dir.resolve(), serve=args.serve, port=args.port))
    except KeyboardInterrupt:
        return 0

"""The ``gateway`` command line.

Each command group lives in its own module under ``gateway/commands`` and
exposes ``register(subparsers)``; this module only wires them and turns every
:class:`GatewayError` into one clear line on stderr and exit code 2 (a
traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from gateway import __version__
from gateway.errors import GatewayError

#: Command modules, in the order their commands appear in ``gateway --help``.
COMMAND_MODULES: tuple[str, ...] = (
    "gateway.commands.demo",
    "gateway.commands.db",
    "gateway.commands.plugins",
    "gateway.commands.plugin_new",
    "gateway.commands.config",
    "gateway.commands.directory",
    "gateway.commands.deliveries",
    "gateway.commands.run",
    "gateway.commands.billing",
    "gateway.commands.licenses",
    "gateway.commands.users",
)

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="MSP license gateway: licenses, devices and bills kept in step with RMM and PSA tools.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--config", metavar="PATH", help="TOML configuration file (default: $GATEWAY_CONFIG, else built-in defaults)"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.handler(args)
    except GatewayError as exc:
        if args.debug:
            raise
        print(f"gateway: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

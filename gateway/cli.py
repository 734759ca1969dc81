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
    "gateway.commands.editions",
    "gateway.commands.directory",
    "gateway.commands.devices",
    "gateway.commands.deliveries",
    "gateway.commands.run",
    "gateway.commands.billing",
    "gateway.commands.licenses",
    "gateway.commands.users",
)

EXIT_USAGE = 2
#: A reader that went away (``gateway ... --json | head``): what a shell reports for any Unix tool
#: that SIGPIPE stopped (128 + 13), so ``set -o pipefail`` sees this command exactly as it sees ``cat``.
EXIT_BROKEN_PIPE = 141


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
    parser.add_argument(
        "--now", metavar="TIME",
        help="run as at this ISO 8601 time with a zone, ticking on from there (default: $GATEWAY_NOW, else the "
             "real time); needs [testing] clock_override = true",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from gateway.commands.common import moved_clock

        args.clock = moved_clock(args)
        result = args.handler(args)
        sys.stdout.flush()  # a reader that went away shows up here, not at interpreter exit
    except BrokenPipeError:
        _drop_stdout()
        return EXIT_BROKEN_PIPE
    except GatewayError as exc:
        if args.debug:
            raise
        print(f"gateway: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from gateway.core.db import is_lock_error

        if args.debug or not is_lock_error(exc):
            raise
        # Another process held the database's write lock past the busy timeout: one line, not a traceback.
        print("gateway: error: the database is busy (another gateway process held its write lock too long); "
              "nothing was half-done, run the command again", file=sys.stderr)
        return EXIT_USAGE
    return int(result or 0)


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush cannot fail a second time (Python's recipe)."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout has no file descriptor (a test's capture): nothing to protect
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

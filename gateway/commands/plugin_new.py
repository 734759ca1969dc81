"""``gateway plugin new NAME --kind psa|rmm``: write a ready plugin package for a tool the gateway does not know."""

from __future__ import annotations

import argparse
from pathlib import Path

from gateway.plugins import get_plugin_manager
from gateway.scaffold import KINDS, scaffold


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("plugin", help="write a new plugin (see `gateway plugins` for installed ones)")
    actions = parser.add_subparsers(dest="plugin_action", metavar="ACTION", required=True)
    new = actions.add_parser(
        "new",
        help="write a plugin package for a PSA or RMM tool: adapter, simulator and tests that pass",
        description="Writes gateway-NAME/ with a pyproject (entry point included), the adapter, a simulator "
        "and tests using the contract kit; it installs with `pip install -e` and its tests pass unchanged.",
    )
    new.add_argument("name", help="the adapter kind, lower-case words joined by '-', e.g. acme-rmm")
    new.add_argument("--kind", choices=KINDS, required=True, help="psa (companies, bills) or rmm (devices)")
    new.add_argument("--dir", type=Path, default=Path("."), help="where to create gateway-NAME/ (default: here)")
    new.set_defaults(handler=_new)


def _new(args: argparse.Namespace) -> int:
    known = set(get_plugin_manager().adapters())
    target = scaffold(args.name, args.kind, args.dir, known_kinds=known)
    files = sorted(path.relative_to(target) for path in target.rglob("*") if path.is_file())
    print(f"created {target}/ ({len(files)} files)")
    for path in files:
        print(f"  {path}")
    print("next:")
    print(f'  pip install -e "{target}[test]"')
    print(f"  cd {target} && pytest")
    print("then replace the made-up API with your tool's: protocol.py, simulator.py, client.py (see README.md)")
    return 0

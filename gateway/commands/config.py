"""``gateway config check``: load and validate the configuration without starting anything.

Problems that stop the gateway are one error line (exit 2). Settings that load but will not work are
warnings (exit 0): placeholder credentials copied from ``config.example.toml``, and connections whose
tool sends webhooks but that have no ``webhook_secret`` (the receiver refuses those webhooks with 404).
``--online`` then authenticates each enabled connection once (one cheap listing call) and reports the
outcome per connection (exit 1 when any failed).
"""

from __future__ import annotations

import argparse
import asyncio
import re
from typing import Any

from gateway.app import validate_connections
from gateway.commands.common import settings_from_args
from gateway.core.settings import ConnectionSettings, Settings, credential_env_name
from gateway.plugins import get_plugin_manager

#: Values that are a placeholder, not a credential: those of config.example.toml and their usual kin.
PLACEHOLDER = re.compile(r"^(your[-_ ].*|<.*>|change-?me|replace-?me|x{3,}|\.\.\.|.*_\.\.\.)$", re.IGNORECASE)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("config", help="check the configuration")
    actions = parser.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="validate the config file and environment; print a summary")
    check.add_argument("--online", action="store_true",
                       help="also sign in to each enabled connection once and report the result per connection")
    check.set_defaults(handler=_check)


def _check(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    plugins = get_plugin_manager()
    validate_connections(settings, plugins)
    print(f"configuration OK ({settings.source or 'defaults and environment'}): "
          f"{len(settings.connections)} connection(s), database {settings.database.url.split('://')[0]}")
    for connection in settings.connections:
        print(f"  {connection.name}: {connection.plugin} at {connection.base_url}")
    for warning in config_warnings(settings, plugins):
        print(f"warning: {warning}")
    if not args.online:
        return 0
    results = asyncio.run(check_online(settings))
    for name, problem in results.items():
        print(f"  {name}: {'ok' if problem is None else 'FAILED: ' + problem}")
    return 1 if any(problem is not None for problem in results.values()) else 0


def config_warnings(settings: Settings, plugins: Any) -> list[str]:
    """What loads but will not work, one sentence each (no secret value in any of them)."""
    adapters = plugins.adapters()
    warnings = []
    for connection in settings.connections:
        for key, secret in sorted(connection.credentials.items()):
            if PLACEHOLDER.match(secret.get_secret_value().strip()):
                warnings.append(
                    f"connection {connection.name!r}: credentials.{key} is a placeholder, not a credential; "
                    f"set the real value in the file or in {credential_env_name(connection.name, key)}")
        if connection.webhook_secret is not None and PLACEHOLDER.match(connection.webhook_secret.get_secret_value()):
            warnings.append(f"connection {connection.name!r}: webhook_secret is a placeholder; set the secret "
                            "the tool signs its webhooks with")
        spec = adapters.get(connection.plugin)
        sends_webhooks = connection.webhook_scheme or (spec is not None and spec.webhook_scheme)
        if connection.enabled and sends_webhooks and connection.webhook_secret is None:
            warnings.append(
                f"connection {connection.name!r} has no webhook_secret: webhooks sent to /webhooks/{connection.name} "
                "are refused with 404; set webhook_secret to the secret the tool signs with (or ignore this if "
                "the tool sends none)")
    return warnings


async def check_online(settings: Settings) -> dict[str, str | None]:
    """Sign in to each enabled connection once (list its organisations or companies): None, or what failed."""
    from gateway.app import build_gateway

    gateway = build_gateway(settings, check_schema=False)  # its logging hides every secret value
    results: dict[str, str | None] = {}
    try:
        for connection in settings.connections:
            if connection.enabled:
                results[connection.name] = await _sign_in(gateway, connection)
    finally:
        gateway.close()
    return results


async def _sign_in(gateway: Any, connection: ConnectionSettings) -> str | None:
    from gateway.errors import AuthError, GatewayError

    role = gateway.plugins.adapters()[connection.plugin].role
    adapter = gateway.build_rmm(connection) if role == "rmm" else gateway.build_psa(connection)
    try:
        if role == "rmm":
            await adapter.list_organizations()
        else:
            await adapter.list_companies()
    except AuthError as exc:
        return f"the credentials were refused ({exc})"
    except GatewayError as exc:
        return str(exc)
    finally:
        await adapter.aclose()
    return None

"""Datto RMM: sites and devices over the API v2 (OAuth2 password grant with the account's API keys)."""

from __future__ import annotations

from gateway.adapters import AdapterSpec
from gateway.hookspecs import hookimpl
from gateway.plugins.datto_rmm import client, protocol, simulator


@hookimpl
def gateway_register_adapters() -> list[AdapterSpec]:
    return [
        AdapterSpec(
            kind="datto_rmm",
            role="rmm",
            factory=client.build,
            description="Datto RMM (API v2): sites and devices",
            required_credentials=("api_key", "api_secret"),
            default_options={"page_size": protocol.DEFAULT_PAGE_SIZE},
            simulator=simulator.create_app,
        )
    ]

"""NinjaOne RMM: organizations and devices over the public API v2 (OAuth2 client credentials)."""

from __future__ import annotations

from gateway.adapters import AdapterSpec
from gateway.hookspecs import hookimpl
from gateway.plugins.ninjaone import client, protocol, simulator


@hookimpl
def gateway_register_adapters() -> list[AdapterSpec]:
    return [
        AdapterSpec(
            kind="ninjaone",
            role="rmm",
            factory=client.build,
            description="NinjaOne RMM (public API v2): organizations and devices",
            required_credentials=("client_id", "client_secret"),
            default_options={"page_size": protocol.DEFAULT_PAGE_SIZE, "scope": protocol.SCOPE},
            simulator=simulator.create_app,
        )
    ]

"""ConnectWise Manage (PSA): companies in, bills out as invoices or agreement additions.

Configure with ``plugin = "connectwise"``, ``base_url`` the site (e.g.
``https://na.myconnectwise.net``), credentials ``company``, ``public_key``,
``private_key`` and ``client_id`` (from developer.connectwise.com), and
``options.delivery = "invoice"`` (default) or ``"addition"``; see ``protocol.py``.
"""

from __future__ import annotations

from gateway.adapters import AdapterSpec
from gateway.hookspecs import hookimpl
from gateway.plugins.connectwise.client import DEFAULT_RATE_LIMIT, REQUIRED_CREDENTIALS, build
from gateway.plugins.connectwise.simulator import create_app


@hookimpl
def gateway_register_adapters() -> list[AdapterSpec]:
    return [
        AdapterSpec(
            kind="connectwise",
            role="psa",
            factory=build,
            description=(
                "ConnectWise Manage REST 3.0: invoices or agreement additions; "
                f"default limit {DEFAULT_RATE_LIMIT.requests}/{DEFAULT_RATE_LIMIT.per_seconds:g}s, "
                f"{DEFAULT_RATE_LIMIT.max_concurrent} at a time"
            ),
            required_credentials=REQUIRED_CREDENTIALS,
            default_options={"delivery": "invoice", "catalog_item": "MSP-DEVICE"},
            simulator=create_app,
            webhook_scheme="connectwise",
        )
    ]

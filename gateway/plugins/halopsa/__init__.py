"""HaloPSA: clients in, bills out as invoices.

Configure with ``plugin = "halopsa"``, ``base_url`` the tenant (e.g.
``https://yourcompany.halopsa.com``), credentials ``client_id`` and ``client_secret``
of an API application (client-credentials, scope ``all``), and ``options.tenant`` for
hosted tenants that need ``?tenant=`` on the token request; see ``protocol.py``.
"""

from __future__ import annotations

from gateway.adapters import AdapterSpec
from gateway.hookspecs import hookimpl
from gateway.plugins.halopsa.client import DEFAULT_RATE_LIMIT, REQUIRED_CREDENTIALS, build
from gateway.plugins.halopsa.simulator import create_app


@hookimpl
def gateway_register_adapters() -> list[AdapterSpec]:
    return [
        AdapterSpec(
            kind="halopsa",
            role="psa",
            factory=build,
            description=(
                "HaloPSA: invoices; "
                f"default limit {DEFAULT_RATE_LIMIT.requests}/{DEFAULT_RATE_LIMIT.per_seconds:g}s, "
                f"{DEFAULT_RATE_LIMIT.max_concurrent} at a time"
            ),
            required_credentials=REQUIRED_CREDENTIALS,
            default_options={"delivery": "invoice"},
            simulator=create_app,
            webhook_scheme="halopsa",
        )
    ]

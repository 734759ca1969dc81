"""Autotask PSA (REST v1.0): companies in, bills out as contract charges or recurring service units.

Configure with ``plugin = "autotask"``, ``base_url`` the zone look-up host
(``https://webservices.autotask.net``), credentials ``username``, ``secret`` and
``integration_code``, and ``options.delivery = "charge"`` (default, needs
``options.billing_code_id``) or ``"contract_service"`` (needs ``options.service_id``).
Autotask invoices cannot be created over REST; see ``protocol.py``.
"""

from __future__ import annotations

from gateway.adapters import AdapterSpec
from gateway.hookspecs import hookimpl
from gateway.plugins.autotask.client import DEFAULT_RATE_LIMIT, REQUIRED_CREDENTIALS, build
from gateway.plugins.autotask.simulator import create_app


@hookimpl
def gateway_register_adapters() -> list[AdapterSpec]:
    return [
        AdapterSpec(
            kind="autotask",
            role="psa",
            factory=build,
            description=(
                "Autotask REST v1.0: contract charges or recurring service units; "
                f"default limit {DEFAULT_RATE_LIMIT.requests}/{DEFAULT_RATE_LIMIT.per_seconds:g}s "
                f"(half of Autotask's 10,000/hour), {DEFAULT_RATE_LIMIT.max_concurrent} at a time"
            ),
            required_credentials=REQUIRED_CREDENTIALS,
            default_options={"delivery": "charge"},
            simulator=create_app,
            webhook_scheme="autotask",
        )
    ]

"""gateway-syncro: Syncro (SyncroMSP) as an RMM and as a PSA for the MSP license gateway.

Two adapter kinds over one API (see ``protocol.py``):

- ``syncro-rmm``: customers are organisations, assets are devices (G1).
- ``syncro-psa``: customers are companies, bills become invoices, exactly once (G2),
  and are read back for reconciliation (G3).

Both take ``base_url`` (``https://<subdomain>.syncromsp.com``) and the credential
``api_token`` (Syncro: *Admin → API Tokens*; the RMM kind needs Customers and Assets
"List/Search", the PSA kind also Invoices "List/Search", "View Details" and "Create").
"""

from __future__ import annotations

from gateway import AdapterSpec, hookimpl
from gateway_syncro import client, protocol, simulator

__version__ = "0.1.0"

_LIMIT = f"{protocol.DEFAULT_RATE_LIMIT.requests}/{protocol.DEFAULT_RATE_LIMIT.per_seconds:g}s"


@hookimpl
def gateway_register_adapters() -> list[AdapterSpec]:
    return [
        AdapterSpec(
            kind="syncro-rmm",
            role="rmm",
            factory=client.build_rmm,
            description=f"Syncro RMM (API v1): customers and assets; default limit {_LIMIT}",
            required_credentials=("api_token",),
            simulator=simulator.create_app,
        ),
        AdapterSpec(
            kind="syncro-psa",
            role="psa",
            factory=client.build_psa,
            description=f"Syncro PSA (API v1): customers in, bills out as invoices; default limit {_LIMIT}",
            required_credentials=("api_token",),
            simulator=simulator.create_app,
        ),
    ]

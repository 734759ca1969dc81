"""MSP license gateway: the public surface for plugin authors.

A plugin imports what it needs from here: ``hookimpl`` to mark hook
implementations, the adapter protocols and records, and the error types.
"""

from gateway.adapters import (
    AdapterContext,
    AdapterSpec,
    BillDocument,
    BillLineDoc,
    DevicePage,
    PsaAdapter,
    PsaCompany,
    PsaRecord,
    PushResult,
    RmmAdapter,
    RmmDevice,
    RmmOrganization,
)
from gateway.errors import (
    AdapterError,
    AuthError,
    CircuitOpen,
    ConfigError,
    GatewayError,
    PermanentError,
    RateLimited,
    TransientError,
)
from gateway.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "AdapterContext",
    "AdapterError",
    "AdapterSpec",
    "AuthError",
    "BillDocument",
    "BillLineDoc",
    "CircuitOpen",
    "ConfigError",
    "DevicePage",
    "GatewayError",
    "PermanentError",
    "PsaAdapter",
    "PsaCompany",
    "PsaRecord",
    "PushResult",
    "RateLimited",
    "RmmAdapter",
    "RmmDevice",
    "RmmOrganization",
    "TransientError",
    "__version__",
    "hookimpl",
]

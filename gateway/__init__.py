"""MSP license gateway: the public surface for plugin authors.

A plugin imports what it needs from here, and from two packages beside it:
``gateway.testing`` (the contract kit for its tests) and ``gateway.simulators``
(building blocks for the fake of its tool). Every other module is internal and may
change without notice; ``tests/test_public_surface.py`` keeps the scaffold, the
contrib plugins and docs/plugins.md to these three.

What is here: ``hookimpl`` to mark hook implementations and ``get_plugin_manager``
to build a manager; the adapter protocols, their records and ``AdapterSpec``; a
connection's settings and the helpers that read its options; the clocks; the shared
HTTP ``Connector`` with its rate limit and auth helpers; the webhook contract; the
error types; and ``add_secrets`` for values a plugin wants kept out of the logs.

Names are loaded on first use (PEP 562 ``__getattr__``): every ``gateway.<module>``
import runs this file first, and the CLI's start-up must not pay for aiohttp or
pydantic before it needs them. Type checkers read the imports under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    from gateway.core.clock import Clock, FrozenClock, SystemClock
    from gateway.core.logging import add_secrets
    from gateway.core.settings import ConnectionSettings, load_settings
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
    from gateway.options import choice_option, int_option, refuse_unknown, text_option, url_option
    from gateway.plugins import get_plugin_manager
    from gateway.sync.http import (
        Auth,
        Connector,
        HttpResponse,
        OAuth2ClientCredentials,
        OAuth2PasswordGrant,
        RateLimit,
        StaticAuth,
        retry_after_seconds,
    )
    from gateway.webhook_contract import (
        WebhookError,
        WebhookEvent,
        WebhookPayloadError,
        WebhookScheme,
        WebhookVerificationError,
    )

#: Where each public name is defined.
_ORIGINS: dict[str, str] = {
    "AdapterContext": "gateway.adapters",
    "AdapterError": "gateway.errors",
    "AdapterSpec": "gateway.adapters",
    "Auth": "gateway.sync.http",
    "AuthError": "gateway.errors",
    "BillDocument": "gateway.adapters",
    "BillLineDoc": "gateway.adapters",
    "CircuitOpen": "gateway.errors",
    "Clock": "gateway.core.clock",
    "ConfigError": "gateway.errors",
    "ConnectionSettings": "gateway.core.settings",
    "Connector": "gateway.sync.http",
    "DevicePage": "gateway.adapters",
    "FrozenClock": "gateway.core.clock",
    "GatewayError": "gateway.errors",
    "HttpResponse": "gateway.sync.http",
    "OAuth2ClientCredentials": "gateway.sync.http",
    "OAuth2PasswordGrant": "gateway.sync.http",
    "PermanentError": "gateway.errors",
    "PsaAdapter": "gateway.adapters",
    "PsaCompany": "gateway.adapters",
    "PsaRecord": "gateway.adapters",
    "PushResult": "gateway.adapters",
    "RateLimit": "gateway.sync.http",
    "RateLimited": "gateway.errors",
    "RmmAdapter": "gateway.adapters",
    "RmmDevice": "gateway.adapters",
    "RmmOrganization": "gateway.adapters",
    "StaticAuth": "gateway.sync.http",
    "SystemClock": "gateway.core.clock",
    "TransientError": "gateway.errors",
    "WebhookError": "gateway.webhook_contract",
    "WebhookEvent": "gateway.webhook_contract",
    "WebhookPayloadError": "gateway.webhook_contract",
    "WebhookScheme": "gateway.webhook_contract",
    "WebhookVerificationError": "gateway.webhook_contract",
    "add_secrets": "gateway.core.logging",
    "choice_option": "gateway.options",
    "get_plugin_manager": "gateway.plugins",
    "hookimpl": "gateway.hookspecs",
    "int_option": "gateway.options",
    "load_settings": "gateway.core.settings",
    "refuse_unknown": "gateway.options",
    "retry_after_seconds": "gateway.sync.http",
    "text_option": "gateway.options",
    "url_option": "gateway.options",
}

__version__ = "0.1.0"

__all__ = [
    "AdapterContext",
    "AdapterError",
    "AdapterSpec",
    "Auth",
    "AuthError",
    "BillDocument",
    "BillLineDoc",
    "CircuitOpen",
    "Clock",
    "ConfigError",
    "ConnectionSettings",
    "Connector",
    "DevicePage",
    "FrozenClock",
    "GatewayError",
    "HttpResponse",
    "OAuth2ClientCredentials",
    "OAuth2PasswordGrant",
    "PermanentError",
    "PsaAdapter",
    "PsaCompany",
    "PsaRecord",
    "PushResult",
    "RateLimit",
    "RateLimited",
    "RmmAdapter",
    "RmmDevice",
    "RmmOrganization",
    "StaticAuth",
    "SystemClock",
    "TransientError",
    "WebhookError",
    "WebhookEvent",
    "WebhookPayloadError",
    "WebhookScheme",
    "WebhookVerificationError",
    "__version__",
    "add_secrets",
    "choice_option",
    "get_plugin_manager",
    "hookimpl",
    "int_option",
    "load_settings",
    "refuse_unknown",
    "retry_after_seconds",
    "text_option",
    "url_option",
]


def __getattr__(name: str) -> Any:
    origin = _ORIGINS.get(name)
    if origin is None:
        raise AttributeError(f"module 'gateway' has no attribute {name!r}")
    value = getattr(importlib.import_module(origin), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

"""What a webhook scheme is and what a webhook handler receives: the plugin contract's webhook types.

A plugin may provide signature schemes (hook ``gateway_webhook_schemes``) and handle
verified events (hook ``gateway_webhook_received``) without providing any adapter, so
these types are a contract of their own rather than part of :mod:`gateway.adapters`.
They live apart from the receiver (:mod:`gateway.sync.webhooks`) so that a plugin,
and ``import gateway``, get them without the receiver's SQLAlchemy and aiohttp code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from gateway.errors import GatewayError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from sqlalchemy.orm import Session


class WebhookError(GatewayError):
    """A webhook was refused; ``status`` is the HTTP answer."""

    status = 400


class WebhookVerificationError(WebhookError):
    """The signature, the credentials or the timestamp did not pass: answered 401, nothing stored."""

    status = 401


class WebhookPayloadError(WebhookError):
    """The request is authentic but its body is not what the scheme needs: answered 400."""

    status = 400


@dataclass(frozen=True)
class WebhookEvent:
    """One verified webhook event, as schemes return it and handlers receive it.

    ``timestamp`` is the sender's signed send time where the scheme has one.
    The receiver fills ``headers`` (without credentials), ``scheme``,
    ``received_at`` and ``session``: an ORM session in the open transaction,
    which holds other events too. Handlers write through it and never commit it;
    whatever a handler does with it, it cannot commit or roll back more than its
    own work (see the docstring of :mod:`gateway.sync.webhooks`).
    """

    id: str
    payload: Any
    timestamp: datetime | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    scheme: str = ""
    received_at: datetime | None = None
    session: Session | None = field(default=None, repr=False, compare=False)

    @property
    def type(self) -> str | None:
        """The payload's ``type`` (Standard Webhooks convention), if it has one."""
        value = self.payload.get("type") if isinstance(self.payload, dict) else None
        return value if isinstance(value, str) else None


@runtime_checkable
class WebhookScheme(Protocol):
    """How one kind of sender signs its webhooks (returned by ``gateway_webhook_schemes``).

    ``verify`` checks ``raw_body`` (the exact bytes received) and ``headers``
    (case-insensitive) against ``secret`` (the connection's plain secret) at
    ``now`` (the injected clock). It compares in constant time, raises
    :class:`WebhookVerificationError` when anything does not match or the
    timestamp is more than 300 s away, :class:`WebhookPayloadError` when the
    authentic body is unusable, and returns the event otherwise. It must not do
    I/O. A scheme may also define ``validate_secret(secret)`` raising ValueError,
    called at start-up so a malformed secret is a configuration error.
    """

    name: str

    def verify(self, headers: Mapping[str, str], raw_body: bytes, secret: str, now: datetime) -> WebhookEvent: ...

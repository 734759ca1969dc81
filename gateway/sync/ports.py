"""What the sync layer needs from the rest of the gateway, as types it owns.

**Decision:** sync never imports web (nor the composition root). The webhook
receiver and the pull job count events, and several jobs announce events to
plugins; they are handed objects of the types below. The web layer's
``Metrics`` is one (it implements both counter protocols), the composition
root's ``Gateway.notify`` is a :data:`Notify`, and the daemon wires them in.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

#: The ``gateway_notify`` hook as a callable: (event, payload).
Notify = Callable[[str, dict[str, Any]], Awaitable[None]]


class WebhookCounters(Protocol):
    """What the webhook receiver counts."""

    def webhook(self, connection: str, outcome: str, seconds: float | None = None) -> None:
        """Count one webhook request (``outcome``: accepted, duplicate, unauthorized, ...)."""

    def webhook_handler_failed(self, connection: str, plugin: str) -> None:
        """Count one ``gateway_webhook_received`` implementation that raised."""


class PullCounters(Protocol):
    """What the pull job counts."""

    def pull(self, connection: str, outcome: str = "ok") -> None:
        """Count one pull of a connection (``outcome``: ok, error)."""

    def retry(self, connection: str, count: int = 1) -> None:
        """Count HTTP requests retried."""

    def rate_limited(self, connection: str, count: int = 1) -> None:
        """Count HTTP 429 answers received."""

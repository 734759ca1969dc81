"""The gateway's error types.

Adapters and services raise these so that callers (the CLI, the web API, the
scheduler) can handle every failure at one boundary without knowing which tool
or rule produced it. Messages are written for the person who has to act on them
and never contain secret values.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration is wrong; the message names the key and the file."""


class DatabaseError(GatewayError):
    """The database cannot be reached or its schema is not current."""


# --- domain -------------------------------------------------------------------


class DomainError(GatewayError):
    """A request broke a rule of the domain (DOMAIN.md); ``code`` is stable, ``field`` optional."""

    code = "invalid"

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        if code is not None:
            self.code = code


class NotFound(DomainError):
    """The object does not exist, or the caller may not see it (S8: both look the same)."""

    code = "not_found"


class Conflict(DomainError):
    """The request is valid but the current state forbids it (e.g. changing a paid bill)."""

    code = "conflict"


# --- adapters and external tools -----------------------------------------------


class AdapterError(GatewayError):
    """An external tool failed; ``connection`` names the configured connection."""

    def __init__(self, message: str, *, connection: str | None = None, status: int | None = None):
        super().__init__(f"{connection}: {message}" if connection else message)
        self.connection = connection
        self.status = status


class TransientError(AdapterError):
    """Worth retrying later: timeouts, 5xx, 429, dropped connections."""


class RateLimited(TransientError):
    """The tool answered 429 (or its equivalent) and retries ran out."""


class CircuitOpen(TransientError):
    """The connection failed repeatedly; calls are paused until a probe succeeds."""


class PermanentError(AdapterError):
    """Retrying will not help: a 4xx other than 408/429, or a response we cannot read."""


class AuthError(PermanentError):
    """The tool refused our credentials (after one token refresh where that applies)."""

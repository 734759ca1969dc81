"""The one structlog configuration.

JSON lines when stderr is not a terminal (services, CI), a readable console
renderer on a terminal. Standard-library loggers (aiohttp, sqlalchemy,
tenacity, alembic) are routed through the same processors, so every line has
the same shape and passes through the same redaction. Context (run id,
connection, customer) is bound with ``structlog.contextvars``.

Redaction is the last line of defence: code should not log secrets in the
first place, but any configured secret value that reaches a log event, in any
field or nested inside one, is replaced by ``"[REDACTED]"``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

REDACTED = "[REDACTED]"
#: Field names whose values are dropped whatever they hold.
SENSITIVE_KEYS = frozenset(
    {"password", "secret", "client_secret", "private_key", "token", "access_token", "authorization", "api_key"}
)


class SecretRedactor:
    """A structlog processor that removes known secret values and sensitive fields from an event."""

    def __init__(self, secrets: Iterable[str] = ()):
        self._secrets: list[str] = []
        self.update(secrets)

    def update(self, secrets: Iterable[str]) -> None:
        # Longest first, so a secret that contains another is removed whole. Very short values are
        # not redacted as substrings: they would shred ordinary words and leak their length anyway.
        merged = set(self._secrets) | {s for s in secrets if s and len(s) >= 4}
        self._secrets = sorted(merged, key=len, reverse=True)

    def forget(self, secret: str) -> None:
        self._secrets = [s for s in self._secrets if s != secret]

    def __call__(self, _logger: WrappedLogger, _method: str, event: EventDict) -> dict[str, Any]:
        return {key: self._clean(key, value) for key, value in event.items()}

    def _clean(self, key: str | None, value: Any) -> Any:
        if key is not None and key.lower() in SENSITIVE_KEYS and value not in (None, ""):
            return REDACTED
        if isinstance(value, str):
            for secret in self._secrets:
                if secret in value:
                    value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, dict):
            return {k: self._clean(str(k), v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self._clean(None, v) for v in value)
        if isinstance(value, BaseException | bytes):
            return self._clean(key, str(value))
        return value


#: The redactor in use; ``configure_logging`` and ``add_secrets`` feed it.
redactor = SecretRedactor()


def add_secrets(secrets: Iterable[str], *, replacing: str | None = None) -> None:
    """Register values to redact that appear at run time (OAuth tokens); ``replacing`` drops an expired one."""
    if replacing:
        redactor.forget(replacing)
    redactor.update(secrets)


def configure_logging(
    level: str = "info",
    fmt: str = "auto",
    *,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> None:
    """Configure structlog and the standard library once; safe to call again (tests, reloads)."""
    stream = stream or sys.stderr
    redactor.update(secrets)
    use_json = fmt == "json" or (fmt == "auto" and not _is_tty(stream))
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redactor,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer(default=str)
        if use_json
        else structlog.dev.ConsoleRenderer(colors=_is_tty(stream))
    )
    numeric_level = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[*shared[:1], structlog.stdlib.filter_by_level, *shared[1:], structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, redactor, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric_level)
    # Chatty libraries: their warnings matter, their per-request info does not.
    for name in ("aiohttp.access", "sqlalchemy.engine", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(max(numeric_level, logging.WARNING))


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False

"""What a sans-I/O protocol module and its adapter's client share.

Each built-in adapter splits its tool's API into ``protocol.py`` (pure functions: the
requests to send, how to read the answers) and ``client.py`` (sends them through the
connector). A protocol function describes a request as a :class:`Request` for the client
to send, and raises errors without knowing which connection it serves: the client names
the connection with :func:`naming_connection`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from gateway.errors import PermanentError


@dataclass(frozen=True)
class Request:
    """One HTTP request to send; ``url`` is relative to the adapter's API base unless absolute."""

    method: str
    url: str
    params: Mapping[str, Any] | None = None
    json: Any = None


@contextmanager
def naming_connection(connection: str) -> Iterator[None]:
    """Re-raise a PermanentError from a sans-I/O protocol function (which cannot know the connection) naming it."""
    try:
        yield
    except PermanentError as exc:
        if exc.connection:
            raise
        raise PermanentError(str(exc), connection=connection, status=exc.status) from None

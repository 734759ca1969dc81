"""What the NinjaOne and Datto RMM clients share: naming the connection in a protocol error."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from gateway.errors import PermanentError


@contextmanager
def naming(connection: str) -> Iterator[None]:
    """Re-raise a PermanentError from a sans-I/O protocol function (which cannot know the connection) naming it."""
    try:
        yield
    except PermanentError as exc:
        if exc.connection:
            raise
        raise PermanentError(str(exc), connection=connection, status=exc.status) from None

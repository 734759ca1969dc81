"""Fixtures for testing gateway plugins, registered with pytest as the ``gateway`` plugin (pytest11).

Installed with the gateway, so a plugin's own test suite gets them without a conftest:

- ``gateway_clock``: a :class:`gateway.FrozenClock` at 10 March 2026, 12:00 UTC.
- ``gateway_redact``: ``gateway_redact(event)`` is what the gateway's log redaction leaves
  of a log event (a dict of fields), so a test can prove that a value the plugin passed to
  :func:`gateway.add_secrets` never reaches a log line.
- ``loopback_server``: ``await loopback_server(app)`` serves an aiohttp app on 127.0.0.1
  (a free port) and returns its base URL; every server is stopped after the test.

The adapter contract tests live in :mod:`gateway.testing.contract`. Async fixtures need
pytest-asyncio (pytest-aiohttp installs it); without it ``loopback_server`` is simply absent, so
having the gateway installed never breaks an unrelated pytest run.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web

from gateway.core.clock import FrozenClock
from gateway.core.logging import redactor

# The kit's asserts explain themselves in a failing test of the plugin author's (pytest rewrites them).
pytest.register_assert_rewrite("gateway.testing.contract")

FROZEN_AT = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)

LoopbackServer = Callable[[web.Application], Awaitable[str]]
Redact = Callable[[Mapping[str, Any]], dict[str, Any]]


@pytest.fixture
def gateway_clock() -> FrozenClock:
    """10 March 2026, 12:00 UTC, until the test moves it."""
    return FrozenClock(FROZEN_AT)


@pytest.fixture
def gateway_redact() -> Redact:
    """``gateway_redact(event)`` -> the event's fields as the gateway's log redaction leaves them."""
    return lambda event: redactor(None, "info", dict(event))


async def _serve(app: web.Application, runners: list[web.AppRunner]) -> str:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    runners.append(runner)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]  # the port the system chose for port 0
    return f"http://127.0.0.1:{port}"


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - only without pytest-asyncio
    pass
else:

    @pytest_asyncio.fixture
    async def loopback_server() -> AsyncIterator[LoopbackServer]:
        """``await loopback_server(app)`` -> ``"http://127.0.0.1:PORT"``; stopped after the test."""
        runners: list[web.AppRunner] = []

        async def serve(app: web.Application) -> str:
            return await _serve(app, runners)

        yield serve
        for runner in reversed(runners):
            await runner.cleanup()

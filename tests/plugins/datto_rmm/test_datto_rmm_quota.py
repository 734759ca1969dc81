"""Datto RMM's account-wide quota: a pull that shares it with other integrations waits, never gets blocked.

"The API request rate limit is 600 requests per 60 seconds ... for all users" (Datto RMM
API v2 help): other integrations spend it too, a 429 carries no ``Retry-After``, and a
caller that keeps retrying after 429s is blocked with 403. Time is virtual on both sides
(:class:`~gateway.simulators.VirtualTime`), so waiting out a 60-second window is free.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.core.clock import FrozenClock
from gateway.core.settings import ConnectionSettings
from gateway.plugins.datto_rmm import protocol, simulator
from gateway.plugins.datto_rmm.client import DattoRmmAdapter
from gateway.simulators import VirtualTime
from gateway.sync.http import Connector, OAuth2PasswordGrant


@pytest.fixture
def frozen() -> FrozenClock:
    return FrozenClock(datetime(2026, 3, 10, 12, 0, tzinfo=UTC))


async def _pull(aiohttp_server: Any, frozen: FrozenClock, *, devices: int, page_size: int, **sim: Any):
    time = VirtualTime()
    app = simulator.create_app(
        clock=frozen, devices=devices, sites=5, monotonic=time.monotonic, sleep=time.sleep, **sim
    )
    server = await aiohttp_server(app)
    base_url = str(server.make_url("")).rstrip("/")
    settings = ConnectionSettings(
        name="datto",
        plugin="datto_rmm",
        base_url=base_url,
        credentials={"api_key": simulator.DEFAULT_API_KEY, "api_secret": simulator.DEFAULT_API_SECRET},
    )
    auth = OAuth2PasswordGrant(base_url + protocol.TOKEN_PATH, simulator.DEFAULT_API_KEY, simulator.DEFAULT_API_SECRET)
    # The adapter's defaults, as client.build makes them; only time is virtual.
    connector = Connector.from_settings(
        settings, rate_limit=protocol.DEFAULT_RATE_LIMIT, auth=auth, clock=frozen,
        monotonic=time.monotonic, sleep=time.sleep,
    )
    adapter = DattoRmmAdapter(connector, page_size=page_size)
    try:
        pages = [page async for page in adapter.fetch_devices()]
    finally:
        await adapter.aclose()
    return app[simulator.STATE], connector, pages, time


async def test_quota_shared_with_other_integrations_is_waited_out_without_a_403(aiohttp_server, frozen) -> None:
    # 500 of the account's 600 requests a minute go to other integrations: 100 are left. No
    # slow-down above 90% (the case: the tool does not pace the caller, the gateway must).
    state, connector, pages, time = await _pull(
        aiohttp_server, frozen, devices=6_000, page_size=25, spent_by_others=500, slowdown_seconds=0.0
    )
    assert sum(len(p.devices) for p in pages) == 6_000  # 240 pages: more than two windows' worth
    assert len({d.external_id for p in pages for d in p.devices}) == 6_000
    assert state.blocks == 0  # never a 403
    assert state.throttled == 1  # one 429, when the budget was first met; then the learned pace
    assert connector.stats.throttled == 1
    assert connector._limiter.allowed <= 100
    assert time.slept >= 120  # the windows were waited out (virtually)


async def test_with_the_tools_slow_down_the_shared_quota_is_never_a_403_either(aiohttp_server, frozen) -> None:
    state, connector, pages, time = await _pull(aiohttp_server, frozen, devices=6_000, page_size=25, spent_by_others=500)
    assert sum(len(p.devices) for p in pages) == 6_000
    assert state.blocks == 0
    assert state.throttled <= 1


async def test_a_429_without_retry_after_is_not_retried_within_the_window(aiohttp_server, frozen) -> None:
    state, connector, pages, time = await _pull(
        aiohttp_server, frozen, devices=500, page_size=25, spent_by_others=590, slowdown_seconds=0.0
    )
    assert sum(len(p.devices) for p in pages) == 500
    assert state.blocks == 0
    assert state.throttled == 1
    assert time.slept >= 60


async def test_simulator_429_has_no_retry_after_and_three_in_a_row_block_with_403(aiohttp_server, frozen) -> None:
    time = VirtualTime()
    app = simulator.create_app(clock=frozen, rate_limit=(2, 60.0), monotonic=time.monotonic, sleep=time.sleep)
    server = await aiohttp_server(app)
    client_session = server.make_url("")
    import aiohttp

    async with aiohttp.ClientSession() as session:
        statuses, retry_after = [], []
        for _ in range(6):
            async with session.get(client_session.join(server.make_url(protocol.DEVICES_PATH))) as response:
                statuses.append(response.status)
                retry_after.append(response.headers.get("Retry-After"))
        assert statuses == [401, 401, 429, 429, 403, 403]  # two admitted (no token), then 429s, then the block
        assert retry_after[2:4] == [None, None]
        await time.sleep(300)
        async with session.get(server.make_url(protocol.DEVICES_PATH)) as response:
            assert response.status != 403  # the block lifts after block_seconds

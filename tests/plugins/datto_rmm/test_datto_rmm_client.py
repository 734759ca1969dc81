"""The Datto RMM adapter against its simulator over loopback."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web

from gateway.adapters import AdapterContext
from gateway.core.clock import FrozenClock
from gateway.core.settings import ConnectionSettings
from gateway.errors import AuthError, ConfigError, PermanentError
from gateway.plugins import get_plugin_manager
from gateway.plugins.datto_rmm import protocol, simulator
from gateway.plugins.datto_rmm.client import DattoRmmAdapter
from gateway.sync.http import Connector, OAuth2PasswordGrant, RateLimit


async def no_sleep(seconds: float) -> None:
    return None


@pytest.fixture
def frozen() -> FrozenClock:
    return FrozenClock(datetime(2026, 3, 10, 12, 0, tzinfo=UTC))


@pytest.fixture
async def datto(aiohttp_server: Any, frozen: FrozenClock):
    async def start(**kw: Any) -> tuple[web.Application, str]:
        kw.setdefault("clock", frozen)
        kw.setdefault("slowdown_seconds", 0.0)
        app = simulator.create_app(**kw)
        server = await aiohttp_server(app)
        return app, str(server.make_url("")).rstrip("/")

    return start


@pytest.fixture
async def adapters(frozen: FrozenClock):
    made: list[DattoRmmAdapter] = []

    def make(base_url: str, *, page_size: int = 250, secret: str = simulator.DEFAULT_API_SECRET, **kw: Any):
        auth = OAuth2PasswordGrant(base_url + protocol.TOKEN_PATH, simulator.DEFAULT_API_KEY, secret)
        kw.setdefault("rate_limit", RateLimit(1000, 1.0, 4))
        connector = Connector(name="datto", base_url=base_url, auth=auth, clock=frozen, sleep=no_sleep, **kw)
        adapter = DattoRmmAdapter(connector, page_size=page_size)
        made.append(adapter)
        return adapter

    yield make
    for adapter in made:
        await adapter.aclose()


async def collect(adapter: DattoRmmAdapter, cursor: str | None = None) -> list:
    return [page async for page in adapter.fetch_devices(cursor)]


async def test_full_paging_to_the_end(datto, adapters, frozen) -> None:
    app, base_url = await datto(devices=1100, sites=30)
    pages = await collect(adapters(base_url))
    assert [len(p.devices) for p in pages] == [250, 250, 250, 250, 100]
    assert [p.cursor for p in pages] == ["1", "2", "3", "4", None]
    devices = [d for p in pages for d in p.devices]
    assert len({d.external_id for d in devices}) == 1100
    state = app[simulator.STATE]
    sample = state.device(777, frozen.now(), "")
    parsed = devices[777]
    assert parsed.external_id == sample["uid"]
    assert parsed.org_external_id == sample["siteUid"]
    assert parsed.hostname == sample["hostname"]
    assert parsed.deleted is sample["deleted"]
    assert parsed.last_contact == datetime.fromtimestamp(sample["lastSeen"] / 1000, tz=UTC)


async def test_population_has_deleted_and_offline_devices(datto, adapters, frozen) -> None:
    app, base_url = await datto(devices=2000, sites=25, seed=3)
    adapter = adapters(base_url)
    devices = [d for p in await collect(adapter) for d in p.devices]
    deleted = sum(d.deleted for d in devices)
    offline = sum(not d.online for d in devices)
    assert 10 < deleted < 100
    assert 0.15 * 2000 < offline < 0.5 * 2000
    sites = await adapter.list_organizations()
    assert {d.org_external_id for d in devices} <= {s.external_id for s in sites}
    # the sites' device counts agree with the device list
    body_counts = app[simulator.STATE].site_counts()
    live = [d for d in devices if not d.deleted]
    assert sum(total for total, _ in body_counts) == len(live)
    assert sum(online for _, online in body_counts) == sum(d.online for d in live)


async def test_sites_are_paged(datto, adapters) -> None:
    app, base_url = await datto(sites=30, devices=10)
    sites = await adapters(base_url, page_size=7).list_organizations()
    state = app[simulator.STATE]
    assert [s.external_id for s in sites] == state.site_uids
    assert [s.name for s in sites] == state.site_names
    assert state.api_requests == 5


async def test_bad_credentials_raise_auth_error(datto, adapters) -> None:
    app, base_url = await datto(devices=10)
    with pytest.raises(AuthError) as caught:
        await collect(adapters(base_url, secret="not-the-secret"))
    assert caught.value.status == 400
    assert "not-the-secret" not in str(caught.value)
    assert app[simulator.STATE].api_requests == 0


async def test_token_request_uses_public_client_basic_auth(datto) -> None:
    # Without the public-client Basic header the token endpoint refuses, even with good keys.
    app, base_url = await datto(devices=10)
    auth = OAuth2PasswordGrant(
        base_url + protocol.TOKEN_PATH, simulator.DEFAULT_API_KEY, simulator.DEFAULT_API_SECRET, client_secret="nope"
    )
    connector = Connector(name="d", base_url=base_url, auth=auth, rate_limit=RateLimit(100, 1), sleep=no_sleep)
    try:
        with pytest.raises(AuthError):
            await connector.request("GET", protocol.DEVICES_PATH)
    finally:
        await connector.aclose()
    assert base64.b64decode(simulator._PUBLIC_CLIENT.split()[1]) == b"public-client:public"


async def test_repeated_breaches_get_403_permanent_error(datto, adapters) -> None:
    app, base_url = await datto(devices=3000, rate_limit=(3, 60.0), block_after=3)
    adapter = adapters(base_url, max_attempts=10)  # a gateway that ignores the quota bounces off it
    with pytest.raises(PermanentError) as caught:
        await collect(adapter)
    assert type(caught.value) is PermanentError
    assert caught.value.status == 403
    assert "rate-limit" in str(caught.value)
    state = app[simulator.STATE]
    assert state.blocked
    assert adapter.connector.stats.throttled == 2


async def test_staying_under_the_quota_gets_no_429(datto, adapters) -> None:
    app, base_url = await datto(devices=1250, rate_limit=(4, 0.5), block_after=1)
    adapter = adapters(base_url, rate_limit=RateLimit(4, 0.5, 2))
    pages = await collect(adapter)
    assert sum(len(p.devices) for p in pages) == 1250
    assert app[simulator.STATE].throttled == 0
    assert adapter.connector.stats.throttled == 0


async def test_registered_factory_builds_a_working_adapter(datto, frozen) -> None:
    _, base_url = await datto(devices=30, sites=3)
    spec = get_plugin_manager(load_entry_points=False).adapters()["datto_rmm"]
    assert spec.role == "rmm" and spec.simulator is simulator.create_app
    settings = ConnectionSettings(
        name="datto-merlot",
        plugin="datto_rmm",
        base_url=base_url,
        credentials={"api_key": simulator.DEFAULT_API_KEY, "api_secret": simulator.DEFAULT_API_SECRET},
        options={"page_size": 20},
    )
    adapter = spec.factory(settings, AdapterContext(clock=frozen))
    try:
        assert [len(p.devices) for p in await collect(adapter)] == [20, 10]
        assert len(await adapter.list_organizations()) == 3
        assert adapter.connector.rate_limit == protocol.DEFAULT_RATE_LIMIT
    finally:
        await adapter.aclose()


def test_factory_reports_bad_options(frozen) -> None:
    spec = get_plugin_manager(load_entry_points=False).adapters()["datto_rmm"]
    settings = ConnectionSettings(
        name="d1", plugin="datto_rmm", base_url="http://127.0.0.1:9", credentials={"api_key": "a", "api_secret": "b"}
    )
    for bad in (251, -1, False, "lots", 10.0):
        with pytest.raises(ConfigError) as caught:
            spec.factory(settings.model_copy(update={"options": {"page_size": bad}}), AdapterContext(clock=frozen))
        assert str(caught.value) == f"connection 'd1': options.page_size must be a whole number from 1 to 250, got {bad!r}"
    assert spec.factory(settings, AdapterContext(clock=frozen)).page_size == protocol.DEFAULT_PAGE_SIZE


@pytest.mark.parametrize("body", [b"<html>maintenance</html>", b'{"devices": [], "pageDetails": null}',
                                  b'{"devices": [{"uid": "x"}], "pageDetails": {}}'])
async def test_an_unreadable_device_page_is_a_permanent_error_naming_the_connection(
    aiohttp_server, adapters, frozen, body
) -> None:
    # The second device page comes back unreadable: not JSON, no pageDetails, a device without siteUid.
    app = simulator.create_app(devices=30, clock=frozen, slowdown_seconds=0.0)
    served: list[str] = []

    @web.middleware
    async def spoil(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == protocol.DEVICES_PATH:
            served.append(request.query_string)
            if len(served) == 2:
                return web.Response(body=body, content_type="application/json")
        return await handler(request)

    app.middlewares.append(spoil)
    server = await aiohttp_server(app)
    adapter = adapters(str(server.make_url("")).rstrip("/"), page_size=10)
    with pytest.raises(PermanentError) as caught:
        await collect(adapter)
    assert type(caught.value) is PermanentError
    assert caught.value.connection == "datto"
    assert str(caught.value).startswith("datto: ")
    assert len(served) == 2  # not retried


async def test_a_bad_stored_cursor_is_a_permanent_error_naming_the_connection(adapters) -> None:
    adapter = adapters("http://127.0.0.1:9")
    with pytest.raises(PermanentError, match="^datto: stored Datto RMM cursor 'page-3' is not a page number"):
        await collect(adapter, "page-3")

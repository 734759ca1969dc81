"""The NinjaOne adapter against its simulator over loopback."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web

from gateway.adapters import AdapterContext
from gateway.core.clock import FrozenClock
from gateway.core.settings import ConnectionSettings
from gateway.errors import AuthError, ConfigError, PermanentError, RateLimited
from gateway.plugins import get_plugin_manager
from gateway.plugins.ninjaone import protocol, simulator
from gateway.plugins.ninjaone.client import NinjaOneAdapter
from gateway.sync.http import Connector, OAuth2ClientCredentials, RateLimit


async def no_sleep(seconds: float) -> None:
    return None


@pytest.fixture
def frozen() -> FrozenClock:
    return FrozenClock(datetime(2026, 3, 10, 12, 0, tzinfo=UTC))


@pytest.fixture
async def ninja(aiohttp_server: Any, frozen: FrozenClock):
    """Start a simulator; returns (app, base_url)."""

    async def start(**kw: Any) -> tuple[web.Application, str]:
        kw.setdefault("clock", frozen)
        app = simulator.create_app(**kw)
        server = await aiohttp_server(app)
        return app, str(server.make_url("")).rstrip("/")

    return start


@pytest.fixture
async def adapters(frozen: FrozenClock):
    made: list[NinjaOneAdapter] = []

    def make(base_url: str, *, page_size: int = 1000, secret: str = simulator.DEFAULT_CLIENT_SECRET, **kw: Any):
        auth = OAuth2ClientCredentials(
            base_url + protocol.TOKEN_PATH, simulator.DEFAULT_CLIENT_ID, secret, scope=protocol.SCOPE
        )
        kw.setdefault("rate_limit", RateLimit(1000, 1.0, 4))
        connector = Connector(name="ninja", base_url=base_url, auth=auth, clock=frozen, sleep=no_sleep, **kw)
        adapter = NinjaOneAdapter(connector, page_size=page_size)
        made.append(adapter)
        return adapter

    yield make
    for adapter in made:
        await adapter.aclose()


async def collect(adapter: NinjaOneAdapter, cursor: str | None = None) -> list:
    return [page async for page in adapter.fetch_devices(cursor)]


@pytest.mark.parametrize(("devices", "sizes"), [(2350, [1000, 1000, 350]), (2000, [1000, 1000, 0])])
async def test_full_paging_to_the_end(ninja, adapters, frozen, devices: int, sizes: list[int]) -> None:
    app, base_url = await ninja(devices=devices, organizations=30)
    adapter = adapters(base_url)
    pages = await collect(adapter)
    assert [len(p.devices) for p in pages] == sizes
    assert [p.cursor for p in pages][-1] is None
    assert all(p.cursor is not None for p in pages[:-1])
    ids = [d.external_id for p in pages for d in p.devices]
    assert ids == [str(i) for i in range(1, devices + 1)]
    state = app[simulator.STATE]
    sample = state.device(1233, frozen.now())
    parsed = next(d for p in pages for d in p.devices if d.external_id == "1234")
    assert parsed.org_external_id == str(sample["organizationId"])
    assert parsed.hostname == sample["systemName"]
    assert parsed.online is (not sample["offline"])
    assert parsed.last_contact == datetime.fromtimestamp(sample["lastContact"], tz=UTC)


async def test_population_is_realistic_and_deterministic(ninja, adapters, frozen) -> None:
    _, base_url = await ninja(devices=1500, organizations=40, seed=7)
    pages = await collect(adapters(base_url))
    devices = [d for p in pages for d in p.devices]
    offline = sum(not d.online for d in devices)
    assert 0.15 * len(devices) < offline < 0.5 * len(devices)
    ages = [frozen.now() - d.last_contact for d in devices]
    assert max(ages) <= timedelta(days=40)
    assert max(ages) > timedelta(days=20)
    assert len({d.org_external_id for d in devices}) > 30
    _, again = await ninja(devices=1500, organizations=40, seed=7)
    assert [d async for p in adapters(again).fetch_devices() for d in p.devices] == devices


async def test_organizations_are_paged(ninja, adapters) -> None:
    app, base_url = await ninja(organizations=25, devices=10)
    organizations = await adapters(base_url, page_size=10).list_organizations()
    assert [o.external_id for o in organizations] == [str(i) for i in range(1, 26)]
    assert [o.name for o in organizations] == app[simulator.STATE].organization_names
    assert app[simulator.STATE].api_requests == 3


async def test_simulator_quota_answers_429_until_retries_run_out(ninja, adapters) -> None:
    _, base_url = await ninja(devices=5000, rate_limit=(3, 60.0))
    adapter = adapters(base_url, max_attempts=2)
    with pytest.raises(RateLimited):
        await collect(adapter)
    assert adapter.connector.stats.throttled == 2


async def test_token_is_renewed_before_its_lifetime_ends(ninja, adapters, frozen) -> None:
    app, base_url = await ninja(devices=10)
    adapter = adapters(base_url)
    await collect(adapter)
    frozen.advance(seconds=simulator.TOKEN_TTL_SECONDS - 30)  # inside the refresh margin
    await collect(adapter)
    state = app[simulator.STATE]
    assert state.token_requests == 2
    assert state.api_requests == 2  # no 401 was needed


async def test_bad_credentials_raise_auth_error(ninja, adapters) -> None:
    app, base_url = await ninja(devices=10)
    with pytest.raises(AuthError) as caught:
        await collect(adapters(base_url, secret="wrong"))
    assert "credentials" in str(caught.value)
    assert "wrong" not in str(caught.value)
    assert app[simulator.STATE].api_requests == 0


async def test_registered_factory_builds_a_working_adapter(ninja, frozen) -> None:
    _, base_url = await ninja(devices=30, organizations=3)
    spec = get_plugin_manager(load_entry_points=False).adapters()["ninjaone"]
    assert spec.role == "rmm" and spec.simulator is simulator.create_app
    settings = ConnectionSettings(
        name="ninja-eu",
        plugin="ninjaone",
        base_url=base_url,
        credentials={"client_id": simulator.DEFAULT_CLIENT_ID, "client_secret": simulator.DEFAULT_CLIENT_SECRET},
        options={"page_size": 20},
    )
    adapter = spec.factory(settings, AdapterContext(clock=frozen))
    try:
        assert [len(p.devices) for p in await collect(adapter)] == [20, 10]
        assert len(await adapter.list_organizations()) == 3
        assert adapter.connector.rate_limit == protocol.DEFAULT_RATE_LIMIT
    finally:
        await adapter.aclose()


def test_factory_reports_missing_credentials_and_bad_options(frozen) -> None:
    spec = get_plugin_manager(load_entry_points=False).adapters()["ninjaone"]
    settings = ConnectionSettings(name="n1", plugin="ninjaone", base_url="http://127.0.0.1:9", credentials={})
    with pytest.raises(ConfigError, match="client_id"):
        spec.factory(settings, AdapterContext(clock=frozen))
    settings = ConnectionSettings(
        name="n1", plugin="ninjaone", base_url="http://127.0.0.1:9", credentials={"client_id": "a", "client_secret": "b"}
    )
    for bad in (5000, 0, True, "many", 2.5, "²"):
        with pytest.raises(ConfigError) as caught:
            spec.factory(settings.model_copy(update={"options": {"page_size": bad}}), AdapterContext(clock=frozen))
        assert str(caught.value) == (
            f"connection 'n1': options.page_size must be a whole number from 1 to 1000, got {bad!r}"
        )
    adapter = spec.factory(settings.model_copy(update={"options": {"page_size": "250"}}), AdapterContext(clock=frozen))
    assert adapter.page_size == 250  # a number written as text (e.g. from the environment) is fine


async def test_an_answer_slower_than_the_timeout_is_retried_and_the_pull_goes_on(ninja, adapters) -> None:
    app, base_url = await ninja(devices=2500)
    adapter = adapters(base_url, timeout=0.2)
    app[simulator.FAULTS].slow(1, seconds=0.5)
    pages = await collect(adapter)
    assert sum(len(p.devices) for p in pages) == 2500
    assert app[simulator.FAULTS].pending == 0
    assert adapter.connector.stats.retries >= 1


@pytest.mark.parametrize("body", [b"<html>maintenance</html>", b'{"devices": []}', b'[{"id": 7}]'])
async def test_an_unreadable_device_page_is_a_permanent_error_naming_the_connection(
    aiohttp_server, adapters, frozen, body
) -> None:
    # The second device page comes back unreadable: not JSON, not an array, a device without organizationId.
    app = simulator.create_app(devices=30, clock=frozen)
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
    assert caught.value.connection == "ninja"
    assert str(caught.value).startswith("ninja: ")
    assert len(served) == 2  # not retried

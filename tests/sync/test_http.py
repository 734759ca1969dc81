"""The shared connector against a real aiohttp server on loopback, with injected faults."""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from gateway.core.clock import FrozenClock
from gateway.core.settings import ConnectionSettings
from gateway.errors import AuthError, CircuitOpen, PermanentError, RateLimited, TransientError
from gateway.sync.http import (
    Connector,
    OAuth2ClientCredentials,
    OAuth2PasswordGrant,
    RateLimit,
    StaticAuth,
    retry_after_seconds,
)

CLIENT_ID = "client-id-1234"
CLIENT_SECRET = "s3cr3t-client-secret-value"
API_PASSWORD = "p4ssw0rd-secret-value"


@dataclass
class Fault:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False
    body: Any = None


@dataclass
class Tool:
    """A scripted API: queued faults, then 200s; remembers what it received."""

    faults: list[Fault] = field(default_factory=list)
    hits: list[float] = field(default_factory=list)  # monotonic receipt times of /api calls
    auth_headers: list[str | None] = field(default_factory=list)
    token_forms: list[dict[str, str]] = field(default_factory=list)
    token_basic: list[str | None] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    valid_tokens: set[str] = field(default_factory=set)
    expires_in: int = 3600
    token_status: int = 200
    always: Fault | None = None
    in_flight: int = 0
    max_in_flight: int = 0
    handler_delay: float = 0.0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/api/{tail:.*}", self.api)
        app.router.add_post("/oauth/token", self.token)
        return app

    async def api(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(time.monotonic())
        self.auth_headers.append(request.headers.get("Authorization"))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.handler_delay:
                await asyncio.sleep(self.handler_delay)
            if self.valid_tokens:
                header = request.headers.get("Authorization", "")
                if header.removeprefix("Bearer ") not in self.valid_tokens:
                    return web.json_response({"error": "invalid_token"}, status=401)
            fault = self.faults.pop(0) if self.faults else self.always
            if fault is None:
                return web.json_response({"ok": True, "path": request.path, "query": dict(request.query)})
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.drop:
                assert request.transport is not None
                request.transport.close()
                return web.Response(status=200)
            body = fault.body if fault.body is not None else {"status": fault.status}
            return web.json_response(body, status=fault.status, headers=fault.headers)
        finally:
            self.in_flight -= 1

    async def token(self, request: web.Request) -> web.Response:
        form = dict(await request.post())
        self.token_forms.append({k: str(v) for k, v in form.items()})
        self.token_basic.append(request.headers.get("Authorization"))
        if self.token_status != 200:
            return web.json_response({"error": "invalid_client"}, status=self.token_status)
        token = f"tok-{len(self.tokens) + 1}-{'x' * 20}"
        self.tokens.append(token)
        self.valid_tokens = {token}
        return web.json_response({"access_token": token, "token_type": "bearer", "expires_in": self.expires_in})


class Sleeps:
    """An injected sleep that records what it was asked for and returns at once."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
def tool() -> Tool:
    return Tool()


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
async def base_url(aiohttp_server: Any, tool: Tool) -> str:
    server = await aiohttp_server(tool.app())
    return str(server.make_url("")).rstrip("/")


@pytest.fixture
def frozen() -> FrozenClock:
    return FrozenClock(datetime(2026, 3, 10, 12, 0, tzinfo=UTC))


@pytest.fixture
async def make(base_url: str, sleeps: Sleeps, frozen: FrozenClock):
    made: list[Connector] = []

    def factory(**kw: Any) -> Connector:
        kw.setdefault("rate_limit", RateLimit(1000, 1.0, 8))
        kw.setdefault("sleep", sleeps)
        kw.setdefault("clock", frozen)
        connector = Connector(name="tool-1", base_url=base_url, **kw)
        made.append(connector)
        return connector

    yield factory
    for connector in made:
        await connector.aclose()


# --- retries ----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
async def test_retries_each_retryable_status_then_succeeds(make, tool: Tool, sleeps: Sleeps, status: int) -> None:
    tool.faults = [Fault(status), Fault(status)]
    connector = make()
    response = await connector.request("GET", "/api/things", params={"page": 2})
    assert response.status == 200
    assert response.json()["query"] == {"page": "2"}
    assert len(tool.hits) == 3
    assert connector.stats.retries == 2
    assert connector.stats.throttled == (2 if status == 429 else 0)
    assert len(sleeps.calls) == 2


@pytest.mark.parametrize("status", [400, 404, 409, 422])
async def test_no_retry_on_other_4xx(make, tool: Tool, sleeps: Sleeps, status: int) -> None:
    tool.faults = [Fault(status, body={"message": "no such thing"})]
    connector = make()
    with pytest.raises(PermanentError) as caught:
        await connector.request("GET", "/api/things/9")
    assert caught.value.status == status
    assert "no such thing" in str(caught.value)
    assert "tool-1" in str(caught.value)
    assert len(tool.hits) == 1
    assert sleeps.calls == []
    assert not connector.degraded


async def test_backoff_is_full_jitter_exponential(make, tool: Tool, sleeps: Sleeps) -> None:
    tool.faults = [Fault(503)] * 5
    connector = make(backoff_base=1.0, backoff_max=100.0, max_attempts=6)
    await connector.request("GET", "/api/x")
    # wait_random_exponential: uniform in [0, base * 2**n] for attempt n
    for n, waited in enumerate(sleeps.calls):
        assert 0 <= waited <= 1.0 * 2**n
    assert len(set(sleeps.calls)) > 1


async def test_retryable_predicate_adds_retries(make, tool: Tool) -> None:
    tool.faults = [Fault(200, body={"busy": True})]
    connector = make(retryable=lambda r: r.status == 200 and r.json().get("busy") is True)
    response = await connector.request("GET", "/api/x")
    assert response.json()["ok"] is True
    assert len(tool.hits) == 2


async def test_429_exhausted_raises_rate_limited(make, tool: Tool) -> None:
    tool.always = Fault(429)
    connector = make(max_attempts=3)
    with pytest.raises(RateLimited) as caught:
        await connector.request("GET", "/api/x")
    assert caught.value.status == 429
    assert len(tool.hits) == 3
    assert connector.stats.throttled == 3
    assert connector.stats.failures == 1


async def test_5xx_exhausted_raises_transient(make, tool: Tool) -> None:
    tool.always = Fault(502)
    connector = make(max_attempts=4)
    with pytest.raises(TransientError) as caught:
        await connector.request("GET", "/api/x")
    assert not isinstance(caught.value, RateLimited)
    assert caught.value.status == 502
    assert len(tool.hits) == 4


async def test_dropped_connection_is_retried(make, tool: Tool) -> None:
    # aiohttp itself retries an idempotent request once on a fresh connection; drop more than that
    tool.faults = [Fault(drop=True)] * 4
    connector = make()
    response = await connector.request("GET", "/api/x")
    assert response.status == 200
    assert connector.stats.retries >= 1
    assert len(tool.hits) == 5


async def test_retry_after_seconds_is_honoured_and_capped(make, tool: Tool, sleeps: Sleeps) -> None:
    tool.faults = [Fault(429, {"Retry-After": "7"}), Fault(503, {"Retry-After": "500"})]
    connector = make(retry_after_cap=20.0)
    await connector.request("GET", "/api/x")
    assert sleeps.calls == [7.0, 20.0]


async def test_retry_after_http_date_is_measured_against_the_date_header(make, tool: Tool, sleeps: Sleeps) -> None:
    server_now = datetime(2026, 3, 10, 12, 0, 0, tzinfo=UTC)
    retry_at = server_now + timedelta(seconds=4)
    tool.faults = [
        Fault(429, {"Retry-After": format_datetime(retry_at, usegmt=True), "Date": format_datetime(server_now, usegmt=True)})
    ]
    connector = make(clock=FrozenClock(datetime(2030, 1, 1, tzinfo=UTC)))  # our clock is far off
    await connector.request("GET", "/api/x")
    assert sleeps.calls == [4.0]


def test_retry_after_date_without_date_header_uses_our_clock() -> None:
    now = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
    header = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert retry_after_seconds({"Retry-After": header}, now) == 30.0
    assert retry_after_seconds({"Retry-After": "soon"}, now) is None
    assert retry_after_seconds({}, now) is None


async def test_deadline_stops_retries_of_slow_responses(make, tool: Tool) -> None:
    tool.always = Fault(delay=0.5)
    connector = make(timeout=0.1, deadline=0.35, max_attempts=50, sleep=asyncio.sleep, backoff_base=0.01)
    started = time.monotonic()
    with pytest.raises(TransientError) as caught:
        await connector.request("GET", "/api/slow")
    elapsed = time.monotonic() - started
    assert "timed out" in str(caught.value)
    assert elapsed < 0.6
    assert 2 <= len(tool.hits) <= 5


async def test_deadline_refuses_a_retry_after_longer_than_the_deadline(make, tool: Tool, sleeps: Sleeps) -> None:
    tool.always = Fault(429, {"Retry-After": "30"})
    connector = make(deadline=10.0, max_attempts=10)
    with pytest.raises(RateLimited):
        await connector.request("GET", "/api/x")
    assert len(tool.hits) == 1
    assert sleeps.calls == []


# --- rate limit and concurrency ----------------------------------------------------------------


async def test_rate_limit_is_never_exceeded_in_any_window(make, tool: Tool) -> None:
    connector = make(rate_limit=RateLimit(5, 0.4, 4))
    started = time.monotonic()
    await asyncio.gather(*(connector.request("GET", f"/api/{i}") for i in range(15)))
    elapsed = time.monotonic() - started
    hits = sorted(tool.hits)
    for i, at in enumerate(hits):
        in_window = [h for h in hits[i:] if h < at + 0.4]
        assert len(in_window) <= 5
    # three windows' worth: two full waits, and not much more (stays close to the limit)
    assert 0.8 <= elapsed < 1.4


async def test_rate_limit_achieves_close_to_the_limit_without_429s(make, tool: Tool) -> None:
    connector = make(rate_limit=RateLimit(20, 0.25, 4))
    started = time.monotonic()
    for i in range(60):
        await connector.request("GET", f"/api/{i}")
    elapsed = time.monotonic() - started
    # 60 requests at 20 per 0.25 s need two full windows (0.5 s); close to that means close to the limit
    assert 0.5 <= elapsed < 0.65
    assert connector.stats.throttled == 0


async def test_concurrency_cap(make, tool: Tool) -> None:
    tool.handler_delay = 0.03
    connector = make(rate_limit=RateLimit(1000, 1.0, 2))
    await asyncio.gather(*(connector.request("GET", f"/api/{i}") for i in range(8)))
    assert tool.max_in_flight == 2


# --- circuit breaker ------------------------------------------------------------------


async def test_breaker_opens_then_half_open_probe_closes_it(make, tool: Tool, frozen: FrozenClock) -> None:
    tool.always = Fault(503)
    connector = make(max_attempts=1, breaker_threshold=2, breaker_cooldown=30)
    for _ in range(2):
        with pytest.raises(TransientError):
            await connector.request("GET", "/api/x")
    assert connector.degraded
    with pytest.raises(CircuitOpen):
        await connector.request("GET", "/api/x")
    assert len(tool.hits) == 2  # refused without a request

    frozen.advance(seconds=29)
    with pytest.raises(CircuitOpen):
        await connector.request("GET", "/api/x")

    frozen.advance(seconds=2)
    tool.always = None
    response = await connector.request("GET", "/api/x")
    assert response.status == 200
    assert not connector.degraded


async def test_breaker_failed_probe_reopens(make, tool: Tool, frozen: FrozenClock) -> None:
    tool.always = Fault(500)
    connector = make(max_attempts=1, breaker_threshold=1, breaker_cooldown=10)
    with pytest.raises(TransientError):
        await connector.request("GET", "/api/x")
    frozen.advance(seconds=11)
    with pytest.raises(TransientError):  # the probe goes out and fails
        await connector.request("GET", "/api/x")
    assert len(tool.hits) == 2
    with pytest.raises(CircuitOpen):
        await connector.request("GET", "/api/x")
    assert connector.degraded


async def test_breaker_lets_only_one_probe_through(make, tool: Tool, frozen: FrozenClock) -> None:
    tool.always = Fault(500)
    connector = make(max_attempts=1, breaker_threshold=1, breaker_cooldown=10)
    with pytest.raises(TransientError):
        await connector.request("GET", "/api/x")
    frozen.advance(seconds=11)
    tool.always = Fault(200, delay=0.1)
    probe = asyncio.create_task(connector.request("GET", "/api/probe"))
    await asyncio.sleep(0.02)
    with pytest.raises(CircuitOpen):
        await connector.request("GET", "/api/other")
    assert (await probe).status == 200
    assert not connector.degraded


async def test_permanent_errors_do_not_open_the_breaker(make, tool: Tool) -> None:
    tool.always = Fault(404)
    connector = make(breaker_threshold=2)
    for _ in range(4):
        with pytest.raises(PermanentError):
            await connector.request("GET", "/api/x")
    assert not connector.degraded


# --- auth -------------------------------------------------------------------------------


def oauth(base_url: str, **kw: Any) -> OAuth2ClientCredentials:
    return OAuth2ClientCredentials(f"{base_url}/oauth/token", CLIENT_ID, CLIENT_SECRET, scope="monitoring management", **kw)


async def test_static_auth_headers_are_sent(make, tool: Tool) -> None:
    connector = make(auth=StaticAuth({"Authorization": "Basic abc"}), default_headers={"clientId": "x"})
    await connector.request("GET", "/api/x")
    assert tool.auth_headers == ["Basic abc"]


async def test_oauth_token_cached_and_refreshed_before_expiry(make, tool: Tool, base_url: str, frozen: FrozenClock) -> None:
    tool.expires_in = 100  # margin is a tenth: refreshed from 90 s on
    connector = make(auth=oauth(base_url))
    await connector.request("GET", "/api/a")
    frozen.advance(seconds=60)
    await connector.request("GET", "/api/b")
    assert len(tool.tokens) == 1
    frozen.advance(seconds=31)  # 91 s: still valid at the tool, but inside the margin
    await connector.request("GET", "/api/c")
    assert len(tool.tokens) == 2
    assert tool.auth_headers == [f"Bearer {tool.tokens[0]}", f"Bearer {tool.tokens[0]}", f"Bearer {tool.tokens[1]}"]
    assert tool.token_forms[0] == {
        "grant_type": "client_credentials",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "scope": "monitoring management",
    }


async def test_oauth_one_retry_with_fresh_token_on_401(make, tool: Tool, base_url: str) -> None:
    connector = make(auth=oauth(base_url))
    await connector.request("GET", "/api/a")
    tool.valid_tokens = {"something-else"}  # the tool expired every token it issued
    response = await connector.request("GET", "/api/b")
    assert response.status == 200
    assert len(tool.tokens) == 2
    assert len(tool.hits) == 3


async def test_oauth_persistent_401_raises_auth_error_after_one_refresh(make, tool: Tool, base_url: str) -> None:
    tool.always = Fault(401, body={"error": "unauthorized"})
    connector = make(auth=oauth(base_url))
    with pytest.raises(AuthError) as caught:
        await connector.request("GET", "/api/a")
    assert caught.value.status == 401
    assert len(tool.hits) == 2
    assert len(tool.tokens) == 2


async def test_403_raises_auth_error_without_refresh(make, tool: Tool, base_url: str) -> None:
    tool.always = Fault(403)
    connector = make(auth=oauth(base_url))
    with pytest.raises(AuthError) as caught:
        await connector.request("GET", "/api/a")
    assert caught.value.status == 403
    assert len(tool.hits) == 1
    assert len(tool.tokens) == 1


async def test_bad_client_credentials_raise_auth_error(make, tool: Tool, base_url: str) -> None:
    tool.token_status = 401
    connector = make(auth=oauth(base_url))
    with pytest.raises(AuthError) as caught:
        await connector.request("GET", "/api/a")
    assert "credentials" in str(caught.value)
    assert tool.hits == []


async def test_password_grant_sends_form_and_public_client_basic(make, tool: Tool, base_url: str) -> None:
    auth = OAuth2PasswordGrant(f"{base_url}/oauth/token", "API-KEY-1", API_PASSWORD)
    connector = make(auth=auth)
    await connector.request("GET", "/api/a")
    assert tool.token_forms == [{"grant_type": "password", "username": "API-KEY-1", "password": API_PASSWORD}]
    assert tool.token_basic == ["Basic " + base64.b64encode(b"public-client:public").decode()]
    assert tool.auth_headers == [f"Bearer {tool.tokens[0]}"]


async def test_secrets_never_appear_in_logs_or_errors(make, tool: Tool, base_url: str) -> None:
    connector = make(auth=oauth(base_url), max_attempts=2)
    errors: list[str] = []
    with capture_logs() as logs:
        await connector.request("GET", "/api/a")
        tool.valid_tokens = {"gone"}
        tool.faults = [Fault(503)]
        await connector.request("GET", "/api/b", params={"q": "x"})
        tool.always = Fault(401)
        with pytest.raises(AuthError) as caught:
            await connector.request("GET", "/api/c")
        errors.append(str(caught.value))
        tool.token_status = 400
        password = make(auth=OAuth2PasswordGrant(f"{base_url}/oauth/token", "API-KEY-1", API_PASSWORD))
        with pytest.raises(AuthError) as caught:
            await password.request("GET", "/api/d")
        errors.append(str(caught.value))
    events = {entry["event"] for entry in logs}
    assert {"http.request", "http.retry", "http.token", "http.auth_refresh"} <= events
    dumped = repr(logs) + repr(errors) + repr(connector.auth)
    for secret in [CLIENT_SECRET, API_PASSWORD, *tool.tokens, "Bearer", "cHVibGljLWNsaWVudDpwdWJsaWM="]:
        assert secret not in dumped


# --- settings -------------------------------------------------------------------------


async def test_from_settings_prefers_the_configured_rate_limit() -> None:
    settings = ConnectionSettings(
        name="ninja",
        plugin="ninjaone",
        base_url="http://127.0.0.1:1/",
        timeout_seconds=12,
        rate_limit={"requests": 50, "per_seconds": 10, "max_concurrent": 2},
    )
    connector = Connector.from_settings(settings, rate_limit=RateLimit(10, 60))
    assert connector.rate_limit == RateLimit(50, 10, 2)
    assert connector.timeout == 12
    assert connector.base_url == "http://127.0.0.1:1"
    plain = Connector.from_settings(settings.model_copy(update={"rate_limit": None}), rate_limit=RateLimit(10, 60))
    assert plain.rate_limit == RateLimit(10, 60)


def test_rate_limit_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="requests >= 1"):
        RateLimit(0, 1)

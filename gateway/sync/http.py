"""The shared retrying connector every adapter talks through.

One :class:`Connector` per configured connection owns one aiohttp session, a
rate limiter that keeps the gateway *under* the tool's documented limit, a
concurrency cap, tenacity retries with full-jitter back-off and ``Retry-After``,
a deadline per call, a circuit breaker, and the auth flow (static headers or an
OAuth2 token that is cached, refreshed before it expires and refreshed once more
on a 401). Adapters stay thin: they build requests and parse bodies.

Decisions:

- The rate limiter counts a request from the moment it is sent until
  ``per_seconds`` after its *response* arrived. The tool counts it somewhere in
  between, so the gateway's window always covers the tool's and never bounces
  off the limit. The limiter runs on real (monotonic) time: it paces real traffic.
- Back-off sleeps go through the injected ``sleep``; the breaker cooldown and
  token expiry are measured on the injected clock, so tests control both.
- A 401 gets one retry with a fresh token; a 403 does not (a new token does not
  lift a refusal of the resource) and becomes :class:`AuthError` at once.
- Only calls that end in a transient failure (retries or deadline ran out) count
  towards the breaker: a 404 proves the tool is up.
- A 429 without ``Retry-After`` on a connector whose :class:`RateLimit` has a
  ``window_seconds`` (the tool's quota window: Datto RMM 60 s, counted for the whole
  account, and ConnectWise behind Cloudflare) is never retried quickly: the whole
  connection pauses for the window (doubling, up to four windows, while 429s follow
  each other), and then sends at most as many requests per window as succeeded in the
  window before the 429 (sends counted, so never more than the tool let through). A
  tool that blocks an address after a few 429s in a row (Datto: 403) thus sees one 429
  per change of the budget others leave. The learned rate is forgotten after ten
  windows without a 429. Time spent paused does not count towards a call's deadline.
  Without ``window_seconds`` such a 429 gets the usual jittered back-off.
"""

from __future__ import annotations

import asyncio
import base64
import json as _json
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_any,
    wait_random_exponential,
)
from tenacity.stop import stop_base
from yarl import URL

from gateway.core.clock import Clock, SystemClock
from gateway.core.logging import add_secrets
from gateway.errors import AuthError, CircuitOpen, PermanentError, RateLimited, TransientError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from gateway.core.settings import ConnectionSettings

log = structlog.get_logger(__name__)

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_NETWORK_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError)


@dataclass(frozen=True)
class RateLimit:
    """At most ``requests`` per ``per_seconds``, and ``max_concurrent`` in flight."""

    requests: int
    per_seconds: float
    max_concurrent: int = 4
    #: The tool's quota window: after a 429 without ``Retry-After`` the connection pauses this
    #: long and then sends at the rate the window allowed (see the module's decisions). None:
    #: such a 429 gets the ordinary back-off.
    window_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.requests < 1 or self.per_seconds <= 0 or self.max_concurrent < 1:
            raise ValueError(
                f"rate limit needs requests >= 1, per_seconds > 0 and max_concurrent >= 1, got {self!r}"
            )
        if self.window_seconds is not None and self.window_seconds <= 0:
            raise ValueError(f"rate limit window_seconds must be > 0 when set, got {self!r}")


@dataclass(frozen=True)
class HttpResponse:
    """A fully read response; ``headers`` is case-insensitive."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    url: str

    def json(self) -> Any:
        try:
            return _json.loads(self.body)
        except ValueError:
            raise PermanentError(
                f"{_without_query(self.url)} answered HTTP {self.status} with a body that is not JSON",
                status=self.status,
            ) from None

    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


@dataclass
class ConnectorStats:
    """Counters of one connector: calls made, retries, 429s received, calls that failed."""

    calls: int = 0
    retries: int = 0
    throttled: int = 0
    failures: int = 0


# --- auth ----------------------------------------------------------------------------


class Auth(Protocol):
    """Supplies the headers that authenticate a request."""

    async def headers(self, connector: Connector, *, refresh: bool = False) -> dict[str, str]:
        """Headers for the next request; ``refresh=True`` after a 401 asks for new credentials."""
        ...


class StaticAuth(Auth):
    """Fixed headers: API keys, HTTP Basic (ConnectWise, Autotask)."""

    def __init__(self, headers: Mapping[str, str]):
        self._headers = dict(headers)

    async def headers(self, connector: Connector, *, refresh: bool = False) -> dict[str, str]:
        return dict(self._headers)

    def __repr__(self) -> str:  # never show the values
        return f"StaticAuth(headers={sorted(self._headers)})"


class _OAuth2Token(Auth):
    """A cached bearer token, fetched by a subclass's form, refreshed before it expires."""

    #: Refresh this long before ``expires_in`` runs out (at most; a tenth of short lifetimes).
    margin_seconds = 60.0

    def __init__(self, token_url: str):
        self.token_url = token_url
        self._token: str | None = None
        self._expires_at: datetime | None = None
        self._lock = asyncio.Lock()

    async def headers(self, connector: Connector, *, refresh: bool = False) -> dict[str, str]:
        seen = self._token
        async with self._lock:
            now = connector.clock.now()
            stale = self._token is None or self._expires_at is None or now >= self._expires_at
            # After a 401 several requests ask for a refresh at once; the first one does it.
            if stale or (refresh and self._token == seen):
                await self._fetch(connector)
            assert self._token is not None
            return {"Authorization": f"Bearer {self._token}"}

    def _form(self) -> dict[str, str]:
        raise NotImplementedError

    def _extra_headers(self) -> dict[str, str]:
        return {}

    async def _fetch(self, connector: Connector) -> None:
        try:
            response = await connector.request(
                "POST",
                self.token_url,
                data=self._form(),
                headers={"Accept": "application/json", **self._extra_headers()},
                authenticate=False,
            )
        except PermanentError as exc:
            # The token endpoint's refusal (400 invalid_grant, 401 invalid_client) means bad credentials.
            raise AuthError(
                f"the token endpoint refused the credentials (HTTP {exc.status}); check the connection's "
                "credentials",
                connection=connector.name,
                status=exc.status,
            ) from None
        payload = response.json()
        token = payload.get("access_token") if isinstance(payload, dict) else None
        if not token:
            raise AuthError(
                "the token endpoint answered without an access_token", connection=connector.name, status=response.status
            )
        expires_in = float(payload.get("expires_in") or 3600)
        margin = min(self.margin_seconds, expires_in / 10)
        # A token is a secret like any other: no log line may carry it, whoever logs it.
        add_secrets([str(token)], replacing=self._token)
        self._token = str(token)
        self._expires_at = connector.clock.now() + timedelta(seconds=expires_in - margin)
        log.info("http.token", connection=connector.name, token_url=self.token_url, expires_in=expires_in)


class OAuth2ClientCredentials(_OAuth2Token):
    """OAuth2 client-credentials grant (NinjaOne, HaloPSA)."""

    def __init__(self, token_url: str, client_id: str, client_secret: str, scope: str | None = None):
        super().__init__(token_url)
        self._client_id = client_id
        self._client_secret = client_secret
        self._scope = scope

    def _form(self) -> dict[str, str]:
        form = {
            "grant_type": "client_credentials",
            "client_id": self._client_id,
            "client_secret": self._client_secret,
        }
        if self._scope:
            form["scope"] = self._scope
        return form

    def __repr__(self) -> str:
        return f"OAuth2ClientCredentials(token_url={self.token_url!r}, client_id={self._client_id!r})"


class OAuth2PasswordGrant(_OAuth2Token):
    """OAuth2 password grant with a public client in HTTP Basic (Datto RMM: public-client:public)."""

    def __init__(
        self,
        token_url: str,
        username: str,
        password: str,
        client_id: str = "public-client",
        client_secret: str = "public",
    ):
        super().__init__(token_url)
        self._username = username
        self._password = password
        self._client_id = client_id
        self._client_secret = client_secret

    def _form(self) -> dict[str, str]:
        return {"grant_type": "password", "username": self._username, "password": self._password}

    def _extra_headers(self) -> dict[str, str]:
        basic = base64.b64encode(f"{self._client_id}:{self._client_secret}".encode()).decode("ascii")
        return {"Authorization": f"Basic {basic}"}

    def __repr__(self) -> str:
        return f"OAuth2PasswordGrant(token_url={self.token_url!r})"


# --- rate limiting and circuit breaking -----------------------------------------------


class RateLimiter:
    """Sliding window: a slot is held while in flight and for ``per_seconds`` after the response.

    After :meth:`throttled` (a 429 without ``Retry-After``) every caller waits out the pause,
    and the window then admits only the learned number of requests (``allowed``).
    """

    #: A learned rate is forgotten after this many windows without a 429.
    forget_after_windows = 10

    def __init__(
        self,
        limit: RateLimit,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.limit = limit
        self.allowed = limit.requests
        self._monotonic = monotonic
        self._sleep = sleep
        self._done: deque[float] = deque()  # response times of recent requests, ascending
        self._ok_sent: deque[float] = deque()  # send times of recent successful requests, ascending
        self._in_flight = 0
        self._lock = asyncio.Lock()  # first come, first served
        self._released = asyncio.Event()
        self._paused_until = 0.0
        self._throttled_at: float | None = None
        self._pauses_in_a_row = 0

    def now(self) -> float:
        return self._monotonic()

    async def acquire(self) -> float:
        """Wait for a slot; returns the send time to hand back to :meth:`release`."""
        async with self._lock:
            while True:
                now = self._monotonic()
                if now < self._paused_until:
                    await self._sleep(self._paused_until - now)
                    continue
                window = self.limit.window_seconds or self.limit.per_seconds
                if (
                    self._throttled_at is not None
                    and now - self._throttled_at > self.forget_after_windows * window
                ):
                    self.allowed, self._throttled_at = self.limit.requests, None
                horizon = now - self.limit.per_seconds
                while self._done and self._done[0] <= horizon:
                    self._done.popleft()
                if len(self._done) + self._in_flight < self.allowed:
                    self._in_flight += 1
                    return now
                self._released.clear()
                wait = self._done[0] - horizon if self._done else None
                await self._wait_for_release(wait)

    async def _wait_for_release(self, timeout: float | None) -> None:
        if timeout is None:
            await self._released.wait()
            return
        if self._in_flight == 0:  # nothing will release: only time frees a slot
            await self._sleep(timeout)
            return
        sleeper = asyncio.ensure_future(self._sleep(timeout))
        waiter = asyncio.ensure_future(self._released.wait())
        try:
            await asyncio.wait({sleeper, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waiter.cancel()

    def release(self, sent_at: float | None = None, *, ok: bool = False) -> None:
        self._in_flight -= 1
        now = self._monotonic()
        self._done.append(now)
        if ok and sent_at is not None:
            self._ok_sent.append(sent_at)
            self._pauses_in_a_row = 0
        window = self.limit.window_seconds or self.limit.per_seconds
        while self._ok_sent and self._ok_sent[0] <= now - window:
            self._ok_sent.popleft()
        self._released.set()

    def throttled(self, sent_at: float) -> float:
        """A 429 without ``Retry-After`` for a request sent at ``sent_at``: pause, learn; the pause in seconds."""
        window = self.limit.window_seconds or self.limit.per_seconds
        now = self._monotonic()
        if self._throttled_at is not None and sent_at < self._throttled_at:
            # Sent before the pause began (in flight beside the first 429): the lesson is learned already.
            return max(0.0, self._paused_until - now)
        while self._ok_sent and self._ok_sent[0] <= now - window:
            self._ok_sent.popleft()
        succeeded = len(self._ok_sent)
        # Sends counted (not responses): every one of them reached the tool inside its window.
        self.allowed = max(1, min(self.limit.requests, succeeded if succeeded else self.allowed // 2))
        self._pauses_in_a_row += 1
        pause = window * min(4, 2 ** (self._pauses_in_a_row - 1))
        self._paused_until = now + pause
        self._throttled_at = now
        self._ok_sent.clear()
        return pause


class CircuitBreaker:
    """Opens after ``threshold`` consecutive failed calls; after ``cooldown`` one probe may pass."""

    def __init__(self, threshold: int, cooldown: float, clock: Clock):
        self.threshold = threshold
        self.cooldown = timedelta(seconds=cooldown)
        self._clock = clock
        self.state = "closed"  # closed | open | half_open
        self._failures = 0
        self._opened_at: datetime | None = None
        self._probing = False

    def allow(self) -> bool:
        """Whether a call may go out now; in half-open state only the one probe."""
        if self.state == "closed":
            return True
        if self.state == "open":
            assert self._opened_at is not None
            if self._clock.now() < self._opened_at + self.cooldown:
                return False
            self.state = "half_open"
        if self._probing:
            return False
        self._probing = True
        return True

    def retry_at(self) -> datetime | None:
        return self._opened_at + self.cooldown if self._opened_at else None

    def success(self) -> bool:
        """Record a call that reached the tool; True when this closed the breaker."""
        was_open = self.state != "closed"
        self.state, self._failures, self._opened_at, self._probing = "closed", 0, None, False
        return was_open

    def failure(self) -> bool:
        """Record a failed call; True when this opened the breaker."""
        if self.state == "half_open":
            self.state, self._opened_at, self._probing = "open", self._clock.now(), False
            return True
        self._failures += 1
        if self.state == "closed" and self._failures >= self.threshold:
            self.state, self._opened_at = "open", self._clock.now()
            return True
        return False

    def abandon(self) -> None:
        """A probe ended without a verdict (cancelled): let the next call probe."""
        self._probing = False


# --- the connector -----------------------------------------------------------------


class _StopAtDeadline(stop_base):
    """Stop when the next sleep would end past the call's deadline (which waits in the limiter move on)."""

    def __init__(self, deadline: list[float]):
        self.deadline = deadline

    def __call__(self, retry_state: RetryCallState) -> bool:
        return time.monotonic() + (retry_state.upcoming_sleep or 0.0) >= self.deadline[0]


class _RetryableResponse(Exception):
    def __init__(self, response: HttpResponse):
        super().__init__(f"HTTP {response.status}")
        self.response = response


class Connector:
    """One tool's HTTP endpoint: session, limits, retries, breaker and auth."""

    def __init__(
        self,
        *,
        name: str,
        base_url: str,
        rate_limit: RateLimit,
        auth: Auth | None = None,
        clock: Clock | None = None,
        timeout: float = 30.0,
        deadline: float = 120.0,
        max_attempts: int = 6,
        retry_after_cap: float = 60.0,
        breaker_threshold: int = 5,
        breaker_cooldown: float = 30.0,
        default_headers: Mapping[str, str] | None = None,
        retryable: Callable[[HttpResponse], bool] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        monotonic: Callable[[], float] | None = None,
    ):
        """``monotonic`` paces the rate limiter; when given, the limiter also waits through ``sleep``
        (a test's virtual time), otherwise it runs on real time whatever ``sleep`` is."""
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.rate_limit = rate_limit
        self.auth = auth
        self.clock: Clock = clock or SystemClock()
        self.timeout = timeout
        self.deadline = deadline
        self.max_attempts = max_attempts
        self.retry_after_cap = retry_after_cap
        self.default_headers = dict(default_headers or {})
        self.stats = ConnectorStats()
        self._retryable = retryable
        self._sleep = sleep
        self._backoff = wait_random_exponential(multiplier=backoff_base, max=backoff_max)
        self._limiter = (
            RateLimiter(rate_limit, monotonic, sleep) if monotonic is not None else RateLimiter(rate_limit)
        )
        self._concurrency = asyncio.Semaphore(rate_limit.max_concurrent)
        self._breaker = CircuitBreaker(breaker_threshold, breaker_cooldown, self.clock)
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_settings(
        cls,
        settings: ConnectionSettings,
        *,
        rate_limit: RateLimit,
        auth: Auth | None = None,
        clock: Clock | None = None,
        **kw: Any,
    ) -> Connector:
        """Build from a ``[[connections]]`` table; its ``rate_limit`` overrides the adapter's default."""
        if settings.rate_limit is not None:
            override = settings.rate_limit
            rate_limit = RateLimit(
                override.requests, override.per_seconds, override.max_concurrent, rate_limit.window_seconds
            )
        kw.setdefault("timeout", settings.timeout_seconds)
        return cls(name=settings.name, base_url=settings.base_url, rate_limit=rate_limit, auth=auth, clock=clock, **kw)

    @property
    def degraded(self) -> bool:
        """True while the circuit breaker is open or probing."""
        return self._breaker.state != "closed"

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def __aenter__(self) -> Connector:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def url(self, url: str) -> str:
        """Absolute URL for ``url`` (absolute already, or relative to ``base_url``)."""
        if url.startswith(("http://", "https://")):
            return url
        return f"{self.base_url}/{url.lstrip('/')}"

    async def request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        authenticate: bool = True,
    ) -> HttpResponse:
        """Send one request with retries; return a 2xx/3xx response or raise a gateway error.

        ``authenticate=False`` sends without auth headers and outside the breaker: it is how an
        :class:`Auth` fetches a token inside a call that does its own breaker bookkeeping.
        """
        method = method.upper()
        target = self.url(url)
        shown = str(URL(target).update_query(_clean_params(params))) if params else target
        self.stats.calls += 1
        if authenticate and not self._breaker.allow():
            self.stats.failures += 1
            retry_at = self._breaker.retry_at()
            raise CircuitOpen(
                f"calls are paused after repeated failures; the next probe goes out at "
                f"{retry_at.isoformat() if retry_at else 'the end of the cooldown'}",
                connection=self.name,
            )
        # A one-element list: time the rate limiter keeps a request waiting moves the deadline on.
        deadline = [time.monotonic() + self.deadline]
        retrying = AsyncRetrying(
            retry=retry_if_exception_type((_RetryableResponse, *_NETWORK_ERRORS)),
            wait=self._wait,
            stop=stop_any(
                stop_after_attempt(self.max_attempts),
                _StopAtDeadline(deadline),
            ),
            sleep=self._sleep,
            before_sleep=lambda state: self._before_retry(state, method, shown),
            reraise=True,
        )
        attempts = 0
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    response = await self._attempt(
                        method, target, shown, params, json, data, headers, authenticate, deadline
                    )
        except _RetryableResponse as exc:
            status = exc.response.status
            error_type = RateLimited if status == 429 else TransientError
            self._failed(authenticate, method, shown, f"HTTP {status}", attempts)
            raise error_type(
                f"{method} {_without_query(shown)} still answered HTTP {status} after {attempts} attempt(s)",
                connection=self.name,
                status=status,
            ) from None
        except _NETWORK_ERRORS as exc:
            reason = _describe_network_error(exc)
            self._failed(authenticate, method, shown, reason, attempts)
            raise TransientError(
                f"{method} {_without_query(shown)} failed after {attempts} attempt(s): {reason}",
                connection=self.name,
            ) from None
        except PermanentError:
            self.stats.failures += 1
            if authenticate:
                self._succeeded()  # the tool answered: it is up
            raise
        except TransientError:  # a token request inside this call ran out of retries
            self.stats.failures += 1
            if authenticate and self._breaker.failure():
                log.error("http.breaker_open", connection=self.name, cooldown=self._breaker.cooldown.total_seconds())
            raise
        except BaseException:
            if authenticate:
                self._breaker.abandon()
            raise
        if authenticate:
            self._succeeded()
        return response

    # -- one attempt -----------------------------------------------------------------

    async def _attempt(
        self,
        method: str,
        target: str,
        shown: str,
        params: Mapping[str, Any] | None,
        json: Any,
        data: Any,
        headers: Mapping[str, str] | None,
        authenticate: bool,
        deadline_at: list[float],
    ) -> HttpResponse:
        auth = self.auth if authenticate else None
        auth_headers = await auth.headers(self) if auth is not None else {}
        response = await self._send(method, target, shown, params, json, data, headers, auth_headers, deadline_at)
        if response.status == 401 and auth is not None:
            log.info("http.auth_refresh", connection=self.name, method=method, url=shown)
            auth_headers = await auth.headers(self, refresh=True)
            response = await self._send(method, target, shown, params, json, data, headers, auth_headers, deadline_at)
        status = response.status
        if status in RETRY_STATUSES or (self._retryable is not None and self._retryable(response)):
            raise _RetryableResponse(response)
        if status in (401, 403) and authenticate:
            raise AuthError(
                f"{method} {_without_query(shown)} was refused with HTTP {status}"
                + (" even with a fresh token" if status == 401 and auth is not None else "")
                + "; check the connection's credentials and the API user's permissions",
                connection=self.name,
                status=status,
            )
        if status >= 400:
            raise PermanentError(
                f"{method} {_without_query(shown)} answered HTTP {status}: {_snippet(response)}",
                connection=self.name,
                status=status,
            )
        return response

    async def _send(
        self,
        method: str,
        target: str,
        shown: str,
        params: Mapping[str, Any] | None,
        json: Any,
        data: Any,
        headers: Mapping[str, str] | None,
        auth_headers: Mapping[str, str],
        deadline_at: list[float],
    ) -> HttpResponse:
        session = self._get_session()
        merged = {**self.default_headers, **(headers or {}), **auth_headers}
        async with self._concurrency:
            queued = time.monotonic()
            sent_at = await self._limiter.acquire()
            started = time.monotonic()
            deadline_at[0] += started - queued
            ok = False
            try:
                remaining = deadline_at[0] - started
                if remaining <= 0:
                    raise TimeoutError()
                async with session.request(
                    method,
                    target,
                    params=_clean_params(params),
                    json=json,
                    data=data,
                    headers=merged,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=min(self.timeout, remaining)),
                ) as raw:
                    body = await raw.read()
                    response = HttpResponse(raw.status, raw.headers, body, str(raw.url))
                    # Token requests are not counted as what the quota let through: tools count API calls.
                    ok = response.status < 400 and bool(auth_headers)
            finally:
                self._limiter.release(sent_at, ok=ok)
        if response.status == 429:
            self.stats.throttled += 1
            if self.rate_limit.window_seconds and retry_after_seconds(response.headers, self.clock.now()) is None:
                pause = self._limiter.throttled(sent_at)
                log.warning(
                    "http.throttled",
                    connection=self.name,
                    url=shown,
                    pause=round(pause, 3),
                    allowed_per_window=self._limiter.allowed,
                )
        log.debug(
            "http.request",
            connection=self.name,
            method=method,
            url=shown,
            status=response.status,
            ms=round((time.monotonic() - started) * 1000, 1),
        )
        return response

    # -- retries, breaker, bookkeeping ---------------------------------------------------

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _RetryableResponse):
            after = retry_after_seconds(exc.response.headers, self.clock.now())
            if after is not None:
                return min(after, self.retry_after_cap)
            if exc.response.status == 429 and self.rate_limit.window_seconds:
                return 0.0  # the rate limiter holds every request until the window has passed
        return float(self._backoff(state))

    def _before_retry(self, state: RetryCallState, method: str, shown: str) -> None:
        self.stats.retries += 1
        exc = state.outcome.exception() if state.outcome else None
        reason = str(exc) if isinstance(exc, _RetryableResponse) else _describe_network_error(exc)
        log.warning(
            "http.retry",
            connection=self.name,
            method=method,
            url=shown,
            attempt=state.attempt_number,
            reason=reason,
            wait=round(state.upcoming_sleep, 3),
        )

    def _failed(self, authenticate: bool, method: str, shown: str, reason: str, attempts: int) -> None:
        self.stats.failures += 1
        log.error("http.failed", connection=self.name, method=method, url=shown, reason=reason, attempts=attempts)
        if authenticate and self._breaker.failure():
            log.error(
                "http.breaker_open",
                connection=self.name,
                cooldown=self._breaker.cooldown.total_seconds(),
            )

    def _succeeded(self) -> None:
        if self._breaker.success():
            log.info("http.breaker_closed", connection=self.name)

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(raise_for_status=False)
        return self._session


# --- helpers ---------------------------------------------------------------------------


def retry_after_seconds(headers: Mapping[str, str], now: datetime) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date), or None.

    A date is measured against the response's own ``Date`` header when present, so a
    difference between the tool's clock and ours does not stretch the wait.
    """
    value = headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    at = _http_date(value)
    if at is None:
        return None
    reference = _http_date(headers.get("Date", "")) or now
    return max(0.0, (at - reference).total_seconds())


def _http_date(value: str) -> datetime | None:
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed is None:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _clean_params(params: Mapping[str, Any] | None) -> dict[str, str] | None:
    if params is None:
        return None
    cleaned: dict[str, str] = {}
    for key, value in params.items():
        if value is None:
            continue
        cleaned[key] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return cleaned


def _without_query(url: str) -> str:
    return url.split("?", 1)[0]


def _snippet(response: HttpResponse, limit: int = 200) -> str:
    text = " ".join(response.text().split())
    return (text[:limit] + "…") if len(text) > limit else (text or "(empty body)")


def _describe_network_error(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

"""A Datto RMM API v2 simulator, for tests, benchmarks and the demo.

What it reproduces, and where it was checked:

- Tokens from ``POST /auth/oauth/token``: HTTP Basic ``public-client:public`` and the
  form ``grant_type=password&username=<API key>&password=<API secret key>``; tokens
  live 100 hours, then requests answer 401. Bad keys get the OAuth2 ``invalid_grant``.
  https://rmm.datto.com/help/en/Content/2SETUP/APIv2.htm (token lifetime, quota),
  https://docs.nango.dev/integrations/all/datto-rmm (public-client/public),
  https://docs.nango.dev/integrations/all/datto-rmm-password-grant/connect (API key and
  secret as the password grant).
- ``GET /api/v2/account/sites`` and ``GET /api/v2/account/devices`` with ``max`` and a
  0-based ``page``, answering ``{"sites"|"devices": [...], "pageDetails": {"count",
  "nextPageUrl", "prevPageUrl"}}`` until ``nextPageUrl`` is null; device fields ``uid``,
  ``id``, ``siteUid``, ``siteId``, ``siteName``, ``hostname``, ``deviceClass`` (device,
  printer, esxihost, unknown), ``deviceType``, ``online``, ``deleted``, ``lastSeen``,
  ``creationDate`` (epoch milliseconds) and more.
  https://www.powershellgallery.com/packages/DattoRMM/1.0.0.6/Content/functions%5CGet-DrmmAccountDevices.ps1
  (the Device and PaginationData models) and
  https://www.powershellgallery.com/packages/DattoRMM/1.0.0.25/Content/functions%5CGet-DrmmAccountDevices.ps1
  (paging ``max``/``page`` until ``nextPageUrl`` is null).
- The quota: 600 requests in any 60 seconds across the account, "for all users" (other
  integrations of the account spend it too: ``spent_by_others``); above 90% every
  response is delayed by one second; past the quota 429, which carries no
  ``Retry-After``; a caller that keeps retrying is blocked with 403 for a while: here
  three 429s in a row (``block_after``) block it for ``block_seconds`` (same sources as
  above). ``monotonic`` and ``sleep`` may be a test's :class:`~gateway.simulators.VirtualTime`.

Error bodies follow Spring's defaults (``timestamp``, ``status``, ``error``,
``message``), OAuth2 errors the ``error``/``error_description`` pair.

The population is generated from ``random.Random(seed)``: site names and sizes up
front, devices lazily from their index, so 100,000 devices cost no memory until a
page is asked for. ``lastSeen`` is spread over the last ~40 days relative to the
simulator's clock: online devices (about 72%) keep checking in as the clock moves,
the others stay where they stopped; about 2% of devices are deleted.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import itertools
import random
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web

from gateway.core.clock import Clock, SystemClock
from gateway.simulators import Faults, RequestWindow, company_names

DEFAULT_API_KEY = "SIMDATTOAPIKEY0001"
DEFAULT_API_SECRET = "SIMDATTOSECRET0001"
TOKEN_TTL_SECONDS = 100 * 3600 - 1
MAX_PAGE_SIZE = 250
_PUBLIC_CLIENT = "Basic " + base64.b64encode(b"public-client:public").decode("ascii")

_TYPES = (  # (deviceClass, deviceType.category, weight)
    ("device", "Desktop", 50),
    ("device", "Laptop", 30),
    ("device", "Server", 12),
    ("esxihost", "ESXi Host", 2),
    ("printer", "Printer", 4),
    ("unknown", "Unknown", 2),
)
_TYPE_WEIGHTS = list(itertools.accumulate(w for *_, w in _TYPES))
_OS = {
    "Desktop": ("Microsoft Windows 11 Pro 23H2", "Microsoft Windows 10 Pro 22H2", "macOS Sonoma 14.5"),
    "Laptop": ("Microsoft Windows 11 Pro 23H2", "Microsoft Windows 11 Enterprise 23H2", "macOS Sequoia 15.1"),
    "Server": ("Microsoft Windows Server 2022 Standard", "Microsoft Windows Server 2019 Standard", "Ubuntu 22.04 LTS"),
}


class DattoState:
    """The simulated account: keys, sites, the device population, tokens, quota and blocking."""

    def __init__(
        self,
        *,
        seed: int,
        sites: int,
        devices: int,
        api_key: str,
        api_secret: str,
        clock: Clock,
        rate_limit: tuple[int, float],
        slowdown_seconds: float,
        block_after: int,
        block_seconds: float,
        token_ttl: int,
        spent_by_others: int = 0,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        if sites < 1:
            raise ValueError("the simulator needs at least one site")
        self.seed = seed
        self.api_key = api_key
        self.api_secret = api_secret
        self.clock = clock
        self.started = clock.now()
        self.token_ttl = token_ttl
        self.monotonic = monotonic
        self.sleep = sleep
        self.window = RequestWindow(*rate_limit, reserved=spent_by_others, monotonic=monotonic)
        self.slowdown_seconds = slowdown_seconds
        self.block_after = block_after
        self.block_seconds = block_seconds
        self.in_a_row = 0  # 429s since the last admitted request
        self.blocked_until = 0.0
        self.blocks = 0
        rng = random.Random(seed)
        self.site_names = company_names(rng, sites)
        self.site_uids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(sites)]
        weights = [rng.lognormvariate(0, 1) for _ in range(sites)]
        self._cumulative = list(itertools.accumulate(weights))
        self.device_count = devices
        self._site_counts: list[tuple[int, int]] | None = None
        self.tokens: dict[str, tuple[int, datetime]] = {}
        self.api_requests = 0
        self.token_requests = 0
        self.throttled = 0

    def add_devices(self, count: int) -> None:
        """New devices enrol (they get the next indexes)."""
        self.device_count += count
        self._site_counts = None

    def breach(self) -> None:
        """Count a 429; ``block_after`` of them in a row block the address."""
        self.in_a_row += 1
        if self.in_a_row >= self.block_after:
            self.blocked_until = self.monotonic() + self.block_seconds
            self.blocks += 1
            self.in_a_row = 0

    @property
    def blocked(self) -> bool:
        return self.monotonic() < self.blocked_until

    def _site_of(self, rng: random.Random) -> int:
        index = bisect.bisect_left(self._cumulative, rng.random() * self._cumulative[-1])
        return min(index, len(self._cumulative) - 1)

    def device(self, index: int, now: datetime, base_url: str) -> dict[str, Any]:
        """Device number ``index`` as ``GET /api/v2/account/devices`` shows it at ``now``."""
        rng = random.Random(self.seed * 1_000_003 + index)
        site = self._site_of(rng)  # first draw: see site_counts
        device_class, category, _ = _TYPES[bisect.bisect_left(_TYPE_WEIGHTS, rng.random() * _TYPE_WEIGHTS[-1])]
        roll = rng.random()
        if roll < 0.72:
            ago = rng.uniform(0, 240)  # the agent's heartbeat: online
        elif roll < 0.95:
            ago = rng.uniform(900, 14 * 86400)
        else:
            ago = rng.uniform(14 * 86400, 40 * 86400)
        deleted = rng.random() < 0.02
        uid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        # Online devices keep checking in; the others stopped at a fixed time before the simulator started.
        last_seen = int(((now if roll < 0.72 else self.started).timestamp() - ago) * 1000)
        created = last_seen - int(rng.uniform(30 * 86400, 900 * 86400) * 1000)
        hostname = f"{category[:3].upper()}-{rng.randrange(16**6):06X}"
        device_id = 100_000 + index
        return {
            "id": device_id,
            "uid": uid,
            "siteId": 1000 + site,
            "siteUid": self.site_uids[site],
            "siteName": self.site_names[site],
            "deviceType": {"category": category, "type": category},
            "hostname": hostname,
            "intIpAddress": f"10.{site % 250}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
            "operatingSystem": rng.choice(_OS.get(category, ("",))),
            "lastLoggedInUser": f"CORP\\user{rng.randrange(1000)}" if category in ("Desktop", "Laptop") else "",
            "domain": "CORP",
            "cagVersion": "4.4.2200.2200",
            "displayVersion": "",
            "extIpAddress": f"203.0.113.{site % 254 + 1}",
            "description": "",
            "a64Bit": True,
            "rebootRequired": rng.random() < 0.1,
            "online": (ago <= 300) and not deleted,
            "suspended": False,
            "deleted": deleted,
            "lastSeen": last_seen,
            "lastReboot": last_seen - int(rng.uniform(3600, 30 * 86400) * 1000),
            "lastAuditDate": last_seen - int(rng.uniform(0, 86400) * 1000),
            "creationDate": created,
            "udf": {},
            "snmpEnabled": device_class == "printer",
            "deviceClass": device_class,
            "portalUrl": f"{base_url}/device/{device_id}/{hostname}",
            "warrantyDate": None,
            "antivirus": {"antivirusProduct": "Datto AV", "antivirusStatus": "RunningAndUpToDate"},
            "patchManagement": {"patchStatus": "FullyPatched", "patchesApprovedPending": 0},
            "softwareStatus": "Compliant",
        }

    def site_counts(self) -> list[tuple[int, int]]:
        """(devices, online devices) per site, not counting deleted ones; computed once per population.

        Replays the first draws of :meth:`device` (site, type, roll, age, deleted) without building devices.
        """
        if self._site_counts is None:
            counts = [[0, 0] for _ in self.site_uids]
            for index in range(self.device_count):
                rng = random.Random(self.seed * 1_000_003 + index)
                site = self._site_of(rng)
                rng.random()
                roll = rng.random()
                draw = rng.random()  # every branch of device() draws the age once
                age = 240 * draw if roll < 0.72 else 901.0
                if rng.random() < 0.02:
                    continue
                counts[site][0] += 1
                counts[site][1] += age <= 300
            self._site_counts = [(total, online) for total, online in counts]
        return self._site_counts

    def site(self, index: int, counts: list[tuple[int, int]], base_url: str) -> dict[str, Any]:
        total, online = counts[index]
        return {
            "id": 1000 + index,
            "uid": self.site_uids[index],
            "accountUid": "SIMACCOUNT",
            "name": self.site_names[index],
            "description": "",
            "notes": "",
            "onDemand": False,
            "splashtopAutoInstall": False,
            "proxy": None,
            "devicesStatus": {
                "numberOfDevices": total,
                "numberOfOnlineDevices": online,
                "numberOfOfflineDevices": total - online,
            },
            "autotaskCompanyName": None,
            "autotaskCompanyId": None,
            "portalUrl": f"{base_url}/site/{1000 + index}",
        }


STATE = web.AppKey("datto_rmm_state", DattoState)
FAULTS = web.AppKey("datto_rmm_faults", Faults)


def _error(status: int, message: str) -> dict[str, Any]:
    reasons = {401: "Unauthorized", 403: "Forbidden", 429: "Too Many Requests", 400: "Bad Request"}
    return {
        "timestamp": int(time.time() * 1000),
        "status": status,
        "error": reasons.get(status, "Internal Server Error" if status >= 500 else "Error"),
        "message": message,
    }


def _blocked() -> web.Response:
    return web.json_response(
        _error(403, "Access denied: too many requests over the rate limit; the address is blocked for a while"),
        status=403,
    )


def _page_args(request: web.Request) -> tuple[int, int]:
    try:
        size = int(request.query.get("max", str(MAX_PAGE_SIZE)))
        page = int(request.query.get("page", "0"))
    except ValueError:
        raise web.HTTPBadRequest(
            text='{"status": 400, "error": "Bad Request", "message": "max and page must be integers"}',
            content_type="application/json",
        ) from None
    return max(1, min(size, MAX_PAGE_SIZE)), max(0, page)


def _page_details(request: web.Request, size: int, page: int, count: int, total: int) -> dict[str, Any]:
    base = f"{request.url.origin()}{request.path}"
    more = (page + 1) * size < total
    return {
        "count": count,
        "totalCount": total,
        "prevPageUrl": f"{base}?max={size}&page={page - 1}" if page > 0 else None,
        "nextPageUrl": f"{base}?max={size}&page={page + 1}" if more else None,
    }


@web.middleware
async def _gatekeeper(request: web.Request, handler: Any) -> web.StreamResponse:
    """Blocking, quota, planned faults and the bearer token, in that order, for every API path."""
    state: DattoState = request.app[STATE]
    if state.blocked:
        return _blocked()
    if not request.path.startswith("/api/"):
        return await handler(request)
    wait = state.window.admit()
    if wait is not None:
        state.throttled += 1
        state.breach()
        if state.blocked:
            return _blocked()
        return web.json_response(_error(429, "Request rate limit exceeded"), status=429)  # no Retry-After
    state.in_a_row = 0
    state.api_requests += 1
    if state.slowdown_seconds and state.window.count() > 0.9 * state.window.limit:
        await state.sleep(state.slowdown_seconds)
    fault = await request.app[FAULTS].inject(request, _error)
    if fault is not None:
        return fault
    token = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    issued = state.tokens.get(token)
    if issued is None or issued[0] != request.app[FAULTS].token_generation or state.clock.now() >= issued[1]:
        return web.json_response(
            {"error": "invalid_token", "error_description": "Access token expired or invalid"}, status=401
        )
    return await handler(request)


async def _token(request: web.Request) -> web.Response:
    state: DattoState = request.app[STATE]
    state.token_requests += 1
    if request.headers.get("Authorization") != _PUBLIC_CLIENT:
        return web.json_response(
            {"error": "unauthorized", "error_description": "Full authentication is required to access this resource"},
            status=401,
        )
    form = await request.post()
    if form.get("grant_type") != "password":
        return web.json_response({"error": "unsupported_grant_type"}, status=400)
    if form.get("username") != state.api_key or form.get("password") != state.api_secret:
        return web.json_response({"error": "invalid_grant", "error_description": "Bad credentials"}, status=400)
    token = secrets.token_urlsafe(32)
    state.tokens[token] = (request.app[FAULTS].token_generation, state.clock.now() + timedelta(seconds=state.token_ttl))
    return web.json_response(
        {
            "access_token": token,
            "token_type": "bearer",
            "expires_in": state.token_ttl,
            "scope": "default",
            "jti": str(uuid.uuid4()),
        }
    )


async def _sites(request: web.Request) -> web.Response:
    state: DattoState = request.app[STATE]
    size, page = _page_args(request)
    total = len(state.site_uids)
    start, end = page * size, min((page + 1) * size, total)
    counts = state.site_counts()
    base = str(request.url.origin())
    sites = [state.site(i, counts, base) for i in range(start, end)]
    return web.json_response({"pageDetails": _page_details(request, size, page, len(sites), total), "sites": sites})


async def _devices(request: web.Request) -> web.Response:
    state: DattoState = request.app[STATE]
    size, page = _page_args(request)
    total = state.device_count
    start, end = page * size, min((page + 1) * size, total)
    now = state.clock.now()
    base = str(request.url.origin())
    devices = [state.device(i, now, base) for i in range(start, end)]
    return web.json_response(
        {"pageDetails": _page_details(request, size, page, len(devices), total), "devices": devices}
    )


def create_app(
    *,
    seed: int = 1,
    sites: int = 20,
    devices: int = 500,
    api_key: str = DEFAULT_API_KEY,
    api_secret: str = DEFAULT_API_SECRET,
    clock: Clock | None = None,
    rate_limit: tuple[int, float] = (600, 60.0),
    slowdown_seconds: float = 1.0,
    block_after: int = 3,
    block_seconds: float = 300.0,
    token_ttl: int = TOKEN_TTL_SECONDS,
    organizations: int | None = None,
    spent_by_others: int = 0,
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> web.Application:
    """A Datto RMM account with ``sites`` sites (``organizations`` is an alias) and ``devices`` devices.

    ``spent_by_others`` requests of every quota window are used by the account's other
    integrations, so only ``rate_limit[0] - spent_by_others`` are left for the caller.
    """
    app = web.Application(middlewares=[_gatekeeper])
    app[STATE] = DattoState(
        seed=seed,
        sites=organizations if organizations is not None else sites,
        devices=devices,
        api_key=api_key,
        api_secret=api_secret,
        clock=clock or SystemClock(),
        rate_limit=rate_limit,
        slowdown_seconds=slowdown_seconds,
        block_after=block_after,
        block_seconds=block_seconds,
        token_ttl=token_ttl,
        spent_by_others=spent_by_others,
        monotonic=monotonic,
        sleep=sleep,
    )
    app[FAULTS] = Faults()
    app.router.add_post("/auth/oauth/token", _token)
    app.router.add_get("/api/v2/account/sites", _sites)
    app.router.add_get("/api/v2/account/devices", _devices)
    return app

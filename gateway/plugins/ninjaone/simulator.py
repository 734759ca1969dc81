"""A NinjaOne public API v2 simulator, for tests, benchmarks and the demo.

What it reproduces, and where it was checked:

- OAuth2 client credentials at ``POST /ws/oauth/token`` (form ``grant_type``,
  ``client_id``, ``client_secret``, ``scope``; scopes ``monitoring``, ``management``,
  ``control``), answering ``access_token``/``token_type``/``expires_in`` (3600 s);
  bad client credentials get the OAuth2 ``invalid_client`` error.
  https://www.ninjaone.com/docs/application-programming-interface-api/oauth-token-configuration
  (scopes), and public clients posting to ``https://app.ninjarmm.com/ws/oauth/token`` and
  ``https://eu.ninjarmm.com/ws/oauth/token`` (GitHub code search, e.g. region maps in
  NinjaOne client libraries).
- ``GET /v2/organizations`` and ``GET /v2/devices`` with ``pageSize`` and ``after``
  (the last device id seen), returning a bare JSON array; device fields ``id``,
  ``organizationId``, ``locationId``, ``nodeClass``, ``approvalStatus``, ``offline``,
  ``displayName``, ``systemName``, ``dnsName``, ``created``, ``lastContact``,
  ``lastUpdate`` (epoch seconds with a fraction).
  https://app.ninjarmm.com/apidocs/ (the official reference, linked from
  https://www.ruby-toolbox.com/projects/ninjaone), the list-devices tool description at
  https://glama.ai/mcp/servers/Allied-Business-Solutions/ninjaone-mcp/tools/ninja_list_devices
  ("Paginate with pageSize and after (last device ID)") and NinjaOne device type
  definitions in public API clients (GitHub code search).
- Error bodies ``{"resultCode": "FAILURE", "errorMessage": ..., "incidentId": ...}``
  and a request quota answered with 429 + ``Retry-After``. NinjaOne publishes no
  quota; the simulator's default (300 per 60 s) matches the adapter's default.

The population is generated from ``random.Random(seed)``: organization names and
sizes up front (small), devices lazily from their index, so 100,000 devices cost no
memory until a page is asked for. ``lastContact`` is spread over the last ~40 days
relative to the simulator's clock: online devices (about 72%) keep checking in as the
clock moves, the others stay where they stopped; devices not seen for five minutes are offline.
Removed devices (``remove_devices``) are simply no longer listed, as in NinjaOne.
"""

from __future__ import annotations

import bisect
import itertools
import random
import secrets
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web

from gateway.core.clock import Clock, SystemClock
from gateway.simulators import Faults, RequestWindow, company_names

DEFAULT_CLIENT_ID = "sim-ninjaone-client"
DEFAULT_CLIENT_SECRET = "sim-ninjaone-secret"
TOKEN_TTL_SECONDS = 3600
MAX_PAGE_SIZE = 1000

_NODE_CLASSES = (
    ("WINDOWS_WORKSTATION", 60),
    ("WINDOWS_SERVER", 15),
    ("MAC", 12),
    ("LINUX_WORKSTATION", 5),
    ("LINUX_SERVER", 5),
    ("VMWARE_VM_GUEST", 3),
)
_CLASS_NAMES = [name for name, _ in _NODE_CLASSES]
_CLASS_WEIGHTS = list(itertools.accumulate(weight for _, weight in _NODE_CLASSES))
_PREFIX = {"WINDOWS_WORKSTATION": "WS", "WINDOWS_SERVER": "SRV", "MAC": "MAC", "LINUX_WORKSTATION": "LNX",
           "LINUX_SERVER": "LSRV", "VMWARE_VM_GUEST": "VM"}


class NinjaOneState:
    """The simulated instance: credentials, organizations, the device population, tokens, quota."""

    def __init__(
        self,
        *,
        seed: int,
        organizations: int,
        devices: int,
        client_id: str,
        client_secret: str,
        clock: Clock,
        rate_limit: tuple[int, float] | None,
        token_ttl: int,
    ):
        if organizations < 1:
            raise ValueError("the simulator needs at least one organization")
        self.seed = seed
        self.client_id = client_id
        self.client_secret = client_secret
        self.clock = clock
        self.started = clock.now()
        self.token_ttl = token_ttl
        self.window = RequestWindow(*rate_limit) if rate_limit else None
        rng = random.Random(seed)
        self.organization_names = company_names(rng, organizations)
        weights = [rng.lognormvariate(0, 1) for _ in range(organizations)]
        self._cumulative = list(itertools.accumulate(weights))
        self._locations = [1 + rng.randrange(3) for _ in range(organizations)]
        self.device_count = devices
        self.removed: set[int] = set()  # ids of devices removed from the instance
        self.tokens: dict[str, tuple[int, datetime]] = {}
        self.api_requests = 0
        self.token_requests = 0
        self.throttled = 0

    def add_devices(self, count: int) -> None:
        """New devices enrol (they get the next ids)."""
        self.device_count += count

    def remove_devices(self, ids: Iterable[int]) -> None:
        """Devices are removed: they are no longer listed, and their ids are not reused."""
        self.removed.update(ids)

    def device(self, index: int, now: datetime) -> dict[str, Any]:
        """Device number ``index`` (id ``index + 1``) as ``GET /v2/devices`` shows it at ``now``."""
        rng = random.Random(self.seed * 1_000_003 + index)
        org_index = bisect.bisect_left(self._cumulative, rng.random() * self._cumulative[-1])
        org_index = min(org_index, len(self._cumulative) - 1)
        node_class = _CLASS_NAMES[bisect.bisect_left(_CLASS_WEIGHTS, rng.random() * _CLASS_WEIGHTS[-1])]
        roll = rng.random()
        if roll < 0.72:
            ago = rng.uniform(0, 240)  # the agent's heartbeat: online
        elif roll < 0.95:
            ago = rng.uniform(900, 14 * 86400)
        else:
            ago = rng.uniform(14 * 86400, 40 * 86400)
        # Online devices keep checking in; the others stopped at a fixed time before the simulator started.
        last_contact = (now if roll < 0.72 else self.started).timestamp() - ago
        created = last_contact - rng.uniform(30 * 86400, 900 * 86400)
        name = f"{_PREFIX[node_class]}-{rng.randrange(16**6):06X}"
        org_id = org_index + 1
        return {
            "id": index + 1,
            "parentDeviceId": None,
            "organizationId": org_id,
            "locationId": org_id * 100 + rng.randrange(self._locations[org_index]),
            "nodeClass": node_class,
            "nodeRoleId": 1 + _CLASS_NAMES.index(node_class),
            "rolePolicyId": 10 + _CLASS_NAMES.index(node_class),
            "policyId": 100 + org_id,
            "approvalStatus": "APPROVED",
            "offline": ago > 300,
            "displayName": name,
            "systemName": name,
            "dnsName": f"{name.lower()}.corp.local",
            "netbiosName": name,
            "created": round(created, 3),
            "lastContact": round(last_contact, 3),
            "lastUpdate": round(last_contact + rng.uniform(0, 5), 3),
        }

    def organization(self, index: int) -> dict[str, Any]:
        return {
            "id": index + 1,
            "name": self.organization_names[index],
            "description": "",
            "nodeApprovalMode": "AUTOMATIC",
            "tags": [],
            "fields": {},
        }


FAULTS = web.AppKey("ninjaone_faults", Faults)
STATE = web.AppKey("ninjaone_state", NinjaOneState)


def _error(status: int, message: str) -> dict[str, Any]:
    return {"resultCode": "FAILURE", "errorMessage": message, "incidentId": str(uuid.uuid4())}


def _page_args(request: web.Request) -> tuple[int, int]:
    try:
        size = int(request.query.get("pageSize", "50"))
        after = int(request.query.get("after", "0"))
    except ValueError:
        raise web.HTTPBadRequest(
            text='{"resultCode": "FAILURE", "errorMessage": "pageSize and after must be integers"}',
            content_type="application/json",
        ) from None
    return max(1, min(size, MAX_PAGE_SIZE)), max(0, after)


@web.middleware
async def _gatekeeper(request: web.Request, handler: Any) -> web.StreamResponse:
    """Quota, planned faults and the bearer token, in that order, for every API path."""
    if not request.path.startswith("/v2/"):
        return await handler(request)
    state: NinjaOneState = request.app[STATE]
    if state.window is not None:
        wait = state.window.admit()
        if wait is not None:
            state.throttled += 1
            return web.json_response(
                _error(429, "Too many requests"), status=429, headers={"Retry-After": str(max(1, round(wait)))}
            )
    state.api_requests += 1
    fault = await request.app[FAULTS].inject(request, _error)
    if fault is not None:
        return fault
    token = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    issued = state.tokens.get(token)
    if issued is None or issued[0] != request.app[FAULTS].token_generation or state.clock.now() >= issued[1]:
        return web.json_response(
            {"error": "invalid_token", "error_description": "The access token is invalid or has expired"},
            status=401,
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    return await handler(request)


async def _token(request: web.Request) -> web.Response:
    state: NinjaOneState = request.app[STATE]
    state.token_requests += 1
    form = await request.post()
    if form.get("grant_type") != "client_credentials":
        return web.json_response({"error": "unsupported_grant_type"}, status=400)
    if form.get("client_id") != state.client_id or form.get("client_secret") != state.client_secret:
        return web.json_response(
            {"error": "invalid_client", "error_description": "Client authentication failed"}, status=401
        )
    requested = str(form.get("scope") or "monitoring").split()
    if not set(requested) <= {"monitoring", "management", "control", "offline_access"}:
        return web.json_response({"error": "invalid_scope"}, status=400)
    token = secrets.token_urlsafe(32)
    expires_at = state.clock.now() + timedelta(seconds=state.token_ttl)
    state.tokens[token] = (request.app[FAULTS].token_generation, expires_at)
    return web.json_response(
        {"access_token": token, "token_type": "Bearer", "expires_in": state.token_ttl, "scope": " ".join(requested)}
    )


async def _organizations(request: web.Request) -> web.Response:
    state: NinjaOneState = request.app[STATE]
    size, after = _page_args(request)
    end = min(after + size, len(state.organization_names))
    return web.json_response([state.organization(i) for i in range(after, end)])


async def _devices(request: web.Request) -> web.Response:
    state: NinjaOneState = request.app[STATE]
    size, after = _page_args(request)
    now = state.clock.now()
    page: list[dict[str, Any]] = []
    index = after  # ids are index + 1: the first id after ``after``
    while len(page) < size and index < state.device_count:
        if index + 1 not in state.removed:
            page.append(state.device(index, now))
        index += 1
    return web.json_response(page)


def create_app(
    *,
    seed: int = 1,
    organizations: int = 20,
    devices: int = 500,
    client_id: str = DEFAULT_CLIENT_ID,
    client_secret: str = DEFAULT_CLIENT_SECRET,
    clock: Clock | None = None,
    rate_limit: tuple[int, float] | None = (300, 60.0),
    token_ttl: int = TOKEN_TTL_SECONDS,
) -> web.Application:
    """A NinjaOne instance with ``organizations`` organizations and ``devices`` devices."""
    app = web.Application(middlewares=[_gatekeeper])
    app[STATE] = NinjaOneState(
        seed=seed,
        organizations=organizations,
        devices=devices,
        client_id=client_id,
        client_secret=client_secret,
        clock=clock or SystemClock(),
        rate_limit=rate_limit,
        token_ttl=token_ttl,
    )
    app[FAULTS] = Faults()
    app.router.add_post("/ws/oauth/token", _token)
    app.router.add_get("/v2/organizations", _organizations)
    app.router.add_get("/v2/devices", _devices)
    return app

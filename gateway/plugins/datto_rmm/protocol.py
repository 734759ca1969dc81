"""Datto RMM API v2, sans I/O: request parameters, response parsing, paging decisions.

Datto RMM pages its account lists by number: ``max=N&page=P`` (P from 0), answering
``{"<items>": [...], "pageDetails": {"count", "nextPageUrl", "prevPageUrl"}}``; the
last page has ``nextPageUrl: null``. Timestamps are epoch milliseconds. The
gateway's cursor for a device pull is the number of the next page.

Decision: the default rate limit is 540 requests per 60 seconds, 90% of the
documented 600: above 90% of the quota Datto delays every response by a second,
and past 600 it answers 429 and, after repeated breaches, blocks the address (403).
The quota is the account's, "for all users", so other integrations may leave less:
the 429 carries no ``Retry-After``, and ``window_seconds=60`` makes the connector wait
the window out and go on at the rate it learned, instead of retrying into a block.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

from gateway.adapters import DevicePage, RmmDevice, RmmOrganization
from gateway.errors import PermanentError
from gateway.sync.http import RateLimit

TOKEN_PATH = "/auth/oauth/token"
SITES_PATH = "/api/v2/account/sites"
DEVICES_PATH = "/api/v2/account/devices"
DEFAULT_PAGE_SIZE = 250
MAX_PAGE_SIZE = 250
DEFAULT_RATE_LIMIT = RateLimit(requests=540, per_seconds=60.0, max_concurrent=4, window_seconds=60.0)


def page_params(page: int, page_size: int) -> dict[str, str]:
    """Query for page ``page`` (0-based) of sites or devices."""
    return {"max": str(page_size), "page": str(page)}


def cursor_to_page(cursor: str | None) -> int:
    """The page a stored cursor resumes at (None: the first page)."""
    if cursor is None:
        return 0
    try:
        page = int(cursor)
    except ValueError:
        raise PermanentError(
            f"stored Datto RMM cursor {cursor!r} is not a page number; reset the connection's cursor"
        ) from None
    if page < 0:
        raise PermanentError(f"stored Datto RMM cursor {cursor!r} is negative; reset the connection's cursor")
    return page


def parse_sites(body: Any, page: int) -> tuple[list[RmmOrganization], int | None]:
    """One page of ``GET /api/v2/account/sites``: the sites and the next page number (None: last)."""
    items = _items(body, "sites")
    sites = [
        RmmOrganization(external_id=str(_required(item, "uid", "site")), name=str(item.get("name") or ""))
        for item in items
    ]
    return sites, next_page(body, page)


def parse_device_page(body: Any, page: int) -> DevicePage:
    """One page of ``GET /api/v2/account/devices``; its cursor is the next page number, or None."""
    items = _items(body, "devices")
    following = next_page(body, page)
    return DevicePage(
        devices=[parse_device(item) for item in items],
        cursor=None if following is None else str(following),
    )


def parse_device(item: Any) -> RmmDevice:
    """One device object of the Datto RMM API."""
    if not isinstance(item, dict):
        raise PermanentError(f"Datto RMM sent a device that is not an object: {type(item).__name__}")
    uid = _required(item, "uid", "device")
    site = item.get("siteUid")
    if site is None:
        raise PermanentError(f"Datto RMM sent device {uid} without 'siteUid'")
    return RmmDevice(
        external_id=str(uid),
        org_external_id=str(site),
        hostname=str(item.get("hostname") or uid),
        device_class=str(item.get("deviceClass") or ""),
        online=bool(item.get("online", False)),
        deleted=bool(item.get("deleted", False)),
        last_contact=epoch_millis(item.get("lastSeen")),
        created_at=epoch_millis(item.get("creationDate")),
    )


def next_page(body: dict[str, Any], page: int) -> int | None:
    """The page after ``page``: read from ``nextPageUrl`` where it says, None when that is null."""
    details = body.get("pageDetails")
    if not isinstance(details, dict):
        raise PermanentError("Datto RMM answered a list without pageDetails")
    url = details.get("nextPageUrl")
    if not url:
        return None
    values = parse_qs(urlsplit(str(url)).query).get("page")
    try:
        return int(values[0]) if values else page + 1
    except ValueError:
        return page + 1


def epoch_millis(value: Any) -> datetime | None:
    """Datto's timestamps (epoch milliseconds) as aware UTC datetimes."""
    if value is None or value == "":
        return None
    try:
        return datetime.fromtimestamp(int(value) / 1000, tz=UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        raise PermanentError(f"Datto RMM sent a timestamp that is not epoch milliseconds: {value!r}") from None


def _items(body: Any, key: str) -> list[Any]:
    if not isinstance(body, dict) or not isinstance(body.get(key), list):
        raise PermanentError(f"Datto RMM answered without a {key!r} list")
    return body[key]


def _required(item: Any, key: str, what: str) -> Any:
    value = item.get(key) if isinstance(item, dict) else None
    if value is None:
        raise PermanentError(f"Datto RMM sent a {what} without {key!r}")
    return value

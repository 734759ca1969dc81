"""NinjaOne public API v2, sans I/O: request parameters, response parsing, paging decisions.

NinjaOne lists organizations and devices with keyset paging: ``pageSize=N`` and
``after=<last id seen>``; the body is a bare JSON array, and a page shorter than
``pageSize`` (or empty) is the last one. Timestamps are epoch seconds with a fraction.
The gateway's cursor for a device pull is the last device id of the stored page.

Decision: NinjaOne publishes no request quota, so the default limit is a
conservative 300 requests per 60 seconds with 4 in flight; an admin with a known
quota raises it with ``rate_limit`` on the connection.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from gateway.adapters import DevicePage, RmmDevice, RmmOrganization
from gateway.errors import PermanentError
from gateway.sync.http import RateLimit

TOKEN_PATH = "/ws/oauth/token"
ORGANIZATIONS_PATH = "/v2/organizations"
DEVICES_PATH = "/v2/devices"
SCOPE = "monitoring management control"
DEFAULT_PAGE_SIZE = 1000
MAX_PAGE_SIZE = 1000
DEFAULT_RATE_LIMIT = RateLimit(requests=300, per_seconds=60.0, max_concurrent=4)


def page_params(after: str | None, page_size: int) -> dict[str, str]:
    """Query for one page of organizations or devices after the id ``after`` (None: from the start)."""
    params = {"pageSize": str(page_size)}
    if after is not None:
        params["after"] = str(after)
    return params


def parse_organizations(body: Any, page_size: int) -> tuple[list[RmmOrganization], str | None]:
    """One page of ``GET /v2/organizations``: the organizations and the ``after`` for the next page."""
    items = _array(body, "organizations")
    organizations = [
        RmmOrganization(external_id=str(_required(item, "id", "organization")), name=str(item.get("name") or ""))
        for item in items
    ]
    return organizations, _next_after(items, page_size)


def parse_device_page(body: Any, page_size: int) -> DevicePage:
    """One page of ``GET /v2/devices``; its cursor is the last id, or None when this was the last page."""
    items = _array(body, "devices")
    return DevicePage(devices=[parse_device(item) for item in items], cursor=_next_after(items, page_size))


def parse_device(item: Any) -> RmmDevice:
    """One device object of ``GET /v2/devices``."""
    if not isinstance(item, dict):
        raise PermanentError(f"NinjaOne sent a device that is not an object: {type(item).__name__}")
    device_id = _required(item, "id", "device")
    organization_id = item.get("organizationId")
    if organization_id is None:
        raise PermanentError(f"NinjaOne sent device {device_id} without 'organizationId'")
    return RmmDevice(
        external_id=str(device_id),
        org_external_id=str(organization_id),
        hostname=str(item.get("systemName") or item.get("displayName") or item.get("dnsName") or device_id),
        device_class=str(item.get("nodeClass") or ""),
        online=not bool(item.get("offline", True)),
        deleted=False,  # NinjaOne does not list removed devices
        last_contact=epoch_seconds(item.get("lastContact")),
        created_at=epoch_seconds(item.get("created")),
    )


def epoch_seconds(value: Any) -> datetime | None:
    """NinjaOne's timestamps (epoch seconds, fractional) as aware UTC datetimes."""
    if value is None or value == "":
        return None
    try:
        return datetime.fromtimestamp(float(value), tz=UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        raise PermanentError(f"NinjaOne sent a timestamp that is not epoch seconds: {value!r}") from None


def _next_after(items: list[Any], page_size: int) -> str | None:
    if len(items) < page_size or not items:
        return None
    return str(_required(items[-1], "id", "last item"))


def _array(body: Any, what: str) -> list[Any]:
    if not isinstance(body, list):
        raise PermanentError(f"NinjaOne answered the {what} list with {type(body).__name__}, expected a JSON array")
    return body


def _required(item: Any, key: str, what: str) -> Any:
    value = item.get(key) if isinstance(item, dict) else None
    if value is None:
        raise PermanentError(f"NinjaOne sent a {what} without {key!r}")
    return value

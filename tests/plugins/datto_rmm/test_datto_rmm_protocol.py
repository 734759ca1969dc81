"""Datto RMM protocol code on recorded response bodies (no I/O)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from gateway.adapters import RmmDevice, RmmOrganization
from gateway.errors import PermanentError
from gateway.plugins.datto_rmm import protocol

# Shaped like GET /api/v2/account/devices?max=2&page=0 from a Datto RMM account (uids and names changed).
DEVICES_BODY = json.loads(
    """
{
  "pageDetails": {
    "count": 2,
    "totalCount": 5,
    "prevPageUrl": null,
    "nextPageUrl": "https://merlot-api.centrastage.net/api/v2/account/devices?max=2&page=1"
  },
  "devices": [
    {"id": 100234, "uid": "5f2c1a4e-8b7d-4e0a-9c41-2b6f0d8e7a11", "siteId": 1003,
     "siteUid": "0b7f3e2a-4c1d-4f6e-8a9b-1c2d3e4f5a6b", "siteName": "Cedar Dental LLC",
     "deviceType": {"category": "Laptop", "type": "Laptop"}, "hostname": "LAP-0A1B2C",
     "intIpAddress": "10.3.4.5", "operatingSystem": "Microsoft Windows 11 Pro 23H2", "online": true,
     "deleted": false, "suspended": false, "lastSeen": 1773144000250, "creationDate": 1693833612000,
     "deviceClass": "device", "a64Bit": true, "udf": {}},
    {"id": 100235, "uid": "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d", "siteUid": "0b7f3e2a-4c1d-4f6e-8a9b-1c2d3e4f5a6b",
     "hostname": "PRN-FF0011", "online": false, "deleted": true, "lastSeen": 1770000000000,
     "creationDate": null, "deviceClass": "printer"}
  ]
}
"""
)

LAST_PAGE = {"pageDetails": {"count": 1, "prevPageUrl": "https://x/api/v2/account/devices?max=2&page=1",
                             "nextPageUrl": None}, "devices": [DEVICES_BODY["devices"][0]]}

SITES_BODY = json.loads(
    """
{
  "pageDetails": {"count": 2, "prevPageUrl": null,
                  "nextPageUrl": "https://merlot-api.centrastage.net/api/v2/account/sites?max=2&page=4"},
  "sites": [
    {"id": 1003, "uid": "0b7f3e2a-4c1d-4f6e-8a9b-1c2d3e4f5a6b", "name": "Cedar Dental LLC", "onDemand": false,
     "devicesStatus": {"numberOfDevices": 12, "numberOfOnlineDevices": 9, "numberOfOfflineDevices": 3}},
    {"id": 1004, "uid": "1c8a4f3b-5d2e-4a7f-9b0c-2d3e4f5a6b7c", "name": "Harbor Freight & Co"}
  ]
}
"""
)


def test_parse_device_maps_datto_fields() -> None:
    device = protocol.parse_device(DEVICES_BODY["devices"][0])
    assert device == RmmDevice(
        external_id="5f2c1a4e-8b7d-4e0a-9c41-2b6f0d8e7a11",
        org_external_id="0b7f3e2a-4c1d-4f6e-8a9b-1c2d3e4f5a6b",
        hostname="LAP-0A1B2C",
        device_class="device",
        online=True,
        deleted=False,
        last_contact=datetime(2026, 3, 10, 12, 0, 0, 250000, tzinfo=UTC),
        created_at=datetime(2023, 9, 4, 13, 20, 12, tzinfo=UTC),
    )


def test_parse_deleted_printer_without_creation_date() -> None:
    device = protocol.parse_device(DEVICES_BODY["devices"][1])
    assert device.deleted is True
    assert device.online is False
    assert device.device_class == "printer"
    assert device.created_at is None


def test_cursor_is_the_next_page_from_next_page_url() -> None:
    page = protocol.parse_device_page(DEVICES_BODY, page=0)
    assert len(page.devices) == 2
    assert page.cursor == "1"
    assert protocol.parse_device_page(LAST_PAGE, page=1).cursor is None


def test_sites_and_their_next_page() -> None:
    sites, following = protocol.parse_sites(SITES_BODY, page=3)
    assert sites == [
        RmmOrganization("0b7f3e2a-4c1d-4f6e-8a9b-1c2d3e4f5a6b", "Cedar Dental LLC"),
        RmmOrganization("1c8a4f3b-5d2e-4a7f-9b0c-2d3e4f5a6b7c", "Harbor Freight & Co"),
    ]
    assert following == 4


def test_next_page_without_a_page_parameter_counts_on() -> None:
    body = {"pageDetails": {"nextPageUrl": "https://x/api/v2/account/devices?cursor=abc"}, "devices": []}
    assert protocol.next_page(body, 6) == 7


def test_params_and_cursor_round_trip() -> None:
    assert protocol.page_params(3, 250) == {"max": "250", "page": "3"}
    assert protocol.cursor_to_page(None) == 0
    assert protocol.cursor_to_page("12") == 12
    with pytest.raises(PermanentError, match="not a page number"):
        protocol.cursor_to_page("after-105")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "without a 'devices' list"),
        ({"devices": []}, "without pageDetails"),
        ({"pageDetails": {}, "devices": [{"uid": "u1"}]}, "without 'siteUid'"),
        ({"pageDetails": {}, "devices": [{"uid": "u1", "siteUid": "s", "lastSeen": "x"}]}, "epoch milliseconds"),
    ],
)
def test_unreadable_bodies_are_permanent_errors(body: object, message: str) -> None:
    with pytest.raises(PermanentError, match=message):
        protocol.parse_device_page(body, page=0)

"""NinjaOne protocol code on recorded response bodies (no I/O)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from gateway.adapters import RmmDevice, RmmOrganization
from gateway.errors import PermanentError
from gateway.plugins.ninjaone import protocol

# Shaped like GET /v2/devices?pageSize=2 from a NinjaOne instance (ids and names changed).
DEVICES_BODY = json.loads(
    """
[
  {"id": 101, "parentDeviceId": null, "organizationId": 7, "locationId": 12, "nodeClass": "WINDOWS_WORKSTATION",
   "nodeRoleId": 1, "rolePolicyId": 5, "policyId": 9, "approvalStatus": "APPROVED", "offline": false,
   "displayName": "Front desk PC", "systemName": "FRONTDESK-01", "dnsName": "frontdesk-01.corp.local",
   "netbiosName": "FRONTDESK-01", "created": 1693833612.417000000, "lastContact": 1773144000.125000000,
   "lastUpdate": 1773144003.5},
  {"id": 105, "organizationId": 9, "locationId": 20, "nodeClass": "LINUX_SERVER", "offline": true,
   "displayName": "backup", "systemName": null, "dnsName": "backup.corp.local",
   "created": 1690000000, "lastContact": 1770000000.9}
]
"""
)

ORGANIZATIONS_BODY = json.loads(
    """
[
  {"id": 7, "name": "Cedar Dental LLC", "description": "", "nodeApprovalMode": "AUTOMATIC", "tags": [], "fields": {}},
  {"id": 9, "name": "Harbor Freight & Co", "nodeApprovalMode": "MANUAL"}
]
"""
)


def test_parse_device_maps_ninjaone_fields() -> None:
    device = protocol.parse_device(DEVICES_BODY[0])
    assert device == RmmDevice(
        external_id="101",
        org_external_id="7",
        hostname="FRONTDESK-01",
        device_class="WINDOWS_WORKSTATION",
        online=True,
        deleted=False,
        last_contact=datetime(2026, 3, 10, 12, 0, 0, 125000, tzinfo=UTC),
        created_at=datetime.fromtimestamp(1693833612.417, tz=UTC),
    )


def test_parse_device_offline_and_name_fallback() -> None:
    device = protocol.parse_device(DEVICES_BODY[1])
    assert device.online is False
    assert device.hostname == "backup"  # systemName missing: displayName
    assert device.last_contact is not None and device.last_contact.tzinfo is UTC


def test_full_page_cursor_is_the_last_id() -> None:
    page = protocol.parse_device_page(DEVICES_BODY, page_size=2)
    assert [d.external_id for d in page.devices] == ["101", "105"]
    assert page.cursor == "105"


@pytest.mark.parametrize("body", [DEVICES_BODY, []])
def test_short_or_empty_page_is_the_last(body: list) -> None:
    page = protocol.parse_device_page(body, page_size=1000)
    assert page.cursor is None
    assert len(page.devices) == len(body)


def test_page_params() -> None:
    assert protocol.page_params(None, 500) == {"pageSize": "500"}
    assert protocol.page_params("105", 500) == {"pageSize": "500", "after": "105"}


def test_parse_organizations_and_paging() -> None:
    organizations, after = protocol.parse_organizations(ORGANIZATIONS_BODY, page_size=2)
    assert organizations == [RmmOrganization("7", "Cedar Dental LLC"), RmmOrganization("9", "Harbor Freight & Co")]
    assert after == "9"
    assert protocol.parse_organizations(ORGANIZATIONS_BODY, page_size=3)[1] is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"devices": []}, "expected a JSON array"),
        ([{"id": 1, "nodeClass": "MAC"}], "without 'organizationId'"),
        ([{"organizationId": 1}], "without 'id'"),
        (["not an object"], "not an object"),
        ([{"id": 1, "organizationId": 2, "lastContact": "yesterday"}], "not epoch seconds"),
    ],
)
def test_unreadable_bodies_are_permanent_errors(body: object, message: str) -> None:
    with pytest.raises(PermanentError, match=message):
        protocol.parse_device_page(body, page_size=10)

"""The NinjaOne adapter: the RMM protocol over the shared connector."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from gateway.adapters import AdapterContext, DevicePage, RmmOrganization
from gateway.options import int_option
from gateway.plugins.ninjaone import protocol
from gateway.plugins.sans_io import naming_connection
from gateway.sync.http import Connector, OAuth2ClientCredentials

if TYPE_CHECKING:  # pragma: no cover - typing only
    from gateway.core.settings import ConnectionSettings


class NinjaOneAdapter:
    """Organizations and devices of one NinjaOne instance."""

    def __init__(self, connector: Connector, *, page_size: int = protocol.DEFAULT_PAGE_SIZE):
        self.connector = connector
        self.page_size = page_size

    async def list_organizations(self) -> list[RmmOrganization]:
        organizations: list[RmmOrganization] = []
        after: str | None = None
        while True:
            response = await self.connector.request(
                "GET", protocol.ORGANIZATIONS_PATH, params=protocol.page_params(after, self.page_size)
            )
            with naming_connection(self.connector.name):
                page, after = protocol.parse_organizations(response.json(), self.page_size)
            organizations.extend(page)
            if after is None:
                return organizations

    async def fetch_devices(self, cursor: str | None = None) -> AsyncIterator[DevicePage]:
        while True:
            response = await self.connector.request(
                "GET", protocol.DEVICES_PATH, params=protocol.page_params(cursor, self.page_size)
            )
            with naming_connection(self.connector.name):
                page = protocol.parse_device_page(response.json(), self.page_size)
            yield page
            if page.cursor is None:
                return
            cursor = page.cursor

    async def aclose(self) -> None:
        await self.connector.aclose()


def build(settings: ConnectionSettings, context: AdapterContext) -> NinjaOneAdapter:
    """The factory registered for ``plugin = "ninjaone"``."""
    page_size = int_option(
        settings.name, settings.options, "page_size", protocol.DEFAULT_PAGE_SIZE, 1, protocol.MAX_PAGE_SIZE
    )
    auth = OAuth2ClientCredentials(
        settings.base_url + protocol.TOKEN_PATH,
        settings.credential("client_id"),
        settings.credential("client_secret"),
        scope=str(settings.options.get("scope", protocol.SCOPE)),
    )
    connector = Connector.from_settings(
        settings, rate_limit=protocol.DEFAULT_RATE_LIMIT, auth=auth, clock=context.clock
    )
    return NinjaOneAdapter(connector, page_size=page_size)

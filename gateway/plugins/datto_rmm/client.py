"""The Datto RMM adapter: the RMM protocol over the shared connector."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from gateway.adapters import AdapterContext, DevicePage, RmmOrganization
from gateway.errors import AuthError, PermanentError
from gateway.options import int_option
from gateway.plugins.datto_rmm import protocol
from gateway.plugins.sans_io import naming_connection
from gateway.sync.http import Connector, HttpResponse, OAuth2PasswordGrant

if TYPE_CHECKING:  # pragma: no cover - typing only
    from gateway.core.settings import ConnectionSettings


class DattoRmmAdapter:
    """Sites and devices of one Datto RMM account."""

    def __init__(self, connector: Connector, *, page_size: int = protocol.DEFAULT_PAGE_SIZE):
        self.connector = connector
        self.page_size = page_size

    async def list_organizations(self) -> list[RmmOrganization]:
        sites: list[RmmOrganization] = []
        page: int | None = 0
        while page is not None:
            response = await self._get(protocol.SITES_PATH, protocol.page_params(page, self.page_size))
            with naming_connection(self.connector.name):
                found, page = protocol.parse_sites(response.json(), page)
            sites.extend(found)
        return sites

    async def fetch_devices(self, cursor: str | None = None) -> AsyncIterator[DevicePage]:
        with naming_connection(self.connector.name):
            page = protocol.cursor_to_page(cursor)
        while True:
            response = await self._get(protocol.DEVICES_PATH, protocol.page_params(page, self.page_size))
            with naming_connection(self.connector.name):
                result = protocol.parse_device_page(response.json(), page)
            yield result
            if result.cursor is None:
                return
            page = int(result.cursor)

    async def aclose(self) -> None:
        await self.connector.aclose()

    async def _get(self, path: str, params: dict[str, str]) -> HttpResponse:
        try:
            return await self.connector.request("GET", path, params=params)
        except AuthError as exc:
            if exc.status != 403:
                raise
            # Datto blocks the caller's address with 403 after repeated 429s; a new token does not help.
            raise PermanentError(
                "Datto RMM refused the request with HTTP 403: it blocks an address for a while after repeated "
                "rate-limit breaches (lower this connection's rate_limit), or the API user lacks permission",
                connection=self.connector.name,
                status=403,
            ) from None


def build(settings: ConnectionSettings, context: AdapterContext) -> DattoRmmAdapter:
    """The factory registered for ``plugin = "datto_rmm"``."""
    page_size = int_option(
        settings.name, settings.options, "page_size", protocol.DEFAULT_PAGE_SIZE, 1, protocol.MAX_PAGE_SIZE
    )
    auth = OAuth2PasswordGrant(
        settings.base_url + protocol.TOKEN_PATH,
        username=settings.credential("api_key"),
        password=settings.credential("api_secret"),
    )
    connector = Connector.from_settings(
        settings, rate_limit=protocol.DEFAULT_RATE_LIMIT, auth=auth, clock=context.clock
    )
    return DattoRmmAdapter(connector, page_size=page_size)

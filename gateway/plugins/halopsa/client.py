"""The HaloPSA adapter: ``protocol.py`` over the shared connector."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from typing import Any

import structlog

from gateway.adapters import AdapterContext, BillDocument, PsaCompany, PsaRecord, PushResult
from gateway.core.settings import ConnectionSettings
from gateway.plugins.halopsa import protocol as p
from gateway.sync.http import Connector, HttpResponse, OAuth2ClientCredentials, RateLimit

log = structlog.get_logger(__name__)

#: HaloPSA throttles hosted tenants with 429 but publishes no number we could cite;
#: two requests a second, four at a time, is a conservative default.
DEFAULT_RATE_LIMIT = RateLimit(requests=120, per_seconds=60.0, max_concurrent=4)

REQUIRED_CREDENTIALS = ("client_id", "client_secret")


class HaloPsaAdapter:
    """A HaloPSA connection: clients in, bills out as invoices."""

    def __init__(self, settings: ConnectionSettings, context: AdapterContext, **connector_kw: Any):
        self.name = settings.name
        self.config = p.Config.from_options(settings.name, settings.options)
        auth = OAuth2ClientCredentials(
            p.token_url(settings.base_url, self.config.tenant),
            settings.credential("client_id"),
            settings.credential("client_secret"),
            scope="all",
        )
        self.connector = Connector.from_settings(
            settings, rate_limit=DEFAULT_RATE_LIMIT, auth=auth, clock=context.clock, **connector_kw
        )
        self._api = p.api_base(settings.base_url)

    async def aclose(self) -> None:
        await self.connector.aclose()

    async def _send(self, request: p.Request) -> HttpResponse:
        url = f"{self._api}/{request.url}"
        return await self.connector.request(request.method, url, params=request.params, json=request.json)

    async def _all(self, make: Callable[[int, int], p.Request], field: str) -> list[dict[str, Any]]:
        """Every row of a paged list, page by page until ``record_count`` is reached."""
        rows: list[dict[str, Any]] = []
        page_no, size = 1, self.config.page_size
        while True:
            page, total = p.parse_page((await self._send(make(page_no, size))).json(), field)
            rows.extend(page)
            if not p.has_more(page_no, size, len(page), total):
                return rows
            page_no += 1

    # -- PsaAdapter ----------------------------------------------------------------------

    async def list_companies(self) -> list[PsaCompany]:
        clients = p.parse_clients(await self._all(lambda n, s: p.page_request("Client", n, s), "clients"))
        log.info("halopsa.clients", connection=self.name, clients=len(clients))
        return clients

    async def push_bill(self, bill: BillDocument) -> PushResult:
        found = await self._invoices_for(bill)
        p.refuse_duplicates(found, bill)
        if found:
            result = PushResult(external_id=str(found[0]["id"]), created=False)
        else:
            response = await self._send(p.create_invoice_request(bill))
            result = PushResult(external_id=str(await self._keep_one(bill, p.saved_id(response.json()))), created=True)
        log.info("psa.push", connection=self.name, key=bill.key, delivery="invoice",
                 external_id=result.external_id, created=result.created)
        return result

    async def _invoices_for(self, bill: BillDocument) -> list[Any]:
        return p.matching(await self._all(lambda n, s: p.client_invoices_request(bill, n, s), "invoices"), bill.key)

    async def _keep_one(self, bill: BillDocument, saved_id: int) -> int:
        """After our create: if a re-sent request (lost answer) saved a second invoice, delete it."""
        found = await self._invoices_for(bill)
        for copy in found[1:]:
            log.warning("psa.duplicate_removed", connection=self.name, key=bill.key, external_id=copy["id"])
            await self._send(p.delete_invoice_request(int(copy["id"])))
        return int(found[0]["id"]) if found else saved_id

    async def read_back(self, period_start: date, period_end: date) -> list[PsaRecord]:
        records = p.invoice_records(await self._all(p.all_invoices_request, "invoices"), period_start, period_end)
        log.info("psa.read_back", connection=self.name, records=len(records))
        return records


def build(settings: ConnectionSettings, context: AdapterContext) -> HaloPsaAdapter:
    """The ``AdapterSpec.factory`` for kind ``halopsa``."""
    return HaloPsaAdapter(settings, context)

"""The Syncro adapters: ``protocol.py`` over the gateway's shared connector."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, time
from typing import Any

import structlog

from gateway import (
    AdapterContext,
    BillDocument,
    Clock,
    ConnectionSettings,
    Connector,
    DevicePage,
    PermanentError,
    PsaCompany,
    PsaRecord,
    PushResult,
    RmmOrganization,
    StaticAuth,
)
from gateway_syncro import protocol as p

log = structlog.get_logger(__name__)


class SyncroApi:
    """One Syncro account over one connector: GETs, paging, and errors named after the connection."""

    def __init__(self, connector: Connector):
        self.connector = connector

    async def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        response = await self.connector.request("GET", path, params=params)
        return self.json(response)

    async def pages(self, path: str, key: str, start: int = 1, **params: Any) -> AsyncIterator[p.Page]:
        """Every page of a list from page ``start`` on."""
        page: int | None = start
        while page is not None:
            body = await self.get(path, p.page_params(page, **params))
            result = self.parse(p.parse_page, body, key)
            yield result
            page = result.next_page

    async def rows(self, path: str, key: str, **params: Any) -> list[dict[str, Any]]:
        return [row async for page in self.pages(path, key, **params) for row in page.rows]

    def json(self, response: Any) -> Any:
        try:
            return response.json()
        except PermanentError as exc:
            raise PermanentError(str(exc), connection=self.connector.name, status=exc.status) from None

    def parse(self, parse: Any, *args: Any) -> Any:
        try:
            return parse(*args)
        except PermanentError as exc:
            raise PermanentError(str(exc), connection=self.connector.name) from None


class SyncroRmmAdapter:
    """Syncro as an RMM: customers are organisations, assets are devices."""

    def __init__(self, api: SyncroApi, clock: Clock):
        self.api = api
        self.clock = clock

    async def list_organizations(self) -> list[RmmOrganization]:
        return self.api.parse(p.parse_organizations, await self.api.rows(p.CUSTOMERS_PATH, "customers"))

    async def fetch_devices(self, cursor: str | None = None) -> AsyncIterator[DevicePage]:
        start = self.api.parse(p.cursor_page, cursor)
        async for page in self.api.pages(p.ASSETS_PATH, "assets", start=start):
            now = self.clock.now()
            devices = [self.api.parse(p.parse_asset, row, now) for row in page.rows]
            yield DevicePage(devices=devices, cursor=str(page.next_page) if page.next_page else None)

    async def aclose(self) -> None:
        await self.api.connector.aclose()


class SyncroPsaAdapter:
    """Syncro as a PSA: customers are companies, bills become invoices."""

    def __init__(self, api: SyncroApi):
        self.api = api

    async def list_companies(self) -> list[PsaCompany]:
        return self.api.parse(p.parse_companies, await self.api.rows(p.CUSTOMERS_PATH, "customers"))

    async def push_bill(self, bill: BillDocument) -> PushResult:
        existing = await self._invoice_numbered(bill)
        if existing is not None:
            return self._pushed(bill, existing, created=False)
        body = p.invoice_body(bill)
        try:
            response = await self.api.connector.request("POST", p.INVOICES_PATH, json=body)
        except PermanentError as exc:
            # 422 "number has already been taken": an earlier attempt of this push created it
            # and its answer was lost. Anything else, or someone else's invoice, stays an error.
            if exc.status != 422 or (existing := await self._invoice_numbered(bill)) is None:
                raise
            return self._pushed(bill, existing, created=False)
        return self._pushed(bill, self.api.parse(p.parse_invoice, self.api.json(response)), created=True)

    async def read_back(self, period_start: date, period_end: date) -> list[PsaRecord]:
        since = datetime.combine(period_start, time(0), tzinfo=UTC).isoformat()
        records = []
        for invoice in await self.api.rows(p.INVOICES_PATH, "invoices", since_updated_at=since):
            record = self.api.parse(p.invoice_record, invoice, period_start, period_end)
            if record is not None:
                records.append(record)
        log.info("psa.read_back", connection=self.api.connector.name, records=len(records))
        return records

    async def aclose(self) -> None:
        await self.api.connector.aclose()

    async def _invoice_numbered(self, bill: BillDocument) -> dict[str, Any] | None:
        """The invoice with the bill's number, if the gateway wrote it for this bill."""
        try:
            body = await self.api.get(p.invoice_path(bill.number))
        except PermanentError as exc:
            if exc.status == 404:
                return None
            raise
        invoice = self.api.parse(p.parse_invoice, body)
        if str(invoice.get("number")) != bill.number:
            return None  # the number looked like an id and matched another invoice's id
        if not p.is_same_bill(invoice, bill):
            raise PermanentError(
                f"Syncro already has an invoice numbered {bill.number} (id {invoice['id']}) that is not the "
                f"gateway's bill {bill.key}; renumber one of them (billing.invoice_prefix)",
                connection=self.api.connector.name,
                status=409,
            )
        return invoice

    def _pushed(self, bill: BillDocument, invoice: dict[str, Any], *, created: bool) -> PushResult:
        result = PushResult(external_id=str(invoice["id"]), created=created)
        log.info("psa.push", connection=self.api.connector.name, key=bill.key, external_id=result.external_id,
                 created=created)
        return result


def _api(settings: ConnectionSettings, context: AdapterContext) -> SyncroApi:
    auth = StaticAuth(p.auth_headers(settings.credential("api_token")))
    return SyncroApi(Connector.from_settings(settings, rate_limit=p.DEFAULT_RATE_LIMIT, auth=auth, clock=context.clock))


def build_rmm(settings: ConnectionSettings, context: AdapterContext) -> SyncroRmmAdapter:
    """The factory registered for ``plugin = "syncro-rmm"``."""
    return SyncroRmmAdapter(_api(settings, context), context.clock)


def build_psa(settings: ConnectionSettings, context: AdapterContext) -> SyncroPsaAdapter:
    """The factory registered for ``plugin = "syncro-psa"``."""
    return SyncroPsaAdapter(_api(settings, context))

"""The ConnectWise Manage adapter: ``protocol.py`` over the shared connector."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from typing import Any

import structlog

from gateway.adapters import AdapterContext, BillDocument, PsaCompany, PsaRecord, PushResult
from gateway.core.settings import ConnectionSettings
from gateway.plugins.connectwise import protocol as p
from gateway.sync.http import Connector, HttpResponse, RateLimit, StaticAuth

log = structlog.get_logger(__name__)

#: ConnectWise publishes no fixed request limit; cloud instances throttle bursts with 429.
#: Two requests a second, four at a time, keeps one integration well clear of that.
#: ConnectWise Cloud sits behind Cloudflare, whose rate-limiting rules answer 429 with an
#: HTML page and no Retry-After; their counting periods run from 10 s to a few minutes and
#: a block ("mitigation timeout") lasts a minute or more. Decision: such a 429 pauses the
#: connection for 60 s, then 120 s, then 240 s (window_seconds doubles while 429s follow
#: each other, capped at four windows), so five retries span more than ten minutes instead
#: of the ~15 s that the jittered back-off would burn; after a pause the connection sends
#: at the rate the window let through.
DEFAULT_RATE_LIMIT = RateLimit(requests=120, per_seconds=60.0, max_concurrent=4, window_seconds=60.0)

REQUIRED_CREDENTIALS = ("company", "public_key", "private_key", "client_id")


class ConnectWiseAdapter:
    """A ConnectWise Manage connection: companies in, bills out as invoices or agreement additions."""

    def __init__(self, settings: ConnectionSettings, context: AdapterContext, **connector_kw: Any):
        self.name = settings.name
        self.config = p.Config.from_options(settings.name, settings.options)
        self._site = settings.base_url
        self._company = settings.credential("company")
        auth = StaticAuth(
            p.auth_headers(
                self._company,
                settings.credential("public_key"),
                settings.credential("private_key"),
                settings.credential("client_id"),
            )
        )
        self.connector = Connector.from_settings(
            settings, rate_limit=DEFAULT_RATE_LIMIT, auth=auth, clock=context.clock, **connector_kw
        )
        self._base: str | None = (
            p.api_base_from_codebase(self._site, self.config.codebase) if self.config.codebase else None
        )

    async def aclose(self) -> None:
        await self.connector.aclose()

    # -- plumbing ----------------------------------------------------------------------

    async def _api_base(self) -> str:
        if self._base is None:
            request = p.company_info_request(self._site, self._company)
            response = await self.connector.request(request.method, request.url, authenticate=False)
            self._base = p.api_base(self._site, response.json())
            log.info("connectwise.codebase", connection=self.name, api_base=self._base)
        return self._base

    async def _send(self, request: p.Request) -> HttpResponse:
        url = request.url if request.url.startswith("http") else f"{await self._api_base()}/{request.url}"
        return await self.connector.request(request.method, url, params=request.params, json=request.json)

    async def _all(self, request: p.ListRequest, what: str) -> list[dict[str, Any]]:
        """Every row of a list that matches its filter, page by page while ``Link`` has a ``rel="next"``.

        The next page is asked for with this request's own query (the link gives its number only),
        and every row is checked against the filter asked for: a tool whose next link drops
        ``conditions`` cannot slip other rows in.
        """
        number = 1
        response = await self._send(request)
        rows = request.wanted(p.parse_list(response.json(), what))
        while (following := p.next_page_number(response.headers, number)) is not None:
            number = following
            response = await self._send(request.page(number))
            rows.extend(request.wanted(p.parse_list(response.json(), what)))
        return rows

    # -- PsaAdapter ----------------------------------------------------------------------

    async def list_companies(self) -> list[PsaCompany]:
        rows = await self._all(p.companies_request(self.config.page_size), "company")
        companies = p.parse_companies(rows)
        log.info("connectwise.companies", connection=self.name, companies=len(companies))
        return companies

    async def push_bill(self, bill: BillDocument) -> PushResult:
        push = self._push_addition if self.config.delivery == "addition" else self._push_invoice
        result = await push(bill)
        log.info("psa.push", connection=self.name, key=bill.key, delivery=self.config.delivery,
                 external_id=result.external_id, created=result.created)
        return result

    async def read_back(self, period_start: date, period_end: date) -> list[PsaRecord]:
        if self.config.delivery == "addition":
            records = await self._read_additions(period_start, period_end)
        else:
            rows = await self._all(p.invoices_in_period_request(period_start), "invoice")
            records = p.invoice_records(rows, period_start, period_end)
        log.info("psa.read_back", connection=self.name, records=len(records))
        return records

    # -- invoices ------------------------------------------------------------------------

    async def _push_invoice(self, bill: BillDocument) -> PushResult:
        found = await self._invoices_for(bill)
        p.refuse_duplicates(found, bill, "invoices")
        if found:
            invoice_id, created = int(found[0]["id"]), False
        else:
            response = await self._send(p.create_invoice_request(bill, self.config))
            invoice_id, created = p.created_id(response.json(), "invoice"), True
            invoice_id = await self._keep_one_invoice(bill, invoice_id)
        # Lines go on after the invoice exists; a push interrupted in between adds the rest next time.
        missing = p.missing_product_requests(bill, invoice_id, await self._lines(invoice_id), self.config)
        for request in missing:
            await self._send(request)
        if missing:
            await self._lines(invoice_id)
        return PushResult(external_id=str(invoice_id), created=created)

    async def _invoices_for(self, bill: BillDocument) -> list[Any]:
        return p.bill_invoices(await self._all(p.find_invoice_request(bill), "invoice"), bill)

    async def _keep_one_invoice(self, bill: BillDocument, created_id: int) -> int:
        """After our create: if a re-sent request made a second invoice, delete it and keep the first."""
        found = await self._invoices_for(bill)
        await self._delete(found[1:], p.delete_invoice_request, key=bill.key)
        return int(found[0]["id"]) if found else created_id

    async def _lines(self, invoice_id: int) -> list[dict[str, Any]]:
        """The invoice's product lines, without copies a re-sent line create left."""
        rows = await self._all(p.invoice_products_request(invoice_id), "product")
        copies = p.extras(rows, lambda row: row.get("sequenceNumber"))
        await self._delete(copies, p.delete_product_request, invoice=invoice_id)
        return [row for row in rows if row not in copies]

    async def _delete(self, copies: list[Any], delete: Callable[[int], p.Request], **where: Any) -> None:
        """Delete the copies a re-sent create (lost answer) left behind; the oldest of each stays."""
        for copy in copies:
            log.warning("psa.duplicate_removed", connection=self.name, external_id=copy["id"], **where)
            await self._send(delete(int(copy["id"])))

    # -- agreement additions -------------------------------------------------------------

    async def _push_addition(self, bill: BillDocument) -> PushResult:
        """``created`` is True when this push changed the addition, False when it already held the bill."""
        agreements = await self._all(p.agreements_request(bill, self.config), "agreement")
        agreement_id = int(p.pick_agreement(agreements, bill, self.config)["id"])
        addition = p.pick_addition(
            await self._all(p.additions_request(agreement_id, self.config), "addition"), self.config
        )
        if addition is not None:
            if p.bill_additions([addition], bill):
                return PushResult(external_id=str(addition["id"]), created=False)
            p.refuse_overwrite(addition, bill)
            await self._send(p.update_addition_request(agreement_id, int(addition["id"]), bill))
            return PushResult(external_id=str(addition["id"]), created=True)
        response = await self._send(p.create_addition_request(agreement_id, bill, self.config))
        created_id = p.created_id(response.json(), "addition")
        # A re-sent create may have made two; keep the first, as for invoices.
        ours = p.bill_additions(await self._all(p.additions_request(agreement_id, self.config), "addition"), bill)
        await self._delete(ours[1:], lambda copy_id: p.delete_addition_request(agreement_id, copy_id), key=bill.key)
        return PushResult(external_id=str(ours[0]["id"] if ours else created_id), created=True)

    async def _read_additions(self, period_start: date, period_end: date) -> list[PsaRecord]:
        records = []
        for agreement in await self._all(p.all_agreements_request(), "agreement"):
            rows = await self._all(p.gateway_additions_request(int(agreement["id"])), "addition")
            for row in rows:
                if (record := p.addition_record(row, agreement, period_start, period_end)) is not None:
                    records.append(record)
        return records


def build(settings: ConnectionSettings, context: AdapterContext) -> ConnectWiseAdapter:
    """The ``AdapterSpec.factory`` for kind ``connectwise``."""
    return ConnectWiseAdapter(settings, context)

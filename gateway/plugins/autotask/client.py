"""The Autotask adapter: ``protocol.py`` over the shared connector."""

from __future__ import annotations

from datetime import date
from typing import Any

import structlog

from gateway.adapters import AdapterContext, BillDocument, PsaCompany, PsaRecord, PushResult
from gateway.core.settings import ConnectionSettings
from gateway.plugins import psa_bills
from gateway.plugins.autotask import protocol as p
from gateway.sync.http import Connector, HttpResponse, RateLimit, StaticAuth

log = structlog.get_logger(__name__)

#: Autotask allows 10,000 requests per rolling hour per database, shared by every integration,
#: and 3 simultaneous requests per endpoint and integration. The gateway takes half the hour
#: (usage above 50% also makes Autotask add latency to every call) and never more than 3 at once.
DEFAULT_RATE_LIMIT = RateLimit(requests=5_000, per_seconds=3600.0, max_concurrent=3)

REQUIRED_CREDENTIALS = ("username", "secret", "integration_code")


class AutotaskAdapter:
    """An Autotask connection: companies in, bills out as contract charges or recurring service units."""

    def __init__(self, settings: ConnectionSettings, context: AdapterContext, **connector_kw: Any):
        self.name = settings.name
        self.config = p.Config.from_options(settings.name, settings.options)
        self._lookup_base = settings.base_url
        self._username = settings.credential("username")
        auth = StaticAuth(
            p.auth_headers(self._username, settings.credential("secret"), settings.credential("integration_code"))
        )
        self.connector = Connector.from_settings(
            settings, rate_limit=DEFAULT_RATE_LIMIT, auth=auth, clock=context.clock, **connector_kw
        )
        self._base: str | None = p.api_base({"url": self.config.zone_url}) if self.config.zone_url else None

    async def aclose(self) -> None:
        await self.connector.aclose()

    # -- plumbing ----------------------------------------------------------------------

    async def _api_base(self) -> str:
        if self._base is None:
            request = p.zone_request(self._lookup_base, self._username)
            response = await self.connector.request(request.method, request.url, params=request.params, authenticate=False)
            self._base = p.api_base(response.json())
            log.info("autotask.zone", connection=self.name, api_base=self._base)
        return self._base

    async def _send(self, request: p.Request) -> HttpResponse:
        url = request.url if request.url.startswith("http") else f"{await self._api_base()}/{request.url}"
        return await self.connector.request(request.method, url, params=request.params, json=request.json)

    async def _all(self, request: p.Request) -> list[dict[str, Any]]:
        """Every item of a query, following ``pageDetails.nextPageUrl``."""
        entity = request.url.split("/")[0]
        items, next_url = p.parse_page((await self._send(request)).json(), entity)
        while next_url:
            page, next_url = p.parse_page((await self.connector.request("GET", next_url)).json(), entity)
            items.extend(page)
        return items

    async def _companies_of_contracts(self, contract_ids: list[int]) -> dict[int, int]:
        if not contract_ids:
            return {}
        rows = await self._all(p.contracts_by_id_request(contract_ids))
        return {int(row["id"]): int(row["companyID"]) for row in rows}

    # -- PsaAdapter ----------------------------------------------------------------------

    async def list_companies(self) -> list[PsaCompany]:
        companies = p.parse_companies(await self._all(p.companies_request(self.config.page_size)))
        log.info("autotask.companies", connection=self.name, companies=len(companies))
        return companies

    async def push_bill(self, bill: BillDocument) -> PushResult:
        push = self._push_units if self.config.delivery == "contract_service" else self._push_charges
        result = await push(bill)
        log.info("psa.push", connection=self.name, key=bill.key, delivery=self.config.delivery,
                 external_id=result.external_id, created=result.created)
        return result

    async def read_back(self, period_start: date, period_end: date) -> list[PsaRecord]:
        if self.config.delivery == "contract_service":
            records = await self._read_units(period_start, period_end)
        else:
            rows = await self._all(p.gateway_charges_request(period_start))
            companies = await self._companies_of_contracts([int(row["contractID"]) for row in rows])
            records = p.charge_records(rows, companies, period_start, period_end)
        log.info("psa.read_back", connection=self.name, records=len(records))
        return records

    # -- contract charges ------------------------------------------------------------------

    async def _push_charges(self, bill: BillDocument) -> PushResult:
        present = p.lines_present(await self._all(p.charges_for_key_request(bill)), bill)
        ids = {line: int(row["id"]) for line, row in present.items()}
        if len(present) < len(psa_bills.priced_lines(bill)):
            contracts = await self._all(p.contracts_request(bill, recurring_only=False))
            contract_id = int(p.pick_contract(contracts, bill, recurring_only=False)["id"])
            for line, request in p.missing_charge_requests(bill, contract_id, present, self.config):
                ids[line] = p.created_item_id((await self._send(request)).json(), "ContractCharges")
            ids.update(await self._remove_copies(bill, contract_id))
        # Lines written by an earlier, interrupted push mean the bill was already (partly) delivered.
        return PushResult(external_id=str(ids[min(ids)]) if ids else "", created=bool(ids) and not present)

    async def _remove_copies(self, bill: BillDocument, contract_id: int) -> dict[int, int]:
        """After our creates: delete charges a re-sent request doubled; the kept charge id per line."""
        rows = await self._all(p.charges_for_key_request(bill))
        for copy in p.extra_charges(rows, bill):
            log.warning("psa.duplicate_removed", connection=self.name, key=bill.key, external_id=copy["id"])
            await self._send(p.delete_charge_request(contract_id, int(copy["id"])))
        return {line: int(group[0]["id"]) for line, group in p.charges_by_line(rows, bill).items()}

    # -- recurring service units -----------------------------------------------------------

    async def _push_units(self, bill: BillDocument) -> PushResult:
        """``created`` is True when this push adjusted the units, False when they already matched.

        An existing service is marked before its units change, so that a second bill for
        the cycle is refused even after a push that stopped in between; a service the
        adjustment creates is marked right after it.
        """
        contracts = await self._all(p.contracts_request(bill, recurring_only=True))
        contract_id = int(p.pick_contract(contracts, bill, recurring_only=True)["id"])
        service = await self._contract_service(contract_id)
        units = 0
        if service is not None:
            p.refuse_overwrite(service, bill)
            await self._mark(contract_id, service, bill)
            units, _ = p.current_units(await self._all(p.units_request(int(service["id"]), bill.period_start)))
        created = units != bill.device_count
        if created:
            await self._send(p.adjustment_request(contract_id, bill, units, self.config))
            if service is None and (service := await self._contract_service(contract_id)) is not None:
                await self._mark(contract_id, service, bill)
            if service is not None:
                await self._correct_units(contract_id, int(service["id"]), bill)
        if service is None:  # nothing to adjust and no service yet: zero devices on a new service
            return PushResult(external_id="", created=False)
        return PushResult(external_id=str(service["id"]), created=created)

    async def _mark(self, contract_id: int, service: dict[str, Any], bill: BillDocument) -> None:
        """Write the bill's marker into the service unless it is there already."""
        if not p.bill_services([service], bill):
            await self._send(p.mark_service_request(contract_id, int(service["id"]), bill))

    async def _correct_units(self, contract_id: int, service_id: int, bill: BillDocument) -> None:
        """Read the units back; a re-sent adjustment (lost answer) counted twice and is undone here."""
        units, _ = p.current_units(await self._all(p.units_request(service_id, bill.period_start)))
        if units != bill.device_count:
            log.warning("psa.units_corrected", connection=self.name, key=bill.key, found=units, wanted=bill.device_count)
            await self._send(p.adjustment_request(contract_id, bill, units, self.config))

    async def _contract_service(self, contract_id: int) -> dict[str, Any] | None:
        rows = await self._all(p.contract_service_request(contract_id, self.config))
        return min(rows, key=lambda row: int(row["id"])) if rows else None

    async def _read_units(self, period_start: date, period_end: date) -> list[PsaRecord]:
        services = []
        for service in await self._all(p.marked_services_request()):
            marker = psa_bills.marker_in_period(service.get("internalDescription"), period_start, period_end)
            if marker is not None:
                services.append((service, marker))
        companies = await self._companies_of_contracts([int(s["contractID"]) for s, _ in services])
        records = []
        for service, marker in services:
            units, price = p.current_units(await self._all(p.units_request(int(service["id"]), marker.period_start)))
            record = p.service_record(service, units, price, companies.get(int(service["contractID"])))
            if record is not None:
                records.append(record)
        return records


def build(settings: ConnectionSettings, context: AdapterContext) -> AutotaskAdapter:
    """The ``AdapterSpec.factory`` for kind ``autotask``."""
    return AutotaskAdapter(settings, context)

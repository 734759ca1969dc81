"""The Autotask adapter against the Autotask simulator over loopback."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import date
from decimal import Decimal
from functools import partial

import aiohttp
import builders
import pytest

from gateway.adapters import AdapterContext, BillDocument, BillLineDoc
from gateway.core.settings import ConnectionSettings
from gateway.errors import AuthError, ConfigError, PermanentError
from gateway.plugins import get_plugin_manager
from gateway.plugins.autotask.client import DEFAULT_RATE_LIMIT, AutotaskAdapter
from gateway.plugins.autotask.simulator import STATE, create_app
from gateway.plugins.psa_bills import parse_marker
from gateway.testing.proxy import FaultProxy

CREDENTIALS = {"username": "api-user@sim.example", "secret": "sim-secret", "integration_code": "SIMINTEGRATIONCODE000000001"}
HEADERS = {"ApiIntegrationCode": CREDENTIALS["integration_code"], "UserName": CREDENTIALS["username"], "Secret": "sim-secret"}
FEB = (date(2026, 2, 1), date(2026, 2, 28))
MARCH = (date(2026, 3, 1), date(2026, 3, 31))


bill = partial(builders.bill, devices=4, connection="at-test", customer_name="Customer")


async def start(aiohttp_server, **kw):
    app = create_app(**{"companies": 7, "contracts": 6, **kw})
    return app, await aiohttp_server(app)


@pytest.fixture
async def sim(aiohttp_server):
    return await start(aiohttp_server)


@pytest.fixture
async def make_adapter(sim, clock):
    adapters = []

    async def no_wait(seconds: float) -> None:  # retries go at once
        return None

    def make(server=None, credentials=CREDENTIALS, rate_limit=None, **options):
        server = server or sim[1]
        settings = ConnectionSettings(
            name="at-test",
            plugin="autotask",
            base_url=str(server.make_url("/")),
            credentials=credentials,
            options={"page_size": 3, "billing_code_id": 2001, "service_id": 1, **options},
            rate_limit=rate_limit,
        )
        adapter = AutotaskAdapter(settings, AdapterContext(clock=clock), sleep=no_wait)
        adapters.append(adapter)
        return adapter

    yield make
    for adapter in adapters:
        await adapter.aclose()


def companies(app) -> list[int]:
    return sorted(app[STATE].companies)


def test_registered_as_a_psa_adapter_needing_its_three_credentials():
    spec = get_plugin_manager(load_entry_points=False).adapters()["autotask"]
    assert spec.role == "psa" and set(spec.required_credentials) == set(CREDENTIALS)


async def test_lists_every_company_across_pages(make_adapter, sim):
    app, _ = sim
    got = await make_adapter().list_companies()
    assert [c.external_id for c in got] == [str(i) for i in companies(app)]
    assert app[STATE].requests["POST /atservicesrest/v1.0/{entity}/query"] == 1
    assert app[STATE].requests["GET /atservicesrest/v1.0/{entity}/query/next"] == 2  # pages of 3, 3, 1


async def test_push_creates_one_charge_per_line_with_quantity_and_amount(make_adapter, sim):
    app, _ = sim
    company = companies(app)[0]
    result = await make_adapter().push_bill(bill(company, devices=4))
    charges = sorted(app[STATE].charges.values(), key=lambda c: c["id"])
    assert result.created and result.external_id == str(charges[0]["id"])
    assert [(c["unitQuantity"], c["billableAmount"]) for c in charges] == [(4.0, 10.0), (1.0, 10.0)]
    contract = app[STATE].contracts[charges[0]["contractID"]]
    assert contract["companyID"] == company and all(c["billingCodeID"] == 2001 for c in charges)


async def test_g2_push_interrupted_between_lines_completes_without_copies(make_adapter, sim):
    app, _ = sim
    b = bill(companies(app)[2])
    await make_adapter().push_bill(b)
    last = max(app[STATE].charges)
    del app[STATE].charges[last]  # the gateway crashed after line 1 was accepted
    result = await make_adapter().push_bill(b)
    assert not result.created
    lines = sorted(c["description"].splitlines()[-1] for c in app[STATE].charges.values())
    assert len(lines) == 2 and lines[0].endswith("line=1") and lines[1].endswith("line=2")


async def test_g3_read_back_returns_what_was_pushed_in_the_period(make_adapter, sim):
    app, _ = sim
    adapter = make_adapter()
    a, b = companies(app)[0], companies(app)[3]
    await adapter.push_bill(bill(a, devices=3))
    await adapter.push_bill(bill(b, devices=8))
    await adapter.push_bill(bill(a, period=MARCH, devices=5))
    records = await adapter.read_back(*FEB)
    assert sorted((r.key, r.company_external_id, r.quantity, r.amount) for r in records) == sorted([
        (f"at-test:{a}:2026-02", str(a), Decimal(3), Decimal("17.50")),
        (f"at-test:{b}:2026-02", str(b), Decimal(8), Decimal("30.00")),
    ])


async def test_contract_service_delivery_brings_units_to_the_device_count(make_adapter, sim):
    app, _ = sim
    adapter = make_adapter(delivery="contract_service")
    for company in companies(app)[:2]:  # the first has the service already (1-20 units), the second has none yet
        result = await adapter.push_bill(bill(company, devices=21))
        assert result.created
        service = app[STATE].contract_services[int(result.external_id)]
        assert app[STATE].contracts[service["contractID"]]["companyID"] == company
        assert app[STATE].units_on(service["id"], date(2026, 2, 1)) == 21
    assert len(app[STATE].adjustments) == 2


async def test_g2_contract_service_pushed_twice_adjusts_once(make_adapter, sim):
    app, _ = sim
    adapter = make_adapter(delivery="contract_service")
    b = bill(companies(app)[1], devices=9)  # its contract has no service yet: 0 units
    first, second = await adapter.push_bill(b), await adapter.push_bill(b)
    assert (first.created, second.created) == (True, False)
    assert len(app[STATE].adjustments) == 1


async def test_g2_crash_between_adjustment_and_marker_heals_without_a_second_adjustment(make_adapter, sim):
    app, _ = sim
    b = bill(companies(app)[1], devices=9)
    result = await make_adapter(delivery="contract_service").push_bill(b)
    app[STATE].contract_services[int(result.external_id)]["internalDescription"] = None  # marker never written
    again = await make_adapter(delivery="contract_service").push_bill(b)
    assert not again.created and len(app[STATE].adjustments) == 1
    assert b.key in app[STATE].contract_services[int(result.external_id)]["internalDescription"]


async def test_g3_contract_service_read_back_reports_units_and_amount(make_adapter, sim):
    app, _ = sim
    adapter = make_adapter(delivery="contract_service")
    company = companies(app)[1]
    await adapter.push_bill(bill(company, devices=6))  # total 25.00 → 4.166667 per unit
    records = await adapter.read_back(*FEB)
    assert [(r.key, r.company_external_id, r.quantity, r.amount) for r in records] == [
        (f"at-test:{company}:2026-02", str(company), Decimal(6), Decimal("25.00"))]


async def test_invoice_delivery_is_refused_at_start_up(make_adapter):
    with pytest.raises(ConfigError, match="invoices"):
        make_adapter(delivery="invoice")


async def test_bad_secret_is_an_auth_error_without_the_secret(make_adapter):
    adapter = make_adapter(credentials={**CREDENTIALS, "secret": "wrong-secret"})
    with pytest.raises(AuthError) as info:
        await adapter.list_companies()
    assert "wrong-secret" not in str(info.value)


async def test_validation_error_is_permanent_and_not_retried(make_adapter, sim):
    app, _ = sim
    adapter = make_adapter(billing_code_id=9999)
    with pytest.raises(PermanentError) as info:
        await adapter.push_bill(bill(companies(app)[0]))
    assert info.value.status == 400 and "billingCodeID 9999" in str(info.value)
    assert app[STATE].requests["POST /atservicesrest/v1.0/Contracts/{parent_id}/Charges"] == 1


async def test_company_without_a_contract_is_a_permanent_error(make_adapter, sim):
    app, _ = sim
    with pytest.raises(PermanentError, match="no active"):
        await make_adapter().push_bill(bill(companies(app)[6]))  # only the first six have contracts


async def test_a_configured_zone_url_is_used_without_a_zone_look_up(make_adapter, sim):
    app, server = sim
    adapter = make_adapter(zone_url=str(server.make_url("/atservicesrest/")))
    assert len(await adapter.list_companies()) == 7
    assert app[STATE].requests["GET /atservicesrest/v1.0/zoneInformation"] == 0


async def test_simulator_enforces_three_threads_per_endpoint(sim):
    app, server = sim
    app[STATE].latency = 0.05
    async with aiohttp.ClientSession(headers=HEADERS) as session:
        url = str(server.make_url("/atservicesrest/v1.0/Companies/query"))
        body = {"filter": [{"op": "gte", "field": "id", "value": 0}], "MaxRecords": 5}

        async def one() -> int:
            async with session.post(url, json=body) as response:
                return response.status

        statuses = await asyncio.gather(*(one() for _ in range(6)))
    assert statuses.count(200) == 3 and statuses.count(429) == 3


async def test_adapter_stays_inside_the_thread_limit_under_concurrent_pushes(make_adapter, sim):
    app, _ = sim
    app[STATE].latency = 0.02
    adapter = make_adapter()
    assert DEFAULT_RATE_LIMIT.max_concurrent <= app[STATE].thread_limit
    await asyncio.gather(*(adapter.push_bill(bill(company)) for company in companies(app)[:6]))
    assert app[STATE].throttled == 0 and app[STATE].peak_threads <= 3
    assert len(app[STATE].charges) == 12


async def test_adapter_rate_limit_keeps_inside_the_hourly_threshold(aiohttp_server, make_adapter):
    # The hour shrunk to 0.3 s and 10,000 requests to 5, for a test that runs in about a second.
    app, server = await start(aiohttp_server, companies=10, hourly_limit=5, window_seconds=0.3)
    adapter = make_adapter(server=server, page_size=1, rate_limit={"requests": 5, "per_seconds": 0.3, "max_concurrent": 3})
    assert len(await adapter.list_companies()) == 10
    assert app[STATE].throttled == 0
    assert sum(app[STATE].requests.values()) == 11  # zone look-up + 10 pages, none refused


async def test_g2_a_late_bill_for_an_earlier_cycle_does_not_rewrite_later_units(make_adapter, sim):
    app, _ = sim
    adapter = make_adapter(delivery="contract_service")
    company = companies(app)[1]
    result = await adapter.push_bill(bill(company, period=MARCH, devices=12))
    with pytest.raises(PermanentError, match="already carries the cycle from 2026-03-01"):
        await adapter.push_bill(bill(company, devices=5))  # February, delivered late
    assert app[STATE].units_on(int(result.external_id), date(2026, 3, 1)) == 12
    assert len(app[STATE].adjustments) == 1


async def proxied(aiohttp_server, sim) -> tuple[FaultProxy, object]:
    proxy = FaultProxy(str(sim[1].make_url("/")).rstrip("/"))
    return proxy, await aiohttp_server(proxy.app)


async def test_g2_a_lost_answer_to_a_charge_create_leaves_one_charge_per_line(aiohttp_server, sim, make_adapter):
    app, _ = sim
    proxy, front = await proxied(aiohttp_server, sim)
    proxy.lose_responses(1, method="POST", path=r"/Charges$")  # Autotask saved line 1; the answer was lost
    result = await make_adapter(server=front).push_bill(bill(companies(app)[0]))
    assert len([s for s in proxy.requests("POST") if s.path.endswith("/Charges")]) == 3  # line 1 went twice
    assert len(app[STATE].charges) == 2 and result.external_id == str(min(app[STATE].charges))
    assert not (await make_adapter(server=front).push_bill(bill(companies(app)[0]))).created


async def test_g2_a_lost_answer_to_an_adjustment_is_corrected_to_the_device_count(aiohttp_server, sim, make_adapter):
    app, _ = sim
    proxy, front = await proxied(aiohttp_server, sim)
    proxy.lose_responses(1, method="POST", path=r"/ContractServiceAdjustments$")
    adapter = make_adapter(server=front, delivery="contract_service")
    result = await adapter.push_bill(bill(companies(app)[1], devices=7))  # a contract without the service: 0 units
    assert app[STATE].units_on(int(result.external_id), date(2026, 2, 1)) == 7
    assert [a["unitChange"] for a in app[STATE].adjustments] == [7, 7, -7]  # re-sent, then undone


def keyed(company: int, kind_and_source: str, devices: int) -> BillDocument:
    """A February bill keyed as the billing core keys it: by bill kind and source."""
    return replace(bill(company, devices=devices), key=f"gw-at-test-{company}-{kind_and_source}-20260201-20260228",
                   number=f"B-{kind_and_source}")


@pytest.mark.parametrize(
    "which, second_kind, second_devices",
    [(0, "plan-8", 5), (1, "plan-8", 5), (1, "plan-8", 9), (1, "monthly-1", 4)],
    ids=["service-existed", "second-plan", "second-plan-same-count", "plan-and-monthly"],
)
async def test_g2_a_second_bill_for_the_cycle_a_contract_service_holds_is_refused_naming_both_keys(
    make_adapter, sim, which, second_kind, second_devices
):
    app, _ = sim
    adapter = make_adapter(delivery="contract_service")
    company = companies(app)[which]
    first, second = keyed(company, "plan-7", 9), keyed(company, second_kind, second_devices)
    service_id = int((await adapter.push_bill(first)).external_id)
    adjustments = len(app[STATE].adjustments)
    with pytest.raises(PermanentError) as info:
        await adapter.push_bill(second)
    message = str(info.value)
    assert first.key in message and second.key in message
    assert "several plans" in message and 'options.delivery = "charge"' in message
    assert app[STATE].units_on(service_id, date(2026, 2, 1)) == 9 and len(app[STATE].adjustments) == adjustments
    assert parse_marker(app[STATE].contract_services[service_id]["internalDescription"]).key == first.key
    assert [r.key for r in await adapter.read_back(*FEB)] == [first.key]


async def test_g2_an_existing_contract_service_is_marked_before_its_units_change(aiohttp_server, sim, make_adapter):
    app, _ = sim
    proxy, front = await proxied(aiohttp_server, sim)
    company = companies(app)[0]  # its contract has the service with 1-20 units
    result = await make_adapter(server=front, delivery="contract_service").push_bill(bill(company, devices=21))
    writes = [(s.method, s.path.rsplit("/", 1)[-1]) for s in proxy.requests() if s.method in ("PATCH", "POST")
              and not s.path.endswith("/query")]
    assert writes == [("PATCH", "Services"), ("POST", "ContractServiceAdjustments")]
    assert app[STATE].units_on(int(result.external_id), date(2026, 2, 1)) == 21


async def test_g2_two_bills_for_one_cycle_each_get_their_own_charges(make_adapter, sim):
    app, _ = sim
    company = companies(app)[0]
    first, second = keyed(company, "plan-7", 3), keyed(company, "plan-8", 5)
    assert (await make_adapter().push_bill(first)).created and (await make_adapter().push_bill(second)).created
    records = await make_adapter().read_back(*FEB)
    assert sorted((r.key, r.amount) for r in records) == [(first.key, first.total), (second.key, second.total)]


# S7: 333 devices, 4.50 for 12 and 6.00 for 19 of March's 31 days. The billing core keeps the prorated
# unit price at 4 places (1.7419, 3.6774) and rounds each amount from the exact fraction, so quantity x
# unit price misses the amount by a cent on both lines (580.05 vs 580.06, 1224.57 vs 1224.58).
PRORATED = (
    BillLineDoc("Devices 1-12 Mar: 333 x 4.50 (12/31 days)", Decimal(333), Decimal("1.7419"), Decimal("580.06")),
    BillLineDoc("Devices 13-31 Mar: 333 x 6.00 (19/31 days)", Decimal(333), Decimal("3.6774"), Decimal("1224.58")),
)


async def test_s7_two_prorated_lines_arrive_as_charges_adding_up_to_the_bill_total_to_the_cent(make_adapter, sim):
    app, _ = sim
    b = replace(bill(companies(app)[0], period=MARCH, devices=333), lines=PRORATED,
                total=sum((line.amount for line in PRORATED), Decimal(0)))
    assert all((line.quantity * line.unit_price).quantize(Decimal("0.01")) != line.amount for line in b.lines)  # the S7 case
    await make_adapter().push_bill(b)
    charges = sorted(app[STATE].charges.values(), key=lambda c: c["id"])
    assert [Decimal(str(c["billableAmount"])) for c in charges] == [Decimal("580.06"), Decimal("1224.58")]
    assert sum(Decimal(str(c["billableAmount"])) for c in charges) == b.total == Decimal("1804.64")
    assert [parse_marker(c["description"]).line for c in charges] == [1, 2]
    [record] = await make_adapter().read_back(*MARCH)
    assert (record.key, record.amount) == (b.key, b.total)


@pytest.mark.parametrize(
    "options, option",
    [({"page_size": "all"}, "page_size"), ({"billing_code_id": "MSP"}, "billing_code_id"),
     ({"zone_url": "zone15"}, "zone_url")],
)
async def test_a_bad_option_stops_the_adapter_at_start_up_with_a_config_error(make_adapter, options, option):
    with pytest.raises(ConfigError, match=f"connection 'at-test': options.{option} must be"):
        make_adapter(**options)

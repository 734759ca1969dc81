"""The HaloPSA adapter against the HaloPSA simulator over loopback."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import date
from decimal import Decimal
from functools import partial

import builders
import pytest

from gateway.adapters import AdapterContext, BillLineDoc
from gateway.core.settings import ConnectionSettings
from gateway.errors import AuthError, ConfigError, PermanentError
from gateway.plugins import get_plugin_manager
from gateway.plugins.halopsa.client import HaloPsaAdapter
from gateway.plugins.halopsa.simulator import STATE, create_app

CREDENTIALS = {"client_id": "sim-client", "client_secret": "sim-secret"}
FEB = (date(2026, 2, 1), date(2026, 2, 28))
MARCH = (date(2026, 3, 1), date(2026, 3, 31))


bill = partial(builders.bill, devices=4, connection="halo-test", customer_name="Client", currency="GBP")


@pytest.fixture
async def sim(aiohttp_server):
    app = create_app(clients=7, tenant="msp")
    return app, await aiohttp_server(app)


@pytest.fixture
async def make_adapter(sim, clock):
    adapters = []

    async def no_wait(seconds: float) -> None:  # retries go at once
        return None

    def make(credentials=CREDENTIALS, server=None, **options):
        settings = ConnectionSettings(
            name="halo-test",
            plugin="halopsa",
            base_url=str((server or sim[1]).make_url("/")),
            credentials=credentials,
            options={"page_size": 3, "tenant": "msp", **options},
        )
        adapter = HaloPsaAdapter(settings, AdapterContext(clock=clock), sleep=no_wait)
        adapters.append(adapter)
        return adapter

    yield make
    for adapter in adapters:
        await adapter.aclose()


def clients(app) -> list[int]:
    return sorted(app[STATE].clients)


def gateway_invoices(app) -> list[dict]:
    return [i for i in app[STATE].invoices.values() if "gateway-bill" in (i.get("internal_note") or "")]


def test_registered_as_a_psa_adapter_needing_its_two_credentials():
    spec = get_plugin_manager(load_entry_points=False).adapters()["halopsa"]
    assert spec.role == "psa" and set(spec.required_credentials) == set(CREDENTIALS)


async def test_lists_every_client_across_pages(make_adapter, sim):
    app, _ = sim
    got = await make_adapter().list_companies()
    assert [c.external_id for c in got] == [str(i) for i in clients(app)]
    assert app[STATE].requests["GET /api/Client"] == 3  # pages of 3, 3, 1
    assert app[STATE].tokens_issued == 1


async def test_push_creates_one_invoice_with_lines_and_amount(make_adapter, sim):
    app, _ = sim
    client = clients(app)[0]
    result = await make_adapter().push_bill(bill(client, devices=6))
    [invoice] = gateway_invoices(app)
    assert result.created and result.external_id == str(invoice["id"])
    assert invoice["client_id"] == client and Decimal(str(invoice["total"])) == Decimal("25.00")
    assert [(line["qty_order"], line["net_amount"]) for line in invoice["lines"]] == [(6.0, 15.0), (1.0, 10.0)]


async def test_g3_read_back_returns_what_was_pushed_in_the_period(make_adapter, sim):
    app, _ = sim
    adapter = make_adapter()
    a, b = clients(app)[0], clients(app)[4]
    pushed_a = await adapter.push_bill(bill(a, devices=3))
    pushed_b = await adapter.push_bill(bill(b, devices=8))
    await adapter.push_bill(bill(a, period=MARCH, devices=5))
    records = await adapter.read_back(*FEB)
    assert sorted((r.key, r.company_external_id, r.external_id, r.quantity, r.amount) for r in records) == sorted([
        (f"halo-test:{a}:2026-02", str(a), pushed_a.external_id, Decimal(3), Decimal("17.50")),
        (f"halo-test:{b}:2026-02", str(b), pushed_b.external_id, Decimal(8), Decimal("30.00")),
    ])


async def test_bad_client_secret_is_an_auth_error_without_the_secret(make_adapter):
    adapter = make_adapter(credentials={**CREDENTIALS, "client_secret": "wrong-secret"})
    with pytest.raises(AuthError) as info:
        await adapter.list_companies()
    assert "wrong-secret" not in str(info.value)


async def test_validation_error_is_permanent_and_not_retried(make_adapter, sim):
    app, _ = sim
    with pytest.raises(PermanentError) as info:
        await make_adapter().push_bill(bill(99999))  # no such client
    assert info.value.status == 400 and "valid Client" in str(info.value)
    assert app[STATE].requests["POST /api/Invoice"] == 1


async def test_throttled_tenant_is_survived(aiohttp_server, clock):
    app = create_app(clients=5, rate_limit=(3, 0.3))
    server = await aiohttp_server(app)
    settings = ConnectionSettings(name="halo-rl", plugin="halopsa", base_url=str(server.make_url("/")),
                                  credentials=CREDENTIALS, options={"page_size": 1})

    async def wait_out_the_window(_: float) -> None:
        await asyncio.sleep(0.3)

    adapter = HaloPsaAdapter(settings, AdapterContext(clock=clock), sleep=wait_out_the_window)
    assert len(await adapter.list_companies()) == 5
    assert adapter.connector.stats.throttled >= 1
    await adapter.aclose()


async def test_a_token_past_its_lifetime_is_renewed(aiohttp_server, clock):
    app = create_app(clients=2, token_lifetime=600, clock=clock)
    server = await aiohttp_server(app)
    settings = ConnectionSettings(name="halo-life", plugin="halopsa", base_url=str(server.make_url("/")),
                                  credentials=CREDENTIALS)
    adapter = HaloPsaAdapter(settings, AdapterContext(clock=clock))
    await adapter.list_companies()
    clock.advance(minutes=11)  # past the token's 10 minutes
    assert len(await adapter.list_companies()) == 2
    assert app[STATE].tokens_issued == 2
    await adapter.aclose()


# S7: 333 devices, 4.50 for 12 and 6.00 for 19 of March's 31 days. The billing core keeps the prorated
# unit price at 4 places (1.7419, 3.6774) and rounds each amount from the exact fraction, so quantity x
# unit price misses the amount by a cent on both lines (580.05 vs 580.06, 1224.57 vs 1224.58).
PRORATED = (
    BillLineDoc("Devices 1-12 Mar: 333 x 4.50 (12/31 days)", Decimal(333), Decimal("1.7419"), Decimal("580.06")),
    BillLineDoc("Devices 13-31 Mar: 333 x 6.00 (19/31 days)", Decimal(333), Decimal("3.6774"), Decimal("1224.58")),
)


async def test_s7_two_prorated_lines_arrive_and_the_invoice_total_is_the_bill_total_to_the_cent(make_adapter, sim):
    app, _ = sim
    b = replace(bill(clients(app)[0], period=MARCH, devices=333), lines=PRORATED,
                total=sum((line.amount for line in PRORATED), Decimal(0)))
    assert all((line.quantity * line.unit_price).quantize(Decimal("0.01")) != line.amount for line in b.lines)  # the S7 case
    result = await make_adapter().push_bill(b)
    [invoice] = gateway_invoices(app)
    assert str(invoice["id"]) == result.external_id
    assert Decimal(str(invoice["total"])) == b.total == Decimal("1804.64")
    assert [Decimal(str(line["net_amount"])) for line in invoice["lines"]] == [Decimal("580.06"), Decimal("1224.58")]
    assert all("prorated" in line["item_shortdescription"] for line in invoice["lines"])
    [record] = await make_adapter().read_back(*MARCH)
    assert (record.key, record.amount) == (b.key, b.total)


@pytest.mark.parametrize("options, option", [({"page_size": "many"}, "page_size"), ({"tenant": ["msp"]}, "tenant")])
async def test_a_bad_option_stops_the_adapter_at_start_up_with_a_config_error(make_adapter, options, option):
    with pytest.raises(ConfigError, match=f"connection 'halo-test': options.{option} must be"):
        make_adapter(**options)

"""The ConnectWise adapter against the ConnectWise simulator over loopback."""

from __future__ import annotations

from dataclasses import replace
from datetime import date
from decimal import Decimal
from functools import partial

import builders
import pytest

from gateway.adapters import AdapterContext, BillDocument, BillLineDoc
from gateway.core.settings import ConnectionSettings
from gateway.errors import AuthError, ConfigError, PermanentError
from gateway.plugins import get_plugin_manager
from gateway.plugins.connectwise.client import ConnectWiseAdapter
from gateway.plugins.connectwise.simulator import FAULTS, STATE, create_app
from gateway.plugins.psa_bills import parse_marker
from gateway.simulators import VirtualTime
from gateway.testing.proxy import FaultProxy

CREDENTIALS = {"company": "simmsp", "public_key": "sim-public", "private_key": "sim-private", "client_id": "sim-client-id"}


bill = partial(builders.bill, company="2", connection="cw-test", customer_name="Customer")


@pytest.fixture
async def sim(aiohttp_server):
    app = create_app(companies=7, agreements=5)
    server = await aiohttp_server(app)
    return app, server


@pytest.fixture
async def make_adapter(sim, clock):
    adapters = []

    async def no_wait(seconds: float) -> None:  # retries go at once
        return None

    def make(credentials=CREDENTIALS, server=None, **options):
        server = server or sim[1]
        settings = ConnectionSettings(
            name="cw-test",
            plugin="connectwise",
            base_url=str(server.make_url("/")),
            credentials=credentials,
            options={"page_size": 3, **options},
        )
        adapter = ConnectWiseAdapter(settings, AdapterContext(clock=clock), sleep=no_wait)
        adapters.append(adapter)
        return adapter

    yield make
    for adapter in adapters:
        await adapter.aclose()


@pytest.fixture
def adapter(make_adapter):
    return make_adapter()


def test_registered_as_a_psa_adapter_needing_its_four_credentials():
    spec = get_plugin_manager(load_entry_points=False).adapters()["connectwise"]
    assert spec.role == "psa" and set(spec.required_credentials) == set(CREDENTIALS)


async def test_lists_every_company_across_pages(adapter, sim):
    app, _ = sim
    companies = await adapter.list_companies()
    assert [c.name for c in companies] == [c["name"] for c in app[STATE].companies.values()]
    assert len(companies) == 7
    assert app[STATE].requests["GET /v4_6_release/apis/3.0/company/companies"] == 3  # pages of 3, 3, 1


async def test_push_creates_one_invoice_with_the_bill_lines_and_amount(adapter, sim):
    app, _ = sim
    result = await adapter.push_bill(bill(devices=4))
    invoices = list(app[STATE].invoices.values())
    assert result.created and [str(i["id"]) for i in invoices] == [result.external_id]
    assert invoices[0]["company"]["id"] == 2 and invoices[0]["reference"] == "cw-test:2:2026-02"
    assert Decimal(str(invoices[0]["total"])) == Decimal("20.00")
    lines = sorted(app[STATE].products.values(), key=lambda row: row["sequenceNumber"])
    assert [(row["quantity"], row["price"]) for row in lines] == [(4.0, 2.5), (1.0, 10.0)]


async def test_g2_push_interrupted_after_the_invoice_was_accepted_completes_without_a_copy(make_adapter, sim):
    app, _ = sim
    first = await make_adapter().push_bill(bill())
    last_line = max(app[STATE].products, key=lambda k: app[STATE].products[k]["sequenceNumber"])
    del app[STATE].products[last_line]  # the gateway stopped after the invoice and its first line
    result = await make_adapter().push_bill(bill())  # a restarted gateway pushes again
    assert not result.created and result.external_id == first.external_id
    assert len(app[STATE].invoices) == 1
    assert sorted(p["sequenceNumber"] for p in app[STATE].products.values()) == [1, 2]


async def test_g2_a_lost_answer_to_the_create_leaves_one_invoice(aiohttp_server, sim, make_adapter):
    app, server = sim
    proxy = FaultProxy(str(server.make_url("/")).rstrip("/"))
    front = await aiohttp_server(proxy.app)
    proxy.lose_responses(1, method="POST")  # ConnectWise made the invoice; the answer never came
    result = await make_adapter(server=front).push_bill(bill())
    assert [s.method for s in proxy.requests("POST")][:2] == ["POST", "POST"]  # the connector re-sent it
    assert [str(i) for i in app[STATE].invoices] == [result.external_id]
    assert len(app[STATE].products) == 2
    assert not (await make_adapter(server=front).push_bill(bill())).created


async def test_g2_two_invoices_for_one_bill_are_refused_not_guessed(adapter, sim):
    app, _ = sim
    result = await adapter.push_bill(bill())
    copy = dict(app[STATE].invoices[int(result.external_id)], id=99)  # a lost answer, re-sent
    app[STATE].invoices[99] = copy
    with pytest.raises(PermanentError, match=f"2 invoices for bill INV-2-02.*ids {result.external_id}, 99"):
        await adapter.push_bill(bill())
    assert len(app[STATE].products) == 2  # nothing more was written


async def test_g3_read_back_returns_what_was_pushed_in_the_period(adapter):
    feb_a, feb_b = bill(company="2", devices=3), bill(company="3", devices=5)
    march = bill(company="2", period=(date(2026, 3, 1), date(2026, 3, 31)), devices=9)
    pushed = {b.key: await adapter.push_bill(b) for b in (feb_a, feb_b, march)}
    records = await adapter.read_back(date(2026, 2, 1), date(2026, 2, 28))
    got = {(r.key, r.company_external_id, r.external_id, r.quantity, r.amount) for r in records}
    assert got == {
        (feb_a.key, "2", pushed[feb_a.key].external_id, Decimal(3), Decimal("17.50")),
        (feb_b.key, "3", pushed[feb_b.key].external_id, Decimal(5), Decimal("22.50")),
    }


async def test_addition_delivery_sets_the_quantity_of_one_addition(make_adapter, sim):
    app, _ = sim
    adapter = make_adapter(delivery="addition")
    result = await adapter.push_bill(bill(company="2", devices=3))
    additions = list(app[STATE].additions.values())
    assert result.created and len(additions) == 1 and additions[0]["quantity"] == 3
    assert Decimal(str(additions[0]["extPrice"])) == Decimal("17.50")


async def test_g2_addition_pushed_twice_is_patched_once_and_the_next_cycle_updates_it(make_adapter, sim):
    app, _ = sim
    adapter = make_adapter(delivery="addition")
    first = await adapter.push_bill(bill(devices=3))
    again = await adapter.push_bill(bill(devices=3))
    assert (first.created, again.created) == (True, False)
    assert app[STATE].requests["PATCH /v4_6_release/apis/3.0/finance/agreements/{agreement_id}/additions/{addition_id}"] == 0
    march = await adapter.push_bill(bill(period=(date(2026, 3, 1), date(2026, 3, 31)), devices=8))
    assert march.created and march.external_id == first.external_id
    assert [a["quantity"] for a in app[STATE].additions.values()] == [8]


async def test_g3_addition_read_back_reports_quantity_and_amount(make_adapter):
    adapter = make_adapter(delivery="addition")
    b = bill(company="3", devices=7)
    await adapter.push_bill(b)
    records = await adapter.read_back(date(2026, 2, 1), date(2026, 2, 28))
    assert [(r.key, r.company_external_id, r.quantity, r.amount) for r in records] == [
        (b.key, "3", Decimal("7.0"), Decimal("27.50"))
    ]
    assert await adapter.read_back(date(2026, 3, 1), date(2026, 3, 31)) == []


async def test_addition_without_an_active_agreement_is_a_permanent_error(make_adapter):
    adapter = make_adapter(delivery="addition")
    with pytest.raises(PermanentError, match="company 7 has no active agreement"):
        await adapter.push_bill(bill(company="7"))  # only companies 1-5 have agreements


@pytest.mark.parametrize(
    "changed",
    [{"private_key": "wrong"}, {"client_id": "unregistered"}, {"company": "simmsp", "public_key": "nope"}],
)
async def test_bad_credentials_are_an_auth_error_without_the_secret(make_adapter, changed):
    adapter = make_adapter(credentials={**CREDENTIALS, **changed})
    with pytest.raises(AuthError) as info:
        await adapter.list_companies()
    assert "sim-private" not in str(info.value) and "wrong" not in str(info.value)


async def test_validation_error_is_permanent_and_not_retried(make_adapter, sim):
    app, _ = sim
    adapter = make_adapter(catalog_item="NO-SUCH-ITEM")
    with pytest.raises(PermanentError) as info:
        await adapter.push_bill(bill())
    assert info.value.status == 400 and "catalogItem" in str(info.value)
    assert app[STATE].requests["POST /v4_6_release/apis/3.0/procurement/products"] == 1


async def test_simulator_rate_limit_answers_429_and_the_adapter_gets_through(aiohttp_server, clock):
    # A 429 without Retry-After pauses the connection for its window (60 s): virtual time on both sides.
    time = VirtualTime()
    app = create_app(companies=4, rate_limit=(2, 0.3), monotonic=time.monotonic)
    server = await aiohttp_server(app)
    settings = ConnectionSettings(
        name="cw-rl", plugin="connectwise", base_url=str(server.make_url("/")), credentials=CREDENTIALS,
        options={"page_size": 1},
    )
    adapter = ConnectWiseAdapter(
        settings, AdapterContext(clock=clock), sleep=time.sleep, monotonic=time.monotonic
    )
    assert len(await adapter.list_companies()) == 4
    assert adapter.connector.stats.throttled >= 1
    await adapter.aclose()


async def test_g2_a_late_bill_for_an_earlier_cycle_does_not_overwrite_the_addition(make_adapter, sim):
    app, _ = sim
    adapter = make_adapter(delivery="addition")
    await adapter.push_bill(bill(period=(date(2026, 3, 1), date(2026, 3, 31)), devices=8))
    with pytest.raises(PermanentError, match="already carries the cycle from 2026-03-01"):
        await adapter.push_bill(bill(devices=3))  # February, delivered late
    assert [a["quantity"] for a in app[STATE].additions.values()] == [8]


async def test_recovers_from_an_answer_slower_than_the_timeout(sim, clock):
    app, server = sim
    app[FAULTS].slow(1, seconds=0.5)
    settings = ConnectionSettings(
        name="cw-slow", plugin="connectwise", base_url=str(server.make_url("/")), credentials=CREDENTIALS,
        timeout_seconds=0.1, options={"page_size": 1000},
    )

    async def no_wait(_: float) -> None:
        return None

    adapter = ConnectWiseAdapter(settings, AdapterContext(clock=clock), sleep=no_wait)
    assert len(await adapter.list_companies()) == 7
    assert adapter.connector.stats.retries == 1
    await adapter.aclose()


def keyed(kind_and_source: str, devices: int) -> BillDocument:
    """A February bill of company 2 keyed as the billing core keys it: by bill kind and source."""
    return replace(bill(devices=devices), key=f"gw-cw-test-2-{kind_and_source}-20260201-20260228",
                   number=f"B-{kind_and_source}")


@pytest.mark.parametrize(
    "second",
    [keyed("plan-8", 5), keyed("plan-8", 3), keyed("monthly-1", 4)],
    ids=["second-plan", "second-plan-same-count", "plan-and-monthly"],
)
async def test_g2_a_second_bill_for_the_cycle_an_addition_holds_is_refused_naming_both_keys(make_adapter, sim, second):
    app, _ = sim
    adapter = make_adapter(delivery="addition")
    first = keyed("plan-7", 3)
    await adapter.push_bill(first)
    with pytest.raises(PermanentError) as info:
        await adapter.push_bill(second)
    message = str(info.value)
    assert first.key in message and second.key in message
    assert "several plans" in message and 'options.delivery = "invoice"' in message
    [addition] = app[STATE].additions.values()
    assert (addition["quantity"], parse_marker(addition["invoiceDescription"]).key) == (3, first.key)
    assert [r.key for r in await adapter.read_back(date(2026, 2, 1), date(2026, 2, 28))] == [first.key]
    assert not (await adapter.push_bill(first)).created  # the first bill is still the one delivered


async def test_g2_two_bills_for_one_cycle_each_get_their_own_invoice(adapter, sim):
    app, _ = sim
    first, second = keyed("plan-7", 3), keyed("plan-8", 5)
    pushed = [await adapter.push_bill(first), await adapter.push_bill(second)]
    assert all(result.created for result in pushed) and len(app[STATE].invoices) == 2
    records = await adapter.read_back(date(2026, 2, 1), date(2026, 2, 28))
    assert sorted((r.key, r.amount) for r in records) == [(first.key, first.total), (second.key, second.total)]


# S7: 333 devices, 4.50 for 12 and 6.00 for 19 of March's 31 days. The billing core keeps the prorated
# unit price at 4 places (1.7419, 3.6774) and rounds each amount from the exact fraction, so quantity x
# unit price misses the amount by a cent on both lines (580.05 vs 580.06, 1224.57 vs 1224.58).
PRORATED = (
    BillLineDoc("Devices 1-12 Mar: 333 x 4.50 (12/31 days)", Decimal(333), Decimal("1.7419"), Decimal("580.06")),
    BillLineDoc("Devices 13-31 Mar: 333 x 6.00 (19/31 days)", Decimal(333), Decimal("3.6774"), Decimal("1224.58")),
)


def prorated_bill() -> BillDocument:
    b = bill(period=(date(2026, 3, 1), date(2026, 3, 31)), devices=333)
    return replace(b, total=sum((line.amount for line in PRORATED), Decimal(0)), lines=PRORATED)


async def test_s7_two_prorated_lines_arrive_and_the_invoice_total_is_the_bill_total_to_the_cent(adapter, sim):
    app, _ = sim
    b = prorated_bill()
    assert all((line.quantity * line.unit_price).quantize(Decimal("0.01")) != line.amount for line in b.lines)  # the S7 case
    result = await adapter.push_bill(b)
    invoice = app[STATE].invoices[int(result.external_id)]
    assert Decimal(str(invoice["total"])) == b.total == Decimal("1804.64")
    lines = sorted(app[STATE].products.values(), key=lambda row: row["sequenceNumber"])
    assert [Decimal(str(row["extPrice"])) for row in lines] == [Decimal("580.06"), Decimal("1224.58")]
    assert all("prorated" in row["description"] for row in lines)
    [record] = await adapter.read_back(date(2026, 3, 1), date(2026, 3, 31))
    assert record.amount == b.total


@pytest.mark.parametrize(
    "options, option",
    [({"page_size": "ten"}, "page_size"), ({"delivery": 1}, "delivery"), ({"catalog_item": ["MSP"]}, "catalog_item")],
)
async def test_a_bad_option_stops_the_adapter_at_start_up_with_a_config_error(make_adapter, options, option):
    with pytest.raises(ConfigError, match=f"connection 'cw-test': options.{option} must be"):
        make_adapter(**options)

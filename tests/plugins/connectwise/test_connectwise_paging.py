"""ConnectWise paging as the real API does it, links that drop ``conditions``, and Cloudflare's throttle."""

from __future__ import annotations

import re
from datetime import date
from functools import partial

import builders
import pytest

from gateway.adapters import AdapterContext
from gateway.core.settings import ConnectionSettings
from gateway.errors import RateLimited
from gateway.plugins.connectwise import protocol as p
from gateway.plugins.connectwise.client import ConnectWiseAdapter
from gateway.plugins.connectwise.simulator import STATE, create_app
from gateway.simulators import VirtualTime

CREDENTIALS = {"company": "simmsp", "public_key": "sim-public", "private_key": "sim-private", "client_id": "sim-client-id"}
API = "/v4_6_release/apis/3.0"


def _settings(server, **options) -> ConnectionSettings:
    return ConnectionSettings(
        name="cw-test", plugin="connectwise", base_url=str(server.make_url("/")), credentials=CREDENTIALS,
        options={"page_size": 2, **options},
    )


async def test_simulator_link_header_ends_with_page_and_has_first_prev_next_last(aiohttp_server, clock) -> None:
    server = await aiohttp_server(create_app(companies=7))
    adapter = ConnectWiseAdapter(_settings(server), AdapterContext(clock=clock))
    try:
        url = f"{API}/company/companies"
        first = await adapter.connector.request("GET", str(server.make_url(url)), params={"pageSize": 2, "page": 1})
        middle = await adapter.connector.request("GET", str(server.make_url(url)), params={"pageSize": 2, "page": 2})
        last = await adapter.connector.request("GET", str(server.make_url(url)), params={"pageSize": 2, "page": 4})
    finally:
        await adapter.aclose()
    rels = lambda response: [rel for _, rel in p._LINK.findall(response.headers["Link"])]  # noqa: E731
    assert rels(first) == ["next", "last"]
    assert rels(middle) == ["first", "prev", "next", "last"]
    assert rels(last) == ["first", "prev"]
    assert re.search(r'/company/companies\?pageSize=2&page=3>; rel="next"', middle.headers["Link"])


def test_next_page_number_is_read_wherever_page_stands_in_the_link() -> None:
    link = '<https://x/company/companies?pageSize=1000&page=2>; rel="next", <https://x/c?pageSize=1000&page=7>; rel="last"'
    assert p.next_page_number({"Link": link}, 1) == 2
    assert p.next_page_number({"Link": '<https://x/c?pageSize=1000&page=1>; rel="first"'}, 2) is None


def test_the_addition_to_update_is_one_of_the_configured_product_not_only_of_the_agreement() -> None:
    config = p.Config.from_options("cw", {"delivery": "addition"})
    other = {"id": 1, "product": {"identifier": "BACKUP-SEAT"}, "invoiceDescription": "", "cancelledDate": None}
    ours = {"id": 2, "product": {"identifier": config.catalog_item}, "invoiceDescription": "", "cancelledDate": None}
    assert p.pick_addition([other, ours], config) == ours
    assert p.pick_addition([other], config) is None


async def test_lists_every_company_when_the_next_link_drops_conditions(aiohttp_server, clock) -> None:
    app = create_app(companies=7, links_keep_conditions=False)
    for company in list(app[STATE].companies.values())[:2]:
        company["deletedFlag"] = True
    server = await aiohttp_server(app)
    adapter = ConnectWiseAdapter(_settings(server), AdapterContext(clock=clock))
    try:
        companies = await adapter.list_companies()
    finally:
        await adapter.aclose()
    assert len(companies) == 5
    assert len({c.external_id for c in companies}) == 5


async def test_invoice_lines_of_other_invoices_are_not_taken_when_links_drop_conditions(aiohttp_server, clock) -> None:
    app = create_app(companies=7, agreements=5, links_keep_conditions=False)
    server = await aiohttp_server(app)
    adapter = ConnectWiseAdapter(_settings(server, page_size=1), AdapterContext(clock=clock))
    bill = partial(builders.bill, connection="cw-test", customer_name="Customer")
    try:
        await adapter.push_bill(bill(company="2", devices=4))
        await adapter.push_bill(bill(company="3", devices=6))
        await adapter.push_bill(bill(company="2", devices=4))  # again: nothing changes
        records = await adapter.read_back(date(2026, 1, 1), date(2026, 12, 31))
    finally:
        await adapter.aclose()
    state = app[STATE]
    assert len(state.invoices) == 2
    per_invoice = {i: [x for x in state.products.values() if x["invoice"]["id"] == i] for i in state.invoices}
    assert all(per_invoice.values())  # neither invoice lost its lines to the other's "copies"
    assert {r.company_external_id for r in records} == {"2", "3"}


async def test_cloudflare_429_with_html_and_no_retry_after_is_waited_out_not_burned_in_seconds(
    aiohttp_server, clock
) -> None:
    time = VirtualTime()
    app = create_app(companies=7, cloudflare=(3, 10.0), cloudflare_block_seconds=60.0, monotonic=time.monotonic)
    server = await aiohttp_server(app)
    adapter = ConnectWiseAdapter(
        _settings(server, page_size=1), AdapterContext(clock=clock), sleep=time.sleep, monotonic=time.monotonic
    )
    try:
        companies = await adapter.list_companies()
    finally:
        await adapter.aclose()
    assert len(companies) == 7
    state = app[STATE]
    assert state.cloudflare_throttled >= 1
    assert adapter.connector.stats.retries <= state.cloudflare_throttled
    assert time.slept >= 60  # each block waited out, never a burst of quick retries
    assert adapter.connector.stats.throttled <= 3  # once learned, the pace stays under the rule


async def test_cloudflare_block_longer_than_the_retries_is_rate_limited_after_minutes(aiohttp_server, clock) -> None:
    time = VirtualTime()
    app = create_app(companies=3, cloudflare=(1, 3600.0), cloudflare_block_seconds=3600.0, monotonic=time.monotonic)
    server = await aiohttp_server(app)
    adapter = ConnectWiseAdapter(_settings(server), AdapterContext(clock=clock), sleep=time.sleep, monotonic=time.monotonic)
    try:
        with pytest.raises(RateLimited):
            await adapter.list_companies()
    finally:
        await adapter.aclose()
    assert time.slept >= 600  # 60 + 120 + 240 + 240 + 240 s before giving up, not ~15 s

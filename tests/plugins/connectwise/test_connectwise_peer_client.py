"""A real ConnectWise client, pyconnectwise, as a peer of the simulator: what it can do, the simulator answers.

pyconnectwise is a third-party client generated from ConnectWise's OpenAPI schema; if the
simulator's paging, bodies or auth drifted from the real API's, this client would stumble.
One shim: pyconnectwise hard-codes ``https://``, so ``_get_url`` (its base URL) is pointed at
the loopback simulator over plain HTTP. The client is synchronous (requests), so it runs in a thread.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.plugins.connectwise.simulator import STATE, create_app

pyconnectwise = pytest.importorskip("pyconnectwise")

CODEBASE = "v4_6_release/"


def _client(host: str) -> Any:
    class LoopbackClient(pyconnectwise.ConnectWiseManageAPIClient):  # the one shim: the base URL
        def _get_url(self) -> str:
            # pyconnectwise 0.6.1.2 never stores a codebase it was given (only one it looked up,
            # over https), hence the fallback to the one passed in.
            codebase = getattr(self, "codebase", None) or CODEBASE
            return f"http://{self.manage_url}/{codebase.strip('/')}/apis/3.0"

    return LoopbackClient("simmsp", host, "sim-client-id", "sim-public", "sim-private", codebase=CODEBASE)


async def test_pyconnectwise_pages_through_every_company_of_the_simulator(aiohttp_server) -> None:
    app = create_app(companies=7)
    server = await aiohttp_server(app)
    client = _client(f"{server.host}:{server.port}")

    def every_company() -> list[Any]:
        return list(client.company.companies.paginated(1, 2).all())

    companies = await asyncio.to_thread(every_company)
    assert sorted(c.id for c in companies) == sorted(app[STATE].companies)  # all 7, across 4 pages
    assert {c.name for c in companies} == {c["name"] for c in app[STATE].companies.values()}


async def test_pyconnectwise_creates_an_invoice_and_reads_it_back(aiohttp_server) -> None:
    app = create_app(companies=3)
    server = await aiohttp_server(app)
    client = _client(f"{server.host}:{server.port}")

    def create_and_read() -> tuple[Any, Any]:
        created = client.finance.invoices.post(
            data={"type": "Standard", "company": {"id": 2}, "reference": "peer-test", "internalNotes": "from a peer"}
        )
        return created, client.finance.invoices.id(created.id).get()

    created, read = await asyncio.to_thread(create_and_read)
    assert read.id == created.id
    assert read.reference == "peer-test"
    assert read.company.id == 2
    assert app[STATE].invoices[created.id]["internalNotes"] == "from a peer"

"""The installed plugin: found by its entry point, configured like any connection, careful with invoice numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date
from decimal import Decimal

import pytest

import gateway_syncro
from gateway import (
    AdapterContext,
    BillDocument,
    BillLineDoc,
    ConfigError,
    ConnectionSettings,
    PermanentError,
    get_plugin_manager,
    load_settings,
)
from gateway_syncro.simulator import DEFAULT_API_TOKEN, STATE, create_app

CONFIG = """
[[connections]]
name = "syncro-devices"
plugin = "syncro-rmm"
base_url = "{base}"

[[connections]]
name = "syncro-billing"
plugin = "syncro-psa"
base_url = "{base}"
"""


def test_entry_point_registers_both_kinds_and_the_listing_shows_the_version():
    manager = get_plugin_manager()
    assert manager.pm.get_plugin("syncro") is gateway_syncro
    adapters = manager.adapters()
    assert (adapters["syncro-rmm"].role, adapters["syncro-psa"].role) == ("rmm", "psa")
    assert adapters["syncro-psa"].required_credentials == ("api_token",)
    listing = subprocess.run(  # the admin's `gateway plugins --json`
        [sys.executable, "-m", "gateway", "plugins", "--json"], capture_output=True, text=True, timeout=120
    )
    assert listing.returncode == 0, listing.stderr
    row = next(r for r in json.loads(listing.stdout) if r["name"] == "syncro")
    assert row["version"] == "0.1.0" and row["adapters"] == ["syncro-rmm (rmm)", "syncro-psa (psa)"]


async def test_g1_connections_from_a_config_file_pull_with_the_token_from_the_environment(
    aiohttp_server, tmp_path, gateway_clock
):
    server = await aiohttp_server(create_app(customers=4, assets=30, clock=gateway_clock), host="127.0.0.1")
    config = tmp_path / "gateway.toml"
    config.write_text(CONFIG.format(base=f"http://127.0.0.1:{server.port}"))
    settings = load_settings(config, environ={"GATEWAY_CREDENTIALS__SYNCRO_DEVICES__API_TOKEN": DEFAULT_API_TOKEN})
    specs = get_plugin_manager().adapters()
    rmm = specs["syncro-rmm"].factory(settings.connection("syncro-devices"), AdapterContext(clock=gateway_clock))
    try:
        devices = [d async for page in rmm.fetch_devices() for d in page.devices]
    finally:
        await rmm.aclose()
    assert {d.external_id for d in devices} == {str(a["id"]) for a in server.app[STATE].assets}
    with pytest.raises(ConfigError, match="'syncro-billing' needs credential 'api_token'"):
        specs["syncro-psa"].factory(settings.connection("syncro-billing"), AdapterContext(clock=gateway_clock))


async def test_g2_an_invoice_number_someone_else_used_is_reported_not_overwritten(aiohttp_server, gateway_clock):
    server = await aiohttp_server(create_app(customers=3, assets=0, clock=gateway_clock), host="127.0.0.1")
    state = server.app[STATE]
    customer = str(state.customers[0]["id"])
    state.invoices.append({"id": 42, "number": "INV-2026-0001", "customer_id": int(customer), "note": "by hand",
                           "subtotal": "10.00", "updated_at": "2026-03-01T00:00:00+00:00"})
    bill = BillDocument(
        key=f"syncro-billing:{customer}:2026-02", number="INV-2026-0001", company_external_id=customer,
        customer_name="x", currency="USD", period_start=date(2026, 2, 1), period_end=date(2026, 2, 28),
        issued_on=date(2026, 3, 1), due_on=date(2026, 3, 31), device_count=2, total=Decimal("5.00"),
        lines=(BillLineDoc("Devices", Decimal(2), Decimal("2.50"), Decimal("5.00")),),
    )
    psa = get_plugin_manager().adapters()["syncro-psa"].factory(
        ConnectionSettings(name="syncro-billing", plugin="syncro-psa", base_url=f"http://127.0.0.1:{server.port}",
                           credentials={"api_token": DEFAULT_API_TOKEN}),
        AdapterContext(clock=gateway_clock),
    )
    try:
        with pytest.raises(PermanentError, match="renumber") as caught:
            await psa.push_bill(bill)
    finally:
        await psa.aclose()
    assert caught.value.status == 409 and caught.value.connection == "syncro-billing"
    assert [i["id"] for i in state.invoices if i["number"] == "INV-2026-0001"] == [42]

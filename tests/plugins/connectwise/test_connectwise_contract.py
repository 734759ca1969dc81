"""The gateway's adapter contract kit, run against the ConnectWise Manage adapter and its simulator."""

from __future__ import annotations

from gateway.plugins.connectwise.simulator import STATE
from gateway.testing.contract import PsaAdapterContract


class TestConnectWiseContract(PsaAdapterContract):
    kind = "connectwise"
    credentials = {
        "company": "simmsp",
        "public_key": "sim-public",
        "private_key": "sim-private",
        "client_id": "sim-client-id",
    }
    options = {"page_size": 10}
    push_path = r"/finance/invoices$"
    simulator_options = {"companies": 25}

    def expected_company_ids(self, app):
        return {str(company_id) for company_id in app[STATE].companies}

"""The gateway's adapter contract kit, run against the Autotask adapter and its simulator."""

from __future__ import annotations

from gateway.plugins.autotask.simulator import STATE
from gateway.testing.contract import PsaAdapterContract


class TestAutotaskContract(PsaAdapterContract):
    kind = "autotask"
    credentials = {
        "username": "api-user@sim.example",
        "secret": "sim-secret",
        "integration_code": "SIMINTEGRATIONCODE000000001",
    }
    options = {"delivery": "charge", "billing_code_id": 2001}
    push_path = r"/Contracts/\d+/Charges$"
    simulator_options = {"companies": 25}

    def expected_company_ids(self, app):
        return {str(cid) for cid, company in app[STATE].companies.items() if company["isActive"]}

"""The gateway's adapter contract kit, run against the HaloPSA adapter and its simulator."""

from __future__ import annotations

from gateway.plugins.halopsa.simulator import STATE
from gateway.testing.contract import PsaAdapterContract


class TestHaloPsaContract(PsaAdapterContract):
    kind = "halopsa"
    credentials = {"client_id": "sim-client", "client_secret": "sim-secret"}
    push_path = r"/api/Invoice$"
    simulator_options = {"clients": 25}
    refreshes_tokens = True

    def expected_company_ids(self, app):
        return {str(cid) for cid, client in app[STATE].clients.items() if not client["inactive"]}

"""The gateway's adapter contract, run against both Syncro kinds and the Syncro simulator."""

from __future__ import annotations

from gateway.testing.contract import PsaAdapterContract, RmmAdapterContract
from gateway_syncro.simulator import DEFAULT_API_TOKEN, STATE


class TestSyncroRmmContract(RmmAdapterContract):
    kind = "syncro-rmm"
    credentials = {"api_token": DEFAULT_API_TOKEN}
    simulator_options = {"customers": 8, "assets": 60}  # three pages of 25

    def expected_organization_ids(self, app):
        return {str(c["id"]) for c in app[STATE].customers if not c["disabled"]}

    def expected_device_ids(self, app):
        return {str(a["id"]) for a in app[STATE].assets}


class TestSyncroPsaContract(PsaAdapterContract):
    kind = "syncro-psa"
    credentials = {"api_token": DEFAULT_API_TOKEN}
    simulator_options = {"customers": 30, "assets": 0}  # two pages of customers

    def expected_company_ids(self, app):
        return {str(c["id"]) for c in app[STATE].customers if not c["disabled"]}

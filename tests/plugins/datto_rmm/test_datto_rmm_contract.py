"""The gateway's adapter contract kit, run against the Datto RMM adapter and its simulator."""

from __future__ import annotations

from gateway.plugins.datto_rmm.simulator import DEFAULT_API_KEY, DEFAULT_API_SECRET, STATE
from gateway.testing.contract import RmmAdapterContract


class TestDattoRmmContract(RmmAdapterContract):
    kind = "datto_rmm"
    credentials = {"api_key": DEFAULT_API_KEY, "api_secret": DEFAULT_API_SECRET}
    options = {"page_size": 25}
    simulator_options = {"sites": 5, "devices": 60}
    refreshes_tokens = True

    def expected_organization_ids(self, app):
        return set(app[STATE].site_uids)

    def expected_device_ids(self, app):
        state = app[STATE]
        return {state.device(index, state.clock.now(), "")["uid"] for index in range(state.device_count)}

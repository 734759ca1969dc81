"""The gateway's adapter contract kit, run against the NinjaOne adapter and its simulator."""

from __future__ import annotations

from gateway.plugins.ninjaone.simulator import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, STATE
from gateway.testing.contract import RmmAdapterContract


class TestNinjaOneContract(RmmAdapterContract):
    kind = "ninjaone"
    credentials = {"client_id": DEFAULT_CLIENT_ID, "client_secret": DEFAULT_CLIENT_SECRET}
    options = {"page_size": 25}
    simulator_options = {"organizations": 5, "devices": 60}
    refreshes_tokens = True

    def expected_organization_ids(self, app):
        return {str(index + 1) for index in range(len(app[STATE].organization_names))}

    def expected_device_ids(self, app):
        return {str(index + 1) for index in range(app[STATE].device_count)}

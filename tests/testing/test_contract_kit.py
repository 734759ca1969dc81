"""The contract kit fails adapters that break the contract (run in a separate pytest, as a plugin author would).

The built-in adapters pass the kit (tests/plugins/*/test_*_contract.py); these tests prove the
kit is not a rubber stamp: an adapter that stops paging, pushes the same bill twice, ignores
the read-back period or retries a 4xx is reported, by the test that names the broken rule.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from xml.etree import ElementTree

import pytest

BROKEN_ADAPTERS = '''
import dataclasses
from datetime import date

import pytest

from gateway.adapters import AdapterContext, DevicePage
from gateway.core.settings import ConnectionSettings
from gateway.errors import PermanentError
from gateway.plugins.halopsa.simulator import STATE as HALO
from gateway.plugins.ninjaone.simulator import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, STATE as NINJA
from gateway.testing.contract import PsaAdapterContract, RmmAdapterContract


class Wrapped:
    """The real adapter with one method replaced by a broken one."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)


class StopsAfterOnePage(Wrapped):
    async def fetch_devices(self, cursor=None):
        async for page in self.inner.fetch_devices(cursor):
            yield DevicePage(page.devices, None)
            return


class RetriesRefusals(Wrapped):
    async def list_organizations(self):
        try:
            return await self.inner.list_organizations()
        except PermanentError:
            return await self.inner.list_organizations()


class NewKeyEveryPush(Wrapped):
    async def push_bill(self, bill):
        self.pushes = getattr(self, "pushes", 0) + 1
        return await self.inner.push_bill(dataclasses.replace(bill, key=f"{bill.key}#{self.pushes}"))


class IgnoresThePeriod(Wrapped):
    async def read_back(self, period_start, period_end):
        return await self.inner.read_back(date(2000, 1, 1), date(2100, 12, 31))


class Broken:
    wrapper = Wrapped

    @pytest.fixture
    def make_adapter(self, adapter_spec, gateway_clock):
        def make(base_url):
            settings = ConnectionSettings(name=self.connection_name, plugin=self.kind, base_url=base_url,
                                          credentials=dict(self.credentials), options=dict(self.options))
            return self.wrapper(adapter_spec.factory(settings, AdapterContext(clock=gateway_clock)))
        return make


class NinjaBase(Broken, RmmAdapterContract):
    kind = "ninjaone"
    credentials = {"client_id": DEFAULT_CLIENT_ID, "client_secret": DEFAULT_CLIENT_SECRET}
    options = {"page_size": 25}
    simulator_options = {"organizations": 4, "devices": 60}

    def expected_organization_ids(self, app):
        return {str(i + 1) for i in range(len(app[NINJA].organization_names))}

    def expected_device_ids(self, app):
        return {str(i + 1) for i in range(app[NINJA].device_count)}


class HaloBase(Broken, PsaAdapterContract):
    kind = "halopsa"
    credentials = {"client_id": "sim-client", "client_secret": "sim-secret"}
    options = {"delivery": "invoice"}
    simulator_options = {"clients": 4}

    def expected_company_ids(self, app):
        return {str(cid) for cid in app[HALO].clients}


class TestStopsAfterOnePage(NinjaBase):
    wrapper = StopsAfterOnePage


class TestRetriesRefusals(NinjaBase):
    wrapper = RetriesRefusals


class TestNewKeyEveryPush(HaloBase):
    wrapper = NewKeyEveryPush


class TestIgnoresThePeriod(HaloBase):
    wrapper = IgnoresThePeriod
'''

SELECTED = (
    "pulls_every_device or resumes_from or lists_every or pushed_twice "
    "or read_back_reports or (client_error and 404)"
)


def run_kit(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "test_broken_adapters.py").write_text(textwrap.dedent(BROKEN_ADAPTERS))
    report = tmp_path / "report.xml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", SELECTED,
         "-o", "asyncio_default_fixture_loop_scope=function", f"--junitxml={report}", "test_broken_adapters.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 1, completed.stdout[-3000:] + completed.stderr[-3000:]
    outcomes = {}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname').rsplit('.', 1)[-1]}::{case.get('name')}"
        failed = case.find("failure") is not None or case.find("error") is not None
        outcomes[name] = "failed" if failed else "passed"
    return outcomes


@pytest.mark.slow  # a pytest of its own in a subprocess: about 5 s
def test_g1_g2_g3_g5_the_kit_fails_each_broken_adapter_on_the_rule_it_breaks(tmp_path):
    outcomes = run_kit(tmp_path)
    failed = {name for name, outcome in outcomes.items() if outcome == "failed"}
    assert failed == {
        "TestStopsAfterOnePage::test_g1_pulls_every_device_page_by_page_to_the_end",
        "TestStopsAfterOnePage::test_g1_resumes_from_a_stored_cursor_after_a_restart",
        "TestRetriesRefusals::test_g5_client_error_is_permanent_and_not_retried[404]",
        "TestNewKeyEveryPush::test_g2_the_same_bill_pushed_twice_is_created_once",
        "TestNewKeyEveryPush::test_g3_read_back_reports_what_was_pushed_for_the_period",  # its keys are wrong too
        "TestIgnoresThePeriod::test_g3_read_back_reports_what_was_pushed_for_the_period",
    }
    # What each broken adapter still does right passes: the kit blames only the broken rule.
    assert outcomes["TestStopsAfterOnePage::test_g1_lists_every_organization"] == "passed"
    assert outcomes["TestNewKeyEveryPush::test_lists_every_company"] == "passed"
    assert outcomes["TestIgnoresThePeriod::test_g2_the_same_bill_pushed_twice_is_created_once"] == "passed"

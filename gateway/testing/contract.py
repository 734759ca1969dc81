"""The adapter contract kit: the tests every RMM or PSA adapter must pass, for plugin authors to subclass.

A plugin's test module names its adapter kind and says what its simulator holds; the
kit does the rest::

    from gateway.testing.contract import RmmAdapterContract

    class TestMyToolRmm(RmmAdapterContract):
        kind = "mytool"                                  # as registered by gateway_register_adapters
        credentials = {"api_key": simulator.API_KEY}     # what the simulator accepts
        simulator_options = {"devices": 60}              # more devices than fit on one page

        def expected_organization_ids(self, app):        # the truth, read from the simulator
            return {str(o["id"]) for o in app[simulator.STATE].organizations}

        def expected_device_ids(self, app):
            return {str(d["id"]) for d in app[simulator.STATE].devices}

How it works: the kit finds the kind through the plugin manager (so the tests also prove
the plugin is registered), builds the simulator with the spec's ``simulator`` factory,
serves it on 127.0.0.1, and puts a :class:`~gateway.testing.proxy.FaultProxy` in front
of it. Adapters are built with the spec's ``factory`` and a ``[[connections]]``-style
:class:`~gateway.ConnectionSettings` whose ``base_url`` is the proxy. Faults
(429, 5xx, 4xx, dropped connections, lost answers, expired tokens) are injected by the
proxy, so a simulator needs no fault support of its own to be tested here.

Override the fixtures ``simulator_app`` or ``make_adapter`` when the defaults do not fit
(e.g. to build the adapter with extra arguments). The ``rig`` fixture gives a test the
simulator app, the proxy (``rig.proxy.faults``, ``rig.proxy.seen``) and fresh adapters
(``rig.adapter()``: a new one each call, as after a restart; all are closed afterwards).

Every test names the rule it proves (G1 mapping of organisations, G2 exactly-once
delivery, G3 reconciliation, G5 a tool's failures become gateway errors).
"""

from __future__ import annotations

import calendar
import inspect
import re
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from typing import Any, ClassVar

import pytest
import pytest_asyncio
from aiohttp import web
from pydantic import SecretStr
from structlog.testing import capture_logs

from gateway.adapters import (
    AdapterContext,
    AdapterSpec,
    BillDocument,
    BillLineDoc,
    PsaAdapter,
    PsaCompany,
    RmmAdapter,
)
from gateway.core.clock import Clock
from gateway.core.settings import ConnectionSettings
from gateway.errors import AuthError, PermanentError, RateLimited, TransientError
from gateway.plugins import get_plugin_manager
from gateway.testing.proxy import FaultProxy
from gateway.testing.pytest_plugin import LoopbackServer

Adapter = Any  # RmmAdapter | PsaAdapter


@dataclass
class Rig:
    """One simulator behind one fault proxy, and the adapters a test made against it."""

    app: web.Application
    proxy: FaultProxy
    base_url: str
    make: Callable[[str], Adapter]
    adapters: list[Adapter] = field(default_factory=list)

    def adapter(self) -> Adapter:
        """A fresh adapter (no state shared with earlier ones, as after a restart)."""
        adapter = self.make(self.base_url)
        self.adapters.append(adapter)
        return adapter

    def sent_since(self, mark: int) -> list[Any]:
        """Requests the proxy saw after ``mark = len(rig.proxy.seen)`` was taken."""
        return self.proxy.seen[mark:]

    async def close(self) -> None:
        for adapter in self.adapters:
            await adapter.aclose()


class AdapterContract:
    """What every adapter must do whatever its role: retries, error mapping, tokens, secrets."""

    pytestmark = pytest.mark.asyncio

    #: The adapter kind under test (``AdapterSpec.kind``); required.
    kind: ClassVar[str] = ""
    #: Credentials the simulator accepts, as a ``[[connections]]`` table would give them.
    credentials: ClassVar[Mapping[str, str]] = {}
    #: Connection options on top of the spec's ``default_options``.
    options: ClassVar[Mapping[str, Any]] = {}
    #: Keyword arguments for the spec's ``simulator`` factory (keep the population small).
    simulator_options: ClassVar[Mapping[str, Any]] = {}
    #: Appended to the proxy's URL to make the connection's ``base_url``.
    base_path: ClassVar[str] = ""
    #: True for adapters whose credentials are short-lived tokens they renew (OAuth2).
    refreshes_tokens: ClassVar[bool] = False
    connection_name: ClassVar[str] = "contract"
    role: ClassVar[str] = ""

    # -- fixtures a subclass may override -------------------------------------------------

    @pytest.fixture
    def adapter_spec(self) -> AdapterSpec:
        """The kind's spec, found the way the gateway finds it (built-ins and entry points)."""
        assert self.kind, f"{type(self).__name__} must set `kind` to the adapter kind under test"
        specs = get_plugin_manager().adapters()
        if self.kind not in specs:
            pytest.fail(
                f"no plugin registers adapter kind {self.kind!r} (found: {', '.join(sorted(specs)) or 'none'}); "
                "is the plugin installed, e.g. with `pip install -e .`?"
            )
        spec = specs[self.kind]
        assert spec.role == self.role, f"{self.kind!r} is registered as a {spec.role} adapter, tested as {self.role}"
        return spec

    @pytest.fixture
    def simulator_app(self, adapter_spec: AdapterSpec, gateway_clock: Clock) -> web.Application:
        """The spec's simulator built with ``simulator_options`` (and the test clock, if it takes one)."""
        if adapter_spec.simulator is None:
            pytest.fail(f"adapter kind {self.kind!r} registers no simulator; set AdapterSpec.simulator")
        kwargs = dict(self.simulator_options)
        if "clock" in inspect.signature(adapter_spec.simulator).parameters:
            kwargs.setdefault("clock", gateway_clock)
        return adapter_spec.simulator(**kwargs)

    @pytest.fixture
    def make_adapter(self, adapter_spec: AdapterSpec, gateway_clock: Clock) -> Callable[[str], Adapter]:
        """``make_adapter(base_url)``: the spec's factory on a connection to ``base_url``."""

        def make(base_url: str) -> Adapter:
            settings = ConnectionSettings(
                name=self.connection_name,
                plugin=self.kind,
                base_url=base_url,
                credentials={key: SecretStr(value) for key, value in self.credentials.items()},
                options={**adapter_spec.default_options, **self.options},
            )
            return adapter_spec.factory(settings, AdapterContext(clock=gateway_clock))

        return make

    @pytest_asyncio.fixture
    async def rig(
        self, simulator_app: web.Application, make_adapter: Callable[[str], Adapter], loopback_server: LoopbackServer
    ) -> AsyncIterator[Rig]:
        upstream = await loopback_server(simulator_app)
        proxy = FaultProxy(upstream)
        base = await loopback_server(proxy.app)
        rig = Rig(simulator_app, proxy, base + self.base_path, make_adapter)
        try:
            yield rig
        finally:
            await rig.close()

    @pytest.fixture
    def faults(self, rig: Rig) -> Any:
        """The proxy's fault plan (``throttle``, ``fail``, ``drop``, ``expire_tokens``, ``clear``)."""
        return rig.proxy.faults

    async def probe(self, adapter: Adapter) -> Any:
        """One read-only call that goes to the tool; the role classes define it."""
        raise NotImplementedError

    # -- the contract -----------------------------------------------------------------------

    async def test_adapter_implements_its_role_protocol(self, rig: Rig) -> None:
        protocol = RmmAdapter if self.role == "rmm" else PsaAdapter
        assert isinstance(rig.adapter(), protocol), f"{self.kind!r} does not implement {protocol.__name__}"

    async def test_g5_throttled_request_is_retried(self, rig: Rig, faults: Any) -> None:
        faults.throttle(2, retry_after=0)
        result = await self.probe(rig.adapter())
        assert result is not None
        statuses = [seen.status for seen in rig.proxy.seen]
        assert statuses[:2] == [429, 429] and 200 in statuses[2:], statuses

    @pytest.mark.parametrize("status", [502, 503])
    async def test_g5_server_error_is_retried(self, rig: Rig, faults: Any, status: int) -> None:
        faults.fail(1, status=status)
        await self.probe(rig.adapter())
        statuses = [seen.status for seen in rig.proxy.seen]
        assert statuses[0] == status and 200 in statuses[1:], statuses

    async def test_g5_dropped_connection_is_retried(self, rig: Rig, faults: Any) -> None:
        faults.drop(1)
        await self.probe(rig.adapter())
        assert rig.proxy.seen[0].status is None and any(s.status == 200 for s in rig.proxy.seen[1:])

    @pytest.mark.parametrize("status", [400, 403, 404, 409, 422])
    async def test_g5_client_error_is_permanent_and_not_retried(self, rig: Rig, faults: Any, status: int) -> None:
        adapter = rig.adapter()
        await self.probe(adapter)  # past any discovery or token request: the fault hits an API call
        mark = len(rig.proxy.seen)
        faults.fail(1, status=status)
        with pytest.raises(PermanentError) as caught:  # AuthError, for 401/403, is a PermanentError
            await self.probe(adapter)
        assert caught.value.status == status and caught.value.connection == self.connection_name
        assert len(rig.sent_since(mark)) == 1, f"a {status} was retried: {rig.sent_since(mark)}"

    async def test_g5_exhausted_retries_are_a_rate_limited_error_naming_the_connection(
        self, rig: Rig, faults: Any
    ) -> None:
        faults.throttle(60, retry_after=0)
        with pytest.raises(RateLimited) as caught:
            await self.probe(rig.adapter())
        faults.clear()
        assert caught.value.connection == self.connection_name
        assert 1 < len(rig.proxy.seen) < 60, "retries must be bounded"

    async def test_expired_token_is_renewed_or_reported_without_leaking_secrets(self, rig: Rig, faults: Any) -> None:
        adapter = rig.adapter()
        await self.probe(adapter)
        before = {seen.credential for seen in rig.proxy.seen if seen.status == 200}
        mark = len(rig.proxy.seen)
        faults.expire_tokens()
        with capture_logs() as logs:
            if self.refreshes_tokens:
                await self.probe(adapter)
                after = rig.sent_since(mark)
                assert any(s.status == 401 for s in after), "the proxy never refused the old token"
                renewed = {s.credential for s in after if s.status == 200} - before
                assert renewed, "the adapter went on without fetching a new token"
                error_text = ""
            else:
                # A static credential cannot be renewed: it was revoked, which is an AuthError at once.
                faults.fail(2, status=401)
                with pytest.raises(AuthError) as caught:
                    await self.probe(adapter)
                assert len(rig.sent_since(mark)) <= 2, "a refused credential was retried"
                error_text = str(caught.value)
        shown = repr(logs) + error_text
        for secret in self.credentials.values():
            if len(secret) >= 4:
                assert secret not in shown, "a credential appeared in a log line or an error"


class RmmAdapterContract(AdapterContract):
    """The RMM contract: organisations, and device pages to the end and from a cursor."""

    role = "rmm"

    def expected_organization_ids(self, app: web.Application) -> set[str]:
        """The external ids of every organisation the simulator holds (read from its state)."""
        raise NotImplementedError(f"{type(self).__name__} must say which organisations its simulator holds")

    def expected_device_ids(self, app: web.Application) -> set[str]:
        """The external ids of every device the simulator lists; more than fit on one page."""
        raise NotImplementedError(f"{type(self).__name__} must say which devices its simulator holds")

    async def probe(self, adapter: Adapter) -> Any:
        return await adapter.list_organizations()

    async def test_g1_lists_every_organization(self, rig: Rig) -> None:
        organizations = await rig.adapter().list_organizations()
        ids = [o.external_id for o in organizations]
        assert len(ids) == len(set(ids)), "an organisation was listed twice"
        assert set(ids) == self.expected_organization_ids(rig.app)
        assert all(o.name for o in organizations), "every organisation needs a name to be mapped by"

    async def test_g1_pulls_every_device_page_by_page_to_the_end(self, rig: Rig) -> None:
        pages = [page async for page in rig.adapter().fetch_devices()]
        ids = [d.external_id for page in pages for d in page.devices]
        assert len(pages) > 1, "the simulator must hold more devices than one page; raise simulator_options"
        assert len(ids) == len(set(ids)), "a device was delivered twice"
        assert set(ids) == self.expected_device_ids(rig.app)
        assert pages[-1].cursor is None and all(page.cursor for page in pages[:-1])
        for device in (d for page in pages for d in page.devices):
            assert device.org_external_id, f"device {device.external_id} has no organisation"
            for moment in (device.last_contact, device.created_at):
                assert moment is None or moment.utcoffset() == timedelta(0), "timestamps must be aware UTC"

    async def test_g1_resumes_from_a_stored_cursor_after_a_restart(self, rig: Rig) -> None:
        pull = rig.adapter().fetch_devices()
        first = await pull.__anext__()
        await pull.aclose()  # the process stops after storing the first page
        assert first.cursor is not None
        resumed = [page async for page in rig.adapter().fetch_devices(first.cursor)]
        earlier = {d.external_id for d in first.devices}
        later = [d.external_id for page in resumed for d in page.devices]
        assert earlier.isdisjoint(later), "resuming delivered devices of the stored page again"
        assert earlier | set(later) == self.expected_device_ids(rig.app)

    async def test_g1_a_throttled_page_mid_pull_is_retried_and_the_pull_goes_on(self, rig: Rig, faults: Any) -> None:
        pull = rig.adapter().fetch_devices()
        ids = [d.external_id for d in (await pull.__anext__()).devices]
        faults.throttle(1, retry_after=0)
        async for page in pull:
            ids.extend(d.external_id for d in page.devices)
        assert any(seen.status == 429 for seen in rig.proxy.seen)
        assert sorted(ids) == sorted(self.expected_device_ids(rig.app))


class PsaAdapterContract(AdapterContract):
    """The PSA contract: companies, exactly-once delivery of bills, and read-back."""

    role = "psa"
    #: The request that creates the PSA object for a bill (the one whose answer the kit loses):
    #: its method, and a regex its path matches (None: any path).
    push_method: ClassVar[str] = "POST"
    push_path: ClassVar[str | None] = None
    #: A company id the simulator does not hold.
    unknown_company_id: ClassVar[str] = "987654321"
    currency: ClassVar[str] = "USD"

    def expected_company_ids(self, app: web.Application) -> set[str]:
        """The external ids of every company the simulator holds (read from its state)."""
        raise NotImplementedError(f"{type(self).__name__} must say which companies its simulator holds")

    def bill_companies(self, companies: list[PsaCompany]) -> list[PsaCompany]:
        """Two companies the kit may bill; override when only some can take a bill."""
        return sorted(companies, key=lambda c: c.external_id)[:2]

    def make_bill(self, company: PsaCompany, period_start: date, *, devices: int = 3,
                  unit_price: Decimal = Decimal("2.50")) -> BillDocument:
        """A finalised bill for one calendar month, as the gateway would send it."""
        period_end = period_start.replace(day=calendar.monthrange(period_start.year, period_start.month)[1])
        amount = (unit_price * devices).quantize(Decimal("0.01"))
        month = period_start.strftime("%Y-%m")
        return BillDocument(
            key=f"{self.connection_name}:{company.external_id}:{month}",
            number=f"CT-{period_start:%Y%m}-{company.external_id}",
            company_external_id=company.external_id,
            customer_name=company.name,
            currency=self.currency,
            period_start=period_start,
            period_end=period_end,
            issued_on=period_end + timedelta(days=1),
            due_on=period_end + timedelta(days=31),
            device_count=devices,
            total=amount,
            lines=(BillLineDoc(f"Managed devices {month}", Decimal(devices), unit_price, amount),),
        )

    async def probe(self, adapter: Adapter) -> Any:
        return await adapter.list_companies()

    def _is_create(self, seen: Any) -> bool:
        path = seen.path.split("?", 1)[0]
        if seen.method != self.push_method:
            return False
        return self.push_path is None or re.search(self.push_path, path) is not None

    async def _companies(self, rig: Rig) -> list[PsaCompany]:
        companies = self.bill_companies(await rig.adapter().list_companies())
        assert len(companies) >= 2, "the simulator must hold at least two companies the kit may bill"
        return companies

    async def _records(self, rig: Rig, bill: BillDocument) -> list[Any]:
        records = await rig.adapter().read_back(bill.period_start, bill.period_end)
        return [r for r in records if r.key == bill.key]

    async def test_lists_every_company(self, rig: Rig) -> None:
        companies = await rig.adapter().list_companies()
        ids = [c.external_id for c in companies]
        assert len(ids) == len(set(ids)), "a company was listed twice"
        assert set(ids) == self.expected_company_ids(rig.app)
        assert all(c.name for c in companies)

    async def test_g2_the_same_bill_pushed_twice_is_created_once(self, rig: Rig) -> None:
        company, _ = await self._companies(rig)
        bill = self.make_bill(company, date(2026, 2, 1))
        adapter = rig.adapter()
        first = await adapter.push_bill(bill)
        second = await adapter.push_bill(bill)
        assert first.created and not second.created
        assert second.external_id == first.external_id
        assert [r.external_id for r in await self._records(rig, bill)] == [first.external_id]

    async def test_g2_a_push_after_a_restart_finds_the_first_delivery(self, rig: Rig) -> None:
        company, _ = await self._companies(rig)
        bill = self.make_bill(company, date(2026, 2, 1))
        first = await rig.adapter().push_bill(bill)
        again = await rig.adapter().push_bill(bill)  # a new process: nothing remembered in memory
        assert not again.created and again.external_id == first.external_id
        assert len(await self._records(rig, bill)) == 1

    async def test_g2_a_lost_answer_to_a_push_creates_no_second_copy(self, rig: Rig) -> None:
        company, _ = await self._companies(rig)
        bill = self.make_bill(company, date(2026, 2, 1))
        rig.proxy.lose_responses(1, method=self.push_method, path=self.push_path)
        try:
            await rig.adapter().push_bill(bill)
        except TransientError:
            pass  # acceptable: the outbox retries later
        lost = [s for s in rig.proxy.seen if self._is_create(s) and s.forwarded and s.status is None]
        assert lost, "the push never sent the create request; set push_method/push_path to the request that creates it"
        retry = await rig.adapter().push_bill(bill)  # the outbox's next attempt
        records = await self._records(rig, bill)
        assert len(records) == 1, f"the PSA holds {len(records)} copies of one bill after a lost answer"
        assert records[0].external_id == retry.external_id

    async def test_g2_a_throttled_push_is_retried_and_delivered_once(self, rig: Rig, faults: Any) -> None:
        company, _ = await self._companies(rig)
        bill = self.make_bill(company, date(2026, 2, 1))
        faults.throttle(2, retry_after=0)
        result = await rig.adapter().push_bill(bill)
        assert result.created and [s.status for s in rig.proxy.seen].count(429) == 2
        assert len(await self._records(rig, bill)) == 1

    async def test_g2_a_bill_for_an_unknown_company_is_refused_for_good(self, rig: Rig) -> None:
        company, _ = await self._companies(rig)
        stranger = PsaCompany(external_id=self.unknown_company_id, name="Not In The PSA Ltd")
        assert stranger.external_id not in self.expected_company_ids(rig.app)
        mark = len(rig.proxy.seen)
        with pytest.raises(PermanentError) as caught:
            await rig.adapter().push_bill(self.make_bill(stranger, date(2026, 2, 1)))
        assert not isinstance(caught.value, TransientError)
        refused = [s for s in rig.sent_since(mark) if self._is_create(s) and s.status and 400 <= s.status < 500]
        assert len(refused) <= 1, "a refused push was sent again"

    async def test_g3_read_back_reports_what_was_pushed_for_the_period(self, rig: Rig) -> None:
        first, second = await self._companies(rig)
        adapter = rig.adapter()
        february = [
            self.make_bill(first, date(2026, 2, 1), devices=3),
            self.make_bill(second, date(2026, 2, 1), devices=7, unit_price=Decimal("4.10")),
        ]
        january = self.make_bill(first, date(2026, 1, 1), devices=2)
        pushed = {bill.key: await adapter.push_bill(bill) for bill in [*february, january]}
        records = {r.key: r for r in await rig.adapter().read_back(date(2026, 2, 1), date(2026, 2, 28))}
        assert set(records) == {bill.key for bill in february}, "read-back must hold exactly the period's bills"
        for bill in february:
            record = records[bill.key]
            assert record.external_id == pushed[bill.key].external_id
            assert record.company_external_id == bill.company_external_id
            assert record.quantity == bill.device_count and record.amount == bill.total
            assert isinstance(record.amount, Decimal)

"""The device pull: NinjaOne and Datto RMM simulators on loopback into a migrated database."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import event, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from gateway.core import db as gdb
from gateway.core.clock import FrozenClock
from gateway.core.models import ConnectionState, Customer, Device, DeviceActivity, ExternalMapping, Partner, Workspace
from gateway.core.settings import ConnectionSettings, Settings
from gateway.errors import AuthError, ConfigError, TransientError
from gateway.hookspecs import hookimpl
from gateway.plugins import get_plugin_manager
from gateway.plugins.datto_rmm import protocol as datto_protocol
from gateway.plugins.datto_rmm import simulator as datto_sim
from gateway.plugins.datto_rmm.client import DattoRmmAdapter
from gateway.plugins.ninjaone import protocol as ninja_protocol
from gateway.plugins.ninjaone import simulator as ninja_sim
from gateway.plugins.ninjaone.client import NinjaOneAdapter
from gateway.sync.devices import map_organization, pull_all, pull_connection, pull_devices, unmapped_organizations
from gateway.sync.http import Connector, OAuth2ClientCredentials, OAuth2PasswordGrant, RateLimit


async def no_sleep(seconds: float) -> None:
    return None


@pytest.fixture
async def ninja(aiohttp_server: Any, clock: FrozenClock):
    async def start(**kw: Any):
        kw.setdefault("clock", clock)
        app = ninja_sim.create_app(**kw)
        server = await aiohttp_server(app)
        return app, str(server.make_url("")).rstrip("/")

    return start


@pytest.fixture
async def adapters(clock: FrozenClock):
    made: list[Any] = []

    def ninja_adapter(base_url: str, *, page_size: int = 100, secret: str = ninja_sim.DEFAULT_CLIENT_SECRET, **kw: Any):
        auth = OAuth2ClientCredentials(base_url + ninja_protocol.TOKEN_PATH, ninja_sim.DEFAULT_CLIENT_ID, secret)
        kw.setdefault("rate_limit", RateLimit(1000, 1.0, 4))
        connector = Connector(name="ninja", base_url=base_url, auth=auth, clock=clock, sleep=no_sleep, **kw)
        adapter = NinjaOneAdapter(connector, page_size=page_size)
        made.append(adapter)
        return adapter

    yield ninja_adapter
    for adapter in made:
        await adapter.aclose()


def add_workspace(
    session: Session, clock: FrozenClock, name: str, *, tz: str = "UTC", max_devices: int | None = None
) -> Workspace:
    partner = session.scalar(select(Partner)) or Partner(name="MSP One", created_at=clock.now())
    session.add(partner)
    session.flush()
    customer = Customer(partner_id=partner.id, name=name, timezone=tz, created_at=clock.now())
    session.add(customer)
    session.flush()
    workspace = Workspace(customer_id=customer.id, name=f"{name} main", max_devices=max_devices, created_at=clock.now())
    session.add(workspace)
    session.flush()
    return workspace


def map_orgs(db: sessionmaker[Session], clock: FrozenClock, connection: str, plan: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Create workspaces and map organisations to them: {org external id: workspace kwargs}."""
    ids = {}
    with gdb.transaction(db) as session:
        for org, kwargs in plan.items():
            workspace = add_workspace(session, clock, f"Customer of org {org}", **kwargs)
            session.add(
                ExternalMapping(
                    connection=connection, kind="rmm_org", external_id=org, workspace_id=workspace.id,
                    customer_id=workspace.customer_id, first_seen_at=clock.now(), last_seen_at=clock.now(),
                )
            )
            ids[org] = workspace.id
    return ids


def devices_by_org(app: Any, clock: FrozenClock) -> dict[str, list[dict[str, Any]]]:
    state = app[ninja_sim.STATE]
    grouped: dict[str, list[dict[str, Any]]] = {}
    for i in range(state.device_count):
        device = state.device(i, clock.now())
        grouped.setdefault(str(device["organizationId"]), []).append(device)
    return grouped


# --- G1: mappings ---------------------------------------------------------------------


async def test_g1_unmapped_organizations_are_listed_and_their_devices_never_billed(ninja, adapters, db, clock) -> None:
    app, base_url = await ninja(organizations=5, devices=300)
    workspaces = map_orgs(db, clock, "ninja", {"1": {}, "2": {}})
    summary = await pull_devices(adapters(base_url), "ninja", db, clock=clock)
    by_org = devices_by_org(app, clock)

    assert summary.devices_new == 300
    assert {o["external_id"] for o in summary.unmapped_organizations} == {"3", "4", "5"}
    assert summary.devices_unmapped == sum(len(by_org[o]) for o in ("3", "4", "5"))
    with db() as session:
        for org, devices in by_org.items():
            stored = session.scalars(select(Device).where(Device.org_external_id == org)).all()
            assert len(stored) == len(devices)
            assert {d.workspace_id for d in stored} == {workspaces.get(org)}
        unbilled = session.scalar(
            select(func.count()).select_from(DeviceActivity).join(Device).where(Device.workspace_id.is_(None))
        )
        assert unbilled == 0
        listed = unmapped_organizations(session, "ninja")
    names = app[ninja_sim.STATE].organization_names
    assert [(row["external_id"], row["devices"]) for row in listed] == sorted(
        [(o, len(by_org[o])) for o in ("3", "4", "5")], key=lambda r: names[int(r[0]) - 1]
    )
    assert {row["name"] for row in listed} == {names[2], names[3], names[4]}


async def test_g1_mapping_an_organization_later_brings_its_devices_in_at_the_next_pull(ninja, adapters, db, clock) -> None:
    app, base_url = await ninja(organizations=3, devices=120)
    adapter = adapters(base_url)
    await pull_devices(adapter, "ninja", db, clock=clock)
    with gdb.transaction(db) as session:
        workspace = add_workspace(session, clock, "Late Customer")
        map_organization(session, "ninja", "2", workspace.id)
        workspace_id = workspace.id
    summary = await pull_devices(adapter, "ninja", db, clock=clock)
    expected = len(devices_by_org(app, clock)["2"])
    assert summary.devices_new == 0
    assert summary.devices_updated == expected
    with db() as session:
        placed = session.scalar(select(func.count()).select_from(Device).where(Device.workspace_id == workspace_id))
        assert placed == expected
        assert {r["external_id"] for r in unmapped_organizations(session)} == {"1", "3"}


async def test_g1_unmapping_an_organization_takes_its_devices_out_of_billing_at_once(ninja, adapters, db, clock) -> None:
    """Not at the next pull, which may be far off while the RMM fails: check-ins arriving meanwhile by
    webhook only count for devices in a workspace, and billing counts only those."""
    app, base_url = await ninja(organizations=2, devices=80)
    map_orgs(db, clock, "ninja", {"1": {}, "2": {}})
    await pull_devices(adapters(base_url), "ninja", db, clock=clock)
    by_org = devices_by_org(app, clock)
    with gdb.transaction(db) as session:
        map_organization(session, "ninja", "1", None)
    with db() as session:
        placed = dict(session.execute(
            select(Device.org_external_id, func.count(Device.workspace_id)).group_by(Device.org_external_id)).all())
        assert placed == {"1": 0, "2": len(by_org["2"])}
        listed = unmapped_organizations(session, "ninja")
    assert [(row["external_id"], row["devices"]) for row in listed] == [("1", len(by_org["1"]))]


async def test_g1_devices_of_an_unlisted_organization_are_reported_unmapped(aiohttp_server, adapters, db, clock) -> None:
    # The organisation list is read before the pages: an organisation created in between is still reported.
    app = ninja_sim.create_app(organizations=4, devices=80, clock=clock)
    state = app[ninja_sim.STATE]
    real_names = list(state.organization_names)
    state.organization_names = real_names[:2]  # orgs 3 and 4 are not listed (yet)
    server = await aiohttp_server(app)
    summary = await pull_devices(adapters(str(server.make_url("")).rstrip("/")), "ninja", db, clock=clock)
    assert {"3", "4"} <= {o["external_id"] for o in summary.unmapped_organizations}
    with db() as session:
        assert {"3", "4"} <= {r["external_id"] for r in unmapped_organizations(session, "ninja")}


async def test_g1_auto_map_creates_customer_and_workspace_by_name(ninja, adapters, db, clock) -> None:
    app, base_url = await ninja(organizations=4, devices=100)
    with gdb.transaction(db) as session:
        session.add(Partner(name="MSP One", created_at=clock.now()))
        existing = add_workspace(session, clock, "placeholder")
        existing_customer = session.get_one(Customer, existing.customer_id)
        existing_customer.name = app[ninja_sim.STATE].organization_names[0]  # a customer of that name exists
    adapter = adapters(base_url)
    summary = await pull_devices(adapter, "ninja", db, clock=clock, auto_map=True)
    names = app[ninja_sim.STATE].organization_names
    assert sorted(summary.auto_mapped) == sorted(names)
    assert summary.unmapped_organizations == []
    with db() as session:
        customers = session.scalars(select(Customer.name)).all()
        assert sorted(customers) == sorted(names)  # the existing customer was reused, not duplicated
        assert session.scalar(select(func.count()).select_from(Device).where(Device.workspace_id.is_(None))) == 0
    again = await pull_devices(adapter, "ninja", db, clock=clock, auto_map=True)
    assert again.auto_mapped == []


async def test_g1_auto_map_without_a_partner_is_a_config_error(ninja, adapters, db, clock) -> None:
    _, base_url = await ninja(organizations=2, devices=10)
    with pytest.raises(ConfigError, match="no partner"):
        await pull_devices(adapters(base_url), "ninja", db, clock=clock, auto_map=True)


async def test_g1_auto_map_partner_option_must_be_a_partner_id(ninja, db, clock) -> None:
    _, base_url = await ninja(organizations=2, devices=10)
    with gdb.transaction(db) as session:
        session.add_all([Partner(name="MSP One", created_at=clock.now()), Partner(name="MSP Two", created_at=clock.now())])
        session.flush()
        second = session.scalar(select(Partner.id).where(Partner.name == "MSP Two"))
    creds = {"client_id": ninja_sim.DEFAULT_CLIENT_ID, "client_secret": ninja_sim.DEFAULT_CLIENT_SECRET}
    plugins = get_plugin_manager(load_entry_points=False)

    def connection(partner_id: Any) -> ConnectionSettings:
        return ConnectionSettings(
            name="ninja", plugin="ninjaone", base_url=base_url, credentials=creds, auto_map=True,
            options={"partner_id": partner_id},
        )

    for bad in ("MSP Two", 0, True, 1.5):
        with pytest.raises(ConfigError) as caught:
            await pull_connection(connection(bad), db, plugins, clock=clock)
        assert str(caught.value) == f"connection 'ninja': options.partner_id must be a whole number of at least 1, got {bad!r}"
    summary = await pull_connection(connection(str(second)), db, plugins, clock=clock)
    assert len(summary.auto_mapped) == 2
    with db() as session:
        assert set(session.scalars(select(Customer.partner_id))) == {second}


# --- M3: maximum device count ---------------------------------------------------------------


async def test_m3_workspace_at_its_maximum_refuses_new_devices_with_a_reason(ninja, adapters, db, clock) -> None:
    app, base_url = await ninja(organizations=2, devices=150)
    total = len(devices_by_org(app, clock)["1"])
    workspaces = map_orgs(db, clock, "ninja", {"1": {"max_devices": 5}, "2": {}})
    summary = await pull_devices(adapters(base_url, page_size=7), "ninja", db, clock=clock)
    assert summary.devices_refused == total - 5
    with db() as session:
        accepted = session.scalars(select(Device).where(Device.workspace_id == workspaces["1"])).all()
        refused = session.scalars(select(Device).where(Device.refused_reason.is_not(None))).all()
        assert len(accepted) == 5
        assert len(refused) == total - 5
        assert all("maximum of 5 devices" in d.refused_reason for d in refused)
        assert all(d.workspace_id is None for d in refused)
        refused_activity = session.scalar(
            select(func.count()).select_from(DeviceActivity).where(DeviceActivity.device_id.in_([d.id for d in refused]))
        )
        assert refused_activity == 0
    # a second pull neither refuses admitted devices nor admits refused ones
    again = await pull_devices(adapters(base_url), "ninja", db, clock=clock)
    assert again.devices_refused == total - 5
    with db() as session:
        assert {d.id for d in session.scalars(select(Device).where(Device.workspace_id == workspaces["1"]))} == {
            d.id for d in accepted
        }


async def test_m3_refused_devices_are_admitted_once_the_workspace_has_room(ninja, adapters, db, clock) -> None:
    app, base_url = await ninja(organizations=1, devices=20)
    workspaces = map_orgs(db, clock, "ninja", {"1": {"max_devices": 12}})
    adapter = adapters(base_url)
    await pull_devices(adapter, "ninja", db, clock=clock)
    with gdb.transaction(db) as session:
        session.get_one(Workspace, workspaces["1"]).max_devices = 15
    summary = await pull_devices(adapter, "ninja", db, clock=clock)
    assert summary.devices_refused == 5
    with db() as session:
        assert session.scalar(select(func.count()).select_from(Device).where(Device.workspace_id == workspaces["1"])) == 15


async def test_m3_devices_removed_from_the_rmm_free_their_seats_after_a_complete_pass(ninja, adapters, db, clock) -> None:
    app, base_url = await ninja(organizations=1, devices=20)
    workspace = map_orgs(db, clock, "ninja", {"1": {"max_devices": 15}})["1"]
    adapter = adapters(base_url, page_size=6)

    def admitted_ids() -> set[int]:
        with db() as session:
            return {
                int(d.external_id)
                for d in session.scalars(
                    select(Device).where(Device.workspace_id == workspace, Device.deleted.is_(False))
                )
            }

    first = await pull_devices(adapter, "ninja", db, clock=clock)
    assert (first.devices_refused, first.devices_removed) == (5, 0)
    gone = sorted(admitted_ids())[:6]
    app[ninja_sim.STATE].remove_devices(gone)

    second = await pull_devices(adapter, "ninja", db, clock=clock)
    assert second.devices_removed == 6
    with db() as session:
        removed = session.scalars(select(Device).where(Device.deleted.is_(True))).all()
        assert sorted(int(d.external_id) for d in removed) == gone
        assert {d.workspace_id for d in removed} == {workspace}  # kept, but without a seat
    assert len(admitted_ids()) == 9

    third = await pull_devices(adapter, "ninja", db, clock=clock)  # the freed seats take the refused devices
    assert (third.devices_refused, third.devices_removed) == (0, 0)
    assert len(admitted_ids()) == 14

    # removed devices that come back need a free seat, like new ones: one is left
    app[ninja_sim.STATE].removed.clear()
    fourth = await pull_devices(adapter, "ninja", db, clock=clock)
    assert fourth.devices_refused == 5
    assert len(admitted_ids()) == 15
    with db() as session:
        refused = session.scalars(select(Device).where(Device.refused_reason.is_not(None))).all()
        assert {int(d.external_id) for d in refused} < set(gone)
        assert all(d.workspace_id is None and "maximum of 15" in d.refused_reason for d in refused)


async def test_m3_a_pull_resumed_from_a_stored_cursor_marks_no_device_removed(ninja, adapters, db, clock) -> None:
    app, base_url = await ninja(organizations=1, devices=30)
    map_orgs(db, clock, "ninja", {"1": {}})
    adapter = adapters(base_url, page_size=10, max_attempts=1)
    await pull_devices(adapter, "ninja", db, clock=clock)
    # the next pull stores its first page, then the RMM fails: the cursor stays after device 10
    app[ninja_sim.FAULTS].allow(2).fail(1, status=500)
    with pytest.raises(TransientError):
        await pull_devices(adapter, "ninja", db, clock=clock, batch_devices=10)
    app[ninja_sim.STATE].remove_devices([5, 25])

    resumed = await pull_devices(adapter, "ninja", db, clock=clock)
    assert resumed.resumed_from == "10"
    assert resumed.devices_seen == 19  # 11-30 without 25; 1-10 were not listed by this pull
    assert resumed.devices_removed == 0
    with db() as session:
        assert session.scalar(select(func.count()).select_from(Device).where(Device.deleted.is_(True))) == 0

    complete = await pull_devices(adapter, "ninja", db, clock=clock)
    assert complete.resumed_from is None and complete.devices_removed == 2
    with db() as session:
        deleted = session.scalars(select(Device.external_id).where(Device.deleted.is_(True))).all()
        assert sorted(deleted) == ["25", "5"]


# --- M5 / S4: activity days in the customer's time zone ------------------------------------


async def test_m5_s4_activity_is_one_row_per_device_per_customer_local_day(ninja, adapters, db, clock) -> None:
    clock.set(datetime(2026, 3, 10, 11, 58, tzinfo=UTC))  # 00:58 on 11 March in Auckland
    app, base_url = await ninja(organizations=2, devices=200)
    map_orgs(db, clock, "ninja", {"1": {"tz": "Pacific/Auckland"}, "2": {"tz": "America/Los_Angeles"}})
    adapter = adapters(base_url)
    await pull_devices(adapter, "ninja", db, clock=clock)
    zones = {"1": ZoneInfo("Pacific/Auckland"), "2": ZoneInfo("America/Los_Angeles")}
    differs = 0
    with db() as session:
        rows = session.execute(select(Device.external_id, Device.org_external_id, DeviceActivity.day).join(DeviceActivity)).all()
        assert len(rows) == 200
        for external_id, org, day in rows:
            sample = app[ninja_sim.STATE].device(int(external_id) - 1, clock.now())
            contact = datetime.fromtimestamp(sample["lastContact"], tz=UTC)
            assert day == contact.astimezone(zones[org]).date()
            differs += day != contact.date()
    assert differs > 50  # the customer's zone, not UTC, decided the day

    await pull_devices(adapter, "ninja", db, clock=clock)  # same day again: nothing new
    with db() as session:
        assert session.scalar(select(func.count()).select_from(DeviceActivity)) == 200
    clock.advance(days=1)
    await pull_devices(adapter, "ninja", db, clock=clock)
    online = sum(
        1 for i in range(200) if not app[ninja_sim.STATE].device(i, clock.now())["offline"]
    )
    with db() as session:
        assert session.scalar(select(func.count()).select_from(DeviceActivity)) == 200 + online


# --- upserts, cursor, state -------------------------------------------------------------------


async def test_pull_upserts_by_connection_and_external_id(ninja, adapters, db, clock) -> None:
    app, base_url = await ninja(organizations=2, devices=90)
    map_orgs(db, clock, "ninja", {"1": {}, "2": {}})
    adapter = adapters(base_url)
    first = await pull_devices(adapter, "ninja", db, clock=clock)
    clock.advance(hours=2)
    second = await pull_devices(adapter, "ninja", db, clock=clock)
    assert (first.devices_new, second.devices_new) == (90, 0)
    online = sum(1 for i in range(90) if not app[ninja_sim.STATE].device(i, clock.now())["offline"])
    assert second.devices_updated >= online  # online devices checked in again
    assert second.devices_updated + second.devices_unchanged == 90
    await pull_devices(adapter, "ninja-eu", db, clock=clock)  # same ids, another connection
    with db() as session:
        assert session.scalar(select(func.count()).select_from(Device)) == 180
        device = session.scalar(select(Device).where(Device.connection == "ninja", Device.external_id == "17"))
        sample = app[ninja_sim.STATE].device(16, clock.now())
        assert device.last_contact == datetime.fromtimestamp(sample["lastContact"], tz=UTC)
        assert device.hostname == sample["systemName"]
        assert device.online is not sample["offline"]


async def test_interrupted_pull_resumes_from_the_stored_cursor(ninja, adapters, db, clock) -> None:
    app, base_url = await ninja(organizations=3, devices=1000)
    map_orgs(db, clock, "ninja", {"1": {}, "2": {}, "3": {}})
    # organisations and two pages of 300 answer; then the RMM fails (inside the first batch of 1000)
    app[ninja_sim.FAULTS].allow(3).fail(50, status=500)
    adapter = adapters(base_url, page_size=300, max_attempts=2)
    with pytest.raises(TransientError):
        await pull_devices(adapter, "ninja", db, clock=clock)
    with db() as session:
        state = session.get_one(ConnectionState, "ninja")
        assert state.cursor == "600"  # the two pages fetched before the failure were kept
        assert state.consecutive_failures == 1
        assert "HTTP 500" in state.last_error
        assert session.scalar(select(func.count()).select_from(Device)) == 600

    app[ninja_sim.FAULTS].clear()
    summary = await pull_devices(adapter, "ninja", db, clock=clock)
    assert summary.resumed_from == "600"
    assert summary.pages == 2  # 300 + the last 100
    assert summary.devices_new == 400
    with db() as session:
        state = session.get_one(ConnectionState, "ninja")
        assert state.cursor is None  # the next pull starts from the beginning
        assert state.consecutive_failures == 0 and state.last_success_at == clock.now()
        assert session.scalar(select(func.count()).select_from(Device)) == 1000


class CountingPlugin:
    """A plugin that watches pages as they are stored."""

    def __init__(self) -> None:
        self.pages: list[list[str]] = []

    @hookimpl
    def gateway_devices_seen(self, connection: str, devices: list) -> None:
        assert connection == "ninja"
        self.pages.append([d.external_id for d in devices])


async def test_devices_seen_hook_gets_every_stored_page(ninja, adapters, db, clock) -> None:
    _, base_url = await ninja(organizations=2, devices=950)
    watcher = CountingPlugin()
    plugins = get_plugin_manager(load_entry_points=False, extra_plugins=[watcher])
    await pull_devices(adapters(base_url, page_size=200), "ninja", db, clock=clock, plugins=plugins, batch_devices=400)
    assert [len(p) for p in watcher.pages] == [200, 200, 200, 200, 150]
    assert [i for page in watcher.pages for i in page] == [str(i) for i in range(1, 951)]


async def test_a_failed_batch_is_rolled_back_and_later_pages_are_not_stored(ninja, adapters, db, clock) -> None:
    if db.kw["bind"].dialect.name != "sqlite":
        pytest.skip("the database fault is injected with a SQLite trigger")
    _, base_url = await ninja(organizations=1, devices=500)
    adapter = adapters(base_url, page_size=100)

    class BreakStore:
        @hookimpl
        def gateway_devices_seen(self, connection: str, devices: list) -> None:
            # after the first batch: make the devices table reject the rest (a database fault)
            with db() as s, s.begin():
                s.execute(text("CREATE TRIGGER IF NOT EXISTS no_more BEFORE INSERT ON devices BEGIN SELECT RAISE(ABORT, 'disk full'); END"))

    plugins = get_plugin_manager(load_entry_points=False, extra_plugins=[BreakStore()])
    with pytest.raises(Exception, match="disk full"):
        await pull_devices(adapter, "ninja", db, clock=clock, plugins=plugins, batch_devices=200)
    with db() as session:
        assert session.get_one(ConnectionState, "ninja").cursor == "200"
        assert session.scalar(select(func.count()).select_from(Device)) == 200


async def test_summary_counts_pages_retries_and_throttling(ninja, adapters, db, clock) -> None:
    app, base_url = await ninja(organizations=2, devices=250)
    app[ninja_sim.FAULTS].throttle(2, retry_after=0).fail(1)
    summary = await pull_devices(adapters(base_url, page_size=100), "ninja", db, clock=clock)
    assert summary.pages == 3
    assert summary.devices_seen == 250
    assert summary.throttled == 2
    assert summary.retries == 3
    assert summary.requests == 1 + 1 + 3  # token, organizations, three pages; retries counted apart
    assert summary.as_dict()["devices_new"] == 250


# --- Datto: deleted devices, M3 -------------------------------------------------------------


async def test_m3_deleted_datto_devices_take_no_seat(aiohttp_server, db, clock) -> None:
    app = datto_sim.create_app(sites=1, devices=300, clock=clock, slowdown_seconds=0)
    server = await aiohttp_server(app)
    base_url = str(server.make_url("")).rstrip("/")
    site = app[datto_sim.STATE].site_uids[0]
    live = [d for i in range(300) if not (d := app[datto_sim.STATE].device(i, clock.now(), ""))["deleted"]]
    workspaces = map_orgs(db, clock, "datto", {site: {"max_devices": len(live)}})
    auth = OAuth2PasswordGrant(base_url + datto_protocol.TOKEN_PATH, datto_sim.DEFAULT_API_KEY, datto_sim.DEFAULT_API_SECRET)
    connector = Connector(name="datto", base_url=base_url, auth=auth, clock=clock, rate_limit=RateLimit(100, 1), sleep=no_sleep)
    adapter = DattoRmmAdapter(connector, page_size=50)
    try:
        summary = await pull_devices(adapter, "datto", db, clock=clock)
    finally:
        await adapter.aclose()
    assert 300 - len(live) > 0
    assert summary.devices_refused == 0
    with db() as session:
        in_workspace = session.scalars(select(Device).where(Device.workspace_id == workspaces[site])).all()
        assert len(in_workspace) == 300
        assert sum(d.deleted for d in in_workspace) == 300 - len(live)


# --- G5: pull_all -------------------------------------------------------------------------------


async def test_g5_one_failing_connection_does_not_stop_the_others(ninja, db, clock) -> None:
    _, good_url = await ninja(organizations=2, devices=40)
    _, bad_url = await ninja(organizations=2, devices=40, client_secret="rotated")
    creds = {"client_id": ninja_sim.DEFAULT_CLIENT_ID, "client_secret": ninja_sim.DEFAULT_CLIENT_SECRET}
    settings = Settings(
        connections=[
            ConnectionSettings(name="good", plugin="ninjaone", base_url=good_url, credentials=creds),
            ConnectionSettings(name="bad", plugin="ninjaone", base_url=bad_url, credentials=creds),
            ConnectionSettings(name="off", plugin="ninjaone", base_url=good_url, credentials=creds, enabled=False),
        ]
    )
    plugins = get_plugin_manager(load_entry_points=False)
    results = await pull_all(settings, db, plugins, clock=clock)
    assert set(results) == {"good", "bad"}
    assert isinstance(results["bad"], AuthError)
    assert results["good"].devices_new == 40
    with db() as session:
        assert session.get_one(ConnectionState, "bad").consecutive_failures == 1
        assert session.get_one(ConnectionState, "good").last_success_at == clock.now()
        assert "rotated" not in (session.get_one(ConnectionState, "bad").last_error or "")


# --- M3 across connections ----------------------------------------------------------------------


async def test_m3_two_connections_pulled_together_never_exceed_the_workspace_maximum(ninja, db_engine, db, clock) -> None:
    # Two NinjaOne instances whose organisation 1 is the same customer: both map it to one workspace.
    _, first_url = await ninja(organizations=1, devices=30)
    _, second_url = await ninja(organizations=1, devices=30)
    workspace = map_orgs(db, clock, "ninja-a", {"1": {"max_devices": 10}})["1"]
    with gdb.transaction(db) as session:
        session.add(
            ExternalMapping(
                connection="ninja-b", kind="rmm_org", external_id="1", workspace_id=workspace,
                customer_id=session.get_one(Workspace, workspace).customer_id,
                first_seen_at=clock.now(), last_seen_at=clock.now(),
            )
        )
    creds = {"client_id": ninja_sim.DEFAULT_CLIENT_ID, "client_secret": ninja_sim.DEFAULT_CLIENT_SECRET}
    settings = Settings(
        connections=[
            ConnectionSettings(name=name, plugin="ninjaone", base_url=url, credentials=creds, options={"page_size": 10})
            for name, url in (("ninja-a", first_url), ("ninja-b", second_url))
        ]
    )
    # Each pull's first seat count waits (briefly) for the other's: unless the count is taken under a
    # lock that makes the second pull wait for the first one's commit, both count the same free seats.
    meeting, counted = threading.Barrier(2), []

    def meet(connection: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "GROUP BY devices.workspace_id" in statement and len(counted) < 2:
            counted.append(statement)
            try:
                meeting.wait(timeout=0.5)
            except threading.BrokenBarrierError:
                pass  # the other pull is waiting for our lock

    event.listen(db_engine, "after_cursor_execute", meet)
    try:
        results = await pull_all(settings, db, get_plugin_manager(load_entry_points=False), clock=clock)
    finally:
        event.remove(db_engine, "after_cursor_execute", meet)
    assert len(counted) == 2
    assert sum(r.devices_refused for r in results.values()) == 60 - 10
    with db() as session:
        admitted = session.scalar(select(func.count()).select_from(Device).where(Device.workspace_id == workspace))
        assert admitted == 10
        assert session.scalar(select(func.count()).select_from(Device).where(Device.refused_reason.is_not(None))) == 50

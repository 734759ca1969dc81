"""M3: a device refused at a workspace's maximum is stored with its reason, its workspace and the time,
and the reason reaches the user: the pull summary, `gateway sync --once`, the devices list (CLI and API)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from builders import write_config
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from gateway.cli import main
from gateway.core import db as gdb
from gateway.core.access import system_principal
from gateway.core.clock import FrozenClock
from gateway.core.devices import list_devices
from gateway.core.models import Customer, Device, ExternalMapping, Partner, Workspace
from gateway.errors import NotFound
from gateway.plugins.ninjaone import protocol as ninja_protocol
from gateway.plugins.ninjaone import simulator as ninja_sim
from gateway.plugins.ninjaone.client import NinjaOneAdapter
from gateway.sync.devices import pull_devices
from gateway.sync.http import Connector, OAuth2ClientCredentials, RateLimit


async def no_sleep(seconds: float) -> None:
    return None


@pytest.fixture
async def ninja(aiohttp_server: Any, clock: FrozenClock):
    server = await aiohttp_server(ninja_sim.create_app(clock=clock, organizations=1, devices=5))
    base_url = str(server.make_url("")).rstrip("/")
    auth = OAuth2ClientCredentials(base_url + ninja_protocol.TOKEN_PATH, ninja_sim.DEFAULT_CLIENT_ID,
                                   ninja_sim.DEFAULT_CLIENT_SECRET)
    connector = Connector(name="ninja", base_url=base_url, auth=auth, clock=clock, sleep=no_sleep,
                          rate_limit=RateLimit(1000, 1.0, 4))
    adapter = NinjaOneAdapter(connector, page_size=100)
    yield adapter
    await adapter.aclose()


def limited_workspace(db: sessionmaker[Session], clock: FrozenClock, max_devices: int) -> tuple[int, int]:
    with gdb.transaction(db) as s:
        partner = Partner(name="MSP One", created_at=clock.now())
        s.add(partner)
        s.flush()
        customer = Customer(partner_id=partner.id, name="Acme", timezone="UTC", created_at=clock.now())
        s.add(customer)
        s.flush()
        workspace = Workspace(customer_id=customer.id, name="Acme HQ", max_devices=max_devices, created_at=clock.now())
        s.add(workspace)
        s.flush()
        s.add(ExternalMapping(connection="ninja", kind="rmm_org", external_id="1", workspace_id=workspace.id,
                              customer_id=customer.id, first_seen_at=clock.now(), last_seen_at=clock.now()))
        return partner.id, workspace.id


async def test_m3_a_refused_device_is_stored_with_its_workspace_reason_and_time_and_can_be_listed(
    ninja, db, clock
) -> None:
    partner_id, workspace_id = limited_workspace(db, clock, max_devices=3)
    first_pull = clock.now()
    summary = await pull_devices(ninja, "ninja", db, clock=clock)
    assert summary.devices_refused == 2
    for refusal in summary.refusals:  # the summary names the device, the workspace and its maximum
        assert (refusal["workspace_id"], refusal["workspace"], refusal["max_devices"]) == (workspace_id, "Acme HQ", 3)
        assert refusal["hostname"] and "maximum of 3 devices" in refusal["reason"]
    clock.advance(timedelta(hours=1))
    await pull_devices(ninja, "ninja", db, clock=clock)  # still refused: the first refusal's time is kept
    me = system_principal(partner_id, "test")
    with db() as s:
        rows, total = list_devices(s, me, workspace_id=workspace_id, refused=True)
        assert total == 2 and {r["external_id"] for r in rows} == {r["external_id"] for r in summary.refusals}
        for row in rows:
            assert row["refused"] and row["workspace_id"] == workspace_id and row["workspace"] == "Acme HQ"
            assert row["refused_at"] == first_pull and "raise the workspace's maximum" in row["refused_reason"]
        everything, total = list_devices(s, me, workspace_id=workspace_id)
        assert total == 5 and sum(r["refused"] for r in everything) == 2
        with pytest.raises(NotFound):
            list_devices(s, system_principal(partner_id + 1, "stranger"), workspace_id=workspace_id)
    with gdb.transaction(db) as s:  # room again: the next pull admits them and the refusal is gone
        s.get_one(Workspace, workspace_id).max_devices = 5
    await pull_devices(ninja, "ninja", db, clock=clock)
    with db() as s:
        assert s.scalars(select(Device).where(Device.refused_at.is_not(None))).all() == []
        assert list_devices(s, me, refused=True) == ([], 0)


def test_m3_sync_once_names_each_refused_device_its_workspace_and_maximum_and_devices_list_shows_why(
    tmp_path: Path, ninja_simulator_url, capsys
):
    config = write_config(tmp_path / "gateway.toml", database_url=f"sqlite:///{tmp_path / 'g.db'}", connections=[
        {"name": "ninja", "plugin": "ninjaone", "base_url": ninja_simulator_url,
         "credentials": {"client_id": ninja_sim.DEFAULT_CLIENT_ID, "client_secret": ninja_sim.DEFAULT_CLIENT_SECRET}},
    ])
    run = lambda *argv: main(["--config", str(config), *argv])  # noqa: E731
    assert run("db", "upgrade") == 0
    assert run("partners", "add", "Northwind") == 0
    assert run("customers", "add", "Contoso", "--timezone", "Europe/Berlin") == 0
    assert run("workspaces", "add", "HQ", "--customer", "1", "--max-devices", "2") == 0
    assert run("sync", "--once", "--json") == 0
    capsys.readouterr()
    assert run("mappings", "--unmapped", "--json") == 0
    org = json.loads(capsys.readouterr().out)[0]
    assert run("mappings", "rmm", "ninja", org["external_id"], "--workspace", "1") == 0
    capsys.readouterr()

    assert run("sync", "--once") == 0
    out = capsys.readouterr().out
    refused = org["devices"] - 2
    assert f"{refused} device(s) refused (M3):" in out
    assert out.count("refused by workspace 1 'HQ' (maximum 2): HQ: workspace is at its maximum of 2 devices") == refused
    assert "gateway devices list --refused" in out

    assert run("devices", "list", "--refused", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == refused and all(r["workspace"] == "HQ" and "maximum of 2" in r["refused_reason"]
                                        and r["refused_at"] for r in rows)
    assert run("devices", "list", "--workspace", "1") == 0
    table = capsys.readouterr().out
    assert f"{org['devices']} device(s)" in table and "REFUSED_REASON" in table

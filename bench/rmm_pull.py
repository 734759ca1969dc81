"""Benchmark: a full RMM pull of 100,000 devices in 2,000 organisations, against its floor.

The simulator runs in a child process on loopback (one fresh child per run, same
seed, so both runs see the same pages and neither warms the other's caches).

- gateway: ``pull_devices`` through the real adapter and connector into a migrated
  SQLite database where every organisation is mapped to a workspace (customers in
  several time zones): mappings, upserts, M3 checks, activity days, a cursor per page.
- floor, in the same run: the same pages fetched with bare aiohttp (token,
  organisations, devices, sequentially), the same device and activity rows written
  with one Core executemany each, in one transaction.

Each is run ``--repeat`` times, interleaved, and the best times are compared (the
machine is shared, so the minimum is the least noisy estimate). Peak RSS is measured
after the first gateway run and before any floor run (the floor holds every device
in memory by design). The last line is the machine-readable result.

    python bench/rmm_pull.py [--tool ninjaone|datto_rmm] [--devices 100000] [--organizations 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo

import aiohttp
import structlog
from sqlalchemy import Table, insert, select

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# The imports below follow this line, hence their noqa: E402: the benchmark runs from a checkout, installed or not.

from gateway.core import db as gdb  # noqa: E402
from gateway.core.clock import SystemClock  # noqa: E402
from gateway.core.models import (  # noqa: E402
    Customer,
    Device,
    DeviceActivity,
    ExternalMapping,
    MappingKind,
    Partner,
    Workspace,
)
from gateway.plugins.datto_rmm import protocol as datto_protocol  # noqa: E402
from gateway.plugins.datto_rmm import simulator as datto_sim  # noqa: E402
from gateway.plugins.datto_rmm.client import DattoRmmAdapter  # noqa: E402
from gateway.plugins.ninjaone import protocol as ninja_protocol  # noqa: E402
from gateway.plugins.ninjaone import simulator as ninja_sim  # noqa: E402
from gateway.plugins.ninjaone.client import NinjaOneAdapter  # noqa: E402
from gateway.sync.devices import pull_devices  # noqa: E402
from gateway.sync.http import Auth, Connector, OAuth2ClientCredentials, OAuth2PasswordGrant  # noqa: E402

TARGET = 1.5
ZONES = ["UTC", "Europe/Berlin", "America/New_York", "America/Los_Angeles", "Pacific/Auckland", "Asia/Kolkata"]
CONNECTION = "bench-rmm"


# --- the simulator child ---------------------------------------------------------------------


def serve(tool: str, devices: int, organizations: int, seed: int) -> None:
    """Child process: run one simulator on 127.0.0.1, print its port, serve until killed."""
    from aiohttp import web

    async def main() -> None:
        if tool == "ninjaone":
            app = ninja_sim.create_app(seed=seed, organizations=organizations, devices=devices)
        else:
            app = datto_sim.create_app(seed=seed, sites=organizations, devices=devices)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]  # the port the system chose for port 0
        print(port, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def start_simulator(args: argparse.Namespace) -> tuple[subprocess.Popen[str], str]:
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--tool", args.tool, "--devices", str(args.devices),
         "--organizations", str(args.organizations), "--seed", str(args.seed)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    port = int(child.stdout.readline())
    return child, f"http://127.0.0.1:{port}"


# --- database set-up (not timed) -------------------------------------------------------------


def fresh_database(directory: Path, name: str) -> Any:
    engine = gdb.make_engine(f"sqlite:///{directory / name}")
    gdb.upgrade(engine)
    return engine


def organization_ids(tool: str, organizations: int, seed: int) -> list[tuple[str, str]]:
    if tool == "ninjaone":
        app = ninja_sim.create_app(seed=seed, organizations=organizations, devices=0)
        names = app[ninja_sim.STATE].organization_names
        return [(str(i + 1), name) for i, name in enumerate(names)]
    app = datto_sim.create_app(seed=seed, sites=organizations, devices=0)
    state = app[datto_sim.STATE]
    return list(zip(state.site_uids, state.site_names, strict=True))


def map_everything(engine: Any, orgs: list[tuple[str, str]]) -> dict[str, tuple[int, str]]:
    """Every organisation mapped to a workspace of its own customer; returns {org: (workspace id, zone)}."""
    now = datetime.now(UTC)
    sessions = gdb.session_factory(engine)
    targets = {}
    with gdb.transaction(sessions) as session:
        partner = Partner(name="Bench MSP", created_at=now)
        session.add(partner)
        session.flush()
        for index, (external_id, name) in enumerate(orgs):
            zone = ZONES[index % len(ZONES)]
            customer = Customer(partner_id=partner.id, name=name, timezone=zone, created_at=now)
            session.add(customer)
            session.flush()
            workspace = Workspace(customer_id=customer.id, name=name, created_at=now)
            session.add(workspace)
            session.flush()
            session.add(
                ExternalMapping(
                    connection=CONNECTION, kind=MappingKind.RMM_ORG, external_id=external_id, external_name=name,
                    workspace_id=workspace.id, customer_id=customer.id, first_seen_at=now, last_seen_at=now,
                )
            )
            targets[external_id] = (workspace.id, zone)
    return targets


# --- the two runs -----------------------------------------------------------------------------


def gateway_adapter(tool: str, base_url: str) -> Any:
    clock = SystemClock()
    if tool == "ninjaone":
        auth: Auth = OAuth2ClientCredentials(
            base_url + ninja_protocol.TOKEN_PATH, ninja_sim.DEFAULT_CLIENT_ID, ninja_sim.DEFAULT_CLIENT_SECRET,
            scope=ninja_protocol.SCOPE,
        )
        connector = Connector(name=CONNECTION, base_url=base_url, rate_limit=ninja_protocol.DEFAULT_RATE_LIMIT,
                              auth=auth, clock=clock)
        return NinjaOneAdapter(connector)
    auth = OAuth2PasswordGrant(base_url + datto_protocol.TOKEN_PATH, datto_sim.DEFAULT_API_KEY, datto_sim.DEFAULT_API_SECRET)
    connector = Connector(name=CONNECTION, base_url=base_url, rate_limit=datto_protocol.DEFAULT_RATE_LIMIT,
                          auth=auth, clock=clock)
    return DattoRmmAdapter(connector)


async def run_gateway(tool: str, base_url: str, engine: Any) -> tuple[float, Any]:
    adapter = gateway_adapter(tool, base_url)
    started = time.perf_counter()
    try:
        summary = await pull_devices(adapter, CONNECTION, gdb.session_factory(engine), clock=SystemClock())
    finally:
        await adapter.aclose()
    return time.perf_counter() - started, summary


async def fetch_floor(tool: str, base_url: str) -> list[dict[str, Any]]:
    """Every device object, fetched page by page with bare aiohttp."""
    devices: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as session:
        if tool == "ninjaone":
            form = {"grant_type": "client_credentials", "client_id": ninja_sim.DEFAULT_CLIENT_ID,
                    "client_secret": ninja_sim.DEFAULT_CLIENT_SECRET, "scope": ninja_protocol.SCOPE}
            async with session.post(base_url + ninja_protocol.TOKEN_PATH, data=form) as r:
                headers = {"Authorization": f"Bearer {(await r.json())['access_token']}"}
            after = 0
            while True:  # organisations
                async with session.get(base_url + "/v2/organizations", params={"pageSize": 1000, "after": after},
                                       headers=headers) as r:
                    page = await r.json()
                if len(page) < 1000:
                    break
                after = page[-1]["id"]
            after = 0
            while True:
                async with session.get(base_url + "/v2/devices", params={"pageSize": 1000, "after": after},
                                       headers=headers) as r:
                    page = await r.json()
                devices.extend(page)
                if len(page) < 1000:
                    return devices
                after = page[-1]["id"]
        basic = {"Authorization": "Basic " + base64.b64encode(b"public-client:public").decode()}
        form = {"grant_type": "password", "username": datto_sim.DEFAULT_API_KEY, "password": datto_sim.DEFAULT_API_SECRET}
        async with session.post(base_url + datto_protocol.TOKEN_PATH, data=form, headers=basic) as r:
            headers = {"Authorization": f"Bearer {(await r.json())['access_token']}"}
        for path, key in (("/api/v2/account/sites", "sites"), ("/api/v2/account/devices", "devices")):
            page_number = 0
            while True:
                async with session.get(base_url + path, params={"max": 250, "page": page_number}, headers=headers) as r:
                    body = await r.json()
                if key == "devices":
                    devices.extend(body["devices"])
                if body["pageDetails"]["nextPageUrl"] is None:
                    break
                page_number += 1
    return devices


def floor_rows(tool: str, raw: list[dict[str, Any]], targets: dict[str, tuple[int, str]], now: datetime):
    zones = {zone: ZoneInfo(zone) for zone in ZONES}
    rows, days = [], []
    for d in raw:
        if tool == "ninjaone":
            external_id, org, host = str(d["id"]), str(d["organizationId"]), d["systemName"]
            cls, online, deleted = d["nodeClass"], not d["offline"], False
            contact = datetime.fromtimestamp(d["lastContact"], tz=UTC)
        else:
            external_id, org, host = d["uid"], d["siteUid"], d["hostname"]
            cls, online, deleted = d["deviceClass"], d["online"], d["deleted"]
            contact = datetime.fromtimestamp(d["lastSeen"] / 1000, tz=UTC)
        workspace_id, zone = targets[org]
        rows.append({"connection": CONNECTION, "external_id": external_id, "org_external_id": org,
                     "workspace_id": workspace_id, "hostname": host, "device_class": cls, "online": online,
                     "deleted": deleted, "last_contact": contact, "first_seen_at": now, "updated_at": now,
                     "refused_reason": None})
        days.append((external_id, contact.astimezone(zones[zone]).date()))
    return rows, days


async def run_floor(tool: str, base_url: str, engine: Any, targets: dict[str, tuple[int, str]]) -> float:
    started = time.perf_counter()
    raw = await fetch_floor(tool, base_url)
    rows, days = floor_rows(tool, raw, targets, datetime.now(UTC))
    # Each model is mapped to a Table; a mapped class's __table__ is typed as any FromClause.
    table = cast(Table, Device.__table__)
    activity = cast(Table, DeviceActivity.__table__)
    with engine.begin() as connection:
        ids = dict(
            (e, i) for i, e in connection.execute(insert(table).returning(table.c.id, table.c.external_id), rows)
        )
        connection.execute(insert(activity), [{"device_id": ids[e], "day": day} for e, day in days])
    return time.perf_counter() - started


def clear_devices(engine: Any) -> None:
    from sqlalchemy import delete

    from gateway.core.models import ConnectionState

    with engine.begin() as connection:
        for model in (DeviceActivity, Device, ConnectionState):
            connection.execute(delete(cast(Table, model.__table__)))


def count(engine: Any, model: Any) -> int:
    from sqlalchemy import func

    with engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(model)).scalar_one()


async def main(args: argparse.Namespace) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    orgs = organization_ids(args.tool, args.organizations, args.seed)
    with tempfile.TemporaryDirectory(prefix="rmm_pull_") as tmp:
        directory = Path(tmp)
        gateway_engine = fresh_database(directory, "gateway.db")
        floor_engine = fresh_database(directory, "floor.db")
        map_everything(gateway_engine, orgs)
        floor_targets = map_everything(floor_engine, orgs)

        gateway_times: list[float] = []
        floor_times: list[float] = []
        gateway_cpu: list[float] = []  # this process only: the simulator child is not counted
        floor_cpu: list[float] = []
        peak_rss_mb = 0.0
        for attempt in range(args.repeat):
            if attempt:  # every run starts from an empty device table, like the first pull of a connection
                clear_devices(gateway_engine)
                clear_devices(floor_engine)
            child, base_url = start_simulator(args)
            cpu = time.process_time()
            try:
                gateway_s, summary = await run_gateway(args.tool, base_url, gateway_engine)
            finally:
                child.kill()
                child.wait()
            gateway_cpu.append(time.process_time() - cpu)
            gateway_times.append(gateway_s)
            if attempt == 0:
                peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

            child, base_url = start_simulator(args)
            cpu = time.process_time()
            try:
                floor_times.append(await run_floor(args.tool, base_url, floor_engine, floor_targets))
            finally:
                child.kill()
                child.wait()
            floor_cpu.append(time.process_time() - cpu)
            print(f"run {attempt + 1}: gateway {gateway_s:.2f} s, floor {floor_times[-1]:.2f} s", flush=True)

        gateway_devices, floor_devices = count(gateway_engine, Device), count(floor_engine, Device)
        gateway_days, floor_days = count(gateway_engine, DeviceActivity), count(floor_engine, DeviceActivity)
        gateway_engine.dispose()
        floor_engine.dispose()
    gateway_s, floor_s = min(gateway_times), min(floor_times)

    if (gateway_devices, gateway_days) != (floor_devices, floor_days):
        raise SystemExit(f"runs disagree: gateway {gateway_devices} devices/{gateway_days} days, "
                         f"floor {floor_devices}/{floor_days}")
    ratio = gateway_s / floor_s
    print(f"tool={args.tool} devices={gateway_devices} organizations={len(orgs)} activity_rows={gateway_days} "
          f"pages={summary.pages} requests={summary.requests} retries={summary.retries} throttled={summary.throttled}")
    print(f"best of {args.repeat}: gateway {gateway_s:.2f} s ({gateway_devices / gateway_s:,.0f} devices/s), "
          f"floor {floor_s:.2f} s; "
          f"peak RSS after the gateway run: {peak_rss_mb:.0f} MB")
    print(f"CPU of this process (best of {args.repeat}): gateway {min(gateway_cpu):.2f} s, floor {min(floor_cpu):.2f} s, "
          f"ratio {min(gateway_cpu) / min(floor_cpu):.2f}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"rmm_pull: ratio={ratio:.2f} target={TARGET} gateway_s={gateway_s:.2f} floor_s={floor_s:.2f} "
          f"peak_rss_mb={peak_rss_mb:.0f}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tool", choices=["ninjaone", "datto_rmm"], default="ninjaone")
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--organizations", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the best of each is compared")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.serve:
        serve(arguments.tool, arguments.devices, arguments.organizations, arguments.seed)
    else:
        asyncio.run(main(arguments))

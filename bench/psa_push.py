"""Benchmark: bills pushed to each PSA simulator whose rate limit is set low, against the limit itself.

For each of ConnectWise (invoices), Autotask (contract charges) and HaloPSA (invoices):
a fresh SQLite store gets ``--bills`` customers, each mapped to its own company in the
simulator and billed for March 2026 by the real billing run (one bill and one outbox
delivery each). The simulator enforces ``--limit`` requests per second (a sliding
window, answered with 429 beyond it) and the connection is configured with that same
documented limit. The outbox worker (``deliver_round`` until nothing is due, the real
adapter and connector) then pushes every bill.

The floor is the limit: no client may send faster. Reported per tool: the achieved request
rate as a fraction of the limit (target >= 0.9), where the rate is the requests the simulator
received, less the one window's worth that any client may send at once at the start, over
the wall time of the push; the 429s the gateway received (target 0), and calls per bill. Every bill
must end delivered, with one object per bill in the simulator. Each simulator runs in a
child process on 127.0.0.1 (so it never competes with the gateway for this process's
interpreter); a second loopback port of the child answers the simulator's counters.
Nothing else is contacted. The last line is the machine-readable result.

    python bench/psa_push.py [--bills 2000] [--limit 20] [--tools connectwise,autotask,halopsa]

At 20 requests/s, 2,000 bills take about 10 minutes for ConnectWise (6 calls a bill),
7 for Autotask and 5 for HaloPSA.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the world builder shared with the outbox tests
# The imports below follow this line, hence their noqa: E402: the benchmark runs from a checkout, installed or not.

from psa_world import (  # type: ignore[import-not-found]  # noqa: E402  # tests/ is put on sys.path above
    autotask_connection,
    build_world,
    connectwise_connection,
    halo_connection,
)

from gateway.adapters import AdapterContext  # noqa: E402
from gateway.app import Gateway  # noqa: E402
from gateway.core import db as gdb  # noqa: E402
from gateway.core.clock import SystemClock  # noqa: E402
from gateway.core.models import Delivery, DeliveryStatus  # noqa: E402
from gateway.core.settings import ConnectionSettings, OutboxSettings, Settings  # noqa: E402
from gateway.plugins import get_plugin_manager  # noqa: E402
from gateway.plugins.autotask import simulator as autotask_sim  # noqa: E402
from gateway.plugins.connectwise import simulator as connectwise_sim  # noqa: E402
from gateway.plugins.halopsa import simulator as halo_sim  # noqa: E402
from gateway.sync.outbox import deliver_round  # noqa: E402

TARGET = 0.9


@dataclass(frozen=True)
class Tool:
    make_app: Callable[[int, int], web.Application]
    companies: Callable[[web.Application], list[int]]
    connection: Callable[..., dict[str, Any]]
    max_concurrent: int  # the adapter's own default
    requests: Callable[[web.Application], int]
    objects: Callable[[web.Application], int]


def _gateway_objects(rows: Any, field: str) -> int:
    return sum(1 for row in rows if "gateway-bill" in (row.get(field) or ""))


TOOLS: dict[str, Tool] = {
    "connectwise": Tool(
        make_app=lambda n, limit: connectwise_sim.create_app(companies=n, rate_limit=(limit, 1.0)),
        companies=lambda app: sorted(app[connectwise_sim.STATE].companies),
        connection=connectwise_connection,
        max_concurrent=4,
        requests=lambda app: sum(app[connectwise_sim.STATE].requests.values()),
        objects=lambda app: _gateway_objects(app[connectwise_sim.STATE].invoices.values(), "internalNotes"),
    ),
    "autotask": Tool(
        make_app=lambda n, limit: autotask_sim.create_app(companies=n, hourly_limit=limit, window_seconds=1.0),
        companies=lambda app: sorted(app[autotask_sim.STATE].companies),
        connection=autotask_connection,
        max_concurrent=3,
        requests=lambda app: sum(app[autotask_sim.STATE].requests.values()),
        objects=lambda app: len(app[autotask_sim.STATE].charges),
    ),
    "halopsa": Tool(
        make_app=lambda n, limit: halo_sim.create_app(clients=n, rate_limit=(limit, 1.0)),
        companies=lambda app: sorted(app[halo_sim.STATE].clients),
        connection=halo_connection,
        max_concurrent=4,
        requests=lambda app: sum(app[halo_sim.STATE].requests.values()),
        objects=lambda app: _gateway_objects(app[halo_sim.STATE].invoices.values(), "internal_note"),
    ),
}


@dataclass
class Result:
    tool: str
    bills: int
    seconds: float
    requests: int
    throttled: int
    retries: int
    limit: float

    @property
    def rate(self) -> float:
        # The window lets the first ``limit`` requests through at once; only what follows is paced.
        return (self.requests - self.limit) / self.seconds

    @property
    def ratio(self) -> float:
        return self.rate / self.limit

    @property
    def calls_per_bill(self) -> float:
        return self.requests / self.bills


async def _push(gateway: Gateway, connection: ConnectionSettings) -> tuple[float, Any]:
    # A built-in PSA adapter: beyond the PsaAdapter protocol, the bench reads its connector's request counts.
    adapter: Any = gateway.spec_for(connection).factory(connection, AdapterContext(clock=gateway.clock))
    try:
        started = time.perf_counter()
        while (await deliver_round(gateway.db, gateway.clock, gateway.settings.outbox, gateway.build_psa, gateway.notify,
                                   "bench", delivered=gateway.bill_delivered, adapters={connection.name: adapter})).claimed:
            pass
        return time.perf_counter() - started, adapter.connector.stats
    finally:
        await adapter.aclose()


# --- the simulator child ---------------------------------------------------------------------


def serve(name: str, bills: int, limit: int) -> None:
    """Child process: the simulator on one loopback port, its counters on another; print both ports."""
    tool = TOOLS[name]

    async def main() -> None:
        app = tool.make_app(bills, limit)

        async def stats(request: web.Request) -> web.Response:
            return web.json_response({"requests": tool.requests(app), "objects": tool.objects(app),
                                      "companies": tool.companies(app)})

        counters = web.Application()
        counters.router.add_get("/stats", stats)
        ports = []
        for served in (app, counters):
            runner = web.AppRunner(served, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            ports.append(runner.addresses[0][1])  # the port the system chose for port 0
        print(*ports, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


class Simulator:
    """A simulator child process; ``stats()`` reads its counters."""

    def __init__(self, name: str, bills: int, limit: int):
        self.child = subprocess.Popen(
            [sys.executable, __file__, "--serve", name, "--bills", str(bills), "--limit", str(limit)],
            stdout=subprocess.PIPE, text=True,
        )
        assert self.child.stdout is not None
        port, stats_port = (int(p) for p in self.child.stdout.readline().split())
        self.url = f"http://127.0.0.1:{port}"
        self._stats = f"http://127.0.0.1:{stats_port}/stats"

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self._stats, timeout=30) as response:
            return json.loads(response.read())

    def close(self) -> None:
        self.child.terminate()
        self.child.wait(10)


# --- the run ----------------------------------------------------------------------------------


def run_tool(name: str, bills: int, limit: int, batch_size: int, directory: Path) -> Result:
    tool = TOOLS[name]
    engine = gdb.make_engine(f"sqlite:///{directory / f'{name}.db'}")
    gdb.upgrade(engine)
    db = gdb.session_factory(engine)
    sim = Simulator(name, bills, limit)
    try:
        build_world(db, customers=bills, psa={name: [str(c) for c in sim.stats()["companies"]]})
        connection = ConnectionSettings(**tool.connection(name, sim.url, requests=limit, per_seconds=1.0,
                                                          max_concurrent=tool.max_concurrent))
        gateway = Gateway(
            settings=Settings(connections=[connection], outbox=OutboxSettings(batch_size=batch_size)),
            engine=engine, db=db, plugins=get_plugin_manager(load_entry_points=False), clock=SystemClock(),
        )
        before = sim.stats()["requests"]
        seconds, stats = asyncio.run(_push(gateway, connection))
        after = sim.stats()
    finally:
        sim.close()
    with db() as s:
        states = dict(s.execute(select(Delivery.status, func.count()).group_by(Delivery.status)).all())
    engine.dispose()
    if states != {DeliveryStatus.DELIVERED: bills} or after["objects"] != bills:
        raise SystemExit(f"{name}: deliveries {states}, {after['objects']} objects in the simulator; "
                         f"expected {bills} delivered")
    return Result(name, bills, seconds, after["requests"] - before, stats.throttled, stats.retries, float(limit))


def main(args: argparse.Namespace) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = sorted(set(tools) - set(TOOLS))
    if unknown:
        raise SystemExit(f"unknown tool(s) {', '.join(unknown)}; choose from {', '.join(TOOLS)}")
    results = []
    with tempfile.TemporaryDirectory(prefix="psa_push_") as tmp:
        for name in tools:
            result = run_tool(name, args.bills, args.limit, args.batch_size, Path(tmp))
            results.append(result)
            print(f"{name}: {result.bills} bills in {result.seconds:.1f} s, {result.requests} requests "
                  f"({result.calls_per_bill:.2f} a bill), {result.rate:.2f} requests/s of {result.limit:g} allowed "
                  f"(ratio {result.ratio:.3f}), 429s {result.throttled}, retries {result.retries}", flush=True)
    print(f"bills={args.bills} limit={args.limit}/s batch_size={args.batch_size} "
          f"at={datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ}")
    worst = min(r.ratio for r in results)
    throttled = sum(r.throttled for r in results)
    calls = sum(r.requests for r in results) / sum(r.bills for r in results)
    per_tool = " ".join(f"{r.tool}_ratio={r.ratio:.3f}" for r in results)
    print(f"psa_push: ratio={worst:.3f} target={TARGET} throttled={throttled} calls_per_bill={calls:.2f} {per_tool}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bills", type=int, default=2_000, help="bills pushed to each simulator (default 2000)")
    parser.add_argument("--limit", type=int, default=20, help="requests per second each simulator allows (default 20)")
    parser.add_argument("--batch-size", type=int, default=OutboxSettings().batch_size,
                        help="outbox.batch_size (default: the gateway's default)")
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset of " + ", ".join(TOOLS))
    parser.add_argument("--serve", choices=sorted(TOOLS), help=argparse.SUPPRESS)  # the simulator child
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.serve:
        serve(arguments.serve, arguments.bills, arguments.limit)
    else:
        main(arguments)

"""Benchmark: sustained signed webhook load on the receiver, against a bare aiohttp handler.

- gateway: the real receiver (``add_webhook_routes`` on a gateway built by
  ``build_gateway``) in a child process, a real ``web.AppRunner`` on 127.0.0.1,
  a migrated SQLite file with 1,000 devices in one mapped workspace. Every
  request is a Standard Webhooks ``device.online`` event with a fresh id:
  verify the HMAC, check the window, insert the event id, update the device and
  its activity day, commit (events that arrive together share one commit: see
  ``gateway.sync.webhooks``).
- floor, in the same run: a bare aiohttp handler in another child process that
  reads the body and answers the same JSON, with no verification and no database.

The load comes from this process (a separate one) over loopback: ``--concurrency``
workers on one aiohttp session, each signing and posting in a loop. Both targets
get the same client, the same time, interleaved in ``--rounds`` slices (the
machine is shared, so slices spread the noise over both). Bounded by
``--seconds`` per target and ``--max-requests`` per slice. The last line is the
machine-readable result; latencies are the gateway's.

    python bench/webhooks.py [--seconds 30] [--concurrency 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGET = 0.5
CONNECTION = "bench-rmm"
DEVICES = 1000
KEY = b"bench-webhook-signing-key-0123456789"
SECRET = "whsec_" + base64.b64encode(KEY).decode()


# --- the servers (child processes) --------------------------------------------------------------


def serve(kind: str, database: str, port_file: str) -> None:
    from aiohttp import web

    app = web.Application()
    if kind == "gateway":
        from gateway.app import build_gateway
        from gateway.core.settings import Settings
        from gateway.sync.webhooks import add_webhook_routes
        from gateway.web.metrics import get_metrics

        # What a configuration file holds: Settings validates and converts it, as load_settings does.
        config: dict[str, Any] = {
            "database": {"url": f"sqlite:///{database}"},
            "logging": {"level": "warning", "format": "json"},
            "connections": [
                {
                    "name": CONNECTION, "plugin": "ninjaone", "base_url": "https://ninja.invalid",
                    "credentials": {"client_id": "bench", "client_secret": "bench-secret"},
                    "webhook_scheme": "standard-webhooks", "webhook_secret": SECRET,
                }
            ],
        }
        settings = Settings(**config)
        gateway = build_gateway(settings)
        add_webhook_routes(app, gateway, get_metrics(gateway))
    else:

        async def bare(request: web.Request) -> web.Response:
            await request.read()
            return web.json_response({"status": "accepted", "event_id": "x"})

        app.router.add_post("/webhooks/{connection}", bare)

    async def run() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        Path(port_file).write_text(str(runner.addresses[0][1]))
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(run())


def prepare_database(path: Path) -> None:
    from gateway.core import db as gdb
    from gateway.core.models import Customer, Device, Partner, Workspace

    engine = gdb.make_engine(f"sqlite:///{path}")
    gdb.upgrade(engine)
    now = datetime.now(UTC)
    with gdb.transaction(gdb.session_factory(engine)) as s:
        partner = Partner(name="Bench MSP", created_at=now)
        workspace = Workspace(
            customer=Customer(partner=partner, name="Bench Customer", timezone="Europe/Berlin", created_at=now),
            name="HQ", created_at=now,
        )
        s.add(workspace)
        s.flush()
        s.add_all(
            Device(connection=CONNECTION, external_id=f"dev-{n}", org_external_id="org", workspace_id=workspace.id,
                   first_seen_at=now, updated_at=now)
            for n in range(DEVICES)
        )
    engine.dispose()


def start(kind: str, database: Path, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port_file = workdir / f"{kind}.port"
    process = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--database", str(database),
                                "--port-file", str(port_file)])
    deadline = time.monotonic() + 30
    while not port_file.exists() or not port_file.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the {kind} server did not start (exit code {process.poll()})")
        time.sleep(0.05)
    return process, int(port_file.read_text())


# --- the load (this process) ------------------------------------------------------------------------


@dataclass
class Tally:
    accepted: int = 0
    other: int = 0
    seconds: float = 0.0
    server_cpu: float = 0.0
    latencies: list[float] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.accepted / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def signed(n: int, prefix: str) -> tuple[bytes, dict[str, str]]:
    body = json.dumps({"type": "device.online", "data": {"device_id": f"dev-{n % DEVICES}"}}).encode()
    msg_id, stamp = f"msg_{prefix}_{n}", str(int(time.time()))
    signature = base64.b64encode(hmac.new(KEY, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()).decode()
    headers = {"Content-Type": "application/json", "webhook-id": msg_id, "webhook-timestamp": stamp,
               "webhook-signature": f"v1,{signature}"}
    return body, headers


async def drive(port: int, seconds: float, concurrency: int, max_requests: int, prefix: str, tally: Tally) -> None:
    url = f"http://127.0.0.1:{port}/webhooks/{CONNECTION}"
    counter = iter(range(max_requests))
    end = time.perf_counter() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        for n in counter:
            if time.perf_counter() >= end:
                return
            body, headers = signed(n, prefix)
            started = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as response:
                answer = await response.json()
            tally.latencies.append(time.perf_counter() - started)
            if response.status == 200 and answer.get("status") == "accepted":
                tally.accepted += 1
            else:
                tally.other += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        began = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        tally.seconds += time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="load time per target (split over the rounds)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="at most this many requests per slice")
    parser.add_argument("--serve", choices=["gateway", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--database", help=argparse.SUPPRESS)
    parser.add_argument("--port-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.database, args.port_file)
        return

    with tempfile.TemporaryDirectory(prefix="bench-webhooks-") as tmp:
        workdir = Path(tmp)
        database = workdir / "gateway.db"
        prepare_database(database)
        servers = {kind: start(kind, database, workdir) for kind in ("gateway", "bare")}
        tallies = {"gateway": Tally(), "bare": Tally()}
        try:
            for kind, (_, port) in servers.items():  # warm-up: connections, caches, first-request costs
                asyncio.run(drive(port, 1.0, args.concurrency, 2_000, f"warm{kind}", Tally()))
            slice_seconds = args.seconds / args.rounds
            for round_number in range(args.rounds):
                for kind in ("gateway", "bare") if round_number % 2 == 0 else ("bare", "gateway"):
                    process, port = servers[kind]
                    cpu = cpu_seconds(process.pid)
                    asyncio.run(drive(port, slice_seconds, args.concurrency, args.max_requests, f"r{round_number}",
                                      tallies[kind]))
                    tallies[kind].server_cpu += cpu_seconds(process.pid) - cpu
        finally:
            for process, _ in servers.values():
                process.send_signal(signal.SIGTERM)
            for process, _ in servers.values():
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
    gateway, bare = tallies["gateway"], tallies["bare"]
    if gateway.other or bare.other:
        print(f"not accepted: gateway={gateway.other} bare={bare.other}", file=sys.stderr)
    for kind, tally in tallies.items():
        cpu_ms = tally.server_cpu / max(tally.accepted, 1) * 1000
        print(f"{kind}: {tally.accepted} accepted in {tally.seconds:.1f} s = {tally.rps:.0f}/s, "
              f"p50 {tally.percentile(0.50):.2f} ms, p99 {tally.percentile(0.99):.2f} ms, "
              f"server CPU {cpu_ms:.3f} ms/request")
    print(f"(cpus={os.cpu_count()}, concurrency={args.concurrency}, rounds={args.rounds})")
    ratio = gateway.rps / bare.rps if bare.rps else 0.0
    print(f"webhooks: ratio={ratio:.3f} target={TARGET} gateway_rps={gateway.rps:.0f} bare_rps={bare.rps:.0f} "
          f"p50_ms={gateway.percentile(0.50):.2f} p99_ms={gateway.percentile(0.99):.2f}")


if __name__ == "__main__":
    main()

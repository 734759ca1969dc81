"""``gateway run``: serves health on the configured port and stops gracefully on SIGTERM with exit 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from builders import free_port, write_config


def wait_for(url: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return json.loads(response.read())
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.slow  # two gateway processes and a wait for the scheduler: 5 s or more
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_run_serves_and_stops_gracefully(tmp_path: Path, stop_signal):
    port = free_port()
    config = write_config(tmp_path / "gateway.toml", database_url=f"sqlite:///{tmp_path / 'g.db'}", sections={
        "server": {"port": port, "shutdown_timeout_seconds": 5},
        "scheduler": {"outbox_interval_seconds": 0.2, "billing_interval_seconds": 0.2},
    })
    env = {**os.environ, "GATEWAY_LOGGING__FORMAT": "json"}
    subprocess.run([sys.executable, "-m", "gateway", "--config", str(config), "db", "upgrade"], check=True,
                   capture_output=True, env=env)
    process = subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(config), "run"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        assert wait_for(f"http://127.0.0.1:{port}/healthz")["status"] == "ok"
        ready = wait_for(f"http://127.0.0.1:{port}/readyz")
        assert ready["status"] == "ready" and ready["database"]["status"] == "ok"
        time.sleep(0.5)  # let the scheduler run its jobs at least once
        jobs = wait_for(f"http://127.0.0.1:{port}/readyz")["jobs"]
        assert {"outbox", "billing", "licensing"} <= set(jobs)
        assert all(job["runs"] >= 1 and not job["failing"] for job in jobs.values()), jobs
        process.send_signal(stop_signal)
        _, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    events = [json.loads(line)["event"] for line in err.splitlines() if line.startswith("{")]
    assert "daemon.scheduler_started" in events and "daemon.scheduler_stopped" in events
    assert "job.failed" not in events, err


def test_run_refuses_an_out_of_date_schema(tmp_path: Path):
    config = write_config(tmp_path / "gateway.toml", database_url=f"sqlite:///{tmp_path / 'g.db'}")
    result = subprocess.run([sys.executable, "-m", "gateway", "--config", str(config), "run"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "run 'gateway db upgrade' first" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow  # two gateway processes and two pull intervals: 5 s or more
def test_run_pulls_each_rmm_connection_on_its_interval_and_counts_it_in_metrics(tmp_path: Path, ninja_simulator_url):
    from gateway.plugins.ninjaone import simulator

    port = free_port()
    config = write_config(
        tmp_path / "gateway.toml", database_url=f"sqlite:///{tmp_path / 'g.db'}",
        sections={"server": {"port": port, "shutdown_timeout_seconds": 5}},
        connections=[{"name": "ninja", "plugin": "ninjaone", "base_url": ninja_simulator_url, "poll_interval_seconds": 0.3,
                      "credentials": {"client_id": simulator.DEFAULT_CLIENT_ID,
                                      "client_secret": simulator.DEFAULT_CLIENT_SECRET}}],
    )
    subprocess.run([sys.executable, "-m", "gateway", "--config", str(config), "db", "upgrade"], check=True,
                   capture_output=True)
    process = subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(config), "run"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz")
        deadline = time.monotonic() + 20
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                text = response.read().decode()
            pulls = [line for line in text.splitlines()
                     if line.startswith('gateway_pulls_total{connection="ninja",outcome="ok"}')]
            if pulls and float(pulls[0].split()[-1]) >= 2:
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
        ready = wait_for(f"http://127.0.0.1:{port}/readyz")
        assert ready["jobs"]["pull:ninja"]["runs"] >= 2
        assert [c["status"] for c in ready["connections"]] == ["ok"]
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0

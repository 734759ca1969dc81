"""The directory CLI and `gateway sync --once` against the NinjaOne simulator on loopback (G1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from builders import write_config

from gateway.cli import main
from gateway.plugins.ninjaone import simulator


def test_g1_sync_once_lists_unmapped_then_bills_only_mapped_devices(tmp_path: Path, ninja_simulator_url, capsys):
    config = write_config(tmp_path / "gateway.toml", database_url=f"sqlite:///{tmp_path / 'g.db'}", connections=[
        {"name": "ninja", "plugin": "ninjaone", "base_url": ninja_simulator_url,
         "credentials": {"client_id": simulator.DEFAULT_CLIENT_ID, "client_secret": simulator.DEFAULT_CLIENT_SECRET}},
    ])
    run = lambda *argv: main(["--config", str(config), *argv])  # noqa: E731
    assert run("db", "upgrade") == 0
    assert run("partners", "add", "Northwind") == 0
    assert run("customers", "add", "Contoso", "--timezone", "Mars/Olympus") == 2
    assert "not an IANA time zone" in capsys.readouterr().err
    assert run("customers", "add", "Contoso", "--timezone", "Europe/Berlin") == 0
    assert run("workspaces", "add", "HQ", "--customer", "1") == 0
    capsys.readouterr()

    assert run("sync", "--once") == 0
    captured = capsys.readouterr()
    assert "ninja: 30 devices" in captured.err  # progress through the gateway_devices_seen hook
    assert run("mappings", "--unmapped", "--json") == 0
    unmapped = json.loads(capsys.readouterr().out)
    assert len(unmapped) == 3 and sum(row["devices"] for row in unmapped) == 30

    first = unmapped[0]
    with pytest.raises(SystemExit) as usage:  # unmapping needs --unmap: it is never what an omitted option means
        run("mappings", "rmm", "ninja", first["external_id"])
    assert usage.value.code == 2 and "--workspace ID | --unmap" in capsys.readouterr().err
    assert run("mappings", "rmm", "ninja", first["external_id"], "--workspace", "1") == 0
    assert run("sync", "--once", "--json") == 0
    capsys.readouterr()
    assert run("mappings", "--unmapped", "--json") == 0
    still = json.loads(capsys.readouterr().out)
    assert [row["external_id"] for row in still] == [row["external_id"] for row in unmapped[1:]]
    assert run("sync", "--once", "--connection", "nope") == 2
    assert "no connection named 'nope'" in capsys.readouterr().err

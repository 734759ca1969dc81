"""The README's main job: `gateway demo` runs the full cycle on the embedded default and exits 0."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import main


@pytest.mark.slow
def test_demo_runs_the_full_cycle_and_reconciles_clean(tmp_path: Path):
    result = subprocess.run([sys.executable, "-m", "gateway", "demo", "--dir", str(tmp_path / "demo")],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Traceback" not in result.stderr
    assert re.search(r"Reconciliation \(G3\): (\d+) checked, \1 matched, 0 differences", out)
    assert "unmapped organisations, never billed (G1): ninja:" in out
    bills = re.findall(r"^NW-\d{4}-\d{2}-\d{6}\s", out, re.M)
    assert len(bills) == 4
    assert re.search(r"Deliveries \(exactly once, G2\): 5 created, 0 already present, 0 dead", out)
    assert "demo: done" in out
    # the demo leaves a real configuration and database that the CLI can read
    config = tmp_path / "demo" / "gateway.toml"
    assert main(["--config", str(config), "deliveries", "list", "--status", "delivered"]) == 0


def test_demo_refuses_a_directory_it_did_not_make(tmp_path: Path, capsys):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    assert main(["demo", "--dir", str(tmp_path)]) == 2
    assert "was not made by 'gateway demo'" in capsys.readouterr().err
    assert precious.read_text() == "keep me"

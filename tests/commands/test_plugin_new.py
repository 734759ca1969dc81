"""``gateway plugin new``: the package it writes installs in a fresh virtual environment and passes its tests.

The fresh environment is made without pip and without downloads: a ``.pth`` file lets it
see this environment's packages (the gateway, pytest, aiohttp, pip), so only the new plugin
is installed into it, with ``pip install -e``, the way an admin would.
"""

from __future__ import annotations

import importlib.util
import os
import re
import site
import subprocess
import sys
import sysconfig
import time
import tomllib
from pathlib import Path
from xml.etree import ElementTree

import pytest

from gateway.cli import main
from gateway.scaffold import placeholders, scaffold


def fresh_venv(root: Path) -> Path:
    """A new virtual environment that sees this one's packages; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    parents = [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in dict.fromkeys(parents))
    (Path(purelib) / "_gateway_parent_env.pth").write_text(lines)
    return python


def run_tests(python: Path, package: Path, report: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}"],
        cwd=package, env=env, capture_output=True, text=True, timeout=300,
    )


def outcomes(report: Path) -> dict[str, str]:
    result = {}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        bad = case.find("failure") is not None or case.find("error") is not None
        result[f"{case.get('classname')}::{case.get('name')}"] = "failed" if bad else "passed"
    return result


@pytest.mark.slow
def test_scaffolded_rmm_and_psa_plugins_install_with_pip_and_pass_their_own_tests(tmp_path, capsys):
    started = time.monotonic()
    assert main(["plugin", "new", "acme-rmm", "--kind", "rmm", "--dir", str(tmp_path)]) == 0
    assert main(["plugin", "new", "acme-psa", "--kind", "psa", "--dir", str(tmp_path)]) == 0
    assert "pip install -e" in capsys.readouterr().out
    python = fresh_venv(tmp_path / "venv")
    # Offline when the build backend is at hand (it is in the test extras); else pip fetches it.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("hatchling") else []
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", *isolation,
         "-e", str(tmp_path / "gateway-acme-rmm"), "-e", str(tmp_path / "gateway-acme-psa")],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    for name, role in (("acme-rmm", "rmm"), ("acme-psa", "psa")):
        package = tmp_path / f"gateway-{name}"
        report = tmp_path / f"{name}.xml"
        completed = run_tests(python, package, report)
        assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-2000:]
        results = outcomes(report)
        assert set(results.values()) == {"passed"}
        contract = [test for test in results if "_contract." in test]
        assert len(contract) >= 15, f"the {role} contract kit did not run: {sorted(results)}"
        assert any(f"test_{'g1' if role == 'rmm' else 'g2'}_" in test for test in contract)
        assert any("test_the_gateway_finds_the_plugin" in test for test in results)  # found by its entry point
    assert time.monotonic() - started < 120


def test_every_written_file_is_valid_and_names_the_plugin(tmp_path):
    for name, kind in (("tiny-psa", "psa"), ("x1-rmm-tool", "rmm")):
        values = placeholders(name, kind)
        target = scaffold(name, kind, tmp_path)
        assert target == tmp_path / values["dist"]
        project = tomllib.loads((target / "pyproject.toml").read_text())
        assert project["project"]["name"] == values["dist"]
        assert project["project"]["entry-points"]["gateway.plugins"] == {name: values["package"]}
        sources = list(target.rglob("*.py"))
        assert {p.name for p in (target / values["package"]).iterdir()} == {
            "__init__.py", "client.py", "protocol.py", "simulator.py"}
        for source in sources:
            text = source.read_text()
            compile(text, str(source), "exec")
            assert not re.search(r"\$\{?[A-Za-z_]", text), f"a placeholder was left in {source}"
        assert f'kind="{name}"' in (target / values["package"] / "__init__.py").read_text()
        assert f'role="{kind}"' in (target / values["package"] / "__init__.py").read_text()


@pytest.mark.parametrize("name", ["Acme", "acme_rmm", "1acme", "acme--rmm", "acme-", "a" * 41, "ninjaone"])
def test_names_that_cannot_be_a_plugin_are_refused_with_the_reason(tmp_path, capsys, name):
    assert main(["plugin", "new", name, "--kind", "rmm", "--dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("gateway: error: ") and ("lower-case" in error or "already provided" in error)
    assert not any(tmp_path.iterdir())


def test_an_existing_folder_is_never_overwritten(tmp_path, capsys):
    (tmp_path / "gateway-acme").mkdir()
    (tmp_path / "gateway-acme" / "notes.txt").write_text("mine")
    assert main(["plugin", "new", "acme", "--kind", "psa", "--dir", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "gateway-acme").iterdir()] == ["notes.txt"]

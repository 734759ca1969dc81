"""What a person types at the CLI is refused with one clear line when it holds control or bidi override
characters, or names a time zone that is no place (``posixrules``, ``Factory``); nothing is stored."""

from __future__ import annotations

from pathlib import Path

import pytest
from builders import write_config

from gateway.cli import main
from gateway.core import db as gdb
from gateway.core.models import Customer, Partner, Workspace


@pytest.fixture
def run(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'g.db'}"
    config = write_config(tmp_path / "gateway.toml", database_url=url)
    runner = lambda *argv: main(["--config", str(config), *argv])  # noqa: E731
    assert runner("db", "upgrade") == 0
    runner.url = url  # type: ignore[attr-defined]
    return runner


def _count(url: str, model) -> int:
    engine = gdb.make_engine(url)
    try:
        with gdb.session_factory(engine)() as s:
            return s.query(model).count()
    finally:
        engine.dispose()


@pytest.mark.parametrize("zone", ["posixrules", "Factory", "localtime", "posix/Europe/Berlin", "right/UTC"])
def test_s4_a_customer_zone_must_be_a_place_not_a_technical_entry_of_the_zone_database(run, capsys, zone):
    assert run("partners", "add", "Northwind") == 0
    assert run("customers", "add", "Contoso", "--timezone", zone) == 2
    err = capsys.readouterr().err
    assert "not an IANA time zone name" in err and "Europe/Berlin" in err and "Traceback" not in err
    assert _count(run.url, Customer) == 0
    for fine in ("Europe/Berlin", "UTC", "Etc/GMT+5"):
        assert run("customers", "add", f"Contoso {fine}", "--timezone", fine) == 0


@pytest.mark.parametrize("bad", ["North\x00wind", "North\x1b[31mwind", "North\u202ewind", "North\nwind"])
def test_names_with_control_or_bidi_override_characters_are_refused_for_partners_customers_and_workspaces(
        run, capsys, bad):
    assert run("partners", "add", bad) == 2
    assert "U+" in capsys.readouterr().err
    assert run("partners", "add", "Northwind") == 0
    assert run("customers", "add", bad, "--timezone", "UTC") == 2
    assert "U+" in capsys.readouterr().err
    assert run("customers", "add", "Contoso", "--timezone", "UTC") == 0
    assert run("workspaces", "add", bad, "--customer", "1") == 2
    assert "U+" in capsys.readouterr().err
    assert (_count(run.url, Partner), _count(run.url, Customer), _count(run.url, Workspace)) == (1, 1, 0)

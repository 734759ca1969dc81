"""A malformed GATEWAY_ environment variable is one line naming the variable and what was wrong, not a
pydantic-settings traceback (the traceback stays for --debug)."""

from __future__ import annotations

import pytest
from builders import write_config

from gateway.cli import main
from gateway.core.settings import load_settings
from gateway.errors import ConfigError


@pytest.mark.parametrize("value", ['[{"name": 1', "not json", "[{'name': 'x'}]"])
def test_a_malformed_gateway_connections_variable_is_one_line_naming_it(tmp_path, monkeypatch, capsys, value):
    config = write_config(tmp_path / "gateway.toml", database_url=f"sqlite:///{tmp_path / 'g.db'}")
    monkeypatch.setenv("GATEWAY_CONNECTIONS", value)
    assert main(["--config", str(config), "db", "upgrade"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "SettingsError" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert "GATEWAY_CONNECTIONS is not valid JSON" in err and "a JSON list of connection tables" in err, err


def test_the_same_one_line_error_when_the_environment_is_given_explicitly(tmp_path):
    config = write_config(tmp_path / "gateway.toml", database_url=f"sqlite:///{tmp_path / 'g.db'}")
    with pytest.raises(ConfigError, match="GATEWAY_CONNECTIONS is not valid JSON"):
        load_settings(config, environ={"GATEWAY_CONNECTIONS": "[oops"})

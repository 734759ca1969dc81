"""The command line: bad input gives one clear line and exit code 2, a traceback only with --debug."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import main


def config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return str(path)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_wrong_database_url(tmp_path, capsys):
    path = config(tmp_path, '[database]\nurl = "mysql+nosuchdriver://x/y"\n')
    assert main(["--config", path, "db", "upgrade"]) == 2
    line = one_error_line(capsys)
    assert "database.url" in line and "nosuchdriver" in line


def test_unreachable_postgres(tmp_path, capsys):
    path = config(tmp_path, '[database]\nurl = "postgresql://gw:pw-secret@127.0.0.1:1/gw"\n')
    assert main(["--config", path, "db", "current"]) == 2
    line = one_error_line(capsys)
    assert "cannot reach the database at postgresql+psycopg://gw:***@127.0.0.1:1/gw" in line
    assert "pw-secret" not in line


def test_plugin_not_installed(tmp_path, capsys):
    path = config(tmp_path, '[[connections]]\nname = "x"\nplugin = "nosuchtool"\nbase_url = "http://127.0.0.1:9"\n')
    assert main(["--config", path, "config", "check"]) == 2
    line = one_error_line(capsys)
    assert path in line and "connections[0] ('x')" in line and "'nosuchtool' is not installed" in line


def test_duplicate_connection_names(tmp_path, capsys):
    block = '[[connections]]\nname = "dup"\nplugin = "ninjaone"\nbase_url = "http://127.0.0.1:9"\n'
    path = config(tmp_path, block + block)
    assert main(["--config", path, "config", "check"]) == 2
    line = one_error_line(capsys)
    assert path in line and "'dup' is already used" in line


def test_out_of_date_schema_says_to_upgrade_then_upgrade_fixes_it(tmp_path, capsys):
    path = config(tmp_path, f'[database]\nurl = "sqlite:///{tmp_path / "g.db"}"\n')
    assert main(["--config", path, "db", "current"]) == 0
    assert "run 'gateway db upgrade'" in capsys.readouterr().out
    assert main(["--config", path, "db", "upgrade"]) == 0
    assert "schema upgraded from empty to" in capsys.readouterr().out
    assert main(["--config", path, "db", "upgrade"]) == 0
    assert "already at revision" in capsys.readouterr().out


def test_debug_shows_the_traceback(tmp_path):
    path = config(tmp_path, "[server]\nbogus = 1\n")
    with pytest.raises(Exception, match="server.bogus"):
        main(["--debug", "--config", path, "config", "check"])


def test_python_dash_m_gateway_runs_the_same_cli(tmp_path):
    path = config(tmp_path, "[server]\nport = 'eighty'\n")
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--config", path, "config", "check"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("gateway: error: config error in") and "server.port" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_adapter_option_is_caught_by_config_check_not_at_the_first_push(tmp_path, capsys):
    path = config(
        tmp_path,
        '[[connections]]\nname = "cw"\nplugin = "connectwise"\nbase_url = "http://127.0.0.1:9"\n'
        'credentials = { company = "c", public_key = "p", private_key = "k-secret", client_id = "i" }\n'
        'options = { delivery = "invoices" }\n',
    )
    assert main(["--config", path, "config", "check"]) == 2
    line = one_error_line(capsys)
    assert "connections[0] ('cw')" in line and "delivery" in line and "k-secret" not in line

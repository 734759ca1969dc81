"""Settings: the example file loads, the environment wins, bad files give one clear message without secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.core.settings import credential_env_name, load_settings
from gateway.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


def test_example_config_loads_and_documents_every_setting():
    settings = load_settings(ROOT / "config.example.toml", environ={})
    assert settings.connections[0].name == "ninja"
    assert settings.connections[0].credentials["client_secret"].get_secret_value() == "your-client-secret"
    # every field of every section appears in the example file, with a comment above it
    text = (ROOT / "config.example.toml").read_text()
    for section_name in type(settings).model_fields:
        if section_name in ("source", "connections"):
            continue
        section = getattr(settings, section_name)
        for key in type(section).model_fields:
            assert f"\n{key} =" in text or f"\n# {key} =" in text, f"[{section_name}] {key} is not documented"


def test_environment_overrides_file_with_nested_keys(tmp_path):
    path = write(tmp_path, '[database]\nurl = "sqlite:///a.db"\n[server]\nport = 9000\n')
    settings = load_settings(path, environ={"GATEWAY_DATABASE__URL": "sqlite:///b.db"})
    assert settings.database.url == "sqlite:///b.db"
    assert settings.server.port == 9000


def test_config_path_from_environment(tmp_path):
    path = write(tmp_path, "[server]\nport = 9100\n")
    assert load_settings(environ={"GATEWAY_CONFIG": str(path)}).server.port == 9100


def test_connection_secret_can_come_from_environment(tmp_path):
    path = write(tmp_path, '[[connections]]\nname = "ninja-eu"\nplugin = "ninjaone"\nbase_url = "http://127.0.0.1:1"\n')
    env = {credential_env_name("ninja-eu", "client_secret"): "from-env"}
    assert credential_env_name("ninja-eu", "client_secret") == "GATEWAY_CREDENTIALS__NINJA_EU__CLIENT_SECRET"
    settings = load_settings(path, environ=env)
    assert settings.connection("ninja-eu").credential("client_secret") == "from-env"


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "[server]\nprot = 80\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    assert str(path) in str(info.value) and "server.prot: unknown setting" in str(info.value)


def test_wrong_type_names_key_and_never_echoes_value(tmp_path):
    path = write(
        tmp_path,
        '[mail]\npassword = "hunter2-secret"\nport = "not-a-number"\n',
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    message = str(info.value)
    assert "mail.port" in message and str(path) in message
    assert "hunter2-secret" not in message and "not-a-number" not in message


def test_secret_with_wrong_type_is_not_echoed(tmp_path):
    path = write(tmp_path, '[[connections]]\nname = "x"\nplugin = "p"\nbase_url = "http://127.0.0.1"\ncredentials = { key = 123456789 }\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    assert "connections[0].credentials.key" in str(info.value) and "123456789" not in str(info.value)


def test_unreadable_and_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", environ={})
    with pytest.raises(ConfigError, match="cannot be read"):
        load_settings(tmp_path, environ={})  # a directory
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "[server\n"), environ={})


def test_duplicate_connection_names_are_refused(tmp_path):
    block = '[[connections]]\nname = "same"\nplugin = "ninjaone"\nbase_url = "http://127.0.0.1"\n'
    with pytest.raises(ConfigError, match=r"connections\[1\].name: 'same' is already used by connections\[0\]"):
        load_settings(write(tmp_path, block + block), environ={})


def test_base_url_must_be_http(tmp_path):
    path = write(tmp_path, '[[connections]]\nname = "a"\nplugin = "p"\nbase_url = "ftp://x"\n')
    with pytest.raises(ConfigError, match=r"connections\[0\].base_url"):
        load_settings(path, environ={})


def test_missing_credential_names_connection_key_and_env_variable(tmp_path):
    path = write(tmp_path, '[[connections]]\nname = "dat"\nplugin = "datto_rmm"\nbase_url = "http://127.0.0.1"\n')
    settings = load_settings(path, environ={})
    with pytest.raises(ConfigError, match="GATEWAY_CREDENTIALS__DAT__API_SECRET"):
        settings.connection("dat").credential("api_secret")


def test_secret_values_are_collected_for_redaction(tmp_path):
    path = write(
        tmp_path,
        '[mail]\npassword = "mailpw"\n[[connections]]\nname = "a"\nplugin = "p"\nbase_url = "http://127.0.0.1"\n'
        'webhook_secret = "whsec_abc"\ncredentials = { k = "credval" }\n',
    )
    assert set(load_settings(path, environ={}).secret_values()) == {"mailpw", "whsec_abc", "credval"}

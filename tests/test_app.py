"""The composition root's product: adapters built by role, and typed per-gateway state (the stash)."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine

from gateway.adapters import PsaAdapter, RmmAdapter
from gateway.app import Gateway
from gateway.core import db as gdb
from gateway.core.clock import SystemClock
from gateway.core.settings import ConnectionSettings, Settings
from gateway.errors import ConfigError
from gateway.plugins import get_plugin_manager
from gateway.stash import Stash, StashKey

CREDENTIALS = {"client_id": "id", "client_secret": "secret"}


@pytest.fixture
def gateway() -> Gateway:
    settings = Settings(connections=[
        ConnectionSettings(name="ninja", plugin="ninjaone", base_url="https://ninja.invalid", credentials=CREDENTIALS),
        ConnectionSettings(name="halo", plugin="halopsa", base_url="https://halo.invalid", credentials=CREDENTIALS),
    ])
    engine = create_engine("sqlite://")
    yield Gateway(settings=settings, engine=engine, db=gdb.session_factory(engine),
                  plugins=get_plugin_manager(load_entry_points=False), clock=SystemClock())
    engine.dispose()


async def test_build_rmm_and_build_psa_return_the_adapter_of_their_role(gateway):
    rmm, psa = gateway.build_rmm("ninja"), gateway.build_psa(gateway.settings.connection("halo"))
    try:
        assert isinstance(rmm, RmmAdapter) and isinstance(psa, PsaAdapter)
    finally:
        await rmm.aclose()
        await psa.aclose()


def test_building_a_connection_for_the_other_role_is_a_clear_config_error(gateway):
    with pytest.raises(ConfigError, match=r"connection 'halo' \(plugin 'halopsa'\) is a PSA connection, not an RMM one"):
        gateway.build_rmm("halo")
    with pytest.raises(ConfigError, match=r"connection 'ninja' \(plugin 'ninjaone'\) is an RMM connection, not a PSA one"):
        gateway.build_psa("ninja")
    with pytest.raises(ConfigError, match="no connection named 'nope'"):
        gateway.build_psa("nope")


def test_stash_keys_are_typed_unique_and_independent():
    stash = Stash()
    name, count = StashKey[str]("name"), StashKey[int]()
    assert name not in stash and len(stash) == 0
    assert stash.get(name, None) is None
    stash[name] = "gateway"
    assert stash[name] == "gateway" and name in stash and count not in stash
    assert stash.setdefault(count, 1) == 1 and stash.setdefault(count, 2) == 1
    with pytest.raises(KeyError):
        stash[StashKey[str]("name")]  # same name, another key
    del stash[name]
    assert stash.get(name, "gone") == "gone" and len(stash) == 1

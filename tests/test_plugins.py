"""The plugin manager: built-ins and entry points load, broken plugins are reported by name, not fatal."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from pathlib import Path

import pytest

from gateway import AdapterSpec, hookimpl
from gateway.cli import main
from gateway.errors import ConfigError
from gateway.plugins import DEFAULT_PLUGINS, get_plugin_manager


def install_fake_distribution(tmp_path: Path, monkeypatch, name: str, module_source: str, module: str) -> None:
    """Install a plugin the way pip would: a module plus a dist-info with a gateway.plugins entry point."""
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(module_source))
    dist = tmp_path / f"{name}-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n")
    (dist / "entry_points.txt").write_text(f"[gateway.plugins]\n{name} = {module}\n")
    (dist / "top_level.txt").write_text(f"{module}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)


class AcmePlugin:
    @hookimpl
    def gateway_register_adapters(self):
        return [AdapterSpec(kind="acme", role="psa", factory=lambda c, ctx: None, required_credentials=("token",))]


def test_entry_point_plugin_is_loaded_and_listed(tmp_path, monkeypatch, capsys):
    install_fake_distribution(
        tmp_path,
        monkeypatch,
        "gateway-acme",
        """
        from gateway import AdapterSpec, hookimpl
        __version__ = "1.2.3"
        @hookimpl
        def gateway_register_adapters():
            return [AdapterSpec(kind="acme", role="rmm", factory=lambda c, ctx: None)]
        """,
        "gateway_acme_plugin",
    )
    manager = get_plugin_manager()
    assert manager.adapters()["acme"].role == "rmm"
    assert main(["plugins", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"gateway-acme"' in out and '"1.2.3"' in out and "acme (rmm)" in out


def test_plugin_that_fails_to_import_is_reported_by_name_and_not_fatal(tmp_path, monkeypatch, capsys):
    install_fake_distribution(tmp_path, monkeypatch, "gateway-broken", "raise ImportError('needs libfoo')\n", "gateway_broken_plugin")
    manager = get_plugin_manager()
    assert [f.name for f in manager.failures] == ["gateway-broken"]
    assert "needs libfoo" in manager.failures[0].error
    assert main(["plugins"]) == 1  # listed, with its error, and the listing says something is wrong
    assert "gateway-broken" in capsys.readouterr().out


def test_misspelt_hookimpl_fails_loudly():
    class Typo:
        @hookimpl
        def gateway_register_adaptors(self):
            return []

    with pytest.raises(Exception, match="gateway_register_adaptors"):
        get_plugin_manager(extra_plugins=[Typo()], load_entry_points=False)


def test_a_raising_hook_is_reported_and_others_still_run():
    calls = []

    class Broken:
        @hookimpl
        def gateway_notify(self, event, payload):
            raise RuntimeError("chat service down")

    class Working:
        @hookimpl
        def gateway_notify(self, event, payload):
            calls.append((event, dict(payload)))

    manager = get_plugin_manager(extra_plugins=[Broken(), Working()], load_entry_points=False)
    manager.call_each("gateway_notify", event="license.reminder", payload={"key": "K"})
    assert calls == [("license.reminder", {"key": "K"})]
    assert len(manager.failures) == 1 and "chat service down" in manager.failures[0].error


async def test_awaitable_hook_results_are_awaited_and_async_failures_isolated():
    seen = []

    class AsyncPlugin:
        @hookimpl
        def gateway_notify(self, event, payload):
            async def send():
                seen.append(event)
                return "sent"

            return send()

    class AsyncBroken:
        @hookimpl
        def gateway_notify(self, event, payload):
            async def send():
                raise ConnectionError("refused")

            return send()

    manager = get_plugin_manager(extra_plugins=[AsyncPlugin(), AsyncBroken()], load_entry_points=False)
    results = await manager.call_each_async("gateway_notify", event="delivery.dead_lettered", payload={})
    assert [value for _, value in results] == ["sent"]
    assert seen == ["delivery.dead_lettered"] and "refused" in manager.failures[0].error


async def test_g5_a_hook_that_hangs_is_cancelled_reported_and_the_others_still_run():
    cancelled = []

    class Quick:
        @hookimpl
        def gateway_notify(self, event, payload):
            async def send():
                return "sent"

            return send()

    class Stuck:
        @hookimpl
        def gateway_notify(self, event, payload):
            async def send():
                try:
                    await asyncio.Event().wait()  # a chat service that never answers, no timeout of its own
                except asyncio.CancelledError:
                    cancelled.append(event)
                    raise

            return send()

    manager = get_plugin_manager(extra_plugins=[Quick(), Stuck()], load_entry_points=False)
    manager.hook_timeout_seconds = 0.1
    results = await asyncio.wait_for(
        manager.call_each_async("gateway_notify", event="delivery.dead_lettered", payload={}), timeout=5)
    assert [value for _, value in results] == ["sent"]
    assert cancelled == ["delivery.dead_lettered"]
    assert [f.error for f in manager.failures] == [
        "gateway_notify: TimeoutError: did not finish within 0.1 s; it was cancelled"
    ]


def test_two_plugins_claiming_one_adapter_kind_is_a_config_error():
    manager = get_plugin_manager(extra_plugins=[AcmePlugin(), AcmePlugin()], load_entry_points=False)
    with pytest.raises(ConfigError, match="adapter kind 'acme' is provided by both plugin"):
        manager.adapters()


def test_builtin_plugins_register_through_the_same_hooks():
    manager = get_plugin_manager(load_entry_points=False)
    registered = {name for name, _ in manager.pm.list_name_plugin()}
    assert set(DEFAULT_PLUGINS) <= registered
    for kind, spec in manager.adapters().items():
        assert spec.kind == kind and spec.role in ("rmm", "psa")

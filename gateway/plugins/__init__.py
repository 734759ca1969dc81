"""The plugin manager, and the built-in plugins (one sub-package per tool).

``get_plugin_manager()`` is the only way to get one: nothing is registered at
import time, so each test and each process builds a fresh manager. Built-in
adapters are ordinary plugins listed in :data:`DEFAULT_PLUGINS`; installed
plugins come from the ``gateway.plugins`` entry-point group.

(ARCHITECTURE.md puts this in ``gateway/plugins.py``; a module and a package of
the same name cannot coexist, so it lives in the package's ``__init__``.)
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy
import structlog

from gateway import hookspecs
from gateway.adapters import AdapterSpec
from gateway.errors import ConfigError

log = structlog.get_logger("gateway.plugins")

ENTRY_POINT_GROUP = "gateway.plugins"

#: Built-in plugins, registered before installed ones. Adding a tool to the
#: core means adding its package here; nothing else in the core changes.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "gateway.plugins.ninjaone",
    "gateway.plugins.datto_rmm",
    "gateway.plugins.connectwise",
    "gateway.plugins.autotask",
    "gateway.plugins.halopsa",
    "gateway.sync.webhook_schemes",
    "gateway.sync.webhook_handlers",
)


@dataclass
class PluginFailure:
    """A plugin that could not be loaded, or a hook implementation that raised."""

    name: str
    error: str


@dataclass
class GatewayPluginManager:
    """The pluggy manager plus what the gateway learnt while loading plugins."""

    pm: pluggy.PluginManager
    failures: list[PluginFailure] = field(default_factory=list)
    #: How long an awaitable a hook returned may run (G5): a plugin that hangs is reported and
    #: skipped instead of holding up the outbox, the scheduler or the webhook writer.
    hook_timeout_seconds: float = 30.0
    _adapters: dict[str, AdapterSpec] | None = None

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def adapters(self) -> dict[str, AdapterSpec]:
        """Adapter specs by kind; two plugins claiming one kind is a configuration error."""
        if self._adapters is None:
            found: dict[str, AdapterSpec] = {}
            owner: dict[str, str] = {}
            for plugin_name, specs in self.call_each("gateway_register_adapters"):
                for spec in specs or ():
                    if spec.kind in found:
                        raise ConfigError(
                            f"adapter kind {spec.kind!r} is provided by both plugin "
                            f"{owner[spec.kind]!r} and plugin {plugin_name!r}; uninstall one of them"
                        )
                    found[spec.kind] = spec
                    owner[spec.kind] = plugin_name
            self._adapters = found
        return self._adapters

    def call_each(self, hook_name: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call every implementation of a hook on its own; one that raises is reported and skipped (G5).

        Returns ``(plugin name, result)`` pairs, results that are None included.
        """
        caller = getattr(self.pm.hook, hook_name)
        results: list[tuple[str, Any]] = []
        # pluggy's own order: last registered first, tryfirst/trylast respected.
        for impl in reversed(caller.get_hookimpls()):
            args = {name: kwargs[name] for name in impl.argnames if name in kwargs}
            try:
                results.append((impl.plugin_name, impl.function(**args)))
            except Exception as exc:  # a plugin's fault must not stop the gateway
                self.report_failure(impl.plugin_name, hook_name, exc)
        return results

    async def call_each_async(self, hook_name: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Like :meth:`call_each`, awaiting results that are awaitable (pluggy itself is sync),
        each for at most :attr:`hook_timeout_seconds`."""
        results: list[tuple[str, Any]] = []
        for plugin_name, value in self.call_each(hook_name, **kwargs):
            if inspect.isawaitable(value):
                try:
                    value = await self.bounded(value)
                except Exception as exc:
                    self.report_failure(plugin_name, hook_name, exc)
                    continue
            results.append((plugin_name, value))
        return results

    async def bounded(self, awaitable: Awaitable[Any]) -> Any:
        """Await what a hook returned, cancelling it with a TimeoutError that says so after the time limit."""
        try:
            return await asyncio.wait_for(awaitable, self.hook_timeout_seconds)
        except TimeoutError:
            raise TimeoutError(f"did not finish within {self.hook_timeout_seconds:g} s; it was cancelled") from None

    def report_failure(self, plugin_name: str, hook_name: str, exc: BaseException) -> None:
        """Record and log a plugin's failure in a hook (G5); also for faults the caller finds in a hook's result."""
        self.failures.append(PluginFailure(plugin_name, f"{hook_name}: {type(exc).__name__}: {exc}"))
        log.error("plugin.hook_failed", plugin=plugin_name, hook=hook_name, error=f"{type(exc).__name__}: {exc}")

    def describe(self) -> list[dict[str, Any]]:
        """Plugins, their versions and the adapter kinds they provide (for ``gateway plugins``)."""
        kinds_by_plugin: dict[str, list[str]] = {}
        for plugin_name, specs in self.call_each("gateway_register_adapters"):
            kinds_by_plugin.setdefault(plugin_name, []).extend(f"{s.kind} ({s.role})" for s in specs or ())
        rows = []
        for name, plugin in self.pm.list_name_plugin():
            if name.startswith("_") or plugin is None:
                continue
            rows.append(
                {
                    "name": name,
                    "version": _version_of(plugin),
                    "builtin": name in DEFAULT_PLUGINS,
                    "adapters": kinds_by_plugin.get(name, []),
                }
            )
        for failure in self.failures:
            rows.append({"name": failure.name, "version": None, "builtin": False, "adapters": [], "error": failure.error})
        return rows


def get_plugin_manager(
    *, extra_plugins: Iterable[Any] = (), load_entry_points: bool = True
) -> GatewayPluginManager:
    """Build a fresh plugin manager: hookspecs, built-ins, installed plugins, then ``check_pending``.

    ``extra_plugins`` are registered last (tests and embedding use it).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    manager = GatewayPluginManager(pm)
    for module_name in DEFAULT_PLUGINS:
        module = importlib.import_module(module_name)  # a broken built-in is a bug: let it raise
        pm.register(module, name=module_name)
    if load_entry_points:
        for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if pm.get_plugin(entry_point.name) is not None or pm.is_blocked(entry_point.name):
                continue
            try:
                plugin = entry_point.load()
                pm.register(plugin, name=entry_point.name)
            except Exception as exc:  # an installed plugin that fails to import is reported, not fatal
                manager.failures.append(PluginFailure(entry_point.name, f"failed to load: {type(exc).__name__}: {exc}"))
                log.error("plugin.load_failed", plugin=entry_point.name, error=f"{type(exc).__name__}: {exc}")
    for plugin in extra_plugins:
        pm.register(plugin)
    pm.check_pending()
    return manager


def _version_of(plugin: Any) -> str | None:
    module_name = getattr(plugin, "__name__", type(plugin).__module__)
    version = getattr(plugin, "__version__", None)
    if version:
        return str(version)
    top = module_name.split(".")[0]
    if top == "gateway":
        from gateway import __version__

        return __version__
    try:
        for dist_name in metadata.packages_distributions().get(top, []):
            return metadata.version(dist_name)
    except Exception:
        return None
    return None

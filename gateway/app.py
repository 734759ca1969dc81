"""Composition root: settings -> logging -> engine -> plugin manager -> adapters.

Every entry point (CLI commands, the daemon, the demo, tests) builds a
:class:`Gateway` here and passes it, or its parts, down. Nothing below this
module reads configuration or builds engines on its own.

**Decision:** the sync layer never takes the whole ``Gateway``: its functions
take what they use (the session factory, the clock, a settings section, an
adapter builder such as :meth:`Gateway.build_psa`, a hook such as
:meth:`Gateway.notify`), so they can be read, tested and reused without a
wired application. What the web layer or the daemon keep on a gateway lives
under typed keys in ``gateway.stash`` (:mod:`gateway.stash`), not here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from gateway.adapters import AdapterContext, AdapterSpec, PsaAdapter, PushResult, RmmAdapter, Role
from gateway.core import db as gdb
from gateway.core.clock import Clock, SystemClock
from gateway.core.settings import ConnectionSettings, Settings, credential_env_name
from gateway.errors import ConfigError
from gateway.plugins import GatewayPluginManager, get_plugin_manager
from gateway.stash import Stash

#: "is an RMM connection, not a PSA one".
_A: dict[str, str] = {"rmm": "an RMM", "psa": "a PSA"}


@dataclass
class Gateway:
    """The wired application: what commands, the daemon and the demo work with."""

    settings: Settings
    engine: Engine
    db: sessionmaker[Session]
    plugins: GatewayPluginManager
    clock: Clock
    stash: Stash = field(default_factory=Stash)

    def spec_for(self, connection: ConnectionSettings) -> AdapterSpec:
        return self.plugins.adapters()[connection.plugin]

    def connections(self, role: str | None = None) -> list[ConnectionSettings]:
        """Enabled connections, optionally only those whose adapter has ``role`` ("rmm" or "psa")."""
        adapters = self.plugins.adapters()
        return [
            c
            for c in self.settings.connections
            if c.enabled and (role is None or adapters[c.plugin].role == role)
        ]

    def build_rmm(self, connection: ConnectionSettings | str) -> RmmAdapter:
        """A new RMM adapter for one connection; the caller closes it (``await adapter.aclose()``)."""
        return cast(RmmAdapter, self._build(connection, "rmm"))

    def build_psa(self, connection: ConnectionSettings | str) -> PsaAdapter:
        """A new PSA adapter for one connection; the caller closes it (``await adapter.aclose()``)."""
        return cast(PsaAdapter, self._build(connection, "psa"))

    def _build(self, connection: ConnectionSettings | str, role: Role) -> RmmAdapter | PsaAdapter:
        if isinstance(connection, str):
            connection = self.settings.connection(connection)
        spec = self.spec_for(connection)
        if spec.role != role:
            raise ConfigError(
                f"connection {connection.name!r} (plugin {connection.plugin!r}) is {_A[spec.role]} "
                f"connection, not {_A[role]} one"
            )
        # The spec's role says which protocol its factory's adapters implement: hence the casts above.
        return spec.factory(connection, AdapterContext(clock=self.clock))

    async def notify(self, event: str, payload: dict[str, Any]) -> None:
        """Announce ``event`` to every plugin (the ``gateway_notify`` hook; one failing never stops the others)."""
        await self.plugins.call_each_async("gateway_notify", event=event, payload=payload)

    async def bill_delivered(self, connection: str, bill_key: str, result: PushResult) -> None:
        """Tell every plugin a PSA holds a bill now (the ``gateway_bill_delivered`` hook)."""
        await self.plugins.call_each_async("gateway_bill_delivered", connection=connection, bill_key=bill_key,
                                           result=result)

    def close(self) -> None:
        self.engine.dispose()


def validate_connections(settings: Settings, plugins: GatewayPluginManager) -> None:
    """Every connection names an installed adapter kind and has its required credentials."""
    adapters = plugins.adapters()
    where = settings.source or "the configuration"
    for index, connection in enumerate(settings.connections):
        spec = adapters.get(connection.plugin)
        if spec is None:
            known = ", ".join(sorted(adapters)) or "none"
            raise ConfigError(
                f"config error in {where}: connections[{index}] ({connection.name!r}): plugin "
                f"{connection.plugin!r} is not installed (installed adapter kinds: {known}); "
                "install the plugin or fix the name"
            )
        prefix = f"config error in {where}: connections[{index}] ({connection.name!r})"
        for key in spec.required_credentials:
            secret = connection.credentials.get(key)
            if secret is None or not secret.get_secret_value():
                raise ConfigError(
                    f"{prefix}: missing required secret credentials.{key}; set it in the file or in "
                    f"{credential_env_name(connection.name, key)}"
                )
        # Building the adapter checks its options now, not at its first pull or push. Adapters open
        # no connection until their first request, so there is nothing to close here.
        try:
            spec.factory(connection, AdapterContext(clock=SystemClock()))
        except ConfigError as exc:
            raise ConfigError(f"{prefix}: {exc}") from None
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"{prefix}: invalid options for plugin {connection.plugin!r}: {exc}") from None


def build_gateway(
    settings: Settings,
    *,
    clock: Clock | None = None,
    extra_plugins: Iterable[Any] = (),
    check_schema: bool = True,
    configure_logs: bool = True,
) -> Gateway:
    """Wire a gateway from settings; raises ConfigError/DatabaseError with one clear message."""
    if configure_logs:
        from gateway.core.logging import configure_logging

        configure_logging(settings.logging.level, settings.logging.format, secrets=settings.secret_values())
    plugins = get_plugin_manager(extra_plugins=extra_plugins)
    validate_connections(settings, plugins)
    engine = gdb.make_engine(settings.database.url, echo=settings.database.echo, pool_size=settings.database.pool_size)
    if check_schema:
        gdb.check_schema_current(engine)
    return Gateway(
        settings=settings,
        engine=engine,
        db=gdb.session_factory(engine),
        plugins=plugins,
        clock=clock or SystemClock(),
    )

"""Configuration: a TOML file, overridden by ``GATEWAY_*`` environment variables.

Precedence, highest first: environment (``GATEWAY_DATABASE__URL``, nested with
``__``), then the file (``--config PATH`` or ``GATEWAY_CONFIG``), then defaults.
Connection credentials can also come from the environment as
``GATEWAY_CREDENTIALS__<CONNECTION>__<KEY>`` (connection name upper-cased, ``-``
and ``.`` as ``_``), so a file checked into git never needs to hold a secret.

Every problem with the configuration is raised as one :class:`ConfigError` whose
message names the file and the key and never contains a secret value.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from gateway.errors import ConfigError

ENV_PREFIX = "GATEWAY_"
CONFIG_ENV = "GATEWAY_CONFIG"
CREDENTIALS_ENV_PREFIX = "GATEWAY_CREDENTIALS__"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatabaseSettings(_Section):
    url: str = "sqlite:///gateway.db"
    echo: bool = False
    pool_size: int = Field(default=5, ge=1)


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    shutdown_timeout_seconds: float = Field(default=30.0, ge=0)


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class RateLimitSettings(_Section):
    """Overrides an adapter's documented limit (e.g. when the vendor granted a higher one)."""

    requests: int = Field(ge=1)
    per_seconds: float = Field(gt=0)
    max_concurrent: int = Field(default=4, ge=1)


class ConnectionSettings(_Section):
    """One ``[[connections]]`` table: an instance of an adapter kind."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    plugin: str = Field(min_length=1)
    base_url: str = Field(min_length=1)
    enabled: bool = True
    poll_interval_seconds: float = Field(default=900.0, gt=0)
    auto_map: bool = False
    timeout_seconds: float = Field(default=30.0, gt=0)
    rate_limit: RateLimitSettings | None = None
    webhook_scheme: str | None = None
    webhook_secret: SecretStr | None = None
    credentials: dict[str, SecretStr] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL, e.g. https://api.example.com")
        return value.rstrip("/")

    def credential(self, key: str) -> str:
        """The plain value of a credential; raises ConfigError naming the connection if missing."""
        secret = self.credentials.get(key)
        if secret is None or not secret.get_secret_value():
            raise ConfigError(
                f"connection {self.name!r} needs credential {key!r}: set credentials.{key} in the config file "
                f"or {credential_env_name(self.name, key)} in the environment"
            )
        return secret.get_secret_value()


class MailSettings(_Section):
    """SMTP server for bills and reports (S2: required before any plan association)."""

    host: str | None = None
    port: int = Field(default=587, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    from_address: str | None = None
    starttls: bool = True
    use_tls: bool = False
    timeout_seconds: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)

    @property
    def configured(self) -> bool:
        return bool(self.host and self.from_address)


class BillingSettings(_Section):
    #: 1-16 capital letters, digits, dashes (see gateway.core.directory.INVOICE_PREFIX).
    invoice_prefix: str = Field(default="INV", pattern=r"^[A-Z0-9-]{1,16}$")
    default_currency: str = Field(default="USD", min_length=3, max_length=3)
    monthly_activation_fee: Decimal = Decimal("10.00")
    monthly_price_per_device: Decimal = Decimal("2.50")
    default_due_days: int = Field(default=30, ge=0)
    #: M5: a cycle is billed only once every RMM connection of the customer has completed a pull that began
    #: this many minutes after the cycle ended (local midnight), so check-ins the RMM reports late are in.
    settling_minutes: int = Field(default=15, ge=0)


class LicensingSettings(_Section):
    #: L6: percentage off by number of licenses bought together. Configuration, not code.
    bulk_discount_tiers: dict[int, Decimal] = Field(
        default_factory=lambda: {
            10: Decimal("5"),
            25: Decimal("10"),
            50: Decimal("15"),
            100: Decimal("20"),
            250: Decimal("25"),
            500: Decimal("30"),
            1000: Decimal("35"),
        }
    )
    #: L4 decision: partner reminders this many days before expiry, each sent once.
    reminder_days: list[int] = Field(default_factory=lambda: [30, 14, 7])
    end_user_notice_days: int = 3
    expiring_soon_days: int = 30
    coupon_deadline_soon_days: int = 30
    #: Price of one seat for one year per edition code; used to price purchases and renewals.
    prices: dict[str, Decimal] = Field(default_factory=dict)
    currency: str = Field(default="USD", min_length=3, max_length=3)


class OutboxSettings(_Section):
    max_attempts: int = Field(default=8, ge=1)
    base_delay_seconds: float = Field(default=30.0, ge=0)
    max_delay_seconds: float = Field(default=3600.0, ge=0)
    claim_seconds: float = Field(default=300.0, gt=0)
    batch_size: int = Field(default=20, ge=1)
    #: One push (look-up and create, with the connector's retries) is cut off after this long and counts as a
    #: failed attempt with back-off, so a tool that accepts connections and never answers is noticed (G5).
    push_timeout_seconds: float = Field(default=60.0, gt=0)


class SchedulerSettings(_Section):
    enabled: bool = True
    outbox_interval_seconds: float = Field(default=15.0, gt=0)
    billing_interval_seconds: float = Field(default=300.0, gt=0)
    #: The licensing job (expiries, reminders) records what it did, so it runs this often and catches up after downtime.
    licensing_interval_seconds: float = Field(default=3600.0, gt=0)


class WebhookSettings(_Section):
    #: Ids of processed webhook events are kept this long (or a scheme's replay window, when longer), so one
    #: delivered twice is processed once (G4); older ones are pruned (see gateway.core.retention).
    keep_ids_days: float = Field(default=30.0, ge=1)
    prune_interval_seconds: float = Field(default=3600.0, gt=0)


class TestingSettings(_Section):
    #: Lets ``gateway --now TIME`` / ``GATEWAY_NOW`` run a command or the daemon at another time (issue 15).
    clock_override: bool = False


class Settings(BaseSettings):
    """All settings. Load with :func:`load_settings`, not by calling this directly."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        case_sensitive=False,
    )

    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    mail: MailSettings = Field(default_factory=MailSettings)
    billing: BillingSettings = Field(default_factory=BillingSettings)
    licensing: LicensingSettings = Field(default_factory=LicensingSettings)
    outbox: OutboxSettings = Field(default_factory=OutboxSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    testing: TestingSettings = Field(default_factory=TestingSettings)
    connections: list[ConnectionSettings] = Field(default_factory=list)
    #: Where the settings were read from (None: defaults and environment only). Not a setting.
    source: str | None = Field(default=None, exclude=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's content arrives as init kwargs; the environment wins over it.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _unique_connection_names(self) -> Settings:
        seen: dict[str, int] = {}
        for index, connection in enumerate(self.connections):
            if connection.name in seen:
                raise ValueError(
                    f"connections[{index}].name: {connection.name!r} is already used by "
                    f"connections[{seen[connection.name]}]; connection names must be unique"
                )
            seen[connection.name] = index
        return self

    def connection(self, name: str) -> ConnectionSettings:
        for connection in self.connections:
            if connection.name == name:
                return connection
        known = ", ".join(c.name for c in self.connections) or "none configured"
        raise ConfigError(f"no connection named {name!r} in {self.source or 'the configuration'} (known: {known})")

    def secret_values(self) -> list[str]:
        """Every secret value in the settings, for the log redaction step."""
        values: list[str] = []

        def walk(node: Any) -> None:
            if isinstance(node, SecretStr):
                if node.get_secret_value():
                    values.append(node.get_secret_value())
            elif isinstance(node, BaseModel):
                for name in type(node).model_fields:
                    walk(getattr(node, name))
            elif isinstance(node, Mapping):
                for item in node.values():
                    walk(item)
            elif isinstance(node, list | tuple):
                for item in node:
                    walk(item)

        walk(self)
        # The database password sits inside a URL string, not in a SecretStr.
        match = re.match(r"^[^:/]+://[^:/@]+:([^@]+)@", self.database.url)
        if match:
            values.append(match.group(1))
        return values


def credential_env_name(connection: str, key: str) -> str:
    """The environment variable that can hold ``key`` of ``connection``."""
    return f"{CREDENTIALS_ENV_PREFIX}{_env_part(connection)}__{_env_part(key)}"


def _env_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", text).upper()


def load_settings(path: str | os.PathLike[str] | None = None, *, environ: Mapping[str, str] | None = None) -> Settings:
    """Read settings from ``path`` (or ``$GATEWAY_CONFIG``, or none) and the environment."""
    env = os.environ if environ is None else environ
    config_path = Path(path) if path is not None else (Path(env[CONFIG_ENV]) if env.get(CONFIG_ENV) else None)
    data: dict[str, Any] = {}
    where = "the environment (no config file)"
    if config_path is not None:
        where = str(config_path)
        data = _read_toml(config_path)
    _apply_credential_env(data, env, where)
    try:
        if environ is None:
            settings = Settings(**data)
        else:
            settings = _settings_with_environ(data, env)
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc, where)) from None
    except SettingsError as exc:  # an environment variable pydantic-settings could not even parse (bad JSON)
        raise ConfigError(_describe_settings_error(exc)) from None
    settings.source = str(config_path) if config_path is not None else None
    return settings


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; copy config.example.toml there or pass --config PATH") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _apply_credential_env(data: dict[str, Any], env: Mapping[str, str], where: str) -> None:
    connections = data.get("connections")
    if not isinstance(connections, list):
        return
    wanted = {k.upper(): v for k, v in env.items() if k.upper().startswith(CREDENTIALS_ENV_PREFIX)}
    if not wanted:
        return
    for connection in connections:
        if not isinstance(connection, dict) or not isinstance(connection.get("name"), str):
            continue
        prefix = f"{CREDENTIALS_ENV_PREFIX}{_env_part(connection['name'])}__"
        for key, value in wanted.items():
            if key.startswith(prefix):
                credentials = connection.setdefault("credentials", {})
                if not isinstance(credentials, dict):
                    raise ConfigError(f"config error in {where}: connections.credentials must be a table")
                credentials[key[len(prefix) :].lower()] = value


def _settings_with_environ(data: dict[str, Any], env: Mapping[str, str]) -> Settings:
    """Build settings against an explicit environment (tests), not ``os.environ``."""
    saved = dict(os.environ)
    try:
        for key in [k for k in os.environ if k.upper().startswith(ENV_PREFIX)]:
            del os.environ[key]
        os.environ.update({k: v for k, v in env.items() if k.upper().startswith(ENV_PREFIX)})
        return Settings(**data)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _describe_settings_error(exc: SettingsError) -> str:
    """One line for a variable such as ``GATEWAY_CONNECTIONS`` that is not the JSON its setting needs."""
    found = re.search(r'field "([^"]+)"', str(exc))
    variable = f"{ENV_PREFIX}{found[1].upper()}" if found else "a GATEWAY_ environment variable"
    cause = exc.__cause__ or exc.__context__
    detail = f" ({cause})" if cause is not None else ""
    what = ("a JSON list of connection tables, e.g. [{\"name\": \"ninja\", \"plugin\": \"ninjaone\", "
            "\"base_url\": \"https://ninja.example\"}]") if found and found[1] == "connections" else "JSON"
    return f"config error in the environment: {variable} is not valid JSON{detail}; give {what}, or unset it"


def _describe_validation_error(exc: ValidationError, where: str) -> str:
    """One line per problem, naming the key; input values are left out because they may be secrets."""
    problems = []
    for error in exc.errors(include_input=False, include_url=False):
        loc = _format_loc(error.get("loc", ()))
        message = error.get("msg", "invalid value")
        if error.get("type") == "extra_forbidden":
            message = "unknown setting (check the spelling against config.example.toml)"
        elif error.get("type") == "missing":
            message = "required setting is missing"
        problems.append(f"{loc}: {message}" if loc else message)
    return f"config error in {where}: " + "; ".join(problems)


def _format_loc(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def check_timezone(name: str) -> str:
    """Validate an IANA time zone name (used for customers)."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{name!r} is not an IANA time zone name (e.g. Europe/Berlin, America/New_York)") from None
    return name

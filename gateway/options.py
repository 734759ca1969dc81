"""Reading a connection's ``options`` table: the checks every adapter applies to what the admin wrote.

RMM and PSA adapters (and the device sync) read options the same way, so an admin gets
the same message for the same mistake whichever tool the connection talks to: a
misspelt option is refused instead of ignored, and a bad value is a
:class:`~gateway.errors.ConfigError` naming the connection, the option and what it takes.
Whole numbers may be given as strings of digits, as environment variables give them.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any, overload

from gateway.errors import ConfigError


def refuse_unknown(connection: str, vendor: str, options: Mapping[str, Any], known: Collection[str]) -> None:
    """A misspelt option would otherwise be ignored silently."""
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(
            f"connection {connection!r}: unknown option(s) {', '.join(unknown)} for {vendor} "
            f"(known: {', '.join(sorted(known))})"
        )


def choice_option(connection: str, options: Mapping[str, Any], name: str, choices: Sequence[str], default: str) -> str:
    """One of ``choices``; unset: ``default``."""
    value = options.get(name, default)
    if value not in choices:
        raise ConfigError(
            f"connection {connection!r}: options.{name} must be one of {', '.join(choices)}, got {value!r}"
        )
    return value


@overload
def int_option(
    connection: str, options: Mapping[str, Any], name: str, default: int, low: int = 1, high: int | None = None
) -> int: ...
@overload
def int_option(
    connection: str, options: Mapping[str, Any], name: str, default: None, low: int = 1, high: int | None = None
) -> int | None: ...
def int_option(
    connection: str, options: Mapping[str, Any], name: str, default: int | None, low: int = 1, high: int | None = None
) -> int | None:
    """A whole number (or a string of digits, as environment variables give it) in ``low..high``; unset: ``default``."""
    value = options.get(name)
    if value is None or value == "":
        return default
    number = _whole(value)
    if number is None or number < low or (high is not None and number > high):
        expected = f"a whole number from {low} to {high}" if high is not None else f"a whole number of at least {low}"
        raise ConfigError(f"connection {connection!r}: options.{name} must be {expected}, got {value!r}")
    return number


def _whole(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"[+-]?[0-9]+", value.strip()):
        return int(value)
    return None


@overload
def text_option(connection: str, options: Mapping[str, Any], name: str, default: str, *, example: str) -> str: ...
@overload
def text_option(
    connection: str, options: Mapping[str, Any], name: str, default: None = None, *, example: str
) -> str | None: ...
def text_option(
    connection: str, options: Mapping[str, Any], name: str, default: str | None = None, *, example: str
) -> str | None:
    """A non-blank text; unset or empty: ``default``."""
    value = options.get(name)
    if value is None or value == "":
        return default
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"connection {connection!r}: options.{name} must be a non-blank text such as {example!r}, got {value!r}"
        )
    return value.strip()


def url_option(connection: str, options: Mapping[str, Any], name: str, example: str) -> str | None:
    """An http(s) URL; unset or empty: None."""
    value = text_option(connection, options, name, example=example)
    if value is not None and not value.startswith(("http://", "https://")):
        raise ConfigError(
            f"connection {connection!r}: options.{name} must be an http(s) URL such as {example!r}, got {value!r}"
        )
    return value

"""What a person may type into the gateway's records: names, notes, descriptions, search text, time zones.

Every create and update path for a name (plans, partners, customers, workspaces), a note (licenses) or a
description (adjustments, credits) passes its text through :func:`check_text`, so control characters and bidi
overrides are refused in one place with the same message, instead of being stored and then shown, printed on a
bill or exported to a spreadsheet as something other than what they look like. PostgreSQL cannot store a NUL
in a text column at all, so a NUL in a search (:func:`check_search`) is refused here too, by field.

Customer and subscription time zones pass :func:`check_zone`: a zone of the IANA database that names a place
or a fixed offset (``Europe/Berlin``, ``UTC``, ``Etc/GMT+5``), not one of the database's technical entries
(``Factory``, ``posixrules``, ``localtime``, the ``posix/`` and ``right/`` copies), which a file system may
hold and ``ZoneInfo`` would load, but which no customer lives in.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from zoneinfo import available_timezones

from gateway.errors import DomainError

#: Bidi embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069): they reorder what follows them,
#: so "invoice.exe" can be shown as something else ("Trojan Source").
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
#: C0 controls (NUL..US), DEL and the C1 controls.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: What multi-line text (notes, descriptions) may hold of the C0 range: tab and line breaks.
_LINE_BREAKS = frozenset("\t\n\r")

#: Entries of the time zone database that name no place a customer can be in.
NON_GEOGRAPHIC_ZONES = frozenset({"Factory", "posixrules", "localtime"})
_NON_GEOGRAPHIC_PREFIXES = ("posix/", "right/", "SystemV/")


def _describe(char: str) -> str:
    name = unicodedata.name(char, "") or {"\x00": "NUL"}.get(char, "control character")
    return f"U+{ord(char):04X} ({name})" if name else f"U+{ord(char):04X}"


def refused_character(value: str, *, multiline: bool = False) -> str | None:
    """The first character ``value`` may not hold, described (``U+0000 (NUL)``), or None when it is clean."""
    for char in value:
        if char in BIDI_CONTROLS or (_CONTROL.match(char) and not (multiline and char in _LINE_BREAKS)):
            return _describe(char)
    return None


def check_text(value: str, *, field: str, what: str, multiline: bool = False) -> str:
    """``value`` unchanged, or a DomainError on ``field`` naming the refused character.

    ``multiline`` (notes, descriptions) allows tab and line breaks; a name allows no control character at all.
    """
    bad = refused_character(value, multiline=multiline)
    if bad is not None:
        allowed = "tabs and line breaks are the only control characters allowed" if multiline else \
            "control characters are not allowed"
        raise DomainError(
            f"{what} contains {bad}, which cannot be stored: remove it ({allowed}; "
            "bidi override characters neither)", field=field)
    return value


def check_search(value: str, *, field: str = "q") -> str:
    """A search text: a DomainError on ``field`` when it holds a control character (PostgreSQL takes no NUL)."""
    bad = refused_character(value)
    if bad is not None:
        raise DomainError(f"the search text contains {bad}; search for printable text only", field=field)
    return value


@lru_cache(maxsize=1)
def customer_zones() -> frozenset[str]:
    """The IANA zone names a customer or subscription may be given (see the module docstring)."""
    return frozenset(name for name in available_timezones()
                     if name not in NON_GEOGRAPHIC_ZONES and not name.startswith(_NON_GEOGRAPHIC_PREFIXES))


def check_zone(name: str, *, field: str = "timezone") -> str:
    """``name`` when it is a time zone a customer can be in; else a DomainError on ``field`` with examples."""
    if not isinstance(name, str) or name not in customer_zones():
        shown = name if isinstance(name, str) and len(name) <= 64 else f"{str(name)[:64]}..."
        hint = " (a technical entry of the time zone database, not a place)" if isinstance(name, str) and (
            name in NON_GEOGRAPHIC_ZONES or name.startswith(_NON_GEOGRAPHIC_PREFIXES)) else ""
        raise DomainError(
            f"{shown!r} is not an IANA time zone name{hint}; use a region/city such as Europe/Berlin or "
            "America/New_York, or UTC", field=field)
    return name

"""Writes a new plugin package from the templates beside this module (``gateway plugin new``).

The package it writes installs with ``pip install -e`` and passes its own tests unchanged:
an adapter for a made-up REST API, the simulator of that API, and tests that include the
contract kit. The admin then replaces the made-up API with their tool's, file by file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from gateway import __version__
from gateway.errors import GatewayError

KINDS = ("psa", "rmm")
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9]*(?:-[a-z0-9]+)*$")
MAX_NAME = 40


class ScaffoldError(GatewayError):
    """The plugin cannot be written as asked; the message says what to change."""


def placeholders(name: str, kind: str) -> dict[str, str]:
    """The values the templates use, all derived from the plugin's name."""
    words = name.split("-")
    return {
        "name": name,
        "role": kind,
        "package": "gateway_" + name.replace("-", "_"),
        "dist": "gateway-" + name,
        "Class": "".join(word.capitalize() for word in words),
        "title": " ".join(word.capitalize() for word in words),
        "env_name": name.replace("-", "_").upper(),
        "gateway_version": __version__,
    }


def check(name: str, kind: str, known_kinds: set[str]) -> None:
    """Refuse names that cannot become a package, an entry point and an adapter kind."""
    if kind not in KINDS:
        raise ScaffoldError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not NAME_PATTERN.match(name) or len(name) > MAX_NAME:
        raise ScaffoldError(
            f"plugin name {name!r} must be lower-case letters and digits, words joined by '-', "
            f"starting with a letter, at most {MAX_NAME} characters (e.g. 'acme-rmm')"
        )
    if name in known_kinds:
        raise ScaffoldError(f"adapter kind {name!r} is already provided by an installed plugin; choose another name")


def scaffold(name: str, kind: str, parent: Path, *, known_kinds: Iterable[str] = ()) -> Path:
    """Write the package ``gateway-<name>`` under ``parent`` and return its folder."""
    check(name, kind, set(known_kinds))
    values = placeholders(name, kind)
    target = parent / values["dist"]
    if target.exists() and any(target.iterdir()):
        raise ScaffoldError(f"{target} already exists and is not empty; remove it or choose another --dir")
    templates = resources.files(__package__) / "templates"
    for source_root, into_package in ((templates / "common", False), (templates / kind, True)):
        for relative, text in _walk(source_root):
            parts = [part.replace("PACKAGE", values["package"]) for part in relative]
            parts[-1] = parts[-1].removesuffix(".tmpl")
            if into_package and parts[0] != "tests":
                parts = [values["package"], *parts]  # the kind's modules go into the package folder
            path = target.joinpath(*parts)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(Template(text).substitute(values), encoding="utf-8")
    return target


def _walk(root: Any, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], str]]:
    found: list[tuple[tuple[str, ...], str]] = []
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.is_dir():
            found.extend(_walk(entry, (*prefix, entry.name)))
        elif entry.name.endswith(".tmpl"):
            found.append(((*prefix, entry.name), entry.read_text(encoding="utf-8")))
    return found

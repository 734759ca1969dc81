"""What every command needs: loading settings and wiring the gateway, printing tables and JSON."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from datetime import date, datetime
from decimal import Decimal
from enum import Enum
from typing import Any

from gateway.app import Gateway, build_gateway
from gateway.core.settings import Settings, load_settings


def settings_from_args(args: argparse.Namespace) -> Settings:
    return load_settings(getattr(args, "config", None))


def gateway_from_args(args: argparse.Namespace, *, check_schema: bool = True) -> Gateway:
    """Settings from ``--config``/environment, wired into a gateway (schema checked unless told not to)."""
    return build_gateway(settings_from_args(args), check_schema=check_schema)


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def to_jsonable(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [to_jsonable(v) for v in value]
    return value


def print_json(value: Any) -> None:
    json.dump(to_jsonable(value), sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def print_table(rows: Sequence[dict[str, Any]] | Iterable[dict[str, Any]], columns: Sequence[str], *, title: str | None = None) -> None:
    """A plain aligned table; good on a terminal and in a log file alike."""
    rows = list(rows)
    if title:
        print(title)
    if not rows:
        print("  (none)")
        return
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    print("  ".join(column.upper().ljust(widths[i]) for i, column in enumerate(columns)).rstrip())
    for line in cells:
        print("  ".join(value.ljust(widths[i]) for i, value in enumerate(line)).rstrip())


def _cell(value: Any) -> str:
    value = to_jsonable(value)
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)

"""What every command needs: loading settings and wiring the gateway, printing tables and JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from enum import Enum
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.app import Gateway, build_gateway
from gateway.core.clock import Clock, OffsetClock
from gateway.core.license_keys import normalize_key
from gateway.core.models import Bill, Customer, License, Partner, ServicePlan, User, Workspace
from gateway.core.settings import Settings, load_settings
from gateway.errors import ConfigError, DomainError, NotFound


def settings_from_args(args: argparse.Namespace) -> Settings:
    return load_settings(getattr(args, "config", None))


def gateway_from_args(args: argparse.Namespace, *, check_schema: bool = True) -> Gateway:
    """Settings from ``--config``/environment, wired into a gateway (schema checked unless told not to).

    Its clock is the one :func:`moved_clock` made from ``--now``/``GATEWAY_NOW`` (the CLI sets ``args.clock``).
    """
    return build_gateway(settings_from_args(args), clock=getattr(args, "clock", None), check_schema=check_schema)


NOW_ENV = "GATEWAY_NOW"


def moved_clock(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Clock | None:
    """The clock ``--now TIME`` (or ``$GATEWAY_NOW``) asks for, or None for the real one.

    Refused (ConfigError) unless the settings have ``[testing] clock_override = true``; a time that is not
    ISO 8601 with a zone is refused naming the argument. The moved clock ticks on from that instant
    (:class:`~gateway.core.clock.OffsetClock`), and one line on stderr says the clock was moved.
    """
    env = os.environ if environ is None else environ
    given, source = getattr(args, "now", None), "--now"
    if given is None and env.get(NOW_ENV):
        given, source = env[NOW_ENV], NOW_ENV
    if given is None:
        return None
    try:
        at = datetime.fromisoformat(given.strip())
    except ValueError:
        at = None
    if at is None or at.tzinfo is None or at.utcoffset() is None:
        raise ConfigError(f"{source} {given!r} is not an ISO 8601 time with a zone; give e.g. 2027-01-15T09:00:00Z "
                          "or 2027-01-15T10:00:00+01:00")
    if not settings_from_args(args).testing.clock_override:
        raise ConfigError(f"{source} moves the clock, which only a test system may do: set [testing] "
                          "clock_override = true in the config file (or GATEWAY_TESTING__CLOCK_OVERRIDE=true), "
                          f"or leave out {source}")
    clock = OffsetClock(at)
    print(f"gateway: clock moved to {at.astimezone(UTC).isoformat()} ([testing] clock_override)", file=sys.stderr)
    return clock


# --- which partner a command acts for ------------------------------------------------------------

#: Arguments whose value names a record of exactly one partner: ``args.<name>`` -> (what it is, how to find it).
_IMPLYING_ARGS: dict[str, tuple[str, Any, Any]] = {
    "customer": ("customer", Customer.id, Customer.partner_id),
    "customer_id": ("customer", Customer.id, Customer.partner_id),
    "plan": ("plan", ServicePlan.id, ServicePlan.partner_id),
    "plan_id": ("plan", ServicePlan.id, ServicePlan.partner_id),
    "bill": ("bill", Bill.id, Bill.partner_id),
    "bill_id": ("bill", Bill.id, Bill.partner_id),
    "workspace": ("workspace", Workspace.id, Customer.partner_id),
    "workspace_id": ("workspace", Workspace.id, Customer.partner_id),
    "key": ("license", License.key, License.partner_id),
    "user_id": ("user", User.id, User.partner_id),
}

NO_PARTNER = "there is no partner yet; create one with 'gateway partners add NAME'"


def infer_partner_id(session: Session, given: int | None = None, **implied: Any) -> int:
    """The partner a command acts for, the same way in every command.

    In order: ``--partner ID`` when given; else the partner that the ids the command was given already
    imply (``customer=3`` is customer 3's partner; the names are those of :data:`_IMPLYING_ARGS`, a value
    may be a list); else the only partner in the store. Several partners and nothing that says which is
    one error, worded the same everywhere.
    """
    if given is not None:
        if session.get(Partner, given) is None:
            raise NotFound(f"no partner with id {given}; list them with 'gateway partners list'", field="partner")
        return given
    found: dict[int, str] = {}
    missing: list[str] = []
    for name, value in implied.items():
        if name not in _IMPLYING_ARGS:
            raise TypeError(f"{name!r} does not name a record of one partner")
        values = value if isinstance(value, list | tuple) else [value]
        what, column, partner_column = _IMPLYING_ARGS[name]
        for one in values:
            if one is None or isinstance(one, bool):
                continue
            if what == "license":
                try:
                    one = normalize_key(str(one))
                except DomainError:
                    missing.append(f"license {one}")
                    continue
            query = select(partner_column).where(column == one)
            if what == "workspace":
                query = query.select_from(Workspace).join(Customer, Customer.id == Workspace.customer_id)
            partner_id = session.scalar(query)
            if partner_id is None:
                missing.append(f"{what} {one}")
            else:
                found.setdefault(partner_id, f"{what} {one}")
    if len(found) > 1:
        named = ", ".join(f"{label} belongs to partner {pid}" for pid, label in sorted(found.items()))
        raise DomainError(f"these belong to different partners ({named}); one command acts for one partner",
                          field="partner")
    if found:
        return next(iter(found))
    partners = session.execute(select(Partner.id, Partner.name).order_by(Partner.id).limit(6)).all()
    if not partners:
        raise NotFound(NO_PARTNER, field="partner")
    if len(partners) == 1:
        return int(partners[0][0])  # an id that names nothing is left to the command, which says what it lacks
    if missing:
        raise NotFound(f"no {missing[0]}", field="partner")
    raise DomainError(several_partners_message(partners), field="partner")


def several_partners_message(partners: Sequence[Any]) -> str:
    """The one wording of "which partner?" (``partners``: (id, name) rows, the first few of the store)."""
    names = ", ".join(f"{pid} ({name})" for pid, name in partners[:5])
    more = ", ..." if len(partners) > 5 else ""
    return f"there are several partners ({names}{more}); say which with --partner ID"


def partner_id_from_args(session: Session, args: argparse.Namespace) -> int:
    """:func:`infer_partner_id` from a parsed command line: ``--partner`` and the id arguments it has."""
    implied = {name: getattr(args, name) for name in _IMPLYING_ARGS if getattr(args, name, None) is not None}
    return infer_partner_id(session, getattr(args, "partner", None), **implied)


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


def print_record(args: Any, row: dict[str, Any], columns: Sequence[str], message: str) -> int:
    """One record a command showed or changed: JSON with ``--json``, else the message and a one-row table.

    A ``notice`` in the record (e.g. "applies from the next cycle") goes to stderr first, in both forms.
    """
    if row.get("notice"):
        print(f"gateway: note: {row['notice']}", file=sys.stderr)
    if args.json:
        print_json(row)
    else:
        print(message)
        print_table([row], columns)
    return 0


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

"""What the PSA adapters (ConnectWise, Autotask, HaloPSA) share about bills, sans I/O.

Each PSA keeps a bill in a different object, but every adapter writes the same
marker (``gateway-bill key=… period=…/… devices=N``) into a free-text field of that
object, prices bill lines the same way, reads the PSA's numbers the same way and refuses
the same unsafe writes. Where a message names the tool, the vendor name is a parameter.
(Reading connection options is shared with the RMM adapters: :mod:`gateway.options`.)
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any
from urllib.parse import quote, unquote

from gateway.adapters import BillDocument, PsaRecord
from gateway.errors import PermanentError

MARKER_PREFIX = "gateway-bill"
REFERENCE_MAX = 50
CENT = Decimal("0.01")
UNIT_PRICE_STEP = Decimal("0.000001")


# --- the marker ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Marker:
    """What the gateway writes into a PSA object so it can recognise it later (G2) and read it back (G3).

    ``line`` numbers the objects of one bill where each line is an object of its own
    (Autotask charges); 0 means the object holds the whole bill.
    """

    key: str
    period_start: date
    period_end: date
    devices: int
    line: int = 0

    def render(self) -> str:
        text = (
            f"{MARKER_PREFIX} key={quote(self.key, safe=':-_./@')} "
            f"period={self.period_start.isoformat()}/{self.period_end.isoformat()} devices={self.devices}"
        )
        return f"{text} line={self.line}" if self.line else text


_MARKER = re.compile(
    rf"{MARKER_PREFIX} key=(?P<key>\S+) period=(?P<start>\d{{4}}-\d{{2}}-\d{{2}})/(?P<end>\d{{4}}-\d{{2}}-\d{{2}}) "
    r"devices=(?P<devices>\d+)(?: line=(?P<line>\d+))?"
)


def marker_for(bill: BillDocument, line: int = 0) -> Marker:
    return Marker(bill.key, bill.period_start, bill.period_end, bill.device_count, line)


def parse_marker(text: Any) -> Marker | None:
    """The marker in a free-text field, or None if the object was not written by the gateway."""
    if not isinstance(text, str):
        return None
    match = _MARKER.search(text)
    if match is None:
        return None
    return Marker(
        unquote(match["key"]),
        date.fromisoformat(match["start"]),
        date.fromisoformat(match["end"]),
        int(match["devices"]),
        int(match["line"] or 0),
    )


def reference_for(key: str, limit: int = REFERENCE_MAX) -> str:
    """The key itself if it fits a reference field of ``limit`` characters, else a stable digest of it."""
    if len(key) <= limit:
        return key
    return "gw-" + hashlib.sha256(key.encode()).hexdigest()[: limit - 3]


def in_period(marker: Marker, period_start: date, period_end: date) -> bool:
    return period_start <= marker.period_start and marker.period_end <= period_end


def marker_in_period(text: Any, period_start: date, period_end: date) -> Marker | None:
    """The gateway's marker in ``text`` if the cycle it names lies in the period, else None."""
    marker = parse_marker(text)
    return marker if marker is not None and in_period(marker, period_start, period_end) else None


def bill_record(
    marker: Marker, company: Any, external_id: Any, amount: Decimal, quantity: Decimal | None = None
) -> PsaRecord:
    """What a PSA holds for one bill (G3): its amount to the cent, its own quantity or else the marked device count."""
    return PsaRecord(
        key=marker.key,
        company_external_id=str(company if company is not None else ""),
        external_id=str(external_id),
        quantity=Decimal(marker.devices) if quantity is None else quantity,
        amount=amount.quantize(CENT, ROUND_HALF_UP),
    )


def matching(rows: Sequence[Mapping[str, Any]], field: str, key: str) -> list[Mapping[str, Any]]:
    """Rows whose marker in ``field`` carries ``key``, oldest (lowest id) first."""
    found = [row for row in rows if (m := parse_marker(row.get(field))) is not None and m.key == key]
    return sorted(found, key=lambda row: int(row["id"]))


# --- money -------------------------------------------------------------------------------------


def priced_lines(bill: BillDocument) -> list[tuple[str, Decimal, Decimal]]:
    """(description, quantity, unit price) per bill line, so that the PSA's quantity × price is the line amount.

    A line whose amount is not quantity × unit price to the cent (a prorated part, S7,
    whose unit price has more places than the PSA keeps) is sent as one unit at its
    amount, with the original figures in the description.
    """
    lines = []
    for line in bill.lines:
        if (line.quantity * line.unit_price).quantize(CENT, ROUND_HALF_UP) == line.amount.quantize(CENT, ROUND_HALF_UP):
            lines.append((line.description, line.quantity, line.unit_price))
        else:
            text = f"{line.description} ({line.quantity} × {line.unit_price}, prorated)"
            lines.append((text, Decimal(1), line.amount))
    if not lines and bill.total:
        lines.append((f"{bill.customer_name} {bill.period_start}–{bill.period_end}", Decimal(1), bill.total))
    return lines


def unit_price_for(bill: BillDocument) -> Decimal:
    """Total / device count at 6 places: the unit price of a quantity-only delivery."""
    if bill.device_count <= 0:
        return Decimal(0)
    return (bill.total / bill.device_count).quantize(UNIT_PRICE_STEP, ROUND_HALF_UP)


def number(value: Any, what: str, vendor: str) -> Decimal:
    """A number the PSA answered (JSON number or string; null is 0) as a Decimal."""
    try:
        result = Decimal(str(value if value is not None else 0))
    except InvalidOperation:
        result = None
    if result is None or not result.is_finite():
        raise PermanentError(f"{vendor} answered a {what} that is not a number: {value!r}")
    return result


def json_number(value: Decimal) -> float | int:
    """A Decimal for a JSON body: PSA numbers are doubles, and integral values go out as integers."""
    return int(value) if value == value.to_integral_value() else float(value)


def company_id(bill: BillDocument, vendor: str, noun: str = "company") -> int:
    """The PSA company id of a bill; all three PSAs number companies with integers."""
    try:
        return int(bill.company_external_id)
    except ValueError:
        raise PermanentError(
            f"bill {bill.number} is addressed to {noun} {bill.company_external_id!r}, which is not a {vendor} "
            f"{noun} id (an integer); fix the customer's PSA mapping"
        ) from None


# --- refusals ------------------------------------------------------------------------------------


def refuse_duplicates(
    found: Sequence[Mapping[str, Any]], bill: BillDocument, what: str, vendor: str, part: str = ""
) -> None:
    """Two objects for one bill key bill the customer twice: a person must delete one, the gateway won't guess.

    This only happens when a create was accepted but its answer lost, and the request
    re-sent. ``part`` narrows the message to a part of the bill (``"line 2 of "``).
    """
    if len(found) > 1:
        ids = ", ".join(str(row["id"]) for row in found)
        raise PermanentError(
            f"{vendor} holds {len(found)} {what} for {part}bill {bill.number} (key {bill.key}): ids {ids}; "
            f"delete all but one in {vendor}, then retry the delivery"
        )


def refuse_overwrite(marker: Marker | None, bill: BillDocument, where: str, instead: str) -> None:
    """A quantity holds one bill at a time: refuse a bill that would overwrite another bill of its own or a later cycle.

    Quantity deliveries (a ConnectWise agreement addition, an Autotask contract service)
    keep one bill key per object. A second bill of the same customer for the same cycle
    (two plan associations, or a plan and monthly billing: their keys differ by bill kind
    and source) would replace the first, and both would count as delivered; a late bill
    for an earlier cycle would roll a later one back. Both are refused, naming both keys.
    ``where`` names the PSA object, ``instead`` the delivery that can carry such bills.
    """
    if marker is None or marker.key == bill.key:
        return
    if marker.period_start <= bill.period_end and bill.period_start <= marker.period_end:
        raise PermanentError(
            f"{where} already carries bill key {marker.key} for {marker.period_start}..{marker.period_end}; "
            f"bill {bill.number} (key {bill.key}) for {bill.period_start}..{bill.period_end} is a second bill for "
            "that cycle and would overwrite it, since a quantity holds one bill per cycle. For customers with "
            f"several plans, or a plan and monthly billing, use {instead}; or enter this bill by hand"
        )
    if marker.period_start > bill.period_start:
        raise PermanentError(
            f"{where} already carries the cycle from {marker.period_start} (bill key {marker.key}); bill "
            f"{bill.number} (key {bill.key}) for {bill.period_start} is earlier and cannot be applied to a quantity "
            f"after the fact without rolling the later cycle back; deliver it with {instead} or enter it by hand"
        )

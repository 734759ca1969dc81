"""How bill documents print numbers: money with the currency's minor digits, quantities without trailing zeros.

Shared by the CSV and PDF documents and the e-mails, so every document shows a
bill's amounts alike.
"""

from __future__ import annotations

from decimal import Decimal

from gateway.core.billing.rules import minor_units


def money(amount: Decimal, currency: str) -> str:
    """An amount shown with exactly the currency's minor digits (stored values keep four)."""
    return f"{amount.quantize(Decimal(1).scaleb(-minor_units(currency))):f}"


def number(value: Decimal) -> str:
    """A quantity or unit price without trailing zeros (10.0000 -> 10, 1.4516 stays)."""
    text = f"{value.normalize():f}"
    return text

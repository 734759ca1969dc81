"""Bounded input types of the admin API, shared by every route module's query and body models.

Each type is enforced by pydantic *and* described exactly in the OpenAPI document, so a client generating
requests from the document (or a fuzzer) sends what the server accepts, and what it does not accept is a 422
naming the field, never a 500 from a database that cannot hold the value:

- :data:`Id`: ids are INTEGER columns (signed 32 bits on PostgreSQL): 1..2**31-1.
- :data:`Offset` / :data:`Count`: non-negative integers within the same range.
- :data:`Money` / :data:`SignedMoney`: decimal strings (never JSON numbers, which are binary floats in most
  clients): up to 14 digits before the point and 4 after, as the NUMERIC(18, 4) columns hold them.
- :data:`Currency`: an ISO 4217 code, three capital letters (``USD``). The pattern is the rule: the core knows the
  minor units of the codes it bills and takes any other three-letter code at two; pydantic-extra-types' Currency
  would add pycountry for a list the core does not use.
- :data:`Period`: a month, ``YYYY-MM`` with a month 01..12.
- :data:`Email`: the e-mail shape the core checks (``x@y.z``, no spaces); email-validator's full RFC 5322
  parsing (and its DNS look-ups) is not needed for an address the gateway only hands to its SMTP server.
- :data:`TimeZone`: an IANA time-zone name, checked against the zone database.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BeforeValidator, Field, WithJsonSchema

#: The largest id (and count or offset): ids are INTEGER columns, signed 32 bits on PostgreSQL.
MAX_ID = 2**31 - 1

Id = Annotated[int, Field(ge=1, le=MAX_ID)]
"""An id of a row: 1..2**31-1 (a larger one could name nothing; the database would refuse it)."""

Offset = Annotated[int, Field(ge=0, le=MAX_ID)]
"""Items to skip in a list: 0..2**31-1."""

Count = Annotated[int, Field(ge=0, le=MAX_ID, strict=True)]
"""A count or limit in a JSON body, stored in an INTEGER column: 0..2**31-1; strict, so ``true`` is not 1."""

MONEY_PATTERN = r"^\d{1,14}(\.\d{1,4})?$"
SIGNED_MONEY_PATTERN = r"^-?\d{1,14}(\.\d{1,4})?$"
MONTH_PATTERN = r"^\d{4}-(0[1-9]|1[0-2])$"
CURRENCY_PATTERN = r"^[A-Z]{3}$"
EMAIL_PATTERN = r"^[^@\s]+@[^@\s]+\.[^@\s]+$"
TIME_ZONE_PATTERN = r"^[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*$"


def _decimal_string(pattern: str, example: str) -> Any:
    compiled = re.compile(pattern)

    def parse(value: Any) -> Decimal:
        if isinstance(value, Decimal):
            return value
        if not isinstance(value, str) or not compiled.match(value):
            raise ValueError(f"write the amount as a decimal string with at most 14 digits before the point and "
                             f"4 after, e.g. \"{example}\"")
        try:
            return Decimal(value)
        except InvalidOperation:  # pragma: no cover - the pattern admits only decimals
            raise ValueError(f"not a decimal amount, e.g. \"{example}\"") from None

    return parse


Money = Annotated[
    Decimal,
    BeforeValidator(_decimal_string(MONEY_PATTERN, "12.50")),
    WithJsonSchema({"type": "string", "pattern": MONEY_PATTERN, "examples": ["12.50"],
                    "description": "a decimal amount as a string: up to 14 digits, a point and up to 4 digits"}),
]
"""A non-negative amount as a decimal string (``"12.50"``)."""

SignedMoney = Annotated[
    Decimal,
    BeforeValidator(_decimal_string(SIGNED_MONEY_PATTERN, "-5.00")),
    WithJsonSchema({"type": "string", "pattern": SIGNED_MONEY_PATTERN, "examples": ["-5.00"],
                    "description": "a decimal amount as a string, negative allowed: up to 14 digits, a point and "
                                   "up to 4 digits"}),
]
"""An amount that may be negative, as a decimal string (``"-5.00"``)."""

Currency = Annotated[str, Field(pattern=CURRENCY_PATTERN, description="ISO 4217, three capital letters, e.g. USD",
                                examples=["USD"])]

Period = Annotated[str, Field(pattern=MONTH_PATTERN, description="a month, YYYY-MM", examples=["2026-03"])]

Email = Annotated[str, Field(min_length=3, max_length=320, pattern=EMAIL_PATTERN,
                             json_schema_extra={"format": "email"}, examples=["billing@example.com"])]


def _known_zone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"{name!r} is not an IANA time zone name (e.g. Europe/Berlin, America/New_York)") from None
    return name


TimeZone = Annotated[str, Field(min_length=1, max_length=64, pattern=TIME_ZONE_PATTERN,
                                json_schema_extra={"format": "iana-time-zone"}, examples=["Europe/Berlin"]),
                     AfterValidator(_known_zone)]
"""An IANA time-zone name (``Europe/Berlin``); an unknown one is a 422 naming it."""

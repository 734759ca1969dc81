"""License keys: random, unguessable, typed by people, with a check character.

A key is 24 random symbols of Crockford's base-32 alphabet (120 bits from the
``secrets`` module) plus one check symbol, shown as five groups of five:
``7K3QD-0M9ZX-...``. The check symbol is Luhn mod 32, which catches every
single mistyped symbol and nearly every swap of two neighbours, so a typo is
answered "mistyped" instead of "not found". Reading is forgiving the way
Crockford intends: case, spaces and dashes do not matter, ``O`` reads as ``0``
and ``I``/``L`` as ``1``.
"""

from __future__ import annotations

import secrets

from gateway.errors import DomainError

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_VALUE = {ch: i for i, ch in enumerate(ALPHABET)}
_ALIASES = str.maketrans({"O": "0", "I": "1", "L": "1"})
RANDOM_SYMBOLS = 24
KEY_SYMBOLS = RANDOM_SYMBOLS + 1
GROUP = 5


def new_key() -> str:
    payload = "".join(secrets.choice(ALPHABET) for _ in range(RANDOM_SYMBOLS))
    return _format(payload + check_symbol(payload))


def check_symbol(payload: str) -> str:
    """The Luhn mod N check symbol for ``payload`` (symbols of :data:`ALPHABET`)."""
    n = len(ALPHABET)
    total, factor = 0, 2
    for ch in reversed(payload):
        addend = factor * _VALUE[ch]
        total += addend // n + addend % n
        factor = 3 - factor
    return ALPHABET[(n - total % n) % n]


def normalize_key(text: str, *, field: str = "key") -> str:
    """The canonical form of a typed key, or a DomainError saying what is wrong with it."""
    raw = "".join(text.split()).replace("-", "").upper().translate(_ALIASES)
    if not raw:
        raise DomainError("a license key is required", field=field, code="invalid_key")
    bad = sorted({ch for ch in raw if ch not in _VALUE})
    if bad:
        raise DomainError(
            f"license key contains {', '.join(repr(ch) for ch in bad)}, which no key has; "
            "keys use digits and letters except I, L, O and U",
            field=field,
            code="invalid_key",
        )
    if len(raw) != KEY_SYMBOLS:
        raise DomainError(
            f"license key has {len(raw)} symbols, a key has {KEY_SYMBOLS} (five groups of five)",
            field=field,
            code="invalid_key",
        )
    if check_symbol(raw[:-1]) != raw[-1]:
        raise DomainError(
            "license key is mistyped: its check symbol does not match; compare it with the key as issued",
            field=field,
            code="invalid_key",
        )
    return _format(raw)


def _format(raw: str) -> str:
    return "-".join(raw[i : i + GROUP] for i in range(0, len(raw), GROUP))

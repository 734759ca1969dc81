"""License keys (L1/L5): random and unguessable, with a check symbol that catches typos."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.license_keys import ALPHABET, KEY_SYMBOLS, check_symbol, new_key, normalize_key
from gateway.errors import DomainError

payloads = st.text(alphabet=ALPHABET, min_size=KEY_SYMBOLS - 1, max_size=KEY_SYMBOLS - 1)


def test_l1_keys_are_unique_random_and_validate():
    keys = {new_key() for _ in range(2000)}
    assert len(keys) == 2000
    for key in list(keys)[:50]:
        assert normalize_key(key) == key
        assert len(key) == 29 and key.count("-") == 4
    # 120 random bits: every symbol of the alphabet shows up in every random position
    for position in (0, 12, 27):
        assert {key[position] for key in keys} == set(ALPHABET)


@given(payloads, st.integers(min_value=0, max_value=KEY_SYMBOLS - 1), st.sampled_from(ALPHABET))
def test_l1_any_single_mistyped_symbol_is_rejected_as_mistyped(payload, position, replacement):
    key = payload + check_symbol(payload)
    typo = key[:position] + replacement + key[position + 1 :]
    if typo == key:
        return
    with pytest.raises(DomainError, match="mistyped") as info:
        normalize_key(typo)
    assert info.value.field == "key" and info.value.code == "invalid_key"


@given(payloads, st.integers(min_value=0, max_value=KEY_SYMBOLS - 2))
def test_l1_swapped_neighbours_are_rejected_except_the_one_blind_spot_of_luhn(payload, position):
    key = payload + check_symbol(payload)
    a, b = key[position], key[position + 1]
    if a == b or {a, b} == {"0", "Z"}:  # Luhn mod N cannot see a 0/Z swap
        return
    swapped = key[:position] + b + a + key[position + 2 :]
    with pytest.raises(DomainError, match="mistyped"):
        normalize_key(swapped)


def test_l1_keys_are_read_forgivingly():
    key = new_key()
    assert normalize_key(key.lower()) == key
    assert normalize_key(f"  {key.replace('-', ' ')} ") == key
    spelled = key.replace("0", "O").replace("1", "I")
    assert normalize_key(spelled) == key


@pytest.mark.parametrize(
    ("typed", "message"),
    [
        ("", "is required"),
        ("ABCDE-FGHJK", "has 10 symbols, a key has 25"),
        ("ABCDE-FGHJK-MNPQR-STVWX-YZ01U", "contains 'U'"),
        ("ABCDE-FGHJK-MNPQR-STVWX-YZ01*", "contains '\\*'"),
    ],
)
def test_l1_malformed_keys_say_what_is_wrong(typed, message):
    with pytest.raises(DomainError, match=message):
        normalize_key(typed)

"""Reading a connection's options the way every adapter does: whole numbers, texts, URLs, choices, typos."""

from __future__ import annotations

import pytest

from gateway.errors import ConfigError
from gateway.options import choice_option, int_option, refuse_unknown, text_option, url_option


@pytest.mark.parametrize("value, expected", [(None, 7), ("", 7), (25, 25), ("25", 25), (" 25 ", 25), (500, 500)])
def test_whole_number_options_take_integers_and_digit_strings(value, expected):
    assert int_option("conn", {"n": value}, "n", 7, 1, 500) == expected


@pytest.mark.parametrize("value", [0, 501, -3, "abc", "2.5", 2.5, True, [1], {"n": 1}])
def test_a_bad_whole_number_option_is_a_config_error_saying_what_it_takes(value):
    with pytest.raises(ConfigError, match=r"^connection 'conn': options\.n must be a whole number from 1 to 500, got "):
        int_option("conn", {"n": value}, "n", 7, 1, 500)


def test_text_and_url_options():
    assert text_option("conn", {"t": " Managed "}, "t", example="Managed") == "Managed"
    assert text_option("conn", {}, "t", "Standard", example="Standard") == "Standard"
    with pytest.raises(ConfigError, match=r"options\.t must be a non-blank text such as 'Standard', got 3"):
        text_option("conn", {"t": 3}, "t", example="Standard")
    assert url_option("conn", {"u": "https://x.example/"}, "u", "https://x.example/") == "https://x.example/"
    with pytest.raises(ConfigError, match=r"options\.u must be an http\(s\) URL such as 'https://x.example/'"):
        url_option("conn", {"u": "x.example"}, "u", "https://x.example/")


def test_choice_and_unknown_options():
    assert choice_option("conn", {}, "delivery", ("invoice", "addition"), "invoice") == "invoice"
    with pytest.raises(ConfigError, match="options.delivery must be one of invoice, addition, got 'mail'"):
        choice_option("conn", {"delivery": "mail"}, "delivery", ("invoice", "addition"), "invoice")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) colour, size for HaloPSA \(known: page_size, tenant\)"):
        refuse_unknown("conn", "HaloPSA", {"size": 1, "colour": 2, "tenant": "x"}, ("tenant", "page_size"))


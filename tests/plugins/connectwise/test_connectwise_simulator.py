"""The simulator's ``conditions`` parser behaves the way ConnectWise's does for what the adapter sends."""

from __future__ import annotations

import pytest

from gateway.plugins.connectwise.simulator import _ConditionError, compile_conditions

ROW = {
    "id": 7,
    "name": "Acme Dental",
    "cancelledFlag": False,
    "company": {"id": 12, "name": "Acme"},
    "internalNotes": "gateway-bill key=a period=2026-02-01/2026-02-28 devices=3",
    "date": "2026-03-01T00:00:00Z",
    "cancelledDate": None,
}


@pytest.mark.parametrize(
    "conditions, expected",
    [
        ('name = "Acme Dental"', True),
        ('name = "acme dental"', True),  # string comparison ignores case
        ("company/id = 12", True),
        ("company/id = 13", False),
        ("company/id = 12 and cancelledFlag = false", True),
        ("company/id = 13 or id = 7", True),
        ("(company/id = 13 or id = 8) and cancelledFlag = false", False),
        ('internalNotes like "gateway-bill%"', True),
        ('internalNotes like "%devices=3"', True),
        ('internalNotes like "gateway%" and date >= [2026-02-01T00:00:00Z]', True),
        ("date >= [2026-03-02T00:00:00Z]", False),
        ("cancelledDate = null", True),
        ('name contains "dent"', True),
        ('name not like "Acme%"', False),
        ("id != 7", False),
    ],
)
def test_conditions_match_like_connectwise(conditions, expected):
    assert compile_conditions(conditions)(ROW) is expected


@pytest.mark.parametrize("conditions", ["name = Acme", "company/id =", 'name = "a" and', "(id = 1", "id ~ 3"])
def test_malformed_conditions_are_refused(conditions):
    with pytest.raises(_ConditionError):
        compile_conditions(conditions)

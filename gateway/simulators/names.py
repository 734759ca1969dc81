"""Plausible customer names for a simulator's companies, organisations and sites, drawn from a seeded RNG."""

from __future__ import annotations

import random

_FIRST = (
    "Acme", "Alpine", "Apex", "Aurora", "Beacon", "Birch", "Blue Ridge", "Bright", "Cedar", "Civic", "Coastal",
    "Copper", "Crescent", "Delta", "Eastside", "Evergreen", "Falcon", "Granite", "Harbor", "Highland", "Iron",
    "Juniper", "Keystone", "Lakeside", "Liberty", "Maple", "Meridian", "Northwind", "Oak", "Orchard", "Pioneer",
    "Prairie", "Quarry", "Redwood", "Riverside", "Sierra", "Silver", "Summit", "Sunrise", "Tidewater", "Valley",
    "Westfield", "Willow",
)
_SECOND = (
    "Accounting", "Architects", "Auto Group", "Bakery", "Builders", "Clinic", "Consulting", "Dental", "Design",
    "Engineering", "Family Practice", "Farms", "Fitness", "Foods", "Freight", "Health", "Hotels", "Insurance",
    "Law", "Logistics", "Manufacturing", "Marine", "Media", "Motors", "Pharmacy", "Plumbing", "Properties",
    "Realty", "Schools", "Solar", "Storage", "Supply", "Tax Advisors", "Veterinary", "Wealth",
)
_SUFFIX = ("LLC", "Inc", "Ltd", "GmbH", "Group", "& Co", "Partners", "")


def company_names(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct, plausible customer names drawn from ``rng``."""
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < count:
        name = " ".join(p for p in (rng.choice(_FIRST), rng.choice(_SECOND), rng.choice(_SUFFIX)) if p)
        if name in seen:
            name = f"{name} {len(names) + 1}"
        seen.add(name)
        names.append(name)
    return names

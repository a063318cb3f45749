"""Country groups in residency rules, expanded in one place so every caller agrees.

A manifest may say ``residency: [EU]`` or ``[EU, CH]``; the planner only ever compares
ISO 3166 alpha-2 codes. The manifest layer and the scheduler both call ``expand_residency``
so that "EU" means the same 27 countries everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable

# Member states of the European Union (ISO 3166-1 alpha-2; Greece is GR, not EL).
EU_COUNTRIES: frozenset[str] = frozenset(
    {
        "AT",
        "BE",
        "BG",
        "HR",
        "CY",
        "CZ",
        "DK",
        "EE",
        "FI",
        "FR",
        "DE",
        "GR",
        "HU",
        "IE",
        "IT",
        "LV",
        "LT",
        "LU",
        "MT",
        "NL",
        "PL",
        "PT",
        "RO",
        "SK",
        "SI",
        "ES",
        "SE",
    }
)

COUNTRY_GROUPS: dict[str, frozenset[str]] = {"EU": EU_COUNTRIES}


def expand_residency(codes: Iterable[str]) -> frozenset[str]:
    """Upper-case the codes and replace each group name (``EU``) by its members.

    Raises ValueError for anything that is neither a group nor a two-letter code, so a
    typo can never widen or empty a residency rule silently.
    """
    expanded: set[str] = set()
    for raw in codes:
        code = raw.strip().upper()
        if code in COUNTRY_GROUPS:
            expanded |= COUNTRY_GROUPS[code]
        elif len(code) == 2 and code.isascii() and code.isalpha():
            expanded.add(code)
        else:
            raise ValueError(
                f"residency entry {raw!r} is neither an ISO 3166 alpha-2 country code "
                f"nor a known group ({', '.join(sorted(COUNTRY_GROUPS))})"
            )
    return frozenset(expanded)

"""Power reads the same on every surface: fixed point to a tenth, never an exponent."""

from __future__ import annotations

import pytest

from orchestrator import units


@pytest.mark.parametrize(("watts", "shown"), [
    (144.0, "144"),
    (49.6, "49.6"),
    (24.04, "24"),
    (0.0, "0"),
    (-1e-12, "0"),  # a budget less what it feeds, to the last float bit
    (2_499_700.0, "2499700"),
    (1_234_567.8, "1234567.8"),
    (1e9, "1000000000"),  # the largest budget a Site may declare
])
def test_watts_read_in_plain_fixed_point(watts: float, shown: str) -> None:
    assert units.show_watts(watts) == shown

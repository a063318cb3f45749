"""What-if scenario fuzzing: whatever the text, a scenario is read or refused with one line
(``ScenarioError``), never anything else: the same code reads ``POST /v1/simulate`` bodies
and ``simulate --scenario`` files."""

from __future__ import annotations

import json
from typing import Any

import yaml
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.simulation import scenario

from .conftest import FUZZ, TRIED, text
from .test_manifest_fuzz import YAML_PIECES, trees

KEYS = st.sampled_from(["fail", "sites", "regions", "countries", "tiers", "demand", "region", "lat", "lon", "factor", "capacity",
                        "cpu", "memoryGiB", "capacityFactor", "carbonGramsPerKWh", "add", "location", "country", "tier", "x"])
shaped = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True), text(max_size=8)),
                      lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=4)), max_leaves=20)


def check(text: str | bytes) -> None:
    try:
        scenario.load_text(text, "fuzz.yaml")
    except scenario.ScenarioError as exc:
        assert str(exc) and "\n" not in str(exc)


@FUZZ
@given(st.one_of(text(max_size=200), st.binary(max_size=200), st.lists(st.sampled_from(YAML_PIECES), max_size=40).map("".join)))
def test_random_and_near_yaml_text(text: str | bytes) -> None:
    TRIED["scenarios: random and near-YAML text"] += 1
    check(text)


@FUZZ
@given(st.one_of(trees, shaped), st.booleans())
def test_random_specs_as_yaml_and_json(spec: Any, as_json: bool) -> None:
    TRIED["scenarios: random specs"] += 1
    doc = {"kind": "Scenario", "metadata": {"name": "f"}, "spec": spec}
    check(json.dumps(doc) if as_json else yaml.safe_dump(doc))

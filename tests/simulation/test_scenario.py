"""Scenario documents: what a drill file may say, and one clear error for what it may not."""

from __future__ import annotations

import unicodedata

import pytest

from orchestrator.reconciler import inventory
from orchestrator.scheduler import model as sched
from orchestrator.simulation import scenario

FULL = """
apiVersion: edgeplane.io/v1alpha1
kind: Scenario
metadata: {name: lyon-dark}
spec:
  fail:
    sites: [edge-lyon]
    regions: [eu-south]
    countries: [fr]
    tiers: [edge]
  demand:
    - {region: eu-central, factor: 2}
    - {lat: 48.85, lon: 2.35, factor: 1.5}
    - {factor: 1.1}
  sites:
    dc-frankfurt: {carbonGramsPerKWh: 650}
    dc-paris: {capacityFactor: 0.5}
    edge-berlin: {capacity: {cpu: 2, memoryGiB: 4}}
  addSites:
    - metadata: {name: edge-lille, labels: {operator: access}}
      spec:
        tier: edge
        location: {country: FR, region: eu-west, lat: 50.63, lon: 3.06}
        capacity: {cpu: 8, memoryGiB: 32}
"""


def test_a_full_scenario_parses_into_changes() -> None:
    c = scenario.load_text(FULL, "drill.yaml")
    assert c.name == "lyon-dark"
    assert (c.fail_sites, c.fail_regions, c.fail_countries, c.fail_tiers) == (
        frozenset({"edge-lyon"}), frozenset({"eu-south"}), frozenset({"FR"}), frozenset({sched.Tier.EDGE}))
    assert c.demand == (scenario.DemandScale(2.0, "eu-central"), scenario.DemandScale(1.5, None, (48.85, 2.35)), scenario.DemandScale(1.1))
    assert c.edits["dc-frankfurt"].carbon_g_per_kwh == 650 and c.edits["dc-paris"].capacity_factor == 0.5
    assert (c.edits["edge-berlin"].cpu, c.edits["edge-berlin"].memory_gib) == (2, 4)
    (added,) = c.added
    assert (added.name, added.country, added.healthy, added.cpu, added.labels["operator"]) == ("edge-lille", "FR", True, 8, "access")
    assert "fail site edge-lyon" in c.describe() and "add site edge-lille" in c.describe()


def test_a_bare_spec_and_an_empty_document_are_accepted() -> None:
    assert scenario.load_text("fail: {sites: [a]}").fail_sites == frozenset({"a"})
    assert scenario.load_text("").empty


@pytest.mark.parametrize("text, message", [
    ("spec: {fail: {site: [a]}}", "d.yaml: spec.fail.site: Extra inputs are not permitted"),
    ("spec: {fail: {countries: [XX]}}", "spec.fail.countries"),
    ("spec: {fail: {tiers: [cloud]}}", "spec.fail.tiers.0"),
    ("spec: {demand: [{lat: 1, factor: 2}]}", "give both lat and lon"),
    ("spec: {demand: [{region: a, lat: 1, lon: 2, factor: 2}]}", "not both"),
    ("spec: {demand: [{region: a, factor: -1}]}", "spec.demand.0.factor"),
    ("spec: {sites: {a: {capacity: {cpu: 1, memoryGiB: 1}, capacityFactor: 2}}}", "not both"),
    ("spec: {sites: {a: {powerBudgetWatts: 0}}}", "spec.sites.a.powerBudgetWatts"),
    ("kind: Site", "kind"),
    # an object left empty or given another type: its fields said, never the class behind them
    ("spec:\n", "d.yaml: spec: spec is empty; give its fields (fail, demand, sites, addSites) or leave it out"),
    ("spec: {fail: 3}", "d.yaml: spec.fail: Input should be a mapping of its fields (sites, regions, countries, tiers), not a number"),
    ("spec: {sites: [a]}", "d.yaml: spec.sites: Input should be a mapping of key: value, not a list"),
    ("spec: {addSites: [{metadata: {name: x}, spec: }]}", "d.yaml: spec.addSites.0.spec: spec is empty; it needs tier and location"),
    ("[1, 2]", "a scenario is a mapping"),
    ("spec: {fail: [", "d.yaml:1: not valid YAML"),
    ("spec:\n  fail: {sites: [!!int '8{']}", "d.yaml:2: not valid YAML (cannot read '8{' as int)"),
    ("spec: {fail: {sites: [!!timestamp x]}}", "d.yaml:1: not valid YAML (cannot read 'x' as timestamp)"),
    ('spec: {"a\\nb": 1}', "d.yaml: spec.'a\\nb': Extra inputs are not permitted"),  # a key's line break, shown escaped
    # a site named twice: the first change would be lost, in YAML as in JSON
    ("spec:\n  sites:\n    dc-paris: {capacityFactor: 0.5}\n    dc-berlin: {}\n    dc-paris: {carbonGramsPerKWh: 900}\n",
     "d.yaml:5: not valid YAML (duplicate key 'dc-paris')"),
    ('{"spec": {"sites": {"dc-paris": {"capacityFactor": 0.5},\n "dc-paris": {"carbonGramsPerKWh": 900}}}}',
     "d.yaml:2: not valid YAML (duplicate key 'dc-paris')"),
    ("spec: {fail: {sites: [a]}, fail: {regions: [b]}}", "d.yaml:1: not valid YAML (duplicate key 'fail')"),
])
def test_bad_scenarios_get_one_line_naming_the_field(text: str, message: str) -> None:
    with pytest.raises(scenario.ScenarioError) as exc:
        scenario.load_text(text, "d.yaml")
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_sites_may_share_settings_through_anchors_and_merge_keys() -> None:
    changes = scenario.load_text(
        "spec:\n"
        "  sites:\n"
        "    dc-frankfurt: &base {carbonGramsPerKWh: 300, capacityFactor: 1}\n"
        "    dc-paris: &dark {<<: *base, capacityFactor: 0.5}\n"
        "    dc-lyon: {<<: *dark}\n"
        "    dc-lille: {<<: [*dark, *base], carbonGramsPerKWh: 900}\n", "d.yaml")
    edits = {name: (e.capacity_factor, e.carbon_g_per_kwh) for name, e in changes.edits.items()}
    assert edits == {"dc-frankfurt": (1, 300), "dc-paris": (0.5, 300), "dc-lyon": (0.5, 300), "dc-lille": (0.5, 900)}


def test_a_merged_mapping_that_merges_another_brings_its_own_keys_and_only_they_count_twice() -> None:
    """The mapping merged is built after the one merging it (it sits deeper): its keys are
    its own, not those it merged, and what it overrides stays overridden wherever it is merged."""
    text = ("b: &b {x: 1, capacityFactor: 1}\n"
            "a: {inner: &m {<<: *b, x: 2, capacityFactor: 0.5}}\n"
            "c: {<<: *m}\n")
    assert scenario.load_data(text, "d.yaml") == {
        "b": {"x": 1, "capacityFactor": 1}, "a": {"inner": {"x": 2, "capacityFactor": 0.5}}, "c": {"x": 2, "capacityFactor": 0.5}}
    with pytest.raises(scenario.ScenarioError, match=r"d.yaml:2: not valid YAML \(duplicate key 'x'\)"):
        scenario.load_data("b: &b {x: 1}\na: {inner: &m {<<: *b, x: 2, x: 3}}\nc: {<<: *m}\n", "d.yaml")
    with pytest.raises(scenario.ScenarioError, match=r"d.yaml:1: not valid YAML \(expected a mapping for merging, but found itself\)"):
        scenario.load_data("a: &a {x: 1, <<: *a}\n", "d.yaml")


def test_a_site_change_may_set_another_power_budget() -> None:
    changes = scenario.load_text("spec: {sites: {edge-lyon: {powerBudgetWatts: 150}}}", "d.yaml")
    assert changes.edits["edge-lyon"].power_budget_watts == 150
    assert changes.describe() == "edge-lyon power budget 150 W"
    hall = scenario.load_text("spec: {sites: {dc-paris: {powerBudgetWatts: 2500000.5}}}", "d.yaml")
    assert hall.describe() == "dc-paris power budget 2500000.5 W"
    added = scenario.load_text(
        "spec:\n  addSites:\n  - metadata: {name: edge-new}\n    spec: {tier: edge, location: {country: FR, lat: 45, lon: 4},\n"
        "      capacity: {cpu: 4, memoryGiB: 8}, energy: {carbonGramsPerKWh: 50, pue: 1.2, powerBudgetWatts: 300}}\n", "d.yaml")
    assert added.added[0].power_budget_watts == 300


def test_added_sites_default_to_the_control_planes_grid_intensity() -> None:
    assert scenario.DEFAULT_CARBON_G_PER_KWH == inventory.DEFAULT_CARBON_G_PER_KWH


def test_merge_adds_flags_to_a_file() -> None:
    a = scenario.load_text("metadata: {name: f}\nspec: {fail: {sites: [a]}, sites: {x: {carbonGramsPerKWh: 1}}}")
    b = scenario.Changes(fail_sites=frozenset({"b"}), edits={"x": scenario.SiteEdit(carbon_g_per_kwh=2)})
    m = scenario.merge(a, b)
    assert m.name == "f" and m.fail_sites == frozenset({"a", "b"}) and m.edits["x"].carbon_g_per_kwh == 2


def test_a_region_typed_decomposed_names_the_sites_region() -> None:
    """A drill file saved on a Mac may hold 'Île-de-France' decomposed (NFD); sites' regions are
    compared composed (NFC), so the scenario's are too, or it would fail a region of no site."""
    nfc = "Île-de-France"
    nfd = unicodedata.normalize("NFD", nfc)
    changes = scenario.parse({"spec": {"fail": {"regions": [nfd]}, "demand": [{"region": nfd, "factor": 2}]}})
    assert changes.fail_regions == frozenset({nfc})
    assert [d.region for d in changes.demand] == [nfc]

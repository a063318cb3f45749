"""A Site an earlier release stored with its region decomposed (NFD: typed on a Mac, or
reported by an agent before regions were composed) reads composed (NFC) once this release
has opened the store, on both backends, as a Site stored now does: the API, the CLI and the
console show one region, not two that print alike."""

from __future__ import annotations

import unicodedata

from orchestrator.store import StateStore as Store
from orchestrator.store import open_store
from orchestrator.store import values as store_values

COMPOSED = "\u00cele-de-France"
DECOMPOSED = unicodedata.normalize("NFD", COMPOSED)


def _site(region: str) -> dict[str, object]:
    return {"tier": "edge", "location": {"country": "FR", "region": region, "lat": 48.85, "lon": 2.35}}


def test_a_decomposed_region_an_earlier_release_stored_reads_composed(location: str) -> None:
    s = open_store(location)
    try:  # as an agent's join registered it before regions were composed
        s.apply([store_values.ObjectWrite("Site", "paris-1", {"joined": "by-agent"}, _site(DECOMPOSED), expected_version=0)],
                store_values.Event("agent:agt-1", "register", "Site", "paris-1", "site registered by its agent on join"))
        s.apply([store_values.ObjectWrite("Site", "tokyo-1", {}, _site("\u6771\u4eac"), expected_version=0)],
                store_values.Event("token:ops", "apply", "Site", "tokyo-1", ""))
        before = {o.name: o for o in s.list("Site")}
    finally:
        s.close()
    reopened: Store = open_store(location)
    try:
        after = {o.name: o for o in reopened.list("Site")}
        assert after["paris-1"].spec == _site(COMPOSED), after["paris-1"].spec
        assert after["tokyo-1"].spec == before["tokyo-1"].spec
        for name in ("paris-1", "tokyo-1"):  # the same Site: only the text's form changed
            assert (after[name].labels, after[name].generation, after[name].resource_version) == (
                before[name].labels, before[name].generation, before[name].resource_version)
    finally:
        reopened.close()

"""A joining agent registers the Site nobody declared; one an operator declared is theirs.

The join reads "not declared" in one transaction and registers in another, so a Site
applied between the two (on another store thread, or by another replica sharing the
database) must survive the registration: the agent's guess at tier, location and labels
never replaces an operator's declaration."""

from __future__ import annotations

import pathlib

from orchestrator import catalog
from orchestrator.agents import model as agent_model
from orchestrator.manifests import loader
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import manifests as m

DECLARED = m.doc("Site", "lyon-1", {
    "tier": "datacenter",
    "location": {"country": "FR", "region": "eu-west", "lat": 45.76, "lon": 4.84},
    "capacity": {"cpu": 64, "memoryGiB": 256},
    "ray": {"address": "local"},
}, labels={"residency": "fr-only"})

JOINED_AT = agent_model.Location("FR", "", 45.7, 4.8)


def test_an_agent_registers_the_site_nobody_declared(tmp_path: pathlib.Path) -> None:
    store = store_mod.Store(tmp_path / "state.db")
    try:
        catalog.register_agent_site(store, "lyon-1", "agt-1", JOINED_AT, {"joined": "by-agent"})
        site = store.get("Site", "lyon-1")
        assert site is not None and site.spec["tier"] == "edge" and site.labels == {"joined": "by-agent"}
        assert any(e.action == "created" and e.actor == "agent:agt-1" for e in store.events(limit=100))
    finally:
        store.close()


def test_a_site_declared_while_its_agent_joined_is_kept_as_declared(tmp_path: pathlib.Path) -> None:
    store = store_mod.Store(tmp_path / "state.db")
    try:
        # the join found no Site; the operator's apply commits before its registration does
        catalog.apply_documents(store, loader.load_text(DECLARED), actor="token:ops", reason="declare lyon-1")
        catalog.register_agent_site(store, "lyon-1", "agt-1", JOINED_AT, {"joined": "by-agent"})
        site = store.get("Site", "lyon-1")
        assert site is not None
        assert site.spec["tier"] == "datacenter" and site.spec["location"]["region"] == "eu-west", site.spec
        assert site.labels == {"residency": "fr-only"} and site.generation == 1
        by_agent = [e for e in store.events(limit=100) if e.actor == "agent:agt-1"]
        assert by_agent == [], by_agent  # neither a change nor a "cannot be scheduled": it is declared
    finally:
        store.close()

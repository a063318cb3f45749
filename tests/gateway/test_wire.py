"""The endpoint table on the wire (what standalone gateways follow) and its publisher."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import pytest

from orchestrator.api import watch
from orchestrator.distill.capture import CapturePolicy
from orchestrator.gateway import cascade_rules, endpoints, routing, wire
from orchestrator.gatewayd import follow

V2 = routing.Endpoint("intent", "intent-eu", "edge-paris", "edge", "FR", "fr", 48.85, 2.35, "http://10.0.0.1:9000",
                      healthy=True, inflight=2, allowed_countries=frozenset({"FR", "DE"}), fallback=("edge", "datacenter"))
OPENAI = routing.Endpoint("chat", "chat-eu", "dc-frankfurt", "datacenter", "DE", "de", 50.11, 8.68, "http://10.0.0.2:8000/chat",
                          healthy=False, api=routing.API_OPENAI, served_model="org/chat-small", lora=True)
ROUTE = cascade_rules.CascadeRoute(
    "intent", "intent-eu",
    (cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.TensorRule("probs", True, "margin", 0.2), 4, 12.5),
     cascade_rules.StageRoute("chatty", frozenset({"edge", "regional"}), cascade_rules.GenerativeRule(-1.5, True, ("I cannot",))),
     cascade_rules.StageRoute("large", frozenset({"datacenter"}), None, None, 300.0)),
    {"edge-paris": cascade_rules.SiteEnergy(56.0, 1.2)},
    CapturePolicy(0.1, 1000, 86400.0, ("EU",)),
)


def full_table() -> endpoints.EndpointTable:
    table = endpoints.EndpointTable()
    table.set_cascades({"intent": ROUTE, "intent-eu": ROUTE})
    table.replace([V2, OPENAI], routing.RegionIndex({"fr": (48.0, 2.0)}), {"intent": "", "lazy": "scaled to zero"}, {"lazy"})
    return table


def test_a_table_survives_the_wire_unchanged() -> None:
    assert wire.contents_from_json(wire.table_to_json(full_table())) == wire.contents_of(full_table())
    doc = json.loads(json.dumps(wire.table_to_json(full_table())))
    copy = endpoints.EndpointTable()
    wire.apply_json(copy, doc)
    assert copy.endpoints("intent") == (V2,) and copy.endpoints("chat") == (OPENAI,)
    assert copy.cascades == {"intent": ROUTE, "intent-eu": ROUTE}
    assert copy.regions == routing.RegionIndex({"fr": (48.0, 2.0)})
    assert copy.is_cold("lazy") and copy.unavailable_reason("lazy") == "scaled to zero"
    assert wire.table_to_json(copy) == doc


def test_a_multi_label_rule_survives_the_wire_and_an_earlier_releases_reads_as_one_class_per_row() -> None:
    """A gateway judging a multi-label stage's answers as one class per row would escalate all of them."""
    rule = cascade_rules.TensorRule("tags", True, "top", 0.9, independent=True)
    route = dataclasses.replace(ROUTE, stages=(dataclasses.replace(ROUTE.stages[0], rule=rule), *ROUTE.stages[1:]))
    doc = json.loads(json.dumps(wire.cascade_to_json(route)))
    assert wire.cascade_from_json(doc, ROUTE.energy).stages[0].rule == rule
    del doc["stages"][0]["rule"]["independent"]
    assert wire.cascade_from_json(doc, ROUTE.energy).stages[0].rule == dataclasses.replace(rule, independent=False)


def test_the_gateways_own_load_and_ejections_stay_local() -> None:
    table = full_table()
    before = wire.table_to_json(table)
    table.eject(V2.url)
    table.started(V2.url)
    assert wire.table_to_json(table) == before


#: What a control plane of a later release adds to each record of its documents: a field this one does not know.
LATER = {"addedLater": {"what": ["a later release's"]}}


def test_a_table_a_newer_control_plane_wrote_reads_as_this_version_wrote_it() -> None:
    """A gateway, or a replica's, follows a leader upgraded before it: a field it does not know,
    at any level, and an item more at the end of a row, are ignored, in snapshots and deltas."""
    doc = json.loads(json.dumps(wire.table_to_json(full_table())))
    doc.update(LATER)
    for e in doc["endpoints"]:
        e.update(LATER)
    for centroid in doc["regions"].values():
        centroid.append(0.0)
    for route in doc["cascades"].values():
        route.update(LATER)
        route["capture"].update(LATER)
        for stage in route["stages"]:
            stage.update(LATER)
            if stage["rule"] is not None:
                stage["rule"].update(LATER)
    for energy in doc["energy"].values():
        energy.update(LATER)
    epoch, version, contents = follow.decode_snapshot(json.dumps({"type": "snapshot", "epoch": "e1", "version": 1, "table": doc, **LATER}))
    assert (epoch, version, contents) == ("e1", 1, wire.contents_of(full_table()))
    new = dataclasses.replace(contents, endpoints=(dataclasses.replace(V2, healthy=False),))
    delta = {"type": "delta", "epoch": "e1", "version": 2, "base": 1, **wire.delta_to_json(contents, new), **LATER}
    for e in delta["upsert"]:
        e.update(LATER)
    for key in delta["remove"]:
        key.append("later")
    assert follow.decode_event(json.dumps(delta, separators=(",", ":")), ("e1", 1, contents)) == ("e1", 2, new)


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("endpoints"),
    lambda d: d["endpoints"][0].pop("url"),
    lambda d: d["endpoints"][0].update(lat="north"),
    lambda d: d["regions"].update(fr=[1]),
    lambda d: d["cascades"]["intent"]["stages"][0]["rule"].update(kind="vibes"),
    lambda d: d.update(cascades=[]),
])
def test_a_bad_document_changes_nothing(mutate: Any) -> None:
    doc = wire.table_to_json(full_table())
    mutate(doc)
    table = endpoints.EndpointTable()
    table.replace([V2])
    with pytest.raises(wire.WireError):
        wire.apply_json(table, doc)
    assert table.endpoints("intent") == (V2,) and table.endpoints("chat") == () and table.cascades == {}


async def test_the_publisher_counts_changes_only_and_wakes_its_watchers() -> None:
    table = endpoints.EndpointTable()
    publisher = watch.TablePublisher(table)
    table.on_change = publisher.publish
    assert publisher.version == 0
    first = asyncio.create_task(publisher.wait_change(0, 30))
    table.replace([])  # the first table, empty as before it: a version all the same (watchers wait for it)
    await asyncio.wait_for(first, 5)
    assert publisher.version == 1
    table.replace([])  # the same document: no new version
    assert publisher.version == 1
    waiting = asyncio.create_task(publisher.wait_change(1, 30))
    await asyncio.sleep(0)
    assert not waiting.done()
    table.replace([V2])
    await asyncio.wait_for(waiting, 5)
    assert publisher.version == 2
    line = await publisher.snapshot()
    assert await publisher.snapshot() is line  # encoded once per version
    event = json.loads(line)
    assert event["version"] == 2 and event["epoch"] == publisher.epoch and event["table"]["endpoints"][0]["site"] == "edge-paris"
    assert follow.decode_snapshot(line.decode()) == (publisher.epoch, 2, wire.contents_of(table))
    heartbeat = publisher.heartbeat().decode()
    assert "table" not in json.loads(heartbeat) and follow.decode_snapshot(heartbeat) == ("", None, None)
    table.set_cascades({"intent": ROUTE})
    assert publisher.version == 3
    closing = asyncio.create_task(publisher.wait_change(3, 30))
    publisher.close()
    await asyncio.wait_for(closing, 5)
    await publisher.wait_change(3, 30)  # closed: returns at once


def test_a_pending_model_lasts_until_a_pass_that_read_the_store_after_it() -> None:
    now = [100.0]
    table = endpoints.EndpointTable(clock=lambda: now[0])
    table.replace([V2], deployed={"intent": ""}, read_since=90.0)
    changes: list[int] = []
    table.on_change = lambda: changes.append(1)
    assert table.note_applied({"intent": "known already", "late": "being placed"}) and changes == [1]
    assert not table.note_applied({"late": "being placed"}) and changes == [1]  # nothing new: no change
    assert table.is_pending("late") and table.unavailable_reason("late") == "being placed"
    followed = wire.contents_from_json(wire.table_to_json(table))  # followers learn it, and that a retry can succeed
    assert followed.deployed == {"intent": "", "late": "being placed"} and followed.pending == {"late"}
    follower = endpoints.EndpointTable()
    wire.apply(follower, followed)
    assert follower.is_pending("late") and not follower.is_pending("intent") and follower.pending() == {"late"}
    delta = wire.delta_to_json(followed, dataclasses.replace(followed, pending=frozenset()))
    assert delta["pending"] == [] and wire.apply_delta(followed, delta).pending == frozenset()
    now[0] = 105.0  # changes went on hold since: the note says so, and is still the one made at 100
    assert table.note_applied({"late": "placed when the hold ends"}) and table.unavailable_reason("late") == "placed when the hold ends"
    table.replace([V2], deployed={"intent": ""}, read_since=99.0)  # a pass that read the store before the note: kept
    assert table.is_pending("late") and "late" in table.models()
    table.replace([V2], deployed={"intent": ""}, read_since=101.0)  # read after it: that pass saw the deployment (or its deletion)
    assert not table.is_pending("late") and table.unavailable_reason("late") is None and "late" not in table.models()
    table.note_applied({"late": "being placed"})
    table.replace([V2], deployed={"intent": "", "late": "deployment late is Pending: no site"}, read_since=99.0)
    assert not table.is_pending("late") and table.unavailable_reason("late") == "deployment late is Pending: no site"


def test_a_model_whose_replicas_start_is_retried_on_every_gateway() -> None:
    table = endpoints.EndpointTable()
    table.replace([V2], deployed={"intent": "", "slow": "deployment slow is Progressing: 1 replica(s)", "stuck": "no site"},
                  starting={"slow"})
    assert table.retry_after("slow") == 2 and table.retry_after("stuck") is None
    followed = wire.contents_from_json(json.loads(json.dumps(wire.table_to_json(table))))
    follower = endpoints.EndpointTable()
    wire.apply(follower, followed)
    assert follower.retry_after("slow") == 2 and follower.retry_after("stuck") is None
    served = dataclasses.replace(followed, starting=frozenset())  # its replica answers now
    delta = wire.delta_to_json(followed, served)
    assert delta["starting"] == [] and wire.apply_delta(followed, delta).starting == frozenset()
    assert not wire.only_load_changed(followed, served)


def _healthy(table: endpoints.EndpointTable) -> bool:
    (e,) = table.endpoints("intent")
    return e.healthy


def test_a_replica_marked_down_stays_down_until_a_pass_that_read_its_health_after_the_mark() -> None:
    """Its agent lost: a pass already under way read it healthy, and must not route to it again."""
    now = [100.0]
    table = endpoints.EndpointTable(clock=lambda: now[0])
    table.replace([V2], deployed={"intent": ""}, read_since=90.0)
    table.mark_down(V2.url + "/")
    assert not _healthy(table)
    now[0] = 101.0
    table.replace([V2], deployed={"intent": ""}, read_since=99.0)  # began reading before the mark
    assert not _healthy(table)
    table.replace([V2], deployed={"intent": ""}, health_since=99.5)  # a pass on hold, as old
    assert not _healthy(table)
    table.replace([V2], deployed={"intent": ""}, read_since=100.5)  # read after it: it says what is
    assert _healthy(table)


def test_a_replica_marked_down_on_a_follower_stays_down_until_the_leader_s_table_has_seen_it_go() -> None:
    healthy = wire.TableContents((V2,), routing.RegionIndex(), {"intent": ""}, frozenset(), {})
    down = dataclasses.replace(healthy, endpoints=(dataclasses.replace(V2, healthy=False),))
    follower = endpoints.EndpointTable()
    wire.apply(follower, healthy)
    follower.mark_down(V2.url)
    assert not _healthy(follower)
    wire.apply(follower, healthy)  # the leader's, from before it heard of the loss
    assert not _healthy(follower)
    wire.apply(follower, down)  # it heard
    wire.apply(follower, healthy)  # and saw the agent back since
    assert _healthy(follower)
    follower.mark_down(V2.url)
    follower.mark_up(V2.url)  # the agent came back here before the leader heard it go
    wire.apply(follower, healthy)
    assert _healthy(follower)


def test_a_replica_marked_down_on_a_follower_comes_back_with_a_table_the_leader_wrote_after_it_heard() -> None:
    """The agent rejoined another replica: the leader's down-then-healthy tables both came
    between two reads of the follower's, which sees it healthy only. A table read after the
    leader must have heard of the loss says what is."""
    now = [100.0]
    healthy = wire.TableContents((V2,), routing.RegionIndex(), {"intent": ""}, frozenset(), {})
    follower = endpoints.EndpointTable(clock=lambda: now[0])
    wire.apply(follower, healthy)
    follower.mark_down(V2.url)
    now[0] = 130.0
    wire.apply(follower, healthy, heard_before=99.0)  # read before the leader can have heard of the loss
    assert not _healthy(follower) and follower.marked_before(100.5)
    wire.apply(follower, healthy, heard_before=100.5)  # after
    assert _healthy(follower) and not follower.marked_before(1000.0)

"""After its first snapshot, the endpoint-table watch sends what changed: the deltas applied
in order give the publisher's table exactly; a watcher too far behind, or a delta that does
not follow the gateway's version, falls back to a snapshot."""

from __future__ import annotations

import dataclasses
import random

import orjson
import pytest

from orchestrator.api import watch
from orchestrator.gateway import endpoints, routing, wire
from orchestrator.gatewayd import follow

from .test_published_table import ROUTES


def fleet(n: int, rng: random.Random) -> list[routing.Endpoint]:
    return [routing.Endpoint(f"model-{rng.randrange(5)}", f"dep-{i % 7}", f"site-{i}", "edge", "FR", "fr", 48.0 + i * 1e-3, 2.35,
                             f"http://10.0.{i // 250}.{i % 250}:9000", auth=routing.AUTH_TOKEN if i % 3 == 0 else routing.AUTH_NONE)
            for i in range(n)]


def mutate(eps: list[routing.Endpoint], rng: random.Random, serial: list[int]) -> list[routing.Endpoint]:
    """A random change as a fleet sees them: health flips, load, versions, sites lost and added,
    an agent restarted with the other --serve-auth."""
    out = list(eps)
    for _ in range(rng.randrange(1, 6)):
        kind = rng.randrange(6)
        if kind == 5 and out:  # its agent restarted with the other --serve-auth: the same key, another auth
            i = rng.randrange(len(out))
            out[i] = dataclasses.replace(out[i], auth=routing.AUTH_NONE if out[i].auth == routing.AUTH_TOKEN else routing.AUTH_TOKEN)
        elif kind == 3 and out:  # a rollout reaches one replica
            i = rng.randrange(len(out))
            out[i] = dataclasses.replace(out[i], version=f"{rng.getrandbits(48):012x}")
        elif kind == 0 and out:
            i = rng.randrange(len(out))
            out[i] = dataclasses.replace(out[i], healthy=not out[i].healthy)
        elif kind == 1 and out:
            i = rng.randrange(len(out))
            out[i] = dataclasses.replace(out[i], inflight=rng.randrange(9))
        elif kind == 2 and out:
            del out[rng.randrange(len(out))]
        else:
            serial[0] += 1
            n = serial[0]
            out.insert(rng.randrange(len(out) + 1), routing.Endpoint(f"model-{rng.randrange(5)}", "dep-new", f"site-n{n}", "edge", "DE",
                                                                      "de", 50.0, 8.0, f"http://10.9.0.{n % 250}:9000"))
    return out


def test_deltas_applied_in_order_give_the_publishers_table_exactly() -> None:
    rng = random.Random(7)
    eps = fleet(60, rng)
    serial = [0]
    table = endpoints.EndpointTable()
    table.replace(eps)
    old = wire.contents_of(table)
    mirror = old
    for step in range(200):
        eps = mutate(eps, rng, serial)
        cold = frozenset({"model-3"}) if step % 3 == 0 else frozenset()
        table.replace(eps, routing.RegionIndex({"fr": (48.0, 2.35 + step % 2)}), {"model-3": "scaled to zero"} if cold else {}, cold)
        if step % 50 == 0:
            table.set_cascades(dict(ROUTES) if step % 100 == 0 else {})
        new = wire.contents_of(table)
        doc = orjson.loads(orjson.dumps(wire.delta_to_json(old, new)))  # as it travels
        mirror = wire.apply_delta(mirror, doc)
        assert mirror == new, step
        assert [wire.endpoint_from_json(orjson.loads(orjson.dumps(wire.endpoint_to_json(e)))) for e in eps] == eps, step  # every field travels
        old = new


def test_a_health_flip_sends_one_endpoint_not_the_table() -> None:
    eps = fleet(1000, random.Random(1))
    table = endpoints.EndpointTable()
    table.replace(eps)
    old = wire.contents_of(table)
    eps[500] = dataclasses.replace(eps[500], healthy=False)
    table.replace(eps)
    doc = wire.delta_to_json(old, wire.contents_of(table))
    assert doc == {"upsert": [wire.endpoint_to_json(eps[500])], "remove": []}
    snapshot = orjson.dumps(wire.table_to_json(table))
    assert len(orjson.dumps(doc)) * 100 < len(snapshot)


@pytest.mark.parametrize("doc", [{"upsert": "x", "remove": []}, {"upsert": [], "remove": [["a"]]}, {"upsert": [{"model": 1}], "remove": []},
                                 {"remove": []}, {"upsert": [], "remove": [], "cold": 3}])
def test_a_bad_delta_is_a_wire_error_and_changes_nothing(doc: dict[str, object]) -> None:
    table = endpoints.EndpointTable()
    table.replace(fleet(3, random.Random(2)))
    old = wire.contents_of(table)
    with pytest.raises(wire.WireError):
        wire.apply_delta(old, doc)
    assert wire.contents_of(table) == old


async def test_the_publisher_sends_deltas_to_a_watcher_close_behind_and_a_snapshot_to_one_far_behind() -> None:
    rng = random.Random(3)
    eps = fleet(20, rng)
    table = endpoints.EndpointTable()
    publisher = watch.TablePublisher(table)
    table.on_change = publisher.publish
    table.replace(eps)
    assert publisher.version == 1
    serial = [0]
    contents = {1: wire.contents_of(table)}
    for v in range(2, 6):
        eps = mutate(eps, rng, serial)
        table.replace(eps)
        assert publisher.version == v
        contents[v] = wire.contents_of(table)
    version, events = await publisher.since(1)
    lines = events.splitlines()
    assert version == 5 and [orjson.loads(line)["type"] for line in lines] == ["delta"] * 4
    state = (publisher.epoch, 1, contents[1])
    for line in lines:
        got = follow.decode_event(line.decode(), state)
        assert got is not None
        state = got
    assert state == (publisher.epoch, 5, contents[5])
    # a second watcher at the same version gets the same bytes (encoded once)
    assert (await publisher.since(1))[1] == events
    # further behind than the publisher keeps: a snapshot of the current table
    for _ in range(watch.DELTAS_KEPT + 1):
        eps = mutate(eps, rng, serial)
        table.replace(eps)
    version, events = await publisher.since(1)
    (line,) = events.splitlines()
    event = orjson.loads(line)
    assert event["type"] == "snapshot" and event["version"] == version == publisher.version
    assert wire.contents_from_json(event["table"]) == wire.contents_of(table)


def test_a_delta_that_does_not_follow_the_gateways_version_restarts_the_watch() -> None:
    table = endpoints.EndpointTable()
    table.replace(fleet(3, random.Random(4)))
    c = wire.contents_of(table)
    delta = orjson.dumps({"type": "delta", "epoch": "e1", "version": 8, "base": 7, "upsert": [], "remove": []}).decode()
    assert follow.decode_event(delta, ("e1", 7, c)) == ("e1", 8, c)
    for current in (("e1", 6, c), ("e0", 7, c), (None, None, c)):  # a version skipped, another epoch, no snapshot yet
        with pytest.raises(follow.WatchFailed, match="does not follow"):
            follow.decode_event(delta, current)

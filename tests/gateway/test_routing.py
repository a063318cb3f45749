"""Table tests of the pure endpoint ranking."""

from __future__ import annotations

import pytest

from orchestrator.gateway import routing
from orchestrator.gateway.endpoints import EndpointTable


def ep(site: str, country: str, lat: float, lon: float, *, tier: str = "edge", healthy: bool = True, inflight: int = 0,
       allowed: frozenset[str] = frozenset(), fallback: tuple[str, ...] = (), region: str = "") -> routing.Endpoint:
    return routing.Endpoint("m", "d", site, tier, country, region, lat, lon, f"http://{site}", healthy, inflight, allowed, fallback)


PARIS = ep("paris", "FR", 48.85, 2.35, region="west")
BERLIN = ep("berlin", "DE", 52.52, 13.40, region="central")
MADRID = ep("madrid", "ES", 40.42, -3.70, region="south")
ZURICH = ep("zurich", "CH", 47.37, 8.54, region="central")
EU = frozenset({"FR", "DE", "ES"})


def sites(result: list[routing.Ranked] | routing.NoRoute) -> list[str] | str:
    if isinstance(result, routing.NoRoute):
        return f"{result.status}: {result.reason}"
    return [r.endpoint.site for r in result]


@pytest.mark.parametrize(
    "endpoints, caller, expected",
    [
        ([PARIS, BERLIN, MADRID], routing.Caller(52.0, 13.0), ["berlin", "paris", "madrid"]),
        ([PARIS, BERLIN, MADRID], routing.Caller(41.0, -3.0), ["madrid", "paris", "berlin"]),
        ([PARIS, BERLIN], routing.Caller(region="south"), ["paris", "berlin"]),  # unknown region -> gateway position absent -> tie by name... distance 0
        ([PARIS, BERLIN, MADRID], routing.Caller(residency=frozenset({"DE"})), ["berlin"]),
        ([PARIS, BERLIN, MADRID], routing.Caller(40.0, -3.0, residency=frozenset({"FR", "DE"})), ["paris", "berlin"]),
        ([ep("p2", "FR", 48.85, 2.35, healthy=False), BERLIN], routing.Caller(48.85, 2.35), ["berlin"]),
        ([ep("p3", "FR", 48.85, 2.35, inflight=1000), BERLIN], routing.Caller(48.85, 2.35), ["berlin", "p3"]),
        ([ep("pa", "FR", 48.85, 2.35, allowed=EU), ep("zu", "CH", 47.37, 8.54, allowed=EU)], routing.Caller(47.37, 8.54), ["pa"]),
        ([ep("dc", "FR", 48.85, 2.35, tier="datacenter", fallback=("edge", "datacenter")),
          ep("far", "ES", 40.4, -3.7, fallback=("edge", "datacenter"))], routing.Caller(48.85, 2.35), ["far", "dc"]),
        ([ep("dc", "FR", 48.85, 2.35, tier="datacenter"), ep("far", "ES", 40.4, -3.7)], routing.Caller(48.85, 2.35), ["dc", "far"]),
    ],
)
def test_rank(endpoints: list[routing.Endpoint], caller: routing.Caller, expected: list[str]) -> None:
    regions = routing.RegionIndex.from_points([("west", 48.85, 2.35), ("central", 52.5, 13.4)])
    got = sites(routing.rank(endpoints, caller, regions=regions))
    if caller.region == "south":
        assert isinstance(got, list) and sorted(got) == sorted(expected)
    else:
        assert got == expected


@pytest.mark.parametrize(
    "endpoints, caller, fragment",
    [
        ([], routing.Caller(), "no replica of this model"),
        ([PARIS, BERLIN], routing.Caller(residency=frozenset({"PL"})), "caller's residency (PL)"),
        ([ZURICH.__class__(**{**ZURICH.__dict__, "allowed_countries": EU})], routing.Caller(), "deployment's residency"),
        ([ep("x", "FR", 1, 1, healthy=False)], routing.Caller(), "no healthy replica"),
    ],
)
def test_no_route_reasons(endpoints: list[routing.Endpoint], caller: routing.Caller, fragment: str) -> None:
    result = routing.rank(endpoints, caller)
    assert isinstance(result, routing.NoRoute) and result.status == 503 and fragment in result.reason


def test_the_503_for_a_model_with_no_healthy_replica_names_twenty_sites_and_counts_the_rest() -> None:
    """A model on every site of a large fleet, none healthy (an outage, a version loading
    everywhere): the answer stays short whatever the fleet's size."""
    down = [ep(f"edge-{i:04d}", "FR", 48.0, 2.0, healthy=False) for i in range(5000)]
    result = routing.rank(down, routing.Caller())
    assert isinstance(result, routing.NoRoute) and result.status == 503
    assert result.reason == f"no healthy replica among the allowed sites ({', '.join(f'edge-{i:04d}' for i in range(20))}, … and 4,980 more)"
    few = routing.rank(down[:3], routing.Caller())
    assert isinstance(few, routing.NoRoute) and few.reason == "no healthy replica among the allowed sites (edge-0000, edge-0001, edge-0002)"


def test_region_header_uses_site_centroid() -> None:
    regions = routing.RegionIndex.from_points([("south", 40.42, -3.70), ("central", 52.5, 13.4)])
    assert sites(routing.rank([PARIS, BERLIN, MADRID], routing.Caller(region="south"), regions=regions))[0] == "madrid"


def test_gateway_position_is_the_default_caller() -> None:
    assert sites(routing.rank([PARIS, BERLIN, MADRID], routing.Caller(), gateway_position=(52.0, 13.0)))[0] == "berlin"


def test_ejected_endpoints_are_skipped() -> None:
    assert sites(routing.rank([PARIS, BERLIN], routing.Caller(48.8, 2.3), ejected=frozenset({"http://paris"}))) == ["berlin"]


@pytest.mark.parametrize(
    "location, region, residency, ok",
    [("48.8,2.3", None, None, True), ("north", None, None, False), ("91,0", None, None, False), ("nan,1", None, None, False),
     (None, "eu-west", "EU", True), (None, None, "FR,DE", True), (None, None, "Narnia", False), (None, None, "", True),
     (None, None, "fr, de,", True), (None, None, ",", False), (None, None, " , ", False), (None, None, ",,", False),
     (None, None, "UK", False), (None, None, "XX", False), (None, None, "FR,XX", False)],
)
def test_parse_caller(location: str | None, region: str | None, residency: str | None, ok: bool) -> None:
    result = routing.parse_caller(location, region, residency)
    assert isinstance(result, routing.Caller) is ok
    if not ok:
        assert result.status == 400


def test_when_every_healthy_replica_is_ejected_they_are_tried_all_the_same() -> None:
    """Panic: an ejection is the gateway's own guess from one failure; a 503 to every caller
    would be sure to fail. Residency and the replicas' reported health still hold."""
    down = ep("lyon", "FR", 45.76, 4.84, healthy=False)
    both = frozenset({"http://paris", "http://berlin"})
    assert sites(routing.rank([PARIS, BERLIN, down], routing.Caller(48.8, 2.3), ejected=both)) == ["paris", "berlin"]
    assert sites(routing.rank([PARIS, BERLIN], routing.Caller(residency=frozenset({"DE"})), ejected=both)) == ["berlin"]
    assert sites(routing.rank([PARIS, BERLIN], routing.Caller(48.8, 2.3), ejected=frozenset({"http://paris"}))) == ["berlin"]
    assert "no healthy replica" in str(sites(routing.rank([PARIS, BERLIN], routing.Caller(), ejected=both, panic=False)))
    assert "no healthy replica" in str(sites(routing.rank([down], routing.Caller())))


def test_ejection_expires_with_the_clock() -> None:
    now = [100.0]
    table = EndpointTable(clock=lambda: now[0], ejection_s=5)
    table.replace([PARIS])
    table.eject("http://paris")
    assert table.ejected() == {"http://paris"}
    now[0] += 5.1
    assert table.ejected() == frozenset()


@pytest.mark.parametrize(("status", "retry_after_s", "ejected_s"), [
    (503, 1, 1),  # a model replaced while the request waited: the new version serves at once
    (503, 60, 5),  # never longer than an ejection
    (503, None, 5),
    (502, 1, 5),  # only a 503 says when the replica is back
])
def test_a_503_that_says_when_to_retry_ejects_for_that_long_at_most(status: int, retry_after_s: int | None, ejected_s: float) -> None:
    now = [100.0]
    table = EndpointTable(clock=lambda: now[0], ejection_s=5)
    table.replace([PARIS])
    table.answered("http://paris", status, retry_after_s)
    now[0] += ejected_s - 0.1
    assert table.ejected() == {"http://paris"}
    now[0] += 0.2
    assert table.ejected() == frozenset()


def test_a_replica_is_ejected_at_its_fifth_500_in_a_row_and_at_once_for_502_503_504() -> None:
    """A 500 is an error of one request; a run of them is a broken replica. Any other
    answer ends the run, and a replica that leaves the table leaves its count behind."""
    table = EndpointTable(ejecting_500s=5)
    table.replace([PARIS, LYON := ep("lyon", "FR", 45.76, 4.84)])
    for _ in range(4):
        table.answered("http://paris", 500)
    table.answered("http://paris", 200)  # a good answer: the run starts over
    for _ in range(4):
        table.answered("http://paris", 500)
    assert table.ejected() == frozenset()
    table.answered("http://paris", 500)
    assert table.ejected() == {"http://paris"}
    for status in (502, 503, 504):
        table = EndpointTable()
        table.replace([PARIS])
        table.answered("http://paris", status)
        assert table.ejected() == {"http://paris"}, status
    table = EndpointTable(ejecting_500s=2)
    table.replace([PARIS, LYON])
    table.answered("http://paris", 500)
    table.replace([LYON])
    table.replace([PARIS, LYON])  # back, with a clean slate
    table.answered("http://paris", 500)
    assert table.ejected() == frozenset()
    table.answered("http://paris", 404)  # the model moved away: not a failure, but the run ends
    table.answered("http://paris", 500)
    assert table.ejected() == frozenset()


def test_a_request_taken_and_not_answered_in_time_counts_like_a_500() -> None:
    """One slow request (a huge batch) must not take the replica from every caller; a replica
    that hangs on everything is ejected at the fifth in a row, 500s and timeouts alike."""
    table = EndpointTable(ejecting_500s=5)
    table.replace([PARIS])
    for _ in range(4):
        table.timed_out("http://paris")
    assert table.ejected() == frozenset()
    table.answered("http://paris", 200)  # it answers others: the run starts over
    for _ in range(2):
        table.timed_out("http://paris")
        table.answered("http://paris", 500)
    assert table.ejected() == frozenset()
    table.timed_out("http://paris")
    assert table.ejected() == {"http://paris"}


def test_local_inflight_counts_in_ranking() -> None:
    table = EndpointTable()
    table.replace([PARIS, ep("paris2", "FR", 48.85, 2.35)])
    for _ in range(3):
        table.started("http://paris")
    ranked = routing.rank(table.with_local_load("m"), routing.Caller(48.85, 2.35))
    assert sites(ranked)[0] == "paris2"
    for _ in range(3):
        table.finished("http://paris")
    assert all(e.inflight == 0 for e in table.with_local_load("m"))


def waiters(table: EndpointTable) -> dict[str, object]:
    """The callers ``table`` holds waiting for a model's endpoints, by model. Read from its
    private record: no public reader shows a waiter left behind by a caller that gave up."""
    return dict(table._waiters)


async def test_a_cold_model_is_woken_and_waited_for() -> None:
    import asyncio

    table = EndpointTable()
    woken: list[str] = []
    table.on_wake = woken.append
    table.replace([], deployed={"m": "scaled to zero"}, cold={"m"})
    assert table.is_cold("m") and not table.is_cold("other")
    table.wake("m")
    assert woken == ["m"] and table.wakes == {"m": 1}
    waiting = asyncio.create_task(table.wait_for_endpoints("m", 10))
    await asyncio.sleep(0)
    assert not waiting.done()
    table.replace([PARIS], cold={"m"})
    assert await asyncio.wait_for(waiting, 5) is True
    assert not table.is_cold("m")  # it has an endpoint now, whatever the last pass said
    table.replace([], cold={"m"})
    assert await table.wait_for_endpoints("m", 0.05) is False  # nobody came: the caller gives up
    assert waiters(table) == {}

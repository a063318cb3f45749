"""The cascade handler's outcomes, table-tested over a real ``EndpointTable`` and an
in-memory upstream: who answers, what the headers say, what is counted."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from starlette.requests import Request

from orchestrator.distill import capture as capture_mod
from orchestrator.distill import store as capture_store
from orchestrator.gateway import cascade, cascade_rules, endpoints, routing

from .transport import Transport

RULE = cascade_rules.TensorRule("p", logits=False, measure="top", below=0.8)
ROUTE = cascade_rules.CascadeRoute("m", "dep", (
    cascade_rules.StageRoute("small", frozenset({"edge"}), RULE, max_inflight=3, watts=10.0),
    cascade_rules.StageRoute("large", frozenset({"datacenter"}), None, watts=300.0),
), {"dc-fr": cascade_rules.SiteEnergy(100.0, 1.5)})
FR = routing.Caller(48.85, 2.35, residency=frozenset({"FR"}))


def ep(site: str, tier: str, country: str = "FR", **kw: Any) -> routing.Endpoint:
    return routing.Endpoint(model="m", deployment="dep", site=site, tier=tier, country=country, region="", lat=48.8, lon=2.3,
                            url=f"http://{site}", **kw)


def run(fleet: list[routing.Endpoint], behaviour: dict[str, str], caller: routing.Caller = FR, mode: str = "on", *,
        route: cascade_rules.CascadeRoute = ROUTE, headers: dict[str, bytes] | None = None, body: bytes = b"{}",
        capture: Callable[[capture_store.Record, int], bool] | None = None) -> tuple[Any, Transport, cascade.CascadeHandler]:
    table = endpoints.EndpointTable()
    table.replace(fleet)
    table.cascades = {"m": route}
    transport = Transport({f"http://{k}": v for k, v in behaviour.items()})
    handler = cascade.CascadeHandler(table, transport, cascade.CascadeMetrics.create(CollectorRegistry()),  # type: ignore[arg-type]
                                     capture=capture, sampler=capture_mod.Sampler(draw=lambda: 0.0))
    raw = [(k.encode(), v) for k, v in (headers or {}).items()]
    request = Request({"type": "http", "method": "POST", "path": "/", "headers": raw})

    async def plain() -> Any:
        raise AssertionError("not in this table")

    return asyncio.run(handler.infer(route, mode, caller, request, body, plain)), transport, handler  # type: ignore[arg-type]


EDGE, DC = ep("edge-fr", "edge"), ep("dc-fr", "datacenter")

CASES: list[tuple[str, list[routing.Endpoint], dict[str, str], int, dict[str, str], str]] = [
    # (case, fleet, behaviour, status, headers expected, reason part)
    ("sure at the edge", [EDGE, DC], {"edge-fr": "sure", "dc-fr": "sure"}, 200,
     {"x-edgeplane-site": "edge-fr", "x-edgeplane-cascade-escalation": "none", "x-edgeplane-cascade-sites": "edge-fr"}, ""),
    ("binary tensors are judged too", [EDGE, DC], {"edge-fr": "sure-binary", "dc-fr": "sure"}, 200,
     {"x-edgeplane-site": "edge-fr", "x-edgeplane-cascade-confidence": "0.9000"}, ""),
    ("unsure escalates", [EDGE, DC], {"edge-fr": "unsure", "dc-fr": "sure"}, 200,
     {"x-edgeplane-site": "dc-fr", "x-edgeplane-cascade-escalation": "escalated", "x-edgeplane-cascade-sites": "edge-fr,dc-fr"},
     "small: top probability 0.550 < 0.8"),
    ("an unreadable answer escalates", [EDGE, DC], {"edge-fr": "garbage", "dc-fr": "sure"}, 200,
     {"x-edgeplane-site": "dc-fr"}, "not a valid v2 inference response"),
    ("edge down escalates", [EDGE, DC], {"edge-fr": "down", "dc-fr": "sure"}, 200,
     {"x-edgeplane-site": "dc-fr", "x-edgeplane-cascade-escalation": "escalated", "x-edgeplane-cascade-sites": "edge-fr,dc-fr"},
     "gave no answer"),
    ("edge 5xx escalates", [EDGE, DC], {"edge-fr": "5xx", "dc-fr": "unsure"}, 200, {"x-edgeplane-site": "dc-fr"}, ""),
    ("edge not running escalates", [DC], {"dc-fr": "sure"}, 200,
     {"x-edgeplane-site": "dc-fr", "x-edgeplane-cascade-sites": "dc-fr"}, "gave no answer"),
    ("overloaded edge is skipped", [ep("edge-fr", "edge", inflight=3), DC], {"edge-fr": "sure", "dc-fr": "sure"}, 200,
     {"x-edgeplane-site": "dc-fr", "x-edgeplane-cascade-sites": "dc-fr"}, "overloaded (3 in flight at edge-fr)"),
    ("unsure but the data centre is down", [EDGE, DC], {"edge-fr": "unsure", "dc-fr": "down"}, 200,
     {"x-edgeplane-site": "edge-fr", "x-edgeplane-cascade-escalation": "not-escalated", "x-edgeplane-cascade-confidence": "0.5500"},
     "but the last stage (large) gave no answer"),
    ("unsure and no allowed data centre", [EDGE, ep("dc-de", "datacenter", "DE")], {"edge-fr": "unsure", "dc-de": "sure"}, 200,
     {"x-edgeplane-site": "edge-fr", "x-edgeplane-cascade-escalation": "not-escalated"}, "no replica in the caller's residency (FR)"),
    ("a later stage refusing keeps the answer in hand", [EDGE, DC], {"edge-fr": "unsure", "dc-fr": "4xx"}, 200,
     {"x-edgeplane-site": "edge-fr", "x-edgeplane-cascade-escalation": "not-escalated", "x-edgeplane-cascade-sites": "edge-fr,dc-fr"},
     "stage 'large' refused the request (HTTP 400)"),
    ("a caller's error is not escalated", [EDGE, DC], {"edge-fr": "4xx", "dc-fr": "sure"}, 400,
     {"x-edgeplane-site": "edge-fr", "x-edgeplane-cascade-sites": "edge-fr"}, ""),
]


@pytest.mark.parametrize(("fleet", "behaviour", "status", "headers", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_outcomes(fleet: list[routing.Endpoint], behaviour: dict[str, str], status: int, headers: dict[str, str], reason: str) -> None:
    response, _, handler = run(fleet, behaviour)
    assert response.status_code == status, response.body
    for name, value in headers.items():
        assert response.headers.get(name) == value, (name, dict(response.headers))
    assert reason in response.headers.get("x-edgeplane-cascade-reason", "")
    [row] = handler.stats.snapshot({"m": ROUTE})
    assert row["requests"] == 1 and row["failed"] == 0


def test_no_stage_answers() -> None:
    response, transport, handler = run([EDGE, DC], {"edge-fr": "down", "dc-fr": "500"})
    assert response.status_code == 502
    assert b"edge-fr: connection refused" in response.body and b"dc-fr: HTTP 500" in response.body
    assert transport.calls == ["http://edge-fr", "http://dc-fr"]
    [row] = handler.stats.snapshot({"m": ROUTE})
    assert (row["requests"], row["failed"], row["escalations"]) == (1, 1, {"down": 1})


@pytest.mark.parametrize(("dc_lyon", "status", "retry_after"), [("draining 4", 503, "4"), ("500", 502, None)],
                         ids=["every last-stage replica unavailable", "one failed"])
def test_a_last_stage_whose_every_replica_answers_503_is_503_with_the_shortest_retry_after(
        dc_lyon: str, status: int, retry_after: str | None) -> None:
    """Not ready or draining is no fault: the caller retries as they said, as on a plain route."""
    fleet = [EDGE, DC, ep("dc-lyon", "datacenter")]
    response, transport, handler = run(fleet, {"edge-fr": "draining 2", "dc-fr": "draining 9", "dc-lyon": dc_lyon})
    assert (response.status_code, response.headers.get("retry-after")) == (status, retry_after), response.body
    assert sorted(transport.calls) == ["http://dc-fr", "http://dc-lyon", "http://edge-fr"]
    [row] = handler.stats.snapshot({"m": ROUTE})
    assert (row["requests"], row["failed"]) == (1, 1)


THREE = cascade_rules.CascadeRoute("m", "dep", (
    cascade_rules.StageRoute("tiny", frozenset({"edge"}), RULE),
    cascade_rules.StageRoute("mid", frozenset({"regional"}), RULE),
    cascade_rules.StageRoute("large", frozenset({"datacenter"}), None),
))


@pytest.mark.parametrize("edge", ["unsure", "down"])
def test_a_middle_stage_the_caller_may_not_use_is_passed_over_for_the_last(edge: str) -> None:
    """The middle stage runs only in Germany, which an FR-resident caller may not use: the
    request goes on to the last stage, in France, as it would past a first stage with no replica."""
    fleet = [EDGE, ep("reg-de", "regional", "DE"), DC]
    response, transport, _ = run(fleet, {"edge-fr": edge, "reg-de": "sure", "dc-fr": "sure"}, route=THREE)
    assert response.status_code == 200, response.body
    assert transport.calls == ["http://edge-fr", "http://dc-fr"]
    assert response.headers["x-edgeplane-site"] == "dc-fr" and response.headers["x-edgeplane-cascade-escalation"] == "escalated"


def test_no_later_stage_that_can_run_names_each_one_skipped() -> None:
    response, transport, _ = run([EDGE, ep("reg-de", "regional", "DE")], {"edge-fr": "down", "reg-de": "sure"}, route=THREE)
    assert response.status_code == 503 and transport.calls == ["http://edge-fr"]
    assert b"no later stage ('mid', 'large') can run" in response.body and b"caller's residency (FR)" in response.body


@pytest.mark.parametrize(("one_request", "the_replica"), [("500", "5xx"), ("slow", "down")])
def test_a_stage_failing_one_request_escalates_without_ejecting_the_replica(one_request: str, the_replica: str) -> None:
    """A 500, or an answer later than the upstream timeout, is an error of that one request,
    as on the plain routes: the replica stays in the table for every other caller until it
    has failed five in a row; a 503 (loading, draining) or a refused connection ejects it at once."""
    response, _, handler = run([EDGE, DC], {"edge-fr": one_request, "dc-fr": "sure"})
    assert response.status_code == 200 and response.headers["x-edgeplane-site"] == "dc-fr"
    assert handler.table.ejected() == frozenset()
    response, _, handler = run([EDGE, DC], {"edge-fr": the_replica, "dc-fr": "sure"})
    assert handler.table.ejected() == {"http://edge-fr"}


def test_ejected_replicas_are_tried_anyway_only_at_the_last_stage() -> None:
    """An earlier stage whose replicas are all ejected hands over to the next; the last
    stage has nothing to hand over to, and tries them all the same."""
    table = endpoints.EndpointTable()
    table.replace([EDGE, DC])
    table.eject(EDGE.url)
    table.eject(DC.url)
    first = cascade_rules.stage_ranking(ROUTE, 0, table.all_endpoints(), FR, ejected=table.ejected())
    last = cascade_rules.stage_ranking(ROUTE, 1, table.all_endpoints(), FR, ejected=table.ejected())
    assert isinstance(first, routing.NoRoute) and "no healthy replica" in first.reason
    assert not isinstance(last, routing.NoRoute) and [r.endpoint.site for r in last] == ["dc-fr"]


def test_nothing_allowed_is_refused_without_a_call() -> None:
    response, transport, _ = run([EDGE, DC], {"edge-fr": "sure", "dc-fr": "sure"}, caller=routing.Caller(residency=frozenset({"DE"})))
    assert response.status_code == 503 and transport.calls == []
    assert b"caller's residency (DE)" in response.body


def test_energy_and_stats_add_up() -> None:
    response, _, handler = run([EDGE, DC], {"edge-fr": "unsure", "dc-fr": "sure"})
    joules = float(response.headers["x-edgeplane-cascade-energy-j"])
    [row] = handler.stats.snapshot({"m": ROUTE, "dep": ROUTE})  # listed once, under both names
    assert row["energyPerRequestJ"] == pytest.approx(joules, rel=1e-3) and joules > 0
    assert row["answered"] == {"small": 0, "large": 1} and row["escalationRate"] == 1.0 and row["meanAddedLatencyMs"] is not None


class SteppedTransport(Transport):
    """Every call takes one second of ``now``."""

    def __init__(self, behaviour: dict[str, str]):
        super().__init__(behaviour)
        self.now = 0.0

    async def request(self, method: str, url: str, body: bytes | None = None, headers: Any = None) -> Any:
        self.now += 1.0
        return await super().request(method, url, body, headers)


def test_a_request_answered_by_the_third_stage_adds_both_earlier_stages_and_escalates_once() -> None:
    route = cascade_rules.CascadeRoute("m", "dep", (
        cascade_rules.StageRoute("tiny", frozenset({"edge"}), RULE),
        cascade_rules.StageRoute("mid", frozenset({"regional"}), RULE),
        cascade_rules.StageRoute("large", frozenset({"datacenter"}), None),
    ))
    table = endpoints.EndpointTable()
    table.replace([EDGE, ep("reg-fr", "regional"), DC])
    table.cascades = {"m": route}
    transport = SteppedTransport({"http://edge-fr": "unsure", "http://reg-fr": "unsure", "http://dc-fr": "sure"})
    registry = CollectorRegistry()
    handler = cascade.CascadeHandler(table, transport, cascade.CascadeMetrics.create(registry), clock=lambda: transport.now)  # type: ignore[arg-type]

    async def plain() -> Any:
        raise AssertionError("not in this test")

    request = Request({"type": "http", "method": "POST", "path": "/", "headers": []})
    response = asyncio.run(handler.infer(route, "on", FR, request, b"{}", plain))
    assert response.headers["x-edgeplane-cascade-sites"] == "edge-fr,reg-fr,dc-fr"
    [row] = handler.stats.snapshot({"m": route})
    assert (row["meanLatencyMs"], row["meanAddedLatencyMs"]) == (3000.0, 2000.0)  # stages 1 and 2 ran before stage 3 began
    assert (row["escalationRate"], row["escalations"]) == (1.0, {"unsure": 2})  # one request, escalated at two stages
    assert registry.get_sample_value("edgeplane_cascade_added_seconds_sum", {"cascade": "dep"}) == 2.0


@pytest.mark.parametrize(("mode", "site"), [("force-last", "dc-fr"), ("force-first", "edge-fr")])
def test_forced_stage(mode: str, site: str) -> None:
    response, transport, _ = run([EDGE, DC], {"edge-fr": "unsure", "dc-fr": "unsure"}, mode=mode)
    assert response.headers["x-edgeplane-site"] == site and transport.calls == [f"http://{site}"]
    assert response.headers["x-edgeplane-cascade-confidence"] == "0.5500"


def test_force_first_never_escalates() -> None:
    response, transport, _ = run([EDGE, DC], {"edge-fr": "down", "dc-fr": "sure"}, mode="force-first")
    assert response.status_code == 503 and transport.calls == ["http://edge-fr"]
    assert b"force-first" in response.body and b"connection refused" in response.body


CAPTURE = capture_mod.CapturePolicy(1.0, 1000, 86400.0, ("EU",))


@pytest.mark.parametrize(("behaviour", "mode", "kept_as"), [
    ({"edge-fr": "sure", "dc-fr": "sure"}, "on", [("small", 0.9)]),  # the student's confident answer
    ({"edge-fr": "unsure", "dc-fr": "sure"}, "on", [("large", 0.55)]),  # the teacher's, for a hard case
    ({"edge-fr": "unsure", "dc-fr": "down"}, "on", []),  # returned not-escalated: the student's unsure answer
    ({"edge-fr": "unsure", "dc-fr": "4xx"}, "on", []),
    ({"edge-fr": "unsure", "dc-fr": "sure"}, "force-first", []),  # what cascade tune replays: never judged
    ({"edge-fr": "sure", "dc-fr": "sure"}, "force-first", []),
    ({"edge-fr": "sure", "dc-fr": "sure"}, "force-last", []),
], ids=["sure", "escalated", "teacher down", "teacher refuses", "force-first unsure", "force-first sure", "force-last"])
def test_only_answers_fit_to_teach_are_captured(behaviour: dict[str, str], mode: str, kept_as: list[tuple[str, float]]) -> None:
    kept: list[capture_store.Record] = []
    response, _, _ = run([EDGE, DC], behaviour, routing.Caller(), mode, route=dataclasses.replace(ROUTE, capture=CAPTURE),
                         capture=lambda r, cap: kept.append(r) is None)
    assert response.status_code == 200, response.body
    assert [(r.stage, r.first_confidence) for r in kept] == [(stage, pytest.approx(c)) for stage, c in kept_as]


@pytest.mark.parametrize("length", [b"\xb2", b"\xb9\xb2", b"-1", b"12x"])  # latin-1: "²", "¹²"
def test_a_binary_length_that_is_no_number_is_captured_without_one(length: bytes) -> None:
    """The header goes on to the stages, whose replicas judge it; the capture only keeps
    no length for it (``str.isdigit`` is true of "²", which ``int`` refuses)."""
    kept: list[capture_store.Record] = []
    route = dataclasses.replace(ROUTE, capture=CAPTURE)
    response, _, _ = run([EDGE, DC], {"edge-fr": "sure", "dc-fr": "sure"}, routing.Caller(), route=route,
                         capture=lambda r, cap: kept.append(r) is None,
                         headers={"inference-header-content-length": length})
    assert response.status_code == 200, response.body
    [record] = kept
    assert record.input_binary is None and record.output_binary is None


def test_a_compressed_request_reaches_every_stage_with_its_encoding_and_is_captured_inflated() -> None:
    """The stages' replicas inflate the body, as on the plain routes; a record keeps the
    request a distillation job can read."""
    kept: list[capture_store.Record] = []
    request = b'{"inputs": []}'
    response, transport, _ = run([EDGE, DC], {"edge-fr": "unsure", "dc-fr": "sure"}, routing.Caller(),
                                 route=dataclasses.replace(ROUTE, capture=CAPTURE), capture=lambda r, cap: kept.append(r) is None,
                                 headers={"content-type": b"application/json", "content-encoding": b"gzip"}, body=gzip.compress(request))
    assert response.status_code == 200 and transport.calls == ["http://edge-fr", "http://dc-fr"]
    assert [h.get("content-encoding") for h in transport.headers] == ["gzip", "gzip"]
    [record] = kept
    assert record.input == request


def test_a_compressed_request_that_cannot_be_inflated_is_refused_before_any_stage_when_captured() -> None:
    response, transport, _ = run([EDGE, DC], {"edge-fr": "sure", "dc-fr": "sure"}, routing.Caller(),
                                 route=dataclasses.replace(ROUTE, capture=CAPTURE), capture=lambda r, cap: True,
                                 headers={"content-encoding": b"gzip"}, body=b"not gzip")
    assert response.status_code == 400 and b"body is not valid gzip" in response.body and transport.calls == []
    response, transport, _ = run([EDGE, DC], {"edge-fr": "sure", "dc-fr": "sure"}, routing.Caller(),
                                 route=dataclasses.replace(ROUTE, capture=CAPTURE), capture=lambda r, cap: True,
                                 headers={"content-encoding": b"br"}, body=b"{}")
    assert response.status_code == 415 and response.headers["accept-encoding"] == "gzip, deflate" and transport.calls == []

"""What one caller request counts in ``edgeplane_gateway_failovers_total`` as it is tried
at replica after replica (:class:`orchestrator.gateway.failover.Failovers`, which the v2
and OpenAI routes, both cascades and the relay share), table-tested on a real counter."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter

from orchestrator.gateway import failover


def counted(counter: Counter) -> dict[str, float]:
    return {s.labels["site"]: s.value for m in counter.collect() for s in m.samples
            if s.name.endswith("_total") and s.value}


@pytest.mark.parametrize(("steps", "moved_on_from"), [
    pytest.param(["a", "ok"], {}, id="the first replica answers"),
    pytest.param(["a"], {}, id="the only replica fails: moved on from nothing"),
    pytest.param(["a", "b", "ok"], {"a": 1}, id="the next replica answers"),
    pytest.param(["a", "b", "c", "ok"], {"a": 1, "b": 1}, id="the third answers"),
    pytest.param(["a", "b", "c"], {"a": 1, "b": 1}, id="every replica fails: the last counts none"),
    pytest.param(["a", "ok", "b", "ok"], {}, id="a later stage after an answer (escalated): no failover"),
    pytest.param(["a", "ok", "b", "c", "ok"], {"b": 1}, id="escalated, then the later stage's first replica fails"),
    pytest.param(["a", "a", "ok"], {"a": 1}, id="the same site again"),
])
def test_a_request_counts_each_replica_it_moved_on_from(steps: list[str], moved_on_from: dict[str, int]) -> None:
    counter = Counter("edgeplane_gateway_failovers", "", ["model", "site"], registry=CollectorRegistry())
    moves = _replayed(failover.Failovers(counter, "intent"), steps)
    assert counted(counter) == moved_on_from
    assert moves.header() == ({"x-edgeplane-failover": ",".join(moves.moved_from)} if moved_on_from else {})
    assert {s.labels["model"] for m in counter.collect() for s in m.samples} <= {"intent"}



@pytest.mark.parametrize(("steps", "header"), [
    pytest.param(["a"], {}, id="the first replica answers"),
    pytest.param(["a", "b", "c"], {"x-edgeplane-failover": "a,b"}, id="the third answers: both moved on from, in order"),
    pytest.param(["a", "ok", "b"], {}, id="escalated to a later stage: no failover"),
    pytest.param(["a", "b", "ok", "c"], {"x-edgeplane-failover": "a"}, id="a failover at the first stage stays named"),
])
def test_an_answer_names_the_sites_its_request_moved_on_from(steps: list[str], header: dict[str, str]) -> None:
    moves = _replayed(failover.Failovers(None, "intent"), steps)
    assert moves.header() == header


def _replayed(moves: failover.Failovers, steps: list[str]) -> failover.Failovers:
    """``moves`` after a request's ``steps``: a site tried, or "ok" for an answer (a stage ended)."""
    for step in steps:
        if step == "ok":
            moves.answered()
        else:
            moves.attempt(step)
    return moves

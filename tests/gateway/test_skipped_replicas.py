"""An answer from a replica farther from the caller than others it could have used says why
those were passed over untried: ``X-Edgeplane-Skipped: site=reason,...``, nearest first, on
the v2 and OpenAI routes and the cascades on both, in the access line as ``skipped`` and in
``edgeplane_gateway_skipped_total`` by the nearest one's reason. Without it an operator
reading ``X-Edgeplane-Site: site-1`` for a caller next to ``site-0`` could not tell whether
site-0 was down, ejected, outside the caller's residency or busy. The reasons are table-tested
on the ranking's arrays; the routes over real HTTP, with loopback replicas answering as
agents do."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator, Collection

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from edge_agent import httpmessages
from edgeplane_proto import logformat
from orchestrator.gateway import cascade, cascade_rules, correlation, endpoints, failover, openai_routes, proxy, replica_index, routing, skips
from orchestrator.gateway.upstream import UpstreamPool
from orchestrator.scheduler import geo
from orchestrator.testing import loopback
from tests.gateway import openai_cascades
from tests.gateway.test_failover_explained import CHAT, INFER, access_lines

PARIS = (48.85, 2.35)
AT_PARIS = {"X-Edgeplane-Location": "48.85,2.35"}


def fleet(n: int = 5, **changes: dict[int, object]) -> list[routing.Endpoint]:
    """Model m on ``n`` sites, site-i ever further east of Paris; ``changes``: a field's value by site number."""
    out = []
    for i in range(n):
        fields = {"healthy": True, "country": "FR", "tier": "edge", "inflight": 0, "version": "", "allowed_countries": frozenset(),
                  "fallback": (), "auth": "none"}
        fields.update({name: values[i] for name, values in changes.items() if i in values})
        out.append(routing.Endpoint("m", "m", f"site-{i}", fields.pop("tier"), fields.pop("country"), "west", PARIS[0], PARIS[1] + i,
                                    f"http://10.0.0.{i}", **fields))
    return out


@pytest.mark.parametrize(("replicas", "caller", "answered", "options", "expected"), [
    pytest.param(fleet(), routing.Caller(), "site-0", {}, None, id="the nearest answered: nothing"),
    pytest.param(fleet(healthy={0: False}), routing.Caller(), "site-1", {}, (("site-0", "unhealthy"),), id="down"),
    pytest.param(fleet(), routing.Caller(), "site-1", {"ejected": {"http://10.0.0.0"}}, (("site-0", "ejected"),), id="ejected"),
    pytest.param(fleet(healthy={1: False}), routing.Caller(), "site-2", {"ejected": {"http://10.0.0.0"}},
                 (("site-0", "ejected"), ("site-1", "unhealthy")), id="two passed over, nearest first"),
    pytest.param(fleet(country={0: "DE", 1: "BE"}), routing.Caller(residency=frozenset({"FR"})), "site-2", {},
                 (("site-0", "residency"), ("site-1", "residency")), id="outside the caller's residency, nearest first"),
    pytest.param(fleet(allowed_countries={0: frozenset({"DE"})}), routing.Caller(), "site-1", {}, (("site-0", "deployment-residency"),),
                 id="outside its deployment's residency"),
    pytest.param(fleet(country={0: "DE"}, healthy={0: False}), routing.Caller(residency=frozenset({"FR"})), "site-1", {},
                 (("site-0", "residency"),), id="the first rule that holds"),
    pytest.param(fleet(auth={0: "token"}), routing.Caller(anonymous=True), "site-1", {}, (("site-0", "auth"),),
                 id="checks tokens, and the request has none to pass on"),
    pytest.param(fleet(auth={0: "token"}, healthy={0: False}), routing.Caller(anonymous=True), "site-1", {}, (("site-0", "auth"),),
                 id="checks tokens: before its health"),
    pytest.param(fleet(auth={0: "token"}, healthy={0: False}), routing.Caller(), "site-1", {}, (("site-0", "unhealthy"),),
                 id="checks tokens, and the request has one: not for that"),
    pytest.param(fleet(version={0: "old", 1: "new", 2: "new"}), routing.Caller(), "site-1", {"version": "new"},
                 (("site-0", "version"),), id="another version"),
    pytest.param(fleet(version={1: "new"}), routing.Caller(), "site-1", {"version": "new"}, (("site-0", "version"),),
                 id="a version not known, where one holds it"),
    pytest.param(fleet(tier={0: "datacenter"}, fallback={i: ("edge", "datacenter") for i in range(5)}), routing.Caller(), "site-1", {},
                 (("site-0", "fallback"),), id="a later fallback tier"),
    pytest.param(fleet(inflight={0: 40}), routing.Caller(), "site-1", {}, (("site-0", "load"),), id="busier"),
    pytest.param(fleet(healthy={0: False}), routing.Caller(), "site-2", {"tried": ["site-1"]}, (("site-0", "unhealthy"),),
                 id="a site tried is a failover, not a skip"),
    pytest.param(fleet(healthy={0: False}), routing.Caller(), "site-1", {"where": None}, None, id="no position: no nearest"),
    pytest.param(fleet(), routing.Caller(), "site-2", {"ejected": {f"http://10.0.0.{i}" for i in range(5)}}, (("site-0", "load"), ("site-1", "load")),
                 id="every replica ejected: all tried all the same, so not for that"),
])
def test_why_each_nearer_replica_was_passed_over(replicas: list[routing.Endpoint], caller: routing.Caller, answered: str,
                                                 options: dict, expected: tuple | None) -> None:
    index = replica_index.ReplicaIndex.build(replicas)
    where = options.pop("where", PARIS)
    found = index.skipped(caller, where, answered, options.pop("tried", ()), api="v2", **options)
    assert (found.listed if found is not None else None) == expected
    assert found is None or found.more == 0


def test_a_long_list_names_the_nearest_and_counts_the_rest() -> None:
    index = replica_index.ReplicaIndex.build(fleet(30, healthy={i: False for i in range(29)}))
    found = index.skipped(routing.Caller(), PARIS, "site-29", (), api="v2")
    assert found is not None and [s for s, _ in found.listed] == [f"site-{i}" for i in range(skips.LISTED)]
    assert skips.header(found)["x-edgeplane-skipped"].endswith(f"site-7=unhealthy,+{29 - skips.LISTED}")


def test_the_nearest_sites_are_listed_from_a_large_fleet_each_once() -> None:
    # 600 replicas, two a site (two deployments) at random places, one in three down: what the
    # index lists is the brute force's: every nearer replica sorted, each site's nearest only
    rng = random.Random(7)
    places = [(rng.uniform(40, 52), rng.uniform(-5, 10)) for _ in range(300)]
    replicas = [routing.Endpoint("m", f"d{j}", f"site-{i:03d}", "edge", "FR", "west", *places[i], f"http://10.0.{j}.{i}",
                                 healthy=rng.random() > 0.3) for i in range(300) for j in range(2)]
    answered = "site-150"
    away = {e.site: geo.rtt_ms(*PARIS, e.lat, e.lon) for e in replicas}
    nearer = sorted((away[s], s) for s in away if away[s] < away[answered])
    found = replica_index.ReplicaIndex.build(replicas).skipped(routing.Caller(), PARIS, answered, (), api="v2")
    assert found is not None
    assert [s for s, _ in found.listed] == [s for _, s in nearer[: skips.LISTED]]
    assert found.more == len(nearer) - skips.LISTED
    down = {e.site for e in replicas if e.deployment == "d0" and not e.healthy}  # each site's first listed is d0's
    assert all((reason == "unhealthy") == (site in down) for site, reason in found.listed)


def test_a_steady_caller_s_skips_are_kept_and_follow_health_and_ejections_at_once() -> None:
    # a caller with residency FR whose nearest site is in DE asks the same on every request:
    # worked out once, and said anew as soon as a replica is ejected, readmitted, down or up
    now = [0.0]
    table = endpoints.EndpointTable(clock=lambda: now[0], ejection_s=15)
    table.replace(fleet(3, country={0: "DE"}))
    berlin = routing.Caller(residency=frozenset({"FR"}))

    def said() -> str | None:
        return skips.header(table.skipped("m", berlin, PARIS, "site-2", ())).get(skips.SKIPPED)

    first = table.skipped("m", berlin, PARIS, "site-2", ())
    assert table.skipped("m", berlin, PARIS, "site-2", ()) is first
    assert said() == "site-0=residency,site-1=load"
    table.eject("http://10.0.0.1")
    assert said() == "site-0=residency,site-1=ejected"
    now[0] = 16.0  # the ejection is over
    assert said() == "site-0=residency,site-1=load"
    table.mark_down("http://10.0.0.1")  # its agent is stopping
    assert said() == "site-0=residency,site-1=unhealthy"
    now[0] = 17.0
    table.mark_up("http://10.0.0.1")
    table.replace(fleet(3, country={0: "DE"}), health_since=now[0])
    assert said() == "site-0=residency,site-1=load"
    table.replace(fleet(3, country={0: "DE"}, healthy={1: False}))  # the control plane's next table says it is down
    assert said() == "site-0=residency,site-1=unhealthy"
    assert skips.header(table.skipped("m", routing.Caller(), PARIS, "site-2", ()))[skips.SKIPPED] == "site-0=load,site-1=unhealthy"


def test_the_skips_an_index_keeps_are_bounded() -> None:
    index = replica_index.ReplicaIndex.build(fleet(healthy={0: False}))
    for i in range(replica_index.CACHED_SKIPS + 50):  # callers that give coordinates of their own
        assert index.skipped(routing.Caller(), (48.0 + i * 1e-4, 2.35), "site-1", (), api="v2") is not None
    assert len(index._skips) == replica_index.CACHED_SKIPS


def test_a_site_name_is_written_as_header_text() -> None:
    assert skips.header(skips.Skips((("lyon 1,=é", "unhealthy"),))) == {"x-edgeplane-skipped": "lyon_1___=unhealthy"}
    assert skips.header(None) == {}


def test_an_answer_s_skips_are_worked_out_and_counted_once_however_often_its_headers_are_asked() -> None:
    # a streamed cascade's last stage asks at the relay and at the stage's own headers
    registry, asked = CollectorRegistry(), []
    moves = failover.Failovers(None, "m", proxy.GatewayMetrics.create(registry).skipped)

    def explain(site: str, tried: Collection[str]) -> skips.Skips:
        asked.append((site, list(tried)))
        return skips.Skips((("site-0", skips.UNHEALTHY),))

    moves.explain_by(explain)
    moves.attempt("site-1")
    moves.attempt("site-2")
    assert moves.header() == moves.header() == {"x-edgeplane-failover": "site-1", "x-edgeplane-skipped": "site-0=unhealthy"}
    assert asked == [("site-2", ["site-1"])] and counted(registry) == {("m", "unhealthy"): 1}
    moves.explain_by(explain)  # the stage's own headers, asked after the relay's
    assert moves.header()["x-edgeplane-skipped"] == "site-0=unhealthy"
    assert counted(registry) == {("m", "unhealthy"): 1}


@contextlib.asynccontextmanager
async def gateway_over(table: endpoints.EndpointTable, registry: CollectorRegistry) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway's routes over ``table``, cascades included, its access log on, over real HTTP."""
    pool = UpstreamPool()
    gw = proxy.Gateway(table, pool, proxy.GatewayMetrics.create(registry),
                       cascade=cascade.CascadeHandler(table, pool, cascade.CascadeMetrics.create(registry)))
    app = Starlette(routes=gw.routes() + openai_routes.OpenAIGateway(gw, registry=registry).routes())
    log = logformat.access_log(True, table.knows)
    try:
        async with loopback.serving(correlation.Correlated(app, log)) as port, \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            yield http
    finally:
        await pool.close()


async def replying(request: httpmessages.Request) -> httpmessages.Response:
    """An agent's answer: a confident v2 one (a cascade's first stage keeps it), or a chat's."""
    if request.path.startswith("/v1/"):
        return openai_cascades.chat_reply(request, "ok")
    name = request.path.split("/")[3]
    return httpmessages.Response(200, json.dumps({"model_name": name, "outputs": [
        {"name": "p", "datatype": "FP32", "shape": [1, 2], "data": [0.9, 0.1]}]}).encode())


async def failing(request: httpmessages.Request) -> httpmessages.Response:
    return httpmessages.Response(500, b'{"error": "boom"}')


def counted(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    return {(s.labels["model"], s.labels["reason"]): s.value for m in registry.collect() if m.name == "edgeplane_gateway_skipped"
            for s in m.samples if s.name.endswith("_total")}


def table_of(urls: list[str]) -> endpoints.EndpointTable:
    """Models m (v2), llm (OpenAI) and c (a v2 cascade: its edge stage, then a datacenter one)
    with a replica at each of ``urls``, site-i ever further east of Paris."""
    table = endpoints.EndpointTable()
    table.replace([routing.Endpoint(model, model, f"site-{i}", "edge", "FR", "west", PARIS[0], PARIS[1] + i, url, api=api)
                   for i, url in enumerate(urls) for model, api in (("m", "v2"), ("llm", "openai"), ("c", "v2"))])
    first = cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.TensorRule("p", logits=False, measure="top", below=0.8))
    table.set_cascades({"c": cascade_rules.CascadeRoute("c", "c", (first, cascade_rules.StageRoute("large", frozenset({"datacenter"}), None)), {})})
    return table


ROUTES = [pytest.param("/v2/models/m/infer", INFER, "m", id="v2"),
          pytest.param("/openai/v1/chat/completions", CHAT, "llm", id="openai"),
          pytest.param("/openai/v1/chat/completions", {**CHAT, "stream": True}, "llm", id="openai streamed"),
          pytest.param("/v2/models/c/infer", INFER, "c", id="v2 cascade")]


@pytest.mark.parametrize(("path", "body", "model"), ROUTES)
async def test_an_answer_past_a_nearer_replica_down_says_so(path: str, body: dict, model: str) -> None:
    registry = CollectorRegistry()
    async with loopback.replica(replying) as near, loopback.replica(replying) as far:
        table = table_of([near, far])
        table.mark_down(near)  # its agent is stopping
        async with gateway_over(table, registry) as http:
            with access_lines() as lines:
                answer = await http.post(path, json=body, headers=AT_PARIS)
                line = await asyncio.wait_for(lines.records.get(), 10)
    assert answer.status_code == 200, answer.text
    assert (answer.headers["x-edgeplane-site"], answer.headers["x-edgeplane-skipped"]) == ("site-1", "site-0=unhealthy")
    assert "x-edgeplane-failover" not in answer.headers
    assert line.skipped == "site-0=unhealthy"
    assert " skipped=site-0=unhealthy" in logformat.TextFormatter().format(line)
    assert counted(registry) == {(model, "unhealthy"): 1}


@pytest.mark.parametrize(("path", "body", "model"), ROUTES)
async def test_a_failover_and_a_skip_are_told_apart(path: str, body: dict, model: str) -> None:
    registry = CollectorRegistry()
    async with loopback.replica(replying) as near, loopback.replica(failing) as next_, loopback.replica(replying) as far:
        table = table_of([near, next_, far])
        table.eject(near)  # failed a request a moment ago
        async with gateway_over(table, registry) as http:
            answer = await http.post(path, json=body, headers=AT_PARIS)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-edgeplane-site"] == "site-2"
    assert answer.headers["x-edgeplane-failover"] == "site-1"
    assert answer.headers["x-edgeplane-skipped"] == "site-0=ejected"
    assert counted(registry) == {(model, "ejected"): 1}


@pytest.mark.parametrize(("path", "body", "model"), ROUTES)
async def test_an_answer_from_the_nearest_replica_skips_nothing(path: str, body: dict, model: str) -> None:
    registry = CollectorRegistry()
    async with loopback.replica(replying) as near, loopback.replica(replying) as far:
        async with gateway_over(table_of([near, far]), registry) as http:
            with access_lines() as lines:
                answer = await http.post(path, json=body, headers=AT_PARIS)
                line = await asyncio.wait_for(lines.records.get(), 10)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-edgeplane-site"] == "site-0" and "x-edgeplane-skipped" not in answer.headers
    assert line.skipped is None and "skipped=" not in logformat.TextFormatter().format(line)
    assert counted(registry) == {}


@pytest.mark.parametrize(("stream", "mode"), [(False, "on"), (True, "on"), pytest.param(True, "force-first", id="relayed as generated")])
async def test_a_generative_cascade_s_answer_says_which_nearer_replicas_of_its_stage_were_skipped(stream: bool, mode: str) -> None:
    first = cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.GenerativeRule(truncated=True))
    async with loopback.replica(openai_cascades.answering("ok")) as near, loopback.replica(openai_cascades.answering("ok")) as far:
        table = openai_cascades.cascade_of(first, [openai_cascades.endpoint("edge-paris", "edge", near),
                                                   openai_cascades.endpoint("edge-lyon", "edge", far, lat=45.76, lon=4.84)])
        table.mark_down(near)
        registry = CollectorRegistry()
        async with openai_cascades.gateway(table, registry=registry) as http:
            answer = await http.post(f"{openai_routes.PREFIX}/chat/completions", json={**openai_cascades.CHAT, "stream": stream},
                                     headers={**AT_PARIS, "X-Edgeplane-Cascade": mode})
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-edgeplane-cascade-stage"] == "small"
    assert (answer.headers["x-edgeplane-site"], answer.headers["x-edgeplane-skipped"]) == ("edge-lyon", "edge-paris=unhealthy")
    assert counted(registry) == {("chat", "unhealthy"): 1}  # one answer, counted once

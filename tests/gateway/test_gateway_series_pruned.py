"""A gateway lets go of the metric series of models and sites its endpoint table no longer
names, on the control plane and on a standalone gateway following it, over real HTTP:
each label value is a series kept for the life of the process, and a gateway that runs
for months while deployments come and go would grow every scrape without bound."""

from __future__ import annotations

import pathlib

import httpx
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.samples import Sample
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orchestrator.gateway import cascade, endpoints, openai_routes, proxy, routing, series
from orchestrator.gateway.upstream import UpstreamPool
from orchestrator.testing import harness, loopback, manifests

EXAMPLE_SHA = "35831637b80bdd36f96771ab77bf514a108f89a6d67ea078d044bfcc8b228703"  # manifests/examples/artifacts/intent-distilled.onnx
FLEET = manifests.bundle(manifests.onnx_model("intent", "artifacts/intent-distilled.onnx", EXAMPLE_SHA),
                         manifests.deployment("intent-fr", "intent", 1, {"residency": ["FR"], "tiers": ["edge"]}))


def labelled(text: str) -> set[tuple[str, str, str]]:
    """(family, model, site) of every ``edgeplane_gateway_*`` sample of a scrape."""
    return {(f.name, s.labels.get("model", ""), s.labels.get("site", "")) for f in text_string_to_metric_families(text)
            if f.name.startswith("edgeplane_gateway_") for s in f.samples}


async def test_a_deleted_deployments_series_leave_the_metrics_of_every_gateway(tmp_path: pathlib.Path) -> None:
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane()
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            assert (await http.post("/v1/apply", content=FLEET)).status_code == 200
            await harness.wait_until(lambda: cp.table.knows("intent"), 30, what="the deployment in the table")
            async with harness.following_gateway(cp.http_url) as gw, httpx.AsyncClient(base_url=gw.http_url, timeout=30) as standalone:
                await harness.wait_until(lambda: gw.table.knows("intent"), 30, what="the deployment in the followed table")
                for at in (http, standalone):  # no site for it: the gateway's own 503, counted under its model
                    assert (await at.post("/v2/models/intent/infer", json={"inputs": []})).status_code == 503
                    assert ("edgeplane_gateway_requests", "intent", "") in labelled((await at.get("/metrics")).text)

                assert (await http.delete("/v1/modeldeployments/intent-fr")).status_code == 200
                await harness.wait_until(lambda: not cp.table.knows("intent") and not gw.table.knows("intent"), 30,
                                         what="the deployment gone from both tables")
                for at in (http, standalone):
                    scraped = labelled((await at.get("/metrics")).text)
                    assert not {s for s in scraped if s[1] == "intent"}, scraped
    finally:
        await fleet.stop()


async def infer(request: Request) -> Response:
    return Response(b'{"model_name": "m", "outputs": []}', media_type="application/json")


REPLICA = Starlette(routes=[Route("/v2/models/m/infer", infer, methods=["POST"])])


def counted(registry: CollectorRegistry) -> set[tuple[str, str]]:
    """(model, site) of the ``edgeplane_gateway_requests_total`` series."""
    return {(s.labels["model"], s.labels["site"]) for f in registry.collect() for s in f.samples if s.name == "edgeplane_gateway_requests_total"}


async def test_the_series_of_a_site_no_replica_is_at_any_more_go_and_the_others_stay() -> None:
    """The model's replica moved from Paris to Lyon: Paris's series go at the next scrape,
    the model's own and those of names the table never knew (``_unknown``) stay."""
    registry = CollectorRegistry()
    async with loopback.serving(REPLICA) as port:
        def at(site: str) -> routing.Endpoint:
            return routing.Endpoint("m", "d", site, "edge", "FR", "fr", 48.85, 2.35, f"http://127.0.0.1:{port}")

        table = endpoints.EndpointTable()
        pool = UpstreamPool()
        gw = proxy.Gateway(table, pool, proxy.GatewayMetrics.create(registry))
        openai = openai_routes.OpenAIGateway(gw, registry=registry)
        app = Starlette(routes=gw.routes() + openai.routes())
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=30) as http:
                async def answered_by() -> str:
                    resp = await http.post("/v2/models/m/infer", json={"inputs": []})
                    assert resp.status_code == 200, resp.text
                    return resp.headers["x-edgeplane-site"]

                table.replace([at("paris")])
                assert await answered_by() == "paris"
                assert (await http.post("/v2/models/not-deployed/infer", json={})).status_code == 404
                table.replace([at("lyon")])  # the replica moved
                assert await answered_by() == "lyon"
        finally:
            await pool.close()
    assert counted(registry) == {("m", "paris"), ("m", "lyon"), (proxy.UNKNOWN_MODEL, "")}
    series.prune(table, openai.labelled())  # as each scrape does
    assert counted(registry) == {("m", "lyon"), (proxy.UNKNOWN_MODEL, "")}
    assert registry.get_sample_value("edgeplane_gateway_request_seconds_count", {"model": "m"}) == 2  # the model's own stay


def test_every_gateway_metric_lets_go_of_a_gone_models_cascades_and_sites_series() -> None:
    """Each metric's series are removed by its own label names, whatever they are: a label
    added to one of them does not stop its pruning. Histograms' buckets go with their series."""
    registry = CollectorRegistry()
    table = endpoints.EndpointTable()
    table.replace([routing.Endpoint("kept", "d", "paris", "edge", "FR", "fr", 48.85, 2.35, "http://127.0.0.1:9")])
    pool = UpstreamPool()
    handler = cascade.CascadeHandler(table, pool, cascade.CascadeMetrics.create(registry))
    metrics = openai_routes.OpenAIGateway(proxy.Gateway(table, pool, proxy.GatewayMetrics.create(registry), cascade=handler),
                                          registry=registry).labelled()
    gone = {"model": "gone", "cascade": "gone", "site": "gone-site"}
    for metric in metrics:
        child = metric.labels(**{name: gone.get(name, "x") for name in series.label_names(metric)})
        if isinstance(child, Histogram):
            child.observe(1.0)
        else:
            child.inc()
    assert all(samples(metric) for metric in metrics)
    series.prune(table, metrics)
    assert {metric.describe()[0].name: samples(metric) for metric in metrics if samples(metric)} == {}


def samples(metric: MetricWrapperBase) -> list[Sample]:
    return [s for family in metric.collect() for s in family.samples]

"""Regions named in the operator's own script ("Île-de-France", "北京", "Região Norte"): a
site declares one in ``spec.location.region`` and a caller names it in ``X-Edgeplane-Region``,
which as an HTTP header holds ASCII only. The CLI and the Python client send a region that is
not ASCII percent-encoded as UTF-8 behind RFC 8187's ``UTF-8''``, the gateway reads that and
the raw UTF-8 bytes curl sends, and every side compares regions in Unicode's composed form
(NFC), so the same name typed on a Mac (decomposed) and on Linux is one region."""

from __future__ import annotations

import unicodedata
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette import datastructures
from starlette.applications import Starlette

from edgeplane_proto.agent.v1 import agent_pb2 as pb
from orchestrator import clientargs
from orchestrator.agents import model as agent_model
from orchestrator.api import methods
from orchestrator.cli import infer
from orchestrator.cli import main as cli_main
from orchestrator.gateway import endpoints, proxy, routing
from orchestrator.manifests import loader

ILE = "Île-de-France"  # composed: one code point for Î
ILE_NFD = unicodedata.normalize("NFD", ILE)
BEIJING = "北京"


@pytest.mark.parametrize(("header", "expected"), [
    ("UTF-8''%C3%8Ele-de-France", ILE),  # what the CLI and the Python client send
    ("utf-8''%E5%8C%97%E4%BA%AC", BEIJING),  # the prefix's case is free, as in RFC 8187
    (ILE.encode().decode("latin-1"), ILE),  # curl -H 'X-Edgeplane-Region: Île-de-France': UTF-8 bytes, read as latin-1
    (ILE_NFD.encode().decode("latin-1"), ILE),  # typed decomposed
    ("UTF-8''" + "I%CC%82le-de-France", ILE),
    ("eu-west", "eu-west"),
    ("50%-off", "50%-off"),  # plain ASCII is read as it is, a % in it included
])
def test_the_gateway_reads_a_region_header_as_text(header: str, expected: str) -> None:
    caller = routing.parse_caller(None, header, None)
    assert isinstance(caller, routing.Caller) and caller.region == expected


def test_the_endpoint_list_reads_a_decomposed_region_as_the_composed_one() -> None:
    caller = routing.parse_query_caller(None, None, ILE_NFD, None)
    assert isinstance(caller, routing.Caller) and caller.region == ILE


def test_sites_declare_a_region_in_its_composed_form() -> None:
    docs = loader.load_text(f"""
apiVersion: edgeplane.io/v1alpha1
kind: Site
metadata: {{name: paris}}
spec:
  tier: edge
  location: {{country: FR, region: "{ILE_NFD}", lat: 48.85, lon: 2.35}}
  capacity: {{cpu: 4, memoryGiB: 8}}
---
apiVersion: edgeplane.io/v1alpha1
kind: ModelDeployment
metadata: {{name: intent}}
spec:
  model: intent
  replicas: {{min: 1, max: 1}}
  demand: [{{region: "{ILE_NFD}", rps: 5}}]
""")
    site, deployment = (d.doc for d in docs)
    assert site.spec.location.region == ILE
    assert deployment.spec.demand[0].region == ILE


def test_an_agent_reports_its_region_in_its_composed_form() -> None:
    assert agent_model.Location.from_proto(pb.Location(country="FR", region=ILE_NFD)).region == ILE


def ep(site: str, region: str) -> routing.Endpoint:
    return routing.Endpoint(model="m", deployment="dep", site=site, tier="edge", country="FR", region=region, lat=48.8, lon=2.3,
                            url=f"http://{site}")


class NoUpstream:
    async def request(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"called a replica: {args}")

    async def stream(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"called a replica: {args}")


@pytest.mark.asyncio
async def test_a_caller_names_a_region_in_any_script_over_http() -> None:
    table = endpoints.EndpointTable()
    table.replace([ep("paris", ILE)], routing.RegionIndex({ILE: (48.8, 2.3), BEIJING: (39.9, 116.4)}))
    registry = CollectorRegistry()
    gw = proxy.Gateway(table, NoUpstream(), proxy.GatewayMetrics.create(registry))  # type: ignore[arg-type]
    app = Starlette(routes=gw.routes(), exception_handlers=methods.EXCEPTION_HANDLERS)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as http:
        unknown = await http.post("/v2/models/m/infer", json={}, headers={"x-edgeplane-region": clientargs.caller_headers(None, "Région Sud", None)["x-edgeplane-region"]})
    assert unknown.status_code == 400
    assert unknown.json()["error"] == ("X-Edgeplane-Region: unknown region 'Région Sud' (known regions: Île-de-France, 北京); "
                                       "give X-Edgeplane-Location: lat,lon instead")
    assert table.query_caller(datastructures.QueryParams({"region": ILE_NFD})) == routing.Caller(region=ILE)


@pytest.mark.parametrize("region", [ILE, BEIJING, "Ar Riyāḍ الرياض"])
def test_the_clients_send_a_region_in_any_script(region: str) -> None:
    sent = clientargs.caller_headers(None, clientargs.header_value(region, "region", text=True), None)["x-edgeplane-region"]
    httpx.Headers({"x-edgeplane-region": sent})  # travels: ASCII
    assert routing.parse_caller(None, sent, None) == routing.Caller(region=region)
    args = cli_main.build_parser().parse_args(["infer", "m", "--data", "{}", "--region", region])
    assert infer.caller_headers(args)["x-edgeplane-region"] == sent


def test_a_region_with_a_line_break_is_still_refused() -> None:
    with pytest.raises(ValueError, match="line break"):
        clientargs.header_value("Île\nde-France", "region", text=True)

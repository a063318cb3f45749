"""``cascade tune``'s sweep: a pure function of the replayed answers; and the replay, which
must read a first stage's answer as the gateway judges it, from the cascade it names."""

from __future__ import annotations

import asyncio
import json
import pathlib
from collections.abc import Iterator

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from edgeplane_proto import oip
from orchestrator.cli import main as cli_main
from orchestrator.cli.cascade import Replayed, replay, sweep
from orchestrator.cli.http import ApiClient
from orchestrator.gateway import cascade, cascade_rules, endpoints, proxy, routing
from orchestrator.testing import loopback

from .transport import Transport


def sample(confidence: float, first: int, last: int, label: int | None) -> Replayed:
    return Replayed(confidence, (first,), (last,), None if label is None else (label,), 2.0, 10.0, 0.1, 5.0)


SAMPLES = [sample(0.95, 1, 1, 1), sample(0.9, 2, 2, 2), sample(0.6, 0, 3, 3), sample(0.5, 1, 0, 1)]


def test_baselines_and_thresholds() -> None:
    rows = {r.name: r for r in sweep(SAMPLES, [0.55, 0.7, 1.0])}
    first, last = rows["first stage only"], rows["last stage only"]
    assert (first.firstStageShare, first.accuracy, first.agreement, first.meanMs, first.energyPerRequestJ) == (1.0, 0.75, 0.5, 2.0, 0.1)
    assert (last.firstStageShare, last.accuracy, last.agreement, last.meanMs, last.energyPerRequestJ) == (0.0, 0.75, 1.0, 10.0, 5.0)
    t = rows["cascade below 0.7"]  # the two unsure samples escalate and pay for both stages
    assert (t.firstStageShare, t.accuracy, t.agreement) == (0.5, 0.75, 1.0)
    assert t.meanMs == pytest.approx(2.0 + 0.5 * 10.0) and t.energyPerRequestJ == pytest.approx(0.1 + 0.5 * 5.0)
    low = rows["cascade below 0.55"]  # the 0.6 sample stays (wrong), the 0.5 one escalates to a wrong teacher
    assert (low.firstStageShare, low.accuracy, low.agreement) == (0.75, 0.5, 0.75)
    assert rows["cascade below 1"].firstStageShare == 0.0


def test_without_labels_accuracy_is_none() -> None:
    rows = sweep([sample(0.9, 1, 1, None)], [0.5])
    assert all(r.accuracy is None for r in rows) and rows[2].agreement == 1.0


@pytest.fixture
def gateway() -> Iterator[tuple[str, list[bytes]]]:
    """A loopback gateway that answers every inference with the next body of its list."""
    answers: list[bytes] = []

    class Handler(loopback.CannedHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            self.reply(200, answers[0])

    with loopback.http_server(Handler) as url:
        yield url, answers


AT = np.float32(0.7)
BELOW = np.nextafter(AT, np.float32(0))


@pytest.mark.parametrize("top", [AT, BELOW], ids=["at the threshold", "just below it"])
@pytest.mark.parametrize("writer", ["shortest", "full digits"])
def test_tune_predicts_what_the_gateway_decides_for_an_fp32_answer_at_the_threshold(
        gateway: tuple[str, list[bytes]], top: np.float32, writer: str) -> None:
    """Whether the replica writes float32 in its shortest form (0.7) or with every digit of
    its float64 widening (0.699999988…), tune reads it as the FP32 it is."""
    url, answers = gateway
    rule = cascade_rules.TensorRule("p", logits=False, measure="top", below=0.7)
    scores = np.array([[top, 1 - top]], np.float32)
    data = [str(v) for v in scores[0]] if writer == "shortest" else [repr(float(v)) for v in scores[0]]
    answers.append(('{"model_name": "m", "outputs": [{"name": "p", "datatype": "FP32", "shape": [1, 2], "data": [%s]}]}'
                    % ", ".join(data)).encode())
    gateway_escalates = cascade_rules.judge_tensor(rule, {t.name: t.array for t in oip.decode_response(answers[0]).outputs}).escalate
    api = ApiClient(url, None)
    try:
        replayed = replay(api, "m", rule, [({"inputs": []}, None)], {}, "sample")
    finally:
        api.close()
    [_, _, at_threshold] = sweep(replayed, [rule.below])
    assert gateway_escalates is bool(top == BELOW)
    assert at_threshold.firstStageShare == (0.0 if gateway_escalates else 1.0)


def test_a_first_stage_answer_with_nan_counts_as_escalated_at_every_threshold(gateway: tuple[str, list[bytes]]) -> None:
    """As the gateway judges it; the replay goes on to the other samples."""
    url, answers = gateway
    rule = cascade_rules.TensorRule("p", logits=False, measure="top", below=0.7)
    answers.append(b'{"model_name": "m", "outputs": [{"name": "p", "datatype": "FP32", "shape": [1, 2], "data": [NaN, 0.5]}]}')
    assert cascade_rules.judge_tensor(rule, {t.name: t.array for t in oip.decode_response(answers[0]).outputs}).escalate
    api = ApiClient(url, None)
    try:
        replayed = replay(api, "m", rule, [({"inputs": []}, None)], {}, "sample")
    finally:
        api.close()
    assert [r.firstStageShare for r in sweep(replayed, [0.5, 0.99])[2:]] == [0.0, 0.0]


def two_cascades_of_one_model() -> tuple[Starlette, Transport]:
    """The real gateway's routes over one model, ``task``, with two cascades in two
    jurisdictions (task-eu: Paris and Frankfurt; task-ch: Geneva and Zurich), and each
    deployment as ``GET /v1/modeldeployments/{name}`` answers it."""
    rule = {"confidence": {"output": "p", "scores": "probabilities", "measure": "top", "below": 0.8}}

    def route(deployment: str) -> cascade_rules.CascadeRoute:
        return cascade_rules.CascadeRoute("task", deployment, (
            cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.TensorRule("p", False, "top", 0.8)),
            cascade_rules.StageRoute("large", frozenset({"datacenter"}), None)))

    def ep(deployment: str, site: str, tier: str, country: str, lat: float, lon: float) -> routing.Endpoint:
        return routing.Endpoint("task", deployment, site, tier, country, "", lat, lon, f"http://{site}")

    fleet = [ep("task-eu", "edge-fr", "edge", "FR", 48.85, 2.35), ep("task-eu", "dc-de", "datacenter", "DE", 50.1, 8.7),
             ep("task-ch", "edge-ch", "edge", "CH", 46.2, 6.1), ep("task-ch", "dc-ch", "datacenter", "CH", 47.4, 8.5)]
    table = endpoints.EndpointTable()
    table.replace(fleet)
    eu, ch = route("task-eu"), route("task-ch")
    table.set_cascades({"task": eu, "task-eu": eu, "task-ch": ch})  # as the reconciler publishes them
    transport = Transport({e.url: "sure" for e in fleet})
    registry = CollectorRegistry()
    handler = cascade.CascadeHandler(table, transport, cascade.CascadeMetrics.create(registry))  # type: ignore[arg-type]
    gw = proxy.Gateway(table, transport, proxy.GatewayMetrics.create(registry), cascade=handler)  # type: ignore[arg-type]

    async def deployment(request: Request) -> JSONResponse:
        return JSONResponse({"spec": {"model": "task", "variant": {"edge": "small", "datacenter": "large"},
                                      "cascade": {"stages": [{"variant": "small", "escalate": rule}, {"variant": "large"}]}}})

    return Starlette(routes=[*gw.routes(), Route("/v1/modeldeployments/{name}", deployment)]), transport


@pytest.mark.asyncio
async def test_tune_replays_through_the_named_cascade_not_another_deployment_of_its_model(tmp_path: pathlib.Path,
                                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """tune task-eu from Geneva, stating no residency: task-ch's Swiss replicas are the
    nearest of the model's, but the sweep is task-eu's threshold over task-eu's stages."""
    app, transport = two_cascades_of_one_model()
    sample = tmp_path / "sample.jsonl"
    sample.write_text(json.dumps({"input": [[0.0, 1.0]], "label": 0}) + "\n")
    async with loopback.serving(app) as port:
        code = await asyncio.to_thread(cli_main.main, ["--server", f"http://127.0.0.1:{port}", "cascade", "tune", "task-eu",
                                                       "-f", str(sample), "--location", "46.20,6.14", "-o", "json"])
    assert code == 0, capsys.readouterr().err
    assert transport.calls == ["http://edge-fr", "http://dc-de"], transport.calls  # first stage alone, then last stage alone

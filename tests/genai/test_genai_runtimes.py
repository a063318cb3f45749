"""A generative model goes only to agents that run onnxruntime-genai: an agent process on a
machine without it is never assigned the model, which its deployment's status says, and
the model serves from the site whose agent runs it once that one joins; ``get sites``
shows what each agent runs."""

from __future__ import annotations

import pathlib

import httpx

from orchestrator.gateway import routing
from orchestrator.testing import genai_model, harness, manifests

PARIS = dict(country="FR", lat=48.8566, lon=2.3522)
LYON = dict(country="FR", lat=45.76, lon=4.84)


def status(cp, kind: str, name: str) -> dict:  # type: ignore[no-untyped-def,type-arg]
    found = cp.store.get(kind, name)
    return found.status if found is not None else {}


async def test_an_agent_without_onnxruntime_genai_is_never_given_a_generative_model(tmp_path: pathlib.Path) -> None:
    built = genai_model.build_package(tmp_path / "artifacts", name="chat")
    variant = {"name": "small", **built.manifest_fields(), "resources": {"cpu": 0.25}}
    variant["artifact"] = {"uri": "chat.tar", "sha256": built.sha256}
    body = manifests.bundle(
        manifests.edge_site("edge-paris", **PARIS),
        manifests.edge_site("edge-lyon", **LYON),
        manifests.doc("Model", "assistant", {"variants": [variant]}),
        manifests.deployment("assistant-fr", "assistant", 1, {"residency": ["FR"], "tiers": ["edge"]}),
    )
    async with harness.serving_fleet(tmp_path, body, {"edge-paris": {**PARIS, "entry": harness.WITHOUT_GENAI}}, resync_s=0.5) as fleet:
        cp = fleet.cp
        assert cp is not None
        why = "site edge-paris: its agent cannot run onnx-genai (it runs: onnx)"
        await harness.wait_until(lambda: why in status(cp, "ModelDeployment", "assistant-fr").get("reason", ""), 30,
                                 what="the deployment to say why edge-paris takes no replica")
        assert status(cp, "ModelDeployment", "assistant-fr")["phase"] == "Unschedulable"
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            site = (await http.get("/v1/sites/edge-paris")).json()
        assert site["status"]["agent"]["runtimes"] == ["onnx"], site["status"]

        await fleet.start_agent("edge-lyon", **LYON)
        await harness.wait_until(lambda: cp.table.endpoints("assistant"), 60, what="the assistant's endpoint")
        (endpoint,) = cp.table.endpoints("assistant")
        assert (endpoint.site, endpoint.api) == ("edge-lyon", routing.API_OPENAI)
        paris = cp.hub.status("edge-paris")
        assert paris is not None and paris.healthy and dict(paris.models) == {}  # nothing was ever sent to it
        assert cp.hub.status("edge-lyon").capacity.runtimes == ("onnx", "onnx-genai")  # type: ignore[union-attr]

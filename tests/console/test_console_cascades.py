"""The Cascades tab: each deployment with ``spec.cascade`` as ``edgeplane get cascades``
shows it (``GET /v1/cascades``: requests, answers per stage, escalations, latency, energy),
with each stage's rule and sites and what it captures, from the deployment itself, and what
it kept today against its daily cap; an empty state while there is none.

A real control plane with the cascade applied (no agents: nothing serves it); only the
placement is served to the page through Playwright's routing, so that each stage has sites.
"""

from __future__ import annotations

import pathlib

import httpx
import pytest

from orchestrator import capture_counts, catalog
from orchestrator.distill import capture as capture_mod
from orchestrator.testing import manifests, onnx_models

from .conftest import console_page

pytestmark = pytest.mark.asyncio(loop_scope="module")

# a model's output may be named anything: the page writes it as text, and a long one wraps
OUTPUT = "<img src=x onerror=window.injected=1>" + "scores_" * 30
PLACEMENTS = [{"deployment": "intent-cascade", "site": site, "variant": variant, "replicas": 1}
              for site, variant in (("edge-paris", "student"), ("edge-berlin", "student"), ("dc-paris", "teacher"))]


def cascade_yaml(sha256: str) -> str:
    io = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 8]}], "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, 4]}]}
    return manifests.bundle(
        manifests.edge_site("edge-paris", "FR", 48.8566, 2.3522), manifests.edge_site("edge-berlin", "DE", 52.52, 13.405),
        manifests.doc("Site", "dc-paris", {"tier": "datacenter", "location": {"country": "FR", "lat": 48.86, "lon": 2.34},
                                           "capacity": {"cpu": 64, "memoryGiB": 256}, "ray": {"address": "http://127.0.0.1:9"}}),
        manifests.doc("Model", "intent", {"variants": [
            {"name": "student", "runtime": "onnx", "artifact": {"uri": "intent.onnx", "sha256": sha256}, "resources": {"cpu": 0.1, "memoryMiB": 64}, **io},
            {"name": "teacher", "runtime": "onnx", "artifact": {"uri": "intent.onnx", "sha256": sha256}, "resources": {"cpu": 0.5, "memoryMiB": 256}, **io},
        ]}),
        manifests.doc("ModelDeployment", "intent-cascade", {
            "model": "intent", "variant": {"edge": "student", "datacenter": "teacher"}, "replicas": {"min": 3, "max": 3},
            "placement": {"residency": ["EU"], "spread": {"by": "site", "maxSkew": 1}},
            "cascade": {"stages": [{"variant": "student", "escalate": {"confidence": {"output": OUTPUT, "scores": "logits", "measure": "margin",
                                                                                      "below": 0.25}, "maxInflight": 8}},
                                   {"variant": "teacher"}],
                        "capture": {"sampleRate": 0.1, "dailyCap": 5000, "retentionDays": 14, "zones": ["EU"]}}}),
    )


async def test_the_cascades_tab_shows_each_cascade_s_stages_rule_captures_and_figures(browser, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    built = onnx_models.build_mlp(tmp_path / "artifacts" / "intent.onnx", in_dim=8, hidden=16, out_dim=4, seed=3)

    async with console_page(browser, tmp_path, {"**/v1/placements": {"items": PLACEMENTS}}) as (page, errors, cp):
        await page.goto(f"{cp.http_url}/ui/")
        await page.click("nav button[data-tab=cascades]")
        none = page.locator("#tab-cascades #cascades-none")
        await none.wait_for(timeout=30_000)
        assert await none.inner_text() == "No cascades (deployments with spec.cascade)."

        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            applied = await http.post("/v1/apply", content=cascade_yaml(built.sha256))
            assert applied.status_code == 200, applied.text
        cascade = page.locator("#tab-cascades section[data-cascade=intent-cascade]")
        await cascade.wait_for(timeout=30_000)
        assert await none.count() == 0
        assert await cascade.locator("h3").inner_text() == "intent-cascade"
        # the figures `get cascades` shows: nothing served yet
        figures = await cascade.locator("table.figures").inner_text()
        assert figures.split("\n")[0].split("\t") == ["model", "requests", "escalated", "not escalated", "failed", "mean ms", "added ms",
                                                      "J/req", "gCO2/req"], figures
        assert figures.split("\n")[1].split("\t") == ["intent", "0", "–", "0", "0", "–", "–", "–", "–"], figures
        stages = [[await td.inner_text() for td in await tr.locator("td").all()] for tr in await cascade.locator("table.stages tr").all()][1:]
        assert stages == [
            ["student", "edge-berlin, edge-paris", "0",
             f"confidence below 0.25 (margin of logits, output {OUTPUT}) or 8 requests in flight at its best replica"],
            ["teacher", "dc-paris", "0", "answers what reaches it"],
        ], stages
        capture = await cascade.locator(".capture").inner_text()
        assert capture == "captures 10% of requests, at most 5000 a day per zone (UTC), kept 14 days, in EU", capture
        # what it kept today against its cap, as the state store counts it: nothing yet, then the cap reached
        day = int(cp.store.now() // capture_mod.DAY_S)
        midnight = catalog.rfc3339((day + 1) * capture_mod.DAY_S)
        today = cascade.locator(".capture-today")
        assert await today.inner_text() == f"today ({catalog.rfc3339(day * capture_mod.DAY_S)[:10]}, UTC): EU 0 of 5,000"
        assert cp.store.take_daily(capture_counts.key("intent-cascade", "EU"), day, 5000, 5000) == 5000
        await cascade.locator(".capture-today", has_text="capture stopped").wait_for(timeout=30_000)
        assert (await today.inner_text()).endswith(f"EU 5,000 of 5,000, capture stopped until {midnight}")
        # the output's name is text: no element made of it, nothing run
        assert await page.locator("#tab-cascades img").count() == 0
        assert await page.evaluate("() => window.injected === undefined")
        # the longest rule wraps within the tab: the table does not run off its side
        assert await page.eval_on_selector("#tab-cascades", "t => t.scrollWidth <= t.clientWidth"), "the cascades tab overflows"
        assert errors == []

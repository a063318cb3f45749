"""edgeplane plan of a Model whose change makes Ray Serve roll an application's replicas
(a ray-serve variant's importPath, args or resources, a vllm variant's llm fields): each
data-centre site that runs it says so, and a new replica count alone does not. The
control plane in process, its data centre a Ray dashboard's Serve REST API on loopback,
the plan asked through the real API and command line."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import json
import re
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
import yaml

from orchestrator import server
from orchestrator.cli import main as cli_main
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import harness
from tests.controlplane import datacentres


def fleet(dashboard: datacentres.ServeDashboard, variant: str = '{name: v, runtime: ray-serve, importPath: "pkg.mod:app", '
                                                                   'resources: {cpu: 1, memoryMiB: 256}}') -> str:
    model = datacentres.MODEL.replace('{name: v, runtime: ray-serve, importPath: "pkg.mod:app", resources: {cpu: 1, memoryMiB: 256}}',
                                      variant)
    return datacentres.bundle(datacentres.site("dc-1", on=f"ray: {{address: '{dashboard.url}'}}"), model,
                              datacentres.deployment("d", "dc-1"))


async def dry_run_and_plan(cp: server.ControlPlane, manifest: pathlib.Path, text: str,
                           capsys: pytest.CaptureFixture[str]) -> tuple[list[tuple[str, str, object]], str, int]:
    """The dry run's (site, change, updated) rows for ``text``, and what ``edgeplane plan``
    prints for it and exits with."""
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        resp = await http.post("/v1/apply", params={"dryRun": "true"}, content=text)
    assert resp.status_code == 200, resp.text
    manifest.write_text(text)
    code = await asyncio.to_thread(cli_main.main, ["--server", cp.http_url, "plan", "-f", str(manifest)])
    return [(c["site"], c["change"], c.get("updated")) for c in resp.json()["plan"]["changes"]], capsys.readouterr().out, code


@contextlib.asynccontextmanager
async def placed(tmp_path: pathlib.Path, text: Callable[[datacentres.ServeDashboard], str]
                 ) -> AsyncIterator[tuple[server.ControlPlane, datacentres.ServeDashboard]]:
    """A control plane in process with the manifests ``text(dashboard)`` applied and their
    deployment placed on dc-1, whose cluster is ``dashboard``."""
    dashboard = datacentres.ServeDashboard()
    f = harness.Fleet(tmp_path)
    try:
        cp = await f.start_control_plane(resync_s=0.2)
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            resp = await http.post("/v1/apply", content=text(dashboard))
            assert resp.status_code == 200, resp.text
        await harness.wait_until(lambda: [r.site for r in cp.store.placements()] == ["dc-1"], 30, what="placed on dc-1")
        yield cp, dashboard
    finally:
        await f.stop()
        dashboard.stop()


async def test_plan_shows_an_import_path_or_args_change_as_an_update_on_each_data_centre(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with placed(tmp_path, fleet) as (cp, dashboard):
        changed = fleet(dashboard, '{name: v, runtime: ray-serve, importPath: "pkg.mod2:app", args: {k: 2}, '
                                   'resources: {cpu: 1, memoryMiB: 256}}')
        manifest = tmp_path / "changed.yaml"
        rows, printed, code = await dry_run_and_plan(cp, manifest, changed, capsys)
        assert rows == [("dc-1", "updated", ["importPath", "args"])], rows
        assert code == 0 and "No replica changes" not in printed, printed
        assert re.search(r"dc-1\s.*updated: importPath, args", printed), printed
        # with another replica count too, the site says both, as a version roll does
        scaled = changed.replace("replicas: {min: 1, max: 1}", "replicas: {min: 2, max: 2}")
        rows, printed, code = await dry_run_and_plan(cp, manifest, scaled, capsys)
        assert rows == [("dc-1", "added", ["importPath", "args"])], rows
        assert re.search(r"dc-1\s.*added, updated: importPath, args", printed), printed


async def test_plan_shows_a_resources_change_which_restarts_the_replicas_as_an_update(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    # new ray_actor_options restart every replica of the application; a new count does not
    async with placed(tmp_path, fleet) as (cp, dashboard):
        # sized through the ingress the cluster reported: only then are its resources sent
        await harness.wait_until(lambda: [a.get("deployments") for a in dashboard.applications.values()] == [
            [{"name": "Ingress", "num_replicas": 1, "ray_actor_options": {"num_cpus": 1.0, "memory": 256 * 1024 * 1024}}]],
            30, what="sized through its ingress on dc-1")
        manifest = tmp_path / "changed.yaml"
        changed = fleet(dashboard, '{name: v, runtime: ray-serve, importPath: "pkg.mod:app", resources: {cpu: 2, memoryMiB: 1024}}')
        rows, printed, code = await dry_run_and_plan(cp, manifest, changed, capsys)
        assert rows == [("dc-1", "updated", ["resources"])], rows
        assert code == 0 and re.search(r"dc-1\s.*updated: resources", printed), (code, printed)
        scaled = changed.replace("replicas: {min: 1, max: 1}", "replicas: {min: 2, max: 2}")
        rows, printed, code = await dry_run_and_plan(cp, manifest, scaled, capsys)
        assert rows == [("dc-1", "added", ["resources"])], rows
        assert re.search(r"dc-1\s.*added, updated: resources", printed), printed
        # a new count alone is a lightweight update: the replicas running keep running
        rows, printed, code = await dry_run_and_plan(cp, manifest, fleet(dashboard).replace("replicas: {min: 1, max: 1}",
                                                                                            "replicas: {min: 2, max: 2}"), capsys)
        assert rows == [("dc-1", "added", None)], rows
        assert "updated" not in printed, printed
        # what Ray Serve is not sent (a throughput figure that only sizes the count) rolls nothing
        rows, printed, code = await dry_run_and_plan(cp, manifest, fleet(
            dashboard, '{name: v, runtime: ray-serve, importPath: "pkg.mod:app", throughputRps: 50, '
                       'resources: {cpu: 1, memoryMiB: 256}}'), capsys)
        assert rows == [("dc-1", "unchanged", None)] and "No replica changes" in printed, (rows, printed)


LLM_MODEL = """
apiVersion: edgeplane.io/v1alpha1
kind: Model
metadata: {name: m}
spec:
  variants:
    - name: v
      runtime: vllm
      resources: {cpu: 8, memoryMiB: 65536}
      llm:
        source: /mnt/models/llama
        contextLength: 8192
        tensorParallelSize: 2
        acceleratorType: H100
        weightBytes: 16000000000
        architecture: {layers: 32, kvHeads: 8, headDim: 128}
        engineArgs: {enable_prefix_caching: true}
"""


def llm_fleet(dashboard: datacentres.ServeDashboard, model: str = LLM_MODEL) -> str:
    site = datacentres.site("dc-1", on=f"ray: {{address: '{dashboard.url}'}}").replace(
        "capacity: {cpu: 64, memoryGiB: 256}", "capacity: {cpu: 64, memoryGiB: 256, gpus: [{model: H100, count: 8, memoryGiB: 80}]}")
    return datacentres.bundle(site, model, datacentres.deployment("d", "dc-1"))


async def test_plan_shows_an_llm_change_which_restarts_the_engines_as_an_update(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with placed(tmp_path, llm_fleet) as (cp, dashboard):
        manifest = tmp_path / "changed.yaml"
        changed = LLM_MODEL.replace("{enable_prefix_caching: true}", "{enable_prefix_caching: false}").replace(
            "tensorParallelSize: 2", "tensorParallelSize: 4")
        rows, printed, code = await dry_run_and_plan(cp, manifest, llm_fleet(dashboard, changed), capsys)
        assert rows == [("dc-1", "updated", ["llm.tensorParallelSize", "llm.engineArgs"])], rows
        assert code == 0 and re.search(r"dc-1\s.*updated: llm.tensorParallelSize, llm.engineArgs", printed), (code, printed)
        # a figure that only sizes GPU memory for placement is not sent to Ray Serve
        rows, printed, code = await dry_run_and_plan(
            cp, manifest, llm_fleet(dashboard, LLM_MODEL.replace("weightBytes: 16000000000", "weightBytes: 17000000000")), capsys)
        assert rows == [("dc-1", "unchanged", None)] and "No replica changes" in printed, (rows, printed)


async def test_plan_shows_a_lora_change_as_an_update_and_its_layer_widths_as_none(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    lora = LLM_MODEL.replace("architecture: {layers: 32, kvHeads: 8, headDim: 128}",
                             "architecture: {layers: 32, kvHeads: 8, headDim: 128, hiddenSize: 4096, intermediateSize: 14336, "
                             "attentionHeads: 32}\n        lora: {adaptersFrom: 's3://adapters/llama', maxRank: 16}")
    async with placed(tmp_path, lambda dashboard: llm_fleet(dashboard, lora)) as (cp, dashboard):
        manifest = tmp_path / "changed.yaml"
        slower = lora.replace("maxRank: 16}", "maxRank: 16, downloadTimeoutSeconds: 300}")
        rows, printed, code = await dry_run_and_plan(cp, manifest, llm_fleet(dashboard, slower), capsys)
        assert rows == [("dc-1", "updated", ["llm.lora"])] and re.search(r"dc-1\s.*updated: llm.lora", printed), (rows, printed)
        # the widths size the adapters' GPU memory for placement only: Ray Serve is sent nothing new
        wider = lora.replace("intermediateSize: 14336", "intermediateSize: 14000")
        rows, printed, code = await dry_run_and_plan(cp, manifest, llm_fleet(dashboard, wider), capsys)
        assert rows == [("dc-1", "unchanged", None)] and "No replica changes" in printed, (rows, printed)


async def test_a_lora_variant_stored_without_layer_widths_still_serves_and_plans(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A vllm variant with llm.lora an earlier version stored, before the layer widths were
    asked for: it is still placed and sent to Ray Serve with its adapters; the same manifest
    applied again is refused naming the widths, and once they are given plan shows no change
    to the replica (the widths are not sent to Ray Serve)."""
    widths = "hiddenSize: 4096, intermediateSize: 14336, attentionHeads: 32"
    lora = LLM_MODEL.replace("architecture: {layers: 32, kvHeads: 8, headDim: 128}",
                             f"architecture: {{layers: 32, kvHeads: 8, headDim: 128, {widths}}}\n"
                             "        lora: {adaptersFrom: 's3://adapters/llama', maxRank: 16}")
    dashboard = datacentres.ServeDashboard()
    f = harness.Fleet(tmp_path)
    try:
        cp = await f.start_control_plane(resync_s=0.2)
        spec = yaml.safe_load(lora)["spec"]
        for name in ("hiddenSize", "intermediateSize", "attentionHeads"):
            del spec["variants"][0]["llm"]["architecture"][name]
        cp.store.apply([store_mod.ObjectWrite("Model", "m", {}, spec)], store_mod.Event("earlier-version", "apply", "", "", "apply"))
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            site_and_deployment = "---".join(d for d in llm_fleet(dashboard, lora).split("---") if "kind: Model\n" not in d)
            resp = await http.post("/v1/apply", content=site_and_deployment)
            assert resp.status_code == 200, resp.text
            await harness.wait_until(lambda: [r.site for r in cp.store.placements()] == ["dc-1"], 30, what="placed on dc-1")
            await harness.wait_until(lambda: any("lora_config" in json.dumps(a) for a in dashboard.applications.values()), 30,
                                     what="deployed with its adapters")
            again = await http.post("/v1/apply", content=llm_fleet(dashboard, lora.replace(f", {widths}", "")))
            assert again.status_code == 422 and "llm.lora needs architecture.hiddenSize" in again.text, again.text
        rows, printed, code = await dry_run_and_plan(cp, tmp_path / "changed.yaml", llm_fleet(dashboard, lora), capsys)
        assert rows == [("dc-1", "unchanged", None)] and code == 0, (rows, printed)
    finally:
        await f.stop()
        dashboard.stop()

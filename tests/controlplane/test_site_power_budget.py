"""A Site's power budget through the real control plane: applied over HTTP, held by the
reconciler's plan, and shown where an operator looks (get sites, describe, status, /metrics)."""

from __future__ import annotations

import asyncio
import json
import pathlib
import subprocess
import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.testing import harness

pytestmark = pytest.mark.asyncio

# 20 W per replica (declared), a 50 W feed behind a PUE of 1.25 (40 W for the replicas):
# two replicas fit, the third of replicas.min does not, whatever the agent's CPUs.
FLEET = """
apiVersion: edgeplane.io/v1alpha1
kind: Site
metadata: {name: edge-lyon}
spec:
  tier: edge
  location: {country: FR, region: eu-west, lat: 45.76, lon: 4.83}
  energy: {carbonGramsPerKWh: 56, pue: 1.25, powerBudgetWatts: 50}
---
apiVersion: edgeplane.io/v1alpha1
kind: Site
metadata: {name: edge-berlin}
spec:
  tier: edge
  location: {country: DE, region: eu-central, lat: 52.52, lon: 13.40}
  capacity: {cpu: 8, memoryGiB: 32}
---
apiVersion: edgeplane.io/v1alpha1
kind: Model
metadata: {name: intent}
spec:
  variants:
    - name: distilled
      runtime: onnx
      artifact:
        uri: artifacts/intent-distilled.onnx
        sha256: 35831637b80bdd36f96771ab77bf514a108f89a6d67ea078d044bfcc8b228703
      resources: {cpu: 0.05, memoryMiB: 16}
      powerWatts: 16
---
apiVersion: edgeplane.io/v1alpha1
kind: ModelDeployment
metadata: {name: intent-fr}
spec:
  model: intent
  replicas: {min: 3, max: 3}
  placement: {residency: [FR]}
"""
REASON = "site edge-lyon: power budget 50 W, 40 W used, replica needs 20 W"


async def cli(cp_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI, in a thread: the control plane under test runs on this event loop."""
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "orchestrator.cli.main", "--server", cp_url, *args],
                                   capture_output=True, text=True, timeout=60)


async def test_a_site_power_budget_holds_and_shows_in_get_describe_status_and_metrics(tmp_path: pathlib.Path) -> None:
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane()
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            applied = await http.post("/v1/apply", content=FLEET)
            assert applied.status_code == 200, applied.text
            await fleet.start_agent("edge-lyon", country="FR", region="eu-west", lat=45.76, lon=4.83)

            def reason() -> str:
                o = cp.store.get("ModelDeployment", "intent-fr")
                return o.status.get("reason", "") if o is not None else ""

            await harness.wait_until(lambda: reason().endswith(REASON), 30, what="the deployment held short by the power budget")
            deployment = (await http.get("/v1/modeldeployments/intent-fr")).json()["status"]
            assert (deployment["phase"], deployment["replicas"]) == ("Unschedulable", 2), deployment
            lyon = (await http.get("/v1/sites/edge-lyon")).json()
            assert lyon["spec"]["energy"]["powerBudgetWatts"] == 50
            assert lyon["status"]["power"] == {"estimatedWatts": 40.0, "budgetWatts": 50.0}
            assert "power" not in (await http.get("/v1/sites/edge-berlin")).json().get("status", {})  # no budget, nothing to show
            families = {f.name: f for f in text_string_to_metric_families((await http.get("/metrics")).text)}
            samples = {(s.labels["site"], s.labels["kind"]): s.value for s in families["edgeplane_site_power_watts"].samples}
            assert samples == {("edge-lyon", "estimated"): 40.0, ("edge-lyon", "budget"): 50.0}

        listed = await cli(cp.http_url, "get", "sites", "-o", "json")
        assert listed.returncode == 0, listed.stderr
        by_name = {o["metadata"]["name"]: o for o in json.loads(listed.stdout)["items"]}
        assert by_name["edge-lyon"]["status"]["power"] == {"estimatedWatts": 40.0, "budgetWatts": 50.0}
        table = await cli(cp.http_url, "get", "sites")
        header, *rows = table.stdout.splitlines()
        assert header.split()[-3:] == ["POWER", "W", "SOURCE"], header
        assert {r.split()[0]: r.split()[-2] for r in rows} == {"edge-berlin": "-", "edge-lyon": "40/50"}, table.stdout
        described = await cli(cp.http_url, "describe", "site", "edge-lyon")
        assert "estimatedWatts: 40.0" in described.stdout and "budgetWatts: 50.0" in described.stdout, described.stdout
        status = await cli(cp.http_url, "status")
        assert "  edge-lyon: power 40/50 W" in status.stdout.splitlines(), status.stdout
        assert REASON in status.stdout
    finally:
        await fleet.stop()

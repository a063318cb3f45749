"""The whole control plane driving a real Ray cluster: apply -> RUNNING -> infer -> scale -> delete."""

from __future__ import annotations

import dataclasses

import pathlib

import httpx
import numpy as np
import pytest

from orchestrator.adapters import local_ray, serve_config
from orchestrator.testing import harness, onnx_models

SITE = """
apiVersion: edgeplane.io/v1alpha1
kind: Site
metadata: {name: dc-test}
spec:
  tier: datacenter
  location: {country: FR, lat: 48.85, lon: 2.35}
  capacity: {cpu: 64, memoryGiB: 256}
  ray: {address: local}
---
apiVersion: edgeplane.io/v1alpha1
kind: Model
metadata: {name: dcmodel}
spec:
  variants:
    - name: v
      runtime: onnx
      artifact: {uri: dc.onnx, sha256: "SHA"}
      resources: {cpu: 0.1, memoryMiB: 128}
---
apiVersion: edgeplane.io/v1alpha1
kind: Model
metadata: {name: broken}
spec:
  variants:
    - name: v
      runtime: ray-serve
      importPath: no_such_module.anywhere:app
      resources: {cpu: 0.1, memoryMiB: 128}
"""

DEPLOYMENT = """
apiVersion: edgeplane.io/v1alpha1
kind: ModelDeployment
metadata: {name: dc-dep}
spec:
  model: dcmodel
  replicas: {min: REPLICAS, max: REPLICAS}
  placement: {tiers: [datacenter]}
"""

BROKEN = """
apiVersion: edgeplane.io/v1alpha1
kind: ModelDeployment
metadata: {name: broken-dep}
spec:
  model: broken
  placement: {tiers: [datacenter]}
"""


def ready_apps(cp, name: str) -> int:
    obs = (cp.reconciler.last_snapshot.datacentres.get("dc-test") if cp.reconciler.last_snapshot else None)
    app = obs.apps.get(name) if obs else None
    return app.replicas_running if app is not None and app.status == serve_config.ServeAppState.RUNNING else 0


@pytest.mark.timeout(300)
async def test_datacentre_lifecycle_through_the_control_plane(ray_cluster: local_ray.LocalRayEndpoints, tmp_path: pathlib.Path) -> None:
    built = onnx_models.build_mlp(tmp_path / "artifacts" / "dc.onnx", in_dim=8, hidden=16, out_dim=4, seed=9)
    fleet = harness.Fleet(tmp_path)
    cp = await fleet.start_control_plane(local_ray_endpoints=ray_cluster, resync_s=1.0)
    app = "ep-dc-dep.v.dc-test"  # ep-<deployment>.<variant>.<site>
    try:
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            resp = await http.post("/v1/apply", content=SITE.replace("SHA", built.sha256) + "---\n" + DEPLOYMENT.replace("REPLICAS", "1"))
            assert resp.status_code == 200, resp.text
            await harness.wait_until(lambda: ready_apps(cp, app) == 1, 180, what="one RUNNING replica")
            await harness.wait_until(lambda: any(e.healthy for e in cp.table.endpoints("dcmodel")), 30, what="dc endpoint")
            x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
            body = {"inputs": [{"name": "input", "shape": [2, 8], "datatype": "FP32", "data": x.ravel().tolist()}]}
            r = await http.post("/v2/models/dcmodel/infer", json=body)
            assert r.status_code == 200, r.text
            assert r.headers["x-edgeplane-site"] == "dc-test" and r.headers["x-edgeplane-tier"] == "datacenter"
            expected = onnx_models.mlp_reference(x, onnx_models.mlp_weights(8, 16, 4, 2, 9), softmax=True)
            np.testing.assert_allclose(np.array(r.json()["outputs"][0]["data"]).reshape(2, 4), expected, rtol=1e-4, atol=1e-5)

            # scale up by changing the manifest
            assert (await http.post("/v1/apply", content=DEPLOYMENT.replace("REPLICAS", "2"))).status_code == 200
            await harness.wait_until(lambda: ready_apps(cp, app) == 2, 180, what="two RUNNING replicas")
            await harness.wait_until(lambda: cp.store.get("ModelDeployment", "dc-dep").status.get("readyReplicas") == 2, 30, what="status 2 ready")

            # a deposed leader's Serve config landing late (one replica) is put right by the next pass
            stale = tuple(dataclasses.replace(a, num_replicas=1) for a in cp.reconciler.last_snapshot.applied_apps["dc-test"])
            deposed = ray_cluster.actuator()
            try:
                await deposed.apply(stale)
            finally:
                await deposed.close()
            await harness.wait_until(lambda: any(e.action == "serve-reapplied" for e in cp.store.recent_events("Site", "dc-test")), 60,
                                     what="the data centre's Serve applications applied again")
            reapplied = next(e for e in cp.store.recent_events("Site", "dc-test") if e.action == "serve-reapplied")
            assert f"configured otherwise: {app}" in reapplied.reason, reapplied.reason
            assert 'edgeplane_datacentre_reapplied_total{site="dc-test"} 1.0' in (await http.get("/metrics")).text
            await harness.wait_until(lambda: ready_apps(cp, app) == 2, 180, what="two RUNNING replicas again")

            # a broken app surfaces its error in status and describe, and disturbs nothing else
            assert (await http.post("/v1/apply", content=BROKEN)).status_code == 200
            await harness.wait_until(lambda: cp.store.get("ModelDeployment", "broken-dep").status.get("phase") == "Failing", 120, what="broken app Failing")
            described = (await http.get("/v1/modeldeployments/broken-dep", params={"describe": "true"})).json()
            assert "no_such_module" in described["status"]["reason"]
            assert (await http.post("/v2/models/dcmodel/infer", json=body)).status_code == 200
            assert cp.store.get("ModelDeployment", "dc-dep").status["phase"] == "Running"

            # delete removes the Serve applications
            assert (await http.delete("/v1/modeldeployments/broken-dep")).status_code == 200
            assert (await http.delete("/v1/modeldeployments/dc-dep")).status_code == 200
            await harness.wait_until(lambda: not (cp.reconciler.last_snapshot.datacentres["dc-test"].apps), 120, what="apps removed")
            gone = await http.post("/v2/models/dcmodel/infer", json=body)
            assert gone.status_code == 404
            events = (await http.get("/v1/events", params={"limit": 1000})).json()["items"]
            assert any(e["action"] == "serve-applied" and e["name"] == "dc-test" for e in events)
            assert any(e["action"] == "replica-placed" and e["name"] == "dc-dep" for e in events)
    finally:
        await fleet.stop()


GPU_FLEET = """
apiVersion: edgeplane.io/v1alpha1
kind: Site
metadata: {name: dc-gpu}
spec:
  tier: datacenter
  location: {country: FR, lat: 48.85, lon: 2.35}
  capacity: {cpu: 64, memoryGiB: 256, gpus: [{model: H100, count: 2, memoryGiB: 80}]}
  ray: {address: local}
---
apiVersion: edgeplane.io/v1alpha1
kind: Model
metadata: {name: gpumodel}
spec:
  variants:
    - name: v
      runtime: onnx
      artifact: {uri: dc.onnx, sha256: "SHA"}
      resources: {cpu: 0.1, memoryMiB: 128, gpus: 1, gpuMemoryGiB: 40}
---
apiVersion: edgeplane.io/v1alpha1
kind: ModelDeployment
metadata: {name: gpu-dep}
spec:
  model: gpumodel
  placement: {tiers: [datacenter]}
"""


@pytest.mark.timeout(240)
async def test_a_cluster_without_the_gpus_says_so(ray_cluster: local_ray.LocalRayEndpoints, tmp_path: pathlib.Path) -> None:
    """The Site declares GPUs, the Ray cluster has none: the cause shows in status and describe."""
    built = onnx_models.build_mlp(tmp_path / "artifacts" / "dc.onnx", in_dim=8, hidden=16, out_dim=4, seed=9)
    fleet = harness.Fleet(tmp_path)
    cp = await fleet.start_control_plane(local_ray_endpoints=ray_cluster, resync_s=1.0)
    try:
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            assert (await http.post("/v1/apply", content=GPU_FLEET.replace("SHA", built.sha256))).status_code == 200
            await harness.wait_until(lambda: "GPU" in (cp.store.get("ModelDeployment", "gpu-dep").status.get("reason") or ""), 120,
                                     what="the missing GPU in the status")
            described = (await http.get("/v1/modeldeployments/gpu-dep", params={"describe": "true"})).json()
            assert "largest node has" in described["status"]["reason"]
            assert described["status"]["readyReplicas"] == 0
            assert (await http.delete("/v1/modeldeployments/gpu-dep")).status_code == 200
            await harness.wait_until(lambda: not cp.reconciler.last_snapshot.datacentres["dc-gpu"].apps, 60, what="app removed")
    finally:
        await fleet.stop()

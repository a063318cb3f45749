"""The Serve REST actuator against the session's real local Ray cluster."""

from __future__ import annotations

import asyncio
import json
import pathlib

import httpx
import numpy as np
import pytest

from edgeplane_proto import oip
from orchestrator import ports
from orchestrator.adapters import local_ray, ray_serve
from orchestrator.adapters.ownership import OwnedElsewhere, Ownership
from orchestrator.adapters.serve_config import (
    RayAuthError,
    RayUnreachable,
    ServeAppFailed,
    ServeAppSpec,
    ServeAppState,
)
from orchestrator.testing import onnx_models

SMALL_CPU = 0.1


def onnx_spec(name: str, model: onnx_models.BuiltModel | None, **overrides: object) -> ServeAppSpec:
    """``model``: the artifact, unless ``overrides`` name it (``artifact_uri``, ``sha256``)."""
    fields: dict[str, object] = {
        "name": name,
        "route_prefix": f"/ep/{name.removeprefix('ep-')}",
        "model_name": "mlp",
        "runtime": "onnx",
        "num_replicas": 1,
        "cpu": SMALL_CPU,
        "memory_mib": 64,
        "gpus": 0.0,
        "artifact_uri": model.path.as_uri() if model is not None else "",
        "sha256": model.sha256 if model is not None else "",
    }
    fields.update(overrides)
    return ServeAppSpec(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> onnx_models.BuiltModel:
    return onnx_models.build_mlp(tmp_path_factory.mktemp("models") / "mlp.onnx", seed=3)


def reference(x: np.ndarray) -> np.ndarray:
    return onnx_models.mlp_reference(x, onnx_models.mlp_weights(8, 16, 4, 2, 3), softmax=True)


async def test_onnx_app_answers_v2_like_the_agent(
    serve_actuator: ray_serve.RayServeActuator, mlp: onnx_models.BuiltModel
) -> None:
    await serve_actuator.apply([onnx_spec("ep-infer", mlp)])
    statuses = await ray_serve.wait_until_running(serve_actuator, ["ep-infer"], timeout_s=90)
    status = statuses["ep-infer"]
    assert (status.replicas_running, status.replicas_target) == (1, 1)
    assert status.endpoint_url is not None and status.endpoint_url.endswith("/ep/infer")
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    async with httpx.AsyncClient(base_url=status.endpoint_url, timeout=30) as client:
        assert (await client.get("/v2/health/live")).json() == {"live": True}
        assert (await client.get("/v2/health/ready")).status_code == 200
        assert (await client.get("/v2/models/mlp/ready")).json()["ready"] is True
        meta = (await client.get("/v2/models/mlp")).json()
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 8]}]
        assert (await client.get("/v2/models/other")).status_code == 404
        # one version, the file's: the first 12 digits of its sha256, as an edge agent names it
        version = mlp.sha256[:12]
        assert meta["versions"] == [version]
        assert status.version == version  # what the gateway's table routes versioned requests by
        assert (await client.get(f"/v2/models/mlp/versions/{version}/ready")).json()["ready"] is True
        wrong = await client.post("/v2/models/mlp/versions/1/infer", content=oip.encode_request({"input": x})[0])
        assert wrong.status_code == 404 and version in wrong.json()["error"], wrong.text

        body, _ = oip.encode_request({"input": x}, id="r1")
        answer = await client.post(f"/v2/models/mlp/versions/{version}/infer", content=body)
        assert answer.status_code == 200, answer.text
        decoded = oip.decode_response(answer.content)
        assert decoded.id == "r1" and decoded.model_name == "mlp" and decoded.model_version == version
        np.testing.assert_allclose(decoded.outputs[0].array, reference(x), rtol=1e-5, atol=1e-6)

        body, length = oip.encode_request({"input": x}, binary=True)
        answer = await client.post(
            "/v2/models/mlp/infer", content=body, headers={oip.BINARY_HEADER: str(length)}
        )
        assert answer.status_code == 200, answer.text
        decoded = oip.decode_response(answer.content, int(answer.headers[oip.BINARY_HEADER]))
        np.testing.assert_allclose(decoded.outputs[0].array, reference(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("tensor", "fragment"),
    [
        ({"name": "input", "datatype": "FP32", "shape": [2, 3], "data": [0.0] * 6}, "shape"),
        ({"name": "input", "datatype": "INT64", "shape": [1, 8], "data": [0] * 8}, "FP32"),
        ({"name": "nope", "datatype": "FP32", "shape": [1, 8], "data": [0.0] * 8}, "unknown"),
        ({"name": "input", "datatype": "FP32", "shape": [1, 8], "data": [0.0] * 7}, "elements"),
    ],
)
async def test_onnx_app_answers_400_on_bad_tensors(
    serve_actuator: ray_serve.RayServeActuator,
    mlp: onnx_models.BuiltModel,
    tensor: dict[str, object],
    fragment: str,
) -> None:
    # Same spec every case: the app is deployed once and only re-checked afterwards.
    await serve_actuator.apply([onnx_spec("ep-badinput", mlp)])
    statuses = await ray_serve.wait_until_running(serve_actuator, ["ep-badinput"], timeout_s=90)
    url = f"{statuses['ep-badinput'].endpoint_url}/v2/models/mlp/infer"
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(url, content=json.dumps({"inputs": [tensor]}))
    assert answer.status_code == 400
    assert fragment in answer.json()["error"]


async def test_scale_up_down_then_remove(
    serve_actuator: ray_serve.RayServeActuator, mlp: onnx_models.BuiltModel
) -> None:
    await serve_actuator.apply([onnx_spec("ep-scale", mlp, num_replicas=2)])
    statuses = await ray_serve.wait_until_running(
        serve_actuator, ["ep-scale"], replicas={"ep-scale": 2}, timeout_s=90
    )
    assert statuses["ep-scale"].replicas_target == 2
    await serve_actuator.apply([onnx_spec("ep-scale", mlp, num_replicas=1)])
    statuses = await ray_serve.wait_until_running(
        serve_actuator, ["ep-scale"], replicas={"ep-scale": 1}, timeout_s=90
    )
    assert statuses["ep-scale"].replicas_target == 1
    await serve_actuator.apply([])
    await ray_serve.wait_until_gone(serve_actuator, ["ep-scale"], timeout_s=60)


async def test_applications_another_writer_changed_are_drift_until_applied_again(
    serve_actuator: ray_serve.RayServeActuator, ray_cluster: local_ray.LocalRayEndpoints, mlp: onnx_models.BuiltModel
) -> None:
    """A deposed leader's PUT that lands after the new leader's: the actuator that applied
    last sees its applications changed and others added, and applying again fixes it.
    Serve's own defaults in what it reports are not a difference."""
    ours = [onnx_spec("ep-drift", mlp)]
    await serve_actuator.observe()
    assert serve_actuator.drift == ""  # nothing applied yet: nothing to compare
    await serve_actuator.apply(ours)
    await ray_serve.wait_until_running(serve_actuator, ["ep-drift"], timeout_s=90)
    assert serve_actuator.drift == ""
    deposed = ray_cluster.actuator()
    try:
        await deposed.apply([onnx_spec("ep-drift", mlp, num_replicas=2), onnx_spec("ep-stale", mlp)])
    finally:
        await deposed.close()
    await serve_actuator.observe()
    assert serve_actuator.drift == "not applied by this control plane: ep-stale; configured otherwise: ep-drift"
    await serve_actuator.apply(ours)
    await serve_actuator.observe()
    assert serve_actuator.drift == ""  # ep-stale is on its way out
    statuses = await ray_serve.wait_until_running(serve_actuator, ["ep-drift"], replicas={"ep-drift": 1}, timeout_s=90)
    assert statuses["ep-drift"].replicas_target == 1
    await ray_serve.wait_until_gone(serve_actuator, ["ep-stale"], timeout_s=60)


async def test_ray_serve_runtime_passes_import_path_and_args_through(
    ray_cluster: local_ray.LocalRayEndpoints,
    serve_actuator: ray_serve.RayServeActuator,
    mlp: onnx_models.BuiltModel,
) -> None:
    # Any importable Serve builder is a "user" application; the built-in one is at hand.
    spec = ServeAppSpec(
        name="ep-userapp",
        route_prefix="/ep/userapp",
        model_name="custom",
        runtime="ray-serve",
        num_replicas=1,
        cpu=SMALL_CPU,
        import_path="orchestrator.serving.onnx_app:build",
        args={"artifact_uri": str(mlp.path), "sha256": mlp.sha256, "model_name": "custom"},
    )
    await serve_actuator.apply([spec])
    statuses = await ray_serve.wait_until_running(serve_actuator, ["ep-userapp"], timeout_s=90)
    async with httpx.AsyncClient(timeout=30) as client:
        ready = await client.get(f"{statuses['ep-userapp'].endpoint_url}/v2/models/custom/ready")
    assert ready.status_code == 200
    # Second pass: the ingress deployment is now known, so edgeplane sizes it.
    await serve_actuator.apply([spec])
    headers = {"Authorization": f"Bearer {ray_cluster.token()}"}
    async with httpx.AsyncClient(base_url=ray_cluster.dashboard_url, headers=headers) as admin:
        details = (await admin.get(ray_serve.APPLICATIONS_PATH)).json()
    deployed = details["applications"]["ep-userapp"]["deployed_app_config"]
    assert deployed["import_path"] == "orchestrator.serving.onnx_app:build"
    assert deployed["args"]["model_name"] == "custom"
    assert deployed["route_prefix"] == "/ep/userapp"
    assert deployed["deployments"][0]["name"] == "OnnxModel"
    assert deployed["deployments"][0]["ray_actor_options"]["num_cpus"] == SMALL_CPU


async def test_missing_import_path_surfaces_deploy_failed(
    serve_actuator: ray_serve.RayServeActuator,
) -> None:
    spec = ServeAppSpec(
        name="ep-missing",
        route_prefix="/ep/missing",
        model_name="m",
        runtime="ray-serve",
        num_replicas=1,
        cpu=SMALL_CPU,
        import_path="edgeplane_no_such_module.app:build",
    )
    await serve_actuator.apply([spec])
    with pytest.raises(ServeAppFailed) as failed:
        await ray_serve.wait_until_running(serve_actuator, ["ep-missing"], timeout_s=60)
    assert failed.value.app == "ep-missing"
    assert "No module named 'edgeplane_no_such_module'" in failed.value.message
    status = (await serve_actuator.observe())["ep-missing"]
    assert status.status is ServeAppState.DEPLOY_FAILED
    assert "Traceback" not in status.message and "Traceback" in status.detail


async def test_artifact_sha_mismatch_is_refused_before_loading(
    serve_actuator: ray_serve.RayServeActuator, mlp: onnx_models.BuiltModel
) -> None:
    await serve_actuator.apply([onnx_spec("ep-badsha", mlp, sha256="0" * 64)])
    with pytest.raises(ServeAppFailed) as failed:
        await ray_serve.wait_until_running(serve_actuator, ["ep-badsha"], timeout_s=60)
    assert "refusing to load" in failed.value.message
    assert mlp.sha256 in failed.value.message


async def test_onnx_app_serves_a_model_with_external_data_from_its_package(
    serve_actuator: ray_serve.RayServeActuator, tmp_path: pathlib.Path
) -> None:
    from orchestrator.artifacts import onnx_package

    out = tmp_path / "packed.tar"
    facts = onnx_package.pack(onnx_models.save_with_external_data(tmp_path / "model"), out)
    spec = onnx_spec("ep-packed", None, artifact_uri=out.as_uri(), sha256=facts.sha256, model_name="m")
    await serve_actuator.apply([spec])
    status = (await ray_serve.wait_until_running(serve_actuator, ["ep-packed"], timeout_s=90))["ep-packed"]
    assert status.endpoint_url is not None
    x = np.linspace(-1.0, 1.0, 8 * 16, dtype=np.float32).reshape(8, 16)
    async with httpx.AsyncClient(base_url=status.endpoint_url, timeout=30) as client:
        response = await client.post("/v2/models/m/infer", content=oip.encode_request({"x": x})[0])
    assert response.status_code == 200, response.text
    np.testing.assert_array_equal(oip.decode_response(response.content).outputs[0].array, onnx_models.run_in_one_file(x))


async def test_a_file_that_does_not_take_the_declared_inputs_fails_its_application_naming_them(
    serve_actuator: ray_serve.RayServeActuator, mlp: onnx_models.BuiltModel
) -> None:
    declared = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 5]}],
                "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 4]}]}
    await serve_actuator.apply([onnx_spec("ep-declared", mlp, args=declared)])
    with pytest.raises(ServeAppFailed) as failed:
        await ray_serve.wait_until_running(serve_actuator, ["ep-declared"], timeout_s=90)
    message = failed.value.message
    assert "input 'input' is declared FP32 [-1, 5], but the file takes FP32 [-1, 8]" in message, message
    assert "Traceback" not in message, message


async def test_apps_not_owned_by_edgeplane_survive_apply(
    ray_cluster: local_ray.LocalRayEndpoints,
    serve_actuator: ray_serve.RayServeActuator,
    mlp: onnx_models.BuiltModel,
    tmp_path: pathlib.Path,
) -> None:
    (tmp_path / "team_app.py").write_text(
        "from ray import serve\n"
        "@serve.deployment(ray_actor_options={'num_cpus': 0.1})\n"
        "class Team:\n"
        "    async def __call__(self, request):\n"
        "        return 'team'\n"
        "app = Team.bind()\n"
    )
    foreign = {
        "name": "team-app",
        "route_prefix": "/team",
        "import_path": "team_app:app",
        "runtime_env": {"env_vars": {"PYTHONPATH": str(tmp_path)}},
    }
    headers = {"Authorization": f"Bearer {ray_cluster.token()}"}
    async with httpx.AsyncClient(base_url=ray_cluster.dashboard_url, headers=headers) as admin:
        current = (await admin.get(ray_serve.APPLICATIONS_PATH)).json()
        put = await admin.put(
            ray_serve.APPLICATIONS_PATH,
            json={
                "http_options": current.get("http_options") or ray_cluster.http_options(),
                "applications": [foreign],
            },
        )
        assert put.status_code == 200, put.text
        try:
            await serve_actuator.apply([onnx_spec("ep-neighbour", mlp)])
            await ray_serve.wait_until_running(serve_actuator, ["ep-neighbour"], timeout_s=90)
            await serve_actuator.apply([])
            await ray_serve.wait_until_gone(serve_actuator, ["ep-neighbour"], timeout_s=60)
            apps = (await admin.get(ray_serve.APPLICATIONS_PATH)).json()["applications"]
            assert apps["team-app"]["status"] == "RUNNING"
            assert "team-app" not in await serve_actuator.observe()
            async with httpx.AsyncClient(timeout=30) as client:
                assert (await client.get(f"{ray_cluster.serve_url}/team")).text == "team"
        finally:
            await admin.put(
                ray_serve.APPLICATIONS_PATH,
                json={"http_options": ray_cluster.http_options(), "applications": []},
            )


async def test_not_enough_gpus_is_visible_and_disturbs_nothing_else(
    serve_actuator: ray_serve.RayServeActuator, mlp: onnx_models.BuiltModel
) -> None:
    greedy = onnx_spec("ep-greedy", mlp, gpus=1.0)
    modest = onnx_spec("ep-modest", mlp)
    await serve_actuator.apply([greedy, modest])
    await ray_serve.wait_until_running(serve_actuator, ["ep-modest"], timeout_s=90)
    status = None
    for _ in range(120):  # the app is built first, then its deployment asks for resources
        status = (await serve_actuator.observe())["ep-greedy"]
        if "cannot place a replica" in status.message:
            break
        await asyncio.sleep(0.25)
    assert status is not None and "1 GPU but the largest node has 0 GPU" in status.message
    assert status.status is not ServeAppState.RUNNING and status.replicas_running == 0


@pytest.mark.parametrize("token", [None, "not-the-token"])
async def test_missing_or_wrong_token_is_an_auth_error(
    ray_cluster: local_ray.LocalRayEndpoints, token: str | None
) -> None:
    provider = ray_serve.static_token(token) if token else ray_serve.no_token
    async with ray_serve.RayServeActuator(
        ray_cluster.dashboard_url, token_provider=provider
    ) as actuator:
        with pytest.raises(RayAuthError) as refused:
            await actuator.observe()
    assert refused.value.status_code == (401 if token is None else 403)
    assert ray_cluster.token() not in str(refused.value)
    assert (token or "@@") not in str(refused.value)
    assert refused.value.retryable is False


async def test_unreachable_dashboard() -> None:
    (port,) = ports.free_ports(1)
    async with ray_serve.RayServeActuator(f"http://127.0.0.1:{port}", timeout_s=2) as actuator:
        with pytest.raises(RayUnreachable) as down:
            await actuator.apply([])
    assert f"127.0.0.1:{port}" in str(down.value) and "ConnectError (" in str(down.value), str(down.value)
    assert down.value.retryable is True


async def test_a_site_marked_by_one_control_plane_on_a_real_cluster_is_refused_to_another_until_taken_over(
    ray_cluster: local_ray.LocalRayEndpoints,
) -> None:
    """The mark is a job on Ray's own Jobs API (token auth on, as Ray 2.60 has it): the
    first control plane marks the site at its first apply, a second one with another id
    reads it and changes nothing, and one given takeOverFrom marks it as its own."""
    site = f"owners-{ports.free_port()}"  # marks outlive the test on the shared cluster: one site of its own
    first = Ownership(owner="a" * 16, site=site)
    second = Ownership(owner="b" * 16, site=site)
    async with ray_cluster.actuator(owned_prefix=f"{site}-", ownership=first) as a, \
            ray_cluster.actuator(owned_prefix=f"{site}-", ownership=second) as b:
        await a.apply([])
        with pytest.raises(OwnedElsewhere) as refused:
            await b.observe()
        assert first.owner in str(refused.value) and f"takeOverFrom: {first.owner}" in str(refused.value)
        with pytest.raises(OwnedElsewhere):
            await b.apply([])
        await a.observe()  # its own: read as before
    taking = Ownership(owner=second.owner, site=site, take_over_from=first.owner)
    async with ray_cluster.actuator(owned_prefix=f"{site}-", ownership=taking) as b, \
            ray_cluster.actuator(owned_prefix=f"{site}-", ownership=first) as a:
        await b.apply([])
        await b.observe()
        with pytest.raises(OwnedElsewhere) as lost:
            await a.apply([])
        assert second.owner in str(lost.value)

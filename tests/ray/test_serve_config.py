"""Pure parts of the data-centre adapters: rendering, merging, status parsing (no Ray)."""

from __future__ import annotations

import http.server
import json
import pathlib
from typing import Any

import httpx
import pytest

from orchestrator.adapters import ray_serve, serve_config
from orchestrator.adapters.serve_config import ServeAppSpec, ServeAppState
from orchestrator.testing import loopback

SHA = "a" * 64


def onnx(name: str = "ep-a", **kw: Any) -> ServeAppSpec:
    base: dict[str, Any] = {
        "name": name,
        "route_prefix": "/ep/a",
        "model_name": "m",
        "runtime": "onnx",
        "num_replicas": 2,
        "cpu": 0.5,
        "memory_mib": 256,
        "gpus": 0.0,
        "artifact_uri": "file:///m.onnx",
        "sha256": SHA,
    }
    base.update(kw)
    return ServeAppSpec(**base)


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"runtime": "tf"}, "runtime"),
        ({"route_prefix": "ep/a"}, "route_prefix"),
        ({"route_prefix": "/ep/a/"}, "route_prefix"),
        ({"num_replicas": -1}, "num_replicas"),
        ({"cpu": -1.0}, ">= 0"),
        ({"sha256": None}, "sha256"),
        ({"sha256": "ABC"}, "sha256"),
        ({"artifact_uri": None}, "artifact_uri"),
        ({"name": "bad name"}, "name"),
        ({"name": "app\n"}, "name"),
        ({"runtime": "ray-serve", "import_path": "nocolon"}, "import_path"),
    ],
)
def test_invalid_specs_are_refused(overrides: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        onnx(**overrides)


@pytest.mark.parametrize(
    ("spec", "actor_options"),
    [
        (onnx(), {"num_cpus": 0.5, "memory": 256 * 1024 * 1024}),
        (onnx(gpus=1.0, memory_mib=0), {"num_cpus": 0.5, "num_gpus": 1.0}),
        (onnx(cpu=0.0, memory_mib=0), {"num_cpus": 0.0}),
    ],
)
def test_onnx_render(spec: ServeAppSpec, actor_options: dict[str, Any]) -> None:
    app = serve_config.render_application(spec)
    assert app["import_path"] == serve_config.ONNX_IMPORT_PATH
    assert app["args"] == {"artifact_uri": "file:///m.onnx", "sha256": SHA, "model_name": "m"}
    assert app["deployments"] == [
        {"name": "OnnxModel", "num_replicas": 2, "ray_actor_options": actor_options}
    ]


def test_ray_serve_render_sizes_named_or_learnt_deployment_only() -> None:
    user = ServeAppSpec(
        name="ep-u", route_prefix="/ep/u", model_name="u", runtime="ray-serve",
        num_replicas=3, cpu=1, import_path="pkg.mod:app", args={"k": 1},
    )  # fmt: skip
    app = serve_config.render_application(user)
    assert app == {"name": "ep-u", "route_prefix": "/ep/u", "import_path": "pkg.mod:app",
                   "args": {"k": 1}}  # fmt: skip
    learnt = serve_config.render_application(user, "Ingress")
    assert learnt["deployments"][0]["name"] == "Ingress"
    named = serve_config.render_application(
        ServeAppSpec(**{**user.__dict__, "deployment": "Model"}), "Ingress"
    )
    assert named["deployments"][0]["name"] == "Model"


@pytest.mark.parametrize(
    ("message", "summary"),
    [
        ("", ""),
        ("plain words", "plain words"),
        (
            (
                "Deploying app 'x' failed with exception:\nTraceback (most recent call last):\n"
                '  File "a.py", line 1, in <module>\n    import x\n    ^^^^\n'
                "ModuleNotFoundError: No module named 'x'\n"
            ),
            "ModuleNotFoundError: No module named 'x'",
        ),
        ("\x1b[36mcolour\x1b[39m", "colour"),
    ],
)
def test_summarize_message(message: str, summary: str) -> None:
    assert serve_config.summarize_message(message) == summary


def _details(apps: dict[str, Any], http_options: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"applications": apps, "http_options": http_options, "proxy_location": "EveryNode"}


class FakeServe:
    """Records what the actuator PUTs; answers GET with canned Serve details."""

    def __init__(self, details: dict[str, Any], status: int = 200) -> None:
        self.details = details
        self.status = status
        self.puts: list[dict[str, Any]] = []
        self.auth: list[str | None] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.auth.append(request.headers.get("Authorization"))
        if self.status != 200:
            return httpx.Response(self.status, text="nope")
        if request.method == "PUT":
            self.puts.append(json.loads(request.content))
            return httpx.Response(200)
        return httpx.Response(200, json=self.details)


async def test_apply_keeps_foreign_declarative_apps_and_replaces_owned_ones() -> None:
    foreign = {"name": "team", "route_prefix": "/team", "import_path": "t:app"}
    fake = FakeServe(
        _details(
            {
                "team": {"source": "declarative", "deployed_app_config": foreign},
                "notebook": {"source": "imperative", "deployed_app_config": None},
                "ep-old": {"source": "declarative", "deployed_app_config": {"name": "ep-old"}},
            },
            http_options={"host": "0.0.0.0", "port": 8000},
        )
    )
    actuator = ray_serve.RayServeActuator(
        "http://ray:8265",
        token_provider=ray_serve.static_token("s3cret"),
        transport=httpx.MockTransport(fake),
    )
    await actuator.apply([onnx()])
    await actuator.close()
    (put,) = fake.puts
    assert [a["name"] for a in put["applications"]] == ["team", "ep-a"]
    assert put["applications"][0] == foreign
    assert put["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert set(fake.auth) == {"Bearer s3cret"}
    assert "s3cret" not in repr(actuator)


async def test_apply_keeps_the_clusters_target_capacity() -> None:
    """target_capacity scales every application on the cluster: another team's gradual
    migration at 50 % stays at 50 % however often edgeplane applies."""
    fake = FakeServe({**_details({}), "target_capacity": 50.0})
    async with ray_serve.RayServeActuator("http://ray:8265", transport=httpx.MockTransport(fake)) as actuator:
        await actuator.apply([onnx()])
        await actuator.apply([])
    assert [put.get("target_capacity") for put in fake.puts] == [50.0, 50.0]


async def test_apply_starts_serve_with_own_http_options_when_not_running() -> None:
    fake = FakeServe({"applications": {}})
    async with ray_serve.RayServeActuator(
        "http://ray:8265",
        http_options={"host": "127.0.0.1", "port": 18000},
        transport=httpx.MockTransport(fake),
    ) as actuator:
        await actuator.apply([])
    assert fake.puts == [{"applications": [], "http_options": {"host": "127.0.0.1", "port": 18000}}]
    assert fake.auth == [None, None]


async def test_apply_refuses_unowned_or_duplicate_names() -> None:
    async with ray_serve.RayServeActuator(
        "http://ray:8265", transport=httpx.MockTransport(FakeServe({}))
    ) as actuator:
        with pytest.raises(ValueError, match="prefix"):
            await actuator.apply([onnx(name="mine")])
        with pytest.raises(ValueError, match="unique"):
            await actuator.apply([onnx(), onnx()])


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (401, serve_config.RayAuthError),
        (403, serve_config.RayAuthError),
        (503, serve_config.RayUnreachable),
        (404, serve_config.RayServeError),
        (500, serve_config.RayServeError),
    ],
)
async def test_http_errors_are_translated(status: int, error: type[Exception]) -> None:
    async with ray_serve.RayServeActuator(
        "http://ray:8265", transport=httpx.MockTransport(FakeServe({}, status))
    ) as actuator:
        with pytest.raises(error):
            await actuator.observe()


async def test_put_400_is_config_rejected() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "PUT":
            return httpx.Response(400, text="ValidationError: route_prefix")
        return httpx.Response(200, json={"applications": {}})

    async with ray_serve.RayServeActuator(
        "http://ray:8265", transport=httpx.MockTransport(handler)
    ) as actuator:
        with pytest.raises(serve_config.ServeConfigRejected, match="route_prefix"):
            await actuator.apply([])


def test_status_from_details_counts_running_replicas_of_the_ingress() -> None:
    app = {
        "status": "DEPLOYING",
        "message": "",
        "route_prefix": "/ep/a",
        "deployment_topology": {"ingress_deployment": "Ingress"},
        "deployments": {
            "Ingress": {
                "name": "Ingress",
                "target_num_replicas": 3,
                "message": "Deployment 'Ingress' has 1 replicas that have taken more than 30s",
                "replicas": [{"state": "RUNNING"}, {"state": "RUNNING"}, {"state": "STARTING"}],
            },
            "Helper": {"name": "Helper", "target_num_replicas": 5, "replicas": []},
        },
    }
    status = ray_serve.status_from_details("ep-a", app, "http://proxy:8000")
    assert status.status is ServeAppState.DEPLOYING
    assert (status.replicas_running, status.replicas_target) == (2, 3)
    assert status.endpoint_url == "http://proxy:8000/ep/a"
    assert "taken more than 30s" in status.message


def test_an_onnx_applications_version_is_known_while_it_runs_the_config_deployed() -> None:
    """Serve's RUNNING says every replica runs the config deployed, so the model file it
    names is what they answer for; while it deploys, replicas may hold either file."""
    sha = "ab" * 32
    deployed = {"import_path": serve_config.ONNX_IMPORT_PATH, "args": {"artifact_uri": "http://a/m.onnx", "sha256": sha}}
    app = {"status": "RUNNING", "route_prefix": "/ep/a", "deployed_app_config": deployed, "deployments": {}}
    assert ray_serve.status_from_details("ep-a", app, "http://proxy:8000").version == sha[:12]
    assert ray_serve.status_from_details("ep-a", {**app, "status": "DEPLOYING"}, "http://proxy:8000").version == ""
    other = {**app, "deployed_app_config": {"import_path": "team.app:build", "args": {"sha256": sha}}}
    assert ray_serve.status_from_details("ep-a", other, "http://proxy:8000").version == ""  # not a file edgeplane names


@pytest.mark.parametrize(("deployment_status", "known"), [("UPSCALING", True), ("DOWNSCALING", True), ("UPDATING", False)])
def test_an_application_scaled_through_its_config_keeps_its_version_and_answers(deployment_status: str, known: bool) -> None:
    """Serve says DEPLOYING while a replica count changes through the config (as edgeplane
    scales an application): its replicas all still run the config deployed, and answer; a
    new config rolling out (UPDATING) leaves the version unknown, the old replicas answering."""
    sha = "cd" * 32
    app = {"status": "DEPLOYING", "route_prefix": "/ep/a",
           "deployed_app_config": {"import_path": serve_config.ONNX_IMPORT_PATH, "args": {"sha256": sha}},
           "deployments": {serve_config.ONNX_DEPLOYMENT: {"status": deployment_status, "target_num_replicas": 4,
                                                          "replicas": [{"state": "RUNNING"}, {"state": "STARTING"}]}}}
    status = ray_serve.status_from_details("ep-a", app, "http://proxy:8000")
    assert status.version == (sha[:12] if known else "")
    assert status.answers
    assert not ray_serve.status_from_details("ep-a", {**app, "deployments": {}}, "http://proxy:8000").answers  # none running yet


def test_an_application_whose_ingress_is_up_before_its_model_answers_nothing_yet() -> None:
    """On its first deploy an application's ingress may run before the deployment behind it
    (a Ray Serve LLM's engine before its OpenAI ingress, or the other way): it is not
    routed to until every deployment has a replica running."""
    app = {"status": "DEPLOYING", "route_prefix": "/ep/a", "deployment_topology": {"ingress_deployment": "Ingress"},
           "deployments": {"Ingress": {"status": "HEALTHY", "target_num_replicas": 1, "replicas": [{"state": "RUNNING"}]},
                           "Model": {"status": "UPDATING", "target_num_replicas": 1, "replicas": [{"state": "STARTING"}]}}}
    status = ray_serve.status_from_details("ep-a", app, "http://proxy:8000")
    assert status.replicas_running == 1 and not status.answers
    app["deployments"]["Model"]["replicas"] = [{"state": "RUNNING"}]
    assert ray_serve.status_from_details("ep-a", app, "http://proxy:8000").answers


def test_demand_sums_replicas() -> None:
    demand = serve_config.total_demand([onnx(), onnx(name="ep-b", gpus=0.5, num_replicas=4)])
    assert (demand.cpu, demand.memory_mib, demand.gpus) == (3.0, 1536, 2.0)
    assert demand.largest_replica_gpus == 0.5


def _app_needing(required: dict[str, float]) -> dict[str, Any]:
    return {"deployments": {"OnnxModel": {"required_resources": required}}}


@pytest.mark.parametrize(
    ("required", "nodes", "fragment"),
    [
        ({"CPU": 0.1, "GPU": 1}, [{"CPU": 8.0}], "1 GPU but the largest node has 0 GPU"),
        ({"CPU": 16}, [{"CPU": 8.0}, {"CPU": 4.0}], "16 CPU but the largest node has 8 CPU"),
        ({"CPU": 1, "memory": 2**31}, [{"CPU": 8.0, "memory": 2.0**30}], "2048 MiB memory"),
        ({"CPU": 1, "GPU": 1}, [{"CPU": 8.0}, {"CPU": 2.0, "GPU": 1.0}], ""),
        ({"CPU": 1, "GPU": 1}, [], ""),  # nodes unknown: say nothing
        ({}, [{"CPU": 1.0}], ""),
    ],
)
def test_unschedulable_reason(
    required: dict[str, float], nodes: list[dict[str, float]], fragment: str
) -> None:
    reason = ray_serve.unschedulable_reason(_app_needing(required), nodes)
    if fragment:
        assert fragment in reason and "'OnnxModel'" in reason
    else:
        assert reason == ""


async def test_sites_sharing_a_cluster_keep_each_others_apps() -> None:
    other_site = {"name": "ep-b--lyon", "route_prefix": "/ep/lyon/b", "import_path": "x:app"}
    fake = FakeServe(
        {
            "applications": {
                "ep-b--lyon": {"source": "declarative", "deployed_app_config": other_site},
                "ep-a--paris": {"source": "declarative", "deployed_app_config": {}},
            }
        }
    )
    async with ray_serve.RayServeActuator(
        "http://ray:8265",
        owns=lambda name: name.startswith("ep-") and name.endswith("--paris"),
        transport=httpx.MockTransport(fake),
    ) as paris:
        await paris.apply([])
        with pytest.raises(ValueError, match="not one this actuator owns"):
            await paris.apply([onnx(name="ep-a--lyon")])
    assert fake.puts[0]["applications"] == [other_site]


async def test_an_empty_token_file_is_named_not_sent_as_no_token(tmp_path: pathlib.Path) -> None:
    """A Site's tokenFile that is empty (a secret not filled in yet) was read as "no token":
    the cluster answered 401 and the error said no token was set, though one was."""
    asked: list[str | None] = []

    class Refusing(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.headers.get("authorization"))
            self.send_response(401)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    token_file = tmp_path / "ray-token"
    token_file.write_text("\n")
    with loopback.http_server(Refusing) as dashboard:
        async with ray_serve.RayServeActuator(dashboard, token_provider=ray_serve.token_from_file(token_file)) as actuator:
            with pytest.raises(serve_config.RayServeError, match=f"the Ray token file {token_file} is empty"):
                await actuator.observe()
    assert asked == []  # nothing is sent without the token

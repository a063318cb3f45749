"""Ray Serve LLM applications: every generated ``LLMConfig`` is one Ray itself accepts,
status counts engine replicas, and on the shared local Ray (no vLLM there) a deployed one
fails clearly.

Ray's ``LLMConfig`` is imported from the module that defines it: ``ray.serve.llm``
re-exports it but also imports the OpenAI protocol models, which need vLLM (or SGLang)
installed. The config module needs only ``pyarrow`` (the ``dev`` extra).
"""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator import accelerator_types
from orchestrator.adapters import ray_serve, serve_config
from orchestrator.adapters.serve_config import LlmApp, ServeAppFailed, ServeAppSpec, ServeAppState
from orchestrator.manifests import llm as llm_schema
from orchestrator.manifests import schema
from orchestrator.reconciler import applications, planning

llm_config_module = pytest.importorskip("ray.llm._internal.serve.core.configs.llm_config",
                                        reason="Ray Serve LLM's config module needs pyarrow (pip install -e '.[dev]')")
LLMConfig = llm_config_module.LLMConfig


def llm_variant(**llm: Any) -> schema.Variant:
    base: dict[str, Any] = {
        "source": "/mnt/models/gpt-oss-120b", "servedModelName": "openai/gpt-oss-120b", "contextLength": 32768,
        "maxConcurrentSequences": 8, "quantization": "mxfp4", "acceleratorType": "H100", "weightBytes": 65_300_000_000,
        "architecture": {"layers": 36, "kvHeads": 8, "headDim": 64, "slidingWindowLayers": 18, "slidingWindowTokens": 128},
    }
    base.update(llm)
    return schema.Variant.model_validate({"name": "v", "runtime": "vllm", "resources": {"cpu": 8}, "llm": base})


def app_spec(llm: LlmApp, replicas: int = 2, cpu: float = 8) -> ServeAppSpec:
    return ServeAppSpec(name="ep-gpt--dc", route_prefix="/ep/dc/gpt", model_name="gpt", runtime="vllm",
                        num_replicas=replicas, cpu=cpu, gpus=float(llm.gpus), llm=llm)


GENERATED = [
    ("gpt-oss-120b-1xH100", applications.llm_app(llm_variant().llm, "gpt")),  # type: ignore[arg-type]
    ("llama-70b-tp8-fp8-kv", applications.llm_app(llm_variant(
        source="s3://weights/llama-3-70b", servedModelName=None, tensorParallelSize=8, acceleratorType="A100-80G",
        quantization=None, kvCacheDtypeBytes=1, weightBytes=141_107_412_992,
        architecture={"layers": 80, "kvHeads": 8, "headDim": 128},
        engineArgs={"enable_prefix_caching": True, "enforce_eager": True}).llm, "llama")),  # type: ignore[arg-type]
    ("llama-70b-tp4-pp2", applications.llm_app(llm_variant(
        source="s3://weights/llama-3-70b", tensorParallelSize=4, pipelineParallelSize=2, quantization=None,
        weightBytes=141_107_412_992, architecture={"layers": 80, "kvHeads": 8, "headDim": 128}).llm, "llama")),  # type: ignore[arg-type]
    ("hub-id-no-accelerator", applications.llm_app(llm_variant(source="openai/gpt-oss-20b", acceleratorType=None,
                                                           dtype="bfloat16").llm, "gpt-20b")),  # type: ignore[arg-type]
    ("gpt-oss-20b-lora", applications.llm_app(llm_variant(
        source="openai/gpt-oss-20b", servedModelName=None, lora={"adaptersFrom": "s3://adapters/gpt-oss-20b/", "maxRank": 64}).llm,
        "gpt-20b")),  # type: ignore[arg-type]
    ("llama-70b-tp4-lora-azure", applications.llm_app(llm_variant(
        source="s3://weights/llama-3-70b", tensorParallelSize=4, quantization=None, weightBytes=141_107_412_992,
        architecture={"layers": 80, "kvHeads": 8, "headDim": 128},
        lora={"adaptersFrom": "abfss://adapters@account.dfs.core.windows.net/llama", "maxAdaptersPerReplica": 4}).llm,
        "llama")),  # type: ignore[arg-type]
    ("gpt-oss-20b-lora-slow-bucket", applications.llm_app(llm_variant(
        source="openai/gpt-oss-20b", servedModelName=None,
        lora={"adaptersFrom": "s3://adapters/gpt-oss-20b", "downloadTimeoutSeconds": 300, "downloadAttempts": 1}).llm,
        "gpt-20b")),  # type: ignore[arg-type]
]


@pytest.mark.parametrize("case_id,llm", GENERATED, ids=[c[0] for c in GENERATED])
@pytest.mark.parametrize("autoscaling", [None, (1, 4)])
def test_generated_config_validates_against_rays_llmconfig(case_id: str, llm: LlmApp, autoscaling: tuple[int, int] | None) -> None:
    if autoscaling is not None:
        llm = LlmApp(**{**llm.__dict__, "autoscaling": autoscaling})
    app = serve_config.render_application(app_spec(llm))
    assert app["import_path"] == "ray.serve.llm:build_openai_app" and app["route_prefix"] == "/ep/dc/gpt"
    # sized through the engine deployment Ray Serve LLM makes, outside the LLMConfig (see below)
    (engines,) = app["deployments"]
    assert engines["name"] == serve_config.llm_deployment(llm.model_id)
    (raw,) = app["args"]["llm_configs"]
    config = LLMConfig.model_validate(raw)
    assert config.model_loading_config.model_id == llm.model_id
    assert config.model_loading_config.model_source == llm.source
    assert config.engine_kwargs["tensor_parallel_size"] == llm.tensor_parallel_size
    # Ray starts tensor_parallel_size x pipeline_parallel_size engine workers, one per bundle
    # (VLLMEngineConfig.num_devices), and the scheduler gave the replica as many GPUs
    workers = config.engine_kwargs["tensor_parallel_size"] * config.engine_kwargs.get("pipeline_parallel_size", 1)
    bundles = config.placement_group_config["bundles"]
    assert len(bundles) == workers == llm.gpus and all(b["GPU"] == 1 for b in bundles)
    assert config.placement_group_config["strategy"] == "STRICT_PACK"
    assert sum(b["CPU"] for b in bundles) == pytest.approx(8)
    assert config.deployment_config == {}
    if autoscaling is None:
        assert engines == {"name": engines["name"], "num_replicas": 2, "autoscaling_config": None}
    else:
        assert engines == {"name": engines["name"], "autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 2}}
    assert (config.accelerator_type or None) == llm.accelerator_type
    if llm.lora is None:
        assert config.lora_config is None and not {"enable_lora", "max_loras", "max_lora_rank"} & set(config.engine_kwargs)
    else:
        # Ray's multi-LoRA: adapters from the path, an LRU of max_num_adapters_per_replica per
        # replica (Ray's multiplexing), and vLLM's max_loras equal to it, as Ray asks
        assert config.lora_config.dynamic_lora_loading_path == llm.lora.path.rstrip("/")
        assert config.lora_config.max_num_adapters_per_replica == llm.lora.max_per_replica
        assert config.multiplex_config().max_num_models_per_replica == llm.lora.max_per_replica
        assert config.engine_kwargs["enable_lora"] is True
        assert config.engine_kwargs["max_loras"] == llm.lora.max_per_replica
        assert config.engine_kwargs["max_lora_rank"] == llm.lora.max_rank
        # how long one adapter's download may take, and how often it is tried: given, or Ray's own (30 s, 3)
        defaults = llm_config_module.LoraConfig()
        multiplex = config.multiplex_config()
        assert multiplex.download_timeout_s == (llm.lora.download_timeout_s or defaults.download_timeout_s)
        assert multiplex.max_download_tries == (llm.lora.download_attempts or defaults.max_download_tries)


def rays_llm_builder(name: str) -> Any:
    """A top-level definition of Ray Serve LLM's deployment builder (the module of
    ``build_llm_deployment``), taken from its installed source: the module itself imports
    vLLM, which is not installed here."""
    import ast
    import importlib.util
    import pathlib

    import ray.llm._internal.serve.constants as constants

    path = importlib.util.find_spec("ray.llm._internal.serve.core.server.builder").origin
    assert path is not None
    tree = ast.parse(pathlib.Path(path).read_text())
    (node,) = [n for n in tree.body if getattr(n, "name", None) == name
               or any(getattr(t, "id", None) == name for t in getattr(n, "targets", ()))]
    namespace = {**vars(constants), "LLMConfig": LLMConfig}
    exec(compile(ast.Module([node], type_ignores=[]), path, "exec"), namespace)
    return namespace[name]


# (replicas, autoscaling bounds); turning Serve's autoscaling on or off is a new code version in Ray's rule
SCALINGS = [((2, None), (5, None)), ((5, None), (1, None)), ((2, (1, 4)), (3, (1, 8)))]


@pytest.mark.parametrize(("before", "after"), SCALINGS, ids=["more-replicas", "fewer-replicas", "autoscaling-bounds"])
def test_scaling_an_llm_app_keeps_the_code_version_ray_serve_restarts_its_engines_on(
        before: tuple[int, tuple[int, int] | None], after: tuple[int, tuple[int, int] | None]) -> None:
    """Ray Serve rebuilds an application, every replica restarted, when its code version
    changes: a hash of its import_path, runtime_env and args (get_app_code_version). The
    engines' count and autoscaling bounds are outside args: Ray applies them to the
    replicas running (a lightweight update), and a 120B model is not minutes reloading."""
    from ray.serve._private.deploy_utils import get_app_code_version
    from ray.serve.schema import ServeDeploySchema

    llm = applications.llm_app(llm_variant().llm, "gpt")  # type: ignore[arg-type]
    rendered = [serve_config.render_application(app_spec(LlmApp(**{**llm.__dict__, "autoscaling": bounds}), replicas=n))
                for n, bounds in (before, after)]
    old, new = (ServeDeploySchema.model_validate({"applications": [app]}).applications[0] for app in rendered)
    assert serve_config.configured_replicas(rendered[0]) == before[0] and serve_config.configured_replicas(rendered[1]) == after[0]
    assert get_app_code_version(old) == get_app_code_version(new)


@pytest.mark.parametrize("autoscaling", [None, (1, 4)])
def test_ray_scales_the_engine_deployment_its_llm_builder_makes(autoscaling: tuple[int, int] | None) -> None:
    """The count goes to the deployment Ray Serve LLM's builder names (``LLMServer:`` and
    the model id as its ``_get_deployment_name`` spells it; one Ray does not have fails the
    application), and Ray's override of the options the builder gives it (autoscaling on by
    default) runs that count: a count alone would leave the builder's autoscaling at one."""
    from ray import serve
    from ray.llm._internal.common.dict_utils import maybe_apply_llm_deployment_config_defaults
    from ray.serve._private.application_state import override_deployment_info
    from ray.serve._private.deployment_info import DeploymentInfo
    from ray.serve.schema import ServeApplicationSchema

    llm = LlmApp(model_id="openai/gpt-oss-1.5b", source="/m", autoscaling=autoscaling)
    app = serve_config.render_application(app_spec(llm, replicas=3))
    (raw,) = app["args"]["llm_configs"]
    config = LLMConfig.model_validate(raw)
    name = f"LLMServer:{rays_llm_builder('_get_deployment_name')(config)}"
    assert name == serve_config.llm_deployment(llm.model_id) == "LLMServer:openai--gpt-oss-1_5b"
    # the engine deployment as build_llm_deployment makes it, the LLMConfig's deployment_config over Ray's defaults
    options = maybe_apply_llm_deployment_config_defaults(rays_llm_builder("DEFAULT_DEPLOYMENT_OPTIONS"),
                                                         {**config.deployment_config, "name": name})

    class Engine:
        pass

    built = serve.deployment(Engine, **options)
    infos = {name: DeploymentInfo(built._deployment_config, built._replica_config, start_time_ms=0, deployer_job_id="job")}
    runs = override_deployment_info(infos, ServeApplicationSchema.model_validate(app))[name].deployment_config
    if autoscaling is None:
        assert (runs.num_replicas, runs.autoscaling_config) == (3, None)
    else:
        scaling = runs.autoscaling_config
        assert scaling is not None and (scaling.min_replicas, scaling.max_replicas, scaling.initial_replicas) == (1, 4, 3)


def test_a_variant_with_lora_renders_rays_multi_lora_and_reads_back_from_the_cluster() -> None:
    llm = applications.llm_app(llm_variant(lora={"adaptersFrom": "gs://tenants/adapters", "maxAdaptersPerReplica": 8}).llm,
                               "gpt")  # type: ignore[arg-type]
    assert llm.lora == serve_config.LoraAdapters(path="gs://tenants/adapters", max_per_replica=8, max_rank=16)
    spec = app_spec(llm)
    app = serve_config.render_application(spec)
    (raw,) = app["args"]["llm_configs"]
    assert raw["lora_config"] == {"dynamic_lora_loading_path": "gs://tenants/adapters", "max_num_adapters_per_replica": 8}
    assert {k: raw["engine_kwargs"][k] for k in ("enable_lora", "max_loras", "max_lora_rank")} == \
        {"enable_lora": True, "max_loras": 8, "max_lora_rank": 16}
    # a control plane that did not write it (restarted, or a new leader) reads it back as it runs
    assert serve_config.application_from_config(app, spec) == spec
    plain = app_spec(applications.llm_app(llm_variant().llm, "gpt"))  # type: ignore[arg-type]
    assert serve_config.application_from_config(serve_config.render_application(plain), spec) == plain


def test_an_adapters_download_settings_render_as_rays_and_read_back() -> None:
    """Ray gives one adapter's download 30 s and 3 tries unless told: a large adapter from a
    far bucket timed out on every first request for it, with nothing in the manifest to say so."""
    lora = {"adaptersFrom": "s3://tenants/adapters", "downloadTimeoutSeconds": 240.5, "downloadAttempts": 2}
    llm = applications.llm_app(llm_variant(lora=lora).llm, "gpt")  # type: ignore[arg-type]
    assert llm.lora == serve_config.LoraAdapters(path="s3://tenants/adapters", download_timeout_s=240.5, download_attempts=2)
    spec = app_spec(llm)
    app = serve_config.render_application(spec)
    (raw,) = app["args"]["llm_configs"]
    assert raw["lora_config"] == {"dynamic_lora_loading_path": "s3://tenants/adapters", "max_num_adapters_per_replica": 16,
                                  "download_timeout_s": 240.5, "max_download_tries": 2}
    assert serve_config.application_from_config(app, spec) == spec


def test_rays_llmconfig_refuses_adapters_where_it_cannot_read_them() -> None:
    """What the manifest refuses at apply (see tests/foundation/test_llm_manifests.py) Ray
    would refuse only once the application deploys."""
    raw = serve_config.llm_config(app_spec(LlmApp(model_id="m", source="/m", lora=serve_config.LoraAdapters(path="/mnt/adapters"))))
    with pytest.raises(ValueError, match="Invalid lora_config"):
        LLMConfig.model_validate(raw)
    for scheme in llm_schema.LORA_SCHEMES:  # every place the manifest takes, Ray takes
        path = f"{scheme}bucket/adapters"
        assert schema.LoraSpec(adaptersFrom=path).adaptersFrom == path
        LLMConfig.model_validate(serve_config.llm_config(app_spec(LlmApp(model_id="m", source="/m",
                                                                         lora=serve_config.LoraAdapters(path=path)))))


def test_manifest_fields_become_engine_arguments() -> None:
    llm = applications.llm_app(llm_variant(kvCacheDtypeBytes=1, gpuMemoryUtilization=0.95,
                                       engineArgs={"enable_prefix_caching": True}).llm, "gpt")  # type: ignore[arg-type]
    assert llm.model_id == "openai/gpt-oss-120b"
    assert dict(llm.engine_kwargs) == {"max_model_len": 32768, "max_num_seqs": 8, "dtype": "auto", "gpu_memory_utilization": 0.95,
                                       "quantization": "mxfp4", "kv_cache_dtype": "fp8", "enable_prefix_caching": True}


def test_rays_llmconfig_does_check_what_it_is_given() -> None:
    """The validation above can fail: an accelerator Ray does not know is refused."""
    raw = serve_config.llm_config(app_spec(LlmApp(model_id="m", source="/m", accelerator_type="H100-80GB")))
    with pytest.raises(ValueError, match="Unsupported accelerator type"):
        LLMConfig.model_validate(raw)


def test_the_manifest_takes_exactly_the_accelerator_types_rays_llmconfig_takes() -> None:
    """An acceleratorType apply takes is one Ray takes at deploy, and the other way round,
    but a TPU, which Ray refuses on the GPU bundles edgeplane gives an engine's workers."""
    rays = {t.value for t in llm_config_module.AcceleratorType} | {"A10"}  # Ray reads A10 as A10G
    tpus = llm_config_module.TPU_ACCELERATOR_VALUES
    assert set(accelerator_types.RAY_ACCELERATOR_TYPES) == rays - tpus
    for name in sorted(rays):
        raw = serve_config.llm_config(app_spec(LlmApp(model_id="m", source="/m", accelerator_type=name)))
        if name in tpus:
            assert "is a TPU" in (accelerator_types.problem(name) or "")
            with pytest.raises(ValueError, match="Hardware mismatch"):
                LLMConfig.model_validate(raw)
        else:
            assert accelerator_types.problem(name) is None
            LLMConfig.model_validate(raw)


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"runtime": "vllm"}, "a vllm application needs llm"),
        ({"runtime": "onnx", "artifact_uri": "file:///m", "sha256": "a" * 64, "llm": LlmApp("m", "/m")}, "only a vllm application"),
        ({"runtime": "vllm", "llm": LlmApp("m", "/m", tensor_parallel_size=0)}, "tensor_parallel_size"),
        ({"runtime": "vllm", "llm": LlmApp("m", "/m", autoscaling=(3, 1))}, "0 <= min <= max"),
    ],
)
def test_bad_llm_app_specs_are_refused(fields: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        ServeAppSpec(name="ep-x", route_prefix="/x", model_name="m", num_replicas=1, **fields)


def llm_details(running: int, target: int, status: str = "RUNNING") -> dict[str, Any]:
    """An LLM application as Serve's REST API describes it: an OpenAI ingress and an engine."""
    def deployment(n_running: int, n_target: int) -> dict[str, Any]:
        return {"status": "HEALTHY", "target_num_replicas": n_target, "message": "",
                "replicas": [{"state": "RUNNING"}] * n_running + [{"state": "STARTING"}] * (n_target - n_running)}
    return {
        "status": status, "route_prefix": "/ep/dc/gpt", "message": "",
        "deployment_topology": {"ingress_deployment": "OpenAiIngress"},
        "deployments": {"OpenAiIngress": deployment(4, 4), "LLMServer:openai--gpt-oss-120b": deployment(running, target)},
    }


def test_llm_app_status_counts_engine_replicas_not_the_ingress() -> None:
    status = ray_serve.status_from_details("ep-gpt--dc", llm_details(1, 2, "DEPLOYING"), "http://serve:8000")
    assert (status.replicas_running, status.replicas_target) == (1, 2)
    assert status.status is ServeAppState.DEPLOYING
    assert status.endpoint_url == "http://serve:8000/ep/dc/gpt"


async def test_deploying_without_vllm_fails_with_the_import_error(serve_actuator: ray_serve.RayServeActuator) -> None:
    spec = app_spec(applications.llm_app(llm_variant(acceleratorType=None).llm, "gpt"), replicas=1, cpu=0.1)  # type: ignore[arg-type]
    await serve_actuator.apply([spec])
    with pytest.raises(ServeAppFailed) as failed:
        await ray_serve.wait_until_running(serve_actuator, [spec.name], timeout_s=90)
    assert "ImportError" in failed.value.message and "vLLM" in failed.value.message, failed.value.message
    status = (await serve_actuator.observe())[spec.name]
    assert status.status is ServeAppState.DEPLOY_FAILED and status.replicas_running == 0


def llm_snapshot(apps: dict[str, serve_config.ServeAppStatus] | None = None, **llm: Any) -> Any:
    from orchestrator.reconciler import snapshot as snap
    from orchestrator.store import sqlite as store_mod

    site = schema.SiteSpec.model_validate({
        "tier": "datacenter", "location": {"country": "FR", "region": "eu-west", "lat": 48.86, "lon": 2.35},
        "capacity": {"cpu": 64, "memoryGiB": 512, "gpus": [{"model": "H100", "count": 8, "memoryGiB": 80}]},
        "ray": {"address": "http://ray-head:8265"}})
    model = schema.ModelSpec(variants=[llm_variant(**llm)])
    dep = schema.ModelDeploymentSpec.model_validate({"model": "gpt", "replicas": {"min": 2, "max": 2},
                                                     "placement": {"residency": ["FR"], "tiers": ["datacenter"]}})
    return snap.Snapshot(
        sites=(snap.SiteRecord("dc-paris", {}, site),), models={"gpt": model}, deployments=(snap.DeploymentRecord("gpt", 1, dep),),
        placements=(store_mod.PlacementRow("gpt", "dc-paris", "v", 2),), agents=(),
        datacentres={"dc-paris": snap.DataCentreObservation(True, apps or {})}, artifacts={}, assignments={}, applied_apps={})


def test_plan_preview_shows_the_gpus_each_replica_takes() -> None:
    from orchestrator import views

    preview = views.preview(llm_snapshot(), [])
    (change,) = preview["changes"]
    # 65.3e9 B weights + 9,701,425,152 B KV (see tests/scheduler/test_gpu_memory.py) + 1.5 GiB = 71.35 GiB per GPU
    shown = {k: change.get(k) for k in ("gpusPerReplica", "gpuMemoryGiBPerGpu", "gpuModel", "after")}
    assert shown == {"gpusPerReplica": 1, "gpuMemoryGiBPerGpu": 71.35, "gpuModel": "H100", "after": 2}


def test_a_running_llm_app_is_an_openai_endpoint_at_its_route_prefix() -> None:
    s = llm_snapshot()
    (app,) = applications.serve_apps(s, s.placements).by_site["dc-paris"]
    assert app.runtime == "vllm" and app.gpus == 1.0 and app.llm is not None and app.llm.model_id == "openai/gpt-oss-120b"
    running = serve_config.ServeAppStatus(name=app.name, status=ServeAppState.RUNNING, message="", replicas_running=2,
                                          replicas_target=2, endpoint_url=f"http://ray-head:8000{app.route_prefix}")
    (endpoint,) = planning.endpoints(llm_snapshot({app.name: running}), s.placements)
    assert (endpoint.api, endpoint.served_model, endpoint.url) == ("openai", "openai/gpt-oss-120b", running.endpoint_url)
    assert endpoint.allowed_countries and "FR" in endpoint.allowed_countries
    assert not endpoint.lora
    # with llm.lora the gateway may send it '<model>:<adapter>' (tests/gateway/test_openai_lora.py)
    (endpoint,) = planning.endpoints(llm_snapshot({app.name: running}, lora={"adaptersFrom": "s3://a/gpt"}), s.placements)
    assert endpoint.lora and endpoint.served_model == "openai/gpt-oss-120b"


def test_the_gateway_table_ranks_endpoints_by_protocol() -> None:
    from orchestrator.gateway import endpoints, routing

    common = dict(model="gpt", deployment="gpt", tier="datacenter", country="FR", region="eu-west", lat=48.86, lon=2.35)
    v2 = routing.Endpoint(site="dc-a", url="http://a:8000/ep/a", **common)  # type: ignore[arg-type]
    openai = routing.Endpoint(site="dc-b", url="http://b:8000/ep/b", api="openai", served_model="gpt-oss", **common)  # type: ignore[arg-type]
    table = endpoints.EndpointTable()
    table.replace([v2, openai])
    ranked = table.rank("gpt", routing.Caller(), None)
    assert isinstance(ranked, list) and [r.endpoint.site for r in ranked] == ["dc-a"]
    ranked = table.rank("gpt", routing.Caller(), None, api="openai")
    assert isinstance(ranked, list) and [r.endpoint.site for r in ranked] == ["dc-b"]
    table.replace([openai])
    refused = table.rank("gpt", routing.Caller(), None)
    assert isinstance(refused, routing.NoRoute) and refused.status == 404
    assert "served over openai only, not v2" in refused.reason



@pytest.mark.parametrize(
    ("nodes", "fragment"),
    [
        ([{"CPU": 8.0}], "'LLMServer:openai--gpt-oss-120b' cannot place a replica: each needs 2 GPU, 1 accelerator_type:H100 but the largest node has 0 GPU"),
        ([{"CPU": 16.0, "GPU": 1.0, "accelerator_type:H100": 1.0}, {"CPU": 16.0, "GPU": 1.0, "accelerator_type:H100": 1.0}],
         "each needs 2 GPU but the largest node has 1 GPU"),
        ([{"CPU": 16.0, "GPU": 8.0, "accelerator_type:A100-80G": 1.0}], "but the largest node has 0 accelerator_type:H100"),
        ([{"CPU": 16.0, "GPU": 8.0, "accelerator_type:H100": 1.0}], ""),
        ([{"CPU": 2.0, "GPU": 8.0, "accelerator_type:H100": 1.0}], "each needs 4 CPU but the largest node has 2 CPU"),
    ],
)
def test_an_engine_that_fits_no_node_is_reported_like_any_gpu_shortage(nodes: list[dict[str, float]], fragment: str) -> None:
    """Serve's details leave out placement groups: the engine's come from the config edgeplane PUT."""
    # Ray Serve LLM names the engine deployment LLMServer:<model id, '/' -> '--', '.' -> '_'>
    llm = LlmApp(model_id="openai/gpt-oss-120b", source="/m", tensor_parallel_size=2, accelerator_type="H100")
    app = {**llm_details(0, 1, "DEPLOYING"), "deployed_app_config": serve_config.render_application(app_spec(llm, replicas=1))}
    app["deployments"]["LLMServer:openai--gpt-oss-120b"]["required_resources"] = {"CPU": 4.0}
    reason = ray_serve.unschedulable_reason(app, nodes)
    if fragment:
        assert fragment in reason, reason
    else:
        assert reason == ""


async def test_the_gateway_names_the_model_as_the_engine_serves_it() -> None:
    """A vllm variant's servedModelName may differ from the Model's name: the OpenAI
    gateway sends each replica the name its engine answers to, and only then re-encodes."""
    import json

    import httpx
    from prometheus_client import CollectorRegistry
    from starlette.applications import Starlette

    from edge_agent import httpmessages
    from orchestrator.gateway import endpoints, openai_relay, openai_routes, proxy, routing, upstream
    from orchestrator.testing.loopback import replica

    received: list[bytes] = []

    async def engine(request: httpmessages.Request) -> httpmessages.Response:
        received.append(request.body)
        return httpmessages.Response(200, b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}\n\n'
                                     + openai_relay.SSE_DONE, content_type="text/event-stream")

    common = dict(model="gpt", deployment="gpt", tier="datacenter", country="FR", region="eu-west", lat=48.86, lon=2.35, api="openai")
    raw = json.dumps({"model": "gpt", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
    async with replica(engine) as url:
        for served in ("", "openai/gpt-oss-120b"):
            table = endpoints.EndpointTable()
            table.replace([routing.Endpoint(site="dc-b", url=url, served_model=served, **common)])  # type: ignore[arg-type]
            pool, registry = upstream.UpstreamPool(), CollectorRegistry()
            gw = proxy.Gateway(table, pool, proxy.GatewayMetrics.create(registry))
            app = Starlette(routes=openai_routes.OpenAIGateway(gw, registry=registry).routes())
            try:
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=30) as http:
                    resp = await http.post(f"{openai_routes.PREFIX}/chat/completions", content=raw,
                                           headers={"content-type": "application/json"})
            finally:
                await pool.close()
            assert resp.status_code == 200, resp.text
    same, renamed = received
    assert same == raw  # the caller's body as it came
    assert json.loads(renamed) == {"model": "openai/gpt-oss-120b", "messages": [{"role": "user", "content": "hi"}], "stream": True}

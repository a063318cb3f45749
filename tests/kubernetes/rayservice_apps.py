"""The Serve applications and cluster shapes the RayService tests render and apply: an ONNX
application with defaults a test overrides, a user's ``ray-serve`` one, LLM applications
on an accelerator, and a site name past what KubeRay takes. Imported by module name, as
this folder has no ``__init__.py`` (one would make it a ``kubernetes`` package, shadowing
the client)."""

from __future__ import annotations

from typing import Any

from orchestrator.adapters import rayservice, serve_config
from orchestrator.adapters.serve_config import ServeAppSpec

SHA = "b" * 64
NS = "edge-dc"
SHAPE = rayservice.RayClusterShape(image="registry.example/edgeplane-ray:2.60.0", ray_version="2.60.0")
LLM_SHAPE = rayservice.RayClusterShape(image="registry.example/edgeplane-ray:2.60.0", ray_version="2.60.0",
                                    llm_image="registry.example/ray-llm:2.60.0-py311-cu128",
                                    accelerator_node_selectors={"H100": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}})


def app(name: str, **kw: Any) -> ServeAppSpec:
    base: dict[str, Any] = {
        "name": name,
        "route_prefix": f"/ep/{name[3:]}",
        "model_name": name[3:],
        "runtime": "onnx",
        "num_replicas": 2,
        "cpu": 1.0,
        "memory_mib": 1024,
        "gpus": 0.0,
        "artifact_uri": "https://models.example/m.onnx",
        "sha256": SHA,
    }
    base.update(kw)
    return ServeAppSpec(**base)


USER_APP = ServeAppSpec(
    name="ep-llm", route_prefix="/ep/llm", model_name="llm", runtime="ray-serve",
    num_replicas=2, cpu=4.0, memory_mib=8192, gpus=1.0,
    import_path="llm_service.app:build", args={"model": "mistral", "max_tokens": 512},
)  # fmt: skip


def llm_app(name: str, accelerator: str | None, tp: int, replicas: int, autoscaling: tuple[int, int] | None = None,
            memory_gib: int = 96) -> ServeAppSpec:
    llm = serve_config.LlmApp(model_id=name[3:], source=f"/mnt/models/{name[3:]}", engine_kwargs={"max_model_len": 8192},
                              tensor_parallel_size=tp, accelerator_type=accelerator, autoscaling=autoscaling)
    return ServeAppSpec(name=name, route_prefix=f"/ep/{name[3:]}", model_name=name[3:], runtime="vllm",
                        num_replicas=replicas, cpu=8.0, memory_mib=memory_gib * 1024, gpus=float(tp), llm=llm)


GPU_APP = app("ep-vision", gpus=1.0, memory_mib=1024)
LONG = "paris-saclay-datacentre-gpu-cluster-a1"  # 38 characters: "edgeplane-" + it is past KubeRay's 47

"""``runtime: vllm`` variants, table-tested like every other manifest field: a good one is
accepted as written, each bad one is refused naming its field, line and the fix."""

from __future__ import annotations

import copy
import pathlib
import re
from typing import Any, get_args

import pytest

from orchestrator.manifests import loader, schema
from orchestrator.reconciler import inventory

from . import support
from .support import join
from .test_bad_manifests import DELETE, Bad, assert_names, check, deployment, mutate

GPT_OSS_120B: dict[str, Any] = {
    "name": "gpt-oss-120b",
    "runtime": "vllm",
    "resources": {"cpu": 8, "memoryMiB": 65536},
    "llm": {
        "source": "/mnt/models/gpt-oss-120b",
        "servedModelName": "openai/gpt-oss-120b",
        "contextLength": 32768,
        "maxConcurrentSequences": 8,
        "quantization": "mxfp4",
        "tensorParallelSize": 1,
        "acceleratorType": "H100",
        "weightBytes": 65_300_000_000,
        "architecture": {"layers": 36, "kvHeads": 8, "headDim": 64, "slidingWindowLayers": 18, "slidingWindowTokens": 128,
                         "hiddenSize": 2880, "intermediateSize": 2880, "attentionHeads": 64},
        "engineArgs": {"enable_prefix_caching": True},
    },
}


def llm_model(*changes: tuple[str, Any]) -> str:
    spec = {"variants": [copy.deepcopy(GPT_OSS_120B)]}
    return mutate("Model", "m", spec, *changes)


V = "spec.variants[0]"
KUBE_DC = {k: v for k, v in support.dc_site_spec().items() if k != "ray"}
BAD = [
    Bad("vllm-without-llm", llm_model((f"{V}.llm", DELETE)), V, "- name:", "a vllm variant needs 'llm'"),
    Bad("llm-on-onnx", mutate("Model", "m", {"variants": [{**support.model_spec()["variants"][0], "llm": GPT_OSS_120B["llm"]}]}),
        V, "- name:", "'llm' is for vllm variants"),
    Bad("vllm-with-import-path", llm_model((f"{V}.importPath", "pkg.mod:app")), V, "- name:", "not 'artifact', 'importPath'"),
    Bad("vllm-with-resources-gpus", llm_model((f"{V}.resources.gpus", 2)), V, "- name:", "llm.tensorParallelSize"),
    Bad("llm-missing-source", llm_model((f"{V}.llm.source", DELETE)), f"{V}.llm.source", "llm:", "required field is missing"),
    Bad("llm-source-with-space", llm_model((f"{V}.llm.source", "/models/my model")), f"{V}.llm.source", "source:", "match"),
    Bad("llm-zero-context", llm_model((f"{V}.llm.contextLength", 0)), f"{V}.llm.contextLength", "contextLength:",
        "greater than or equal to 16"),
    Bad("llm-context-is-a-word", llm_model((f"{V}.llm.contextLength", "long")), f"{V}.llm.contextLength", "contextLength:",
        "valid integer"),
    Bad("llm-tp-zero", llm_model((f"{V}.llm.tensorParallelSize", 0)), f"{V}.llm.tensorParallelSize", "tensorParallelSize:",
        "greater than or equal to 1"),
    Bad("llm-bad-dtype", llm_model((f"{V}.llm.dtype", "int3")), f"{V}.llm.dtype", "dtype:", "'bfloat16'"),
    Bad("llm-bad-kv-bytes", llm_model((f"{V}.llm.kvCacheDtypeBytes", 3)), f"{V}.llm.kvCacheDtypeBytes", "kvCacheDtypeBytes:", "1, 2 or 4"),
    Bad("llm-no-weights", llm_model((f"{V}.llm.weightBytes", DELETE)), f"{V}.llm.weightBytes", "llm:", "required field is missing"),
    Bad("llm-negative-weights", llm_model((f"{V}.llm.weightBytes", -1)), f"{V}.llm.weightBytes", "weightBytes:", "greater than or equal to 1"),
    Bad("llm-no-head-dim", llm_model((f"{V}.llm.architecture.headDim", DELETE)), f"{V}.llm.architecture.headDim", "architecture:",
        "required field is missing"),
    Bad("llm-window-without-tokens", llm_model((f"{V}.llm.architecture.slidingWindowTokens", DELETE)), f"{V}.llm.architecture",
        "architecture:", "slidingWindowLayers and slidingWindowTokens together"),
    Bad("llm-more-window-layers-than-layers", llm_model((f"{V}.llm.architecture.slidingWindowLayers", 40)), f"{V}.llm.architecture",
        "architecture:", "slidingWindowLayers (40) is more than layers (36)"),
    Bad("llm-engine-arg-twice", llm_model((f"{V}.llm.engineArgs", {"tensor_parallel_size": 2, "max_model_len": 4096})),
        f"{V}.llm.engineArgs", "engineArgs:", "set max_model_len, tensor_parallel_size through the llm fields"),
    # Ray Serve LLM gives a replica tensor_parallel_size x pipeline_parallel_size GPUs: one
    # given past the fields would be placed and sized on tensorParallelSize GPUs alone
    Bad("llm-pipeline-parallel-in-engine-args", llm_model((f"{V}.llm.engineArgs", {"pipeline_parallel_size": 2})),
        f"{V}.llm.engineArgs", "engineArgs:", "set pipeline_parallel_size through the llm fields"),
    Bad("llm-more-gpus-than-a-node", llm_model((f"{V}.llm.tensorParallelSize", 16), (f"{V}.llm.pipelineParallelSize", 8)),
        f"{V}.llm", "llm:", "tensorParallelSize x pipelineParallelSize is 128 GPUs per replica"),
    Bad("llm-utilization-over-one", llm_model((f"{V}.llm.gpuMemoryUtilization", 1.5)), f"{V}.llm.gpuMemoryUtilization",
        "gpuMemoryUtilization:", "less than or equal to 1"),
    Bad("llm-unknown-field", llm_model((f"{V}.llm.maxTokens", 5)), f"{V}.llm.maxTokens", "maxTokens:", "unknown field"),
    Bad("llm-bad-accelerator", llm_model((f"{V}.llm.acceleratorType", "H100 80GB")), f"{V}.llm.acceleratorType", "acceleratorType:",
        "match"),
    # Ray Serve LLM refuses a type it does not know when the application deploys
    # ("Unsupported accelerator type"): nvidia-smi's spelling is not Ray's
    Bad("llm-accelerator-ray-does-not-know", llm_model((f"{V}.llm.acceleratorType", "A100-80GB")), f"{V}.llm.acceleratorType",
        "acceleratorType:", "'A100-80GB' is not an accelerator type Ray Serve LLM takes; did you mean 'A100-80G'?"),
    Bad("llm-accelerator-a-tpu", llm_model((f"{V}.llm.acceleratorType", "TPU-V5P")), f"{V}.llm.acceleratorType",
        "acceleratorType:", "'TPU-V5P' is a TPU: edgeplane runs vllm replicas on GPUs"),
    # LoRA adapters: Ray Serve LLM reads them from object storage only, and would refuse
    # anything else only when the application deploys
    Bad("lora-from-a-path", llm_model((f"{V}.llm.lora", {"adaptersFrom": "/mnt/adapters"})), f"{V}.llm.lora.adaptersFrom",
        "adaptersFrom:", "'/mnt/adapters' is not a place Ray Serve LLM reads LoRA adapters from: give a folder in object storage "
        "(s3://..., gs://..., abfss://..., azure://...)"),
    Bad("lora-from-https", llm_model((f"{V}.llm.lora", {"adaptersFrom": "https://hf.co/org/adapter"})), f"{V}.llm.lora.adaptersFrom",
        "adaptersFrom:", "not a place Ray Serve LLM reads LoRA adapters from"),
    Bad("lora-no-bucket", llm_model((f"{V}.llm.lora", {"adaptersFrom": "s3:///"})), f"{V}.llm.lora.adaptersFrom",
        "adaptersFrom:", "'s3:///' names no bucket: give s3://<bucket>/<folder of adapters>"),
    Bad("lora-without-a-place", llm_model((f"{V}.llm.lora", {"maxRank": 16})), f"{V}.llm.lora.adaptersFrom", "lora:",
        "required field is missing"),
    Bad("lora-zero-adapters", llm_model((f"{V}.llm.lora", {"adaptersFrom": "s3://a/b", "maxAdaptersPerReplica": 0})),
        f"{V}.llm.lora.maxAdaptersPerReplica", "maxAdaptersPerReplica:", "greater than or equal to 1"),
    Bad("lora-too-many-adapters", llm_model((f"{V}.llm.lora", {"adaptersFrom": "s3://a/b", "maxAdaptersPerReplica": 1000})),
        f"{V}.llm.lora.maxAdaptersPerReplica", "maxAdaptersPerReplica:", "less than or equal to 256"),
    Bad("lora-rank-vllm-does-not-take", llm_model((f"{V}.llm.lora", {"adaptersFrom": "s3://a/b", "maxRank": 24})),
        f"{V}.llm.lora.maxRank", "maxRank:", "1, 8, 16, 32, 64, 128, 256, 320 or 512"),
    Bad("lora-download-timeout-zero", llm_model((f"{V}.llm.lora", {"adaptersFrom": "s3://a/b", "downloadTimeoutSeconds": 0})),
        f"{V}.llm.lora.downloadTimeoutSeconds", "downloadTimeoutSeconds:", "greater than 0"),
    Bad("lora-download-no-attempt", llm_model((f"{V}.llm.lora", {"adaptersFrom": "s3://a/b", "downloadAttempts": 0})),
        f"{V}.llm.lora.downloadAttempts", "downloadAttempts:", "greater than or equal to 1"),
    Bad("lora-misspelt-field", llm_model((f"{V}.llm.lora", {"adaptersFrom": "s3://a/b", "maxAdapterPerReplica": 4})),
        f"{V}.llm.lora.maxAdapterPerReplica", "maxAdapterPerReplica:", "maxAdaptersPerReplica"),
    # vLLM sets aside adapter slots on every layer at start: placement needs the layer's widths to count them
    Bad("lora-without-layer-widths", llm_model((f"{V}.llm.lora", {"adaptersFrom": "s3://a/b"}),
                                               (f"{V}.llm.architecture.intermediateSize", DELETE)), f"{V}.llm", "llm:",
        "llm.lora needs architecture.intermediateSize (config.json's hidden_size, intermediate_size, num_attention_heads)"),
    Bad("lora-through-engine-args", llm_model((f"{V}.llm.engineArgs", {"enable_lora": True, "max_loras": 4})),
        f"{V}.llm.engineArgs", "engineArgs:", "set enable_lora, max_loras through llm.lora"),
    # Ray reads a request's model up to its first ':' as the base model
    Bad("lora-served-name-with-a-colon", llm_model((f"{V}.llm.servedModelName", "gpt:oss"), (f"{V}.llm.lora", {"adaptersFrom": "s3://a/b"})),
        f"{V}.llm", "llm:", "servedModelName 'gpt:oss' holds a ':'"),
    Bad("llm-image-with-space", mutate("Site", "dc1", {**KUBE_DC, "kubernetes": {"context": "prod", "llmImage": "ray llm"}}),
        "spec.kubernetes.llmImage", "llmImage:", "match"),
    Bad("vllm-at-the-edge", join(llm_model(), deployment(("spec.variant", "gpt-oss-120b"), ("spec.placement.tiers", ["edge"]))),
        "spec.variant", "variant: gpt-oss-120b", "runs only in data centres", document=1),
]


@pytest.mark.parametrize("case", BAD, ids=[c.id for c in BAD])
def test_bad_llm_variant_names_its_field(case: Bad) -> None:
    assert_names(check(case.text), case, "bad.yaml")


def test_a_good_llm_variant_loads_as_written() -> None:
    docs = loader.load_text(llm_model(), "ok.yaml")
    variant = docs[0].doc.spec.variants[0]  # type: ignore[union-attr]
    assert variant.llm.architecture.slidingWindowTokens == 128
    assert variant.llm.gpuMemoryUtilization == 0.9 and variant.llm.dtype == "auto"
    assert check(llm_model()) == []


def test_a_variant_with_lora_adapters_loads_as_written() -> None:
    lora = {"adaptersFrom": "s3://adapters/gpt-oss-120b", "maxAdaptersPerReplica": 32, "maxRank": 64}
    (doc,) = loader.load_text(llm_model((f"{V}.llm.lora", lora)), "ok.yaml")
    assert doc.doc.spec.variants[0].llm.lora == schema.LoraSpec(**lora)  # type: ignore[union-attr]
    (doc,) = loader.load_text(llm_model((f"{V}.llm.lora", {"adaptersFrom": "azure://adapters/gpt"})), "ok.yaml")
    assert (doc.doc.spec.variants[0].llm.lora.maxAdaptersPerReplica, doc.doc.spec.variants[0].llm.lora.maxRank) == (16, 16)  # type: ignore[union-attr]


def test_a_stored_variant_with_lora_engine_args_still_reads() -> None:
    """Refused in manifests only: engineArgs an earlier release stored read back."""
    llm = {**GPT_OSS_120B["llm"], "engineArgs": {"enable_lora": True}}
    assert schema.Variant.model_validate({**GPT_OSS_120B, "llm": llm}).llm.engineArgs == {"enable_lora": True}  # type: ignore[union-attr]


def test_a_stored_variant_with_an_accelerator_type_ray_does_not_know_still_reads() -> None:
    """Refused in manifests only: a variant an earlier release stored reads back."""
    llm = {**GPT_OSS_120B["llm"], "acceleratorType": "H100-80GB"}
    assert schema.Variant.model_validate({**GPT_OSS_120B, "llm": llm}).llm.acceleratorType == "H100-80GB"  # type: ignore[union-attr]


def test_a_stored_variant_with_pipeline_stages_in_its_engine_args_reads_them_as_its_pipeline_parallel_size() -> None:
    """An earlier release took pipeline_parallel_size in engineArgs, which apply now refuses:
    a variant it stored reads back (one that did not would hold the fleet), its stages read
    as pipelineParallelSize, so that its replicas are given the GPUs their workers take."""
    llm = {**GPT_OSS_120B["llm"], "tensorParallelSize": 4, "engineArgs": {"pipeline_parallel_size": 2, "enforce_eager": True}}
    stored = schema.Variant.model_validate({**GPT_OSS_120B, "llm": llm}).llm
    assert stored is not None and (stored.tensorParallelSize, stored.pipelineParallelSize) == (4, 2)
    assert stored.engineArgs == {"enforce_eager": True}
    assert inventory.llm_shape(stored).pipeline_parallel_size == 2


def test_a_kubernetes_site_names_its_llm_image() -> None:
    text = mutate("Site", "dc1", {**KUBE_DC, "kubernetes": {"context": "prod", "llmImage": "registry.example/ray-llm:2.60.0-py311-cu128"}})
    assert check(text) == []


def _doc_section() -> str:
    text = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "datacentre.md").read_text()
    start = text.index("## Large language models")
    return text[start:text.index("\n## ", start + 1)]


def test_the_manifests_in_the_docs_load_and_their_arithmetic_is_what_the_planner_uses() -> None:
    section = _doc_section()
    blocks = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    docs = [d for block in blocks if "kind:" in block for d in loader.load_text(block, "datacentre.md")]
    variants = {f"{d.name}/{v.name}": v for d in docs if d.kind == "Model" for v in d.doc.spec.variants}  # type: ignore[union-attr]
    assert set(variants) == {"gpt-oss-120b/h100", "gpt-oss-20b/dc", "gpt-oss-20b/gpu16", "support-chat/dc"}
    assert variants["support-chat/dc"].llm.lora == schema.LoraSpec(  # type: ignore[union-attr]
        adaptersFrom="s3://acme-adapters/support-chat", maxAdaptersPerReplica=16, maxRank=32)
    shown = {"gpt-oss-120b/h100": ("71.35", "79.28"), "gpt-oss-20b/dc": ("38.38", "42.64"), "gpt-oss-20b/gpu16": ("15.11", "15.90")}
    for key, (per_gpu, card) in shown.items():
        memory = inventory.llm_memory(variants[key].llm)  # type: ignore[arg-type]
        assert (f"{memory.per_gpu_gib:.2f}", f"{memory.card_gib:.2f}") == (per_gpu, card), key
        assert f"**{per_gpu} GiB**" in section and f"**{card} GiB**" in section
    adapters = inventory.llm_memory(variants["support-chat/dc"].llm)  # type: ignore[arg-type]
    assert f"**{adapters.lora_bytes_per_gpu / 2**30:.2f} GiB**" in section and f"**{adapters.card_gib:.2f} GiB**" in section


def test_the_manifests_doc_gives_every_kv_cache_element_size_the_schema_takes() -> None:
    taken = get_args(schema.LlmSpec.model_fields["kvCacheDtypeBytes"].annotation)
    text = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "manifests.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `llm.kvCacheDtypeBytes`"))
    assert taken and all(f" {n} (" in row for n in taken), (taken, row)

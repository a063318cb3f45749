"""The GPU memory of an LLM replica on published architectures, worked out by hand, and
what the planner does with it.

Architectures are those of the models' published config.json:

- gpt-oss-120b: 36 layers (18 full attention, 18 sliding window of 128 tokens), 8 KV
  heads, head_dim 64; MXFP4 checkpoint of about 65.3 GB.
- gpt-oss-20b: 24 layers (12 full, 12 sliding 128), 8 KV heads, head_dim 64; about 13.8 GB.
- Llama-3-70B: 80 layers, 8 KV heads, head_dim 128, 70,553,706,496 parameters in bf16.
"""

from __future__ import annotations

import pytest
from scheduler_builders import deployment, site

from orchestrator.manifests import schema
from orchestrator.reconciler import inventory
from orchestrator.reconciler.inventory import to_variant
from orchestrator.scheduler import GpuGroup, Site, Status, Tier, plan
from orchestrator.scheduler.gpu_memory import GIB, LlmShape, replica_memory

OVERHEAD = 1_610_612_736  # 1.5 GiB per GPU of runtime (CUDA context, graphs, activations)

GPT_OSS_120B = dict(weight_bytes=65_300_000_000, layers=36, kv_heads=8, head_dim=64,
                    sliding_window_layers=18, sliding_window_tokens=128)
GPT_OSS_20B = dict(weight_bytes=13_800_000_000, layers=24, kv_heads=8, head_dim=64,
                   sliding_window_layers=12, sliding_window_tokens=128)
LLAMA_70B = dict(weight_bytes=2 * 70_553_706_496, layers=80, kv_heads=8, head_dim=128)

# (id, shape, KV cache bytes, bytes per GPU, smallest card GiB)
CASES = [
    # per layer and token: 2 x 8 x 64 x 2 B = 2048 B
    # full: 18 x 2048 x 32768 x 8 = 9,663,676,416 (9 GiB); window: 18 x 2048 x 128 x 8 = 37,748,736
    # per GPU: 65.3e9 + 9,701,425,152 + 1.5 GiB = 76,612,037,888 (71.35 GiB); card 71.35 / 0.9 = 79.28 GiB
    ("gpt-oss-120b-32k-x8-1xH100", LlmShape(**GPT_OSS_120B, context_length=32768, max_sequences=8),
     9_701_425_152, 76_612_037_888, 79.28),
    # the full 128k context for two sequences: the same 262,144 full-attention tokens
    ("gpt-oss-120b-128k-x2", LlmShape(**GPT_OSS_120B, context_length=131072, max_sequences=2),
     9_663_676_416 + 18 * 2048 * 128 * 2, 65_300_000_000 + 9_663_676_416 + 9_437_184 + OVERHEAD, 79.25),
    # full: 12 x 2048 x 16384 x 2 = 805,306,368; window: 12 x 2048 x 128 x 2 = 6,291,456
    # per GPU: 13.8e9 + 811,597,824 + 1.5 GiB = 16,222,210,560 (15.11 GiB); card 15.11 / 0.95 = 15.90 GiB
    ("gpt-oss-20b-16k-x2-16GB", LlmShape(**GPT_OSS_20B, context_length=16384, max_sequences=2, gpu_memory_utilization=0.95),
     811_597_824, 16_222_210_560, 15.90),
    # per layer and token: 2 x 8 x 128 x 2 B = 4096 B; x 80 layers = 327,680 B per token
    # 8k x 16 sequences = 131,072 tokens -> 42,949,672,960 B (40 GiB)
    # per GPU (TP 4): (141,107,412,992 + 42,949,672,960) / 4 + 1.5 GiB = 47,624,884,224 (44.35 GiB); card 49.28 GiB
    ("llama-70b-8k-x16-tp4", LlmShape(**LLAMA_70B, context_length=8192, max_sequences=16, tensor_parallel_size=4),
     42_949_672_960, 47_624_884_224, 49.28),
    # 32k x 16 = 524,288 tokens -> 171,798,691,840 B (160 GiB)
    # TP 4: (141,107,412,992 + 171,798,691,840) / 4 + 1.5 GiB = 79,837,138,944 (74.35 GiB); card 82.62 GiB
    ("llama-70b-32k-x16-tp4", LlmShape(**LLAMA_70B, context_length=32768, max_sequences=16, tensor_parallel_size=4),
     171_798_691_840, 79_837_138_944, 82.62),
    # TP 8: 312,906,104,832 / 8 + 1.5 GiB = 40,723,875,840 (37.93 GiB); card 42.14 GiB
    ("llama-70b-32k-x16-tp8", LlmShape(**LLAMA_70B, context_length=32768, max_sequences=16, tensor_parallel_size=8),
     171_798_691_840, 40_723_875_840, 42.14),
]


@pytest.mark.parametrize("case_id,shape,kv,per_gpu,card", CASES, ids=[c[0] for c in CASES])
def test_published_architectures(case_id, shape, kv, per_gpu, card):
    memory = replica_memory(shape)
    assert memory.kv_cache_bytes == kv
    assert memory.per_gpu_bytes == per_gpu
    assert memory.gpus == shape.tensor_parallel_size
    assert memory.card_gib == pytest.approx(card, abs=0.005)


def test_sliding_window_longer_than_context_counts_the_context():
    short = replica_memory(LlmShape(**GPT_OSS_20B, context_length=64))
    # every layer holds 64 tokens: 24 x 2048 x 64
    assert short.kv_cache_bytes == 24 * 2048 * 64


def test_fp8_kv_cache_halves_it():
    bf16 = replica_memory(LlmShape(**LLAMA_70B, context_length=8192, max_sequences=16))
    fp8 = replica_memory(LlmShape(**LLAMA_70B, context_length=8192, max_sequences=16, kv_bytes=1))
    assert fp8.kv_cache_bytes * 2 == bf16.kv_cache_bytes == 40 * GIB


def llm_variant(name: str, tp: int, context: int, accelerator: str | None = "H100", pp: int = 1,
                lora: dict | None = None, **arch):
    lora_block = {} if lora is None else {"lora": lora}
    spec = schema.Variant.model_validate({
        "name": name, "runtime": "vllm", "resources": {"cpu": 8, "memoryMiB": 65536},
        "llm": {"source": "/models/llama-3-70b", "contextLength": context, "maxConcurrentSequences": 16,
                "tensorParallelSize": tp, "pipelineParallelSize": pp, "weightBytes": 2 * 70_553_706_496,
                "acceleratorType": accelerator, "architecture": {"layers": 80, "kvHeads": 8, "headDim": 128, **arch}, **lora_block},
    })
    return to_variant(spec)


def dc(name: str, gpus: tuple[GpuGroup, ...], city: str = "paris") -> Site:
    base = site(name, city, tier="datacenter", cpu=128, memory_gib=1024)
    return Site(**{**base.__dict__, "gpus": gpus})


H100X8 = (GpuGroup("H100", 8, 80),)


def test_manifest_variant_takes_the_model_numbers():
    v = llm_variant("v", tp=8, context=32768)
    assert v.gpus == 8 and v.gpu_memory_gib == pytest.approx(42.14, abs=0.005) and v.gpu_model == "H100"


def test_tp4_at_32k_fits_no_node_and_says_by_how_much():
    v = llm_variant("llama", tp=4, context=32768)
    result = plan([dc("fr-dc", H100X8)], [deployment(variants=(v,), tiers={"datacenter"})], [])
    status = result.deployments["d"]
    assert status.status is Status.UNSCHEDULABLE
    # the reason carries the arithmetic and what the largest site has
    for words in ("4×GPU ≥82.6 GiB", "weights 131.4 GiB", "KV cache 160.0 GiB", "74.4 GiB per GPU", "8×H100 80 GiB"):
        assert words in status.reason, status.reason


def test_tp8_at_32k_takes_a_whole_8xh100_node():
    v = llm_variant("llama", tp=8, context=32768)
    sites = [dc("fr-dc", H100X8), dc("de-dc", H100X8, "frankfurt")]
    result = plan(sites, [deployment(variants=(v,), tiers={"datacenter"}, replicas=(3, 3))], [])
    status = result.deployments["d"]
    # two nodes of 8 GPUs: two replicas, the third has no GPUs left
    assert status.placed == 2 and status.status is not Status.SCHEDULED
    assert "free H100 GPU(s) with ≥42.14 GiB" in status.reason, status.reason


def test_pipeline_stages_multiply_the_gpus_of_a_replica():
    # TP 4 x PP 2: the 312,906,104,832 B of weights and cache over 8 GPUs, as TP 8 puts them
    v = llm_variant("llama", tp=4, pp=2, context=32768)
    assert v.gpus == 8 and v.llm_memory.per_gpu_bytes == 40_723_875_840
    assert v.gpu_memory_gib == pytest.approx(42.14, abs=0.005)
    # a site of two 4-GPU nodes cannot hold it; one of 8 can
    four_per_node = dc("fr-dc", (GpuGroup("H100", 4, 80),) * 2)
    result = plan([four_per_node, dc("de-dc", H100X8, "frankfurt")], [deployment(variants=(v,), tiers={"datacenter"})], [])
    assert [r.site for r in result.replicas] == ["de-dc"]
    alone = plan([four_per_node], [deployment(variants=(v,), tiers={"datacenter"})], []).deployments["d"]
    assert alone.status is Status.UNSCHEDULABLE and "8×GPU ≥42.1 GiB" in alone.reason, alone.reason


def test_accelerator_type_must_match_the_site_gpu_model():
    v = llm_variant("llama", tp=8, context=8192)
    result = plan([dc("fr-dc", (GpuGroup("A100-80G", 8, 80),)), dc("de-dc", H100X8, "frankfurt")],
                  [deployment(variants=(v,), tiers={"datacenter"})], [])
    assert {r.site for r in result.replicas} == {"de-dc"}


def test_residency_still_applies_to_llm_replicas():
    v = llm_variant("llama", tp=8, context=8192, accelerator=None)
    sites = [dc("fr-dc", H100X8), dc("de-dc", H100X8, "frankfurt")]
    result = plan(sites, [deployment(variants=(v,), tiers={"datacenter"}, residency={"DE"})], [])
    assert {r.site for r in result.replicas} == {"de-dc"}


def test_vllm_never_lands_on_an_edge_site():
    v = llm_variant("llama", tp=1, context=1024, accelerator=None)
    edge = Site(**{**site("e", tier="edge", cpu=128, memory_gib=1024).__dict__, "gpus": (GpuGroup("gpu", 8, 200),)})
    assert edge.tier is Tier.EDGE
    result = plan([edge], [deployment(variants=(v,))], [])
    assert result.deployments["d"].status is Status.UNSCHEDULABLE
    assert "as does vllm" in result.deployments["d"].reason


LLAMA_70B_WIDTHS = dict(hidden_size=8192, intermediate_size=28672, attention_heads=64)


# (id, shape, LoRA bytes per GPU): vLLM's adapter slots, A (rank x input) and B (output x rank)
# of q, k, v, o, gate, up and down in every layer, for each of maxAdaptersPerReplica, in bf16
LORA_CASES = [
    # one GPU, one layer, one slot of rank 16: q/k/v A 3 x 16 x 8192 + B 16 x (8192 + 2 x 1024);
    # o A 16 x 8192 + B 8192 x 16; gate/up A 2 x 16 x 8192 + B 2 x 28672 x 16; down A 16 x 28672 + B 8192 x 16
    # = 2,588,672 elements; x 16 slots x 80 layers x 2 B = 6,627,000,320 B (6.17 GiB)
    ("llama-70b-16x16-tp1", LlmShape(**LLAMA_70B, **LLAMA_70B_WIDTHS, context_length=8192, lora_slots=16, lora_rank=16),
     6_627_000_320),
    # TP 4 splits the B of q/k/v and gate/up and the A of o and down; the others are whole on each GPU:
    # 393,216 + 40,960 + 32,768 + 131,072 + 262,144 + 229,376 + 114,688 + 131,072 = 1,335,296 x 16 x 80 x 2
    ("llama-70b-16x16-tp4", LlmShape(**LLAMA_70B, **LLAMA_70B_WIDTHS, context_length=8192, lora_slots=16, lora_rank=16,
                                     tensor_parallel_size=4), 3_418_357_760),
    # two pipeline stages hold 40 layers each
    ("llama-70b-16x16-pp2", LlmShape(**LLAMA_70B, **LLAMA_70B_WIDTHS, context_length=8192, lora_slots=16, lora_rank=16,
                                     pipeline_parallel_size=2), 3_313_500_160),
    ("no-adapters", LlmShape(**LLAMA_70B, **LLAMA_70B_WIDTHS, context_length=8192), 0),
]


@pytest.mark.parametrize("case_id,shape,lora", LORA_CASES, ids=[c[0] for c in LORA_CASES])
def test_adapter_slots_take_gpu_memory(case_id, shape, lora):
    memory, plain = replica_memory(shape), replica_memory(LlmShape(**{**shape.__dict__, "lora_slots": 0, "lora_rank": 0}))
    assert memory.lora_bytes_per_gpu == lora
    assert memory.per_gpu_bytes == plain.per_gpu_bytes + lora


def test_adapters_that_would_not_fit_beside_the_model_are_not_placed():
    """A replica whose base model just fits an 80 GiB H100 (77.51 GiB card) was placed with 16
    adapter slots of rank 16 as well, which vLLM sets aside at start (3.2 GiB per GPU at TP 4):
    placement now counts them, and says so."""
    widths = {"hiddenSize": 8192, "intermediateSize": 28672, "attentionHeads": 64}
    base = llm_variant("llama", tp=4, context=29000, **widths)
    adapted = llm_variant("llama", tp=4, context=29000, lora={"adaptersFrom": "s3://adapters/llama", "maxRank": 16}, **widths)
    assert base.gpu_memory_gib == pytest.approx(77.51, abs=0.01)
    assert adapted.gpu_memory_gib == pytest.approx(77.51 + 3_418_357_760 / GIB / 0.9, abs=0.01)
    assert len(plan([dc("fr-dc", H100X8)], [deployment(variants=(base,), tiers={"datacenter"})], []).replicas) == 1
    status = plan([dc("fr-dc", H100X8)], [deployment(variants=(adapted,), tiers={"datacenter"})], []).deployments["d"]
    assert status.status is Status.UNSCHEDULABLE
    assert "LoRA adapters 3.2 GiB/GPU" in status.reason, status.reason


@pytest.mark.parametrize("dtype,engine_args,element_bytes", [
    ("auto", {}, 2), ("bfloat16", {}, 2), ("float32", {}, 4),  # vLLM's adapters take the model's dtype
    ("float32", {"lora_dtype": "bfloat16"}, 2), ("bfloat16", {"lora_dtype": "float32"}, 4), ("float32", {"lora_dtype": "auto"}, 4),
])
def test_adapter_slots_are_counted_in_the_dtype_vllm_keeps_them_in(dtype, engine_args, element_bytes):
    llm = schema.LlmSpec.model_validate({
        "source": "/models/llama-3-70b", "contextLength": 8192, "maxConcurrentSequences": 16, "weightBytes": 2 * 70_553_706_496,
        "dtype": dtype, "engineArgs": engine_args, "lora": {"adaptersFrom": "s3://adapters/llama", "maxRank": 16},
        "architecture": {"layers": 80, "kvHeads": 8, "headDim": 128, "hiddenSize": 8192, "intermediateSize": 28672, "attentionHeads": 64},
    })
    assert inventory.llm_memory(llm).lora_bytes_per_gpu == 6_627_000_320 // 2 * element_bytes

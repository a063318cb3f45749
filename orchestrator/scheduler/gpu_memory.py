"""How much GPU memory one replica of a large language model takes, and on how many GPUs.

A vLLM replica holds the model's weights and a KV cache big enough for the context and
concurrency it promises, spread evenly over its GPUs: ``tensor_parallel_size`` for each of
its ``pipeline_parallel_size`` stages (which split the layers), all of one node.
Placement needs that number before anything runs, so it is computed here from what the
Model manifest declares (weights and the architecture of its ``config.json``), as a pure
function the planner and ``edgeplane plan`` share::

    KV bytes per token of one layer = 2 (K and V) x kv_heads x head_dim x kv_bytes
    KV cache = per-layer bytes x (full layers x context x sequences
                                  + window layers x min(window, context) x sequences)
    GPUs     = tensor_parallel_size x pipeline_parallel_size
    per GPU  = (weights + KV cache) / GPUs + LoRA slots per GPU + RUNTIME_OVERHEAD_GIB
    card     = per GPU / gpu_memory_utilization

``RUNTIME_OVERHEAD_GIB`` is what each GPU holds besides weights and cache: the CUDA
context, NCCL buffers, CUDA graphs and the activations of one prefill batch (vLLM
profiles these at start; 1.5 GiB covers the models documented in docs/datacentre.md).
vLLM takes only ``gpu_memory_utilization`` of each card (0.9 unless told), so the card
must be that much larger than what the replica uses.

A replica serving LoRA adapters sets aside, at start, ``lora_slots`` adapters of
``lora_rank`` (vLLM's ``max_loras`` and ``max_lora_rank``) on the seven projections of each
of its layers: A (rank x input) and B (output x rank) of q, k, v, o, gate, up and down, in
the dtype vLLM keeps them in (``lora_dtype_bytes``: the model's, 2 bytes, or 4 for a float32
model or engine argument ``lora_dtype: float32``). Tensor parallelism splits B of the column-parallel
ones (q/k/v, gate/up) and A of the row-parallel ones (o, down); the other halves are whole
on every GPU; pipeline stages split the layers. An MoE model's experts count as one MLP of
``intermediate_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
#: Per GPU, besides weights and KV cache: CUDA context, NCCL, CUDA graphs, activations.
RUNTIME_OVERHEAD_GIB = 1.5


@dataclass(frozen=True)
class LlmShape:
    """What sizes one replica: weights, architecture, context, concurrency, parallelism."""

    weight_bytes: int
    layers: int
    kv_heads: int
    head_dim: int
    context_length: int
    max_sequences: int = 1
    kv_bytes: int = 2
    sliding_window_layers: int = 0
    sliding_window_tokens: int | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    #: LoRA adapter slots and their rank (0: no adapters), and the widths that size them.
    lora_slots: int = 0
    lora_rank: int = 0
    hidden_size: int = 0
    intermediate_size: int = 0
    attention_heads: int = 0
    lora_dtype_bytes: int = 2


@dataclass(frozen=True)
class GpuMemory:
    """One replica's GPU memory, whole and per GPU, in bytes (``card_gib``: the smallest
    card each GPU may be)."""

    gpus: int
    weight_bytes: int
    kv_cache_bytes: int
    kv_bytes_per_token: int  # over every full-attention layer
    per_gpu_bytes: int
    card_gib: float
    lora_bytes_per_gpu: int = 0  # the adapter slots vLLM sets aside, included in per_gpu_bytes

    @property
    def total_bytes(self) -> int:
        return self.per_gpu_bytes * self.gpus

    @property
    def per_gpu_gib(self) -> float:
        return self.per_gpu_bytes / GIB

    def describe(self) -> str:
        lora = f"LoRA adapters {self.lora_bytes_per_gpu / GIB:.1f} GiB/GPU + " if self.lora_bytes_per_gpu else ""
        return (
            f"{self.gpus}×GPU ≥{self.card_gib:.1f} GiB (weights {self.weight_bytes / GIB:.1f} GiB + "
            f"KV cache {self.kv_cache_bytes / GIB:.1f} GiB + {lora}{RUNTIME_OVERHEAD_GIB:g} GiB/GPU runtime, "
            f"{self.per_gpu_gib:.1f} GiB per GPU)"
        )


def layer_kv_bytes_per_token(shape: LlmShape) -> int:
    """K and V of one token in one layer."""
    return 2 * shape.kv_heads * shape.head_dim * shape.kv_bytes


def lora_bytes_per_gpu(shape: LlmShape) -> int:
    """The LoRA adapter slots one GPU of a replica holds (see the module docstring)."""
    if not shape.lora_slots or not shape.lora_rank:
        return 0
    r, h, i, tp = shape.lora_rank, shape.hidden_size, shape.intermediate_size, shape.tensor_parallel_size
    q, kv = shape.attention_heads * shape.head_dim, shape.kv_heads * shape.head_dim
    whole = 3 * r * h + h * r + 2 * r * h + h * r  # A of q/k/v and gate/up, B of o and down
    split = r * (q + 2 * kv) + r * q + 2 * i * r + r * i  # B of q/k/v and gate/up, A of o and down
    layers = -(-shape.layers // shape.pipeline_parallel_size)
    return (whole + -(-split // tp)) * shape.lora_slots * layers * shape.lora_dtype_bytes


def replica_memory(shape: LlmShape) -> GpuMemory:
    """The GPU memory one replica of ``shape`` takes (see the module docstring)."""
    per_layer = layer_kv_bytes_per_token(shape)
    full_layers = shape.layers - shape.sliding_window_layers
    window = min(shape.sliding_window_tokens or 0, shape.context_length)
    tokens_full = shape.context_length * shape.max_sequences
    tokens_window = window * shape.max_sequences
    kv = per_layer * (full_layers * tokens_full + shape.sliding_window_layers * tokens_window)
    gpus = shape.tensor_parallel_size * shape.pipeline_parallel_size
    lora = lora_bytes_per_gpu(shape)
    per_gpu = -(-(shape.weight_bytes + kv) // gpus) + lora + int(RUNTIME_OVERHEAD_GIB * GIB)
    return GpuMemory(
        gpus=gpus,
        weight_bytes=shape.weight_bytes,
        kv_cache_bytes=kv,
        kv_bytes_per_token=per_layer * full_layers,
        per_gpu_bytes=per_gpu,
        card_gib=per_gpu / GIB / shape.gpu_memory_utilization,
        lora_bytes_per_gpu=lora,
    )

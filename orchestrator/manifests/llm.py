"""A ``runtime: vllm`` variant's ``llm`` block: the model an engine serves on GPUs.

Apart from :mod:`orchestrator.manifests.schema`, which reads it into ``Variant.llm`` and
re-exports its names, because these fields are the engine's and its sizing's: what
vLLM takes (context, dtype, parallelism, engine arguments) and what the GPU memory
model reads (weights, architecture), none of which any other runtime has.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, ValidationInfo, field_validator, model_validator

from orchestrator import accelerator_types
from orchestrator.manifests.strict import Strict, written


class Architecture(Strict):
    """The numbers of a transformer that size its KV cache (from the model's config.json)."""

    layers: int = Field(ge=1, le=1024)
    kvHeads: int = Field(ge=1, le=1024)
    headDim: int = Field(ge=1, le=4096)
    #: Layers that attend over a sliding window only (gpt-oss: every other layer, 128 tokens).
    slidingWindowLayers: int = Field(default=0, ge=0, le=1024)
    slidingWindowTokens: int | None = Field(default=None, ge=1, le=16 * 1024 * 1024)
    #: The widths of a layer (config.json's hidden_size, intermediate_size, num_attention_heads),
    #: which size the GPU memory of LoRA adapters: a manifest with ``llm.lora`` gives them.
    hiddenSize: int | None = Field(default=None, ge=1, le=1024 * 1024)
    intermediateSize: int | None = Field(default=None, ge=1, le=1024 * 1024)
    attentionHeads: int | None = Field(default=None, ge=1, le=16 * 1024)

    @model_validator(mode="after")
    def _window(self) -> Architecture:
        if self.slidingWindowLayers > self.layers:
            raise ValueError(f"slidingWindowLayers ({self.slidingWindowLayers}) is more than layers ({self.layers})")
        if (self.slidingWindowLayers > 0) != (self.slidingWindowTokens is not None):
            raise ValueError("give slidingWindowLayers and slidingWindowTokens together")
        return self


#: Where Ray Serve LLM reads LoRA adapters from (its ``is_remote_path``): object stores only.
LORA_SCHEMES = ("s3://", "gs://", "abfss://", "azure://")
#: ``engineArgs`` keys ``llm.lora`` sets; giving them there is refused (in manifests).
LORA_ENGINE_ARGS = ("enable_lora", "max_loras", "max_lora_rank")


class LoraSpec(Strict):
    """LoRA adapters one replica serves beside its base model (Ray Serve LLM's multi-LoRA).

    ``adaptersFrom`` holds one folder per adapter (``adapter_config.json`` and
    ``adapter_model.safetensors``), which a request names as ``<model>:<folder>``; a
    replica loads one on its first request and keeps the ``maxAdaptersPerReplica`` used
    last, which are also the adapters one batch may mix (vLLM's ``max_loras``, as Ray
    asks). edgeplane never lists or fetches them.
    """

    adaptersFrom: Annotated[str, StringConstraints(min_length=1, max_length=2048, pattern=r"^\S+$")]
    maxAdaptersPerReplica: int = Field(default=16, ge=1, le=256)
    #: The highest rank of any adapter served (vLLM's ``max_lora_rank``, one of the ranks it takes).
    maxRank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = 16
    #: How long one try at downloading an adapter may take, and how many tries a request's
    #: adapter gets (Ray's ``download_timeout_s``, ``max_download_tries``); absent: Ray's 30 s, 3.
    downloadTimeoutSeconds: float | None = Field(default=None, gt=0, le=3600)
    downloadAttempts: int | None = Field(default=None, ge=1, le=10)

    @field_validator("adaptersFrom")
    @classmethod
    def _ray_reads(cls, v: str) -> str:
        scheme = next((s for s in LORA_SCHEMES if v.startswith(s)), None)
        if scheme is None:
            raise ValueError(f"{v!r} is not a place Ray Serve LLM reads LoRA adapters from: give a folder in object storage "
                             f"({', '.join(s + '...' for s in LORA_SCHEMES)}) holding one folder per adapter")
        if not v[len(scheme):].strip("/"):
            raise ValueError(f"{v!r} names no bucket: give {scheme}<bucket>/<folder of adapters>")
        return v


#: ``engineArgs`` keys edgeplane sets itself from the fields above; giving them twice is refused.
LLM_RESERVED_ENGINE_ARGS = ("model", "served_model_name", "max_model_len", "dtype", "quantization",
                            "tensor_parallel_size", "pipeline_parallel_size", "max_num_seqs", "kv_cache_dtype")


class LlmSpec(Strict):
    """A large language model served by an engine on GPUs (``runtime: vllm``).

    ``source`` is handed to the engine as is: a path on the data centre's storage, an
    ``s3://``/``gs://`` URI, or a model id the cluster resolves. edgeplane never fetches it.
    The weight and architecture numbers size GPU memory (see ``scheduler.gpu_memory``).
    """

    source: Annotated[str, StringConstraints(min_length=1, max_length=2048, pattern=r"^\S+$")]
    #: The ``model`` name OpenAI clients send; defaults to the Model's name.
    servedModelName: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$")] | None = None
    contextLength: int = Field(ge=16, le=16 * 1024 * 1024)
    maxConcurrentSequences: int = Field(default=1, ge=1, le=4096)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    quantization: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,32}$")] | None = None
    tensorParallelSize: int = Field(default=1, ge=1, le=64)
    #: Pipeline stages of a replica, each on ``tensorParallelSize`` GPUs: a replica takes the product.
    pipelineParallelSize: int = Field(default=1, ge=1, le=64)
    #: Ray's accelerator type (``H100``, ``A100-80G``, ``L4``...); must match the site's GPU model.
    acceleratorType: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")] | None = None
    weightBytes: int = Field(ge=1, le=2**50)
    architecture: Architecture
    #: Bytes per KV-cache element: 2 for bf16/fp16, 1 for an fp8 KV cache, 4 for fp32.
    kvCacheDtypeBytes: Literal[1, 2, 4] = 2
    #: Fraction of each GPU's memory the engine may take (vLLM's gpu_memory_utilization).
    gpuMemoryUtilization: float = Field(default=0.9, gt=0.1, le=1.0)
    engineArgs: dict[str, Any] = Field(default_factory=dict)
    #: LoRA adapters served beside the base model; absent: the base model only.
    lora: LoraSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _stored_stages(cls, data: Any, info: ValidationInfo) -> Any:
        """A variant an earlier release stored with its pipeline stages in ``engineArgs``
        (then the only place for them; a manifest is now refused them there) reads them as
        ``pipelineParallelSize``: it reads back, and its replicas get the GPUs they take."""
        if written(info) or not isinstance(data, dict) or "pipelineParallelSize" in data:
            return data
        engine = data.get("engineArgs")
        if not isinstance(engine, dict) or "pipeline_parallel_size" not in engine:
            return data
        rest = {k: v for k, v in engine.items() if k != "pipeline_parallel_size"}
        return {**data, "engineArgs": rest, "pipelineParallelSize": engine["pipeline_parallel_size"]}

    # Refused in manifests only, as an importPath is: one an earlier version stored still reads.
    @field_validator("acceleratorType")
    @classmethod
    def _ray_knows(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and written(info) and (why := accelerator_types.problem(v)) is not None:
            raise ValueError(why)
        return v

    @field_validator("engineArgs")
    @classmethod
    def _not_twice(cls, v: dict[str, Any]) -> dict[str, Any]:
        twice = sorted(k for k in v if k in LLM_RESERVED_ENGINE_ARGS or k == "gpu_memory_utilization")
        if twice:
            raise ValueError(f"set {', '.join(twice)} through the llm fields, not engineArgs")
        return v

    # Refused in manifests only: engineArgs an earlier version stored (enable_lora set by
    # hand) still read.
    @field_validator("engineArgs")
    @classmethod
    def _lora_through_its_field(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        given = sorted(k for k in v if k in LORA_ENGINE_ARGS)
        if given and written(info):
            raise ValueError(f"set {', '.join(given)} through llm.lora (adaptersFrom, maxAdaptersPerReplica, maxRank), not engineArgs: "
                             "without it the gateway routes no adapter to the replicas")
        return v

    @model_validator(mode="after")
    def _gpus(self) -> LlmSpec:
        if self.tensorParallelSize * self.pipelineParallelSize > 64:
            raise ValueError(f"tensorParallelSize x pipelineParallelSize is {self.tensorParallelSize * self.pipelineParallelSize} "
                             "GPUs per replica, more than the 64 of any node")
        return self

    # Refused in manifests only: a variant an earlier version stored reads, its adapters uncounted.
    @model_validator(mode="after")
    def _adapter_widths(self, info: ValidationInfo) -> LlmSpec:
        a = self.architecture
        missing = [n for n in ("hiddenSize", "intermediateSize", "attentionHeads") if getattr(a, n) is None]
        if self.lora is not None and missing and written(info):
            raise ValueError(f"llm.lora needs architecture.{', '.join(missing)} (config.json's hidden_size, intermediate_size, "
                             "num_attention_heads): vLLM sets aside GPU memory for maxAdaptersPerReplica adapters of maxRank "
                             "on every layer, which placement counts from them")
        return self

    @model_validator(mode="after")
    def _adapter_names(self) -> LlmSpec:
        # Ray Serve LLM reads a request's model up to its first ':' as the base model's id
        if self.lora is not None and self.servedModelName is not None and ":" in self.servedModelName:
            raise ValueError(f"servedModelName {self.servedModelName!r} holds a ':', which Ray Serve LLM reads as the start of "
                             "an adapter's name once llm.lora is set: rename it, or leave llm.lora out")
        return self

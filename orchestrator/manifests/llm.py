"""A ``runtime: vllm`` variant's ``llm`` block: the model an engine serves on GPUs.

Apart from :mod:`orchestrator.manifests.schema`, which reads it into ``Variant.llm`` and
re-exports its names, because these fields are the engine's and its sizing's: what
vLLM takes (context, dtype, parallelism, engine arguments) and what the GPU memory
model reads (weights, architecture), none of which any other runtime has.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator, model_validator

from orchestrator import accelerator_types


class _Strict(BaseModel):
    # the same rules as every manifest model (schema.Strict); kept here to avoid an import cycle
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def _written(info: ValidationInfo) -> bool:
    """Whether the value comes from a manifest, not from the store (schema.written)."""
    return bool((info.context or {}).get("manifest"))


class Architecture(_Strict):
    """The numbers of a transformer that size its KV cache (from the model's config.json)."""

    layers: int = Field(ge=1, le=1024)
    kvHeads: int = Field(ge=1, le=1024)
    headDim: int = Field(ge=1, le=4096)
    #: Layers that attend over a sliding window only (gpt-oss: every other layer, 128 tokens).
    slidingWindowLayers: int = Field(default=0, ge=0, le=1024)
    slidingWindowTokens: int | None = Field(default=None, ge=1, le=16 * 1024 * 1024)

    @model_validator(mode="after")
    def _window(self) -> Architecture:
        if self.slidingWindowLayers > self.layers:
            raise ValueError(f"slidingWindowLayers ({self.slidingWindowLayers}) is more than layers ({self.layers})")
        if (self.slidingWindowLayers > 0) != (self.slidingWindowTokens is not None):
            raise ValueError("give slidingWindowLayers and slidingWindowTokens together")
        return self


#: ``engineArgs`` keys edgeplane sets itself from the fields above; giving them twice is refused.
LLM_RESERVED_ENGINE_ARGS = ("model", "served_model_name", "max_model_len", "dtype", "quantization",
                            "tensor_parallel_size", "pipeline_parallel_size", "max_num_seqs", "kv_cache_dtype")


class LlmSpec(_Strict):
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

    @model_validator(mode="before")
    @classmethod
    def _stored_stages(cls, data: Any, info: ValidationInfo) -> Any:
        """A variant an earlier release stored with its pipeline stages in ``engineArgs``
        (then the only place for them; a manifest is now refused them there) reads them as
        ``pipelineParallelSize``: it reads back, and its replicas get the GPUs they take."""
        if _written(info) or not isinstance(data, dict) or "pipelineParallelSize" in data:
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
        if v is not None and _written(info) and (why := accelerator_types.problem(v)) is not None:
            raise ValueError(why)
        return v

    @field_validator("engineArgs")
    @classmethod
    def _not_twice(cls, v: dict[str, Any]) -> dict[str, Any]:
        twice = sorted(k for k in v if k in LLM_RESERVED_ENGINE_ARGS or k == "gpu_memory_utilization")
        if twice:
            raise ValueError(f"set {', '.join(twice)} through the llm fields, not engineArgs")
        return v

    @model_validator(mode="after")
    def _gpus(self) -> LlmSpec:
        if self.tensorParallelSize * self.pipelineParallelSize > 64:
            raise ValueError(f"tensorParallelSize x pipelineParallelSize is {self.tensorParallelSize * self.pipelineParallelSize} "
                             "GPUs per replica, more than the 64 of any node")
        return self

"""The KV cache's bytes per token of an onnxruntime-genai model, from its genai_config.json.

Both ends size a generative model's memory by it: the control plane's packer prints it for
the manifest (``kvBytesPerToken``), and the agent weighs a package's load against the memory
it has before loading it. One formula, so the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: dtype name in genai_config / ONNX -> bytes per element of the KV cache.
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1}


def bytes_per_token(config: Mapping[str, Any]) -> int:
    """2 (key and value) x layers x KV heads x head size x element size (``kv_cache_dtype``,
    float32 unless said). Raises KeyError, TypeError or ValueError naming what is missing."""
    decoder = config.get("model", {}).get("decoder", {})
    layers = int(decoder["num_hidden_layers"])
    heads = int(decoder.get("num_key_value_heads") or decoder["num_attention_heads"])
    head_size = int(decoder["head_size"])
    dtype = str(decoder.get("kv_cache_dtype", "float32"))
    return 2 * layers * heads * head_size * DTYPE_BYTES.get(dtype, 4)

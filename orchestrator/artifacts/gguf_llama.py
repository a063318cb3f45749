"""A Llama-architecture GGUF file as an onnxruntime-genai package, with no torch.

onnxruntime-genai's own model builder reads GGUF but needs torch and transformers, which
are gigabytes on the package index. This converter needs only ``gguf`` (the reader
published by the llama.cpp project: numpy, a few hundred KB), ``onnx`` and ``tokenizers``:

* the layers' linear weights stored as Q4_0, Q4_1 or Q4_K stay as the file has them, 4
  bits in blocks of 32, multiplied by onnxruntime's ``MatMulNBits`` (the per-block offset
  of Q4_1 and Q4_K as one small extra product); every other weight (the embedding, the
  norms, other quantization types, or all of them with ``--float32``) is dequantized by
  ``gguf`` to float32. They go to ``model.onnx.data`` beside the graph;
* the decoder is written with plain ONNX operators: RMSNorm, rotary position embedding
  on adjacent pairs (the layout llama.cpp's converter leaves the query and key weights
  in), grouped-query attention over the KV cache with a causal mask, the SwiGLU MLP and
  the output projection tied to the embedding where the file has no ``output.weight``.
  Its inputs and outputs are the ones onnxruntime-genai drives for ``"type": "llama"``
  (``input_ids``, ``attention_mask``, ``past_key_values.N.key/value``; ``logits``,
  ``present.N.key/value``);
* the tokenizer (a GPT-2 style byte-level BPE: ``tokenizer.ggml.model`` = ``gpt2``) is
  rebuilt from the file's vocabulary and merges into ``tokenizer.json``, and its chat
  template goes to ``tokenizer_config.json``.

    python -m orchestrator.artifacts.gguf_llama MODEL.gguf OUT_DIR [--context-length N] [--float32] [--pack OUT.tar]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestrator.artifacts import genai_package

OPSET = 17
#: ``MatMulNBits`` accuracy level: 4 multiplies with int8 activations (onnxruntime's fast
#: kernel on x86 and Arm), 0 in float32 (exact, several times slower).
ACCURACY_LEVEL = 4
#: Bumped whenever the graph or the files written change, so caches of converted packages
#: (``orchestrator.testing.examples``) build again.
CONVERTER_VERSION = 4
#: Bounds on the header's numbers, far above any published Llama-architecture model (Llama
#: 3.1 405B: 126 layers, 128 heads, 16384 wide, 128256 tokens, 131072 of context). The
#: header is read before the tensors that back it, so a crafted one of a few hundred bytes
#: must not size the converter's loops and tables.
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_WIDTH = 1 << 20  # hidden and feed-forward sizes
MAX_VOCAB = 1 << 22
#: The rotary tables hold context x head size float32 values (512 MiB at 1M tokens and
#: head size 128); a longer trained context is converted with ``--context-length``.
MAX_CONTEXT = 1 << 20


class GGUFError(Exception):
    """A GGUF file this converter cannot turn into a package; the message says why."""


@dataclass(frozen=True)
class LlamaShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    context_length: int
    rope_base: float
    rms_eps: float

    @property
    def head_size(self) -> int:
        return self.hidden // self.heads


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise GGUFError(f"the file has no {key!r}")
        return default
    return field.contents()


def _whole(reader: Any, key: str, default: int | None = None) -> int:
    value = _field(reader, key, default)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise GGUFError(f"{key} is {value!r:.40}, not a whole number")
    return int(value)


def _count(reader: Any, key: str, high: int | None, default: int | None = None) -> int:
    value = _whole(reader, key, default)
    if value < 1 or (high is not None and value > high):
        raise GGUFError(f"{key} is {value}, not " + (f"between 1 and {high}" if high is not None else "at least 1"))
    return value


def _real(reader: Any, key: str, default: float | None = None, *, positive: bool = False) -> float:
    value = _field(reader, key, default)
    number = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
    if not number or not (0 < value < float("inf") if positive else 0 <= value < float("inf")):
        raise GGUFError(f"{key} is {value!r:.40}, not a finite number {'above' if positive else 'of at least'} 0")
    return float(value)


def read_shape(reader: Any, context_length: int | None = None) -> LlamaShape:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise GGUFError(f"architecture {arch!r} is not supported (only 'llama')")
    if context_length is not None and context_length < 1:
        raise GGUFError(f"a context length of {context_length} tokens: give at least 1")
    trained = _count(reader, "llama.context_length", None)  # bounded once capped, below
    heads = _count(reader, "llama.attention.head_count", MAX_HEADS)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    shape = LlamaShape(
        layers=_count(reader, "llama.block_count", MAX_LAYERS),
        hidden=_count(reader, "llama.embedding_length", MAX_WIDTH),
        heads=heads,
        kv_heads=_count(reader, "llama.attention.head_count_kv", MAX_HEADS, heads),
        ffn=_count(reader, "llama.feed_forward_length", MAX_WIDTH),
        vocab=len(tokens.data) if tokens is not None else 0,
        context_length=min(trained, context_length) if context_length else trained,
        rope_base=_real(reader, "llama.rope.freq_base", 10000.0, positive=True),
        rms_eps=_real(reader, "llama.attention.layer_norm_rms_epsilon"),
    )
    if not 1 <= shape.vocab <= MAX_VOCAB:
        raise GGUFError(f"the file has {shape.vocab} tokens in 'tokenizer.ggml.tokens', not between 1 and {MAX_VOCAB}")
    if shape.context_length > MAX_CONTEXT:
        raise GGUFError(f"a context of {shape.context_length} tokens is more than {MAX_CONTEXT}: give --context-length")
    if shape.hidden % shape.heads or shape.heads % shape.kv_heads:
        raise GGUFError(f"{shape.heads} heads do not divide the hidden size {shape.hidden} or into {shape.kv_heads} KV heads")
    if shape.head_size % 2:
        raise GGUFError(f"head size {shape.head_size} (hidden size {shape.hidden} / {shape.heads} heads) is odd: "
                        "the rotary embedding turns pairs of values")
    return shape


def _weights(reader: Any) -> dict[str, np.ndarray]:
    from gguf import quants

    out = {}
    for tensor in reader.tensors:
        try:
            values = quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as exc:
            raise GGUFError(f"tensor {tensor.name}: {tensor.tensor_type.name} cannot be dequantized: {exc}") from None
        out[tensor.name] = np.ascontiguousarray(values, dtype=np.float32)
    return out


@dataclass(frozen=True)
class Blocks:
    """A weight kept as the file stores it, in blocks of 32 along the input dimension:
    ``value = scale * (q - 8 if symmetric else q) + low`` (Q4_0: symmetric, no ``low``;
    Q4_1 and Q4_K: ``low`` per block)."""

    q: np.ndarray  # uint8 [out, blocks, 32], 0..15
    scale: np.ndarray  # float32 [out, blocks]
    low: np.ndarray | None  # float32 [out, blocks] (Q4_1, Q4_K), None (Q4_0: zero point 8)

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.q.shape[1] * 32


#: The layers' linear weights (the embedding and the tied output stay float32).
LINEAR = tuple(f"{name}.weight" for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"))
#: Tensor types whose blocks the decoder multiplies as they are (``MatMulNBits``).
KEPT_TYPES = ("Q4_0", "Q4_1", "Q4_K")


def _blocks(tensor: Any) -> Blocks | None:
    """The 4-bit blocks of a Q4_0, Q4_1 or Q4_K tensor; None for any other type."""
    kind = tensor.tensor_type.name
    if kind not in KEPT_TYPES:
        return None
    raw = np.asarray(tensor.data, dtype=np.uint8)
    rows = raw.shape[0]
    if kind == "Q4_K":
        return _k_blocks(raw.reshape(rows, -1))
    size = 18 if kind == "Q4_0" else 20
    blocks = raw.reshape(rows, -1, size)
    scale = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    low = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if kind == "Q4_1" else None
    packed = blocks[..., size - 16:]
    # ggml: element j is the low nibble of byte j, element j + 16 its high nibble
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1)
    return Blocks(q, scale, low)


def _k_blocks(raw: np.ndarray) -> Blocks:
    """Q4_K rows as blocks of 32. A super-block of 256 values is ``d``, ``dmin`` (float16),
    12 bytes of 6-bit scales and minimums for its 8 sub-blocks (unpacked by ``gguf``'s own
    ``Q4_K.get_scale_min``) and 128 bytes of 4-bit values, 64 at a time: the low nibbles
    are one sub-block, the high nibbles the next. A sub-block's value is
    ``d * scale * q - dmin * min``: per block of 32, a scale and a ``low``, as Q4_1."""
    from gguf.quants import Q4_K

    rows = raw.shape[0]
    supers = raw.reshape(-1, 144)
    d = supers[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = supers[:, 2:4].copy().view(np.float16).astype(np.float32)
    scales, minimums = Q4_K.get_scale_min(supers[:, 4:16].copy())
    nibbles = supers[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    q = (nibbles & 0x0F).reshape(rows, -1, 32)
    scale = (d * scales.astype(np.float32)).reshape(rows, -1)
    low = -(dmin * minimums.astype(np.float32)).reshape(rows, -1)
    return Blocks(q, scale, low)


def _decoder(shape: LlamaShape, w: dict[str, np.ndarray], blocks: dict[str, Blocks] | None = None) -> Any:
    from onnx import TensorProto, helper, numpy_helper

    h, nh, kvh, d = shape.hidden, shape.heads, shape.kv_heads, shape.head_size
    group = nh // kvh
    nodes: list[Any] = []
    inits: list[Any] = []

    def const(name: str, value: np.ndarray, doc: str = "") -> str:
        inits.append(numpy_helper.from_array(value, name))
        if doc:
            inits[-1].doc_string = doc
        return name

    def node(op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def linear(x: str, weight: str, out: str) -> str:
        kept = (blocks or {}).get(weight)
        if kept is None:
            return node("MatMul", [x, const(f"{weight}.T", np.ascontiguousarray(w[weight].T))], out)
        return quantized_linear(x, weight, kept, out)

    def quantized_linear(x: str, weight: str, b: Blocks, out: str) -> str:
        """``x @ W.T`` on the file's 4-bit blocks (onnxruntime's ``MatMulNBits``). Its fast
        kernels take whole-number zero points; a per-block ``low`` (Q4_1, Q4_K) is added as
        ``block sums of x @ low.T``, a matrix 32 times smaller than the weight."""
        n, k = b.shape
        packed = (b.q[..., 0::2] | (b.q[..., 1::2] << 4)).astype(np.uint8)  # MatMulNBits: element 2i low, 2i+1 high
        zero = 8 if b.low is None else 0
        points = np.full((n, (k // 32 + 1) // 2), zero | (zero << 4), np.uint8)  # two blocks' zero points a byte
        y = node("MatMulNBits", [x, const(f"{weight}.q4", packed), const(f"{weight}.scales", b.scale.reshape(-1)),
                                 const(f"{weight}.zero_points", points.reshape(-1))],
                 f"{out}.q" if b.low is not None else out, domain="com.microsoft", K=k, N=n, bits=4, block_size=32,
                 accuracy_level=ACCURACY_LEVEL)
        if b.low is None:
            return y
        sums = node("ReduceSum", [node("Reshape", [x, "in_blocks"], f"{out}.x_blocks"), "last_axis"], f"{out}.x_sums", keepdims=0)
        low = const(f"{weight}.low.T", np.ascontiguousarray(b.low.T), genai_package.QUANTIZATION_DOC)  # bytes, not parameters
        return node("Add", [y, node("MatMul", [sums, low], f"{out}.low")], out)

    def rms_norm(x: str, weight: str, out: str) -> str:
        sq = node("Mul", [x, x], f"{out}.sq")
        mean = node("ReduceMean", [sq], f"{out}.mean", axes=[-1], keepdims=1)
        var = node("Add", [mean, "rms_eps"], f"{out}.var")
        inv = node("Reciprocal", [node("Sqrt", [var], f"{out}.std")], f"{out}.inv")
        return node("Mul", [node("Mul", [x, inv], f"{out}.normed"), const(weight, w[weight])], out)

    def rope(x: str, heads: int, out: str) -> str:
        # [B, heads, S, d] -> pairs (x[2i], x[2i+1]) rotated by the position's angle
        pairs = node("Reshape", [x, const(f"{out}.pairs_shape", np.array([0, heads, -1, d // 2, 2], np.int64))], f"{out}.pairs")
        nodes.append(helper.make_node("Split", [pairs, "two_ones"], [f"{out}.x0", f"{out}.x1"], axis=-1))
        a = node("Squeeze", [f"{out}.x0", "last_axis"], f"{out}.a")
        b = node("Squeeze", [f"{out}.x1", "last_axis"], f"{out}.b")
        r0 = node("Sub", [node("Mul", [a, "cos"], f"{out}.ac"), node("Mul", [b, "sin"], f"{out}.bs")], f"{out}.r0")
        r1 = node("Add", [node("Mul", [a, "sin"], f"{out}.as"), node("Mul", [b, "cos"], f"{out}.bc")], f"{out}.r1")
        both = node("Concat", [node("Unsqueeze", [r0, "last_axis"], f"{out}.u0"), node("Unsqueeze", [r1, "last_axis"], f"{out}.u1")],
                    f"{out}.both", axis=-1)
        return node("Reshape", [both, const(f"{out}.shape", np.array([0, heads, -1, d], np.int64))], out)

    const("rms_eps", np.array(shape.rms_eps, np.float32))
    if blocks:
        const("in_blocks", np.array([0, 0, -1, 32], np.int64))
    const("two_ones", np.array([1, 1], np.int64))
    const("last_axis", np.array([-1], np.int64))
    const("zero", np.array(0, np.int64))
    const("one", np.array(1, np.int64))
    const("scale", np.array(1.0 / np.sqrt(d), np.float32))
    const("masked", np.array(np.finfo(np.float32).min, np.float32))
    const("no_mask", np.array(0.0, np.float32))
    inv_freq = shape.rope_base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    angles = np.outer(np.arange(shape.context_length, dtype=np.float64), inv_freq)
    const("cos_table", np.cos(angles).astype(np.float32))
    const("sin_table", np.sin(angles).astype(np.float32))

    # positions of the new tokens: the mask covers past and new, the ids only the new
    total = node("Gather", [node("Shape", ["attention_mask"], "mask_shape"), "one"], "total", axis=0)
    count = node("Gather", [node("Shape", ["input_ids"], "ids_shape"), "one"], "count", axis=0)
    start = node("Sub", [total, count], "start")
    positions = node("Range", [start, total, "one"], "positions")
    for trig in ("cos", "sin"):
        node("Gather", [f"{trig}_table", positions], trig, axis=0)  # [S, d/2]
    # causal mask [S, T]: a new token sees every past position and the new ones up to itself
    keys = node("Range", ["zero", total, "one"], "key_positions")
    visible = node("LessOrEqual", [node("Unsqueeze", [keys, "zero_axis"], "keys_row"),
                                   node("Unsqueeze", [positions, "last_axis"], "positions_col")], "visible")
    const("zero_axis", np.array([0], np.int64))
    mask = node("Where", [visible, "no_mask", "masked"], "causal_mask")

    x = node("Gather", [const("token_embd.weight", w["token_embd.weight"]), "input_ids"], "x0", axis=0)
    heads_shape = const("heads_shape", np.array([0, 0, nh, d], np.int64))
    kv_shape = const("kv_shape", np.array([0, 0, kvh, d], np.int64))
    grouped_q = const("grouped_q", np.array([0, kvh, group, -1, d], np.int64))
    kv_expand = const("kv_expand", np.array([2], np.int64))
    merged = const("merged", np.array([0, 0, h], np.int64))
    heads_back = const("heads_back", np.array([0, nh, -1, d], np.int64))
    for i in range(shape.layers):
        p = f"blk.{i}"
        n = rms_norm(x, f"{p}.attn_norm.weight", f"{p}.attn_in")
        q = node("Transpose", [node("Reshape", [linear(n, f"{p}.attn_q.weight", f"{p}.q_flat"), heads_shape], f"{p}.q_heads")],
                 f"{p}.q_t", perm=[0, 2, 1, 3])
        k = node("Transpose", [node("Reshape", [linear(n, f"{p}.attn_k.weight", f"{p}.k_flat"), kv_shape], f"{p}.k_heads")],
                 f"{p}.k_t", perm=[0, 2, 1, 3])
        v = node("Transpose", [node("Reshape", [linear(n, f"{p}.attn_v.weight", f"{p}.v_flat"), kv_shape], f"{p}.v_heads")],
                 f"present.{i}.value_new", perm=[0, 2, 1, 3])
        q = rope(q, nh, f"{p}.q_rot")
        k = rope(k, kvh, f"{p}.k_rot")
        keys_all = node("Concat", [f"past_key_values.{i}.key", k], f"present.{i}.key", axis=2)
        values_all = node("Concat", [f"past_key_values.{i}.value", v], f"present.{i}.value", axis=2)
        # grouped-query attention: query head j reads KV head j // group
        qg = node("Reshape", [q, grouped_q], f"{p}.qg")  # [B, kvh, group, S, d]
        kg = node("Unsqueeze", [node("Transpose", [keys_all], f"{p}.k_tt", perm=[0, 1, 3, 2]), kv_expand], f"{p}.kg")  # [B, kvh, 1, d, T]
        vg = node("Unsqueeze", [values_all, kv_expand], f"{p}.vg")  # [B, kvh, 1, T, d]
        scores = node("Add", [node("Mul", [node("MatMul", [qg, kg], f"{p}.qk"), "scale"], f"{p}.scaled"), mask], f"{p}.scores")
        attn = node("MatMul", [node("Softmax", [scores], f"{p}.probs", axis=-1), vg], f"{p}.attn")  # [B, kvh, group, S, d]
        attn = node("Transpose", [node("Reshape", [attn, heads_back], f"{p}.attn_heads")], f"{p}.attn_t", perm=[0, 2, 1, 3])
        attn = linear(node("Reshape", [attn, merged], f"{p}.attn_merged"), f"{p}.attn_output.weight", f"{p}.attn_out")
        x = node("Add", [x, attn], f"{p}.x_attn")
        n = rms_norm(x, f"{p}.ffn_norm.weight", f"{p}.ffn_in")
        gate = linear(n, f"{p}.ffn_gate.weight", f"{p}.gate")
        silu = node("Mul", [gate, node("Sigmoid", [gate], f"{p}.gate_sig")], f"{p}.silu")
        up = node("Mul", [silu, linear(n, f"{p}.ffn_up.weight", f"{p}.up")], f"{p}.act")
        x = node("Add", [x, linear(up, f"{p}.ffn_down.weight", f"{p}.down")], f"{p}.x_out")
    x = rms_norm(x, "output_norm.weight", "final")
    # [vocab, hidden] as the file has it, multiplied transposed: a tied output shares the
    # embedding's weights instead of a transposed copy (113 MB for SmolLM2)
    output = "output.weight" if "output.weight" in w else "token_embd.weight"
    if output != "token_embd.weight":
        const(output, w[output])
    rows = node("Reshape", [x, const("rows_shape", np.array([-1, h], np.int64))], "final_rows")
    flat = node("Gemm", [rows, output], "logits_rows", transB=1)
    batch_seq = node("Slice", [node("Shape", [x], "final_shape"), "zero_axis", const("two", np.array([2], np.int64))], "batch_seq")
    vocab = const("vocab_dim", np.array([shape.vocab], np.int64))
    node("Reshape", [flat, node("Concat", [batch_seq, vocab], "logits_shape", axis=0)], "logits")

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", i64, ["batch", "total_sequence"])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "sequence", shape.vocab])]
    for i in range(shape.layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f32, ["batch", kvh, "past_sequence", d]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", f32, ["batch", kvh, "total_sequence", d]))
    graph = helper.make_graph(nodes, "edgeplane_gguf_llama", inputs, outputs, inits)
    opsets = [helper.make_operatorsetid("", OPSET)] + ([helper.make_operatorsetid("com.microsoft", 1)] if blocks else [])
    model = helper.make_model(graph, opset_imports=opsets, producer_name="edgeplane")
    model.ir_version = 8
    return model


#: GGUF token types (control, unused) whose strings may repeat under other ids of the same types.
_KEEP_ONE_ID = (3, 5)


def _tokenizer(reader: Any) -> tuple[Any, list[str], dict[str, int]]:
    """The file's byte-level BPE as a ``tokenizers`` tokenizer, its vocabulary, and its special tokens' ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"tokenizer {kind!r} is not supported (only the byte-level BPE 'gpt2')")
    tokens = [str(t) for t in _field(reader, "tokenizer.ggml.tokens")]
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    if len(types) != len(tokens) or not all(isinstance(t, int) for t in types):
        raise GGUFError(f"tokenizer.ggml.token_type is not one whole number for each of the {len(tokens)} tokens")
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        # A tokenizer.json vocabulary holds each string once: the string's later id is lost.
        # That is harmless between control and unused tokens (a control token decodes to
        # nothing, an unused one is never generated), so the first id stands for both.
        first = vocab.setdefault(t, i)
        if first != i and not (types[first] in _KEEP_ONE_ID and types[i] in _KEEP_ONE_ID):
            raise GGUFError(f"tokens {vocab[t]} and {i} are both {t!r:.60}: tokenizer.json maps a string to one id, "
                            "so the model's other id would decode wrongly; not converted")
    merges = [tuple(str(m).split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    for pair in merges:  # tokenizers raises, or panics, on a merge whose parts or result it lacks
        if len(pair) != 2 or pair[0] not in vocab or pair[1] not in vocab or pair[0] + pair[1] not in vocab:
            raise GGUFError(f"merge {' '.join(pair)!r:.80}: not two tokens of the vocabulary, a space between them, "
                            "that make a third")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    special = {t: vocab[t] for t, kind in zip(tokens, types, strict=True) if kind in (3, 4)}  # control, user-defined
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return tok, tokens, special


def convert(gguf_path: pathlib.Path, out_dir: pathlib.Path, *, context_length: int | None = None,
            keep_quantized: bool = True) -> pathlib.Path:
    """Write ``model.onnx`` (+ ``model.onnx.data``), ``genai_config.json`` and the tokenizer
    files for ``gguf_path`` into ``out_dir``, which must not exist or be empty. Everything is
    read and checked first; the files are written in a folder beside it and renamed into
    place, so a failure leaves no half-written model. ``keep_quantized``: the layers' Q4_0,
    Q4_1 and Q4_K weights stay 4-bit (``MatMulNBits``); False dequantizes every weight."""
    import onnx

    try:
        from gguf import GGUFReader
    except ImportError:
        raise GGUFError("reading GGUF files needs the gguf package: pip install 'edgeplane[convert]'") from None
    try:
        reader = GGUFReader(str(gguf_path))
    except Exception as exc:  # noqa: BLE001 - the reader raises what its parse met (ValueError, struct.error, KeyError...)
        raise GGUFError(f"{gguf_path}: not a readable GGUF file: {exc}") from None
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise GGUFError(f"{out_dir} exists and is not an empty folder")
    shape = read_shape(reader, context_length)
    tok, tokens, special = _tokenizer(reader)
    weights = _weights(reader)
    _check_weights(shape, weights)
    kept = None
    if keep_quantized:
        kept = {t.name: b for t in reader.tensors if t.name.endswith(LINEAR) and (b := _blocks(t)) is not None}
    model = _decoder(shape, weights, kept)
    tokenizer_config, config = _configs(reader, shape, tokens, special)
    partial = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        # the weights beside the graph, as onnxruntime-genai's own builder writes them: the
        # session maps them instead of parsing them out of protobuf (SmolLM2 loads 2.7x faster)
        onnx.save_model(model, str(partial / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
        tok.save(str(partial / "tokenizer.json"))
        (partial / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True))
        (partial / genai_package.CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out_dir


def _expected_weights(shape: LlamaShape, tied: bool) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every tensor the decoder reads, with the shape the header promises, layer by layer:
    a header claiming more layers than the file holds fails at the first one missing."""
    h, kv, v = shape.hidden, shape.kv_heads * shape.head_size, shape.vocab
    yield from {"token_embd.weight": (v, h), "output_norm.weight": (h,)}.items()
    if not tied:
        yield "output.weight", (v, h)
    for i in range(shape.layers):
        p = f"blk.{i}"
        yield from {f"{p}.attn_norm.weight": (h,), f"{p}.ffn_norm.weight": (h,), f"{p}.attn_q.weight": (h, h),
                    f"{p}.attn_k.weight": (kv, h), f"{p}.attn_v.weight": (kv, h), f"{p}.attn_output.weight": (h, h),
                    f"{p}.ffn_gate.weight": (shape.ffn, h), f"{p}.ffn_up.weight": (shape.ffn, h),
                    f"{p}.ffn_down.weight": (h, shape.ffn)}.items()


def _check_weights(shape: LlamaShape, weights: dict[str, np.ndarray]) -> None:
    for name, want in _expected_weights(shape, tied="output.weight" not in weights):
        got = weights.get(name)
        if got is None:
            raise GGUFError(f"the file has no tensor {name!r}")
        if got.shape != want:
            raise GGUFError(f"tensor {name!r} has shape {list(got.shape)}, the header says {list(want)}")


def _configs(reader: Any, shape: LlamaShape, tokens: list[str], special: dict[str, int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``tokenizer_config.json`` and ``genai_config.json``."""
    ids = {key: _whole(reader, f"tokenizer.ggml.{key}_token_id", -1) for key in ("bos", "eos", "padding", "unknown")}
    ids = {key: i for key, i in ids.items() if 0 <= i < len(tokens)}
    if "eos" not in ids:
        raise GGUFError("the file names no end-of-sequence token (tokenizer.ggml.eos_token_id)")
    eos = [ids["eos"]] + [i for t, i in special.items() if t in ("<|endoftext|>", "<|im_end|>", "<|eot_id|>") and i != ids["eos"]]
    template = reader.fields.get("tokenizer.chat_template")
    tokenizer_config = genai_package.tokenizer_config(
        bos=tokens[ids.get("bos", eos[0])], eos=tokens[ids["eos"]], pad=tokens[ids.get("padding", ids["eos"])],
        unk=tokens[ids.get("unknown", ids["eos"])], context_length=shape.context_length, special=special,
        chat_template=template.contents() if template is not None else None,
        add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)))
    config = genai_package.llama_config(
        bos=ids.get("bos", eos[0]), eos=eos, pad=ids.get("padding", ids["eos"]), vocab=shape.vocab,
        context_length=shape.context_length, head_size=shape.head_size, hidden_size=shape.hidden, heads=shape.heads,
        kv_heads=shape.kv_heads, layers=shape.layers)
    return tokenizer_config, config


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.artifacts.gguf_llama", description=__doc__.split("\n")[0])
    parser.add_argument("gguf", type=pathlib.Path)
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--context-length", type=int, help="cap the context (the rotary table and the package's declared limit)")
    parser.add_argument("--float32", action="store_true",
                        help="dequantize every weight to float32 (default: the layers' Q4_0/Q4_1/Q4_K weights stay 4-bit)")
    parser.add_argument("--pack", type=pathlib.Path,
                        help="also pack the folder into this package (tar) and print what a Model manifest needs (sha256, sizes)")
    args = parser.parse_args(argv)
    try:
        out = convert(args.gguf, args.out_dir, context_length=args.context_length, keep_quantized=not args.float32)
        if args.pack:
            # the figures a Model manifest needs, as `genai_package pack` prints them
            print(json.dumps(genai_package.pack(out, args.pack).as_dict(), indent=2))
    except (GGUFError, genai_package.PackageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a folder that cannot be written
        print(f"error: {exc.filename or args.out_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main())

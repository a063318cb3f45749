"""A tiny generative model that onnxruntime-genai runs, built here with no download.

Tests, benchmarks and the demo need a real ``runtime: onnx-genai`` package: a decoder
ONNX graph with the KV-cache inputs and outputs onnxruntime-genai drives, a
``tokenizer.json`` and a chat template. This module makes one from nothing but
``onnx.helper`` and the ``tokenizers`` package, in well under a second:

* the text is a fixed corpus generated from a small grammar about edge serving;
* the tokenizer is a byte-level BPE trained on it by ``tokenizers`` (GPT-2 style), with
  ChatML-like special tokens and a Jinja chat template in ``tokenizer_config.json``;
* the decoder is a bigram language model of that corpus (``Gather`` of a log-probability
  table) plus a small context term (the mean of the value cache, projected to the
  vocabulary), so it writes corpus-like text that depends on the prompt, greedy decoding
  is deterministic, and the KV cache grows one position per token like a real model.
  ``<|im_end|>``/``<|endoftext|>`` get a very low score unless ``eos_bias`` says
  otherwise, so greedy generation runs until ``max_tokens`` or a stop string;
* ``ffn_layers`` adds a residual MLP per token (compute standing in for a larger model's
  layers), for benchmarks and for generations slow enough to interrupt.

Everything is seeded: the same arguments give byte-identical packages (same sha256).

    python -m orchestrator.testing.genai_model OUT_DIR [--layers 2 --kv-heads 2 ...]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import sys
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from orchestrator.artifacts import genai_package

OPSET = 17
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SUBJECTS = ("the edge site", "the model", "the gateway", "the agent", "a replica", "the data centre", "the scheduler", "the operator",
             "each request", "the control plane", "a small model", "the cluster")
_VERBS = ("answers", "serves", "routes", "places", "streams", "checks", "measures", "loads", "keeps", "sends", "reports", "moves")
_OBJECTS = ("tokens", "the request", "a chat answer", "the nearest site", "customers", "the package", "every reply", "its memory",
            "the load", "a new version", "the heartbeat", "the traffic")
_TAILS = ("quickly", "close to users", "within its budget", "at the edge", "in the data centre", "one token at a time",
          "without a download", "when it is healthy", "before the deadline", "with care", "in order", "on the CPU")


def corpus(sentences: int = 1500, seed: int = 0) -> list[str]:
    """Deterministic sentences from a small grammar: the training text of the tokenizer and the bigram table."""
    rng = random.Random(seed)
    out = []
    for _ in range(sentences):
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
        if rng.random() < 0.3:
            s += f" and {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        out.append(s[0].upper() + s[1:] + ".")
    return out


@dataclass(frozen=True)
class GenAIModel:
    """A built model folder and, once packed, its package and the figures a manifest declares."""

    directory: pathlib.Path
    package: pathlib.Path
    sha256: str
    size_bytes: int
    parameters: int
    weight_bytes: int
    context_length: int
    kv_bytes_per_token: int
    vocab_size: int

    def manifest_fields(self) -> dict:
        """The ``spec.variants[]`` entry of a ``runtime: onnx-genai`` Model, artifact URI left to the caller."""
        return {
            "runtime": "onnx-genai",
            "artifact": {"sha256": self.sha256},
            "generative": {
                "parameters": self.parameters,
                "weightBytes": self.weight_bytes,
                "contextLength": self.context_length,
                "kvBytesPerToken": self.kv_bytes_per_token,
            },
        }


def _train_tokenizer(text: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Chat-formatted lines too, so role names and newlines have tokens of their own.
    lines = list(text) + [f"user\n{t}" for t in text[:50]] + [f"assistant\n{t}" for t in text[50:100]] + [f"system\n{t}" for t in text[:10]]
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def _bigram_logits(tok, text: list[str], vocab: int, eos_ids: list[int], eos_bias: float, rng: np.random.Generator) -> np.ndarray:
    counts = np.full((vocab, vocab), 0.01, dtype=np.float64)
    starts = np.zeros(vocab, dtype=np.float64)
    for sentence in text:
        ids = tok.encode(" " + sentence).ids
        starts[ids[0]] += 1.0
        for a, b in zip(ids[:-1], ids[1:]):
            counts[a, b] += 1.0
    # After a full stop, or after any token the corpus never continues (role names, bytes),
    # a new sentence starts.
    counts += 2.0 * starts / starts.sum()
    logp = np.log(counts / counts.sum(axis=1, keepdims=True))
    logp += rng.standard_normal(logp.shape) * 0.05  # breaks ties so greedy decoding is well defined
    for e in eos_ids:
        logp[:, e] = eos_bias
    return logp.astype(np.float32)


def kv_cache(rng: np.random.Generator, vocab: int, kv_heads: int, head_size: int, layer: int, kind: str,
             inits: list[onnx.TensorProto], nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
             outputs: list[onnx.ValueInfoProto], table: str, names: str) -> None:
    """One layer's key or value cache, as onnxruntime-genai reads it: the past
    (``past_key_values.N.key``) with a random embedding of the new tokens appended
    (``present.N.key``); ``table`` names the embedding and ``names`` prefixes the steps."""
    inits.append(numpy_helper.from_array((rng.standard_normal((vocab, kv_heads * head_size)) * 0.5).astype(np.float32), table))
    nodes += [
        helper.make_node("Gather", [table, "input_ids"], [f"{names}_flat"], axis=0),
        helper.make_node("Reshape", [f"{names}_flat", "kv_shape"], [f"{names}_heads"]),
        helper.make_node("Transpose", [f"{names}_heads"], [f"{names}_new"], perm=[0, 2, 1, 3]),
        helper.make_node("Concat", [f"past_key_values.{layer}.{kind}", f"{names}_new"], [f"present.{layer}.{kind}"], axis=2),
    ]
    inputs.append(helper.make_tensor_value_info(
        f"past_key_values.{layer}.{kind}", TensorProto.FLOAT, ["batch_size", kv_heads, "past_sequence_length", head_size]))
    outputs.append(helper.make_tensor_value_info(
        f"present.{layer}.{kind}", TensorProto.FLOAT, ["batch_size", kv_heads, "total_sequence_length", head_size]))


def _decoder(vocab: int, layers: int, kv_heads: int, head_size: int, logits_table: np.ndarray, rng: np.random.Generator,
             ffn_layers: int = 0, ffn_dim: int = 0, embed_dim: int = 0, ffn_repeat: int = 1) -> onnx.ModelProto:
    hidden = kv_heads * head_size
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", vocab])]
    inits = [
        numpy_helper.from_array(logits_table, "bigram_logits"),
        numpy_helper.from_array(np.array([0, 0, kv_heads, head_size], dtype=np.int64), "kv_shape"),
        numpy_helper.from_array(np.array([0, 0, hidden], dtype=np.int64), "flat_shape"),
    ]
    nodes = [helper.make_node("Gather", ["bigram_logits", "input_ids"], ["bigram"], axis=0)]
    last_value = None
    for layer in range(layers):
        for kind in ("key", "value"):
            kv_cache(rng, vocab, kv_heads, head_size, layer, kind, inits, nodes, inputs, outputs, table=f"{kind}_embed_{layer}",
                     names=f"{kind}_{layer}")
        last_value = f"present.{layer}.value"
    # Context term: mean of the last layer's value cache over all positions, projected to the vocabulary.
    inits.append(numpy_helper.from_array((rng.standard_normal((hidden, vocab)) * 0.05).astype(np.float32), "context_proj"))
    nodes += [
        helper.make_node("ReduceMean", [last_value], ["ctx_heads"], axes=[2], keepdims=1),  # [B, H, 1, D]
        helper.make_node("Transpose", ["ctx_heads"], ["ctx_t"], perm=[0, 2, 1, 3]),  # [B, 1, H, D]
        helper.make_node("Reshape", ["ctx_t", "flat_shape"], ["ctx"]),  # [B, 1, H*D]
        helper.make_node("MatMul", ["ctx", "context_proj"], ["ctx_logits"]),  # [B, 1, V]
    ]
    if ffn_layers:
        # Compute that stands in for a larger model's layers (benchmarks, slow generations):
        # a residual ReLU MLP over the token embedding whose output nudges the logits.
        d, f = embed_dim or 4 * hidden, ffn_dim or 16 * hidden
        inits.append(numpy_helper.from_array((rng.standard_normal((vocab, d)) / np.sqrt(d)).astype(np.float32), "ffn_embed"))
        nodes.append(helper.make_node("Gather", ["ffn_embed", "input_ids"], ["ffn_x0"], axis=0))
        x = "ffn_x0"
        for i in range(ffn_layers):
            inits += [numpy_helper.from_array((rng.standard_normal((d, f)) / np.sqrt(d)).astype(np.float32), f"ffn_w1_{i}"),
                      numpy_helper.from_array((rng.standard_normal((f, d)) / np.sqrt(f) * 0.1).astype(np.float32), f"ffn_w2_{i}")]
        # ``ffn_repeat`` runs the stack again with the same weights: more compute per token,
        # not more bytes to package, download and load.
        for i in range(ffn_layers * max(1, ffn_repeat)):
            w = i % ffn_layers
            nodes += [helper.make_node("MatMul", [x, f"ffn_w1_{w}"], [f"ffn_h{i}"]),
                      helper.make_node("Relu", [f"ffn_h{i}"], [f"ffn_r{i}"]),
                      helper.make_node("MatMul", [f"ffn_r{i}", f"ffn_w2_{w}"], [f"ffn_o{i}"]),
                      helper.make_node("Add", [x, f"ffn_o{i}"], [f"ffn_x{i + 1}"])]
            x = f"ffn_x{i + 1}"
        inits.append(numpy_helper.from_array((rng.standard_normal((d, vocab)) * 0.01).astype(np.float32), "ffn_out"))
        nodes += [helper.make_node("MatMul", [x, "ffn_out"], ["ffn_logits"]),
                  helper.make_node("Add", ["ctx_logits", "ffn_logits"], ["ctx_ffn_logits"])]
        nodes.append(helper.make_node("Add", ["bigram", "ctx_ffn_logits"], ["logits"]))
    else:
        nodes.append(helper.make_node("Add", ["bigram", "ctx_logits"], ["logits"]))
    graph = helper.make_graph(nodes, "edgeplane_tiny_decoder", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_operatorsetid("", OPSET)], producer_name="edgeplane")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def build_model_dir(
    out_dir: pathlib.Path,
    *,
    vocab_size: int = 384,
    layers: int = 2,
    kv_heads: int = 2,
    head_size: int = 8,
    context_length: int = 256,
    eos_bias: float = -30.0,
    seed: int = 0,
    ffn_layers: int = 0,
    ffn_dim: int = 0,
    embed_dim: int = 0,
    ffn_repeat: int = 1,
) -> pathlib.Path:
    """Write genai_config.json, model.onnx and the tokenizer files into ``out_dir``."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = corpus(seed=seed)
    tok = _train_tokenizer(text, vocab_size)
    vocab = tok.get_vocab_size()
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    rng = np.random.default_rng(seed)
    table = _bigram_logits(tok, text, vocab, [ids["<|im_end|>"], ids["<|endoftext|>"]], eos_bias, rng)
    model = _decoder(vocab, layers, kv_heads, head_size, table, rng, ffn_layers, ffn_dim, embed_dim, ffn_repeat)
    onnx.save_model(model, str(out_dir / "model.onnx"))
    tok.save(str(out_dir / "tokenizer.json"))
    tokenizer_config = genai_package.tokenizer_config(
        bos="<|endoftext|>", eos="<|im_end|>", pad="<|endoftext|>", unk="<|endoftext|>", context_length=context_length,
        special=ids, chat_template=CHAT_TEMPLATE)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True))
    config = genai_package.llama_config(
        bos=ids["<|endoftext|>"], eos=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad=ids["<|endoftext|>"], vocab=vocab,
        context_length=context_length, head_size=head_size, hidden_size=kv_heads * head_size, heads=kv_heads,
        kv_heads=kv_heads, layers=layers)
    (out_dir / genai_package.CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    return out_dir


def build_package(work_dir: pathlib.Path, *, name: str = "tiny-chat", **options) -> GenAIModel:
    """Build the model folder ``work_dir/name`` and pack it to ``work_dir/name.tar``."""
    work_dir = pathlib.Path(work_dir)
    directory = build_model_dir(work_dir / name, **options)
    package = work_dir / f"{name}.tar"
    facts = genai_package.pack(directory, package)
    config = json.loads((directory / genai_package.CONFIG_NAME).read_text())
    return GenAIModel(
        directory=directory,
        package=package,
        sha256=facts.sha256,
        size_bytes=facts.size_bytes,
        parameters=facts.parameters,
        weight_bytes=facts.weight_bytes,
        context_length=facts.context_length,
        kv_bytes_per_token=facts.kv_bytes_per_token,
        vocab_size=int(config["model"]["vocab_size"]),
    )


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.testing.genai_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--name", default="tiny-chat")
    parser.add_argument("--vocab-size", type=int, default=384)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-size", type=int, default=8)
    parser.add_argument("--context-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ffn-layers", type=int, default=0, help="extra compute per token, standing in for a larger model")
    parser.add_argument("--ffn-dim", type=int, default=0)
    parser.add_argument("--embed-dim", type=int, default=0)
    parser.add_argument("--ffn-repeat", type=int, default=1, help="run the extra layers this many times (compute, no more weights)")
    args = parser.parse_args(argv)
    built = build_package(
        args.out_dir, name=args.name, vocab_size=args.vocab_size, layers=args.layers, kv_heads=args.kv_heads,
        head_size=args.head_size, context_length=args.context_length, seed=args.seed,
        ffn_layers=args.ffn_layers, ffn_dim=args.ffn_dim, embed_dim=args.embed_dim, ffn_repeat=args.ffn_repeat,
    )
    info = {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in built.__dict__.items()}
    json.dump(info, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())

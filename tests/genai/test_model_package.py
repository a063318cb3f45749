"""The tiny generative model the suite builds: onnxruntime-genai runs it, and it packs reproducibly."""

from __future__ import annotations

import json
import tarfile

import onnx
import onnxruntime_genai as og
from onnx import numpy_helper

from orchestrator.artifacts import genai_package
from orchestrator.testing import genai_model


def _greedy(model_dir, prompt_messages, steps):
    model = og.Model(str(model_dir))
    tok = og.Tokenizer(model)
    prompt = tok.apply_chat_template(json.dumps(prompt_messages), add_generation_prompt=True)
    ids = tok.encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + steps, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    out = []
    for _ in range(steps):
        if gen.is_done():
            break
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return prompt, out, tok.decode(out)


def test_onnxruntime_genai_runs_the_model_with_its_chat_template(genai_package):
    prompt, tokens, text = _greedy(genai_package.directory, [{"role": "user", "content": "Where does it run?"}], 20)
    assert prompt.startswith("<|im_start|>user\nWhere does it run?<|im_end|>\n") and prompt.endswith("<|im_start|>assistant\n")
    assert len(tokens) == 20  # end-of-sequence is suppressed: greedy decoding runs to the limit
    assert text.strip() and all(0 <= t < genai_package.vocab_size for t in tokens)
    # Greedy decoding is deterministic.
    assert _greedy(genai_package.directory, [{"role": "user", "content": "Where does it run?"}], 20)[1] == tokens


def test_same_arguments_give_the_same_package_bytes(tmp_path, genai_package):
    again = genai_model.build_package(tmp_path, name="tiny-chat")
    assert again.sha256 == genai_package.sha256
    other = genai_model.build_package(tmp_path, name="other", seed=1)
    assert other.sha256 != genai_package.sha256


def test_package_figures_match_the_config(genai_package):
    with tarfile.open(genai_package.package) as tar:
        names = sorted(tar.getnames())
        assert all(m.isfile() for m in tar.getmembers())
    assert names == ["genai_config.json", "model.onnx", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads(genai_package_member(genai_package, "genai_config.json"))
    dec = config["model"]["decoder"]
    assert genai_package.kv_bytes_per_token == 2 * dec["num_hidden_layers"] * dec["num_key_value_heads"] * dec["head_size"] * 4
    assert genai_package.context_length == config["model"]["context_length"]
    arrays = [numpy_helper.to_array(t) for t in onnx.load(str(genai_package.directory / "model.onnx")).graph.initializer]
    assert genai_package.parameters == sum(a.size for a in arrays)
    assert genai_package.weight_bytes == sum(a.nbytes for a in arrays)


def genai_package_member(built, name):
    return genai_package.read_member(built.package, name)

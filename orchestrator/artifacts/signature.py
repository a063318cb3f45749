"""What an ONNX artifact takes and returns, read from its graph, for ``describe model``.

Callers address a model by its input names, datatypes and shapes; the manifest does not carry
them, the verified file does. Only the graph's declarations are read (no weights, no
onnxruntime session), once per sha256; of an onnx package (a tar of the graph and its
external data, ``onnx_package``), the graph is read from the tar, which is not unpacked.
"""

from __future__ import annotations

import functools
import pathlib
import tarfile
from typing import Any

import onnx
from google.protobuf.message import DecodeError

from edge_agent import artifacts as edge_artifacts
from orchestrator.artifacts import catalog as catalog_mod
from orchestrator.manifests import schema

#: ONNX element type -> Open Inference Protocol (v2) datatype, as requests spell it.
V2_DATATYPES = {
    onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.DOUBLE: "FP64", onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.INT8: "INT8", onnx.TensorProto.INT16: "INT16", onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64", onnx.TensorProto.UINT8: "UINT8", onnx.TensorProto.UINT16: "UINT16",
    onnx.TensorProto.UINT32: "UINT32", onnx.TensorProto.UINT64: "UINT64", onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.STRING: "BYTES", onnx.TensorProto.BFLOAT16: "BF16",
}


@functools.lru_cache(maxsize=256)
def read(path: pathlib.Path, sha256: str) -> dict[str, list[dict[str, Any]]]:
    """``{"inputs": [...], "outputs": [...]}``, each ``{name, datatype, shape}``; a dimension
    without a fixed size is ``-1`` (as v2 metadata writes it). ``sha256`` keys the cache."""
    if edge_artifacts.is_package(path):  # as agents and replicas tell it
        model = _packed_graph(path)
    else:
        model = onnx.load(str(path), load_external_data=False)
    weights = {i.name for i in model.graph.initializer}  # older exporters list weights as inputs
    return {
        "inputs": [_tensor(v) for v in model.graph.input if v.name not in weights],
        "outputs": [_tensor(v) for v in model.graph.output],
    }


def _packed_graph(path: pathlib.Path) -> onnx.ModelProto:
    """The graph of an onnx package, without its external data (a ValueError if it holds none)."""
    with tarfile.open(path, "r:") as tar:
        graphs = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".onnx")]
        if len(graphs) != 1:
            raise ValueError(f"the package holds {len(graphs)} .onnx graphs, not one")
        member = tar.extractfile(graphs[0])
        if member is None:
            raise ValueError(f"{graphs[0].name} in the package cannot be read")
        return onnx.load_model_from_string(member.read())


def _tensor(value: onnx.ValueInfoProto) -> dict[str, Any]:
    kind = value.type
    if kind.HasField("optional_type"):  # an input a request may leave out: described by its tensor, as agents do
        kind = kind.optional_type.elem_type
    tensor = kind.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    datatype = V2_DATATYPES.get(tensor.elem_type, onnx.TensorProto.DataType.Name(tensor.elem_type))
    return {"name": value.name, "datatype": datatype, "shape": shape}


def describe_variants(spec: schema.ModelSpec, catalog: catalog_mod.ArtifactCatalog) -> list[dict[str, Any]]:
    """Each variant of a Model with what it takes and returns, for the ones whose verified
    ONNX file is on this control plane."""
    out: list[dict[str, Any]] = []
    for variant in spec.variants:
        item: dict[str, Any] = {"name": variant.name, "runtime": variant.runtime}
        artifact = variant.artifact
        if variant.runtime in ("onnx-genai", "vllm"):
            item["io"] = "OpenAI chat and text completions (/openai/v1 at the gateway)"
        elif variant.runtime != "onnx" or artifact is None:
            item["io"] = "defined by the application this runtime serves"
        else:
            try:
                catalog.register(artifact.uri, artifact.sha256)  # checks the sha256 before the file is read
                path = catalog.local_path(artifact.uri)
                if path is None:
                    item["io"] = "remote artifact: read by the replicas that download it"
                else:
                    item.update(read(path, artifact.sha256))
            except (catalog_mod.ArtifactError, OSError, ValueError, DecodeError, tarfile.TarError) as exc:  # said, not raised
                item["error"] = f"cannot read the artifact's inputs and outputs: {exc}"
        out.append(item)
    return out

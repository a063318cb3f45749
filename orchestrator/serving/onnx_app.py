"""The built-in Ray Serve application that serves an ONNX variant on a data-centre site.

Edge agents and data-centre replicas must look the same to the gateway and to any standard
KServe v2 client, so this deployment answers the agent's Open Inference Protocol routes,
relative to the route prefix the actuator gives the application:

    GET  <prefix>/v2/health/live | /v2/health/ready
    GET  <prefix>/v2/models/{name}          (metadata)
    GET  <prefix>/v2/models/{name}/ready
    POST <prefix>/v2/models/{name}/infer    (JSON or binary tensors, gzip/deflate bodies)

The model itself is the agent's (``edge_agent.runtime.onnx``): the same input checks, UTF-8
strings for BYTES tensors, and every error onnxruntime raises on a run is the caller's 400;
a body is read, and a compressed one inflated as the agent does
(``edgeplane_proto.encoding``), under the agent's limit (413 past it). Only the routing around it is Serve's.

The artifact is an ONNX file, or an onnx package (a tar of a graph and its external data,
``orchestrator.artifacts.onnx_package``), which a replica unpacks as an agent does. Its
sha256 is checked before onnxruntime sees the file, twice: once in
:func:`build`, which Serve runs when the application is deployed, so a wrong digest fails
the application at once with a clear message instead of after a round of replica
restarts; and again in the replica that fetches it, on the copy it loads or unpacks (a later
replica on the node loads the folder that one unpacked whole, from checked bytes only). A replica also
refuses a file that does not take the inputs (or answer the outputs) its variant declares,
as an edge agent does (``edge_agent.signature``): its deployment fails naming the tensor
and both shapes, and callers written to the declaration never get its 400s.
"""

from __future__ import annotations

import asyncio
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnxruntime as ort
import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

import edge_agent
from edge_agent import errors, packages, signature
from edge_agent.runtime import onnx as onnx_runtime
from edgeplane_proto import encoding, oip
from edgeplane_proto.assignment import DeclaredTensor
from orchestrator.serving import artifacts, bodies, nodecache

#: The agent's limit on a request body: as sent, and a compressed one once inflated.
MAX_REQUEST_BYTES = edge_agent.DEFAULT_MAX_REQUEST_BYTES

# Anchored at the end: the route prefix in front can be anything, even contain "v2".
_ROUTE = re.compile(
    r"(?:^|/)v2/(?:health/(?P<health>live|ready)"
    r"|models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<action>/ready|/infer)?)/?\Z"
)
JSON = "application/json"


def _providers() -> list[str]:
    """CUDA when this replica was given a GPU and the CUDA build of onnxruntime is installed."""
    available = ort.get_available_providers()
    # outside a Ray worker (a replica built in a test) there is no GPU given, and asking would fail
    if ray.is_initialized() and ray.get_gpu_ids() and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return Response(oip.error_body(message), status_code=status, media_type=JSON, headers=headers)


def _not_allowed(method: str) -> Response:
    """The agent's 405: the one method the route takes, in ``Allow`` (RFC 9110, 15.5.6)."""
    return _error(405, f"method not allowed; use {method}", {"allow": method})


def _json(doc: Any, status: int = 200) -> Response:
    return Response(oip.dumps(doc), status_code=status, media_type=JSON)


def _load(artifact_uri: str, sha256: str, artifact_hosts: tuple[str, ...]) -> tuple[onnx_runtime.OnnxModel, nodecache.Hold]:
    """The verified artifact loaded: an ONNX file from its bytes, an onnx package (a graph with
    its external data) from the folder it is unpacked into, once per node and version, as an
    agent does (``edge_agent.packages``); with the hold that keeps its download and that
    folder on the node (``nodecache``), taken before either is made."""
    held = nodecache.hold(sha256)
    try:
        return nodecache.loaded(artifact_uri, sha256, artifact_hosts, packages.ONNX, _session), held
    except BaseException:
        held.release()
        raise


def _session(path: pathlib.Path) -> onnx_runtime.OnnxModel:
    """An ONNX file loaded from its bytes, or an unpacked onnx package from its graph's path."""
    if not path.is_dir():
        return onnx_runtime.OnnxModel.load(path.read_bytes(), providers=_providers())
    return onnx_runtime.OnnxModel.load(packages.graph(path), providers=_providers())


@serve.deployment(name="OnnxModel")
class OnnxModel:
    """One replica: a verified ONNX file in an onnxruntime session behind the v2 routes."""

    def __init__(self, artifact_uri: str, sha256: str, model_name: str, artifact_hosts: tuple[str, ...] = (),
                 inputs: tuple[DeclaredTensor, ...] = (), outputs: tuple[DeclaredTensor, ...] = ()) -> None:
        self._model_name = model_name
        self._version = oip.model_version(sha256)  # the version an edge agent gives the same file
        self._model, self._held = _load(artifact_uri, sha256, artifact_hosts)
        refused = signature.mismatch(inputs, outputs, self._model.inputs, self._model.outputs)
        if refused is not None:
            self.__del__()
            raise errors.ModelLoadError(refused)
        nodecache.prune()  # versions no replica on this node serves any more
        self._metadata = oip.model_metadata(
            model_name,
            [(t.name, t.datatype, list(t.shape)) for t in self._model.inputs],
            [(t.name, t.datatype, list(t.shape)) for t in self._model.outputs],
            versions=(self._version,),
        )

    def __del__(self) -> None:
        """Serve's shutdown of the replica (the collector may call it again): its version let
        go, and its download and folder removed unless another replica on the node serves it."""
        held: nodecache.Hold | None = getattr(self, "_held", None)  # (none: __init__ failed before it)
        self._held = None
        nodecache.let_go(held)

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        root = request.scope.get("root_path") or ""
        if root and path.startswith(root):
            path = path[len(root) :]
        match = _ROUTE.search(path)
        if match is None:
            return _error(404, f"no route {path!r}; this replica serves /v2/...")
        allowed = "POST" if match["action"] == "/infer" else "GET"
        if request.method != allowed:  # as the agent: before the model is looked up
            return _not_allowed(allowed)
        if match["health"]:
            return _json({"live": True} if match["health"] == "live" else {"ready": True})
        if match["model"] != self._model_name:
            return _error(404, f"model {match['model']!r} is not served here")
        if match["version"] is not None and match["version"] != self._version:
            return _error(404, f"model {self._model_name!r} has no version {match['version']!r}; its versions: {self._version}")
        action = match["action"]
        if action is None:
            return _json(self._metadata)
        if action == "/ready":
            return _json({"name": self._model_name, "ready": True})
        return await self._infer(request)

    async def _infer(self, request: Request) -> Response:
        body = await bodies.read(request, MAX_REQUEST_BYTES)
        if isinstance(body, encoding.Refused):
            return _error(body.status, body.message)
        inflated = await encoding.inflate_off_loop(body, request.headers.get("content-encoding"), MAX_REQUEST_BYTES)
        if isinstance(inflated, encoding.Refused):
            return _error(inflated.status, inflated.message, encoding.refusal_headers(inflated.status))
        body = inflated
        header = request.headers.get(oip.BINARY_HEADER)
        try:
            header_length = int(header) if header is not None else None
            decoded = oip.decode_request(body, header_length)
            feeds = self._model.feeds([(t.name, t.array, t.datatype) for t in decoded.inputs])
            outputs = self._model.output_names(decoded.outputs)
            # every error of a run is the input's (a shape the graph cannot broadcast...)
            results = await asyncio.to_thread(self._model.run, feeds, outputs)
        except (ValueError, errors.InvalidInput) as exc:  # oip.ProtocolError is a ValueError
            return _error(400, str(exc))
        response = oip.InferResponse(
            model_name=self._model_name,
            model_version=self._version,
            id=decoded.id,
            outputs=tuple(oip.Tensor(n, np.asarray(a)) for n, a in zip(outputs, results)),
        )
        payload, length = oip.encode_response(response, binary=decoded.binary_outputs)
        if length is None:
            return Response(payload, media_type=JSON)
        return Response(
            payload,
            media_type="application/octet-stream",
            headers={oip.BINARY_HEADER: str(length)},
        )


def _string_arg(args: Mapping[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"the onnx application needs a non-empty string argument {key!r}")
    return value


def _tensors_arg(args: Mapping[str, Any], key: str) -> tuple[DeclaredTensor, ...]:
    """The variant's declared ``inputs`` or ``outputs`` (absent: none declared)."""
    value = args.get(key, [])
    try:
        return tuple(DeclaredTensor.from_json(t) for t in value)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"the onnx application's argument {key!r} must be a list of {{name, datatype, shape}}") from exc


def build(args: Mapping[str, Any]) -> serve.Application:
    """Serve application builder: ``args`` = ``{artifact_uri, sha256, model_name[, artifact_hosts, inputs, outputs]}``."""
    uri = _string_arg(args, "artifact_uri")
    sha256 = _string_arg(args, "sha256")
    model_name = _string_arg(args, "model_name")
    hosts = artifacts.hosts_arg(args)
    inputs, outputs = _tensors_arg(args, "inputs"), _tensors_arg(args, "outputs")
    nodecache.check(uri, sha256, hosts, packages.ONNX)
    return OnnxModel.bind(uri, sha256, model_name, hosts, inputs, outputs)

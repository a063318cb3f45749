"""The built-in Ray Serve application that serves a generative (``onnx-genai``) variant.

A data-centre replica answers exactly what an edge agent answers, relative to the route
prefix the actuator gives the application:

    GET  <prefix>/v1/models
    POST <prefix>/v1/chat/completions      (stream: true → server-sent events)
    POST <prefix>/v1/completions

so the gateway, the Python client and any OpenAI SDK treat both alike (the endpoint's
``api`` is ``openai`` either way; a later engine, e.g. vLLM behind ``ray-serve``, only has
to answer the same routes). To guarantee it, the replica runs the agent's own generation
code (``edge_agent.generation``: validation, the OpenAI objects, gzip/deflate bodies,
bounded concurrency with a queue and 429, cancel on disconnect) and the same package handling
(``edge_agent.packages``: sha256 before unpacking, no traversal or links, atomic).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

import edge_agent
from edge_agent import generation, httpmessages, httpserver, openai_api, packages, refusals, registry
from edge_agent.metrics import AgentMetrics
from edge_agent.runtime import genai
from edgeplane_proto import encoding
from orchestrator.serving import artifacts, bodies, nodecache

#: The agent's limit on a request body: as sent, and a compressed one once inflated.
MAX_REQUEST_BYTES = edge_agent.DEFAULT_MAX_REQUEST_BYTES


class _OneModel:
    """The registry view ``GenerationServer`` needs, over the one model of this replica."""

    def __init__(self, served: registry.ServedModel) -> None:
        self._served = served

    def serving(self) -> list[registry.ServedModel]:
        return [self._served]

    def get(self, name: str) -> registry.ServedModel | None:
        return self._served if name == self._served.name else None

    def known(self, name: str) -> bool:
        return name == self._served.name


def load(artifact_uri: str, sha256: str, artifact_hosts: tuple[str, ...] = ()) -> tuple[genai.GenAIModel, nodecache.Hold]:
    """Fetch and verify the package, unpack it safely (once per node and version), load it;
    with the hold that keeps its download and folder on the node (``nodecache``), taken
    before either is made."""
    held = nodecache.hold(sha256)
    try:
        # outside a Ray worker (a replica built in a test) there is no GPU given, and asking would fail
        gpus = ray.get_gpu_ids() if ray.is_initialized() else []
        options = genai.LoadOptions(cuda=bool(gpus) and genai.built_with_cuda())
        return nodecache.loaded(artifact_uri, sha256, artifact_hosts, packages.GENAI,
                                lambda directory: genai.GenAIModel.load(directory, options)), held
    except BaseException:
        held.release()
        raise


@serve.deployment(name="GenAIModel")
class GenAIReplica:
    """One replica: an onnxruntime-genai model behind the OpenAI-compatible routes."""

    def __init__(self, artifact_uri: str, sha256: str, model_name: str, max_concurrent_sequences: int = 0,
                 max_queued: int = 0, artifact_hosts: tuple[str, ...] = ()) -> None:
        model, self._held = load(artifact_uri, sha256, artifact_hosts)
        served = registry.ServedModel(model_name, sha256, model, max_concurrent_sequences, max_queued)
        self.metrics = AgentMetrics(lambda: 0, lambda: 1)
        self._server = generation.GenerationServer(_OneModel(served), self.metrics, MAX_REQUEST_BYTES)  # type: ignore[arg-type]
        nodecache.prune()  # versions no replica on this node serves any more

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
            path = path[len(root):]
        at = path.find("/v1/")
        if at < 0:
            if path.rstrip("/").endswith(("/v2/health/live", "/v2/health/ready", "/ready")):
                return Response('{"ready": true}', media_type="application/json")
            return Response(openai_api.error_body(f"no route {path!r}; this replica serves /v1/...", code="not_found"),
                            status_code=404, media_type="application/json")
        body = await bodies.read(request, MAX_REQUEST_BYTES)
        if isinstance(body, encoding.Refused):
            return Response(refusals.error_body(body.status, body.message, body.code, path[at:]), status_code=body.status,
                            media_type="application/json")
        # a compressed body is inflated by the generation server, as on the agent
        answer = await self._server.handle(httpmessages.Request(
            method=request.method, path=path[at:], query=request.url.query,
            headers={k.lower(): v for k, v in request.headers.items()}, body=body))
        if isinstance(answer, httpserver.StreamingResponse):
            return StreamingResponse(_closing(answer.chunks), status_code=answer.status, media_type=answer.content_type,
                                     headers={"cache-control": "no-cache", **dict(answer.headers)})
        return Response(answer.body, status_code=answer.status, media_type=answer.content_type, headers=dict(answer.headers))


async def _closing(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Yield ``chunks``; when the client goes (Serve cancels the request), close them so the
    generation stops."""
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


def _string_arg(args: Mapping[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"the onnx-genai application needs a non-empty string argument {key!r}")
    return value


def build(args: Mapping[str, Any]) -> serve.Application:
    """Serve application builder: ``{artifact_uri, sha256, model_name[, max_concurrent_sequences, max_queued,
    artifact_hosts]}``."""
    uri, sha256, name = _string_arg(args, "artifact_uri"), _string_arg(args, "sha256"), _string_arg(args, "model_name")
    hosts = artifacts.hosts_arg(args)
    nodecache.check(uri, sha256, hosts, packages.GENAI)
    return GenAIReplica.bind(uri, sha256, name, int(args.get("max_concurrent_sequences", 0)), int(args.get("max_queued", 0)), hosts)

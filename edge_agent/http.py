"""The agent's Open Inference Protocol (KServe v2) HTTP API and its /metrics.

Any standard v2 client works against an agent exactly as against the gateway. The event
loop only routes and reads bodies; decoding, validation, ``session.run`` and encoding run
together in one worker-thread hop, so a large JSON body never stalls other requests and
binary tensors go from the request bytes to onnxruntime without a copy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import edge_agent
from edge_agent import errors, registry
from edgeplane_proto import oip

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
_JSON = "application/json"


class _TooLarge(Exception):
    pass


def _error(status: int, message: str) -> Response:
    return Response(oip.error_body(message), status_code=status, media_type=_JSON)


class AgentMetrics:
    """Prometheus series of one agent, in its own registry (no process-wide globals)."""

    def __init__(self, inflight: Callable[[], int], serving: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "edgeplane_agent_infer_requests",
            "Inference requests by model and HTTP status",
            ["model", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "edgeplane_agent_infer_seconds",
            "Inference latency inside the agent (body read to response)",
            ["model"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        Gauge("edgeplane_agent_inflight", "Requests being served", registry=self.registry).set_function(inflight)
        Gauge("edgeplane_agent_models_serving", "Models serving", registry=self.registry).set_function(serving)
        self._ok: dict[str, tuple[Counter, Histogram]] = {}

    def observe_ok(self, model: str, seconds: float) -> None:
        children = self._ok.get(model)
        if children is None:
            children = self._ok[model] = (
                self.requests.labels(model, "200"),
                self.latency.labels(model),
            )
        children[0].inc()
        children[1].observe(seconds)

    def observe_error(self, model: str, code: int) -> None:
        self.requests.labels(model, str(code)).inc()


def _infer_sync(
    served: registry.ServedModel, body: bytes, header_length: int | None
) -> tuple[bytes, int | None]:
    request = oip.decode_request(body, header_length)
    runtime = served.runtime
    feeds = runtime.feeds([(t.name, t.array, t.datatype) for t in request.inputs])
    names = runtime.output_names(request.outputs)
    arrays = runtime.run(feeds, names)
    response = oip.InferResponse(
        model_name=served.name,
        model_version=served.sha256[:12],
        id=request.id,
        outputs=tuple(oip.Tensor(n, a) for n, a in zip(names, arrays, strict=True)),
    )
    return oip.encode_response(response, binary=request.binary_outputs)


class InferenceServer:
    """Builds the Starlette app; ``ready``/``draining`` are set by the daemon."""

    def __init__(
        self,
        models: registry.ModelRegistry,
        executor: Executor,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self._models = models
        self._executor = executor
        self._max_body = max_body_bytes
        self.inflight = 0
        self.ready = False
        self.draining = False
        self.metrics = AgentMetrics(lambda: self.inflight, lambda: len(models.serving()))

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v2/health/live", self.live, methods=["GET"]),
                Route("/v2/health/ready", self.server_ready, methods=["GET"]),
                Route("/v2", self.server_metadata, methods=["GET"]),
                Route("/v2/models/{name}", self.model_metadata, methods=["GET"]),
                Route("/v2/models/{name}/ready", self.model_ready, methods=["GET"]),
                Route("/v2/models/{name}/infer", self.infer, methods=["POST"]),
                Route("/metrics", self.prometheus, methods=["GET"]),
            ]
        )

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def server_ready(self, request: Request) -> Response:
        ok = self.ready and not self.draining
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse(
            {
                "name": "edgeplane-agent",
                "version": edge_agent.__version__,
                "extensions": ["binary_tensor_data", "model_repository_readonly"],
            }
        )

    def _lookup(self, name: str) -> registry.ServedModel | Response:
        served = self._models.get(name)
        if served is not None:
            return served
        if self._models.known(name):
            status = {s.name: s for s in self._models.statuses()}.get(name)
            detail = f" ({status.phase.name}: {status.message})" if status and status.message else ""
            return _error(503, f"model {name!r} is not ready{detail}")
        return _error(404, f"model {name!r} is not served by this agent")

    async def model_metadata(self, request: Request) -> Response:
        served = self._lookup(request.path_params["name"])
        if isinstance(served, Response):
            return served
        runtime = served.runtime
        body = oip.model_metadata(
            served.name,
            [(s.name, s.datatype, s.shape) for s in runtime.inputs],
            [(s.name, s.datatype, s.shape) for s in runtime.outputs],
            versions=(served.sha256[:12],),
        )
        return JSONResponse(body)

    async def model_ready(self, request: Request) -> Response:
        name = request.path_params["name"]
        served = self._lookup(name)
        if isinstance(served, Response):
            return served
        return JSONResponse({"name": name, "ready": True})

    async def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_body:
            raise _TooLarge
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self._max_body:
                raise _TooLarge
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def infer(self, request: Request) -> Response:
        name = request.path_params["name"]
        started = time.perf_counter()
        served = self._lookup(name)
        if isinstance(served, Response):
            self.metrics.observe_error(name, served.status_code)
            return served
        header = request.headers.get(oip.BINARY_HEADER)
        header_length: int | None = None
        if header is not None:
            if not header.isdigit():
                self.metrics.observe_error(name, 400)
                return _error(400, f"{oip.BINARY_HEADER} must be a non-negative integer")
            header_length = int(header)
        self.inflight += 1
        try:
            try:
                body = await self._body(request)
            except _TooLarge:
                self.metrics.observe_error(name, 413)
                return _error(413, f"request body exceeds {self._max_body} bytes")
            loop = asyncio.get_running_loop()
            try:
                payload, out_header = await loop.run_in_executor(
                    self._executor, _infer_sync, served, body, header_length
                )
            except (oip.ProtocolError, errors.InvalidInput) as exc:
                self.metrics.observe_error(name, 400)
                return _error(400, str(exc))
        finally:
            self.inflight -= 1
        served.requests += 1
        self.metrics.observe_ok(name, time.perf_counter() - started)
        if out_header is None:
            return Response(payload, media_type=_JSON)
        return Response(
            payload,
            media_type="application/octet-stream",
            headers={oip.BINARY_HEADER: str(out_header)},
        )

"""The agent's Open Inference Protocol (KServe v2) HTTP API and its /metrics.

Any standard v2 client works against an agent exactly as against the gateway.
Connections are handled by ``edge_agent.httpserver``.

Decoding, validation, ``session.run`` and encoding are one step, and binary tensors go
from the request bytes to onnxruntime without a copy. The step runs on a worker thread, so
a long run or a large JSON body never stalls other requests, except when the request is
alone (the HTTP server holds no other received and unanswered), no larger than the model
usually gets, and the model's steps are short (``inline_max_s``, 20 ms by default, measured
over the whole step: a JSON parse counts): then it runs on the event loop itself. The hop
to a worker and back costs about 0.1 ms and lands on a cold thread, which one request at a
time cannot hide (measured against raw ``session.run``: 0.53x -> 0.74x for a 1 ms model,
0.77x -> 0.87x for a 9 ms one). A request arriving meanwhile waits at most one short step,
while onnxruntime's own threads use the cores.

A request's body is charged against the memory budget of requests in flight by the HTTP
server (``edge_agent.inflight``); what decoding its JSON may take is charged here, before
the parse takes it, and a request that does not fit is refused at once (503, or 413 past
the whole budget).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, NamedTuple, TypeVar

import edge_agent
from typing import TYPE_CHECKING

from edge_agent import errors, inflight, refusals, registry, serve_auth
from edge_agent.metrics import CONTENT_TYPE, AgentMetrics
from edge_agent.httpmessages import Request, Response
from edge_agent.httpserver import StreamingResponse

if TYPE_CHECKING:
    from edge_agent import generation
from edgeplane_proto import encoding as encoding_mod
from edgeplane_proto import oip
from edgeplane_proto.headers import DRAINING

log = logging.getLogger(__name__)



T = TypeVar("T")
UNKNOWN_MODEL = "(unknown)"
DEFAULT_INLINE_MAX_S = 0.02  # steps this short, alone in flight, skip the worker thread
QUEUED_RUNS_PER_WORKER = 32  # runs waiting for a worker, by default (--max-queued-runs 0)
DEFERRED_RELEASE_MIN_BYTES = 64 * 1024  # JSON parts this large are freed after their answer is out
_BINARY_HEADER = oip.BINARY_HEADER.lower()  # as the HTTP server keeps header names
_JSON_FREE_MAX_BYTES = inflight.JSON_FREE_MAX_BYTES
_DECODED = (f"its body, and up to {inflight.JSON_DECODE_FACTOR} x its JSON while that is decoded; binary tensors "
            f"({oip.BINARY_HEADER}) need no decoding")

# How the server and its models describe themselves, over HTTP and gRPC alike (a v2 client
# may choose its behaviour from them). The platform is Triton's name for onnxruntime.
SERVER_NAME = "edgeplane-agent"
EXTENSIONS = ("binary_tensor_data", "model_repository_readonly")
PLATFORM = "onnxruntime_onnx"


class Refusal(NamedTuple):
    status: int  # the HTTP status; gRPC maps 404 to NOT_FOUND, 400 to INVALID_ARGUMENT, 503 to UNAVAILABLE
    message: str
    code: str | None = None  # OpenAI's error code, for the /v1 routes


async def inflated(request: Request, limit: int) -> Request | Refusal | inflight.Refused:
    """``request`` with its body as sent before its ``Content-Encoding`` (at most ``limit``
    bytes of it), charged to its hold of the memory budget as it inflates; or why it cannot
    be had (the v2 routes; the /v1 routes inflate in ``generation``, which data-centre
    replicas run too)."""
    meter = None if request.hold is None else inflight.Inflating(request.hold)
    body = await encoding_mod.inflate_off_loop(request.body, request.headers.get("content-encoding"), limit, meter)
    if isinstance(body, encoding_mod.Refused):
        return Refusal(*body)
    if isinstance(body, inflight.Refused):
        return body
    return dataclasses.replace(request, body=body)


def _error(status: int, message: str) -> Response:
    return Response(status, oip.error_body(message))


def _json(obj: object, status: int = 200) -> Response:
    return Response(status, oip.dumps(obj))


def model_version(served: registry.ServedModel) -> str:
    """The version a served model answers to: its artifact's digest, shortened (a new file is a new version)."""
    return oip.model_version(served.sha256)


def _infer_sync(
    served: registry.ServedModel, body: bytes, header_length: int | None
) -> tuple[bytes, int | None, object]:
    """Decode, run, encode: the answer's body, its binary header length, and the parsed
    request, for the caller to free once the answer is out."""
    request = oip.decode_request(body, header_length)
    runtime = served.runtime
    feeds = runtime.feeds([(t.name, t.array, t.datatype) for t in request.inputs])
    names = runtime.output_names(request.outputs)
    arrays = runtime.run(feeds, names)
    outputs = tuple(map(oip.Tensor, names, arrays))
    response = oip.InferResponse(served.name, outputs, model_version(served), request.id)
    return *oip.encode_response(response, binary=request.binary_outputs), request.document


class InferenceServer:
    """Routes v2 requests to the registry's models; ``ready``/``draining`` are set by the
    daemon. ``handle`` is the ``httpserver`` handler."""

    def __init__(
        self,
        models: registry.ModelRegistry,
        executor: Executor,
        inline_max_s: float = DEFAULT_INLINE_MAX_S,
        max_inflight: int | None = None,
        budget: inflight.Budget | None = None,
    ) -> None:
        """``budget``: the memory requests in flight may hold (none: no bound), shared with
        the HTTP server, which charges their bodies; this server charges their decoding."""
        self._models = models
        self._executor = executor
        self._inline_max_s = inline_max_s
        # Runs running or waiting for a worker at once (None: no bound); one more is refused.
        self._max_inflight = math.inf if max_inflight is None else max_inflight
        # Requests received and not answered, by the transport's count (set by the daemon
        # to its HTTP server's): an answer computed on the loop does not yield, so requests
        # that wait behind it are only visible there.
        self.received: Callable[[], int] = lambda: self.inflight
        self.inflight = 0
        self.budget = budget or inflight.Budget()
        self.max_body_bytes = edge_agent.DEFAULT_MAX_REQUEST_BYTES  # of a compressed body once inflated
        self.ready = False
        self.draining = False
        self.metrics = AgentMetrics(lambda: self.inflight + (self._generation.active if self._generation else 0),
                                    lambda: len(models.serving()), self.budget)
        self._generation: generation.GenerationServer | None = None
        #: The API tokens callers must present (``--serve-auth token``); None: any caller.
        self.auth: serve_auth.ServeAuth | None = None
        self._fixed = {
            "/v2/health/live": self.live,
            "/v2/health/ready": self.server_ready,
            "/v2": self.server_metadata,
            "/metrics": self.prometheus,
        }

    @property
    def generation(self) -> generation.GenerationServer:
        """The OpenAI-compatible routes (/v1/...) of generative models; imported on first use,
        so an agent serving only v2 models does not carry them."""
        if self._generation is None:
            from edge_agent import generation

            self._generation = generation.GenerationServer(self._models, self.metrics, self.max_body_bytes)
            self._generation.refuse_model = self._refused_model
            self.metrics.generation_gauges = self._generation.gauges
        return self._generation

    def models_changed(self) -> None:
        """The registry changed: a generative version it no longer serves is let go of, and
        the metrics of a model no longer assigned."""
        if self._generation is not None:
            self._generation.models_changed()
        self.metrics.retain(lambda name: name == UNKNOWN_MODEL or self._models.known(name))

    def close(self) -> None:
        if self._generation is not None:
            self._generation.close()

    def refusal(self, request: Request, names: tuple[str, ...] | None) -> Response | None:
        """Why the caller of ``request`` may not call the model of ``names`` (None: the
        request names none), with ``--serve-auth token`` (:mod:`edge_agent.serve_auth`), in the
        shape of the API it called; None when it may."""
        if self.auth is None:
            return None
        refused = self.auth.admit(request.headers.get("authorization"), names)
        if refused is None:
            return None
        status, body, headers = serve_auth.http_answer(refused, refusals.speaks_openai(request.path))
        return Response(status, body, headers=headers)

    def _refused_model(self, request: Request, name: str) -> Response | None:
        """The ``/v1`` routes' check of the model a body or path names (a LoRA adapter
        ``<model>:<adapter>`` by its base model too)."""
        return self.refusal(request, (name, name.partition(":")[0]))

    async def handle(self, request: Request) -> Response | StreamingResponse:
        path = request.path
        if self.auth is not None and path not in self._fixed and (refused := self.refusal(request, None)) is not None:
            return refused  # health, server metadata and /metrics stay open for probes, as at the gateway
        if path.startswith("/v1/"):
            if request.method == "POST":
                if self.draining:
                    return Response(503, refusals.openai_error_body("the agent is draining", "server_error", None, "draining"),
                                    headers=(("retry-after", "1"), (DRAINING, "1")))
            return await self.generation.handle(request)
        fixed = self._fixed.get(path)
        if fixed is not None:
            return fixed() if request.method == "GET" else _not_allowed("GET")
        parts = path.split("/")
        # "", "v2", "models", name[, "versions", version][, "ready" | "infer"]
        if len(parts) >= 4 and parts[1] == "v2" and parts[2] == "models" and parts[3]:
            name, rest, version = parts[3], parts[4:], None
            if len(rest) >= 2 and rest[0] == "versions" and rest[1]:
                version, rest = rest[1], rest[2:]
            action = rest[0] if len(rest) == 1 else "" if not rest else None
            if action in ("infer", "", "ready") and (refused := self.refusal(request, (name,))) is not None:
                if action == "infer":
                    self.refused(name, refused.status)
                return refused
            if action == "infer":
                if request.method != "POST":
                    return _not_allowed("POST")
                return await self.infer(name, request, version)
            if action in ("", "ready"):
                if request.method != "GET":
                    return _not_allowed("GET")
                return self.model_metadata(name, version) if action == "" else self.model_ready(name, version)
        if refusals.speaks_openai(path):  # "/v1" itself
            return await self.generation.handle(request)
        return _error(404, f"no such endpoint: {request.method} {path}")

    def live(self) -> Response:
        return _json({"live": True})

    def server_ready(self) -> Response:
        ok = self.ready and not self.draining
        return _json({"ready": ok}, status=200 if ok else 503)

    def server_metadata(self) -> Response:
        return _json({"name": SERVER_NAME, "version": edge_agent.__version__, "extensions": list(EXTENSIONS)})

    def find(self, name: str, version: str | None = None) -> registry.ServedModel | Refusal:
        """The model answering for ``name`` (at ``version``, when given), or why none does
        (404: never assigned here, or not that version; 503: assigned, not ready). Shared
        by the HTTP and gRPC front ends."""
        served = self._models.get(name)
        if served is not None and served.kind != registry.assignments.RUNTIME_ONNX:
            return Refusal(400, f"model {name!r} is a generative model: use /v1/chat/completions or /v1/completions")
        if served is not None and version is not None and version != model_version(served):
            return Refusal(404, f"model {name!r} has no version {version!r}; its versions: {model_version(served)}")
        if served is not None:
            return served
        if self._models.known(name):
            status = {s.name: s for s in self._models.statuses()}.get(name)
            detail = f" ({status.phase.name}: {status.message})" if status and status.message else ""
            return Refusal(503, f"model {name!r} is not ready{detail}")
        return Refusal(404, f"model {name!r} is not served by this agent")

    def refused(self, name: str, status: int) -> None:
        """Count a refused inference. A name this agent was never asked to serve is the
        caller's to choose: one series for all of them, or any client could grow
        /metrics without bound."""
        self.metrics.observe_error(name if self._models.known(name) else UNKNOWN_MODEL, status)

    def _lookup(self, name: str, version: str | None = None) -> registry.ServedModel | Response:
        found = self.find(name, version)
        return _error(found.status, found.message) if isinstance(found, Refusal) else found

    def model_metadata(self, name: str, version: str | None = None) -> Response:
        served = self._lookup(name, version)
        if isinstance(served, Response):
            return served
        runtime = served.runtime
        body = oip.model_metadata(
            served.name,
            [(s.name, s.datatype, s.shape) for s in runtime.inputs],
            [(s.name, s.datatype, s.shape) for s in runtime.outputs],
            versions=(model_version(served),),
            platform=PLATFORM,
        )
        return _json(body)

    def model_ready(self, name: str, version: str | None = None) -> Response:
        served = self._lookup(name, version)
        if isinstance(served, Response):
            return served
        return _json({"name": name, "ready": True})

    def prometheus(self) -> Response:
        return Response(200, self.metrics.render(), content_type=CONTENT_TYPE)

    async def compute(self, served: registry.ServedModel, step: Callable[..., T], small: bool, *args: Any,
                      body_bytes: int | None = None, hold: inflight.Hold | None = None) -> T:
        """Run ``step(*args)`` (decode, ``session.run``, encode) for ``served``: on the event
        loop when it is alone in flight, small, and the model's runs are short; on a
        worker thread otherwise. Shared by the HTTP and gRPC front ends. :class:`errors.Overloaded`
        when as many runs are in flight as the agent takes (the pool's queue is full).
        ``hold``: the request's share of the memory budget, kept until a run on a worker ends
        (it goes on when its caller leaves)."""
        if self.inflight >= self._max_inflight:
            wait_s = served.run_s  # what an answer takes now, its wait for a worker included
            raise errors.Overloaded(f"this agent has {self.inflight} runs in flight, as many as it queues; retry later",
                                    max(1, math.ceil(wait_s)) if wait_s < math.inf else 1)
        self.inflight += 1
        started = time.perf_counter()

        def finished(job: asyncio.Future[Any] | None = None) -> None:
            self.inflight -= 1
            if job is None or not job.cancelled():  # failed runs count (a slow refusal is slow); dropped ones did not run
                served.answered(time.perf_counter() - started, body_bytes)
            if job is not None and hold is not None:
                hold.release()
            if job is not None and not job.cancelled():
                job.exception()  # read: a run that failed once its caller had gone is no one's to log

        if small and self.inflight == 1 and self.received() <= 1 and served.run_s <= self._inline_max_s:
            try:
                return step(*args)
            finally:
                finished()
        if hold is not None:
            hold.pin()
        run = self._executor.submit(step, *args)  # what run_in_executor does, keeping the run's future
        job = asyncio.wrap_future(run)
        job.add_done_callback(finished)
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            # The caller went away (a gRPC deadline, a closed connection): a run still waiting
            # for a worker is dropped; one under way goes on, and holds its slot until it ends.
            run.cancel()
            raise

    async def infer(self, name: str, request: Request, version: str | None = None) -> Response:
        started = time.perf_counter()
        served = self._lookup(name, version)
        if isinstance(served, Response):
            self.refused(name, served.status)
            return served
        if "content-encoding" in request.headers:
            plain = await inflated(request, self.max_body_bytes)
            if isinstance(plain, Refusal):
                self.metrics.observe_error(name, plain.status)
                return Response(plain.status, oip.error_body(plain.message), headers=tuple(encoding_mod.refusal_headers(plain.status).items()))
            if isinstance(plain, inflight.Refused):
                return self._refused_memory(name, plain)
            request = plain
        header = request.headers.get(_BINARY_HEADER)
        header_length: int | None = None
        if header is not None:
            if not (header.isascii() and header.isdigit()):  # isdigit alone takes '²', which int() refuses
                self.metrics.observe_error(name, 400)
                return _error(400, f"{oip.BINARY_HEADER} must be a non-negative integer")
            header_length = int(header)
        json_bytes = len(request.body) if header_length is None else header_length
        if json_bytes > _JSON_FREE_MAX_BYTES and request.hold is not None:  # before the parse takes it
            refused = request.hold.grow(inflight.json_decode_bytes(min(json_bytes, len(request.body))), _DECODED)
            if refused is not None:
                return self._refused_memory(name, refused)
        # Small: no more bytes than this model usually gets (one large batch, or a JSON body
        # where binary ones are usual, is not computed on the loop). The step's usual time,
        # JSON parse included, is what ``compute`` bounds.
        small = served.usual_size(len(request.body))
        try:
            payload, out_header, parsed = await self.compute(served, _infer_sync, small, served, request.body,
                                                             header_length, body_bytes=len(request.body), hold=request.hold)
        except (oip.ProtocolError, errors.InvalidInput) as exc:
            self.metrics.observe_error(name, 400)
            return _error(400, str(exc))
        except errors.Overloaded as exc:
            self.metrics.observe_error(name, 503)
            return Response(503, oip.error_body(str(exc)), headers=(("retry-after", str(exc.retry_after)),))
        self.metrics.observe_ok(name, time.perf_counter() - started)
        # A large JSON part's document is freed on the loop's next turn, after this answer
        # is written: its numbers are freed while the caller reads the answer. A small one,
        # such as the head of binary tensors however large, is freed here (the turn it would
        # cost is an epoll_wait more per request).
        if json_bytes >= DEFERRED_RELEASE_MIN_BYTES:
            asyncio.get_running_loop().call_soon(_release, parsed)
        if out_header is None:
            return Response(200, payload)
        return Response(
            200,
            payload,
            content_type="application/octet-stream",
            headers=((oip.BINARY_HEADER, str(out_header)),),
        )

    def _refused_memory(self, name: str, refused: inflight.Refused) -> Response:
        """The answer to an inference refused for the memory it would take (counted with the
        model's other refusals; the budget counts it too)."""
        self.metrics.observe_error(name, refused.status)
        headers = () if refused.retry_after is None else (("retry-after", str(refused.retry_after)),)
        return Response(refused.status, oip.error_body(refused.message), headers=headers)


def _release(_: object) -> None:
    """Nothing: the reference this call held was the last one."""


def _not_allowed(method: str) -> Response:
    refused = _error(405, f"method not allowed; use {method}")
    return Response(refused.status, refused.body, headers=(("allow", method),))

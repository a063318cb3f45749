"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), next to HTTP.

Started with ``edgeplane-agent --grpc-listen HOST:PORT``. The same models, the same input
checks and the same dispatch as the HTTP API (``http.InferenceServer.compute``); tensors
come as raw bytes (``raw_input_contents``) or typed values (``contents``), and answers
carry raw bytes (``raw_output_contents``). Errors are gRPC status codes: NOT_FOUND for a
model not served here, UNAVAILABLE while it loads or while the agent drains,
INVALID_ARGUMENT for a request that does not fit the model, RESOURCE_EXHAUSTED for one over
the size limit (enforced by the server before the handler runs), for one that finds the
runs queue full or the memory budget of requests in flight held by others (with
``grpc-retry-pushback-ms``, gRPC's Retry-After), and for one that needs more memory than
that whole budget (``edge_agent.inflight``: a message is charged twice its size, and its
typed values what each becomes on its way to an array, before it is parsed). A call whose
deadline passes, or that its client cancels, before its run starts leaves no run behind.
With ``--access-log`` each call is one access line, as over HTTP (:class:`_Line`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError

import edge_agent
from edge_agent import errors, http, inflight, registry
from edgeplane_proto import correlation, hostport, logformat, oip, oip_tensors
from edgeplane_proto.inference.v2 import inference_pb2 as pb

SERVICE = "inference.GRPCInferenceService"

#: The largest message gRPC can take (its lengths are C ints): a larger
#: ``--max-request-bytes`` holds over HTTP only.
MAX_MESSAGE_BYTES = 2**31 - 1

# Which typed list carries each datatype when raw bytes are not used.
_CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def _inputs(request: pb.ModelInferRequest) -> list[tuple[str, np.ndarray, str]]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise oip.ProtocolError(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    out = []
    for i, tensor in enumerate(request.inputs):
        where = f"inputs[{i}] ({tensor.name!r})"
        if raw:
            array = oip_tensors.array_from_raw(raw[i], tensor.datatype, tensor.shape, where)
        else:
            field = _CONTENTS.get(tensor.datatype)
            if field is None:
                oip_tensors.numpy_dtype(tensor.datatype)  # raises the clear error for an unknown name
                raise oip.ProtocolError(f"{where}: {tensor.datatype} tensors travel in raw_input_contents only")
            array = oip_tensors.array_from_values(getattr(tensor.contents, field), tensor.datatype, tensor.shape, where)
        if any(tensor.name == name for name, _, _ in out):
            raise oip.ProtocolError(f"{where}: input {tensor.name!r} is given twice")
        out.append((tensor.name, array, tensor.datatype))
    return out


def _infer(served: registry.ServedModel, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    """Decode, run, encode: the step ``InferenceServer.compute`` places."""
    runtime = served.runtime
    feeds = runtime.feeds(_inputs(request))
    names = runtime.output_names([o.name for o in request.outputs])
    arrays = runtime.run(feeds, names)
    response = pb.ModelInferResponse(model_name=served.name, model_version=http.model_version(served), id=request.id)
    for name, array in zip(names, arrays, strict=True):
        response.outputs.add(name=name, datatype=oip_tensors.datatype_of(array), shape=array.shape)
        response.raw_output_contents.append(oip_tensors.raw_bytes(array))
    return response


class InferenceServicer:
    def __init__(self, server: http.InferenceServer) -> None:
        self._server = server

    async def _served(self, name: str, context: grpc.aio.ServicerContext, count: bool = False,
                      version: str = "") -> registry.ServedModel:
        """The model answering for ``name`` (at ``version`` unless empty), or the call
        aborted with the reason (the same decision as HTTP's 404/503); ``count`` records a
        refused inference."""
        await self._admit(name, context, count)
        found = self._server.find(name, version or None)
        refusal = http.Refusal(503, "the agent is draining") if self._server.draining else found
        if isinstance(refusal, http.Refusal):
            if count:
                self._server.refused(name, refusal.status)
            code = {404: grpc.StatusCode.NOT_FOUND, 400: grpc.StatusCode.INVALID_ARGUMENT}.get(refusal.status, grpc.StatusCode.UNAVAILABLE)
            await context.abort(code, refusal.message)
        assert not isinstance(found, http.Refusal)
        return found

    async def _admit(self, name: str, context: grpc.aio.ServicerContext, count: bool = False) -> None:
        """With ``--serve-auth token``, the call aborted unless its ``authorization`` metadata
        (``Bearer <token>``) holds a token that may call ``name`` (:mod:`edge_agent.serve_auth`):
        UNAUTHENTICATED, PERMISSION_DENIED, or UNAVAILABLE while the agent has no list."""
        auth = self._server.auth
        if auth is None:
            return
        given = dict(context.invocation_metadata() or ()).get("authorization")
        refused = auth.admit(given if isinstance(given, str) else None, (name,))
        if refused is not None:
            if count:
                self._server.refused(name, refused.status)
            await context.abort(_AUTH_CODES[refused.status], refused.message)

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._server.ready and not self._server.draining)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        await self._admit(request.name, context)
        # Ready when it would answer ModelInfer, as HTTP's /ready (a generative model does not)
        ready = not isinstance(self._server.find(request.name, request.version or None), http.Refusal)
        return pb.ModelReadyResponse(ready=ready and not self._server.draining)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=http.SERVER_NAME, version=edge_agent.__version__, extensions=http.EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        served = await self._served(request.name, context, version=request.version)
        runtime = served.runtime
        return pb.ModelMetadataResponse(
            name=served.name, versions=[http.model_version(served)], platform=http.PLATFORM,
            inputs=[pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape) for s in runtime.inputs],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape) for s in runtime.outputs],
        )

    async def infer(self, raw: bytes, context: grpc.aio.ServicerContext, line: _Line | None = None) -> pb.ModelInferResponse:
        """ModelInfer as it arrives: charged against the memory budget before it is parsed,
        given back once it is answered or failed."""
        hold = self._server.budget.take(MESSAGE_COPIES * len(raw), "its message, and the message parsed")
        if isinstance(hold, inflight.Refused):
            await _refuse_memory(context, hold)
        assert isinstance(hold, inflight.Hold)
        try:
            request = await _parse(pb.ModelInferRequest, raw, context)
            if line is not None:
                line.model = request.model_name
            return await self.ModelInfer(request, context, hold)
        finally:
            hold.release()

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext,
                         hold: inflight.Hold | None = None) -> pb.ModelInferResponse:
        started = time.perf_counter()
        metrics = self._server.metrics
        served = await self._served(request.model_name, context, count=True, version=request.model_version)
        values = 0 if hold is None or request.raw_input_contents else _typed_values(request)
        if values:
            refused = hold.grow(values * inflight.GRPC_VALUE_BYTES, _TYPED) if hold is not None else None
            if refused is not None:
                metrics.observe_error(served.name, refused.status)
                await _refuse_memory(context, refused)
        try:
            # Always a worker: gRPC hands no count of the calls waiting behind this one.
            response = await self._server.compute(served, _infer, False, served, request, hold=hold)
        except (oip.ProtocolError, errors.InvalidInput) as exc:
            metrics.observe_error(served.name, 400)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except errors.Overloaded as exc:
            metrics.observe_error(served.name, 503)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc),
                                trailing_metadata=(("grpc-retry-pushback-ms", str(exc.retry_after * 1000)),))
        metrics.observe_ok(served.name, time.perf_counter() - started)
        return response


#: The gRPC codes of :class:`edge_agent.serve_auth.Refusal`'s statuses.
_AUTH_CODES = {401: grpc.StatusCode.UNAUTHENTICATED, 403: grpc.StatusCode.PERMISSION_DENIED, 503: grpc.StatusCode.UNAVAILABLE}

#: A ModelInfer message is held twice while it is served: gRPC's bytes and the parsed message.
MESSAGE_COPIES = 2
_TYPED = (f"its message, the message parsed, and up to {inflight.GRPC_VALUE_BYTES} bytes for each value in typed "
          "contents; raw_input_contents need none")


def _typed_values(request: pb.ModelInferRequest) -> int:
    """How many values the request's inputs carry in typed ``contents``."""
    return sum(len(getattr(t.contents, _CONTENTS.get(t.datatype, "bytes_contents"))) for t in request.inputs)


async def _refuse_memory(context: grpc.aio.ServicerContext, refused: inflight.Refused) -> None:
    """End a call refused for the memory it would hold: RESOURCE_EXHAUSTED, with when to
    retry when other requests held the budget."""
    pushback = () if refused.retry_after is None else (("grpc-retry-pushback-ms", str(refused.retry_after * 1000)),)
    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refused.message, trailing_metadata=pushback)


async def _parse(message: Any, raw: bytes, context: grpc.aio.ServicerContext) -> Any:
    """A body that is not the message gets INVALID_ARGUMENT naming it, not gRPC's UNKNOWN
    "unexpected DecodeError"."""
    try:
        return message.FromString(raw)
    except DecodeError as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {message.DESCRIPTOR.name}: {exc}")


class _Line:
    """What one call's access line names once its request is parsed: the model it asks for
    (written only when the agent serves it: ``logformat.AccessLog``)."""

    __slots__ = ("model",)

    def __init__(self) -> None:
        self.model: str | None = None


def _logged(access: logformat.AccessLog, route: str, call: Any) -> Any:
    """``call`` writing its access line once answered: the fields of an HTTP request's, the
    method gRPC's ``POST``, the route the method's path, ``grpc_status`` the call's code by
    name (``OK``, ``NOT_FOUND``; none when its client left first) and the bytes its request
    and answer messages hold."""

    async def run(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        line = _Line()
        status: str | None = None
        out = 0
        try:
            response = await call(raw, context, line)
            status, out = grpc.StatusCode.OK.name, response.ByteSize()
            return response
        except asyncio.CancelledError:
            raise
        except BaseException:
            code = context.code()
            status = code.name if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN.name
            raise
        finally:
            metadata = dict(context.invocation_metadata() or ())
            access.write(correlation.request_id(metadata.get(correlation.HEADER)), "POST", route, line.model, None, None,
                         len(raw), out, (time.perf_counter() - started) * 1000, grpc_status=status)

    return run


def _handlers(servicer: InferenceServicer, access: logformat.AccessLog | None = None) -> grpc.GenericRpcHandler:
    """The service's methods, each parsing its own request (ModelInfer once it is charged
    against the memory budget: ``InferenceServicer.infer``), each writing its access line
    when ``access`` is given."""

    def parsing(message: Any, method: Any) -> Any:
        async def call(raw: bytes, context: grpc.aio.ServicerContext, line: _Line | None = None) -> Any:
            request = await _parse(message, raw, context)
            if line is not None:
                line.model = getattr(request, "name", None)  # ModelReady's and ModelMetadata's model
            return await method(request, context)

        return call

    methods = {
        "ServerLive": pb.ServerLiveRequest, "ServerReady": pb.ServerReadyRequest, "ModelReady": pb.ModelReadyRequest,
        "ServerMetadata": pb.ServerMetadataRequest, "ModelMetadata": pb.ModelMetadataRequest,
    }
    calls: dict[str, Any] = {name: parsing(message, getattr(servicer, name)) for name, message in methods.items()}
    calls["ModelInfer"] = servicer.infer
    if access is not None:
        calls = {name: _logged(access, f"/{SERVICE}/{name}", call) for name, call in calls.items()}
    return grpc.method_handlers_generic_handler(SERVICE, {
        name: grpc.unary_unary_rpc_method_handler(call, response_serializer=lambda m: m.SerializeToString())
        for name, call in calls.items()
    })


async def start(host: str, port: int, server: http.InferenceServer, max_message_bytes: int,
                access: logformat.AccessLog | None = None) -> tuple[grpc.aio.Server, int]:
    """Serve on ``host:port`` (0 = any free port), each call an access line when ``access``
    is given (``--access-log``); returns the server and its port."""
    grpc_server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", min(max_message_bytes, MAX_MESSAGE_BYTES)),
        ("grpc.max_send_message_length", -1),  # answers are as large as the model makes them
        ("grpc.so_reuseport", 0),
    ])
    grpc_server.add_generic_rpc_handlers((_handlers(InferenceServicer(server), access),))
    address = hostport.address(host, port)
    try:
        bound = grpc_server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc's way of saying the address is taken
        raise OSError(f"cannot serve gRPC inference on {address}: {exc}") from None
    if bound == 0:
        raise OSError(f"cannot serve gRPC inference on {address}")
    await grpc_server.start()
    return grpc_server, bound

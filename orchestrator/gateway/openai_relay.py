"""The relay of one OpenAI request across its ranked replicas, for
:mod:`orchestrator.gateway.openai_routes` and the stream of a cascade's answering stage
(:mod:`orchestrator.gateway.openai_cascade`, with its :class:`RelayHooks`).

Streams are relayed event by event as they arrive, never buffered whole
(:mod:`orchestrator.gateway.event_stream` reads them). The answer to the caller is
committed only once its first token is in hand (a chat stream's leading empty ``role``
event is held until then): a replica that fails before that — refused connection, 5xx, a
stream cut before any token — is ejected (for a 500, an error of that one request, only
at the fifth in a row: ``EndpointTable.answered``) and the request goes to the next
candidate, so no caller sees it; an error event, or ``[DONE]``, before any token counts as
a 500. A replica that took the request and sent no token within the first-token timeout
(an opening is no token) is skipped the same way but, like a 500, ejected only at the
fifth in a row (``EndpointTable.timed_out``): one long prompt on slow edge hardware must
not take the replica from every caller. After the commit an upstream failure (a cut, a
pause past the idle timeout, an end without ``[DONE]``) ends the stream with an SSE error
event and ``[DONE]``, counted in ``edgeplane_gateway_streams_cut`` (not a failover: the
request stays where it is). The replica is judged by how its stream ended, not by its
first token: a pause counts as a timeout, a cut ejects it, an error event counts as a 500,
and only a stream that ended with ``[DONE]`` as an answer. A caller that goes away cancels
the upstream request, which closes its connection, and the replica stops generating
(:mod:`orchestrator.gateway.caller_watch`).

Upstream calls go through the gateway's ``UpstreamPool`` in its streaming mode
(``UpstreamPool.stream``): the answer's head comes back as soon as it arrives and its body
as it is read, a slow caller pauses the replica's socket, and an attempt left unfinished
closes its connection. Its cost per stream is measured in ``bench/genai_gateway.py``
(docs/benchmarks.md). A gateway out of file descriptors (``upstream.OutOfDescriptors``)
answers 503 with a Retry-After and tries no other replica, none of which failed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from edgeplane_proto import openai_error
from orchestrator.gateway import adapter_names, adapter_refusals, caller_watch, event_stream, failover, routing, scoping
from orchestrator.gateway.upstream import OutOfDescriptors, Stream, UpstreamError, UpstreamTimeout

if TYPE_CHECKING:  # the relay's owner, which imports this module
    from orchestrator.gateway import openai_routes

SSE_DONE = b"data: [DONE]\n\n"


def error_body(message: str, status: int, *, param: str | None = None, code: str | None = None) -> bytes:
    """OpenAI's error object (its ``type`` by ``status``, as the agents answer it)."""
    return openai_error.body(message, openai_error.type_of(status), param, code)


def sse_error(message: str, code: str = "upstream_failed") -> bytes:
    return b"data: " + error_body(message, 502, code=code) + b"\n\n"


class RelayHooks(Protocol):
    """What a caller of the relay (the generative cascade) learns of it and adds to it."""

    def committed(self, e: routing.Endpoint) -> dict[str, str]:
        """``e``'s answer (a 200) goes to the caller: the headers to add to it."""
        ...

    async def refused(self, send: Send, e: routing.Endpoint, status: int, body: bytes, retry_after: str | None) -> None:
        """``e`` refused the request (a 4xx other than 404 and 429: the caller's error):
        this hook answers the caller, with that refusal or an earlier answer, and counts
        that answer in ``edgeplane_gateway_requests_total``."""
        ...

    def busy(self, e: routing.Endpoint, seconds: float) -> None:
        """An attempt at ``e`` ended (answered or failed) after ``seconds``."""
        ...

    async def failed(self, send: Send, failures: list[str], at_capacity: AtCapacity | None) -> bool:
        """Every replica failed or was at capacity (``at_capacity``: the last one that said
        so) before answering; True when this hook answered instead."""
        ...


@dataclass(frozen=True)
class AtCapacity:
    """A replica's 429: its sequences are full. With hooks it is no answer, as in a
    non-streaming cascade stage: the stage's next replica is tried."""

    endpoint: routing.Endpoint
    body: bytes
    retry_after: str | None


class _Failed(Exception):
    """This attempt failed before anything reached the caller: try the next replica
    (``eject``: and leave this one out for a while; ``slow``: it took the request and sent
    nothing in time, which ejects it only as the last of several in a row; ``at_capacity``:
    it answered 429; ``retry_after``: it answered 503; ``moved``: it answered 404, it no
    longer serves the model)."""

    def __init__(self, why: str, *, eject: bool = True, slow: bool = False, at_capacity: AtCapacity | None = None,
                 retry_after: int | None = None, moved: bool = False) -> None:
        super().__init__(why)
        self.eject = eject and not slow
        self.slow = slow
        self.at_capacity = at_capacity
        self.retry_after = retry_after  # it answered 503 (not ready, draining): retry after this many seconds
        self.moved = moved


def json_object(content: bytes) -> dict[str, Any] | None:
    """A replica's whole answer as the JSON object every completion is; None when it is not one."""
    try:
        parsed = json.loads(content)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def engine_model(e: routing.Endpoint, asked: str) -> str:
    """The ``model`` a request for ``asked`` names at ``e``: a vllm variant's
    ``servedModelName`` may differ from the Model's name, and its engine serves only that."""
    return e.served_model or asked


def relay(owner: openai_routes.OpenAIGateway, model: str, ranked: list[routing.Ranked], suffix: str, raw: bytes, stream: bool, *, chat: bool,
          arrived: float, forwarded: Mapping[str, str], hooks: RelayHooks | None = None,
          failovers: failover.Failovers | None = None) -> Response:
    """Send ``raw`` (a JSON body) to the first of ``ranked`` that answers and relay its answer
    (its first token timed from ``arrived``, the caller's request: ``time.perf_counter``), with
    the caller's id and trace context and its verified token (``forwarded``: :func:`correlation.forwarded`
    and :func:`scoping.passed_on`, the token sent on by :func:`scoping.to_replica` to the replicas that check tokens alone);
    ``failovers``: the request's, when replicas before these failed it (a cascade's earlier stages)."""
    return Relay(owner, model, ranked, suffix, raw, {"content-type": "application/json", **forwarded}, stream, chat=chat, arrived=arrived,
                  hooks=hooks, failovers=failovers)


class Relay(Response):
    """The ASGI answer that picks the replica, relays it, and watches the caller: a
    disconnect at any point cancels the work, which closes the upstream connection."""

    def __init__(self, owner: openai_routes.OpenAIGateway, model: str, ranked: list[routing.Ranked], suffix: str, raw: bytes,
                 headers: dict[str, str], stream: bool, *, chat: bool, arrived: float, hooks: RelayHooks | None = None,
                 failovers: failover.Failovers | None = None, adapter: str | None = None) -> None:
        self.owner, self.model, self.ranked, self.suffix = owner, model, ranked, suffix
        self.named = adapter_names.Named(model, adapter)  # ``raw`` names the model as ``self.named.asked(model)``
        self.failovers = failovers if failovers is not None else failover.Failovers(owner.gw.metrics.failovers, model,
                                                                                    owner.gw.metrics.skipped)
        self.raw, self.fwd_headers, self.stream, self.chat = raw, headers, stream, chat
        self.arrived = arrived  # the caller's request (time.perf_counter), which its first token is timed from
        self.hooks = hooks
        self.status_code = 200
        self.background = None

    def _out(self, e: routing.Endpoint) -> dict[str, str]:
        """Headers of the answer ``e`` gives, once it is committed to the caller."""
        out = {"x-edgeplane-site": e.site, "x-edgeplane-tier": e.tier, **self.failovers.header()}
        if self.hooks is not None:
            out.update(self.hooks.committed(e))
        return out

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await caller_watch.until_disconnected(self._run(send), receive)

    def _body_for(self, e: routing.Endpoint) -> bytes:
        """The caller's body, naming the model (and its adapter) as this replica's engine knows it."""
        name = self.named.asked(engine_model(e, self.model))
        if name == self.named.asked(self.model):
            return self.raw
        return json.dumps({**json.loads(self.raw), "model": name}).encode()

    async def _run(self, send: Send) -> None:
        gw = self.owner.gw
        failures: list[str] = []
        at_capacity: AtCapacity | None = None
        unavailable: list[int | None] = []  # the Retry-After of each replica that answered 503, None for each 404
        out_of_descriptors: OutOfDescriptors | None = None
        for choice in self.ranked:
            e = choice.endpoint
            self.failovers.attempt(e.site)
            gw.table.started(e.url)
            began = time.perf_counter()
            try:
                await self._attempt(e, send)
                return
            except _Failed as exc:
                failures.append(f"{e.site}: {exc}")
                at_capacity = exc.at_capacity or at_capacity
                if exc.retry_after is not None or exc.moved:
                    unavailable.append(exc.retry_after)
                if exc.slow or exc.eject:  # slow: a long prompt on slow hardware, or stuck: EndpointTable.timed_out tells
                    gw.table.failed(e.url, slow=exc.slow)
            except OutOfDescriptors as exc:  # the gateway's own: no replica failed, and the next would need a descriptor too
                failures.append(f"{e.site}: {exc}")
                out_of_descriptors = exc
                break
            finally:
                gw.table.finished(e.url)
                if self.hooks is not None:
                    self.hooks.busy(e, time.perf_counter() - began)
        if self.hooks is not None and await self.hooks.failed(send, failures, at_capacity):
            return
        if out_of_descriptors is not None:
            gw.refused(self.model, 503)
            await _send_whole(send, 503, error_body(str(out_of_descriptors), 503, code="unavailable"),
                              {"retry-after": str(out_of_descriptors.retry_after)})
            return
        if (retry := failover.retry_after(unavailable, len(failures))) is not None:
            gw.refused(self.model, 503)
            await _send_whole(send, 503, error_body(f"no replica tried can answer now: {'; '.join(failures)}; retry", 503,
                                                    code="unavailable"), {"retry-after": str(retry)})
            return
        gw.refused(self.model, 502)
        await _send_whole(send, 502, error_body(f"every replica tried failed: {'; '.join(failures)}", 502, code="upstream_failed"), {})

    async def _attempt(self, e: routing.Endpoint, send: Send) -> None:
        owner = self.owner
        first_token_by = asyncio.get_running_loop().time() + owner.first_token_timeout  # the head's wait counts too
        try:
            resp = await owner.post(f"{e.url}/v1{self.suffix}", self._body_for(e), scoping.to_replica(self.fwd_headers, e), stream=self.stream)
        except UpstreamTimeout as exc:
            raise _Failed(str(exc), slow=True) from None
        except UpstreamError as exc:
            raise _Failed(f"connect: {exc}") from None
        try:
            ctype = resp.headers.get("content-type", "application/json")
            streamed = resp.status == 200 and ctype.startswith("text/event-stream")
            if resp.status == 200 and streamed != self.stream:  # a proxy's own page, say, where a stream was asked for
                owner.gw.table.malformed(e.url)
                raise _Failed(f"answered a {'streamed' if self.stream else 'whole'} request with {ctype} (HTTP 200)", eject=False)
            if resp.status == 500 and self.named.adapter is not None:  # Ray's refusal of the adapter, which no replica loads?
                if (refusal := await self._adapter_refusal(resp)) is not None:  # the caller's answer; the replica is fine
                    owner.gw.metrics.requests.labels(self.model, e.site, str(refusal.status)).inc()
                    body = error_body(adapter_refusals.told(self.named, refusal), refusal.status, param="model", code=refusal.code)
                    retry = {"retry-after": str(adapter_refusals.RETRY_AFTER_S)} if refusal.status == 503 else {}
                    await _send_whole(send, refusal.status, body, {**self._out(e), **retry})
                    return
            if resp.status != 200:  # a 200 has answered once it is read whole, or a stream once its first token is in
                owner.gw.table.answered(e.url, resp.status, failover.ejection_s(resp.headers))
            if (redirected := failover.redirect(resp.status, resp.headers)) is not None:  # the table has ejected it
                raise _Failed(redirected, eject=False)
            if resp.status == 503:  # not ready, or draining: it says when to retry
                raise _Failed("unavailable (HTTP 503)", eject=False, retry_after=failover.retry_after_s(resp.headers.get("retry-after")))
            if resp.status >= 500:  # the table has ejected the replica if the answer calls for it
                raise _Failed(f"HTTP {resp.status}", eject=False)
            if not streamed:
                content = await self._whole(resp)
                if resp.status == 404 and (self.named.adapter is None or not adapter_names.missing(content)):
                    # moved away a moment ago (the table follows): the next replica may serve it; the agent itself is fine
                    raise _Failed(f"does not serve {self.model!r} now (HTTP 404)", eject=False, moved=True)
                if resp.status == 404:  # the adapter is not in the bucket, which every replica reads: the caller's answer
                    content = error_body(adapter_names.not_found(self.named), 404, param="model", code="model_not_found")
                    ctype = "application/json"
                if resp.status == 200:
                    if json_object(content) is None:  # cut short, or not JSON at all: the next replica may answer
                        owner.gw.table.malformed(e.url)
                        raise _Failed("the answer is not a JSON object", eject=False)
                    owner.gw.table.answered(e.url, 200)
                if resp.status == 429 and self.hooks is not None:  # full (the replica is fine): the next one may not be
                    raise _Failed("at capacity (HTTP 429)", eject=False,
                                  at_capacity=AtCapacity(e, content, resp.headers.get("retry-after")))
                if resp.status != 200 and self.hooks is not None:  # not an answer: the hooks say what the caller gets, and count it
                    await self.hooks.refused(send, e, resp.status, content, resp.headers.get("retry-after"))
                    return
                owner.gw.metrics.requests.labels(self.model, e.site, str(resp.status)).inc()
                out = self._out(e)
                if resp.status == 200:
                    owner.ttft.labels(self.model).observe(time.perf_counter() - self.arrived)
                out.update(failover.passed_on(resp.headers.get("retry-after")))
                await _send_whole(send, resp.status, content, {**out, "content-type": ctype})
                return
            await self._relay_stream(e, resp, send, first_token_by)
        finally:
            resp.close()  # an unfinished answer closes its connection: the replica sees the caller leave

    async def _adapter_refusal(self, resp: Stream) -> adapter_refusals.Refusal | None:
        """Ray's refusal of the adapter that the 500 ``resp`` is (read within the first token's timeout, up to
        ``adapter_refusals.LONGEST_ANSWER`` bytes); None for any other 500: the replica's own fault."""
        try:
            async with asyncio.timeout(self.owner.first_token_timeout):
                return adapter_refusals.cause(await resp.body(adapter_refusals.LONGEST_ANSWER))
        except (UpstreamError, TimeoutError):
            return None

    async def _whole(self, resp: Stream) -> bytes:
        """The answer ``resp`` gives, read whole within the first token's timeout."""
        try:
            async with asyncio.timeout(self.owner.first_token_timeout):
                return await resp.body()
        except UpstreamError as exc:
            raise _Failed(f"answer cut: {exc}") from None
        except TimeoutError:
            raise _Failed(f"answer cut: no end within {self.owner.first_token_timeout:g}s", slow=True) from None

    async def _relay_stream(self, e: routing.Endpoint, resp: Stream, send: Send, first_token_by: float) -> None:
        owner = self.owner
        reader = event_stream.Reader(resp, first_token_by, owner.idle_timeout)
        events = reader.batches()
        held: list[bytes] = []
        # Hold what comes before the first token (a chat's opening): a failure before it is retried elsewhere.
        try:
            async for batch in events:
                held.append(batch)
                lead = event_stream.lead(batch)
                if lead is None:
                    continue
                kind, obj = lead
                if kind is event_stream.Kind.TOKEN:
                    break
                owner.gw.table.answered(e.url, 500)  # the replica's own error (or an empty answer): a 500 in all but name
                if kind is event_stream.Kind.ERROR:
                    raise _Failed(f"error before the first token: {event_stream.error_message(obj)}", eject=False)
                raise _Failed("stream ended before its first token ([DONE] with no token)", eject=False)
            else:
                raise _Failed("stream ended before its first token")
        except event_stream.Cut as exc:
            raise _Failed(str(exc), slow=exc.silent) from None
        reader.answering()
        owner.gw.metrics.requests.labels(self.model, e.site, "200").inc()
        owner.ttft.labels(self.model).observe(time.perf_counter() - self.arrived)
        head = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        head += [(k.encode(), v.encode()) for k, v in self._out(e).items()]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        await send({"type": "http.response.body", "body": b"".join(held), "more_body": True})
        prev, last = b"", b"".join(held)  # how the stream ended ([DONE], an error before it) is read there
        cut: event_stream.Cut | None = None
        try:
            async for batch in events:
                prev, last = last, batch
                await send({"type": "http.response.body", "body": batch, "more_body": True})
        except event_stream.Cut as exc:
            cut = exc
        ending = event_stream.ending(prev, last)
        if cut is None and ending[-1:] != [event_stream.Kind.DONE]:
            cut = event_stream.Cut("stream ended without [DONE]")  # half an answer, which the caller must not take for all of it
        # The replica is judged by how its stream ended, not by its first token: one that
        # stalls or breaks after every first token is left out as one that fails before it.
        if cut is not None:
            owner.gw.table.failed(e.url, slow=cut.silent)
            owner.gw.metrics.streams_cut.labels(self.model, e.site).inc()
            await send({"type": "http.response.body", "body": sse_error(f"{e.site}: {cut}") + SSE_DONE, "more_body": True})
        else:
            owner.gw.table.answered(e.url, 500 if ending[0] is event_stream.Kind.ERROR else 200)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _send_whole(send: Send, status: int, body: bytes, headers: dict[str, str]) -> None:
    head = [(k.encode(), v.encode()) for k, v in headers.items()]
    if not any(k == b"content-type" for k, _ in head):
        head.append((b"content-type", b"application/json"))
    head.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body, "more_body": False})


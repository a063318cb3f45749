"""The agent's OpenAI-compatible routes: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``.

Each generative model admits at most ``max_concurrent`` sequences at once (they run on
that model's own worker threads) and lets at most ``max_queued`` more wait for a slot, in
arrival order; one more is answered 429 with ``Retry-After`` at once, so a burst never
becomes an unbounded backlog. A request that waits and whose client leaves gives its
place up.

A streamed generation's tokens are written by the generating thread itself while the
client keeps up: the server lends it the socket (``httpserver.Passthrough``) while it waits
for the stream's next item, and each token goes out as one server-sent event with one
non-blocking ``send``, without waking the event loop. Everything else (the first chunk of
a chat, events with logprobs, the end of the stream, and any token the socket does not take
at once because the client's buffer is full) reaches the event loop through a deque: the
generating thread appends each event and wakes the loop (``call_soon_threadsafe``) only when
no wake-up is pending, and the loop takes every event that is there at once and sends them
in one write when the client has room (``httpserver.StreamingResponse``). One lock decides
between the two ways, so the events keep their order. When the client goes away
(connection closed, the task cancelled) the generating thread is told between two steps,
the sequence's slot is freed when that thread returns, and the model's
``cancelled`` counter in /metrics goes up.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import edge_agent
from edge_agent import errors, generation_answer, inflight, openai_api, refusals, registry
from edge_agent.admission import DEFAULT_MAX_CONCURRENT, Admission, Retired
from edge_agent.httpmessages import Request, Response
from edge_agent.httpmessages import request_id as request_id_of
from edge_agent.httpserver import Passthrough, StreamingResponse
from edge_agent.metrics import AgentMetrics
from edge_agent.runtime import genai
from edgeplane_proto import correlation, encoding, oip

log = logging.getLogger(__name__)

DEFAULT_MAX_QUEUED = 16
_STARTED = int(time.time())
# Response ids need to be unique, not secret: os.urandom costs a system call per request
# (0.5 ms measured here), a seeded generator nothing.
_IDS = random.Random()
# A token made sooner than this after the one before is handed to the event loop, not
# written by the generating thread (see _Sequence._write_through; bench/genai_agent.py).
WRITE_THROUGH_MIN_GAP_S = 0.25e-3
# More characters than any token of a real vocabulary holds (their longest are runs of
# spaces or punctuation, far shorter). A prompt longer than the context times this is
# refused before it is tokenized (about 50 ms a MiB).
MAX_TOKEN_CHARS = 1024
# A prompt of more characters than this (a chat's messages counted with what their template
# writes around them, openai_api.prompt_chars) is formatted and tokenized on a worker thread
# (the library lets go of the GIL meanwhile), so that the event loop goes on answering other
# requests; a shorter one costs less than the hand-over to a thread.
INLINE_PROMPT_CHARS = 16 * 1024
# A body of more bytes than this is read as JSON and checked on a worker thread, as a long
# prompt is tokenized: tens of MiB of JSON hold the event loop for seconds; a smaller one
# costs less than the hand-over to a thread.
INLINE_BODY_BYTES = 64 * 1024
_DECODED = f"its body, and up to {inflight.JSON_DECODE_FACTOR} x it while it is decoded"
_TOKENIZED = (f"its body, up to {inflight.JSON_DECODE_FACTOR} x it while it is decoded, and up to "
              f"{inflight.PROMPT_BYTE_FACTOR} x its prompt's text while that is formatted and tokenized")
T = TypeVar("T")
_READ = ("GET", "HEAD")
_ROUTES = {"/v1/models": _READ, **{path: ("POST",) for path in refusals.GENERATE_PATHS}}


def _limits(served: registry.ServedModel) -> tuple[int, int]:
    """``(sequences at once, requests waiting)`` as ``served``'s assignment sets them."""
    return (max(1, served.max_concurrent or DEFAULT_MAX_CONCURRENT),
            served.max_queued if served.max_queued or served.max_concurrent else DEFAULT_MAX_QUEUED)


class _Model:
    """Per served version: its admission and its own generation threads."""

    def __init__(self, served: registry.ServedModel) -> None:
        self.served = served
        self.limits = max_active, max_queued = _limits(served)
        self.executor = self._threads(max_active)
        # Not a method of this object: the admission would then hold it, a cycle that kept a
        # dropped version's weights until the cycle collector ran.
        self.admission = Admission(max_active, max_queued, functools.partial(self.executor.shutdown, wait=False))

    def _threads(self, n: int) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=n, thread_name_prefix=f"gen-{self.served.name}"[:15])

    def follow_limits(self) -> None:
        """Take up the limits the version's assignment sets now (changed with the same
        artifact): running sequences keep their slots and threads, new ones obey them."""
        limits = _limits(self.served)
        if limits == self.limits:
            return
        if limits[0] != self.limits[0]:
            # New sequences go to threads as many as the new limit; the old ones end with the
            # sequences they run.
            old, self.executor = self.executor, self._threads(limits[0])
            old.shutdown(wait=False)
            self.admission.drained = functools.partial(self.executor.shutdown, wait=False)
        self.limits = limits
        self.admission.resize(*limits)

    def retire(self) -> None:
        """No longer served (unassigned, stopped or replaced): the requests waiting for a
        slot are refused, the running generations finish, and then the threads end."""
        self.admission.close()


class GenerationServer:
    """Handles ``/v1/*`` for the registry's ``onnx-genai`` models."""

    def __init__(self, models: registry.ModelRegistry, metrics: AgentMetrics,
                 max_body_bytes: int = edge_agent.DEFAULT_MAX_REQUEST_BYTES) -> None:
        self._models = models
        self._metrics = metrics
        self.max_body_bytes = max_body_bytes  # of a compressed body once inflated
        self._state: dict[str, _Model] = {}  # by model name: the version served now
        # Versions no longer served, by model name, whose sequences still run: counted in the
        # gauges until they end (their admissions only: those hold nothing of the model).
        self._retiring: list[tuple[str, Admission]] = []
        self.active = 0
        self.written_through = 0  # streamed tokens the generating threads wrote themselves
        #: The answer refusing the caller of a request the model it names (``--serve-auth
        #: token``, set by the agent's server); None: it may call it.
        self.refuse_model: Callable[[Request, str], Response | None] = lambda request, name: None

    # -- routing ---------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response | StreamingResponse:
        path = request.path.rstrip("/")
        try:
            allowed = _ROUTES.get(path) or (_READ if path.startswith("/v1/models/") else None)
            if allowed is None:
                raise openai_api.ApiError(404, f"no such endpoint: {request.method} {request.path}", code="not_found")
            if request.method not in allowed:
                raise openai_api.ApiError(405, f"{request.method} is not allowed on {request.path}; it takes {', '.join(allowed)}",
                                          code="method_not_allowed", headers=(("allow", ", ".join(allowed)),))
            if path == "/v1/models":
                return self._list(request)
            if path.startswith("/v1/models/"):
                name = path[len("/v1/models/"):]
                return self.refuse_model(request, name) or self._one(name)
            return await self._generate(request, chat=path.endswith("chat/completions"))
        except openai_api.ApiError as err:
            return Response(err.status, err.body(), headers=err.headers)

    def _generative(self) -> list[registry.ServedModel]:
        return [m for m in self._models.serving() if m.kind == genai.GenAIModel.kind]

    def _list(self, request: Request) -> Response:
        names = [(m.name, "edgeplane") for m in sorted(self._generative(), key=lambda m: m.name)
                 if self.refuse_model(request, m.name) is None]
        return generation_answer.json_response(openai_api.models_list(names, _STARTED))

    def _one(self, name: str) -> Response:
        served = self._find(name)
        return generation_answer.json_response({"id": served.name, "object": "model", "created": _STARTED, "owned_by": "edgeplane"})

    def _find(self, name: str) -> registry.ServedModel:
        served = self._models.get(name)
        if served is not None and served.kind == genai.GenAIModel.kind:
            return served
        if served is not None:
            raise openai_api.ApiError(400, f"model {name!r} is not a generative model (it serves the v2 inference API)",
                                      param="model", code="model_not_generative")
        if self._models.known(name):
            raise openai_api.ApiError(503, f"model {name!r} is not ready yet", type_="server_error", param="model",
                                      code="model_not_ready", headers=(("retry-after", "5"),))
        raise openai_api.ApiError(404, f"The model {name!r} does not exist or is not served here", param="model",
                                  code="model_not_found")

    def _state_of(self, served: registry.ServedModel) -> _Model:
        state = self._state.get(served.name)
        if state is not None and state.served is served:
            return state
        if self._models.get(served.name) is not served:  # unloaded while its prompt was read
            raise _retired(served.name)
        if state is not None:
            self._retire(state)  # a replaced version the registry has not told of yet
        state = self._state[served.name] = _Model(served)
        return state

    def models_changed(self) -> None:
        """Let go of the versions the registry no longer serves, so that their weights and
        threads are freed once their running generations end, and apply the limits of those
        it still serves (called by the registry's owner on every change)."""
        for name, state in list(self._state.items()):
            if self._models.get(name) is not state.served:
                del self._state[name]
                self._retire(state)
            else:
                state.follow_limits()

    def _retire(self, state: _Model) -> None:
        state.retire()
        self._retiring = [(name, a) for name, a in self._retiring if a.active]
        if state.admission.active:
            self._retiring.append((state.served.name, state.admission))

    def gauges(self) -> list[tuple[str, int, int]]:
        """``(model, sequences running, requests queued)`` per generative model, the
        sequences of its versions no longer served that still run included."""
        self._retiring = [(name, a) for name, a in self._retiring if a.active]
        running = {name: s.admission.active for name, s in self._state.items()}
        for name, admission in self._retiring:
            running[name] = running.get(name, 0) + admission.active
        return [(name, n, s.admission.queued if (s := self._state.get(name)) else 0) for name, n in sorted(running.items())]

    def close(self) -> None:
        for state in self._state.values():
            state.executor.shutdown(wait=False, cancel_futures=True)

    # -- generation ---------------------------------------------------------------------------

    async def _inflated(self, request: Request) -> bytes:
        """The body as sent before its ``Content-Encoding``: here, not in front of this server,
        so that every server of these routes (the agent, a data-centre replica) takes the same
        bodies and refuses the same ones (415, 413 past the limit once inflated). On the
        agent, charged to the request's hold of the memory budget as it inflates."""
        meter = None if request.hold is None else inflight.Inflating(request.hold)
        plain = await encoding.inflate_off_loop(request.body, request.headers.get("content-encoding"), self.max_body_bytes,
                                                meter)
        if isinstance(plain, encoding.Refused):
            raise openai_api.ApiError(plain.status, plain.message, code=plain.code,
                                      headers=tuple(encoding.refusal_headers(plain.status).items()))
        if isinstance(plain, inflight.Refused):
            raise _refused_memory(plain)
        return plain

    async def _generate(self, request: Request, chat: bool) -> Response | StreamingResponse:
        started = time.perf_counter()
        label = "(unknown)"
        try:
            raw = await self._inflated(request)
            if request.hold is not None and len(raw) > inflight.JSON_FREE_MAX_BYTES:  # before the parse takes it
                refused = request.hold.grow(inflight.openai_decode_bytes(len(raw)), _DECODED)
                if refused is not None:
                    raise _refused_memory(refused)
            if len(raw) > INLINE_BODY_BYTES:
                body = await _on_worker(request.hold, functools.partial(openai_api.parse, raw, chat=chat, interruptible=True))
            else:
                body = openai_api.parse(raw, chat=chat)
            if (refused := self.refuse_model(request, body.model)) is not None:
                self._metrics.observe_error(label, refused.status)
                return refused
            served = self._find(body.model)
            label = served.name
            runtime: genai.GenAIModel = served.runtime  # type: ignore[assignment]
            limit = runtime.context_length
            if len(body.messages) >= limit:
                raise openai_api.too_many_messages(body, limit)
            chars = openai_api.prompt_chars(body)
            if chars > limit * MAX_TOKEN_CHARS:
                raise openai_api.prompt_too_long(body, limit, chars)
            hold = request.hold
            tokenizing = 0 if hold is None else inflight.prompt_bytes(openai_api.prompt_utf8_bytes(body))
            if hold is not None and tokenizing:  # before the tokenizer takes it
                refused = hold.grow(tokenizing, _TOKENIZED)
                if refused is not None:
                    raise _refused_memory(refused)
            if chars > INLINE_PROMPT_CHARS:
                prompt = await _on_worker(hold, functools.partial(_tokens, runtime, body, chat))
            else:
                prompt = _tokens(runtime, body, chat)
            if hold is not None and tokenizing:  # the tokens stay while the sequence runs
                hold.shrink(tokenizing - min(tokenizing, int(prompt.nbytes)))
            n = int(prompt.shape[0])
            if n == 0:
                raise openai_api.ApiError(400, "the prompt is empty", param="prompt" if not chat else "messages")
            if n >= limit or (body.max_tokens is not None and n + body.max_tokens > limit):
                raise openai_api.context_error(body, limit, n)
            max_tokens = body.max_tokens if body.max_tokens is not None else limit - n
            options = genai.SamplingOptions(**{**body.options.__dict__, "max_tokens": max_tokens})
            state = self._state_of(served)
            try:
                await state.admission.acquire()
            except Retired:
                raise _retired(served.name) from None
            except errors.Overloaded as exc:
                raise openai_api.ApiError(
                    429, f"model {served.name!r} is at capacity ({state.admission.max_active} running, "
                         f"{state.admission.max_queued} queued); retry after {exc.retry_after}s",
                    type_="rate_limit_error", code="rate_limit_exceeded", headers=(("retry-after", str(exc.retry_after)),)) from None
        except openai_api.ApiError as err:
            self._metrics.observe_error(label, err.status)
            raise
        except errors.InvalidInput as exc:
            self._metrics.observe_error(label, 400)
            raise openai_api.ApiError(400, str(exc), param="messages" if chat else "prompt") from None
        self._metrics.generation(served.name, "prompt_tokens", n)
        seq = _Sequence(self, state, prompt, options, started, request_id_of(request.headers))
        shaper = openai_api.Shaper(body, ("chatcmpl-" if chat else "cmpl-") + f"{_IDS.getrandbits(96):024x}",
                                   version=oip.model_version(served.sha256))
        if body.stream:
            direct = None if body.options.logprobs else seq.passthrough(shaper.token_event)
            return StreamingResponse(200, generation_answer.Closing(generation_answer.sse(shaper, seq.batches()), seq.close), passthrough=direct)
        try:
            return await generation_answer.whole(shaper, seq.batches())
        finally:
            seq.close()


def _refused_memory(refused: inflight.Refused) -> openai_api.ApiError:
    """A request refused for the memory it would take, as OpenAI's error object (503: retry)."""
    headers = () if refused.retry_after is None else (("retry-after", str(refused.retry_after)),)
    return openai_api.ApiError(refused.status, refused.message, type_="server_error" if refused.status == 503 else
                               "invalid_request_error", code=refused.code, headers=headers)


class _Sequence:
    """One generation, started at once on its model's threads. ``close`` (idempotent) stops
    it between two steps if it is still running; the slot is freed when its thread returns."""

    def __init__(self, server: GenerationServer, state: _Model, prompt: Any, options: genai.SamplingOptions,
                 started: float, request_id: str | None = None) -> None:
        loop = asyncio.get_running_loop()
        self._metrics = server._metrics
        self._pending: collections.deque[genai.TokenEvent | genai.Finished | generation_answer.Failed] = collections.deque()
        self._ready = asyncio.Event()
        self._wake_pending = False  # a wake-up is on its way to the loop (read and set by both threads)
        self._cancel = genai.Cancel()
        self._started = started
        self._name = name = state.served.name
        self._outcome = "cancelled"
        self._tokens = 0
        self._closed = False
        self._loop = loop
        # Set once the server lends the stream's socket; then its lock orders every event.
        self._direct: Passthrough | None = None
        self._encode: Callable[[str], bytes] | None = None
        self._parked = False  # the loop waits for events with none pending (under the lock)
        self._last_token = started
        self._through = 0  # tokens written by the generating thread
        self._server = server
        runtime: genai.GenAIModel = state.served.runtime  # type: ignore[assignment]
        pending, ready, cancel = self._pending, self._ready, self._cancel

        def wake() -> None:
            self._wake_pending = False
            ready.set()

        def queue(ev: Any) -> None:
            pending.append(ev)
            if not self._wake_pending:  # a wake-up already on its way finds this event too
                self._wake_pending = True
                loop.call_soon_threadsafe(wake)

        def emit(ev: Any) -> None:  # on the generating thread
            direct = self._direct
            if direct is None:
                queue(ev)
                return
            token = type(ev) is genai.TokenEvent
            if token:
                now = time.perf_counter()
                since, self._last_token = now - self._last_token, now
            with direct.lock:
                if token and self._parked and self._write_through(direct, ev, since):
                    return
                self._parked = False
                queue(ev)

        # The thread may not run far ahead of what was sent (see runtime.genai.Window).
        self._window = window = genai.Window()

        def work() -> int:
            try:
                return runtime.generate(prompt, options, emit, cancel, window).completion_tokens
            except Exception as exc:  # a native error mid-generation: end this stream with it
                log.exception("generation for %s failed%s", name, correlation.in_log(request_id))
                emit(generation_answer.Failed(f"generation failed: {exc}"))
                return 0

        slot_started = time.perf_counter()
        server.active += 1
        metrics = self._metrics

        def done(job: asyncio.Future[int]) -> None:
            server.active -= 1
            state.admission.release(time.perf_counter() - slot_started)
            # Tokens the model actually generated: after a disconnect, the ones made before
            # the generating thread saw the cancel.
            metrics.generation(name, "completion_tokens", job.result() if not job.cancelled() and job.exception() is None else 0)

        loop.run_in_executor(state.executor, work).add_done_callback(done)

    def passthrough(self, encode: Callable[[str], bytes]) -> Callable[[Passthrough], None]:
        """For ``StreamingResponse.passthrough``: tokens are then written by the generating
        thread as ``encode(text)`` while the server lends it the socket."""

        def take(direct: Passthrough) -> None:
            self._encode = encode
            self._direct = direct

        return take

    def _write_through(self, direct: Passthrough, ev: genai.TokenEvent, since: float) -> bool:
        """On the generating thread, the lock held, the loop parked: send one token itself,
        made ``since`` seconds after the one before. Tokens that come faster than a wake-up
        of the loop costs go to the loop instead, which sends all those made meanwhile in
        one write."""
        if since < WRITE_THROUGH_MIN_GAP_S and self._tokens:
            return False
        if ev.text:
            if not direct.send(self._encode(ev.text)):  # type: ignore[misc]
                return False
            self._through += 1
        self._tokens += 1
        if self._tokens == 1:
            self._loop.call_soon_threadsafe(self._metrics.observe_ttft, self._name, time.perf_counter() - self._started)
        self._window.consumed(1)
        return True

    def _park(self) -> bool:
        """True when nothing is pending: the generating thread may then write tokens itself."""
        direct = self._direct
        if direct is None:
            return not self._pending
        with direct.lock:
            self._parked = not self._pending
            return self._parked

    def _unpark(self) -> None:
        direct = self._direct
        if direct is not None:
            with direct.lock:
                self._parked = False

    async def batches(self) -> AsyncIterator[list[genai.TokenEvent | genai.Finished | generation_answer.Failed]]:
        """Every event there is, in order, as one batch; the last batch ends with a
        :class:`genai.Finished` or :class:`~edge_agent.generation_answer.Failed`."""
        pending, ready = self._pending, self._ready
        while True:
            ready.clear()  # an event appended after this wakes the loop (see emit)
            if self._park():
                try:
                    await ready.wait()
                finally:
                    self._unpark()
            batch = []
            while pending:
                ev = pending.popleft()
                batch.append(ev)
                if isinstance(ev, genai.TokenEvent):
                    if self._tokens == 0:
                        self._metrics.observe_ttft(self._name, time.perf_counter() - self._started)
                    self._tokens += 1
                    continue
                self._outcome = ("cancelled" if ev.reason == "cancelled" else "completed") if isinstance(ev, genai.Finished) else "failed"
                yield batch
                return
            yield batch  # resumed when the consumer wants more: these are written
            self._window.consumed(len(batch))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._server.written_through += self._through
        self._cancel.set()
        self._window.close()  # a thread waiting for this consumer wakes and sees the cancel
        m, name = self._metrics, self._name
        m.generation(name, self._outcome, 1)
        if self._outcome == "completed":
            m.observe_ok(name, time.perf_counter() - self._started)
        else:
            m.observe_error(name, 499 if self._outcome == "cancelled" else 500)


def _retired(name: str) -> openai_api.ApiError:
    return openai_api.ApiError(503, f"model {name!r} was unloaded or replaced while this request waited; retry",
                               type_="server_error", param="model", code="model_not_ready", headers=(("retry-after", "1"),))


async def _on_worker(hold: inflight.Hold | None, step: Callable[[], T]) -> T:
    """``step()`` on a worker thread, ``hold`` kept until the thread is done with it: a caller
    that leaves ends the wait, not the decoding or tokenizing, which goes on taking the memory
    charged for it (as a v2 run on a worker keeps its charge, ``http.InferenceServer.compute``).
    Its error once the caller has left is no one's (a bad body, a special token in a message):
    it is read here, not logged by asyncio as never retrieved."""
    if hold is None:
        return await asyncio.to_thread(step)
    hold.pin()
    job = asyncio.ensure_future(asyncio.to_thread(step))

    def done(job: asyncio.Future[T]) -> None:
        hold.release()
        if not job.cancelled():
            job.exception()

    job.add_done_callback(done)
    return await asyncio.shield(job)


def _tokens(runtime: genai.GenAIModel, body: openai_api.GenerationRequest, chat: bool) -> Any:
    """The request's prompt as token ids: its messages in the model's chat template, or its text.
    A message may not carry the model's special tokens: its content would become turns of
    the chat (a completion's prompt is the caller's own to write, special tokens and all)."""
    if not chat:
        return runtime.encode(body.prompt)
    for i, message in enumerate(body.messages):
        special = runtime.special_token_in(message["content"])
        if special is not None:
            param = f"messages[{i}].content"
            raise openai_api.ApiError(400, f"{param}: holds {special!r}, a special token of this model's chat format, which a "
                                           "message may not carry", param=param, code="invalid_content")
    return runtime.encode(runtime.chat_prompt(body.messages))

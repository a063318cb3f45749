"""Python client for applications: call the nearest replica directly, fail over, refresh.

``Client(server).infer(model, {"input": array})`` asks the control plane once for the
model's endpoints nearest to the caller (``GET /v1/endpoints/{model}``), caches the list
for its TTL, and then sends each request straight to the best replica — no gateway hop.
A connection error or 5xx moves on to the next endpoint at once and keeps the failed one
out of rotation for a while; when every direct endpoint fails, the request goes through
the gateway, so a replica dying mid-stream costs latency, not requests.

``Client(server).chat(model, messages)`` does the same for a generative model: the
nearest replica that speaks OpenAI first, then the gateway's ``/openai/v1``; it yields the
answer's text as it arrives. A replica that fails before the first token is skipped; once
text has been yielded a failure raises :class:`StreamCut` (the text cannot be taken back).
Its attempts (and the endpoint list's lookup before them) share the client's ``timeout``:
each has what the ones before left, and an answer that has not come by then raises
:class:`TimedOut` (the whole timeout for each attempt in turn would multiply the wait by
the replicas tried). ``infer`` gives each attempt the whole timeout: a hung replica costs it
once and the next one answers, as a v2 inference is short and idempotent.

A numpy array goes in its own dtype, as given. A value given as a plain list or Python
number goes in the datatype the model declares for its input, read from its v2 metadata
through the same replicas and gateways and kept per model (:mod:`orchestrator.clientdatatypes`):
a list does not say whether ``[[0, 1, 0]]`` is FP32, INT32 or BOOL, and a replica takes only
its input's; a value that datatype cannot hold is a ``ValueError``, and the inference is not sent.

Tensors travel with the v2 binary extension by default (every edgeplane endpoint, agent,
Ray replica and gateway, speaks it): 256 floats cost about 5 µs to send as bytes and
140 µs as JSON. Pass ``binary=False`` for a server that only takes JSON.

:class:`AsyncClient` is the same over ``httpx.AsyncClient`` (one for each event loop it is used in).

Several gateways: ``Client(["http://gw1:8088", "http://gw2:8088"])`` (standalone
``edgeplane gateway`` processes, or control planes). The endpoint list is asked of the
first URL that answers; a request that no replica answered directly goes to the gateways
in order, and a connection error or a 5xx from one moves it to the next (inference is
idempotent; a chat moves on only before its first token). A gateway that could not be
reached is tried last for ``ejection_s`` seconds; when none gives a new endpoint list
past its TTL, the list held is used and asked for again after ``ejection_s``.
``direct=False`` sends every request through the gateways (replicas the callers cannot
reach, or one place to meter). The ``token`` goes to the gateways, and to a replica called
directly only where its endpoint entry says it checks tokens (``auth: "token"``: an agent run
with ``--serve-auth token``); an entry without ``auth`` (an earlier control plane) gets none, and
its 401 moves the request on, the replica ejected (:func:`clientattempt.replica_headers`).

No answer is read past ``max_answer_bytes`` (:data:`MAX_ANSWER_BYTES`, 64 MiB, by default:
the most the gateway takes from a replica): a larger one raises :class:`BadAnswer`, read
no further (:mod:`orchestrator.clientbody`); a replica's is left for the next attempt.

Errors: arguments that cannot work (a server URL without ``http://``, a location outside
-90..90/-180..180, a region with a line break, a residency that is not ASCII, a tensor of a dtype the
v2 protocol has no name for, a chat's ``n`` other than 1, a proxy in the environment that
httpx cannot use, such as ``ALL_PROXY=socks5://...`` without socksio) raise ``ValueError``
(``TypeError`` for a wrong type) before anything is sent. Everything that happens on the
way raises an :class:`EdgeplaneError`, never an ``httpx`` exception: :class:`NoEndpoint`,
:class:`Unreachable` (timeouts included; a chat's is a :class:`TimedOut`, as is :class:`PoolFull`:
more requests at once than ``max_connections``, 100 by default, the client's own condition,
which ejects no replica), :class:`InferenceError`, :class:`StreamCut`, :class:`BadAnswer`.

Request ids: each call goes by one ``X-Request-Id`` (``request_id=``, else one the client
makes), sent to every replica and gateway it tries (a gateway sends it on to its replicas),
and carried by its result (``InferResult.request_id``, ``Chat.request_id``) and by every
error it raises (``EdgeplaneError.request_id``), for an operator to find it in the logs.

This module decides where each request goes and sends it; the parts it decides with live
beside it, each importable from here as well: one attempt, and what its answer is, in
:mod:`orchestrator.clientattempt`, the error tree in :mod:`orchestrator.clienterrors`, the
endpoint list cache in :mod:`orchestrator.clientcache`, a chat's answer and the OpenAI wire format it is read from in :mod:`orchestrator.clientchat`,
an :class:`AsyncClient`'s HTTP client for each event loop in :mod:`orchestrator.clientloops`,
an answer's body read within its bound in :mod:`orchestrator.clientbody`, its connection pool
in :mod:`orchestrator.clientpool`, and the checks of what a caller gives in :mod:`orchestrator.clientargs`.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import weakref
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import httpx

from edgeplane_proto import correlation, oip
from orchestrator import clientargs as args
from orchestrator import clientattempt, clientbody, clientchat, clientdatatypes, clientpool, proxyenv
from orchestrator.clientattempt import Attempt, InferResult
from orchestrator.clientbody import MAX_ANSWER_BYTES
from orchestrator.clientpool import MAX_CONNECTIONS
from orchestrator.clientcache import EndpointCache
from orchestrator.clientchat import Chat
from orchestrator.clientdatatypes import DatatypeCache
from orchestrator.clientloops import LoopClients
from orchestrator.clienterrors import BadAnswer, EdgeplaneError, InferenceError, NoEndpoint, PoolFull, StreamCut, TimedOut, Unreachable
from orchestrator.urlpath import path_segment

__all__ = ["MAX_ANSWER_BYTES", "MAX_CONNECTIONS", "AsyncClient", "BadAnswer", "Chat", "Client", "DatatypeCache", "EdgeplaneError", "EndpointCache", "InferResult",
           "InferenceError", "NoEndpoint", "PoolFull", "StreamCut", "TimedOut", "Unreachable"]


class _Base:
    def __init__(self, server: str | Sequence[str], *, timeout: float = 30.0, token: str | None = None,
                 location: tuple[float, float] | None = None, region: str | None = None, residency: str | None = None,
                 binary: bool = True, cache: EndpointCache | None = None, direct: bool = True,
                 max_answer_bytes: int = MAX_ANSWER_BYTES, max_connections: int = MAX_CONNECTIONS, own_pool: bool = True,
                 datatypes: DatatypeCache | None = None):
        self.servers = args.servers(server)
        self.server = self.servers[0]
        self.direct = direct
        self.location = args.position(location)
        self.region, self.residency = args.header_value(region, "region", text=True), args.header_value(residency, "residency")
        self.binary = binary
        self.cache = cache or EndpointCache()
        self.datatypes = datatypes or DatatypeCache()  # of models called with plain lists (clientdatatypes)
        self._asking = args.endpoint_params(self.location, self.region, self.residency)  # the endpoint list's query
        if token is not None and (not isinstance(token, str) or not all("!" <= c <= "~" for c in token)):
            raise ValueError("token: a token is visible ASCII only (no spaces, control or non-ASCII characters)")
        self._auth = {"authorization": f"Bearer {token}"} if token else {}
        self._seconds = args.seconds(timeout)
        self._timeout = httpx.Timeout(self._seconds, connect=min(2.0, self._seconds))
        self.max_answer_bytes = args.count(max_answer_bytes, "max_answer_bytes", "bytes")
        self.max_connections = args.count(max_connections, "max_connections", "connections")
        self._pool = clientpool.Pool(self.max_connections if own_pool else None, self._seconds)  # a transport given holds its own

    def _body(self, inputs: Mapping[str, Any] | Sequence[oip.Tensor], rid: str) -> tuple[bytes, dict[str, str]]:
        """An inference's body and headers, its ``X-Request-Id`` (``rid``) among them."""
        body, header_len = oip.encode_request(args.tensors(inputs), binary=self.binary)
        headers = {"content-type": "application/octet-stream" if header_len is not None else "application/json", correlation.HEADER: rid}
        if header_len is not None:
            headers[oip.BINARY_HEADER] = str(header_len)
        return body, headers

    def _request(self, attempt: Attempt, body: bytes) -> httpx.Request:
        """An inference post, built once per attempt and handed to ``send``: merging
        the client's base URL, parameters and headers into each request
        (``httpx.Client.post``) cost about 0.1 ms a call, more than encoding and decoding
        take together. The URL is parsed once per replica; proxies from the environment,
        hooks and the client's timeout still apply."""
        return httpx.Request("POST", attempt.url, content=body, headers=attempt.headers,
                             extensions={"timeout": self._timeout.as_dict()})

    # The decisions are shared by both clients; only sending differs.

    def _gateways(self) -> list[str]:
        """The gateway URLs in the order to try: those not ejected first."""
        ejected = self.cache.ejected()
        return sorted(self.servers, key=lambda u: u in ejected)

    def _endpoints_requests(self, model: str, deadline: float | None) -> Iterator[tuple[str, str, dict[str, str], httpx.Timeout]]:
        """(gateway, URL, parameters, timeout) of the endpoint list, one per gateway in order,
        each with the client's timeout cut to what is left until ``deadline`` (a chat's: the
        lookup is part of its one timeout); none once nothing is left."""
        for gateway in self._gateways():
            timeout = self._timeout
            if deadline is not None:
                left = deadline - time.perf_counter()
                if left <= 0:
                    return
                timeout = httpx.Timeout(min(left, self._seconds), connect=min(2.0, left))
            yield (gateway, f"{gateway}/v1/endpoints/{path_segment(model)}", self._asking, timeout)

    def listing_key(self, model: str) -> str:
        """Where ``model``'s endpoint list is kept in the cache: under the query that asked
        for it, as the list is this caller's (filtered by its residency, ranked from its
        position), and a cache shared with a client of another caller must not give it
        theirs: one of another residency would call a replica its own forbids."""
        query = urllib.parse.urlencode(self._asking)
        return f"{model}?{query}" if query else model

    def _endpoints_answer(self, model: str, resp: httpx.Response | None) -> list[dict[str, Any]]:
        try:
            body = clientchat.read_json(resp.content) if resp is not None and resp.status_code == 200 else None
        except ValueError:  # not JSON: no list from there (the gateway still decides)
            body = None
        if isinstance(body, Mapping):
            self.cache.store(self.listing_key(model), body)
        elif self.cache.order(self.listing_key(model)):
            self.cache.keep(self.listing_key(model))
        else:
            self.cache.invalidate(self.listing_key(model))
        return self.cache.order(self.listing_key(model))

    def _attempts(self, model: str, endpoints: list[dict[str, Any]], headers: dict[str, str]) -> Iterator[Attempt]:
        """The replicas nearest first, then the gateways; made as they are needed (the
        first one nearly always answers)."""
        for e in endpoints:  # the token only to an agent that checks it (--serve-auth token)
            yield Attempt(clientattempt.url(e["inferUrl"]), clientattempt.replica_headers(headers, self._auth, e), e["url"], e["site"])
        through = {**headers, **self._auth, **args.caller_headers(self.location, self.region, self.residency)}
        gateways = self._gateways()
        for i, gateway in enumerate(gateways):
            yield Attempt(clientattempt.url(f"{gateway}/v2/models/{path_segment(model)}/infer"), through, gateway=gateway, last=i == len(gateways) - 1)

    def _chat_attempts(self, model: str, endpoints: list[dict[str, Any]], request_id: str) -> Iterator[Attempt]:
        """Generative replicas nearest first, then the gateways' OpenAI routes."""
        headers = {"content-type": "application/json", correlation.HEADER: request_id}
        for e in endpoints:
            if e.get("api") == "openai":
                yield Attempt(clientattempt.url(f"{e['url']}/v1/chat/completions"), clientattempt.replica_headers(headers, self._auth, e),
                              e["url"], e["site"])
        through = {**headers, **self._auth, **args.caller_headers(self.location, self.region, self.residency)}
        gateways = self._gateways()
        for i, gateway in enumerate(gateways):
            yield Attempt(clientattempt.url(f"{gateway}/openai/v1/chat/completions"), through, gateway=gateway, last=i == len(gateways) - 1)

    def _gateway_failed(self, attempt: Attempt, resp: httpx.Response | None) -> bool:
        """Whether a gateway's failure sends the request to the next gateway: a connection
        error (the gateway is then tried last for a while) or a 5xx, unless it is the last."""
        if resp is None:
            self.cache.eject(attempt.gateway)
        return not attempt.last and (resp is None or resp.status_code >= 500)

    def chat(self, model: str, messages: Sequence[Mapping[str, str]], *, stream: bool = True, request_id: str | None = None,
             **params: Any) -> Chat:
        """The answer's text deltas as they arrive (one delta with ``stream=False``);
        ``params`` go into the request body (``max_tokens``, ``temperature``, ``stop``, ...;
        ``n`` other than 1 is a ``ValueError``: the answer is one choice); ``request_id``: its
        ``X-Request-Id`` (one is made when None), ``chat.request_id`` and its errors'. The endpoint
        list's lookup and the replicas and gateways tried share the client's ``timeout``;
        :class:`TimedOut` when no answer came within it. A streamed answer that has begun
        may go on past it, each of its pieces within the time that was left when its
        attempt began."""
        args.model_name(model)
        args.check_messages(messages)
        clientchat.check_one_choice(params)
        chat = Chat(None, request_id=args.request_id(request_id))
        # Client: an iterator; AsyncClient: an async one. It refers to the chat weakly: the chat
        # refers to it, and a cycle would keep an answer the caller dropped streaming until
        # the next cycle collection. (Only the closing of a dropped chat runs without it.)
        chat._deltas = self._chat(weakref.proxy(chat), model, messages, stream, params)
        return chat

    def _chat(self, chat: Chat, model: str, messages: Sequence[Mapping[str, str]], stream: bool,
              params: Mapping[str, Any]) -> Iterator[str] | AsyncIterator[str]:
        """The deltas as the client's transport reads them: each client gives its own."""
        raise NotImplementedError

    def _chat_started(self, chat: Chat, model: str, messages: Sequence[Mapping[str, str]], stream: bool,
                      params: Mapping[str, Any]) -> bytes:
        """The request's body, once the chat's clock and its one deadline are started."""
        body = self._chat_body(model, messages, stream, params)
        chat._started = time.perf_counter()
        chat._deadline = chat._started + self._seconds
        return body

    def _chat_body(self, model: str, messages: Sequence[Mapping[str, str]], stream: bool, params: Mapping[str, Any]) -> bytes:
        body = {"model": model, "messages": [dict(m) for m in messages], "stream": stream, **params}
        if stream:
            body["stream_options"] = {"include_usage": True}
        try:
            return json.dumps(body, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise TypeError(f"the messages and chat parameters must be JSON values: {exc}") from None

    def _chat_begins(self, chat: Chat, number: int) -> dict[str, float]:
        """Attempt ``number`` begins, with nothing of one that failed before its first token
        (its finish, its usage); its timeouts are the client's cut to what is left of the
        chat's, so that the attempts share one timeout. ``TimedOut`` when nothing is left."""
        left = chat._deadline - time.perf_counter()
        if left <= 0:
            raise TimedOut(self._seconds, chat.attempts)
        chat.attempts, chat.finish_reason, chat.usage, chat._ended = number, None, None, False
        return {"connect": min(2.0, left), "read": left, "write": left, "pool": left}

    def _chat_refused(self, chat: Chat, model: str, attempt: Attempt, resp: httpx.Response | None,
                      error: Exception | None) -> bool:
        """Whether to try the next attempt (True); raises for a refusal or when the gateway failed."""
        if attempt.endpoint is not None:
            if resp is None or resp.status_code >= 500 or clientattempt.refused_untokened(attempt, resp):
                self.cache.eject(attempt.endpoint)
                return True
            if resp.status_code == 404:  # moved away since the list was read: the next one may serve it
                self.cache.invalidate(self.listing_key(model))
                return True
            if resp.status_code >= 400:
                raise clientchat.read_refusal(resp)
            return False
        self.cache.invalidate(self.listing_key(model))
        if self._gateway_failed(attempt, resp):
            return True
        if resp is None:
            if isinstance(error, httpx.TimeoutException) and not (isinstance(error, httpx.ConnectTimeout)
                                                                  and time.perf_counter() < chat._deadline):
                raise TimedOut(self._seconds, chat.attempts) from error  # nothing listening there is Unreachable
            raise Unreachable(error) from error
        if resp.status_code >= 400:
            raise clientattempt.gateway_refusal(resp)
        return False

    def _chat_request(self, attempt: Attempt, body: bytes, timeouts: dict[str, float]) -> httpx.Request:
        return httpx.Request("POST", attempt.url, content=body, headers=attempt.headers, extensions={"timeout": timeouts})

    def _chat_answering(self, chat: Chat, attempt: Attempt, resp: httpx.Response) -> None:
        chat.site, chat.url = resp.headers.get("x-edgeplane-site", attempt.site or ""), attempt.endpoint or attempt.gateway

    def _chat_failed(self, chat: Chat, attempt: Attempt, exc: Exception) -> None:
        """After a failed answer: a cut once text has arrived, an error from the gateway,
        else the replica is ejected and the next attempt follows."""
        if chat.text:
            raise clientchat.cut(chat, exc) from None
        if attempt.endpoint is None:
            if not attempt.last:
                return  # the next gateway
            if isinstance(exc, BadAnswer):
                raise exc
            if isinstance(exc, httpx.TimeoutException):
                raise TimedOut(self._seconds, chat.attempts) from None
            raise EdgeplaneError(f"the gateway's answer failed: {exc}") from None
        self.cache.eject(attempt.endpoint)

    def _outcome(self, model: str, attempt: Attempt, number: int, resp: httpx.Response | None,
                 error: Exception | None) -> InferResult | None:
        """The result, None to try the next attempt, or an exception for a refusal."""
        if attempt.endpoint is not None:  # a replica, directly
            if resp is None or resp.status_code >= 500 or clientattempt.refused_untokened(attempt, resp):
                self.cache.eject(attempt.endpoint)
                return None
            if resp.status_code == 404:  # moved away since the list was read: the next one (or the gateway) may serve it
                self.cache.invalidate(self.listing_key(model))
                return None
            if resp.status_code >= 400:
                raise clientchat.read_refusal(resp)
            outputs = clientattempt.decode(resp)
            if isinstance(outputs, str):  # not a v2 answer: a broken replica, like a 5xx
                self.cache.eject(attempt.endpoint)
                return None
            return InferResult(outputs, attempt.site or "", attempt.endpoint, number, attempt.headers[correlation.HEADER])
        # Every direct endpoint failed or none is known: the gateway decided and failed over.
        self.cache.invalidate(self.listing_key(model))
        if self._gateway_failed(attempt, resp):
            return None
        if isinstance(error, BadAnswer):  # an answer past max_answer_bytes
            raise error
        if resp is None:
            raise Unreachable(error) from error
        if resp.status_code >= 400:
            raise clientattempt.gateway_refusal(resp)
        outputs = clientattempt.decode(resp)
        if isinstance(outputs, str):
            if not attempt.last:
                return None
            raise BadAnswer(f"{attempt.gateway} answered {outputs[:300]}; is it an edgeplane gateway?")
        return InferResult(outputs, resp.headers.get("x-edgeplane-site", ""), attempt.gateway, number, attempt.headers[correlation.HEADER])


class Client(_Base):
    """Synchronous client; use as a context manager or call :meth:`close`."""

    def __init__(self, server: str | Sequence[str], *, timeout: float = 30.0, transport: httpx.BaseTransport | None = None,
                 **kwargs: Any):
        super().__init__(server, timeout=timeout, own_pool=transport is None, **kwargs)
        try:
            # the environment's proxies as proxyenv reads them (NO_PROXY=10.0.0.0/8 included);
            # a transport given is used as it is, as httpx does
            self._http = httpx.Client(timeout=self._timeout, transport=transport or proxyenv.transport(self._pool.limits()), trust_env=False)
        except proxyenv.UNUSABLE as exc:  # a proxy from the environment httpx cannot use, found as it is mounted
            raise ValueError(proxyenv.explain(exc)) from None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def endpoints(self, model: str, refresh: bool = False) -> list[dict[str, Any]]:
        """The model's replicas nearest first (cached for the list's TTL); [] with ``direct=False``."""
        return self._endpoints(model, refresh, None)

    def _endpoints(self, model: str, refresh: bool, deadline: float | None) -> list[dict[str, Any]]:
        args.model_name(model)
        if not self.direct:
            return []
        if not refresh and self.cache.fresh(self.listing_key(model)):
            return self.cache.order(self.listing_key(model))
        resp = None
        for gateway, url, params, timeout in self._endpoints_requests(model, deadline):
            try:
                resp = self._read(self._http.build_request("GET", url, params=params, headers=self._auth, timeout=timeout))
                break
            except (httpx.HTTPError, BadAnswer):
                self.cache.eject(gateway)
        return self._endpoints_answer(model, resp)

    def _post(self, attempt: Attempt, body: bytes) -> httpx.Response:
        return self._read(self._request(attempt, body))

    def _read(self, request: httpx.Request) -> httpx.Response:
        """The answer to ``request``, read whole within ``max_answer_bytes``."""
        resp = self._pool.send(self._http, request)
        try:
            return clientbody.read(resp, self.max_answer_bytes)
        finally:
            resp.close()

    def infer(self, model: str, inputs: Mapping[str, Any] | Sequence[oip.Tensor], *, request_id: str | None = None) -> InferResult:
        """``inputs``' outputs from the nearest replica that answers; ``request_id``: the call's
        ``X-Request-Id`` (one is made when None), on its result and on any error it raises.
        A value that is not a numpy array goes in its input's datatype (:mod:`orchestrator.clientdatatypes`)."""
        args.model_name(model)
        rid = args.request_id(request_id)
        if not clientdatatypes.plain(inputs):
            return self._infer(model, inputs, rid)
        args.tensors(inputs)  # what cannot be a tensor is refused before the model's metadata is read
        held = self._datatypes(model, rid, False)
        try:
            return self._infer(model, clientdatatypes.typed(inputs, held), rid)
        except InferenceError as exc:
            if not clientdatatypes.refused_datatype(exc) or (fresh := self._datatypes(model, rid, True)) == held:
                raise
        return self._infer(model, clientdatatypes.typed(inputs, fresh), rid)

    def _datatypes(self, model: str, rid: str, refresh: bool) -> dict[str, str]:
        """The datatypes of ``model``'s inputs, kept or read (one read for the threads that
        ask meanwhile; ``refresh``: this call's own); {} when none could be read."""
        def read() -> dict[str, str] | None:
            with clientattempt.named({correlation.HEADER: rid}):  # PoolFull
                attempts = self._attempts(model, self.endpoints(model), {correlation.HEADER: rid})
                return clientdatatypes.read(self._read, attempts, self._timeout, self.cache.eject)

        if not refresh:
            return self.datatypes.shared(model, read) or {}
        if (found := read()) is not None:
            self.datatypes.store(model, found)
        return found or {}

    def _infer(self, model: str, inputs: Mapping[str, Any] | Sequence[oip.Tensor], rid: str) -> InferResult:
        body, headers = self._body(inputs, rid)
        with clientattempt.named(headers):
            for number, attempt in enumerate(self._attempts(model, self.endpoints(model), headers), start=1):
                resp, error = None, None
                try:
                    resp = self._post(attempt, body)
                except (httpx.HTTPError, BadAnswer) as exc:
                    error = exc
                result = self._outcome(model, attempt, number, resp, error)
                if result is not None:
                    return result
            raise EdgeplaneError("no attempt left")  # the gateway attempt always answers or raises

    def _chat(self, chat: Chat, model: str, messages: Sequence[Mapping[str, str]], stream: bool, params: Mapping[str, Any]) -> Iterator[str]:
        body = self._chat_started(chat, model, messages, stream, params)
        for number, attempt in enumerate(self._chat_attempts(model, self._endpoints(model, False, chat._deadline), chat.request_id), start=1):
            request = self._chat_request(attempt, body, self._chat_begins(chat, number))
            try:
                resp = self._pool.send(self._http, request)
            except httpx.HTTPError as exc:
                self._chat_refused(chat, model, attempt, None, exc)
                continue
            try:
                if resp.status_code >= 400:
                    if self._chat_refused(chat, model, attempt, clientbody.read(resp, self.max_answer_bytes), None):
                        continue
                self._chat_answering(chat, attempt, resp)
                if not stream:
                    yield clientchat.read_whole(chat, clientbody.read(resp, self.max_answer_bytes))
                    return
                for line in clientchat.lines_of(resp.iter_bytes()):
                    text = clientchat.line_text(chat, attempt.site, line, self._seconds)
                    if text:
                        yield text
                clientchat.check_ended(chat)
                return
            except (clientchat.Retry, BadAnswer, httpx.HTTPError) as exc:
                self._chat_failed(chat, attempt, exc)
            finally:
                resp.close()


class AsyncClient(_Base):
    """Asynchronous client with the same behaviour as :class:`Client`.

    One client may serve several event loops, one after another (``asyncio.run`` once per
    call: a script, a synchronous wrapper, a notebook cell run again) or side by side in
    threads: each loop gets its own connections, as a connection belongs to the loop that
    opened it (one kept from a loop that has ended raised ``RuntimeError('Event loop is
    closed')`` in the next). Those of an ended loop are let go when another loop begins;
    :meth:`aclose` closes those of the loop it runs in and ends the client: a call after it
    raises ``RuntimeError``. A ``transport`` given is the caller's: every loop sends through
    it (give one only to a client used in one loop), and the client does not close it."""

    def __init__(self, server: str | Sequence[str], *, timeout: float = 30.0, transport: httpx.AsyncBaseTransport | None = None,
                 **kwargs: Any):
        super().__init__(server, timeout=timeout, own_pool=transport is None, **kwargs)
        self._loops = LoopClients(self._timeout, transport, self._pool.limits())

    @property
    def _http(self) -> httpx.AsyncClient:
        """The HTTP client of the running event loop."""
        return self._loops.current()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._loops.aclose()

    async def endpoints(self, model: str, refresh: bool = False) -> list[dict[str, Any]]:
        """The model's replicas nearest first (cached for the list's TTL); [] with ``direct=False``."""
        return await self._endpoints(model, refresh, None)

    async def _endpoints(self, model: str, refresh: bool, deadline: float | None) -> list[dict[str, Any]]:
        args.model_name(model)
        if not self.direct:
            return []
        if not refresh and self.cache.fresh(self.listing_key(model)):
            return self.cache.order(self.listing_key(model))
        resp = None
        for gateway, url, params, timeout in self._endpoints_requests(model, deadline):
            try:
                resp = await self._read(self._http.build_request("GET", url, params=params, headers=self._auth, timeout=timeout))
                break
            except (httpx.HTTPError, BadAnswer):
                self.cache.eject(gateway)
        return self._endpoints_answer(model, resp)

    async def _post(self, attempt: Attempt, body: bytes) -> httpx.Response:
        return await self._read(self._request(attempt, body))

    async def _read(self, request: httpx.Request) -> httpx.Response:
        """The answer to ``request``, read whole within ``max_answer_bytes``."""
        resp = await self._pool.asend(self._http, request)
        try:
            return await clientbody.aread(resp, self.max_answer_bytes)
        finally:
            await resp.aclose()

    async def infer(self, model: str, inputs: Mapping[str, Any] | Sequence[oip.Tensor], *, request_id: str | None = None) -> InferResult:
        """As :meth:`Client.infer`."""
        args.model_name(model)
        rid = args.request_id(request_id)
        if not clientdatatypes.plain(inputs):
            return await self._infer(model, inputs, rid)
        args.tensors(inputs)
        held = await self._datatypes(model, rid, False)
        try:
            return await self._infer(model, clientdatatypes.typed(inputs, held), rid)
        except InferenceError as exc:
            if not clientdatatypes.refused_datatype(exc) or (fresh := await self._datatypes(model, rid, True)) == held:
                raise
        return await self._infer(model, clientdatatypes.typed(inputs, fresh), rid)

    async def _datatypes(self, model: str, rid: str, refresh: bool) -> dict[str, str]:
        async def read() -> dict[str, str] | None:
            with clientattempt.named({correlation.HEADER: rid}):  # PoolFull
                attempts = self._attempts(model, await self.endpoints(model), {correlation.HEADER: rid})
                return await clientdatatypes.aread(self._read, attempts, self._timeout, self.cache.eject)

        if not refresh:
            return await self.datatypes.ashared(model, read) or {}
        if (found := await read()) is not None:
            self.datatypes.store(model, found)
        return found or {}

    async def _infer(self, model: str, inputs: Mapping[str, Any] | Sequence[oip.Tensor], rid: str) -> InferResult:
        body, headers = self._body(inputs, rid)
        with clientattempt.named(headers):
            for number, attempt in enumerate(self._attempts(model, await self.endpoints(model), headers), start=1):
                resp, error = None, None
                try:
                    resp = await self._post(attempt, body)
                except (httpx.HTTPError, BadAnswer) as exc:
                    error = exc
                result = self._outcome(model, attempt, number, resp, error)
                if result is not None:
                    return result
            raise EdgeplaneError("no attempt left")

    async def _chat(self, chat: Chat, model: str, messages: Sequence[Mapping[str, str]], stream: bool, params: Mapping[str, Any]) -> AsyncIterator[str]:
        body = self._chat_started(chat, model, messages, stream, params)
        for number, attempt in enumerate(self._chat_attempts(model, await self._endpoints(model, False, chat._deadline), chat.request_id), start=1):
            request = self._chat_request(attempt, body, self._chat_begins(chat, number))
            try:
                resp = await self._pool.asend(self._http, request)
            except httpx.HTTPError as exc:
                self._chat_refused(chat, model, attempt, None, exc)
                continue
            try:
                if resp.status_code >= 400:
                    if self._chat_refused(chat, model, attempt, await clientbody.aread(resp, self.max_answer_bytes), None):
                        continue
                self._chat_answering(chat, attempt, resp)
                if not stream:
                    yield clientchat.read_whole(chat, await clientbody.aread(resp, self.max_answer_bytes))
                    return
                async for line in clientchat.alines_of(resp.aiter_bytes()):
                    text = clientchat.line_text(chat, attempt.site, line, self._seconds)
                    if text:
                        yield text
                clientchat.check_ended(chat)
                return
            except (clientchat.Retry, BadAnswer, httpx.HTTPError) as exc:
                self._chat_failed(chat, attempt, exc)
            finally:
                await resp.aclose()

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
Its attempts share the client's ``timeout``: each has what the ones before left, and an
answer that has not come by then raises :class:`TimedOut` (the whole timeout for each
attempt in turn would multiply the wait by the replicas tried). ``infer`` gives each
attempt the whole timeout: a hung replica costs it once and the next one answers, as a v2
inference is short and idempotent.

Tensors travel with the v2 binary extension by default (every edgeplane endpoint, agent,
Ray replica and gateway, speaks it): 256 floats cost about 5 µs to send as bytes and
140 µs as JSON. Pass ``binary=False`` for a server that only takes JSON.

:class:`AsyncClient` is the same over ``httpx.AsyncClient``.

Several gateways: ``Client(["http://gw1:8088", "http://gw2:8088"])`` (standalone
``edgeplane gateway`` processes, or control planes). The endpoint list is asked of the
first URL that answers; a request that no replica answered directly goes to the gateways
in order, and a connection error or a 5xx from one moves it to the next (inference is
idempotent; a chat moves on only before its first token). A gateway that could not be
reached is tried last for ``ejection_s`` seconds; when none gives a new endpoint list
past its TTL, the list held is used and asked for again after ``ejection_s``.
``direct=False`` sends every request through the gateways (replicas the callers cannot
reach, or one place to meter).

Errors: arguments that cannot work (a server URL without ``http://``, a location outside
-90..90/-180..180, a region that cannot travel in an HTTP header, a tensor of a dtype the
v2 protocol has no name for, a chat's ``n`` other than 1, a proxy in the environment that
httpx cannot use, such as ``ALL_PROXY=socks5://...`` without socksio) raise ``ValueError``
(``TypeError`` for a wrong type) before anything is sent. Everything that happens on the
way raises an :class:`EdgeplaneError`, never an ``httpx`` exception: :class:`NoEndpoint`,
:class:`Unreachable` (timeouts included; a chat's is a :class:`TimedOut`),
:class:`InferenceError`, :class:`StreamCut`, :class:`BadAnswer`.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from edgeplane_proto import oip
from orchestrator import clientargs as args
from orchestrator import proxyenv, urlpath
from orchestrator.urlpath import path_segment


class EdgeplaneError(Exception):
    """Base of the client's errors."""


class NoEndpoint(EdgeplaneError):
    """The control plane knows no allowed, healthy replica for the model."""


class Unreachable(EdgeplaneError):
    """Nothing answered: no replica the client tried, and not the gateway (connection
    refused, timed out): the address may be wrong or the control plane down."""

    def __init__(self, error: Exception | None):
        super().__init__(f"neither a replica nor the gateway answered: {error}")


class TimedOut(Unreachable):
    """A chat's answer did not come within the client's timeout: the replicas and gateways
    it tried took it all between them (an :class:`Unreachable`, as timeouts always were)."""

    def __init__(self, seconds: float, attempts: int):
        EdgeplaneError.__init__(self, f"no answer within the timeout ({seconds:g} s; attempts: {attempts})")


class InferenceError(EdgeplaneError):
    """A replica refused the request (4xx): retrying elsewhere would not help. ``code`` is
    the OpenAI API's error code when the refusal gave one (``context_length_exceeded``)."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.code = code


class StreamCut(EdgeplaneError):
    """A generation failed after part of its text was delivered."""


class BadAnswer(EdgeplaneError):
    """The gateway answered with something that is not what the protocol says (not a v2
    inference response, not OpenAI JSON or events): the URL may lead to another service."""


@dataclass
class Chat:
    """One answer: iterate it for the text deltas; ``site``, ``ttft_s`` (seconds from the
    first attempt to the first token, failed attempts included), ``usage`` and
    ``finish_reason`` (of the attempt that answers) are filled in as it arrives."""

    _deltas: Any
    site: str = ""
    url: str = ""
    ttft_s: float | None = None
    usage: dict[str, int] | None = None
    finish_reason: str | None = None
    attempts: int = 0
    text: str = ""
    _ended: bool = field(default=False, repr=False)  # the stream's [DONE] arrived
    _started: float = field(default=0.0, repr=False)  # time.perf_counter() when the first attempt began
    _deadline: float = field(default=math.inf, repr=False)  # and when its timeout ends

    def __iter__(self) -> Iterator[str]:
        return iter(self._deltas)

    def __aiter__(self) -> AsyncIterator[str]:
        return self._deltas.__aiter__()


@dataclass(frozen=True)
class _Event:
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    error: str | None = None
    done: bool = False


def _chat_event(line: str) -> _Event | None:
    """One SSE line of a chat stream; None for lines that carry nothing (comments, blanks)."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return _Event(done=True)
    try:
        obj = json.loads(data)
    except ValueError:
        return _Event(error=f"an event that is not JSON: {data[:100]!r}")
    if not isinstance(obj, dict):
        return _Event(error=f"an event that is not a JSON object: {data[:100]!r}")
    if "error" in obj:
        err = obj["error"]
        return _Event(error=str(err.get("message", err) if isinstance(err, dict) else err))
    choices = obj.get("choices")
    # the first choice only: an engine that sends several interleaves their events
    choice = next((c for c in choices if isinstance(c, dict) and c.get("index", 0) == 0), {}) if isinstance(choices, list) else {}
    delta = choice.get("delta") or choice.get("message") or {}
    text = delta.get("content") if isinstance(delta, dict) else None
    usage = obj.get("usage")
    finish = choice.get("finish_reason")
    return _Event(text if isinstance(text, str) else "", finish if isinstance(finish, str) else None,
                  usage if isinstance(usage, dict) else None)


def _check_one_choice(params: Mapping[str, Any]) -> None:
    """A chat yields one answer: ``n`` other than 1 would have the engine generate answers
    that no one reads (edgeplane's replicas refuse it)."""
    n = params.get("n", 1)
    if n is not None and (type(n) is not int or n != 1):
        raise ValueError(f"n={n!r}: a chat yields one answer; ask again for another")


def _cut(chat: Chat, why: object) -> StreamCut:
    """An answer that failed after part of its text was delivered (named by its site, or
    the URL that answered when no site was given)."""
    return StreamCut(f"the answer from {chat.site or chat.url or 'the replica'} was cut after "
                     f"{len(chat.text)} characters: {why}")


def _openai_refusal(resp: httpx.Response) -> InferenceError:
    code = None
    try:
        err = resp.json().get("error", resp.text)
        message = err.get("message", err) if isinstance(err, dict) else err
        code = err.get("code") if isinstance(err, dict) and isinstance(err.get("code"), str) else None
    except (ValueError, AttributeError):  # not JSON, or JSON that is not an object
        message = resp.text or resp.reason_phrase
    return InferenceError(resp.status_code, str(message)[:500], code)


@dataclass(frozen=True)
class InferResult:
    outputs: Mapping[str, np.ndarray]
    site: str
    url: str
    attempts: int

    def __getitem__(self, name: str) -> np.ndarray:
        return self.outputs[name]


@dataclass
class _Endpoints:
    items: list[dict[str, Any]]
    fresh_until: float  # no need to ask again before (the list's TTL, or a backoff)


@dataclass
class EndpointCache:
    """The sans-I/O part shared by both clients: which URLs to try, in which order."""

    clock: Callable[[], float] = time.monotonic
    ejection_s: float = 10.0
    _lists: dict[str, _Endpoints] = field(default_factory=dict)
    _ejected: dict[str, float] = field(default_factory=dict)

    def fresh(self, model: str) -> bool:
        entry = self._lists.get(model)
        return entry is not None and self.clock() < entry.fresh_until

    def store(self, model: str, body: Any) -> None:
        """Keep the list of an endpoint answer; entries a client cannot call (no URL, a URL
        that does not parse) are left out, and a list that is not one counts as empty."""
        body = body if isinstance(body, Mapping) else {}
        items = body.get("endpoints")
        ttl = body.get("ttlSeconds", 10)
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 <= ttl < math.inf:
            ttl = 10
        usable = [e for e in items if _callable_endpoint(e)] if isinstance(items, list) else []
        self._lists[model] = _Endpoints(usable, self.clock() + ttl)

    def keep(self, model: str) -> None:
        """No new list came (no gateway answered with one): serve the one held for
        ``ejection_s`` more before asking again, as long as an unreachable gateway is
        tried last; asking on every request would cost each one a connection attempt
        (the connect timeout, for a gateway that drops them) though its replica answers."""
        entry = self._lists.get(model)
        if entry is not None:
            entry.fresh_until = self.clock() + self.ejection_s

    def invalidate(self, model: str) -> None:
        self._lists.pop(model, None)

    def order(self, model: str) -> list[dict[str, Any]]:
        now = self.clock()
        entry = self._lists.get(model)
        if entry is None:
            return []
        return [e for e in entry.items if self._ejected.get(e["url"], 0) <= now]

    def eject(self, url: str) -> None:
        self._ejected[url] = self.clock() + self.ejection_s


def _callable_endpoint(e: Any) -> bool:
    """Whether an entry of an endpoint list has what a call needs: a site, a base URL and,
    for a v2 replica, its inference URL, each an http(s) URL."""
    if not isinstance(e, Mapping) or not isinstance(e.get("site"), str):
        return False
    urls = [e.get("url")] + ([] if e.get("api") == "openai" else [e.get("inferUrl")])
    return all(isinstance(u, str) and urlpath.base_url_problem(u) is None for u in urls)


def _decode(resp: httpx.Response) -> Mapping[str, np.ndarray] | str:
    """The outputs of a v2 response, or why the body is not one (a proxy's page, another
    service at that URL)."""
    header = resp.headers.get(oip.BINARY_HEADER)
    try:
        decoded = oip.decode_response(resp.content, int(header) if header else None)
    except ValueError as exc:  # oip.ProtocolError, or a header that is not a number
        return f"HTTP {resp.status_code} ({resp.headers.get('content-type', 'no content type')}) with no v2 inference response: {exc}"
    return {t.name: t.array for t in decoded.outputs}


def _refusal(resp: httpx.Response) -> InferenceError:
    try:
        message = resp.json().get("error", resp.text)
    except (ValueError, AttributeError):  # not JSON, or JSON that is not an object
        message = resp.text or resp.reason_phrase
    return InferenceError(resp.status_code, str(message)[:500])


@functools.lru_cache(maxsize=1024)
def _url(url: str) -> httpx.URL:
    """Parsed once per replica URL: httpx's parser takes half of building a request."""
    return httpx.URL(url)


@dataclass(frozen=True)
class _Attempt:
    url: httpx.URL
    headers: dict[str, str]
    endpoint: str | None = None  # base URL of a replica; None for a gateway
    site: str | None = None
    gateway: str = ""  # base URL of the gateway (attempts through one)
    last: bool = True  # the last gateway: its answer is the caller's, whatever it is


class _Base:
    def __init__(self, server: str | Sequence[str], *, timeout: float = 30.0, token: str | None = None,
                 location: tuple[float, float] | None = None, region: str | None = None, residency: str | None = None,
                 binary: bool = True, cache: EndpointCache | None = None, direct: bool = True):
        self.servers = args.servers(server)
        self.server = self.servers[0]
        self.direct = direct
        self.location = args.position(location)
        self.region, self.residency = args.header_value(region, "region"), args.header_value(residency, "residency")
        self.binary = binary
        self.cache = cache or EndpointCache()
        if token is not None and (not isinstance(token, str) or not all("!" <= c <= "~" for c in token)):
            raise ValueError("token: a token is visible ASCII only (no spaces, control or non-ASCII characters)")
        self._auth = {"authorization": f"Bearer {token}"} if token else {}
        self._seconds = args.seconds(timeout)
        self._timeout = httpx.Timeout(self._seconds, connect=min(2.0, self._seconds))

    def _body(self, inputs: Mapping[str, Any] | Sequence[oip.Tensor]) -> tuple[bytes, dict[str, str]]:
        body, header_len = oip.encode_request(args.tensors(inputs), binary=self.binary)
        headers = {"content-type": "application/octet-stream" if header_len is not None else "application/json"}
        if header_len is not None:
            headers[oip.BINARY_HEADER] = str(header_len)
        return body, headers

    def _request(self, attempt: _Attempt, body: bytes) -> httpx.Request:
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
        now = self.cache.clock()
        return sorted(self.servers, key=lambda u: self.cache._ejected.get(u, 0) > now)

    def _endpoints_requests(self, model: str) -> Iterator[tuple[str, str, dict[str, str]]]:
        """(gateway, URL, parameters) of the endpoint list, one per gateway in order."""
        for gateway in self._gateways():
            yield gateway, f"{gateway}/v1/endpoints/{path_segment(model)}", args.endpoint_params(self.location, self.region, self.residency)

    def _endpoints_answer(self, model: str, resp: httpx.Response | None) -> list[dict[str, Any]]:
        try:
            body = resp.json() if resp is not None and resp.status_code == 200 else None
        except ValueError:  # not JSON: no list from there (the gateway still decides)
            body = None
        if isinstance(body, Mapping):
            self.cache.store(model, body)
        elif self.cache.order(model):
            self.cache.keep(model)
        else:
            self.cache.invalidate(model)
        return self.cache.order(model)

    def _attempts(self, model: str, endpoints: list[dict[str, Any]], headers: dict[str, str]) -> Iterator[_Attempt]:
        """The replicas nearest first, then the gateways; made as they are needed (the
        first one nearly always answers)."""
        for e in endpoints:
            yield _Attempt(_url(e["inferUrl"]), headers, e["url"], e["site"])
        through = {**headers, **self._auth, **args.caller_headers(self.location, self.region, self.residency)}
        gateways = self._gateways()
        for i, gateway in enumerate(gateways):
            yield _Attempt(_url(f"{gateway}/v2/models/{path_segment(model)}/infer"), through, gateway=gateway, last=i == len(gateways) - 1)

    def _chat_attempts(self, model: str, endpoints: list[dict[str, Any]]) -> Iterator[_Attempt]:
        """Generative replicas nearest first, then the gateways' OpenAI routes."""
        for e in endpoints:
            if e.get("api") == "openai":
                yield _Attempt(_url(f"{e['url']}/v1/chat/completions"), {"content-type": "application/json"}, e["url"], e["site"])
        through = {"content-type": "application/json", **self._auth, **args.caller_headers(self.location, self.region, self.residency)}
        gateways = self._gateways()
        for i, gateway in enumerate(gateways):
            yield _Attempt(_url(f"{gateway}/openai/v1/chat/completions"), through, gateway=gateway, last=i == len(gateways) - 1)

    def _gateway_failed(self, attempt: _Attempt, resp: httpx.Response | None) -> bool:
        """Whether a gateway's failure sends the request to the next gateway: a connection
        error (the gateway is then tried last for a while) or a 5xx, unless it is the last."""
        if resp is None:
            self.cache.eject(attempt.gateway)
        return not attempt.last and (resp is None or resp.status_code >= 500)

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

    def _chat_refused(self, chat: Chat, model: str, attempt: _Attempt, resp: httpx.Response | None,
                      error: Exception | None) -> bool:
        """Whether to try the next attempt (True); raises for a refusal or when the gateway failed."""
        if attempt.endpoint is not None:
            if resp is None or resp.status_code >= 500:
                self.cache.eject(attempt.endpoint)
                return True
            if resp.status_code == 404:  # moved away since the list was read: the next one may serve it
                self.cache.invalidate(model)
                return True
            if resp.status_code >= 400:
                raise _openai_refusal(resp)
            return False
        self.cache.invalidate(model)
        if self._gateway_failed(attempt, resp):
            return True
        if resp is None:
            if isinstance(error, httpx.TimeoutException) and not (isinstance(error, httpx.ConnectTimeout)
                                                                  and time.perf_counter() < chat._deadline):
                raise TimedOut(self._seconds, chat.attempts) from error  # nothing listening there is Unreachable
            raise Unreachable(error) from error
        if resp.status_code >= 400:
            refusal = _openai_refusal(resp)
            raise NoEndpoint(refusal.args[0]) if resp.status_code in (404, 503) else refusal
        return False

    def _chat_request(self, attempt: _Attempt, body: bytes, timeouts: dict[str, float]) -> httpx.Request:
        return httpx.Request("POST", attempt.url, content=body, headers=attempt.headers, extensions={"timeout": timeouts})

    def _chat_answering(self, chat: Chat, attempt: _Attempt, resp: httpx.Response) -> None:
        chat.site, chat.url = resp.headers.get("x-edgeplane-site", attempt.site or ""), attempt.endpoint or attempt.gateway

    def _chat_failed(self, chat: Chat, attempt: _Attempt, exc: Exception) -> None:
        """After a failed answer: a cut once text has arrived, an error from the gateway,
        else the replica is ejected and the next attempt follows."""
        if chat.text:
            raise _cut(chat, exc) from None
        if attempt.endpoint is None:
            if not attempt.last:
                return  # the next gateway
            if isinstance(exc, httpx.TimeoutException):
                raise TimedOut(self._seconds, chat.attempts) from None
            raise EdgeplaneError(f"the gateway's answer failed: {exc}") from None
        self.cache.eject(attempt.endpoint)

    def _chat_line(self, chat: Chat, attempt: _Attempt, line: str) -> str | None:
        """The text of one line; raises ``_Retry`` before the first token, ``StreamCut`` after."""
        event = _chat_event(line)
        if event is not None and event.done:
            chat._ended = True
        if event is None or event.done:
            return None
        if event.error is not None:
            if not chat.text:
                raise _Retry(event.error)
            raise _cut(chat, event.error)
        if event.finish_reason:
            chat.finish_reason = event.finish_reason
        if event.usage:
            chat.usage = event.usage
        if event.text and chat.ttft_s is None:
            chat.ttft_s = time.perf_counter() - chat._started
            chat.site = attempt.site or chat.site
        chat.text += event.text
        return event.text or None

    def _outcome(self, model: str, attempt: _Attempt, number: int, resp: httpx.Response | None,
                 error: Exception | None) -> InferResult | None:
        """The result, None to try the next attempt, or an exception for a refusal."""
        if attempt.endpoint is not None:  # a replica, directly
            if resp is None or resp.status_code >= 500:
                self.cache.eject(attempt.endpoint)
                return None
            if resp.status_code == 404:  # moved away since the list was read: the next one (or the gateway) may serve it
                self.cache.invalidate(model)
                return None
            if resp.status_code >= 400:
                raise _refusal(resp)
            outputs = _decode(resp)
            if isinstance(outputs, str):  # not a v2 answer: a broken replica, like a 5xx
                self.cache.eject(attempt.endpoint)
                return None
            return InferResult(outputs, attempt.site or "", attempt.endpoint, number)
        # Every direct endpoint failed or none is known: the gateway decided and failed over.
        self.cache.invalidate(model)
        if self._gateway_failed(attempt, resp):
            return None
        if resp is None:
            raise Unreachable(error) from error
        if resp.status_code in (404, 503):
            raise NoEndpoint(_refusal(resp).args[0])
        if resp.status_code >= 400:
            raise _refusal(resp)
        outputs = _decode(resp)
        if isinstance(outputs, str):
            if not attempt.last:
                return None
            raise BadAnswer(f"{attempt.gateway} answered {outputs[:300]}; is it an edgeplane gateway?")
        return InferResult(outputs, resp.headers.get("x-edgeplane-site", ""), attempt.gateway, number)


class _Retry(Exception):
    """This attempt failed before its first token: the next one may answer."""


def _check_ended(chat: Chat) -> None:
    """A stream ends with ``data: [DONE]`` (every edgeplane replica and gateway, and the
    OpenAI API, send it); one that stops before it was cut (a proxy closed it), or was no
    event stream at all. Raises ``_Retry``; the caller makes it a cut once text arrived."""
    if not chat._ended:
        raise _Retry("the event stream ended before its [DONE]" if chat.text else "the answer is not an event stream ending in [DONE]")


def _whole(chat: Chat, resp: httpx.Response) -> str:
    """The text of a whole (not streamed) answer; ``_Retry`` when the body is not one."""
    try:
        obj = resp.json()
        choice = obj["choices"][0]
        text = choice["message"]["content"] or ""
        if not isinstance(text, str):
            raise TypeError(type(text).__name__)
    except (ValueError, LookupError, TypeError, AttributeError):
        raise _Retry(f"HTTP {resp.status_code} with no chat completion ({resp.headers.get('content-type', 'no content type')})") from None
    chat.ttft_s = time.perf_counter() - chat._started
    chat.text = text
    finish, usage = choice.get("finish_reason"), obj.get("usage")
    chat.finish_reason, chat.usage = finish if isinstance(finish, str) else None, usage if isinstance(usage, dict) else None
    return chat.text


class Client(_Base):
    """Synchronous client; use as a context manager or call :meth:`close`."""

    def __init__(self, server: str | Sequence[str], *, timeout: float = 30.0, transport: httpx.BaseTransport | None = None,
                 **kwargs: Any):
        super().__init__(server, timeout=timeout, **kwargs)
        try:
            self._http = httpx.Client(timeout=self._timeout, transport=transport)
        except (ImportError, ValueError) as exc:  # a proxy from the environment httpx cannot use, found as it is mounted
            raise ValueError(proxyenv.explain(exc)) from None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def endpoints(self, model: str, refresh: bool = False) -> list[dict[str, Any]]:
        """The model's replicas nearest first (cached for the list's TTL); [] with ``direct=False``."""
        args.model_name(model)
        if not self.direct:
            return []
        if not refresh and self.cache.fresh(model):
            return self.cache.order(model)
        resp = None
        for gateway, url, params in self._endpoints_requests(model):
            try:
                resp = self._http.get(url, params=params, headers=self._auth)
                break
            except httpx.HTTPError:
                self.cache.eject(gateway)
        return self._endpoints_answer(model, resp)

    def _post(self, attempt: _Attempt, body: bytes) -> httpx.Response:
        return self._http.send(self._request(attempt, body))

    def infer(self, model: str, inputs: Mapping[str, Any] | Sequence[oip.Tensor]) -> InferResult:
        args.model_name(model)
        body, headers = self._body(inputs)
        for number, attempt in enumerate(self._attempts(model, self.endpoints(model), headers), start=1):
            resp, error = None, None
            try:
                resp = self._post(attempt, body)
            except httpx.HTTPError as exc:
                error = exc
            result = self._outcome(model, attempt, number, resp, error)
            if result is not None:
                return result
        raise EdgeplaneError("no attempt left")  # the gateway attempt always answers or raises

    def chat(self, model: str, messages: Sequence[Mapping[str, str]], *, stream: bool = True, **params: Any) -> Chat:
        """The answer's text deltas as they arrive (one delta with ``stream=False``);
        ``params`` go into the request body (``max_tokens``, ``temperature``, ``stop``, ...;
        ``n`` other than 1 is a ``ValueError``: the answer is one choice). The replicas and
        gateways tried share the client's ``timeout``; :class:`TimedOut` when no answer
        came within it. A streamed answer that has begun may go on past it, each of its
        pieces within the time that was left when its attempt began."""
        args.model_name(model)
        args.check_messages(messages)
        _check_one_choice(params)
        chat = Chat(None)
        chat._deltas = self._chat(chat, model, messages, stream, params)
        return chat

    def _chat(self, chat: Chat, model: str, messages: Sequence[Mapping[str, str]], stream: bool, params: Mapping[str, Any]) -> Iterator[str]:
        body = self._chat_body(model, messages, stream, params)
        chat._started = time.perf_counter()
        chat._deadline = chat._started + self._seconds
        for number, attempt in enumerate(self._chat_attempts(model, self.endpoints(model)), start=1):
            request = self._chat_request(attempt, body, self._chat_begins(chat, number))
            try:
                resp = self._http.send(request, stream=True)
            except httpx.HTTPError as exc:
                self._chat_refused(chat, model, attempt, None, exc)
                continue
            try:
                if resp.status_code >= 400:
                    resp.read()
                    if self._chat_refused(chat, model, attempt, resp, None):
                        continue
                self._chat_answering(chat, attempt, resp)
                if not stream:
                    resp.read()
                    yield _whole(chat, resp)
                    return
                for line in resp.iter_lines():
                    text = self._chat_line(chat, attempt, line)
                    if text:
                        yield text
                _check_ended(chat)
                return
            except (_Retry, httpx.HTTPError) as exc:
                self._chat_failed(chat, attempt, exc)
            finally:
                resp.close()


class AsyncClient(_Base):
    """Asynchronous client with the same behaviour as :class:`Client`."""

    def __init__(self, server: str | Sequence[str], *, timeout: float = 30.0, transport: httpx.AsyncBaseTransport | None = None,
                 **kwargs: Any):
        super().__init__(server, timeout=timeout, **kwargs)
        try:
            self._http = httpx.AsyncClient(timeout=self._timeout, transport=transport)
        except (ImportError, ValueError) as exc:  # a proxy from the environment httpx cannot use, found as it is mounted
            raise ValueError(proxyenv.explain(exc)) from None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def endpoints(self, model: str, refresh: bool = False) -> list[dict[str, Any]]:
        """The model's replicas nearest first (cached for the list's TTL); [] with ``direct=False``."""
        args.model_name(model)
        if not self.direct:
            return []
        if not refresh and self.cache.fresh(model):
            return self.cache.order(model)
        resp = None
        for gateway, url, params in self._endpoints_requests(model):
            try:
                resp = await self._http.get(url, params=params, headers=self._auth)
                break
            except httpx.HTTPError:
                self.cache.eject(gateway)
        return self._endpoints_answer(model, resp)

    async def _post(self, attempt: _Attempt, body: bytes) -> httpx.Response:
        return await self._http.send(self._request(attempt, body))

    async def infer(self, model: str, inputs: Mapping[str, Any] | Sequence[oip.Tensor]) -> InferResult:
        args.model_name(model)
        body, headers = self._body(inputs)
        for number, attempt in enumerate(self._attempts(model, await self.endpoints(model), headers), start=1):
            resp, error = None, None
            try:
                resp = await self._post(attempt, body)
            except httpx.HTTPError as exc:
                error = exc
            result = self._outcome(model, attempt, number, resp, error)
            if result is not None:
                return result
        raise EdgeplaneError("no attempt left")

    def chat(self, model: str, messages: Sequence[Mapping[str, str]], *, stream: bool = True, **params: Any) -> Chat:
        """The answer's text deltas as they arrive (one delta with ``stream=False``);
        ``params`` go into the request body (``max_tokens``, ``temperature``, ``stop``, ...;
        ``n`` other than 1 is a ``ValueError``: the answer is one choice). The replicas and
        gateways tried share the client's ``timeout``; :class:`TimedOut` when no answer
        came within it. A streamed answer that has begun may go on past it, each of its
        pieces within the time that was left when its attempt began."""
        args.model_name(model)
        args.check_messages(messages)
        _check_one_choice(params)
        chat = Chat(None)
        chat._deltas = self._chat(chat, model, messages, stream, params)
        return chat

    async def _chat(self, chat: Chat, model: str, messages: Sequence[Mapping[str, str]], stream: bool, params: Mapping[str, Any]) -> AsyncIterator[str]:
        body = self._chat_body(model, messages, stream, params)
        chat._started = time.perf_counter()
        chat._deadline = chat._started + self._seconds
        for number, attempt in enumerate(self._chat_attempts(model, await self.endpoints(model)), start=1):
            request = self._chat_request(attempt, body, self._chat_begins(chat, number))
            try:
                resp = await self._http.send(request, stream=True)
            except httpx.HTTPError as exc:
                self._chat_refused(chat, model, attempt, None, exc)
                continue
            try:
                if resp.status_code >= 400:
                    await resp.aread()
                    if self._chat_refused(chat, model, attempt, resp, None):
                        continue
                self._chat_answering(chat, attempt, resp)
                if not stream:
                    await resp.aread()
                    yield _whole(chat, resp)
                    return
                async for line in resp.aiter_lines():
                    text = self._chat_line(chat, attempt, line)
                    if text:
                        yield text
                _check_ended(chat)
                return
            except (_Retry, httpx.HTTPError) as exc:
                self._chat_failed(chat, attempt, exc)
            finally:
                await resp.aclose()

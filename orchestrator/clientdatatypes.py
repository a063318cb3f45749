"""The datatypes a model's inputs take, as the Python client (:mod:`orchestrator.client`)
reads and keeps them: a value given as a plain list or Python number goes in its input's.

A list does not say whether ``[[0, 1, 0]]`` is FP32, INT32 or BOOL; sent as numpy reads it
(INT64) it was refused by a model of FP32 input (``input 'input' must be FP32, got
INT64``). So when some value given is not a numpy array, the client reads the model's v2
metadata (``GET /v2/models/{model}``) from the replicas and gateways it would send the
inference to, in the same order, and turns each such value into its input's datatype,
checked first (:mod:`orchestrator.plaintensors`): one the datatype cannot hold is a
``ValueError`` naming the input, and no inference is sent. Numpy arrays go as given, with
no metadata read. What was read is kept for :data:`TTL_S` per model; a refusal that names a
datatype (a rollout changed the model's) has it read again once, and the call sent again
when it changed. Metadata that no one gives leaves the values as numpy reads them.

Calls of a model whose datatypes are not kept share one read: the first reads, and those
that come while it does (threads of a synchronous client, tasks of an asynchronous one on
one event loop) wait for its answer, where each sent its own request (N callers, N reads
of the same metadata). A read that fails (no one gave the metadata, or it raised) is its
caller's alone: nothing of it is kept, and those that waited read again, one for all.

The cache and the decisions are pure; :func:`read` and :func:`aread` send, each over its
client's transport, as :mod:`orchestrator.clientbody` does.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from orchestrator import clientchat, plaintensors
from orchestrator.clientattempt import Attempt
from orchestrator.clienterrors import BadAnswer, InferenceError

#: How long a model's datatypes are kept, in seconds: a rollout that changes them is met
#: by the refusal it brings (read again at once), so this bounds only stale reads.
TTL_S = 30.0

#: How many reads of others a call waits for, each failing, before it reads on its own: a
#: bound, not a policy (each failed read of another is followed by one shared read again).
JOINS = 3

#: What a replica's refusal of a tensor in another datatype than its input's says.
_REFUSED = re.compile(r"must be (BOOL|U?INT(8|16|32|64)|FP(16|32|64)|BF16|BYTES), got ")


@dataclass
class _Read:
    """A read of a model's datatypes under way, which the calls that come meanwhile wait for."""

    done: threading.Event | asyncio.Event
    found: dict[str, str] | None = None  # its answer once ``done``: None, it failed


@dataclass
class DatatypeCache:
    """Each model's input datatypes, by model name, for ``ttl_s`` after they were read, and
    the reads under way (:meth:`shared`, :meth:`ashared`): a cache given to several clients
    shares them too. The reads themselves are the clients' (:func:`read`, :func:`aread`)."""

    clock: Callable[[], float] = time.monotonic
    ttl_s: float = TTL_S
    _held: dict[str, tuple[dict[str, str], float]] = field(default_factory=dict)
    # by model (threads) and by (event loop, model) (tasks: an asyncio.Event is its loop's)
    _reads: dict[Any, _Read] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def get(self, model: str) -> dict[str, str] | None:
        held = self._held.get(model)
        return held[0] if held is not None and self.clock() < held[1] else None

    def store(self, model: str, datatypes: dict[str, str]) -> None:
        self._held[model] = (datatypes, self.clock() + self.ttl_s)

    def shared(self, model: str, read: Callable[[], dict[str, str] | None]) -> dict[str, str] | None:
        """``model``'s datatypes kept, or those one ``read`` finds for every thread that asks
        while it runs; None when this call's own read failed."""
        for _ in range(JOINS):
            joined = self._join(model, lambda: _Read(threading.Event()))
            if isinstance(joined, dict):
                return joined
            under_way, leads = joined
            if leads:
                return self._lead(model, under_way, read)
            under_way.done.wait()
            if under_way.found is not None:
                return under_way.found
        return self._lead(model, _Read(threading.Event()), read, alone=True)

    async def ashared(self, model: str, read: Callable[[], Awaitable[dict[str, str] | None]]) -> dict[str, str] | None:
        """:meth:`shared` for the tasks of one event loop."""
        key = (asyncio.get_running_loop(), model)
        for _ in range(JOINS):
            joined = self._join(model, lambda: _Read(asyncio.Event()), key)
            if isinstance(joined, dict):
                return joined
            under_way, leads = joined
            if leads:
                return await self._alead(model, key, under_way, read)
            await under_way.done.wait()  # a waiter cancelled leaves the read and the others as they are
            if under_way.found is not None:
                return under_way.found
        return await self._alead(model, key, _Read(asyncio.Event()), read, alone=True)

    def _join(self, model: str, new: Callable[[], _Read], key: Any = None) -> dict[str, str] | tuple[_Read, bool]:
        """What is kept of ``model``, else the read under way (``key``'s) and whether this call begins it."""
        key = model if key is None else key
        with self._lock:
            if (held := self.get(model)) is not None:
                return held
            if (under_way := self._reads.get(key)) is not None:
                return under_way, False
            under_way = self._reads[key] = new()
            return under_way, True

    def _lead(self, model: str, under_way: _Read, read: Callable[[], dict[str, str] | None], alone: bool = False) -> dict[str, str] | None:
        found = None
        try:
            found = read()
            return found
        finally:  # raised or not: those waiting are let go
            self._land(model, model, under_way, found, alone)

    async def _alead(self, model: str, key: Any, under_way: _Read, read: Callable[[], Awaitable[dict[str, str] | None]],
                     alone: bool = False) -> dict[str, str] | None:
        found = None
        try:
            found = await read()
            return found
        finally:  # raised or cancelled too: those waiting read again
            self._land(model, key, under_way, found, alone)

    def _land(self, model: str, key: Any, under_way: _Read, found: dict[str, str] | None, alone: bool) -> None:
        with self._lock:
            if found is not None:
                self.store(model, found)
            if not alone:
                del self._reads[key]
            under_way.found = found
        under_way.done.set()


def plain(inputs: Mapping[str, Any] | Any) -> bool:
    """Whether some value of ``inputs`` is not a numpy array (a list, a Python number): only
    then are the model's datatypes read."""
    return isinstance(inputs, Mapping) and not all(isinstance(v, (np.ndarray, np.generic)) for v in inputs.values())


def typed(inputs: Mapping[str, Any], datatypes: Mapping[str, str]) -> Mapping[str, Any]:
    """``inputs`` with each plain value in its input's datatype (:func:`plaintensors.arrays`):
    a ``ValueError`` naming the input for a value the datatype cannot hold."""
    return plaintensors.arrays(inputs, datatypes)


def refused_datatype(exc: InferenceError) -> bool:
    """Whether a refusal is of a tensor's datatype (``input 'x' must be FP32, got INT64``)."""
    return exc.status == 400 and _REFUSED.search(str(exc)) is not None


def metadata_request(attempt: Attempt, timeout: httpx.Timeout) -> httpx.Request | None:
    """``GET /v2/models/{model}`` of the replica or gateway of an inference ``attempt``
    (its URL without ``/infer``, with its headers); None for a URL that is not one."""
    path = attempt.url.path
    if not path.endswith("/infer"):
        return None
    return httpx.Request("GET", attempt.url.copy_with(path=path[: -len("/infer")]), headers=attempt.headers,
                         extensions={"timeout": timeout.as_dict()})


def answer(resp: httpx.Response | None) -> dict[str, str] | None:
    """The datatypes a metadata answer declares; None for a failure or a body that is none."""
    if resp is None or resp.status_code != 200:
        return None
    try:
        return plaintensors.datatypes_of(clientchat.read_json(resp.content))
    except ValueError:
        return None


def read(send: Callable[[httpx.Request], httpx.Response], attempts: Iterable[Attempt], timeout: httpx.Timeout,
         eject: Callable[[str], None]) -> dict[str, str] | None:
    """The model's datatypes from the first of ``attempts`` that gives them; a replica or a
    gateway that could not be reached, or a replica's 5xx, is ``eject``-ed as an inference's."""
    for attempt in attempts:
        request = metadata_request(attempt, timeout)
        if request is None:
            continue
        try:
            resp = send(request)
        except (httpx.HTTPError, BadAnswer):
            resp = None
        found = _outcome(attempt, resp, eject)
        if found is not None:
            return found
    return None


async def aread(send: Callable[[httpx.Request], Awaitable[httpx.Response]], attempts: Iterable[Attempt],
                timeout: httpx.Timeout, eject: Callable[[str], None]) -> dict[str, str] | None:
    """:func:`read` over an asynchronous transport."""
    for attempt in attempts:
        request = metadata_request(attempt, timeout)
        if request is None:
            continue
        try:
            resp = await send(request)
        except (httpx.HTTPError, BadAnswer):
            resp = None
        found = _outcome(attempt, resp, eject)
        if found is not None:
            return found
    return None


def _outcome(attempt: Attempt, resp: httpx.Response | None, eject: Callable[[str], None]) -> dict[str, str] | None:
    if resp is None or (attempt.endpoint is not None and resp.status_code >= 500):
        eject(attempt.endpoint or attempt.gateway)
    return answer(resp)


"""The Python client (``Client`` and ``AsyncClient``) against servers that answer anything: a loopback server plays the
control plane's endpoint list, the replicas it names and the gateway, each answering a
status, headers and body Hypothesis draws (valid v2 answers and chat completions, the same
damaged, other JSON, other bytes, event streams cut anywhere). ``infer`` and ``chat`` must
return a result or raise an ``EdgeplaneError``, whatever came back: never an ``httpx``, a
decoding or a lookup error."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent import httplistener, httpmessages
from edgeplane_proto import oip
from orchestrator import client as client_mod

from .conftest import FUZZ, TRIED, LoopThread
from .test_infer_fuzz import json_values
from .test_response_fuzz import bodies as v2_bodies

Answer = tuple[int, dict[str, str], bytes]
T = TypeVar("T")


class Scripted:
    """Answers each path with the next answer drawn for it (a 503 once they run out)."""

    def __init__(self) -> None:
        self.answers: dict[str, list[Answer]] = {}
        self.loop: LoopThread

    async def __call__(self, request: httpmessages.Request) -> httpmessages.Response:
        queue = self.answers.get(request.path) or [(503, {"content-type": "application/json"}, b'{"error": "no more"}')]
        status, headers, body = queue.pop(0)
        content_type = headers.pop("content-type", "application/json")
        return httpmessages.Response(status, body, content_type=content_type, headers=tuple(headers.items()))


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[Scripted, str]]:
    lt = LoopThread("client-fuzz")
    scripted = Scripted()
    scripted.loop = lt  # AsyncClient runs here too
    http = httplistener.HttpServer(scripted)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))

    async def start() -> None:
        await http.start(sock)

    lt.run(start())
    try:
        yield scripted, f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        lt.run(http.shutdown(2))
        lt.close()


class Calls:
    """``infer`` and a whole ``chat`` through :class:`Client`, or through :class:`AsyncClient`
    on the server's loop; one client for every example (making one builds a TLS context:
    tens of ms), its cache emptied by ``reset``."""

    def __init__(self, made: client_mod.Client | client_mod.AsyncClient, loop: LoopThread) -> None:
        self.made, self.loop = made, loop

    def reset(self, binary: bool = True) -> None:
        self.made.cache, self.made.binary = client_mod.EndpointCache(), binary

    def infer(self) -> client_mod.InferResult:
        inputs = {"x": np.zeros((2, 3), np.float32)}
        if isinstance(self.made, client_mod.Client):
            return self.made.infer("m", inputs)
        return self.loop.run(self.made.infer("m", inputs), 30)

    def chat(self, stream: bool) -> str:
        chat = self.made.chat("m", [{"role": "user", "content": "hi"}], stream=stream)
        if isinstance(self.made, client_mod.Client):
            return "".join(chat)

        async def whole() -> str:
            return "".join([delta async for delta in chat])

        return self.loop.run(whole(), 30)


@pytest.fixture(scope="module", params=["Client", "AsyncClient"])
def client(server: tuple[Scripted, str], request: pytest.FixtureRequest) -> Iterator[Calls]:
    scripted, base = server
    if request.param == "Client":
        with client_mod.Client(base, timeout=5) as made:
            yield Calls(made, scripted.loop)
        return
    made = scripted.loop.run(_async_client(base))
    try:
        yield Calls(made, scripted.loop)
    finally:
        scripted.loop.run(made.aclose())


async def _async_client(base: str) -> client_mod.AsyncClient:
    return client_mod.AsyncClient(base, timeout=5)  # made on the loop that will use it


STATUS = st.sampled_from([200, 200, 200, 201, 400, 404, 409, 429, 500, 502, 503])


@st.composite
def v2_answers(draw: st.DrawFn) -> Answer:
    body, length = draw(v2_bodies())
    headers = {"content-type": draw(st.sampled_from(["application/json", "application/octet-stream", "text/html"]))}
    if length is not None or draw(st.integers(0, 5)) == 0:
        headers[oip.BINARY_HEADER] = str(length) if length is not None and draw(st.integers(0, 3)) else draw(
            st.sampled_from(["", "x", "-1", "99999999999999999999"]))
    return draw(st.one_of(st.just(200), STATUS)), headers, body  # mostly read as an answer


def _completion(text: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}


@st.composite
def chat_answers(draw: st.DrawFn) -> Answer:
    kind = draw(st.integers(0, 3))
    if kind == 0:  # an event stream, maybe cut, maybe damaged
        events = [f"data: {json.dumps({'choices': [{'delta': {'content': draw(st.text(max_size=5))}}]})}\n\n"
                  for _ in range(draw(st.integers(0, 3)))]
        events += [draw(st.sampled_from(["data: [DONE]\n\n", "", "data: {\n\n", "event: error\ndata: {\"error\": 1}\n\n"]))]
        raw = "".join(events).encode()
        return draw(STATUS), {"content-type": "text/event-stream"}, raw[:draw(st.integers(0, len(raw)))]
    if kind == 1:  # a whole completion, its content maybe of another type
        return draw(STATUS), {}, json.dumps(_completion(draw(st.one_of(st.text(max_size=5), json_values)))).encode()
    if kind == 2:  # an error object of any shape
        return draw(STATUS), {}, json.dumps({"error": draw(json_values)}).encode()
    return draw(STATUS), {"content-type": draw(st.sampled_from(["text/event-stream", "application/json"]))}, draw(st.binary(max_size=40))


@st.composite
def endpoint_lists(draw: st.DrawFn, base: str, kind: str) -> Answer:
    """The list the client asks for first: replicas on this server (answering under /r<i>),
    or anything else."""
    if draw(st.integers(0, 4)) == 0:
        return draw(STATUS), {}, json.dumps(draw(json_values)).encode()
    entries = []
    for i in range(draw(st.integers(0, 3))):
        entry: dict[str, Any] = {"site": f"s{i}", "url": f"{base}/r{i}", "inferUrl": f"{base}/r{i}/v2/models/m/infer"}
        if kind == "chat":
            entry["api"] = "openai"
        if draw(st.integers(0, 5)) == 0:
            entry[draw(st.sampled_from(sorted(entry)))] = draw(json_values)
        entries.append(entry)
    return 200, {}, json.dumps({"endpoints": entries, "ttlSeconds": draw(st.one_of(st.just(0), json_values))}).encode()


def script(data: st.DataObject, server: tuple[Scripted, str], kind: str, answers: st.SearchStrategy[Answer], route: str,
           gateway_route: str) -> None:
    """Draw what the endpoint list, three replicas (at ``/r<i><route>``) and the gateway
    answer; the client's cache starts empty, as if nothing was asked before."""
    scripted, base = server
    drawn = st.lists(answers, min_size=1, max_size=2)
    scripted.answers = {"/v1/endpoints/m": [data.draw(endpoint_lists(base, kind))],
                        **{f"/r{i}{route}": data.draw(drawn) for i in range(3)}, gateway_route: data.draw(drawn)}


def answered(call: Callable[[], T]) -> T | None:
    """What ``call`` returns, or None for an ``EdgeplaneError`` (any other exception fails the test)."""
    try:
        return call()
    except client_mod.EdgeplaneError:
        return None


@FUZZ
@given(st.data())
def test_infer_returns_a_result_or_raises_an_edgeplane_error(server: tuple[Scripted, str], client: Calls,
                                                             data: st.DataObject) -> None:
    TRIED[f"client: infer against any answers ({type(client.made).__name__})"] += 1
    script(data, server, "v2", v2_answers(), "/v2/models/m/infer", "/v2/models/m/infer")
    client.reset(binary=data.draw(st.booleans()))
    result = answered(client.infer)
    assert result is None or isinstance(result.outputs, dict)


@FUZZ
@given(st.data())
def test_chat_yields_text_or_raises_an_edgeplane_error(server: tuple[Scripted, str], client: Calls,
                                                       data: st.DataObject) -> None:
    TRIED[f"client: chat against any answers ({type(client.made).__name__})"] += 1
    script(data, server, "chat", chat_answers(), "/v1/chat/completions", "/openai/v1/chat/completions")
    client.reset()
    stream = data.draw(st.booleans())
    text = answered(lambda: client.chat(stream))
    assert text is None or isinstance(text, str)

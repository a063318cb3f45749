"""Bad input to the Python client and to the commands built on it (``infer``, ``chat``,
``cascade tune``, ``distill``, ``captures``), and bad bodies to ``POST /v1/distill``.

The client's promise: arguments that cannot work are a ``ValueError``/``TypeError`` before
anything is sent; whatever happens on the way is an ``EdgeplaneError`` (never an ``httpx``
or ``json`` exception). Answers that are not what the protocol says come from a loopback
HTTP server that plays a broken gateway, replica or proxy; the commands run as the
installed ``edgeplane`` and must end with one line and the documented exit code.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from edgeplane_proto import oip
from orchestrator import client as client_mod
from orchestrator.cli import infer
from orchestrator.testing import loopback

from . import support

X = np.ones((1, 4), dtype=np.float32)
HELLO = [{"role": "user", "content": "hello"}]
DEEP = b"[" * 100_000  # JSON nested past the parser: Python's raises RecursionError, not ValueError


# --- a loopback server that answers each path from a table ------------------------------------


class Canned:
    """Answers ``METHOD path`` (the longest matching path prefix) with a fixed status,
    headers and body, and keeps what it was asked."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], tuple[int, dict[str, str], bytes]] = {}
        self.requests: list[tuple[str, str, bytes]] = []
        canned = self

        class Handler(loopback.CannedHandler):
            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                canned.requests.append((self.command, self.path, body))
                path = self.path.split("?")[0]
                match = max((p for m, p in canned.routes if m == self.command and path.startswith(p)), key=len, default=None)
                status, headers, payload = canned.routes[(self.command, match)] if match is not None else (404, {}, b'{"error": "no route"}')
                self.reply(status, payload, headers)

            do_GET = do_POST = do_DELETE = _answer

        self._serving = contextlib.ExitStack()
        self.url = self._serving.enter_context(loopback.http_server(Handler))

    def on(self, method: str, path: str, status: int, body: Any, **headers: str) -> Canned:
        payload = body if isinstance(body, bytes) else body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.routes[(method, path)] = (status, headers, payload)
        return self

    def close(self) -> None:
        self._serving.close()


@pytest.fixture
def canned() -> Iterator[Canned]:
    server = Canned()
    try:
        yield server
    finally:
        server.close()


def v2_answer(value: float = 2.0) -> bytes:
    body, _ = oip.encode_response(oip.InferResponse("m", (oip.Tensor("output", np.full((1, 4), value, np.float32)),)))
    return body


def endpoint_list(*endpoints: dict[str, Any]) -> dict[str, Any]:
    return {"ttlSeconds": 600, "endpoints": list(endpoints)}


def closed_url() -> str:
    return f"http://127.0.0.1:{support.closed_port()}"


# --- the client: arguments ---------------------------------------------------------------------


@pytest.mark.parametrize("server", ["localhost:8080", "127.0.0.1:8080", "http://gw:8088?x=1", "http://gw:8088#top",
                                    "ftp://gw:8088", "http://[::1", "http://gw:99999", ["http://gw-1:8088", "gw-2:8088"],
                                    "http://gw..example:8088", "http://xn--a.example:8088", f"http://{'a' * 64}.example:8088"])
@pytest.mark.parametrize("cls", [client_mod.Client, client_mod.AsyncClient])
def test_a_server_url_that_cannot_work_is_refused_when_the_client_is_made(cls: type, server: Any) -> None:
    with pytest.raises(ValueError, match=r"server '.*' is not a URL such as http://127\.0\.0\.1:8080 \(.+\)"):
        cls(server)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"location": (200.0, 2.35)}, ValueError, "outside -90..90, -180..180"),
    ({"location": (float("nan"), 2.35)}, ValueError, "outside"),
    ({"location": "48.85,2.35"}, TypeError, r"\(lat, lon\) pair"),
    ({"location": (48.85, 2.35, 0.0)}, TypeError, r"\(lat, lon\) pair"),
    ({"region": "eu\nwest"}, ValueError, "region .*line break"),  # any script goes (encoded), one line of it
    ({"residency": 33}, TypeError, "residency must be a string"),
    ({"residency": "FR\r\nX-Evil: 1"}, ValueError, "residency .*printable ASCII"),
    ({"token": "tök"}, ValueError, "token"),
    ({"token": "a b"}, ValueError, "token"),
    ({"timeout": 0}, ValueError, "timeout 0: give more than 0"),
    ({"timeout": -1}, ValueError, "timeout -1"),
    ({"timeout": float("nan")}, ValueError, "timeout nan"),
    ({"timeout": 1e300}, ValueError, "at most"),
    ({"timeout": "30"}, TypeError, "timeout must be a number"),
    ({"max_answer_bytes": 0}, ValueError, "max_answer_bytes 0: give a whole number of bytes, 1 or more"),
    ({"max_answer_bytes": 1.5}, TypeError, "max_answer_bytes must be a whole number of bytes"),
    ({"max_answer_bytes": True}, TypeError, "max_answer_bytes must be a whole number of bytes"),
    ({"max_connections": 0}, ValueError, "max_connections 0: give a whole number of connections, 1 or more"),
    ({"max_connections": "8"}, TypeError, "max_connections must be a whole number of connections"),
])
@pytest.mark.parametrize("cls", [client_mod.Client, client_mod.AsyncClient])
def test_caller_arguments_that_cannot_travel_are_refused_when_the_client_is_made(cls: type, kwargs: dict[str, Any], error: type,
                                                                                 message: str) -> None:
    with pytest.raises(error, match=message):
        cls("http://127.0.0.1:9", **kwargs)


@pytest.mark.parametrize("inputs, error, message", [
    ({"x": np.ones(2, np.complex64)}, ValueError, "input 'x': numpy dtype complex64 has no v2 datatype"),
    ({"x": np.array(["2024-01-01"], dtype="datetime64[D]")}, ValueError, "input 'x': numpy dtype datetime64"),
    ({"x": np.array([object()])}, ValueError, "input 'x': an object array .* str or bytes"),
    ({"x": {"a": 1}}, ValueError, "input 'x': an object array"),
    ({"x": None}, ValueError, "input 'x': an object array"),
    ({"x": [[1.0, 2.0], [3.0]]}, ValueError, "input 'x': not an array"),
    ({}, ValueError, "at least one input"),
    (5, TypeError, "inputs must be a mapping"),
])
def test_tensors_the_protocol_cannot_carry_are_refused_naming_the_input(inputs: Any, error: type, message: str) -> None:
    with client_mod.Client(closed_url(), timeout=2) as c, pytest.raises(error, match=message):
        c.infer("m", inputs)


def test_bytes_json_cannot_carry_are_refused_before_sending_unless_binary() -> None:
    jpeg = np.array([b"\xff\xd8\xff\xe0\x00\x10JFIF"], dtype=object)
    with client_mod.Client(closed_url(), binary=False, timeout=2) as c, pytest.raises(
            ValueError, match=r"tensor 'image': BYTES element 0 is not UTF-8 .* binary tensor \(binary=True\)"):
        c.infer("m", {"image": jpeg})  # refused here: sent, it would be Unreachable
    with client_mod.Client(closed_url(), binary=True, timeout=2) as c, pytest.raises(client_mod.Unreachable):
        c.infer("m", {"image": jpeg})


@pytest.mark.parametrize("model, error", [("", ValueError), (None, TypeError), (7, TypeError)])
def test_a_model_name_must_be_a_non_empty_string(model: Any, error: type) -> None:
    with client_mod.Client(closed_url(), timeout=2) as c:
        with pytest.raises(error, match="model"):
            c.infer(model, {"x": X})
        with pytest.raises(error, match="model"):
            c.chat(model, HELLO)


def test_chat_messages_and_parameters_must_be_json() -> None:
    with client_mod.Client(closed_url(), timeout=2) as c:
        with pytest.raises(TypeError, match="messages must be a non-empty list"):
            c.chat("m", "hello")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="must be JSON values"):
            list(c.chat("m", HELLO, temperature=float("nan")))


# --- the client: answers that are not what the protocol says ------------------------------------


@pytest.mark.parametrize("endpoints", [
    b"<html>maintenance</html>",
    b"[1, 2]",
    json.dumps({"endpoints": "all of them", "ttlSeconds": 600}).encode(),
    json.dumps(endpoint_list({"site": "edge-a"})).encode(),
    json.dumps(endpoint_list({"site": "edge-a", "url": "http://127.0.0.1:9"})).encode(),
    json.dumps(endpoint_list({"site": "edge-a", "url": "::not a url", "inferUrl": "::not a url"})).encode(),
    json.dumps({"endpoints": [], "ttlSeconds": "soon"}).encode(),
    DEEP,
])
def test_an_endpoint_list_that_cannot_be_read_sends_the_request_through_the_gateway(canned: Canned, endpoints: bytes) -> None:
    canned.on("GET", "/v1/endpoints/", 200, endpoints).on("POST", "/v2/models/m/infer", 200, v2_answer(), **{"x-edgeplane-site": "gw-site"})
    with client_mod.Client(canned.url, timeout=5) as c:
        result = c.infer("m", {"input": X})
    assert result.url == canned.url and result.site == "gw-site"
    np.testing.assert_array_equal(result["output"], np.full((1, 4), 2.0, np.float32))


def test_a_replica_that_answers_something_else_than_v2_is_skipped(canned: Canned) -> None:
    broken = Canned().on("POST", "/", 200, "<html>a proxy's page</html>", **{"content-type": "text/html"})
    try:
        canned.on("GET", "/v1/endpoints/", 200, endpoint_list({"site": "edge-broken", "url": broken.url,
                                                               "inferUrl": f"{broken.url}/v2/models/m/infer"}))
        canned.on("POST", "/v2/models/m/infer", 200, v2_answer(), **{"x-edgeplane-site": "gw-site"})
        with client_mod.Client(canned.url, timeout=5) as c:
            result = c.infer("m", {"input": X})
            assert result.site == "gw-site" and result.attempts == 2
            assert c.cache.order("m") == []  # the broken replica is out of rotation for a while
    finally:
        broken.close()


@pytest.mark.parametrize("answer, content_type", [
    (b"<html>Welcome to nginx</html>", "text/html"),
    (b'{"outputs": [{"name": "output", "datatype": "FP32", "shape": [3], "data": [1]}]}', "application/json"),
    (b'{"status": "ok"}', "application/json"),
    # integer outputs whose numbers a cast would change (1.5 -> 1, 300.7 -> 44, 1e12 -> -2**31)
    (b'{"outputs": [{"name": "output", "datatype": "INT64", "shape": [2], "data": [1.5, 2.7]}]}', "application/json"),
    (b'{"outputs": [{"name": "output", "datatype": "UINT8", "shape": [2], "data": [-1.5, 300.7]}]}', "application/json"),
    (b'{"outputs": [{"name": "output", "datatype": "INT32", "shape": [2], "data": [1e12, 0.0]}]}', "application/json"),
    (b'{"outputs": [{"name": "output", "datatype": "BOOL", "shape": [2], "data": [2, 0]}]}', "application/json"),
    (b'{"outputs": [{"name": "output", "datatype": "FP32", "shape": [1], "data": [1]},'
     b' {"name": "output", "datatype": "FP32", "shape": [1], "data": [2]}]}', "application/json"),  # which one is it?
])
async def test_a_gateway_that_answers_something_else_than_v2_is_a_bad_answer(canned: Canned, answer: bytes, content_type: str) -> None:
    canned.on("GET", "/v1/endpoints/", 404, {"error": "no"}).on("POST", "/v2/models/m/infer", 200, answer, **{"content-type": content_type})
    with client_mod.Client(canned.url, timeout=5) as c, pytest.raises(client_mod.BadAnswer, match="no v2 inference response"):
        c.infer("m", {"input": X})
    async with client_mod.AsyncClient(canned.url, timeout=5) as ac:
        with pytest.raises(client_mod.BadAnswer, match="is it an edgeplane gateway"):
            await ac.infer("m", {"input": X})


def test_a_refusal_whose_body_is_not_an_object_is_an_inference_error(canned: Canned) -> None:
    canned.on("GET", "/v1/endpoints/", 404, {"error": "no"}).on("POST", "/v2/models/m/infer", 400, [1, 2])
    with client_mod.Client(canned.url, timeout=5) as c, pytest.raises(client_mod.InferenceError, match=r"HTTP 400: \[1, 2\]"):
        c.infer("m", {"input": X})


@pytest.mark.parametrize("chat", [False, True])
def test_a_refusal_nested_past_the_json_parser_is_an_inference_error(canned: Canned, chat: bool) -> None:
    canned.on("GET", "/v1/endpoints/", 404, {"error": "no"})
    canned.on("POST", "/openai/v1/chat/completions" if chat else "/v2/models/m/infer", 400, DEEP)
    with client_mod.Client(canned.url, timeout=5) as c, pytest.raises(client_mod.InferenceError, match=r"HTTP 400: \[\[\["):
        list(c.chat("m", HELLO)) if chat else c.infer("m", {"input": X})


def test_a_gateway_that_never_answers_costs_the_timeout_then_is_unreachable() -> None:
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # accepts (the kernel does), never answers
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        with client_mod.Client(url, timeout=0.3) as c, pytest.raises(client_mod.Unreachable):
            c.infer("m", {"input": X})
        assert time.monotonic() - started < 10


def sse(*events: Any, done: bool = True) -> bytes:
    out = b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)
    return out + (b"data: [DONE]\n\n" if done else b"")


def delta(text: str) -> dict[str, Any]:
    return {"choices": [{"delta": {"content": text}, "finish_reason": None}]}


def openai_replica(canned: Canned, url: str) -> None:
    canned.on("GET", "/v1/endpoints/", 200, endpoint_list({"site": "edge-llm", "url": url, "api": "openai"}))


def test_a_stream_that_stops_before_its_done_after_text_is_a_cut(canned: Canned) -> None:
    replica = Canned().on("POST", "/v1/chat/completions", 200, sse(delta("Hel"), delta("lo"), done=False),
                          **{"content-type": "text/event-stream"})
    try:
        openai_replica(canned, replica.url)
        with client_mod.Client(canned.url, timeout=5) as c:
            answer = c.chat("m", HELLO)
            with pytest.raises(client_mod.StreamCut, match="cut after 5 characters.*before its \\[DONE\\]"):
                list(answer)
        assert answer.text == "Hello"
    finally:
        replica.close()


@pytest.mark.parametrize("stream", [b"data: {not json\n\n", b"data: [1, 2]\n\n", b"data: " + DEEP + b"\n\n", b"<html>oops</html>",
                                    sse(done=False)])
def test_a_replica_whose_stream_is_broken_before_the_first_token_is_skipped(canned: Canned, stream: bytes) -> None:
    replica = Canned().on("POST", "/v1/chat/completions", 200, stream, **{"content-type": "text/event-stream"})
    try:
        openai_replica(canned, replica.url)
        canned.on("POST", "/openai/v1/chat/completions", 200, sse(delta("from the gateway")), **{"content-type": "text/event-stream"})
        with client_mod.Client(canned.url, timeout=5) as c:
            answer = c.chat("m", HELLO)
            assert "".join(answer) == "from the gateway" and answer.attempts == 2
    finally:
        replica.close()


@pytest.mark.parametrize("answer", [{"id": "x"}, DEEP])
@pytest.mark.parametrize("stream", [True, False])
async def test_a_gateway_chat_answer_that_is_not_openai_is_an_edgeplane_error(canned: Canned, stream: bool, answer: Any) -> None:
    canned.on("GET", "/v1/endpoints/", 404, {"error": "no"}).on("POST", "/openai/v1/chat/completions", 200, answer)
    with client_mod.Client(canned.url, timeout=5) as c, pytest.raises(client_mod.EdgeplaneError, match="the gateway's answer failed"):
        list(c.chat("m", HELLO, stream=stream))
    async with client_mod.AsyncClient(canned.url, timeout=5) as ac:
        with pytest.raises(client_mod.EdgeplaneError, match="the gateway's answer failed"):
            async for _ in ac.chat("m", HELLO, stream=stream):
                pass


# --- the commands --------------------------------------------------------------------------------


def one_line_error(done: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr and "this is a bug" not in done.stderr, done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("data, needle", [
    ('{"input": [[1, 2], [3]]}', "input 'input': the rows are not all the same length"),
    ('{"input": [[1, 2], 3]}', "the rows are not all the same length"),
    ('{"input": [1, "a"]}', "one kind only; got integer, string"),
    ('{"input": [null]}', "got null"),
    ('{"input": [{"a": 1}]}', "got object"),
    ('{"": [1]}', "an input name is empty"),
    ("@", "name a file after the @"),
    ('{"input": ' + "[" * 20 + "1" + "]" * 20 + "}", "nested deeper than a tensor's 16 dimensions"),
])
def test_infer_refuses_data_that_is_no_tensor_before_sending(data: str, needle: str) -> None:
    one_line_error(support.cli("infer", "m", "--data", data, server_url=closed_url()), 2, needle)


def test_infer_refuses_json_nested_past_the_parser(tmp_path: pathlib.Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    one_line_error(support.cli("infer", "m", "--data", f"@{deep}", server_url=closed_url()), 2, "nested too deeply")


@pytest.mark.parametrize("text, datatype", [("[true, false]", "BOOL"), ('["a", "b"]', "BYTES"), ("[1, 2]", "INT64"), ("[1, 2.5]", "FP32"),
                                            ("[]", "FP32")])
def test_infer_names_the_datatype_of_json_values(text: str, datatype: str) -> None:
    assert infer.body_of(f'{{"x": {text}}}')["inputs"][0]["datatype"] == datatype


def model_x(canned: Canned, datatype: str) -> Canned:
    """``canned`` answering the v2 metadata of model ``m``, of one input ``x`` of ``datatype``
    (``edgeplane infer`` reads the datatype it sends from it)."""
    return canned.on("GET", "/v2/models/m", 200, {"name": "m", "inputs": [{"name": "x", "datatype": datatype, "shape": [-1, -1]}]})


@pytest.mark.parametrize("method, path, argv", [
    ("GET", "/v1/sites", ["get", "sites"]),
    ("POST", "/v2/models/m/infer", ["infer", "m", "--data", '{"x": [[1]]}']),
])
def test_a_refusal_nested_past_the_json_parser_is_reported_not_a_bug(canned: Canned, method: str, path: str, argv: list[str]) -> None:
    """Python's JSON parser raises RecursionError, not ValueError, on arrays nested deeper
    than its recursion limit: the refusal was reported as a bug of the CLI."""
    model_x(canned, "INT64").on(method, path, 400, b'{"error": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    one_line_error(support.cli(*argv, server_url=canned.url), 1, '{"error": [[[')


def test_infer_waits_as_long_as_its_timeout_and_says_it_had_no_answer() -> None:
    """infer waited a fixed 30 s, less than a gateway may take (a cold start, then the
    model), and said "cannot reach" of a server it had reached."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # accepts (the kernel does), never answers
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        done = support.cli("infer", "m", "--data", '{"x": [[1]]}', "--timeout", "0.3", server_url=url)
    one_line_error(done, 3, f"the control plane at {url} did not answer GET /v2/models/m within 0.3 s")  # the model's metadata, first


def test_infer_json_output_is_json_when_a_model_outputs_nan_or_infinities(canned: Canned) -> None:
    """The v2 codec writes them as bare NaN and Infinity; ``-o json`` passed them on, which
    is no JSON for a script's parser (JavaScript, Go, jq). They are strings, as protobuf writes them."""
    y = np.array([[0.5, np.nan, np.inf, -np.inf]], np.float32)
    body, _ = oip.encode_response(oip.InferResponse("m", (oip.Tensor("y", y),)))
    model_x(canned, "FP32").on("POST", "/v2/models/m/infer", 200, body)
    done = support.cli("infer", "m", "--data", '{"x": [[1]]}', "-o", "json", server_url=canned.url)
    assert done.returncode == 0, done.stderr

    def refuse(token: str) -> None:
        raise AssertionError(f"{token} is no JSON: {done.stdout}")

    assert json.loads(done.stdout, parse_constant=refuse)["outputs"][0]["data"] == [0.5, "NaN", "Infinity", "-Infinity"]


def test_infer_reads_a_data_file_saved_with_a_byte_order_mark(canned: Canned, tmp_path: pathlib.Path) -> None:
    """What Notepad and PowerShell 5's ``Out-File -Encoding utf8`` write, as ``-f`` manifests already were read."""
    model_x(canned, "FP32").on("POST", "/v2/models/m/infer", 200, {"model_name": "m", "outputs": [{"name": "y", "datatype": "FP32",
                                                                                                "shape": [1], "data": [0.5]}]})
    (tmp_path / "input.json").write_bytes(b'\xef\xbb\xbf{"x": [[1.5, 2.5]]}\r\n')
    for data, stdin in ((f"@{tmp_path / 'input.json'}", None), ("@-", '\ufeff{"x": [[1.5, 2.5]]}')):
        done = support.cli("infer", "m", "--data", data, "-o", "json", server_url=canned.url, stdin=stdin)
        assert done.returncode == 0, done.stderr
        assert json.loads(canned.requests[-1][2])["inputs"] == [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.5, 2.5]}]


def test_infer_reads_data_from_stdin_and_says_when_stdin_is_closed(canned: Canned) -> None:
    model_x(canned, "INT64").on("POST", "/v2/models/m/infer", 200, {"model_name": "m", "outputs": [{"name": "y", "datatype": "FP32",
                                                                                                 "shape": [1], "data": [0.5]}]})
    done = support.cli("infer", "m", "--data", "@-", "-o", "json", server_url=canned.url, stdin='{"x": [[1, 2]]}')
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["outputs"][0]["data"] == [0.5]
    assert json.loads(canned.requests[-1][2])["inputs"][0] == {"name": "x", "shape": [1, 2], "datatype": "INT64", "data": [1, 2]}
    closed = subprocess.run([str(support.EDGEPLANE), "infer", "m", "--data", "@-"], capture_output=True, text=True, timeout=60,
                            env=support.clean_env(EDGEPLANE_SERVER=canned.url), preexec_fn=lambda: os.close(0))
    one_line_error(closed, 2, "standard input is closed")


@pytest.mark.parametrize("status, body", [(400, [1, 2]), (200, [1, 2]), (200, {"outputs": "none"}), (200, {"outputs": [{"name": "y"}]})])
def test_infer_says_what_was_wrong_with_an_answer_that_is_not_v2(canned: Canned, status: int, body: Any) -> None:
    model_x(canned, "INT64").on("POST", "/v2/models/m/infer", status, body)
    one_line_error(support.cli("infer", "m", "--data", '{"x": [1]}', server_url=canned.url), 1)


@pytest.mark.parametrize("args, needle", [
    (["infer", "", "--data", "[1]"], "MODEL is empty"),
    (["chat", "", "hello"], "MODEL is empty"),
    (["chat", "m", "hello", "--timeout", "1e300"], "--timeout 1e+300: at most"),
    (["cascade", "tune", "", "-f", "/dev/null"], "deployment name is empty"),
    (["distill", ""], "DEPLOYMENT is empty"),
    (["distill", "d", "--zone", " "], "--zone is empty"),
    (["captures", ""], "ZONE is empty"),
    (["captures", "EU", "--delete", ""], "--delete is empty"),
    (["captures", "EU", "--deployment", ""], "--deployment is empty"),
])
def test_empty_names_and_impossible_values_are_usage_errors(args: list[str], needle: str) -> None:
    one_line_error(support.cli(*args, server_url=closed_url()), 2, needle)


def test_chat_refuses_a_server_url_the_client_cannot_use() -> None:
    one_line_error(support.cli("chat", "m", "hello", server_url="http://127.0.0.1:99999"), 2, "port 99999 is not 1-65535")


def test_chat_with_a_timeout_past_the_clock_is_refused_against_a_live_control_plane(control_plane: support.ServerThread) -> None:
    one_line_error(support.cli("chat", "m", "hello", "--timeout", "1e12", server_url=control_plane.url), 2, "--timeout")


CASCADE = {"spec": {"model": "m", "cascade": {"stages": [{"variant": "small", "escalate": {"confidence": {"output": "probs", "below": 0.8}}},
                                                         {"variant": "big"}]}}}


def cascade_gateway(canned: Canned, answer: Any) -> None:
    # replayed by the deployment's name: its own cascade, whatever other deployments model m has
    canned.on("GET", "/v1/modeldeployments/c", 200, CASCADE).on("POST", "/v2/models/c/infer", 200, answer)


GOOD = {"outputs": [{"name": "probs", "datatype": "FP32", "shape": [1, 2], "data": [0.9, 0.1]}]}


@pytest.mark.parametrize("sample, answer, needle", [
    ('{"input": [[1, 2]], "label": -1}', GOOD, '"label" must be a class index (0 or more)'),
    ('{"input": [[1, 2]], "label": []}', GOOD, '"label" must be a class index'),
    ('{"input": [[1, 2]], "label": [1, 0]}', GOOD, "2 label(s) for 1 row(s)"),
    ('{"input": [[1, 2]]}', {"outputs": [{"name": "probs", "shape": [3], "data": [1]}]}, "output 'probs' is not a tensor of numbers"),
    ('{"input": [[1, 2]]}', [1, 2], 'no v2 inference response (no "outputs" list)'),
    ('{}', GOOD, "the sample must be"),
])
def test_cascade_tune_says_which_sample_or_answer_is_wrong(canned: Canned, tmp_path: pathlib.Path, sample: str, answer: Any,
                                                            needle: str) -> None:
    cascade_gateway(canned, answer)
    path = tmp_path / "sample.jsonl"
    path.write_text(sample + "\n")
    line = one_line_error(support.cli("cascade", "tune", "c", "-f", str(path), server_url=canned.url), 1, needle)
    assert str(path) in line


def test_cascade_tune_reads_the_sample_from_stdin(canned: Canned) -> None:
    cascade_gateway(canned, GOOD)
    done = support.cli("cascade", "tune", "c", "-f", "-", "-o", "json", server_url=canned.url, stdin='{"input": [[1, 2]], "label": 0}\n')
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["samples"] == 1
    one_line_error(support.cli("cascade", "tune", "c", "-f", "-", server_url=canned.url, stdin='{"input": [[1, 2]], "label": -3}\n'),
                   1, "<stdin>:1:")


RESULT = {"published": True, "deployment": "d", "zone": "EU", "variant": "small",
          "artifact": {"uri": "distilled/x.onnx", "sha256": "ab" * 32}, "gate": {}}


def test_distill_json_output_is_the_report_alone_with_progress_on_stderr(canned: Canned) -> None:
    lines = [{"progress": {"phase": "train", "examples": 10}}, {"progress": {"epoch": 1, "epochs": 2, "loss": 0.5}}, {"result": RESULT}]
    canned.on("POST", "/v1/distill/d", 200, "".join(json.dumps(x) + "\n" for x in lines), **{"content-type": "application/x-ndjson"})
    done = support.cli("distill", "d", "-o", "json", server_url=canned.url)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == RESULT
    assert "train: epoch 1/2  loss 0.5" in done.stderr and "train: examples 10" in done.stderr


@pytest.mark.parametrize("status, body, needle", [
    (200, "<html>proxy</html>", "something else than the run's NDJSON lines"),
    (502, "[1]", "HTTP 502: [1]"),
])
def test_distill_says_what_a_broken_answer_was(canned: Canned, status: int, body: str, needle: str) -> None:
    canned.on("POST", "/v1/distill/d", status, body)
    one_line_error(support.cli("distill", "d", server_url=canned.url), 1, needle)


# --- POST /v1/distill: bodies --------------------------------------------------------------------


@pytest.mark.parametrize("body, needle", [
    (b'{"epochs": "5"}', 'epochs must be a whole number from 1 to 1000, not "5"'),
    (b'{"epochs": 1.5}', "epochs must be a whole number"),
    (b'{"epochs": 99999999999999999999}', "epochs must be a whole number"),
    (b'{"minGain": NaN}', "body must be a JSON object"),
    (b'{"minGain": 1e400}', "minGain must be a number from 0 to less than 1, not Infinity"),
    (b'{"minGain": true}', "minGain must be a number"),
    (b'{"zone": 5}', "zone must be a residency zone such as EU or CH, not 5"),
    (b'{"zone": ["EU"]}', "zone must be a residency zone"),
    (b'{"zone": ""}', "zone must be a residency zone"),
    (b'{"epoch": 5}', "unknown field 'epoch'"),
    (b"[]", "body must be a JSON object"),
    (b"\xff\xfe", "body must be a JSON object"),
    (b"[" * 60_000, "body must be a JSON object"),
])
def test_distill_bodies_that_cannot_be_read_are_a_400_naming_the_field(control_plane: support.ServerThread, body: bytes,
                                                                       needle: str) -> None:
    resp = httpx.post(f"{control_plane.url}/v1/distill/nowhere", content=body, timeout=30)
    assert resp.status_code == 400, resp.text
    assert needle in resp.json()["error"]


def test_a_distill_body_past_its_limit_is_a_413(control_plane: support.ServerThread) -> None:
    resp = httpx.post(f"{control_plane.url}/v1/distill/nowhere", content=b" " * (65 * 1024), timeout=30)
    assert resp.status_code == 413 and "larger than 64 KiB" in resp.json()["error"]


def test_good_distill_options_reach_the_deployment_check(control_plane: support.ServerThread) -> None:
    resp = httpx.post(f"{control_plane.url}/v1/distill/nowhere", json={"zone": "eu", "epochs": 3, "minGain": 0}, timeout=30)
    assert resp.status_code == 404 and resp.json()["error"] == "ModelDeployment 'nowhere' does not exist"

"""Where the agent computes an answer: on the event loop for a short run alone in flight,
on a worker thread otherwise (the first run of a model, a long one, concurrent ones,
large JSON bodies)."""

from __future__ import annotations

import asyncio
import gc
import gzip
import pathlib
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper

from edge_agent import http, registry
from edge_agent.httpmessages import Request
from edge_agent.runtime import onnx
from edgeplane_proto import encoding, oip
from orchestrator.testing import onnx_models
from orchestrator.testing.agent_parts import OneModel

from .conftest import serve_http


class Recorded:
    """An onnxruntime model that notes the thread of each run, and can be made slow."""

    def __init__(self, inner: onnx.OnnxModel) -> None:
        self._inner = inner
        self.threads: list[str] = []
        self.delay = 0.0
        self.gate: threading.Event | None = None  # when set: each run waits for it

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def run(self, feeds: Any, outputs: Any) -> Any:
        self.threads.append(threading.current_thread().name)
        if self.gate is not None:
            self.gate.wait(30)
        if self.delay:
            time.sleep(self.delay)
        return self._inner.run(feeds, outputs)


@pytest.fixture
def server(tmp_path: pathlib.Path, request: pytest.FixtureRequest):  # noqa: ANN201
    """By default a bound on the step no loaded CI machine reaches (the first run of a cold
    session under a parallel suite took over 20 ms): the rule, not the machine's speed, is
    tested; a test that needs the real bound asks for it."""
    inline_max_s = getattr(request, "param", 30.0)
    built = onnx_models.build_mlp(tmp_path / "m.onnx", in_dim=8, hidden=16, out_dim=4)
    runtime = Recorded(onnx.OnnxModel.load(built.path.read_bytes()))
    served = registry.ServedModel("m", built.sha256, runtime)  # type: ignore[arg-type]
    with ThreadPoolExecutor(2, thread_name_prefix="infer") as pool:
        yield http.InferenceServer(OneModel(served), pool, inline_max_s=inline_max_s), runtime  # type: ignore[arg-type]


def request(x: np.ndarray, binary: bool = True) -> Request:
    body, header = oip.encode_request({"input": x}, binary=binary)
    headers = {oip.BINARY_HEADER.lower(): str(header)} if header is not None else {}
    return Request("POST", "/v2/models/m/infer", "", headers, body)


X = np.ones((1, 8), dtype=np.float32)


async def test_short_runs_alone_stay_on_the_loop_after_the_first(server) -> None:  # noqa: ANN001
    app, runtime = server
    for _ in range(3):
        assert (await app.infer("m", request(X))).status == 200
    loop_thread = threading.current_thread().name
    assert runtime.threads[0].startswith("infer")  # unknown run time: a worker
    assert runtime.threads[1:] == [loop_thread, loop_thread]
    assert (await app.infer("m", request(X, binary=False))).status == 200  # a small JSON body too
    assert runtime.threads[-1] == loop_thread


@pytest.mark.parametrize("server", [http.DEFAULT_INLINE_MAX_S], indirect=True)
async def test_concurrent_long_and_large_requests_go_to_workers(server) -> None:  # noqa: ANN001
    app, runtime = server
    await app.infer("m", request(X))
    runtime.threads.clear()
    # with another request in flight (awaiting its worker), a short one does not take the loop
    app.inflight += 1
    try:
        assert (await app.infer("m", request(X))).status == 200
    finally:
        app.inflight -= 1
    assert runtime.threads[-1].startswith("infer")
    # a body far larger than the model usually gets (a large JSON batch) is parsed on a worker
    runtime.threads.clear()
    big = np.full((4000, 8), 0.123456, dtype=np.float32)
    assert not app.find("m").usual_size(len(request(big, binary=False).body))
    assert (await app.infer("m", request(big, binary=False))).status == 200
    assert runtime.threads[-1].startswith("infer")
    # a model whose runs grew long leaves the loop free for others
    runtime.delay = 0.05
    for _ in range(12):  # the moving average crosses 20 ms
        await app.infer("m", request(X))
    runtime.threads.clear()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    t = asyncio.create_task(ticker())
    assert (await app.infer("m", request(X))).status == 200
    t.cancel()
    assert runtime.threads == [runtime.threads[0]] and runtime.threads[0].startswith("infer")
    assert ticks >= 3  # the loop kept running during the 50 ms run


async def test_requests_waiting_behind_one_send_it_to_a_worker(server) -> None:  # noqa: ANN001
    """Over the real HTTP server: requests received together are not computed one after
    another on the loop; a lone one is."""
    app, runtime = server
    http_server, port = await serve_http(app.handle)
    app.received = lambda: http_server.pending
    try:
        one = request(X)
        head = (f"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\n{oip.BINARY_HEADER}: {one.headers[oip.BINARY_HEADER.lower()]}\r\n"
                f"Content-Length: {len(one.body)}\r\n\r\n").encode() + one.body
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def send(n: int) -> list[str]:
            runtime.threads.clear()
            writer.write(head * n)  # pipelined: all received in one read
            for _ in range(n):
                status = await reader.readuntil(b"\r\n\r\n")
                assert status.startswith(b"HTTP/1.1 200")
                length = int(next(h for h in status.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1])
                await reader.readexactly(length)
            return [t for t in runtime.threads if not t.startswith("infer")]

        await send(1)  # the model's first run: a worker (its run time is unknown)
        assert len(await send(4)) <= 1, runtime.threads  # only the last, once nothing waits behind it
        assert len(await send(1)) == 1  # a lone request: on the loop
        assert http_server.pending == 0
        writer.close()
    finally:
        await http_server.shutdown(1)


@pytest.mark.parametrize("server", [http.DEFAULT_INLINE_MAX_S], indirect=True)
async def test_a_caller_that_goes_away_keeps_its_slot_until_the_run_ends(server) -> None:  # noqa: ANN001
    app, runtime = server
    runtime.delay = 0.3  # long runs: a worker each
    assert (await app.infer("m", request(X))).status == 200
    call = asyncio.create_task(app.infer("m", request(X)))
    for _ in range(500):  # bounded: until the worker is inside the run
        if len(runtime.threads) == 2:
            break
        await asyncio.sleep(0.002)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert app.inflight == 1  # the run still holds a worker
    for _ in range(500):
        if app.inflight == 0:
            break
        await asyncio.sleep(0.01)
    assert app.inflight == 0


async def test_a_run_that_fails_after_its_caller_went_away_logs_no_traceback(
        tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    """``total = a + b`` over lengths that do not broadcast: onnxruntime refuses it inside the
    graph, on a worker, once its caller has gone (the refusal is no one's to read)."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["total"])], "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n"]), helper.make_tensor_value_info("b", TensorProto.FLOAT, ["m"])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_models.OPSET)])
    model.ir_version = 8
    runtime = Recorded(onnx.OnnxModel.load(model.SerializeToString()))
    runtime.gate = threading.Event()
    served = registry.ServedModel("m", "0" * 64, runtime)  # type: ignore[arg-type]
    body, header = oip.encode_request({"a": np.ones(3, np.float32), "b": np.ones(2, np.float32)}, binary=True)
    mismatched = Request("POST", "/v2/models/m/infer", "", {oip.BINARY_HEADER.lower(): str(header)}, body)
    with ThreadPoolExecutor(1, thread_name_prefix="infer") as pool:
        app = http.InferenceServer(OneModel(served), pool, inline_max_s=0)  # type: ignore[arg-type]
        call = asyncio.create_task(app.infer("m", mismatched))
        for _ in range(500):  # bounded: until the worker is inside the run
            if runtime.threads:
                break
            await asyncio.sleep(0.002)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        runtime.gate.set()
        for _ in range(500):  # bounded: until the run has failed
            if app.inflight == 0:
                break
            await asyncio.sleep(0.01)
        assert app.inflight == 0
    gc.collect()  # the failed run is let go of here, where asyncio logs an error no one read
    unread = [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]
    assert not unread, unread


async def test_a_large_json_body_the_model_usually_gets_stays_on_the_loop(tmp_path: pathlib.Path) -> None:
    """The step's measured time bounds what the loop computes, JSON parse included: a
    model that usually gets large JSON bodies (over the 64 KiB that once sent every JSON
    body to a worker) and answers them within the bound skips the worker."""
    built = onnx_models.build_mlp(tmp_path / "m.onnx", in_dim=8, hidden=16, out_dim=4)
    runtime = Recorded(onnx.OnnxModel.load(built.path.read_bytes()))
    served = registry.ServedModel("m", built.sha256, runtime)  # type: ignore[arg-type]
    pool = ThreadPoolExecutor(2, thread_name_prefix="infer")
    app = http.InferenceServer(OneModel(served), pool, inline_max_s=30.0)  # type: ignore[arg-type]
    big = request(np.full((4000, 8), 0.123456, dtype=np.float32), binary=False)
    assert len(big.body) > 64 << 10
    for _ in range(3):
        assert (await app.infer("m", big)).status == 200
    assert runtime.threads[0].startswith("infer")  # unknown step time: a worker
    assert runtime.threads[-1] == threading.current_thread().name
    pool.shutdown()


async def test_a_large_compressed_body_inflates_off_the_loop(server) -> None:  # noqa: ANN001
    """A 64 KiB deflate bomb takes a few tenths of a second to refuse: other requests and the
    agent's heartbeats go on meanwhile (under load, a blocked loop missed heartbeats)."""
    app, _ = server
    bomb = Request("POST", "/v2/models/m/infer", "", {"content-encoding": "deflate"}, zlib.compress(bytes(app.max_body_bytes + (1 << 20))))
    refused = asyncio.create_task(app.infer("m", bomb))
    turns = 0
    while not refused.done():
        turns += 1
        await asyncio.sleep(0)
    assert refused.result().status == 413 and turns > 10, turns
    small = Request("POST", "/v2/models/m/infer", "", {"content-encoding": "gzip"}, gzip.compress(request(X, binary=False).body))
    assert len(small.body) <= encoding.INFLATE_INLINE_MAX and (await app.infer("m", small)).status == 200

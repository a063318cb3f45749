"""Concurrent first calls of one model with plain lists share one read of its metadata.

The Python client reads a model's v2 metadata to send plain lists in its inputs'
datatypes, and keeps it for 30 s; each call that found nothing kept read it, so N threads
(or tasks) calling a model for the first time sent N metadata requests at once. Now the
first reads and the others wait for its answer. A read that fails is its caller's alone:
the others read again (one of them, for all), and nothing of it is kept.

A gateway on loopback (real HTTP) counts the metadata requests and holds the first answer
until as many as there are callers have come, or a second has passed: without sharing
they all come, each caller sending its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from orchestrator import client as client_mod
from orchestrator.testing import loopback

CALLERS = 8
METADATA = {"name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]}


class Gateway:
    """``GET /v2/models/m`` and ``POST /v2/models/m/infer``: the metadata requests counted,
    the first held (see the module), the first ``failing`` of them answered 503; each
    inference's input datatype kept."""

    def __init__(self, failing: int = 0) -> None:
        self.reads = 0
        self.failing = failing
        self.sent: list[str] = []
        self._came = threading.Condition()
        gateway = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                with gateway._came:
                    gateway.reads += 1
                    number = gateway.reads
                    gateway._came.notify_all()
                    if number == 1:  # held: the others come meanwhile, or do not
                        gateway._came.wait_for(lambda: gateway.reads >= CALLERS, timeout=1.0)
                if number <= gateway.failing:
                    self._answer(503, {"error": "starting"})
                else:
                    self._answer(200, METADATA)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with gateway._came:
                    gateway.sent.append(body["inputs"][0]["datatype"])
                self._answer(200, {"model_name": "m", "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 3],
                                                                   "data": [0.0, 1.0, 0.0]}]})

            def _answer(self, status: int, doc: Any) -> None:
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._serving = contextlib.ExitStack()
        self.url = self._serving.enter_context(loopback.http_server(Handler))

    def stop(self) -> None:
        self._serving.close()


@pytest.fixture
def gateway(request: pytest.FixtureRequest) -> Iterator[Gateway]:
    served = Gateway(getattr(request, "param", 0))
    yield served
    served.stop()


def sync_calls(url: str) -> list[client_mod.InferResult]:
    """CALLERS threads' first calls of model m with a plain list, on one client."""
    with client_mod.Client(url, timeout=30, direct=False, binary=False) as c:
        results: list[client_mod.InferResult] = []
        errors: list[BaseException] = []

        def call() -> None:
            try:
                results.append(c.infer("m", {"x": [[0, 1, 0]]}))
            except BaseException as exc:  # raised in the test, not lost in its thread
                errors.append(exc)

        threads = [threading.Thread(target=call) for _ in range(CALLERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        return results


async def async_calls(url: str) -> list[client_mod.InferResult]:
    """CALLERS tasks' first calls of model m with a plain list, on one client."""
    async with client_mod.AsyncClient(url, timeout=30, direct=False, binary=False) as c:
        return list(await asyncio.gather(*(c.infer("m", {"x": [[0, 1, 0]]}) for _ in range(CALLERS))))


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_concurrent_first_calls_read_the_metadata_once(gateway: Gateway, kind: str) -> None:
    results = await asyncio.to_thread(sync_calls, gateway.url) if kind == "sync" else await async_calls(gateway.url)
    assert len(results) == CALLERS
    assert gateway.reads == 1, gateway.reads
    assert gateway.sent == ["FP32"] * CALLERS, gateway.sent


@pytest.mark.parametrize("gateway", [1], indirect=True)
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_failed_read_is_its_callers_alone_and_the_others_share_one_read_again(gateway: Gateway, kind: str) -> None:
    """The first read answers 503: its caller sends its list as numpy reads it (as with no
    metadata at all), the others read again, once for all, and send FP32; nothing of the
    failure is kept."""
    results = await asyncio.to_thread(sync_calls, gateway.url) if kind == "sync" else await async_calls(gateway.url)
    assert len(results) == CALLERS
    assert gateway.reads == 2, gateway.reads
    assert sorted(gateway.sent) == ["FP32"] * (CALLERS - 1) + ["INT64"], gateway.sent


async def test_a_read_cancelled_or_raising_lets_those_waiting_read_again() -> None:
    """The reading task cancelled (its caller gave up), or the read raising (no endpoint):
    those waiting are let go and read again, not left waiting nor given its error."""
    from orchestrator import clientdatatypes

    cache = clientdatatypes.DatatypeCache()
    began, reads = asyncio.Event(), []

    async def hanging() -> dict[str, str] | None:
        reads.append("hanging")
        began.set()
        await asyncio.Event().wait()
        return None

    async def answering() -> dict[str, str] | None:
        reads.append("answering")
        return {"x": "FP32"}

    first = asyncio.create_task(cache.ashared("m", hanging))
    await began.wait()
    second = asyncio.create_task(cache.ashared("m", answering))
    await asyncio.sleep(0)  # one turn of the loop: the second waits on the first's read
    first.cancel()
    assert await second == {"x": "FP32"} and reads == ["hanging", "answering"]
    with pytest.raises(asyncio.CancelledError):
        await first

    def raising() -> dict[str, str] | None:
        raise RuntimeError("no endpoint")

    assert cache.get("m") == {"x": "FP32"}
    other = clientdatatypes.DatatypeCache()
    with pytest.raises(RuntimeError):
        other.shared("n", raising)
    assert other.shared("n", lambda: {"y": "INT32"}) == {"y": "INT32"}  # nothing of the failure kept

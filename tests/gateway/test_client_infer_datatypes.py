"""The Python client sends plain lists in the datatype each input takes.

A list does not say whether ``[[0, 1, 0]]`` is FP32, INT32 or BOOL, and the agent takes a
tensor only in its input's own datatype: the client reads each input's datatype from the
model's v2 metadata, from the replica it calls or through the control plane acting as a
gateway, in front of a real agent serving models of FP32, FP16, INT32, UINT8 and BOOL
inputs. A value the datatype cannot hold is refused before the inference is sent; numpy
arrays go as given, with no metadata read; datatypes kept from before a rollout are read
again when a replica refuses them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
import pytest_asyncio


from orchestrator import client as client_mod

from . import typed_fleet

pytestmark = pytest.mark.asyncio(loop_scope="module")

PLAIN = {"f32": [[0, 1, 0]], "f16": [[0.5, 1, 2]], "i32": [[1, 2, -3]], "u8": [[0, 200, 255]], "flag": [[1, 0, 1]]}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    async with typed_fleet.serving(tmp_path_factory.mktemp("client-datatypes"), "intent-classifier") as url:
        yield url


class Recorded(httpx.HTTPTransport):
    """A real transport that keeps each request's method and path."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.seen.append((request.method, request.url.path))
        return super().handle_request(request)


class ARecorded(httpx.AsyncHTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.method, request.url.path))
        return await super().handle_async_request(request)


async def infer(url: str, kind: str, model: str, inputs: Any, **kwargs: Any) -> tuple[client_mod.InferResult, list[tuple[str, str]]]:
    """``inputs``' result from a client of ``kind`` (sync or async) and the requests it sent;
    an error it raises is raised here, with the requests on it as ``seen``."""
    if kind == "sync":
        transport = Recorded()

        def call() -> client_mod.InferResult:
            with client_mod.Client(url, timeout=30, transport=transport, **kwargs) as c:
                return c.infer(model, inputs)

        try:
            return await asyncio.to_thread(call), transport.seen
        except Exception as exc:
            exc.seen = transport.seen  # type: ignore[attr-defined]
            raise
        finally:
            transport.close()
    atransport = ARecorded()
    try:
        async with client_mod.AsyncClient(url, timeout=30, transport=atransport, **kwargs) as c:
            return await c.infer(model, inputs), atransport.seen
    except Exception as exc:
        exc.seen = atransport.seen  # type: ignore[attr-defined]
        raise
    finally:
        await atransport.aclose()


def posts(seen: list[tuple[str, str]]) -> list[str]:
    return [path for method, path in seen if method == "POST"]


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "gateway"])
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_plain_lists_go_to_each_input_in_its_own_datatype(server: str, kind: str, direct: bool) -> None:
    """Plain lists went as numpy read them (INT64, FP64) and each input of another datatype refused them."""
    result, seen = await infer(server, kind, "typed", PLAIN, direct=direct)
    got = {name: (a.dtype, a.tolist()) for name, a in result.outputs.items()}
    assert got == {"f32_out": (np.float32, [[0.0, 1.0, 0.0]]), "f16_out": (np.float16, [[0.5, 1.0, 2.0]]),
                   "i32_out": (np.int32, [[1, 2, -3]]), "u8_out": (np.uint8, [[0, 200, 255]]),
                   "flag_out": (np.bool_, [[True, False, True]])}, got
    assert len(posts(seen)) == 1 and ("GET", "/v2/models/typed") in seen, seen
    # the README's call: whole numbers for a model of one FP32 input
    result, _ = await infer(server, kind, "intent-classifier", {"input": [[0, 1, 0]]}, direct=direct)
    assert result["output"].dtype == np.float32 and result["output"].shape == (1, 2)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_numpy_arrays_go_as_given_with_no_metadata_read(server: str, kind: str) -> None:
    inputs = {"f32": np.zeros((1, 3), np.float32), "f16": np.ones((1, 3), np.float16), "i32": np.ones((1, 3), np.int32),
              "u8": np.ones((1, 3), np.uint8), "flag": np.ones((1, 3), np.bool_)}
    result, seen = await infer(server, kind, "typed", inputs)
    assert result["u8_out"].dtype == np.uint8
    assert not [path for method, path in seen if method == "GET" and path.startswith("/v2/")], seen


@pytest.mark.parametrize(("given", "error"), [
    ({"i32": [[1, 0.5, 2]]}, "input 'i32': INT32 data must be whole numbers, got 0.5"),
    ({"u8": [[1, 256, 2]]}, "input 'u8': data does not fit UINT8: values span 1..256"),
    ({"flag": [[1, 2, 0]]}, "input 'flag': data does not fit BOOL: values span 0..2 (BOOL data are true and false, or 1 and 0)"),
    ({"f16": [[70000, 0, 0]]}, "input 'f16': data does not fit FP16: 70000.0 is past ±65504.0, the most it holds"),
    ({"f32": [[True, False, True]]}, "input 'f32': FP32 data must be numbers, not JSON booleans (true/false); "
                                     "send them as 1 and 0, or give the tensor datatype BOOL"),
    ({"f32": [["a", "b", "c"]]}, "input 'f32': FP32 data must be numbers, got str"),
])
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_value_the_datatype_cannot_hold_is_refused_before_the_inference_is_sent(
        server: str, kind: str, given: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError) as raised:
        await infer(server, kind, "typed", {**PLAIN, **given})
    assert str(raised.value) == error
    assert posts(raised.value.seen) == []  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_datatypes_kept_from_before_a_rollout_are_read_again_when_refused(server: str, kind: str) -> None:
    """Datatypes held from a model's earlier version (every input FP64 here) go once, are
    refused, and the call goes again in those the model declares now."""
    stale = client_mod.DatatypeCache()
    stale.store("typed", dict.fromkeys(typed_fleet.TYPED, "FP64"))
    result, seen = await infer(server, kind, "typed", PLAIN, datatypes=stale)
    assert result["i32_out"].dtype == np.int32 and result["flag_out"].tolist() == [[True, False, True]]
    assert len(posts(seen)) == 2 and [m for m, p in seen if p == "/v2/models/typed"] == ["GET"], seen
    assert stale.get("typed") == {"f32": "FP32", "f16": "FP16", "i32": "INT32", "u8": "UINT8", "flag": "BOOL"}

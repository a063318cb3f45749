"""The built-in ONNX Serve application answers v2 inference as an edge agent does: the
gateway fails over between the two tiers and forwards a compressed body as it came, so an
answer that differs (a 500 for a bad input, text turned into ``b'...'``, a gzip body
refused) differs by tier. Driven in-process over ASGI, without a Ray cluster."""

from __future__ import annotations

import gzip
import json
import pathlib
import zlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from starlette.requests import Request

from edgeplane_proto import oip
from orchestrator.serving import onnx_app
from orchestrator.testing import onnx_models

INFER = "/v2/models/m/infer"


def build_model(path: pathlib.Path) -> str:
    """``total = a + b`` (independent dynamic lengths: a mismatch fails inside the graph) and
    ``text_out = text``."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["total"]), helper.make_node("Identity", ["text"], ["text_out"])], "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n"]), helper.make_tensor_value_info("b", TensorProto.FLOAT, ["m"]),
         helper.make_tensor_value_info("text", TensorProto.STRING, ["k"])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, None), helper.make_tensor_value_info("text_out", TensorProto.STRING, ["k"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_models.OPSET)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return onnx_models.sha256_file(path)


@pytest.fixture
async def replica(tmp_path: pathlib.Path) -> AsyncIterator[httpx.AsyncClient]:
    path = tmp_path / "m.onnx"
    sha256 = build_model(path)
    served = onnx_app.OnnxModel.func_or_class(str(path), sha256, "m")  # the class Serve runs in each replica

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        response = await served(Request(scope, receive))
        await response(scope, receive, send)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://replica") as client:
        yield client


def inputs(a: list[float], b: list[float], text: list[str]) -> dict[str, Any]:
    return {"inputs": [{"name": "a", "datatype": "FP32", "shape": [len(a)], "data": a},
                       {"name": "b", "datatype": "FP32", "shape": [len(b)], "data": b},
                       {"name": "text", "datatype": "BYTES", "shape": [len(text)], "data": text}]}


def outputs(answer: httpx.Response) -> dict[str, Any]:
    assert answer.status_code == 200, answer.text
    return {o["name"]: o["data"] for o in answer.json()["outputs"]}


async def test_bytes_inputs_reach_the_model_as_utf8_text(replica: httpx.AsyncClient) -> None:
    answer = await replica.post(INFER, json=inputs([1], [2], ["héllo", "x"]))
    assert outputs(answer)["text_out"] == ["héllo", "x"]


async def test_bytes_that_are_not_utf8_are_a_400(replica: httpx.AsyncClient) -> None:
    f32 = np.array([1.0], dtype=np.float32)
    body, length = oip.encode_request({"a": f32, "b": f32, "text": np.array([b"\xff\xfe"], dtype=object)}, binary=True)
    answer = await replica.post(INFER, content=body, headers={oip.BINARY_HEADER: str(length)})
    assert answer.status_code == 400 and "UTF-8" in answer.json()["error"], answer.text


async def test_an_input_the_graph_cannot_run_is_a_400_not_a_500(replica: httpx.AsyncClient) -> None:
    answer = await replica.post(INFER, json=inputs([1, 2, 3], [1, 2], ["x"]))
    assert answer.status_code == 400 and "model rejected the input" in answer.json()["error"], answer.text


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
async def test_a_compressed_body_is_inflated(replica: httpx.AsyncClient, coding: str) -> None:
    plain = json.dumps(inputs([1, 2], [3, 4], ["x"])).encode()
    body = gzip.compress(plain) if coding == "gzip" else zlib.compress(plain)
    answer = await replica.post(INFER, content=body, headers={"content-encoding": coding, "content-type": "application/json"})
    assert outputs(answer)["total"] == [4.0, 6.0]


async def test_a_body_that_inflates_past_the_limit_is_a_413(replica: httpx.AsyncClient) -> None:
    bomb = gzip.compress(b" " * (onnx_app.MAX_REQUEST_BYTES + 1))
    answer = await replica.post(INFER, content=bomb, headers={"content-encoding": "gzip"})
    assert answer.status_code == 413, answer.text


async def test_an_unknown_coding_is_a_415_naming_those_taken(replica: httpx.AsyncClient) -> None:
    answer = await replica.post(INFER, content=b"x", headers={"content-encoding": "br"})
    assert answer.status_code == 415 and answer.headers["accept-encoding"] == "gzip, deflate"


class Sent:
    """A streamed request body of ``size`` bytes in 1 MiB chunks (valid JSON, padded): how much of it was read."""

    def __init__(self, size: int) -> None:
        self.size, self.read = size, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        head = json.dumps(inputs([1], [2], ["x"])).encode()
        while self.read < self.size:
            chunk = head if self.read == 0 else b" " * min(1 << 20, self.size - self.read)
            self.read += len(chunk)
            yield chunk


async def test_a_body_declared_over_the_agents_limit_is_a_413_unread(replica: httpx.AsyncClient) -> None:
    sent = Sent(onnx_app.MAX_REQUEST_BYTES + 1)
    answer = await replica.post(INFER, content=sent, headers={"content-length": str(sent.size)})
    assert answer.status_code == 413 and "exceeds" in answer.json()["error"], answer.text
    assert sent.read < 2 << 20


async def test_a_body_sent_without_a_length_is_cut_off_past_the_agents_limit(replica: httpx.AsyncClient) -> None:
    sent = Sent(onnx_app.MAX_REQUEST_BYTES + (8 << 20))
    answer = await replica.post(INFER, content=sent)  # chunked
    assert answer.status_code == 413 and "exceeds" in answer.json()["error"], answer.text
    assert sent.read <= onnx_app.MAX_REQUEST_BYTES + (2 << 20)  # not read to its end


async def test_a_body_of_the_agents_limit_is_answered(replica: httpx.AsyncClient) -> None:
    sent = Sent(onnx_app.MAX_REQUEST_BYTES)
    assert outputs(await replica.post(INFER, content=sent))["total"] == [3.0]


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("POST", "/v2/models/m", "GET"),
    ("DELETE", "/v2/models/m/ready", "GET"),
    ("POST", "/v2/health/live", "GET"),
    ("GET", INFER, "POST"),
])
async def test_a_method_a_route_does_not_take_is_a_405_naming_the_one_it_takes(replica: httpx.AsyncClient, method: str, path: str,
                                                                               allowed: str) -> None:
    answer = await replica.request(method, path)
    assert answer.status_code == 405 and answer.headers["allow"] == allowed, (answer.status_code, answer.text)
    assert answer.json()["error"] == f"method not allowed; use {allowed}"

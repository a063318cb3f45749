"""The official Open Inference Protocol client (tritonclient) against a real agent, over HTTP
and gRPC, and against the gateway over HTTP: the protocol as other tools speak it, JSON and
binary tensors, several datatypes, and errors that client reports cleanly.

One control plane and one agent subprocess serve two tiny ONNX models built here: the MLP
(FP32) and a "typed" model (INT64, FP16, BYTES). Answers are compared exactly with
onnxruntime run directly on the same files. tritonclient's clients are synchronous, so each
call runs in a worker thread while the event loop serves the gateway."""

from __future__ import annotations

import asyncio
import gzip
import json
import pathlib
import re
import sys
import zlib
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import pytest_asyncio
import tritonclient.http as httpclient
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from orchestrator.testing import harness, manifests, onnx_models

pytestmark = pytest.mark.asyncio(loop_scope="module")

SITE = "edge-lyon"
MLP, TYPED = "mlp", "typed"


def build_typed(path: pathlib.Path) -> str:
    """INT64, FP16 and string inputs, each with its own output; returns the file's sha256."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["ids", "ids"], ["ids_twice"]),
            helper.make_node("Mul", ["half", "half"], ["half_squared"]),
            helper.make_node("Identity", ["text"], ["text_out"]),
        ],
        "typed",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 3]),
            helper.make_tensor_value_info("half", TensorProto.FLOAT16, ["batch", 2]),
            helper.make_tensor_value_info("text", TensorProto.STRING, ["batch"]),
        ],
        [
            helper.make_tensor_value_info("ids_twice", TensorProto.INT64, ["batch", 3]),
            helper.make_tensor_value_info("half_squared", TensorProto.FLOAT16, ["batch", 2]),
            helper.make_tensor_value_info("text_out", TensorProto.STRING, ["batch"]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_models.OPSET)], producer_name="edgeplane")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return onnx_models.sha256_file(path)


class Served:
    def __init__(self, fleet: harness.Fleet, mlp_path: pathlib.Path, typed_path: pathlib.Path, grpc_port: int) -> None:
        self.fleet = fleet
        assert fleet.cp is not None
        self.gateway = fleet.cp.http_url.removeprefix("http://")
        self.agent_http = fleet.agents[SITE].url.removeprefix("http://").rstrip("/")
        self.agent_grpc = f"127.0.0.1:{grpc_port}"
        self.mlp = ort.InferenceSession(str(mlp_path), providers=["CPUExecutionProvider"])
        self.typed = ort.InferenceSession(str(typed_path), providers=["CPUExecutionProvider"])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("triton")
    mlp = onnx_models.build_mlp(root / "artifacts" / "mlp.onnx", in_dim=8, hidden=16, out_dim=4, seed=5)
    typed_sha = build_typed(root / "artifacts" / "typed.onnx")
    fleet = harness.Fleet(root)
    try:
        cp = await fleet.start_control_plane()
        bundle = manifests.bundle(
            manifests.edge_site(SITE, country="FR", lat=45.76, lon=4.83, region="fr"),
            manifests.onnx_model(MLP, "mlp.onnx", mlp.sha256),
            manifests.onnx_model(TYPED, "typed.onnx", typed_sha),
            manifests.deployment("mlp-fr", MLP, 1, {"residency": ["FR"], "tiers": ["edge"]}),
            manifests.deployment("typed-fr", TYPED, 1, {"residency": ["FR"], "tiers": ["edge"]}),
        )
        async with httpx.AsyncClient(base_url=cp.http_url) as http:
            resp = await http.post("/v1/apply", content=bundle)
            assert resp.status_code == 200, resp.text
        agent = await fleet.start_agent(SITE, country="FR", region="fr", lat=45.76, lon=4.83,
                                        extra=("--grpc-listen", "127.0.0.1:0"))
        for name in (MLP, TYPED):
            await harness.wait_until(lambda n=name: any(e.healthy for e in cp.table.endpoints(n)), 60, what=f"{name} endpoint")
        found = await harness.wait_until(lambda: re.search(r"serving v2 over gRPC on [\d.]+:(\d+)", agent.log()), 30,
                                         what="the agent's gRPC port")
        yield Served(fleet, mlp.path, root / "artifacts" / "typed.onnx", int(found.group(1)))
    finally:
        await fleet.stop()


def http_client(url: str) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url=url, network_timeout=30.0, connection_timeout=10.0)


async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(fn, *args, **kwargs)


def features(batch: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 8)).astype(np.float32)


# --- HTTP, to the agent and through the gateway ------------------------------------------------

HTTP_TARGETS = ["agent", "gateway"]


def http_url(served: Served, target: str) -> str:
    return served.agent_http if target == "agent" else served.gateway


def http_health_and_metadata(url: str) -> None:
    client = http_client(url)
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready(MLP)
        meta = client.get_model_metadata(MLP)
        assert meta["name"] == MLP
        assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [("input", "FP32", [-1, 8])]
        assert [(t["name"], t["datatype"]) for t in meta["outputs"]] == [("output", "FP32")]
        typed = client.get_model_metadata(TYPED)
        assert {t["name"]: t["datatype"] for t in typed["inputs"]} == {"ids": "INT64", "half": "FP16", "text": "BYTES"}
    finally:
        client.close()


@pytest.mark.parametrize("target", HTTP_TARGETS)
async def test_http_health_and_metadata(served: Served, target: str) -> None:
    await call(http_health_and_metadata, http_url(served, target))


def http_infer_mlp(url: str, x: np.ndarray, binary: bool) -> np.ndarray:
    client = http_client(url)
    try:
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = httpclient.InferRequestedOutput("output", binary_data=binary)
        result = client.infer(MLP, [inp], outputs=[out], request_id="req-7")
        assert result.get_response()["model_name"] == MLP
        assert result.get_response()["id"] == "req-7"
        return result.as_numpy("output")
    finally:
        client.close()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("target", HTTP_TARGETS)
async def test_http_fp32_infer_matches_onnxruntime_exactly(served: Served, target: str, binary: bool) -> None:
    x = features(seed=1)
    got = await call(http_infer_mlp, http_url(served, target), x, binary)
    [want] = served.mlp.run(["output"], {"input": x})
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)  # bit for bit, JSON included


def typed_inputs() -> dict[str, np.ndarray]:
    """The same values as triton_grpc_probe.TYPED_INPUTS (that module cannot be imported here)."""
    return {
        "ids": np.array([[1, -2, 2**40], [0, 7, -(2**50)]], dtype=np.int64),
        "half": np.array([[0.5, -1.25], [3.0, 127.9375]], dtype=np.float16),
        "text": np.array(["héllo".encode(), b"two words"], dtype=np.object_),
    }


def http_infer_typed(url: str, binary: bool) -> dict[str, np.ndarray]:
    client = http_client(url)
    try:
        inputs = []
        for name, arr in typed_inputs().items():
            datatype = {"ids": "INT64", "half": "FP16", "text": "BYTES"}[name]
            inp = httpclient.InferInput(name, list(arr.shape), datatype)
            # FP16 has no JSON form in tritonclient: always binary
            inp.set_data_from_numpy(arr, binary_data=binary or name == "half")
            inputs.append(inp)
        outputs = [httpclient.InferRequestedOutput(n, binary_data=binary or n == "half_squared")
                   for n in ("ids_twice", "half_squared", "text_out")]
        result = client.infer(TYPED, inputs, outputs=outputs)
        return {n: result.as_numpy(n) for n in ("ids_twice", "half_squared", "text_out")}
    finally:
        client.close()


def expected_typed(served: Served) -> dict[str, np.ndarray]:
    feeds = typed_inputs()
    feeds["text"] = np.array([s.decode() for s in feeds["text"]], dtype=np.object_)
    names = ["ids_twice", "half_squared", "text_out"]
    return dict(zip(names, served.typed.run(names, feeds), strict=True))


def assert_typed(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got["ids_twice"].dtype == np.int64
    np.testing.assert_array_equal(got["ids_twice"], want["ids_twice"])
    assert got["half_squared"].dtype == np.float16
    np.testing.assert_array_equal(got["half_squared"], want["half_squared"])
    assert [bytes(s) for s in got["text_out"]] == [s.encode() for s in want["text_out"]]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("target", HTTP_TARGETS)
async def test_http_int64_fp16_bytes(served: Served, target: str, binary: bool) -> None:
    got = await call(http_infer_typed, http_url(served, target), binary)
    assert_typed(got, expected_typed(served))


def http_refusal(url: str, model: str, x: np.ndarray) -> InferenceServerException:
    client = http_client(url)
    try:
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        with pytest.raises(InferenceServerException) as refused:
            client.infer(model, [inp])
        # and the server goes on answering
        assert client.is_model_ready(MLP)
        return refused.value
    finally:
        client.close()


@pytest.mark.parametrize("target", HTTP_TARGETS)
async def test_http_errors_are_clear(served: Served, target: str) -> None:
    url = http_url(served, target)
    unknown = await call(http_refusal, url, "no-such-model", features())
    assert unknown.status() == "404", unknown
    assert "no-such-model" in unknown.message()
    wrong = await call(http_refusal, url, MLP, np.ones((2, 3), dtype=np.float32))
    assert wrong.status() == "400", wrong
    assert "shape" in wrong.message()
    assert not await call(lambda: http_client(url).is_model_ready("no-such-model"))
    not_text = await call(http_bytes_refusal, url, np.array([b"ok", b"\xff\xfe"], dtype=np.object_))
    assert not_text.status() == "400", not_text
    assert "UTF-8" in not_text.message()


def http_bytes_refusal(url: str, text: np.ndarray) -> InferenceServerException:
    """A string input that is not UTF-8: the model's string tensors cannot take it."""
    client = http_client(url)
    try:
        inputs = []
        for name, arr in {**typed_inputs(), "text": text}.items():
            datatype = {"ids": "INT64", "half": "FP16", "text": "BYTES"}[name]
            inputs.append(httpclient.InferInput(name, list(arr.shape), datatype))
            inputs[-1].set_data_from_numpy(arr, binary_data=True)
        with pytest.raises(InferenceServerException) as refused:
            client.infer(TYPED, inputs)
        assert client.is_model_ready(TYPED)
        return refused.value
    finally:
        client.close()


# --- gRPC, to the agent (tritonclient's gRPC client runs in a child process: see the probe) ---

PROBE = pathlib.Path(__file__).with_name("triton_grpc_probe.py")


async def test_grpc_agent_health_metadata_infer_and_errors(served: Served, tmp_path: pathlib.Path) -> None:
    x = features(batch=3, seed=2)
    np.save(tmp_path / "x.npy", x)
    probe = await asyncio.create_subprocess_exec(sys.executable, str(PROBE), served.agent_grpc, str(tmp_path),
                                                 stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(probe.communicate(), 60)
    assert probe.returncode == 0, output.decode(errors="replace")[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    got = np.load(tmp_path / "out.npz")

    assert report["live"] and report["ready"] and report["mlp_ready"] and not report["unknown_ready"]
    inputs = report["metadata"]["inputs"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in inputs] == [("input", "FP32", ["-1", "8"])]
    assert {t["name"]: t["datatype"] for t in report["typed_metadata"]["inputs"]} == {"ids": "INT64", "half": "FP16", "text": "BYTES"}

    assert report["id"] == "g-1"
    [want] = served.mlp.run(["output"], {"input": x})
    assert got["output"].dtype == np.float32
    np.testing.assert_array_equal(got["output"], want)
    text_out = np.array([s.encode() for s in report["text_out"]], dtype=np.object_)
    assert_typed({"ids_twice": got["ids_twice"], "half_squared": got["half_squared"], "text_out": text_out}, expected_typed(served))

    unknown, wrong = report["unknown_model"], report["wrong_shape"]
    assert unknown["status"] == "StatusCode.NOT_FOUND" and "no-such-model" in unknown["message"], unknown
    assert wrong["status"] == "StatusCode.INVALID_ARGUMENT" and "shape" in wrong["message"], wrong
    assert unknown["ready_after"] and wrong["ready_after"]  # the agent goes on serving


def http_infer_options(url: str, x: np.ndarray, **options: Any) -> np.ndarray:
    client = http_client(url)
    try:
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        result = client.infer(MLP, [inp], outputs=[httpclient.InferRequestedOutput("output", binary_data=True)], **options)
        return result.as_numpy("output")
    finally:
        client.close()


@pytest.mark.parametrize("options", [
    {"request_compression_algorithm": "gzip"},
    {"request_compression_algorithm": "deflate"},
    {"response_compression_algorithm": "gzip"},
    {"parameters": {"note": "kept", "n": 3}, "headers": {"x-trace": "t-1"}},
    {"priority": 1, "timeout": 5_000_000},
], ids=["gzip-request", "deflate-request", "gzip-response", "parameters", "priority-timeout"])
@pytest.mark.parametrize("target", HTTP_TARGETS)
async def test_http_client_options(served: Served, target: str, options: dict[str, Any]) -> None:
    x = features(seed=4)
    got = await call(http_infer_options, http_url(served, target), x, **options)
    [want] = served.mlp.run(["output"], {"input": x})
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(("encoding", "body", "status", "words"), [
    ("gzip", b"not gzip at all", 400, "not valid gzip"),
    ("gzip", gzip.compress(b'{"inputs": []}', mtime=0)[:-6], 400, "truncated"),
    ("br", b"\x00", 415, "not supported"),
    ("deflate", zlib.compress(bytes(65 << 20)), 413, "once inflated"),  # a 64 KiB bomb of 65 MiB
])
@pytest.mark.parametrize("target", HTTP_TARGETS)
async def test_bad_compressed_bodies_are_refused(served: Served, target: str, encoding: str, body: bytes,
                                                 status: int, words: str) -> None:
    async with httpx.AsyncClient(base_url=f"http://{http_url(served, target)}", timeout=30) as http:
        resp = await http.post(f"/v2/models/{MLP}/infer", content=body, headers={"content-encoding": encoding})
        assert resp.status_code == status, resp.text
        assert words in resp.json()["error"]
        assert resp.headers.get("accept-encoding") == ("gzip, deflate" if status == 415 else None)  # RFC 9110, through the gateway too
        assert (await http.get(f"/v2/models/{MLP}/ready")).status_code == 200

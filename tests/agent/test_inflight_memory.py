"""The memory all requests in flight hold together is bounded: past the budget a request is
refused at once (503 with Retry-After, gRPC RESOURCE_EXHAUSTED) while the agent serves the
others, one larger than the whole budget gets a 413 that says so, and whatever way a request
ends (answered, refused, its client gone, bad input) what it held is given back. A real
agent with a small budget, real HTTP on loopback (raw sockets, so that a request can be left
half sent), real gRPC, real onnxruntime."""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections.abc import Awaitable, Callable

import grpc
import numpy as np
import pytest

from edge_agent import capacity, daemon, inflight
from edgeplane_proto import oip
from edgeplane_proto.inference.v2 import inference_pb2 as pb
from edgeplane_proto.inference.v2 import inference_pb2_grpc as pb_grpc
from orchestrator.agents import model

from .conftest import SITE, ControlPlane, MakeAgent, Models
from .test_agent import assignment, reference, wait_model
from .test_grpc_inference import raw_request

MB = 1 << 20
BUDGET = 4 * MB
ROWS = MB // 32  # rows of 8 float32 values: a binary body of 1 MiB and a head


def binary(rows: int, seed: int = 0) -> tuple[np.ndarray, bytes, int]:
    x = np.random.default_rng(seed).standard_normal((rows, 8)).astype(np.float32)
    body, header = oip.encode_request({"input": x}, binary=True)
    assert header is not None
    return x, body, header


class Raw:
    """One HTTP/1.1 connection to the agent, written and read by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Raw:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def head(self, length: int, *, path: str = "/v2/models/mlp/infer", headers: dict[str, str] | None = None) -> None:
        lines = [f"POST {path} HTTP/1.1", "Host: agent", f"Content-Length: {length}",
                 *(f"{k}: {v}" for k, v in (headers or {}).items())]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await self.writer.drain()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self) -> tuple[int, dict[str, str], bytes]:
        async with asyncio.timeout(10):
            head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return int(head[0].split()[1]), headers, body

    def close(self) -> None:
        self.writer.close()


async def until(check: Callable[[], bool], what: Callable[[], str]) -> None:
    for _ in range(1000):  # bounded: 10 s
        if check():
            return
        await asyncio.sleep(0.01)
    pytest.fail(what())


async def held(agent: daemon.Agent, n: int) -> None:
    await until(lambda: agent.budget.held == n, lambda: f"requests in flight hold {agent.budget.held} bytes, not {n}")


async def metrics(port: int) -> dict[str, float]:
    conn = await Raw.open(port)
    try:
        conn.writer.write(b"GET /metrics HTTP/1.1\r\nHost: agent\r\n\r\n")
        status, _, body = await conn.answer()
    finally:
        conn.close()
    assert status == 200
    return {name: float(value) for name, _, value in (line.rpartition(" ") for line in body.decode().splitlines())
            if not name.startswith("#")}


async def serving(cp: ControlPlane, make_agent: MakeAgent, models: Models, **config: object) -> tuple[daemon.Agent, int]:
    agent = await make_agent(cp, **config)
    cp.hub.set_assignments(SITE, [assignment(models.v1_url, models.v1)], version=1)
    await wait_model(cp, lambda s: s.phase is model.ModelPhase.READY)
    port = urllib.parse.urlsplit(agent.endpoint_url).port
    assert port is not None
    return agent, port


async def test_past_the_budget_requests_are_refused_at_once_and_the_others_served(
    control_plane: ControlPlane, make_agent: MakeAgent, models: Models
) -> None:
    agent, port = await serving(control_plane, make_agent, models, max_inflight_bytes=BUDGET)
    x, body, header = binary(ROWS)
    headers = {oip.BINARY_HEADER: str(header)}
    admitted = []
    for n in range(1, 4):  # three bodies on their way: three of the four MiB
        conn = await Raw.open(port)
        await conn.head(len(body), headers=headers)
        await held(agent, n * len(body))
        admitted.append(conn)
    for _ in range(2):  # a fourth and a fifth do not fit: refused from their heads, before their bodies
        late = await Raw.open(port)
        await late.head(len(body), headers=headers)
        status, answer_headers, error = await late.answer()
        assert status == 503, error
        assert answer_headers["retry-after"] == "1"
        message = json.loads(error)["error"]
        assert "requests in flight hold 3.0 MB of the 4.0 MB this agent lets them hold (--max-inflight-bytes)" in message
        late.close()
    for conn in admitted:
        await conn.send(body)
    for conn in admitted:
        status, answer_headers, out = await conn.answer()
        assert status == 200, out
        answer = oip.decode_response(out, int(answer_headers[oip.BINARY_HEADER.lower()]))
        np.testing.assert_allclose(answer.outputs[0].array, reference(models.v1, 0, x), rtol=1e-5, atol=1e-6)
        conn.close()
    await held(agent, 0)
    seen = await metrics(port)
    assert seen["edgeplane_agent_inflight_bytes"] == 0
    assert seen["edgeplane_agent_inflight_bytes_limit"] == BUDGET
    assert seen['edgeplane_agent_requests_refused_for_memory_total{code="503"}'] == 2
    assert seen['edgeplane_agent_infer_requests_total{code="200",model="mlp"}'] == 3
    assert agent.server.inflight == 0


async def test_a_burst_of_large_requests_is_served_or_refused_and_the_agent_stays_up(
    control_plane: ControlPlane, make_agent: MakeAgent, models: Models
) -> None:
    agent, port = await serving(control_plane, make_agent, models, max_inflight_bytes=BUDGET)
    _, body, header = binary(ROWS)

    async def post() -> int:
        conn = await Raw.open(port)
        try:
            await conn.head(len(body), headers={oip.BINARY_HEADER: str(header)})
            await conn.send(body)
            status, _, _ = await conn.answer()
            return status
        finally:
            conn.close()

    statuses = await asyncio.gather(*(post() for _ in range(12)))
    assert set(statuses) <= {200, 503} and 200 in statuses
    await held(agent, 0)
    assert await post() == 200  # still up, and the budget whole again
    seen = await metrics(port)
    assert seen['edgeplane_agent_requests_refused_for_memory_total{code="503"}'] == statuses.count(503)


async def test_a_request_larger_than_the_whole_budget_gets_a_413_before_its_body(
    control_plane: ControlPlane, make_agent: MakeAgent, models: Models
) -> None:
    agent, port = await serving(control_plane, make_agent, models, max_inflight_bytes=BUDGET)
    conn = await Raw.open(port)
    await conn.head(5 * MB, headers={"Expect": "100-continue"})
    status, _, error = await conn.answer()  # the answer, not 100 Continue: the client sends none of it
    assert status == 413
    assert json.loads(error)["error"] == ("this request needs about 5.0 MB of memory (its body), more than this agent lets "
                                          "all requests in flight hold together (4.0 MB, --max-inflight-bytes)")
    conn.close()
    # under /v1 the refusal is OpenAI's error object
    v1 = await Raw.open(port)
    await v1.head(5 * MB, path="/v1/chat/completions", headers={"Expect": "100-continue"})
    status, _, error = await v1.answer()
    assert status == 413 and json.loads(error)["error"]["code"] == "request_too_large"
    v1.close()
    # a chunked body is charged as it arrives
    chunked = await Raw.open(port)
    chunked.writer.write(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: agent\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(5):
        chunked.writer.write(b"%x\r\n%b\r\n" % (MB, b"0" * MB))
    status, _, error = await chunked.answer()
    assert status == 413 and "--max-inflight-bytes" in json.loads(error)["error"]
    chunked.close()
    await held(agent, 0)
    assert (await metrics(port))['edgeplane_agent_requests_refused_for_memory_total{code="413"}'] == 3


async def test_a_json_body_is_charged_what_decoding_it_may_take(
    control_plane: ControlPlane, make_agent: MakeAgent, models: Models
) -> None:
    agent, port = await serving(control_plane, make_agent, models, max_inflight_bytes=BUDGET)
    x = np.random.default_rng(1).standard_normal((500, 8)).astype(np.float32)
    body, _ = oip.encode_request({"input": x})  # 500 x 8 values: about 2.2 MB to decode, at most
    assert 2 * MB < inflight.json_decode_bytes(len(body)) < 3 * MB
    conn = await Raw.open(port)
    await conn.head(len(body))
    await conn.send(body)
    status, _, out = await conn.answer()  # alone, it fits
    assert status == 200, out
    np.testing.assert_allclose(oip.decode_response(out).outputs[0].array, reference(models.v1, 0, x), rtol=1e-5, atol=1e-6)
    await held(agent, 0)

    _, big, header = binary(ROWS)
    waiting = []
    for n in range(1, 3):  # two binary bodies on their way hold two MiB: the JSON's decoding does not fit
        other = await Raw.open(port)
        await other.head(len(big), headers={oip.BINARY_HEADER: str(header)})
        await held(agent, n * len(big))
        waiting.append(other)
    await conn.head(len(body))
    await conn.send(body)
    status, answer_headers, error = await conn.answer()
    assert status == 503 and answer_headers["retry-after"] == "1", error
    for other in waiting:
        other.close()
    await held(agent, 0)

    huge, _ = oip.encode_request({"input": np.ones((1000, 8), np.float32) / 3})  # more than all of it to decode
    await conn.head(len(huge))
    await conn.send(huge)
    status, _, error = await conn.answer()
    assert status == 413
    assert "binary tensors (Inference-Header-Content-Length) need no decoding" in json.loads(error)["error"]
    conn.close()
    await held(agent, 0)
    seen = await metrics(port)
    assert seen['edgeplane_agent_infer_requests_total{code="503",model="mlp"}'] == 1
    assert seen['edgeplane_agent_infer_requests_total{code="413",model="mlp"}'] == 1


async def test_whatever_way_a_request_ends_what_it_held_is_given_back(
    control_plane: ControlPlane, make_agent: MakeAgent, models: Models
) -> None:
    agent, port = await serving(control_plane, make_agent, models, max_inflight_bytes=BUDGET)
    x, body, header = binary(ROWS)
    headers = {oip.BINARY_HEADER: str(header)}

    async def ends(how: Callable[[Raw], Awaitable[None]], expected: int | None) -> None:
        conn = await Raw.open(port)
        try:
            await how(conn)
            if expected is not None:
                status, _, text = await conn.answer()
                assert status == expected, text
        finally:
            conn.close()
        await held(agent, 0)

    async def half_sent(conn: Raw) -> None:  # the client goes away in the middle of its body
        await conn.head(len(body), headers=headers)
        await conn.send(body[: len(body) // 2])
        await held(agent, len(body))

    async def continue_unanswered(conn: Raw) -> None:  # asked for 100 Continue, then left
        await conn.head(len(body), headers={**headers, "Expect": "100-continue"})
        assert await conn.reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"

    async def gone_before_the_answer(conn: Raw) -> None:  # its run queued or under way
        await conn.head(len(body), headers=headers)
        await conn.send(body)

    async def bad_json(conn: Raw) -> None:
        junk = b'{"inputs": [' + b"1," * 8000
        await conn.head(len(junk))
        await conn.send(junk)

    async def wrong_input(conn: Raw) -> None:  # the model refuses it (its input is "input")
        wrong, _ = oip.encode_request({"nope": x[:600]})
        await conn.head(len(wrong))
        await conn.send(wrong)

    async def wrong_shape(conn: Raw) -> None:
        wrong, length = oip.encode_request({"input": np.ones((ROWS, 7), np.float32)}, binary=True)
        await conn.head(len(wrong), headers={oip.BINARY_HEADER: str(length)})
        await conn.send(wrong)

    async def no_such_model(conn: Raw) -> None:
        await conn.head(len(body), path="/v2/models/ghost/infer", headers=headers)
        await conn.send(body)

    async def not_gzip(conn: Raw) -> None:
        await conn.head(len(body), headers={**headers, "Content-Encoding": "gzip"})
        await conn.send(body)

    async def malformed_chunk(conn: Raw) -> None:
        await conn.send(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: agent\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"%x\r\n%b\r\nzz\r\n" % (MB, b"0" * MB))

    for how, expected in ((half_sent, None), (continue_unanswered, None), (gone_before_the_answer, None), (bad_json, 400),
                          (wrong_input, 400), (wrong_shape, 400), (no_such_model, 404), (not_gzip, 400),
                          (malformed_chunk, 400)):
        await ends(how, expected)
    seen = await metrics(port)
    assert seen["edgeplane_agent_inflight_bytes"] == 0
    assert seen['edgeplane_agent_requests_refused_for_memory_total{code="503"}'] == 0
    assert agent.server.inflight == 0


async def test_over_grpc_a_call_past_the_budget_is_resource_exhausted(
    control_plane: ControlPlane, make_agent: MakeAgent, models: Models
) -> None:
    agent, port = await serving(control_plane, make_agent, models, max_inflight_bytes=BUDGET,
                                grpc_listen=("127.0.0.1", 0))
    _, body, header = binary(ROWS)
    x = np.ones((MB // 2 // 32 * 3, 8), np.float32)  # 1.5 MiB of raw values: 3 MiB charged, the message and its parse
    async with grpc.aio.insecure_channel(f"127.0.0.1:{agent.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        waiting = []
        for n in range(1, 3):  # two HTTP bodies on their way hold two MiB
            conn = await Raw.open(port)
            await conn.head(len(body), headers={oip.BINARY_HEADER: str(header)})
            await held(agent, n * len(body))
            waiting.append(conn)
        with pytest.raises(grpc.aio.AioRpcError) as busy:
            await stub.ModelInfer(raw_request(x), timeout=10)
        assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "(--max-inflight-bytes), and this one needs" in str(busy.value.details())
        assert dict(busy.value.trailing_metadata())["grpc-retry-pushback-ms"] == "1000"
        for conn in waiting:
            conn.close()
        await held(agent, 0)
        assert (await stub.ModelInfer(raw_request(x), timeout=10)).model_name == "mlp"  # room again

        with pytest.raises(grpc.aio.AioRpcError) as too_large:  # 5 MiB, twice: more than all of it
            await stub.ModelInfer(raw_request(np.ones((5 * MB // 2 // 32, 8), np.float32)), timeout=10)
        assert too_large.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "more than this agent lets all requests in flight hold together" in str(too_large.value.details())
        assert "grpc-retry-pushback-ms" not in dict(too_large.value.trailing_metadata() or ())

        typed = pb.ModelInferRequest(model_name="mlp")  # 80,000 typed values, at 64 bytes each: 4.9 MiB
        values = typed.inputs.add(name="input", datatype="FP32", shape=[10_000, 8])
        values.contents.fp32_contents.extend([0.5] * 80_000)
        with pytest.raises(grpc.aio.AioRpcError) as typed_too_large:
            await stub.ModelInfer(typed, timeout=10)
        assert typed_too_large.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "raw_input_contents need none" in str(typed_too_large.value.details())
    await held(agent, 0)
    seen = await metrics(port)
    assert seen['edgeplane_agent_requests_refused_for_memory_total{code="503"}'] == 1
    assert seen['edgeplane_agent_requests_refused_for_memory_total{code="413"}'] == 2


class Free(capacity.CapacityProbe):
    """This machine, with as much memory free as the test says."""

    def __init__(self, free: int) -> None:
        super().__init__(lambda: ["CPUExecutionProvider"], gpus=lambda: ())
        self.free = free

    def memory_available(self) -> int:
        return self.free


async def test_by_default_requests_in_flight_may_hold_half_the_memory_the_agent_has_free(
    control_plane: ControlPlane, make_agent: MakeAgent, models: Models
) -> None:
    probe = Free(300 * MB)
    agent = await make_agent(control_plane, probe=probe)
    assert agent.budget.limit == 150 * MB
    probe.free = 100 * MB  # something else took memory: when the models served change, the budget follows
    control_plane.hub.set_assignments(SITE, [assignment(models.v1_url, models.v1)], version=1)
    await wait_model(control_plane, lambda s: s.phase is model.ModelPhase.READY)
    assert agent.budget.limit == 50 * MB
    port = urllib.parse.urlsplit(agent.endpoint_url).port
    assert port is not None
    assert (await metrics(port))["edgeplane_agent_inflight_bytes_limit"] == 50 * MB


@pytest.mark.parametrize(("available", "limit"), [
    (None, None),  # not measured: no bound
    (0, inflight.MIN_DEFAULT_BYTES),  # a box whose free memory reads low still answers ordinary requests
    (10 * MB, inflight.MIN_DEFAULT_BYTES),
    (100 * MB, 50 * MB),
    (8 << 30, 4 << 30),
])
def test_the_default_budget(available: int | None, limit: int | None) -> None:
    assert inflight.default_limit(available) == limit


@pytest.mark.parametrize(("length", "charged"), [
    (100, 0), (inflight.JSON_FREE_MAX_BYTES, 0),  # a binary request's head: decoded within little
    (inflight.JSON_FREE_MAX_BYTES + 1, inflight.JSON_DECODE_FACTOR * (inflight.JSON_FREE_MAX_BYTES + 1)),
    (MB, inflight.JSON_DECODE_FACTOR * MB),
])
def test_what_decoding_json_is_charged(length: int, charged: int) -> None:
    assert inflight.json_decode_bytes(length) == charged


def test_a_hold_is_given_back_once_by_its_last_holder() -> None:
    budget = inflight.Budget(100)
    hold = budget.take(40, "its body")
    assert isinstance(hold, inflight.Hold) and budget.held == 40
    assert hold.grow(30, "its body") is None and (budget.held, hold.bytes) == (70, 70)
    busy = budget.take(40, "its body")
    assert isinstance(busy, inflight.Refused) and (busy.status, busy.retry_after, budget.held) == (503, 1, 70)
    refused = hold.grow(31, "its body")  # 101 for this one request: more than the whole budget
    assert refused is not None and (refused.status, refused.retry_after, budget.held) == (413, None, 70)
    hold.pin()  # a run under way on a worker
    hold.release()  # the server is done with it: the run still holds it
    assert budget.held == 70
    hold.release()
    assert budget.held == 0
    hold.release()  # once only
    assert budget.held == 0
    assert (budget.refused_busy, budget.refused_too_large) == (1, 1)


def test_a_lowered_budget_keeps_what_is_held_and_refuses_newcomers_until_it_fits() -> None:
    budget = inflight.Budget(100)
    hold = budget.take(80, "its body")
    assert isinstance(hold, inflight.Hold)
    budget.resize(50)
    assert isinstance(budget.take(10, "its body"), inflight.Refused)
    hold.release()
    assert isinstance(budget.take(50, "its body"), inflight.Hold)
    budget.resize(None)
    assert isinstance(budget.take(1 << 40, "its body"), inflight.Hold)

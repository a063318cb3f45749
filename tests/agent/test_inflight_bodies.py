"""What a body takes beyond its bytes on the wire is charged to the memory budget of requests
in flight before it is taken: a compressed body as it inflates, piece by piece, so that a
burst of small compressed bodies that inflate to large ones never holds more than the
budget; an OpenAI chat or completion body for what decoding its JSON may take, before it
is parsed. A real agent with a small budget, real HTTP on loopback, real onnxruntime; the
memory is the peak of what this process allocates while the burst lasts (``tracemalloc``:
every inflated byte is a Python ``bytes``, and zlib's buffers come from Python's allocator
too). Not its peak resident size: that counts as well what the allocator keeps of the freed
pieces in each thread's arena, and whatever else the process does meanwhile, which on a busy
machine varied from 3.8 to 9.6 MB over the 4 MiB budget between runs of the same code."""

from __future__ import annotations

import asyncio
import gzip
import json
import tracemalloc
import zlib

import numpy as np
import pytest

from edge_agent import inflight
from edgeplane_proto import oip

from .conftest import ControlPlane, MakeAgent, Models
from .test_agent import reference
from .test_inflight_memory import BUDGET, MB, Raw, held, metrics, serving

def zeros(rows: int) -> tuple[np.ndarray, bytes, int]:
    """A binary request of ``rows`` x 8 float32 zeros: a few KB once compressed."""
    x = np.zeros((rows, 8), np.float32)
    body, header = oip.encode_request({"input": x}, binary=True)
    assert header is not None
    return x, body, header


async def post(port: int, body: bytes, headers: dict[str, str], path: str = "/v2/models/mlp/infer") -> tuple[int, dict[str, str], bytes]:
    conn = await Raw.open(port)
    try:
        await conn.head(len(body), path=path, headers=headers)
        await conn.send(body)
        return await conn.answer()
    finally:
        conn.close()


async def test_a_burst_of_compressed_bodies_never_holds_more_than_the_budget_while_they_inflate(
    control_plane: ControlPlane, make_agent: MakeAgent, models: Models
) -> None:
    agent, port = await serving(control_plane, make_agent, models, max_inflight_bytes=BUDGET)
    # One that fits, compressed either way: inflated, answered, and all it held given back.
    x, body, header = zeros(MB // 32)
    for coding, packed in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
        status, answer_headers, out = await post(port, packed, {oip.BINARY_HEADER: str(header), "Content-Encoding": coding})
        assert status == 200, out
        answer = oip.decode_response(out, int(answer_headers[oip.BINARY_HEADER.lower()]))
        np.testing.assert_allclose(answer.outputs[0].array, reference(models.v1, 0, x), rtol=1e-5, atol=1e-6)
        await held(agent, 0)

    # Eight bodies of 12 KB each, every one 12 MiB once inflated: three times the budget.
    _, big, big_header = zeros(12 * MB // 32)
    packed = gzip.compress(big)
    assert len(packed) < 64 * 1024
    tracing = tracemalloc.is_tracing()
    tracemalloc.start()
    tracemalloc.reset_peak()
    before, _ = tracemalloc.get_traced_memory()
    try:
        answers = await asyncio.gather(*(post(port, packed, {oip.BINARY_HEADER: str(big_header), "Content-Encoding": "gzip"})
                                         for _ in range(8)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        if not tracing:
            tracemalloc.stop()
    grew = peak - before
    for status, _, error in answers:
        assert status in (413, 503), error
        if status == 413:
            assert "its body, inflated" in json.loads(error)["error"]
    # The budget, and the requests' own small change (measured: 4.2 MB in all, run after run);
    # inflated before being charged, the eight took 92.5 MB (129 MB resident).
    assert grew < 2 * BUDGET, f"the agent's memory grew {grew / MB:.1f} MB while the bodies inflated"
    await held(agent, 0)
    assert agent.server.inflight == 0


async def test_a_compressed_chat_body_is_charged_as_it_inflates(
    control_plane: ControlPlane, make_agent: MakeAgent, models: Models
) -> None:
    agent, port = await serving(control_plane, make_agent, models, max_inflight_bytes=BUDGET)
    _, body, header = zeros(MB // 32)
    waiting = []
    for n in range(1, 3):  # two bodies on their way hold two of the four MiB
        conn = await Raw.open(port)
        await conn.head(len(body), headers={oip.BINARY_HEADER: str(header)})
        await held(agent, n * len(body))
        waiting.append(conn)
    chat = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "a" * (5 * MB // 2)}]}).encode()
    status, answer_headers, error = await post(port, gzip.compress(chat), {"Content-Encoding": "gzip"},
                                               path="/v1/chat/completions")
    assert status == 503, error
    assert answer_headers["retry-after"] == "1"
    assert json.loads(error)["error"]["code"] == "server_busy"
    for conn in waiting:
        conn.close()
    await held(agent, 0)


def chat_body(length: int) -> bytes:
    """A chat body of about ``length`` bytes, its one message a long string."""
    return json.dumps({"model": "chat", "messages": [{"role": "user", "content": "a" * (length - 60)}]}).encode()


async def test_a_chat_body_is_charged_what_decoding_it_may_take(
    control_plane: ControlPlane, make_agent: MakeAgent, models: Models
) -> None:
    agent, port = await serving(control_plane, make_agent, models, max_inflight_bytes=BUDGET)
    small = chat_body(20_000)  # about 1 MB to decode, at most: read, and the model looked for
    assert inflight.openai_decode_bytes(len(small)) == inflight.JSON_DECODE_FACTOR * len(small)
    status, _, error = await post(port, small, {}, path="/v1/chat/completions")
    assert status == 404 and json.loads(error)["error"]["code"] == "model_not_found", error
    await held(agent, 0)

    _, body, header = zeros(MB // 32)
    waiting = []
    for n in range(1, 3):  # two bodies on their way hold two of the four MiB: its decoding does not fit
        conn = await Raw.open(port)
        await conn.head(len(body), headers={oip.BINARY_HEADER: str(header)})
        await held(agent, n * len(body))
        waiting.append(conn)
    status, answer_headers, error = await post(port, chat_body(40_000), {}, path="/v1/chat/completions")
    assert status == 503 and answer_headers["retry-after"] == "1", error
    assert json.loads(error)["error"]["code"] == "server_busy"
    for conn in waiting:
        conn.close()
    await held(agent, 0)

    status, _, error = await post(port, chat_body(100_000), {}, path="/v1/chat/completions")  # more than all of it
    assert status == 413, error
    refused = json.loads(error)["error"]
    assert refused["code"] == "request_too_large"
    assert "its body, and up to 52 x it while it is decoded" in refused["message"]
    await held(agent, 0)
    seen = await metrics(port)
    assert seen['edgeplane_agent_requests_refused_for_memory_total{code="503"}'] == 1
    assert seen['edgeplane_agent_requests_refused_for_memory_total{code="413"}'] == 1
    assert seen['edgeplane_agent_infer_requests_total{code="413",model="(unknown)"}'] == 1  # its model not read yet


@pytest.mark.parametrize(("length", "charged"), [
    (100, 0), (inflight.JSON_FREE_MAX_BYTES, 0),
    (64 * 1024, inflight.JSON_DECODE_FACTOR * 64 * 1024),  # read by json.loads, no bound on its values: 52 x
    (512 * 1024, inflight.JSON_DECODE_FACTOR * 512 * 1024),
    # past the values the body may hold, only its strings grow with it (a string with one
    # character past U+FFFF takes 4 bytes a character, in the body's text and in its own)
    (MB, inflight.OPENAI_STRING_FACTOR * MB + inflight.OPENAI_VALUES_BYTES),
    (64 * MB, inflight.OPENAI_STRING_FACTOR * 64 * MB + inflight.OPENAI_VALUES_BYTES),
])
def test_what_decoding_a_chat_body_is_charged(length: int, charged: int) -> None:
    assert inflight.openai_decode_bytes(length) == charged

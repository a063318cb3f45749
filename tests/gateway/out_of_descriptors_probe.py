"""A gateway whose process has no file descriptor left, run by
``test_gateway_out_of_descriptors`` in a child process: the open-file limit is lowered here,
which the test process, shared with other tests, must not have done to it.

The gateway (v2 and OpenAI routes, a plain model and a cascade on each) sits in front of
loopback replicas that answer; its callers reach it in-process (no descriptor needed), and
every descriptor under a lowered ``RLIMIT_NOFILE`` is then taken, so that each connection it
opens to a replica fails with ``EMFILE``, as a gateway's does under a load past its limit.
Prints one JSON object: what each caller got while none was left, the replicas ejected, what
the gateway logged (once, then once more when its clock has moved past the log's interval),
and what each caller got once the descriptors were freed. Cascades whose first stage is
unsure escalate to a replica that closes each connection, while the first stage's is kept:
with no descriptor left, the first stage still answers and its answer stands.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
import os
import resource
import socket
from typing import Any

import httpx
import numpy as np
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

import loopback
import openai_cascades
from edge_agent import httplistener, httpmessages
from edgeplane_proto import oip
from orchestrator.api import methods
from orchestrator.gateway import cascade, cascade_rules, endpoints, openai_routes, proxy, routing, upstream

PARIS = {"x-edgeplane-location": "48.85,2.35"}
TENSORS = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]}
HI = [{"role": "user", "content": "hi"}]
SURE = cascade_rules.TensorRule("p", logits=False, measure="top", below=0.8)
CALLS: dict[str, tuple[str, dict[str, Any], dict[str, str]]] = {
    "v2": ("/v2/models/m/infer", TENSORS, {}),
    "v2 cascade": ("/v2/models/cm/infer", TENSORS, {}),
    "openai": ("/openai/v1/chat/completions", {"model": "g", "messages": HI}, {}),
    "openai streamed": ("/openai/v1/chat/completions", {"model": "g", "messages": HI, "stream": True}, {}),
    "openai cascade": ("/openai/v1/chat/completions", {"model": "chat", "messages": HI}, {}),
    # the stage the caller chose streams through the relay, with the cascade's hooks
    "openai cascade streamed": ("/openai/v1/chat/completions", {"model": "chat", "messages": HI, "stream": True},
                                {"x-edgeplane-cascade": "force-first"}),
}
ESCALATING: dict[str, tuple[str, dict[str, Any], dict[str, str]]] = {
    "v2 cascade": ("/v2/models/esc/infer", TENSORS, {}),
    "openai cascade": ("/openai/v1/chat/completions", {"model": "chat-esc", "messages": HI}, {}),
    "openai cascade streamed": ("/openai/v1/chat/completions", {"model": "chat-esc", "messages": HI, "stream": True}, {}),
}


class Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def replica(handle: httpmessages.Handler) -> tuple[httplistener.HttpServer, str]:
    server = httplistener.HttpServer(handle)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await server.start(sock)
    return server, f"http://127.0.0.1:{sock.getsockname()[1]}"


async def chatting(request: httpmessages.Request) -> httpmessages.Response:
    return openai_cascades.chat_reply(request, "hello")  # streamed when asked to be


async def unsure(request: httpmessages.Request) -> httpmessages.Response:
    if request.path.startswith("/v1/"):
        return openai_cascades.chat_reply(request, "The answer is", finish="length")  # cut at max_tokens: escalate
    payload, _ = oip.encode_response(oip.InferResponse("esc", (oip.Tensor("p", np.array([[0.5, 0.5]], dtype=np.float32)),)))
    return httpmessages.Response(200, payload)


async def closing(request: httpmessages.Request) -> httpmessages.Response:
    """A last stage that closes each connection: none is kept for it."""
    answer = await (chatting(request) if request.path.startswith("/v1/") else unsure(request))
    return dataclasses.replace(answer, headers=(*answer.headers, ("connection", "close")))


async def call(http: httpx.AsyncClient, name: str, calls: dict[str, tuple[str, dict[str, Any], dict[str, str]]] = CALLS) -> dict[str, Any]:
    path, body, headers = calls[name]
    resp = await http.post(path, json=body, headers={**PARIS, **headers})
    return {"call": name, "status": resp.status_code, "retry_after": resp.headers.get("retry-after"), "body": resp.text[:600],
            "escalation": resp.headers.get("x-edgeplane-cascade-escalation"), "reason": resp.headers.get("x-edgeplane-cascade-reason"),
            "site": resp.headers.get("x-edgeplane-site")}


def take_every_descriptor() -> list[int]:
    """Every descriptor left under a limit just above those open now."""
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 32, hard))
    taken: list[int] = []
    for _ in range(highest + 32):
        try:
            taken.append(os.open(os.devnull, os.O_RDONLY))
        except OSError as exc:
            assert exc.errno == errno.EMFILE, exc
            return taken
    raise AssertionError("the lowered limit was never reached")


async def main() -> None:
    kept = Kept()
    logging.getLogger("orchestrator.gateway.upstream").addHandler(kept)
    v2, v2_url = await loopback.v2_server("edge-a")
    chat, chat_url = await replica(chatting)
    first, first_url = await replica(unsure)
    last, last_url = await replica(closing)
    table = endpoints.EndpointTable()
    table.replace([
        routing.Endpoint("m", "m-dep", "edge-a", "edge", "FR", "fr", 48.85, 2.35, v2_url),
        routing.Endpoint("cm", "cm-dep", "edge-c", "edge", "FR", "fr", 48.85, 2.35, v2_url),
        routing.Endpoint("g", "g-dep", "edge-g", "edge", "FR", "fr", 48.85, 2.35, chat_url, api=routing.API_OPENAI),
        openai_cascades.endpoint("edge-chat", "edge", chat_url),
        openai_cascades.endpoint("dc-chat", "datacenter", chat_url),
        routing.Endpoint("esc", "esc-dep", "edge-unsure", "edge", "FR", "fr", 48.85, 2.35, first_url),
        routing.Endpoint("esc", "esc-dep", "dc-closing", "datacenter", "FR", "fr", 48.85, 2.35, last_url),
        routing.Endpoint("chat-esc", "chat-esc-dep", "edge-unsure", "edge", "FR", "fr", 48.85, 2.35, first_url, api=routing.API_OPENAI),
        routing.Endpoint("chat-esc", "chat-esc-dep", "dc-closing", "datacenter", "FR", "fr", 48.85, 2.35, last_url, api=routing.API_OPENAI),
    ])
    large = cascade_rules.StageRoute("large", frozenset({"datacenter"}), None)
    table.set_cascades({
        "cm": cascade_rules.CascadeRoute("cm", "cm-dep", (cascade_rules.StageRoute("small", frozenset({"edge"}), None),
                                                          cascade_rules.StageRoute("large", frozenset({"datacenter"}), None)), {}),
        "chat": cascade_rules.CascadeRoute("chat", "chat-dep", (cascade_rules.StageRoute("small", frozenset({"edge"}), None),
                                                                openai_cascades.DC), {}),
        "esc": cascade_rules.CascadeRoute("esc", "esc-dep", (cascade_rules.StageRoute("small", frozenset({"edge"}), SURE), large), {}),
        "chat-esc": cascade_rules.CascadeRoute("chat-esc", "chat-esc-dep", (
            cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.GenerativeRule(truncated=True)), large), {}),
    })
    now = [1000.0]
    pool = upstream.UpstreamPool(clock=lambda: now[0])
    registry = CollectorRegistry()
    handler = cascade.CascadeHandler(table, pool, cascade.CascadeMetrics.create(registry))
    gw = proxy.Gateway(table, pool, proxy.GatewayMetrics.create(registry), cascade=handler)
    app = Starlette(routes=gw.routes() + openai_routes.OpenAIGateway(gw, registry=registry).routes(),
                    exception_handlers=methods.EXCEPTION_HANDLERS)
    report: dict[str, Any] = {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=30) as http:
        # escalated while descriptors are left: the first stages' connections are kept, the last stages' closed
        report["escalated"] = [await call(http, name, ESCALATING) for name in ESCALATING]
        taken = take_every_descriptor()
        report["not_escalated"] = [await call(http, name, ESCALATING) for name in ESCALATING]
        # more requests to the one plain replica than the run of failures that ejects a replica
        report["while_out"] = [await call(http, name) for name in [*CALLS, *["v2"] * table.ejecting_500s]]
        report["logged"] = list(kept.lines)
        now[0] += upstream.OUT_OF_DESCRIPTORS_LOG_S
        report["while_out"].append(await call(http, "v2"))
        report["logged_later"] = kept.lines[len(report["logged"]):]
        report["ejected"] = sorted(table.ejected())
        for fd in taken:
            os.close(fd)
        report["after"] = [await call(http, name) for name in CALLS]
    await pool.close()
    await v2.shutdown(1)
    for server in (chat, first, last):
        await server.shutdown(1)
    print(json.dumps(report))


if __name__ == "__main__":
    asyncio.run(main())

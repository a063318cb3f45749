"""A stand-in for a large language-model Serve application, for the examples and demo.

A real deployment brings its own Serve app (vLLM or similar) by ``importPath``; this one
lets the examples and the demo exercise the ``ray-serve`` runtime on a laptop. It answers
the Open Inference Protocol like the other replicas: a ``BYTES`` input ``text_input``
gives a ``BYTES`` output ``text_output``, a deterministic toy continuation of the prompt.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from edgeplane_proto import oip

WORDS = ("the", "network", "edge", "model", "answers", "quickly", "near", "customers", "with", "care")


def complete(prompt: str, max_words: int) -> str:
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "little")
    words = [WORDS[(seed >> (i % 24) ^ i) % len(WORDS)] for i in range(max_words)]
    return f"{prompt} ... {' '.join(words)}"


@serve.deployment(name="ToyLLM")
class ToyLLM:
    def __init__(self, max_words: int = 8) -> None:
        self.max_words = max_words

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/")
        if path.endswith(("/v2/health/live", "/v2/health/ready", "/ready")):
            return Response(json.dumps({"ready": True}), media_type="application/json")
        if request.method == "GET" and "/v2/models/" in path:
            name = path.rsplit("/v2/models/", 1)[1].split("/")[0]
            meta = oip.model_metadata(name, [("text_input", "BYTES", [-1])], [("text_output", "BYTES", [-1])], platform="ray-serve")
            return Response(json.dumps(meta), media_type="application/json")
        if request.method != "POST" or not path.endswith("/infer"):
            return Response(oip.error_body(f"no route {path}"), status_code=404, media_type="application/json")
        try:
            req = oip.decode_request(await request.body(), _header_length(request))
        except oip.ProtocolError as exc:
            return Response(oip.error_body(str(exc)), status_code=400, media_type="application/json")
        prompts = req.inputs[0].array.reshape(-1)
        texts = [complete(p.decode(errors="replace") if isinstance(p, bytes) else str(p), self.max_words) for p in prompts]
        out = np.empty(len(texts), dtype=object)
        out[:] = [t.encode() for t in texts]
        name = path.rsplit("/v2/models/", 1)[1].split("/")[0]
        body, _ = oip.encode_response(oip.InferResponse(name, (oip.Tensor("text_output", out),), id=req.id))
        return Response(body, media_type="application/json")


def _header_length(request: Request) -> int | None:
    value = request.headers.get(oip.BINARY_HEADER)
    return int(value) if value and value.isdigit() else None


def build(args: Mapping[str, Any]) -> serve.Application:
    return ToyLLM.bind(max_words=int(args.get("max_words", 8)))

"""An in-memory upstream for the cascade handler (its constructor seam): each replica
answers as it is told to, and every URL asked for, with its headers, is recorded."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeplane_proto import oip
from orchestrator.gateway.upstream import Answer, UpstreamError, UpstreamTimeout

ANSWERS = {"sure": [[0.9, 0.1]], "unsure": [[0.55, 0.45]]}


class Transport:
    """Answers as each replica was told to, and records every URL it was asked for."""

    def __init__(self, behaviour: dict[str, str]):
        self.behaviour = behaviour
        self.calls: list[str] = []
        self.headers: list[dict[str, str]] = []  # of each call

    async def request(self, method: str, url: str, body: bytes | None = None, headers: Any = None) -> Answer:
        base = url.split("/v2/")[0]
        self.calls.append(base)
        self.headers.append(dict(headers or {}))
        how = self.behaviour[base]
        if how == "down":
            raise UpstreamError("connection refused")
        if how == "slow":
            raise UpstreamTimeout("no answer within 30s")
        if how == "5xx":
            return Answer(503, {"content-type": "application/json"}, oip.error_body("busy"))
        if how.startswith("draining "):  # as a draining agent answers: 503, retry after the seconds given
            return Answer(503, {"content-type": "application/json", "retry-after": how.split()[1]}, oip.error_body("the agent is draining"))
        if how == "500":
            return Answer(500, {"content-type": "application/json"}, oip.error_body("the run failed"))
        if how == "4xx":
            return Answer(400, {"content-type": "application/json"}, oip.error_body("input 'input' has shape [1, 3]"))
        if how == "garbage":
            return Answer(200, {"content-type": "application/json"}, b"not json")
        p = np.array(ANSWERS["sure" if how.startswith("sure") else "unsure"], dtype=np.float32)
        payload, length = oip.encode_response(oip.InferResponse("m", (oip.Tensor("p", p),)), binary=how.endswith("binary"))
        headers = {"content-type": "application/octet-stream" if length is not None else "application/json"}
        if length is not None:
            headers[oip.BINARY_HEADER.lower()] = str(length)
        return Answer(200, headers, payload)

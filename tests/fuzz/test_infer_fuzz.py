"""v2 inference fuzzing against a real agent and the gateway in front of it: any body
gets a 2xx/4xx answer (never a 5xx while the agent is up) and the daemon stays alive."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeplane_proto import oip

from .conftest import FUZZ, TRIED, FleetThread, text

DATATYPES = ["FP32", "FP64", "FP16", "INT8", "INT32", "INT64", "UINT8", "BOOL", "BYTES", "fp32", "XX", ""]
numbers = st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True), st.booleans())
leaf = st.one_of(numbers, st.none(), text(max_size=8))
data_trees = st.recursive(leaf, lambda inner: st.lists(inner, max_size=6), max_leaves=40)
json_values = st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(text(max_size=8), inner, max_size=4)),
                           max_leaves=20)
shapes = st.one_of(st.lists(st.integers(-2, 2**40), max_size=5), st.lists(st.integers(0, 9), max_size=3), json_values)


@st.composite
def tensor_specs(draw: st.DrawFn, input_name: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": draw(st.sampled_from([input_name, "x", ""]) | text(max_size=5))}
    if draw(st.booleans()):
        spec["datatype"] = draw(st.sampled_from(DATATYPES))
    if draw(st.booleans()):
        spec["shape"] = draw(shapes)
    if draw(st.integers(0, 3)):
        if draw(st.booleans()):
            rows = draw(st.integers(0, 3))
            spec["data"] = draw(st.lists(st.lists(numbers, min_size=8, max_size=8), min_size=rows, max_size=rows))
        else:
            spec["data"] = draw(data_trees)
    if draw(st.integers(0, 4)) == 0:
        spec["parameters"] = draw(st.one_of(json_values, st.fixed_dictionaries({"binary_data_size": st.integers(-5, 200)})))
    return spec


@st.composite
def bodies(draw: st.DrawFn, input_name: str) -> tuple[bytes, dict[str, str]]:
    kind = draw(st.integers(0, 9))
    headers: dict[str, str] = {"content-type": "application/json"}
    if kind == 0:
        return draw(st.binary(max_size=200)), headers
    if kind == 1:
        return json.dumps(draw(json_values)).encode(), headers
    if kind in (2, 3):  # well-formed, with extreme numbers and batch sizes (0 included)
        rows = draw(st.integers(0, 4))
        values = draw(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=rows * 8, max_size=rows * 8))
        doc = {"inputs": [{"name": input_name, "datatype": "FP32", "shape": [rows, 8], "data": values}]}
        return json.dumps(doc, allow_nan=True).encode(), headers
    doc: dict[str, Any] = {"inputs": draw(st.lists(tensor_specs(input_name), min_size=0, max_size=3))}
    if draw(st.booleans()):
        doc["outputs"] = draw(st.one_of(json_values, st.lists(st.fixed_dictionaries({"name": text(max_size=6)}, optional={"parameters": json_values}), max_size=3)))
    if draw(st.booleans()):
        doc["parameters"] = draw(json_values)
    if draw(st.booleans()):
        doc["id"] = draw(json_values)
    body = json.dumps(doc, allow_nan=True).encode()
    if draw(st.integers(0, 3)) == 0:  # binary extension: a header length and trailing bytes
        headers[oip.BINARY_HEADER] = str(draw(st.one_of(st.just(len(body)), st.integers(-3, len(body) + 10))))
        body += draw(st.binary(max_size=64))
    elif draw(st.integers(0, 9)) == 0:
        headers[oip.BINARY_HEADER] = draw(st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=5))
    return body, headers


@pytest.fixture(scope="module")
def targets(fuzz_fleet: FleetThread) -> dict[str, str]:
    cp = fuzz_fleet.fleet.cp
    assert cp is not None
    agent = fuzz_fleet.fleet.agents["edge-fuzz"]
    return {"agent": agent.url, "gateway": cp.http_url}


def _valid_body(fuzz_fleet: FleetThread) -> bytes:
    built = fuzz_fleet.built  # type: ignore[attr-defined]
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    return json.dumps({"inputs": [{"name": built.input_name, "datatype": "FP32", "shape": [2, 8], "data": x.ravel().tolist()}]}).encode()


def _fleet_state(fuzz_fleet: FleetThread) -> str:
    cp = fuzz_fleet.fleet.cp
    assert cp is not None
    status = cp.hub.status("edge-fuzz")
    heard = f"healthy={status.healthy}, last heartbeat {time.time() - status.last_heartbeat:.2f}s ago" if status else "no agent"
    return f"agent {heard}; gateway ejections {sorted(cp.table.ejected())}"


@pytest.mark.parametrize("where", ["agent", "gateway"])
def test_infer_bodies_never_5xx(fuzz_fleet: FleetThread, targets: dict[str, str], where: str) -> None:
    agent = fuzz_fleet.fleet.agents["edge-fuzz"]
    built = fuzz_fleet.built  # type: ignore[attr-defined]
    codes: dict[int, int] = {}
    first: list[str] = []  # Hypothesis reports the shrunk case; the first one says more
    with httpx.Client(base_url=targets[where], timeout=10) as http:
        assert http.post("/v2/models/intent/infer", content=_valid_body(fuzz_fleet)).status_code == 200

        @FUZZ
        @given(bodies(built.input_name), st.sampled_from(["intent", "intent", "intent", "nope", "intent%00"]))
        def fuzz(body_headers: tuple[bytes, dict[str, str]], model: str) -> None:
            TRIED[f"v2 infer bodies -> {where}"] += 1
            body, headers = body_headers
            resp = http.post(f"/v2/models/{model}/infer", content=body, headers=headers)
            codes[resp.status_code] = codes.get(resp.status_code, 0) + 1
            if resp.status_code >= 500 and not first:
                first.append(f"{resp.status_code} {resp.text[:300]!r} for {body[:300]!r} {headers}; {_fleet_state(fuzz_fleet)}")
            assert resp.status_code < 500, (resp.status_code, resp.text[:300], body[:300], headers)
            if resp.status_code >= 400:
                assert "error" in resp.json()

        try:
            fuzz()
        except AssertionError as exc:
            raise AssertionError(f"first 5xx: {first[0] if first else '-'}") from exc
        assert agent.process.poll() is None, "the agent died"
        ok = http.post("/v2/models/intent/infer", content=_valid_body(fuzz_fleet))
        assert ok.status_code == 200 and oip.decode_response(ok.content).outputs
    print(f"{where}: status codes {sorted(codes.items())}")

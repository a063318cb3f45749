"""The agent's v2 gRPC service (``inference.GRPCInferenceService``) fuzzed with structured
requests: any datatype, typed contents or raw contents (of the right size or not), shapes
past 64 bits, extra raw entries, requested outputs and parameters of every kind. Every
answer is an inference or a refusal with a deliberate status and a one-line message, and
the agent goes on answering a valid request."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeplane_proto.inference.v2 import inference_pb2 as pb
from edgeplane_proto.inference.v2 import inference_pb2_grpc as pb_grpc

from .conftest import FUZZ, TRIED, FleetThread

DATATYPES = ["FP32", "FP64", "FP16", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT64", "BOOL", "BYTES", "fp32", "", "XX"]
DELIBERATE = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}
INT64 = st.integers(-(2**63), 2**63 - 1)
CONTENTS = {
    "bool_contents": st.booleans(), "int_contents": st.integers(-(2**31), 2**31 - 1), "int64_contents": INT64,
    "uint_contents": st.integers(0, 2**32 - 1), "uint64_contents": st.integers(0, 2**64 - 1),
    "fp32_contents": st.floats(width=32), "fp64_contents": st.floats(), "bytes_contents": st.binary(max_size=8),
}
parameters = st.dictionaries(st.text(max_size=6), st.one_of(
    st.builds(pb.InferParameter, bool_param=st.booleans()), st.builds(pb.InferParameter, int64_param=INT64),
    st.builds(pb.InferParameter, string_param=st.text(max_size=8)), st.builds(pb.InferParameter, double_param=st.floats()),
    st.builds(pb.InferParameter, uint64_param=st.integers(0, 2**64 - 1))), max_size=3)


@st.composite
def valid_requests(draw: st.DrawFn, input_name: str, output_name: str) -> pb.ModelInferRequest:
    """A request the model answers, its rows of any float32 values (NaN and infinities too),
    with any id and parameters, as typed or raw contents."""
    rows = draw(st.integers(0, 4))
    values = draw(st.lists(st.floats(width=32), min_size=rows * 8, max_size=rows * 8))
    request = pb.ModelInferRequest(model_name="intent", id=draw(st.text(max_size=8)))
    for key, value in draw(parameters).items():
        request.parameters[key].CopyFrom(value)
    tensor = request.inputs.add(name=input_name, datatype="FP32", shape=[rows, 8])
    if draw(st.booleans()):
        request.raw_input_contents.append(np.array(values, np.float32).tobytes())
    else:
        tensor.contents.fp32_contents.extend(values)
    if draw(st.booleans()):
        request.outputs.add(name=output_name)
    return request


@st.composite
def requests(draw: st.DrawFn, input_name: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=draw(st.sampled_from(["intent", "intent", "intent", "nope", "", "chat"])),
                                   id=draw(st.text(max_size=8)))
    if draw(st.integers(0, 4)) == 0:
        request.model_version = draw(st.text(max_size=14))
    for key, value in draw(parameters).items():
        request.parameters[key].CopyFrom(value)
    raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        rows = draw(st.integers(0, 3))
        shape = draw(st.one_of(st.just([rows, 8]), st.lists(st.integers(-2, 2**62), max_size=4)))
        tensor = request.inputs.add(name=draw(st.sampled_from([input_name, input_name, "x", ""])),
                                    datatype=draw(st.sampled_from(DATATYPES)), shape=shape)
        for key, value in draw(parameters).items():
            tensor.parameters[key].CopyFrom(value)
        if raw:
            good = np.zeros(rows * 8, np.float32).tobytes()
            request.raw_input_contents.append(draw(st.one_of(st.just(good), st.binary(max_size=80))))
        elif draw(st.integers(0, 3)):
            field = draw(st.sampled_from(sorted(CONTENTS)))
            getattr(tensor.contents, field).extend(draw(st.lists(CONTENTS[field], max_size=24)))
    if draw(st.integers(0, 5)) == 0:
        request.raw_input_contents.append(draw(st.binary(max_size=16)))  # one entry too many
    for _ in range(draw(st.integers(0, 2))):
        out = request.outputs.add(name=draw(st.sampled_from(["probabilities", "nope", ""])))
        for key, value in draw(parameters).items():
            out.parameters[key].CopyFrom(value)
    return request


@pytest.fixture(scope="module")
def stub(fuzz_fleet: FleetThread) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{fuzz_fleet.grpc_port}") as channel:  # type: ignore[attr-defined]
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def test_random_infer_requests(fuzz_fleet: FleetThread, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    built = fuzz_fleet.built  # type: ignore[attr-defined]
    valid = pb.ModelInferRequest(model_name="intent")
    valid.inputs.add(name=built.input_name, datatype="FP32", shape=[2, 8])
    valid.raw_input_contents.append(np.ones((2, 8), np.float32).tobytes())
    assert len(stub.ModelInfer(valid, timeout=10).raw_output_contents) == 1
    codes: dict[str, int] = {}

    @FUZZ
    @given(st.one_of(valid_requests(built.input_name, built.output_name), requests(built.input_name)))
    def fuzz(request: pb.ModelInferRequest) -> None:
        TRIED["gRPC ModelInfer (agent)"] += 1
        try:
            answer = stub.ModelInfer(request, timeout=10)
        except grpc.RpcError as exc:
            codes[exc.code().name] = codes.get(exc.code().name, 0) + 1
            assert exc.code() in DELIBERATE, (exc.code(), exc.details(), request)
            assert exc.details() and "\n" not in exc.details(), exc.details()
        else:
            codes["OK"] = codes.get("OK", 0) + 1
            assert answer.model_name == "intent" and len(answer.raw_output_contents) == len(answer.outputs)

    fuzz()
    assert len(stub.ModelInfer(valid, timeout=10).raw_output_contents) == 1, codes  # still serving
    print("gRPC ModelInfer answers:", codes)
    assert codes.get("OK", 0) > 0 and codes.get("INVALID_ARGUMENT", 0) > 0, codes

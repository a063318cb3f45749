"""v2 inference answers as the gateway's cascade and the Python client read them: any body
(random bytes, random JSON, valid answers of every datatype, the same with one field
changed, with or without binary tensors) is decoded or refused with a ``ProtocolError``,
and a cascade's judge makes a verdict of whatever was decoded, never an exception."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from edgeplane_proto import oip
from orchestrator.gateway import cascade_rules as rules

from .conftest import FUZZ, TRIED
from .test_infer_fuzz import json_values

DTYPES = [np.float32, np.float64, np.float16, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
          np.uint64, np.bool_]
RULES = [rules.TensorRule("p", logits=False, measure="top", below=0.8), rules.TensorRule("p", logits=True, measure="margin", below=0.3)]


@st.composite
def arrays(draw: st.DrawFn, binary: bool) -> np.ndarray:
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    if draw(st.integers(0, 5)) == 0:
        items = st.binary(max_size=6) if binary else st.text(max_size=6).map(str.encode)  # JSON carries text only
        return np.array(draw(st.lists(items, min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))),
                        dtype=object).reshape(shape)
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    raw = draw(st.binary(min_size=int(np.prod(shape)) * dtype.itemsize, max_size=int(np.prod(shape)) * dtype.itemsize))
    arr = np.frombuffer(raw, dtype=dtype).reshape(shape) if dtype != np.bool_ else (np.frombuffer(raw, np.uint8) % 2 == 1).reshape(shape)
    return arr


@st.composite
def bodies(draw: st.DrawFn) -> tuple[bytes, int | None]:
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.binary(max_size=200)), draw(st.none() | st.integers(-2, 210))
    if kind == 1:
        return json.dumps(draw(json_values)).encode(), None
    binary = draw(st.booleans())
    outputs = tuple(oip.Tensor(draw(st.sampled_from(["p", "q", ""])), draw(arrays(binary))) for _ in range(draw(st.integers(0, 3))))
    body, length = oip.encode_response(oip.InferResponse("m", outputs), binary=binary)
    if kind == 2:
        return body, length
    # one field of one output changed to anything (or the header length changed)
    head_len = length if length is not None else len(body)
    doc = json.loads(body[:head_len])
    if doc["outputs"] and kind in (3, 4):
        spec = draw(st.sampled_from(doc["outputs"]))
        key = draw(st.sampled_from(["name", "datatype", "shape", "data", "parameters"]))
        spec[key] = draw(json_values | st.fixed_dictionaries({"binary_data_size": json_values}))
    else:
        doc[draw(st.sampled_from(["outputs", "model_name", "id"]))] = draw(json_values)
    head = json.dumps(doc).encode()
    tail = body[head_len:]
    if length is None:
        return head, None
    return head + tail, draw(st.sampled_from([len(head), len(head) - 1, len(head) + 1]))


@FUZZ
@given(bodies())
def test_any_answer_is_decoded_or_refused_and_judged(body_length: tuple[bytes, int | None]) -> None:
    TRIED["v2 answers: decode and judge"] += 1
    body, length = body_length
    try:
        decoded = oip.decode_response(body, length)
    except oip.ProtocolError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    outputs = {t.name: t.array for t in decoded.outputs}
    for rule in RULES:
        verdict = rules.judge_tensor(rule, outputs)
        assert verdict.escalate or verdict.confidence is not None
        assert "\n" not in verdict.reason

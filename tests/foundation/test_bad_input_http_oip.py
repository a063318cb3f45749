"""JSON booleans are no data of a number tensor, whichever way the body is read: orjson
(short bodies), simdjson (longer ones) or the native reader (large number arrays); BOOL
tensors keep taking them, and numbers 0 and 1 stay numbers."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from edgeplane_proto import oip, oip_reader

#: Element counts whose bodies take each reading path (short, simdjson, native).
SIZES = {"orjson": 8, "simdjson": 1000, "native": 40_000}


def body(datatype: str, data: Any, shape: list[int], key: str = "inputs") -> bytes:
    return json.dumps({key: [{"name": "x", "datatype": datatype, "shape": shape, "data": data}]}).encode()


def numbers(datatype: str, n: int, at: int, value: Any) -> list[Any]:
    """``n`` numbers of ``datatype`` with ``value`` at ``at``."""
    data: list[Any] = [0.5 if datatype.startswith("FP") else 7] * n
    data[at] = value
    return data


def test_the_sizes_take_the_paths_they_are_named_for() -> None:
    lengths = {path: len(body("FP32", [0.5] * n, [n])) for path, n in SIZES.items()}
    assert lengths["orjson"] < oip.FAST_READ_MIN_BYTES <= lengths["simdjson"] < oip_reader.NATIVE_MIN_CHARS <= lengths["native"]


CASES = [
    (f"{datatype} {path} {where}", datatype, numbers(datatype, n, at, value), [n])
    for path, n in SIZES.items()
    for datatype in ("FP32", "FP64", "FP16", "INT64", "INT8", "UINT8")
    for where, at, value in (("first", 0, True), ("last", n - 1, False))
] + [
    ("nested", "FP32", [[0.5, 0.5], [0.5, True]], [2, 2]),
    ("nested deep", "INT32", [[[1], [2]], [[False], [4]]], [2, 2, 1]),
    ("all booleans", "INT32", [True, False], [2]),
    ("a scalar", "FP64", True, []),
]


@pytest.mark.parametrize(("datatype", "data", "shape"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_booleans_in_a_number_tensor_are_refused_naming_it(datatype: str, data: Any, shape: list[int]) -> None:
    expected = f"inputs[0] 'x': {datatype} data must be numbers, not JSON booleans (true/false); send them as 1 and 0, or give the tensor datatype BOOL"
    with pytest.raises(oip.ProtocolError) as err:
        oip.decode_request(body(datatype, data, shape))
    assert str(err.value) == expected


def test_a_response_with_booleans_in_a_number_tensor_is_refused_too() -> None:
    with pytest.raises(oip.ProtocolError, match=r"outputs\[0\] 'x': FP32 data must be numbers, not JSON booleans"):
        oip.decode_response(body("FP32", [1.0, True], [2], key="outputs"))


@pytest.mark.parametrize("n", SIZES.values(), ids=SIZES.keys())
def test_bool_tensors_take_booleans_and_numbers_stay_numbers(n: int) -> None:
    flags = [i % 3 == 0 for i in range(n)]
    assert oip.decode_request(body("BOOL", flags, [n])).inputs[0].array.tolist() == flags
    zeros_and_ones = [float(f) for f in flags]
    assert oip.decode_request(body("FP32", zeros_and_ones, [n])).inputs[0].array.tolist() == zeros_and_ones
    ints = [int(f) for f in flags]
    read = oip.decode_request(body("INT64", ints, [n])).inputs[0].array
    assert read.dtype == np.int64 and read.tolist() == ints
    nested = oip.decode_request(body("UINT8", [ints[: n // 2], ints[n // 2 : 2 * (n // 2)]], [2, n // 2])).inputs[0].array
    assert nested.reshape(-1).tolist() == ints[: 2 * (n // 2)]

"""Every v2 datatype round-trips exactly through the codec, as JSON and as binary tensors.

Exactness is checked on the bytes (FP32/FP16/FP64 bit for bit, NaN payloads aside: JSON
spells one NaN), so a codec that rounds floats through a shorter form fails here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgeplane_proto import oip, oip_reader, oip_tensors

NUMERIC = sorted(oip_tensors.DATATYPES)
shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)


@pytest.fixture(autouse=True, params=["default", "fast-read"])
def reader(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test twice: as the codec reads by default (short JSON by orjson alone), and with
    even the shortest document on the simdjson read, so its fall-backs stay covered."""
    before = oip.FAST_READ_MIN_BYTES
    if request.param == "fast-read":
        oip.FAST_READ_MIN_BYTES = 0
    try:
        yield
    finally:
        oip.FAST_READ_MIN_BYTES = before


@st.composite
def tensors(draw: st.DrawFn, datatype: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    shape = draw(shapes) if shape is None else shape
    if datatype == "BYTES":
        # JSON carries BYTES as text, so they are UTF-8 strings there; binary carries any bytes.
        items = draw(st.lists(st.text(max_size=8).map(str.encode), min_size=int(np.prod(shape)),
                              max_size=int(np.prod(shape))))
        arr = np.empty(len(items), dtype=object)
        arr[:] = items
        return arr.reshape(shape)
    dtype = oip_tensors.DATATYPES[datatype]
    elements = st.floats(width=dtype.itemsize * 8, allow_nan=True) if dtype.kind == "f" else None
    return draw(hnp.arrays(dtype, shape, elements=elements))


def _same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert oip_tensors.datatype_of(a) == oip_tensors.datatype_of(b)
    if a.dtype == object:
        assert a.reshape(-1).tolist() == b.reshape(-1).tolist()
    elif a.dtype.kind == "f":
        nan = np.isnan(a)
        assert np.array_equal(nan, np.isnan(b))
        assert a[~nan].tobytes() == b[~nan].tobytes()  # bit for bit, -0.0 included
    else:
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", [*NUMERIC, "BYTES"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_tensor_round_trips_exactly(datatype: str, binary: bool, data: st.DataObject) -> None:
    first = data.draw(tensors(datatype), label="x")
    second = data.draw(tensors(datatype), label="y")
    body, length = oip.encode_request({"x": first, "y": second}, id="r", binary=binary)
    request = oip.decode_request(body, length)
    assert [t.name for t in request.inputs] == ["x", "y"]
    _same(first, request.inputs[0].array)
    _same(second, request.inputs[1].array)
    response = oip.InferResponse("m", request.inputs, model_version="1", id="r")
    out_body, out_length = oip.encode_response(response, binary=binary)
    decoded = oip.decode_response(out_body, out_length)
    _same(first, decoded.outputs[0].array)
    _same(second, decoded.outputs[1].array)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", [d for d in NUMERIC if oip_tensors.DATATYPES[d].itemsize > 1])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_big_endian_array_travels_as_its_datatype_with_its_values(datatype: str, binary: bool, data: st.DataObject) -> None:
    # Arrays read from FITS, HDF5 or the network are big-endian: the same values, the same
    # datatype, little-endian on the wire.
    x = data.draw(tensors(datatype), label="x")
    big = x.astype(x.dtype.newbyteorder(">"))
    assert oip_tensors.datatype_of(big) == datatype
    request = oip.decode_request(*oip.encode_request({"x": big}, binary=binary))
    _same(x, request.inputs[0].array)
    answer = oip.decode_response(*oip.encode_response(oip.InferResponse("m", (oip.Tensor("x", big),)), binary=binary))
    _same(x, answer.outputs[0].array)


def test_json_nonfinite_values_use_the_literals_v2_clients_read() -> None:
    arr = np.array([np.nan, np.inf, -np.inf, 1.5], dtype=np.float32)
    body, _ = oip.encode_request({"x": arr})
    assert b"NaN" in body and b"-Infinity" in body and b"null" not in body
    back = oip.decode_request(body).inputs[0].array
    assert np.isnan(back[0]) and back[1] == np.inf and back[2] == -np.inf and back[3] == 1.5


@pytest.mark.parametrize(
    ("data", "datatype", "message"),
    [
        (["1.5"], "FP32", "must be numbers"),
        ([1, None], "FP32", "must be numbers"),
        ([[1, 2], [3]], "FP32", "nested evenly"),
        ([300], "UINT8", "does not fit UINT8"),
        ([-1], "UINT32", "does not fit UINT32"),
        ([1, 2, 3], "INT32", "needs 2 elements"),
        ([1], "FP8", "unknown datatype"),
    ],
)
def test_json_data_that_does_not_fit_is_refused_clearly(data: list, datatype: str, message: str) -> None:
    shape = [2] if datatype == "INT32" else [len(data)] if not isinstance(data[0], list) else [2, 2]
    body = oip.dumps({"inputs": [{"name": "x", "datatype": datatype, "shape": shape, "data": data}]})
    with pytest.raises(oip.ProtocolError, match=message):
        oip.decode_request(body)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"outputs": -9.5e-138}, r'"outputs" must be a list'),  # found by the gateway fuzz test: was a 500
        ({"outputs": [{"name": "y", "parameters": [False]}]}, r"outputs\[0\]\.parameters must be an object"),
        ({"parameters": [False, 1.0]}, "parameters must be an object"),
    ],
)
def test_request_level_fields_of_the_wrong_type_are_refused_clearly(extra: dict, message: str) -> None:
    body = oip.dumps({"inputs": [{"name": "x", "datatype": "BOOL", "shape": [1], "data": [True]}], **extra})
    with pytest.raises(oip.ProtocolError, match=message):
        oip.decode_request(body)


@pytest.mark.parametrize(
    ("output", "tail", "message"),
    [
        ({"parameters": 1}, b"", r"outputs\[0\]\.parameters must be an object"),  # the answer fuzz test: an AttributeError
        ({"parameters": {"binary_data_size": []}}, b"", r"binary_data_size must be an integer"),  # and a TypeError
        ({"parameters": {"binary_data_size": -4}}, b"\0" * 4, r"binary_data_size must be an integer"),
        ({"parameters": {"binary_data_size": 8}}, b"\0" * 4, r"outputs\[0\]: binary data runs past the end of the body"),
    ],
)
def test_answers_with_binary_fields_of_the_wrong_type_are_refused_clearly(output: dict, tail: bytes, message: str) -> None:
    """As the cascade's judge and the Python client read an answer: one ``ProtocolError``."""
    head = oip.dumps({"model_name": "m", "outputs": [{"name": "y", "datatype": "FP32", "shape": [1], **output}]})
    with pytest.raises(oip.ProtocolError, match=message):
        oip.decode_response(head + tail, len(head))


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_an_answer_that_gives_one_output_twice_is_refused(binary: bool) -> None:
    """Read into a mapping by name, as the client and the cascade read answers, one of the two
    would be dropped without a word: a model's outputs have one name each."""
    twice = (oip.Tensor("y", np.ones(2, np.float32)), oip.Tensor("z", np.zeros(1, np.int64)), oip.Tensor("y", np.zeros(2, np.float32)))
    with pytest.raises(oip.ProtocolError, match=r"^outputs\[2\]: output 'y' given twice$"):
        oip.decode_response(*oip.encode_response(oip.InferResponse("m", twice), binary=binary))


@pytest.mark.parametrize("datatype", ["FP64", "BYTES"])
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_an_empty_tensor_whose_other_sides_no_array_can_hold_is_refused_clearly(datatype: str, binary: bool) -> None:
    # found by the fuzz test: numpy's own ValueError was a 500
    spec = {"name": "x", "datatype": datatype, "shape": [0, 235943, 236023, 20703240]}
    if binary:
        head = oip.dumps({"inputs": [{**spec, "parameters": {"binary_data_size": 0}}]})
        body, length = head, len(head)
    else:
        body, length = oip.dumps({"inputs": [{**spec, "data": []}]}), None
    with pytest.raises(oip.ProtocolError, match="larger than any tensor"):
        oip.decode_request(body, length)
    empty = oip.dumps({"inputs": [{**spec, "shape": [0, 235943, 236023], "data": []}]})
    assert oip.decode_request(empty).inputs[0].array.shape == (0, 235943, 236023)


json_numbers = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),  # past 2**53 too: float64 would round them
    st.booleans(),
)


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
@settings(max_examples=60, deadline=None)
@given(values=st.lists(json_numbers, max_size=40))
def test_flat_json_numbers_decode_as_numpy_casts_them(datatype: str, values: list) -> None:
    # A flat list takes the fast conversion; the result must be what numpy's own
    # conversion of the same list gives, bit for bit (ints cast from int64, not float64).
    # A boolean among them is refused: numpy would take it for 1 or 0; so is a number
    # that the datatype's width would turn into an infinity.
    body = oip.dumps({"inputs": [{"name": "x", "datatype": datatype, "shape": [len(values)], "data": values}]})
    with np.errstate(over="ignore"):
        expected = np.asarray(values).astype(oip_tensors.DATATYPES[datatype])
    if np.isinf(expected).any():
        with pytest.raises(oip.ProtocolError, match=f"inputs\\[0\\] 'x': data does not fit {datatype}: "):
            oip.decode_request(body)
        return
    if any(isinstance(v, bool) for v in values):
        with pytest.raises(oip.ProtocolError, match=f"inputs\\[0\\] 'x': {datatype} data must be numbers, not JSON booleans"):
            oip.decode_request(body)
        return
    got = oip.decode_request(body).inputs[0].array
    assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes()


@pytest.mark.parametrize(("datatype", "value", "largest"), [
    ("FP16", 70000.0, "65504.0"), ("FP16", -65520, "65504.0"), ("FP16", 1e300, "65504.0"),
    ("FP32", 1e39, "3.4028234663852886e+38"), ("FP32", -3.5e38, "3.4028234663852886e+38"),
])
@pytest.mark.parametrize("length", [1, 1000, 20_000], ids=["short", "long", "native-read"])
def test_json_numbers_past_a_float_datatypes_largest_are_refused_not_read_as_infinity(
        datatype: str, value: float, largest: str, length: int) -> None:
    """FP16 70000 and FP32 1e39 were read as +inf, which the model then ran on, where an
    integer past its datatype is refused; what JSON says is infinite (the literal) stays so."""
    data = [0.5] * (length - 1) + [value]
    body = oip.dumps({"inputs": [{"name": "x", "datatype": datatype, "shape": [length], "data": data}]})
    with pytest.raises(oip.ProtocolError) as refused:
        oip.decode_request(body)
    assert str(refused.value) == f"inputs[0] 'x': data does not fit {datatype}: {float(value)!r} is past ±{largest}, the most it holds"
    infinite = json.dumps({"inputs": [{"name": "x", "datatype": datatype, "shape": [2], "data": [float("inf"), 1.0]}]})
    assert oip.decode_request(infinite.encode()).inputs[0].array.tolist() == [float("inf"), 1.0]


@pytest.mark.parametrize(("datatype", "values"), [
    ("FP32", [2**64, -1]), ("FP64", [2**64, -1]), ("FP32", [10**30, 0.5]), ("FP64", [-(10**300), 3]),
    ("FP32", [[2**64 + 1], [-(2**65)]]),
])
@pytest.mark.parametrize("length", [1, 1000, 20_000], ids=["short", "long", "native-read"])
def test_whole_numbers_past_64_bits_in_a_float_tensor_are_read_as_floats(datatype: str, values: list, length: int) -> None:
    """FP32 [2**64, -1] and 1e30 written with all its digits fit FP32 and FP64, but were refused as
    'numbers out of range' where the data came with its integers whole (the Python client and
    edgeplane infer read JSON so): each is now the float its digits parse to, however the body came."""
    flat = np.asarray(values, dtype=object).reshape(-1).tolist()
    expected = np.array([float(str(v)) for v in flat]).astype(oip_tensors.DATATYPES[datatype]).reshape(np.shape(values))
    padded = [*flat, *[0.5] * (length - len(flat))]
    body = b'{"inputs":[{"name":"x","datatype":"%s","shape":[%d],"data":[%s]}]}' % (
        datatype.encode(), len(padded), ",".join(str(v) for v in padded).encode())
    got = oip.decode_request(body).inputs[0].array
    assert got.tobytes()[:expected.nbytes] == expected.tobytes()
    read_whole = oip_tensors.array_from_json({"name": "x", "datatype": datatype, "shape": list(np.shape(values)), "data": values}, "inputs[0]")
    assert read_whole.dtype == expected.dtype and read_whole.tobytes() == expected.tobytes()


@pytest.mark.parametrize(("datatype", "values", "message"), [
    ("FP32", [10**39, 1], "data does not fit FP32: 1e+39 is past ±3.4028234663852886e+38, the most it holds"),
    ("FP16", [2**64, 1], "data does not fit FP16: 1.8446744073709552e+19 is past ±65504.0, the most it holds"),
    ("FP64", [-(10**400), 1], "data does not fit FP64: an integer of 401 digits is past ±1.7976931348623157e+308, the most it holds"),
    ("FP32", [2**64, True], "FP32 data must be numbers, not JSON booleans (true/false)"),
    ("FP32", [2**64, "1"], "FP32 data must be numbers, got str"),
])
def test_whole_numbers_past_64_bits_past_a_float_datatype_or_beside_a_non_number_are_refused(
        datatype: str, values: list, message: str) -> None:
    with pytest.raises(oip.ProtocolError) as refused:
        oip_tensors.array_from_json({"name": "x", "datatype": datatype, "shape": [len(values)], "data": values}, "inputs[0]")
    assert str(refused.value).startswith(f"inputs[0] 'x': {message}")


def _utf8(item: bytes) -> bool:
    try:
        item.decode()
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(st.binary(max_size=8) | st.text(max_size=4).map(str.encode), min_size=1, max_size=6))
def test_bytes_arrive_exactly_or_are_refused_before_they_leave(binary: bool, items: list[bytes]) -> None:
    # JSON carries text: bytes that are not UTF-8 (an image) are refused, never sent with
    # U+FFFD in their place; the binary extension carries any bytes.
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    if not binary and not all(map(_utf8, items)):
        first = next(i for i, item in enumerate(items) if not _utf8(item))
        for encode in (lambda: oip.encode_request({"x": arr}), lambda: oip.encode_response(oip.InferResponse("m", (oip.Tensor("x", arr),)))):
            with pytest.raises(oip.ProtocolError, match=rf"tensor 'x': BYTES element {first} is not UTF-8 .* binary tensor \(binary=True\)"):
                encode()
        return
    request = oip.decode_request(*oip.encode_request({"x": arr}, binary=binary))
    assert request.inputs[0].array.tolist() == items
    answer = oip.decode_response(*oip.encode_response(oip.InferResponse("m", request.inputs), binary=binary))
    assert answer.outputs[0].array.tolist() == items


#: The datatypes whose JSON numbers are integers, with the values each holds.
WHOLE = {d: (0, 1) if d == "BOOL" else (np.iinfo(dtype).min, np.iinfo(dtype).max)
         for d, dtype in oip_tensors.DATATYPES.items() if dtype.kind in "biu"}


@pytest.mark.parametrize("datatype", WHOLE)
@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.one_of(st.floats(), st.integers(-(2**64), 2**64), st.sampled_from([0, 1, 1.0, 2.0, -0.0, 1e3, 2.0**63])),
                       min_size=1, max_size=12))
def test_integer_and_bool_json_data_decode_as_the_numbers_given_or_are_refused(datatype: str, values: list) -> None:
    # JSON does not tell 2 from 2.0: a whole number is the integer it is, wherever it stands;
    # a fraction, NaN, an infinity or a value past the datatype (BOOL: 0 and 1) is refused,
    # never cast to another number (1.5 -> 1, 300.7 -> 44 as UINT8, 2 -> true as BOOL).
    least, most = WHOLE[datatype]
    body = json.dumps({"inputs": [{"name": "x", "datatype": datatype, "shape": [len(values)], "data": values}]}).encode()
    fits = all((isinstance(v, int) or v.is_integer()) and least <= v <= most for v in values)
    if not fits:
        with pytest.raises(oip.ProtocolError, match=r"inputs\[0\] 'x': "):
            oip.decode_request(body)
        return
    got = oip.decode_request(body).inputs[0].array
    assert got.dtype == oip_tensors.DATATYPES[datatype] and got.tolist() == values


@pytest.mark.parametrize("bad", ["1.5", None, [1.0], {"v": 1}])
def test_a_non_number_anywhere_in_a_long_flat_list_is_refused(bad: object) -> None:
    data = [0.5] * 1000 + [bad] + [0.5] * 10
    body = oip.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [len(data)], "data": data}]})
    with pytest.raises(oip.ProtocolError):
        oip.decode_request(body)


# The JSON read's private steps, the one place these tests take them: which way a body is
# read, and the parser a thread keeps, show in nothing public but the speed.
def parsed(body: bytes) -> Any:
    """The document ``decode_request`` reads ``body`` into, before its tensors are built."""
    return oip._loads_tensors(body)


def thread_parser() -> Any:
    """The simdjson parser this thread keeps for its next body, or None."""
    return getattr(oip_reader._reused, "parser", None)


def test_a_flat_float_tensor_is_read_straight_into_an_array() -> None:
    # The fast read must stay in use: a silent fall-back to orjson would pass every
    # exactness test here and only show as a slower agent.
    x = np.random.default_rng(3).standard_normal((64, 1024)).astype(np.float32)
    body, _ = oip.encode_request({"input": x}, binary=False)
    assert isinstance(parsed(body)["inputs"][0]["data"], np.ndarray)
    assert oip.decode_request(body).inputs[0].array.tobytes() == x.tobytes()


@pytest.mark.parametrize(
    ("body", "name", "values"),
    [
        # a key given twice: the last one counts, as with orjson
        (b'{"inputs":[{"name":"x","datatype":"FP32","shape":[2],"data":[9,9],"data":[1,2]}]}', "x", [1.0, 2.0]),
        # a bracket escaped in a string: the bracket count differs, the orjson path reads it
        (b'{"inputs":[{"name":"x\\u005b","datatype":"FP32","shape":[2],"data":[1,2]}]}', "x[", [1.0, 2.0]),
        # NaN literals are not JSON: the standard library's path reads them
        (b'{"inputs":[{"name":"x","datatype":"FP64","shape":[2],"data":[NaN,-Infinity]}]}', "x", [float("nan"), float("-inf")]),
        # evenly nested lists keep their general-path reading
        (b'{"inputs":[{"name":"x","datatype":"FP16","shape":[2,1],"data":[[1.5],[2]]}]}', "x", [[1.5], [2.0]]),
    ],
)
def test_unusual_json_bodies_decode_as_they_always_did(body: bytes, name: str, values: list) -> None:
    got = oip.decode_request(body).inputs[0]
    assert got.name == name
    np.testing.assert_array_equal(got.array, np.array(values, dtype=got.array.dtype))


@pytest.mark.parametrize("data", [[1, [2]], [0.5, [1.0], 0.5], [[1.0], 2.0]])
def test_data_nested_unevenly_is_refused_though_the_fast_read_would_flatten_it(data: list) -> None:
    body = oip.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [len(data)], "data": data}]})
    with pytest.raises(oip.ProtocolError, match="nested evenly"):
        oip.decode_request(body)


def _fast_body(rows: int) -> tuple[bytes, np.ndarray]:
    x = np.random.default_rng(rows).standard_normal((rows, 1024)).astype(np.float32)
    return oip.encode_request({"input": x}, binary=False)[0], x


def test_a_value_kept_from_an_earlier_parse_does_not_push_bodies_off_the_fast_read() -> None:
    body, x = _fast_body(4)
    parsed(body)  # this thread now has its parser
    kept = thread_parser().parse(b'{"a": [1, 2]}')["a"]  # holds the parser, as a leak would
    doc = parsed(body)
    assert isinstance(doc["inputs"][0]["data"], np.ndarray)
    assert oip.decode_request(body).inputs[0].array.tobytes() == x.tobytes()
    assert kept.as_list() == [1, 2]  # the old parser's value is still readable


def test_each_thread_reads_with_its_own_parser_and_large_bodies_with_a_parser_of_their_own() -> None:
    import threading

    body, x = _fast_body(8)
    seen: dict[str, object] = {}

    def decode(name: str) -> None:
        assert oip.decode_request(body).inputs[0].array.tobytes() == x.tobytes()
        seen[name] = thread_parser()

    threads = [threading.Thread(target=decode, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen["a"] is not seen["b"]

    large, big = _fast_body(128)
    assert len(large) > oip_reader.REUSED_PARSER_MAX_BYTES
    before = thread_parser()
    assert isinstance(parsed(large)["inputs"][0]["data"], np.ndarray)
    assert oip.decode_request(large).inputs[0].array.tobytes() == big.tobytes()
    assert thread_parser() is before  # not kept for this thread's next body


# -- request heads kept once read --------------------------------------------------------------


def _binary_request(**tensors: np.ndarray) -> tuple[bytes, int]:
    body, length = oip.encode_request(tensors, binary=True)
    assert length is not None
    return body, length


@pytest.mark.parametrize("datatype", [*NUMERIC, "BYTES"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_bodies_that_share_a_kept_head_each_give_their_own_tensors(datatype: str, data: st.DataObject) -> None:
    first = data.draw(tensors(datatype), label="first")
    second = data.draw(tensors(datatype, first.shape), label="second")
    decoded = [oip.decode_request(*_binary_request(x=first)), oip.decode_request(*_binary_request(x=second))]
    _same(first, decoded[0].inputs[0].array)  # still its own body's, after the second was read
    _same(second, decoded[1].inputs[0].array)


def test_a_binary_head_is_read_once_and_each_body_is_still_checked_against_it() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    body, length = _binary_request(x=x)
    oip.decode_request(body, length)
    head = oip.HEADS.get(body[:length])
    assert head is not None and head.reusable
    again = oip.decode_request(body[:length] + (x + 1).tobytes(), length)
    assert oip.HEADS.get(body[:length]) is head
    assert again.inputs[0].array.tolist() == (x + 1).tolist() and not again.inputs[0].array.flags.writeable
    with pytest.raises(oip.ProtocolError, match=r"inputs\[0\]: binary data runs past the end"):
        oip.decode_request(body[:-4], length)
    with pytest.raises(TypeError):
        again.parameters["binary_data_output"] = False  # type: ignore[index]  # shared by every request of the head


def test_heads_that_differ_from_request_to_request_or_fail_are_not_kept() -> None:
    x = np.ones((1, 2), dtype=np.float32)
    with_id, id_length = oip.encode_request({"x": x}, binary=True, id="r-1")
    bad = oip.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "parameters": {"binary_data_size": 4}}]})
    mixed = oip.dumps({"inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "data": [1.5]},
                                  {"name": "b", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}]})
    assert oip.decode_request(with_id, id_length).id == "r-1"
    assert oip.HEADS.get(with_id[:id_length]) is None
    for _ in range(2):  # refused the same way each time
        with pytest.raises(oip.ProtocolError, match=r"inputs\[0\]: shape \[1, 2\] of FP32 needs 8 bytes, got 4"):
            oip.decode_request(bad + bytes(4), len(bad))
    assert oip.HEADS.get(bad) is None
    decoded = oip.decode_request(mixed + np.float32(2.5).tobytes(), len(mixed))
    assert [t.array.tolist() for t in decoded.inputs] == [[1.5], [2.5]]
    assert oip.HEADS.get(mixed) is None


def test_the_kept_heads_are_bounded_newest_first() -> None:
    first, first_length = _binary_request(x=np.zeros(1, dtype=np.float32))
    oip.decode_request(first, first_length)
    for n in range(2, oip.HEADS.capacity + 3):
        oip.decode_request(*_binary_request(x=np.zeros(n, dtype=np.float32)))
    assert len(oip.HEADS) == oip.HEADS.capacity
    assert oip.HEADS.get(first[:first_length]) is None
    assert oip.decode_request(first, first_length).inputs[0].array.tolist() == [0.0]

"""The native reader of large JSON number arrays (``edgeplane_proto._jsonfloats``).

It must change nothing but the speed: every body decodes to the same arrays, bit for bit,
or fails with the same error, as through simdjson alone. Each test compares the two paths
on the same body, with the reader's thresholds lowered so that small bodies take it too,
cut into as many chunks as this machine has CPUs.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeplane_proto import oip, oip_reader
from fuzz.test_infer_fuzz import bodies as fuzz_bodies

# The reader's private handle on the native module, the one place these tests touch it:
# nothing public says whether the install built it, or reads a body through simdjson alone.
native = oip_reader._jsonfloats


@contextlib.contextmanager
def simdjson_alone() -> Iterator[None]:
    """Bodies decoded meanwhile are read as if the native reader were not built."""
    oip_reader._jsonfloats = None
    try:
        yield
    finally:
        oip_reader._jsonfloats = native


def test_the_native_reader_is_built_where_a_compiler_and_python_headers_are() -> None:
    headers = Path(sysconfig.get_paths()["include"], "Python.h").exists()
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None or not headers:
        pytest.skip("no C++ compiler or Python headers here: the install leaves the reader out, as designed")
    assert native is not None, "setup.py should have built edgeplane_proto._jsonfloats"


needs_native = pytest.mark.skipif(native is None, reason="edgeplane_proto._jsonfloats is not built")


@pytest.fixture
def everything_native(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oip, "FAST_READ_MIN_BYTES", 0)  # short bodies too: they are what the fuzzer writes
    monkeypatch.setattr(oip_reader, "NATIVE_MIN_CHARS", 2)
    monkeypatch.setattr(oip_reader, "NATIVE_CHUNK_CHARS", 4)


def _decode(body: bytes, header_length: int | None = None, *, through_native: bool) -> object:
    """What decode_request gives (its inputs' arrays and parameters), or the error's text."""
    path = contextlib.nullcontext() if through_native else simdjson_alone()
    try:
        with path, np.errstate(all="ignore"):  # values past FP16's range become inf on both paths
            request = oip.decode_request(body, header_length)
    except oip.ProtocolError as exc:
        return f"ProtocolError: {exc}"
    return [(t.name, t.array.dtype.str, t.array.shape, t.array.tobytes()) for t in request.inputs], request.parameters


def _same_both_ways(body: bytes, header_length: int | None = None) -> object:
    ordinary = _decode(body, header_length, through_native=False)
    assert _decode(body, header_length, through_native=True) == ordinary
    return ordinary


def _body(data_text: str, datatype: str = "FP32", count: int | None = None, *, before: str = "", after: str = "") -> bytes:
    shape = count if count is not None else data_text.count(",") + 1
    return (
        f'{{{before}"inputs":[{{"name":"x","datatype":"{datatype}","shape":[{shape}],"data":{data_text}}}]{after}}}'
    ).encode()


# -- numbers as JSON spells them -----------------------------------------------------------

digits = st.text("0123456789", min_size=1, max_size=25)
json_number_text = st.builds(
    lambda sign, whole, fraction, exponent: sign + whole + fraction + exponent,
    st.sampled_from(["", "-"]),
    st.one_of(st.just("0"), st.builds(lambda a, b: a + b, st.sampled_from("123456789"), st.text("0123456789", max_size=20))),
    st.one_of(st.just(""), digits.map(lambda d: "." + d)),
    st.one_of(st.just(""), st.builds(lambda e, s, d: e + s + d, st.sampled_from("eE"), st.sampled_from(["", "+", "-"]),
                                     st.text("0123456789", min_size=1, max_size=4))),
)
printed_floats = st.one_of(
    st.floats(width=32, allow_nan=False, allow_infinity=False).map(lambda f: json.dumps(float(np.float32(f)))),
    st.floats(width=32, allow_nan=False, allow_infinity=False).map(lambda f: np.format_float_positional(np.float32(f))),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.integers(min_value=-(2**64), max_value=2**64).map(str),
)
spaces = st.text(" \t\n\r", max_size=2)


@needs_native
@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64", "INT64", "UINT8"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(numbers=st.lists(st.one_of(json_number_text, printed_floats), min_size=1, max_size=60), pad=spaces)
def test_any_json_numbers_decode_exactly_as_without_the_native_reader(
    everything_native: None, datatype: str, numbers: list[str], pad: str
) -> None:
    text = "[" + pad + f"{pad},{pad}".join(numbers) + pad + "]"
    _same_both_ways(_body(text, datatype, len(numbers)))


@needs_native
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=300))
def test_float32_values_round_trip_bit_for_bit_through_the_native_reader(everything_native: None, values: list[float]) -> None:
    x = np.array(values, dtype=np.float32)
    body, _ = oip.encode_request({"x": x}, binary=False)
    assert oip_reader.split_arrays(body) is not None or not np.isfinite(x).all()  # the reader took it (non-finite: NaN literals)
    assert oip.decode_request(body).inputs[0].array.tobytes() == x.tobytes()


@needs_native
@pytest.mark.parametrize(
    "text",
    [
        "[01, 2]", "[1., 2]", "[.5, 2]", "[+1, 2]", "[1e, 2]", "[1e+, 2]", "[-, 2]", "[--1, 2]", "[1,, 2]",
        "[1, 2,]", "[1 2]", "[1, NaN]", "[1, Infinity]", "[1, -Infinity]", "[1e400, 2]", "[1e-400, 2]",
        "[0x10, 2]", "[1_000, 2]", "[1, \"2\"]", "[1, null]", "[1, true]", "[1, [2]]", "[1, {\"a\": 2}]",
        "[1, \uff11]", "[-0, -0.0]", "[1, 2", "[1, 2]]", "[9007199254740993, 1]", "[1e22, 1e23, 5e-324]",
    ],
)
def test_bodies_the_native_reader_refuses_or_reads_decode_as_they_always_did(everything_native: None, text: str) -> None:
    body = _body(text, count=2) if text not in ("[1e22, 1e23, 5e-324]",) else _body(text)
    _same_both_ways(body)


@needs_native
def test_minus_zero_written_as_an_integer_is_zero_as_json_parsers_read_it() -> None:
    rest, values, _ = native.split(b"[-0, -0.0, -0e0, 0]", 2, "m:")
    assert np.signbit(np.frombuffer(values[0])).tolist() == [False, True, True, False]


# -- where the arrays are ----------------------------------------------------------------


@needs_native
@pytest.mark.parametrize(
    ("before", "after"),
    [
        ('"id":"[1, 2, 3]",', ""),  # an array-like string: not an array
        ('"id":"a\\"[1, 2, 3]\\\\",', ""),  # escaped quotes and backslashes in it
        ('"parameters":{"w":[1, 2.5, 9007199254740993]},', ""),  # a number array outside any tensor
        ("", ',"outputs":[{"name":"y","parameters":{"k":[3, 4]}}]'),
    ],
)
def test_number_arrays_anywhere_in_a_body_come_back_as_the_ordinary_parse_gives_them(
    everything_native: None, before: str, after: str
) -> None:
    decoded = _same_both_ways(_body("[0.5, -1.25e-3]", before=before, after=after))
    assert not isinstance(decoded, str), decoded
    if "parameters" in before:
        assert decoded[1] == {"w": [1, 2.5, 9007199254740993]}  # integers exact, past 2**53 too


@needs_native
def test_integer_tensors_keep_their_exact_values(everything_native: None) -> None:
    values = [2**63 - 1, -(2**63), 2**53 + 1, 0, -1]
    decoded = _same_both_ways(_body(json.dumps(values), "INT64"))
    assert np.frombuffer(decoded[0][0][3], dtype=np.int64).tolist() == values


@needs_native
def test_a_key_given_twice_keeps_the_last_as_before(everything_native: None) -> None:
    body = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[2],"data":[9, 9],"data":[1, 2]}]}'
    decoded = _same_both_ways(body)
    assert np.frombuffer(decoded[0][0][3], dtype=np.float32).tolist() == [1.0, 2.0]


@needs_native
def test_each_chunk_of_a_long_array_lands_in_its_place() -> None:
    x = np.random.default_rng(7).standard_normal(20_000).astype(np.float64)
    text = json.dumps(x.tolist()).encode()
    for chunk_chars in (1, 7, 1000, 64 * 1024, len(text)):
        rest, values, spans = native.split(text, 2, "m:", chunk_chars)
        assert rest == b'"m:0"' and spans == [(0, len(text))]
        assert np.frombuffer(values[0]).tobytes() == x.tobytes()


@needs_native
def test_the_wide_model_s_request_is_read_by_the_native_reader_at_the_default_thresholds() -> None:
    # A silent fall-back to simdjson would pass every exactness test and only show as a
    # slower agent.
    x = np.random.default_rng(3).standard_normal((64, 1024)).astype(np.float32)
    body, _ = oip.encode_request({"input": x}, binary=False)
    assert len(body) >= oip_reader.NATIVE_MIN_CHARS
    split = oip_reader.split_arrays(body)
    assert split is not None and len(split.values) == 1 and len(split.rest) < 200
    assert oip.decode_request(body).inputs[0].array.tobytes() == x.tobytes()


@needs_native
def test_many_threads_decoding_at_once_each_get_their_own_numbers() -> None:
    from concurrent.futures import ThreadPoolExecutor

    bodies: list[tuple[bytes, np.ndarray]] = []
    for seed in range(6):
        x = np.random.default_rng(seed).standard_normal((16 + seed, 1024)).astype(np.float32)
        bodies.append((oip.encode_request({"input": x}, binary=False)[0], x))

    def check(i: int) -> bool:
        body, x = bodies[i % len(bodies)]
        return oip.decode_request(body).inputs[0].array.tobytes() == x.tobytes()

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(check, range(48)))


@needs_native
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(drawn=fuzz_bodies("x"))
def test_the_inference_fuzzer_s_bodies_decode_as_without_the_native_reader(
    everything_native: None, drawn: tuple[bytes, dict[str, str]]
) -> None:
    body, headers = drawn
    length = headers.get(oip.BINARY_HEADER)
    if length is not None and not length.lstrip("-").isdigit():
        return  # the agent refuses such a header before decoding
    _same_both_ways(body, int(length) if length is not None else None)

"""Open Inference Protocol (KServe v2) tensors: JSON and binary-extension codec.

The agent, the data-centre ONNX replica, the gateway and the Python client all read and
write v2 inference bodies, so the encoding lives here once. Decoding validates everything
a caller controls (datatype names, shapes against element counts, binary sizes) and raises
:class:`ProtocolError`, which servers turn into a 400.

JSON is written by orjson: numeric ``data`` straight from numpy (float32 in its shortest
exact form, so FP32 round-trips bit for bit), ten times and more faster than ``json``
with ``tolist``. A body is read by simdjson, which parses a float tensor's flat ``data``
(what v2 clients send) straight into an array of doubles, with no Python float per
element; anything else in a body, and any body simdjson does not take, goes through
orjson, where a flat float list converts in one ``struct.pack`` and the rest as numpy
casts it (``bench/json_budget.py``). Before that, number arrays of 128 KiB and more are
read on several cores by a small native module, when the install could build it
(``_jsonfloats``, the interpreter lock released; the same doubles, or the body goes the
ordinary way). JSON has no NaN or
Infinity; like the standard library and tritonclient the codec writes and reads them as
the bare literals ``NaN``/``Infinity``/``-Infinity`` (a rare body with them takes the slower
standard-library path), so a non-finite value is never silently turned into ``null``.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import threading
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import simdjson

try:  # large number arrays read on several cores; optional (setup.py builds it when it can)
    from edgeplane_proto import _jsonfloats
except ImportError:  # pragma: no cover - depends on the install
    _jsonfloats = None

#: v2 datatype name -> numpy dtype (BYTES is handled apart: object arrays of bytes).
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
_DTYPE_TO_NAME = {dt: name for name, dt in DATATYPES.items()}

#: Header that carries the JSON part's length when binary tensors follow it.
BINARY_HEADER = "Inference-Header-Content-Length"


def model_version(sha256: str) -> str:
    """The version a model file answers ``/versions/{v}`` for, wherever it is served: its
    sha256, shortened (a new file is a new version)."""
    return sha256[:12]
MAX_DIMS = 16


class ProtocolError(ValueError):
    """A v2 body that cannot be decoded: the message is safe to return to the caller."""


@dataclass(frozen=True)
class Tensor:
    name: str
    array: np.ndarray

    @property
    def datatype(self) -> str:
        return datatype_of(self.array)


@dataclass(frozen=True)
class InferRequest:
    inputs: tuple[Tensor, ...]
    id: str | None = None
    outputs: tuple[str, ...] = ()  # requested output names; empty = all
    binary_outputs: bool = False
    parameters: Mapping[str, Any] = field(default_factory=dict)
    # The parsed JSON it was read from. A JSON tensor leaves one Python number per element
    # behind (65k floats take about 0.3 ms to free): holding this lets a server free them
    # after it has answered instead of before the run.
    document: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class InferResponse:
    model_name: str
    outputs: tuple[Tensor, ...]
    model_version: str | None = None
    id: str | None = None


def datatype_of(array: np.ndarray) -> str:
    name = _DTYPE_TO_NAME.get(array.dtype)
    if name is not None:
        return name
    if array.dtype.kind in "OSU":
        return "BYTES"
    raise ProtocolError(f"numpy dtype {array.dtype} has no v2 datatype")


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    try:
        return DATATYPES[datatype]
    except KeyError as exc:
        known = ", ".join([*DATATYPES, "BYTES"])
        raise ProtocolError(f"unknown datatype {datatype!r} (known: {known})") from exc


def _check_shape(shape: Any, where: str) -> tuple[int, ...]:
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise ProtocolError(f"{where}.shape must be a list of at most {MAX_DIMS} integers")
    dims: list[int] = []
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise ProtocolError(f"{where}.shape must hold non-negative integers, got {dim!r}")
        dims.append(dim)
    # numpy refuses a shape whose non-zero sides multiply past its address space even when
    # another side is 0 (an empty tensor): said here, not as numpy's ValueError.
    if math.prod(d for d in dims if d) > _LARGEST_SHAPE:
        raise ProtocolError(f"{where}.shape {dims} is larger than any tensor can be")
    return tuple(dims)


#: Elements numpy can address at the widest datatype (16 bytes, with room to spare).
_LARGEST_SHAPE = sys.maxsize // 16


def _flatten(data: Any, depth: int = 0) -> list[Any]:
    if depth > MAX_DIMS:
        raise ProtocolError("tensor data is nested deeper than any allowed shape")
    if isinstance(data, list):
        out: list[Any] = []
        for item in data:
            if isinstance(item, list):
                out.extend(_flatten(item, depth + 1))
            else:
                out.append(item)
        return out
    return [data]


def _array_from_json(spec: Mapping[str, Any], where: str) -> np.ndarray:
    datatype = spec.get("datatype")
    if not isinstance(datatype, str):
        raise ProtocolError(f"{where}.datatype is required (e.g. \"FP32\")")
    shape = _check_shape(spec.get("shape"), where)
    if "data" not in spec:
        raise ProtocolError(f"{where}.data is required")
    if datatype == "BYTES":
        flat = [v.encode() if isinstance(v, str) else v for v in _flatten(spec["data"])]
        if not all(isinstance(v, bytes) for v in flat):
            raise ProtocolError(f"{where}: BYTES data must be strings")
        return _array_from_list(flat, datatype, shape, where)
    array = _numbers_to_array(spec["data"], numpy_dtype(datatype), datatype, shape, where)
    if datatype != "BOOL" and not isinstance(spec["data"], np.ndarray) and _may_hold_bool(array) and _holds_bool(spec["data"]):
        raise ProtocolError(f"{where} {spec.get('name')!r}: {datatype} data must be numbers, not JSON booleans (true/false); "
                            "send them as 1 and 0, or give the tensor datatype BOOL")
    return array


def _may_hold_bool(values: np.ndarray) -> bool:
    """Whether a tensor read from JSON may have held a boolean. Python's bool is an int, so
    numpy and ``struct`` read true and false as 1 and 0 without a word: only a tensor that
    holds a 0 or a 1 has its elements looked at one by one (:func:`_holds_bool`). A float
    tensor's data read straight into an array held none: that parse refuses booleans."""
    return np.count_nonzero((values == 0) | (values == 1)) > 0


def _holds_bool(data: Any) -> bool:
    """Whether JSON ``data`` (numbers, nested or not) holds a boolean: written again by
    orjson, a boolean is the only value with a ``t`` or an ``f`` (three times faster than
    a look at each element's type)."""
    text = orjson.dumps(data)
    return b"t" in text or b"f" in text


def _numbers_to_array(data: Any, dtype: np.dtype[Any], datatype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    """Flat or nested JSON numbers as one vectorised conversion (no per-element Python)."""
    if isinstance(data, np.ndarray):  # float data the parse read straight into an array
        if data.size != math.prod(shape):
            raise ProtocolError(f"{where}: shape {list(shape)} needs {math.prod(shape)} elements, data has {data.size}")
        return data.astype(dtype, copy=False).reshape(shape)
    if dtype.kind == "f" and isinstance(data, list):
        flat = _flat_floats(data)
        if flat is not None and flat.size == math.prod(shape):
            return flat.astype(dtype, copy=False).reshape(shape)
    if isinstance(data, list) and len(data) > 0 and isinstance(data[0], list):
        _check_depth(data)
    try:
        values = np.asarray(data)
    except (ValueError, OverflowError, TypeError) as exc:  # ragged nesting
        raise ProtocolError(f"{where}: {datatype} data must be a list of numbers nested evenly: {exc}") from exc
    if values.dtype.kind not in "biuf":
        raise ProtocolError(f"{where}: {datatype} data must be numbers, got {_kind_name(values)}")
    if values.dtype.kind == "f" and dtype.kind == "u":
        values = _exact_unsigned(data, values, where)
    count = math.prod(shape)
    if values.size != count:
        raise ProtocolError(f"{where}: shape {list(shape)} needs {count} elements, data has {values.size}")
    if dtype.kind in "iu" and values.dtype.kind in "iu" and values.size and values.dtype != dtype:
        info = np.iinfo(dtype)
        low, high = values.min(), values.max()
        if low < info.min or high > info.max:
            raise ProtocolError(f"{where}: data does not fit {datatype}: values span {low}..{high}")
    return values.astype(dtype, copy=False).reshape(shape)


#: Integers past this may round on the way through float64 (the general path casts them
#: from int64 instead); floats of any size convert the same on both paths.
_EXACT_IN_FLOAT64 = 2.0**53


def _flat_floats(data: list[Any]) -> np.ndarray | None:
    """A flat list of numbers as float64, or None when it is anything else (nested lists,
    strings, null, objects, huge integers): the general path then decides, with its errors.

    ``struct`` converts the whole list in one C loop, refusing what is not a number, 3-4x
    faster than numpy's per-element type discovery: it is most of what a large JSON tensor
    costs after the parse itself."""
    try:
        values = np.frombuffer(struct.pack(f"{len(data)}d", *data), dtype=np.float64)
    except (struct.error, OverflowError, TypeError):
        return None
    if not _exact_in_float64(values):  # infinities take the general path
        return None
    return values


def _exact_unsigned(data: Any, values: np.ndarray, where: str) -> np.ndarray:
    """Integers on both sides of 2**63 promote to float64, which rounds those past 2**53:
    read them as uint64 instead (negatives are then refused as not fitting)."""
    if not all(isinstance(v, int) for v in np.asarray(data, dtype=object).reshape(-1)):
        return values
    try:
        return np.asarray(data, dtype=np.uint64)
    except OverflowError as exc:
        raise ProtocolError(f"{where}: data does not fit UINT64: {exc}") from exc


def _check_depth(data: list[Any]) -> None:
    depth = 0
    while isinstance(data, list) and data:
        depth += 1
        if depth > MAX_DIMS:
            raise ProtocolError("tensor data is nested deeper than any allowed shape")
        data = data[0]


def _kind_name(values: np.ndarray) -> str:
    if values.dtype.kind in "US":
        return "str"
    kinds = {type(v).__name__ for v in values.reshape(-1)[:64] if not isinstance(v, (int, float, bool))}
    return ", ".join(sorted(kinds)) or "numbers out of range"


def _array_from_list(values: Sequence[Any], datatype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    """A tensor from flat, already type-checked values: JSON ``data`` and gRPC ``contents``."""
    count = math.prod(shape)
    if len(values) != count:
        raise ProtocolError(f"{where}: shape {list(shape)} needs {count} elements, data has {len(values)}")
    if datatype == "BYTES":
        arr = np.empty(count, dtype=object)
        arr[:] = list(values)
        return arr.reshape(shape)
    try:
        return np.asarray(values, dtype=numpy_dtype(datatype)).reshape(shape)
    except (ValueError, OverflowError, TypeError) as exc:
        raise ProtocolError(f"{where}: data does not fit {datatype}: {exc}") from exc


def _array_from_bytes(raw: memoryview, datatype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    if datatype == "BYTES":
        items: list[bytes] = []
        pos = 0
        while pos < len(raw):
            if pos + 4 > len(raw):
                raise ProtocolError(f"{where}: truncated BYTES element length")
            size = int.from_bytes(raw[pos : pos + 4], "little")
            pos += 4
            if pos + size > len(raw):
                raise ProtocolError(f"{where}: truncated BYTES element")
            items.append(bytes(raw[pos : pos + size]))
            pos += size
        if len(items) != math.prod(shape):
            raise ProtocolError(f"{where}: shape {list(shape)} does not match {len(items)} elements")
        arr = np.empty(len(items), dtype=object)
        arr[:] = items
        return arr.reshape(shape)
    return np.frombuffer(raw, dtype=_fixed_width(datatype, shape, len(raw), where)).reshape(shape)


def _fixed_width(datatype: str, shape: tuple[int, ...], size: int, where: str) -> np.dtype[Any]:
    """The numpy dtype of a tensor of ``size`` raw bytes, which its shape must fill exactly."""
    dtype = numpy_dtype(datatype)
    expected = math.prod(shape) * dtype.itemsize
    if size != expected:
        raise ProtocolError(f"{where}: shape {list(shape)} of {datatype} needs {expected} bytes, got {size}")
    return dtype


def _json_body(body: bytes, header_length: int | None) -> tuple[Any, memoryview]:
    """The JSON head, and the binary tensors after it as a view (no copy of the bytes)."""
    if header_length is None:
        head, rest = body, memoryview(b"")
    else:
        if header_length < 0 or header_length > len(body):
            raise ProtocolError(f"{BINARY_HEADER} {header_length} is outside the body")
        head, rest = body[:header_length], memoryview(body)[header_length:]
    return _loads_tensors(head), rest


#: Tensor datatypes whose JSON ``data`` the parse reads straight into an array.
_FLOAT_DATATYPES = frozenset({"FP16", "FP32", "FP64"})

#: JSON shorter than this is read by orjson alone: the head of a binary request (0.6 against
#: 6 microseconds for a 139-byte head here) and small JSON tensors, which orjson and one
#: numpy conversion read faster up to about 3 KB (256 float32 values: 10 against 13 us).
FAST_READ_MIN_BYTES = 4096


def _loads_tensors(head: bytes | memoryview) -> Any:
    """Parse a v2 body's JSON. The ``data`` of a float tensor (under ``inputs`` or
    ``outputs``) comes out as a flat float64 array read by simdjson's parse, with no Python
    float per element (orjson's parse and the conversion after it cost as much as a
    millisecond model run on a 64 x 1024 tensor); the rest of the document is the same
    Python objects orjson gives. Whatever this does not expect (invalid JSON and ``NaN``
    literals, nested or non-numeric data, integers past 2**53) goes the orjson way, with
    its errors and its exact conversions. Large number arrays are first read on several
    cores by the native module, when it is built (:func:`_split_arrays`). A short document
    (:data:`FAST_READ_MIN_BYTES`) is orjson's alone."""
    if len(head) < FAST_READ_MIN_BYTES:
        return loads(head)
    raw = bytes(head)
    split = _split_arrays(raw)
    source = raw if split is None else split.rest
    try:
        doc = _plain(_parse(source), tensors=True)
    except Exception:  # noqa: BLE001 - invalid for simdjson, or unusual: the orjson path says what is wrong
        return loads(head)
    if isinstance(doc, dict) and not _flat_as_written(source, doc):
        return loads(head)
    return doc if split is None else split.restore(doc, raw)


#: Number arrays of a JSON body at least this long (in characters; 128 KiB is about 10,000
#: float32 values) are read by the native module, when it is built, in chunks of about
#: NATIVE_CHUNK_CHARS on as many threads as there are chunks and usable CPUs: a thread
#: costs some 40 microseconds to start on another core here, a chunk about 0.5 ms to parse.
NATIVE_MIN_CHARS = 128 * 1024
NATIVE_CHUNK_CHARS = 64 * 1024


@dataclass(frozen=True)
class _Split:
    """A body whose large number arrays the native module read: ``rest`` is the body with a
    marker string in place of each, ``values`` their numbers (float64 bytes) and ``spans``
    where each stood in the body."""

    rest: bytes
    marker: str
    values: list[bytes]
    spans: list[tuple[int, int]]

    def restore(self, doc: Any, raw: bytes) -> Any:
        """``doc`` with each marker replaced by what the ordinary parse would have given in
        its place: a float tensor's ``data`` as a float64 array, anything else (an integer
        tensor's data, a parameter) as the list orjson reads from the original text."""
        left = len(self.values)
        for spec in _tensor_specs(doc):
            index = self._index(spec.get("data")) if spec.get("datatype") in _FLOAT_DATATYPES else None
            if index is not None:
                values = np.frombuffer(self.values[index], dtype=np.float64)
                if _exact_in_float64(values):
                    spec["data"] = values
                    left -= 1
        return self._elsewhere(doc, raw) if left else doc

    def _index(self, value: Any) -> int | None:
        if isinstance(value, str) and value.startswith(self.marker):
            return int(value[len(self.marker):])
        return None

    def _elsewhere(self, value: Any, raw: bytes) -> Any:
        if isinstance(value, dict):
            return {key: self._elsewhere(item, raw) for key, item in value.items()}
        if isinstance(value, list):
            return [self._elsewhere(item, raw) for item in value]
        index = self._index(value)
        if index is not None:
            start, end = self.spans[index]
            return orjson.loads(raw[start:end])
        return value


def _tensor_specs(doc: Any) -> Iterator[dict[str, Any]]:
    """The tensor objects under a v2 document's ``inputs`` and ``outputs``."""
    if isinstance(doc, dict):
        for key in ("inputs", "outputs"):
            specs = doc.get(key)
            if isinstance(specs, list):
                yield from (spec for spec in specs if isinstance(spec, dict))


def _exact_in_float64(values: np.ndarray) -> bool:
    """Whether every value is below 2**53 in size (NaN compares false: it passes)."""
    return not (np.abs(values) >= _EXACT_IN_FLOAT64).any()


def _split_arrays(raw: bytes) -> _Split | None:
    """The body's large number arrays read by the native module, or None: no module, no
    such array, or one the native reader does not take (then the ordinary parse reads it
    all and says what is wrong, if anything)."""
    if _jsonfloats is None or len(raw) < NATIVE_MIN_CHARS:
        return None
    marker = f"edgeplane:{os.urandom(8).hex()}:"  # random per body: no body can hold it already
    found = _jsonfloats.split(raw, NATIVE_MIN_CHARS, marker, NATIVE_CHUNK_CHARS)
    if found is None:
        return None
    rest, values, spans = found
    return _Split(rest, marker, values, spans)


#: Bodies up to this size are read by a parser kept per thread: its buffers (about 3.5x the
#: body) stay allocated, where a new parser's are mapped and faulted in again for each body
#: (2.4 against 1.9 ms to decode a 715 KB body here, 3.4 against 2.1 ms when other work
#: freed memory in between). A larger body gets a parser of its own, freed with it, so one
#: large request does not pin its memory for the life of the process.
REUSED_PARSER_MAX_BYTES = 1 << 20
_reused = threading.local()


def _parse(raw: bytes) -> Any:
    """simdjson's document for ``raw``; the caller keeps none of its values (the next parse
    of this thread's parser needs them gone)."""
    if len(raw) > REUSED_PARSER_MAX_BYTES:
        return simdjson.Parser().parse(raw)
    parser = getattr(_reused, "parser", None)
    if parser is not None:
        try:
            return parser.parse(raw)
        except RuntimeError:  # a value of an earlier parse is still referenced: start afresh
            pass
    _reused.parser = simdjson.Parser()
    return _reused.parser.parse(raw)


def _flat_as_written(raw: bytes, doc: dict[str, Any]) -> bool:
    """Whether every float ``data`` read as an array was a flat list in the body.

    simdjson flattens nested lists, so ``[1, [2]]`` would pass for ``[1, 2]``; the general
    path refuses it. Counting brackets tells them apart without a look at each element:
    the body must hold one ``[`` per such tensor plus those of the rest of the document
    (written again by orjson; a bracket escaped in a string makes the counts differ, and
    such a body just takes the orjson path)."""
    fast = 0
    rest = dict(doc)
    for key in ("inputs", "outputs"):
        specs = doc.get(key)
        if isinstance(specs, list):
            rest[key] = [{**spec, "data": None} if isinstance(spec, dict) and isinstance(spec.get("data"), np.ndarray) else spec
                         for spec in specs]
            fast += sum(isinstance(spec, dict) and isinstance(spec.get("data"), np.ndarray) for spec in specs)
    return fast == 0 or _brackets(raw) == _brackets(orjson.dumps(rest)) + fast


def _brackets(raw: bytes) -> int:
    """How many ``[`` the document holds. ``bytes.count`` looks at each byte (0.22 ms for a
    715 KB body here); ``replace`` jumps between the few brackets with ``memchr`` (0.03 ms)."""
    return len(raw) - len(raw.replace(b"[", b""))


class _Unusual(Exception):
    """A document the simdjson path leaves to orjson (a key given twice: orjson keeps the last)."""


def _plain(value: Any, tensors: bool = False) -> Any:
    """Python objects for simdjson's values; with ``tensors``, the top level of a v2 body,
    whose ``inputs``/``outputs`` entries get :func:`_tensor_spec`."""
    if isinstance(value, simdjson.Object):
        keys = list(value.keys())
        if len(set(keys)) != len(keys):
            raise _Unusual
        if not tensors:
            return value.as_dict()
        out = {}
        for key in keys:
            item = value[key]
            if key in ("inputs", "outputs") and isinstance(item, simdjson.Array):
                out[key] = [_tensor_spec(item[i]) for i in range(len(item))]
            else:
                out[key] = _plain(item)
        return out
    if isinstance(value, simdjson.Array):
        return value.as_list()
    return value


def _tensor_spec(spec: Any) -> Any:
    if not isinstance(spec, simdjson.Object):
        return _plain(spec)
    keys = list(spec.keys())
    if len(set(keys)) != len(keys):
        raise _Unusual
    out = {key: _plain(spec[key]) for key in keys if key != "data"}
    if "data" in keys:
        data = spec["data"]
        values = _float_data(data) if out.get("datatype") in _FLOAT_DATATYPES else None
        out["data"] = values if values is not None else _plain(data)
    return out


def _float_data(data: Any) -> np.ndarray | None:
    """A flat array of numbers as float64; None for anything else (the general path decides)."""
    if not isinstance(data, simdjson.Array) or (len(data) and isinstance(data[0], simdjson.Array)):
        return None
    try:
        values = np.frombuffer(data.as_buffer(of_type="d"), dtype=np.float64)
    except (TypeError, ValueError):  # strings, booleans, null, objects
        return None
    if values.size != len(data) or not _exact_in_float64(values):  # nested past the first item; huge
        return None
    return values


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Parse JSON; ``NaN``/``Infinity`` literals (which orjson refuses) fall back to ``json``."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if not _has_nonfinite_literal(data):
            raise ProtocolError(f"body is not valid JSON: {exc}") from exc
    try:
        return json.loads(bytes(data) if isinstance(data, memoryview) else data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(f"body is not valid JSON: {exc}") from exc


def _has_nonfinite_literal(data: bytes | bytearray | memoryview | str) -> bool:
    raw = data.encode() if isinstance(data, str) else bytes(data)
    return b"NaN" in raw or b"Infinity" in raw


def dumps(obj: Any) -> bytes:
    """Compact JSON; numpy arrays are written natively, non-finite floats as ``NaN``/``Infinity``."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
    except orjson.JSONEncodeError as exc:
        raise ProtocolError(f"cannot encode as JSON: {exc}") from exc


class _Heads:
    """Checked request heads by their bytes, the newest :attr:`capacity` of them; any thread."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._heads: dict[bytes, _RequestHead] = {}
        self._lock = threading.Lock()

    def get(self, raw: bytes) -> _RequestHead | None:
        return self._heads.get(raw)

    def put(self, raw: bytes, head: _RequestHead) -> None:
        with self._lock:
            if raw not in self._heads and len(self._heads) >= self.capacity:
                del self._heads[next(iter(self._heads))]  # the oldest
            self._heads[raw] = head

    def __len__(self) -> int:
        return len(self._heads)


#: Heads up to this long are kept once read (a one-input binary head is about 150 bytes).
HEAD_MEMO_MAX_BYTES = 2048
#: The request heads kept: as many shapes and models as one process sees at once, at most
#: 256 KiB of them.
HEADS = _Heads(128)


def decode_request(body: bytes, header_length: int | None = None) -> InferRequest:
    """Decode a v2 ``/infer`` request body (JSON, optionally with binary tensors).

    The head of a request whose tensors are all binary says the same for every request of
    one shape, so once read and checked it is kept (:data:`HEADS`) and the next request
    with the same head bytes only takes views of its tensors."""
    if header_length is not None and 0 <= header_length <= min(len(body), HEAD_MEMO_MAX_BYTES):
        raw = bytes(body[:header_length])
        head = HEADS.get(raw)
        if head is None:
            head = _request_head(_loads_tensors(raw))
            if head.reusable:
                HEADS.put(raw, head)
        return head.request(memoryview(body)[header_length:])
    doc, binary = _json_body(body, header_length)
    return _request_head(doc).request(binary, document=doc)


@dataclass(frozen=True)
class _BinaryInput:
    name: str
    datatype: str
    shape: tuple[int, ...]
    size: int  # bytes in the binary part
    dtype: np.dtype[Any] | None  # None: BYTES, whose elements the body says


@dataclass(frozen=True)
class _RequestHead:
    """A request's JSON part, checked: its inputs (binary layouts or JSON tensors read
    already), outputs asked for, id and parameters."""

    inputs: tuple[_BinaryInput | Tensor, ...]
    id: str | None
    outputs: tuple[str, ...]
    binary_outputs: bool
    parameters: Mapping[str, Any]

    @property
    def reusable(self) -> bool:
        """Whether other requests may send the same head: every tensor binary, no id."""
        return self.id is None and all(isinstance(i, _BinaryInput) for i in self.inputs)

    def request(self, binary: memoryview, document: Any = None) -> InferRequest:
        """The request this head starts, its binary tensors read from ``binary`` (views, no copies)."""
        tensors: list[Tensor] = []
        offset = 0
        for i, spec in enumerate(self.inputs):
            if isinstance(spec, Tensor):
                tensors.append(spec)
                continue
            end = offset + spec.size
            if end > len(binary):
                raise ProtocolError(f"inputs[{i}]: binary data runs past the end of the body")
            if spec.dtype is None:
                array = _array_from_bytes(binary[offset:end], spec.datatype, spec.shape, f"inputs[{i}]")
            else:
                array = np.frombuffer(binary[offset:end], dtype=spec.dtype).reshape(spec.shape)
            tensors.append(Tensor(spec.name, array))
            offset = end
        return InferRequest(tuple(tensors), self.id, self.outputs, self.binary_outputs, self.parameters, document)


def _request_head(doc: Any) -> _RequestHead:
    if not isinstance(doc, dict):
        raise ProtocolError("request body must be a JSON object")
    inputs_doc = doc.get("inputs")
    if not isinstance(inputs_doc, list) or not inputs_doc:
        raise ProtocolError("request needs a non-empty \"inputs\" list")
    inputs: list[_BinaryInput | Tensor] = []
    seen: set[str] = set()
    for i, spec in enumerate(inputs_doc):
        where = f"inputs[{i}]"
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ProtocolError(f"{where} must be an object with a \"name\"")
        if spec["name"] in seen:
            raise ProtocolError(f"{where}: input {spec['name']!r} given twice")
        seen.add(spec["name"])
        params = spec.get("parameters") or {}
        if not isinstance(params, dict):
            raise ProtocolError(f"{where}.parameters must be an object")
        size = params.get("binary_data_size")
        if size is None:
            inputs.append(Tensor(spec["name"], _array_from_json(spec, where)))
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ProtocolError(f"{where}.parameters.binary_data_size must be an integer")
        datatype = spec.get("datatype")
        if not isinstance(datatype, str):
            raise ProtocolError(f"{where}.datatype is required")
        shape = _check_shape(spec.get("shape"), where)
        # A fixed-width layout is the head's alone: checked here, once for every body it starts.
        dtype = None if datatype == "BYTES" else _fixed_width(datatype, shape, size, where)
        inputs.append(_BinaryInput(spec["name"], datatype, shape, size, dtype))
    outputs: list[str] = []
    binary_outputs = False
    requested = doc.get("outputs") or []
    if not isinstance(requested, list):
        raise ProtocolError("\"outputs\" must be a list")
    for j, out in enumerate(requested):
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise ProtocolError(f"outputs[{j}] must be an object with a \"name\"")
        out_params = out.get("parameters") or {}
        if not isinstance(out_params, dict):
            raise ProtocolError(f"outputs[{j}].parameters must be an object")
        outputs.append(out["name"])
        binary_outputs |= bool(out_params.get("binary_data"))
    req_id = doc.get("id")
    parameters = doc.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError("parameters must be an object")
    return _RequestHead(
        inputs=tuple(inputs),
        id=str(req_id) if req_id is not None else None,
        outputs=tuple(outputs),
        binary_outputs=binary_outputs or bool(parameters.get("binary_data_output")),
        parameters=types.MappingProxyType(parameters),
    )


def _tensor_json(t: Tensor) -> dict[str, Any]:
    arr = t.array
    datatype = datatype_of(arr)
    if datatype == "BYTES":
        data: list[Any] = [
            v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in arr.reshape(-1)
        ]
    else:
        data = np.ascontiguousarray(arr.reshape(-1))  # orjson writes it natively
    return {"name": t.name, "shape": list(arr.shape), "datatype": datatype, "data": data}


def _finite(tensors: Sequence[Tensor]) -> bool:
    return all(t.array.dtype.kind != "f" or bool(np.isfinite(t.array).all()) for t in tensors)


def _tolist_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _tensor_bytes(arr: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts = []
        for v in arr.reshape(-1):
            b = v if isinstance(v, bytes) else str(v).encode()
            parts.append(len(b).to_bytes(4, "little") + b)
        return b"".join(parts)
    return np.ascontiguousarray(arr).tobytes()


def _encode(doc: dict[str, Any], tensors: Sequence[Tensor], key: str, binary: bool) -> tuple[bytes, int | None]:
    if not binary:
        doc[key] = [_tensor_json(t) for t in tensors]
        if _finite(tensors):
            return dumps(doc), None
        # JSON cannot spell NaN/Infinity; the standard library's literals are what v2 clients read.
        return json.dumps(doc, separators=(",", ":"), default=_tolist_default).encode(), None
    blobs = []
    specs = []
    for t in tensors:
        datatype = datatype_of(t.array)
        raw = _tensor_bytes(t.array, datatype)
        blobs.append(raw)
        specs.append({"name": t.name, "shape": list(t.array.shape), "datatype": datatype,
                      "parameters": {"binary_data_size": len(raw)}})
    doc[key] = specs
    head = dumps(doc)
    return b"".join([head, *blobs]), len(head)


def encode_request(
    inputs: Sequence[Tensor] | Mapping[str, np.ndarray],
    *,
    id: str | None = None,
    binary: bool = False,
    outputs: Sequence[str] = (),
) -> tuple[bytes, int | None]:
    """Encode a request; returns ``(body, header_length)`` (the latter only for binary)."""
    tensors = _as_tensors(inputs)
    doc: dict[str, Any] = {}
    if id is not None:
        doc["id"] = id
    if outputs:
        doc["outputs"] = [{"name": n, "parameters": {"binary_data": binary}} for n in outputs]
    elif binary:
        doc["parameters"] = {"binary_data_output": True}
    return _encode(doc, tensors, "inputs", binary)


def encode_response(response: InferResponse, *, binary: bool = False) -> tuple[bytes, int | None]:
    doc: dict[str, Any] = {"model_name": response.model_name}
    if response.model_version is not None:
        doc["model_version"] = response.model_version
    if response.id is not None:
        doc["id"] = response.id
    return _encode(doc, response.outputs, "outputs", binary)


def decode_response(body: bytes, header_length: int | None = None) -> InferResponse:
    doc, binary = _json_body(body, header_length)
    if not isinstance(doc, dict) or not isinstance(doc.get("outputs"), list):
        raise ProtocolError("response body must be a JSON object with \"outputs\"")
    outputs = []
    offset = 0
    for i, spec in enumerate(doc["outputs"]):
        where = f"outputs[{i}]"
        if not isinstance(spec, dict):
            raise ProtocolError(f"{where} must be an object")
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            shape = _check_shape(spec.get("shape"), where)
            arr = _array_from_bytes(binary[offset : offset + size], str(spec.get("datatype")), shape, where)
            offset += size
        else:
            arr = _array_from_json(spec, where)
        outputs.append(Tensor(str(spec.get("name")), arr))
    return InferResponse(
        model_name=str(doc.get("model_name", "")),
        model_version=doc.get("model_version"),
        id=doc.get("id"),
        outputs=tuple(outputs),
    )


def _as_tensors(inputs: Sequence[Tensor] | Mapping[str, np.ndarray]) -> list[Tensor]:
    if isinstance(inputs, Mapping):
        return [Tensor(name, np.asarray(arr)) for name, arr in inputs.items()]
    return list(inputs)


def model_metadata(
    name: str,
    inputs: Sequence[tuple[str, str, Sequence[int]]],
    outputs: Sequence[tuple[str, str, Sequence[int]]],
    versions: Sequence[str] = ("1",),
    platform: str = "onnxruntime_onnx",
) -> dict[str, Any]:
    """The body of ``GET /v2/models/{name}``: ``(name, datatype, shape)`` per tensor, -1 = dynamic."""
    return {
        "name": name,
        "versions": list(versions),
        "platform": platform,
        "inputs": [{"name": n, "datatype": d, "shape": list(s)} for n, d, s in inputs],
        "outputs": [{"name": n, "datatype": d, "shape": list(s)} for n, d, s in outputs],
    }


def error_body(message: str) -> bytes:
    """v2 error object: ``{"error": "..."}``."""
    return dumps({"error": message})


# -- the gRPC form (inference.GRPCInferenceService) -----------------------------------
# Tensors arrive as a datatype, a shape and either their raw bytes (the same layout as the
# binary extension's) or a typed list of values; they leave as raw bytes.

def array_from_raw(raw: bytes, datatype: str, shape: Sequence[int], where: str) -> np.ndarray:
    """A tensor from its raw little-endian bytes (BYTES: 4-byte length + bytes per element)."""
    return _array_from_bytes(memoryview(raw), datatype, _check_shape(list(shape), where), where)


def array_from_values(values: Sequence[Any], datatype: str, shape: Sequence[int], where: str) -> np.ndarray:
    """A tensor from a typed list of values (``fp32_contents`` and the like)."""
    dtype = None if datatype == "BYTES" else numpy_dtype(datatype)
    if dtype is not None and dtype.itemsize == 2 and dtype.kind == "f":
        raise ProtocolError(f"{where}: FP16 tensors travel as raw bytes only")
    return _array_from_list(values, datatype, _check_shape(list(shape), where), where)


def raw_bytes(array: np.ndarray) -> bytes:
    """A tensor's raw form, as ``raw_output_contents`` carries it."""
    return _tensor_bytes(array, datatype_of(array))

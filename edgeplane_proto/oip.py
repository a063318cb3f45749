"""Open Inference Protocol (KServe v2) tensors: JSON and binary-extension codec.

The agent, the data-centre ONNX replica, the gateway and the Python client all read and
write v2 inference bodies, so the encoding lives here once. Decoding validates everything
a caller controls (datatype names, shapes against element counts, binary sizes) and raises
:class:`ProtocolError`, which servers turn into a 400.

JSON is written by orjson: numeric ``data`` straight from numpy (float32 in its shortest
exact form, so FP32 round-trips bit for bit), ten times and more faster than ``json``
with ``tolist``. A body of 4 KB or more is read by :mod:`edgeplane_proto.oip_reader`
(simdjson, and a native module for number arrays of 128 KiB and more), which gives a
float tensor's flat ``data`` (what v2 clients send) as an array of doubles, with no Python
float per element; a shorter body, anything else in a body, and any body the reader does
not take, goes through orjson, where a flat float list converts in one ``struct.pack`` and
the rest as numpy casts it (``bench/json_budget.py``). JSON has no NaN or
Infinity; like the standard library and tritonclient the codec writes and reads them as
the bare literals ``NaN``/``Infinity``/``-Infinity`` (a rare body with them takes the slower
standard-library path), so a non-finite value is never silently turned into ``null``.
"""

from __future__ import annotations

import json
import math
import struct
import sys
import threading
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

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


def header_length(value: str | None) -> int | None:
    """The length a :data:`BINARY_HEADER` value gives, or None when it gives none (absent,
    or not a decimal number). ASCII digits only: ``str.isdigit`` is also true of "²",
    which ``int`` refuses."""
    return int(value) if value is not None and value.isascii() and value.isdigit() else None


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
    if not exact_in_float64(values):  # infinities take the general path
        return None
    return values


def exact_in_float64(values: np.ndarray) -> bool:
    """Whether every value is below 2**53 in size (NaN compares false: it passes)."""
    return not (np.abs(values) >= _EXACT_IN_FLOAT64).any()


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


#: JSON shorter than this is read by orjson alone: the head of a binary request (0.6 against
#: 6 microseconds for a 139-byte head here) and small JSON tensors, which orjson and one
#: numpy conversion read faster up to about 3 KB (256 float32 values: 10 against 13 us).
FAST_READ_MIN_BYTES = 4096


def _loads_tensors(head: bytes | memoryview) -> Any:
    """Parse a v2 body's JSON. A short document (:data:`FAST_READ_MIN_BYTES`) is orjson's
    alone; a longer one is read by :mod:`edgeplane_proto.oip_reader`, which gives the
    ``data`` of a float tensor (under ``inputs`` or ``outputs``) as a flat float64 array
    with no Python float per element (orjson's parse and the conversion after it cost as
    much as a millisecond model run on a 64 x 1024 tensor), and the rest of the document as
    the same Python objects orjson gives. Whatever the reader does not expect (invalid JSON
    and ``NaN`` literals, nested or non-numeric data, integers past 2**53) goes the orjson
    way, with its errors and its exact conversions. The reader is imported with the first
    such body: an agent that is sent binary tensors or small JSON never maps simdjson
    (0.45 MB of its idle RSS)."""
    if len(head) < FAST_READ_MIN_BYTES:
        return loads(head)
    from edgeplane_proto import oip_reader  # noqa: PLC0415 - with the first long body (see above)

    doc = oip_reader.read(bytes(head))
    return loads(head) if doc is oip_reader.UNREAD else doc


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


def _binary_size(spec: Mapping[str, Any], where: str) -> int | None:
    """The bytes a tensor has in the binary part (``parameters.binary_data_size``), or None
    for a tensor given in JSON."""
    params = spec.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError(f"{where}.parameters must be an object")
    size = params.get("binary_data_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise ProtocolError(f"{where}.parameters.binary_data_size must be an integer")
    return size


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
        size = _binary_size(spec, where)
        if size is None:
            inputs.append(Tensor(spec["name"], _array_from_json(spec, where)))
            continue
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
        size = _binary_size(spec, where)
        if size is not None:
            shape = _check_shape(spec.get("shape"), where)
            if offset + size > len(binary):
                raise ProtocolError(f"{where}: binary data runs past the end of the body")
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

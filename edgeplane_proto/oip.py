"""Open Inference Protocol (KServe v2) tensors: JSON and binary-extension codec.

The agent, the data-centre ONNX replica, the gateway and the Python client all read and
write v2 inference bodies, so the encoding lives here once. Decoding validates everything
a caller controls (datatype names, shapes against element counts, binary sizes) and raises
:class:`ProtocolError`, which servers turn into a 400. What one tensor's values become as
an array, whichever form they came in, is :mod:`edgeplane_proto.oip_tensors`'s; this
module reads and writes the bodies around them.

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
import threading
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from edgeplane_proto import oip_tensors
from edgeplane_proto.oip_tensors import ProtocolError  # the codec's one error, raised by both modules

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


@dataclass(frozen=True)
class Tensor:
    name: str
    array: np.ndarray

    @property
    def datatype(self) -> str:
        return oip_tensors.datatype_of(self.array)


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
                array = oip_tensors.array_from_bytes(binary[offset:end], spec.datatype, spec.shape, f"inputs[{i}]")
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
            inputs.append(Tensor(spec["name"], oip_tensors.array_from_json(spec, where)))
            continue
        datatype = spec.get("datatype")
        if not isinstance(datatype, str):
            raise ProtocolError(f"{where}.datatype is required")
        shape = oip_tensors.check_shape(spec.get("shape"), where)
        # A fixed-width layout is the head's alone: checked here, once for every body it starts.
        dtype = None if datatype == "BYTES" else oip_tensors.fixed_width(datatype, shape, size, where)
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
    arr = oip_tensors.native(t.array)
    datatype = oip_tensors.datatype_of(arr)
    if datatype == "BYTES":
        data: list[Any] = _texts(t.name, arr)
    elif datatype == "BF16":  # orjson writes no bfloat16 array; each is a float32, exactly
        data = np.ascontiguousarray(arr.reshape(-1).astype(np.float32))
    elif arr.dtype == np.float64:
        # orjson's native numpy writer (3.12, 3.13) overruns its buffer on a few hundred float64
        # values spelt at their longest (24 characters, e.g. -1.1737277190147808e+247) and
        # corrupts the process's heap; its writer of Python floats checks its room as it goes
        data = arr.reshape(-1).tolist()
    else:
        data = np.ascontiguousarray(arr.reshape(-1))  # orjson writes it natively
    return {"name": t.name, "shape": list(arr.shape), "datatype": datatype, "data": data}


def _texts(name: str, arr: np.ndarray) -> list[str]:
    """A BYTES tensor's elements as JSON strings. JSON carries text only: bytes that are not
    UTF-8 (an image, a protobuf) are refused rather than sent with U+FFFD in place of what
    they held; the binary extension carries any bytes."""
    texts = []
    for index, value in enumerate(arr.reshape(-1)):
        if not isinstance(value, bytes):
            texts.append(str(value))
            continue
        try:
            texts.append(value.decode())
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"tensor {name!r}: BYTES element {index} is not UTF-8 text ({exc.reason} at byte {exc.start}), "
                                "which JSON cannot carry: send it as a binary tensor (binary=True)") from None
    return texts


def _finite(tensors: Sequence[Tensor]) -> bool:
    return all(not oip_tensors.floating(t.array.dtype) or bool(np.isfinite(t.array).all()) for t in tensors)


def _tolist_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")




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
        datatype = oip_tensors.datatype_of(t.array)
        raw = oip_tensors.tensor_bytes(t.array, datatype)
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
    seen: set[str] = set()
    for i, spec in enumerate(doc["outputs"]):
        where = f"outputs[{i}]"
        if not isinstance(spec, dict):
            raise ProtocolError(f"{where} must be an object")
        name = str(spec.get("name"))
        if name in seen:  # a model's outputs have one name each: which of the two would be its?
            raise ProtocolError(f"{where}: output {name!r} given twice")
        seen.add(name)
        size = _binary_size(spec, where)
        if size is not None:
            shape = oip_tensors.check_shape(spec.get("shape"), where)
            if offset + size > len(binary):
                raise ProtocolError(f"{where}: binary data runs past the end of the body")
            arr = oip_tensors.array_from_bytes(binary[offset : offset + size], str(spec.get("datatype")), shape, where)
            offset += size
        else:
            arr = oip_tensors.array_from_json(spec, where)
        outputs.append(Tensor(name, arr))
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

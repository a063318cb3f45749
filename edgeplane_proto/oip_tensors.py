"""One v2 tensor's values as a numpy array and back: datatypes, shapes, and the forms the values travel in.

The Open Inference Protocol carries a tensor's values as JSON ``data`` (numbers, flat or
nested, or strings for BYTES), as raw little-endian bytes (the binary extension's layout,
which gRPC's ``raw_input_contents`` shares) or as a typed list (gRPC's ``fp32_contents``
and the like). Turning each into an array, and checking on the way what a caller controls
(datatype names, shapes against element and byte counts, values that fit their datatype),
is the same work whichever body or transport brought the tensor: it lives here, apart
from :mod:`edgeplane_proto.oip`, which reads and writes whole request and response bodies
(their JSON, the binary framing, the memo of request heads) and hands each tensor here.
The agent's gRPC servicer, which has no body to read, uses these directly. Errors are
:class:`ProtocolError`, the codec's one error, which servers turn into a 400.
"""

from __future__ import annotations

import functools
import math
import struct
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orjson


#: v2 datatype name -> numpy dtype (BYTES is handled apart: object arrays of bytes; so is
#: BF16, which numpy lacks: :func:`bfloat16`).
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

MAX_DIMS = 16


@functools.cache
def bfloat16() -> np.dtype[Any]:
    """The numpy dtype of BF16 tensors: ``ml_dtypes``' bfloat16 (numpy has none; onnx depends
    on ml_dtypes), imported with the first BF16 tensor: a process that sees none keeps the
    1.8 MB it would cost."""
    import ml_dtypes  # noqa: PLC0415 - with the first BF16 tensor (see above)

    return np.dtype(ml_dtypes.bfloat16)


def is_bfloat16(dtype: np.dtype[Any]) -> bool:
    """Whether ``dtype`` is BF16's, told without importing ml_dtypes."""
    return dtype.name == "bfloat16" and dtype.itemsize == 2


def floating(dtype: np.dtype[Any]) -> bool:
    """Whether a tensor of ``dtype`` holds floats (FP16, FP32, FP64 or BF16)."""
    return dtype.kind == "f" or is_bfloat16(dtype)


def largest(dtype: np.dtype[Any]) -> float:
    """The largest finite value of a float dtype."""
    if is_bfloat16(dtype):
        import ml_dtypes  # noqa: PLC0415 - imported already: the array is one of its dtypes

        return float(ml_dtypes.finfo(dtype).max)
    return float(np.finfo(dtype).max)


class ProtocolError(ValueError):
    """A v2 body that cannot be decoded: the message is safe to return to the caller."""


def datatype_of(array: np.ndarray) -> str:
    name = _DTYPE_TO_NAME.get(array.dtype)
    if name is not None:
        return name
    if is_bfloat16(array.dtype):
        return "BF16"
    if not array.dtype.isnative:  # big-endian (FITS, HDF5, the network's order): same values, same datatype
        name = _DTYPE_TO_NAME.get(array.dtype.newbyteorder("="))
        if name is not None:
            return name
    if array.dtype.kind in "OSU":
        return "BYTES"
    raise ProtocolError(f"numpy dtype {array.dtype} has no v2 datatype")


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    try:
        return DATATYPES[datatype]
    except KeyError as exc:
        if datatype == "BF16":
            return bfloat16()
        known = ", ".join([*DATATYPES, "BF16", "BYTES"])
        raise ProtocolError(f"unknown datatype {datatype!r} (known: {known})") from exc


def check_shape(shape: Any, where: str) -> tuple[int, ...]:
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


def array_from_json(spec: Mapping[str, Any], where: str) -> np.ndarray:
    datatype = spec.get("datatype")
    if not isinstance(datatype, str):
        raise ProtocolError(f"{where}.datatype is required (e.g. \"FP32\")")
    shape = check_shape(spec.get("shape"), where)
    if "data" not in spec:
        raise ProtocolError(f"{where}.data is required")
    if datatype == "BYTES":
        flat = [v.encode() if isinstance(v, str) else v for v in _flatten(spec["data"])]
        if not all(isinstance(v, bytes) for v in flat):
            raise ProtocolError(f"{where}: BYTES data must be strings")
        return _array_from_list(flat, datatype, shape, where)
    named = f"{where} {spec.get('name')!r}"
    array = _numbers_to_array(spec["data"], numpy_dtype(datatype), datatype, shape, named)
    if datatype != "BOOL" and not isinstance(spec["data"], np.ndarray) and _may_hold_bool(array) and _holds_bool(spec["data"]):
        raise ProtocolError(f"{named}: {datatype} data must be numbers, not JSON booleans (true/false); "
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
    a look at each element's type); data with an integer past 64 bits, which orjson does not
    write, is looked at element by element."""
    try:
        text = orjson.dumps(data)
    except orjson.JSONEncodeError:
        return any(isinstance(v, bool) for v in _flatten(data))
    return b"t" in text or b"f" in text


def _numbers_to_array(data: Any, dtype: np.dtype[Any], datatype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    """Flat or nested JSON numbers as one vectorised conversion (no per-element Python)."""
    if isinstance(data, np.ndarray):  # float data the parse read straight into an array
        if data.size != math.prod(shape):
            raise ProtocolError(f"{where}: shape {list(shape)} needs {math.prod(shape)} elements, data has {data.size}")
        return (_as_float(data, dtype, datatype, where) if floating(dtype) else data.astype(dtype, copy=False)).reshape(shape)
    if floating(dtype) and isinstance(data, list):
        flat = _flat_floats(data)
        if flat is not None and flat.size == math.prod(shape):
            return _as_float(flat, dtype, datatype, where).reshape(shape)
    if isinstance(data, list) and len(data) > 0 and isinstance(data[0], list):
        _check_depth(data)
    try:
        values = np.asarray(data)
    except (ValueError, OverflowError, TypeError) as exc:  # ragged nesting
        raise ProtocolError(f"{where}: {datatype} data must be a list of numbers nested evenly: {exc}") from exc
    if values.dtype.kind == "O" and floating(dtype):
        values = _wide_integers_as_floats(values, datatype, where)
    if values.dtype.kind not in "biuf":
        raise ProtocolError(f"{where}: {datatype} data must be numbers, got {_kind_name(values)}")
    if values.dtype.kind == "f" and dtype.kind in "biu":
        values = _whole_numbers(data, values, datatype, where)
    count = math.prod(shape)
    if values.size != count:
        raise ProtocolError(f"{where}: shape {list(shape)} needs {count} elements, data has {values.size}")
    if dtype.kind in "biu" and values.dtype.kind in "iu" and values.size and values.dtype != dtype:
        _check_range(int(values.min()), int(values.max()), dtype, datatype, where)
    if floating(dtype):
        return _as_float(values, dtype, datatype, where).reshape(shape)
    return values.astype(dtype, copy=False).reshape(shape)


def _as_float(values: np.ndarray, dtype: np.dtype[Any], datatype: str, where: str) -> np.ndarray:
    """JSON numbers as a float tensor: each rounded to the nearest value of its width, as
    numpy casts, but one past the width's largest (FP16 70000, FP32 1e39) is refused where
    the cast would give an infinity the sender did not write, as an integer past its
    datatype is. An infinity written (the ``Infinity`` literal) stays one."""
    with np.errstate(over="ignore"):
        out = values.astype(dtype, copy=False)
    if out.dtype.itemsize < values.dtype.itemsize or values.dtype.kind != "f":
        overflowed = np.isinf(out)
        if overflowed.any():
            past = values.reshape(-1)[(overflowed & np.isfinite(values)).reshape(-1)]
            if past.size:
                raise ProtocolError(f"{where}: data does not fit {datatype}: {float(past[0])!r} is past "
                                    f"±{largest(dtype)!r}, the most it holds")
    return out


def _wide_integers_as_floats(values: np.ndarray, datatype: str, where: str) -> np.ndarray:
    """Numbers numpy could not hold (integers past 64 bits, as the Python client and
    ``edgeplane infer`` read JSON: whole) as the float64s their digits parse to, for a float
    tensor, whose width is then checked as for any float; ``values`` as they are when they
    hold anything but numbers (the caller names it). An integer past float64's largest does
    not fit any float datatype."""
    given = values.reshape(-1).tolist()
    if not all(isinstance(v, (int, float)) for v in given):
        return values
    try:
        return np.array([float(v) for v in given], dtype=np.float64).reshape(values.shape)
    except OverflowError:
        past = next(v for v in given if isinstance(v, int) and abs(v) > sys.float_info.max)
        raise ProtocolError(f"{where}: data does not fit {datatype}: an integer of {len(str(abs(past)))} digits is past "
                            f"±{largest(numpy_dtype(datatype))!r}, the most it holds") from None


def _whole_numbers(data: Any, values: np.ndarray, datatype: str, where: str) -> np.ndarray:
    """The data of an integer or BOOL tensor that numpy read as floats (a value written
    with a fraction or an exponent, or integers on both sides of 2**63) as integers.

    JSON does not tell 2 from 2.0, and the protocol lets a server coerce a value to the
    tensor's datatype: a whole number is taken as the integer it is. A cast would also turn
    1.5 into 1, 300.7 into 44 (UINT8) and 1e12 into -2**31 (INT32), other numbers than the
    sender's, so a value with a fraction (or NaN) is refused, and the range is checked
    after as for integers."""
    expected = "true and false, or 1 and 0" if datatype == "BOOL" else "whole numbers"
    if exact_in_float64(values):
        whole = values == np.trunc(values)  # NaN is not
        if not whole.all():
            odd = values.reshape(-1)[np.argmin(whole.reshape(-1))]
            raise ProtocolError(f"{where}: {datatype} data must be {expected}, got {float(odd)!r}")
        return values.astype(np.int64)
    # Past 2**53 the float64s may have rounded an integer written beside them: each value
    # as JSON gave it (Python compares ints and floats exactly).
    given = np.asarray(data, dtype=object).reshape(-1).tolist()
    odd = next((v for v in given if isinstance(v, float) and not v.is_integer()), None)  # infinities too
    if odd is not None:
        raise ProtocolError(f"{where}: {datatype} data must be {expected}, got {odd!r}")
    low, high = min(given), max(given)
    _check_range(low, high, numpy_dtype(datatype), datatype, where)
    return np.array([int(v) for v in given], dtype=np.uint64 if low >= 0 else np.int64).reshape(values.shape)


def _check_range(low: float, high: float, dtype: np.dtype[Any], datatype: str, where: str) -> None:
    # A BOOL element is one byte, 1 or 0, in the binary form: a JSON number is one of those too.
    least, most = (0, 1) if dtype.kind == "b" else (int(np.iinfo(dtype).min), int(np.iinfo(dtype).max))
    if low < least or high > most:
        hint = " (BOOL data are true and false, or 1 and 0)" if dtype.kind == "b" else ""
        raise ProtocolError(f"{where}: data does not fit {datatype}: values span {low}..{high}{hint}")


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


def array_from_bytes(raw: memoryview, datatype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
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
    return np.frombuffer(raw, dtype=fixed_width(datatype, shape, len(raw), where)).reshape(shape)


def fixed_width(datatype: str, shape: tuple[int, ...], size: int, where: str) -> np.dtype[Any]:
    """The numpy dtype of a tensor of ``size`` raw bytes, which its shape must fill exactly."""
    dtype = numpy_dtype(datatype)
    expected = math.prod(shape) * dtype.itemsize
    if size != expected:
        raise ProtocolError(f"{where}: shape {list(shape)} of {datatype} needs {expected} bytes, got {size}")
    return dtype


def tensor_bytes(arr: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts = []
        for v in arr.reshape(-1):
            b = v if isinstance(v, bytes) else str(v).encode()
            parts.append(len(b).to_bytes(4, "little") + b)
        return b"".join(parts)
    return np.ascontiguousarray(native(arr)).tobytes()


def native(arr: np.ndarray) -> np.ndarray:
    """``arr`` in the machine's byte order: binary tensors are written and read in it (the
    wire's little-endian on the hosts edgeplane runs on), and orjson writes only such numpy
    arrays. One in the other order (read from FITS or HDF5, ``np.frombuffer(raw, ">f4")``)
    is converted, a copy; any other is ``arr`` itself."""
    return arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="))


# -- the gRPC form (inference.GRPCInferenceService) -----------------------------------
# Tensors arrive as a datatype, a shape and either their raw bytes (the same layout as the
# binary extension's) or a typed list of values; they leave as raw bytes.

def array_from_raw(raw: bytes, datatype: str, shape: Sequence[int], where: str) -> np.ndarray:
    """A tensor from its raw little-endian bytes (BYTES: 4-byte length + bytes per element)."""
    return array_from_bytes(memoryview(raw), datatype, check_shape(list(shape), where), where)


def array_from_values(values: Sequence[Any], datatype: str, shape: Sequence[int], where: str) -> np.ndarray:
    """A tensor from a typed list of values (``fp32_contents`` and the like)."""
    dtype = None if datatype == "BYTES" else numpy_dtype(datatype)
    if dtype is not None and dtype.itemsize == 2 and floating(dtype):
        raise ProtocolError(f"{where}: {datatype} tensors travel as raw bytes only")
    return _array_from_list(values, datatype, check_shape(list(shape), where), where)


def raw_bytes(array: np.ndarray) -> bytes:
    """A tensor's raw form, as ``raw_output_contents`` carries it."""
    return tensor_bytes(array, datatype_of(array))

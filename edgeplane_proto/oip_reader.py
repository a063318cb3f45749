"""Long v2 JSON bodies read with no Python float per number: simdjson, and a native module for
large number arrays.

:func:`edgeplane_proto.oip.decode_request` and its kin hand a JSON document of 4 KB or more
(``oip.FAST_READ_MIN_BYTES``) to :func:`read`. simdjson parses a float tensor's flat
``data`` (what v2 clients send) straight into an array of doubles; the rest of the document
comes out as the same Python objects orjson gives. Before that, number arrays of 128 KiB
and more are read on several cores by ``_jsonfloats``, when the install could build it (the
interpreter lock released; the same doubles, or the body goes the ordinary way). Whatever
this module does not expect (invalid JSON, ``NaN`` literals, nested or non-numeric data,
integers past 2**53, a key given twice) is :data:`UNREAD`, and the caller parses the body
with orjson, which says what is wrong, if anything.

It is its own module so that a process that is never sent a long JSON body never imports
simdjson: an edge agent whose callers send binary tensors keeps 0.45 MB less. The first long
body pays for the import (a few milliseconds, once).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import simdjson

from edgeplane_proto.oip_tensors import exact_in_float64

try:  # large number arrays read on several cores; optional (setup.py builds it when it can)
    from edgeplane_proto import _jsonfloats
except ImportError:  # pragma: no cover - depends on the install
    _jsonfloats = None

#: What :func:`read` gives for a document it leaves to orjson.
UNREAD = object()

#: Tensor datatypes whose JSON ``data`` is read straight into an array.
FLOAT_DATATYPES = frozenset({"FP16", "FP32", "FP64", "BF16"})


def read(raw: bytes) -> Any:
    """The document, its float tensors' ``data`` as float64 arrays; :data:`UNREAD` for one
    this module does not take."""
    split = split_arrays(raw)
    source = raw if split is None else split.rest
    try:
        doc = _plain(_parse(source), tensors=True)
    except Exception:  # noqa: BLE001 - invalid for simdjson, or unusual: the orjson path says what is wrong
        return UNREAD
    if isinstance(doc, dict) and not _flat_as_written(source, doc):
        return UNREAD
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
            index = self._index(spec.get("data")) if spec.get("datatype") in FLOAT_DATATYPES else None
            if index is not None:
                values = np.frombuffer(self.values[index], dtype=np.float64)
                if exact_in_float64(values):
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


def split_arrays(raw: bytes) -> _Split | None:
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
        values = _float_data(data) if out.get("datatype") in FLOAT_DATATYPES else None
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
    if values.size != len(data) or not exact_in_float64(values):  # nested past the first item; huge
        return None
    return values

"""Plain values (JSON, Python lists and numbers) as tensors of the datatypes a model declares.

JSON and a Python list do not say whether ``[[0, 1, 0]]`` is FP32, INT32 or BOOL, and a
replica takes a tensor only in its input's own datatype (an agent refuses the rest: ``input
'x' must be FP32, got INT64``). So ``edgeplane infer --data`` and the Python client
(:mod:`orchestrator.client`) read each input's datatype from the model's v2 metadata
(``GET /v2/models/{model}``, :func:`datatypes_of`) and turn the values given into it here
(:func:`typed`, :func:`arrays`), checked as a replica checks them
(:func:`edgeplane_proto.oip_tensors.array_from_json`): a value the datatype cannot hold
(0.5 for INT32, 256 for UINT8, 2 for BOOL, 70000 for FP16, a string or true/false for
numbers) is a ``ValueError`` naming the input, before anything is sent.

Pure. numpy is imported by a call that checks values, not with this module: the CLI
imports it for every command.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

#: The most dimensions a tensor has (``edgeplane_proto.oip_tensors.MAX_DIMS``; not imported: it brings numpy).
MAX_DIMS = 16

#: The v2 datatypes whose values travel as JSON floats.
FLOATS = frozenset({"FP16", "FP32", "FP64", "BF16"})


def datatypes_of(doc: Any) -> dict[str, str] | None:
    """Each input's datatype by name, in the model's order, from a v2 model metadata
    document (the answer to ``GET /v2/models/{model}``); None when ``doc`` is none (no
    ``inputs`` list of names and datatypes: a proxy's page, another service)."""
    inputs = doc.get("inputs") if isinstance(doc, Mapping) else None
    if not isinstance(inputs, list) or not all(isinstance(i, Mapping) and isinstance(i.get("name"), str)
                                               and isinstance(i.get("datatype"), str) for i in inputs):
        return None
    return {i["name"]: i["datatype"] for i in inputs}


def shape_of(value: Any, where: str, depth: int = 0) -> tuple[list[int], list[Any]]:
    """The shape and the flat values of nested lists (or tuples), which must nest evenly
    (every row as long as the first) and no deeper than a tensor's dimensions; a
    ``ValueError`` beginning with ``where`` otherwise. A lone value is of shape [1]."""
    if depth > MAX_DIMS:
        raise ValueError(f"{where}: nested deeper than a tensor's {MAX_DIMS} dimensions")
    if not isinstance(value, (list, tuple)):
        if depth == 0:
            return [1], [value]
        return [], [value]
    if value and isinstance(value[0], (list, tuple)):
        inner = [shape_of(v, where, depth + 1) for v in value]
        if any(not isinstance(v, (list, tuple)) for v in value) or any(shape != inner[0][0] for shape, _ in inner):
            raise ValueError(f"{where}: the rows are not all the same length (a tensor is a box: nest the lists evenly)")
        return [len(value), *inner[0][0]], [x for _, flat in inner for x in flat]
    if any(isinstance(v, (list, tuple)) for v in value):
        raise ValueError(f"{where}: the rows are not all the same length (a tensor is a box: nest the lists evenly)")
    return [len(value)], list(value)


def typed(name: str, shape: list[int], flat: list[Any], datatype: str, where: str) -> np.ndarray:
    """Input ``name``'s values (``flat``, of ``shape``) as an array of ``datatype``, checked
    as a replica checks them: a ``ValueError`` saying ``where``, the input and the value the
    datatype cannot hold (a fraction for an integer, a value past its range or width, a
    string or true/false for numbers, anything but strings for BYTES)."""
    if datatype == "BYTES" and not all(isinstance(v, (str, bytes)) for v in flat):
        raise ValueError(f"{where} {name!r}: BYTES data must be strings")
    # here, not at the top: numpy is imported by a call that checks values, not by every command
    from edgeplane_proto import oip_tensors  # noqa: PLC0415

    # a ProtocolError is a ValueError
    return oip_tensors.array_from_json({"name": name, "datatype": datatype, "shape": shape, "data": flat}, where)


def arrays(values: Mapping[str, Any], datatypes: Mapping[str, str], where: str = "input") -> dict[str, Any]:
    """``values`` ({input name: value}) with each one that is not a numpy array already (a
    list, a Python number), of an input ``datatypes`` declares, as an array of that
    datatype (:func:`typed`); the others as given (a numpy array keeps its dtype)."""
    import numpy as np  # noqa: PLC0415 (see typed)

    out = {}
    for name, value in values.items():
        datatype = datatypes.get(name)
        if datatype is None or isinstance(value, (np.ndarray, np.generic)):
            out[name] = value
            continue
        # a lone number is a tensor of shape [], as numpy has it
        shape, flat = shape_of(value, f"{where} {name!r}") if isinstance(value, (list, tuple)) else ([], [value])
        out[name] = typed(name, shape, flat, datatype, where)
    return out

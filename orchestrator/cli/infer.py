"""``edgeplane infer``: one request through the gateway, for a quick try.

``--data`` is JSON inline, ``@FILE`` or ``@-`` (standard input). Data that is no tensor
(rows of different lengths, a mix of strings and numbers, null) is refused here, before
anything is sent, as a usage error naming the input.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from typing import Any, NoReturn

from orchestrator.cli import render, textfile
from orchestrator.cli.http import ApiClient, CliError, json_of
from orchestrator.urlpath import path_segment

#: The most dimensions a tensor has (``edgeplane_proto.oip_tensors.MAX_DIMS``; not imported: it brings numpy).
MAX_DIMS = 16


def body_of(data: str, input_names: Callable[[], list[str]] | None = None, what: str = "--data") -> dict[str, Any]:
    """The v2 request for ``--data``: ``{"INPUT": [[...]]}``, a v2 body, or a bare array when
    the model takes one input (``input_names`` asks the model's metadata for its name).
    ``@FILE`` reads a file, ``@-`` standard input; ``what`` names the source in errors."""
    text = _data_text(data) if data.startswith("@") else data
    try:
        doc = json.loads(text, parse_constant=_refuse_non_finite, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise CliError(f"{what} is not JSON: {exc}", 2) from exc
    except ValueError:  # what the JSON parser leaves to int(), which reads at most 4,300 digits
        raise CliError(f"{what}: an integer too long to read", 2) from None
    except RecursionError:
        raise CliError(f"{what}: JSON nested too deeply (a tensor has at most {MAX_DIMS} dimensions)", 2) from None
    if isinstance(doc, dict) and "inputs" in doc:
        return doc  # already a v2 request
    if isinstance(doc, list) and input_names is not None:
        names = input_names()
        if len(names) != 1:
            raise CliError(f'the model takes {len(names)} inputs ({", ".join(names)}): give {what} as {{"NAME": [[...]], ...}}', 2)
        doc = {names[0]: doc}
    if not isinstance(doc, dict) or not doc:
        raise CliError(f'{what} must be {{"INPUT": [[...]]}}, a v2 body with "inputs", or an array for a model of one input', 2)
    inputs = []
    for name, value in doc.items():
        if not name:
            raise CliError(f"{what}: an input name is empty", 2)
        shape, flat = _shape(value, f"{what}: input {name!r}")
        inputs.append({"name": name, "shape": shape, "datatype": _datatype(flat, f"{what}: input {name!r}"), "data": flat})
    return {"inputs": inputs}


def _data_text(data: str) -> str:
    """The text of ``--data @FILE`` (``@-``: standard input)."""
    path = data[1:]
    if not path:
        raise CliError("--data @: name a file after the @ (@- reads standard input)", 2)
    if path == "-":
        return textfile.read_stdin("--data @-")
    try:
        return textfile.read(path, 2)
    except OSError as exc:
        raise CliError(f"--data {data}: cannot read the file: {exc.strerror or exc}", 2) from exc


def _refuse_non_finite(token: str) -> NoReturn:
    # the body goes out as JSON, which has no NaN or Infinity (json.loads reads them, json.dumps refuses them)
    raise CliError(f"{token} in the inputs: a tensor sent as JSON holds finite numbers only", 2)


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):  # 1e999: past the largest float
        _refuse_non_finite(token)
    return value


def _shape(value: Any, where: str, depth: int = 0) -> tuple[list[int], list[Any]]:
    """The shape and the flat data of nested lists, which must nest evenly (every row as
    long as the first) and no deeper than a tensor's dimensions."""
    if depth > MAX_DIMS:
        raise CliError(f"{where}: nested deeper than a tensor's {MAX_DIMS} dimensions", 2)
    if not isinstance(value, list):
        if depth == 0:
            return [1], [value]
        return [], [value]
    if value and isinstance(value[0], list):
        inner = [_shape(v, where, depth + 1) for v in value]
        if any(not isinstance(v, list) for v in value) or any(shape != inner[0][0] for shape, _ in inner):
            raise CliError(f"{where}: the rows are not all the same length (a tensor is a box: nest the lists evenly)", 2)
        return [len(value), *inner[0][0]], [x for _, flat in inner for x in flat]
    if any(isinstance(v, list) for v in value):
        raise CliError(f"{where}: the rows are not all the same length (a tensor is a box: nest the lists evenly)", 2)
    return [len(value)], list(value)


def _datatype(flat: list[Any], where: str) -> str:
    """The v2 datatype of JSON values: strings are BYTES, true/false BOOL, whole numbers
    INT64 and other numbers FP32; anything else (objects, null, a mix) is refused."""
    kinds = {"string" if isinstance(v, str) else "true/false" if isinstance(v, bool) else "integer" if isinstance(v, int)
             else "number" if isinstance(v, float) else "null" if v is None else "object" for v in flat}
    if kinds <= {"integer", "number"}:
        return "INT64" if kinds == {"integer"} else "FP32"
    if kinds == {"string"}:
        return "BYTES"
    if kinds == {"true/false"}:
        return "BOOL"
    raise CliError(f"{where}: a tensor holds numbers, true/false or strings, one kind only; got {', '.join(sorted(kinds))}", 2)


def caller_headers(args: argparse.Namespace) -> dict[str, str]:
    """The gateway's caller headers from ``--location`` (a lat_lon pair), ``--region`` and ``--residency``."""
    headers = {}
    if args.location:
        headers["x-edgeplane-location"] = "{},{}".format(*args.location)
    if args.region:
        headers["x-edgeplane-region"] = args.region
    if args.residency:
        headers["x-edgeplane-residency"] = args.residency
    return headers


def run(api: ApiClient, args: argparse.Namespace) -> int:
    if not args.model:
        raise CliError("MODEL is empty: name the model to call (edgeplane get models)", 2)
    headers = caller_headers(args)

    def input_names() -> list[str]:
        meta = api.raw("GET", f"/v2/models/{path_segment(args.model)}", headers=headers)
        doc = json_of(meta)
        if meta.status_code >= 400 or not isinstance(doc, dict):
            raise CliError(_error_of(meta, doc))
        inputs = doc.get("inputs")
        return [str(i.get("name")) for i in inputs if isinstance(i, dict)] if isinstance(inputs, list) else []

    body = body_of(args.data, input_names)
    started = time.perf_counter()
    # the gateway may wait for a cold start (30 s by default), then for the model: longer than a read of the control plane
    resp = api.raw("POST", f"/v2/models/{path_segment(args.model)}/infer", json=body, headers=headers, timeout=args.timeout)
    elapsed = (time.perf_counter() - started) * 1000
    answer = json_of(resp)
    if answer is None:  # not JSON: a proxy's error page, say
        raise CliError(f"HTTP {resp.status_code}: {resp.text[:300] or resp.reason_phrase}")
    if resp.status_code >= 400 or not isinstance(answer, dict):
        raise CliError(_error_of(resp, answer))
    outputs = answer.get("outputs")
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("data"), list) for o in outputs):
        raise CliError(f"HTTP {resp.status_code} with no v2 inference response (no \"outputs\" list): {resp.text[:200]}")
    site = resp.headers.get("x-edgeplane-site", "?")
    if args.output in ("json", "yaml"):
        render.dump({"servedBy": site, "tier": resp.headers.get("x-edgeplane-tier"), "ms": round(elapsed, 2), **answer}, args.output)
        return 0
    print(f"served by {site} ({resp.headers.get('x-edgeplane-tier', '?')}) in {elapsed:.1f} ms")
    for out in outputs:
        data = out["data"]
        shown = ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in data[:16]) + (" ..." if len(data) > 16 else "")
        print(f"  {out.get('name')} {out.get('datatype')} {out.get('shape')}: [{shown}]")
    return 0


def _error_of(resp: Any, doc: Any) -> str:
    """The one-line reason of a refusal: the body's ``error`` when it has one."""
    error = doc.get("error") if isinstance(doc, dict) else None
    return str(error) if error else f"HTTP {resp.status_code}: {resp.text[:200] or resp.reason_phrase}"

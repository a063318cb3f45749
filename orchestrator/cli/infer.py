"""``edgeplane infer``: one request through the gateway, for a quick try.

``--data`` is JSON inline, ``@FILE`` or ``@-`` (standard input). Data that is no tensor
(rows of different lengths, a mix of strings and numbers, null) is refused here, before
anything is sent, as a usage error naming the input.

JSON does not say whether ``[[0, 1, 0]]`` is FP32, INT32 or BOOL, and a replica takes a
tensor only in its input's own datatype: each input goes in the datatype the model's v2
metadata (``GET /v2/models/{model}``) declares for it, its values checked to fit it first.
Only when that metadata cannot be read is the datatype the JSON's (whole numbers INT64,
other numbers FP32), said in a warning. A v2 body with ``inputs`` is sent as written.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from orchestrator import header_text, plaintensors
from orchestrator.api import reasons
from orchestrator.cli import render, textfile
from orchestrator.cli.http import ApiClient, CliError, json_of
from orchestrator.plaintensors import FLOATS, MAX_DIMS
from orchestrator.urlpath import path_segment


@dataclass(frozen=True)
class Declared:
    """What the model's v2 metadata says of its inputs: each one's datatype by name, in the
    model's order; ``unread``: why the metadata could not be read (then nothing is declared,
    and each input's datatype is guessed from its JSON)."""

    datatypes: dict[str, str]
    unread: str | None = None


@dataclass(frozen=True)
class Given:
    """One input as ``--data`` gives it: its name (None for a bare array), its shape, its
    values flat, and the datatype its JSON suggests (``_datatype``)."""

    name: str | None
    shape: list[int]
    flat: list[Any]
    guess: str


def read_data(data: str, what: str = "--data") -> Any:
    """The JSON of ``--data``: inline, ``@FILE`` or ``@-`` (standard input); ``what`` names the source in errors."""
    text = _data_text(data) if data.startswith("@") else data
    try:
        return json.loads(text, parse_constant=_refuse_non_finite, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise CliError(f"{what} is not JSON: {exc}", 2) from exc
    except ValueError:  # what the JSON parser leaves to int(), which reads at most 4,300 digits
        raise CliError(f"{what}: an integer too long to read", 2) from None
    except RecursionError:
        raise CliError(f"{what}: JSON nested too deeply (a tensor has at most {MAX_DIMS} dimensions)", 2) from None


def is_v2(doc: Any) -> bool:
    """Whether ``doc`` is a whole v2 request (it has ``inputs``): it is sent as written."""
    return isinstance(doc, dict) and "inputs" in doc


def given_of(doc: Any, what: str = "--data") -> list[Given]:
    """The inputs of ``{"INPUT": [[...]], ...}`` or of a bare array, each a tensor: data that
    is none (rows of different lengths, a mix of strings and numbers, null) is a usage error."""
    if isinstance(doc, list):
        shape, flat = _shape(doc, what)
        return [Given(None, shape, flat, _datatype(flat, what))]
    if not isinstance(doc, dict) or not doc:
        raise CliError(f'{what} must be {{"INPUT": [[...]]}}, a v2 body with "inputs", or an array for a model of one input', 2)
    given = []
    for name, value in doc.items():
        if not name:
            raise CliError(f"{what}: an input name is empty", 2)
        shape, flat = _shape(value, f"{what}: input {name!r}")
        given.append(Given(name, shape, flat, _datatype(flat, f"{what}: input {name!r}")))
    return given


def request_of(given: list[Given], declared: Declared | None, what: str = "--data") -> dict[str, Any]:
    """The v2 request of ``given``: each input in the datatype ``declared`` for it, its values
    checked to fit it (exit 1 naming the input and the value, before anything is sent); an
    input nothing declares (``declared`` None or unread, a name the model lacks, which its
    replica then refuses) in the datatype its JSON suggests. A bare array takes the name of
    the model's one input."""
    if any(g.name is None for g in given):
        if declared is None:
            raise CliError(f'{what} must be {{"INPUT": [[...]]}}, a v2 body with "inputs", or an array for a model of one input', 2)
        if declared.unread is not None:
            raise CliError(f'cannot read the name of the model\'s input ({declared.unread}): give {what} as {{"NAME": [[...]]}}')
        names = list(declared.datatypes)
        if len(names) != 1:
            raise CliError(f'the model takes {len(names)} inputs ({", ".join(names)}): give {what} as {{"NAME": [[...]], ...}}', 2)
        given = [Given(names[0], g.shape, g.flat, g.guess) for g in given]
    inputs = []
    for g in given:
        datatype = declared.datatypes.get(str(g.name)) if declared is not None else None
        data = g.flat if datatype is None else _encoded(g, datatype, f"{what}: input")
        inputs.append({"name": g.name, "shape": g.shape, "datatype": datatype or g.guess, "data": data})
    return {"inputs": inputs}


def body_of(data: str, what: str = "--data") -> dict[str, Any]:
    """The v2 request for ``data`` without the model's metadata: a v2 body as written, or
    ``{"INPUT": [[...]]}`` in the datatypes its JSON suggests."""
    doc = read_data(data, what)
    return doc if is_v2(doc) else request_of(given_of(doc, what), None, what)


def _encoded(given: Given, datatype: str, where: str) -> list[Any]:
    """``given``'s values as ``datatype`` takes them in JSON (2.0 as 2 for an integer, 1 as
    true for BOOL), checked as the replica checks them: a fraction for an integer, a value
    past the datatype's range or width, a string or true/false for numbers is refused."""
    if datatype == "BYTES":
        if given.guess != "BYTES":
            raise CliError(f"{where} {given.name!r}: BYTES data must be strings, got {given.guess} values", reason=reasons.Reason.INVALID)
        return given.flat
    try:
        plaintensors.typed(str(given.name), given.shape, given.flat, datatype, where)
    except ValueError as exc:
        raise CliError(str(exc), reason=reasons.Reason.INVALID) from None
    cast: Callable[[Any], Any] = bool if datatype == "BOOL" else float if datatype in FLOATS else int
    return [cast(v) for v in given.flat]


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


def _shape(value: Any, where: str) -> tuple[list[int], list[Any]]:
    """The shape and the flat data of nested lists (:func:`plaintensors.shape_of`); data
    that nests unevenly or too deep is a usage error."""
    try:
        return plaintensors.shape_of(value, where)
    except ValueError as exc:
        raise CliError(str(exc), 2) from None


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
        headers["x-edgeplane-region"] = header_text.encoded(args.region)
    if args.residency:
        headers["x-edgeplane-residency"] = args.residency
    return headers


def run(api: ApiClient, args: argparse.Namespace) -> int:
    if not args.model:
        raise CliError("MODEL is empty: name the model to call (edgeplane get models)", 2)
    headers = caller_headers(args)

    doc = read_data(args.data)
    if is_v2(doc):
        body = doc
    else:
        given = given_of(doc)  # refused before the model is asked anything
        declared = declared_of(api.raw("GET", f"/v2/models/{path_segment(args.model)}", headers=headers, timeout=args.timeout))
        body = request_of(given, declared)
        if declared.unread is not None:
            print(f"warning: cannot read the datatypes model {args.model!r} takes ({declared.unread}): "
                  "whole numbers go as INT64, other numbers as FP32", file=sys.stderr, flush=True)
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


def declared_of(resp: Any) -> Declared:
    """The inputs the answer to ``GET /v2/models/{model}`` declares (it may wake a cold
    model: it waits as the inference does). A refusal the inference would get as well (the
    model not deployed, a caller header refused) is the command's error; an answer that is
    no v2 metadata (a replica that failed, a proxy's page) leaves the datatypes unread."""
    doc = json_of(resp)
    if 400 <= resp.status_code < 500 and resp.status_code != 429 and isinstance(doc, dict) and doc.get("error"):
        raise CliError(str(doc["error"]))
    if resp.status_code >= 400:
        return Declared({}, " ".join(_error_of(resp, doc).split()))
    datatypes = plaintensors.datatypes_of(doc)
    if datatypes is None:
        return Declared({}, f"HTTP {resp.status_code} with no v2 model metadata: no \"inputs\" list of names and datatypes")
    return Declared(datatypes)

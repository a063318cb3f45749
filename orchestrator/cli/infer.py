"""``edgeplane infer``: one request through the gateway, for a quick try."""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from typing import Any, NoReturn

from orchestrator.cli import render, textfile
from orchestrator.cli.http import ApiClient, CliError
from orchestrator.urlpath import path_segment


def body_of(data: str, input_names: Callable[[], list[str]] | None = None) -> dict[str, Any]:
    """The v2 request for ``--data``: ``{"INPUT": [[...]]}``, a v2 body, or a bare array when
    the model takes one input (``input_names`` asks the model's metadata for its name)."""
    try:
        text = textfile.read(data[1:], 2) if data.startswith("@") else data
    except OSError as exc:
        raise CliError(f"--data {data}: cannot read the file: {exc.strerror or exc}", 2) from exc
    try:
        doc = json.loads(text, parse_constant=_refuse_non_finite, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise CliError(f"--data is not JSON: {exc}", 2) from exc
    if isinstance(doc, dict) and "inputs" in doc:
        return doc  # already a v2 request
    if isinstance(doc, list) and input_names is not None:
        names = input_names()
        if len(names) != 1:
            raise CliError(f'the model takes {len(names)} inputs ({", ".join(names)}): give --data as {{"NAME": [[...]], ...}}', 2)
        doc = {names[0]: doc}
    if not isinstance(doc, dict) or not doc:
        raise CliError('--data must be {"INPUT": [[...]]}, a v2 body with "inputs", or an array for a model of one input', 2)
    inputs = []
    for name, value in doc.items():
        shape, flat = _shape(value)
        datatype = "BYTES" if flat and isinstance(flat[0], str) else ("INT64" if flat and all(isinstance(v, int) for v in flat) else "FP32")
        inputs.append({"name": name, "shape": shape, "datatype": datatype, "data": flat})
    return {"inputs": inputs}


def _refuse_non_finite(token: str) -> NoReturn:
    # the body goes out as JSON, which has no NaN or Infinity (json.loads reads them, json.dumps refuses them)
    raise CliError(f"{token} in the inputs: a tensor sent as JSON holds finite numbers only", 2)


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):  # 1e999: past the largest float
        _refuse_non_finite(token)
    return value


def _shape(value: Any) -> tuple[list[int], list[Any]]:
    if not isinstance(value, list):
        return [1], [value]
    if value and isinstance(value[0], list):
        inner = [_shape(v) for v in value]
        return [len(value), *inner[0][0]], [x for _, flat in inner for x in flat]
    return [len(value)], list(value)


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
    headers = caller_headers(args)

    def input_names() -> list[str]:
        meta = api.raw("GET", f"/v2/models/{path_segment(args.model)}", headers=headers)
        try:
            doc = meta.json()
        except ValueError:
            doc = {}
        if meta.status_code >= 400 or not isinstance(doc, dict):
            raise CliError(doc.get("error", meta.reason_phrase) if isinstance(doc, dict) else meta.reason_phrase)
        return [str(i.get("name")) for i in doc.get("inputs", [])]

    body = body_of(args.data, input_names)
    started = time.perf_counter()
    resp = api.raw("POST", f"/v2/models/{path_segment(args.model)}/infer", json=body, headers=headers)
    elapsed = (time.perf_counter() - started) * 1000
    try:
        body = resp.json()
    except ValueError:  # not JSON: a proxy's error page, say
        raise CliError(f"HTTP {resp.status_code}: {resp.text[:300] or resp.reason_phrase}") from None
    if resp.status_code >= 400:
        raise CliError(body.get("error", resp.reason_phrase))
    site = resp.headers.get("x-edgeplane-site", "?")
    if args.output in ("json", "yaml"):
        render.dump({"servedBy": site, "tier": resp.headers.get("x-edgeplane-tier"), "ms": round(elapsed, 2), **body}, args.output)
        return 0
    print(f"served by {site} ({resp.headers.get('x-edgeplane-tier', '?')}) in {elapsed:.1f} ms")
    for out in body.get("outputs", []):
        data = out["data"]
        shown = ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in data[:16]) + (" ..." if len(data) > 16 else "")
        print(f"  {out['name']} {out['datatype']} {out['shape']}: [{shown}]")
    return 0

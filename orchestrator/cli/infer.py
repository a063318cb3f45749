"""``edgeplane infer``: one request through the gateway, for a quick try."""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from typing import Any

from orchestrator.cli import render
from orchestrator.cli.http import ApiClient, CliError


def body_of(data: str) -> dict[str, Any]:
    try:
        text = pathlib.Path(data[1:]).read_text() if data.startswith("@") else data
    except OSError as exc:
        raise CliError(f"--data {data}: cannot read the file: {exc.strerror or exc}", 2) from exc
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"--data is not JSON: {exc}", 2) from exc
    if isinstance(doc, dict) and "inputs" in doc:
        return doc  # already a v2 request
    if not isinstance(doc, dict) or not doc:
        raise CliError('--data must be {"INPUT": [[...]]} or a v2 body with "inputs"', 2)
    inputs = []
    for name, value in doc.items():
        shape, flat = _shape(value)
        datatype = "BYTES" if flat and isinstance(flat[0], str) else ("INT64" if flat and all(isinstance(v, int) for v in flat) else "FP32")
        inputs.append({"name": name, "shape": shape, "datatype": datatype, "data": flat})
    return {"inputs": inputs}


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
    started = time.perf_counter()
    resp = api.raw("POST", f"/v2/models/{args.model}/infer", json=body_of(args.data), headers=headers)
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

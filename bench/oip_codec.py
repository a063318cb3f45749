"""The v2 JSON codec against the standard library it replaced, same tensors, same run.

    .venv/bin/python -m bench.oip_codec

For the output of the "wide" model at several batches (float32, N x 2048 elements as a
reference size) it times encoding a response and decoding it back, as
``edgeplane_proto.oip`` does it (orjson, numpy written natively, one vectorised
conversion on the way in) and as the codec did before (``json.dumps`` of ``tolist()``,
``json.loads`` then ``np.asarray``), plus the binary extension for scale. Writes
bench/results/oip_codec.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from edgeplane_proto import oip

RESULTS = Path(__file__).parent / "results" / "oip_codec.json"
BATCHES = (1, 24, 64, 256)


def _best_ms(fn, budget_s: float, max_runs: int = 200) -> float:
    best = float("inf")
    deadline = time.perf_counter() + budget_s
    for _ in range(max_runs):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() > deadline:
            break
    return round(best * 1000, 3)


def _stdlib_encode(arr: np.ndarray) -> bytes:
    doc = {"model_name": "m", "outputs": [{"name": "o", "shape": list(arr.shape), "datatype": "FP32",
                                           "data": arr.reshape(-1).tolist()}]}
    return json.dumps(doc, separators=(",", ":")).encode()


def _stdlib_decode(body: bytes) -> np.ndarray:
    spec = json.loads(body)["outputs"][0]
    return np.asarray(spec["data"], dtype=np.float32).reshape(spec["shape"])


def _row(batch: int, arr: np.ndarray, budget: float) -> dict:
    response = oip.InferResponse("m", (oip.Tensor("o", arr),))
    body, _ = oip.encode_response(response)
    binary, length = oip.encode_response(response, binary=True)
    assert oip.decode_response(body).outputs[0].array.tobytes() == arr.tobytes()
    old = _stdlib_encode(arr)
    row = {
        "batch": batch, "elements": arr.size, "json_bytes": len(body),
        "stdlib_encode_ms": _best_ms(lambda: _stdlib_encode(arr), budget),
        "stdlib_decode_ms": _best_ms(lambda: _stdlib_decode(old), budget),
        "codec_encode_ms": _best_ms(lambda: oip.encode_response(response), budget),
        "codec_decode_ms": _best_ms(lambda: oip.decode_response(body), budget),
        "binary_encode_ms": _best_ms(lambda: oip.encode_response(response, binary=True), budget),
        "binary_decode_ms": _best_ms(lambda: oip.decode_response(binary, length), budget),
    }
    row["speedup_round_trip"] = round(
        (row["stdlib_encode_ms"] + row["stdlib_decode_ms"]) / (row["codec_encode_ms"] + row["codec_decode_ms"]), 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter timing budget per case")
    budget = 0.3 if parser.parse_args().quick else 1.0
    rng = np.random.default_rng(0)
    rows = []
    for batch in BATCHES:
        rows.append(_row(batch, rng.standard_normal((batch, 2048)).astype(np.float32), budget))
    table = Table(title=f"v2 JSON codec vs the standard library, best of runs, ms ({os.cpu_count()} cores)")
    cols = ["batch", "json_bytes", "stdlib_encode_ms", "codec_encode_ms", "stdlib_decode_ms", "codec_decode_ms",
            "binary_encode_ms", "binary_decode_ms", "speedup_round_trip"]
    for col in cols:
        table.add_column(col.replace("_ms", " ms").replace("_", " "), justify="right")
    for r in rows:
        table.add_row(*(f"{r[c]:,}" for c in cols))
    Console().print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "oip_codec", "cpu_count": os.cpu_count(),
                                   "load_avg_1m": os.getloadavg()[0], "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

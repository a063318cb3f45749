"""Where a JSON inference request's time goes: the "wide" model at batch 64 (agent_infer's JSON row).

    .venv/bin/python -m bench.json_budget [--quick]

Each step the agent takes for one v2 JSON request, timed alone in this process, rounds
interleaved so that every step sees the same moments of a shared machine: the orjson
path (parsing the body, converting the parsed numbers to float32 with one ``struct.pack``
or, before that, numpy's ``asarray`` + ``astype``, freeing the parsed numbers), the
simdjson read (the float data parsed straight into an array), the native reader that now
reads large number arrays on several cores before it, ``decode_request`` as a whole with
and without that reader, ``session.run`` with the agent's session options, and encoding the output (orjson
writing numpy natively; ``tolist`` + orjson, which writes float64 digits, for comparison). The HTTP path itself is the
tiny model's row of ``bench.agent_infer``. 0.5x of raw ``session.run`` throughput one
request at a time leaves a budget of one run for everything else. Writes
bench/results/json_budget.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
from rich.console import Console
from rich.table import Table

from edge_agent.runtime import onnx
from edgeplane_proto import oip, oip_reader, oip_tensors
from orchestrator.testing import onnx_models

RESULTS = Path(__file__).parent / "results" / "json_budget.json"


def _previous_conversion(data: list[float]) -> np.ndarray:
    """What the codec did before: numpy discovers the type of each element."""
    return np.asarray(data).astype(np.float32)


def _without_native_reader(fn: Callable[[], object]) -> object:
    """``fn`` with the codec's native reader of large number arrays switched off."""
    native, oip_reader._jsonfloats = oip_reader._jsonfloats, None
    try:
        return fn()
    finally:
        oip_reader._jsonfloats = native


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _parse_then_free(body: bytes) -> tuple[float, float]:
    t = time.perf_counter()
    doc = orjson.loads(body)
    parsed = time.perf_counter()
    del doc
    return parsed - t, time.perf_counter() - parsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    rounds = 40 if parser.parse_args().quick else 200
    with tempfile.TemporaryDirectory() as tmp:
        built = onnx_models.build_mlp(Path(tmp) / "wide.onnx", in_dim=1024, hidden=1024, out_dim=16, layers=4,
                                      softmax=False)
        model = onnx.OnnxModel.load(built.path.read_bytes())
    x = np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32)
    body, _ = oip.encode_request({"input": x})
    names = [s.name for s in model.outputs]
    out = model.run({"input": x}, names)[0]
    response = oip.InferResponse("wide", (oip.Tensor(names[0], out),), model_version="0" * 12)
    response_body, _ = oip.encode_response(response)
    data = orjson.loads(body)["inputs"][0]["data"]
    assert oip.decode_request(body).inputs[0].array.tobytes() == x.tobytes()  # bit for bit
    if oip_reader.split_arrays(body) is None:
        raise SystemExit("the codec's native reader (edgeplane_proto._jsonfloats) is not built: run `make proto`")

    flat_out = out.reshape(-1)
    steps: dict[str, Callable[[], float]] = {
        "parse the body (orjson.loads)": lambda: _parse_then_free(body)[0],
        "free the parsed numbers": lambda: _parse_then_free(body)[1],
        "numbers -> float32, before (np.asarray + astype)": lambda: _timed(lambda: _previous_conversion(data)),
        "numbers -> float32, orjson path (struct.pack)": lambda: _timed(lambda: oip_tensors._flat_floats(data).astype(np.float32)),
        "simdjson read: parse + float data as an array, to float32": lambda: _timed(
            lambda: _without_native_reader(lambda: oip._loads_tensors(body)["inputs"][0]["data"].astype(np.float32))),
        "decode_request, whole, simdjson alone (before)": lambda: _timed(
            lambda: _without_native_reader(lambda: oip.decode_request(body))),
        "native reader alone (_jsonfloats.split)": lambda: _timed(lambda: oip_reader.split_arrays(body)),
        "decode_request, whole (now)": lambda: _timed(lambda: oip.decode_request(body)),
        "session.run (agent's session options)": lambda: _timed(lambda: model.run({"input": x}, names)),
        "encode the response (encode_response)": lambda: _timed(lambda: oip.encode_response(response)),
        "output data alone: orjson, numpy natively": lambda: _timed(
            lambda: orjson.dumps(flat_out, option=orjson.OPT_SERIALIZE_NUMPY)),
        "output data alone: tolist + orjson": lambda: _timed(lambda: orjson.dumps(flat_out.tolist())),
    }
    for step in steps.values():  # warm up
        step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            samples[name].append(step())
    rows = [{"step": name, "p50_ms": round(statistics.median(v) * 1000, 3), "min_ms": round(min(v) * 1000, 3)}
            for name, v in samples.items()]
    by = {r["step"]: r for r in rows}
    run_ms = by["session.run (agent's session options)"]["p50_ms"]
    decode_ms = by["decode_request, whole (now)"]["p50_ms"]
    encode_ms = by["encode the response (encode_response)"]["p50_ms"]
    sizes = {"request_json_bytes": len(body), "input_raw_bytes": x.nbytes, "input_shape": list(x.shape),
             "output_raw_bytes": out.nbytes, "output_shape": list(out.shape), "response_json_bytes": len(response_body)}
    table = Table(title=f"wide model, batch 64, one JSON request ({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})")
    for col in ("step", "p50 ms", "min ms"):
        table.add_column(col, justify="left" if col == "step" else "right")
    for r in rows:
        table.add_row(r["step"], f"{r['p50_ms']:.3f}", f"{r['min_ms']:.3f}")
    console = Console()
    console.print(table)
    console.print(f"request {len(body):,} JSON bytes for {x.nbytes:,} raw; response {len(response_body):,} JSON bytes "
                  f"for {out.nbytes:,} raw. Codec cost per request {decode_ms + encode_ms:.2f} ms against a budget of "
                  f"{run_ms:.2f} ms (one run) for 0.5x, before the HTTP path.")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "json_budget", "cpu_count": os.cpu_count(), "rounds": rounds,
                                   "load_avg_1m": os.getloadavg()[0], "sizes": sizes, "rows": rows,
                                   "codec_ms_p50": round(decode_ms + encode_ms, 3), "budget_ms_p50": run_ms}, indent=2))


if __name__ == "__main__":
    main()

"""The agent's own Python per v2 request, without sockets: warm, and right after a model run.

    .venv/bin/python -m bench.agent_path [--quick] [--rounds N]

What the agent adds to a binary request of the tiny model (``MLP 8 -> 16 -> 4``, a 6 us
run): the bytes of one HTTP request are handed to the agent's HTTP connection as a read
would hand them (``received``: parse, route, decode, ``session.run``, encode, write to a
transport that keeps the bytes), timed in this process with no socket and no event-loop
turn. Baseline in the same rounds: the *floor* of ``bench.agent_infer``
without its socket (view the body's tensor, run, write a status line and the raw output).

Each is timed twice per round: *warm*, the third of three calls back to back, and *after a
run*, right after a ``session.run`` of the wide model at batch 24 (1024 -> 1024 x3 -> 16,
about 0.8 ms on 2 cores), which is what a request finds on a serving agent: that run
streamed 12.6 MB of weights through both cores' caches and left little of the
interpreter's code and data in them. The difference between the two columns is why the
agent's overhead grows with the model it serves (``bench.agent_infer``'s *x floor*).
Writes bench/results/agent_path.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

from bench.agent_common import write_results
from bench.agent_infer import infer_request
from edge_agent import http, httplistener, httpserver, registry
from edge_agent.runtime import onnx
from orchestrator.testing import onnx_models
from orchestrator.testing.agent_parts import OneModel

RESULTS = Path(__file__).parent / "results" / "agent_path.json"


class _KeptBytes:
    """A transport that keeps what is written (the last answer) and reads nothing."""

    def __init__(self) -> None:
        self.last = b""

    def write(self, data: bytes) -> None:
        self.last = data

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


async def run(rounds: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny = onnx_models.build_mlp(root / "tiny.onnx")
        wide = onnx_models.build_mlp(root / "wide.onnx", in_dim=1024, hidden=1024, out_dim=16, layers=4, softmax=False)
        model = onnx.OnnxModel.load(tiny.path.read_bytes())
        evict = onnx.OnnxModel.load(wide.path.read_bytes())
        evict_feeds = {"input": np.random.default_rng(0).standard_normal((24, 1024)).astype(np.float32)}
        with ThreadPoolExecutor(2) as pool:
            app = http.InferenceServer(OneModel(registry.ServedModel("tiny", tiny.sha256, model)), pool)  # type: ignore[arg-type]
            app.ready = True
            server = httplistener.HttpServer(app.handle)
            app.received = lambda: server.pending
            conn = httpserver._Connection(server)
            transport = _KeptBytes()
            conn.connection_made(transport)  # type: ignore[arg-type]
            raw = infer_request("http://127.0.0.1", "tiny", np.ones((1, 8), dtype=np.float32), binary=True)
            for _ in range(50):  # the first runs go to a worker thread until the model's run time is known
                conn.received(raw)
                await asyncio.sleep(0.001)
            if b" 200 " not in transport.last.split(b"\r\n", 1)[0]:
                raise SystemExit(f"the agent did not answer 200: {transport.last[:200]!r}")

            session = ort.InferenceSession(tiny.path.read_bytes(), onnx.session_options(),
                                                providers=["CPUExecutionProvider"])
            length = len(raw)

            def floor() -> None:
                x = np.frombuffer(raw, dtype=np.float32, count=8, offset=length - 32).reshape(1, 8)
                out = session.run(None, {"input": x})[0].tobytes()
                transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(out), out))

            paths: list[tuple[str, Callable[[], None]]] = [
                ("floor: view, run, write", floor),
                ("agent: received", lambda: conn.received(raw)),
            ]
            times: dict[tuple[str, str], list[float]] = {(name, when): [] for name, _ in paths for when in ("warm", "cold")}
            for _ in range(rounds):
                for name, call in paths:
                    call()
                    call()
                    started = time.perf_counter()
                    call()
                    times[name, "warm"].append(time.perf_counter() - started)
                    evict.run(evict_feeds, evict._output_names)
                    started = time.perf_counter()
                    call()
                    times[name, "cold"].append(time.perf_counter() - started)
            conn.connection_lost(None)
    rows = []
    for name, _ in paths:
        warm, cold = (statistics.median(times[name, w]) * 1e6 for w in ("warm", "cold"))
        rows.append({"path": name, "warm_us_p50": round(warm, 1), "after_run_us_p50": round(cold, 1),
                     "slower_after_run": round(cold / warm, 2)})
    floor_row, agent_row = rows
    agent_row["added_warm_us"] = round(agent_row["warm_us_p50"] - floor_row["warm_us_p50"], 1)
    agent_row["added_after_run_us"] = round(agent_row["after_run_us_p50"] - floor_row["after_run_us_p50"], 1)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="500 rounds")
    parser.add_argument("--rounds", type=int, default=3000)
    args = parser.parse_args()
    rounds = 500 if args.quick else args.rounds
    rows = asyncio.run(run(rounds))
    table = Table(title=f"the agent's Python per binary v2 request, tiny model, no sockets ({rounds} rounds)")
    for col in ["path", "warm us p50", "after a run us p50", "x slower after a run", "agent adds warm / after a run"]:
        table.add_column(col, justify="left" if col == "path" else "right")
    for r in rows:
        added = f"{r['added_warm_us']} / {r['added_after_run_us']}" if "added_warm_us" in r else ""
        table.add_row(r["path"], str(r["warm_us_p50"]), str(r["after_run_us_p50"]), f"{r['slower_after_run']:.2f}", added)
    Console(width=120).print(table)
    write_results(RESULTS, "agent_path", rows, rounds=rounds)

if __name__ == "__main__":
    main()

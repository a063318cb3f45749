"""What the gateway adds to a streamed generation: time to first token and per chunk.

    .venv/bin/python -m bench.genai_gateway [--quick]

A control plane (its gateway included) runs as its own process, as in production, with
one agent process serving the tests' tiny generative model (built on the spot by
``orchestrator.testing.genai_model``; a step takes tens of microseconds, so what is
measured is the path, not the model). The same streamed ``/v1/completions`` request goes
alternately to the agent directly (``{agent}/v1``) and through the gateway
(``{gateway}/openai/v1``), each over one keep-alive HTTP/1.1 connection read event by
event with a raw client in this process. Per request: time to first token (first byte
sent to the first token's event) and the mean gap between token events after it. The
added cost is the gateway's p50 minus the direct p50, same run. Writes
bench/results/genai_gateway.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
from rich.console import Console
from rich.table import Table

from bench.gateway import Setup as _V2Setup
from bench.gateway import free_port, wait_for
from orchestrator.testing import genai_model, harness, manifests

RESULTS = pathlib.Path(__file__).parent / "results" / "genai_gateway.json"
PROMPT = "The agent serves the request"


def fleet_yaml(built: genai_model.GenAIModel) -> str:
    variant = {"name": "small", **built.manifest_fields(), "resources": {"cpu": 0.25}}
    variant["artifact"] = {"uri": "chat.tar", "sha256": built.sha256}
    return manifests.bundle(
        manifests.edge_site("edge-a", country="FR", lat=48.85, lon=2.35),
        manifests.doc("Model", "chat", {"variants": [variant]}),
        manifests.deployment("chat", "chat", 1, {"tiers": ["edge"]}),
    )


class Setup(_V2Setup):
    """The v2 benchmark's control-plane process, with one agent serving the chat model."""

    def __init__(self, root: pathlib.Path):  # replaces the v2 fleet; stop() and start_agent() are the parent's
        self.root = root
        self.port, self.agent_port, self.join_port = free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.built = genai_model.build_package(root / "artifacts", name="chat", context_length=1024)
        self.server = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli.main", "serve", "--data-dir", str(root / "cp"), "--port", str(self.port),
             "--agent-port", str(self.agent_port), "--agent-join-port", str(self.join_port), "--artifact-root", str(root / "artifacts"),
             "--bootstrap-token", harness.BOOTSTRAP_TOKEN, "--heartbeat-interval", "0.5", "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=(root / "cp.log").open("w"))
        wait_for(self._up, 30, "control plane")
        httpx.post(f"{self.url}/v1/apply", content=fleet_yaml(self.built)).raise_for_status()
        self.agents = {}
        self.start_agent("edge-a")
        wait_for(lambda: len(self.endpoints()) == 1, 90, "the chat endpoint")

    def endpoints(self) -> list[dict]:
        return httpx.get(f"{self.url}/v1/endpoints/chat").json()["endpoints"]


class StreamClient:
    """One keep-alive connection; reads a chunked SSE answer event by event."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, prefix: str) -> None:
        self.reader, self.writer, self.prefix = reader, writer, prefix

    @classmethod
    async def connect(cls, url: str, prefix: str) -> StreamClient:
        host, port = url.removeprefix("http://").split(":")
        return cls(*await asyncio.open_connection(host, int(port)), prefix)

    async def run(self, max_tokens: int) -> tuple[float, float, int]:
        body = json.dumps({"model": "chat", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True}).encode()
        request = (f"POST {self.prefix}/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
                   f"content-length: {len(body)}\r\n\r\n").encode() + body
        started = time.perf_counter()
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.decode(errors="replace"))
        first = last = 0.0
        tokens = 0
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
            data = await self.reader.readexactly(size + 2)
            if size == 0:
                break
            now = time.perf_counter()
            count = data.count(b'"text":"') - data.count(b'"text":""')
            if count:
                tokens += count
                last = now
                if not first:
                    first = now - started
        gap = (last - started - first) / (tokens - 1) if tokens > 1 else 0.0
        return first, gap, tokens

    def close(self) -> None:
        self.writer.close()


def stats(runs: list[tuple[float, float, int]]) -> dict:
    ttft = sorted(r[0] * 1000 for r in runs)
    gaps = sorted(r[1] * 1000 for r in runs)
    return {"runs": len(runs), "tokens": runs[0][2], "ttft_p50_ms": round(statistics.median(ttft), 3),
            "ttft_p90_ms": round(ttft[int(len(ttft) * 0.9)], 3), "chunk_gap_p50_ms": round(statistics.median(gaps), 4)}


async def measure(agent_url: str, gateway_url: str, runs: int, max_tokens: int) -> dict:
    direct = await StreamClient.connect(agent_url, "/v1")
    gateway = await StreamClient.connect(gateway_url, "/openai/v1")
    out: dict[str, list] = {"direct": [], "gateway": []}
    try:
        for _ in range(20):  # warm both paths
            await direct.run(max_tokens)
            await gateway.run(max_tokens)
        for _ in range(runs):
            out["direct"].append(await direct.run(max_tokens))
            out["gateway"].append(await gateway.run(max_tokens))
    finally:
        direct.close()
        gateway.close()
    d, g = stats(out["direct"]), stats(out["gateway"])
    return {"direct": d, "gateway": g, "added_ttft_p50_ms": round(g["ttft_p50_ms"] - d["ttft_p50_ms"], 3),
            "added_chunk_gap_p50_ms": round(g["chunk_gap_p50_ms"] - d["chunk_gap_p50_ms"], 4), "target_added_ttft_ms": 1.0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer requests")
    args = p.parse_args()
    runs, max_tokens = (60, 16) if args.quick else (300, 32)
    with tempfile.TemporaryDirectory() as tmp:
        setup = Setup(pathlib.Path(tmp))
        try:
            agent_url = setup.endpoints()[0]["url"]
            result = asyncio.run(measure(agent_url, setup.url, runs, max_tokens))
        finally:
            setup.stop()
    result["max_tokens"] = max_tokens
    table = Table(title=f"streamed /v1/completions, {runs} requests each, {max_tokens} tokens, alternating")
    for col in ("path", "TTFT p50 ms", "TTFT p90 ms", "gap/chunk p50 ms"):
        table.add_column(col)
    for name in ("direct", "gateway"):
        r = result[name]
        table.add_row(name, f"{r['ttft_p50_ms']:.3f}", f"{r['ttft_p90_ms']:.3f}", f"{r['chunk_gap_p50_ms']:.4f}")
    table.add_row("added", f"{result['added_ttft_p50_ms']:+.3f}", "", f"{result['added_chunk_gap_p50_ms']:+.4f}")
    Console().print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

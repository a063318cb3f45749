"""v2 inference through a real ``edgeplane-agent`` vs raw ``session.run``, same model.

    .venv/bin/python -m bench.agent_infer [--quick]

Models (built on the spot): ``wide`` = MLP 1024 -> 1024 x3 -> 16, called with batches of
8, 24, 64 and 256 rows (runs of about 0.4, 1, 2.5 and 10 ms on an idle 2-core machine) and ``tiny`` = MLP 8 -> 16 -> 4 (run time in microseconds: the
result is the agent's per-request overhead). The raw baseline runs the same ONNX bytes
in this process, sequentially, right before the agent rows of the same case, and keeps the
faster of onnxruntime's defaults and the agent's session options. The agent is a
subprocess joined to a control plane in this process and is called over raw keep-alive
HTTP/1.1 with a pre-encoded request (the cheapest client, so the client is not what is
measured), one request at a time (latency) and with 4 in flight (throughput). The client
shares the machine's cores with the agent, as a co-located caller would.

*floor* rows: the same ``session.run`` behind the least an HTTP server can be: a process
with one blocking socket that reads a request by its Content-Length, views the body's last
bytes as the input tensor, runs, and answers the output's raw bytes; called by the same
client, one request at a time (binary case). What it loses against raw is the loopback
round trip and the two processes' wake-ups on these cores, which any server pays here.
Writes bench/results/agent_infer.json (``--spin-between-runs``: agent_infer_spin_between_runs.json,
``--spin-after-run-us N``: agent_infer_spin_after_run.json; the floor takes the same policy).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import numpy as np
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

from bench.agent_common import ControlPlaneAndAgent, write_results
from edge_agent.runtime import onnx
from edgeplane_proto import oip
from orchestrator.agents import model
from orchestrator.testing import onnx_models

RESULTS = Path(__file__).parent / "results" / "agent_infer.json"


def _stats(latencies: list[float], wall: float) -> dict:
    ordered = sorted(latencies)
    return {
        "requests": len(ordered),
        "per_s": round(len(ordered) / wall, 1),
        "p50_ms": round(ordered[len(ordered) // 2] * 1000, 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 3),
    }


def raw_baseline(path: Path, x: np.ndarray, duration: float) -> dict:
    """The faster of onnxruntime's defaults (intra-op threads = cores, idle threads spin)
    and the agent's session options (one inter-op thread, quiet logs): the baseline is
    raw's best case."""
    runs = [_raw_run(path, x, duration, options) for options in (ort.SessionOptions(), onnx.session_options())]
    best = max(runs, key=lambda r: r["per_s"])
    return {**best, "raw_per_s_defaults": runs[0]["per_s"], "raw_per_s_agent_options": runs[1]["per_s"]}


def _raw_run(path: Path, x: np.ndarray, duration: float, options: ort.SessionOptions) -> dict:
    session = ort.InferenceSession(path.read_bytes(), options, providers=["CPUExecutionProvider"])
    feeds = {"input": x}
    for _ in range(20):
        session.run(None, feeds)
    latencies = []
    start = time.perf_counter()
    while time.perf_counter() - start < duration:
        t = time.perf_counter()
        session.run(None, feeds)
        latencies.append(time.perf_counter() - t)
    return _stats(latencies, time.perf_counter() - start)


class _KeepAlive:
    """One keep-alive HTTP/1.1 connection sending a pre-encoded request: the cheapest client
    Python offers (no per-request header building or parsing beyond Content-Length), so
    the client's own cost is a small part of what is measured."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
        self._reader, self._writer, self._request = reader, writer, request

    @classmethod
    async def open(cls, url: str, request: bytes) -> _KeepAlive:
        parts = urllib.parse.urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer, request)

    async def call(self) -> bytes:
        self._writer.write(self._request)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = head[9:12]
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        body = await self._reader.readexactly(length)
        if status != b"200":
            raise RuntimeError(f"HTTP {status.decode()}: {body[:200]!r}")
        return body

    def close(self) -> None:
        self._writer.close()


async def through_agent(url: str, name: str, x: np.ndarray, binary: bool, concurrency: int, duration: float) -> dict:
    body, header = oip.encode_request({"input": x}, binary=binary)
    host = urllib.parse.urlsplit(url).netloc
    extra = f"{oip.BINARY_HEADER}: {header}\r\n" if header is not None else ""
    ctype = "application/octet-stream" if binary else "application/json"
    request = (
        f"POST /v2/models/{name}/infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype}\r\n"
        f"{extra}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    latencies: list[float] = []
    conns = [await _KeepAlive.open(url, request) for _ in range(concurrency)]
    try:
        for conn in conns:
            for _ in range(10):
                await conn.call()
        deadline = time.perf_counter() + duration

        async def worker(conn: _KeepAlive) -> None:
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                await conn.call()
                latencies.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in conns))
        return _stats(latencies, time.perf_counter() - start)
    finally:
        for conn in conns:
            conn.close()


FLOOR_SERVER = """
import socket, sys
import numpy as np
import onnxruntime as ort
from edge_agent.runtime import onnx

path, rows, cols, spin, spin_us = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", int(sys.argv[5])
options = onnx.session_options(spin_between_runs=spin, spin_after_run_us=spin_us)
session = ort.InferenceSession(open(path, "rb").read(), options, providers=["CPUExecutionProvider"])
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def more():
    data = conn.recv(1 << 20)
    if not data:
        sys.exit(0)  # the client is done
    return data


buf = b""
while True:
    while b"\\r\\n\\r\\n" not in buf:
        buf += more()
    head, _, buf = buf.partition(b"\\r\\n\\r\\n")
    length = next(int(line[15:]) for line in head.lower().split(b"\\r\\n") if line.startswith(b"content-length:"))
    while len(buf) < length:
        buf += more()
    body, buf = buf[:length], buf[length:]
    x = np.frombuffer(body, dtype=np.float32, count=rows * cols, offset=length - rows * cols * 4).reshape(rows, cols)
    out = session.run(None, {"input": x})[0].tobytes()
    conn.sendall(b"HTTP/1.1 200 OK\\r\\ncontent-length: %d\\r\\n\\r\\n%b" % (len(out), out))
"""


async def through_floor(path: Path, x: np.ndarray, duration: float, spin: bool, spin_us: int) -> dict:
    """``session.run`` behind the least an HTTP server can be (see the module docstring),
    with the agent's session options."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", FLOOR_SERVER, str(path), str(x.shape[0]), str(x.shape[1]),
                                                "1" if spin else "0", str(spin_us), stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        port = int((await asyncio.wait_for(proc.stdout.readline(), 60)).decode())
        return await through_agent(f"http://127.0.0.1:{port}", "floor", x, True, 1, duration)
    finally:
        proc.kill()
        await proc.wait()


async def run(duration: float, spin: bool = False, spin_us: int = 0) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        wide = onnx_models.build_mlp(root / "wide.onnx", in_dim=1024, hidden=1024, out_dim=16, layers=4, softmax=False)
        tiny = onnx_models.build_mlp(root / "tiny.onnx")
        rng = np.random.default_rng(0)
        # (label, served model, its file, input, encodings): one wide model at four batch
        # sizes gives runs of about 0.4, 1, 2.5 and 10 ms on this machine.
        cases = [
            ("wide b8", "wide", wide, rng.standard_normal((8, 1024)).astype(np.float32), (True,)),
            ("wide b24", "wide", wide, rng.standard_normal((24, 1024)).astype(np.float32), (True,)),
            ("wide b64", "wide", wide, rng.standard_normal((64, 1024)).astype(np.float32), (True, False)),
            ("wide b256", "wide", wide, rng.standard_normal((256, 1024)).astype(np.float32), (True,)),
            ("tiny", "tiny", tiny, rng.standard_normal((1, 8)).astype(np.float32), (True, False)),
        ]
        flags = ["--spin-between-runs"] if spin else ["--spin-after-run-us", str(spin_us)] if spin_us else []
        rig = ControlPlaneAndAgent(root / "agent", extra=flags)
        await rig.start()
        try:
            await rig.assign(
                [model.Assignment(n, n, "cpu", b.path.as_uri(), b.sha256) for n, b in (("wide", wide), ("tiny", tiny))],
                ["wide", "tiny"],
            )
            for label, name, built, x, encodings in cases:
                # Measured right before its agent rows (the agent idles meanwhile), so both
                # see the same background load on a shared machine.
                base = raw_baseline(built.path, x, duration)
                rows.append({"model": label, "path": "raw session.run", "concurrency": 1, **base, "vs_raw": 1.0})
                floor = await through_floor(built.path, x, duration, spin, spin_us) if True in encodings else None
                if floor is not None:
                    rows.append({"model": label, "path": "floor: minimal socket server", "concurrency": 1, **floor,
                                 "vs_raw": round(floor["per_s"] / base["per_s"], 3),
                                 "overhead_ms_p50": round(floor["p50_ms"] - base["p50_ms"], 3)})
                for binary in encodings:
                    for concurrency in (1, 4):
                        got = await through_agent(rig.url, name, x, binary, concurrency, duration)
                        rows.append({
                            "model": label,
                            "path": f"agent HTTP v2 {'binary' if binary else 'JSON'}",
                            "concurrency": concurrency,
                            **got,
                            "vs_raw": round(got["per_s"] / base["per_s"], 3),
                            "overhead_ms_p50": round(got["p50_ms"] - base["p50_ms"], 3),
                            **({"vs_floor": round(got["per_s"] / floor["per_s"], 3)} if floor and concurrency == 1 else {}),
                        })
        finally:
            await rig.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (about 20 s)")
    spin = parser.add_mutually_exclusive_group()
    spin.add_argument("--spin-between-runs", action="store_true", help="run the agent (and the floor) with that flag")
    spin.add_argument("--spin-after-run-us", type=int, default=0, metavar="US",
                      help="run the agent (and the floor) with that option")
    args = parser.parse_args()
    duration = 1.5 if args.quick else 5.0
    rows = asyncio.run(run(duration, args.spin_between_runs, args.spin_after_run_us))
    spinning = (", --spin-between-runs" if args.spin_between_runs
                else f", --spin-after-run-us {args.spin_after_run_us}" if args.spin_after_run_us else "")
    table = Table(title=f"v2 inference through the agent vs raw session.run ({os.cpu_count()} cores{spinning})")
    for col in ["model", "path", "in flight", "req/s", "p50 ms", "p99 ms", "x raw", "x floor"]:
        table.add_column(col, justify="left" if col in ("model", "path") else "right")
    for r in rows:
        table.add_row(r["model"], r["path"], str(r["concurrency"]), f"{r['per_s']:,}", str(r["p50_ms"]),
                      str(r["p99_ms"]), f"{r['vs_raw']:.2f}", f"{r['vs_floor']:.2f}" if "vs_floor" in r else "")
    Console(width=120).print(table)
    results = (RESULTS.with_name("agent_infer_spin_between_runs.json") if args.spin_between_runs
               else RESULTS.with_name("agent_infer_spin_after_run.json") if args.spin_after_run_us else RESULTS)
    write_results(results, "agent_infer", rows, quick=args.quick, spin_between_runs=args.spin_between_runs,
                  spin_after_run_us=args.spin_after_run_us, duration_s_per_row=duration,
                  target={"wide_vs_raw": 0.8, "wide_b8_vs_raw": 0.7, "wide_b64_json_vs_raw": 0.5})

if __name__ == "__main__":
    main()

"""v2 inference through a real ``edgeplane-agent`` vs raw ``session.run``, same model.

    .venv/bin/python -m bench.agent_infer [--quick]

Models (built on the spot): ``wide`` = MLP 1024 -> 1024 x3 -> 16, called with batches of
8, 12, 24, 32, 64 and 256 rows (runs of about 0.3, 0.5, 0.9, 1.3, 2.1 and 8.4 ms on this
2-core machine) and ``tiny`` = MLP 8 -> 16 -> 4 (run time in microseconds: the result is
the agent's per-request overhead). The raw baseline runs the same ONNX bytes in this
process and keeps the faster of onnxruntime's defaults and the agent's session options.
The paths of a case (raw, floors, agent) take turns: each is timed in 5 slices of a second
(a fifth of its row's time), in a rotating order, so every ratio compares the same minutes
of a machine whose speed drifts by more than the differences measured. The agent is a
subprocess joined to a control plane in this process and is called over raw keep-alive
HTTP/1.1 with a pre-encoded request (the cheapest clients, so the client is not what is
measured): one request at a time over a blocking socket (latency), 4 in flight on asyncio
streams (throughput). The client shares the machine's cores with the agent, as a
co-located caller would.

*floor* rows: the same ``session.run`` behind the least an HTTP server can be: a process
with one blocking socket that reads a request by its Content-Length, views the body's last
bytes as the input tensor, runs, and answers the output's raw bytes; called by the same
client, one request at a time (binary case). What it loses against raw is the loopback
round trip and the two processes' wake-ups on these cores, which any server pays here.
*floor on the agent's HTTP server*: the same view, run and answer as the handler of the
agent's own HTTP server (``edge_agent.httpserver``: asyncio, httptools, keep-alive and
limits), in a process of its own. Between the two floors is what the event loop and the HTTP
layer cost; between this one and the agent, what its v2 handler costs (routing, decoding,
checking, encoding, metrics).
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
from collections.abc import Callable, Sequence
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
    and the agent's session options (one inter-op thread, quiet logs), each run back to
    back for ``duration``: the baseline is raw's best case."""
    raws = [Raw(path, x, options) for options in (ort.SessionOptions(), onnx.session_options())]
    for raw in raws:
        raw.run_for(duration)
    return _best_raw(raws)


def _best_raw(raws: Sequence[Raw]) -> dict:
    measured = [r.stats() for r in raws]
    return {**max(measured, key=lambda r: r["per_s"]),
            "raw_per_s_defaults": measured[0]["per_s"], "raw_per_s_agent_options": measured[1]["per_s"]}


class KeepAlive:
    """One keep-alive HTTP/1.1 connection sending a pre-encoded request: the cheapest asyncio
    client (no per-request header building or parsing beyond Content-Length), so
    the client's own cost is a small part of what is measured."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
        self._reader, self._writer, self._request = reader, writer, request

    @classmethod
    async def open(cls, url: str, request: bytes) -> KeepAlive:
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


class BlockingClient:
    """The same request over one blocking socket, for one request at a time: no event loop
    between the socket and the caller, about 30 us less per request than ``KeepAlive``
    here (the floor server answering the tiny model: 0.103 against 0.135 ms p50)."""

    def __init__(self, url: str, request: bytes) -> None:
        parts = urllib.parse.urlsplit(url)
        self._sock = socket.create_connection((parts.hostname, parts.port))
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._request = request
        self._buffer = bytearray(1 << 22)
        self._view = memoryview(self._buffer)

    def call(self) -> None:
        self._sock.sendall(self._request)
        got = 0
        end = -1
        while end < 0:
            got += self._receive(got)
            end = self._buffer.find(b"\r\n\r\n", 0, got)
        head = bytes(self._buffer[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        length = int(head[at + 17:].split(b"\r\n", 1)[0]) if at >= 0 else 0
        while got < end + 4 + length:
            got += self._receive(got)
        if head[9:12] != b"200":
            raise RuntimeError(f"HTTP {head[9:12].decode()}: {bytes(self._buffer[end + 4:got])[:200]!r}")

    def _receive(self, at: int) -> int:
        if at == len(self._buffer):
            raise RuntimeError("answer larger than the client's buffer")
        n = self._sock.recv_into(self._view[at:])
        if n == 0:
            raise RuntimeError("the server closed the connection")
        return n

    def close(self) -> None:
        self._view.release()
        self._sock.close()


def timed(call: Callable[[], object], seconds: float, latencies: list[float]) -> float:
    """Call ``call`` back to back for ``seconds``, each call's latency into ``latencies``;
    the wall time taken."""
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - t)
    return time.perf_counter() - start


class _Path:
    """One measured path of a case, timed in slices that take turns with the case's other
    paths (:func:`_take_turns`); its statistics are over all its slices."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.wall = 0.0

    async def slice(self, seconds: float) -> float:
        """Measure for ``seconds`` more; this slice's requests a second."""
        done, wall = len(self.latencies), self.wall
        await self._measure(seconds)
        return (len(self.latencies) - done) / (self.wall - wall)

    async def _measure(self, seconds: float) -> None:
        raise NotImplementedError

    def stats(self) -> dict:
        return _stats(self.latencies, self.wall)

    def close(self) -> None:
        pass


class Raw(_Path):
    """``session.run`` in this process with ``options`` (it holds the event loop meanwhile)."""

    def __init__(self, path: Path, x: np.ndarray, options: ort.SessionOptions) -> None:
        super().__init__()
        self._session = ort.InferenceSession(path.read_bytes(), options, providers=["CPUExecutionProvider"])
        self._feeds = {"input": x}
        for _ in range(20):
            self._session.run(None, self._feeds)

    def run_for(self, seconds: float) -> None:
        self.wall += timed(lambda: self._session.run(None, self._feeds), seconds, self.latencies)

    async def _measure(self, seconds: float) -> None:
        self.run_for(seconds)


class _OneAtATime(_Path):
    """One request at a time over a blocking socket (``BlockingClient``), in a thread."""

    def __init__(self, url: str, request: bytes) -> None:
        super().__init__()
        self._client = BlockingClient(url, request)
        for _ in range(10):
            self._client.call()

    async def _measure(self, seconds: float) -> None:
        self.wall += await asyncio.to_thread(timed, self._client.call, seconds, self.latencies)

    def close(self) -> None:
        self._client.close()


class InFlight(_Path):
    """Several keep-alive connections on this event loop, each sending its next request as
    soon as its answer is in (``KeepAlive``)."""

    def __init__(self, conns: list[KeepAlive]) -> None:
        super().__init__()
        self._conns = conns

    @classmethod
    async def open(cls, url: str, request: bytes, concurrency: int) -> InFlight:
        conns = [await KeepAlive.open(url, request) for _ in range(concurrency)]
        for conn in conns:
            for _ in range(10):
                await conn.call()
        return cls(conns)

    async def _measure(self, seconds: float) -> None:
        deadline = time.perf_counter() + seconds

        async def worker(conn: KeepAlive) -> None:
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                await conn.call()
                self.latencies.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in self._conns))
        self.wall += time.perf_counter() - start

    def close(self) -> None:
        for conn in self._conns:
            conn.close()


def infer_request(url: str, name: str, x: np.ndarray, binary: bool) -> bytes:
    """The whole HTTP/1.1 request (head and v2 body) that infers ``x`` on ``name``."""
    body, header = oip.encode_request({"input": x}, binary=binary)
    host = urllib.parse.urlsplit(url).netloc
    extra = f"{oip.BINARY_HEADER}: {header}\r\n" if header is not None else ""
    ctype = "application/octet-stream" if binary else "application/json"
    return (
        f"POST /v2/models/{name}/infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype}\r\n"
        f"{extra}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def open_path(url: str, name: str, x: np.ndarray, binary: bool, concurrency: int) -> _Path:
    request = infer_request(url, name, x, binary)
    if concurrency == 1:
        return await asyncio.to_thread(_OneAtATime, url, request)
    return await InFlight.open(url, request, concurrency)


#: A case's paths take turns in this many slices each (3 with ``--quick``), in a rotating
#: order, with a pause between slices (idle threads of the raw session spin for a while after
#: it).
ROUNDS = 5
PAUSE_S = 0.05


async def _take_turns(paths: Sequence[_Path], duration: float, rounds: int) -> None:
    for turn in range(rounds):
        for i in range(len(paths)):
            await paths[(turn + i) % len(paths)].slice(duration / rounds)
            await asyncio.sleep(PAUSE_S)


#: What both floors share: the model's session with the agent's options, and the run of a
#: request: its body's last bytes viewed as the input, the output's raw bytes back.
_FLOOR_RUN = """
import sys
import numpy as np
import onnxruntime as ort
from edge_agent.runtime import onnx

path, rows, cols, spin, spin_us = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", int(sys.argv[5])
options = onnx.session_options(spin_between_runs=spin, spin_after_run_us=spin_us)
session = ort.InferenceSession(open(path, "rb").read(), options, providers=["CPUExecutionProvider"])


def answer(body):
    x = np.frombuffer(body, dtype=np.float32, count=rows * cols, offset=len(body) - rows * cols * 4).reshape(rows, cols)
    return session.run(None, {"input": x})[0].tobytes()
"""

FLOOR_SERVER = _FLOOR_RUN + """
import socket

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
    out = answer(body)
    conn.sendall(b"HTTP/1.1 200 OK\\r\\ncontent-length: %d\\r\\n\\r\\n%b" % (len(out), out))
"""

HTTP_SERVER_FLOOR = _FLOOR_RUN + """
import asyncio, socket
from edge_agent import httplistener, httpmessages


async def handler(request):
    return httpmessages.Response(200, answer(request.body), content_type="application/octet-stream")


async def main():
    listener = socket.create_server(("127.0.0.1", 0))
    server = httplistener.HttpServer(handler)
    await server.start(listener)
    print(listener.getsockname()[1], flush=True)
    await asyncio.Event().wait()


asyncio.run(main())
"""

#: The floors' rows, by name: the minimal one is what ``x floor`` compares the agent with.
MINIMAL_FLOOR = "floor: minimal socket server"
FLOORS = ((MINIMAL_FLOOR, FLOOR_SERVER), ("floor on the agent's HTTP server", HTTP_SERVER_FLOOR))


async def start_floor(path: Path, x: np.ndarray, spin: bool, spin_us: int,
                      script: str = FLOOR_SERVER) -> tuple[asyncio.subprocess.Process, str]:
    """``session.run`` behind the least an HTTP server can be (see the module docstring),
    or behind the agent's HTTP server (``HTTP_SERVER_FLOOR``), with the agent's session
    options: the process and its URL."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, str(path), str(x.shape[0]), str(x.shape[1]),
                                                "1" if spin else "0", str(spin_us), stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        port = int((await asyncio.wait_for(proc.stdout.readline(), 60)).decode())
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    return proc, f"http://127.0.0.1:{port}"


async def _case(url: str, label: str, name: str, path: Path, x: np.ndarray, encodings: tuple[bool, ...],
                duration: float, rounds: int, spin: bool, spin_us: int) -> list[dict]:
    """The rows of one case: raw (the faster of onnxruntime's defaults and the agent's
    session options), the two floors (binary cases) and the agent, taking turns."""
    raws = [Raw(path, x, ort.SessionOptions()), Raw(path, x, onnx.session_options())]
    floors: dict[str, _Path] = {}
    procs: list[asyncio.subprocess.Process] = []
    paths: list[_Path] = list(raws)
    agent: dict[tuple[bool, int], _Path] = {}
    try:
        if True in encodings:
            for floor_label, script in FLOORS:
                proc, floor_url = await start_floor(path, x, spin, spin_us, script)
                procs.append(proc)
                floors[floor_label] = await open_path(floor_url, "floor", x, True, 1)
            paths += floors.values()
        for binary in encodings:
            for concurrency in (1, 4):
                agent[binary, concurrency] = await open_path(url, name, x, binary, concurrency)
        paths += agent.values()
        await _take_turns(paths, duration, rounds)
    finally:
        for opened in paths:
            opened.close()
        for proc in procs:
            proc.kill()
            await proc.wait()
    base = _best_raw(raws)
    rows = [{"model": label, "path": "raw session.run", "concurrency": 1, **base, "vs_raw": 1.0}]
    floor_stats = {floor_label: floor_path.stats() for floor_label, floor_path in floors.items()}
    for floor_label, measured in floor_stats.items():
        rows.append({"model": label, "path": floor_label, "concurrency": 1, **measured,
                     "vs_raw": round(measured["per_s"] / base["per_s"], 3),
                     "overhead_ms_p50": round(measured["p50_ms"] - base["p50_ms"], 3)})
    floor = floor_stats.get(MINIMAL_FLOOR)
    for (binary, concurrency), measured_path in agent.items():
        got = measured_path.stats()
        rows.append({
            "model": label,
            "path": f"agent HTTP v2 {'binary' if binary else 'JSON'}",
            "concurrency": concurrency,
            **got,
            "vs_raw": round(got["per_s"] / base["per_s"], 3),
            "overhead_ms_p50": round(got["p50_ms"] - base["p50_ms"], 3),
            **({"vs_floor": round(got["per_s"] / floor["per_s"], 3)} if floor and concurrency == 1 else {}),
        })
    return rows


async def run(duration: float, rounds: int, spin: bool = False, spin_us: int = 0) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        wide = onnx_models.build_mlp(root / "wide.onnx", in_dim=1024, hidden=1024, out_dim=16, layers=4, softmax=False)
        tiny = onnx_models.build_mlp(root / "tiny.onnx")
        rng = np.random.default_rng(0)
        # (label, served model, its file, input, encodings): one wide model at six batch
        # sizes gives runs of about 0.3, 0.5, 0.9, 1.3, 2.1 and 8.4 ms on this machine (in its
        # slower phases; 0.5 ms was batch 24 in faster ones).
        cases = [
            ("wide b8", "wide", wide, rng.standard_normal((8, 1024)).astype(np.float32), (True,)),
            ("wide b12", "wide", wide, rng.standard_normal((12, 1024)).astype(np.float32), (True,)),
            ("wide b24", "wide", wide, rng.standard_normal((24, 1024)).astype(np.float32), (True,)),
            ("wide b32", "wide", wide, rng.standard_normal((32, 1024)).astype(np.float32), (True,)),
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
                rows += await _case(rig.url, label, name, built.path, x, encodings, duration, rounds, spin, spin_us)
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
    duration, rounds = (1.5, 3) if args.quick else (5.0, ROUNDS)
    rows = asyncio.run(run(duration, rounds, args.spin_between_runs, args.spin_after_run_us))
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
                  slices_per_row=rounds,
                  clients={"one at a time": "blocking socket", "4 in flight": "asyncio streams"},
                  target={"binary_one_at_a_time_vs_raw": {"raw_p50_about_0.5_ms": 0.7, "raw_p50_1_ms_or_more": 0.8},
                          "wide_b64_json_vs_raw": 0.5})

if __name__ == "__main__":
    main()

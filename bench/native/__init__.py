"""Load generators in C++ for benchmarks whose Python generator would eat the cores it measures.

``hbgen`` (``hbgen.cc``) simulates agents for ``bench.agent_heartbeats --generator native``.
It is built on first use into ``build/native/`` from the agent protocol's ``.proto`` with
Debian's gRPC C++ packages (``apt-get install libgrpc++-dev protobuf-compiler-grpc``), and
rebuilt when its source or the protocol changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = Path(__file__).with_name("hbgen.cc")
PROTO = ROOT / "protos" / "edgeplane_proto" / "agent" / "v1" / "agent.proto"
BUILD = ROOT / "build" / "native"
HBGEN = BUILD / "hbgen"
PACKAGES = "libgrpc++-dev protobuf-compiler-grpc"


class BuildError(RuntimeError):
    """The native generator could not be built; the message says what is missing."""


def hbgen() -> Path:
    """The path of a built ``hbgen``, building it first if it is missing or stale."""
    if HBGEN.exists() and HBGEN.stat().st_mtime > max(SOURCE.stat().st_mtime, PROTO.stat().st_mtime):
        return HBGEN
    missing = [tool for tool in ("protoc", "grpc_cpp_plugin", "pkg-config", "g++") if shutil.which(tool) is None]
    if missing:
        raise BuildError(f"building bench/native/hbgen needs {', '.join(missing)}: apt-get install {PACKAGES} pkg-config g++")
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "grpc++", "protobuf"], capture_output=True, text=True)
    if flags.returncode != 0:
        raise BuildError(f"pkg-config knows no grpc++: apt-get install {PACKAGES} ({flags.stderr.strip()})")
    BUILD.mkdir(parents=True, exist_ok=True)
    generated = BUILD / "edgeplane_proto" / "agent" / "v1"
    _run(["protoc", f"-I{ROOT / 'protos'}", f"--cpp_out={BUILD}", f"--grpc_out={BUILD}",
          f"--plugin=protoc-gen-grpc={shutil.which('grpc_cpp_plugin')}", str(PROTO)])
    partial = HBGEN.with_suffix(".tmp")
    _run(["g++", "-O2", "-std=c++17", f"-I{BUILD}", str(SOURCE), str(generated / "agent.pb.cc"),
          str(generated / "agent.grpc.pb.cc"), *flags.stdout.split(), "-lpthread", "-o", str(partial)])
    partial.replace(HBGEN)  # a build cut short never leaves a half-written binary behind
    return HBGEN


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise BuildError(f"{command[0]} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")


class Hbgen:
    """One running ``hbgen``: ``agents`` simulated agents ``site-{first_site}`` … on ``target``,
    each beating once per ``interval`` seconds, until :meth:`stop` or ``max_seconds``."""

    def __init__(self, target: str, agents: int, *, interval: float, token: str, first_site: int = 0,
                 max_seconds: float = 900.0) -> None:
        self.process = subprocess.Popen(
            [str(hbgen()), "--target", target, "--agents", str(agents), "--first-site", str(first_site),
             "--interval", str(interval), "--token", token, "--max-seconds", str(max_seconds)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    async def stop(self, timeout: float = 30.0) -> dict:
        """Ends the run (closing its standard input) and returns its report (``{}`` if it died
        without one); it is killed if it has not answered within ``timeout`` seconds."""
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        try:
            out = await asyncio.wait_for(asyncio.to_thread(self.process.stdout.read), timeout)
        except TimeoutError:
            self.process.kill()  # which ends the read
            out = ""
        await asyncio.to_thread(self.process.wait)
        return json.loads(out) if out.strip() else {}

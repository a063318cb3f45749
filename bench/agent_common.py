"""Shared by the agent benchmarks: a control plane in this process and a real
``edgeplane-agent`` subprocess joined to it."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import sys
import time

import httpx

from orchestrator.agents import auth, hub, model, service

TOKEN = "bench-token"


def write_results(path: pathlib.Path, benchmark: str, rows: list[dict], **fields: object) -> None:
    """A benchmark's ``rows`` and settings as JSON, with the machine's cores and its load at the end."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": benchmark, "cpu_count": os.cpu_count(), **fields,
                                "load_avg_1m_at_end": round(os.getloadavg()[0], 2), "rows": rows}, indent=2))


def agent_command() -> list[str]:
    script = pathlib.Path(sys.executable).parent / "edgeplane-agent"
    return [str(script)] if script.exists() else [sys.executable, "-m", "edge_agent.main"]


class ControlPlaneAndAgent:
    def __init__(self, data_dir: pathlib.Path, *, heartbeat_interval: float = 5.0, extra: list[str] | None = None,
                 tree: str | None = None) -> None:
        """``tree``: a source tree for the agent subprocess to import (``PYTHONPATH``), to
        measure another version of the agent beside this checkout's."""
        self.data_dir = data_dir
        self.tree = tree
        self.heartbeat_interval = heartbeat_interval
        self.extra = extra or []
        self.hub = hub.AgentHub(auth.InMemoryJoinAuthenticator([TOKEN]))
        self.server: service.AgentServer | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""

    async def start(self, site: str = "bench-site") -> None:
        self.server = await service.start_agent_server(self.hub, "127.0.0.1", 0)
        self.proc = await asyncio.create_subprocess_exec(
            *agent_command(),
            "--control-plane", f"127.0.0.1:{self.server.port}",
            "--site", site,
            "--token", TOKEN,
            "--listen", "127.0.0.1:0",
            "--data-dir", str(self.data_dir),
            "--heartbeat-interval", str(self.heartbeat_interval),
            "--insecure",
            "--allow-file-artifacts",
            "--log-level", "WARNING",
            *self.extra,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **({"PYTHONPATH": self.tree} if self.tree else {})},
        )
        assert self.proc.stdout is not None
        line = (await asyncio.wait_for(self.proc.stdout.readline(), 60)).decode()
        if not line.startswith("serving "):
            raise RuntimeError(f"agent did not start: {line!r}")
        self.url = line.split()[1]
        self.site = site

    async def assign(self, assignments: list[model.Assignment], names: list[str]) -> None:
        self.hub.set_assignments(self.site, assignments, int(time.time()))
        async with httpx.AsyncClient(base_url=self.url) as client:
            for name in names:
                for _ in range(600):  # bounded poll across the process boundary
                    if (await client.get(f"/v2/models/{name}/ready")).status_code == 200:
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise RuntimeError(f"model {name} never became ready")

    async def stop(self) -> int:
        code = -1
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            code = await asyncio.wait_for(self.proc.wait(), 30)
        if self.server is not None:
            await self.server.stop(None)
        return code

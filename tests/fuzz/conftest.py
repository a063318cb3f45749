"""Fuzzing fixtures: example counts, a fleet on its own event-loop thread, a tally.

Hypothesis tests are synchronous, so the control plane and its agents run on a loop in a
background thread (:class:`FleetThread`) and the tests talk to them over real HTTP and
gRPC. ``EDGEPLANE_FUZZ_EXAMPLES`` scales every fuzz test (default 300 inputs each); the
number of inputs each test tried is printed at the end of the session.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import threading
from collections import Counter
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import httpx
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from orchestrator import ports
from orchestrator.testing import genai_model, harness, manifests, onnx_models

T = TypeVar("T")

EXAMPLES = int(os.environ.get("EDGEPLANE_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)
TRIED: Counter[str] = Counter()

#: Any text a JSON body can carry: hypothesis leaves out lone UTF-16 surrogates, which JSON's
#: ``\\ud800`` escape carries and which no UTF-8 encoder takes.
CHARACTERS = st.one_of(st.characters(), st.sampled_from(["\ud800", "\udfff", "\udbff"]))


def text(max_size: int, min_size: int = 0) -> st.SearchStrategy[str]:
    return st.text(CHARACTERS, min_size=min_size, max_size=max_size)

def fleet_yaml(sha256: str, chat: genai_model.GenAIModel) -> str:
    chat_variant = {"name": "tiny", **chat.manifest_fields(), "resources": {"cpu": 0.1, "memoryMiB": 256}}
    chat_variant["artifact"] = {"uri": chat.package.name, "sha256": chat.sha256}
    return manifests.bundle(
        manifests.edge_site("edge-fuzz", "FR", 48.85, 2.35, region="fr"),
        manifests.onnx_model("intent", "intent.onnx", sha256),
        manifests.deployment("intent-fr", "intent", 1, {"residency": ["FR"], "tiers": ["edge"]}),
        manifests.doc("Model", "chat", {"variants": [chat_variant]}),
        manifests.deployment("chat-fr", "chat", 1, {"residency": ["FR"], "tiers": ["edge"]}),
    )


class LoopThread:
    """An event loop running in a daemon thread, for synchronous tests to hand coroutines to."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class FleetThread(LoopThread):
    """A :class:`harness.Fleet` whose event loop runs in a daemon thread."""

    def __init__(self, root: pathlib.Path) -> None:
        super().__init__("fuzz-fleet")
        self.fleet = harness.Fleet(root)

    def close(self) -> None:
        try:
            self.run(self.fleet.stop(), 60)
        finally:
            super().close()


@pytest.fixture(scope="module")
def fuzz_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetThread]:
    """Control plane + one agent serving ``intent`` (8 floats in, 4 out) and the generative
    ``chat`` (a tiny onnxruntime-genai model) at ``edge-fuzz``, over HTTP and the v2 gRPC
    service (``grpc_port``)."""
    root = tmp_path_factory.mktemp("fuzz")
    built = onnx_models.build_mlp(root / "artifacts" / "intent.onnx", in_dim=8, hidden=16, out_dim=4, seed=7)
    chat = genai_model.build_package(root / "artifacts", name="tiny-chat")
    ft = FleetThread(root)
    ft.built = built  # type: ignore[attr-defined]
    try:
        # These tests are about bytes, not liveness: a 2-core machine busy with the fuzzer
        # must not be able to starve the agent's heartbeats past the hub's deadline (the
        # harness default is 3 x 0.5 s), which would turn every later answer into a 503.
        # Nor about failed joins: thousands of made-up tokens from one address would be
        # refused before the code behind authentication, the fuzz's target (join_failure_rate 0).
        cp = ft.run(ft.fleet.start_control_plane(missed_heartbeats=20, join_failure_rate=0.0))
        resp = httpx.post(f"{cp.http_url}/v1/apply", content=fleet_yaml(built.sha256, chat).encode())
        assert resp.status_code == 200, resp.text
        ft.grpc_port = ports.free_port()  # type: ignore[attr-defined]
        ft.run(ft.fleet.start_agent("edge-fuzz", country="FR", region="fr", lat=48.85, lon=2.35,
                                    extra=("--grpc-listen", f"127.0.0.1:{ft.grpc_port}")))  # type: ignore[attr-defined]
        ft.run(harness.wait_until(lambda: all(any(e.healthy for e in cp.table.endpoints(m)) for m in ("intent", "chat")), 60,
                                  what="the intent and chat endpoints"))
        yield ft
    finally:
        ft.close()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if TRIED:
        terminalreporter.write_sep("-", "fuzz inputs tried")
        for name, count in sorted(TRIED.items()):
            terminalreporter.write_line(f"{name}: {count}")
        terminalreporter.write_line(f"total: {sum(TRIED.values())} (EDGEPLANE_FUZZ_EXAMPLES={EXAMPLES})")

"""kill -9 the control plane mid-apply and mid-rollout, restart it on the same data dir and
ports: no lost or half-applied objects, agents keep serving meanwhile, and the fleet
converges after the restart."""

from __future__ import annotations

import pathlib
import sqlite3
import threading
import time

import httpx

from orchestrator.testing import harness, manifests, onnx_models

from .conftest import RECOVERY, TWO_SITES, ServeProcess, fleet_yaml, infer_body, start_two_sites, wait_for



def _served_versions(agents: list[harness.AgentProcess]) -> set[str]:
    out = set()
    for a in agents:
        resp = httpx.get(f"{a.url}/v2/models/intent", timeout=2)
        out.update(resp.json().get("versions", []) if resp.status_code == 200 else ["none"])
    return out


def _gateway_ok(cp: ServeProcess, model: onnx_models.BuiltModel) -> bool:
    return httpx.post(f"{cp.url}/v2/models/intent/infer", content=infer_body(model), timeout=5).status_code == 200


def _assert_serving(agents: list[harness.AgentProcess], model: onnx_models.BuiltModel, cp: ServeProcess) -> None:
    """Every agent answers ``model``; a failure says what that agent and the control plane logged."""
    for a in agents:
        resp = httpx.post(f"{a.url}/v2/models/intent/infer", content=infer_body(model), timeout=5)
        if resp.status_code != 200:
            raise AssertionError(f"{a.site} answered {resp.status_code} {resp.text[:200]} while the control plane was down\n"
                                 f"its log:\n{a.log()[-3000:]}\nthe control plane's last log:\n{cp.log()[-3000:]}")


def test_kill9_mid_apply_and_mid_rollout(tmp_path: pathlib.Path, models: tuple[onnx_models.BuiltModel, onnx_models.BuiltModel],
                                         agents: list[harness.AgentProcess]) -> None:
    v1, v2 = models
    cp = ServeProcess(tmp_path, v1.path.parent)
    try:
        start_two_sites(cp, tmp_path, v1, agents)
        wait_for(lambda: _served_versions(agents) == {v1.sha256[:12]}, 60, "both agents serving v1")
        wait_for(lambda: _gateway_ok(cp, v1), 30, "the gateway")

        # -- mid-apply: a 300-object apply is in flight when the process dies -------------
        for round_, delay in enumerate((0.0, 0.05, 0.6)):
            batch = manifests.bundle(*(manifests.edge_site(f"batch{round_}-{i}", "FR", 45.0, 2.35, region="fr") for i in range(300))).encode()
            outcome: dict[str, int | str] = {}

            def send(batch: bytes = batch, outcome: dict[str, int | str] = outcome) -> None:
                try:
                    outcome["status"] = httpx.post(f"{cp.url}/v1/apply", content=batch, timeout=30).status_code
                except httpx.TransportError as exc:
                    outcome["status"] = type(exc).__name__

            sender = threading.Thread(target=send)
            sender.start()
            time.sleep(delay)  # the chaos itself: kill at a different point of the apply each round
            cp.kill9()
            sender.join(30)
            _assert_serving(agents, v1, cp)  # the agents keep serving while the control plane is down
            restart = time.monotonic()
            cp.start()
            names = {s["metadata"]["name"] for s in httpx.get(f"{cp.url}/v1/sites", timeout=10).json()["items"]}
            present = len([n for n in names if n.startswith(f"batch{round_}-")])
            assert present in (0, 300), f"half-applied: {present} of 300 objects after kill -9 ({outcome})"
            if outcome.get("status") == 200:
                assert present == 300, "an acknowledged apply was lost"
            wait_for(lambda: _gateway_ok(cp, v1), 60, "the gateway to route again")
            RECOVERY[f"kill -9 mid-apply (round {round_}, {present} objects): restart to gateway serving"] = time.monotonic() - restart

        # -- mid-rollout: v1 -> v2 acknowledged, process dies while agents fetch -----------
        assert httpx.post(f"{cp.url}/v1/apply", content=fleet_yaml(TWO_SITES, v2, replicas=2).encode(), timeout=30).status_code == 200
        cp.kill9()
        _assert_serving(agents, v1, cp)
        restart = time.monotonic()
        cp.start()
        wait_for(lambda: _served_versions(agents) == {v2.sha256[:12]}, 60, "both agents to converge on v2")
        wait_for(lambda: _gateway_ok(cp, v2), 30, "the gateway")
        RECOVERY["kill -9 mid-rollout: restart to both agents on v2"] = time.monotonic() - restart
        model = httpx.get(f"{cp.url}/v1/models/intent", timeout=5).json()
        assert model["spec"]["variants"][0]["artifact"]["sha256"] == v2.sha256
    finally:
        cp.stop()
    db = sqlite3.connect(tmp_path / "cp" / "state.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()

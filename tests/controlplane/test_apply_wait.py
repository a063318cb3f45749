"""``edgeplane apply --wait`` against a real control plane and a real agent: it exits 0 once a
deployment it created serves, or once a new version of the Model one uses is served, 1
naming one that cannot be placed, and 1 at its ``--timeout``
saying what it still waits for; ``-o json`` keeps stdout one document. How a status is judged
is a table test of the pure :func:`rollouts.judge`."""

from __future__ import annotations

import asyncio
import json
import pathlib
import os
import signal
import sys

import pytest

from orchestrator.cli import main as cli_main
from orchestrator.cli import rollouts
from orchestrator.testing import harness, manifests, onnx_models

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("status", "generation", "model_generation", "state"), [
    ({}, 1, None, rollouts.WAITING),  # not planned yet
    ({"phase": "Running", "observedGeneration": 1}, 2, None, rollouts.WAITING),  # the old spec's status
    ({"phase": "Running", "observedGeneration": 2, "readyReplicas": 1, "wantedReplicas": 1}, 2, None, rollouts.DONE),
    ({"phase": "ScaledToZero", "observedGeneration": 2}, 2, None, rollouts.DONE),
    ({"phase": "Progressing", "observedGeneration": 2}, 2, None, rollouts.WAITING),
    ({"phase": "Scheduled", "observedGeneration": 2}, 2, None, rollouts.WAITING),
    # what needs a person: no fitting site, no such Model, a version that fails to load
    ({"phase": "Unschedulable", "observedGeneration": 2, "reason": "no site"}, 2, None, rollouts.WAITING),
    ({"phase": "Invalid", "observedGeneration": 2}, 2, None, rollouts.FAILED),
    ({"phase": "Failing", "observedGeneration": 3, "rollout": {"upgraded": 1, "switching": 1, "waiting": 1, "halted": "x"}}, 2,
     None, rollouts.FAILED),
    # what the control plane retries (a data centre briefly unreachable): waited on
    ({"phase": "Failing", "observedGeneration": 2, "reason": "dc-1: connection refused"}, 2, None, rollouts.WAITING),
    ({"phase": "Degraded", "observedGeneration": 2}, 2, None, rollouts.WAITING),
    # a new Model version: done only once the status was computed against it and its rollout is over
    ({"phase": "Running", "observedGeneration": 1}, 1, 2, rollouts.WAITING),  # an older control plane's status
    ({"phase": "Running", "observedGeneration": 1, "modelGeneration": 1}, 1, 2, rollouts.WAITING),
    ({"phase": "Progressing", "observedGeneration": 1, "modelGeneration": 2,
      "rollout": {"upgraded": 0, "switching": 1, "waiting": 0}}, 1, 2, rollouts.WAITING),
    ({"phase": "Running", "observedGeneration": 1, "modelGeneration": 2,
      "rollout": {"upgraded": 1, "switching": 0, "waiting": 0}}, 1, 2, rollouts.WAITING),
    ({"phase": "Running", "observedGeneration": 1, "modelGeneration": 2}, 1, 2, rollouts.DONE),
    ({"phase": "Running", "observedGeneration": 1, "modelGeneration": 3}, 1, 2, rollouts.DONE),  # a later apply's
])
def test_judge(status: dict, generation: int, model_generation: int | None, state: str) -> None:
    assert rollouts.judge(status, generation, model_generation).state == state


def test_halted_rollout_is_said() -> None:
    verdict = rollouts.judge({"phase": "Failing", "observedGeneration": 1, "readyReplicas": 3, "wantedReplicas": 3,
                              "rollout": {"upgraded": 1, "switching": 1, "waiting": 1, "halted": "edge-a could not load"},
                              "reason": "edge-a could not load"}, 1)
    assert verdict.said == "Failing, 3/3 ready, rollout 1/3 halted: edge-a could not load"


async def _apply(capsys: pytest.CaptureFixture[str], url: str, path: pathlib.Path, *extra: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(cli_main.main, ["apply", "-f", str(path), "--server", url, "--interval", "0.2", *extra])
    out, err = capsys.readouterr()
    return code, out, err


async def _interrupt_apply(url: str, path: pathlib.Path) -> tuple[int, str, str]:
    """``apply --wait`` in a process of its own (this checkout's code), Ctrl-C once it said a first state."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "orchestrator.cli.main", "apply", "-f", str(path), "--server", url, "--wait", "-o", "json",
        cwd=REPO, env={k: v for k, v in os.environ.items() if not k.startswith("EDGEPLANE_")},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    try:
        first = await asyncio.wait_for(proc.stderr.readline(), 60)
        assert first.startswith(b"modeldeployment/intent-c: "), first
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), first.decode() + err.decode()


async def test_apply_wait(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = onnx_models.build_mlp(tmp_path / "artifacts" / "intent.onnx", in_dim=8, hidden=16, out_dim=4, seed=1)
    fr = {"residency": ["FR"], "tiers": ["edge"]}
    fleet = harness.Fleet(tmp_path)
    try:
        # missed heartbeats: a stopped agent stays healthy (its replica placed, not ready) past the test's timeout
        cp = await fleet.start_control_plane(resync_s=0.5, missed_heartbeats=100)
        agent = await fleet.start_agent("edge-paris", country="FR", lat=48.85, lon=2.35)
        base = [manifests.edge_site("edge-paris", "FR", 48.85, 2.35),
                manifests.onnx_model("intent", model.path.name, model.sha256),
                manifests.onnx_model("intent-b", model.path.name, model.sha256),
                manifests.onnx_model("intent-c", model.path.name, model.sha256)]
        path = tmp_path / "m.yaml"

        path.write_text(manifests.bundle(*base, manifests.deployment("intent-fr", "intent", 1, fr)))
        code, out, err = await _apply(capsys, cp.http_url, path, "--wait", "--timeout", "60s", "-o", "json")
        assert code == 0, err
        result = json.loads(out)  # stdout: one document
        assert result["wait"]["done"] is True and result["wait"]["deployments"]["intent-fr"]["status"]["phase"] == "Running"
        assert "modeldeployment/intent-fr: Running, 1/1 ready" in err and "1 of 1 deployment(s) serving: intent-fr" in err, err

        # applying the same again changes no deployment: nothing to wait for
        code, out, err = await _apply(capsys, cp.http_url, path, "--wait")
        assert code == 0 and "nothing to wait for" in err and "modeldeployment/intent-fr unchanged" in out, (out, err)

        # no site in Germany: it cannot be placed (a site may yet join), and at --timeout it
        # is named with the reason
        path.write_text(manifests.bundle(*base, manifests.deployment("intent-de", "intent-b", 1, {"residency": ["DE"]})))
        code, out, err = await _apply(capsys, cp.http_url, path, "--wait", "--timeout", "3s")
        assert code == 1, (out, err)
        assert "modeldeployment/intent-de created" in out
        (line,) = [x for x in err.splitlines() if x.startswith("error:")]
        assert line.startswith("error: modeldeployment/intent-de not serving within 3 s"), err
        assert "still Unschedulable, 0/1 ready: " in line, err

        # the agent does not answer: placed, never ready, and --timeout says what it waits for
        agent.kill(signal.SIGSTOP)
        try:
            path.write_text(manifests.bundle(*base, manifests.deployment("intent-de", "intent-b", 1, fr)))
            code, out, err = await _apply(capsys, cp.http_url, path, "--wait", "--timeout", "2s")
            path.write_text(manifests.bundle(*base, manifests.deployment("intent-c", "intent-c", 1, fr)))
            interrupted = await _interrupt_apply(cp.http_url, path)
        finally:
            agent.kill(signal.SIGCONT)
        assert code == 1, (out, err)
        (line,) = [x for x in err.splitlines() if x.startswith("error:")]
        assert line.startswith("error: modeldeployment/intent-de not serving within 2 s (waiting for generation 2 to be Running), "
                               "still Progressing, 0/1 ready"), err

        # a new Model version changes no deployment's spec: the deployments that use it are
        # followed until their agents serve it
        v2 = onnx_models.build_mlp(tmp_path / "artifacts" / "v2.onnx", in_dim=8, hidden=16, out_dim=4, seed=2)
        path.write_text(manifests.bundle(base[0], manifests.onnx_model("intent", v2.path.name, v2.sha256)))
        code, out, err = await _apply(capsys, cp.http_url, path, "--wait", "--timeout", "60s", "-o", "json")
        assert code == 0, (out, err)
        assert "1 of 1 deployment(s) serving: intent-fr" in err, err
        followed = json.loads(out)["wait"]["deployments"]
        assert set(followed) == {"intent-fr"} and followed["intent-fr"]["status"]["modelGeneration"] == 2, followed
        served = cp.hub.status("edge-paris")
        assert served is not None and served.models["intent"].serving_sha256 == v2.sha256

        code, out, err = await _apply(capsys, cp.http_url, path, "--wait", "--dry-run")
        assert code == 2 and "nothing to --wait for" in err and out == "", (out, err)

        code, out, err = interrupted  # Ctrl-C: one line, no traceback, and -o json still one document
        assert code == 130 and "interrupted: stopped following" in err and "Traceback" not in err, err
        assert json.loads(out)["wait"]["deployments"]["intent-c"]["state"] == "waiting", out
    finally:
        await fleet.stop()


async def test_apply_wait_says_the_fleet_is_on_hold(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A stored object this version cannot read puts every change on hold: apply --wait
    waited to its --timeout saying only that the deployment was not planned. It says the
    hold once, as a progress line, and again when it gives up, and still waits until then."""
    from orchestrator.reconciler import hold
    from orchestrator.store import sqlite as store_mod

    model = onnx_models.build_mlp(tmp_path / "artifacts" / "intent.onnx", in_dim=8, hidden=16, out_dim=4, seed=1)
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane(resync_s=0.5)
        cp.store.apply([store_mod.ObjectWrite("SiteMaintenance", "edge-y", {}, {"mode": "evacuate"})])
        cp.changed("test")
        await harness.wait_until(lambda: (p := cp.store.published(hold.PUBLISHED_KEY)) is not None and p[1], 30, what="the hold")
        path = tmp_path / "m.yaml"
        path.write_text(manifests.bundle(manifests.edge_site("edge-paris", "FR", 48.85, 2.35),
                                         manifests.onnx_model("intent", model.path.name, model.sha256),
                                         manifests.deployment("intent-fr", "intent", 1, {"residency": ["FR"]})))
        code, out, err = await _apply(capsys, cp.http_url, path, "--wait", "--timeout", "2s", "-o", "json")
        assert code == 1, (out, err)
        said = [x for x in err.splitlines() if "changes on hold: SiteMaintenance 'edge-y' cannot be read" in x]
        assert len(said) == 2 and said[1].startswith("error: modeldeployment/intent-fr not serving within 2 s"), err
        assert "uncordon site edge-y" in said[0], err
        assert "changes on hold" in json.loads(out)["wait"]["hold"], out
    finally:
        await fleet.stop()

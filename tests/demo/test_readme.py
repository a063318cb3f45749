"""The README's "Try it by hand" works as written.

Its shell block runs line by line in one bash session with job control (as in a terminal:
``kill %1`` signals a job's process group), then its Python snippet while the fleet is up,
then the block's last line, which stops everything. The commands are read from README.md, so
the test fails when the README drifts from what works. Only what must differ on a shared test
machine is rewritten, and each rewritten literal must be in the README: the control plane's
ports (free ones, handed to ``make serve`` through ``SERVE_ARGS`` and to the CLI through
``EDGEPLANE_SERVER``), its data dir, the agent's data dir and listen port.

The README's own line waits for the control plane to answer after ``make serve &``. Where a
person would wait without a command, the session waits: for the agent to join after it is
started, and it runs ``get placements`` again (as its comment says) until every replica is ready.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shlex
import signal
import socket
import subprocess
import time

import pytest

from orchestrator.adapters import local_ray

REPO = pathlib.Path(__file__).resolve().parents[2]


def _section(text: str, title: str) -> str:
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def readme_blocks() -> tuple[list[str], str]:
    """The shell commands (continuation lines joined) and the Python snippet of the walkthrough."""
    section = _section((REPO / "README.md").read_text(), "Try it by hand")
    shell = re.search(r"```sh\n(.*?)```", section, re.S)
    python = re.search(r"```python\n(.*?)```", section, re.S)
    assert shell and python, "the walkthrough needs a sh block and a python block"
    commands = [line.strip() for line in shell.group(1).replace("\\\n", " ").splitlines() if line.strip()]
    return commands, python.group(1)


def _free_pair() -> int:
    """A port p with p + 1 free too (the agent finds the join port at --control-plane + 1)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with contextlib.suppress(OSError), socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", port))
            b.bind(("127.0.0.1", port + 1))
            return port
    raise AssertionError("no two consecutive free ports")


def _free() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rewrite(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert old in text, f"the README no longer has {old!r}; update this test's rewrites"
        text = text.replace(old, new)
    return text


# Waits a person does without a command. `placements_ready` reruns `get placements` until
# every row is ready, as the README's comment on that line says to.
HELPERS = r"""
set -m
fail() { echo "README step failed: $1" >&2; exit 1; }
wait_until() {  # wait_until SECONDS WHAT COMMAND...
  local limit=$1 what=$2; shift 2
  for _ in $(seq 1 $((limit * 2))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  fail "timed out after ${limit}s waiting for $what"
}
placements_ready() {
  python - <<'PY'
import json, subprocess, sys
items = json.loads(subprocess.run(["edgeplane", "get", "placements", "-o", "json"], capture_output=True, text=True, check=True).stdout)["items"]
sys.exit(0 if items and all(p.get("ready", 0) >= p["replicas"] for p in items) else 1)
PY
}
"""


@pytest.mark.ray
def test_the_walkthrough_runs_as_written(tmp_path: pathlib.Path) -> None:
    commands, snippet = readme_blocks()
    http, agent_port, listen, gateway = _free(), _free_pair(), _free(), _free()
    data_dir, agent_dir = tmp_path / "cp", tmp_path / "edge-lyon"
    serve_args = f"--port {http} --agent-port {agent_port} --agent-join-port {agent_port + 1} --data-dir {data_dir}"
    shell = _rewrite("\n".join(commands), {
        "make serve &": f"make serve SERVE_ARGS={shlex.quote(serve_args)} &",
        "http://127.0.0.1:8080/healthz": f"http://127.0.0.1:{http}/healthz",
        "127.0.0.1:8081": f"127.0.0.1:{agent_port}",
        ".edgeplane/ca/ca.crt": f"{data_dir}/ca/ca.crt",
        "/tmp/edge-lyon": str(agent_dir),
        "127.0.0.1:9001": f"127.0.0.1:{listen}",
        "edgeplane gateway --control-plane http://127.0.0.1:8080 &":
            f"edgeplane gateway --control-plane http://127.0.0.1:{http} --port {gateway} &",
        "--server http://127.0.0.1:8088": f"--server http://127.0.0.1:{gateway}",
    }).splitlines()
    snippet = _rewrite(snippet, {"http://127.0.0.1:8080": f"http://127.0.0.1:{http}"})
    assert shell[-1].startswith("kill "), "the walkthrough ends by saying how to stop"

    script = [HELPERS]
    for line in shell[:-1]:
        if line.startswith("make serve"):
            script.append(line)
        elif line.startswith("until "):  # the README's own wait for the control plane, as written, bounded here
            script.append(f"timeout 180 bash -c {shlex.quote(line)} || fail 'the control plane to answer'")
        elif line.startswith("edgeplane-agent"):
            script += [line, 'wait_until 60 "edge-lyon to join" sh -c "edgeplane get site edge-lyon -o json | grep -q Healthy"']
        elif line.startswith("edgeplane gateway"):  # ready once it holds the control plane's table
            script += [line, f"wait_until 60 'the gateway' python -c \"import urllib.request; "
                             f"urllib.request.urlopen('http://127.0.0.1:{gateway}/readyz')\""]
        elif line.startswith("edgeplane get placements"):
            script += ['wait_until 300 "every replica to be ready" placements_ready', f"{line} || fail {shlex.quote(line)}"]
        else:
            script.append(f"{line} || fail {shlex.quote(line)}")
    script += [f"python - <<'PY' || fail 'the Python snippet'\n{snippet}PY", shell[-1], "wait"]
    path = tmp_path / "walkthrough.sh"
    path.write_text("\n".join(script) + "\n")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEPLANE_", "VIRTUAL_ENV"))}
    env.update(EDGEPLANE_SERVER=f"http://127.0.0.1:{http}", PYTHONUNBUFFERED="1")
    log = tmp_path / "walkthrough.log"
    try:
        with log.open("w") as out:
            proc = subprocess.run(["bash", str(path)], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=540)
        text = log.read_text()
        assert proc.returncode == 0, text[-6000:]
        # what the reader was promised along the way
        assert "intent-classifier" in text and "served by" in text, text[-3000:]
        assert re.search(r"input\s*\n\s*datatype: FP32\s*\n\s*shape:\s*\n\s*- -1\s*\n\s*- 32", text), "describe model shows the inputs"
        assert re.search(r"^(edge|dc)-\S+ \[\[", text, re.M), "the Python snippet prints where it was served and the output"
        assert not (data_dir / "local-ray.json").exists(), "kill %1 stopped the control plane and its local Ray"
    finally:
        _stop_leftovers(tmp_path)
        local_ray.reclaim(data_dir / "local-ray.json")


def _stop_leftovers(root: pathlib.Path) -> None:
    """Whatever the walkthrough started and did not stop (a failed step): ended by its data dir."""
    mine = []
    for entry in pathlib.Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and str(root).encode() in (entry / "cmdline").read_bytes():
                mine.append(int(entry.name))
    for pid in mine:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(pathlib.Path(f"/proc/{p}").exists() for p in mine):
        time.sleep(0.2)
    for pid in mine:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

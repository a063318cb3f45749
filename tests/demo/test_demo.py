"""`edgeplane demo` end to end, as a newcomer runs it (without the Ray data centre, which
tests/ray covers): it must exit 0 and report where each caller was served."""

from __future__ import annotations

import subprocess
import sys

import pytest


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
    assert "stopping agents" in out

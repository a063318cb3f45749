"""A gateway out of file descriptors (``EMFILE`` as it connects to a replica: its process's
open-file limit reached) is in its own trouble, not its replicas': every route answers 503
with a Retry-After, ejects no replica and counts nothing against one, and the gateway logs
that it ran out, at most once in ``OUT_OF_DESCRIPTORS_LOG_S``. A cascade whose later stage
cannot be reached answers with the earlier stage's answer, as when that stage is down. Its
replicas answer as soon as descriptors are freed. The gateway runs in a child process
(``out_of_descriptors_probe.py``), whose limit is lowered for real."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import pytest

from orchestrator.gateway import upstream

PROBE = pathlib.Path(__file__).with_name("out_of_descriptors_probe.py")
ROOT = PROBE.parents[2]


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, str(PROBE)], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def test_every_route_answers_503_with_a_retry_after_and_ejects_no_replica(report: dict[str, Any]) -> None:
    """More requests to one replica than the run of failures that ejects one: each is the
    gateway's 503, and the replica is as it was (it was ejected at the first: 502 "every
    replica tried failed: edge-a: connect to ... failed: Too many open files")."""
    for answer in report["while_out"]:
        assert answer["status"] == 503, answer
        assert answer["retry_after"] == str(upstream.OUT_OF_DESCRIPTORS_RETRY_S), answer
        assert "the gateway is out of file descriptors" in answer["body"], answer
    assert report["ejected"] == []
    assert [(a["call"], a["status"]) for a in report["after"]] == [(a["call"], 200) for a in report["after"]], report["after"]


def test_a_cascade_keeps_the_answer_of_a_stage_before_the_one_it_cannot_reach(report: dict[str, Any]) -> None:
    assert [(a["status"], a["site"], a["escalation"]) for a in report["escalated"]] == [(200, "dc-closing", "escalated")] * 3
    for answer in report["not_escalated"]:
        assert (answer["status"], answer["site"], answer["escalation"]) == (200, "edge-unsure", "not-escalated"), answer
        assert "out of file descriptors" in answer["reason"], answer


def test_running_out_is_logged_at_most_once_in_the_interval_with_how_many_since(report: dict[str, Any]) -> None:
    [line] = report["logged"]
    assert "out of file descriptors" in line and "RLIMIT_NOFILE" in line and "ulimit -n" in line, line
    [later] = report["logged_later"]
    unlogged = len(report["not_escalated"]) + len(report["while_out"]) - 2  # all but the one logged, before the clock moved
    assert f"({unlogged} more since the last such line)" in later, later

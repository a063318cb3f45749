"""How ``edgeplane`` tables read, as a subprocess against ``edgeplane serve``: piped, every
cell whole whatever the environment says of colours."""

from __future__ import annotations

import json
import re

from orchestrator.cli import render

from . import support
from .support import cli, ok

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
SITE_HEADERS = [h for h, _ in render.COLUMNS["Site"]]


def _sites(serve: support.ServeProcess) -> list[dict]:  # type: ignore[type-arg]
    return json.loads(ok("get", "sites", "-o", "json", server=serve))["items"]


def test_a_piped_table_is_whole_when_the_environment_forces_colours(serve: support.ServeProcess, applied) -> None:  # type: ignore[no-untyped-def]
    """FORCE_COLOR=1, set in many CI pipelines for coloured logs, made rich take the pipe for
    a terminal 80 columns wide: ``get sites | grep dc-frankfurt`` found nothing (dc-fra…)."""
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE"):
        proc = cli("get", "sites", server_url=serve.url, env={name: "1"})
        assert proc.returncode == 0, proc.stderr
        lines = [ANSI.sub("", line) for line in proc.stdout.splitlines()]
        assert "…" not in proc.stdout, (name, proc.stdout)
        assert lines[0].split() == [w for h in SITE_HEADERS for w in h.split()], (name, lines[0])
        assert {line.split()[0] for line in lines[1:]} == {s["metadata"]["name"] for s in _sites(serve)}, (name, lines)

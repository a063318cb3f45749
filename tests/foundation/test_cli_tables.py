"""How ``edgeplane`` tables read, as a subprocess against ``edgeplane serve``: piped, every
cell whole whatever the environment says of colours; on a terminal (a real pseudo-terminal
of a given width), cut to its width from the widest columns down, never dropping a column
or cutting a short value such as a number, and printed whole when that cannot fit."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import struct
import subprocess
import termios
import time

import pytest

from orchestrator.cli import render

from . import support
from .support import cli, ok

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
SITE_HEADERS = [h for h, _ in render.COLUMNS["Site"]]


def on_terminal(server_url: str, columns: int, *args: str, timeout: float = 60.0) -> list[str]:
    """``edgeplane ARGS`` with its stdout on a pseudo-terminal ``columns`` wide: the lines it
    showed, without colour codes."""
    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = support.clean_env(EDGEPLANE_SERVER=server_url)
    for name in ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR"):
        env.pop(name, None)
    proc = subprocess.Popen([str(support.EDGEPLANE), *args], stdout=terminal, stderr=subprocess.PIPE, env=env, cwd=support.REPO)
    os.close(terminal)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the command ended and closed the terminal
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(controller)
    assert proc.wait(timeout=max(1.0, deadline - time.monotonic())) == 0, proc.stderr.read() if proc.stderr else ""
    if proc.stderr is not None:
        proc.stderr.close()
    return [ANSI.sub("", line) for line in out.decode().replace("\r", "").splitlines()]


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


@pytest.mark.parametrize("columns", [80, 130])
def test_a_table_on_a_terminal_keeps_every_column_and_short_value(serve: support.ServeProcess, applied, columns: int) -> None:  # type: ignore[no-untyped-def]
    """On a terminal 80 columns wide the CPU column of get sites vanished, and at 120 its 192
    and 256 read 1… and 2…: rich cut every column alike to fit."""
    lines = on_terminal(serve.url, columns, "get", "sites")
    header, rows = lines[0], lines[1:]
    starts = [header.index(h) for h in SITE_HEADERS]  # every header whole, in order
    assert starts == sorted(starts), header
    by_name = {row.split()[0]: row for row in rows}
    sites = _sites(serve)
    assert set(by_name) == {s["metadata"]["name"] for s in sites}, lines
    cpu = starts[SITE_HEADERS.index("CPU")]
    for s in sites:
        row = by_name[s["metadata"]["name"]]
        assert row[cpu:].split()[0] == f"{s['spec']['capacity']['cpu']:g}", (row, header)
        assert s["spec"]["location"]["country"] in row.split() and s["spec"]["tier"] in row.split(), row
    if columns == 130:  # it fits once the widest (GPUS) is cut (at 120 the next widest are cut too, headers and all)
        assert all(len(line) <= columns for line in lines), lines
        assert any("…" in row for row in rows), lines
    else:  # it cannot fit without cutting names and words to nothing: whole, the terminal wraps it
        assert "…" not in "".join(lines), lines


@pytest.mark.parametrize(("widths", "room", "caps"), [
    ([12, 10, 3, 24], 60, [12, 10, 3, 24]),  # fits whole
    ([12, 10, 3, 24], 40, [12, 10, 3, 15]),  # the widest is cut first
    ([12, 10, 3, 24], 33, [12, 9, 3, 9]),  # then the next, to one width
    ([12, 10, 3, 24], 30, None),  # below 8 characters a column would read as nothing: whole
    ([40, 10, 10], 45, None),  # the first column (the name) is never cut
])
def test_the_widest_columns_are_cut_first_and_none_below_eight(widths: list[int], room: int, caps: list[int] | None) -> None:
    assert render.column_caps(widths, room) == caps

"""The README's walkthrough waits for the control plane before its first command: ``make
serve &`` installs ``.venv`` on a fresh checkout (about a minute) and then starts the server,
so a command typed at once met no ``.venv`` or no API. Its wait line is run here as written
(the port aside) against a port nothing listens on and against a real control plane.
(tests/demo/test_readme.py runs the whole walkthrough.)"""

from __future__ import annotations

import pathlib
import re
import socket
import subprocess

import pytest

from . import support

README = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()


def wait_line(port: int) -> str:
    """The walkthrough's line that waits for the API on 127.0.0.1:8080, pointed at ``port``."""
    section = README[README.index("## Try it by hand"):]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "the walkthrough has no sh block"
    lines = block.group(1).splitlines()
    serve = next(i for i, line in enumerate(lines) if line.startswith("make serve &"))
    first_command = next(i for i, line in enumerate(lines) if line.startswith("edgeplane "))
    waits = [line for line in lines[serve + 1:first_command] if "127.0.0.1:8080/healthz" in line]
    assert waits, "nothing waits for the control plane between `make serve &` and the first edgeplane command"
    return waits[0].replace("127.0.0.1:8080", f"127.0.0.1:{port}")


def test_the_walkthrough_waits_while_nothing_answers() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run(["bash", "-c", wait_line(closed)], capture_output=True, timeout=3)


def test_the_walkthrough_goes_on_once_the_control_plane_answers(control_plane: support.ServerThread) -> None:
    port = int(control_plane.url.rsplit(":", 1)[1])
    done = subprocess.run(["bash", "-c", wait_line(port)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout == "", done

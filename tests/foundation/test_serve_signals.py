"""How ``edgeplane serve`` and ``edgeplane gateway`` end: a stop signal stops them cleanly
(``stopping...``, exit code 0) whenever it comes, as it does the agent
(``tests/agent/test_agent_signals.py``). Real processes, found from outside: their banner on
a pipe, a file their start-up writes. No Ray (no data-centre Site)."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from orchestrator import runloop

from . import support

Command = Callable[[pathlib.Path], tuple[list[str], bytes]]


def serve(tmp: pathlib.Path) -> tuple[list[str], bytes]:
    return ([str(support.EDGEPLANE), "serve", "--data-dir", str(tmp / "cp"), "--port", str(support.free_port()),
             "--agent-port", str(support.free_port()), "--agent-join-port", str(support.free_port()), "--log-level", "info"],
            b"edgeplane control plane:")


def gateway(tmp: pathlib.Path) -> tuple[list[str], bytes]:
    return ([str(support.EDGEPLANE), "gateway", "--control-plane", f"http://127.0.0.1:{support.closed_port()}",
             "--host", "127.0.0.1", "--port", "0", "--log-level", "info"], b"serving http://")


def launch(args: list[str], tmp: pathlib.Path) -> subprocess.Popen[bytes]:
    """Its stdout on a pipe (read with :func:`read_until`), its log in ``tmp/log``."""
    with (tmp / "log").open("wb") as log:
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, env=support.clean_env(),
                                cwd=support.REPO, start_new_session=True)


def read_until(proc: subprocess.Popen[bytes], needle: bytes, tmp: pathlib.Path, timeout: float = 30.0) -> bytes:
    assert proc.stdout is not None
    seen, deadline = b"", time.monotonic() + timeout
    while needle not in seen:
        assert time.monotonic() < deadline and proc.poll() is None, f"{seen!r}\n{(tmp / 'log').read_text(errors='replace')}"
        chunk = os.read(proc.stdout.fileno(), 4096)
        assert chunk, f"stdout ended: {seen!r}\n{(tmp / 'log').read_text(errors='replace')}"
        seen += chunk
    return seen


def finish(proc: subprocess.Popen[bytes], tmp: pathlib.Path, timeout: float = 30.0) -> tuple[int, str, str]:
    """Its exit code, the rest of its stdout and its log."""
    code = proc.wait(timeout)
    out = proc.stdout.read() if proc.stdout is not None and not proc.stdout.closed else b""
    return code, out.decode(errors="replace"), (tmp / "log").read_text(errors="replace")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def assert_stopped_cleanly(code: int, out: str, log: str) -> None:
    assert code == 0, f"exit code {code}:\n{out}\n{log[-2000:]}"
    assert "stopping..." in out, out
    assert "Traceback" not in log, log[-2000:]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("command", [serve, gateway], ids=["serve", "gateway"])
def test_stopped_as_soon_as_it_prints_its_banner_it_stops_cleanly(
        tmp_path: pathlib.Path, processes: list[subprocess.Popen[bytes]], command: Command, sig: signal.Signals) -> None:
    args, banner = command(tmp_path)
    proc = launch(args, tmp_path)
    processes.append(proc)
    read_until(proc, banner, tmp_path)
    proc.send_signal(sig)
    assert_stopped_cleanly(*finish(proc, tmp_path))


def test_a_sigterm_during_start_up_stops_serve_cleanly_once_started(
        tmp_path: pathlib.Path, processes: list[subprocess.Popen[bytes]]) -> None:
    args, _ = serve(tmp_path)
    proc = launch(args, tmp_path)
    processes.append(proc)
    ca = tmp_path / "cp" / "ca" / "ca.crt"  # made by the start, before it serves
    deadline = time.monotonic() + 30
    while not ca.exists():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text(errors="replace")
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    code, out, log = finish(proc, tmp_path)
    assert_stopped_cleanly(code, out, log)
    assert "edgeplane control plane:" not in out  # no banner for a service that is stopping


SITE = b"""apiVersion: edgeplane.io/v1alpha1
kind: Site
metadata: {name: s1}
spec:
  tier: edge
  location: {country: FR, region: eu-west, lat: 45.7, lon: 4.8}
  capacity: {cpu: 8, memoryGiB: 32}
  energy: {carbonGramsPerKWh: 56}
"""


def serving(tmp_path: pathlib.Path, processes: list[subprocess.Popen[bytes]]) -> tuple[subprocess.Popen[bytes], int, bytes]:
    """``edgeplane serve`` started and past its banner: the process, its API port and its admin token."""
    args, banner = serve(tmp_path)
    proc = launch(args, tmp_path)
    processes.append(proc)
    read_until(proc, banner, tmp_path)
    return proc, int(args[args.index("--port") + 1]), (tmp_path / "cp" / "admin.token").read_text().strip().encode()


def read_answer(sock: socket.socket) -> bytes:
    sock.settimeout(30)
    answer = b""
    with contextlib.suppress(OSError):  # a reset: the request was cut
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_serve_whose_stdout_reader_is_gone_still_drains_and_exits_0(
        tmp_path: pathlib.Path, processes: list[subprocess.Popen[bytes]]) -> None:
    """``edgeplane serve | tee cp.log`` stopped with Ctrl-C: tee is gone before serve says ``stopping...``."""
    proc, port, token = serving(tmp_path, processes)
    with socket.create_connection(("127.0.0.1", port)) as sock:  # an apply in flight, half its body sent
        sock.sendall(b"POST /v1/apply HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer " + token
                     + b"\r\ncontent-type: application/yaml\r\ncontent-length: %d\r\n\r\n" % len(SITE) + SITE[:40])
        assert proc.stdout is not None
        proc.stdout.close()
        proc.send_signal(signal.SIGTERM)
        sock.sendall(SITE[40:])
        answer = read_answer(sock)
    code, _, log = finish(proc, tmp_path)
    assert answer.startswith(b"HTTP/1.1 200"), f"{answer!r}\n{log[-2000:]}"
    assert code == 0, log[-2000:]
    assert "Broken pipe" not in log and "Traceback" not in log, log[-2000:]


def test_a_gateway_whose_stdout_reader_is_gone_exits_0(tmp_path: pathlib.Path, processes: list[subprocess.Popen[bytes]]) -> None:
    args, banner = gateway(tmp_path)
    proc = launch(args, tmp_path)
    processes.append(proc)
    read_until(proc, banner, tmp_path)
    assert proc.stdout is not None
    proc.stdout.close()
    proc.send_signal(signal.SIGTERM)
    code, _, log = finish(proc, tmp_path)
    assert code == 0, log[-2000:]
    assert "Broken pipe" not in log and "Traceback" not in log, log[-2000:]


@pytest.mark.parametrize("command", [serve, gateway], ids=["serve", "gateway"])
def test_a_sighup_leaves_it_serving_and_says_so(
        tmp_path: pathlib.Path, processes: list[subprocess.Popen[bytes]], command: Command) -> None:
    """logrotate's ``postrotate kill -HUP``, a closed terminal: nothing to reload, and no reason to stop."""
    args, banner = command(tmp_path)
    proc = launch(args, tmp_path)
    processes.append(proc)
    read_until(proc, banner, tmp_path)
    proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "SIGHUP: nothing to reload" not in (tmp_path / "log").read_text(errors="replace"):
        assert proc.poll() is None and time.monotonic() < deadline, f"exit code {proc.poll()}"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert_stopped_cleanly(*finish(proc, tmp_path))


def test_a_stop_while_a_pass_hashes_a_large_artifact_ends_without_waiting_for_the_hash(
        tmp_path: pathlib.Path, processes: list[subprocess.Popen[bytes]]) -> None:
    """A new Model's local artifact is hashed by the reconcile pass: 1 TiB (sparse here) takes
    many minutes to read, and the stop does not wait for it."""
    root = tmp_path / "artifacts"
    root.mkdir()
    big = root / "big.onnx"
    with big.open("wb") as fh:
        fh.truncate(1 << 40)  # read at a few GiB/s at best: the stop's bound below is a small part of that
    args, banner = serve(tmp_path)
    port = int(args[args.index("--port") + 1])
    proc = launch([*args, "--artifact-root", str(root)], tmp_path)
    processes.append(proc)
    read_until(proc, banner, tmp_path)
    token = (tmp_path / "cp" / "admin.token").read_text().strip()
    model = ("apiVersion: edgeplane.io/v1alpha1\nkind: Model\nmetadata: {name: big}\nspec:\n  variants:\n"
             f"  - name: v\n    runtime: onnx\n    artifact: {{uri: big.onnx, sha256: \"{'0' * 64}\"}}\n")
    applied = httpx.post(f"http://127.0.0.1:{port}/v1/apply", content=model, timeout=30,
                         headers={"authorization": f"Bearer {token}", "content-type": "application/yaml"})
    assert applied.status_code == 200, applied.text
    deadline = time.monotonic() + 30
    while str(big) not in open_files(proc.pid):  # the pass is reading it
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text(errors="replace")
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    code, out, log = finish(proc, tmp_path, timeout=90)
    took = time.monotonic() - started  # the stop's own bounds: 1 s for agents, 5 s for requests, 10 s for the pass
    assert took < 60, f"the stop took {took:.0f} s: it waited for the hash"
    assert_stopped_cleanly(code, out, log)
    assert "reconcile pass failed" not in log, log[-2000:]


def open_files(pid: int) -> set[str]:
    names = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            names.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return names


#: ``edgeplane serve`` whose stop gives a request in flight an hour rather than 5 s: the stop
#: then ends only at its own bound on the HTTP server's task (10 s), and exits 0.
LONG_DRAIN_SERVE = textwrap.dedent("""
    import sys
    from orchestrator import runloop
    from orchestrator.cli import main

    runloop.DRAIN_GRACE_S = 3600
    raise SystemExit(main.main(sys.argv[1:]))
""")


def test_a_second_stop_signal_ends_a_stop_that_takes_long(
        tmp_path: pathlib.Path, processes: list[subprocess.Popen[bytes]]) -> None:
    """The stop gives a request in flight (here an upload that never ends) time to finish;
    Ctrl-C again while it waits ends the process there (exit code 1). Had the process waited
    for the stop, it would have ended with 0."""
    args, banner = serve(tmp_path)
    proc = launch([sys.executable, "-c", LONG_DRAIN_SERVE, *args[1:]], tmp_path)
    processes.append(proc)
    read_until(proc, banner, tmp_path)
    port, token = int(args[args.index("--port") + 1]), (tmp_path / "cp" / "admin.token").read_text().strip().encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/apply HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer " + token
                     + b"\r\ncontent-type: application/yaml\r\ncontent-length: %d\r\n\r\n" % len(SITE) + SITE[:40])
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200  # the upload is in its hands
        proc.send_signal(signal.SIGINT)
        read_until(proc, b"stopping...", tmp_path)
        time.sleep(runloop.SAME_STOP_S)  # one sooner is the same stop told twice (make passes SIGTERM on)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(30)
    log = (tmp_path / "log").read_text(errors="replace")
    assert code == 1, log[-2000:]
    assert "SIGINT again: exiting now" in log, log[-2000:]


#: A service whose stop never ends: only a second stop signal can end the process.
ENDLESS_STOP = textwrap.dedent("""
    import asyncio
    from orchestrator import runloop

    class Service:
        async def stop(self):
            await asyncio.Event().wait()

    async def start():
        return Service()

    raise SystemExit(runloop.main("info", start, lambda service: ["serving"], ()))
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_second_stop_signal_ends_the_process_without_waiting_for_the_stop(
        tmp_path: pathlib.Path, processes: list[subprocess.Popen[bytes]], sig: signal.Signals) -> None:
    proc = launch([sys.executable, "-c", ENDLESS_STOP], tmp_path)
    processes.append(proc)
    read_until(proc, b"serving", tmp_path)
    proc.send_signal(sig)
    read_until(proc, b"stopping...", tmp_path)
    time.sleep(runloop.SAME_STOP_S)
    proc.send_signal(sig)
    code = proc.wait(30)  # the stop never ends: only the second signal can end the process
    log = (tmp_path / "log").read_text(errors="replace")
    assert code == 1, log[-2000:]
    assert f"{sig.name} again: exiting now" in log, log[-2000:]


def in_flight(port: int, head: bytes) -> socket.socket:
    """A request whose body never comes whole, in the server's hands once a later request on
    another connection has been answered (the server reads its connections in turn)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(head)
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
    return sock


def assert_answered_503_at_the_grace(sock: socket.socket, proc: subprocess.Popen[bytes], tmp: pathlib.Path) -> None:
    proc.send_signal(signal.SIGTERM)
    answer = read_answer(sock)
    code, out, log = finish(proc, tmp)
    head = answer.partition(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 503"), f"{answer!r}\n{log[-2000:]}"
    assert b"retry-after: 2" in head and b"connection: close" in head, answer
    assert_stopped_cleanly(code, out, log)
    assert "still in flight at the end of the 5 s drain: answered 503" in log, log[-2000:]


def test_a_request_still_in_flight_when_the_drain_ends_is_answered_503(
        tmp_path: pathlib.Path, processes: list[subprocess.Popen[bytes]]) -> None:
    proc, port, token = serving(tmp_path, processes)
    with in_flight(port, b"POST /v1/apply HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer " + token
                   + b"\r\ncontent-type: application/yaml\r\ncontent-length: 4000\r\n\r\napiVersion: edgeplane.io/v1alpha1\n") as sock:
        assert_answered_503_at_the_grace(sock, proc, tmp_path)


def test_a_gateway_request_still_in_flight_when_the_drain_ends_is_answered_503(
        tmp_path: pathlib.Path, processes: list[subprocess.Popen[bytes]]) -> None:
    """A chat completion whose body is still coming, on a gateway that follows a control plane."""
    cp_args, cp_banner = serve(tmp_path)
    cp_port = int(cp_args[cp_args.index("--port") + 1])
    (tmp_path / "cp-run").mkdir()
    cp = launch(cp_args, tmp_path / "cp-run")
    processes.append(cp)
    read_until(cp, cp_banner, tmp_path / "cp-run")
    token = (tmp_path / "cp" / "admin.token").read_text().strip()
    port = support.free_port()
    gw = launch([str(support.EDGEPLANE), "gateway", "--control-plane", f"http://127.0.0.1:{cp_port}", "--host", "127.0.0.1",
                 "--port", str(port), "--token", token], tmp_path)
    processes.append(gw)
    read_until(gw, b"serving http://", tmp_path)
    deadline = time.monotonic() + 30
    while httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code != 200:  # it has the table
        assert time.monotonic() < deadline, (tmp_path / "log").read_text(errors="replace")
        time.sleep(0.05)
    with in_flight(port, b"POST /openai/v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
                         b"content-length: 400\r\n\r\n{\"model\": ") as sock:
        assert_answered_503_at_the_grace(sock, gw, tmp_path)


#: A service whose stop fails while a worker thread of its is still at work (it never ends).
FAILING_STOP = textwrap.dedent("""
    import threading
    from orchestrator import runloop

    class Service:
        async def stop(self):
            raise RuntimeError("the store would not close")

    async def start():
        threading.Thread(target=threading.Event().wait, name="at work").start()  # not a daemon
        return Service()

    raise SystemExit(runloop.main("info", start, lambda service: ["serving"], ()))
""")


def test_a_stop_that_fails_says_why_and_exits_1_without_waiting_for_worker_threads(
        tmp_path: pathlib.Path, processes: list[subprocess.Popen[bytes]]) -> None:
    proc = launch([sys.executable, "-c", FAILING_STOP], tmp_path)
    processes.append(proc)
    read_until(proc, b"serving", tmp_path)
    proc.send_signal(signal.SIGTERM)
    code, _, log = finish(proc, tmp_path, timeout=15)
    assert code == 1, log[-2000:]
    assert "the store would not close" in log, log[-2000:]

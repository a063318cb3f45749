"""The artifact cache over real HTTP (resume, verification, URL policy) and the ONNX
runtime's input checks, on models built by the test."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from edge_agent import artifacts, errors
from edge_agent.runtime import onnx
from orchestrator.testing import loopback, onnx_models

from .conftest import ArtifactServer, Models


async def test_download_resumes_with_range_and_verifies(
    tmp_path: pathlib.Path, models: Models, artifact_server: ArtifactServer
) -> None:
    cache = artifacts.ArtifactCache(tmp_path)
    data = models.v1.path.read_bytes()
    partial = cache.root / (models.v1.sha256 + ".partial")
    partial.write_bytes(data[:500])
    before = len(artifact_server.ranges)
    path = await cache.fetch(models.v1_url, models.v1.sha256)
    assert artifact_server.ranges[before:] == ["bytes=500-"]
    assert path.read_bytes() == data and not partial.exists()
    assert await cache.read(models.v1.sha256) == data
    # Cached: no second request.
    assert await cache.fetch("http://127.0.0.1:1/unreachable", models.v1.sha256) == path


async def test_a_partial_file_another_process_writes_is_left_alone_until_it_is_done(
    tmp_path: pathlib.Path, models: Models, artifact_server: ArtifactServer
) -> None:
    """A download child left running by an agent that was killed (on a system that does not
    kill it with its parent) must not be raced by the agent started in its place."""
    cache = artifacts.ArtifactCache(tmp_path)
    data = models.v1.path.read_bytes()
    partial = cache.root / (models.v1.sha256 + ".partial")
    partial.write_bytes(data[:500])
    with partial.open("ab") as writer:
        fcntl.flock(writer.fileno(), fcntl.LOCK_EX)
        hits = len(artifact_server.hits)
        with pytest.raises(errors.ArtifactUnavailable, match="being written by another process"):
            await cache.fetch(models.v1_url, models.v1.sha256)
        assert partial.read_bytes() == data[:500] and len(artifact_server.hits) == hits
    path = await cache.fetch(models.v1_url, models.v1.sha256)  # its writer gone: resumed
    assert path.read_bytes() == data and not partial.exists()


def test_a_download_child_whose_agent_died_before_it_started_does_nothing(tmp_path: pathlib.Path) -> None:
    partial = tmp_path / ("0" * 64 + ".partial")
    proc = subprocess.run([sys.executable, "-m", "edge_agent.fetch", "http://127.0.0.1:1/m.onnx", str(partial),
                           "--max-bytes", "10", "--parent-pid", str(os.getppid())],  # not the child's parent: this process is
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (1, "")
    assert json.loads(proc.stdout) == {"error": "unavailable", "message": f"the download's agent (pid {os.getppid()}) "
                                                                          "is no longer its parent: not started"}
    assert not partial.exists()


async def test_mismatching_artifact_never_reaches_the_cache(
    tmp_path: pathlib.Path, models: Models
) -> None:
    cache = artifacts.ArtifactCache(tmp_path)
    with pytest.raises(errors.ArtifactIntegrityError, match="expected " + models.v2.sha256):
        await cache.fetch(models.corrupt_url, models.v2.sha256)
    assert list(cache.root.iterdir()) == []


async def test_corruption_on_disk_is_detected_before_loading(
    tmp_path: pathlib.Path, models: Models
) -> None:
    cache = artifacts.ArtifactCache(tmp_path)
    path = await cache.fetch(models.v1_url, models.v1.sha256)
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    with pytest.raises(errors.ArtifactIntegrityError, match="corrupt"):
        await cache.read(models.v1.sha256)
    assert not path.exists()


@pytest.mark.parametrize(
    ("url", "sha", "error", "fragment"),
    [
        ("file:///etc/hostname", "0" * 64, errors.ArtifactUnavailable, "--allow-file-artifacts"),
        ("ftp://example/x.onnx", "0" * 64, errors.ArtifactUnavailable, "scheme"),
        ("", "0" * 64, errors.ArtifactUnavailable, "not cached here and no URL was given"),
        ("http://127.0.0.1:1/x.onnx", "0" * 64, errors.ArtifactUnavailable, "failed"),
        ("http://127.0.0.1:1/x.onnx", "not-a-digest", errors.ArtifactIntegrityError, "64 hex"),
        ("http://127.0.0.1:1/x.onnx", "0" * 64 + "\n", errors.ArtifactIntegrityError, "64 hex"),
    ],
)
async def test_refused_urls(tmp_path, url, sha, error, fragment) -> None:
    cache = artifacts.ArtifactCache(tmp_path)
    with pytest.raises(error, match=fragment):
        await cache.fetch(url, sha)


async def test_http_errors_are_reported(tmp_path, artifact_server) -> None:
    cache = artifacts.ArtifactCache(tmp_path)
    with pytest.raises(errors.ArtifactUnavailable, match="HTTP 404"):
        await cache.fetch(artifact_server.url("missing.onnx"), "0" * 64)


async def test_file_urls_with_the_flag(tmp_path, models: Models) -> None:
    cache = artifacts.ArtifactCache(tmp_path, allow_file_urls=True)
    path = await cache.fetch(models.v1.path.as_uri(), models.v1.sha256)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == models.v1.sha256


@pytest.fixture(scope="module")
def runtime(models: Models) -> onnx.OnnxModel:
    return onnx.OnnxModel.load(models.v1.path.read_bytes())


@pytest.mark.parametrize(
    ("named", "fragment"),
    [
        ([("input", np.zeros((1, 3), np.float32), "FP32")], "must have shape [-1, 8]"),
        ([("input", np.zeros((8,), np.float32), "FP32")], "must have shape [-1, 8]"),
        ([("input", np.zeros((1, 8), np.int32), "INT32")], "must be FP32, got INT32"),
        ([("other", np.zeros((1, 8), np.float32), "FP32")], "unknown input 'other'"),
        ([], "missing input(s): input"),
    ],
)
def test_input_checks(runtime: onnx.OnnxModel, named, fragment) -> None:
    with pytest.raises(errors.InvalidInput) as refused:
        runtime.feeds(named)
    assert fragment in str(refused.value)


def test_runtime_describes_and_runs(runtime: onnx.OnnxModel) -> None:
    assert runtime.inputs == (onnx.TensorSpec("input", "FP32", (-1, 8)),)
    assert runtime.provider == "CPUExecutionProvider"
    feeds = runtime.feeds([("input", np.zeros((0, 8), np.float32), "FP32")])
    assert runtime.run(feeds, runtime.output_names(()))[0].shape == (0, 4)


def test_garbage_model_is_a_load_error() -> None:
    with pytest.raises(errors.ModelLoadError, match="could not load"):
        onnx.OnnxModel.load(b"definitely not onnx")


@pytest.mark.parametrize(
    ("available", "chosen"),
    [
        (["CPUExecutionProvider"], ["CPUExecutionProvider"]),
        (["CUDAExecutionProvider", "CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]),
        (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
         ["CUDAExecutionProvider", "CPUExecutionProvider"]),
        ([], ["CPUExecutionProvider"]),
    ],
)
def test_provider_choice(available, chosen) -> None:
    assert onnx.choose_providers(available) == chosen


async def test_a_redirect_to_a_host_not_allowed_is_refused_naming_it(tmp_path: pathlib.Path) -> None:
    body = b"model bytes on a mirror"
    cache = artifacts.ArtifactCache(tmp_path)
    async with loopback.behind_a_redirect(body) as (url, asked):
        with pytest.raises(errors.ArtifactUnavailable, match=r"redirects to http://localhost:\d+/m.onnx, whose host 'localhost' "
                                                            r"is not an allowed artifact host \(models.example.com"):
            await cache.fetch(url, hashlib.sha256(body).hexdigest(), redirect_hosts=("models.example.com",))
        assert asked == []  # never reached
    assert list(cache.root.iterdir()) == []


@pytest.mark.parametrize("redirect_hosts", [("localhost",), (".example.com", "LOCALHOST"), ()], ids=["allowed", "any-case", "any-host"])
async def test_a_redirect_to_an_allowed_host_is_followed(tmp_path: pathlib.Path, redirect_hosts: tuple[str, ...]) -> None:
    body = b"model bytes on a mirror"
    cache = artifacts.ArtifactCache(tmp_path)
    async with loopback.behind_a_redirect(body) as (url, asked):
        path = await cache.fetch(url, hashlib.sha256(body).hexdigest(), redirect_hosts=redirect_hosts)
    assert path.read_bytes() == body and asked == ["/m.onnx"]


async def test_an_oversized_download_leaves_nothing_to_resume(tmp_path: pathlib.Path, models: Models) -> None:
    cache = artifacts.ArtifactCache(tmp_path, max_bytes=100)
    with pytest.raises(errors.ArtifactIntegrityError, match=r"larger than the agent's limit of 100 bytes \(--max-artifact-gb\)"):
        await cache.fetch(models.v1_url, models.v1.sha256)
    assert list(cache.root.iterdir()) == []


async def test_an_artifact_announced_over_the_limit_is_refused_before_its_download(tmp_path: pathlib.Path) -> None:
    cache = artifacts.ArtifactCache(tmp_path, max_bytes=100, timeout=60.0)
    (cache.root / ("0" * 64 + ".partial")).write_bytes(b"x" * 10)  # nothing worth resuming either
    head = b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 10-999999999999/1000000000000\r\nContent-Length: 999999999990\r\n\r\n"
    async with _SilentServer(head + b"x" * 10) as url:  # then nothing: reading on would wait out the 60 s socket timeout
        with pytest.raises(errors.ArtifactIntegrityError, match="is 1000000000000 bytes, larger than the agent's limit of 100 bytes"):
            await asyncio.wait_for(cache.fetch(url, "0" * 64), 20)
    assert list(cache.root.iterdir()) == []


async def test_a_size_in_non_ascii_digits_is_taken_as_unknown(tmp_path: pathlib.Path) -> None:
    """'²' (latin-1, as header values are read) is a digit to str.isdigit, not to int()."""
    cache = artifacts.ArtifactCache(tmp_path, timeout=60.0)
    head = b"HTTP/1.1 200 OK\r\nContent-Range: bytes 0-9/\xb2\r\nContent-Length: 10\r\n\r\n"
    async with _SilentServer(head + b"x" * 10) as url:
        with pytest.raises(errors.ArtifactIntegrityError, match="sha256"):  # read whole, then checked
            await asyncio.wait_for(cache.fetch(url, "0" * 64), 20)


async def test_a_url_with_an_impossible_port_is_refused_clearly(tmp_path: pathlib.Path) -> None:
    cache = artifacts.ArtifactCache(tmp_path)
    with pytest.raises(errors.ArtifactUnavailable, match="port"):
        await cache.fetch("http://127.0.0.1:99999/x.onnx", "0" * 64)


class _SilentServer:
    """A loopback TCP server that sends ``reply`` to each connection, then ``rest`` once
    ``go`` is set (nothing when there is no rest), then waits for the peer to go away."""

    def __init__(self, reply: bytes = b"", rest: bytes = b"") -> None:
        self.reply, self.rest = reply, rest
        self.connected = asyncio.Event()
        self.closed = asyncio.Event()
        self.go = asyncio.Event()

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/m.onnx"

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connected.set()
        writer.write(self.reply)
        if self.rest:
            await writer.drain()
            await self.go.wait()
            writer.write(self.rest)
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass  # the request, then wait for the peer to go away
        self.closed.set()
        writer.close()


async def test_a_cancelled_download_is_stopped_at_once(tmp_path: pathlib.Path) -> None:
    cache = artifacts.ArtifactCache(tmp_path, timeout=60.0)
    silent = _SilentServer()
    async with silent as url:
        fetch = asyncio.create_task(cache.fetch(url, "0" * 64))
        await asyncio.wait_for(silent.connected.wait(), 30)
        fetch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(fetch, 10)
        # the child that held the connection is gone, long before its 60 s timeout
        await asyncio.wait_for(silent.closed.wait(), 10)


async def test_a_stalled_download_fails_on_the_socket_timeout(tmp_path: pathlib.Path) -> None:
    cache = artifacts.ArtifactCache(tmp_path, timeout=0.5)
    headers = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10
    async with _SilentServer(headers) as url:
        with pytest.raises(errors.ArtifactUnavailable, match="timed out"):
            await asyncio.wait_for(cache.fetch(url, "0" * 64), 30)
    # what came before the stall is kept for the next attempt's Range request
    assert (cache.root / ("0" * 64 + ".partial")).read_bytes() == b"x" * 10


async def test_a_dropped_connection_keeps_what_came_and_the_next_attempt_resumes(tmp_path: pathlib.Path) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB
    sha = hashlib.sha256(body).hexdigest()
    ranges: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        wanted = re.search(r"(?im)^range: bytes=(\d+)-", head)
        if wanted is None:  # promise the whole artifact, send half of it, hang up
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body[: len(body) // 2])
        else:
            ranges.append(wanted.group(0).split(": ", 1)[1])
            start = int(wanted.group(1))
            writer.write(b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes %d-%d/%d\r\nContent-Length: %d\r\n\r\n"
                         % (start, len(body) - 1, len(body), len(body) - start) + body[start:])
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/m.onnx"
    try:
        cache = artifacts.ArtifactCache(tmp_path)
        with pytest.raises(errors.ArtifactUnavailable, match=f"closed after {len(body) // 2} of {len(body)} bytes"):
            await cache.fetch(url, sha)
        assert (cache.root / (sha + ".partial")).stat().st_size == len(body) // 2
        assert (await cache.fetch(url, sha)).read_bytes() == body
        assert ranges == [f"bytes={len(body) // 2}-"]
    finally:
        server.close()


async def test_pruning_keeps_what_is_wanted_and_what_a_fetch_is_writing(tmp_path: pathlib.Path, models: Models) -> None:
    cache = artifacts.ArtifactCache(tmp_path, timeout=60.0)
    old, wanted = await cache.fetch(models.v1_url, models.v1.sha256), await cache.fetch(models.v2_url, models.v2.sha256)
    abandoned = cache.root / ("a" * 64 + ".partial")  # a download whose model was unassigned
    abandoned.write_bytes(b"x" * 10)
    (cache.root / "notes.txt").write_text("the operator's")
    body = b"x" * 1000
    sha = hashlib.sha256(body).hexdigest()
    server = _SilentServer(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + body[:10], body[10:])
    async with server as url:
        fetch = asyncio.create_task(cache.fetch(url, sha))
        await asyncio.wait_for(server.connected.wait(), 30)
        await cache.prune({models.v2.sha256})
        server.go.set()
        arrived = await asyncio.wait_for(fetch, 30)  # its .partial was left alone: moved into place once whole
    assert arrived.read_bytes() == body
    assert not old.exists() and not abandoned.exists()
    assert wanted.exists() and (cache.root / "notes.txt").exists()
    await cache.prune(set())
    assert sorted(p.name for p in cache.root.iterdir()) == ["notes.txt"]


async def test_a_download_reports_its_progress_and_the_registry_shows_it(tmp_path: pathlib.Path) -> None:
    """What `get placements` shows for a replica whose model is still on its way."""
    from edge_agent import assignments, registry

    body = bytes(range(256)) * 8192  # 2 MiB
    sha = hashlib.sha256(body).hexdigest()
    half = len(body) // 2  # sent at once; the rest when the test says
    server = _SilentServer(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:half], body[half:])
    async with server as url:
        seen: list[str] = []
        models = registry.ModelRegistry(artifacts.ArtifactCache(tmp_path), lambda data: (_ for _ in ()).throw(errors.ModelLoadError("no")),
                                        on_change=lambda: seen.extend(s.message for s in models.statuses()))
        want = assignments.AssignmentSet(1, (assignments.Assignment("big", "d", "v", url, sha),))
        converging = asyncio.create_task(models.converge(want))
        for _ in range(500):  # bounded: the child reports its first chunk at once
            if any(m.startswith("downloading") for m in seen):
                break
            await asyncio.sleep(0.02)
        before_the_rest = list(seen)
        server.go.set()
        await asyncio.wait_for(converging, 30)
    shown = [int(m.group(1)) for x in before_the_rest if (m := re.fullmatch(rf"downloading {url}: (\d+)% of 2.1 MB", x))]
    assert shown and shown[-1] <= 50, before_the_rest  # while at most half of it had come
    assert (tmp_path / "sha256" / sha).read_bytes() == body  # then downloaded whole and verified


def test_the_daemon_never_imports_the_download_client() -> None:
    code = "import sys, edge_agent.daemon, edge_agent.main; print(sorted({'http.client', 'email', 'tempfile'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # http.client lives in the download child (edge_agent.fetch)


async def test_a_cache_that_cannot_be_written_is_reported_as_such(tmp_path: pathlib.Path, models: Models) -> None:
    cache = artifacts.ArtifactCache(tmp_path)
    (cache.root / (models.v1.sha256 + ".partial")).mkdir()  # what the download must write to
    with pytest.raises(errors.ArtifactUnavailable, match="cannot store artifact .* in the cache"):
        await cache.fetch(models.v1_url, models.v1.sha256)
    assert not (cache.root / models.v1.sha256).exists()


async def test_a_download_child_that_says_nothing_is_killed(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(artifacts, "STALL_GRACE_S", -29.0)  # 1 s of silence with a 30 s socket timeout
    cache = artifacts.ArtifactCache(tmp_path, timeout=30.0)
    silent = _SilentServer()
    async with silent as url:
        with pytest.raises(errors.ArtifactUnavailable, match="stalled"):
            await asyncio.wait_for(cache.fetch(url, "0" * 64), 20)
        # The silence counts from the child's start: on a loaded machine it can be killed
        # before it connects (it was reaped, so it never will). Once connected, the
        # connection must go with it.
        if silent.connected.is_set():
            await asyncio.wait_for(silent.closed.wait(), 10)


def test_intra_op_threads_stop_spinning_after_a_run_unless_the_operator_asks_otherwise() -> None:
    from edge_agent import main

    quiet = onnx.session_options()
    assert quiet.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert quiet.get_session_config_entry("session.force_spinning_stop") == "1"
    spinning = onnx.session_options(spin_between_runs=True)  # onnxruntime's own default: no entry at all
    with pytest.raises(RuntimeError, match="does not have configuration"):
        spinning.get_session_config_entry("session.force_spinning_stop")
    bounded = onnx.session_options(spin_after_run_us=250)  # a short spin after each run, then sleep
    assert bounded.get_session_config_entry("session.intra_op.spin_duration_us") == "250"
    with pytest.raises(RuntimeError, match="does not have configuration"):
        bounded.get_session_config_entry("session.force_spinning_stop")
    required = ["--control-plane", "127.0.0.1:1", "--site", "edge-1", "--token", "t"]
    default = main.config_from_args(main.parser().parse_args(required))
    assert not default.spin_between_runs and default.spin_after_run_us == 0
    assert main.config_from_args(main.parser().parse_args([*required, "--spin-between-runs"])).spin_between_runs
    assert main.config_from_args(main.parser().parse_args([*required, "--spin-after-run-us", "250"])).spin_after_run_us == 250


@pytest.mark.parametrize("args", [["--spin-after-run-us", "-1"], ["--spin-after-run-us", "100001"],
                                  ["--spin-after-run-us", "250", "--spin-between-runs"]])
def test_spin_policies_out_of_range_or_together_are_usage_errors(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from edge_agent import main

    with pytest.raises(SystemExit) as exited:
        main.parser().parse_args(["--control-plane", "127.0.0.1:1", "--site", "edge-1", "--token", "t", *args])
    assert exited.value.code == 2
    assert "--spin-" in capsys.readouterr().err


def test_a_bounded_spin_after_runs_answers_alike(tmp_path: pathlib.Path) -> None:
    model = onnx_models.build_mlp(tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    answers = [onnx.OnnxModel.load(model.path.read_bytes(), spin_after_run_us=us).run({"input": x}, ["output"])[0]
               for us in (0, 250)]
    np.testing.assert_array_equal(answers[0], answers[1])


async def test_finished_download_children_are_reaped_by_asyncio_with_their_own_status(
    tmp_path: pathlib.Path, models: Models, caplog: pytest.LogCaptureFixture
) -> None:
    """A child that has closed its output is left to exit. Killing it then (as the cache did)
    made ``Popen`` reap it first, and asyncio reported "Unknown child process pid ..., will
    report returncode 255" for about one download in three here."""
    caplog.set_level("WARNING", logger="asyncio")
    for i in range(12):
        cache = artifacts.ArtifactCache(tmp_path / f"cache-{i}")
        await cache.fetch(models.v1_url, models.v1.sha256)
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []

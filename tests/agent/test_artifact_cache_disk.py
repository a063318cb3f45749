"""The artifact cache on an edge device's disk as it is: one that fills up (or a file-size
limit) in the middle of a download, an artifact larger than the space left, an SD card slow to read back a large partial download,
and a cache folder removed under a running agent."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import tarfile
from collections.abc import AsyncIterator, Callable

import pytest

from edge_agent import artifacts, assignments, daemon, diskspace, errors, registry, state
from orchestrator.testing import harness

from .conftest import ArtifactServer

_FETCH_UNDER_A_LIMIT = """
import asyncio, pathlib, resource, sys
from edge_agent import artifacts, assignments, daemon, diskspace, errors, registry, state
from orchestrator.testing import harness
limit = int(sys.argv[4])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # inherited by the download child
cache = artifacts.ArtifactCache(pathlib.Path(sys.argv[1]))
try:
    asyncio.run(cache.fetch(sys.argv[2], sys.argv[3]))
except errors.AgentError as exc:
    print(type(exc).__name__, exc)
else:
    print("published")
"""


async def test_a_disk_that_fills_during_the_last_chunk_keeps_the_partial_to_resume(
    tmp_path: pathlib.Path, artifact_server: ArtifactServer
) -> None:
    """A write that reaches the end of the disk (here a file-size limit, as a quota is)
    stores part of a chunk and returns without an error: those bytes were hashed all the
    same, and a truncated file reached the cache under the artifact's digest."""
    data = os.urandom(3 << 19)  # a whole 1 MiB chunk, then half of one
    (artifact_server.root / "fills.bin").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    room = 5 << 18  # the disk is full a quarter of a MiB into the last chunk
    out = subprocess.run(
        [sys.executable, "-c", _FETCH_UNDER_A_LIMIT, str(tmp_path), artifact_server.url("fills.bin"), digest, str(room)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip()
    assert out.startswith(f"ArtifactUnavailable cannot store artifact {digest[:12]} in the cache"), out
    cache = artifacts.ArtifactCache(tmp_path)
    assert not (cache.root / digest).exists()
    assert (cache.root / (digest + ".partial")).read_bytes() == data[:room]
    before = len(artifact_server.ranges)
    assert (await cache.fetch(artifact_server.url("fills.bin"), digest)).read_bytes() == data  # space freed
    assert artifact_server.ranges[before:] == [f"bytes={room}-"]


async def test_a_cache_folder_removed_to_free_space_is_made_again(tmp_path: pathlib.Path, artifact_server: ArtifactServer) -> None:
    data = os.urandom(4096)
    (artifact_server.root / "after-rm.bin").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    cache = artifacts.ArtifactCache(tmp_path / "cache")
    shutil.rmtree(tmp_path / "cache")  # rm -rf <data-dir>/cache while the agent runs
    await cache.prune(set())  # each convergence prunes: nothing to do, no error
    assert (await cache.fetch(artifact_server.url("after-rm.bin"), digest)).read_bytes() == data


_SLOW_CARD = """
import hashlib, time
_sha256 = hashlib.sha256


class _ReadFromASlowCard:  # 10 MiB/s: each MiB hashed is a MiB read off an SD card
    def __init__(self, *data):
        self._h = _sha256(*data)

    def update(self, data):
        time.sleep(len(data) / (10 << 20))
        self._h.update(data)

    def hexdigest(self):
        return self._h.hexdigest()


hashlib.sha256 = _ReadFromASlowCard
"""


async def test_a_large_partial_on_a_slow_disk_resumes_rather_than_being_taken_for_a_stall(
    tmp_path: pathlib.Path, artifact_server: ArtifactServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resume re-reads the partial file before its Range request: 2 GB of it on eMMC is
    longer than the 40 s of silence after which a download child is killed, and so was
    every attempt after it, for good."""
    data = os.urandom(32 << 20)
    (artifact_server.root / "slow-card.bin").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    held = 24 << 20  # 2.4 s to re-read, over the 2 s of silence allowed here
    card = tmp_path / "card"
    card.mkdir()
    (card / "sitecustomize.py").write_text(_SLOW_CARD)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(card), os.environ.get("PYTHONPATH")])))
    monkeypatch.setattr(artifacts, "STALL_GRACE_S", 1.0)
    cache = artifacts.ArtifactCache(tmp_path / "cache", timeout=1.0)
    (cache.root / (digest + ".partial")).write_bytes(data[:held])
    before, shown = len(artifact_server.ranges), []
    assert (await cache.fetch(artifact_server.url("slow-card.bin"), digest, shown.append)).read_bytes() == data
    # asked once to learn whether the rest fits, then again once the partial file is read
    assert artifact_server.ranges[before:] == [f"bytes={held}-"] * 2
    assert shown[0].startswith("re-reading what came before: ") and shown[0].endswith(" of 25.2 MB"), shown


_ANNOUNCED = 10**17  # bytes: no disk has that free


@contextlib.asynccontextmanager
async def _announcing(head: bytes) -> AsyncIterator[str]:
    """The URL of a server that answers ``head`` and 10 bytes, then nothing: reading on
    would wait out the socket timeout."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head + b"x" * 10)
        with contextlib.suppress(ConnectionError):
            await reader.read()  # until the download child hangs up
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/huge.onnx"
    finally:
        server.close()


async def _agent_until(data_dir: pathlib.Path, assignment: assignments.Assignment,
                       found: Callable[[registry.ModelStatus], object], what: str) -> list[registry.ModelStatus]:
    """An agent that finds ``assignment`` in its saved state (no control plane to reach), run
    until one of its models' statuses is ``found``: those that are."""
    state.StateStore(data_dir).save_assignments("edge-a", assignments.AssignmentSet(1, (assignment,)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{s.getsockname()[1]}"
    agent = daemon.Agent(daemon.AgentConfig(control_plane=nobody, site="edge-a", token="t", data_dir=data_dir,
                                            listen_port=0, insecure=True, max_artifact_bytes=1 << 60))
    await agent.start()
    try:
        return await harness.wait_until(lambda: [m for m in agent.model_statuses() if found(m)], 20, interval=0.01, what=what)
    finally:
        await agent.stop()


@pytest.mark.parametrize(("held", "head"), [
    (0, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % _ANNOUNCED),
    (10, b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 10-%d/%d\r\nContent-Length: %d\r\n\r\n"
     % (_ANNOUNCED - 1, _ANNOUNCED, _ANNOUNCED - 10)),
], ids=["from-the-start", "resumed"])
async def test_an_artifact_larger_than_the_free_space_is_refused_before_it_fills_the_disk(
    tmp_path: pathlib.Path, held: int, head: bytes
) -> None:
    async with _announcing(head) as url:
        cache = artifacts.ArtifactCache(tmp_path, max_bytes=1 << 60, timeout=60.0)
        partial = cache.root / ("0" * 64 + ".partial")
        if held:
            partial.write_bytes(b"x" * held)  # what came before the space ran out: kept to resume
        shown: list[str] = []
        with pytest.raises(errors.ArtifactUnavailable,
                           match=rf"cannot store artifact 000000000000 in the cache .*: {url} needs {(_ANNOUNCED - held) / 1e6:.1f} "
                                 r"MB more, and \d+\.\d MB are free"):
            await asyncio.wait_for(cache.fetch(url, "0" * 64, shown.append), 20)
        assert partial.read_bytes() == b"x" * held if held else not partial.exists()
        # refused before the partial file is read back: gigabytes off an SD card, at every retry
        assert not [line for line in shown if line.startswith("re-reading")], shown


async def test_a_download_that_would_leave_the_disk_all_but_full_is_refused(tmp_path: pathlib.Path) -> None:
    """The agent's state.json and its other downloads need some room too: a download that
    took all but the last megabyte would fail them until it was removed."""
    announced = shutil.disk_usage(tmp_path).free - (1 << 20)
    async with _announcing(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % announced) as url:
        cache = artifacts.ArtifactCache(tmp_path, max_bytes=1 << 60, timeout=60.0)
        with pytest.raises(errors.ArtifactUnavailable, match=r"MB are free, \d+\.\d MB of which are kept for the agent's own files"):
            await asyncio.wait_for(cache.fetch(url, "0" * 64), 20)


@pytest.mark.parametrize("torn", [False, True], ids=["no-folder", "a-folder-not-whole"])
async def test_a_package_with_room_to_download_but_not_to_unpack_is_refused_before_it_fills_the_disk(
        tmp_path: pathlib.Path, torn: bool) -> None:
    """A generative package is unpacked beside its cached tar (uncompressed: its members
    hold at most its own size): one the disk holds once but not twice would download, then
    fail half-unpacked, and do both again at every retry. A folder of the version that is not
    whole (no mark: torn by a power loss) is removed first, and counts for nothing."""
    room = diskspace.room(tmp_path)
    assert room is not None
    announced = (room.free - room.kept) * 3 // 4  # fits once, with the reserve to spare
    async with _announcing(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % announced) as url:
        data_dir = tmp_path / "agent"
        data_dir.mkdir()
        folder = data_dir / "models" / ("0" * 64)
        if torn:
            folder.mkdir(parents=True)
            (folder / "genai_config.json").write_text("{}")
        failed = await _agent_until(
            data_dir, assignments.Assignment("chat", "d", "v", url, "0" * 64, runtime=assignments.RUNTIME_GENAI),
            lambda m: m.phase is registry.ModelPhase.FAILED, "the package refused")
    assert re.search(rf"{url} needs {2 * announced / 1e6:.1f} MB more to download and unpack, and \d+\.\d MB are free",
                     failed[0].message), failed[0].message
    assert not list((data_dir / "cache" / "sha256").iterdir())  # not a byte written
    assert not folder.exists()


_TAR_HEAD = tarfile.TarInfo("model.onnx").tobuf()  # what an onnx package's first 512 bytes look like
_ONNX_HEAD = b"\x08\x07\x12\x07pytorch" + bytes(500)  # a protobuf's first field: no tar magic at byte 257


@pytest.mark.parametrize(("held", "first"), [(0, _TAR_HEAD), (len(_TAR_HEAD), _TAR_HEAD), (0, _ONNX_HEAD)],
                         ids=["package", "package-resumed", "plain-onnx-file"])
async def test_an_onnx_package_with_room_to_download_but_not_to_unpack_is_refused_before_it_fills_the_disk(
        tmp_path: pathlib.Path, held: int, first: bytes) -> None:
    """An onnx artifact is a package when its first bytes are a tar's, unpacked beside its
    cached tar as a generative one is: one the disk holds once but not twice downloaded, then
    its unpack was refused, at every retry. A plain ONNX file of that size still downloads."""
    room = diskspace.room(tmp_path)
    assert room is not None
    announced = (room.free - room.kept) * 3 // 4  # fits once, with the reserve to spare
    head = (b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes %d-%d/%d\r\nContent-Length: %d\r\n\r\n"
            % (held, announced - 1, announced, announced - held) if held
            else b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % announced)
    async with _announcing(head + first[held:]) as url:
        data_dir = tmp_path / "agent"
        (data_dir / "cache" / "sha256").mkdir(parents=True)
        partial = data_dir / "cache" / "sha256" / ("0" * 64 + ".partial")
        if held:
            partial.write_bytes(first[:held])
        seen = await _agent_until(
            data_dir, assignments.Assignment("m", "d", "v", url, "0" * 64, runtime=assignments.RUNTIME_ONNX),
            lambda m: m.phase is registry.ModelPhase.FAILED or re.search(r"downloading .*: \d+% of", m.message),
            "the download refused, or under way")
    if first is _ONNX_HEAD:  # not a package: its size once is all it needs
        assert seen[0].phase is not registry.ModelPhase.FAILED, seen[0].message
        return
    assert seen[0].phase is registry.ModelPhase.FAILED, seen[0].message
    assert re.search(rf"{url} needs {(2 * announced - held) / 1e6:.1f} MB more to download and unpack, and \d+\.\d MB are free",
                     seen[0].message), seen[0].message
    assert partial.read_bytes() == first[:held] if held else not partial.exists()  # not a byte written

"""The artifact cache on an edge device's disk as it is: one that fills up (or a file-size
limit) in the middle of a download, and a cache folder removed under a running agent."""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys

from edge_agent import artifacts

from .conftest import ArtifactServer

_FETCH_UNDER_A_LIMIT = """
import asyncio, pathlib, resource, sys
from edge_agent import artifacts, errors
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

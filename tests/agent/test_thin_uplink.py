"""Artifacts pulled over a thin, lossy uplink (a satellite or 4G backup link: a few Mbit/s,
stalls, connections cut in the middle of a transfer), through a real throttling proxy
(:mod:`orchestrator.testing.thinlink`) in front of a real HTTP artifact server, scaled down
to a few MB so that each test takes seconds."""

from __future__ import annotations

import hashlib
import os

import pytest

from edge_agent import artifacts, assignments, errors, registry, retry
from orchestrator.testing import thinlink

from .conftest import ArtifactServer


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Slowest:
    """Jitter that always picks the longest wait: the backoff at its worst."""

    def uniform(self, a: float, b: float) -> float:
        return b


def _refuse(data: bytes) -> object:
    raise errors.ModelLoadError("not loaded in this test")


@pytest.fixture
def artifact(artifact_server: ArtifactServer) -> tuple[str, bytes, str]:
    body = os.urandom(2 << 20)
    name = f"thin-{hashlib.sha256(body).hexdigest()[:8]}.bin"
    (artifact_server.root / name).write_bytes(body)
    return name, body, hashlib.sha256(body).hexdigest()


async def test_a_download_cut_again_and_again_resumes_at_once_each_time(
    tmp_path, artifact_server: ArtifactServer, artifact: tuple[str, bytes, str]
) -> None:
    """Each cut connection is an attempt that failed, but one whose bytes are kept: the next
    one resumes past them. Backing off as for an artifact that cannot be had (1 s doubling
    to 60 s) left a link that drops every few minutes idle for a minute after each drop."""
    name, body, sha = artifact
    clock = _Clock()
    async with thinlink.ThinLink(("127.0.0.1", int(artifact_server.base_url.rsplit(":", 1)[1])),
                                 cut_after=512 << 10) as link:
        url = f"http://127.0.0.1:{link.port}/{name}"
        cache = artifacts.ArtifactCache(tmp_path)
        models = registry.ModelRegistry(cache, _refuse, clock=clock, rng=_Slowest())
        want = assignments.AssignmentSet(1, (assignments.Assignment("big", "d", "v", url, sha),))
        waits = []
        for _ in range(10):  # bounded: 5 connections carry it (each also carries its headers)
            await models.converge(want)
            if (cache.root / sha).exists():
                break
            due = models.retry_due_in()
            assert due is not None
            waits.append(due)
            clock.now += due
        assert (cache.root / sha).read_bytes() == body  # whole, and its sha256 verified
        assert len(waits) == link.connections - 1 >= 3
        assert waits == [retry.MODEL_RETRY.initial] * len(waits), waits

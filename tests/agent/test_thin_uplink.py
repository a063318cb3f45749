"""Artifacts pulled over a thin, lossy uplink (a satellite or 4G backup link: a few Mbit/s,
stalls, connections cut in the middle of a transfer), through a real throttling proxy
(:mod:`orchestrator.testing.thinlink`) in front of a real HTTP artifact server, scaled down
to a few MB so that each test takes seconds."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re

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


def _three_served(artifact_server: ArtifactServer, prefix: str) -> tuple[list[bytes], list[str]]:
    """Three artifacts of 1 MiB served as ``<prefix>-<sha256[:8]>.bin``: their bytes and sha256s."""
    bodies = [os.urandom(1 << 20) for _ in range(3)]
    shas = [hashlib.sha256(b).hexdigest() for b in bodies]
    for sha, body in zip(shas, bodies, strict=True):
        (artifact_server.root / f"{prefix}-{sha[:8]}.bin").write_bytes(body)
    return bodies, shas


async def test_a_download_cut_again_and_again_resumes_at_once_each_time(
    tmp_path, artifact_server: ArtifactServer, artifact: tuple[str, bytes, str]
) -> None:
    """Each cut connection is an attempt that failed, but one whose bytes are kept: the next
    one resumes past them. Backing off as for an artifact that cannot be had (1 s doubling
    to 60 s) left a link that drops every few minutes idle for a minute after each drop."""
    name, body, sha = artifact
    clock = _Clock()
    async with thinlink.ThinLink(_upstream(artifact_server), cut_after=512 << 10) as link:
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


def _upstream(artifact_server: ArtifactServer) -> tuple[str, int]:
    return "127.0.0.1", int(artifact_server.base_url.rsplit(":", 1)[1])


async def test_progress_says_the_rate_and_the_time_left(
    tmp_path, artifact_server: ArtifactServer, artifact: tuple[str, bytes, str]
) -> None:
    """What `get placements` and the agent's log show for a model on its way over a thin link:
    how much, how fast and how long still, not only how much."""
    name, body, sha = artifact
    rate = 512 << 10  # 4.2 Mbit/s: 2 MiB in 4 s
    async with thinlink.ThinLink(_upstream(artifact_server), rate=rate) as link:
        seen: list[str] = []
        cache = artifacts.ArtifactCache(tmp_path)
        path = await asyncio.wait_for(cache.fetch(f"http://127.0.0.1:{link.port}/{name}", sha, seen.append), 60)
    assert path.read_bytes() == body
    paced = [m for x in seen if (m := re.fullmatch(r"(\d+)% of 2\.1 MB at ([\d.]+) Mbit/s, about (\d+) s left", x))]
    assert len(paced) >= 2, seen
    for m in paced:
        assert 3.0 <= float(m.group(2)) <= 5.0, seen  # the link's 4.2 Mbit/s
        left = (100 - int(m.group(1))) / 100 * len(body) / rate
        assert abs(int(m.group(3)) - left) <= 1.5, seen


async def test_a_stalled_link_is_shown_as_such_and_the_download_goes_on_when_it_flows_again(
    tmp_path, artifact_server: ArtifactServer, artifact: tuple[str, bytes, str]
) -> None:
    """Bytes stop, the connection stays open: the progress says for how long nothing came
    (not a rate and a time left frozen at what they were), and the same download goes on
    once the link flows again, shorter than the socket timeout."""
    name, body, sha = artifact
    async with thinlink.ThinLink(_upstream(artifact_server), rate=1 << 20) as link:
        seen: list[str] = []
        stalled = asyncio.Event()

        def heard(done: str) -> None:
            seen.append(done)
            if link.sent > len(body) // 4 and not stalled.is_set():
                link.flowing.clear()
            if "nothing received for" in done:
                stalled.set()

        cache = artifacts.ArtifactCache(tmp_path, timeout=8.0)
        fetch = asyncio.create_task(cache.fetch(f"http://127.0.0.1:{link.port}/{name}", sha, heard))
        await asyncio.wait_for(stalled.wait(), 30)
        link.flowing.set()
        assert (await asyncio.wait_for(fetch, 30)).read_bytes() == body
    quiet = next(x for x in seen if "nothing received for" in x)
    shown = re.fullmatch(r"\d+% of 2\.1 MB at [\d.]+ Mbit/s, about \d+ s left, nothing received for (\d+)s", quiet)
    assert shown is not None and 4 <= int(shown.group(1)) < 8, seen  # half the socket timeout, and less than it
    assert link.connections == 1  # the same connection, not a new attempt


async def test_with_one_download_at_a_time_the_first_model_is_not_slowed_by_the_others(
    tmp_path, artifact_server: ArtifactServer
) -> None:
    """Three models assigned at once over one thin link: all in parallel, each gets a third of
    it and none is ready before nearly all are. With ``max_downloads=1`` they take turns, in
    the order of the set, and the others say they wait."""
    bodies, shas = _three_served(artifact_server, "turn")
    async with thinlink.ThinLink(_upstream(artifact_server), rate=1 << 20) as link:
        cache = artifacts.ArtifactCache(tmp_path, max_downloads=1)
        messages: dict[str, list[str]] = {}
        arrived: list[str] = []

        def changed() -> None:
            for s in models.statuses():
                if not messages.get(s.name) or messages[s.name][-1] != s.message:
                    messages.setdefault(s.name, []).append(s.message)
            arrived.extend(sha for sha in shas if sha not in arrived and (cache.root / sha).exists())

        models = registry.ModelRegistry(cache, _refuse, on_change=changed)
        want = assignments.AssignmentSet(1, tuple(
            assignments.Assignment(f"m{i}", "d", "v", f"http://127.0.0.1:{link.port}/turn-{sha[:8]}.bin", sha)
            for i, sha in enumerate(shas)))
        await asyncio.wait_for(models.converge(want), 60)
    assert arrived == shas  # one after the other, in the set's order
    assert link.connections == 3
    assert any("waiting for the download of m0 to end (--max-downloads 1)" in m for m in messages["m1"]), messages["m1"]
    assert any("waiting for the download of m0 to end" in m for m in messages["m2"]), messages["m2"]
    # told again when the turn moves on: not still waiting for m0 while m1 downloads
    assert any("waiting for the download of m1 to end (--max-downloads 1)" in m for m in messages["m2"]), messages["m2"]


async def test_a_download_cut_off_keeps_its_turn_and_resumes_before_the_others(
    tmp_path, artifact_server: ArtifactServer
) -> None:
    """A link that drops every 300 kB: the first model's download, retried at once after each
    cut as the registry does, resumes ahead of the models waiting, rather than going to the
    back of the queue at every cut (all three taking turns, as slow as all at once)."""
    bodies, shas = _three_served(artifact_server, "cut")
    async with thinlink.ThinLink(_upstream(artifact_server), cut_after=300 << 10) as link:
        cache = artifacts.ArtifactCache(tmp_path, max_downloads=1)
        sent_when_done: dict[str, int] = {}

        async def pull(i: int, sha: str) -> None:
            for _ in range(10):  # bounded: 4 attempts carry it
                try:
                    await cache.fetch(f"http://127.0.0.1:{link.port}/cut-{sha[:8]}.bin", sha, name=f"m{i}")
                except errors.ArtifactUnavailable:
                    await asyncio.sleep(0)  # retried at once, as a resumable download is
                    continue
                sent_when_done[sha] = link.sent
                return

        await asyncio.wait_for(asyncio.gather(*(pull(i, sha) for i, sha in enumerate(shas))), 60)
    assert sorted(sent_when_done, key=sent_when_done.__getitem__) == shas
    assert sent_when_done[shas[0]] < 1.3 * (1 << 20), sent_when_done  # its own bytes, not the others'
    assert all((cache.root / sha).read_bytes() == body for sha, body in zip(shas, bodies, strict=True))


async def test_the_bytes_received_count_each_byte_once_across_resumes(
    tmp_path, artifact_server: ArtifactServer, artifact: tuple[str, bytes, str]
) -> None:
    """What edgeplane_agent_artifact_received_bytes_total counts: the bytes that came over the
    link, a resumed download's re-read partial file not counted again."""
    name, body, sha = artifact
    async with thinlink.ThinLink(_upstream(artifact_server), cut_after=1 << 20) as link:
        cache = artifacts.ArtifactCache(tmp_path, max_downloads=1)
        assert cache.downloads() == (0, 0, 0)
        url = f"http://127.0.0.1:{link.port}/{name}"
        for _ in range(5):  # bounded: 3 connections carry it
            try:
                await cache.fetch(url, sha)
                break
            except errors.ArtifactUnavailable:
                continue
    assert link.connections == 3
    assert cache.downloads() == (len(body), 0, 0)


async def test_a_trickle_under_the_speed_limit_ends_the_attempt_and_keeps_its_bytes(
    tmp_path, artifact_server: ArtifactServer, artifact: tuple[str, bytes, str]
) -> None:
    """A link (or a middlebox) that sends a few bytes now and then never reaches the socket
    timeout, so without a floor the download crawls forever. Under the speed limit for the
    speed time, the attempt ends as a cut one does: failed, its bytes kept for the resume."""
    name, _, sha = artifact
    async with thinlink.ThinLink(_upstream(artifact_server), rate=200) as link:
        cache = artifacts.ArtifactCache(tmp_path, speed_limit=1000, speed_time=2.0)
        with pytest.raises(errors.ArtifactUnavailable) as failed:
            await asyncio.wait_for(cache.fetch(f"http://127.0.0.1:{link.port}/{name}", sha), 30)
    assert re.search(r"too slow: \d+ bytes in the last 2 s, under the speed limit of 1000 bytes/s", str(failed.value)), failed.value
    assert failed.value.received > 0  # resumed past them, within a second, like a cut
    assert (cache.root / f"{sha}.partial").stat().st_size == failed.value.received


async def test_a_thin_link_above_the_speed_limit_is_left_to_go_on(
    tmp_path, artifact_server: ArtifactServer, artifact: tuple[str, bytes, str]
) -> None:
    name, body, sha = artifact
    async with thinlink.ThinLink(_upstream(artifact_server), rate=1 << 20) as link:
        cache = artifacts.ArtifactCache(tmp_path, speed_limit=100 << 10, speed_time=1.0)
        path = await asyncio.wait_for(cache.fetch(f"http://127.0.0.1:{link.port}/{name}", sha), 30)
    assert path.read_bytes() == body


async def test_a_download_too_slow_gives_its_turn_to_the_next(
    tmp_path, artifact_server: ArtifactServer, artifact: tuple[str, bytes, str]
) -> None:
    """A server that trickles is no reason for the models waiting their turn (whose artifacts
    may come from elsewhere) to wait on: unlike a cut one, a download ended as too slow goes
    to the back of the queue."""
    name, body, sha = artifact
    other = os.urandom(1 << 20)
    other_sha = hashlib.sha256(other).hexdigest()
    (artifact_server.root / f"next-{other_sha[:8]}.bin").write_bytes(other)
    async with thinlink.ThinLink(_upstream(artifact_server), rate=200) as slow, \
            thinlink.ThinLink(_upstream(artifact_server)) as fast:
        cache = artifacts.ArtifactCache(tmp_path, max_downloads=1, speed_limit=1000, speed_time=2.0)
        # (tasks start in the order made: the first takes the turn, the second waits)
        trickle = asyncio.create_task(cache.fetch(f"http://127.0.0.1:{slow.port}/{name}", sha, name="slow"))
        waiting = asyncio.create_task(cache.fetch(f"http://127.0.0.1:{fast.port}/next-{other_sha[:8]}.bin", other_sha, name="next"))
        with pytest.raises(errors.ArtifactUnavailable, match="too slow"):
            await asyncio.wait_for(trickle, 30)
        again = asyncio.create_task(cache.fetch(f"http://127.0.0.1:{slow.port}/{name}", sha, name="slow"))  # the retry
        try:
            assert (await asyncio.wait_for(waiting, 30)).read_bytes() == other
            assert not again.done()  # it waits behind, or has only begun again
        finally:
            again.cancel()
            with contextlib.suppress(asyncio.CancelledError, errors.ArtifactUnavailable):
                await again

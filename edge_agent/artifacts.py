"""Content-addressed artifact cache: download, resume, verify, and only then hand over.

Edge uplinks are slow and flaky, so a download resumes with an HTTP ``Range`` request from
what ``<hex>.partial`` already holds. A file reaches its final name
``<root>/sha256/<hex>`` only after its sha256 matched, and :meth:`ArtifactCache.read`
hashes the bytes it returns once more, so what onnxruntime loads is exactly what was
verified (a file corrupted on disk later is refused, not served).

Downloads are one streamed GET each, made with the standard library's ``http.client`` by
a child process (:mod:`edge_agent.fetch`): an HTTP client library would add 10 MB to an
agent whose whole budget is 80 MB, and even ``http.client`` costs the daemon 1 MB for
good. The same child copies ``file://`` artifacts (with ``--allow-file-artifacts``). A
cancelled fetch kills its child and waits for it, so nothing else may touch the
``.partial`` file before the writer is gone; an agent killed outright takes its children
with it (Linux), and a child finding ``.partial`` locked by another leaves it alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import json
import logging
import os
import pathlib
import re
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from typing import Any

import edge_agent
from edge_agent import errors, pace, tarhead

log = logging.getLogger(__name__)

_HEX = re.compile(r"[0-9a-f]{64}")
#: Beyond the socket timeout, how long a download child may say nothing before it is killed.
STALL_GRACE_S = 10.0
#: How long a download child may say nothing before its progress says so (a stalled link), at most half the socket timeout.
QUIET_SHOWN_S = 5.0
#: How long a fetch child whose output ended may take to exit before it is killed.
EXIT_GRACE_S = 5.0
#: A download slower than this many bytes a second for DEFAULT_SPEED_TIME_S is cut, to be
#: resumed: a trickle, far under any real thin link (a 64 kbit/s line carries 8000).
DEFAULT_SPEED_LIMIT = 1000.0
DEFAULT_SPEED_TIME_S = 60.0
#: The downloads' socket timeout: a stall this long ends an attempt, to be resumed.
DEFAULT_TIMEOUT_S = 30.0


def check_sha256(sha256: str) -> str:
    value = sha256.lower()
    if not _HEX.fullmatch(value):
        raise errors.ArtifactIntegrityError(f"sha256 {sha256!r} is not 64 hex digits")
    return value


class Unpack(enum.Enum):
    """Whether an artifact is unpacked after its download, beside its cached copy: its
    download needs room for that too (an uncompressed tar's members hold at most its size),
    until the unpack is whole and the copy is dropped (:meth:`ArtifactCache.drop`)."""

    NEVER = "never"  # loaded as it is
    ALWAYS = "always"  # a package (onnx-genai)
    IF_TAR = "if-tar"  # an onnx artifact: a package when its first bytes are a tar's (tarhead)


class ArtifactCache:
    """Artifacts by sha256 under ``root``."""

    def __init__(
        self,
        root: pathlib.Path,
        *,
        allow_file_urls: bool = False,
        max_bytes: int = edge_agent.DEFAULT_MAX_ARTIFACT_GIB << 30,
        timeout: float = DEFAULT_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
        unpack_root: pathlib.Path | None = None,
        max_downloads: int = 0,
        speed_limit: float = DEFAULT_SPEED_LIMIT,
        speed_time: float = DEFAULT_SPEED_TIME_S,
    ) -> None:
        """``unpack_root``: where packages are unpacked (``<unpack_root>/<sha256>``), whose
        room a package's download counts too. ``max_downloads``: how many http(s)
        downloads run at once, the others waiting their turn in the order they came (0: no
        limit), for a thin uplink that all of them at once would share, none ready before
        nearly all are. ``timeout``: the downloads' socket timeout; ``speed_limit`` (bytes a
        second, 0: none) and ``speed_time``: an attempt whose bytes come slower than that
        for that long fails, to be resumed (a trickle never reaches the socket timeout)."""
        self.root = root / "sha256"
        self._unpack_root = unpack_root
        self.root.mkdir(parents=True, exist_ok=True)
        self._allow_file = allow_file_urls
        self._max_bytes = max_bytes
        self._timeout = timeout
        self._floor = (speed_limit, speed_time)
        self._clock = clock
        self._locks: dict[str, asyncio.Lock] = {}
        self._turns = _Turns(max_downloads) if max_downloads else None
        self._received = 0  # bytes downloads received over the network, each once
        self._running = 0  # download children under way

    async def fetch(self, url: str, sha256: str, progress: Callable[[str], None] | None = None,
                    redirect_hosts: tuple[str, ...] = (), *, unpack: Unpack = Unpack.NEVER,
                    name: str = "") -> pathlib.Path:
        """Return the verified file for ``sha256``, downloading it from ``url`` if needed;
        ``progress`` hears how far a download has got ("40% of 812.3 MB at 2.0 Mbit/s, about 32 min
        left"), about once a second.
        A redirect is followed only to ``url``'s host or one of ``redirect_hosts`` (empty: any).
        One that ``unpack`` says is (or, from its first bytes, turns out to be) a package is
        refused before a byte is written unless there is room to unpack it too. ``name``:
        what the download is of (a model), in what the downloads waiting their turn are told."""
        digest = check_sha256(sha256)
        lock = self._locks.setdefault(digest, asyncio.Lock())
        async with lock:
            final = self.root / digest
            if final.is_file():
                return final
            if not url:  # a version the control plane only expects from this cache
                raise errors.ArtifactUnavailable(f"artifact {digest[:12]} is not cached here and no URL was given for it")
            scheme = urllib.parse.urlsplit(url).scheme
            if scheme in ("http", "https") or (scheme == "file" and self._allow_file):
                try:
                    self.root.mkdir(parents=True, exist_ok=True)  # removed by hand to free space: made again
                    unpack_into = self._unpack_root if unpack is not Unpack.NEVER and self._unpack_root is not None \
                        and not (self._unpack_root / digest).is_dir() else None
                    # a file:// artifact is a local copy: no uplink to share, no turn to take
                    async with (self._turn(digest, name or digest[:12], progress) if scheme != "file"
                                else contextlib.nullcontext()):
                        await self._download(url, digest, final, progress, redirect_hosts, unpack_into,
                                             if_tar=unpack is Unpack.IF_TAR)
                except OSError as exc:  # a full or read-only cache disk: reported, retried, old model kept
                    raise errors.ArtifactUnavailable(
                        f"cannot store artifact {digest[:12]} in the cache {self.root}: {exc.strerror or exc}"
                    ) from exc
            elif scheme == "file":
                raise errors.ArtifactUnavailable(
                    f"file:// artifact {url!r} refused (start the agent with --allow-file-artifacts)"
                )
            else:
                raise errors.ArtifactUnavailable(f"artifact URL {url!r}: scheme must be http(s)")
            return final

    def downloads(self) -> tuple[int, int, int]:
        """(bytes received over the network since the start, downloads under way, downloads
        waiting their turn): for the agent's metrics."""
        return self._received, self._running, self._turns.waiting() if self._turns is not None else 0

    @contextlib.asynccontextmanager
    async def _turn(self, digest: str, name: str, progress: Callable[[str], None] | None) -> AsyncIterator[None]:
        """Take one of the ``max_downloads`` turns for ``digest``'s download, or the one it
        holds (none: no limit); while it waits, ``progress`` hears whose downloads it waits
        for. The turn is kept by a download cut off after bytes came (it resumes within a
        second: giving the turn away would have the downloads take turns at each cut, as
        slow as all at once), and given back when it ends otherwise (too slow included: a
        trickling server holds up no other model) or is cancelled."""
        if self._turns is None:
            yield
            return
        turns = self._turns
        if digest not in turns.holders:
            await turns.take(digest, name, progress)
        try:
            yield
        except errors.ArtifactUnavailable as exc:
            if not exc.received or exc.slow:  # (too slow: the server's fault, maybe, not the link's)
                turns.give_back(digest)
            raise
        except BaseException:
            turns.give_back(digest)
            raise
        turns.give_back(digest)

    def drop(self, sha256: str) -> None:
        """Remove ``sha256``'s cached file, a package unpacked whole: its folder is what
        loads from now on, and the tar beside it would double the version's room on the disk."""
        path = self.root / check_sha256(sha256)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:  # a read-only disk: the tar stays, the folder serves all the same
            log.warning("cannot remove package %s from the cache, unpacked: %s", path, exc.strerror or exc)
            return
        log.info("removed package %s from the cache: unpacked into its folder", sha256[:12])

    async def prune(self, keep: set[str]) -> None:
        """Delete cached artifacts and ``.partial`` downloads whose digest is not in ``keep``,
        except those a fetch is working on now (whose lock is held)."""
        busy = {digest for digest, lock in self._locks.items() if lock.locked()}
        if self._turns is not None:
            for digest in [d for d in self._turns.holders if d not in keep and d not in busy]:
                self._turns.give_back(digest)  # kept for a resume that will not come: its model was unassigned
        for digest in [d for d in self._locks if d not in keep and d not in busy]:
            del self._locks[digest]
        spared = keep | busy
        # listed here (a few names), removed in a thread only when there is something to remove: on
        # most passes there is none, and a thread's first work would cost the idle agent an arena
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:  # removed by hand: nothing left to prune; the next download makes it again
            return
        doomed = [name for name in names
                  if _HEX.match(name.removesuffix(".partial")) and name.removesuffix(".partial") not in spared]
        if doomed:
            removed = await asyncio.to_thread(_remove, self.root, doomed)
            log.info("removed %d artifact file(s) no assignment needs from the cache: %s", len(removed), ", ".join(removed))

    async def read(self, sha256: str) -> bytes:
        """The cached artifact's bytes, re-verified; raises if missing or corrupt."""
        return await asyncio.to_thread(self._read_verified, check_sha256(sha256))

    def _read_verified(self, digest: str) -> bytes:
        path = self.root / digest
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise errors.ArtifactUnavailable(f"artifact {digest[:12]} is not cached: {exc}") from exc
        _refuse_if_corrupt(path, digest, hashlib.sha256(data).hexdigest())
        return data

    async def _download(self, url: str, digest: str, final: pathlib.Path, progress: Callable[[str], None] | None = None,
                        redirect_hosts: tuple[str, ...] = (), unpack_into: pathlib.Path | None = None, *,
                        if_tar: bool = False) -> None:
        """One download, made by ``python -m edge_agent.fetch`` in a child process, which
        is killed if this is cancelled or the child goes quiet for longer than a socket
        timeout could explain. ``unpack_into``: where it is unpacked after (``if_tar``: only
        if its first bytes are a tar's), whose room it needs too."""
        partial = final.with_name(digest + ".partial")
        started, held = self._clock(), _size(partial)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "edge_agent.fetch", url, str(partial),
                "--timeout", str(self._timeout), "--max-bytes", str(self._max_bytes),
                "--speed-limit", str(self._floor[0]), "--speed-time", str(self._floor[1]),
                *(f"--redirect-host={host}" for host in redirect_hosts),
                *([f"--unpack-into={unpack_into}"] if unpack_into is not None else []),
                *(["--only-if-tar"] if unpack_into is not None and if_tar else []), f"--parent-pid={os.getpid()}",
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise errors.ArtifactUnavailable(f"download of {url} failed: cannot start {sys.executable}: {exc}") from exc
        ended = False
        self._running += 1
        try:
            report, counted = await self._follow(proc, url, held, progress)
            ended = True
        except errors.ArtifactUnavailable as exc:  # stalled: what came before the stall is kept all the same
            exc.received = max(0, _size(partial) - held)
            raise
        finally:
            self._running -= 1
            await asyncio.shield(_reap(proc, ended=ended))
        # the bytes since the child's last report (it reports at most once a second)
        self._received += max(0, int(report["done"]) - counted if "done" in report else _size(partial) - counted)
        if "done" not in report:
            assert proc.stderr is not None
            failure = self._failure(url, digest, report, proc.returncode, await proc.stderr.read())
            if isinstance(failure, errors.ArtifactUnavailable):  # a cut connection: its bytes are resumed from
                failure.received = max(0, _size(partial) - held)
            raise failure
        _publish(partial, final, url, digest, str(report["sha256"]))
        log.info("downloaded %s (%d bytes, sha256 verified) in %.1fs", url, report["done"], self._clock() - started)

    async def _follow(self, proc: asyncio.subprocess.Process, url: str, held: int,
                      progress: Callable[[str], None] | None = None) -> tuple[dict[str, Any], int]:
        """Log the child's progress (every 5 s), hand each report to ``progress`` with the
        rate and the time left (the child reports at most once a second), and, while it says
        nothing for longer than :data:`QUIET_SHOWN_S`, how long it has been quiet (a stalled
        link); return its last report (``{}`` if it printed none) and how far the bytes
        received were counted (``held``: what the partial file held before)."""
        assert proc.stdout is not None
        report: dict[str, Any] = {}
        last_log = heard = self._clock()
        shown, receiving = "", False  # the last progress shown, which a quiet spell while receiving adds to
        # from the first bytes this attempt received: not the process's start, nor a resume's re-read
        rate: pace.Pace | None = None
        counted = held  # what the partial file held, or the last report said: counted before
        stalled_after, quiet_shown = self._timeout + STALL_GRACE_S, min(QUIET_SHOWN_S, self._timeout / 2)
        while True:
            try:
                async with asyncio.timeout(1.0):
                    line = await proc.stdout.readline()
            except TimeoutError:
                quiet = self._clock() - heard
                if quiet >= stalled_after:
                    raise errors.ArtifactUnavailable(f"download of {url} stalled: nothing received for {stalled_after:g}s") from None
                if quiet >= quiet_shown and progress is not None and receiving:  # (not a re-read: a disk's pace)
                    progress(f"{shown}, nothing received for {quiet:.0f}s")
                continue
            if not line:
                return report, counted
            heard = self._clock()
            try:
                report = dict(json.loads(line))
            except ValueError:
                continue  # not one of its reports; the exit status tells the rest
            if "resumed" in report:
                rate, counted = None, int(report["resumed"])  # what came before is not this attempt's pace
                log.info("resuming %s at %d bytes", url, report["resumed"])
            elif "progress" in report:
                have = int(report["progress"])
                if have < counted:  # the server ignored Range: started again from byte 0
                    counted = 0
                self._received += have - counted
                counted = have
                if rate is None:
                    rate = pace.Pace(heard, have)
                else:
                    rate.add(heard, have)
                shown, receiving = pace.describe(have, report.get("total"), rate.rate()), True
            elif "verifying" in report:  # (re-reading a partial: a slow disk, not a stall)
                shown = f"re-reading what came before: {pace.describe(int(report['verifying']), report.get('total'), None)}"
                receiving = False
            else:
                continue
            if progress is not None:
                progress(shown)
            if heard - last_log >= 5.0:
                last_log = heard
                log.info("downloading %s: %s", url, shown)

    def _failure(self, url: str, digest: str, report: dict[str, Any], code: int | None, stderr: bytes) -> errors.AgentError:
        kind, message = report.get("error"), str(report.get("message", ""))
        if kind == "integrity":
            return errors.ArtifactIntegrityError(message)
        if kind == "disk":
            return errors.ArtifactUnavailable(f"cannot store artifact {digest[:12]} in the cache {self.root}: {message}")
        if kind == "unavailable":
            return errors.ArtifactUnavailable(message)
        if kind == "slow":
            slow = errors.ArtifactUnavailable(message)
            slow.slow = True
            return slow
        tail = stderr.decode(errors="replace").strip()[-300:]
        return errors.ArtifactUnavailable(f"download of {url} failed: the fetch process exited with status {code}: {tail}")


class _Turns:
    """``size`` turns at downloading, each held by a digest, handed out in the order asked;
    each download waiting is told whose it waits for, again whenever the turns move on."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.holders: dict[str, str] = {}  # digest: what its download is of
        # digest: (what it is of, its turn, what hears whose it waits for), in the order they asked
        self._waiting: dict[str, tuple[str, asyncio.Future[None], Callable[[str], None] | None]] = {}

    def waiting(self) -> int:
        return len(self._waiting)

    async def take(self, digest: str, name: str, progress: Callable[[str], None] | None = None) -> None:
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[digest] = (name, turn, progress)
        self._hand_out()
        if digest in self._waiting:
            self._tell(progress)
        try:
            await turn
        except BaseException:
            if self._waiting.pop(digest, None) is None:  # handed the turn as it was cancelled
                self.give_back(digest)
            raise

    def give_back(self, digest: str) -> None:
        if self.holders.pop(digest, None) is not None and self._hand_out():
            for _, _, progress in self._waiting.values():
                self._tell(progress)

    def _hand_out(self) -> bool:
        """Whether a turn was handed out."""
        handed = False
        while len(self.holders) < self.size and self._waiting:
            digest = next(iter(self._waiting))
            name, turn, _ = self._waiting.pop(digest)
            if not turn.done():  # (one cancelled is no longer waiting)
                self.holders[digest] = name
                turn.set_result(None)
                handed = True
        return handed

    def _tell(self, progress: Callable[[str], None] | None) -> None:
        if progress is not None:
            ahead = sorted(self.holders.values())
            progress(f"waiting for the download{'s' if len(ahead) > 1 else ''} of {', '.join(ahead)} to end "
                     f"(--max-downloads {self.size})")


def _size(path: pathlib.Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _remove(root: pathlib.Path, names: list[str]) -> list[str]:
    removed = []
    for name in names:
        entry = root / name
        if not entry.is_file():  # not the cache's
            continue
        try:
            entry.unlink()
        except OSError as exc:
            log.warning("cannot remove %s from the cache: %s", entry, exc.strerror or exc)
            continue
        removed.append(name[:12] + (".partial" if name.endswith(".partial") else ""))
    return removed


def is_package(path: pathlib.Path) -> bool:
    """Whether the cached artifact at ``path`` is a package (a tar, ``edge_agent.packages``),
    not an ONNX file (:mod:`edge_agent.tarhead`)."""
    with path.open("rb") as fh:
        return tarhead.is_tar(fh.read(tarhead.HEAD_BYTES))


def verify_file(path: pathlib.Path, sha256: str) -> None:
    """Re-hash a cached artifact too large to read at once (a generative package) before
    it is used; one corrupted on disk is removed, so the next attempt fetches it again."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    _refuse_if_corrupt(path, sha256, h.hexdigest())


def _refuse_if_corrupt(path: pathlib.Path, digest: str, actual: str) -> None:
    if actual != digest:
        path.unlink(missing_ok=True)
        raise errors.ArtifactIntegrityError(
            f"cached artifact {digest[:12]} is corrupt (sha256 {actual[:12]}); removed"
        )


async def _reap(proc: asyncio.subprocess.Process, *, ended: bool) -> None:
    """Wait for the fetch child; kill it first unless its output ``ended``. A child that
    closed its output is exiting: killing it then made ``Popen.kill`` reap it before
    asyncio's child watcher could, which reported it as exit status 255 with a warning
    (about one download in three here)."""
    if ended and proc.returncode is None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(EXIT_GRACE_S):
                await proc.wait()
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    await proc.wait()


def _publish(partial: pathlib.Path, final: pathlib.Path, url: str, digest: str, actual: str) -> None:
    """Move a fully written artifact into the cache, only if its digest is the expected one."""
    if actual != digest:
        partial.unlink(missing_ok=True)
        raise errors.ArtifactIntegrityError(f"artifact {url} has sha256 {actual}, expected {digest}: refused")
    os.replace(partial, final)

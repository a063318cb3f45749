"""A data-centre node's artifact cache: which versions its replicas use, and removing the others.

Replicas download the ``http(s)://`` artifacts they serve into one folder per node
(:func:`orchestrator.serving.artifacts.cache_dir`, ``<sha256>.onnx`` each, a plain ONNX file
or a package's tar) and unpack every onnx package and generative package into another
(:func:`orchestrator.serving.artifacts.models_root`, ``<sha256>`` each, by
``edge_agent.packages``), gigabytes a version: kept for good, every version a node ever
served would fill its disk. A package's tar goes once unpacked (:func:`fetch`): the folder is
what the replicas load, and the tar beside it would double the version's room.

What is in use is what the replicas on the node hold: each holds a shared ``flock`` on
``.<sha256>.lock`` in the unpacked folder's root from before its download until it ends
(:func:`hold`); so does an application builder while it fetches the artifact to check it.
The kernel drops it with the process, a replica killed by ``kill -9`` or the OOM killer
included, so there is no list of replicas to go stale, and none to share between Ray's
worker processes.

A sweep (:func:`prune`) takes each version's lock exclusively, without waiting: a lock it
gets is held by no replica on the node, so that version is neither served nor being
downloaded or unpacked. Its unpacked folder is renamed aside while the lock is held (a
replica finds it whole or not at all, and unpacks it again), its download removed, its lock
file removed, and only then the folder deleted. A lock it does not get is left alone. A
temporary file or folder of a download or an unpack (``.<sha12>-...``, in either folder)
goes only when no lock of a version with that prefix is held: it was cut short. A download
an earlier release cut short (``tmp*.part`` in the downloads' folder, named after no version
and held by no lock) goes once it has not been written for :data:`EARLIER_PART_IDLE_S`: a
replica of such a release downloading on the node meanwhile writes it more often than that.

The replicas sweep, each when it has loaded its version and when Serve shuts it down
(``__del__``), and so does the application builder before its check (and after one that
refuses the artifact), rather than
a sweeper of the node: no other edgeplane process runs on a Ray
node (the control plane drives Serve over REST and sees no node's disk), a sweeper actor
per node would need placing, restarting and resources of its own, and the replicas start
and end exactly when a version comes to a node and leaves it. The lock makes any of them
right to sweep for all. A replica killed outright leaves its version until the next replica
on that node starts or ends.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import pathlib
import re
import shutil
import time
from collections.abc import Callable
from typing import TypeVar

from edge_agent import artifacts as edge_artifacts
from edge_agent import packages
from orchestrator.serving import artifacts

log = logging.getLogger(__name__)
T = TypeVar("T")

LOCK_SUFFIX = ".lock"
_DIGEST = re.compile(r"[0-9a-f]{64}")
#: A version's lock, unpacked folder or download
_VERSION = re.compile(rf"\.?([0-9a-f]{{64}})(?:{re.escape(LOCK_SUFFIX)}|{re.escape(artifacts.DOWNLOAD_SUFFIX)})?")
#: A download's or an unpack's temporary file or folder, named after its version's sha256
_TEMPORARY = re.compile(r"\.([0-9a-f]{12})-.+")
#: A download an earlier release cut short: ``tmp*.part`` (``tempfile``'s name), no version in it, no lock
_EARLIER_PART = re.compile(r"tmp[a-z0-9_]{8}\.part")
#: How long a ``tmp*.part`` must have gone unwritten to be one cut short: twice the 300 s read
#: timeout of those releases' downloads, which wrote at least that often or failed and removed it
EARLIER_PART_IDLE_S = 600.0
#: How often :func:`hold` opens a lock file again that a sweep removed meanwhile
HOLD_ATTEMPTS = 8


class Hold:
    """A replica's hold of its version: kept until :meth:`release` (or the end of a ``with``
    block), or until its process ends."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def hold(sha256: str) -> Hold:
    """Hold ``sha256``'s version in use on this node, before it is downloaded or unpacked: no
    sweep removes its download or its folder, or their temporary ones, until it is released.
    Raises :class:`~orchestrator.serving.artifacts.ArtifactError` for a ``sha256`` that is no
    digest (a Serve config written by hand), before it names a file."""
    if not _DIGEST.fullmatch(sha256):
        raise artifacts.ArtifactError(f"sha256 {sha256!r} is not 64 lowercase hex digits")
    models_root = artifacts.models_root()
    models_root.mkdir(parents=True, exist_ok=True)
    path = _lock(models_root, sha256)
    for _ in range(HOLD_ATTEMPTS):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # a sweep holds it exclusively for one rename at most
            if _same_file(path, fd):
                return Hold(fd)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # removed by a sweep between the open and the lock: take the one there now
    raise OSError(errno.EAGAIN, f"the lock of version {sha256[:12]} in {models_root} keeps being removed")


def fetch(uri: str, sha256: str, redirect_hosts: tuple[str, ...], runtime: str) -> pathlib.Path:
    """A replica's version, which it holds (:func:`hold`): the folder its package is unpacked
    into, or (``runtime`` onnx) the plain ONNX file. A folder that a replica on the node
    unpacked whole is taken as it is, neither downloaded nor read again; otherwise the artifact
    is fetched and verified and a package unpacked, then its download removed: the folder is
    what this replica and the later ones load, and the tar beside it doubled the version's
    room on the disk while it was served. A ``file://`` artifact is never removed."""
    try:
        return _fetched(uri, sha256, redirect_hosts, runtime)
    except FileNotFoundError:  # another replica unpacked it and removed the download meanwhile: the folder is whole
        return _fetched(uri, sha256, redirect_hosts, runtime)


def loaded(uri: str, sha256: str, redirect_hosts: tuple[str, ...], runtime: str, load: Callable[[pathlib.Path], T]) -> T:
    """``load`` of what :func:`fetch` gives. When it fails on a folder taken as it was found
    (neither downloaded nor verified by this replica), whose files may have been damaged since
    its unpack (a removal cut short, a disk's fault), which its mark does not tell, that folder
    is removed, renamed aside at once as a sweep does (a replica finds it whole or not at all),
    so that the replica Serve starts next, after its backoff, downloads, verifies and unpacks
    it again; one failing right after its own unpack keeps the folder."""
    found = packages.unpacked(artifacts.models_root(), sha256, runtime)
    path = fetch(uri, sha256, redirect_hosts, runtime)
    try:
        return load(path)
    except Exception as exc:
        if found is None or path != found:
            raise
        try:
            packages.remove(artifacts.models_root(), sha256)
        except OSError as failed:  # a read-only disk: the load's own reason stays the replica's
            log.warning("version %s: its unpacked folder %s failed to load, and cannot be removed: %s",
                        sha256[:12], path, failed.strerror or failed)
            exc.add_note(f"its unpacked folder {path} could not be removed ({failed.strerror or failed}): "
                         "the next replica tries again")
            raise exc from None
        log.warning("version %s: its unpacked folder %s failed to load, removed to be downloaded again: %s",
                    sha256[:12], path, exc)
        exc.add_note(f"its unpacked folder {path} was removed: the package is downloaded, verified and unpacked "
                     "again by the next replica")
        raise


def _fetched(uri: str, sha256: str, redirect_hosts: tuple[str, ...], runtime: str) -> pathlib.Path:
    models_root = artifacts.models_root()
    if (folder := packages.unpacked(models_root, sha256, runtime)) is None:
        path = artifacts.fetch_verified(uri, sha256, redirect_hosts=redirect_hosts)
        if runtime == packages.ONNX and not edge_artifacts.is_package(path):
            return path
        folder = packages.unpack(path, sha256, models_root, runtime=runtime)
    _drop_download(sha256)  # also one a replica killed before it removed its own left beside the folder
    return folder


def _drop_download(sha256: str) -> None:
    """Remove ``sha256``'s download, its package unpacked (a ``file://`` artifact is read
    where it is, never from the downloads' folder)."""
    (artifacts.cache_dir() / f"{sha256}{artifacts.DOWNLOAD_SUFFIX}").unlink(missing_ok=True)


def check(uri: str, sha256: str, redirect_hosts: tuple[str, ...], runtime: str) -> None:
    """An application builder's fetch of the artifact, to fail the deploy now rather than
    after the replicas' retries: its download, or this node's replica of it (a download, or
    a package's folder a replica unpacked, taken as checked), held from a sweep meanwhile,
    which it makes first. Checked, it is let go and kept for the replicas that start on the
    node next (on a one-node cluster, all of them), which would otherwise download it again:
    a node that only builds keeps the version it checked last, until the next sweep there.
    Refused, it is let go and its lock file removed."""
    held = hold(sha256)
    try:
        prune()
        if packages.unpacked(artifacts.models_root(), sha256, runtime) is None:
            artifacts.fetch_verified(uri, sha256, redirect_hosts=redirect_hosts)
            if packages.unpacked(artifacts.models_root(), sha256, runtime) is not None:
                _drop_download(sha256)  # a replica unpacked it meanwhile
    except BaseException:
        let_go(held)
        raise
    held.release()


def let_go(held: Hold | None) -> None:
    """A replica's shutdown (Serve's, or the collector's later: called again, it does
    nothing): its version let go, then removed unless another replica on the node holds it."""
    if held is not None:
        held.release()
        prune()


def prune() -> list[str]:
    """Remove the versions (downloads and unpacked folders) that no replica on this node
    holds, and temporary files and folders of downloads and unpacks cut short (an earlier
    release's ``tmp*.part`` too, once unwritten for :data:`EARLIER_PART_IDLE_S`); the sha256
    prefixes of the versions removed. Never raises for a file system error: what it cannot
    remove is logged and left to the next sweep."""
    models_root, downloads = artifacts.models_root(), artifacts.cache_dir()
    listed = {folder: _names(folder) for folder in (models_root, downloads)}
    versions = sorted({m.group(1) for names in listed.values() for name in names if (m := _VERSION.fullmatch(name))})
    removed = []
    for sha256 in versions:
        try:
            if _remove_unheld(models_root, downloads, sha256):
                removed.append(sha256[:12])
        except OSError as exc:
            log.warning("cannot remove version %s from %s: %s", sha256[:12], models_root.parent, exc.strerror or exc)
    for folder, names in listed.items():
        for name in names:
            if (m := _TEMPORARY.fullmatch(name)) is not None and not _prefix_held(models_root, m.group(1)):
                _remove_temporary(folder / name)
    for name in listed[downloads]:
        if _EARLIER_PART.fullmatch(name) and _idle(downloads / name, time.time()) > EARLIER_PART_IDLE_S:
            _remove_temporary(downloads / name)
    if removed:
        log.info("removed %d version(s) no replica on this node uses: %s", len(removed), ", ".join(removed))
    return removed


def _names(folder: pathlib.Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("cannot list %s: %s", folder, exc.strerror or exc)
        return []


def _remove_unheld(models_root: pathlib.Path, downloads: pathlib.Path, sha256: str) -> bool:
    """Remove ``sha256``'s folder, download and lock file if no replica holds it; whether a
    folder or a download went."""
    models_root.mkdir(parents=True, exist_ok=True)  # a node whose replicas only downloaded, before locks
    path = _lock(models_root, sha256)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    aside, downloaded = None, downloads / f"{sha256}{artifacts.DOWNLOAD_SUFFIX}"
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # served, or being downloaded or unpacked
        if not _same_file(path, fd):
            return False  # another sweep removed it meanwhile
        aside = models_root / f".{sha256[:12]}-pruned-{os.getpid()}"
        try:
            os.rename(models_root / sha256, aside)
        except FileNotFoundError:
            aside = None  # a plain ONNX file, or a lock whose replica never unpacked (its download failed)
        try:
            downloaded.unlink()
        except FileNotFoundError:
            downloaded = None  # a file:// artifact, read where it is
        path.unlink()  # while held: a replica waiting for it opens the next one
    finally:
        os.close(fd)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return aside is not None or downloaded is not None


def _idle(path: pathlib.Path, now: float) -> float:
    """How long ago ``path`` was last written (0: gone, or unreadable: kept)."""
    try:
        return now - path.stat().st_mtime
    except OSError:
        return 0.0


def _remove_temporary(path: pathlib.Path) -> None:
    """An unpack's temporary folder, or a download's temporary file, cut short."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc.strerror or exc)


def _prefix_held(models_root: pathlib.Path, prefix: str) -> bool:
    """Whether a replica holds a version whose sha256 starts with ``prefix``: a temporary
    file or folder so named may be its download's or its unpack's, under way."""
    for lock in models_root.glob(f".{prefix}*{LOCK_SUFFIX}"):
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        except OSError:
            return True  # cannot tell: kept
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
    return False


def _lock(models_root: pathlib.Path, sha256: str) -> pathlib.Path:
    return models_root / f".{sha256}{LOCK_SUFFIX}"


def _same_file(path: pathlib.Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False

"""Unpacked packages on a data-centre node: which its replicas use, and removing the others.

Replicas unpack every onnx package and generative package they serve into one folder per
node (:func:`orchestrator.serving.artifacts.models_root`, ``<sha256>`` each, by
``edge_agent.packages``), gigabytes a version: kept for good, every version a node ever
served would fill its disk.

What is in use is what the replicas on the node hold: each holds a shared ``flock`` on
``.<sha256>.lock`` beside its version's folder from before its unpack until it ends. The
kernel drops it with the process, a replica killed by ``kill -9`` or the OOM killer
included, so there is no list of replicas to go stale, and none to share between Ray's
worker processes.

A sweep (:func:`prune`) takes each version's lock exclusively, without waiting: a lock it
gets is held by no replica on the node, so that version is neither served nor being
unpacked. Its folder is renamed aside while the lock is held (a replica finds it whole or
not at all, and unpacks it again), its lock file removed, and only then the folder deleted.
A lock it does not get is left alone. A temporary folder of an unpack (``.<sha12>-...``)
goes only when no lock of a version with that prefix is held: its unpack was cut short.

The replicas sweep, each when it has loaded its version and when Serve shuts it down
(``__del__``), rather than a sweeper of the node: no other edgeplane process runs on a Ray
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

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
_VERSION = re.compile(r"[0-9a-f]{64}")
#: How often :func:`hold` opens a lock file again that a sweep removed meanwhile
HOLD_ATTEMPTS = 8


class Hold:
    """A replica's hold of its version: kept until :meth:`release`, or its process ends."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def hold(models_root: pathlib.Path, sha256: str) -> Hold:
    """Hold ``sha256``'s version in use on this node, before it is unpacked: no sweep removes
    its folder, or its unpack's temporary folder, until the hold is released."""
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


def prune(models_root: pathlib.Path) -> list[str]:
    """Remove the unpacked versions that no replica on this node holds, and temporary folders
    of unpacks cut short; the sha256 prefixes of the versions removed. Never raises for a
    file system error: the sweep is logged and left to the next one."""
    try:
        names = os.listdir(models_root)
    except FileNotFoundError:
        return []
    versions = sorted({name.removeprefix(".").removesuffix(LOCK_SUFFIX) for name in names
                       if _VERSION.fullmatch(name.removeprefix(".").removesuffix(LOCK_SUFFIX))})
    removed = []
    for sha256 in versions:
        try:
            if _remove_unheld(models_root, sha256):
                removed.append(sha256[:12])
        except OSError as exc:
            log.warning("cannot remove unpacked version %s from %s: %s", sha256[:12], models_root, exc.strerror or exc)
    for name in names:
        if name.startswith(".") and not name.endswith(LOCK_SUFFIX) and not _prefix_held(models_root, name[1:13]):
            shutil.rmtree(models_root / name, ignore_errors=True)
    if removed:
        log.info("removed %d unpacked version(s) no replica on this node uses: %s", len(removed), ", ".join(removed))
    return removed


def _remove_unheld(models_root: pathlib.Path, sha256: str) -> bool:
    """Remove ``sha256``'s folder and lock file if no replica holds it; whether a folder went."""
    path = _lock(models_root, sha256)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    aside = None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # served, or being unpacked
        if not _same_file(path, fd):
            return False  # another sweep removed it meanwhile
        aside = models_root / f".{sha256[:12]}-pruned-{os.getpid()}"
        try:
            os.rename(models_root / sha256, aside)
        except FileNotFoundError:
            aside = None  # a lock whose replica never unpacked (its download failed)
        path.unlink()  # while held: a replica waiting for it opens the next one
    finally:
        os.close(fd)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return aside is not None


def _prefix_held(models_root: pathlib.Path, prefix: str) -> bool:
    """Whether a replica holds a version whose sha256 starts with ``prefix``: a temporary
    folder so named may be its unpack's, under way."""
    for lock in models_root.glob(f".{prefix}*{LOCK_SUFFIX}"):
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
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

"""Download one artifact into its ``.partial`` file, in a process of its own.

    python -m edge_agent.fetch URL PARTIAL --timeout S --max-bytes N [--redirect-host HOST]...
                               [--speed-limit BYTES --speed-time S]
                               [--unpack-into DIR [--only-if-tar]] [--parent-pid PID]

(``file://`` URLs too, copied from the start: the agent only passes them on with
``--allow-file-artifacts``.)

A redirect is followed only to URL's own host or to a ``--redirect-host`` (the control
plane's ``--artifact-host`` list, sent with the assignment; none given: any host), at most
``MAX_REDIRECTS`` times: the URL the control plane checked is only where a download starts.

:class:`edge_agent.artifacts.ArtifactCache` runs this as a child process for every
http(s) download. ``http.client`` and the ``email`` package it parses headers with cost
an agent about 1 MB for the rest of its life, for a job it does once per model version;
here they go away with the child. A child is also the one thing that can be stopped at
any point: a fetch cancelled in the middle of a DNS lookup or a stalled read is killed,
not waited for.

A child must not outlive the agent: one orphaned by a ``kill -9`` or the OOM killer would
go on writing ``PARTIAL`` under the agent started in its place. Given ``--parent-pid``, it
asks Linux to kill it when that parent dies (``PR_SET_PDEATHSIG``), and exits at once if
the parent died before it asked. ``PARTIAL`` is also held under ``flock`` while it is read
and written, so that a second writer, wherever it comes from, is refused (``unavailable``)
rather than interleaved with the first.

A download resumes with an HTTP ``Range`` request from what ``PARTIAL`` already holds. The
answer's announced size is checked against the limit and the free space before ``PARTIAL``
is re-read to hash what came before (a large one with the request closed meanwhile, and
made again after). The child reports on stdout, one JSON object a line, and exits 0 when
it finished:

``{"verifying": N, "total": T}``       re-reading the T bytes ``PARTIAL`` held, before resuming
                                       (at most once a second: a slow disk is not a stall)
``{"resumed": N}``                     the server resumed at byte N
``{"progress": N, "total": T}``        at most once a second (T is null when unknown)
``{"done": N, "sha256": HEX}``         the last line of a finished download
``{"error": KIND, "message": TEXT}``   the last line of a failed one (exit 1); KIND is
                                       ``unavailable`` (worth retrying: a cut connection,
                                       a socket timeout), ``slow`` (bytes at under
                                       ``--speed-limit`` a second over ``--speed-time``:
                                       worth retrying too), ``integrity``, or
                                       ``disk`` (``PARTIAL`` cannot be written, or the size
                                       announced, twice for a package to unpack (with
                                       ``--only-if-tar``: one whose first bytes, read
                                       before any is written, are a tar's), is more than
                                       the disk has free, less a reserve of 1 % of it, 64 MB
                                       to 1 GB)

The caller compares the digest, moves the file into the cache, and logs.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import http.client
import json
import math
import os
import pathlib
import signal
import ssl
import sys
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import BinaryIO

from edge_agent import diskspace, pace, tarhead
from edgeplane_proto import artifact_hosts

CHUNK = 1 << 20
MAX_REDIRECTS = artifact_hosts.MAX_REDIRECTS
PROGRESS_EVERY_S = 1.0
# A partial file of up to this many bytes (about a second off an SD card) is re-read with
# the request that resumes it open; a larger one is re-read first and the request made again.
REREAD_WITH_REQUEST_OPEN = 16 << 20
_PR_SET_PDEATHSIG = 1
_REDIRECTS = (301, 302, 303, 307, 308)


class Failed(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def download(url: str, partial: pathlib.Path, *, timeout: float, max_bytes: int,
             redirect_hosts: tuple[str, ...] = (), unpack_into: pathlib.Path | None = None,
             only_if_tar: bool = False, floor: tuple[float, float] = (0, 0)) -> tuple[int, str]:
    """Fetch ``url`` into ``partial`` (resuming over HTTP), fsync it; return its size and
    sha256. ``file://`` URLs are copied from the start (the caller decides whether they
    are allowed). A redirect goes only to ``url``'s host or one of ``redirect_hosts``
    (empty: any). ``unpack_into``: the folder a package unpacks into, where it needs room
    for its own size again (a tar, uncompressed: its members hold less); ``only_if_tar``:
    an onnx artifact, a package only when its first bytes are a tar's. ``floor``: (bytes a
    second, seconds) under which the download is too slow and fails (:class:`pace.Floor`)."""
    fh = _claim(partial)
    try:
        return _download_into(fh, partial, url, timeout, max_bytes, redirect_hosts, unpack_into, only_if_tar, floor)
    except BaseException:
        if os.fstat(fh.fileno()).st_size == 0:  # an attempt that wrote nothing leaves nothing to resume
            partial.unlink(missing_ok=True)
        raise
    finally:
        fh.close()  # (the lock goes with it)


def _download_into(fh: BinaryIO, partial: pathlib.Path, url: str, timeout: float, max_bytes: int,
                   redirect_hosts: tuple[str, ...], unpack_into: pathlib.Path | None,
                   only_if_tar: bool, floor: tuple[float, float]) -> tuple[int, str]:
    hasher = hashlib.sha256()
    held, verify_due = os.fstat(fh.fileno()).st_size, _every(PROGRESS_EVERY_S)

    def verifying(n: int) -> None:
        if verify_due():
            _emit(verifying=n, total=held)

    # Asked first, from what the partial file's size says: whether the rest is refused (too
    # large, no room), which must not wait for a re-read of what came before (minutes for a
    # few GB off an SD card, at every retry).
    source = _open(url, held, timeout, redirect_hosts)
    have = held
    ahead = b""  # bytes read from ``source`` to tell a tar, not written yet
    try:
        _refuse_unless_it_fits(source, partial, url, max_bytes, held, None if only_if_tar else unpack_into)
        if unpack_into is not None and only_if_tar:  # a package, or a plain ONNX file loaded as it is
            head, ahead = _head(fh, held, source, url)
            unpack_into = unpack_into if tarhead.is_tar(head) else None
            _refuse_unless_it_fits(source, partial, url, max_bytes, held, unpack_into)
        if held and source.start != 0:  # resumed, or nothing left: the hash covers what came before
            # The agent must not take a long re-read for a stall (it kills a child silent for
            # its socket timeout + 10 s): it is told how far the re-read got.
            large = held > REREAD_WITH_REQUEST_OPEN  # minutes, maybe: a server would not wait that long for the request to read on
            if large:
                source.close()
            have = hash_into(fh, hasher, verifying)
            if large and source.start is not None:
                source = _open(url, have, timeout, redirect_hosts)
                _refuse_unless_it_fits(source, partial, url, max_bytes, have, unpack_into)
        if source.start is None:
            return have, hasher.hexdigest()  # nothing left to fetch (or bogus): the hash decides
        if source.start:
            _emit(resumed=have)
        else:
            have = 0  # the server ignored Range, there was nothing to resume, or a local copy
            hasher = hashlib.sha256()
            fh.truncate(0)  # not unlinked: the lock is on this file
        progress_due = _every(PROGRESS_EVERY_S)
        slow = pace.Floor(*floor, now=time.monotonic(), have=have)
        while True:
            chunk, ahead = (ahead, b"") if ahead else (_read(source, url), b"")
            if not chunk:
                break
            have += len(chunk)
            if have > max_bytes:  # nothing of it is worth resuming
                partial.unlink(missing_ok=True)
                raise Failed("integrity", f"artifact at {url} is {_over(max_bytes)}")
            hasher.update(chunk)
            _write_all(fh, chunk)
            if progress_due():
                _emit(progress=have, total=source.total)
            if slow.too_slow(now := time.monotonic(), have):  # written first: resumed past
                raise Failed("slow", f"download of {url} too slow: {have - slow.had} bytes in the last "
                             f"{now - slow.since:.0f} s, under the speed limit of {slow.rate:g} bytes/s")
        fh.flush()
        os.fsync(fh.fileno())
    finally:
        source.close()
    if (stored := os.fstat(fh.fileno()).st_size) != have:  # what is hashed is what is published
        raise OSError(errno.EIO, f"{partial} holds {stored} of the {have} bytes received")
    if source.total is not None and have < source.total:
        # http.client's read1 returns b"" when the peer closes early, Content-Length or not:
        # a dropped connection, whose bytes are kept for the next attempt's Range request
        raise Failed("unavailable", f"download of {url} failed: the connection closed after {have} of {source.total} bytes")
    return have, hasher.hexdigest()


def _read(source: _Source, url: str, size: int = CHUNK) -> bytes:
    try:
        return source.read(size)
    except (OSError, http.client.HTTPException) as exc:
        raise Failed("unavailable", f"download of {url} failed: {exc}") from exc


def _head(fh: BinaryIO, held: int, source: _Source, url: str) -> tuple[bytes, bytes]:
    """The artifact's first bytes, as many as :func:`tarhead.is_tar` needs (or all there
    are), and those of them read from ``source``, which the download writes first: from
    ``fh`` where ``source`` resumes after them, else read ahead from ``source``."""
    kept = os.pread(fh.fileno(), min(held, tarhead.HEAD_BYTES), 0) if source.start != 0 else b""
    ahead = b""
    while source.start is not None and len(kept) + len(ahead) < tarhead.HEAD_BYTES:
        chunk = _read(source, url, tarhead.HEAD_BYTES - len(kept) - len(ahead))
        if not chunk:
            break
        ahead += chunk
    return kept + ahead, ahead


@dataclass
class _Source:
    read: Callable[[int], bytes]  # up to n bytes as they come (one socket read), b"" at the end
    start: int | None  # the byte it begins at: 0, or what ``partial`` holds (resumed); None: nothing left
    total: int | None  # the artifact's size, when known
    close: Callable[[], None]


def _open(url: str, have: int, timeout: float, redirect_hosts: tuple[str, ...]) -> _Source:
    if urllib.parse.urlsplit(url).scheme == "file":
        path = pathlib.Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
        try:
            fh = path.open("rb")
        except OSError as exc:
            raise Failed("unavailable", f"cannot read {url}: {exc}") from exc
        return _Source(fh.read1, 0, os.fstat(fh.fileno()).st_size, fh.close)
    # Identity encoding: the hash covers the bytes as stored, and Range counts them.
    headers = {"Accept-Encoding": "identity", "User-Agent": "edgeplane-agent"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        conn, response = _get(url, headers, timeout, redirect_hosts)
    except (OSError, http.client.HTTPException) as exc:
        raise Failed("unavailable", f"download of {url} failed: {exc}") from exc
    if response.status == 416 and have:
        return _Source(response.read1, None, have, conn.close)
    if response.status == 206 and have:
        return _Source(response.read1, have, _total_size(response.headers, have), conn.close)
    if response.status == 200:
        return _Source(response.read1, 0, _total_size(response.headers, 0), conn.close)
    conn.close()
    raise Failed("unavailable", f"GET {url} answered HTTP {response.status}")


def _refuse_unless_it_fits(source: _Source, partial: pathlib.Path, url: str, max_bytes: int, held: int,
                           unpack_into: pathlib.Path | None) -> None:
    """Refuse ``source`` before a byte of it is read when the size it announces is over the
    limit (the partial file goes: nothing of it is worth resuming) or cannot fit on the disk
    (the partial file, ``held`` bytes, stays for when space is freed)."""
    if source.total is None:
        return
    if source.total > max_bytes:
        partial.unlink(missing_ok=True)
        raise Failed("integrity", f"artifact at {url} is {source.total} bytes, {_over(max_bytes)}")
    if source.start is not None:
        _refuse_unless_room(partial, url, source.total - source.start, 0 if source.start else held,
                            (unpack_into, source.total) if unpack_into is not None else None)


def _refuse_unless_room(partial: pathlib.Path, url: str, needed: int, freed: int,
                        unpack: tuple[pathlib.Path, int] | None) -> None:
    """Refuse a download that cannot fit, with a reserve to spare (:mod:`edge_agent.diskspace`),
    before a byte of it is written (``freed``: what starting again from byte 0 gives back).
    ``unpack``: a package's folder and the size it unpacks to, counted too (on the same disk,
    added to the download's): a package that downloads, then fails half-unpacked on a full
    disk, would do so again at every retry."""
    download = diskspace.room(partial.parent)
    needs = [(download, needed, freed)]
    if unpack is not None:
        folder, unpacked = unpack
        there = diskspace.room(folder)
        if download is not None and there is not None and there.device == download.device:
            needs = [(download, needed + unpacked, freed)]
        else:
            needs.append((there, unpacked, 0))
    for disk, size, given_back in needs:
        if (why := diskspace.shortfall(disk, size, given_back)) is not None:
            what = " to download and unpack" if unpack is not None else ""
            raise Failed("disk", f"{url} needs {size / 1e6:.1f} MB more{what}, {why}")


def _write_all(fh: BinaryIO, chunk: bytes) -> None:
    """Write all of ``chunk``. A write that reaches a full disk or a file-size limit
    (``RLIMIT_FSIZE``, a quota) stores what fits and returns that count without raising;
    the next one raises (ENOSPC, EFBIG, EDQUOT), which is the error to report."""
    view = memoryview(chunk)
    while view:
        written = fh.write(view)
        if not written:  # (not from a regular file; not worth spinning on)
            raise OSError(errno.EIO, f"a write to {fh.name} stored nothing")
        view = view[written:]


def hash_into(fh: BinaryIO, hasher: hashlib._Hash, hashed: Callable[[int], object] = lambda n: None) -> int:
    """Hash all of ``fh`` from its start, telling ``hashed`` how far it got after each
    chunk; return its size."""
    fh.seek(0)
    size = 0
    for chunk in iter(lambda: fh.read(CHUNK), b""):
        hasher.update(chunk)
        size += len(chunk)
        hashed(size)
    return size


def _every(seconds: float) -> Callable[[], bool]:
    """A test that is true at its first call (a slow start shows it has started), then at
    most once every ``seconds``."""
    last = -math.inf

    def due() -> bool:
        nonlocal last
        now = time.monotonic()
        if now - last < seconds:
            return False
        last = now
        return True

    return due


def _claim(partial: pathlib.Path) -> BinaryIO:
    """``partial`` opened to append, created if need be, under an exclusive ``flock`` that
    the kernel drops with this process; :class:`Failed` when another process holds it."""
    for _ in range(3):
        fh = partial.open("a+b", buffering=0)  # unbuffered: each chunk is kept for a Range request as it is written
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise Failed("unavailable", f"{partial} is being written by another process "
                                        "(left running by an agent that stopped?): not touched") from None
        except BaseException:
            fh.close()
            raise
        with contextlib.suppress(FileNotFoundError):
            if os.stat(partial).st_ino == os.fstat(fh.fileno()).st_ino:
                return fh
        fh.close()  # its holder removed it between the open and the lock: take the one there now
    raise Failed("unavailable", f"{partial} keeps being replaced by another process")


def _get(url: str, headers: Mapping[str, str], timeout: float,
         redirect_hosts: tuple[str, ...]) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """GET ``url``, following up to ``MAX_REDIRECTS`` http(s) redirects to its own host or
    one of ``redirect_hosts``; the caller closes."""
    first = url
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise Failed("unavailable", f"artifact URL {url!r}: scheme must be http(s)")
        try:
            port = parts.port
        except ValueError:
            raise Failed("unavailable", f"artifact URL {url!r}: the port is not a number from 0 to 65535") from None
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(parts.hostname, port, timeout=timeout, context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(parts.hostname, port, timeout=timeout)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request("GET", target, headers=dict(headers))
            response = conn.getresponse()
        except BaseException:
            conn.close()
            raise
        location = response.getheader("location")
        if response.status in _REDIRECTS and location:
            conn.close()
            url = urllib.parse.urljoin(url, location)
            _check_redirect(first, url, redirect_hosts)
            continue
        return conn, response
    raise Failed("unavailable", f"download of {url} failed: more than {MAX_REDIRECTS} redirects")


def _check_redirect(first: str, target: str, redirect_hosts: tuple[str, ...]) -> None:
    host = urllib.parse.urlsplit(target).hostname
    if not host or artifact_hosts.allows_redirect(redirect_hosts, urllib.parse.urlsplit(first).hostname, host):
        return  # (one naming no host is refused as a URL that is not http(s))
    raise Failed("unavailable", f"download of {first} refused: it redirects to {target}, whose host {host!r} is not "
                                f"an allowed artifact host ({', '.join(redirect_hosts)}; edgeplane serve --artifact-host)")


def _total_size(headers: http.client.HTTPMessage, have: int) -> int | None:
    content_range = headers.get("content-range", "")
    if "/" in content_range:
        tail = content_range.rsplit("/", 1)[1]
        return int(tail) if tail.isascii() and tail.isdigit() else None
    length = headers.get("content-length")
    return have + int(length) if length and length.isascii() and length.isdigit() else None


def _over(max_bytes: int) -> str:
    return f"larger than the agent's limit of {max_bytes} bytes (--max-artifact-gb): refused"


def _emit(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def die_with(parent: int) -> None:
    """Be killed when ``parent`` dies (Linux), and exit now if it already has: a parent
    that died before the request was made has nothing left to send the signal."""
    if sys.platform.startswith("linux"):
        # the signal comes when the thread that started this process ends: the agent's
        # event loop runs in its main thread, so that is when the agent does
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # said, for a parent that is there all the same (started through another process)
        _emit(error="unavailable", message=f"the download's agent (pid {parent}) is no longer its parent: not started")
        sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_agent.fetch", description=__doc__.split("\n")[0])
    parser.add_argument("url")
    parser.add_argument("partial", type=pathlib.Path)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--max-bytes", type=int, required=True)
    parser.add_argument("--speed-limit", type=float, default=0.0, metavar="BYTES",
                        help="fail when fewer than BYTES a second came over --speed-time seconds (0: never)")
    parser.add_argument("--speed-time", type=float, default=60.0, metavar="S")
    parser.add_argument("--redirect-host", action="append", default=[], metavar="HOST",
                        help="a host a redirect may go to, besides the URL's (exact, or .domain); none: any")
    parser.add_argument("--unpack-into", type=pathlib.Path, metavar="DIR",
                        help="a package, unpacked into DIR after: room for its size there too")
    parser.add_argument("--only-if-tar", action="store_true",
                        help="with --unpack-into: an onnx artifact, a package only when its first bytes are a tar's")
    parser.add_argument("--parent-pid", type=int, metavar="PID",
                        help="the agent that runs this: its death kills this process (Linux)")
    args = parser.parse_args(argv)
    if args.parent_pid is not None:
        die_with(args.parent_pid)
    try:
        size, digest = download(args.url, args.partial, timeout=args.timeout, max_bytes=args.max_bytes,
                                redirect_hosts=tuple(args.redirect_host), unpack_into=args.unpack_into,
                                only_if_tar=args.only_if_tar, floor=(args.speed_limit, args.speed_time))
    except Failed as exc:
        _emit(error=exc.kind, message=str(exc))
        return 1
    except OSError as exc:  # the partial file itself: a full or read-only disk
        _emit(error="disk", message=exc.strerror or str(exc))
        return 1
    _emit(done=size, sha256=digest)
    return 0


if __name__ == "__main__":
    sys.exit(main())

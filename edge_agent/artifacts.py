"""Content-addressed artifact cache: download, resume, verify, and only then hand over.

Edge uplinks are slow and flaky, so a download resumes with an HTTP ``Range`` request from
what ``<hex>.partial`` already holds. A file reaches its final name
``<root>/sha256/<hex>`` only after its sha256 matched, and :meth:`ArtifactCache.read`
hashes the bytes it returns once more, so what onnxruntime loads is exactly what was
verified (a file corrupted on disk later is refused, not served).

Downloads are one streamed GET each, made with the standard library's ``http.client`` in
a worker thread: an HTTP client library would add 10 MB to an agent whose whole budget is
80 MB, for a request this simple. The thread checks a stop flag between chunks, so a
cancelled fetch ends before anything else may touch its ``.partial`` file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import logging
import os
import pathlib
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping

from edge_agent import errors

log = logging.getLogger(__name__)

_HEX = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20
MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)


class _Stopped(Exception):
    """The fetch that started this download was cancelled."""


def check_sha256(sha256: str) -> str:
    value = sha256.lower()
    if not _HEX.match(value):
        raise errors.ArtifactIntegrityError(f"sha256 {sha256!r} is not 64 hex digits")
    return value


class ArtifactCache:
    """Artifacts by sha256 under ``root``."""

    def __init__(
        self,
        root: pathlib.Path,
        *,
        allow_file_urls: bool = False,
        max_bytes: int = 8 << 30,
        timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = root / "sha256"
        self.root.mkdir(parents=True, exist_ok=True)
        self._allow_file = allow_file_urls
        self._max_bytes = max_bytes
        self._timeout = timeout
        self._clock = clock
        self._locks: dict[str, asyncio.Lock] = {}

    async def fetch(self, url: str, sha256: str) -> pathlib.Path:
        """Return the verified file for ``sha256``, downloading it from ``url`` if needed."""
        digest = check_sha256(sha256)
        lock = self._locks.setdefault(digest, asyncio.Lock())
        async with lock:
            final = self.root / digest
            if final.is_file():
                return final
            scheme = urllib.parse.urlsplit(url).scheme
            if scheme in ("http", "https") or (scheme == "file" and self._allow_file):
                try:
                    work = self._copy_file if scheme == "file" else self._download
                    await _in_thread(work, url, digest, final)
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

    async def read(self, sha256: str) -> bytes:
        """The cached artifact's bytes, re-verified; raises if missing or corrupt."""
        return await asyncio.to_thread(self._read_verified, check_sha256(sha256))

    def _read_verified(self, digest: str) -> bytes:
        path = self.root / digest
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise errors.ArtifactUnavailable(f"artifact {digest[:12]} is not cached: {exc}") from exc
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            path.unlink(missing_ok=True)
            raise errors.ArtifactIntegrityError(
                f"cached artifact {digest[:12]} is corrupt (sha256 {actual[:12]}); removed"
            )
        return data

    def _download(self, url: str, digest: str, final: pathlib.Path, stop: threading.Event) -> None:
        partial = final.with_name(digest + ".partial")
        hasher = hashlib.sha256()
        have = _hash_into(partial, hasher) if partial.exists() else 0
        # Identity encoding: the hash covers the bytes as stored, and Range counts them.
        headers = {"Accept-Encoding": "identity", "User-Agent": "edgeplane-agent"}
        if have:
            headers["Range"] = f"bytes={have}-"
        started = last_log = self._clock()
        try:
            conn, response = _get(url, headers, self._timeout)
        except (OSError, http.client.HTTPException) as exc:
            raise errors.ArtifactUnavailable(f"download of {url} failed: {exc}") from exc
        try:
            if response.status == 416 and have:
                pass  # the partial file is already complete (or bogus): let the hash decide
            elif response.status == 206 and have:
                log.info("resuming %s at %d bytes", url, have)
            elif response.status == 200:
                if have:
                    log.info("server ignored Range for %s; downloading from the start", url)
                have = 0
                hasher = hashlib.sha256()
                partial.unlink(missing_ok=True)
            else:
                raise errors.ArtifactUnavailable(f"GET {url} answered HTTP {response.status}")
            total = _total_size(response.headers, have)
            with partial.open("ab") as fh:
                while response.status != 416:
                    if stop.is_set():
                        raise _Stopped
                    try:
                        chunk = response.read(CHUNK)
                    except (OSError, http.client.HTTPException) as exc:
                        raise errors.ArtifactUnavailable(f"download of {url} failed: {exc}") from exc
                    if not chunk:
                        break
                    have += len(chunk)
                    if have > self._max_bytes:  # nothing of it is worth resuming
                        partial.unlink(missing_ok=True)
                        raise errors.ArtifactIntegrityError(f"artifact at {url} is larger than {self._max_bytes} bytes")
                    hasher.update(chunk)
                    fh.write(chunk)
                    now = self._clock()
                    if now - last_log >= 5.0:
                        last_log = now
                        log.info("downloading %s: %s", url, _progress(have, total))
                fh.flush()
                os.fsync(fh.fileno())
        finally:
            conn.close()
        _publish(partial, final, url, digest, hasher.hexdigest())
        log.info("downloaded %s (%d bytes, sha256 verified) in %.1fs", url, have, self._clock() - started)

    def _copy_file(self, url: str, digest: str, final: pathlib.Path, stop: threading.Event) -> None:
        source = pathlib.Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
        partial = final.with_name(digest + ".partial")
        hasher = hashlib.sha256()
        size = 0
        try:
            with source.open("rb") as src, partial.open("wb") as dst:
                for chunk in iter(lambda: src.read(CHUNK), b""):
                    if stop.is_set():
                        raise _Stopped
                    size += len(chunk)
                    if size > self._max_bytes:
                        raise errors.ArtifactIntegrityError(
                            f"artifact {url} is larger than {self._max_bytes} bytes"
                        )
                    hasher.update(chunk)
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise errors.ArtifactUnavailable(f"cannot read {url}: {exc}") from exc
        except BaseException:  # too large, or stopped: a local copy is not resumed
            partial.unlink(missing_ok=True)
            raise
        _publish(partial, final, url, digest, hasher.hexdigest())


async def _in_thread(work: Callable[[str, str, pathlib.Path, threading.Event], None], url: str, digest: str, final: pathlib.Path) -> None:
    """Run a blocking fetch in a worker thread. Cancelled, it asks the thread to stop at
    its next chunk and waits for that, so the caller's lock is held until nobody writes
    the ``.partial`` file any more."""
    stop = threading.Event()
    job = asyncio.get_running_loop().run_in_executor(None, work, url, digest, final, stop)
    try:
        await asyncio.shield(job)
    except asyncio.CancelledError:
        stop.set()
        with contextlib.suppress(Exception):
            await job
        raise


def _publish(partial: pathlib.Path, final: pathlib.Path, url: str, digest: str, actual: str) -> None:
    """Move a fully written artifact into the cache, only if its digest is the expected one."""
    if actual != digest:
        partial.unlink(missing_ok=True)
        raise errors.ArtifactIntegrityError(f"artifact {url} has sha256 {actual}, expected {digest}: refused")
    os.replace(partial, final)


def _hash_into(path: pathlib.Path, hasher: hashlib._Hash) -> int:
    size = 0
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            hasher.update(chunk)
            size += len(chunk)
    return size


def _get(url: str, headers: Mapping[str, str], timeout: float) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """GET ``url``, following up to ``MAX_REDIRECTS`` http(s) redirects; the caller closes."""
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise errors.ArtifactUnavailable(f"artifact URL {url!r}: scheme must be http(s)")
        try:
            port = parts.port
        except ValueError:
            raise errors.ArtifactUnavailable(f"artifact URL {url!r}: the port is not a number from 0 to 65535") from None
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
            continue
        return conn, response
    raise errors.ArtifactUnavailable(f"download of {url} failed: more than {MAX_REDIRECTS} redirects")


def _total_size(headers: http.client.HTTPMessage, have: int) -> int | None:
    content_range = headers.get("content-range", "")
    if "/" in content_range:
        tail = content_range.rsplit("/", 1)[1]
        return int(tail) if tail.isdigit() else None
    length = headers.get("content-length")
    return have + int(length) if length and length.isdigit() else None


def _progress(have: int, total: int | None) -> str:
    if total:
        return f"{have / total:.0%} of {total / 1e6:.1f} MB"
    return f"{have / 1e6:.1f} MB"

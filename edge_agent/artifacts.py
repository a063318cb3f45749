"""Content-addressed artifact cache: download, resume, verify, and only then hand over.

Edge uplinks are slow and flaky, so a download resumes with an HTTP ``Range`` request from
what ``<hex>.partial`` already holds. A file reaches its final name
``<root>/sha256/<hex>`` only after its sha256 matched, and :meth:`ArtifactCache.read`
hashes the bytes it returns once more, so what onnxruntime loads is exactly what was
verified (a file corrupted on disk later is refused, not served).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import pathlib
import re
import time
import urllib.parse
from collections.abc import Callable

import httpx

from edge_agent import errors

log = logging.getLogger(__name__)

_HEX = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20


def check_sha256(sha256: str) -> str:
    value = sha256.lower()
    if not _HEX.match(value):
        raise errors.ArtifactIntegrityError(f"sha256 {sha256!r} is not 64 hex digits")
    return value


class ArtifactCache:
    """Artifacts by sha256 under ``root``; ``client`` is the injected HTTP transport."""

    def __init__(
        self,
        root: pathlib.Path,
        client: httpx.AsyncClient,
        *,
        allow_file_urls: bool = False,
        max_bytes: int = 8 << 30,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = root / "sha256"
        self.root.mkdir(parents=True, exist_ok=True)
        self._client = client
        self._allow_file = allow_file_urls
        self._max_bytes = max_bytes
        self._clock = clock
        self._locks: dict[str, asyncio.Lock] = {}

    def path(self, sha256: str) -> pathlib.Path:
        return self.root / check_sha256(sha256)

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

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
                    if scheme == "file":
                        await asyncio.to_thread(self._copy_file, url, digest, final)
                    else:
                        await self._download(url, digest, final)
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

    async def _download(self, url: str, digest: str, final: pathlib.Path) -> None:
        partial = final.with_name(digest + ".partial")
        hasher = hashlib.sha256()
        have = 0
        if partial.exists():
            have = await asyncio.to_thread(_hash_into, partial, hasher)
        # Identity encoding: the hash covers the bytes as stored, and Range counts them.
        headers = {"Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        started = last_log = self._clock()
        try:
            async with self._client.stream("GET", url, headers=headers) as response:
                if response.status_code == 416 and have:
                    # The partial file is already complete (or bogus): let the hash decide.
                    pass
                elif response.status_code == 206 and have:
                    log.info("resuming %s at %d bytes", url, have)
                elif response.status_code == 200:
                    if have:
                        log.info("server ignored Range for %s; downloading from the start", url)
                    have = 0
                    hasher = hashlib.sha256()
                    partial.unlink(missing_ok=True)
                else:
                    raise errors.ArtifactUnavailable(
                        f"GET {url} answered HTTP {response.status_code}"
                    )
                total = _total_size(response, have)
                with partial.open("ab") as fh:
                    if response.status_code != 416:
                        async for chunk in response.aiter_raw(CHUNK):
                            have += len(chunk)
                            if have > self._max_bytes:
                                raise errors.ArtifactIntegrityError(
                                    f"artifact at {url} is larger than {self._max_bytes} bytes"
                                )
                            hasher.update(chunk)
                            fh.write(chunk)
                            now = self._clock()
                            if now - last_log >= 5.0:
                                last_log = now
                                log.info("downloading %s: %s", url, _progress(have, total))
                    fh.flush()
                    os.fsync(fh.fileno())
        except httpx.HTTPError as exc:
            raise errors.ArtifactUnavailable(f"download of {url} failed: {exc}") from exc
        _publish(partial, final, url, digest, hasher.hexdigest())
        log.info(
            "downloaded %s (%d bytes, sha256 verified) in %.1fs",
            url,
            have,
            self._clock() - started,
        )

    def _copy_file(self, url: str, digest: str, final: pathlib.Path) -> None:
        source = pathlib.Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
        partial = final.with_name(digest + ".partial")
        hasher = hashlib.sha256()
        size = 0
        try:
            with source.open("rb") as src, partial.open("wb") as dst:
                for chunk in iter(lambda: src.read(CHUNK), b""):
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
        _publish(partial, final, url, digest, hasher.hexdigest())


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


def _total_size(response: httpx.Response, have: int) -> int | None:
    content_range = response.headers.get("content-range", "")
    if "/" in content_range:
        tail = content_range.rsplit("/", 1)[1]
        return int(tail) if tail.isdigit() else None
    length = response.headers.get("content-length")
    return have + int(length) if length and length.isdigit() else None


def _progress(have: int, total: int | None) -> str:
    if total:
        return f"{have / total:.0%} of {total / 1e6:.1f} MB"
    return f"{have / 1e6:.1f} MB"

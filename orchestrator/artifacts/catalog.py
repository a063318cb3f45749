"""Resolve a Model's artifact URI to what an agent or a Ray replica downloads.

Remote ``http(s)://`` URIs are passed through unchanged: the consumer downloads and
verifies them. Local ones (``file://`` or a path relative to an artifact root) are read
only from the configured roots — a manifest cannot make the control plane read an
arbitrary file — and are served by the control plane at ``/v1/artifacts/<sha256>``
after their digest has been checked.

A check holds for one file, not one path: the catalog remembers the identity of the file
it hashed (device, inode, size, modification time) for each (sha256, path), hashes it again
when that identity changes, and hands out for serving only an open file that still has it,
opened without following a link. So bytes rewritten, deleted or swapped for a link after
their check are never served under the digest, and the next pass reports them on the
Model; identical copies at two paths are each hashed once, not once per pass.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import stat
import threading
import urllib.parse
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import BinaryIO

from edgeplane_proto import artifact_hosts

CHUNK = 1 << 20

#: A link, a FIFO (which would block the open) or a device is never opened as an artifact.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


class ArtifactError(Exception):
    pass


class ArtifactChanged(ArtifactError):
    """The files checked for a digest have changed (or gone) since: none can be served under it."""


class CatalogClosed(Exception):
    """The catalog was closed (the control plane stops) while a file was hashed: the check ends
    unfinished. Not an :class:`ArtifactError`: nothing is wrong with the artifact."""


def sha256_stream(fh: BinaryIO, closed: threading.Event | None = None) -> str:
    """``closed``: set, the hash ends at the next chunk (:class:`CatalogClosed`)."""
    h = hashlib.sha256()
    for chunk in iter(lambda: fh.read(CHUNK), b""):
        if closed is not None and closed.is_set():
            raise CatalogClosed("the artifact catalog was closed while a file was hashed")
        h.update(chunk)
    return h.hexdigest()


def sha256_file(path: pathlib.Path) -> str:
    with path.open("rb") as fh:
        return sha256_stream(fh)


@dataclass(frozen=True)
class FileIdentity:
    """What tells a file from its replacement or its rewrite without reading it."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def open_regular(path: pathlib.Path) -> tuple[BinaryIO, FileIdentity]:
    """``path`` open for reading, and the identity of what was opened. Raises OSError
    (ELOOP when it is a symbolic link) or ArtifactError when it is not a regular file."""
    fd = os.open(path, _OPEN_FLAGS)
    fh = os.fdopen(fd, "rb")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        fh.close()
        raise ArtifactError(f"is not a regular file ({path})")
    return fh, FileIdentity.of(st)


@dataclass
class ArtifactCatalog:
    roots: tuple[pathlib.Path, ...]
    public_base: str = ""  # control plane URL as agents reach it, e.g. http://10.0.0.5:8080
    #: Hosts remote artifact URLs may name (exact, or ".example.com" for its subdomains);
    #: empty = any host. Applied before a URL is handed to an agent or a replica.
    allowed_hosts: tuple[str, ...] = ()
    #: sha256 -> path -> identity of the file whose digest was checked there. Registered from
    #: the reconciler's and the API's worker threads, read by the route on the event loop;
    #: versions nothing uses any more are dropped after each pass (:meth:`retain`).
    _checked: dict[str, dict[pathlib.Path, FileIdentity]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    #: Set by :meth:`close`. A hash in progress (of a large artifact, minutes of reading)
    #: ends at its next chunk: the control plane's stop is not to wait for it.
    _closed: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        # --public-url http://cp.example:8080/ (or .../edgeplane/): the artifacts' URLs join
        # it with a path of their own, and a route under "//v1/..." is none the server has
        self.public_base = self.public_base.rstrip("/")

    def close(self) -> None:
        """End the checks in progress, and refuse those to come, with :class:`CatalogClosed`."""
        self._closed.set()

    def local_path(self, uri: str) -> pathlib.Path | None:
        """The file behind a local URI, or None for remote URIs. Raises outside the roots."""
        try:
            return self._local_path(uri)
        except ValueError as exc:  # a NUL in a path, an unparsable host: this URI's error, not its caller's
            raise ArtifactError(f"{uri!r} is not a usable artifact URI: {exc}") from exc

    def _local_path(self, uri: str) -> pathlib.Path | None:
        if uri.startswith(("http://", "https://")):
            # parsed whatever the allowed hosts: one stored before apply refused it is this
            # variant's error, not handed to agents and replicas that cannot download it
            parts = urllib.parse.urlsplit(uri)
            host, _ = parts.hostname, parts.port  # ValueError: an unparsable host or port
            if not host:
                raise ArtifactError(f"{uri}: names no host")
            self._check_host(uri, host)
            return None
        if uri.startswith("file://"):
            parsed = urllib.parse.urlparse(uri)
            if parsed.netloc not in ("", "localhost"):
                raise ArtifactError(f"{uri}: file URIs must not name a host")
            candidate = pathlib.Path(urllib.parse.unquote(parsed.path)).resolve()
            if not any(candidate.is_relative_to(r.resolve()) for r in self.roots):
                roots = ", ".join(str(r) for r in self.roots) or "none configured"
                raise ArtifactError(f"{uri} is outside the allowed artifact roots ({roots}); see 'edgeplane serve --artifact-root'")
            return candidate
        for root in self.roots:
            candidate = (root / uri).resolve()
            if candidate.is_relative_to(root.resolve()) and candidate.exists():
                return candidate
        raise ArtifactError(f"artifact {uri!r} was not found under the artifact roots ({', '.join(str(r) for r in self.roots)})")

    def _check_host(self, uri: str, host: str) -> None:
        if not artifact_hosts.allows(self.allowed_hosts, host):
            raise ArtifactError(f"{uri}: host {host.lower()!r} is not an allowed artifact host ({', '.join(self.allowed_hosts)}); see --artifact-host")

    def register(self, uri: str, sha256: str) -> str:
        """Check a local artifact and return the URL consumers should download it from. The
        file is read in full the first time and whenever its identity has changed: call it
        off the event loop."""
        path = self.local_path(uri)
        if path is None:
            return uri
        try:
            self._check(path, sha256)
        except FileNotFoundError as exc:
            raise ArtifactError(f"artifact {uri!r} does not exist ({path})") from exc
        except OSError as exc:
            raise ArtifactError(f"artifact {uri!r} cannot be read ({path}): {exc.strerror or exc}") from exc
        except ArtifactError as exc:
            raise ArtifactError(f"artifact {uri!r} {exc}") from exc
        return f"{self.public_base}/v1/artifacts/{sha256}"

    def _check(self, path: pathlib.Path, sha256: str) -> None:
        try:
            fh, identity = open_regular(path)
            with fh:
                if self._identity(sha256, path) == identity:
                    return
                actual = sha256_stream(fh, self._closed)
                after = FileIdentity.of(os.fstat(fh.fileno()))
            if actual != sha256:
                raise ArtifactError(f"has sha256 {actual}, the Model says {sha256}")
            if after != identity:  # what was read may be neither the old bytes nor the new
                raise ArtifactError("changed while its sha256 was checked; it is checked again at the next pass")
        except Exception:
            self._forget(sha256, path)
            raise
        with self._lock:
            self._checked.setdefault(sha256, {})[path] = identity

    def _identity(self, sha256: str, path: pathlib.Path) -> FileIdentity | None:
        with self._lock:
            return self._checked.get(sha256, {}).get(path)

    def _forget(self, sha256: str, path: pathlib.Path) -> None:
        with self._lock:
            paths = self._checked.get(sha256, {})
            paths.pop(path, None)
            if not paths:
                self._checked.pop(sha256, None)

    def checked(self) -> frozenset[str]:
        """The versions it serves: those checked and not forgotten since."""
        with self._lock:
            return frozenset(self._checked)

    def retain(self, live: Collection[str]) -> None:
        """Forget the checks of every version not in ``live`` (those no Model, agent or data
        centre uses any more: ``reconciler.artifact_use``): they are served no more, and a
        version used again is hashed again."""
        with self._lock:
            self._checked = {sha256: paths for sha256, paths in self._checked.items() if sha256 in live}

    def open_checked(self, sha256: str) -> tuple[BinaryIO, FileIdentity] | None:
        """A file whose bytes were checked for ``sha256``, open for reading, or None when no
        file was registered under it. Raises :class:`ArtifactChanged` when every file checked
        for it has since been rewritten, deleted or replaced (by a link too): what is at the
        path now was never checked. Nothing is read, but an open on a network file system may wait."""
        with self._lock:
            candidates = list(self._checked.get(sha256, {}).items())
        if not candidates:
            return None
        for path, checked in candidates:
            try:
                fh, identity = open_regular(path)
            except (OSError, ArtifactError):
                continue
            if identity == checked:
                return fh, identity
            fh.close()
        raise ArtifactChanged(f"the file checked for sha256 {sha256} was changed, replaced or deleted since; "
                              "it is not served until it is checked again (each reconcile pass checks those a Model names)")

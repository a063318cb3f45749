"""Resolve a Model's artifact URI to what an agent or a Ray replica downloads.

Remote ``http(s)://`` URIs are passed through unchanged: the consumer downloads and
verifies them. Local ones (``file://`` or a path relative to an artifact root) are read
only from the configured roots — a manifest cannot make the control plane read an
arbitrary file — and are served by the control plane at ``/v1/artifacts/<sha256>``
after their digest has been checked.
"""

from __future__ import annotations

import hashlib
import pathlib
import urllib.parse
from dataclasses import dataclass, field


class ArtifactError(Exception):
    pass


def sha256_file(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ArtifactCatalog:
    roots: tuple[pathlib.Path, ...]
    public_base: str = ""  # control plane URL as agents reach it, e.g. http://10.0.0.5:8080
    #: Hosts remote artifact URLs may name (exact, or ".example.com" for its subdomains);
    #: empty = any host. Applied before a URL is handed to an agent or a replica.
    allowed_hosts: tuple[str, ...] = ()
    _verified: dict[str, pathlib.Path] = field(default_factory=dict)

    def local_path(self, uri: str) -> pathlib.Path | None:
        """The file behind a local URI, or None for remote URIs. Raises outside the roots."""
        try:
            return self._local_path(uri)
        except ValueError as exc:  # a NUL in a path, an unparsable host: this URI's error, not its caller's
            raise ArtifactError(f"{uri!r} is not a usable artifact URI: {exc}") from exc

    def _local_path(self, uri: str) -> pathlib.Path | None:
        if uri.startswith(("http://", "https://")):
            self._check_host(uri)
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

    def _check_host(self, uri: str) -> None:
        if not self.allowed_hosts:
            return
        host = (urllib.parse.urlsplit(uri).hostname or "").lower()
        for allowed in self.allowed_hosts:
            allowed = allowed.lower()
            if host == allowed or (allowed.startswith(".") and host.endswith(allowed)):
                return
        raise ArtifactError(f"{uri}: host {host!r} is not an allowed artifact host ({', '.join(self.allowed_hosts)}); see --artifact-host")

    def register(self, uri: str, sha256: str) -> str:
        """Check a local artifact and return the URL consumers should download it from."""
        path = self.local_path(uri)
        if path is None:
            return uri
        if self._verified.get(sha256) != path:
            if not path.is_file():
                raise ArtifactError(f"artifact {uri!r} does not exist ({path})")
            actual = sha256_file(path)
            if actual != sha256:
                raise ArtifactError(f"artifact {uri!r} has sha256 {actual}, the Model says {sha256}")
            self._verified[sha256] = path
        return f"{self.public_base}/v1/artifacts/{sha256}"

    def path_for(self, sha256: str) -> pathlib.Path | None:
        return self._verified.get(sha256)

"""Fetching and verifying model artifacts on a Ray node before anything loads them.

The security contract says artifacts are verified by sha256 before loading; a replica must
refuse a file whose digest differs from the one in the manifest, whatever its source. The
digest is checked on the bytes that will be loaded (after download, on the local copy), and a
download is checked before it enters the node's cache, so a refused one leaves nothing behind.
A download follows a redirect only to the URL's own host or an allowed artifact host (the
control plane's ``--artifact-host``, as an agent does), and at most ``MAX_REDIRECTS`` of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import pathlib
import tempfile
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx

import edge_agent
from edgeplane_proto import artifact_hosts
from orchestrator import proxyenv

CHUNK = 1 << 20
#: A download's name in :func:`cache_dir`: ``<sha256>.onnx`` (a package's tar too)
DOWNLOAD_SUFFIX = ".onnx"
MAX_REDIRECTS = artifact_hosts.MAX_REDIRECTS


class ArtifactError(RuntimeError):
    """The artifact cannot be fetched, or its digest is not the expected one."""


def sha256_of(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("EDGEPLANE_ARTIFACT_CACHE") or tempfile.gettempdir()) / (
        "edgeplane-artifacts"
    )


def models_root() -> pathlib.Path:
    """Where a replica unpacks packages (generative, and onnx models with external data),
    one folder per sha256 (``edge_agent.packages``)."""
    return pathlib.Path(os.environ.get("EDGEPLANE_ARTIFACT_CACHE") or tempfile.gettempdir()) / "edgeplane-genai-models"


def max_bytes() -> int:
    """The largest download a replica makes: ``$EDGEPLANE_MAX_ARTIFACT_GB`` GiB, as an agent's
    ``--max-artifact-gb`` (a wrong URL must not fill a node's disk) and its default unless set."""
    setting = os.environ.get("EDGEPLANE_MAX_ARTIFACT_GB") or str(edge_agent.DEFAULT_MAX_ARTIFACT_GIB)
    try:
        gib = float(setting)
    except ValueError:
        gib = -1.0
    if not (gib > 0 and math.isfinite(gib)):  # inf (or 1e400) has no byte count
        raise ArtifactError(f"EDGEPLANE_MAX_ARTIFACT_GB={setting!r}: must be a finite number of GiB above 0")
    return int(gib * (1 << 30))


def hosts_arg(args: Mapping[str, Any]) -> tuple[str, ...]:
    """An application's ``artifact_hosts`` argument: the hosts its downloads may be
    redirected to (the control plane's ``--artifact-host``); absent: any host."""
    hosts = args.get("artifact_hosts", [])
    if not isinstance(hosts, list) or not all(isinstance(h, str) and h for h in hosts):
        raise ValueError("the application's argument 'artifact_hosts' must be a list of host names")
    return tuple(hosts)


def fetch_verified(uri: str, sha256: str, *, timeout_s: float = 300.0, redirect_hosts: tuple[str, ...] = ()) -> pathlib.Path:
    """Return a local path to ``uri`` whose sha256 is ``sha256``; raise :class:`ArtifactError`.

    ``file://`` URIs and plain paths are read in place; ``http(s)://`` URIs are downloaded
    into a cache keyed by digest, so replicas on one node share one download, following a
    redirect only to ``uri``'s host or one of ``redirect_hosts`` (empty: any host). The
    caller holds the version (``nodecache.hold``), so that no sweep removes the download.
    """
    parts = urlsplit(uri)
    if parts.scheme in ("", "file"):
        path = pathlib.Path(unquote(parts.path if parts.scheme else uri))
        if not path.is_file():
            raise ArtifactError(f"artifact {uri} does not exist on this node")
    elif parts.scheme in ("http", "https"):
        path = cache_dir() / f"{sha256}{DOWNLOAD_SUFFIX}"
        if path.is_file() and sha256_of(path) == sha256:
            return path  # cached and just verified
        _download(uri, path, sha256, timeout_s, redirect_hosts)
        return path  # verified before it took the cache's name
    else:
        raise ArtifactError(f"artifact {uri}: unsupported scheme {parts.scheme!r}")
    actual = sha256_of(path)
    if actual != sha256:
        raise ArtifactError(
            f"artifact {uri} has sha256 {actual}, expected {sha256}: refusing to load it"
        )
    return path


def _download(uri: str, path: pathlib.Path, sha256: str, timeout_s: float, redirect_hosts: tuple[str, ...]) -> None:
    """Download into a ``.<sha12>-*.part`` file, hashing as it is written; only bytes with the
    expected digest take the cache's name, anything else is deleted with the ``.part`` (one
    cut short by a replica's death goes at a sweep, ``nodecache``)."""
    digest, limit, size = hashlib.sha256(), max_bytes(), 0
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{sha256[:12]}-", suffix=".part")
    too_large = f"artifact {uri} is larger than a replica downloads ({limit} bytes; EDGEPLANE_MAX_ARTIFACT_GB)"
    try:
        with (
            os.fdopen(fd, "wb") as out,
            proxyenv.client(timeout=timeout_s) as client,
            contextlib.closing(_get(client, uri, redirect_hosts)) as response,
        ):
            response.raise_for_status()
            announced = response.headers.get("content-length", "")
            if announced.isdigit() and int(announced) > limit:
                raise ArtifactError(too_large)
            for chunk in response.iter_bytes(CHUNK):
                size += len(chunk)
                if size > limit:  # a length not announced, or not kept to
                    raise ArtifactError(too_large)
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256:
            raise ArtifactError(
                f"artifact {uri} has sha256 {digest.hexdigest()}, expected {sha256}: refusing to load it"
            )
        os.replace(tmp_name, path)
    except (httpx.HTTPError, OSError, ValueError) as exc:  # ValueError: proxy settings httpx cannot use
        raise ArtifactError(f"cannot download artifact {uri}: {exc}") from exc
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def _get(client: httpx.Client, uri: str, redirect_hosts: tuple[str, ...]) -> httpx.Response:
    """The streamed answer to GET ``uri`` after the redirects it may follow; the caller closes it."""
    request = client.build_request("GET", uri)
    for _ in range(MAX_REDIRECTS + 1):
        response = client.send(request, stream=True)
        if response.next_request is None:
            return response
        response.close()
        request = response.next_request
        host = request.url.host
        if not artifact_hosts.allows_redirect(redirect_hosts, httpx.URL(uri).host, host):
            raise ArtifactError(f"cannot download artifact {uri}: it redirects to {request.url}, whose host {host!r} is not "
                                f"an allowed artifact host ({', '.join(redirect_hosts)}; edgeplane serve --artifact-host)")
    raise ArtifactError(f"cannot download artifact {uri}: more than {MAX_REDIRECTS} redirects")

"""The control plane serves a local artifact only as the bytes whose sha256 it checked.

A file rewritten, deleted or swapped for a link after its check is refused at
``/v1/artifacts/<sha256>`` and reported by the next check (each reconcile pass registers
every variant), never served under a digest it does not have; an unchanged file is not
read again, at one path or at several. Served over real HTTP (uvicorn on loopback).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import BinaryIO

import httpx
import pytest
from starlette.applications import Starlette

from orchestrator.api import artifacts as artifacts_api
from orchestrator.artifacts import catalog
from orchestrator.testing import loopback

BYTES = b"the checked model bytes"
SHA = hashlib.sha256(BYTES).hexdigest()


@asynccontextmanager
async def serving(cat: catalog.ArtifactCatalog) -> AsyncIterator[httpx.AsyncClient]:
    app = Starlette(routes=[artifacts_api.route(cat)])
    async with loopback.serving(app) as port, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        yield http


def checked(tmp_path: pathlib.Path) -> tuple[catalog.ArtifactCatalog, pathlib.Path]:
    root = tmp_path / "artifacts"
    root.mkdir()
    model = root / "model.onnx"
    model.write_bytes(BYTES)
    cat = catalog.ArtifactCatalog((root,), "http://cp")
    assert cat.register("model.onnx", SHA) == f"http://cp/v1/artifacts/{SHA}"
    return cat, model


@pytest.mark.asyncio
async def test_a_checked_artifact_is_served_whole_from_an_offset_and_by_head(tmp_path: pathlib.Path) -> None:
    cat, _ = checked(tmp_path)
    async with serving(cat) as http:
        whole = await http.get(f"/v1/artifacts/{SHA}")
        assert whole.status_code == 200 and whole.content == BYTES
        resumed = await http.get(f"/v1/artifacts/{SHA}", headers={"Range": "bytes=4-"})  # how an agent resumes
        assert resumed.status_code == 206 and resumed.content == BYTES[4:]
        assert resumed.headers["content-range"] == f"bytes 4-{len(BYTES) - 1}/{len(BYTES)}"
        past_the_end = await http.get(f"/v1/artifacts/{SHA}", headers={"Range": f"bytes={len(BYTES)}-"})
        assert past_the_end.status_code == 416 and past_the_end.headers["content-range"] == f"bytes */{len(BYTES)}"
        assert past_the_end.json()["reason"] == "RangeNotSatisfiable" and past_the_end.json()["error"]  # the API's error shape
        head = await http.head(f"/v1/artifacts/{SHA}")
        assert head.status_code == 200 and head.headers["content-length"] == str(len(BYTES)) and head.content == b""
        assert (await http.get(f"/v1/artifacts/{'1' * 64}")).status_code == 404


@pytest.mark.asyncio
async def test_a_file_rewritten_after_its_check_is_not_served_and_the_next_check_says_why(tmp_path: pathlib.Path) -> None:
    cat, model = checked(tmp_path)
    model.write_bytes(b"rewritten in place after the check")
    async with serving(cat) as http:
        refused = await http.get(f"/v1/artifacts/{SHA}")
    assert refused.status_code == 409 and "changed" in refused.json()["error"], refused.text
    with pytest.raises(catalog.ArtifactError, match="has sha256"):
        cat.register("model.onnx", SHA)


@pytest.mark.asyncio
async def test_a_file_swapped_for_a_link_after_its_check_does_not_serve_what_it_points_to(tmp_path: pathlib.Path) -> None:
    cat, model = checked(tmp_path)
    secret = tmp_path / "secret.key"  # outside the artifact root
    secret.write_bytes(b"-----BEGIN PRIVATE KEY-----")
    model.unlink()
    model.symlink_to(secret)
    async with serving(cat) as http:
        refused = await http.get(f"/v1/artifacts/{SHA}")
    assert refused.status_code == 409 and b"PRIVATE KEY" not in refused.content
    with pytest.raises(catalog.ArtifactError, match="was not found under the artifact roots"):
        cat.register("model.onnx", SHA)


@pytest.mark.asyncio
async def test_a_file_deleted_after_its_check_is_refused_and_the_next_check_says_so(tmp_path: pathlib.Path) -> None:
    cat, model = checked(tmp_path)
    uri = model.as_uri()  # file:///…/artifacts/model.onnx, as a manifest may name it
    cat.register(uri, SHA)
    model.unlink()
    async with serving(cat) as http:
        assert (await http.get(f"/v1/artifacts/{SHA}")).status_code == 409
    with pytest.raises(catalog.ArtifactError, match="does not exist"):
        cat.register(uri, SHA)


def test_identical_copies_at_two_paths_are_read_once_each_until_one_changes(tmp_path: pathlib.Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "artifacts"
    for version in ("v1", "v2"):
        (root / version).mkdir(parents=True)
        (root / version / "model.onnx").write_bytes(BYTES)
    reads: list[str] = []

    def counted(fh: BinaryIO, closed: threading.Event | None = None) -> str:
        reads.append(fh.name)
        return hashlib.sha256(fh.read()).hexdigest()

    monkeypatch.setattr(catalog, "sha256_stream", counted)
    cat = catalog.ArtifactCatalog((root,), "http://cp")
    for _pass in range(5):  # as five reconcile passes register both variants
        cat.register("v1/model.onnx", SHA)
        cat.register("v2/model.onnx", SHA)
    assert len(reads) == 2, reads
    touched = root / "v1" / "model.onnx"  # written again, same bytes: its modification time changes
    before = touched.stat()
    touched.write_bytes(BYTES)
    os.utime(touched, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    cat.register("v1/model.onnx", SHA)
    cat.register("v2/model.onnx", SHA)
    assert len(reads) == 3, reads


@pytest.mark.parametrize(("header", "expected"), [
    (None, None),
    ("bytes=0-", (0, 9)),
    ("bytes=4-", (4, 9)),
    ("bytes=2-5", (2, 5)),
    ("bytes=2-99", (2, 9)),
    ("bytes=-3", (7, 9)),
    ("bytes=-99", (0, 9)),
    ("bytes=10-", (10, 10)),  # past the end: 416
    ("bytes=-0", (10, 10)),
    ("bytes=5-2", None),  # not understood: the whole file
    ("bytes=0-1,4-5", None),  # several ranges: the whole file
    ("bytes=-", None),
    ("items=0-1", None),
])
def test_the_range_an_agent_resumes_from(header: str | None, expected: tuple[int, int] | None) -> None:
    assert artifacts_api.byte_range(header, 10) == expected


@pytest.mark.asyncio
@pytest.mark.parametrize("header", ["bytes=" + "1" * 5000 + "-", "bytes=0-" + "9" * 5000, "bytes=-" + "7" * 5000, "bytes=\u0661-"])
async def test_a_range_of_digits_past_any_offset_is_a_range_not_understood(tmp_path: pathlib.Path, header: str) -> None:
    """int() refuses more than 4,300 digits: a Range of 5,000 was a 500 with a traceback on a
    route that needs no token. Past 19 digits (or not ASCII) it is a range not understood:
    the whole file, as HTTP says."""
    cat, _ = checked(tmp_path)
    async with serving(cat) as http:
        r = await http.get(f"/v1/artifacts/{SHA}", headers={"Range": header.encode()})
    assert (r.status_code, r.content) == (200, BYTES)

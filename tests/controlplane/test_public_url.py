"""``--public-url`` as operators write it: the artifact URLs agents and data-centre replicas
are sent are ones the control plane serves."""

from __future__ import annotations

import hashlib
import pathlib

import httpx
import pytest

from orchestrator.ports import free_port
from orchestrator.testing import harness


@pytest.mark.parametrize("suffix", ["/", "/edgeplane/"])
async def test_an_artifact_url_under_a_public_url_with_a_trailing_slash_is_served(tmp_path: pathlib.Path, suffix: str) -> None:
    """``--public-url http://cp.example:8080/`` made ``http://cp.example:8080//v1/artifacts/...``,
    which no route serves: every agent's download of a local artifact failed 404."""
    port = free_port()
    body = b"an onnx file's bytes"
    sha = hashlib.sha256(body).hexdigest()
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "m.onnx").write_bytes(body)
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane(port=port, public_url=f"http://127.0.0.1:{port}{suffix}")
        url = cp.artifacts.register("m.onnx", sha)
        if suffix == "/":  # no reverse proxy takes a prefix off here: the control plane itself is asked
            async with httpx.AsyncClient(trust_env=False) as http:
                got = await http.get(url)
            assert got.status_code == 200 and got.content == body, (url, got.status_code)
        assert url == f"http://127.0.0.1:{port}{suffix.rstrip('/')}/v1/artifacts/{sha}"
    finally:
        await fleet.stop()

"""A data-centre node keeps the unpacked packages its replicas use, and only those: every
version a node ever served (genai or onnx with external data, gigabytes each) stayed on its
disk. Replicas are built as Serve builds them (``func_or_class``), in this process and in
others, which a ``kill -9`` ends as Ray's OOM killer does."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys

import pytest

from orchestrator.artifacts import onnx_package
from orchestrator.serving import genai_app, onnx_app
from orchestrator.testing import genai_model, onnx_models

_REPLICA = """
import sys
from orchestrator.serving import genai_app, onnx_app
served = onnx_app.OnnxModel.func_or_class(sys.argv[1], sys.argv[2], "m")
print("serving", flush=True)
sys.stdin.read()  # until the test ends this replica
served.__del__()  # as Serve shuts it down
"""


def _version(tmp_path: pathlib.Path, name: str) -> tuple[str, str]:
    """A packed onnx model with external data, its own version (a file of its own beside it)."""
    folder = onnx_models.save_with_external_data(tmp_path / name)
    (folder / "notes.txt").write_text(name)
    out = tmp_path / f"{name}.tar"
    return str(out), onnx_package.pack(folder, out).sha256


def _unpacked(cache: pathlib.Path) -> set[str]:
    return {p.name for p in (cache / "edgeplane-genai-models").iterdir() if not p.name.startswith(".")}


@pytest.fixture
def cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    monkeypatch.setenv("EDGEPLANE_ARTIFACT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _replica_elsewhere(uri: str, sha256: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", _REPLICA, uri, sha256], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    assert proc.stdout is not None and proc.stdout.readline() == "serving\n"
    return proc


def test_a_version_no_replica_serves_any_more_is_removed_and_those_in_use_are_kept(
        tmp_path: pathlib.Path, cache: pathlib.Path) -> None:
    (old_uri, old), (new_uri, new), (other_uri, other) = (_version(tmp_path, n) for n in ("old", "new", "other"))
    gone = _replica_elsewhere(old_uri, old)  # a replica ended by the OOM killer: it says nothing
    gone.send_signal(signal.SIGKILL)
    gone.wait(timeout=30)
    serving = _replica_elsewhere(other_uri, other)  # another deployment's replica, serving on
    try:
        replica = onnx_app.OnnxModel.func_or_class(new_uri, new, "m")
        assert _unpacked(cache) == {new, other}  # the killed replica's version went when this one started
        replica.__del__()  # Serve shuts a replica down with its __del__
        assert _unpacked(cache) == {other}
        replica.__del__()  # and the collector may call it again
    finally:
        serving.communicate("", timeout=30)
    assert _unpacked(cache) == set()  # the last replica of a version that ends removes it


def test_an_unpack_under_way_is_left_alone_and_one_cut_short_is_removed(
        tmp_path: pathlib.Path, cache: pathlib.Path) -> None:
    from orchestrator.serving import unpacked

    (uri, sha256), (_, busy), (_, dead) = (_version(tmp_path, n) for n in ("served", "busy", "dead"))
    root = cache / "edgeplane-genai-models"
    root.mkdir(parents=True)
    (root / f".{busy[:12]}-under-way").mkdir()  # a replica elsewhere unpacking it now: holds its version
    (root / f".{dead[:12]}-cut-short").mkdir()  # a replica killed in the middle of its unpack
    (root / f".{dead[:12]}-cut-short" / "model.onnx.data").write_bytes(b"x" * 4096)
    holder = subprocess.Popen([sys.executable, "-c", "import pathlib, sys\nfrom orchestrator.serving import unpacked\n"
                               "h = unpacked.hold(pathlib.Path(sys.argv[1]), sys.argv[2])\nprint('held', flush=True)\n"
                               "sys.stdin.read()", str(root), busy], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        replica = onnx_app.OnnxModel.func_or_class(uri, sha256, "m")
        left = {p.name for p in root.iterdir() if not p.name.endswith(unpacked.LOCK_SUFFIX)}
        assert left == {sha256, f".{busy[:12]}-under-way"}
        replica.__del__()
    finally:
        holder.communicate("", timeout=30)


def test_a_generative_replica_removes_its_version_when_it_is_the_last_to_end(
        tmp_path: pathlib.Path, cache: pathlib.Path, genai_package: genai_model.GenAIModel) -> None:
    first, second = (genai_app.GenAIReplica.func_or_class(genai_package.package.as_uri(), genai_package.sha256, "a")
                     for _ in range(2))
    first.__del__()
    assert _unpacked(cache) == {genai_package.sha256}  # the second replica serves it still
    second.__del__()
    assert _unpacked(cache) == set()

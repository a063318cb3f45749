"""A data-centre node keeps the downloads and unpacked packages its replicas use, and only
those: every version a node ever served (genai or onnx, gigabytes each) stayed on its disk. Replicas are built as Serve builds them (``func_or_class``), in this process and in
others, which a ``kill -9`` ends as Ray's OOM killer does."""

from __future__ import annotations

import concurrent.futures
import http.server
import os
import pathlib
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from orchestrator.artifacts import onnx_package
from orchestrator.serving import artifacts, genai_app, nodecache, onnx_app
from orchestrator.testing import genai_model, loopback, onnx_models

_REPLICA = """
import sys
from orchestrator.serving import artifacts, genai_app, onnx_app
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
    from orchestrator.serving import nodecache

    (uri, sha256), (_, busy), (_, dead) = (_version(tmp_path, n) for n in ("served", "busy", "dead"))
    root = cache / "edgeplane-genai-models"
    root.mkdir(parents=True)
    (root / f".{busy[:12]}-under-way").mkdir()  # a replica elsewhere unpacking it now: holds its version
    (root / f".{dead[:12]}-cut-short").mkdir()  # a replica killed in the middle of its unpack
    (root / f".{dead[:12]}-cut-short" / "model.onnx.data").write_bytes(b"x" * 4096)
    holder = subprocess.Popen([sys.executable, "-c", "import sys\nfrom orchestrator.serving import nodecache\n"
                               "h = nodecache.hold(sys.argv[1])\nprint('held', flush=True)\n"
                               "sys.stdin.read()", busy], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        replica = onnx_app.OnnxModel.func_or_class(uri, sha256, "m")
        left = {p.name for p in root.iterdir() if not p.name.endswith(nodecache.LOCK_SUFFIX)}
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


class _Artifacts(http.server.BaseHTTPRequestHandler):
    """The files of ``folder`` over HTTP; ``/slow/NAME`` sends half of NAME, then the rest
    once ``go`` is set, having set ``asked``."""

    folder: pathlib.Path
    asked = threading.Event()
    go = threading.Event()

    def do_GET(self) -> None:
        body = (self.folder / self.path.removeprefix("/slow").lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.path.startswith("/slow/"):
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.asked.set()
            assert self.go.wait(30)
            body = body[len(body) // 2:]
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def artifact_server(tmp_path: pathlib.Path) -> Iterator[tuple[str, type[_Artifacts]]]:
    """The test's folder over HTTP: its base URL, and its handler's events."""
    handler = type("Handler", (_Artifacts,), {"folder": tmp_path, "asked": threading.Event(), "go": threading.Event()})
    with loopback.http_server(handler) as url:
        yield url, handler


def _downloaded(cache: pathlib.Path) -> set[str]:
    return {p.name for p in (cache / "edgeplane-artifacts").iterdir()}


def test_a_download_no_replica_uses_any_more_is_removed_and_one_cut_short_too(
        tmp_path: pathlib.Path, cache: pathlib.Path, artifact_server: tuple[str, type[_Artifacts]]) -> None:
    """The http(s) downloads (a plain ONNX file, a package's tar) stayed on the node for good."""
    url, _ = artifact_server
    plain = onnx_models.build_identity(tmp_path / "plain.onnx", {"x": 1}).sha256
    new_uri, new = _version(tmp_path, "new")
    gone = _replica_elsewhere(f"{url}/plain.onnx", plain)  # ended by the OOM killer
    gone.send_signal(signal.SIGKILL)
    gone.wait(timeout=30)
    assert _downloaded(cache) == {f"{plain}.onnx"}
    cut_short = cache / "edgeplane-artifacts" / f".{'d' * 12}-killed.part"  # a download killed half-way
    cut_short.write_bytes(b"x" * 4096)
    replica = onnx_app.OnnxModel.func_or_class(f"{url}/{pathlib.Path(new_uri).name}", new, "m")
    assert _downloaded(cache) == set() and _unpacked(cache) == {new}  # (a package is kept unpacked only)
    replica.__del__()
    assert _downloaded(cache) == set()
    assert _unpacked(cache) == set()


def test_a_download_under_way_is_left_alone(
        tmp_path: pathlib.Path, cache: pathlib.Path, artifact_server: tuple[str, type[_Artifacts]]) -> None:
    """A replica holds its version before its download: another's sweep meanwhile (a replica
    of another deployment starting or ending on the node) leaves the part written alone."""
    from orchestrator.serving import nodecache

    url, handler = artifact_server
    uri, sha256 = _version(tmp_path, "slow")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        starting = pool.submit(onnx_app.OnnxModel.func_or_class, f"{url}/slow/{pathlib.Path(uri).name}", sha256, "m")
        try:
            assert handler.asked.wait(30)
            (partial,) = _downloaded(cache)
            assert partial.startswith(f".{sha256[:12]}-") and partial.endswith(".part")
            assert nodecache.prune() == []
            assert _downloaded(cache) == {partial}  # still being written
        finally:
            handler.go.set()
        replica = starting.result(timeout=60)
    assert _unpacked(cache) == {sha256}
    replica.__del__()


def test_a_sha256_that_is_no_digest_is_refused_before_it_names_a_file(tmp_path: pathlib.Path, cache: pathlib.Path) -> None:
    """A Serve config written by hand may pass any sha256: it names the version's lock,
    download and folder, so it is refused before it names any (as the digest check did)."""
    uri, _ = _version(tmp_path, "v")
    with pytest.raises(artifacts.ArtifactError, match="is not 64 lowercase hex digits"):
        onnx_app.OnnxModel.func_or_class(uri, "../../escaped", "m")
    assert not (tmp_path / "escaped.lock").exists() and not list(cache.rglob("*"))


def test_a_download_an_earlier_release_left_cut_short_goes_once_nothing_writes_it(
        tmp_path: pathlib.Path, cache: pathlib.Path, artifact_server: tuple[str, type[_Artifacts]]) -> None:
    """Earlier releases wrote a download to ``tmp*.part`` (no version in its name, no lock): one
    cut short by a replica's death stayed on the node for good."""
    from orchestrator.serving import nodecache

    url, _ = artifact_server
    downloads = cache / "edgeplane-artifacts"
    downloads.mkdir(parents=True)
    dead, writing = downloads / "tmpk2x9_q4a.part", downloads / "tmpw8hz3mfe.part"
    dead.write_bytes(b"x" * 4096)
    writing.write_bytes(b"x" * 4096)  # an earlier release's replica downloading now writes it
    idle = nodecache.EARLIER_PART_IDLE_S + 1
    os.utime(dead, (dead.stat().st_atime - idle, dead.stat().st_mtime - idle))
    plain = onnx_models.build_identity(tmp_path / "plain.onnx", {"x": 1}).sha256
    replica = onnx_app.OnnxModel.func_or_class(f"{url}/plain.onnx", plain, "m")
    assert _downloaded(cache) == {f"{plain}.onnx", writing.name}
    replica.__del__()
    assert _downloaded(cache) == {writing.name}


class _Counted(_Artifacts):
    """The test's files over HTTP, counting the GETs."""

    gets = 0

    def do_GET(self) -> None:
        type(self).gets += 1
        super().do_GET()


def _left(cache: pathlib.Path) -> set[str]:
    return {p.name for p in cache.rglob("*") if p.is_file()}


def test_a_node_that_only_builds_keeps_the_last_version_it_checked_alone(
        tmp_path: pathlib.Path, cache: pathlib.Path, artifact_server: tuple[str, type[_Artifacts]]) -> None:
    """A node that only ever runs the application builder (Serve runs it as a task, on the head
    node as often as not) keeps the version it checked last, for the replicas that start there
    next; the next build there removes it."""
    url, _ = artifact_server
    (first_uri, first), (last_uri, last) = (_version(tmp_path, n) for n in ("first", "last"))
    for uri, sha256 in ((first_uri, first), (last_uri, last)):
        onnx_app.build({"artifact_uri": f"{url}/{pathlib.Path(uri).name}", "sha256": sha256, "model_name": "m"})
    assert _downloaded(cache) == {f"{last}.onnx"} and _unpacked(cache) == set()


def test_a_replica_on_the_node_that_built_its_version_does_not_download_it_again(
        tmp_path: pathlib.Path, cache: pathlib.Path) -> None:
    """The builder's download went as soon as it was checked, so a replica placed on the node
    that built (every replica, on a one-node cluster) downloaded the artifact a second time:
    gigabytes, and as long again to start, for a generative or onnx package."""
    handler = type("Handler", (_Counted,), {"folder": tmp_path, "asked": threading.Event(), "go": threading.Event()})
    uri, sha256 = _version(tmp_path, "built")
    with loopback.http_server(handler) as url:
        onnx_app.build({"artifact_uri": f"{url}/{pathlib.Path(uri).name}", "sha256": sha256, "model_name": "m"})
        replica = onnx_app.OnnxModel.func_or_class(f"{url}/{pathlib.Path(uri).name}", sha256, "m")
        assert handler.gets == 1 and _downloaded(cache) == set() and _unpacked(cache) == {sha256}
        replica.__del__()
    assert _left(cache) == set()


def test_the_builder_leaves_no_lock_file_for_a_sha256_the_artifact_does_not_have(
        tmp_path: pathlib.Path, cache: pathlib.Path) -> None:
    uri, _ = _version(tmp_path, "v")
    with pytest.raises(artifacts.ArtifactError, match="expected"):
        onnx_app.build({"artifact_uri": uri, "sha256": "0" * 64, "model_name": "m"})
    assert _left(cache) == set()


def test_the_builder_keeps_a_version_a_replica_on_the_node_serves_and_takes_its_folder_as_checked(
        tmp_path: pathlib.Path, cache: pathlib.Path) -> None:
    """The package a replica on the node unpacked is not downloaded again to be checked: the
    download would stay beside the folder while the version is served."""
    handler = type("Handler", (_Counted,), {"folder": tmp_path, "asked": threading.Event(), "go": threading.Event()})
    uri, sha256 = _version(tmp_path, "served")
    with loopback.http_server(handler) as url:
        served = _replica_elsewhere(f"{url}/{pathlib.Path(uri).name}", sha256)
        try:
            onnx_app.build({"artifact_uri": f"{url}/{pathlib.Path(uri).name}", "sha256": sha256, "model_name": "m"})
            assert _unpacked(cache) == {sha256} and _downloaded(cache) == set() and handler.gets == 1
        finally:
            served.communicate("", timeout=30)


def test_a_package_is_kept_unpacked_only_and_a_later_replica_neither_downloads_nor_unpacks_it(
        tmp_path: pathlib.Path, cache: pathlib.Path) -> None:
    """A package's tar stayed beside its unpacked folder for as long as the version was served:
    twice its size on the node's disk, and hashed again by every replica that started there."""
    handler = type("Handler", (_Counted,), {"folder": tmp_path, "asked": threading.Event(), "go": threading.Event()})
    uri, sha256 = _version(tmp_path, "package")
    with loopback.http_server(handler) as url:
        first = onnx_app.OnnxModel.func_or_class(f"{url}/{pathlib.Path(uri).name}", sha256, "m")
        assert _downloaded(cache) == set() and _unpacked(cache) == {sha256}
        unpacked_at = (cache / "edgeplane-genai-models" / sha256).stat().st_ino
        second = onnx_app.OnnxModel.func_or_class(f"{url}/{pathlib.Path(uri).name}", sha256, "m")
        assert handler.gets == 1 and (cache / "edgeplane-genai-models" / sha256).stat().st_ino == unpacked_at
        first.__del__()
        second.__del__()
    assert _left(cache) == set()


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_a_folder_whose_weights_were_damaged_after_its_unpack_is_removed_and_the_next_replica_fetches_it_again(
        tmp_path: pathlib.Path, cache: pathlib.Path, damage: str) -> None:
    """Its mark and graph kept, every replica failed on it and none fetched it again: the version
    failed on that node until someone removed the folder by hand."""
    handler = type("Handler", (_Counted,), {"folder": tmp_path, "asked": threading.Event(), "go": threading.Event()})
    uri, sha256 = _version(tmp_path, f"damaged-{damage}")
    with loopback.http_server(handler) as url:
        first = onnx_app.OnnxModel.func_or_class(f"{url}/{pathlib.Path(uri).name}", sha256, "m")
        held = nodecache.hold(sha256)  # another replica serving it: the version stays on the node
        first.__del__()
        weights = cache / "edgeplane-genai-models" / sha256 / "model.onnx.data"
        if damage == "truncated":
            weights.write_bytes(weights.read_bytes()[:100])
        else:
            weights.unlink()
        with pytest.raises(Exception, match=r"could not load the model|model\.onnx\.data") as failed:
            onnx_app.OnnxModel.func_or_class(f"{url}/{pathlib.Path(uri).name}", sha256, "m")
        assert "was removed: the package is downloaded, verified and unpacked again" in "".join(failed.value.__notes__)
        assert _unpacked(cache) == set() and handler.gets == 1
        replica = onnx_app.OnnxModel.func_or_class(f"{url}/{pathlib.Path(uri).name}", sha256, "m")
        assert handler.gets == 2 and _unpacked(cache) == {sha256} and _downloaded(cache) == set()
        replica.__del__()
        nodecache.let_go(held)
    assert _left(cache) == set()


def test_a_damaged_folder_that_cannot_be_removed_fails_the_replica_with_its_load_error(
        tmp_path: pathlib.Path, cache: pathlib.Path) -> None:
    """The node's models folder gone read-only (``chattr +i`` here): the replica fails with
    what its load said and a note that the folder could not be removed, not with the removal's
    PermissionError in place of the load's reason."""
    handler = type("Handler", (_Counted,), {"folder": tmp_path, "asked": threading.Event(), "go": threading.Event()})
    uri, sha256 = _version(tmp_path, "stuck")
    with loopback.http_server(handler) as url:
        first = onnx_app.OnnxModel.func_or_class(f"{url}/{pathlib.Path(uri).name}", sha256, "m")
        held = nodecache.hold(sha256)
        first.__del__()
        models = cache / "edgeplane-genai-models"
        (models / sha256 / "model.onnx.data").write_bytes(b"\0" * 100)
        if subprocess.run(["chattr", "+i", str(models)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is refused here (not root, or a file system without it)")
        try:
            with pytest.raises(Exception, match=r"could not load the model|model\.onnx\.data") as failed:
                onnx_app.OnnxModel.func_or_class(f"{url}/{pathlib.Path(uri).name}", sha256, "m")
        finally:
            subprocess.run(["chattr", "-i", str(models)], check=True)
        assert not isinstance(failed.value, PermissionError)
        assert f"its unpacked folder {models / sha256} could not be removed (Operation not permitted)" in "".join(
            failed.value.__notes__)
        assert _unpacked(cache) == {sha256}
        nodecache.let_go(held)


def test_a_package_broken_as_published_keeps_the_folder_its_replica_unpacked(
        tmp_path: pathlib.Path, cache: pathlib.Path) -> None:
    """A replica failing right after its own download and unpack: the next one takes the folder
    (and fails, removing it), so a broken package is downloaded at every other replica's start."""
    handler = type("Handler", (_Counted,), {"folder": tmp_path, "asked": threading.Event(), "go": threading.Event()})
    folder = onnx_models.save_with_external_data(tmp_path / "broken")
    (folder / "model.onnx.data").write_bytes(b"\0" * 10)
    sha256 = onnx_package.pack(folder, tmp_path / "broken.tar").sha256
    with loopback.http_server(handler) as url:
        for gets, kept in ((1, True), (1, False), (2, True)):
            with pytest.raises(Exception, match=r"could not load the model|model\.onnx\.data"):
                onnx_app.OnnxModel.func_or_class(f"{url}/broken.tar", sha256, "m")
            assert (handler.gets, _unpacked(cache) == {sha256}) == (gets, kept)


def test_a_plain_onnx_download_stays_while_served(
        tmp_path: pathlib.Path, cache: pathlib.Path, artifact_server: tuple[str, type[_Artifacts]]) -> None:
    """A plain ONNX file is what a later replica on the node loads: it is kept, not unpacked."""
    url, _ = artifact_server
    plain = onnx_models.build_identity(tmp_path / "plain.onnx", {"x": 1}).sha256
    replica = onnx_app.OnnxModel.func_or_class(f"{url}/plain.onnx", plain, "m")
    assert _downloaded(cache) == {f"{plain}.onnx"} and _unpacked(cache) == set()
    replica.__del__()


def test_a_generative_package_is_kept_unpacked_only(
        cache: pathlib.Path, genai_package: genai_model.GenAIModel) -> None:
    handler = type("Handler", (_Counted,), {"folder": genai_package.package.parent, "asked": threading.Event(),
                                            "go": threading.Event()})
    with loopback.http_server(handler) as url:
        first, second = (genai_app.GenAIReplica.func_or_class(f"{url}/{genai_package.package.name}", genai_package.sha256, "a")
                         for _ in range(2))
        assert handler.gets == 1 and _downloaded(cache) == set() and _unpacked(cache) == {genai_package.sha256}
        first.__del__()
        second.__del__()


_KILLED_BEFORE_REMOVING_ITS_DOWNLOAD = """
import sys
from edge_agent import packages
from orchestrator.serving import artifacts, nodecache
held = nodecache.hold(sys.argv[2])
path = artifacts.fetch_verified(sys.argv[1], sys.argv[2])
packages.unpack(path, sys.argv[2], artifacts.models_root(), runtime=packages.ONNX)
print("unpacked", flush=True)
sys.stdin.read()  # killed here, its download not yet removed
"""


def test_a_download_a_killed_replica_left_beside_its_folder_goes_with_the_next_replica(
        tmp_path: pathlib.Path, cache: pathlib.Path, artifact_server: tuple[str, type[_Artifacts]]) -> None:
    """A replica killed between its unpack and its download's removal left the tar beside the
    folder, and each later replica, taking the folder whole, kept it for as long as the version
    was served: twice its room on the disk."""
    url, _ = artifact_server
    uri, sha256 = _version(tmp_path, "killed")
    killed = subprocess.Popen([sys.executable, "-c", _KILLED_BEFORE_REMOVING_ITS_DOWNLOAD, f"{url}/{pathlib.Path(uri).name}",
                               sha256], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert killed.stdout is not None and killed.stdout.readline() == "unpacked\n"
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert _downloaded(cache) == {f"{sha256}.onnx"} and _unpacked(cache) == {sha256}
    replica = onnx_app.OnnxModel.func_or_class(f"{url}/{pathlib.Path(uri).name}", sha256, "m")
    assert _downloaded(cache) == set() and _unpacked(cache) == {sha256}
    replica.__del__()

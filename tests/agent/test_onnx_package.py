"""An ONNX model with its weights in external data, packed (``python -m
orchestrator.artifacts.onnx_package pack``) into one tar whose sha256 covers the graph and
its weights: served by an edge agent and a data-centre replica as the same model saved in one
file is, and refused, naming why, when the package is damaged or its graph reads a file from
outside it."""

from __future__ import annotations

import hashlib
import pathlib

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edge_agent import errors, footprint
from edgeplane_proto import oip
from orchestrator.agents import model
from orchestrator.artifacts import onnx_package, tarball
from orchestrator.serving import onnx_app
from orchestrator.testing import onnx_models

from .conftest import SITE, ArtifactServer, ControlPlane, MakeAgent
from .genai_packages import evil_package
from .test_agent import wait_model
from .test_model_io_types import _asgi

X = np.linspace(-1.0, 1.0, 8 * 16, dtype=np.float32).reshape(8, 16)


def relocated(folder: pathlib.Path, location: str) -> pathlib.Path:
    """``folder``'s graph naming ``location`` as its weights' file (which pack refuses to write)."""
    graph_path = folder / "model.onnx"
    proto = onnx.load(str(graph_path), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    graph_path.write_bytes(proto.SerializeToString())
    return folder


def sha256_of(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def infer(client: httpx.AsyncClient, name: str) -> np.ndarray:
    body, _ = oip.encode_request({"x": X})
    response = await client.post(f"/v2/models/{name}/infer", content=body)
    assert response.status_code == 200, response.text
    return oip.decode_response(response.content).outputs[0].array


# -- pack ---------------------------------------------------------------------------------


def test_pack_writes_a_tar_of_the_folder_and_prints_its_sha256_and_size(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = onnx_models.save_with_external_data(tmp_path / "model")
    out = tmp_path / "out" / "model.tar"
    assert onnx_package._main(["pack", str(folder), str(out)]) == 0
    printed = capsys.readouterr().out
    assert f'"sha256": "{sha256_of(out)}"' in printed and f'"size_bytes": {out.stat().st_size}' in printed
    assert '"external_data": [\n    "model.onnx.data"\n  ]' in printed
    again = tmp_path / "again.tar"
    onnx_package.pack(folder, again)
    assert again.read_bytes() == out.read_bytes()  # the same folder, the same digest


def _no_graph(folder: pathlib.Path) -> None:
    (folder / "model.onnx").unlink()


def _two_graphs(folder: pathlib.Path) -> None:
    (folder / "other.onnx").write_bytes((folder / "model.onnx").read_bytes())


def _graph_below(folder: pathlib.Path) -> None:
    (folder / "sub").mkdir()
    (folder / "model.onnx").rename(folder / "sub" / "model.onnx")


def _missing_data(folder: pathlib.Path) -> None:
    (folder / "model.onnx.data").unlink()


def _escaping(folder: pathlib.Path) -> None:
    relocated(folder, "../model.onnx.data")


def _absolute(folder: pathlib.Path) -> None:
    relocated(folder, str(folder / "model.onnx.data"))


def _link(folder: pathlib.Path) -> None:
    (folder / "model.onnx.data").rename(folder.parent / "elsewhere.data")
    (folder / "model.onnx.data").symlink_to(folder.parent / "elsewhere.data")


def _not_onnx(folder: pathlib.Path) -> None:
    (folder / "model.onnx").write_bytes(b"\xff\xff not a protobuf message")


@pytest.mark.parametrize(("spoil", "message"), [
    (_no_graph, "holds no .onnx graph"),
    (_two_graphs, "holds 2 .onnx graphs (model.onnx, other.onnx): an onnx package holds one"),
    (_graph_below, "graph sub/model.onnx is not at the folder's top"),
    (_missing_data, "keeps its data in 'model.onnx.data', which the folder"),
    (_escaping, "keeps its data in '../model.onnx.data', which is outside the folder"),
    (_absolute, "which is outside the folder"),
    (_link, "model.onnx.data is a symbolic link; a package holds regular files only"),
    (_not_onnx, "model.onnx is not an ONNX model"),
])
def test_pack_refuses_a_folder_no_agent_could_load_in_one_line_and_writes_nothing(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], spoil, message: str) -> None:
    folder = onnx_models.save_with_external_data(tmp_path / "model")
    spoil(folder)
    out = tmp_path / "model.tar"
    assert onnx_package._main(["pack", str(folder), str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured
    assert message in captured.err, captured.err
    assert list(tmp_path.glob("model.tar*")) == []


def test_pack_refuses_to_write_the_package_inside_the_folder(tmp_path: pathlib.Path) -> None:
    folder = onnx_models.save_with_external_data(tmp_path / "model")
    with pytest.raises(tarball.PackageError, match="write the package outside the folder"):
        onnx_package.pack(folder, folder / "model.tar")


def test_a_package_is_weighed_with_its_external_data() -> None:
    need = footprint.onnx_need(300 << 20, package=True)
    assert need.bytes == 900 << 20 and need.why == "3 x its 300.0 MB package (its graph and external data)"


# -- an edge agent ------------------------------------------------------------------------


def packed(artifact_server: ArtifactServer, folder: pathlib.Path, name: str) -> tuple[str, str]:
    out = artifact_server.root / name
    facts = onnx_package.pack(folder, out)
    return artifact_server.url(name), facts.sha256


def tarred(artifact_server: ArtifactServer, folder: pathlib.Path, name: str) -> tuple[str, str]:
    """``folder`` tarred as pack would, without its checks: a package only a hand could make."""
    out = artifact_server.root / name
    tarball.write(tarball.regular_files(folder), out)
    return artifact_server.url(name), sha256_of(out)


async def test_an_agent_serves_a_packed_model_as_it_serves_the_model_in_one_file(
        control_plane: ControlPlane, make_agent: MakeAgent, artifact_server: ArtifactServer, tmp_path: pathlib.Path) -> None:
    url, sha256 = packed(artifact_server, onnx_models.save_with_external_data(tmp_path / "model"), "packed.tar")
    agent = await make_agent(control_plane)
    control_plane.hub.set_assignments(SITE, [model.Assignment("m", "intent", "small", url, sha256)], version=1)
    state = await wait_model(control_plane, lambda s: s.phase in (model.ModelPhase.READY, model.ModelPhase.FAILED), name="m")
    assert state.phase is model.ModelPhase.READY, state.message
    async with httpx.AsyncClient(base_url=agent.endpoint_url) as client:
        metadata = (await client.get("/v2/models/m")).json()
        assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}], metadata
        np.testing.assert_array_equal(await infer(client, "m"), onnx_models.run_in_one_file(X))
    unpacked = agent.models_dir / sha256
    assert sorted(p.name for p in unpacked.iterdir()) == [".edgeplane-unpacked", "model.onnx", "model.onnx.data"]


async def test_an_agent_refuses_a_package_that_is_damaged_or_reads_outside_itself(
        control_plane: ControlPlane, make_agent: MakeAgent, artifact_server: ArtifactServer, tmp_path: pathlib.Path) -> None:
    escaping = relocated(onnx_models.save_with_external_data(tmp_path / "escaping"), "../model.onnx.data")
    absolute = onnx_models.save_with_external_data(tmp_path / "absolute")
    relocated(absolute, str(absolute / "model.onnx.data"))
    missing = onnx_models.save_with_external_data(tmp_path / "missing")
    (missing / "model.onnx.data").unlink()
    good_url, good_sha = packed(artifact_server, onnx_models.save_with_external_data(tmp_path / "good"), "tampered.tar")
    tampered = artifact_server.root / "tampered.tar"
    data = bytearray(tampered.read_bytes())
    data[600] ^= 0xFF  # a byte of the graph, changed after the digest was taken
    tampered.write_bytes(bytes(data))
    link, link_sha = evil_package(onnx_models.save_with_external_data(tmp_path / "link"), artifact_server.root / "link.tar", "symlink")
    wanted = {
        "escaping": (*tarred(artifact_server, escaping, "escaping.tar"),
                     "keeps its data in '../model.onnx.data', which is outside its package folder"),
        "absolute": (*tarred(artifact_server, absolute, "absolute.tar"), "which is outside its package folder"),
        "missing": (*tarred(artifact_server, missing, "missing.tar"),
                    "keeps its data in 'model.onnx.data', which its package folder does not hold"),
        "tampered": (good_url, good_sha, f"expected {good_sha}: refused"),
        "link": (artifact_server.url(link.name), link_sha, "package member 'weights.bin' is a link (to '/etc/passwd'): refused"),
    }
    agent = await make_agent(control_plane)
    control_plane.hub.set_assignments(
        SITE, [model.Assignment(name, "intent", "small", url, sha) for name, (url, sha, _) in wanted.items()], version=1)
    for name, (_, _, message) in wanted.items():
        state = await wait_model(control_plane, lambda s: s.phase is model.ModelPhase.FAILED, name=name)
        assert message in state.message, (name, state.message)
    # nothing half-unpacked, and nothing a refused package names outside it was read
    assert [p.name for p in agent.models_dir.iterdir() if not p.name.startswith(".")] == \
        [p.name for p in agent.models_dir.iterdir() if (p / ".edgeplane-unpacked").is_file()]
    assert not (agent.models_dir / link_sha).exists()


# -- a data-centre replica ----------------------------------------------------------------


async def test_a_data_centre_replica_serves_a_packed_model_alike(tmp_path: pathlib.Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEPLANE_ARTIFACT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "packed.tar"
    sha256 = onnx_package.pack(onnx_models.save_with_external_data(tmp_path / "model"), out).sha256
    served = onnx_app.OnnxModel.func_or_class(str(out), sha256, "m")
    transport = httpx.ASGITransport(app=lambda scope, receive, send: _asgi(served, scope, receive, send))
    async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
        np.testing.assert_array_equal(await infer(client, "m"), onnx_models.run_in_one_file(X))
    assert (tmp_path / "cache" / "edgeplane-genai-models" / sha256 / "model.onnx.data").is_file()


def test_a_data_centre_replica_refuses_a_graph_reading_outside_its_package(tmp_path: pathlib.Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEPLANE_ARTIFACT_CACHE", str(tmp_path / "cache"))
    folder = relocated(onnx_models.save_with_external_data(tmp_path / "model"), "../model.onnx.data")
    out = tmp_path / "escaping.tar"
    tarball.write(tarball.regular_files(folder), out)
    with pytest.raises(errors.ModelLoadError, match=r"keeps its data in '\.\./model\.onnx\.data', which is outside"):
        onnx_app.OnnxModel.func_or_class(str(out), sha256_of(out), "m")


def test_describe_model_reads_a_packages_graph_from_the_tar(tmp_path: pathlib.Path) -> None:
    from orchestrator.artifacts import signature

    out = tmp_path / "packed.tar"
    sha256 = onnx_package.pack(onnx_models.save_with_external_data(tmp_path / "model"), out).sha256
    assert signature.read(out, sha256) == {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}],
                                           "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]}


def test_a_packaged_graph_with_a_sequence_output_is_refused_as_a_file_is(tmp_path: pathlib.Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEPLANE_ARTIFACT_CACHE", str(tmp_path / "cache"))
    made = onnx_models.external_data_graph()
    made.graph.node.append(helper.make_node("SequenceConstruct", ["y"], ["ys"]))
    del made.graph.output[:]
    made.graph.output.append(helper.make_tensor_sequence_value_info("ys", TensorProto.FLOAT, None))
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save_model(made, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
                    size_threshold=0)
    out = tmp_path / "seq.tar"
    sha256 = onnx_package.pack(folder, out).sha256
    with pytest.raises(errors.ModelLoadError, match=r"the model's output 'ys' is seq\(tensor\(float\)\), not a tensor"):
        onnx_app.OnnxModel.func_or_class(str(out), sha256, "m")


async def test_an_agent_refuses_a_package_that_does_not_take_the_declared_inputs(
        control_plane: ControlPlane, make_agent: MakeAgent, artifact_server: ArtifactServer, tmp_path: pathlib.Path) -> None:
    from edgeplane_proto.assignment import DeclaredTensor

    url, sha256 = packed(artifact_server, onnx_models.save_with_external_data(tmp_path / "model"), "declared.tar")
    await make_agent(control_plane)
    declared = model.Assignment("m", "intent", "small", url, sha256,
                                inputs=(DeclaredTensor("x", "FP32", (-1, 5)),), outputs=(DeclaredTensor("y", "FP32", (-1, 4)),))
    control_plane.hub.set_assignments(SITE, [declared], version=1)
    state = await wait_model(control_plane, lambda s: s.phase is model.ModelPhase.FAILED, name="m")
    assert "input 'x' is declared FP32 [-1, 5], but the file takes FP32 [-1, 16]" in state.message, state.message


def test_a_folder_named_like_a_graph_is_not_taken_for_one(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model folder with a sub-folder whose name ends in .onnx ('exported.onnx/notes.txt')
    packs, as pack counts graphs among files only; a replica unpacks it and loads the one graph,
    and finds the unpacked folder whole the next time instead of unpacking it again."""
    monkeypatch.setenv("EDGEPLANE_ARTIFACT_CACHE", str(tmp_path / "cache"))
    folder = onnx_models.save_with_external_data(tmp_path / "model")
    (folder / "exported.onnx").mkdir()
    (folder / "exported.onnx" / "notes.txt").write_text("how it was exported")
    out = tmp_path / "packed.tar"
    sha256 = onnx_package.pack(folder, out).sha256
    for _ in range(2):
        served = onnx_app.OnnxModel.func_or_class(str(out), sha256, "m")
        assert served._model.inputs[0].name == "x"
    unpacked = tmp_path / "cache" / "edgeplane-genai-models" / sha256
    assert (unpacked / "exported.onnx" / "notes.txt").is_file()

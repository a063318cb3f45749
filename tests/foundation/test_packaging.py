"""Installing edgeplane: the build reads its metadata without deprecation warnings (an SPDX
license expression), the source distribution builds the same package as the checkout, and
``make`` shows pip's progress instead of a silent minute."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import tomllib

from tests import built_package

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_metadata_builds_without_warnings(tmp_path: pathlib.Path) -> None:
    script = ("import sys, setuptools.build_meta as b; "
              "print(b.prepare_metadata_for_build_wheel(sys.argv[1]))")
    proc = subprocess.run([sys.executable, "-W", "always", "-c", script, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "deprecat" not in (proc.stdout + proc.stderr).lower(), proc.stderr
    metadata = (tmp_path / proc.stdout.strip().splitlines()[-1] / "METADATA").read_text()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()


def test_the_build_asks_for_a_setuptools_that_reads_spdx_licenses() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    setuptools_req = next(r for r in project["build-system"]["requires"] if r.startswith("setuptools"))
    major = int(re.search(r">=\s*(\d+)", setuptools_req).group(1))  # type: ignore[union-attr]
    assert major >= 77, setuptools_req  # project.license as a string (PEP 639) needs setuptools 77


def test_make_shows_what_pip_installs() -> None:
    installs = [line for line in (REPO / "Makefile").read_text().splitlines() if "pip install" in line]
    assert installs
    assert not [line for line in installs if re.search(r"\s-q\b|--quiet", line)], installs


def test_the_source_distribution_builds_the_whole_package(tmp_path: pathlib.Path) -> None:
    """`pip install edgeplane-0.1.0.tar.gz` (or pip falling back to the sdist on a platform
    without a wheel) failed at once: the sdist left out protos/, from which the build
    generates the gRPC modules, and the example manifests the package carries."""
    unpacked = built_package.sdist(built_package.checkout_copy(tmp_path / "checkout"), tmp_path / "dist")
    lib = tmp_path / "lib"
    built = built_package.build_lib(unpacked, lib)
    assert built.returncode == 0, built.stdout + built.stderr
    for module in ("edgeplane_proto/agent/v1/agent_pb2.py", "edgeplane_proto/agent/v1/agent_pb2_grpc.py",
                   "edgeplane_proto/inference/v2/inference_pb2.py", "edgeplane_proto/inference/v2/inference_pb2_grpc.py",
                   "orchestrator/console/static/index.html", "orchestrator/examples/sites.yaml", "edge_agent/BUILD"):
        assert (lib / module).is_file(), module
    assert sorted(p.name for p in (lib / "orchestrator" / "examples" / "artifacts").iterdir()) == \
        sorted(p.name for p in (REPO / "manifests" / "examples" / "artifacts").iterdir())
    assert (unpacked / "edgeplane_proto" / "_jsonfloats.c").is_file()  # the native module builds from it, where it can


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_gpu_extra_brings_what_counts_the_gpus() -> None:
    """An agent installed with `pip install 'edgeplane[gpu]'` on a GPU server counts its GPUs
    through NVML (``import pynvml``, the nvidia-ml-py package), which the extra did not
    install: the agent reported no GPU, and since what an agent measures wins over what its
    Site declares, placement saw none there and put no GPU variant on it."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "nvidia-ml-py" in _names(extras["gpu"]), extras["gpu"]
    assert not _names(extras["cpu"]) & {"nvidia-ml-py", "pynvml"}, extras["cpu"]


def test_a_build_over_an_earlier_one_carries_only_the_examples_there_now(tmp_path: pathlib.Path) -> None:
    """pip builds a checkout in its build/ folder, where the last build's files stay: an
    example manifest removed since (or renamed) stayed in the package's examples, and
    `edgeplane demo`, which applies every manifest there, applied it too."""
    sources = built_package.checkout_copy(tmp_path / "sources")
    lib = tmp_path / "lib"
    assert (first := built_package.build_lib(sources, lib)).returncode == 0, first.stdout + first.stderr
    examples = sources / "manifests" / "examples"
    (examples / "deployments.yaml").rename(examples / "fleet-deployments.yaml")
    assert (second := built_package.build_lib(sources, lib)).returncode == 0, second.stdout + second.stderr

    def files(folder: pathlib.Path) -> list[str]:
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files(lib / "orchestrator" / "examples") == files(examples)

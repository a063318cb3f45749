"""Build hooks: generate the gRPC code from protos/ before packaging, put the example
manifests in the package, and compile the one native module.

The protocol is defined once in ``protos/`` and the Python modules are produced by
``grpc_tools.protoc`` at build time (regular and editable installs alike), so the
generated files are never edited by hand nor committed.

``edgeplane_proto._jsonfloats`` reads large JSON number arrays on several cores (v2 JSON
tensors, docs/benchmarks.md). It is C (a C compiler is all it needs) and optional: where
no compiler or Python headers are found, the install goes on without it and the codec
reads those arrays with simdjson alone.
"""

from __future__ import annotations

import os
import pathlib
import re
import runpy
import shutil
import subprocess

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).resolve().parent


class BuildWithProtos(build_py):
    def run(self) -> None:
        runpy.run_path(str(ROOT / "protos" / "generate.py"), run_name="edgeplane_build")["generate"]()
        super().run()
        # the version an agent of this build reports to the control plane (edge_agent.build);
        # an editable install runs the sources in place, which report the bare version
        if getattr(self, "editable_mode", False):
            return
        baked = pathlib.Path(self.build_lib) / "edge_agent" / "BUILD"
        baked.parent.mkdir(parents=True, exist_ok=True)
        baked.write_text(build_version(self.distribution.get_version(), build_id()) + "\n", encoding="utf-8")
        # the example manifests and the artifacts they name, which `edgeplane demo` applies
        # (orchestrator.testing.harness.EXAMPLES); a source tree reads manifests/examples. Copied
        # whole over no earlier build's copy: the demo applies every manifest there, and one
        # removed or renamed since would otherwise stay in build/ and in the package
        examples = pathlib.Path(self.build_lib) / "orchestrator" / "examples"
        shutil.rmtree(examples, ignore_errors=True)
        shutil.copytree(ROOT / "manifests" / "examples", examples)


def build_id() -> str:
    """What tells this build from another of the same version: ``EDGEPLANE_BUILD`` (an image
    built without the repository's history: ``--build-arg EDGEPLANE_BUILD=...``), else
    ``git describe --always --dirty`` of the tree built, else nothing."""
    given = os.environ.get("EDGEPLANE_BUILD", "").strip()
    if given or not (ROOT / ".git").exists():
        return given
    try:
        described = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                                   text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return ""
    return described.stdout.strip()


def build_version(version: str, build: str) -> str:
    """``version+build`` (a PEP 440 local label: letters, digits and dots), at most the 64
    characters the control plane takes."""
    label = re.sub(r"[^A-Za-z0-9]+", ".", build).strip(".")
    return (f"{version}+{label}" if label else version)[:64].rstrip(".+")


class OptionalBuildExt(build_ext):
    """Builds the native module when it can; says why and goes on when it cannot."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - no compiler, no headers: the module is optional
            self._skipped(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - as above
            self._skipped(exc)

    @staticmethod
    def _skipped(exc: Exception) -> None:
        print(f"edgeplane: native JSON number reader not built ({exc}); large JSON tensors are read with simdjson alone")


JSONFLOATS = Extension(
    "edgeplane_proto._jsonfloats",
    sources=["edgeplane_proto/_jsonfloats.c"],
    extra_compile_args=["-std=gnu11", "-O3", "-fvisibility=hidden", "-Wall", "-Wextra"],
    extra_link_args=["-pthread"],
)

setup(cmdclass={"build_py": BuildWithProtos, "build_ext": OptionalBuildExt}, ext_modules=[JSONFLOATS])

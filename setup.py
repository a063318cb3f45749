"""Build hook: generate the gRPC code from protos/ before packaging.

The protocol is defined once in ``protos/`` and the Python modules are produced by
``grpc_tools.protoc`` at build time (regular and editable installs alike), so the
generated files are never edited by hand nor committed.
"""

from __future__ import annotations

import pathlib
import runpy

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).resolve().parent


class BuildWithProtos(build_py):
    def run(self) -> None:
        runpy.run_path(str(ROOT / "protos" / "generate.py"), run_name="edgeplane_build")["generate"]()
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})

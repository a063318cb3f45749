"""The package as its build makes it, run from outside the checkout.

Tests of what an installed edgeplane does build it from a copy of the checkout's files (a
clean clone's: what git tracks or would, no generated module, no compiled one), since the
build generates the gRPC modules where it runs and other tests of the session import them
meanwhile. ``setup.py build_py`` lays out the pure-Python part of the wheel: the same
files, without the optional native module.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

REPO = pathlib.Path(__file__).resolve().parents[1]


def checkout_copy(dest: pathlib.Path) -> pathlib.Path:
    """The checkout's files as a fresh clone has them, copied into ``dest``."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True, timeout=60).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():  # listed but deleted in the work tree: not in the clone either
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def sdist(sources: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """The source distribution of ``sources`` (as ``python -m build --sdist`` makes it), unpacked in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    script = "import sys, setuptools.build_meta as b; print(b.build_sdist(sys.argv[1]))"
    made = subprocess.run([sys.executable, "-c", script, str(out)], cwd=sources, capture_output=True, text=True,
                          check=True, timeout=120).stdout.strip().splitlines()[-1]
    with tarfile.open(out / made) as archive:
        archive.extractall(out, filter="data")
    return out / made.removesuffix(".tar.gz")


def build_lib(sources: pathlib.Path, out: pathlib.Path, build_id: str = "") -> subprocess.CompletedProcess[str]:
    """``setup.py build_py`` of ``sources`` into ``out`` (what the wheel holds, less the native module)."""
    env = {**os.environ, "EDGEPLANE_BUILD": build_id}
    return subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(out)], cwd=sources, env=env,
                          capture_output=True, text=True, timeout=120)


def installed(tmp_path: pathlib.Path, build_id: str = "") -> dict[str, str]:
    """The package built from a copy of the checkout into ``tmp_path/lib``; the environment that runs it from there."""
    lib = tmp_path / "lib"
    built = build_lib(checkout_copy(tmp_path / "sources"), lib, build_id)
    assert built.returncode == 0, built.stdout + built.stderr
    return {**os.environ, "PYTHONPATH": str(lib), "PYTHONUNBUFFERED": "1"}

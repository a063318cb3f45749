"""Writing a model folder as a package: one plain, uncompressed tar whose bytes depend on the
folder's files alone (their names in order, zeroed times, owners and modes), so the same
folder always gives the same sha256. Generative packages (``genai_package``) and onnx
packages (``onnx_package``) are both written here; agents and replicas unpack them alike
(``edge_agent.packages``)."""

from __future__ import annotations

import pathlib
import tarfile


class PackageError(Exception):
    """A model folder that would make a package no agent or replica loads."""


def regular_files(model_dir: pathlib.Path) -> list[tuple[str, pathlib.Path]]:
    """``model_dir``'s files as ``(name in the package, path)``, in the package's order;
    a symbolic link is refused (a package holds regular files only)."""
    files = []
    for path in sorted(model_dir.rglob("*")):
        rel = path.relative_to(model_dir).as_posix()
        if path.is_symlink():
            raise PackageError(f"{rel} is a symbolic link; a package holds regular files only")
        if path.is_file():
            files.append((rel, path))
    return files


def write(files: list[tuple[str, pathlib.Path]], out: pathlib.Path) -> None:
    """Tar ``files`` into ``out``, written whole or not at all (through ``out.partial``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for rel, path in files:
                info = tarfile.TarInfo(rel)
                info.size = path.stat().st_size
                info.mode = 0o644
                info.mtime = 0
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                with path.open("rb") as fh:
                    tar.addfile(info, fh)
        tmp.replace(out)
    except BaseException:  # a full disk, a file that shrank while read: no half-written package is left
        tmp.unlink(missing_ok=True)
        raise

"""Hostile generative-model packages: a valid model folder plus one member that tries to
leave it (``..``, an absolute path, a symbolic or hard link to a file outside)."""

from __future__ import annotations

import hashlib
import io
import pathlib
import tarfile


def evil_package(model_dir: pathlib.Path, out: pathlib.Path, kind: str) -> tuple[pathlib.Path, str]:
    with tarfile.open(out, "w") as tar:
        for path in sorted(model_dir.iterdir()):
            tar.add(path, arcname=path.name)
        member = tarfile.TarInfo()
        if kind == "dotdot":
            member.name = "../../escaped"
        elif kind == "absolute":
            member.name = str(out.parent / "escaped-absolute")
        elif kind == "symlink":
            member.name, member.type, member.linkname = "weights.bin", tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            member.name, member.type, member.linkname = "weights.bin", tarfile.LNKTYPE, "/etc/passwd"
        else:
            raise ValueError(kind)
        payload = b"escaped" if member.type == tarfile.REGTYPE else b""
        member.size = len(payload)
        tar.addfile(member, io.BytesIO(payload))
    return out, hashlib.sha256(out.read_bytes()).hexdigest()

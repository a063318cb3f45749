"""Generative-model package fuzzing: whatever a verified tar holds, ``packages.unpack`` either
unpacks exactly its files inside the model folder or refuses it with one line
(``PackageRefused``), and a refusal leaves nothing behind."""

from __future__ import annotations

import hashlib
import io
import pathlib
import tarfile
import tempfile

from hypothesis import example, given
from hypothesis import strategies as st

from edge_agent import packages

from .conftest import FUZZ, TRIED

CONFIG = packages.CONFIG_NAME
KINDS = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
         "fifo": tarfile.FIFOTYPE, "device": tarfile.CHRTYPE}
FORMATS = [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]
LONG_NAMES = [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]  # USTAR holds 255 bytes at most

# names built from the pieces that matter to a path: separators, dots, the config's own name,
# and components longer than a file system takes (a tar header cannot carry a NUL)
PIECES = ["a", "b", "model.onnx", CONFIG, "/", "//", ".", "..", "./", "../", "\\", "é", "\n", "x" * 130]
names = st.lists(st.sampled_from(PIECES), min_size=0, max_size=6).map("".join)
members = st.lists(st.tuples(names, st.sampled_from(sorted(KINDS)), st.binary(max_size=64)), max_size=8)


def _tar(entries: list[tuple[str, str, bytes]], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            info.type = KINDS[kind]
            if kind in ("symlink", "hardlink"):
                info.linkname = "a"
            info.size = len(data) if kind == "file" else 0
            tar.addfile(info, io.BytesIO(data) if kind == "file" else None)
    return buf.getvalue()


def _unpacked(root: pathlib.Path) -> dict[str, bytes | None]:
    """What a folder holds: relative name -> bytes (a file) or None (a folder)."""
    out: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        assert not path.is_symlink(), path
        out[path.relative_to(root).as_posix()] = path.read_bytes() if path.is_file() else None
    return out


def check(raw: bytes, entries: list[tuple[str, str, bytes]] | None) -> None:
    sha = hashlib.sha256(raw).hexdigest()
    with tempfile.TemporaryDirectory() as tmp:
        package, models = pathlib.Path(tmp, "p.tar"), pathlib.Path(tmp, "models")
        package.write_bytes(raw)
        try:
            folder = packages.unpack(package, sha, models, max_bytes=4096, max_files=6)
        except packages.PackageRefused as exc:
            assert str(exc) and "\n" not in str(exc) and len(str(exc)) < 400, str(exc)
            assert list(models.iterdir()) == [], "a refused package left something behind"
            return
        assert list(models.iterdir()) == [folder] and folder.name == sha
        got = _unpacked(folder)
        assert got.pop(packages.MARK) == b""  # the unpack's own, written last
        assert isinstance(got.get(CONFIG), bytes)
        if entries is not None:  # the tar as built: every member is where its name says, with its bytes
            want: dict[str, bytes | None] = {}
            for name, kind, data in entries:
                parts = [p for p in name.split("/") if p not in ("", ".")]
                if not parts:  # "." or "./": the package's own folder, not an entry in it
                    continue
                for i in range(1, len(parts)):
                    want.setdefault("/".join(parts[:i]), None)
                want["/".join(parts)] = data if kind == "file" else None
            assert got == want


@FUZZ
@given(members, st.booleans(), st.sampled_from(LONG_NAMES))
@example([(".", "dir", b"")], True, tarfile.GNU_FORMAT)  # the package's own folder as a member
def test_any_members(entries: list[tuple[str, str, bytes]], with_config: bool, fmt: int) -> None:
    TRIED["packages: random members"] += 1
    if with_config:
        entries = [(CONFIG, "file", b"{}"), *entries]
    check(_tar(entries, fmt), entries)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 1 << 16), st.sampled_from(["set", "cut", "insert"]), st.binary(min_size=1, max_size=40)),
                min_size=1, max_size=6),
       st.sampled_from(FORMATS))
def test_damaged_bytes(damage: list[tuple[int, str, bytes]], fmt: int) -> None:
    TRIED["packages: damaged bytes"] += 1
    raw = bytearray(_tar([(CONFIG, "file", b"{}"), ("sub/model.onnx", "file", bytes(range(200))), ("sub", "dir", b"")], fmt))
    for where, how, data in damage:
        at = where % len(raw)
        if how == "set":
            raw[at:at + len(data)] = data
        elif how == "cut":
            del raw[at:at + len(data) * 16]
        else:
            raw[at:at] = data
    check(bytes(raw), None)

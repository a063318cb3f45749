"""Unpacking model packages: verified first, atomically, and only inside the folder.

A ``runtime: onnx-genai`` artifact is a tar of a model folder, and so is a ``runtime: onnx``
artifact that keeps its weights in ONNX external data: one ``.onnx`` graph beside the files it
names (``artifacts.is_package`` tells it from a plain ONNX file by the tar's magic). Its bytes are checked against
the assignment's sha256 before the first member is read (the cache already refused a
mismatching download; this re-hashes the file on disk, so a package corrupted in the cache
is not unpacked either, and is removed from the cache to be fetched again). Then every member is checked before anything is written:

- regular files and folders only: no symbolic or hard links, devices or FIFOs;
- relative names without ``..``, absolute paths, backslashes or NUL, so nothing lands
  outside the folder whatever the tar says;
- at most ``max_files`` members and ``max_bytes`` unpacked, so a tar bomb is refused
  before it fills the disk;
- no member inside another that is a file (``a`` and ``a/b``), no name longer than the
  file system takes, and none deeper than ``MAX_DEPTH`` folders or longer than
  ``MAX_NAME_CHARS`` (a model folder is shallow; a path thousands of folders deep is only
  an attack on whatever walks it);
- a ``genai_config.json`` file at the top (a generative package), or one ``.onnx`` file, at
  the top, and no other anywhere (an onnx package: :func:`graph` names it);
- room for its members on the disk, with the reserve downloads keep (:mod:`edge_agent.diskspace`).

Members go into a fresh temporary folder beside the final one, which is renamed into
place only when all of them are written: a crash or a refusal leaves no half-unpacked
model, and the version already serving is never touched. The final folder is named by the
sha256, so a version unpacked once is reused, with no download and no hash, and its tar is then
not kept (the agent drops it from its cache, so a package served takes its room once). Every file and folder is synced to the disk
before that rename, and the rename after it: an edge site that loses power finds a version
either whole or not there, never a folder whose files the page cache had not written yet,
which would be reused (and fail) on every start. A folder is reused only when it holds the
mark (:data:`MARK`) written, and synced, as its last file: agents before the sync renamed
folders that a power loss could leave torn, and such a folder, with no mark, is unpacked
again, once, the first time an agent of this version loads its version.
"""

from __future__ import annotations

import errno
import os
import pathlib
import shutil
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from edge_agent import artifacts, diskspace, errors

if TYPE_CHECKING:  # tarfile and tempfile cost resident memory: imported when a package is unpacked
    import tarfile

CONFIG_NAME = "genai_config.json"
#: The runtimes whose artifacts may be packages, as assignments name them
GENAI = "onnx-genai"
ONNX = "onnx"
GRAPH_SUFFIX = ".onnx"
DEFAULT_MAX_BYTES = 256 << 30
DEFAULT_MAX_FILES = 4096
MAX_DEPTH = 64
MAX_NAME_CHARS = 1024
#: Written, and synced, into a folder as its unpack's last file: the folder was whole on the
#: disk before it was renamed into place (agents before the sync wrote none)
MARK = ".edgeplane-unpacked"


class PackageRefused(errors.ArtifactIntegrityError):
    """The package is not one this agent unpacks (links, traversal, too large, no config)."""


def _shown(name: str) -> str:
    """A member's name for a message: quoted, and cut short (a tar can name a member with
    thousands of characters)."""
    return repr(name) if len(name) <= 80 else repr(name[:77]) + "..."


def _check_name(name: str) -> str:
    """``name`` normalised ("./a//b" is "a/b"); "" for the package folder itself ("./")."""
    if not name or "\x00" in name or "\\" in name:
        raise PackageRefused(f"package member {_shown(name)} has an invalid name")
    if name.startswith("/") or pathlib.PurePosixPath(name).is_absolute():
        raise PackageRefused(f"package member {_shown(name)} is an absolute path: refused")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise PackageRefused(f"package member {_shown(name)} leaves the package folder ('..'): refused")
    if len(parts) > MAX_DEPTH or len(name) > MAX_NAME_CHARS:
        raise PackageRefused(f"package member {_shown(name)} is deeper than {MAX_DEPTH} folders or longer than "
                             f"{MAX_NAME_CHARS} characters: refused")
    return "/".join(parts)


def _graphs(folder: pathlib.Path) -> list[pathlib.Path]:
    """The ``.onnx`` files at ``folder``'s top (a folder so named is none: the package's
    check counts files only)."""
    return sorted(path for path in folder.glob("*" + GRAPH_SUFFIX) if path.is_file())


def graph(folder: pathlib.Path) -> pathlib.Path:
    """The ``.onnx`` graph of an unpacked onnx package (:func:`unpack` checked there is one)."""
    found = _graphs(folder)
    if len(found) != 1:
        raise PackageRefused(f"unpacked package {folder.name[:12]} holds {len(found)} .onnx graphs at its top, not one")
    return found[0]


def check_members(tar: tarfile.TarFile, max_bytes: int, max_files: int,
                  runtime: str = GENAI) -> list[tuple[tarfile.TarInfo, str]]:
    """Every member with its normalised name, or :class:`PackageRefused` naming the first bad
    one; the package holds at its top what a ``runtime`` model needs."""
    out: list[tuple[tarfile.TarInfo, str]] = []
    total = 0
    seen: set[str] = set()
    files: dict[str, str] = {}  # normalised name -> the name in the tar
    for member in tar:
        if len(out) >= max_files:
            raise PackageRefused(f"package has more than {max_files} members: refused")
        name = _check_name(member.name)
        if not name:
            if member.isdir():  # "./", first in a tar made with `tar -cf m.tar -C folder .`
                continue
            raise PackageRefused(f"package member {_shown(member.name)} has an empty name")
        if member.issym() or member.islnk():
            raise PackageRefused(f"package member {_shown(member.name)} is a link (to {_shown(member.linkname)}): refused")
        if not (member.isfile() or member.isdir()):
            raise PackageRefused(f"package member {_shown(member.name)} is not a regular file or folder: refused")
        if name in seen:
            raise PackageRefused(f"package member {_shown(member.name)} appears twice: refused")
        if name == MARK:
            raise PackageRefused(f"package member {_shown(member.name)} has the name of the agent's own mark of an unpack: refused")
        seen.add(name)
        if member.isfile():
            files[name] = member.name
        total += member.size
        if total > max_bytes:
            raise PackageRefused(f"package unpacks to more than {max_bytes} bytes: refused")
        out.append((member, name))
    for _, name in out:  # any order: "a/b" may come before the file "a"
        parent = name.rpartition("/")[0]
        while parent:
            if parent in files:
                raise PackageRefused(f"package member {_shown(name)} is inside {_shown(files[parent])}, which is a file: refused")
            parent = parent.rpartition("/")[0]
    if runtime == ONNX:
        _check_graph(files)
        return out
    if CONFIG_NAME in seen and CONFIG_NAME not in files:
        raise PackageRefused(f"package's {CONFIG_NAME} is a folder, not a file: not an onnxruntime-genai model")
    if CONFIG_NAME not in files:
        raise PackageRefused(f"package has no {CONFIG_NAME} at its top: not an onnxruntime-genai model")
    return out


def _check_graph(files: dict[str, str]) -> None:
    """An onnx package holds one ``.onnx`` graph, at its top: the one file onnxruntime is given."""
    graphs = sorted(name for name in files if name.endswith(GRAPH_SUFFIX))
    if not graphs:
        raise PackageRefused("package holds no .onnx graph: not an onnx model package")
    if len(graphs) > 1:
        shown = ", ".join(_shown(files[g]) for g in graphs[:4]) + (", ..." if len(graphs) > 4 else "")
        raise PackageRefused(f"package holds {len(graphs)} .onnx graphs ({shown}): an onnx package holds one")
    if "/" in graphs[0]:
        raise PackageRefused(f"package's graph {_shown(files[graphs[0]])} is not at its top: an onnx package holds it there")


def unpack(package: pathlib.Path, sha256: str, models_root: pathlib.Path, *, runtime: str = GENAI,
           max_bytes: int = DEFAULT_MAX_BYTES, max_files: int = DEFAULT_MAX_FILES,
           fsync: Callable[[int], None] = os.fsync,
           room: Callable[[pathlib.Path], diskspace.Room | None] = diskspace.room) -> pathlib.Path:
    """The model folder of ``package`` under ``models_root/<sha256>``, unpacked if not there
    yet; ``runtime`` says what the package holds (:data:`GENAI` or :data:`ONNX`). ``fsync``
    is the call that makes a file's or a folder's writes durable, ``room`` the one that says
    how much the disk has free."""
    import tarfile
    import tempfile

    models_root.mkdir(parents=True, exist_ok=True)
    final = models_root / sha256
    if _whole(final, runtime):
        return final  # renamed into place only once complete and on the disk
    artifacts.verify_file(package, sha256)  # before the first member is read
    _discard(final, models_root, sha256, runtime)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{sha256[:12]}-", dir=models_root))
    try:
        try:
            tar = tarfile.open(package, "r:")
        except tarfile.TarError as exc:
            raise PackageRefused(f"package {sha256[:12]} is not a tar archive: {exc}") from None
        with tar:
            try:
                members = check_members(tar, max_bytes, max_files, runtime)
                _refuse_unless_room(room(models_root), sha256, sum(member.size for member, _ in members))
                for member, name in members:
                    _write(tar, member, tmp / name, fsync)
            except tarfile.TarError as exc:
                raise PackageRefused(f"package {sha256[:12]} is a damaged tar archive: {exc}") from None
        with open(tmp / MARK, "wb") as mark:  # last: the files above are on the disk
            fsync(mark.fileno())
        for folder in sorted((p for p in tmp.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            _sync_folder(folder, fsync)  # the names in it, deepest first
        _sync_folder(tmp, fsync)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _whole(final, runtime):  # not a concurrent unpack of the same version
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            _sync_folder(models_root, fsync)  # the rename itself
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def unpacked(models_root: pathlib.Path, sha256: str, runtime: str = GENAI) -> pathlib.Path | None:
    """The folder :func:`unpack` made of ``sha256``'s package under ``models_root``, if it is
    there whole (its package need not be)."""
    final = models_root / sha256
    return final if _whole(final, runtime) else None


def reuse(models_root: pathlib.Path, sha256: str, runtime: str = GENAI) -> pathlib.Path | None:
    """:func:`unpacked`, removing first what is at the version's folder and is not whole (a
    folder damaged on the disk, or torn by a power loss under an agent before the mark), so
    that a download of the package counts the room it took as free: it is unpacked again."""
    if (folder := unpacked(models_root, sha256, runtime)) is not None:
        return folder
    _discard(models_root / sha256, models_root, sha256, runtime)
    return None


def size(folder: pathlib.Path) -> int:
    """The bytes of the files in an unpacked ``folder``: what a load of it reads."""
    return sum(entry.stat().st_size for entry in folder.rglob("*") if entry.is_file() and entry.name != MARK)


def _whole(folder: pathlib.Path, runtime: str) -> bool:
    """Whether ``folder`` is a version this module unpacked whole, and is still so on the
    disk as far as a look can tell (its config, or its graph, not deleted since)."""
    if not (folder / MARK).is_file():
        return False
    if runtime == ONNX:
        return len(_graphs(folder)) == 1
    return (folder / CONFIG_NAME).is_file()


def _discard(final: pathlib.Path, models_root: pathlib.Path, sha256: str, runtime: str) -> None:
    """Remove what is at ``final`` and not :func:`_whole`: a folder an agent before the sync
    renamed into place (a power loss may have left its files empty), or one damaged on the
    disk. Removed before the unpack, so it takes no room the unpack needs (the package it is
    unpacked from again was just verified); moved aside first, so an unpack of the same version
    that renamed a whole folder there meanwhile keeps it."""
    if not _whole(final, runtime):
        _remove(final, models_root, sha256)


def remove(models_root: pathlib.Path, sha256: str) -> None:
    """Remove the version's folder, whole or not: one whose files were damaged after its unpack
    (a removal cut short, a disk's fault), which its mark and graph do not tell, and a load of
    it did; it is downloaded, verified and unpacked again."""
    _remove(models_root / sha256, models_root, sha256)


def _remove(final: pathlib.Path, models_root: pathlib.Path, sha256: str) -> None:
    if not os.path.lexists(final):
        return
    aside = models_root / f".{sha256[:12]}-discarded-{os.getpid()}-{threading.get_ident()}"
    try:
        os.rename(final, aside)
    except FileNotFoundError:
        return
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


def _refuse_unless_room(room: diskspace.Room | None, sha256: str, unpacked: int) -> None:
    """ENOSPC, saying how much is missing, before the first member is written, when the
    package's members do not fit with the reserve to spare: a disk filled halfway through
    would fail the agent's other writes, and the unpack again at every retry."""
    if (why := diskspace.shortfall(room, unpacked)) is not None:
        raise OSError(errno.ENOSPC, f"package {sha256[:12]} unpacks to {unpacked / 1e6:.1f} MB, {why}")


def _sync_folder(folder: pathlib.Path, fsync: Callable[[int], None]) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsync(fd)
    finally:
        os.close(fd)


def _write(tar: tarfile.TarFile, member: tarfile.TarInfo, target: pathlib.Path, fsync: Callable[[int], None]) -> None:
    try:
        if member.isdir():
            target.mkdir(parents=True, exist_ok=True)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        src = tar.extractfile(member)
        if src is None:
            raise PackageRefused(f"package member {_shown(member.name)} cannot be read")
        with src, open(target, "xb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            fsync(dst.fileno())
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:  # the package's fault, not the disk's: not worth retrying
            raise PackageRefused(f"package member {_shown(member.name)} has a name longer than this file system takes: refused") from None
        raise


def prune(models_root: pathlib.Path, keep: set[str], unpacking: set[str]) -> None:
    """Remove unpacked versions not in ``keep`` and leftovers of interrupted unpacks, but
    not the temporary folder of a version in ``unpacking``, whose unpack may be under way."""
    if not models_root.is_dir():
        return
    spared = {f".{sha256[:12]}-" for sha256 in unpacking}  # as unpack names its temporary folder
    for entry in models_root.iterdir():
        if entry.name not in keep and entry.name[:14] not in spared:
            shutil.rmtree(entry, ignore_errors=True)

"""What the agent keeps across restarts, written atomically under ``--data-dir``.

``state.json`` holds the last assignment set so a rebooted agent whose uplink is down
serves the same models from its cache at once. ``replacing.json`` holds, per model whose
new version's load under ``replaceWhenFull`` unloaded the version serving first, that
version: an agent restarted mid-way still reports it (``replaced_sha256``), keeps its
artifact and loads it again if the new one fails. ``identity.json`` (mode 0600) holds the
agent id and credential the control plane issued, so a restart rejoins as the same agent
instead of spending the bootstrap token again. The credential lives only here and in
:mod:`edge_agent.uplink`; a later mTLS pass replaces both with a key and certificate.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import os
import pathlib
import re
import socket
from dataclasses import dataclass
from typing import Any

from edge_agent import assignments, errors

FORMAT = 1
_TMP_SEQ = itertools.count()
#: How :func:`write_bytes_atomic` names its temporary files: ``.<name>.<pid>.<counter>.tmp``.
_TMP_NAME = re.compile(r"\..+\.[0-9]+\.[0-9]+\.tmp")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Identity:
    site: str
    agent_id: str
    credential: str


def write_atomic(path: pathlib.Path, doc: dict[str, Any], mode: int = 0o644) -> None:
    write_bytes_atomic(path, json.dumps(doc, indent=1).encode(), mode)


def write_bytes_atomic(path: pathlib.Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` whole or not at all, durably. The temporary file is
    created 0600, so a private key is never readable by others on its way in."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique among live writers (process id, then a counter). One left by a crash under
    # the same name, once a reboot reused the pid, is removed: its mode may not be 0600.
    tmp = str(path.with_name(f".{path.name}.{os.getpid()}.{next(_TMP_SEQ)}.tmp"))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temporaries(folder: pathlib.Path, before: float) -> list[str]:
    """Remove from ``folder`` the temporary files of atomic writes that a crash or a power
    loss cut short, last modified before ``before`` (a ``time.time()``), and return their
    names. Called at start, with the data dir held, before any write of this agent's: the
    pid in a name may be a live process's since a reboot, so the name alone says nothing.
    Only regular files named as :func:`write_bytes_atomic` names them go; the files they
    were to replace are never such a name."""
    removed: list[str] = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not _TMP_NAME.fullmatch(entry.name):
            continue
        try:
            if not entry.is_file(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_mtime >= before:
                continue
            os.unlink(entry.path)
        except FileNotFoundError:
            continue
        except OSError as exc:  # a read-only disk: left, and said
            log.warning("cannot remove %s, left by a write a crash cut short: %s", entry.path, exc.strerror or exc)
            continue
        removed.append(entry.name)
    return removed


class Held(Exception):
    """Another live process holds the lock file; ``pid`` and ``host`` are what it wrote there
    ("" if unknown)."""

    def __init__(self, pid: str, host: str = "") -> None:
        super().__init__(pid)
        self.pid = pid
        self.host = host

    @property
    def holder(self) -> str:
        """The holder, for a message: "pid 4242"; "pid 1 on host agent-a" when it wrote
        another host name than this process's, as a process in another container does (its
        pid is its own namespace's: where containers share a volume, each one's is 1); ""
        when not known."""
        if not self.pid:
            return ""
        return f"pid {self.pid} on host {self.host}" if self.host and self.host != socket.gethostname() else f"pid {self.pid}"


def hold(path: pathlib.Path) -> int:
    """Lock ``path`` (``flock``, created if needed) for as long as the returned descriptor
    stays open, writing this process's pid and host name in it; :class:`Held` when another
    process holds it. The kernel drops the lock with its holder, ``kill -9`` included. (The
    control plane holds its SQLite file so, too.)"""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid, _, host = os.read(fd, 320).decode(errors="replace").strip().partition(" ")
        os.close(fd)
        raise Held(pid, host.strip()) if pid.isdigit() else Held("") from None
    except OSError:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    return fd


def _read(path: pathlib.Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise errors.StateError(f"cannot read {path}: {exc}") from exc
    written = doc.get("format") if isinstance(doc, dict) else None
    if type(written) is int and written > FORMAT:  # whole, and a newer agent's: not ours to set aside
        raise errors.NewerState(f"{path} was written by a newer edgeplane-agent (format {written}); this one reads format {FORMAT} "
                                "— upgrade it or use another --data-dir")
    if written != FORMAT:
        raise errors.StateError(f"{path} is not an edgeplane agent state file (format {FORMAT})")
    return doc


class StateStore:
    def __init__(self, data_dir: pathlib.Path) -> None:
        self.data_dir = data_dir
        self._state = data_dir / "state.json"
        self._identity = data_dir / "identity.json"
        self._replacing = data_dir / "replacing.json"

    def refuse_newer(self) -> None:
        """:class:`errors.NewerState` when a newer agent wrote ``state.json`` or ``identity.json``:
        asked at start, before anything in the data dir is written or set aside. A damaged
        file is left to the load that reads it."""
        for path in (self._state, self._identity):
            with contextlib.suppress(errors.StateError):
                _read(path)

    def load_assignments(self, site: str) -> assignments.AssignmentSet | None:
        """The saved assignment set; None when there is none for ``site`` or it cannot be
        read: what is assigned is then unknown, not nothing. It is a cache of what the
        control plane sends again at the next connection, so an unreadable file (damaged
        outside the agent: its own writes are atomic) does not keep the agent from
        starting: it is set aside, for inspection, under ``.unreadable``."""
        try:
            return self._saved_assignments(site)
        except errors.StateError as exc:
            kept = self.set_aside(self._state)
            log.error("%s; set aside as %s: starting with no saved assignment (the control plane sends them again "
                      "when it is reached)", exc, kept.name)
            return None

    def _saved_assignments(self, site: str) -> assignments.AssignmentSet | None:
        doc = _read(self._state)
        if doc is None or doc.get("site") != site:
            return None
        try:
            return assignments.AssignmentSet.from_json(doc["assignments"])
        except (KeyError, TypeError, ValueError) as exc:
            raise errors.StateError(f"{self._state} is malformed: {exc}") from exc

    def set_aside(self, path: pathlib.Path) -> pathlib.Path:
        """Rename an unreadable state file to ``<name>.unreadable`` (replacing an older one)."""
        kept = path.with_name(path.name + ".unreadable")
        os.replace(path, kept)
        return kept

    def save_assignments(self, site: str, desired: assignments.AssignmentSet) -> None:
        write_atomic(self._state, {"format": FORMAT, "site": site, "assignments": desired.to_json()})

    def load_replacing(self, site: str) -> dict[str, assignments.Replacement]:
        """Per model, the version its replacement under way unloaded first (replaceWhenFull),
        as the agent last saved it; none when there is no file, or one of another ``site``.
        A memory, not the control plane's word: one that does not read (damaged outside the
        agent, or a newer agent's) is logged and taken as none (a damaged one set aside
        under ``.unreadable``); the agent then reports no replacement, as before it kept one."""
        try:
            doc = _read(self._replacing)
            if doc is None or doc.get("site") != site:
                return {}
            return {str(name): assignments.Replacement.from_json(entry) for name, entry in doc["models"].items()}
        except errors.NewerState as exc:
            log.warning("%s: the replacements it names are not reported", exc)
            return {}
        except (errors.StateError, KeyError, TypeError, ValueError, AttributeError) as exc:
            try:
                kept = self.set_aside(self._replacing)
            except OSError as failed:
                log.warning("cannot read %s (%s), nor set it aside: %s", self._replacing, exc, failed.strerror or failed)
            else:
                log.warning("cannot read %s (%s); set aside as %s: no replacement under way is reported", self._replacing, exc,
                            kept.name)
            return {}

    def save_replacing(self, site: str, replacing: dict[str, assignments.Replacement]) -> None:
        """Save ``replacing`` (see :meth:`load_replacing`), or remove the file when it is empty."""
        if not replacing:
            self._replacing.unlink(missing_ok=True)
            return
        write_atomic(self._replacing, {"format": FORMAT, "site": site,
                                       "models": {name: entry.to_json() for name, entry in sorted(replacing.items())}})

    @property
    def identity_path(self) -> pathlib.Path:
        return self._identity

    def load_identity(self, site: str) -> Identity | None:
        doc = _read(self._identity)
        if doc is None or doc.get("site") != site:
            return None
        return Identity(site, str(doc.get("agent_id", "")), str(doc.get("credential", "")))

    def save_identity(self, identity: Identity) -> None:
        write_atomic(
            self._identity,
            {
                "format": FORMAT,
                "site": identity.site,
                "agent_id": identity.agent_id,
                "credential": identity.credential,
            },
            mode=0o600,
        )

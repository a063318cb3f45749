"""Room on a disk for what the agent writes there, with a reserve kept free.

A download, or the unpacking of a generative package, that filled the disk would keep it
full: the agent's other downloads and its ``state.json`` saves would fail, and so would
every retry of the write itself. Both are refused before a byte is written when what they
need does not fit with :func:`reserve` to spare. Shared by the download child
(:mod:`edge_agent.fetch`) and the unpacking (:mod:`edge_agent.packages`), so that the two
keep the same reserve and say the same thing.
"""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass

#: Left free by a download or an unpack, for the agent's state.json and other small writes.
RESERVE_MIN_BYTES = 64 << 20
RESERVE_MAX_BYTES = 1 << 30


@dataclass(frozen=True)
class Room:
    device: int  # st_dev: two folders on one disk share its room
    free: int  # bytes an unprivileged process may still write
    kept: int  # of which the reserve


def reserve(disk_bytes: int) -> int:
    """What a write leaves free on a disk of ``disk_bytes``: 1 % of it, at least
    ``RESERVE_MIN_BYTES`` and at most ``RESERVE_MAX_BYTES``."""
    return max(RESERVE_MIN_BYTES, min(disk_bytes // 100, RESERVE_MAX_BYTES))


def room(folder: pathlib.Path) -> Room | None:
    """The room on the disk that holds ``folder`` (or would: its nearest folder that exists);
    None for a file system that reports no size at all (some FUSE ones): not known."""
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    disk = os.statvfs(folder)
    if not disk.f_blocks:
        return None
    return Room(os.stat(folder).st_dev, disk.f_bavail * disk.f_frsize, reserve(disk.f_blocks * disk.f_frsize))


def shortfall(room: Room | None, needed: int, freed: int = 0) -> str | None:
    """Why ``needed`` bytes do not fit in ``room`` (``freed``: what the write gives back
    first), as the end of a sentence: "and 3210.5 MB are free, 320.0 MB of which are kept
    for the agent's own files"; None when they fit, or when the room is not known."""
    if room is None or needed <= room.free + freed - room.kept:
        return None
    return (f"and {(room.free + freed) / 1e6:.1f} MB are free, {room.kept / 1e6:.1f} MB of which are kept for the "
            "agent's own files")

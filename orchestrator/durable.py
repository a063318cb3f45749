"""Making a renamed or newly created file survive a crash of the host.

``fsync`` of a file puts its bytes on disk, not its name: the directory entry that a
create or an ``os.replace`` changed is the folder's data, and until the folder is synced
too a power cut may leave the old file, or none, where the new one was. The control plane's
CA files and the initial admin token are written once and relied on at every later start,
so each of them syncs its folder after it is in place.
"""

from __future__ import annotations

import os
import pathlib


def sync_folder(folder: pathlib.Path) -> None:
    """On disk when this returns: the names in ``folder`` (a file created, renamed or removed)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["sync_folder"]

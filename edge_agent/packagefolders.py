"""What the model registry loads packages through: where they are unpacked, and their loaders."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

from edge_agent import errors
from edge_agent.runtime import onnx

if TYPE_CHECKING:  # the daemon imports it with the first generative model it loads
    from edge_agent.runtime import genai

#: Loads a generative package: (the folder it was unpacked into, its sha256, whether on a GPU) -> the model.
PackageLoader = Callable[[pathlib.Path, str, bool], "genai.GenAIModel"]
#: Loads an onnx package (a graph with its external data): (the folder it was unpacked into, its sha256) -> the model.
OnnxPackageLoader = Callable[[pathlib.Path, str], onnx.OnnxModel]
T = TypeVar("T")


class PackageFolders(Protocol):
    """Where packages are unpacked, a folder a version (``edge_agent.packages`` behind it,
    imported only by an agent that unpacks one)."""

    def reuse(self, sha256: str, runtime: str) -> pathlib.Path | None:
        """The version's folder when an unpack finished it (its mark) and it still looks so;
        None otherwise, a folder that does not being removed first (it is unpacked again);
        :class:`errors.AgentError` when it cannot be (a read-only disk)."""

    def unpack(self, package: pathlib.Path, sha256: str, runtime: str) -> pathlib.Path:
        """The cached ``package`` verified and unpacked whole: its folder."""

    def size(self, folder: pathlib.Path) -> int:
        """The bytes of ``folder``'s files: what its load reads."""

    def remove(self, sha256: str) -> None:
        """Remove the version's folder, whole or not: a load of it failed (its files damaged
        since its unpack), and it is fetched, verified and unpacked again. Raises
        :class:`errors.AgentError` when it cannot (a read-only disk)."""


async def loaded(folders: PackageFolders | None, folder: pathlib.Path, sha256: str, reused: bool,
                 load: Callable[..., T], *args: object) -> T:
    """``load(folder, sha256, *args)`` on a thread. When it fails and ``folder`` was ``reused``
    as an earlier unpack left it (neither downloaded nor verified by this attempt), its files
    may have been damaged since, which its mark does not tell: it is removed (in the turn
    unpacks take), so that the next attempt, backed off as any, fetches the package again."""
    try:
        return await asyncio.to_thread(load, folder, sha256, *args)
    except Exception as exc:
        if not reused or folders is None:
            raise
        why = str(exc) if isinstance(exc, errors.AgentError) else f"{type(exc).__name__}: {exc}"
        try:
            await asyncio.to_thread(folders.remove, sha256)  # (said by the failure's message)
        except errors.AgentError as failed:  # a read-only disk: the next attempt tries again
            raise errors.ModelLoadError(f"{why}; its unpacked folder, reused as found, may have been damaged since "
                                        f"its unpack, and {failed}: the next attempt tries again") from None
    raise errors.ModelLoadError(f"{why}; its unpacked folder {folder} was removed: the package is downloaded, "
                                "verified and unpacked again at the next attempt")

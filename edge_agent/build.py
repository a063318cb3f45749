"""Which build of the agent this is: the version it reports to the control plane at each
join, and ``edgeplane-agent --version`` prints.

``edge_agent.__version__`` is the same in every build of a release, so the control plane
could not tell an agent that enforces newer rules from an older one. Building the package
(``setup.py``, a wheel or an image) bakes a ``BUILD`` file beside this module: the
distribution's version, with the build's identifier as its local label (``EDGEPLANE_BUILD``
at build time, else ``git describe --always --dirty`` of the tree built), such as
``0.1.0+g9323f84.dirty``. It is read from that file rather than with ``importlib.metadata``,
which would bring email, zipfile and shutil into the idle agent for one string. A source
tree run in place has no such file and reports ``__version__``.
"""

from __future__ import annotations

import pathlib

import edge_agent

#: The longest agent version the control plane takes at a join.
MAX_CHARS = 64
FILE_NAME = "BUILD"


def describe(folder: pathlib.Path = pathlib.Path(__file__).parent) -> str:
    """The version baked into ``folder``'s ``BUILD`` file by the package's build, else ``__version__``."""
    try:
        baked = (folder / FILE_NAME).read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return edge_agent.__version__
    return baked[:MAX_CHARS] or edge_agent.__version__

"""Telling a package (a tar) from an ONNX file by its first bytes.

Shared by the artifact cache, which tells a cached onnx artifact's kind before its load
(:func:`edge_agent.artifacts.is_package`), and the download child (:mod:`edge_agent.fetch`),
which tells it from the first bytes received, to count the room the package's unpack will
need before it writes a byte. An ONNX file is a protobuf message, which starts with a
field's tag, never with a tar's 257-byte name field followed by ``ustar``.
"""

from __future__ import annotations

#: Where a tar's header says it is one (POSIX ustar, and GNU tar's variant of it)
MAGIC_AT = 257
MAGIC = b"ustar"
#: The bytes :func:`is_tar` needs
HEAD_BYTES = MAGIC_AT + len(MAGIC)


def is_tar(head: bytes) -> bool:
    """Whether a file whose first bytes are ``head`` (at least :data:`HEAD_BYTES` of them,
    or all there are) is a tar."""
    return head[MAGIC_AT:HEAD_BYTES] == MAGIC

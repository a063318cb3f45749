"""Reading the files a command is given (manifests, ``--data @FILE``, a scenario, samples).

They are text, and a file that is not UTF-8 (a binary given by mistake) is the user's
mistake: one line naming the file and the first byte that is not, the same from every
command, never a decoding error reported as a bug.
"""

from __future__ import annotations

import pathlib
import sys

from orchestrator.cli.http import CliError


def read(path: str | pathlib.Path, code: int = 1) -> str:
    """The text of ``path``; :class:`CliError` with exit ``code`` when it is not UTF-8.
    ``OSError`` is the caller's to say (each names its option its own way)."""
    try:
        return pathlib.Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CliError(f"{path}: not UTF-8 text (byte {exc.start})", code) from exc


def read_stdin(option: str) -> str:
    """Standard input as text, for ``option`` (``-f -``, ``--data @-``) in the errors: closed,
    unreadable or not UTF-8 is a usage error, not a bug."""
    if sys.stdin is None or sys.stdin.closed:
        raise CliError(f"{option}: standard input is closed", 2)
    try:
        return sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CliError(f"{option}: standard input is not UTF-8 text (byte {exc.start})", 2) from None
    except OSError as exc:
        raise CliError(f"{option}: cannot read standard input: {exc.strerror or exc}", 2) from None

"""Reading the files a command is given (manifests, ``--data @FILE``, a scenario, samples).

They are text: UTF-8, or UTF-16 or UTF-32 behind a byte-order mark (what PowerShell 5's
``>`` writes), :mod:`orchestrator.unicode_text`. A file that is not (a binary given by
mistake) is the user's mistake: one line naming the file and the first byte that is not,
the same from every command, never a decoding error reported as a bug. A byte-order mark is
no part of the text: JSON and YAML parsers refuse it or read it as part of the first key.
"""

from __future__ import annotations

import os
import pathlib
import sys

from orchestrator import unicode_text
from orchestrator.cli.http import CliError


def read(path: str | pathlib.Path, code: int = 1) -> str:
    """The text of ``path`` without a byte-order mark; :class:`CliError` with exit ``code``
    when it is not text. ``OSError`` is the caller's to say (each names its option its own way)."""
    try:
        return unicode_text.decoded(pathlib.Path(path).read_bytes())
    except unicode_text.NotText as exc:
        raise CliError(f"{path}: {exc}", code) from exc


def manifest_texts(path: str, seen: set[pathlib.Path] | None = None) -> list[tuple[str, str]]:
    """``(name, text)`` of each manifest file ``-f path`` names: the file, or every ``.yaml``,
    ``.yml`` and ``.json`` of the directory. A path that does not exist, a directory without
    one, a link among them that leads to no file, or a file or directory this user may not
    read is a usage error (exit 2) naming it,
    the same from every command that takes ``-f``. ``seen`` (resolved paths) skips a file
    named before (``-f dir -f dir/a.yaml``) and records those read."""
    from orchestrator.manifests import loader  # its schema takes ~0.2 s to import: only commands that read files pay

    out: list[tuple[str, str]] = []
    try:
        target = pathlib.Path(path)
        if not target.exists():
            raise CliError(f"{path}: no such file or directory", 2)
        files = loader.manifest_files(target)
        if not files:
            raise CliError(f"{path}: no .yaml, .yml or .json files in this directory", 2)
        for f in files:
            if f.is_symlink() and not f.exists():  # a file moved away, or a loop: its part of the fleet is not left out unsaid
                raise CliError(f"{f}: a link to {os.readlink(f)}, which leads to no file", 2)
            if seen is not None:
                if f.resolve() in seen:
                    continue
                seen.add(f.resolve())
            out.append((str(f), read(f)))
    except OSError as exc:  # permission denied, an I/O error: the user's to fix, not a bug
        raise CliError(f"{exc.filename or path}: {exc.strerror or exc}", 2) from None
    return out


def read_stdin(option: str) -> str:
    """Standard input as text, for ``option`` (``-f -``, ``--data @-``) in the errors: closed,
    unreadable or not UTF-8 is a usage error, not a bug."""
    if sys.stdin is None or sys.stdin.closed:
        raise CliError(f"{option}: standard input is closed", 2)
    try:
        return unicode_text.decoded(sys.stdin.buffer.read())
    except unicode_text.NotText as exc:
        raise CliError(f"{option}: standard input is {exc}", 2) from None
    except OSError as exc:
        raise CliError(f"{option}: cannot read standard input: {exc.strerror or exc}", 2) from None

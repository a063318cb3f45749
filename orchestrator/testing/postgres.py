"""A throwaway PostgreSQL server for tests and benchmarks, from the Debian packages.

Why a real server: the PostgreSQL store must keep exactly the SQLite store's contract,
and only the real server shows its locking, transactions and types. The server runs
from a data directory in a fresh temporary folder, on a free loopback port, with its
unix socket in that folder; it refuses to run as root, so under root it runs as the
``postgres`` user the Debian package creates. ``make test`` installs the packages
(``tests/install-system-packages``); when they are missing the tests that need them skip
saying so.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pathlib
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator

from orchestrator.ports import free_port

MISSING = ("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/pg_ctl); "
           "install them with `tests/install-system-packages` (apt-get install postgresql)")


def bin_dir() -> pathlib.Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return pathlib.Path(found[-1]).parent if found else None


class PostgresServer:
    def __init__(self, bindir: pathlib.Path):
        self.bindir = bindir
        self.root = pathlib.Path(tempfile.mkdtemp(prefix="edgeplane-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True, cwd=self.root)

    def start(self) -> PostgresServer:
        if not self.data.exists():
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        # fsync off: the tests kill clients, never this server mid-write, and speed matters
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), "-w", "-t", "60", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        """A fresh, empty database on this server; returns its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def cleanup(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def running() -> Iterator[PostgresServer | str]:
    """The running server, or the reason there is none (a string)."""
    bindir = bin_dir()
    if bindir is None:
        yield MISSING
        return
    try:
        import psycopg  # noqa: F401
    except ImportError:
        yield "psycopg is not installed (pip install -e '.[dev]')"
        return
    server = PostgresServer(bindir)
    try:
        server.start()
    except subprocess.CalledProcessError as e:
        server.cleanup()
        yield f"PostgreSQL did not start: {(e.stderr or e.stdout).strip()[-300:]}"
        return
    try:
        yield server
    finally:
        server.cleanup()

"""A PostgreSQL server of a test's own, to stop and start while a run goes on.

The machine's shared PostgreSQL serves other test runs and must never be restarted; this one is made with
Debian's binaries (``initdb``, ``pg_ctl`` as the ``postgres`` user) in a temporary folder, listens on a free
loopback port with trust authentication, and is removed afterwards.
"""

from __future__ import annotations

import contextlib
import glob
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        pytest.fail(
            f"PostgreSQL's {name} is not installed under /usr/lib/postgresql/*/bin; `make services` installs it."
        )
    return found[-1]


@dataclass
class PrivatePostgres:
    """A running server: its data folder and port; ``stop`` and ``start`` restart it."""

    folder: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/amlrun"

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", _bin("pg_ctl"), "-D", str(self.folder / "data"), *args],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._pg_ctl("-o", options, "-l", str(self.folder / "server.log"), "-w", "start")

    def stop(self) -> None:
        # Fast: connections are cut as a restart or failover cuts them.
        self._pg_ctl("-m", "fast", "-w", "stop")


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A fresh server with an empty database ``amlrun``, stopped and removed at the end."""
    import psycopg

    folder = Path(tempfile.mkdtemp(prefix="amlrun-pg-"))
    shutil.chown(folder, "postgres", "postgres")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = PrivatePostgres(folder, port)
    try:
        subprocess.run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                _bin("initdb"),
                "-D",
                str(folder / "data"),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        server.start()
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True) as admin:
            admin.execute("CREATE DATABASE amlrun")
        yield server
    finally:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)

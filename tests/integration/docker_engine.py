"""The real Docker Engine the Docker target's tests run containers on, and helpers to watch it.

A test module uses the fixtures with ``pytest_plugins = ["tests.integration.docker_engine"]``. (PYTEST_DONT_REWRITE: test modules import it before pytest would.)
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_amlrun.targets.docker import LABEL_RUN_ID
from tests.conftest import REPO

SOCKET = "/var/run/docker.sock"


@pytest.fixture(scope="session")
def docker_api() -> Iterator[Any]:
    """The local Docker Engine, started (and the base image made) by scripts/docker.sh."""
    done = subprocess.run([str(REPO / "scripts" / "docker.sh")], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"scripts/docker.sh failed:\n{done.stdout}\n{done.stderr}")
    import docker

    client = docker.APIClient(base_url=f"unix://{SOCKET}", version="auto")
    yield client
    client.close()


@pytest.fixture
def docker_home(amlrun_home: Path, docker_api: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A fresh workspace, and compute_target="docker" meaning the local engine with default options."""
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    for key in [k for k in os.environ if k.startswith("AMLRUN_DOCKER_")]:
        monkeypatch.delenv(key)
    return docker_api


def containers_of(api: Any, run_id: str) -> list[dict[str, Any]]:
    return list(api.containers(all=True, filters={"label": f"{LABEL_RUN_ID}={run_id}"}))


class SocketProxy:
    """A socket forwarding every connection to the Docker daemon's unix socket, counting the bytes the daemon
    sends back: on TCP loopback (the local daemon, reached as a remote one) or on a unix socket of its own.

    Leaving it stops it: it refuses new connections and cuts those it forwards, as a daemon that went away.
    """

    def __init__(self, upstream: str = SOCKET, *, unix_path: Path | None = None) -> None:
        self.upstream = upstream
        if unix_path is None:
            self.server = socket.create_server(("127.0.0.1", 0))
            self.url = f"tcp://127.0.0.1:{self.server.getsockname()[1]}"
        else:
            self.server = socket.socket(socket.AF_UNIX)
            self.server.bind(str(unix_path))
            self.server.listen()
            self.url = f"unix://{unix_path}"
        self.received = 0
        self._count = threading.Lock()
        self._open: list[socket.socket] = []
        self.closed = False

    def __enter__(self) -> SocketProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Refuse new connections and cut those forwarded now."""
        self.closed = True
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread; close alone would not
        self.server.close()
        with self._count:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.closed:
                client.close()
                return
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(self.upstream)
            with self._count:
                self._open += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, dest: socket.socket, from_daemon: bool) -> None:
        try:
            while data := source.recv(65536):
                if from_daemon:
                    with self._count:
                        self.received += len(data)
                dest.sendall(data)
            dest.shutdown(socket.SHUT_WR)
        except OSError:
            pass

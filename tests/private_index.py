"""A package index that asks for a password: a PEP 503 "simple" index over HTTP with Basic auth.

It serves one small pure-Python wheel, built here, so that resolving and installing an environment whose
index URL carries ``${TOKEN}`` can be tested for real: the resolver and the installers must send the
password, and nothing they store may contain it. It listens on every address (a Docker build on the host
network and an SSH host in a network namespace reach it too) and logs each request's path and whether it
was authorized.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import socket
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PACKAGE = "amlrun-private-pkg"
MODULE = "amlrun_private_pkg"
VERSION = "1.0.0"
WHEEL = f"{MODULE}-{VERSION}-py3-none-any.whl"


def build_wheel(version: str = VERSION) -> tuple[str, bytes]:
    """A minimal wheel of ``amlrun-private-pkg``: its file name and bytes."""
    dist = f"{MODULE}-{version}.dist-info"
    files = {
        f"{MODULE}/__init__.py": f'"""Served only by the private test index."""\nVERSION = "{version}"\n',
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: amlrun-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        for name, text in files.items():
            data = text.encode()
            # A fixed time makes the wheel, and so its hash in a lock, the same on every build.
            wheel.writestr(zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0)), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{name},sha256={digest},{len(data)}")
        record.append(f"{dist}/RECORD,,")
        wheel.writestr(
            zipfile.ZipInfo(f"{dist}/RECORD", date_time=(2026, 1, 1, 0, 0, 0)), "\n".join(record) + "\n"
        )
    return f"{MODULE}-{version}-py3-none-any.whl", buffer.getvalue()


@dataclass
class PrivateIndex:
    """The running index: its port, the credentials it accepts, and what it was asked."""

    port: int
    user: str
    token: str
    requests: list[tuple[str, bool]] = field(default_factory=list)

    def url(self, host: str = "127.0.0.1", *, variable: str = "AMLRUN_TEST_INDEX_TOKEN") -> str:
        """The index URL as an environment spec writes it: the token as a ``${VAR}`` reference."""
        return f"http://{self.user}:${{{variable}}}@{host}:{self.port}/simple"

    def wheel_url(self, host: str = "127.0.0.1", *, variable: str = "AMLRUN_TEST_INDEX_TOKEN") -> str:
        """The URL of the index's wheel as a direct-URL requirement writes it, the token a ``${VAR}`` reference."""
        return f"http://{self.user}:${{{variable}}}@{host}:{self.port}/files/{WHEEL}"

    @property
    def authorized_downloads(self) -> int:
        return sum(1 for path, ok in self.requests if ok and path.endswith(".whl"))


@contextlib.contextmanager
def private_index(token: str, user: str = "amlrun") -> Iterator[PrivateIndex]:
    """Serve the index until the block ends; only ``user:token`` may read it."""
    wheel_name, wheel = build_wheel()
    sha = hashlib.sha256(wheel).hexdigest()
    expected = "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()
    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    index = PrivateIndex(port=port, user=user, token=token)

    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, *, body: bool) -> None:
            authorized = self.headers.get("Authorization") == expected
            index.requests.append((self.path, authorized))
            if not authorized:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="amlrun"')
                self.end_headers()
                return
            path = self.path.split("?")[0].rstrip("/")
            if path == "/simple":
                self._send("text/html", f'<a href="/simple/{PACKAGE}/">{PACKAGE}</a>'.encode(), body)
            elif path == f"/simple/{PACKAGE}":
                link = f'<a href="/files/{wheel_name}#sha256={sha}">{wheel_name}</a>'
                self._send("text/html", f"<html><body>{link}</body></html>".encode(), body)
            elif path == f"/files/{wheel_name}":
                self._send("application/octet-stream", wheel, body)
            else:
                self.send_response(404)
                self.end_headers()

        def _send(self, kind: str, data: bytes, body: bool) -> None:
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("", port), Handler)
    thread = threading.Thread(target=server.serve_forever, name="private-index", daemon=True)
    thread.start()
    try:
        yield index
    finally:
        server.shutdown()
        server.server_close()

"""The store at an fsspec URL (s3://, gs://, az://, memory://, ...): its objects, through the URL's file
system.

Object stores (S3, GCS, Azure) publish an object only when its single or multipart upload completes, so
they are written directly; any other file system gets the object under a temporary name, renamed into
place, so a final name never holds a partial object.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
from collections.abc import Iterator
from typing import Any, BinaryIO

from airflow_amlrun.snapshot.copying import CHUNK
from airflow_amlrun.snapshot.keys import TMP_PREFIX, tmp_name

# Protocols whose single PUT (or completed multipart upload) is atomic: no temp-name-and-rename needed.
_ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "memory"})


class RemoteBackend:
    """The objects of the store at the fsspec URL ``url`` (keys are checked by the caller).

    :param url: an fsspec URL.
    :param storage_options: passed to fsspec (credentials, ``client_kwargs``, ...).
    """

    def __init__(self, url: str, storage_options: dict[str, Any]) -> None:
        import fsspec.core  # deferred: remote stores are the less common, heavier path

        self.fs: Any
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self._atomic_put = any(p in _ATOMIC_PUT_PROTOCOLS for p in protocols)
        self.root: str = root.rstrip("/")

    def path(self, key: str) -> str:
        """The path of ``key`` in the URL's file system."""
        return f"{self.root}/{key}"

    def exists(self, key: str) -> bool:
        """Whether the object ``key`` exists."""
        return bool(self.fs.exists(self.path(key)))

    def get(self, key: str) -> bytes:
        """The bytes of object ``key``; raises ``FileNotFoundError`` if absent."""
        return bytes(self.fs.cat_file(self.path(key)))

    def read(self, key: str, offset: int, size: int) -> bytes:
        """At most ``size`` bytes of object ``key`` from byte ``offset``."""
        with self.fs.open(self.path(key), "rb") as f:
            f.seek(offset)
            return bytes(f.read(size))

    @contextlib.contextmanager
    def open_read(self, key: str) -> Iterator[BinaryIO]:
        """The object ``key`` open for reading."""
        with self.fs.open(self.path(key), "rb", block_size=8 * CHUNK) as f:
            yield f

    def list(self, prefix: str) -> list[str]:
        """Keys of all objects under ``prefix`` (recursive, all when empty), relative to it, sorted."""
        base = self.path(prefix) if prefix else self.root
        try:
            paths = self.fs.find(base)
        except FileNotFoundError:
            return []
        strip = base.rstrip("/") + "/"
        return sorted(
            p[len(strip) :]
            for p in paths
            if p.startswith(strip) and not posixpath.basename(p).startswith(TMP_PREFIX)
        )

    def put_fd(self, key: str, fd: int) -> None:
        """Write the content of the open file ``fd`` (from its current position) at ``key``."""
        final = self.path(key)
        with os.fdopen(os.dup(fd), "rb") as src:
            if self._atomic_put:
                with self.fs.open(final, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
            else:
                tmp = tmp_name(final)
                self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
                with self.fs.open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
                self.fs.mv(tmp, final)

    def put_bytes(self, key: str, data: bytes) -> int:
        """Write ``data`` at ``key``; returns the bytes written."""
        final = self.path(key)
        if self._atomic_put:
            self.fs.pipe_file(final, data)
        else:
            tmp = tmp_name(final)
            self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, final)
        return len(data)

"""Reading a folder a run wrote without ever leaving it: the files of outputs/ or logs/, no link followed out.

A run's folders are written by code the worker does not control (a script, a container running as root),
and the worker reads them afterwards with its own rights. A symlink ``outputs/x -> ~/.ssh/id_rsa`` must not
make the worker read that file, so here:

* a regular file is opened with ``O_NOFOLLOW`` relative to its parent folder's descriptor, and its
  ``fstat`` must be the entry the listing saw (same device and inode): a file swapped for a link or for
  another file between listing and opening is refused;
* folders are opened the same way (``O_DIRECTORY | O_NOFOLLOW``), so a folder swapped for a link is never
  entered, and folder links are not descended;
* a link to a regular file inside the folder yields that file's content under the link's name (a run's
  ``best.pt -> epoch_9.pt`` is what users expect to find among its outputs); the target is found with
  ``realpath``, checked to lie inside the folder, then opened one component at a time from the folder's
  descriptor with ``O_NOFOLLOW``, so nothing changed in between can lead it outside;
* a link leading outside the folder, dangling, or to a folder, and anything that is not a regular file
  (FIFO, socket, device) is skipped, and a warning names it and its target.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from collections.abc import Callable, Iterator

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Non-blocking, so that a FIFO put in a file's place cannot hang the open.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def confined_files(root: str | os.PathLike[str], warn: Callable[[str], None]) -> Iterator[tuple[str, int]]:
    """The regular files under ``root`` as ``(relative posix path, open descriptor)``, never leaving ``root``.

    Each descriptor is open until the consumer asks for the next file. What is skipped is reported through
    ``warn`` (see the module's docstring); a missing ``root`` yields nothing.

    :param root: the folder, e.g. a run's ``outputs``.
    :param warn: receives one message per skipped entry.
    """
    root = os.fspath(root)
    label = posixpath.basename(root.rstrip(os.sep)) or root
    try:
        root_fd = os.open(root, _DIR_FLAGS)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            warn(
                f"{label}/ is a symlink to {_readlink(root)!r} (or not a folder): nothing in it was collected. "
                f"A run's {label} are the files inside its own {label}/ folder."
            )
            return
        raise
    try:
        walk = _Walk(root_fd, _real_path(root_fd, root), label, warn)
        yield from walk.folder(root_fd, "")
    finally:
        os.close(root_fd)


class _Walk:
    """One walk under an open root folder."""

    def __init__(self, root_fd: int, real_root: str, label: str, warn: Callable[[str], None]) -> None:
        self.root_fd = root_fd
        self.real_root = real_root
        self.label = label
        self.warn = warn

    def folder(self, dir_fd: int, dir_rel: str) -> Iterator[tuple[str, int]]:
        # The whole listing, with each entry's own stat (not following links), is taken first: what is
        # opened afterwards must still be what was listed.
        listed: list[tuple[str, os.stat_result]] = []
        with os.scandir(dir_fd) as entries:
            for entry in entries:
                try:
                    listed.append((entry.name, entry.stat(follow_symlinks=False)))
                except OSError:
                    continue  # gone since it was listed
        for name, st in sorted(listed, key=lambda item: item[0]):
            rel = f"{dir_rel}/{name}" if dir_rel else name
            if stat.S_ISLNK(st.st_mode):
                yield from self.link(dir_fd, name, rel)
            elif stat.S_ISDIR(st.st_mode):
                sub = self._open(dir_fd, name, rel, st, _DIR_FLAGS)
                if sub is not None:
                    try:
                        yield from self.folder(sub, rel)
                    finally:
                        os.close(sub)
            elif stat.S_ISREG(st.st_mode):
                fd = self._open(dir_fd, name, rel, st, _FILE_FLAGS)
                if fd is not None:
                    try:
                        yield rel, fd
                    finally:
                        os.close(fd)
            else:
                self.warn(
                    f"{self._shown(rel)} is not a regular file (a FIFO, socket or device): not collected."
                )

    def link(self, dir_fd: int, name: str, rel: str) -> Iterator[tuple[str, int]]:
        try:
            target = os.readlink(name, dir_fd=dir_fd)
        except OSError:
            return  # gone since it was listed
        shown = f"{self._shown(rel)} is a symlink to {target!r}"
        resolved = os.path.realpath(os.path.join(self.real_root, *rel.split("/")[:-1], target))
        if resolved != self.real_root and not resolved.startswith(self.real_root + os.sep):
            self.warn(
                f"{shown}, outside {self.label}/: it was not read or collected. A run's {self.label} are the "
                f"files inside {self.label}/; copy a file there to keep it."
            )
            return
        parts = os.path.relpath(resolved, self.real_root).split(os.sep)
        fd = self._open_beneath(parts if parts != ["."] else [])
        if fd is None:
            self.warn(f"{shown}, which does not exist (or changed while it was collected): not collected.")
            return
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            self.warn(
                f"{shown}, a folder: not followed (the files inside {self.label}/ are collected under their "
                "own paths)."
            )
            return
        try:
            yield rel, fd
        finally:
            os.close(fd)

    def _open(self, dir_fd: int, name: str, rel: str, listed: os.stat_result, flags: int) -> int | None:
        try:
            fd = os.open(name, flags, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                self.warn(
                    f"{self._shown(rel)} changed while it was collected ({exc.strerror}): not collected."
                )
            return None
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (listed.st_dev, listed.st_ino):
            os.close(fd)
            self.warn(f"{self._shown(rel)} was replaced while it was collected: not collected.")
            return None
        return fd

    def _open_beneath(self, parts: list[str]) -> int | None:
        """Open ``parts`` (resolved, so link-free) from the root, following no link on the way."""
        fd = os.dup(self.root_fd)
        try:
            for i, part in enumerate(parts):
                flags = _DIR_FLAGS if i < len(parts) - 1 else _FILE_FLAGS
                try:
                    child = os.open(part, flags, dir_fd=fd)
                except OSError:
                    return None
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _shown(self, rel: str) -> str:
        return repr(f"{self.label}/{rel}")


def _real_path(fd: int, fallback: str) -> str:
    # The folder actually opened, even if its path was swapped since: the kernel knows it.
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(fallback)


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"

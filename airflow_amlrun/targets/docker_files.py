"""How files cross between the worker and a run's container, without the container reaching other files.

A container controls everything under its run folder: on a daemon that bind-mounts it, it can replace any
file there with a symbolic link to a path of the worker (``outputs/model -> /home/airflow/airflow.cfg``),
with a folder, a FIFO or a device node, at any moment. So the worker:
- keeps its own files (the log spool) outside the mounted folder, and writes nothing into it once the
  container started;
- opens what it reads there (the events file, ``ended_by``) with ``files.read_beneath``: no symbolic link is
  followed on the way, and only a regular file is read;
- takes ``outputs/`` and ``logs/`` out of the folder only once the container ended (``take_folder``), and
  keeps in them only regular files, folders and links to regular files inside (``keep_only_inside``); every
  entry left out is named in the task log;
- unpacks what comes back from a daemon as a tar (``extract_folder``) with the same rules;
- before it leaves a run folder behind, and when it collects one, removes the device nodes, FIFOs and sockets
  a container made there and clears every setuid and setgid bit (``defuse``): a container (root in it, on
  a daemon without user namespaces) could otherwise leave a setuid-root program or a device of the host's
  disk on the worker's machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO

from airflow_amlrun.targets.files import DIR_FLAGS, file_kind, require_tar_data_filter

log = logging.getLogger(__name__)

# Mode bits that make running a file (or making a file in a folder) take on its owner or group.
_PRIVILEGE_BITS = stat.S_ISUID | stat.S_ISGID


def take_folder(source: Path, dest: Path, *, what: str) -> list[str]:
    """Move the folder ``source`` (in a run folder whose container ended) to ``dest`` (one rename; check what
    it holds with ``keep_only_inside``); returns what was left out, one line each.

    A ``source`` that is no real folder (a link to one elsewhere, say) is left where it is, and ``dest`` made
    empty. ``dest`` must not exist. Raises OSError when the rename is refused (a folder of another user).
    """
    try:
        mode = os.lstat(source).st_mode
    except FileNotFoundError:
        dest.mkdir(parents=True)
        return []
    if not stat.S_ISDIR(mode):
        dest.mkdir(parents=True)
        return [f"{what} is {file_kind(mode)}{_link_target(source)}, not a folder: it was not collected"]
    os.rename(source, dest)
    return []


def keep_only_inside(root: Path, *, what: str) -> list[str]:
    """Remove from the folder ``root`` every entry that is not a regular file, a folder, or a symbolic link to
    a regular file inside ``root``; returns what was removed, one line each, as ``what/relative/path``."""
    removed: list[str] = []
    top = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
                continue
            shown = f"{what}/{os.path.relpath(path, root)}"
            if stat.S_ISLNK(mode):
                target = os.path.realpath(path)
                if os.path.commonpath([top, target]) == top and os.path.isfile(target):
                    continue
                removed.append(
                    f"{shown} is a symbolic link{_link_target(Path(path))} leading outside {what}/ "
                    "or to no regular file: it was not collected"
                )
            else:
                removed.append(f"{shown} is {file_kind(mode)}: it was not collected")
            os.unlink(path)
        # os.walk lists links to folders among dirnames but does not enter them; they were just removed.
        dirnames[:] = [d for d in dirnames if os.path.isdir(os.path.join(dirpath, d))]
    return removed


def defuse(root: Path, *, what: str = "run") -> list[str]:
    """Remove every device node, FIFO and socket from the folder ``root`` and clear every setuid and setgid bit
    in it, never following a symbolic link; returns what was done (or could not be), one line each, as
    ``what/relative/path``.

    Each folder is opened without following links and its entries are looked at through it, so a container
    that still runs cannot steer the walk out of ``root`` by swapping a folder for a link.
    """
    done: list[str] = []
    try:
        top = os.open(root, DIR_FLAGS)
    except FileNotFoundError:
        return done
    _defuse_folder(top, what, done)
    return done


def _defuse_folder(folder: int, shown: str, done: list[str]) -> None:
    """``defuse`` of the open folder ``folder`` (which it closes)."""
    try:
        mode = os.fstat(folder).st_mode
        if mode & _PRIVILEGE_BITS:
            _clear_privileges(lambda m: os.fchmod(folder, m), mode, shown, done)
        with os.scandir(folder) as entries:
            names = [entry.name for entry in entries]
        for name in names:
            path = f"{shown}/{name}"
            try:
                mode = os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(mode):
                continue  # not followed; collecting decides what a link may lead to
            if stat.S_ISDIR(mode):
                try:
                    inner = os.open(name, DIR_FLAGS, dir_fd=folder)
                except OSError as err:
                    done.append(f"{path} could not be opened ({err.strerror}): it was not checked")
                    continue
                _defuse_folder(inner, path, done)
            elif stat.S_ISREG(mode):
                if mode & _PRIVILEGE_BITS:
                    _clear_file_privileges(folder, name, path, done)
            else:
                try:
                    os.unlink(name, dir_fd=folder)
                except OSError as err:
                    done.append(f"{path} is {file_kind(mode)}, which could not be removed ({err.strerror})")
                else:
                    done.append(f"{path} was {file_kind(mode)}: it was removed")
    finally:
        os.close(folder)


def _clear_file_privileges(folder: int, name: str, shown: str, done: list[str]) -> None:
    if not hasattr(os, "O_PATH"):
        mode = os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode
        _clear_privileges(lambda m: os.chmod(name, m, dir_fd=folder), mode, shown, done)
        return
    # The very inode looked at, opened for nothing (O_PATH), changed through /proc: a link swapped in
    # meanwhile is not followed.
    handle = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
    try:
        mode = os.fstat(handle).st_mode
        if stat.S_ISREG(mode):
            _clear_privileges(lambda m: os.chmod(f"/proc/self/fd/{handle}", m), mode, shown, done)
    finally:
        os.close(handle)


def _clear_privileges(chmod: Callable[[int], None], mode: int, shown: str, done: list[str]) -> None:
    names = [name for bit, name in ((stat.S_ISUID, "setuid"), (stat.S_ISGID, "setgid")) if mode & bit]
    bits = " and ".join(names) + (" bits" if len(names) > 1 else " bit")
    try:
        chmod(stat.S_IMODE(mode) & ~_PRIVILEGE_BITS)
    except OSError as err:
        done.append(f"{shown} has its {bits}, which could not be cleared ({err.strerror})")
    else:
        done.append(f"{shown} had its {bits}: cleared")


def hand_over(root: Path, uid: int, gid: int) -> None:
    """Make the folder ``root``, just written by the worker (no container has seen it yet), and everything in
    it belong to uid:gid, the user its container runs as; links themselves, never what they lead to."""
    os.chown(root, uid, gid, follow_symlinks=False)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


def _link_target(path: Path) -> str:
    try:
        return f" (to {os.readlink(path)})"
    except OSError:
        return ""


def extract_folder(chunks: Iterable[bytes], dest: Path) -> list[str]:
    """Unpack a tar of one folder (as ``get_archive`` makes it: members named ``<name>/...``) as the new
    folder ``dest``; returns what was left out, one line each.

    The tar is unpacked into an empty folder of its own first, so that nothing in it can reach beside
    ``dest``; links leaving the folder, absolute links, device files and members outside it stay out.
    """
    folder = dest.name
    skipped: list[str] = []

    def only_inside(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
        if PurePosixPath(member.name).parts[:1] != (folder,):
            skipped.append(f"{member.name} is not inside {folder}/: it was not collected")
            return None
        try:
            return tarfile.data_filter(member, path)
        except tarfile.FilterError as err:
            skipped.append(f"{member.name}: {err}; it was not collected")
            return None

    require_tar_data_filter()
    staging = Path(tempfile.mkdtemp(prefix=f".fetch-{folder}-", dir=dest.parent))
    try:
        with spooled(chunks) as spool, tarfile.open(fileobj=spool) as tar:
            tar.extractall(staging, filter=only_inside)
        taken = staging / folder
        if taken.is_dir() and not taken.is_symlink():
            os.rename(taken, dest)
        else:
            dest.mkdir()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return skipped + keep_only_inside(dest, what=folder)


def regular_member(chunks: Iterable[bytes]) -> bytes | None:
    """The content of the one regular file in a tar of one file (as ``get_archive`` of a file returns it);
    None when the path was something else (a link, a folder)."""
    with spooled(chunks) as spool, tarfile.open(fileobj=spool) as tar:
        member = tar.next()
        extracted = tar.extractfile(member) if member is not None and member.isreg() else None
        return extracted.read() if extracted is not None else None


def copy_member_from(chunks: Iterable[bytes], offset: int, out: IO[bytes]) -> bool:
    """Write what the one regular file in a tar of one file holds past offset to out; False when the path was
    something else (a link, a folder)."""
    with spooled(chunks) as spool, tarfile.open(fileobj=spool) as tar:
        member = tar.next()
        extracted = tar.extractfile(member) if member is not None and member.isreg() else None
        if extracted is None:
            return False
        extracted.seek(offset)
        shutil.copyfileobj(extracted, out, 1 << 20)
    return True


@contextlib.contextmanager
def spooled(chunks: Iterable[bytes]) -> Iterator[IO[bytes]]:
    """A stream from the daemon in a temporary file (outputs may be larger than memory)."""
    spool: IO[bytes]
    with tempfile.TemporaryFile() as spool:
        for data in chunks:
            spool.write(data)
        spool.seek(0)
        yield spool


def replace_with_copy(
    source: Path, dest: Path, transform: Callable[[Iterable[bytes]], Iterable[bytes]] | None = None
) -> None:
    """Write a copy of the worker's file source as dest, whatever entry dest was (file, link, folder).

    :param transform: what the copy is made of, given the source's pieces (default: the pieces).
    """
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISDIR(os.lstat(dest).st_mode):
            shutil.rmtree(dest)
        else:
            os.unlink(dest)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with open(source, "rb") as src, os.fdopen(os.open(dest, flags, 0o644), "wb") as out:
        pieces: Iterable[bytes] = iter(lambda: src.read(1 << 20), b"")
        for data in transform(pieces) if transform is not None else pieces:
            out.write(data)

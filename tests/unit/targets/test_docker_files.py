"""Reading and collecting a run folder that a container controls: on real files, links, FIFOs and tars."""

from __future__ import annotations

import io
import os
import socket
import stat
import tarfile
from pathlib import Path

import pytest

from airflow_amlrun.errors import ConfigurationError
from airflow_amlrun.targets.docker_files import defuse, extract_folder, keep_only_inside, take_folder
from airflow_amlrun.targets.docker_transfer import owner_in
from airflow_amlrun.targets.files import UnsafeFileError, read_beneath


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, Path]:
    """A run folder (as a container leaves it) and a file of the worker beside it."""
    folder = tmp_path / "run"
    (folder / ".amlrun").mkdir(parents=True)
    secret = tmp_path / "secret.txt"
    secret.write_text("of the worker\n")
    return folder, secret


def test_a_regular_file_is_read_from_an_offset(run: tuple[Path, Path]) -> None:
    folder, _ = run
    (folder / ".amlrun" / "events.jsonl").write_bytes(b"one\ntwo\n")

    assert read_beneath(folder, ".amlrun/events.jsonl", offset=4) == b"two\n"
    assert read_beneath(folder, ".amlrun/events.jsonl", offset=0, limit=3) == b"one"
    assert read_beneath(folder, ".amlrun/missing") is None


@pytest.mark.parametrize("where", ["file", "folder"])
def test_no_link_is_followed_on_the_way_to_a_file(run: tuple[Path, Path], where: str) -> None:
    folder, secret = run
    if where == "file":
        (folder / ".amlrun" / "events.jsonl").symlink_to(secret)
        expected = ".amlrun/events.jsonl is a symbolic link"
    else:
        (secret.parent / "elsewhere").mkdir()
        (secret.parent / "elsewhere" / "events.jsonl").write_text("of the worker\n")
        os.rename(folder / ".amlrun", folder / ".gone")
        (folder / ".amlrun").symlink_to(secret.parent / "elsewhere")
        expected = ".amlrun is a symbolic link or not a folder"

    with pytest.raises(UnsafeFileError, match=expected):
        read_beneath(folder, ".amlrun/events.jsonl")


def test_a_fifo_is_refused_without_blocking(run: tuple[Path, Path]) -> None:
    folder, _ = run
    os.mkfifo(folder / ".amlrun" / "events.jsonl")  # opening it to read would wait for a writer forever

    with pytest.raises(UnsafeFileError, match="is a FIFO, not a regular file"):
        read_beneath(folder, ".amlrun/events.jsonl")


def test_taking_outputs_keeps_files_and_links_inside_and_drops_the_rest(
    run: tuple[Path, Path], tmp_path: Path
) -> None:
    folder, secret = run
    outputs = folder / "outputs"
    (outputs / "ckpt").mkdir(parents=True)
    (outputs / "ckpt" / "epoch1.bin").write_bytes(b"weights")
    (outputs / "latest").symlink_to("ckpt/epoch1.bin")
    (outputs / "stolen").symlink_to(secret)
    (outputs / "up").symlink_to("..")
    os.mkfifo(outputs / "pipe")
    dest = tmp_path / "collected"

    left_out = take_folder(outputs, dest, what="outputs")
    left_out += keep_only_inside(dest, what="outputs")

    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == [
        "ckpt",
        "ckpt/epoch1.bin",
        "latest",
    ]
    assert sorted(line.split(" ", 1)[0] for line in left_out) == [
        "outputs/pipe",
        "outputs/stolen",
        "outputs/up",
    ]
    assert all("not collected" in line for line in left_out)
    assert secret.read_text() == "of the worker\n"


def test_a_folder_that_is_a_link_is_not_taken(run: tuple[Path, Path], tmp_path: Path) -> None:
    folder, secret = run
    (folder / "logs").symlink_to(secret.parent)
    dest = tmp_path / "collected-logs"

    left_out = take_folder(folder / "logs", dest, what="logs")

    assert left_out == [f"logs is a symbolic link (to {secret.parent}), not a folder: it was not collected"]
    assert dest.is_dir() and list(dest.iterdir()) == []


def test_a_fetched_folder_stays_inside_its_destination(tmp_path: Path) -> None:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        _add(tar, "outputs/", tarfile.DIRTYPE)
        _add(tar, "outputs/model.txt", content=b"weights")
        _add(tar, "outputs/abs", tarfile.SYMTYPE, link="/etc/passwd")
        _add(tar, "outputs/escape", tarfile.SYMTYPE, link="../spool.txt")
        _add(tar, "outputs/hard", tarfile.LNKTYPE, link="../spool.txt")
        _add(tar, "spool.txt", content=b"overwritten")
    (tmp_path / "spool.txt").write_text("the worker's")

    left_out = extract_folder([data.getvalue()], tmp_path / "outputs")

    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["model.txt"]
    assert (tmp_path / "spool.txt").read_text() == "the worker's"
    assert len(left_out) == 4 and all("not collected" in line for line in left_out)


def test_defusing_leaves_no_special_file_and_no_setuid_bit_and_follows_no_link(
    run: tuple[Path, Path], tmp_path: Path
) -> None:
    folder, secret = run
    scratch = folder / "scratch"
    scratch.mkdir()
    (scratch / "rootsh").write_bytes(b"#!/bin/sh\n")
    (scratch / "rootsh").chmod(0o6755)
    scratch.chmod(0o2775)
    os.mkfifo(scratch / "fifo")
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(scratch / "socket"))
    # Beside the run folder: a setuid file and a FIFO of the worker, that links in the folder lead to.
    secret.chmod(0o4755)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.mkfifo(elsewhere / "fifo")
    (scratch / "to-secret").symlink_to(secret)
    (folder / "to-elsewhere").symlink_to(elsewhere)

    done = defuse(folder, what="run")

    modes = {p.relative_to(folder).as_posix(): os.lstat(p).st_mode for p in folder.rglob("*")}
    assert sorted(modes) == [".amlrun", "scratch", "scratch/rootsh", "scratch/to-secret", "to-elsewhere"]
    assert stat.S_IMODE(modes["scratch/rootsh"]) == 0o755 and stat.S_IMODE(modes["scratch"]) == 0o775
    assert sorted(done) == [
        "run/scratch had its setgid bit: cleared",
        "run/scratch/fifo was a FIFO: it was removed",
        "run/scratch/rootsh had its setuid and setgid bits: cleared",
        "run/scratch/socket was a socket: it was removed",
    ]
    # What the links lead to is untouched.
    assert stat.S_IMODE(secret.stat().st_mode) == 0o4755
    assert stat.S_ISFIFO(os.lstat(elsewhere / "fifo").st_mode)
    assert defuse(folder, what="run") == []  # nothing left to do


PASSWD = b"root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
GROUP = b"root:x:0:\nstaff:x:50:\nnogroup:x:65534:\n"


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("nobody", (65534, 65534)),
        ("nobody:staff", (65534, 50)),
        ("65534", (65534, 65534)),
        ("1234", (1234, 0)),
        ("1234:staff", (1234, 50)),
        ("nobody:77", (65534, 77)),
        ("root", (0, 0)),
    ],
)
def test_a_container_user_is_found_as_docker_finds_it(user: str, expected: tuple[int, int]) -> None:
    assert owner_in(PASSWD, GROUP, user, image="img", where="here") == expected


@pytest.mark.parametrize(
    ("user", "message"),
    [
        ("jovyan", "its /etc/passwd has no 'jovyan'"),
        ("nobody:wheel", "names the group 'wheel', which the image 'img' does not define"),
    ],
)
def test_a_container_user_the_image_does_not_define_is_refused(user: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        owner_in(PASSWD, GROUP, user, image="img", where="Docker option user")


def _add(
    tar: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, content: bytes = b"", link: str = ""
) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(content) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(content) if kind == tarfile.REGTYPE else None)
